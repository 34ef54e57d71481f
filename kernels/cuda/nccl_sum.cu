#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/nccl_sum.h"

namespace moert::cuda {
namespace {

template <typename T>
__global__ void ordered_sum_kernel(const T* slots, int32_t ranks, int64_t count, T* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    T acc = slots[i];
    for (int32_t r = 1; r < ranks; ++r) acc += slots[r * count + i];
    out[i] = acc;
  }
}

template <typename T>
void launch(const void* slots, int32_t ranks, int64_t count, void* out, cudaStream_t stream) {
  constexpr unsigned kBlock = 256;
  // Grid-stride: a bounded grid covers any count.
  const unsigned grid = std::min(grid_for(count, kBlock), 65535u);
  ordered_sum_kernel<T><<<grid, kBlock, 0, stream>>>(static_cast<const T*>(slots), ranks, count,
                                                     static_cast<T*>(out));
  check_launch("ordered_sum");
}

}  // namespace

void ordered_sum(const void* slots, int32_t ranks, int64_t count, ReduceType type, void* out,
                 cudaStream_t stream) {
  if (count == 0) return;
  switch (type) {
    case ReduceType::F32:
      return launch<float>(slots, ranks, count, out, stream);
    case ReduceType::F64:
      return launch<double>(slots, ranks, count, out, stream);
    case ReduceType::I64:
      return launch<unsigned long long>(slots, ranks, count, out, stream);
  }
}

}  // namespace moert::cuda
