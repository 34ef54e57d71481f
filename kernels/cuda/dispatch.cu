// Dispatch on the GPU: the deterministic permutation of token assignments into expert order
// (stable by token index), the gather, the weighted combine, and their backward.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/kernels.h"

namespace moert::cuda {
namespace {

constexpr unsigned kThreads = 256;

__global__ void make_sort_keys_k(const int32_t* experts, int64_t rows, int64_t top_k, int64_t* keys,
                                 int32_t* vals) {
  const int64_t a = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (a >= rows * top_k) return;
  keys[a] = int64_t{experts[a]} * rows + a / top_k;
  vals[a] = static_cast<int32_t>(a);
}

__global__ void positions_k(int32_t* v, int64_t n) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i < n) v[i] = static_cast<int32_t>(i);
}

__global__ void histogram_k(const int32_t* experts, int64_t n, unsigned long long* counts) {
  const int64_t a = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (a < n) atomicAdd(&counts[experts[a]], 1ull);  // integer counts: order does not matter
}

__global__ void offsets_k(const int64_t* counts, int64_t num_experts, int64_t* offsets) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
}

__global__ void fill_plan_k(const int64_t* keys, const int32_t* vals, const float* weights,
                            int64_t rows, int64_t n, int32_t* token, int32_t* expert, float* weight,
                            int32_t* slot_of) {
  const int64_t slot = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (slot >= n) return;
  const int64_t key = keys[slot];
  const int32_t a = vals[slot];
  token[slot] = static_cast<int32_t>(key % rows);
  expert[slot] = static_cast<int32_t>(key / rows);
  weight[slot] = weights[a];
  slot_of[a] = static_cast<int32_t>(slot);
}

// One thread per token: its K slots, sorted ascending (that is, by expert).
__global__ void token_view_k(const int32_t* slot_of, int64_t rows, int64_t top_k,
                             int64_t* token_offsets, int32_t* token_assign) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t > rows) return;
  token_offsets[t] = t * top_k;
  if (t == rows) return;
  int32_t* out = token_assign + t * top_k;
  for (int64_t k = 0; k < top_k; ++k) {
    const int32_t v = slot_of[t * top_k + k];
    int64_t j = k;
    while (j > 0 && out[j - 1] > v) {
      out[j] = out[j - 1];
      --j;
    }
    out[j] = v;
  }
}

// One block per row.
__global__ void gather_rows_k(const float* x, const int32_t* token, int64_t dim, float* y) {
  const float4* src = reinterpret_cast<const float4*>(x + int64_t{token[blockIdx.x]} * dim);
  float4* dst = reinterpret_cast<float4*>(y + blockIdx.x * dim);
  // float4 needs 16-byte addresses: rows of a multiple of 4 floats from 16-byte aligned bases.
  if (dim % 4 == 0 && (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16 == 0) {
    for (int64_t i = threadIdx.x; i < dim / 4; i += blockDim.x) dst[i] = src[i];
  } else {
    const float* s = x + int64_t{token[blockIdx.x]} * dim;
    float* d = y + blockIdx.x * dim;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) d[i] = s[i];
  }
}

// One block per token: y[t] += sum of its assignments' weighted outputs, in expert order.
__global__ void combine_k(const int64_t* token_offsets, const int32_t* token_assign,
                          const float* weight, const float* y_perm, float* y, int64_t dim) {
  const int64_t t = blockIdx.x;
  const int64_t j0 = token_offsets[t], j1 = token_offsets[t + 1];
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = y[t * dim + d];
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t a = token_assign[j];
      acc += weight[a] * y_perm[int64_t{a} * dim + d];
    }
    y[t * dim + d] = acc;
  }
}

// One block per assignment.
__global__ void combine_backward_k(const int32_t* token, const float* weight, const float* y_perm,
                                   const float* dy, float* dy_perm, float* dweight, int64_t dim) {
  __shared__ double shared[kThreads];
  const int64_t a = blockIdx.x;
  const float* g = dy + int64_t{token[a]} * dim;
  const float* yp = y_perm + a * dim;
  const float w = weight[a];
  double dot = 0.0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    if (dy_perm) dy_perm[a * dim + d] = w * g[d];
    dot += double{g[d]} * yp[d];
  }
  shared[threadIdx.x] = dot;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0 && dweight) dweight[a] = static_cast<float>(shared[0]);
}

