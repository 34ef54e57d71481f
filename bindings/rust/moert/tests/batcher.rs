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
    // Refused before rows * output_width outputs are allocated, which would abort the process.
    assert_eq!(
        b.forward_tokens(&batch(1, 0), 1 << 40).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );

    let mut o = BatcherOptions::new().unwrap();
    assert_eq!(o.sessions(0).unwrap_err().code(), Code::INVALID_ARGUMENT);
    assert_eq!(
        o.max_batch_rows(0).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    assert!(o.max_wait(Duration::from_secs(2)).is_err());
    assert_eq!(
        o.max_queued_rows((1 << 40) + 1).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    // A queue bound below the row cap (256) could never take a full request.
    o.max_queued_rows(8).unwrap();
    assert_eq!(
        Batcher::new(&m, Some(&o)).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    o.max_queued_rows(0).unwrap();
    let mut training = SessionOptions::new().unwrap();
    training.mode(Mode::TRAINING).unwrap();
    o.session_options(&training).unwrap();
    assert_eq!(
        Batcher::new(&m, Some(&o)).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
}

/// A minimal executor for the futures below: polls on this thread, parks until woken.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread, AtomicBool);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.1.store(true, Ordering::SeqCst);
            self.0.unpark();
        }
    }
    let unpark = Arc::new(Unpark(std::thread::current(), AtomicBool::new(false)));
    let waker = Waker::from(Arc::clone(&unpark));
    let mut cx = Context::from_waker(&waker);
    let mut future = Box::pin(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        while !unpark.1.swap(false, Ordering::SeqCst) {
            std::thread::park_timeout(Duration::from_secs(60));
        }
    }
}

/// A batcher whose requests stay queued: a one-second wait and a cap they never fill.
fn queueing_batcher(m: &Model) -> Batcher {
    let mut options = BatcherOptions::new().unwrap();
    options
        .max_batch_rows(1024)
        .unwrap()
        .max_wait(Duration::from_secs(1))
        .unwrap();
    Batcher::new(m, Some(&options)).unwrap()
}

#[test]
fn submitted_requests_agree_with_solo_calls_waited_for_or_awaited() {
    let m = model();
    let solo = Session::new(&m, None).unwrap();
    let mut options = BatcherOptions::new().unwrap();
    options
        .sessions(2)
        .unwrap()
        .max_wait(Duration::from_millis(5))
        .unwrap();
    let b = Batcher::new(&m, Some(&options)).unwrap();
    // One thread keeps 64 requests in flight: half waited for, half awaited.
    let pending: Vec<_> = (0..64)
        .map(|r| b.submit_tokens(&batch(1 + r % 5, r), 1 + r % 5).unwrap())
        .collect();
    let mut shared = 0;
    for (r, p) in pending.into_iter().enumerate() {
        let (out, stats) = if r % 2 == 0 {
            p.wait().unwrap()
        } else {
            block_on(p).unwrap()
        };
        let rows = 1 + r % 5;
        let want = solo.forward_tokens(&batch(rows, r), rows).unwrap();
        assert_agrees(
            &out,
            &want,
            64,
            stats.batch_requests == 1,
            &format!("request {r}"),
        );
        assert!(stats.batch_rows >= rows as u64);
        if stats.batch_requests > 1 {
            shared += 1;
        }
    }
    assert!(
        shared > 32,
        "only {shared} of 64 submitted requests shared a pass"
    );
    let c = b.counters().unwrap();
    assert_eq!((c.requests, c.failed), (64, 0));
}

