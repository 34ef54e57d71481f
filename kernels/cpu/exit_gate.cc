#include "kernels/cpu/exit_gate.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <thread>

#include "core/error.h"

namespace moert::cpu {
namespace {

std::atomic<int64_t> g_in_flight{0};
std::atomic<bool> g_exiting{false};
thread_local int t_depth = 0;  // this thread's nested DnnlCalls
std::atomic<int64_t> g_calls{0};
constexpr int64_t kEveryCall = 4096;

// How long exit waits for the calls in flight: a GEMM takes milliseconds; a thread stopped in
// one (by a debugger, SIGSTOP) must not hang the exit for ever.
constexpr auto kExitWait = std::chrono::seconds(10);

void at_exit() {
  g_exiting.store(true);
  // The exiting thread's own call (exit() from a signal handler that interrupted one) never
  // returns: it is not waited for.
  const int64_t own = t_depth > 0 ? 1 : 0;
  const auto until = std::chrono::steady_clock::now() + kExitWait;
  while (g_in_flight.load() > own && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

}  // namespace

DnnlCall::DnnlCall() {
  if (t_depth == 0) {
    // Counted before the check: at_exit() sets the flag before it reads the count, so a call
    // either sees the flag or is waited for.
    g_in_flight.fetch_add(1);
    if (g_exiting.load()) {
      g_in_flight.fetch_sub(1);
      fail(Code::InvalidState,
           "the process is exiting: oneDNN is being torn down, so no GEMM can run any more");
    }
  }
  ++t_depth;
}

DnnlCall::~DnnlCall() {
  if (--t_depth > 0) return;
  g_in_flight.fetch_sub(1);
  // oneDNN registers the destructors of what a call sets up lazily (kernels for a shape or
  // variant it meets first) as it goes, and exit handlers run in reverse order: the handler must
  // be registered again after such calls to run before them. The first calls of a process set
  // up nearly everything; later, fewer and fewer calls do (a new row count, a new shape).
  // Registering after each of the first kEveryCall calls and then at every power of two keeps
  // the registrations bounded (an exit handler costs about 32 bytes).
  const int64_t n = g_calls.fetch_add(1) + 1;
  if (n <= kEveryCall || (n & (n - 1)) == 0) std::atexit(at_exit);
}

}  // namespace moert::cpu
