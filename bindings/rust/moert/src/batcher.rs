//! The batcher: many threads, one forward pass (see `moert.h`, "Batcher").

use super::{check, check_abi, invalid, Code, Error, Io, Model, Result, SessionOptions};
use moert_sys as sys;
use std::fmt;
use std::ptr::{self, NonNull};
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

    fn out_len(&self, rows: usize) -> Result<usize> {
        rows.checked_mul(self.io.output_width as usize)
            .ok_or_else(|| invalid(format!("{rows} rows overflow the output size")))
    }

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
        let mut out = vec![0f32; self.out_len(rows)?];
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
        let mut out = vec![0f32; self.out_len(rows)?];
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
    fn drop(&mut self) {
        // SAFETY: ours, and &mut self means no request is in flight on any thread.
        unsafe { sys::moert_batcher_free(self.ptr.as_ptr()) }
    }
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher").field("io", &self.io).finish()
    }
}