// One block per token.
__global__ void dispatch_backward_k(const int64_t* token_offsets, const int32_t* token_assign,
                                    const float* dx_perm, float* dx, int64_t dim) {
  const int64_t t = blockIdx.x;
  const int64_t j0 = token_offsets[t], j1 = token_offsets[t + 1];
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = dx[t * dim + d];
    for (int64_t j = j0; j < j1; ++j) acc += dx_perm[int64_t{token_assign[j]} * dim + d];
    dx[t * dim + d] = acc;
  }
}

}  // namespace

void make_sort_keys(const int32_t* experts, int64_t rows, int64_t top_k, int64_t* keys,
                    int32_t* vals, cudaStream_t s) {
  make_sort_keys_k<<<grid_for(rows * top_k, kThreads), kThreads, 0, s>>>(experts, rows, top_k, keys,
                                                                         vals);
  check_launch("make_sort_keys");
}

void positions(int32_t* v, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  positions_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(v, n);
  check_launch("positions");
}

void expert_histogram(const int32_t* experts, int64_t n, int64_t num_experts, int64_t* counts,
                      cudaStream_t s) {
  static_assert(sizeof(unsigned long long) == sizeof(int64_t));
  check(cudaMemsetAsync(counts, 0, sizeof(int64_t) * num_experts, s), "zero histogram");
  if (n == 0) return;
  histogram_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(
      experts, n, reinterpret_cast<unsigned long long*>(counts));
  check_launch("expert_histogram");
}

void exclusive_offsets(const int64_t* counts, int64_t num_experts, int64_t* offsets,
                       cudaStream_t s) {
  offsets_k<<<1, 1, 0, s>>>(counts, num_experts, offsets);
  check_launch("exclusive_offsets");
}

void fill_plan(const int64_t* sorted_keys, const int32_t* sorted_vals, const float* weights,
               int64_t rows, int64_t n, int32_t* token, int32_t* expert, float* weight,
               int32_t* slot_of, cudaStream_t s) {
  if (n == 0) return;
  fill_plan_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(sorted_keys, sorted_vals, weights, rows, n,
                                                         token, expert, weight, slot_of);
  check_launch("fill_plan");
}

void token_view(const int32_t* slot_of, int64_t rows, int64_t top_k, int64_t* token_offsets,
                int32_t* token_assign, cudaStream_t s) {
  token_view_k<<<grid_for(rows + 1, kThreads), kThreads, 0, s>>>(slot_of, rows, top_k,
                                                                 token_offsets, token_assign);
  check_launch("token_view");
}

void gather_rows(const float* x, const int32_t* token, int64_t n, int64_t dim, float* y,
                 cudaStream_t s) {
  if (n == 0) return;
  gather_rows_k<<<static_cast<unsigned>(n), 128, 0, s>>>(x, token, dim, y);
  check_launch("gather_rows");
}

void combine(const int64_t* token_offsets, const int32_t* token_assign, const float* weight,
             const float* y_perm, float* y, int64_t rows, int64_t dim, cudaStream_t s) {
  if (rows == 0) return;
  combine_k<<<static_cast<unsigned>(rows), 128, 0, s>>>(token_offsets, token_assign, weight, y_perm,
                                                        y, dim);
  check_launch("combine");
}

void combine_backward(const int32_t* token, const float* weight, const float* y_perm,
                      const float* dy, float* dy_perm, float* dweight, int64_t n, int64_t dim,
                      cudaStream_t s) {
  if (n == 0) return;
  combine_backward_k<<<static_cast<unsigned>(n), kThreads, 0, s>>>(token, weight, y_perm, dy,
                                                                   dy_perm, dweight, dim);
  check_launch("combine_backward");
}

void dispatch_backward(const int64_t* token_offsets, const int32_t* token_assign,
                       const float* dx_perm, float* dx, int64_t rows, int64_t dim, cudaStream_t s) {
  if (rows == 0) return;
  dispatch_backward_k<<<static_cast<unsigned>(rows), 128, 0, s>>>(token_offsets, token_assign,
                                                                  dx_perm, dx, dim);
  check_launch("dispatch_backward");
}

}  // namespace moert::cuda
