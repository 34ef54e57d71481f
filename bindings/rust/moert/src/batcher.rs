//! The batcher: many threads, one forward pass (see `moert.h`, "Batcher").

use super::{check, check_abi, Code, Error, Io, Model, Result, SessionOptions};
use moert_sys as sys;
use std::ffi::c_void;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Options for [`Batcher::new`]: 1 session, at most 256 rows per pass, no wait, default session
/// options.
pub struct BatcherOptions {
    ptr: NonNull<sys::moert_batcher_options>,
}

// SAFETY: as SessionOptions: must not be modified concurrently, may move between threads.
unsafe impl Send for BatcherOptions {}

impl BatcherOptions {
    /// Options with the defaults.
    pub fn new() -> Result<BatcherOptions> {
        check_abi()?;
        let mut out = ptr::null_mut();
        // SAFETY: a valid out-pointer.
        check(unsafe { sys::moert_batcher_options_create(&mut out) })?;
        NonNull::new(out)
            .map(|ptr| BatcherOptions { ptr })
            .ok_or_else(|| Error::new(Code::INTERNAL, "the library returned no options"))
    }

    /// Inference sessions in the pool, 1 to 256: how many passes run at once. Sessions times
    /// threads per session should be about the machine's cores.
    pub fn sessions(&mut self, sessions: u32) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_batcher_options_set_sessions(self.ptr.as_ptr(), sessions) })?;
        Ok(self)
    }

    /// The row cap, 1 to 2^20: the most rows one pass gathers and one request may have.
    pub fn max_batch_rows(&mut self, rows: u64) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_batcher_options_set_max_batch_rows(self.ptr.as_ptr(), rows) })?;
        Ok(self)
    }

    /// The most rows that may wait for a pass, 0 (the default: no bound) to 2^40, and at least
    /// the row cap when not 0: a request that would queue more fails at once with
    /// `MOERT_ERR_LIMIT`, so that a service under overload sheds load instead of queueing without
    /// end.
    pub fn max_queued_rows(&mut self, rows: u64) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_batcher_options_set_max_queued_rows(self.ptr.as_ptr(), rows) })?;
        Ok(self)
    }

    /// The bounded wait, up to 1 s (microsecond resolution): how long a free session holding
    /// fewer rows than the cap waits for more after the oldest queued request arrived.
    pub fn max_wait(&mut self, wait: Duration) -> Result<&mut Self> {
        let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_batcher_options_set_max_wait_us(self.ptr.as_ptr(), us) })?;
        Ok(self)
    }

    /// The options every pool session is created with (copied); training mode is refused by
    /// [`Batcher::new`].
    pub fn session_options(&mut self, options: &SessionOptions) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed; the session options are only read.
        check(unsafe {
            sys::moert_batcher_options_set_session_options(self.ptr.as_ptr(), options.ptr.as_ptr())
        })?;
        Ok(self)
    }
}

impl fmt::Debug for BatcherOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatcherOptions").finish_non_exhaustive()
    }
}

impl Drop for BatcherOptions {
    fn drop(&mut self) {
        // SAFETY: ours, and no call in flight.
        unsafe { sys::moert_batcher_options_free(self.ptr.as_ptr()) }
    }
}

/// How one request was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestStats {
    /// From entering the batcher to the start of its forward pass.
    pub queue: Duration,
    /// The forward pass that carried it.
    pub run: Duration,
    /// Rows of that pass.
    pub batch_rows: u64,
    /// Requests of that pass.
    pub batch_requests: u64,
    /// Pool index of the session that ran it.
    pub session: u32,
}

/// A batcher's cumulative figures since its creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatcherCounters {
    /// Requests answered, failed ones included.
    pub requests: u64,
    /// Requests answered with an error.
    pub failed: u64,
    /// Forward passes run for batches.
    pub batches: u64,
    /// Rows of those passes.
    pub rows: u64,
    /// Sum of the answered requests' queue times.
    pub queue: Duration,
    /// Sum of the passes' run times.
    pub run: Duration,
    /// Batches that failed and were rerun request by request.
    pub isolated: u64,
}

