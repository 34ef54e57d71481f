// Elementwise, normalisation, embedding, loss and optimizer kernels.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/kernels.h"

namespace moert::cuda {
namespace {

constexpr unsigned kThreads = 256;

__device__ inline float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// Sum over a block in a fixed tree order (deterministic). shared: blockDim.x values.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  T r = shared[0];
  __syncthreads();
  return r;
}

__global__ void to_bf16_k(const float* x, __nv_bfloat16* y, int64_t n, bool saturate) {
  constexpr float kBf16Max = 3.38953139e38f;  // 0x7F7F as bf16, exact in fp32
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = x[i];
    y[i] = __float2bfloat16_rn(saturate && isfinite(v) ? fminf(fmaxf(v, -kBf16Max), kBf16Max) : v);
  }
}

__global__ void add_into_k(float* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = dst[i] + src[i];
}

__device__ inline void store_as(float v, float* p) { *p = v; }
__device__ inline void store_as(float v, __nv_bfloat16* p) { *p = __float2bfloat16_rn(v); }

template <typename Out>
__global__ void swiglu_k(const float* h1, const float* h3, Out* a, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    store_as((h1[i] == -INFINITY ? 0.0f : h1[i] * sigmoidf_(h1[i])) * h3[i], a + i);
}

__global__ void swiglu_backward_k(const float* h1, const float* h3, const float* da, float* dh1,
                                  float* dh3, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float s = sigmoidf_(h1[i]);
    const float g = da[i];
    dh3[i] = g * h1[i] * s;
    dh1[i] = g * h3[i] * s * (1.0f + h1[i] * (1.0f - s));
  }
}

__global__ void add_bias_k(float* y, const float* bias, int64_t rows, int64_t out) {
  const int64_t n = rows * out;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    y[i] += bias[i % out];
}

__global__ void column_sums_k(const float* dy, float* db, int64_t rows, int64_t out) {
  const int64_t o = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (o >= out) return;
  double sum = 0.0;
  for (int64_t r = 0; r < rows; ++r) sum += dy[r * out + o];
  db[o] += static_cast<float>(sum);
}

// One block per row.
__global__ void rmsnorm_k(const float* x, const float* w, float* y, float* inv_rms, int64_t dim,
                          float eps) {
  __shared__ double shared[kThreads];
  const float* xr = x + blockIdx.x * dim;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += double{xr[i]} * xr[i];
  ss = block_sum(ss, shared);
  const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(dim) + eps));
  if (threadIdx.x == 0 && inv_rms) inv_rms[blockIdx.x] = inv;
  float* yr = y + blockIdx.x * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

// One block per block of `row_block` rows: dx rows, and this block's dw partial.
__global__ void rmsnorm_backward_k(const float* x, const float* w, const float* inv_rms,
                                   const float* dy, float* dx, double* partial, int64_t rows,
                                   int64_t dim, int64_t row_block) {
  __shared__ double shared[kThreads];
  const int64_t r0 = blockIdx.x * row_block;
  const int64_t r1 = min(rows, r0 + row_block);
  double* part = partial + blockIdx.x * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) part[i] = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * dim;
    const float* gr = dy + r * dim;
    const double inv = inv_rms[r];
    double dot = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      dot += double{gr[i]} * w[i] * xr[i];
      part[i] += double{gr[i]} * xr[i] * inv;
    }
    dot = block_sum(dot, shared);
    const double k = inv * inv * inv * dot / static_cast<double>(dim);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
      dx[r * dim + i] = static_cast<float>(inv * gr[i] * w[i] - k * xr[i]);
  }
}

__global__ void fold_partials_k(const double* partial, float* dw, int64_t blocks, int64_t dim) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= dim) return;
  double sum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) sum += partial[b * dim + i];
  dw[i] += static_cast<float>(sum);
}

// One block per token position.
__global__ void embedding_k(const int32_t* tokens, const float* table, float* y, int64_t dim) {
  const float* src = table + int64_t{tokens[blockIdx.x]} * dim;
  float* dst = y + blockIdx.x * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
}

