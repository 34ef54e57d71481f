#include "kernels/cpu/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "kernels/cpu/math.h"

namespace moert::cpu {

void router_scores(ScoreFunction fn, const float* logits, float* scores, int64_t num_experts) {
  if (fn == ScoreFunction::Sigmoid) {
    for (int64_t e = 0; e < num_experts; ++e) scores[e] = sigmoid(logits[e]);
    return;
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < num_experts; ++e) mx = std::max(mx, logits[e]);
  float sum = 0.0f;
  for (int64_t e = 0; e < num_experts; ++e) {
    scores[e] = std::exp(logits[e] - mx);
    sum += scores[e];
  }
  for (int64_t e = 0; e < num_experts; ++e) scores[e] /= sum;
}

void scores_backward(ScoreFunction fn, const float* scores, const float* ds, float* dlogits,
                     int64_t num_experts) {
  if (fn == ScoreFunction::Sigmoid) {
    for (int64_t e = 0; e < num_experts; ++e) dlogits[e] = ds[e] * scores[e] * (1.0f - scores[e]);
    return;
  }
  double dot = 0.0;
  for (int64_t e = 0; e < num_experts; ++e) dot += static_cast<double>(ds[e]) * scores[e];
  for (int64_t e = 0; e < num_experts; ++e)
    dlogits[e] = static_cast<float>(scores[e] * (ds[e] - dot));
}

namespace {

// Orders candidate indices by decreasing value, the lower index first among equals.
struct ByValueThenIndex {
  const float* v;
  bool operator()(int32_t a, int32_t b) const { return v[a] > v[b] || (v[a] == v[b] && a < b); }
};

}  // namespace

void route_token(const RouterConfig& cfg, const float* logits, const float* bias, float* scores,
                 int32_t* experts, float* weights, float* scratch, int32_t* iscratch) {
  const int32_t num_experts = static_cast<int32_t>(cfg.num_experts);
  const int32_t num_groups = static_cast<int32_t>(cfg.num_groups);
  float* biased = scratch;
  float* group_score = scratch + num_experts;
  int32_t* order = iscratch;

  router_scores(cfg.score, logits, scores, num_experts);
  for (int32_t e = 0; e < num_experts; ++e) {
    biased[e] = scores[e] + (bias ? bias[e] : 0.0f);
    // A NaN would break the ordering the sorts rely on; it ranks below every real score instead.
    if (std::isnan(biased[e])) biased[e] = -std::numeric_limits<float>::infinity();
  }

  if (num_groups > 1 && cfg.topk_groups < cfg.num_groups) {
    const int32_t group_size = num_experts / num_groups;
    // A group's score is the sum of its two best biased scores (its one score if it has one).
    for (int32_t g = 0; g < num_groups; ++g) {
      const float* b = biased + static_cast<int64_t>(g) * group_size;
      float first = -std::numeric_limits<float>::infinity();
      float second = first;
      for (int32_t i = 0; i < group_size; ++i) {
        if (b[i] > first) {
          second = first;
          first = b[i];
        } else if (b[i] > second) {
          second = b[i];
        }
      }
      group_score[g] = group_size >= 2 ? first + second : first;
    }
    int32_t* gorder = iscratch + num_experts;
    std::iota(gorder, gorder + num_groups, 0);
    std::partial_sort(gorder, gorder + cfg.topk_groups, gorder + num_groups,
                      ByValueThenIndex{group_score});
    // Experts of the groups not kept cannot be chosen: -inf, never 0, which could still win.
    float* keep = group_score;  // reused: 1 for a kept group, 0 otherwise
    std::fill(keep, keep + num_groups, 0.0f);
    for (uint32_t i = 0; i < cfg.topk_groups; ++i) keep[gorder[i]] = 1.0f;
    for (int32_t e = 0; e < num_experts; ++e)
      if (keep[e / group_size] == 0.0f) biased[e] = -std::numeric_limits<float>::infinity();
  }

  std::iota(order, order + num_experts, 0);
  std::partial_sort(order, order + cfg.top_k, order + num_experts, ByValueThenIndex{biased});

  // Gate weights come from the unbiased scores: the bias steers selection only.
  float sum = 0.0f;
  for (uint32_t k = 0; k < cfg.top_k; ++k) {
    experts[k] = order[k];
    weights[k] = scores[order[k]];
    sum += weights[k];
  }
  for (uint32_t k = 0; k < cfg.top_k; ++k) {
    if (cfg.normalize) weights[k] = weights[k] / (sum + 1e-20f);
    weights[k] *= cfg.scaling;
  }
}

}  // namespace moert::cpu
