#include "kernels/cpu/signal_guard.h"

#include <pthread.h>
#include <signal.h>
#include <time.h>

#include <cstdint>
#include <initializer_list>

namespace moert::cpu {
namespace {

// Depth of the scopes open on this thread; a thread that blocked its signals for good holds one
// that never closes.
thread_local int depth = 0;
thread_local sigset_t saved;
thread_local bool owned = false;            // block_async_signals(): never opened again
thread_local int64_t blocked_since_ns = 0;  // when the outermost scope last blocked them

// How long a stretch of work keeps the signals out before it lets the pending ones in.
constexpr int64_t kMaxBlockedNs = 10'000'000;

int64_t monotonic_ns() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<int64_t>(t.tv_sec) * 1'000'000'000 + t.tv_nsec;
}

// The set is computed once; every scope and every owned thread blocks the same signals.
const sigset_t& asynchronous_signals() {
  static const sigset_t set = [] {
    sigset_t s;
    sigfillset(&s);
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS}) sigdelset(&s, sig);
    return s;
  }();
  return set;
}

}  // namespace

void block_async_signals_for_now() {
  if (depth++ > 0) return;
  pthread_sigmask(SIG_BLOCK, &asynchronous_signals(), &saved);
  blocked_since_ns = monotonic_ns();
}

void let_pending_signals_in() noexcept {
  if (owned || depth == 0) return;
  const int64_t now = monotonic_ns();
  if (now - blocked_since_ns < kMaxBlockedNs) return;
  // The thread's own mask for a moment: the kernel delivers what is pending as the call returns,
  // to the host's handlers, on this thread's own stack (no GEMM runs on it here).
  pthread_sigmask(SIG_SETMASK, &saved, nullptr);
  pthread_sigmask(SIG_BLOCK, &asynchronous_signals(), nullptr);
  blocked_since_ns = now;
}

void restore_async_signals() noexcept {
  if (--depth > 0) return;
  pthread_sigmask(SIG_SETMASK, &saved, nullptr);
}

AsyncSignalScope::AsyncSignalScope() { block_async_signals_for_now(); }

AsyncSignalScope::~AsyncSignalScope() { restore_async_signals(); }

static_assert(sizeof(sigset_t) <= 128 && alignof(sigset_t) <= 16);

KeepSignalMask::KeepSignalMask() {
  pthread_sigmask(SIG_SETMASK, nullptr, reinterpret_cast<sigset_t*>(saved_));
}

KeepSignalMask::~KeepSignalMask() {
  pthread_sigmask(SIG_SETMASK, reinterpret_cast<const sigset_t*>(saved_), nullptr);
}

void block_async_signals() {
  pthread_sigmask(SIG_BLOCK, &asynchronous_signals(), nullptr);
  ++depth;
  owned = true;
}

}  // namespace moert::cpu