// One block per vocabulary row: its positions are a run of the sorted list, summed in order.
__global__ void embedding_backward_k(const int32_t* sorted_tok, const int32_t* sorted_pos,
                                     int64_t n, const float* dy, float* dtable, int64_t dim) {
  const int32_t v = static_cast<int32_t>(blockIdx.x);
  int64_t lo = 0, hi = n;  // first index with sorted_tok >= v
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted_tok[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo >= n || sorted_tok[lo] != v) return;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float acc = dtable[int64_t{v} * dim + i];
    for (int64_t j = lo; j < n && sorted_tok[j] == v; ++j)
      acc += dy[int64_t{sorted_pos[j]} * dim + i];
    dtable[int64_t{v} * dim + i] = acc;
  }
}

// One block per row.
__global__ void cross_entropy_k(const float* logits, const int32_t* targets, int64_t vocab,
                                float* dlogits, float scale, double* row_loss) {
  __shared__ double shared[kThreads];
  __shared__ float fshared[kThreads];
  const float* z = logits + blockIdx.x * vocab;
  if (targets[blockIdx.x] < 0) {  // an ignored target: no loss, no gradient
    if (threadIdx.x == 0) row_loss[blockIdx.x] = 0.0;
    if (dlogits)
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) dlogits[blockIdx.x * vocab + v] = 0;
    return;
  }
  float mx = -INFINITY;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) mx = fmaxf(mx, z[v]);
  fshared[threadIdx.x] = mx;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride)
      fshared[threadIdx.x] = fmaxf(fshared[threadIdx.x], fshared[threadIdx.x + stride]);
    __syncthreads();
  }
  mx = fshared[0];
  double sum = 0.0;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) sum += exp(double{z[v] - mx});
  sum = block_sum(sum, shared);
  const double lse = mx + log(sum);
  const int32_t t = targets[blockIdx.x];
  if (threadIdx.x == 0) row_loss[blockIdx.x] = lse - z[t];
  if (dlogits) {
    float* g = dlogits + blockIdx.x * vocab;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
      g[v] = static_cast<float>(scale * exp(double{z[v]} - lse)) - (v == t ? scale : 0.0f);
  }
}

// The smallest index of a NaN or infinity in x, into *first (initialised to n by the caller).
__global__ void find_nonfinite_k(const float* x, int64_t n, unsigned long long* first) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    if (!isfinite(x[i])) atomicMin(first, static_cast<unsigned long long>(i));
}

__global__ void sum_squares_k(const float* x, int64_t n, double* partial) {
  __shared__ double shared[kThreads];
  const int64_t per_block = (n + gridDim.x - 1) / gridDim.x;
  const int64_t b0 = blockIdx.x * per_block, b1 = min(n, b0 + per_block);
  double sq = 0.0;
  for (int64_t i = b0 + threadIdx.x; i < b1; i += blockDim.x) sq += double{x[i]} * x[i];
  sq = block_sum(sq, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sq;
}

__global__ void adamw_k(float* p, const float* g, float* m, float* v, int64_t n, double lr,
                        double beta1, double beta2, double eps, double wd, double gscale,
                        double bc1, double bc2) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const double gi = g[i] * gscale;
    const double mi = beta1 * m[i] + (1.0 - beta1) * gi;
    const double vi = beta2 * v[i] + (1.0 - beta2) * gi * gi;
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    const double update = (mi / bc1) / (sqrt(vi / bc2) + eps) + wd * p[i];
    p[i] = static_cast<float>(p[i] - lr * update);
  }
}

__global__ void sgd_k(float* p, const float* g, float* m, int64_t n, double lr, double momentum,
                      double wd, double gscale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const double gi = g[i] * gscale + wd * p[i];
    const double buf = momentum * m[i] + gi;
    m[i] = static_cast<float>(buf);
    p[i] = static_cast<float>(p[i] - lr * buf);
  }
}

}  // namespace

void to_bf16(const float* x, uint16_t* y, int64_t n, bool saturate, cudaStream_t s) {
  if (n == 0) return;
  to_bf16_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(x, reinterpret_cast<__nv_bfloat16*>(y), n,
                                                       saturate);
  check_launch("to_bf16");
}

void add_into(float* dst, const float* src, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  add_into_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(dst, src, n);
  check_launch("add_into");
}

