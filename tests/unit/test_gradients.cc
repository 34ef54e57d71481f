// Finite-difference checks of every parameter kind's gradient, through a training session.
// The loss is fp32 underneath, so each check is a directional derivative along a direction close
// to the gradient (large, well above rounding noise), compared with central differences.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <numbers>
#include <ostream>
#include <random>
#include <vector>

#include "core/session.h"
#include "tests/unit/random_tensor.h"

namespace moert {
namespace {

using test::random_tensor;

struct Config {
  ScoreFunction score;
  uint32_t groups, keep;
  bool normalize;
  BalancingPolicy policy;
  uint32_t shared;

  friend void PrintTo(const Config& c, std::ostream* os) {
    *os << (c.score == ScoreFunction::Sigmoid ? "sigmoid" : "softmax") << " groups " << c.groups
        << "/" << c.keep << " normalize " << c.normalize << " policy " << static_cast<int>(c.policy)
        << " shared " << c.shared;
  }
};

// Embedding(context 2) -> RMSNorm -> MoE -> DenseFFN -> OutputHead, every tensor random.
std::shared_ptr<Model> make_model(const Config& c, std::mt19937& rng) {
  auto m = std::make_shared<Model>();
  m->token_input = true;
  const uint32_t V = 13, e = 6, D = 12, E = 8, H = 10;
  m->input_width = 2;
  m->output_width = V;
  EmbeddingSpec emb{V, e, 2, random_tensor({V, e}, rng, 0.7f)};
  m->layers.push_back({"emb", LayerKind::Embedding, 2, D, emb});
  RMSNormSpec norm{D, 1e-5f, random_tensor({D}, rng, 0.3f)};
  for (auto& v : norm.weight.values) v += 1.0f;
  m->layers.push_back({"norm", LayerKind::RMSNorm, D, D, norm});
  MoESpec moe;
  moe.dim = D;
  moe.expert_hidden = H;
  moe.num_shared = c.shared;
  moe.shared_hidden = c.shared ? 7 : 0;
  moe.router = {E, 2, c.score, c.groups, c.keep, c.normalize, 1.5f};
  moe.balancing.policy = c.policy;
  moe.balancing.aux_alpha = 0.05f;
  moe.balancing.capacity_factor = 1.25f;
  moe.gate = random_tensor({E, D}, rng, 0.8f);
  moe.gate_bias = random_tensor({E}, rng, 0.05f);
  moe.w1 = random_tensor({E, H, D}, rng, 0.4f);
  moe.w3 = random_tensor({E, H, D}, rng, 0.4f);
  moe.w2 = random_tensor({E, D, H}, rng, 0.4f);
  if (c.shared) {
    moe.shared_w1 = random_tensor({c.shared, 7, D}, rng, 0.4f);
    moe.shared_w3 = random_tensor({c.shared, 7, D}, rng, 0.4f);
    moe.shared_w2 = random_tensor({c.shared, D, 7}, rng, 0.4f);
  }
  m->layers.push_back({"moe", LayerKind::MoE, D, D, moe});
  DenseFFNSpec ffn{D,
                   9,
                   true,
                   random_tensor({9, D}, rng, 0.4f),
                   random_tensor({9, D}, rng, 0.4f),
                   random_tensor({D, 9}, rng, 0.4f)};
  m->layers.push_back({"ffn", LayerKind::DenseFFN, D, D, ffn});
  OutputHeadSpec head{D, V, true, random_tensor({V, D}, rng, 0.4f), random_tensor({V}, rng, 0.2f)};
  m->layers.push_back({"head", LayerKind::OutputHead, D, V, head});
  return m;
}

class GradientCheck : public ::testing::TestWithParam<Config> {};

TEST_P(GradientCheck, DirectionalDerivativesMatchCentralDifferences) {
  const Config c = GetParam();
  std::mt19937 rng(
      static_cast<unsigned>(17 + c.groups * 5 + c.shared + static_cast<int>(c.policy) * 3));
  auto model = make_model(c, rng);
  SessionOptions opts;
  opts.mode = Mode::Training;
  opts.threads = 2;
  Session s(model, opts);
  const int64_t rows = 48;
  std::vector<int32_t> tokens(rows * 2), targets(rows);
  std::uniform_int_distribution<int32_t> tok(0, 12);
  for (auto& t : tokens) t = tok(rng);
  for (auto& t : targets) t = tok(rng);
  std::vector<float> out(rows * 13);
  const uint32_t moe_index = 2;

  auto loss_at = [&](std::vector<int64_t>* counts) {
    s.zero_grad();
    s.forward_tokens(tokens.data(), tokens.size(), nullptr, 0, rows, out.data(), out.size());
    if (counts) *counts = s.expert_counts(moe_index, CountScope::Last);
    return s.backward_loss(targets.data(), targets.size());
  };

  std::vector<int64_t> base_counts;
  loss_at(&base_counts);
  for (size_t p = 0; p < s.num_parameters(); ++p) {
    const int64_t n = s.parameter_size(p);
    std::vector<float> theta(n), grad(n);
    s.read_parameter(p, theta.data(), n);
    s.read_gradient(p, grad.data(), n);
    double gnorm = 0.0;
    for (float g : grad) gnorm += static_cast<double>(g) * g;
    gnorm = std::sqrt(gnorm);
    ASSERT_GT(gnorm, 0.0) << s.parameter_name(p) << " has a zero gradient";
    // Direction: the gradient plus a random part, unit length.
    std::normal_distribution<double> nd;
    std::vector<double> v(n);
    double vn = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      v[i] = grad[i] / gnorm + 0.5 * nd(rng) / std::sqrt(static_cast<double>(n));
      vn += v[i] * v[i];
    }
    vn = std::sqrt(vn);
    double analytic = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      v[i] /= vn;
      analytic += grad[i] * v[i];
    }
    const double eps = 2e-3;
    auto shifted = [&](double sign, std::vector<int64_t>* counts) {
      std::vector<float> t(theta);
      for (int64_t i = 0; i < n; ++i) t[i] = static_cast<float>(theta[i] + sign * eps * v[i]);
      s.write_parameter(p, t.data(), n);
      return loss_at(counts);
    };
    std::vector<int64_t> cp, cm;
    const double lp = shifted(+1, &cp), lm = shifted(-1, &cm);
    s.write_parameter(p, theta.data(), n);
    // A routing decision that flips inside the interval makes the loss non-smooth there.
    ASSERT_EQ(cp, base_counts) << s.parameter_name(p) << ": routing changed under +eps";
    ASSERT_EQ(cm, base_counts) << s.parameter_name(p) << ": routing changed under -eps";
    const double numeric = (lp - lm) / (2 * eps);
    EXPECT_NEAR(numeric, analytic, 2e-2 * std::abs(analytic) + 1e-4) << s.parameter_name(p);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Routers, GradientCheck,
    ::testing::Values(
        Config{ScoreFunction::Sigmoid, 1, 1, true, BalancingPolicy::LossFreeBias, 1},
        Config{ScoreFunction::Sigmoid, 4, 2, true, BalancingPolicy::AuxLoss, 2},
        Config{ScoreFunction::Sigmoid, 1, 1, false, BalancingPolicy::SequenceAuxLoss, 0},
        Config{ScoreFunction::Softmax, 1, 1, false, BalancingPolicy::AuxLoss, 1},
        Config{ScoreFunction::Softmax, 2, 1, true, BalancingPolicy::None, 0},
        Config{ScoreFunction::Softmax, 1, 1, false, BalancingPolicy::ExpertChoice, 1}));

TEST(TrainingConfig, WarmupThenCosineDecay) {
  TrainingConfig c;
  c.lr = 1.0;
  c.min_lr = 0.1;
  c.warmup_steps = 4;
  c.total_steps = 14;
  EXPECT_DOUBLE_EQ(c.lr_at(1), 0.25);
  EXPECT_DOUBLE_EQ(c.lr_at(4), 1.0);
  EXPECT_NEAR(c.lr_at(9), 0.1 + 0.45 * (1 + std::cos(std::numbers::pi * 0.5)), 1e-12);
  EXPECT_DOUBLE_EQ(c.lr_at(14), 0.1);
  EXPECT_DOUBLE_EQ(c.lr_at(100), 0.1);
  c.total_steps = 0;
  EXPECT_DOUBLE_EQ(c.lr_at(100), 1.0);
}

}  // namespace
}  // namespace moert
