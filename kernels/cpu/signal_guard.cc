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

sigset_t asynchronous_signals() {
  sigset_t set;
  sigfillset(&set);
  for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS}) sigdelset(&set, s);
  return set;
}

}  // namespace

AsyncSignalScope::AsyncSignalScope() {
  if (depth++ > 0) return;
  static const sigset_t set = asynchronous_signals();
  pthread_sigmask(SIG_BLOCK, &set, &saved);
}

AsyncSignalScope::~AsyncSignalScope() {
  if (--depth > 0) return;
  pthread_sigmask(SIG_SETMASK, &saved, nullptr);
}

void block_async_signals() {
  const sigset_t set = asynchronous_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ++depth;
}

}  // namespace moert::cpu
