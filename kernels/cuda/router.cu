// The router on the GPU: one fused kernel for scores, bias, group-limited top-k, renormalisation
// and scaling (docs/design.md section 1, the same rules as the CPU's), its backward, and the
// auxiliary loss.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/router_rules.h"

namespace moert::cuda {
namespace {

constexpr unsigned kThreads = 128;

// Every kernel here is one thread per item; the item's work is in router_rules.h, shared with the
// host-side test that holds it to the CPU backend.

// One thread per token. scratch: rules::route_scratch_floats(cfg) floats per token.
__global__ void route_topk_k(RouterConfig cfg, const float* logits, const float* bias, int64_t rows,
                             float* scores, int32_t* experts, float* weights, float* scratch) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  const int64_t E = cfg.num_experts, K = cfg.top_k;
  rules::route_token(cfg, logits + t * E, bias, scores + t * E, experts + t * K, weights + t * K,
                     scratch + t * rules::route_scratch_floats(cfg));
}

// One thread per token. ds scratch: E floats per token.
__global__ void router_backward_k(RouterConfig cfg, bool normalize, const float* scores,
                                  const int64_t* token_offsets, const int32_t* token_assign,
                                  const int32_t* expert, const float* dweight,
                                  const float* ds_extra, float* dlogits, float* scratch,
                                  int64_t rows) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  const int64_t E = cfg.num_experts;
  rules::router_backward_token(
      cfg, normalize, scores + t * E, token_offsets[t], token_offsets[t + 1], token_assign, expert,
      dweight, ds_extra ? ds_extra + t * E : nullptr, scratch + t * E, dlogits + t * E);
}

// One thread per token: z = sum of its scores, computed once for every expert's statistics.
__global__ void score_sums_k(const float* scores, int64_t rows, int E, double* z) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  z[t] = rules::score_sum(scores + t * E, E);
}

// One thread per (chunk, expert), the expert fastest: neighbouring threads read neighbouring
// scores. Counts come by binary search in the plan's expert-major order, not by a scan of every
// assignment of the chunk.
__global__ void aux_partials_k(const float* scores, const double* z, const int64_t* chunk_offsets,
                               int64_t chunks, int E, const int64_t* expert_offsets,
                               const int32_t* token, int64_t* counts, double* psum) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= chunks * E) return;
  const int64_t c = i / E;
  const int e = static_cast<int>(i % E);
  const int64_t t0 = chunk_offsets[c], t1 = chunk_offsets[c + 1];
  counts[i] = rules::expert_tokens_in(expert_offsets, token, e, t0, t1);
  psum[i] = rules::aux_psum(scores, z, t0, t1, e, E);
}

// One thread per token.
__global__ void aux_grad_k(const float* scores, int64_t rows, int E, const int64_t* seq_offsets,
                           int64_t num_seq, const double* coef, float* ds) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  const float* s = scores + t * E;
  const int64_t q = rules::sequence_of(seq_offsets, num_seq, t);
  if (q < 0) {
    for (int e = 0; e < E; ++e) ds[t * E + e] = 0.0f;
    return;
  }
  rules::aux_grad_token(s, rules::score_sum(s, E), coef + q * E, E, ds + t * E);
}

}  // namespace

void route_topk(const RouterConfig& cfg, const float* logits, const float* bias, int64_t rows,
                float* scores, int32_t* experts, float* weights, float* scratch, cudaStream_t s) {
  if (rows == 0) return;
  route_topk_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(cfg, logits, bias, rows, scores,
                                                             experts, weights, scratch);
  check_launch("route_topk");
}

void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                     const int64_t* token_offsets, const int32_t* token_assign,
                     const int32_t* expert, const float* dweight, const float* ds_extra,
                     float* dlogits, float* scratch, int64_t rows, cudaStream_t s) {
  if (rows == 0) return;
  router_backward_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(
      cfg, normalize, scores, token_offsets, token_assign, expert, dweight, ds_extra, dlogits,
      scratch, rows);
  check_launch("router_backward");
}

void aux_partials(const RouterConfig& cfg, const float* scores, int64_t rows,
                  const int64_t* chunk_offsets, int64_t chunks, const int64_t* expert_offsets,
                  const int32_t* token, double* z, int64_t* counts, double* psum, cudaStream_t s) {
  const int E = static_cast<int>(cfg.num_experts);
  if (rows > 0) {
    score_sums_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(scores, rows, E, z);
    check_launch("aux_partials score sums");
  }
  if (chunks * E == 0) return;
  aux_partials_k<<<grid_for(chunks * E, kThreads), kThreads, 0, s>>>(
      scores, z, chunk_offsets, chunks, E, expert_offsets, token, counts, psum);
  check_launch("aux_partials");
}

void aux_grad(const RouterConfig& cfg, const float* scores, int64_t rows,
              const int64_t* seq_offsets, int64_t num_seq, const double* coef, float* ds,
              cudaStream_t s) {
  if (rows == 0) return;
  aux_grad_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(
      scores, rows, static_cast<int>(cfg.num_experts), seq_offsets, num_seq, coef, ds);
  check_launch("aux_grad");
}

}  // namespace moert::cuda
