// A signal must not arrive while a oneDNN GEMM runs. oneDNN's generated f32 GEMM kernels (AVX2
// and AVX-512, Debian's 2.6 included) point the stack pointer into a heap workspace while they run;
// the kernel writes a signal's frame at the stack pointer, so a handled signal that lands there
// overwrites the heap (oneDNN issue 4845, fixed upstream in March 2026 by PR 4855). Hosts send such
// signals as a matter of course: Go's CPU profiler (SIGPROF on every thread), async-profiler on the
// JVM, a host's own timers. Measured here before this guard: a Go service under load and
// `pprof/profile` corrupted its heap within seconds, as did two threads running dnnl_sgemm under a
// 10 kHz SIGPROF timer.
//
// So every thread that runs oneDNN blocks the asynchronous signals while it does: the backend's own
// threads for good, the caller's thread for the duration of the work, after which it gets its own
// mask back (docs/design.md section 3: a library restores any per-thread setting it touched). A
// signal that arrives meanwhile is delivered to another thread of the process that accepts it, or
// to this one once the work is done. The synchronous signals (SIGSEGV, SIGBUS, SIGFPE, SIGILL,
// SIGTRAP, SIGSYS) stay open: a fault must still reach the host's handler.
#pragma once

namespace moert::cpu {

// For the life of the object, this thread does not take asynchronous signals. Nests: only the
// outermost scope on a thread changes and restores the mask, so inner ones cost nothing.
class AsyncSignalScope {
 public:
  AsyncSignalScope();
  ~AsyncSignalScope();
  AsyncSignalScope(const AsyncSignalScope&) = delete;
  AsyncSignalScope& operator=(const AsyncSignalScope&) = delete;
};

// The same as a pair of calls, for a scope that outlives a C++ block (CpuBackend::begin_compute
// and end_compute, around a stretch of computation such as a whole pass: its hundred parallel_for
// calls then change the mask once, not twice each). Every block_async_signals_for_now() needs its
// restore_async_signals(), on the same thread.
void block_async_signals_for_now();
void restore_async_signals() noexcept;
// Where no GEMM runs on this thread (a parallel_for's start): if the signals have been blocked
// by such a scope for 10 ms or more, opens the thread's own mask for a moment, so that a signal
// sent meanwhile (the host's SIGINT) waits about that long at most, not for the whole call.
void let_pending_signals_in() noexcept;

// For a thread moert owns: it takes no asynchronous signal from now on.
void block_async_signals();

// Around a host's code run on a thread moert owns (a completion callback): the thread's mask
// as it was comes back when the object goes, whatever that code did to it. A JVM attaching the
// thread unblocks its own signals there, and the thread's later scopes would not block them
// again: they nest inside the one block_async_signals() opened, and change nothing.
class KeepSignalMask {
 public:
  KeepSignalMask();
  ~KeepSignalMask();
  KeepSignalMask(const KeepSignalMask&) = delete;
  KeepSignalMask& operator=(const KeepSignalMask&) = delete;

 private:
  alignas(16) unsigned char saved_[128];  // a sigset_t; this header includes no system header
};

}  // namespace moert::cpu
