#include "kernels/cpu/omp_guard.h"

#if MOERT_DNNL_OPENMP
#include <omp.h>
#endif

namespace moert::cpu {

#if MOERT_DNNL_OPENMP
SerialOmpScope::SerialOmpScope() : saved_(omp_get_max_threads()) {
  if (saved_ != 1) omp_set_num_threads(1);
}
SerialOmpScope::~SerialOmpScope() {
  if (saved_ != 1) omp_set_num_threads(saved_);
}
void make_omp_serial() { omp_set_num_threads(1); }
#else
// A sequential oneDNN starts no threads.
SerialOmpScope::SerialOmpScope() {}
SerialOmpScope::~SerialOmpScope() {}
void make_omp_serial() {}
#endif

}  // namespace moert::cpu
