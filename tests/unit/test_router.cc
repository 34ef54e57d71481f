// Router cases computed by hand from docs/design.md section 1.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/math.h"
#include "kernels/router_rules.h"

namespace moert {
namespace {

struct Routed {
  std::vector<int32_t> experts;
  std::vector<float> weights;
  std::vector<float> scores;
};

Routed route(const RouterConfig& cfg, const std::vector<float>& logits,
             const std::vector<float>& bias = {}) {
  Routed r;
  r.experts.resize(cfg.top_k);
  r.weights.resize(cfg.top_k);
  r.scores.resize(cfg.num_experts);
  std::vector<float> f(rules::route_scratch_floats(cfg));
  rules::route_token(cfg, logits.data(), bias.empty() ? nullptr : bias.data(), r.scores.data(),
                     r.experts.data(), r.weights.data(), f.data());
  return r;
}

// Logit whose sigmoid is exactly p (up to fp32 rounding).
float logit(double p) { return static_cast<float>(std::log(p / (1.0 - p))); }

RouterConfig sigmoid_cfg(uint32_t experts, uint32_t k) {
  RouterConfig c;
  c.num_experts = experts;
  c.top_k = k;
  c.score = ScoreFunction::Sigmoid;
  c.num_groups = 1;
  c.topk_groups = 1;
  c.normalize = false;
  c.scaling = 1.0f;
  return c;
}

TEST(Router, SigmoidTopKPicksHighestScoresInOrder) {
  auto cfg = sigmoid_cfg(4, 2);
  auto r = route(cfg, {logit(0.2), logit(0.9), logit(0.4), logit(0.7)});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{1, 3}));
  EXPECT_NEAR(r.weights[0], 0.9f, 1e-6);
  EXPECT_NEAR(r.weights[1], 0.7f, 1e-6);
  EXPECT_NEAR(r.scores[2], 0.4f, 1e-6);
}

TEST(Router, TiesGoToTheLowerExpertIndex) {
  auto cfg = sigmoid_cfg(5, 2);
  auto r = route(cfg, {0.5f, 1.0f, 0.5f, 1.0f, 1.0f});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{1, 3}));
  cfg.top_k = 4;
  r = route(cfg, {0.5f, 1.0f, 0.5f, 1.0f, 1.0f});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{1, 3, 4, 0}));
}

TEST(Router, BiasChangesSelectionButNotWeights) {
  auto cfg = sigmoid_cfg(4, 2);
  const std::vector<float> logits = {logit(0.6), logit(0.5), logit(0.3), logit(0.2)};
  auto unbiased = route(cfg, logits);
  EXPECT_EQ(unbiased.experts, (std::vector<int32_t>{0, 1}));
  // Biased scores: 0.6-0.5=0.1, 0.5, 0.3+0.4=0.7, 0.2 -> experts 2 then 1.
  auto biased = route(cfg, logits, {-0.5f, 0.0f, 0.4f, 0.0f});
  EXPECT_EQ(biased.experts, (std::vector<int32_t>{2, 1}));
  // The weights are the unbiased sigmoid scores of the chosen experts.
  EXPECT_NEAR(biased.weights[0], 0.3f, 1e-6);
  EXPECT_NEAR(biased.weights[1], 0.5f, 1e-6);
  EXPECT_NEAR(biased.scores[0], 0.6f, 1e-6);
}

TEST(Router, RenormalisationAndScaling) {
  auto cfg = sigmoid_cfg(4, 2);
  cfg.normalize = true;
  cfg.scaling = 2.5f;
  auto r = route(cfg, {logit(0.2), logit(0.9), logit(0.4), logit(0.6)});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{1, 3}));
  EXPECT_NEAR(r.weights[0], 2.5 * 0.9 / 1.5, 1e-6);
  EXPECT_NEAR(r.weights[1], 2.5 * 0.6 / 1.5, 1e-6);
  cfg.normalize = false;
  r = route(cfg, {logit(0.2), logit(0.9), logit(0.4), logit(0.6)});
  EXPECT_NEAR(r.weights[0], 2.5 * 0.9, 1e-6);
}

TEST(Router, SoftmaxScoresSumToOneAndWeightsAreUnbiased) {
  RouterConfig cfg = sigmoid_cfg(3, 1);
  cfg.score = ScoreFunction::Softmax;
  auto r = route(cfg, {0.0f, std::log(2.0f), std::log(5.0f)}, {1.0f, 0.0f, 0.0f});
  // Softmax = 1/8, 2/8, 5/8; biased 1.125, 0.25, 0.625 -> expert 0, weight 1/8.
  EXPECT_NEAR(r.scores[0] + r.scores[1] + r.scores[2], 1.0f, 1e-6);
  EXPECT_EQ(r.experts[0], 0);
  EXPECT_NEAR(r.weights[0], 0.125f, 1e-6);
}

