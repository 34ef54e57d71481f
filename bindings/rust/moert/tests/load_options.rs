//! Load limits through the safe crate, on the example model (110720 parameters, 433 KiB).

use moert::{Code, LoadOptions, Mode, Model, Session, SessionOptions};
use std::path::PathBuf;

fn model_path() -> PathBuf {
    match std::env::var_os("MOERT_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../examples/models/tiny_moe.moert"),
    }
}

fn expect_limit<T: std::fmt::Debug>(result: moert::Result<T>) -> String {
    let err = result.expect_err("the load should have been refused");
    assert_eq!(err.code(), Code::LIMIT, "{err}");
    assert_eq!(Code::LIMIT.name(), "MOERT_ERR_LIMIT");
    err.message().to_string()
}

#[test]
fn limits_refuse_model_loads_above_them_and_allow_those_below() {
    let path = model_path();
    let bytes = std::fs::read(&path).unwrap();
    let mut options = LoadOptions::new().unwrap();
    options.load_model(&path).unwrap();
    options.max_memory(400 << 10).unwrap();
    let message = expect_limit(options.load_model(&path));
    assert!(
        message.contains("moert_load_options_set_max_memory"),
        "{message}"
    );
    expect_limit(options.model_from_bytes(&bytes, None));
    options.max_memory(1 << 20).unwrap();
    assert_eq!(
        options
            .model_from_bytes(&bytes, None)
            .unwrap()
            .num_layers()
            .unwrap(),
        6
    );
    options.max_file_bytes(bytes.len() as u64 - 1).unwrap();
    expect_limit(options.load_model(&path));
    expect_limit(options.model_from_bytes(&bytes, None));
}

/// A checkpoint of one training step at `ckpt`, and a fresh training session of the same model.
fn checkpoint_and_fresh_session(ckpt: &std::path::Path) -> Session {
    let model = Model::load(model_path()).unwrap();
    let mut so = SessionOptions::new().unwrap();
    so.mode(Mode::TRAINING).unwrap();
    let a = Session::new(&model, Some(&so)).unwrap();
    a.zero_grad().unwrap();
    a.forward_tokens(&[0; 16 * 4], 16).unwrap();
    a.backward_loss(&[0; 16]).unwrap();
    a.step().unwrap();
    a.save(ckpt).unwrap();
    Session::new(&model, Some(&so)).unwrap()
}

#[test]
fn limits_bound_checkpoint_loads_and_a_refusal_keeps_the_session() {
    let dir = std::env::temp_dir().join(format!("moert-rust-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("ck.moert");
    let b = checkpoint_and_fresh_session(&ckpt);

    let mut options = LoadOptions::new().unwrap();
    options.max_memory(1 << 20).unwrap();
    expect_limit(options.load_checkpoint(&b, &ckpt));
    assert_eq!(b.step_count().unwrap(), 0);
    options.max_memory(u64::MAX).unwrap();
    options.load_checkpoint(&b, &ckpt).unwrap();
    assert_eq!(b.step_count().unwrap(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn confine_external_data_refuses_a_data_file_linked_from_outside() {
    let root = std::env::temp_dir().join(format!("moert-rust-confine-{}", std::process::id()));
    let dir = root.join("ck");
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("ck.moert");
    let b = checkpoint_and_fresh_session(&ckpt);
    // The checkpoint's data file moves out of its directory, and a link takes its place.
    let data: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .collect();
    assert_eq!(data.len(), 1, "{data:?}");
    let moved = root.join("elsewhere.data");
    std::fs::rename(&data[0], &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &data[0]).unwrap();

    let mut options = LoadOptions::new().unwrap();
    options.confine_external_data(true).unwrap();
    let message = expect_invalid_model(options.load_checkpoint(&b, &ckpt));
    assert!(
        message.contains("outside the model's directory"),
        "{message}"
    );
    assert_eq!(b.step_count().unwrap(), 0);
    expect_invalid_model(options.load_model(&ckpt));
    options.confine_external_data(false).unwrap();
    options.load_checkpoint(&b, &ckpt).unwrap();
    assert_eq!(b.step_count().unwrap(), 1);
    std::fs::remove_dir_all(&root).unwrap();
}

fn expect_invalid_model<T: std::fmt::Debug>(result: moert::Result<T>) -> String {
    let err = result.expect_err("the load should have been refused");
    assert_eq!(err.code(), Code::INVALID_MODEL, "{err}");
    err.message().to_string()
}

#[test]
fn a_description_only_model_answers_as_a_full_one_and_refuses_a_session() {
    let full = Model::load(model_path()).unwrap();
    let mut options = LoadOptions::new().unwrap();
    options.description_only(true).unwrap();
    let described = options.load_model(model_path()).unwrap();
    assert_eq!(
        described.num_parameters().unwrap(),
        full.num_parameters().unwrap()
    );
    assert_eq!(
        described.resident_bytes().unwrap(),
        full.resident_bytes().unwrap()
    );
    let err = Session::new(&described, None).expect_err("a session over no weights");
    assert_eq!(err.code(), Code::INVALID_ARGUMENT, "{err}");
    assert!(err.message().contains("description-only"), "{err}");
}