impl BatcherCounters {
    /// rows / batches (0 before the first pass).
    pub fn mean_batch_rows(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.rows as f64 / self.batches as f64
        }
    }
}

fn nanos(v: i64) -> Duration {
    Duration::from_nanos(u64::try_from(v).unwrap_or(0))
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Serves inference to many threads at once: each call blocks while the batcher gathers the calls
/// that arrive within the bounded wait, up to the row cap, into one forward pass on a pool of
/// sessions, and returns exactly the caller's own outputs, or its own error — the outputs a
/// [`Session`](crate::Session) would return for those rows alone (bit for bit on the CPU). Every
/// method takes `&self`: share one batcher with an `Arc`.
pub struct Batcher {
    ptr: NonNull<sys::moert_batcher>,
    io: Io,
}

// SAFETY: moert.h: the forward and counters functions "may be called from any number of threads
// at once"; the batcher is not tied to the thread that created it.
unsafe impl Send for Batcher {}
// SAFETY: as above; moert_batcher_free, the one call that must not race, happens in Drop.
unsafe impl Sync for Batcher {}

impl Batcher {
    /// A batcher over `model` with `options` (None: defaults); the model may be dropped after.
    pub fn new(model: &Model, options: Option<&BatcherOptions>) -> Result<Batcher> {
        check_abi()?;
        let io = model.io()?;
        let mut out = ptr::null_mut();
        // SAFETY: a live model, live options or NULL, a valid out-pointer.
        check(unsafe {
            sys::moert_batcher_create(
                model.ptr.as_ptr(),
                options.map_or(ptr::null(), |o| o.ptr.as_ptr()),
                &mut out,
            )
        })?;
        let ptr = NonNull::new(out)
            .ok_or_else(|| Error::new(Code::INTERNAL, "the library returned no batcher"))?;
        Ok(Batcher { ptr, io })
    }

    /// What a request takes and returns.
    pub fn io(&self) -> Io {
        self.io
    }

    const STATS_KNOWN: usize = sys::MOERT_REQUEST_STATS as usize;

    fn stats(s: &[i64]) -> RequestStats {
        RequestStats {
            queue: nanos(s[sys::MOERT_REQUEST_QUEUE_NS as usize]),
            run: nanos(s[sys::MOERT_REQUEST_RUN_NS as usize]),
            batch_rows: count(s[sys::MOERT_REQUEST_BATCH_ROWS as usize]),
            batch_requests: count(s[sys::MOERT_REQUEST_BATCH_REQUESTS as usize]),
            session: count(s[sys::MOERT_REQUEST_SESSION as usize]) as u32,
        }
    }

    /// One request of `rows` rows of token ids; returns rows * output_width values.
    pub fn forward_tokens(&self, tokens: &[i32], rows: usize) -> Result<(Vec<f32>, RequestStats)> {
        let mut out = vec![0f32; self.io.output_len(rows, tokens.len())?];
        let stats = self.forward_tokens_into(tokens, rows, &mut out)?;
        Ok((out, stats))
    }

    /// As [`Batcher::forward_tokens`], into `out` (written only on success).
    pub fn forward_tokens_into(
        &self,
        tokens: &[i32],
        rows: usize,
        out: &mut [f32],
    ) -> Result<RequestStats> {
        let mut s = [0i64; sys::MOERT_REQUEST_STATS as usize];
        // SAFETY: slices with their true lengths; the library reads and writes them only until
        // the call returns.
        check(unsafe {
            sys::moert_batcher_forward_tokens(
                self.ptr.as_ptr(),
                tokens.as_ptr(),
                tokens.len() as u64,
                rows as u64,
                out.as_mut_ptr(),
                out.len() as u64,
                s.as_mut_ptr(),
                s.len() as u64,
            )
        })?;
        Ok(Self::stats(&s))
    }

    /// One request of `rows` rows of hidden states; returns rows * output_width values.
    pub fn forward_hidden(&self, input: &[f32], rows: usize) -> Result<(Vec<f32>, RequestStats)> {
        let mut out = vec![0f32; self.io.output_len(rows, input.len())?];
        let stats = self.forward_hidden_into(input, rows, &mut out)?;
        Ok((out, stats))
    }

    /// As [`Batcher::forward_hidden`], into `out` (written only on success).
    pub fn forward_hidden_into(
        &self,
        input: &[f32],
        rows: usize,
        out: &mut [f32],
    ) -> Result<RequestStats> {
        let mut s = [0i64; sys::MOERT_REQUEST_STATS as usize];
        // SAFETY: slices with their true lengths.
        check(unsafe {
            sys::moert_batcher_forward_hidden(
                self.ptr.as_ptr(),
                input.as_ptr(),
                input.len() as u64,
                rows as u64,
                out.as_mut_ptr(),
                out.len() as u64,
                s.as_mut_ptr(),
                s.len() as u64,
            )
        })?;
        Ok(Self::stats(&s))
    }

    /// Submits one request of `rows` rows of token ids and returns at once: the request is
    /// checked here (a bad one is this call's error), its ids copied, and its answer arrives later
    /// in the returned [`Pending`], which a thread can [`wait`](Pending::wait) for or an async task
    /// `.await`. Nothing holds a thread while the request waits for its pass, so one thread or an
    /// event loop can keep many requests in flight.
    pub fn submit_tokens(&self, tokens: &[i32], rows: usize) -> Result<Pending> {
        Pending::submit(|done, user_data| {
            // SAFETY: a slice with its true length, read (copied) before the call returns; the
            // callback and its user_data as Pending::submit prepares them.
            unsafe {
                sys::moert_batcher_submit_tokens(
                    self.ptr.as_ptr(),
                    tokens.as_ptr(),
                    tokens.len() as u64,
                    rows as u64,
                    done,
                    user_data,
                )
            }
        })
    }

    /// As [`Batcher::submit_tokens`], over `rows` rows of hidden states.
    pub fn submit_hidden(&self, input: &[f32], rows: usize) -> Result<Pending> {
        Pending::submit(|done, user_data| {
            // SAFETY: as in submit_tokens.
            unsafe {
                sys::moert_batcher_submit_hidden(
                    self.ptr.as_ptr(),
                    input.as_ptr(),
                    input.len() as u64,
                    rows as u64,
                    done,
                    user_data,
                )
            }
        })
    }

    /// The cumulative figures (a consistent snapshot).
    pub fn counters(&self) -> Result<BatcherCounters> {
        let mut c = [0i64; sys::MOERT_BATCHER_COUNTERS as usize];
        // SAFETY: an array with its true length.
        check(unsafe {
            sys::moert_batcher_counters(self.ptr.as_ptr(), c.as_mut_ptr(), c.len() as u64)
        })?;
        Ok(BatcherCounters {
            requests: count(c[sys::MOERT_BATCHER_REQUESTS as usize]),
            failed: count(c[sys::MOERT_BATCHER_FAILED as usize]),
            batches: count(c[sys::MOERT_BATCHER_BATCHES as usize]),
            rows: count(c[sys::MOERT_BATCHER_ROWS as usize]),
            queue: nanos(c[sys::MOERT_BATCHER_QUEUE_NS as usize]),
            run: nanos(c[sys::MOERT_BATCHER_RUN_NS as usize]),
            isolated: count(c[sys::MOERT_BATCHER_ISOLATED as usize]),
        })
    }
}

impl Drop for Batcher {
    /// Frees the batcher. Submitted requests in a pass finish first; those still queued are
    /// answered with [`Code::INVALID_STATE`]: every [`Pending`] gets an answer. Before this
    /// returns, except on the batcher's own thread (a waker that drops it): there the library
    /// returns at once and releases the batcher on a thread of its own once the waker returns.
    fn drop(&mut self) {
        // SAFETY: ours, and &mut self means no call is in flight on any thread (submitted
        // requests may be: the library answers them, see above).
        unsafe { sys::moert_batcher_free(self.ptr.as_ptr()) }
    }
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher").field("io", &self.io).finish()
    }
}