TEST(Router, GroupScoreIsTheSumOfTheTopTwoNotTheMax) {
  // 8 experts in 4 groups of 2, keep 1 group, top-2.
  RouterConfig cfg = sigmoid_cfg(8, 2);
  cfg.num_groups = 4;
  cfg.topk_groups = 1;
  // Group 0: 0.95 + 0.05 = 1.00 (holds the best single expert).
  // Group 1: 0.60 + 0.60 = 1.20 (best top-2 sum): must win.
  // Groups 2 and 3: low.
  auto r = route(cfg, {logit(0.95), logit(0.05), logit(0.6), logit(0.6), logit(0.1), logit(0.1),
                       logit(0.2), logit(0.1)});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{2, 3}));
}

TEST(Router, MaskedGroupsAreMinusInfinityNotZero) {
  // With negative biased scores, masking with 0 would make masked experts win.
  RouterConfig cfg = sigmoid_cfg(4, 2);
  cfg.num_groups = 2;
  cfg.topk_groups = 1;
  const float p = logit(0.5);  // score 0.5 everywhere
  // Biased: group 0 = {-0.5, -0.6} (sum -1.1), group 1 = {-0.7, -0.9} (sum -1.6): keep group 0.
  auto r = route(cfg, {p, p, p, p}, {-1.0f, -1.1f, -1.2f, -1.4f});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1}));
}

TEST(Router, KeepingAllGroupsEqualsNoGrouping) {
  RouterConfig grouped = sigmoid_cfg(8, 3);
  grouped.num_groups = 4;
  grouped.topk_groups = 4;
  const std::vector<float> logits = {0.3f, -0.2f, 1.5f, 0.7f, 0.9f, -1.0f, 2.0f, 0.1f};
  EXPECT_EQ(route(grouped, logits).experts, route(sigmoid_cfg(8, 3), logits).experts);
}

TEST(Router, GroupTiesGoToTheLowerGroupIndex) {
  RouterConfig cfg = sigmoid_cfg(4, 1);
  cfg.num_groups = 2;
  cfg.topk_groups = 1;
  // Both groups sum to the same value; group 0 wins, then its best expert (index 1).
  auto r = route(cfg, {logit(0.3), logit(0.7), logit(0.7), logit(0.3)});
  EXPECT_EQ(r.experts[0], 1);
}

TEST(Router, NaNBiasRanksLast) {
  auto cfg = sigmoid_cfg(3, 2);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto r = route(cfg, {5.0f, 0.0f, -1.0f}, {nan, 0.0f, 0.0f});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{1, 2}));
}

}  // namespace
}  // namespace moert

namespace moert {
namespace {

// A router GEMM can overflow to +-inf from finite inputs (a hidden value of 1e38 times a weight of
// 10); the scores are then the limit, never NaN (issue: finite input, non-finite result).
TEST(Router, SoftmaxTakesTheLimitAtInfiniteLogits) {
  const float inf = std::numeric_limits<float>::infinity();
  RouterConfig cfg = sigmoid_cfg(4, 2);
  cfg.score = ScoreFunction::Softmax;
  auto one = route(cfg, {inf, 1.0f, 0.5f, 0.0f});
  EXPECT_EQ(one.scores, (std::vector<float>{1.0f, 0.0f, 0.0f, 0.0f}));
  EXPECT_EQ(one.experts, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(one.weights, (std::vector<float>{1.0f, 0.0f}));
  auto two = route(cfg, {-inf, inf, 3.0f, inf});
  EXPECT_EQ(two.scores, (std::vector<float>{0.0f, 0.5f, 0.0f, 0.5f}));
  EXPECT_EQ(two.experts, (std::vector<int32_t>{1, 3}));
  auto none = route(cfg, {-inf, -inf, -inf, -inf});
  EXPECT_EQ(none.scores, (std::vector<float>{0.25f, 0.25f, 0.25f, 0.25f}));
  auto finite_low = route(cfg, {-inf, 2.0f, -inf, 2.0f});
  EXPECT_EQ(finite_low.scores, (std::vector<float>{0.0f, 0.5f, 0.0f, 0.5f}));
}

TEST(Router, SigmoidTakesTheLimitAtInfiniteLogits) {
  const float inf = std::numeric_limits<float>::infinity();
  auto r = route(sigmoid_cfg(3, 1), {inf, -inf, 0.0f});
  EXPECT_EQ(r.scores, (std::vector<float>{1.0f, 0.0f, 0.5f}));
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0}));
}

}  // namespace
}  // namespace moert