#[test]
fn a_bad_submission_is_refused_at_once_and_a_dropped_batcher_answers_every_request() {
    let m = model();
    let b = queueing_batcher(&m);
    let mut bad = batch(2, 1);
    bad[6] = 99;
    let e = b.submit_tokens(&bad, 2).unwrap_err();
    assert_eq!(e.code(), Code::INVALID_ARGUMENT);
    assert!(e.message().contains("row 1, column 2"), "{e}");
    assert_eq!(
        b.submit_hidden(&[0.0; 4], 1).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
    let pending: Vec<_> = (0..10)
        .map(|r| b.submit_tokens(&batch(2, r), 2).unwrap())
        .collect();
    let p = pending.into_iter().collect::<Vec<_>>();
    let (first, rest) = p.split_first().unwrap();
    assert!(!first.is_ready());
    let started = std::time::Instant::now();
    drop(b);
    assert!(started.elapsed() < Duration::from_millis(900));
    for q in rest {
        assert!(q.is_ready());
    }
    for q in p {
        let e = q.wait_timeout(Duration::from_secs(5)).unwrap().unwrap_err();
        assert_eq!(e.code(), Code::INVALID_STATE);
        assert!(e.message().contains("freed"), "{e}");
    }
}

fn assert_send<T: Send>() {}

#[test]
fn pendings_may_be_dropped_unanswered_moved_to_other_threads_and_awaited_there() {
    assert_send::<moert::Pending>();
    let m = model();
    let solo = Session::new(&m, None).unwrap();
    let mut options = BatcherOptions::new().unwrap();
    options
        .sessions(2)
        .unwrap()
        .max_wait(Duration::from_millis(2))
        .unwrap();
    let b = Arc::new(Batcher::new(&m, Some(&options)).unwrap());
    // Dropped before their answers: the answers are discarded, nothing else notices.
    for r in 0..40 {
        drop(b.submit_tokens(&batch(1 + r % 3, r), 1 + r % 3).unwrap());
    }
    // Submitted here, waited for or awaited on other threads, from which they also submit.
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let p = b.submit_tokens(&batch(2, 100 + t), 2).unwrap();
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let first = if t % 2 == 0 { p.wait() } else { block_on(p) }.unwrap();
                let second = block_on(b.submit_tokens(&batch(3, 200 + t), 3).unwrap()).unwrap();
                (first, second)
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        let ((o1, s1), (o2, s2)) = h.join().unwrap();
        let w1 = solo.forward_tokens(&batch(2, 100 + t), 2).unwrap();
        let w2 = solo.forward_tokens(&batch(3, 200 + t), 3).unwrap();
        assert_agrees(
            &o1,
            &w1,
            64,
            s1.batch_requests == 1,
            &format!("thread {t}, first"),
        );
        assert_agrees(
            &o2,
            &w2,
            64,
            s2.batch_requests == 1,
            &format!("thread {t}, second"),
        );
    }
    // Every request is answered (the dropped ones too, maybe still in a pass on the other
    // session now), failing none.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut c = b.counters().unwrap();
    while c.requests < 56 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        c = b.counters().unwrap();
    }
    assert_eq!((c.requests, c.failed), (56, 0));
    // A NaN is refused at submission (check_finite is on by default).
    let hm = Model::load(
        std::env::var_os("MOERT_TEST_HIDDEN_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../../examples/models/tiny_hidden.moert")
            }),
    )
    .unwrap();
    let hb = Batcher::new(&hm, None).unwrap();
    let width = hb.io().input_width as usize;
    let mut x = vec![0.5f32; 2 * width];
    x[width + 1] = f32::NAN;
    assert_eq!(hb.submit_hidden(&x, 2).unwrap_err().code(), Code::NUMERIC);
    assert_eq!(
        hb.submit_tokens(&[1; 4], 1).unwrap_err().code(),
        Code::INVALID_ARGUMENT
    );
}

#[test]
fn a_batcher_dropped_while_threads_wait_and_tasks_await_answers_them_all() {
    let m = model();
    let b = queueing_batcher(&m);
    // wait_timeout gives a request without an answer back.
    let p = b.submit_tokens(&batch(2, 0), 2).unwrap();
    let p = p.wait_timeout(Duration::from_millis(10)).unwrap_err();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiters: Vec<_> = (0..6)
        .map(|t| {
            let q = b.submit_tokens(&batch(2, t + 1), 2).unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                tx.send(()).unwrap();
                if t % 2 == 0 {
                    q.wait()
                } else {
                    block_on(q)
                }
            })
        })
        .collect();
    for _ in 0..6 {
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    drop(b);
    for w in waiters {
        let e = w.join().unwrap().unwrap_err();
        assert_eq!(e.code(), Code::INVALID_STATE, "{e}");
    }
    assert!(p.is_ready());
    assert_eq!(p.wait().unwrap_err().code(), Code::INVALID_STATE);
}

/// Polls `pending` once with `waker`; the request must still be waiting (a queueing batcher).
fn poll_once(pending: &mut moert::Pending, waker: std::task::Waker) {
    let mut cx = std::task::Context::from_waker(&waker);
    let polled = std::future::Future::poll(std::pin::Pin::new(pending), &mut cx);
    assert!(
        polled.is_pending(),
        "answered before its batch's wait was over"
    );
}

/// A waker that panics on the library's thread: the panic stays there (it once unwound into the
/// library and aborted the process), and the answer still arrives.
#[test]
fn a_panicking_waker_does_not_take_the_process_down() {
    use std::task::{Wake, Waker};
    struct Panics;
    impl Wake for Panics {
        fn wake(self: Arc<Self>) {
            panic!("this waker panics on purpose");
        }
    }
    let m = model();
    let b = queueing_batcher(&m);
    let mut pending = b.submit_tokens(&batch(2, 0), 2).unwrap();
    poll_once(&mut pending, Waker::from(Arc::new(Panics)));
    let (out, _) = pending.wait().unwrap();
    assert_eq!(out.len(), 2 * 64);
}

/// A service that drops its last Batcher inside a waker (on the batcher's own thread): the
/// library releases it once the callback returns (this once aborted the process: a thread
/// cannot join itself).
#[test]
fn dropping_the_batcher_inside_a_waker_releases_it() {
    use std::sync::Mutex;
    use std::task::{Wake, Waker};
    struct DropsBatcher(Mutex<Option<Batcher>>);
    impl Wake for DropsBatcher {
        fn wake(self: Arc<Self>) {
            drop(self.0.lock().unwrap().take());
        }
    }
    let m = model();
    let b = queueing_batcher(&m);
    let mut pending = b.submit_tokens(&batch(2, 0), 2).unwrap();
    let holder = Arc::new(DropsBatcher(Mutex::new(Some(b))));
    poll_once(&mut pending, Waker::from(Arc::clone(&holder)));
    let (out, _) = pending.wait().unwrap();
    assert_eq!(out.len(), 2 * 64);
    // The waker runs after the answer is in place: wait for it to have dropped the batcher.
    let start = std::time::Instant::now();
    while holder.0.lock().unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the waker never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
