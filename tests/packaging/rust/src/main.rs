//! A Rust program that links an installed libmoert through the moert crate, as a user's would.

fn main() -> moert::Result<()> {
    let path = std::env::args()
        .nth(1)
        .expect("usage: moert-consumer MODEL");
    let model = moert::Model::load(path)?;
    let session = moert::Session::new(&model, None)?;
    let out = session.forward_tokens(&[1, 2, 3, 4], 1)?;
    println!(
        "consumer: moert {}, {} outputs",
        moert::version(),
        out.len()
    );
    Ok(())
}
