// Error checking and launch helpers shared by the CUDA kernels and backend.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/error.h"

namespace moert::cuda {

[[noreturn]] inline void cuda_failed(cudaError_t e, const char* what) {
  cudaGetLastError();  // clear a sticky-free error so the session can go on where it can
  fail(e == cudaErrorMemoryAllocation ? Code::OutOfMemory : Code::Internal, "CUDA: ", what, ": ",
       cudaGetErrorString(e));
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) cuda_failed(e, what);
}

inline void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    fail(s == CUBLAS_STATUS_ALLOC_FAILED ? Code::OutOfMemory : Code::Internal, "cuBLASLt: ", what,
         ": status ", static_cast<int>(s));
}

// After a kernel launch: a bad configuration shows up here, not at the next synchronisation.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Blocks to cover n items, one thread each. The grid's x dimension holds up to 2^31 - 1 blocks,
// so kernels that take one item per thread cover any size a session can pass (rows < 2^31,
// times at most a block of work each); the grid-stride kernels work with any count.
inline unsigned grid_for(int64_t n, unsigned block) {
  const int64_t g = (n + block - 1) / block;
  constexpr int64_t kMaxBlocks = 0x7FFFFFFF;
  return static_cast<unsigned>(g < 1 ? 1 : (g > kMaxBlocks ? kMaxBlocks : g));
}

}  // namespace moert::cuda