void swiglu_bf16(const float* h1, const float* h3, uint16_t* a, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  swiglu_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(h1, h3, reinterpret_cast<__nv_bfloat16*>(a),
                                                      n);
  check_launch("swiglu");
}

void swiglu_f32(const float* h1, const float* h3, float* a, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  swiglu_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(h1, h3, a, n);
  check_launch("swiglu (fp32)");
}

void swiglu_backward(const float* h1, const float* h3, const float* da, float* dh1, float* dh3,
                     int64_t n, cudaStream_t s) {
  if (n == 0) return;
  swiglu_backward_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(h1, h3, da, dh1, dh3, n);
  check_launch("swiglu_backward");
}

void add_bias(float* y, const float* bias, int64_t rows, int64_t out, cudaStream_t s) {
  if (rows * out == 0) return;
  add_bias_k<<<grid_for(rows * out, kThreads), kThreads, 0, s>>>(y, bias, rows, out);
  check_launch("add_bias");
}

void column_sums(const float* dy, float* db, int64_t rows, int64_t out, cudaStream_t s) {
  if (out == 0) return;
  column_sums_k<<<grid_for(out, kThreads), kThreads, 0, s>>>(dy, db, rows, out);
  check_launch("column_sums");
}

void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
             float eps, cudaStream_t s) {
  if (rows == 0) return;
  rmsnorm_k<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(x, w, y, inv_rms, dim, eps);
  check_launch("rmsnorm");
}

void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                      float* dx, float* dw, double* partial, int64_t rows, int64_t dim,
                      int64_t row_block, cudaStream_t s) {
  if (rows == 0) return;
  const int64_t blocks = (rows + row_block - 1) / row_block;
  rmsnorm_backward_k<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
      x, w, inv_rms, dy, dx, partial, rows, dim, row_block);
  check_launch("rmsnorm_backward");
  fold_partials_k<<<grid_for(dim, kThreads), kThreads, 0, s>>>(partial, dw, blocks, dim);
  check_launch("rmsnorm_backward fold");
}

void embedding(const int32_t* tokens, const float* table, float* y, int64_t n, int64_t dim,
               cudaStream_t s) {
  if (n == 0) return;
  embedding_k<<<static_cast<unsigned>(n), 128, 0, s>>>(tokens, table, y, dim);
  check_launch("embedding");
}

void embedding_backward(const int32_t* sorted_tok, const int32_t* sorted_pos, int64_t n,
                        const float* dy, float* dtable, int64_t vocab, int64_t dim,
                        cudaStream_t s) {
  if (n == 0) return;
  embedding_backward_k<<<static_cast<unsigned>(vocab), 128, 0, s>>>(sorted_tok, sorted_pos, n, dy,
                                                                    dtable, dim);
  check_launch("embedding_backward");
}

void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                   float* dlogits, float scale, double* row_loss, cudaStream_t s) {
  if (rows == 0) return;
  cross_entropy_k<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(logits, targets, vocab, dlogits,
                                                                   scale, row_loss);
  check_launch("cross_entropy");
}

void find_nonfinite(const float* x, int64_t n, unsigned long long* first, cudaStream_t s) {
  if (n == 0) return;
  find_nonfinite_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(x, n, first);
  check_launch("find_nonfinite");
}

void sum_squares(const float* x, int64_t n, double* partial, cudaStream_t s) {
  sum_squares_k<<<kSumBlocks, kThreads, 0, s>>>(x, n, partial);
  check_launch("sum_squares");
}

void adamw(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
           double beta2, double eps, double wd, double gscale, double bc1, double bc2,
           cudaStream_t s) {
  if (n == 0) return;
  adamw_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(p, g, m, v, n, lr, beta1, beta2, eps, wd,
                                                     gscale, bc1, bc2);
  check_launch("adamw");
}

void sgd(float* p, const float* g, float* m, int64_t n, double lr, double momentum, double wd,
         double gscale, cudaStream_t s) {
  if (n == 0) return;
  sgd_k<<<grid_for(n, kThreads), kThreads, 0, s>>>(p, g, m, n, lr, momentum, wd, gscale);
  check_launch("sgd");
}

}  // namespace moert::cuda
