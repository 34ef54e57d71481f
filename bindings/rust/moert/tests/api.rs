//! The safe crate against the example model: 4 token ids in, 64 logits out, MoE at 2 and 4.

use moert::{Code, Error, LayerKind, Mode, Model, MoeKey, Scope, Session, SessionOptions};
use std::path::PathBuf;
use std::sync::Arc;

fn model_path() -> PathBuf {
    match std::env::var_os("MOERT_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../examples/models/tiny_moe.moert"),
    }
}

fn batch(rows: usize, seed: usize) -> Vec<i32> {
    (0..rows * 4)
        .map(|i| ((i * 7 + i / 3 + seed * 13) % 64) as i32)
        .collect()
}

fn session(model: &Model, mode: Mode) -> Session {
    let mut options = SessionOptions::new().unwrap();
    options
        .mode(mode)
        .unwrap()
        .threads(2)
        .unwrap()
        .seed(7)
        .unwrap();
    Session::new(model, Some(&options)).unwrap()
}

fn expect_code<T: std::fmt::Debug>(result: moert::Result<T>, code: Code) -> Error {
    let err = result.expect_err("the call should have failed");
    assert_eq!(err.code(), code, "{err}");
    assert!(!err.message().is_empty(), "no message: {err:?}");
    err
}

/// One optimizer step over two micro-batches; the mean loss.
fn train_step(s: &Session, step: usize) -> f64 {
    s.zero_grad().unwrap();
    let mut sum = 0.0;
    for mb in 0..2 {
        let ids = batch(16, step * 2 + mb);
        s.forward_tokens(&ids, 16).unwrap();
        let targets: Vec<i32> = (0..16).map(|r| ids[r * 4 + 3]).collect();
        sum += s.backward_loss(&targets).unwrap();
    }
    let st = s.step().unwrap();
    assert!(st.learning_rate > 0.0 && st.gradient_norm > 0.0, "{st:?}");
    sum / 2.0
}

fn sum_squares(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

#[test]
fn versions_match_the_header() {
    moert::check_abi().unwrap();
    assert_eq!(moert::abi_version(), moert::BUILT_ABI_VERSION);
    let (ma, mi, pa) = moert::BUILT_VERSION;
    assert_eq!(moert::version(), format!("{ma}.{mi}.{pa}"));
    assert_eq!(moert::schema_version().0, 1);
    assert_eq!(Code::IO.name(), "MOERT_ERR_IO");
    assert_eq!(Code(999).to_string(), "MOERT_ERR_UNKNOWN");
}

#[test]
fn thread_safety_is_what_the_header_documents() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Model>();
    send_sync::<Session>();
    send::<SessionOptions>();
    // SessionOptions: !Sync is checked by the crate's compile_fail doc test.
}

#[test]
fn inspects_the_model() {
    let m = Model::load(model_path()).unwrap();
    assert_eq!(m.name().unwrap(), "tiny-moe");
    let layers = m.layers().unwrap();
    assert_eq!(layers.len(), 6);
    assert_eq!(layers[2].kind, LayerKind::MOE);
    assert_eq!(layers[2].name, "moe0");
    assert_eq!((layers[2].in_width, layers[2].out_width), (64, 64));
    assert_eq!(layers[5].kind, LayerKind::OUTPUT_HEAD);
    assert_eq!(m.vocab_size().unwrap(), 64);
    let io = m.io().unwrap();
    assert_eq!(
        (io.input, io.input_width, io.output_width),
        (moert::InputKind::TOKENS, 4, 64)
    );
    assert_eq!(m.num_parameters().unwrap(), (110720, 36032));
    assert_eq!(m.moe_int(2, MoeKey::NUM_EXPERTS).unwrap(), 8);
    assert_eq!(
        m.moe_int(2, MoeKey::SCORE_FUNCTION).unwrap(),
        moert::SCORE_SIGMOID
    );
    assert_eq!(
        m.moe_int(4, MoeKey::BALANCING_POLICY).unwrap(),
        moert::BALANCING_AUX_LOSS
    );
    assert_eq!(m.moe_float(2, MoeKey::ROUTED_SCALING_FACTOR).unwrap(), 2.5);
    expect_code(m.moe_int(1, MoeKey::TOP_K), Code::INVALID_ARGUMENT);
    expect_code(m.layer(99), Code::INVALID_ARGUMENT);
}

