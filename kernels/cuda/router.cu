// The router on the GPU: one fused kernel for scores, bias, group-limited top-k, renormalisation
// and scaling (DESIGN.md section 1, the same rules as the CPU's), its backward, and the
// auxiliary loss.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/router_rules.h"

namespace moert::cuda {
namespace {

constexpr unsigned kThreads = 128;
// Rows per partial P sum of the auxiliary loss: enough threads for a whole-batch sequence, few
// enough partials for the fold.
constexpr int64_t kAuxChunk = 128;

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

// One thread per (sequence, chunk of kAuxChunk rows, expert), the expert fastest: neighbouring
// threads read neighbouring scores, and even one sequence of every row fills the GPU.
__global__ void aux_p_partial_k(const float* scores, const double* z, int64_t num_seq, int64_t L,
                                int64_t chunks, int E, double* p_partial) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= num_seq * chunks * E) return;
  rules::aux_p_partial(scores, z, i, L, kAuxChunk, chunks, E, p_partial);
}

// One thread per (sequence, expert): its count by binary search in the plan's expert-major
// order, not by a scan of every assignment of its sequence.
__global__ void aux_stats_k(const int64_t* expert_offsets, const int32_t* token,
                            const double* p_partial, int64_t num_seq, int64_t L, int64_t chunks,
                            int E, int K, double alpha, double* f_table, double* loss_part) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= num_seq * E) return;
  rules::aux_stats(expert_offsets, token, p_partial, i, num_seq, L, chunks, E, K, alpha, f_table,
                   loss_part);
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

// z [rows], f_table [num_seq * E], p_partial [num_seq * chunks * E], as aux_loss lays them out.
int64_t aux_loss_scratch(int64_t rows, int64_t seq_len, int64_t num_experts) {
  const int64_t num_seq = rows / seq_len;
  return rows + num_seq * num_experts +
         num_seq * rules::aux_chunks(seq_len, kAuxChunk) * num_experts;
}

void aux_loss(const RouterConfig& cfg, const float* scores, const int64_t* expert_offsets,
              const int32_t* token, int64_t rows, int64_t seq_len, double alpha, float* ds,
              double* loss_part, double* scratch, cudaStream_t s) {
  const int E = static_cast<int>(cfg.num_experts), K = static_cast<int>(cfg.top_k);
  const int64_t num_seq = rows / seq_len, chunks = rules::aux_chunks(seq_len, kAuxChunk);
  double* z = scratch;
  double* f_table = z + rows;
  double* p_partial = f_table + num_seq * E;
  score_sums_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(scores, rows, E, z);
  check_launch("aux_loss score sums");
  aux_p_partial_k<<<grid_for(num_seq * chunks * E, kThreads), kThreads, 0, s>>>(
      scores, z, num_seq, seq_len, chunks, E, p_partial);
  check_launch("aux_loss partial sums");
  aux_stats_k<<<grid_for(num_seq * E, kThreads), kThreads, 0, s>>>(
      expert_offsets, token, p_partial, num_seq, seq_len, chunks, E, K, alpha, f_table, loss_part);
  check_launch("aux_loss stats");
  aux_grad_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(scores, z, f_table, rows, seq_len,
                                                           num_seq, E, alpha, ds);
  check_launch("aux_loss grad");
}

}  // namespace moert::cuda