/// What a submitted request's answer is: its outputs (rows * output_width values) and how it was
/// served, or its own error.
pub type Answer = Result<(Vec<f32>, RequestStats)>;

struct Slot {
    answer: Option<Answer>,
    waker: Option<Waker>,
}

struct Shared {
    slot: Mutex<Slot>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A panic while holding the lock cannot leave a Slot half-written: recover it.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request submitted with [`Batcher::submit_tokens`] or [`Batcher::submit_hidden`]: its answer
/// arrives once its forward pass is over. Wait for it on a thread with [`Pending::wait`], or
/// `.await` it (it is a [`Future`] of any executor: the library's thread wakes the task). It does
/// not borrow the batcher: dropping the batcher answers it (with an error if it had not run),
/// and dropping it discards the answer when it comes.
pub struct Pending {
    shared: Arc<Shared>,
}

impl Pending {
    fn submit(
        call: impl FnOnce(sys::moert_batcher_callback, *mut c_void) -> *mut sys::moert_status,
    ) -> Result<Pending> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                answer: None,
                waker: None,
            }),
            ready: Condvar::new(),
        });
        // The library holds one reference until it calls `answer`, exactly once on success.
        let user_data = Arc::into_raw(Arc::clone(&shared)) as *mut c_void;
        if let Err(e) = check(call(Some(answer), user_data)) {
            // SAFETY: refused, so the library never calls back: the reference is ours again.
            drop(unsafe { Arc::from_raw(user_data as *const Shared) });
            return Err(e);
        }
        Ok(Pending { shared })
    }

    /// Whether the answer has arrived (then `wait` returns at once).
    pub fn is_ready(&self) -> bool {
        self.shared.lock().answer.is_some()
    }

    /// Blocks the calling thread until the answer arrives.
    pub fn wait(self) -> Answer {
        let mut slot = self.shared.lock();
        loop {
            if let Some(a) = slot.answer.take() {
                return a;
            }
            slot = self
                .shared
                .ready
                .wait(slot)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// As [`Pending::wait`], for at most `timeout`; gives the request back if it has no answer
    /// by then.
    pub fn wait_timeout(self, timeout: Duration) -> std::result::Result<Answer, Pending> {
        let answer = {
            let slot = self.shared.lock();
            let (mut slot, _) = self
                .shared
                .ready
                .wait_timeout_while(slot, timeout, |s| s.answer.is_none())
                .unwrap_or_else(|e| e.into_inner());
            slot.answer.take()
        };
        answer.ok_or(self)
    }
}

impl Future for Pending {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let mut slot = self.shared.lock();
        match slot.answer.take() {
            Some(a) => Poll::Ready(a),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// The library's callback (moert_batcher_callback): runs on a batcher thread, so it only copies
/// the answer, stores it and wakes whoever waits.
unsafe extern "C" fn answer(
    user_data: *mut c_void,
    status: *mut sys::moert_status,
    out: *const f32,
    out_len: u64,
    stats: *const i64,
    stats_len: u64,
) {
    // SAFETY: user_data is the reference Pending::submit gave the library for this one call.
    let shared = unsafe { Arc::from_raw(user_data as *const Shared) };
    let result = check(status).and_then(|()| {
        if out.is_null() || stats.is_null() || (stats_len as usize) < Batcher::STATS_KNOWN {
            return Err(Error::new(
                Code::INTERNAL,
                "the library answered without outputs or figures",
            ));
        }
        // SAFETY: moert.h: `out` holds out_len floats and `stats` stats_len figures until this
        // callback returns; both are copied here.
        let (o, s) = unsafe {
            (
                std::slice::from_raw_parts(out, out_len as usize),
                std::slice::from_raw_parts(stats, stats_len as usize),
            )
        };
        Ok((o.to_vec(), Batcher::stats(s)))
    });
    let waker = {
        let mut slot = shared.lock();
        slot.answer = Some(result);
        slot.waker.take()
    };
    shared.ready.notify_all();
    if let Some(w) = waker {
        // A panic must not unwind into the library's thread (the process would abort): a waker
        // that panics is its executor's fault, and the answer is already in place for a poll.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
    }
}