#[test]
fn forward_and_metrics() {
    let m = Model::load(model_path()).unwrap();
    let s = session(&m, Mode::INFERENCE);
    drop(m); // the session keeps what it needs
    let rows = 32;
    let ids = batch(rows, 0);
    let out = s.forward_tokens(&ids, rows).unwrap();
    assert_eq!(out.len(), rows * 64);
    assert!(out.iter().all(|v| v.is_finite()));
    let mut again = vec![0f32; rows * 64];
    s.forward_tokens_into(&ids, rows, &mut again).unwrap();
    assert_eq!(out, again, "forward is not deterministic");
    for layer in [2, 4] {
        let counts = s.expert_counts(layer, Scope::LAST).unwrap();
        assert_eq!(counts.len(), 8);
        assert_eq!(counts.iter().sum::<i64>(), rows as i64 * 2);
        assert!(s.max_vio(layer, Scope::LAST).unwrap() >= 0.0);
    }
    assert!(s.max_vio(moert::ALL_LAYERS, Scope::LAST).unwrap() >= 0.0);
    assert_eq!(
        s.expert_counts(2, Scope::EVAL).unwrap().iter().sum::<i64>(),
        2 * rows as i64 * 2
    );
    s.reset_metrics().unwrap();
    assert_eq!(
        s.expert_counts(2, Scope::EVAL).unwrap().iter().sum::<i64>(),
        0
    );

    expect_code(
        s.forward_tokens_into(&ids, rows, &mut [0f32; 3]),
        Code::INVALID_ARGUMENT,
    );
    expect_code(s.forward_tokens(&ids[..5], rows), Code::INVALID_ARGUMENT);
    // A row count far past the input is refused before rows * output_width outputs are
    // allocated (an allocation that size would abort the process).
    for huge in [1usize << 31, 1 << 40] {
        expect_code(s.forward_tokens(&ids, huge), Code::INVALID_ARGUMENT);
        expect_code(
            s.forward_tokens_masked(&ids, &[true; 4], huge),
            Code::INVALID_ARGUMENT,
        );
        expect_code(s.forward_hidden(&[0.0; 4], huge), Code::INVALID_ARGUMENT);
    }
    let mut bad = ids.clone();
    bad[0] = 1000;
    expect_code(s.forward_tokens(&bad, rows), Code::INVALID_ARGUMENT);
    assert!(s.forward_hidden(&[0.0; 4], 1).is_err());
    let e = expect_code(s.expert_counts(1, Scope::LAST), Code::INVALID_ARGUMENT);
    assert!(e.message().contains("MoE layers: [2, 4]"), "{e}");
    expect_code(s.zero_grad(), Code::INVALID_STATE);
}

#[test]
fn options_errors() {
    let mut o = SessionOptions::new().unwrap();
    expect_code(o.threads(0), Code::INVALID_ARGUMENT);
    expect_code(o.config("no_such_knob", "1"), Code::INVALID_ARGUMENT);
    expect_code(o.config("bad\0key", "1"), Code::INVALID_ARGUMENT);
    expect_code(o.mode(Mode(42)), Code::INVALID_ARGUMENT);
    o.config("check_finite", "false")
        .unwrap()
        .device(moert::Device::CUDA, 0)
        .unwrap();
    let m = Model::load(model_path()).unwrap();
    match Session::new(&m, Some(&o)) {
        Ok(_) => {} // a build with a CUDA backend and a GPU
        Err(e) => assert_eq!(e.code(), Code::UNSUPPORTED, "{e}"),
    }
}

