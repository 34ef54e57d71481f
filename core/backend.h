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
  std::vector<int32_t> expert;          // [A]: its expert
  std::vector<float> weight;            // [A]: its gate weight
  std::vector<int64_t> token_offsets;   // [rows + 1]: token t's assignments are listed in
  std::vector<int64_t> token_assign;    // token_assign[token_offsets[t] .. token_offsets[t + 1])

  int64_t num_assignments() const { return static_cast<int64_t>(token.size()); }
  int64_t count(int64_t e) const { return expert_offsets[e + 1] - expert_offsets[e]; }
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

  // ---- Training. Weight gradients are accumulated (+=); each reduction runs in a fixed order,
  // so gradients are bitwise reproducible for any thread count.

  // dx (+)= dy * w (when dx is not null); dw += dy^T x; db += column sums of dy (when not null).
  virtual void linear_backward(const float* x, const float* w, const float* dy, float* dx,
                               bool dx_accumulate, float* dw, float* db, int64_t rows, int64_t in,
                               int64_t out) = 0;

  // dx = d rmsnorm / dx applied to dy (overwritten); dw += d / dw.
  virtual void rmsnorm_backward(const float* x, const float* w, const float* inv_rms,
                                const float* dy, float* dx, float* dw, int64_t rows,
                                int64_t dim) = 0;

  // dtable[token] += the slice of dy that token produced.
  virtual void embedding_backward(const int32_t* tokens, const float* dy, float* dtable,
                                  int64_t rows, int64_t context, int64_t dim) = 0;

  // swiglu_ffn that also keeps the pre-activations h1 = W1 x and h3 = W3 x ([rows, hidden]).
  virtual void swiglu_ffn_train(const float* x, const float* w1, const float* w3, const float* w2,
                                float* y, float* h1, float* h3, int64_t rows, int64_t dim,
                                int64_t hidden, bool accumulate) = 0;

  // Backward of swiglu_ffn: dx (+)= d/dx, dw1, dw3, dw2 += d/dw.
  virtual void swiglu_ffn_backward(const float* x, const float* w1, const float* w3,
                                   const float* w2, const float* h1, const float* h3,
                                   const float* dy, float* dx, bool dx_accumulate, float* dw1,
                                   float* dw3, float* dw2, int64_t rows, int64_t dim,
                                   int64_t hidden) = 0;

  // grouped_swiglu_ffn that keeps h1 and h3 ([assignments, hidden]).
  virtual void grouped_swiglu_ffn_train(const DispatchPlan& plan, const float* x_perm,
                                        const float* w1, const float* w3, const float* w2,
                                        float* y_perm, float* h1, float* h3, int64_t dim,
                                        int64_t hidden) = 0;

  // Backward of grouped_swiglu_ffn: dx_perm (overwritten) and per-expert dw1, dw3, dw2 (+=).
  virtual void grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm,
                                           const float* w1, const float* w3, const float* w2,
                                           const float* h1, const float* h3, const float* dy_perm,
                                           float* dx_perm, float* dw1, float* dw3, float* dw2,
                                           int64_t dim, int64_t hidden) = 0;

  // Backward of combine: dy_perm[a] = weight[a] * dy[token[a]], dweight[a] = <dy[token[a]],
  // y_perm[a]>.
  virtual void combine_backward(const DispatchPlan& plan, const float* y_perm, const float* dy,
                                float* dy_perm, float* dweight, int64_t dim) = 0;

  // Backward of dispatch: dx[t] += sum over t's assignments of dx_perm[a].
  virtual void dispatch_backward(const DispatchPlan& plan, const float* dx_perm, float* dx,
                                 int64_t dim) = 0;

  // Gradient of the router logits [rows, E]. dweight [A] is the gradient of each assignment's gate
  // weight; it flows through the scaling, the renormalisation (when `normalize`) and the score
  // function. ds_extra [rows, E] (optional) is added to the gradient of the scores first (the
  // auxiliary losses). The bias receives nothing.
  virtual void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                               const DispatchPlan& plan, const float* dweight,
                               const float* ds_extra, float* dlogits, int64_t rows) = 0;

  // Softmax cross-entropy over `rows` rows of logits with one target each. Returns the summed
  // loss (in double); dlogits (optional) = scale * (softmax - onehot).
  virtual double cross_entropy(const float* logits, const int32_t* targets, int64_t rows,
                               int64_t vocab, float* dlogits, float scale) = 0;
};

// The CPU backend with `threads` worker threads (the caller's included).
std::unique_ptr<Backend> make_cpu_backend(unsigned threads);

}  // namespace moert
