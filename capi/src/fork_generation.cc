#include "capi/src/fork_generation.h"

#include <pthread.h>

#include <atomic>

#include "core/error.h"

namespace moert::capi {
namespace {

std::atomic<uint64_t> generation{0};

void count_fork_in_child() { generation.fetch_add(1, std::memory_order_relaxed); }

}  // namespace

uint64_t fork_generation() {
  // glibc drops the handler when the library is unloaded (it is registered with the library's
  // __dso_handle), so a later fork never calls into unmapped code. A failed registration (out of
  // memory) is tried again by the next call rather than remembered. No lock: one held by another
  // thread at a fork would stay held in the child; threads racing through the first call may
  // register more than once, which only makes a child's count grow by more than one.
  static std::atomic<bool> installed{false};
  if (!installed.load(std::memory_order_acquire)) {
    if (pthread_atfork(nullptr, nullptr, &count_fork_in_child) != 0)
      fail(Code::OutOfMemory, "cannot register moert's fork handler (pthread_atfork failed)");
    installed.store(true, std::memory_order_release);
  }
  return generation.load(std::memory_order_relaxed);
}

bool inherited(uint64_t made_in) { return fork_generation() != made_in; }

void require_made_here(uint64_t made_in, const char* what) {
  if (inherited(made_in))
    fail(Code::InvalidState, "this ", what,
         " was made by a parent of this process, before fork(): its threads stayed there; make a "
         "new one in this process (freeing the inherited one is allowed and waits for nothing)");
}

}  // namespace moert::capi
