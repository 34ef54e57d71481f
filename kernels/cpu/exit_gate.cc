#include "kernels/cpu/exit_gate.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "core/error.h"

namespace moert::cpu {
namespace {

// The calls in flight, counted in slots that threads take in turn, each on its own cache line:
// every GEMM call of every thread writes its slot twice, and one counter shared by the pool's
// threads moved its line between their cores on each call (1-3 % of the main job's steps). Exit
// sums the slots.
constexpr unsigned kSlots = 64;
struct alignas(64) Slot {
  std::atomic<int64_t> calls{0};
};
Slot g_in_flight[kSlots];
std::atomic<unsigned> g_next_slot{0};
// Read by every call, written at exit and around a fork: stays in every core's cache meanwhile.
alignas(64) std::atomic<bool> g_exiting{false};
alignas(64) std::atomic<bool> g_forking{false};
// The process's calls, counted while the calling thread is within its own first kEveryCall.
alignas(64) std::atomic<int64_t> g_calls{0};
// When exit stops waiting (steady clock, nanoseconds; 0 until the first handler runs).
alignas(64) std::atomic<int64_t> g_deadline{0};
struct ThreadState {
  int depth = 0;         // nested DnnlCalls
  bool created = false;  // created_dnnl_state() in the current call
  int slot = -1;         // in g_in_flight, taken at the thread's first call
  int64_t calls = 0;     // calls made
};
thread_local ThreadState t_state;
std::once_flag g_fork_handler;
// Registrations of at_exit so far, each kept until exit.
std::atomic<int64_t> g_registrations{0};

constexpr int64_t kEveryCall = 4096;
// How long exit, or a fork, waits for the calls in flight, in all: a GEMM takes milliseconds; a
// thread stopped in one (a debugger, SIGSTOP) must not hang the exit or the fork for ever.
constexpr auto kExitWait = std::chrono::seconds(10);

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t in_flight() {
  int64_t n = 0;
  for (const Slot& s : g_in_flight) n += s.calls.load();
  return n;
}

// Waits, polling every `poll`, until no other thread has a call in flight or `deadline` (now_ns())
// has passed. The calling thread's own call (exit() or fork() from a signal handler that
// interrupted one) cannot return while it waits: it is not waited for.
void wait_for_other_calls(int64_t deadline, std::chrono::microseconds poll) {
  const int64_t own = t_state.depth > 0 ? 1 : 0;
  while (in_flight() > own && now_ns() < deadline) std::this_thread::sleep_for(poll);
}

// Runs once per registration: the first run sets the deadline, which every later run keeps.
void at_exit() {
  g_exiting.store(true);
  int64_t deadline = 0;
  const int64_t mine = now_ns() + std::chrono::nanoseconds(kExitWait).count();
  if (g_deadline.compare_exchange_strong(deadline, mine)) deadline = mine;
  wait_for_other_calls(deadline, std::chrono::milliseconds(1));
}

// Registrations hold this, and fork() takes it first: glibc does not reset its atexit lock in a
// child, so a fork while another thread was inside std::atexit left the child unable to register
// a handler or to exit (capi.Fork: 1 child in about 40 hung so, under load).
std::mutex g_registering;

void register_exit_handler() {
  const std::lock_guard<std::mutex> lock(g_registering);
  if (std::atexit(at_exit) == 0) g_registrations.fetch_add(1, std::memory_order_relaxed);
}

// A fork waits for the oneDNN calls of the other threads to return, and holds new ones back
// until it is done: a child forked while another thread was inside oneDNN inherited the locks
// that thread held there (in dnnl_sgemm's setup), and its own first GEMM waited on one for good
// (capi.Fork hung about once in 60 forks on a loaded machine). As at exit, the wait is bounded.
void before_fork() {
  g_registering.lock();
  g_forking.store(true);
  wait_for_other_calls(now_ns() + std::chrono::nanoseconds(kExitWait).count(),
                       std::chrono::microseconds(50));
}
void after_fork_in_parent() {
  g_forking.store(false);
  g_registering.unlock();
}
// A child of fork() has only the forking thread: the other threads' calls never end there.
void after_fork_in_child() {
  g_forking.store(false);
  g_registering.unlock();
  for (Slot& s : g_in_flight) s.calls.store(0);
  if (t_state.depth > 0) g_in_flight[t_state.slot].calls.store(1);
}

// Counts the calling thread's call. Once the process has begun to exit, a call is not counted
// and false is returned, unless `even_at_exit` (a teardown).
bool enter_call(bool even_at_exit) noexcept {
  ThreadState& ts = t_state;
  if (ts.depth == 0) {
    std::call_once(g_fork_handler,
                   [] { pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child); });
    if (ts.slot < 0)
      ts.slot = static_cast<int>(g_next_slot.fetch_add(1, std::memory_order_relaxed) % kSlots);
    // Counted before the checks: at_exit() and before_fork() set their flag before they read the
    // counts, so a call either sees the flag or is waited for.
    std::atomic<int64_t>& mine = g_in_flight[ts.slot].calls;
    for (;;) {
      mine.fetch_add(1);
      if (g_exiting.load() && !even_at_exit) {
        mine.fetch_sub(1);
        return false;
      }
      if (!g_forking.load()) break;
      mine.fetch_sub(1);  // a fork is waiting for the calls in flight: this one starts after it
      while (g_forking.load()) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  ++ts.depth;
  return true;
}

// Ends the calling thread's call; true when it was the outermost (no longer counted).
bool leave_call() noexcept {
  ThreadState& ts = t_state;
  if (--ts.depth > 0) return false;
  g_in_flight[ts.slot].calls.fetch_sub(1);
  return true;
}

}  // namespace

void created_dnnl_state() { t_state.created = true; }

int64_t exit_handler_registrations() { return g_registrations.load(std::memory_order_relaxed); }

DnnlCall::DnnlCall() {
  if (!enter_call(false))
    fail(Code::InvalidState,
         "the process is exiting: oneDNN is being torn down, so no GEMM can run any more");
}

DnnlCall::~DnnlCall() {
  if (!leave_call()) return;
  ThreadState& ts = t_state;
  // The first calls of a process set up nearly everything oneDNN sets up lazily; later, fewer
  // and fewer calls do. The handler is registered again after each of the process's first
  // kEveryCall calls, then at every power of two of them; a thread past its own first kEveryCall
  // counts its calls alone (the shared counter's line is not moved between cores on every call)
  // and registers at their powers of two. That keeps the registrations bounded (about 32 bytes
  // each): kEveryCall plus about 40 per thread. What the library creates itself later (a bf16
  // primitive for a new shape) registers at once.
  const int64_t own = ++ts.calls;
  bool again = ts.created;
  if (own <= kEveryCall) {
    const int64_t n = g_calls.fetch_add(1, std::memory_order_relaxed) + 1;
    again = again || n <= kEveryCall || (n & (n - 1)) == 0;
  } else {
    again = again || (own & (own - 1)) == 0;
  }
  if (again) register_exit_handler();
  ts.created = false;
}

DnnlTeardown::DnnlTeardown() noexcept { enter_call(true); }

DnnlTeardown::~DnnlTeardown() { leave_call(); }

}  // namespace moert::cpu
