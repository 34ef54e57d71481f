//! The batcher from many threads: every answer agrees with the solo call's (bit for bit where a
//! pass carried one request, within [`TOLERANCE`] where requests shared it), requests share
//! passes, errors stay with their caller, misuse is refused.

use moert::{Batcher, BatcherOptions, Code, Mode, Model, Session, SessionOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn model() -> Model {
    let p = match std::env::var_os("MOERT_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../examples/models/tiny_moe.moert"),
    };
    Model::load(p).unwrap()
}

fn batch(rows: usize, seed: usize) -> Vec<i32> {
    (0..rows * 4)
        .map(|i| ((i * 7 + i / 3 + seed * 13) % 64) as i32)
        .collect()
}

/// Per row, ||batched - solo|| / ||solo|| (L2) for an answer that shared a pass: the CPU GEMMs
/// (oneDNN) round a row differently in calls of different row counts (worst row 5.4e-7 in the
/// C ABI's tests, tests/capi/batcher_test.cc, which say why and where a routing tie could exceed
/// it).
const TOLERANCE: f64 = 1e-5;

fn assert_agrees(got: &[f32], want: &[f32], width: usize, alone: bool, what: &str) {
    if alone {
        assert_eq!(got, want, "{what}: its pass carried it alone");
        return;
    }
    assert_eq!(got.len(), want.len(), "{what}");
    for (r, (g, w)) in got.chunks(width).zip(want.chunks(width)).enumerate() {
        let num: f64 = g
            .iter()
            .zip(w)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum();
        let den: f64 = w.iter().map(|&b| f64::from(b).powi(2)).sum();
        let e = (num / den.max(1e-300)).sqrt();
        assert!(
            e <= TOLERANCE,
            "{what}: row {r} is {e} from the solo call's"
        );
    }
}

#[test]
fn answers_agree_with_solo_calls_from_many_threads() {
    let m = model();
    let solo = Session::new(&m, None).unwrap();
    let mut so = SessionOptions::new().unwrap();
    so.threads(1).unwrap();
    let mut options = BatcherOptions::new().unwrap();
    options
        .sessions(2)
        .unwrap()
        .max_batch_rows(64)
        .unwrap()
        .max_wait(Duration::from_millis(5))
        .unwrap()
        .session_options(&so)
        .unwrap();
    let b = Arc::new(Batcher::new(&m, Some(&options)).unwrap());
    drop(m);
    let want: Arc<Vec<Vec<f32>>> = Arc::new(
        (0..96)
            .map(|r| {
                solo.forward_tokens(&batch(1 + r % 6, r), 1 + r % 6)
                    .unwrap()
            })
            .collect(),
    );
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (b, want) = (Arc::clone(&b), Arc::clone(&want));
            std::thread::spawn(move || {
                let mut shared = 0;
                for r in (t..96).step_by(16) {
                    let rows = 1 + r % 6;
                    let (out, st) = b.forward_tokens(&batch(rows, r), rows).unwrap();
                    let alone = st.batch_requests == 1;
                    assert_agrees(&out, &want[r], 64, alone, &format!("request {r}"));
                    assert!(st.batch_rows >= rows as u64 && st.session < 2, "{st:?}");
                    shared += usize::from(st.batch_requests > 1);
                }
                shared
            })
        })
        .collect();
    let shared: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let c = b.counters().unwrap();
    assert_eq!((c.requests, c.failed), (96, 0), "{c:?}");
    assert!(
        shared > 0 && c.batches < 96 && c.mean_batch_rows() > 1.0,
        "{c:?}"
    );
}

#[test]
fn errors_belong_to_their_caller_and_misuse_is_refused() {
    let m = model();
    let mut options = BatcherOptions::new().unwrap();
    options.max_batch_rows(8).unwrap();
    let b = Batcher::new(&m, Some(&options)).unwrap();
    let mut bad = batch(2, 1);
    bad[6] = 99;
    let e = b.forward_tokens(&bad, 2).unwrap_err();
    assert_eq!(e.code(), Code::INVALID_ARGUMENT);
    assert!(e.message().contains("row 1, column 2"), "{e}");
    assert!(b.forward_tokens(&batch(9, 0), 9).is_err());
    assert!(b.forward_hidden(&[0.0; 4], 1).is_err());
    assert_eq!(b.forward_tokens(&batch(1, 0), 1).unwrap().0.len(), 64);
    let c = b.counters().unwrap();
    assert_eq!((c.requests, c.failed), (4, 3));

    let mut o = BatcherOptions::new().unwrap();
    assert_eq!(o.sessions(0).unwrap_err().code(), Code::INVALID_ARGUMENT);
    assert_eq!(
        o.max_batch_rows(0).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    assert!(o.max_wait(Duration::from_secs(2)).is_err());
    let mut training = SessionOptions::new().unwrap();
    training.mode(Mode::TRAINING).unwrap();
    o.session_options(&training).unwrap();
    assert_eq!(
        Batcher::new(&m, Some(&o)).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
}
