// oneDNN (Debian builds it on OpenMP) runs a GEMM with as many threads as the calling thread's
// OpenMP setting allows. The CPU backend runs one GEMM per work item on each of its threads, so
// every GEMM must stay on the thread that calls it: the backend's own worker threads are set to
// one OpenMP thread for good, and the caller's thread, which runs work items too, is set to one
// for the duration of the work and then given its own setting back (docs/design.md section 3: a
// library restores any per-thread setting it touched).
#pragma once

namespace moert::cpu {

// For the life of the object, OpenMP regions started on this thread use one thread.
class SerialOmpScope {
 public:
  SerialOmpScope();
  ~SerialOmpScope();
  SerialOmpScope(const SerialOmpScope&) = delete;
  SerialOmpScope& operator=(const SerialOmpScope&) = delete;

 private:
  int saved_ = 0;
};

// For a thread moert owns: OpenMP regions it starts use one thread from now on.
void make_omp_serial();

}  // namespace moert::cpu