#[test]
fn training_step_backward_and_parameters() {
    let m = Model::load(model_path()).unwrap();
    let s = session(&m, Mode::TRAINING);
    s.set_config("lr", "0.01").unwrap();
    let params = s.parameters().unwrap();
    assert!(params.contains(&moert::ParameterInfo {
        name: "moe0.w1".into(),
        numel: 8 * 32 * 64
    }));
    let before = s.get_parameter("moe0.w1").unwrap();

    let first = train_step(&s, 0);
    assert!(first > 3.0 && first < 6.0, "first loss {first}");
    let grad = s.get_gradient("moe0.w1").unwrap();
    assert!(sum_squares(&grad) > 0.0, "zero gradient");
    assert_ne!(
        before,
        s.get_parameter("moe0.w1").unwrap(),
        "the step changed nothing"
    );
    assert_eq!(s.step_count().unwrap(), 1);
    assert!(
        sum_squares(&s.expert_bias(2).unwrap()) > 0.0,
        "the loss-free bias did not move"
    );
    for i in 0..5 {
        train_step(&s, i + 1);
    }
    assert!(train_step(&s, 0) < first, "the loss did not fall");

    s.set_parameter("moe0.w1", &before).unwrap();
    assert_eq!(s.get_parameter("moe0.w1").unwrap(), before);
    let mut nan = before.clone();
    nan[1] = f32::NAN;
    expect_code(s.set_parameter("moe0.w1", &nan), Code::NUMERIC);
    s.set_gradient("moe0.w1", &vec![0.0; grad.len()]).unwrap();
    assert_eq!(sum_squares(&s.get_gradient("moe0.w1").unwrap()), 0.0);
    expect_code(s.get_parameter("nope"), Code::INVALID_ARGUMENT);

    s.set_expert_bias(2, &[0.0; 8]).unwrap();
    s.set_bias_frozen(moert::ALL_LAYERS, true).unwrap();
    train_step(&s, 3);
    assert_eq!(
        sum_squares(&s.expert_bias(2).unwrap()),
        0.0,
        "a frozen bias moved"
    );
    s.set_bias_frozen(moert::ALL_LAYERS, false).unwrap();
    s.set_bias_update_rate(2, 0.0).unwrap();
    expect_code(s.set_bias_update_rate(2, -1.0), Code::INVALID_ARGUMENT);

    s.set_eval(true).unwrap();
    s.forward_tokens(&batch(4, 2), 4).unwrap();
    expect_code(s.backward_loss(&[0; 4]), Code::INVALID_STATE);
    s.set_eval(false).unwrap();

    s.forward_tokens(&batch(4, 5), 4).unwrap();
    assert!(s.backward(&[0.01; 4 * 64], None).unwrap() >= 0.0);
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moert-rust-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn checkpoint_resumes_bit_identically() {
    let dir = temp_dir("ckpt");
    let ckpt = dir.join("step-2.moert");
    let m = Model::load(model_path()).unwrap();
    let (a, b) = (session(&m, Mode::TRAINING), session(&m, Mode::TRAINING));
    train_step(&a, 0);
    train_step(&a, 1);
    a.save(&ckpt).unwrap();
    train_step(&a, 2);
    b.load(&ckpt).unwrap();
    assert_eq!(b.step_count().unwrap(), 2);
    train_step(&b, 2);
    assert_eq!(
        a.get_parameter("moe1.w2").unwrap(),
        b.get_parameter("moe1.w2").unwrap()
    );
    let cm = Model::load(&ckpt).unwrap();
    assert_eq!(cm.name().unwrap(), "tiny-moe");
    assert_eq!(cm.checkpoint_step().unwrap(), Some(2));
    assert_eq!(
        cm.moe_float(2, MoeKey::SAVED_BIAS_UPDATE_RATE).unwrap(),
        f64::from(0.001f32)
    );
    assert_eq!(cm.moe_int(2, MoeKey::SAVED_BIAS_FROZEN).unwrap(), 0);
    assert_eq!(m.checkpoint_step().unwrap(), None);
    expect_code(
        m.moe_int(2, MoeKey::SAVED_BIAS_FROZEN),
        Code::INVALID_ARGUMENT,
    );
    expect_code(a.save(dir.join("missing").join("x.moert")), Code::IO);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_files_are_errors_with_the_message() {
    let dir = temp_dir("corrupt");
    let data = std::fs::read(model_path()).unwrap();
    let truncated = dir.join("truncated.moert");
    std::fs::write(&truncated, &data[..data.len() / 2]).unwrap();
    let err = expect_code(Model::load(&truncated), Code::INVALID_MODEL);
    assert!(err.message().contains("truncated.moert"), "{err}");
    expect_code(Model::from_bytes(&data[..100], None), Code::INVALID_MODEL);
    expect_code(Model::load(dir.join("absent.moert")), Code::IO);

    let m = Model::from_bytes(&data, None).unwrap();
    let s = session(&m, Mode::TRAINING);
    train_step(&s, 0);
    let ckpt = dir.join("ckpt.moert");
    s.save(&ckpt).unwrap();
    let raw = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &raw[..raw.len() - 64]).unwrap();
    train_step(&s, 1);
    let before = s.get_parameter("moe1.w2").unwrap();
    assert!(s.load(&ckpt).is_err());
    assert_eq!(s.step_count().unwrap(), 2);
    assert_eq!(s.get_parameter("moe1.w2").unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_session_serves_many_threads() {
    let m = Model::load(model_path()).unwrap();
    let s = Arc::new(session(&m, Mode::INFERENCE));
    let want: Vec<Vec<f32>> = (0..16)
        .map(|w| s.forward_tokens(&batch(8, w), 8).unwrap())
        .collect();
    std::thread::scope(|scope| {
        for w in 0..16 {
            let (s, want) = (Arc::clone(&s), &want);
            scope.spawn(move || {
                for _ in 0..5 {
                    assert_eq!(
                        s.forward_tokens(&batch(8, w), 8).unwrap(),
                        want[w],
                        "worker {w}"
                    );
                }
            });
        }
    });
}

#[test]
fn quantizes_experts_to_fp8_and_holds_them_at_one_byte_per_value() {
    let m = Model::load(model_path()).unwrap();
    // Every parameter and the two loss-free biases, in fp32.
    assert_eq!(m.resident_bytes().unwrap(), 4 * (110720 + 16));
    let (q, n) = m.quantize_fp8(false).unwrap();
    assert_eq!(n, 9);
    assert_eq!(q.num_tensors(2).unwrap(), 8);
    // moe0.w1 [8, 32, 64]: a code per value and, per expert, one block scale padded to 4 floats.
    let w1 = q.tensor(2, 1).unwrap();
    assert_eq!(
        w1,
        moert::TensorInfo {
            name: "w1".into(),
            stored: moert::DType::F8E4M3,
            held: moert::DType::F8E4M3,
            numel: 16384,
            bytes: 16384 + 8 * 4 * 4,
        }
    );
    let gate = q.tensor(2, 0).unwrap();
    assert_eq!((gate.name.as_str(), gate.held), ("gate", moert::DType::F32));
    let after = q.resident_bytes().unwrap();
    assert!(after < 4 * (110720 + 16) / 3, "{after}");
    let path = std::env::temp_dir().join(format!("moert_rust_fp8_{}.moert", std::process::id()));
    q.save(&path).unwrap();
    let r = Model::load(&path).unwrap();
    assert_eq!(r.resident_bytes().unwrap(), after);
    std::fs::remove_file(&path).unwrap();
    expect_code(q.tensor(2, 8), Code::INVALID_ARGUMENT);
    let (_p2, n2) = m.quantize_fp8(true).unwrap();
    assert_eq!(n2, 9);
}

/// A step made and counted before it fails (weight decay takes moe0.w1 past the fp32 range)
/// carries its figures in the error; one refused before any change carries none.
#[test]
fn a_step_made_before_it_failed_carries_its_figures() {
    let m = Model::load(model_path()).unwrap();
    let s = session(&m, Mode::TRAINING);
    s.set_eval(true).unwrap();
    let refused = expect_code(s.step(), Code::INVALID_STATE);
    assert_eq!(refused.step_made(), None);
    s.set_eval(false).unwrap();
    s.set_config("lr", "1").unwrap();
    s.set_config("weight_decay", "3").unwrap();
    s.forward_tokens(&batch(16, 0), 16).unwrap();
    s.backward_loss(&[0; 16]).unwrap();
    let huge = vec![3e38f32; s.get_parameter("moe0.w1").unwrap().len()];
    s.set_parameter("moe0.w1", &huge).unwrap();
    let made = expect_code(s.step(), Code::NUMERIC);
    let step = made.step_made().expect("the step was made");
    assert_eq!(step.learning_rate, 1.0);
    assert!(
        step.gradient_norm > 0.0 && step.gradient_norm.is_finite(),
        "{step:?}"
    );
    assert_eq!(s.step_count().unwrap(), 1);
}
