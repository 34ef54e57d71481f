// Launchers of the CUDA kernels (all asynchronous on `s`). Reductions run in a fixed order, so
// every result is bitwise reproducible on the same GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/model.h"

namespace moert::cuda {

// ---- Elementwise
// y = bf16(x), round to nearest even; with `saturate` (weights' copies, Backend::to_bf16) a finite
// x beyond bf16's largest gives the largest rather than infinity.
void to_bf16(const float* x, uint16_t* y, int64_t n, bool saturate, cudaStream_t s);
// a = silu(h1) * h3, written as bf16 (the next GEMM's input).
void swiglu_bf16(const float* h1, const float* h3, uint16_t* a, int64_t n, cudaStream_t s);
// The same in fp32: FP8 quantizes it next, from the values the CPU computes (kernels/cpu/math.h).
void swiglu_f32(const float* h1, const float* h3, float* a, int64_t n, cudaStream_t s);
// dst[i] = dst[i] + src[i].
void add_into(float* dst, const float* src, int64_t n, cudaStream_t s);
// dh1, dh3 from dA (dA may alias dh1).
void swiglu_backward(const float* h1, const float* h3, const float* da, float* dh1, float* dh3,
                     int64_t n, cudaStream_t s);
// y[r, o] += bias[o]
void add_bias(float* y, const float* bias, int64_t rows, int64_t out, cudaStream_t s);
// db[o] += sum over rows of dy[r, o], rows in order.
void column_sums(const float* dy, float* db, int64_t rows, int64_t out, cudaStream_t s);

// ---- Norms and embeddings
void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
             float eps, cudaStream_t s);
// dx; per-block partial weight gradients in partial[blocks, dim] (doubles), then folded into dw
// in block order.
void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                      float* dx, float* dw, double* partial, int64_t rows, int64_t dim,
                      int64_t row_block, cudaStream_t s);
void embedding(const int32_t* tokens, const float* table, float* y, int64_t n, int64_t dim,
               cudaStream_t s);
// dtable[v] += every dy slice whose token is v, in position order. sorted_pos: positions sorted
// by token (stable), sorted_tok: their tokens.
void embedding_backward(const int32_t* sorted_tok, const int32_t* sorted_pos, int64_t n,
                        const float* dy, float* dtable, int64_t vocab, int64_t dim, cudaStream_t s);

// ---- Loss and optimizer
// Per-row loss into row_loss (double); dlogits = scale * (softmax - onehot) when not null.
void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                   float* dlogits, float scale, double* row_loss, cudaStream_t s);
// partial[b] = sum of squares of block b's share (kSumBlocks blocks, fixed split).
inline constexpr unsigned kSumBlocks = 256;
// atomicMin of the index of every NaN or infinity of x into *first (the caller sets it to n).
void find_nonfinite(const float* x, int64_t n, unsigned long long* first, cudaStream_t s);
void sum_squares(const float* x, int64_t n, double* partial, cudaStream_t s);
void adamw(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
           double beta2, double eps, double wd, double gscale, double bc1, double bc2,
           cudaStream_t s);
void sgd(float* p, const float* g, float* m, int64_t n, double lr, double momentum, double wd,
         double gscale, cudaStream_t s);

// ---- Routing
// One thread per token: scores, biased selection with group limits, top-k, weights.
// scratch: rows * rules::route_scratch_floats(cfg) floats (router_rules.h).
void route_topk(const RouterConfig& cfg, const float* logits, const float* bias, int64_t rows,
                float* scores, int32_t* experts, float* weights, float* scratch, cudaStream_t s);
// dlogits from the assignment weight gradients (token-major plan view) and ds_extra.
void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                     const int64_t* token_offsets, const int32_t* token_assign,
                     const int32_t* expert, const float* dweight, const float* ds_extra,
                     float* dlogits, float* scratch, int64_t rows, cudaStream_t s);
// Auxiliary-loss statistics per chunk (Backend::aux_partials), all in device memory: z [rows]
// scratch; chunk_offsets [chunks + 1]; counts and psum [chunks * E].
void aux_partials(const RouterConfig& cfg, const float* scores, int64_t rows,
                  const int64_t* chunk_offsets, int64_t chunks, const int64_t* expert_offsets,
                  const int32_t* token, double* z, int64_t* counts, double* psum, cudaStream_t s);
// Backward of an auxiliary loss through P (Backend::aux_grad); seq_offsets [num_seq + 1] and
// coef [num_seq * E] in device memory.
void aux_grad(const RouterConfig& cfg, const float* scores, int64_t rows,
              const int64_t* seq_offsets, int64_t num_seq, const double* coef, float* ds,
              cudaStream_t s);

// ---- Dispatch
// keys[a] = expert[a] * rows + token, vals[a] = a, for a = t * K + k.
void make_sort_keys(const int32_t* experts, int64_t rows, int64_t top_k, int64_t* keys,
                    int32_t* vals, cudaStream_t s);
// v[i] = i for i in [0, n).
void positions(int32_t* v, int64_t n, cudaStream_t s);
// Histogram of experts (integers) into counts[E] (zeroed first).
void expert_histogram(const int32_t* experts, int64_t n, int64_t num_experts, int64_t* counts,
                      cudaStream_t s);
// offsets[0] = 0, offsets[e + 1] = offsets[e] + counts[e] (E small: one thread).
void exclusive_offsets(const int64_t* counts, int64_t num_experts, int64_t* offsets,
                       cudaStream_t s);
// From the sorted (key, value) pairs: token, expert, weight per slot; slot_of[a] = slot.
void fill_plan(const int64_t* sorted_keys, const int32_t* sorted_vals, const float* weights,
               int64_t rows, int64_t n, int32_t* token, int32_t* expert, float* weight,
               int32_t* slot_of, cudaStream_t s);
// token_offsets[t] = t K; token_assign[t K ..] = token t's slots in ascending (expert) order.
void token_view(const int32_t* slot_of, int64_t rows, int64_t top_k, int64_t* token_offsets,
                int32_t* token_assign, cudaStream_t s);
void gather_rows(const float* x, const int32_t* token, int64_t n, int64_t dim, float* y,
                 cudaStream_t s);
void combine(const int64_t* token_offsets, const int32_t* token_assign, const float* weight,
             const float* y_perm, float* y, int64_t rows, int64_t dim, cudaStream_t s);
// dy_perm or dweight may be null (Backend::combine_backward).
void combine_backward(const int32_t* token, const float* weight, const float* y_perm,
                      const float* dy, float* dy_perm, float* dweight, int64_t n, int64_t dim,
                      cudaStream_t s);
void dispatch_backward(const int64_t* token_offsets, const int32_t* token_assign,
                       const float* dx_perm, float* dx, int64_t rows, int64_t dim, cudaStream_t s);

}  // namespace moert::cuda
