#include "kernels/cpu/signal_guard.h"

#include <pthread.h>
#include <signal.h>

#include <initializer_list>

namespace moert::cpu {
namespace {

// Depth of the scopes open on this thread; a thread that blocked its signals for good holds one
// that never closes.
thread_local int depth = 0;
thread_local sigset_t saved;

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

AsyncSignalScope::AsyncSignalScope() {
  if (depth++ > 0) return;
  pthread_sigmask(SIG_BLOCK, &asynchronous_signals(), &saved);
}

AsyncSignalScope::~AsyncSignalScope() {
  if (--depth > 0) return;
  pthread_sigmask(SIG_SETMASK, &saved, nullptr);
}

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
}

}  // namespace moert::cpu
