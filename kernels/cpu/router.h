// The MoE router on the CPU, exactly as DESIGN.md section 1 states. Everything is fp32; ties are
// broken towards the lower index so the selection is deterministic.
#pragma once

#include <cstdint>

#include "core/model.h"

namespace moert::cpu {

// Routes one token. logits: [E]; bias: [E] or nullptr. scores (out, [E]): sigmoid or softmax of
// the logits, before the bias. scratch: at least 2 * E + num_groups floats and E ints.
// experts/weights (out, [top_k]): the selected experts in order of decreasing biased score, and
// their gate weights, taken from the unbiased scores, renormalised if configured, then scaled.
void route_token(const RouterConfig& cfg, const float* logits, const float* bias, float* scores,
                 int32_t* experts, float* weights, float* scratch, int32_t* iscratch);

// Scores only (sigmoid or softmax over the E logits of one token).
void router_scores(ScoreFunction fn, const float* logits, float* scores, int64_t num_experts);

// Gradient of the logits of one token from the gradient ds of its scores (sigmoid or softmax).
void scores_backward(ScoreFunction fn, const float* scores, const float* ds, float* dlogits,
                     int64_t num_experts);

// Number of floats and ints route_token needs as scratch.
inline int64_t route_scratch_floats(const RouterConfig& cfg) {
  return 2 * static_cast<int64_t>(cfg.num_experts) + cfg.num_groups;
}
inline int64_t route_scratch_ints(const RouterConfig& cfg) {
  return static_cast<int64_t>(cfg.num_experts) + cfg.num_groups;
}

}  // namespace moert::cpu
