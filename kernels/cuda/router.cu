// The router on the GPU: one fused kernel for scores, bias, group-limited top-k, renormalisation
// and scaling (DESIGN.md section 1, the same rules as the CPU's), its backward, and the
// auxiliary loss.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/router_rules.h"

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

// One thread per (sequence, expert).
__global__ void aux_stats_k(const float* scores, const double* z, const int64_t* token_offsets,
                            const int32_t* token_assign, const int32_t* expert, int64_t num_seq,
                            int64_t L, int E, int K, double alpha, double* f_table,
                            double* loss_part) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= num_seq * E) return;
  rules::aux_stats(scores, z, token_offsets, token_assign, expert, i, num_seq, L, E, K, alpha,
                   f_table, loss_part);
}

// One thread per token.
__global__ void aux_grad_k(const float* scores, const double* z_all, const double* f_table,
                           int64_t rows, int64_t L, int64_t num_seq, int E, double alpha,
                           float* ds) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  rules::aux_grad_token(scores + t * E, z_all[t], f_table + (t / L) * E, L, num_seq, E, alpha,
                        ds + t * E);
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

void aux_loss(const RouterConfig& cfg, const float* scores, const int64_t* token_offsets,
              const int32_t* token_assign, const int32_t* expert, int64_t rows, int64_t seq_len,
              double alpha, float* ds, double* z, double* f_table, double* loss_part,
              cudaStream_t s) {
  const int E = static_cast<int>(cfg.num_experts), K = static_cast<int>(cfg.top_k);
  const int64_t num_seq = rows / seq_len;
  score_sums_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(scores, rows, E, z);
  check_launch("aux_loss score sums");
  aux_stats_k<<<grid_for(num_seq * E, kThreads), kThreads, 0, s>>>(
      scores, z, token_offsets, token_assign, expert, num_seq, seq_len, E, K, alpha, f_table,
      loss_part);
  check_launch("aux_loss stats");
  aux_grad_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(scores, z, f_table, rows, seq_len,
                                                           num_seq, E, alpha, ds);
  check_launch("aux_loss grad");
}

}  // namespace moert::cuda
