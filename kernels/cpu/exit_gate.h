// Every oneDNN call of the library passes this gate, so that the process can exit while a thread
// computes. At exit, oneDNN's static destructors unmap its generated kernels; a thread still
// running one then faulted (a Rust service whose static Batcher is never dropped, a C program
// returning from main while a worker thread runs a session: SIGSEGV on nearly every exit). The
// gate's exit handler waits for the calls in flight to return (10 s at most in all) and refuses
// later ones with MOERT_ERR_INVALID_STATE, so that oneDNN is torn down after its last kernel. Exit
// handlers run in reverse order of registration, and oneDNN registers the teardown of what it sets
// up as it goes, so the handler is registered again after calls (DnnlCall's destructor) and a CPU
// backend sets oneDNN's GEMM kernels up before any session computes (warm_up_sgemm,
// kernels/cpu/gemm.h).
#pragma once

#include <cstdint>

namespace moert::cpu {

// Says that the current call created oneDNN state the process had not created before (a
// primitive, a reorder, of a new shape), whose teardown oneDNN may register: the gate's exit
// handler is registered again when the call ends, so that it runs before that teardown. Not for
// a shape created before: each registration stays until exit (kernels/cpu/gemm.cc).
void created_dnnl_state();

// How many times the process has registered the gate's exit handler; each registration stays until
// exit (for tests).
int64_t exit_handler_registrations();

// Held for the duration of one oneDNN call (nested holds on one thread count once). Throws
// Error(Code::InvalidState) once the process has begun to exit. A fork() waits (10 s at most)
// for the calls held by other threads to end, and a call that begins meanwhile waits for the
// fork, so that a child never inherits a lock oneDNN held in another thread.
class DnnlCall {
 public:
  DnnlCall();
  ~DnnlCall();
  DnnlCall(const DnnlCall&) = delete;
  DnnlCall& operator=(const DnnlCall&) = delete;
};

// Held while oneDNN objects are destroyed (a Bf16Gemm's primitives): as a DnnlCall, a fork waits
// for it, but it never throws, as a destructor must not, and it is entered after exit has begun
// too (a session freed by a static destructor frees its objects; LeakSanitizer counts them
// otherwise).
class DnnlTeardown {
 public:
  DnnlTeardown() noexcept;
  ~DnnlTeardown();
  DnnlTeardown(const DnnlTeardown&) = delete;
  DnnlTeardown& operator=(const DnnlTeardown&) = delete;
};

}  // namespace moert::cpu
