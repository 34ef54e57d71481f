// Each runtime layer against a naive per-token reference in double, written from docs/design.md
// section 1.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "core/backend.h"
#include "core/layers.h"
#include "tests/unit/random_tensor.h"

namespace moert {
namespace {

using Vec = std::vector<double>;

using test::random_tensor;

std::vector<float> random_rows(int64_t n, std::mt19937& rng) {
  return random_tensor({n}, rng, 1.0f).values;
}

double rel_error(const std::vector<float>& got, const Vec& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// y = W x for W [out, in] at `w`.
Vec matvec(const float* w, const Vec& x, int64_t out) {
  const int64_t in = static_cast<int64_t>(x.size());
  Vec y(static_cast<size_t>(out), 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) y[o] += static_cast<double>(w[o * in + i]) * x[i];
  return y;
}

double silu(double v) { return v / (1.0 + std::exp(-v)); }

Vec swiglu_ref(const float* w1, const float* w3, const float* w2, const Vec& x, int64_t hidden) {
  const Vec h1 = matvec(w1, x, hidden), h3 = matvec(w3, x, hidden);
  Vec a(h1.size());
  for (size_t i = 0; i < a.size(); ++i) a[i] = silu(h1[i]) * h3[i];
  return matvec(w2, a, static_cast<int64_t>(x.size()));
}

Vec row(const std::vector<float>& x, int64_t r, int64_t dim) {
  return Vec(x.begin() + r * dim, x.begin() + (r + 1) * dim);
}

// A one-layer model with its backend, parameter store and runtime layer, kept alive until the
// next run() so that a test can inspect the layer afterwards.
struct Held {
  std::unique_ptr<Backend> be;
  Model model;
  std::unique_ptr<ParamStore> store;
  std::unique_ptr<Layer> layer;
};

std::vector<float> run(const LayerSpec& spec, const std::vector<float>& x, int64_t rows,
                       unsigned threads, Layer** keep = nullptr) {
  static Held held;
  held.layer.reset();
  held.store.reset();
  held.be = make_cpu_backend(threads);
  held.model.layers = {spec};
  held.store = std::make_unique<ParamStore>(*held.be, held.model, nullptr);
  held.layer = make_layer(held.model.layers[0], *held.store);
  std::vector<float> y(static_cast<size_t>(rows) * spec.out_width);
  held.layer->forward(*held.be, x.data(), y.data(), rows, Pass::Eval);
  held.layer->commit_stats(Pass::Eval);
  if (keep) *keep = held.layer.get();
  return y;
}

TEST(Layers, RMSNorm) {
  std::mt19937 rng(1);
  RMSNormSpec s;
  s.dim = 24;
  s.eps = 1e-5f;
  s.weight = random_tensor({24}, rng);
  LayerSpec l{"n", LayerKind::RMSNorm, 24, 24, s};
  const int64_t rows = 70;
  auto x = random_rows(rows * 24, rng);
  auto y = run(l, x, rows, 3);
  Vec want;
  for (int64_t r = 0; r < rows; ++r) {
    Vec xr = row(x, r, 24);
    double ss = 0;
    for (double v : xr) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / 24 + 1e-5);
    for (int i = 0; i < 24; ++i) want.push_back(xr[i] * inv * s.weight.values[i]);
  }
  EXPECT_LT(rel_error(y, want), 1e-6);
}

TEST(Layers, DenseFFNWithAndWithoutResidual) {
  std::mt19937 rng(2);
  for (bool residual : {true, false}) {
    DenseFFNSpec s;
    s.dim = 16;
    s.hidden = 40;
    s.residual = residual;
    s.w1 = random_tensor({40, 16}, rng);
    s.w3 = random_tensor({40, 16}, rng);
    s.w2 = random_tensor({16, 40}, rng);
    LayerSpec l{"f", LayerKind::DenseFFN, 16, 16, s};
    const int64_t rows = 130;
    auto x = random_rows(rows * 16, rng);
    auto y = run(l, x, rows, 2);
    Vec want;
    for (int64_t r = 0; r < rows; ++r) {
      Vec xr = row(x, r, 16);
      Vec f = swiglu_ref(s.w1.data(), s.w3.data(), s.w2.data(), xr, 40);
      for (int i = 0; i < 16; ++i) want.push_back(f[i] + (residual ? xr[i] : 0.0));
    }
    EXPECT_LT(rel_error(y, want), 1e-5) << "residual " << residual;
  }
}

TEST(Layers, OutputHeadWithBias) {
  std::mt19937 rng(3);
  OutputHeadSpec s;
  s.dim = 12;
  s.vocab_size = 30;
  s.has_bias = true;
  s.weight = random_tensor({30, 12}, rng);
  s.bias = random_tensor({30}, rng);
  LayerSpec l{"h", LayerKind::OutputHead, 12, 30, s};
  auto x = random_rows(9 * 12, rng);
  auto y = run(l, x, 9, 2);
  Vec want;
  for (int64_t r = 0; r < 9; ++r) {
    Vec o = matvec(s.weight.data(), row(x, r, 12), 30);
    for (int i = 0; i < 30; ++i) want.push_back(o[i] + s.bias.values[i]);
  }
  EXPECT_LT(rel_error(y, want), 1e-6);
}

TEST(Layers, EmbeddingConcatenatesTheContextWindow) {
  std::mt19937 rng(4);
  EmbeddingSpec s;
  s.vocab_size = 11;
  s.dim = 3;
  s.context = 2;
  s.weight = random_tensor({11, 3}, rng);
  auto be = make_cpu_backend(2);
  Model m;
  m.layers.push_back({"e", LayerKind::Embedding, 2, 6, s});
  ParamStore store(*be, m, nullptr);
  EmbeddingLayer layer(std::get<EmbeddingSpec>(m.layers[0].spec), store);
  const std::vector<int32_t> tokens = {0, 10, 5, 5, 3, 1};
  std::vector<float> y(3 * 6);
  layer.forward_tokens(*be, tokens.data(), y.data(), 3, Pass::Eval);
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 2; ++c)
      for (int d = 0; d < 3; ++d)
        EXPECT_EQ(y[(r * 2 + c) * 3 + d], s.weight.values[tokens[r * 2 + c] * 3 + d]);
}

// Naive MoE for one token: route from double-precision scores, then sum the experts.
struct MoERef {
  const MoESpec& s;

