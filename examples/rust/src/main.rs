//! Loads a moert model, runs a forward pass from four threads sharing one session, prints how
//! the routers spread the tokens, trains a few steps and saves and reloads a checkpoint.
//!
//!     cargo run --offline -- MODEL_FILE

use moert::{LayerKind, Mode, Model, MoeKey, Scope, Session, SessionOptions};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "examples/models/tiny_moe.moert".to_string());
    println!("moert {} (ABI {})", moert::version(), moert::abi_version());
    let model = Model::load(&path)?;
    let io = model.io()?;
    let (total, activated) = model.num_parameters()?;
    println!(
        "model '{}': {} layers, {total} parameters, {activated} activated per row",
        model.name()?,
        model.num_layers()?
    );
    if io.input != moert::InputKind::TOKENS {
        return Err("this example feeds token ids".into());
    }

    let rows = 64;
    let width = io.input_width as usize;
    let tokens: Vec<i32> = (0..rows * width)
        .map(|i| ((i * 7 + i / 3) % 64) as i32)
        .collect();

    // One session, four threads: the library serialises the calls.
    let mut options = SessionOptions::new()?;
    options.threads(2)?;
    let session = Arc::new(Session::new(&model, Some(&options))?);
    let rows_per_thread = rows / 4;
    let results: Vec<moert::Result<Vec<f32>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (session, tokens) = (Arc::clone(&session), &tokens);
                scope.spawn(move || {
                    let part =
                        &tokens[t * rows_per_thread * width..(t + 1) * rows_per_thread * width];
                    session.forward_tokens(part, rows_per_thread)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread panicked"))
            .collect()
    });
    let outputs = results.into_iter().collect::<moert::Result<Vec<_>>>()?;
    let out = outputs.concat();
    println!(
        "forward: {rows} rows on 4 threads -> out[0][0..2] = {:.5} {:.5} {:.5}",
        out[0], out[1], out[2]
    );
    session.forward_tokens(&tokens, rows)?;
    for layer in model.layers()? {
        if layer.kind == LayerKind::MOE {
            println!(
                "layer {} '{}' (top-{}): tokens per expert {:?}  MaxVio {:.3}",
                layer.index,
                layer.name,
                model.moe_int(layer.index, MoeKey::TOP_K)?,
                session.expert_counts(layer.index, Scope::LAST)?,
                session.max_vio(layer.index, Scope::LAST)?
            );
        }
    }

    let mut options = SessionOptions::new()?;
    options.mode(Mode::TRAINING)?.config("lr", "0.01")?;
    let trainer = Session::new(&model, Some(&options))?;
    let targets: Vec<i32> = (0..rows).map(|r| tokens[r * width + width - 1]).collect();
    for step in 1..=5 {
        trainer.zero_grad()?;
        trainer.forward_tokens(&tokens, rows)?;
        let loss = trainer.backward_loss(&targets)?;
        let st = trainer.step()?;
        println!(
            "step {step}: loss {loss:.4}, grad norm {:.4}",
            st.gradient_norm
        );
    }
    let dir = std::env::temp_dir().join(format!("moert-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ckpt = dir.join("step-5.moert");
    trainer.save(&ckpt)?;
    trainer.load(&ckpt)?;
    println!("checkpoint reloaded at step {}", trainer.step_count()?);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
