// What layers ask of a device. Layers say what (route, dispatch, grouped GEMM); a backend says how.
// Pointers are host memory for the CPU backend. Every operation is deterministic for a given input.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/model.h"

namespace moert {

// Token-to-expert assignments of one MoE layer, in expert-major order, tokens ascending within an
// expert (a stable counting sort), so that the same routing always gives the same order.
struct DispatchPlan {
  int64_t rows = 0;
  std::vector<int64_t> expert_offsets;  // [E + 1]: assignments of expert e are [o[e], o[e + 1])
  std::vector<int64_t> token;           // [A]: the token of each assignment
  std::vector<float> weight;            // [A]: its gate weight
  std::vector<int64_t> token_offsets;   // [rows + 1]: token t's assignments are listed in
  std::vector<int64_t> token_assign;    // token_assign[token_offsets[t] .. token_offsets[t + 1])

  int64_t num_assignments() const { return static_cast<int64_t>(token.size()); }
  int64_t count(int64_t expert) const {
    return expert_offsets[expert + 1] - expert_offsets[expert];
  }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // y[rows, out] = x[rows, in] * w[out, in]^T (+ bias[out]) (+ y when accumulate).
  virtual void linear(const float* x, const float* w, const float* bias, float* y, int64_t rows,
                      int64_t in, int64_t out, bool accumulate) = 0;

  // y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; inv_rms[r] (optional) keeps the scale.
  virtual void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows,
                       int64_t dim, float eps) = 0;

  // y[r] = concat over c of table[tokens[r * context + c]]; ids already range-checked.
  virtual void embedding(const int32_t* tokens, const float* table, float* y, int64_t rows,
                         int64_t context, int64_t dim) = 0;

  // y[rows, dim] (+)= W2 (silu(W1 x) * W3 x) with w1, w3 [hidden, dim] and w2 [dim, hidden].
  virtual void swiglu_ffn(const float* x, const float* w1, const float* w3, const float* w2,
                          float* y, int64_t rows, int64_t dim, int64_t hidden, bool accumulate) = 0;

  // Token-choice routing of `rows` tokens: scores [rows, E] (unbiased), experts and weights
  // [rows, top_k], exactly as DESIGN.md section 1.
  virtual void route_topk(const RouterConfig& cfg, const float* logits, const float* bias,
                          int64_t rows, float* scores, int32_t* experts, float* weights) = 0;

  // Expert-choice routing: scores [rows, E]; each expert takes its `capacity` best tokens (the
  // lower token index among equals); the plan's weights are the scaled scores.
  virtual void route_expert_choice(const RouterConfig& cfg, const float* logits, int64_t rows,
                                   int64_t capacity, float* scores, DispatchPlan& plan) = 0;

  // Builds the plan of a token-choice routing (experts/weights [rows, top_k]).
  virtual void plan_dispatch(const int32_t* experts, const float* weights, int64_t rows,
                             int64_t top_k, int64_t num_experts, DispatchPlan& plan) = 0;

  // x_perm[a] = x[plan.token[a]] for every assignment.
  virtual void dispatch(const DispatchPlan& plan, const float* x, float* x_perm, int64_t dim) = 0;

  // For every expert e, y_perm over its assignments = SwiGLU FFN of expert e applied to x_perm
  // (grouped GEMM over the contiguous segments). w1, w3 [E, hidden, dim]; w2 [E, dim, hidden].
  virtual void grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, const float* w1,
                                  const float* w3, const float* w2, float* y_perm, int64_t dim,
                                  int64_t hidden) = 0;

  // y[t] += sum over t's assignments a (in expert order) of plan.weight[a] * y_perm[a].
  virtual void combine(const DispatchPlan& plan, const float* y_perm, float* y, int64_t dim) = 0;
};

// The CPU backend with `threads` worker threads (the caller's included).
std::unique_ptr<Backend> make_cpu_backend(unsigned threads);

}  // namespace moert