  Vec forward(const Vec& x, std::vector<int64_t>& counts) const {
    const RouterConfig& r = s.router;
    const int64_t E = r.num_experts, D = s.dim;
    Vec logits = matvec(s.gate.data(), x, E), scores(E);
    if (r.score == ScoreFunction::Sigmoid) {
      for (int64_t e = 0; e < E; ++e) scores[e] = 1.0 / (1.0 + std::exp(-logits[e]));
    } else {
      const double mx = *std::max_element(logits.begin(), logits.end());
      double z = 0;
      for (int64_t e = 0; e < E; ++e) z += std::exp(logits[e] - mx);
      for (int64_t e = 0; e < E; ++e) scores[e] = std::exp(logits[e] - mx) / z;
    }
    Vec biased(E);
    for (int64_t e = 0; e < E; ++e) biased[e] = scores[e] + s.gate_bias.values[e];
    const int64_t gs = E / r.num_groups;
    std::vector<std::pair<double, int64_t>> groups;
    for (int64_t g = 0; g < r.num_groups; ++g) {
      Vec b(biased.begin() + g * gs, biased.begin() + (g + 1) * gs);
      std::sort(b.rbegin(), b.rend());
      groups.push_back({-(gs >= 2 ? b[0] + b[1] : b[0]), g});
    }
    std::sort(groups.begin(), groups.end());
    std::vector<bool> kept(r.num_groups, false);
    for (uint32_t i = 0; i < r.topk_groups; ++i) kept[groups[i].second] = true;
    std::vector<std::pair<double, int64_t>> cand;
    for (int64_t e = 0; e < E; ++e)
      if (kept[e / gs]) cand.push_back({-biased[e], e});
    std::sort(cand.begin(), cand.end());
    double sum = 0;
    for (uint32_t k = 0; k < r.top_k; ++k) sum += scores[cand[k].second];
    Vec y = s.residual ? x : Vec(D, 0.0);
    const int64_t stride = static_cast<int64_t>(s.expert_hidden) * D;
    for (uint32_t k = 0; k < r.top_k; ++k) {
      const int64_t e = cand[k].second;
      ++counts[e];
      double w = scores[e];
      if (r.normalize) w /= sum + 1e-20;
      w *= r.scaling;
      Vec f = swiglu_ref(s.w1.data() + e * stride, s.w3.data() + e * stride,
                         s.w2.data() + e * stride, x, s.expert_hidden);
      for (int64_t d = 0; d < D; ++d) y[d] += w * f[d];
    }
    const int64_t sstride = static_cast<int64_t>(s.shared_hidden) * D;
    for (uint32_t i = 0; i < s.num_shared; ++i) {
      Vec f = swiglu_ref(s.shared_w1.data() + i * sstride, s.shared_w3.data() + i * sstride,
                         s.shared_w2.data() + i * sstride, x, s.shared_hidden);
      for (int64_t d = 0; d < D; ++d) y[d] += f[d];
    }
    return y;
  }
};

MoESpec random_moe(std::mt19937& rng, ScoreFunction score, uint32_t groups, uint32_t keep,
                   uint32_t shared, bool normalize, bool residual) {
  MoESpec s;
  s.dim = 16;
  s.expert_hidden = 24;
  s.num_shared = shared;
  s.shared_hidden = shared ? 20 : 0;
  s.residual = residual;
  s.router = {8, 3, score, groups, keep, normalize, 2.5f};
  s.balancing.policy = BalancingPolicy::LossFreeBias;
  s.gate = random_tensor({8, 16}, rng, 0.5f);
  s.gate_bias = random_tensor({8}, rng, 0.1f);
  s.w1 = random_tensor({8, 24, 16}, rng);
  s.w3 = random_tensor({8, 24, 16}, rng);
  s.w2 = random_tensor({8, 16, 24}, rng);
  if (shared) {
    s.shared_w1 = random_tensor({shared, 20, 16}, rng);
    s.shared_w3 = random_tensor({shared, 20, 16}, rng);
    s.shared_w2 = random_tensor({shared, 16, 20}, rng);
  }
  return s;
}

struct MoECase {
  friend void PrintTo(const MoECase& c, std::ostream* os) {
    *os << (c.score == ScoreFunction::Sigmoid ? "sigmoid" : "softmax") << " groups " << c.groups
        << "/" << c.keep << " shared " << c.shared << " normalize " << c.normalize << " residual "
        << c.residual;
  }
  ScoreFunction score;
  uint32_t groups, keep, shared;
  bool normalize, residual;
};

class MoELayerTest : public ::testing::TestWithParam<MoECase> {};

TEST_P(MoELayerTest, MatchesNaiveReferenceAndCountsEveryAssignment) {
  const MoECase c = GetParam();
  std::mt19937 rng(5 + c.groups * 7 + c.shared * 3 + c.normalize);
  MoESpec s = random_moe(rng, c.score, c.groups, c.keep, c.shared, c.normalize, c.residual);
  LayerSpec l{"moe", LayerKind::MoE, 16, 16, s};
  const int64_t rows = 150;
  auto x = random_rows(rows * 16, rng);
  Layer* layer = nullptr;
  auto y = run(l, x, rows, 3, &layer);
  MoERef ref{std::get<MoESpec>(l.spec)};
  std::vector<int64_t> counts(8, 0);
  Vec want;
  for (int64_t r = 0; r < rows; ++r) {
    Vec o = ref.forward(row(x, r, 16), counts);
    want.insert(want.end(), o.begin(), o.end());
  }
  EXPECT_LT(rel_error(y, want), 1e-5);
  EXPECT_EQ(static_cast<MoELayer*>(layer)->counts().last, counts);
  // The same input on one thread gives bitwise the same output.
  EXPECT_EQ(run(l, x, rows, 1), y);
}

INSTANTIATE_TEST_SUITE_P(Configs, MoELayerTest,
                         ::testing::Values(MoECase{ScoreFunction::Sigmoid, 1, 1, 0, true, true},
                                           MoECase{ScoreFunction::Sigmoid, 4, 2, 1, true, true},
                                           MoECase{ScoreFunction::Sigmoid, 4, 2, 2, false, false},
                                           MoECase{ScoreFunction::Softmax, 1, 1, 1, false, true},
                                           MoECase{ScoreFunction::Softmax, 2, 1, 0, true, false}));

TEST(Layers, ExpertChoiceGivesEachExpertItsCapacity) {
  std::mt19937 rng(9);
  MoESpec s = random_moe(rng, ScoreFunction::Softmax, 1, 1, 0, false, false);
  s.balancing.policy = BalancingPolicy::ExpertChoice;
  s.balancing.capacity_factor = 1.0f;
  LayerSpec l{"ec", LayerKind::MoE, 16, 16, s};
  const int64_t rows = 40;  // capacity = ceil(1.0 * 40 * 3 / 8) = 15
  auto x = random_rows(rows * 16, rng);
  Layer* layer = nullptr;
  auto y = run(l, x, rows, 2, &layer);
  const auto& spec = std::get<MoESpec>(l.spec);
  EXPECT_EQ(static_cast<MoELayer*>(layer)->counts().last, std::vector<int64_t>(8, 15));
  EXPECT_EQ(max_violation(static_cast<MoELayer*>(layer)->counts().last), 0.0);
  // Reference: each expert takes its 15 best tokens by softmax score.
  std::vector<Vec> scores(rows);
  for (int64_t t = 0; t < rows; ++t) {
    Vec lg = matvec(spec.gate.data(), row(x, t, 16), 8);
    const double mx = *std::max_element(lg.begin(), lg.end());
    double z = 0;
    for (double v : lg) z += std::exp(v - mx);
    for (double v : lg) scores[t].push_back(std::exp(v - mx) / z);
  }
  Vec want(rows * 16, 0.0);
  const int64_t stride = 24 * 16;
  for (int64_t e = 0; e < 8; ++e) {
    std::vector<int64_t> order(rows);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return scores[a][e] > scores[b][e]; });
    for (int64_t i = 0; i < 15; ++i) {
      const int64_t t = order[i];
      Vec f = swiglu_ref(spec.w1.data() + e * stride, spec.w3.data() + e * stride,
                         spec.w2.data() + e * stride, row(x, t, 16), 24);
      for (int d = 0; d < 16; ++d) want[t * 16 + d] += scores[t][e] * spec.router.scaling * f[d];
    }
  }
  EXPECT_LT(rel_error(y, want), 1e-5);
}

}  // namespace
}  // namespace moert

namespace moert {
namespace {

// Concurrent GEMM calls from the session's threads must not disturb each other (a BLAS that is not
// thread-safe shows up here as outputs that differ between repetitions).
TEST(Layers, RepeatedMultiThreadedForwardIsBitwiseStable) {
  std::mt19937 rng(11);
  MoESpec s = random_moe(rng, ScoreFunction::Sigmoid, 4, 2, 1, true, true);
  LayerSpec l{"moe", LayerKind::MoE, 16, 16, s};
  const int64_t rows = 700;
  auto x = random_rows(rows * 16, rng);
  const auto first = run(l, x, rows, 1);
  for (int rep = 0; rep < 10; ++rep) ASSERT_EQ(run(l, x, rows, 4), first) << "repetition " << rep;
}

}  // namespace
}  // namespace moert
