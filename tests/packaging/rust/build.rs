//! Sets this program's run path to the libmoert the moert crate was built against, so that it
//! runs without LD_LIBRARY_PATH. A library cannot do it for the program (rust-lang/cargo#9554);
//! these lines are all a program needs.

fn main() {
    if let Ok(dir) = std::env::var("DEP_MOERT_RS_RPATH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
