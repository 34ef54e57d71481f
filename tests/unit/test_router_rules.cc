// The CUDA router's per-item rules (kernels/router_rules.h), run on the host item by item as
// the kernels' threads run them, against the CPU backend. The GPU code cannot run here; this holds
// its logic to the CPU's: routing bit for bit, gradients and the auxiliary loss to rounding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/aux_loss.h"
#include "core/backend.h"
#include "core/grad_reduction.h"
#include "kernels/router_rules.h"

namespace moert {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::string describe(const RouterConfig& c) {
  return "E=" + std::to_string(c.num_experts) + " G=" + std::to_string(c.num_groups) +
         " topk_groups=" + std::to_string(c.topk_groups) + " K=" + std::to_string(c.top_k) +
         (c.score == ScoreFunction::Sigmoid ? " sigmoid" : " softmax") +
         (c.normalize ? " normalized" : "") + " scaling=" + std::to_string(c.scaling);
}

// Every shape of group-limited routing the tests cover: E in {4, 8, 16, 64, 256}, G in
// {1, 2, 4, 8} dividing E, every topk_groups, every K <= 8 that the kept groups can fill; both
// score functions, with and without renormalisation. Scaling is never 1, so that a missing or
// doubled scaling shows.
std::vector<RouterConfig> every_config(std::mt19937& rng) {
  std::uniform_real_distribution<float> scaling(0.25f, 3.0f);
  std::vector<RouterConfig> out;
  for (uint32_t E : {4u, 8u, 16u, 64u, 256u})
    for (uint32_t G : {1u, 2u, 4u, 8u}) {
      if (E % G != 0) continue;
      for (uint32_t tg = 1; tg <= G; ++tg)
        for (uint32_t K = 1; K <= std::min(8u, tg * (E / G)); ++K)
          for (ScoreFunction fn : {ScoreFunction::Sigmoid, ScoreFunction::Softmax})
            for (bool normalize : {false, true}) {
              RouterConfig c;
              c.num_experts = E;
              c.num_groups = G;
              c.topk_groups = tg;
              c.top_k = K;
              c.score = fn;
              c.normalize = normalize;
              c.scaling = (out.size() % 3 == 0) ? 2.5f : scaling(rng);
              out.push_back(c);
            }
    }
  return out;
}

enum class Logits {
  Normal,    // continuous values and a small random bias: no ties
  Ties,      // small integers and no bias: exact ties everywhere, in scores and group scores
  Extremes,  // NaN, +-inf, -1e30 among small integers, and one row entirely -1e30
};

struct Inputs {
  std::vector<float> logits, bias;
  bool use_bias = true;
};

Inputs make_inputs(const RouterConfig& cfg, int64_t rows, Logits kind, std::mt19937& rng) {
  const int64_t E = cfg.num_experts;
  Inputs in;
  in.logits.resize(static_cast<size_t>(rows * E));
  in.bias.assign(static_cast<size_t>(E), 0.0f);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> small(-1, 3), pick(0, 15);
  switch (kind) {
    case Logits::Normal:
      for (auto& v : in.logits) v = normal(rng);
      for (auto& b : in.bias) b = 0.02f * normal(rng);
      break;
    case Logits::Ties:
      for (auto& v : in.logits) v = static_cast<float>(small(rng));
      // Zero bias, given as zeros or as no bias at all: both must rank the same.
      in.use_bias = rng() % 2 == 0;
      break;
    case Logits::Extremes:
      for (auto& v : in.logits) {
        const int p = pick(rng);
        v = p == 0   ? kNaN
            : p == 1 ? -1e30f
            : p == 2 ? -kInf
            : p == 3 ? kInf
            : p == 4 ? -1e30f
                     : static_cast<float>(small(rng));
      }
      for (auto& b : in.bias) b = 0.01f * static_cast<float>(small(rng));
      std::fill(in.logits.begin(), in.logits.begin() + E, -1e30f);
      break;
  }
  return in;
}

struct Routing {
  std::vector<float> scores, weights;
  std::vector<int32_t> experts;
};

Routing route_cpu(Backend& be, const RouterConfig& cfg, const Inputs& in, int64_t rows) {
  Routing r;
  r.scores.resize(static_cast<size_t>(rows * cfg.num_experts));
  r.experts.resize(static_cast<size_t>(rows * cfg.top_k));
  r.weights.resize(r.experts.size());
  be.route_topk(cfg, in.logits.data(), in.use_bias ? in.bias.data() : nullptr, rows,
                r.scores.data(), r.experts.data(), r.weights.data());
  return r;
}

// route_topk_k, one "thread" per token, each with its own slice of scratch.
Routing route_rules(const RouterConfig& cfg, const Inputs& in, int64_t rows) {
  const int64_t E = cfg.num_experts, K = cfg.top_k, S = rules::route_scratch_floats(cfg);
  Routing r;
  r.scores.resize(static_cast<size_t>(rows * E));
  r.experts.resize(static_cast<size_t>(rows * K));
  r.weights.resize(r.experts.size());
  std::vector<float> scratch(static_cast<size_t>(rows * S));
  for (int64_t t = 0; t < rows; ++t)
    rules::route_token(cfg, in.logits.data() + t * E, in.use_bias ? in.bias.data() : nullptr,
                       r.scores.data() + t * E, r.experts.data() + t * K, r.weights.data() + t * K,
                       scratch.data() + t * S);
  return r;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Largest |got - want| relative to the largest |want| of the case: the kernels' reductions are
// in double, so what stays is the rounding to float (and, on the GPU, FMA contraction).
double max_rel_error(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  }
  return scale > 0.0 ? err / scale : err;
}

class RouterRules : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> cpu_ = make_cpu_backend(2);
  std::mt19937 rng_{20240611};
};

TEST_F(RouterRules, RouteTopkIsTheCpusBitForBit) {
  const int64_t rows = 16;
  int64_t cases = 0, tokens = 0;
  for (const RouterConfig& cfg : every_config(rng_))
    for (Logits kind : {Logits::Normal, Logits::Ties, Logits::Extremes}) {
      const Inputs in = make_inputs(cfg, rows, kind, rng_);
      const Routing want = route_cpu(*cpu_, cfg, in, rows);
      const Routing got = route_rules(cfg, in, rows);
      SCOPED_TRACE(describe(cfg) + " logits kind " + std::to_string(static_cast<int>(kind)));
      ASSERT_EQ(got.experts, want.experts);
      ASSERT_TRUE(same_bits(got.scores, want.scores));
      ASSERT_TRUE(same_bits(got.weights, want.weights));
      ++cases;
      tokens += rows;
    }
  std::printf("route_topk: %lld cases, %lld tokens, all bitwise equal\n",
              static_cast<long long>(cases), static_cast<long long>(tokens));
}

// The top-K is found in one pass by insertion; it must take exactly what K successive argmaxes
// take, in their order: ties to the lower index however many values tie (-0 and +0 among them),
// -inf (a masked group's or a NaN score's) after every real value and among themselves by index,
// for K from 1 to 12 and n - 1 and n.
TEST(RouterTopK, TopKOfTakesWhatSuccessiveArgmaxesTake) {
  std::mt19937 rng(77);
  std::uniform_int_distribution<int> pick(0, 9), small(-2, 2);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int64_t cases = 0;
  for (int n : {1, 2, 3, 5, 8, 16, 17, 64, 256, 300})
    for (int k = 1; k <= n; k = k < 12 ? k + 1 : std::max(k + 1, n - 1))
      for (int kind = 0; kind < 4; ++kind)
        for (int rep = 0; rep < 20; ++rep) {
          std::vector<float> v(static_cast<size_t>(n));
          for (float& x : v) {
            const int p = pick(rng);
            x = kind == 0   ? normal(rng)                                        // distinct
                : kind == 1 ? (p == 0 ? -0.0f : static_cast<float>(small(rng)))  // ties, +-0
                : kind == 2 ? (p < 3   ? -kInf
                               : p < 5 ? kInf
                                       : static_cast<float>(small(rng)))
                            : -kInf;  // all masked
          }
          std::vector<unsigned char> taken(static_cast<size_t>(n), 0);
          std::vector<int32_t> want(static_cast<size_t>(k)), got(static_cast<size_t>(k), -7);
          for (int j = 0; j < k; ++j) {
            want[static_cast<size_t>(j)] = rules::argmax_untaken(v.data(), taken.data(), n);
            taken[static_cast<size_t>(want[static_cast<size_t>(j)])] = 1;
          }
          std::vector<float> best(static_cast<size_t>(k), kNaN);
          rules::top_k_of(v.data(), n, k, got.data(), best.data());
          ASSERT_EQ(got, want) << "n " << n << " k " << k << " kind " << kind;
          for (int j = 0; j < k; ++j)
            ASSERT_EQ(std::memcmp(&best[static_cast<size_t>(j)],
                                  &v[static_cast<size_t>(want[static_cast<size_t>(j)])], 4),
                      0);
          ++cases;
        }
  std::printf("top_k_of: %lld cases, all as successive argmaxes\n", static_cast<long long>(cases));
}

// A routing of random logits and the plan the CPU builds from it.
struct Routed {
  Routing r;
  DispatchPlan plan;
};

Routed route_and_plan(Backend& be, const RouterConfig& cfg, int64_t rows, Logits kind,
                      std::mt19937& rng) {
  Routed out;
  out.r = route_cpu(be, cfg, make_inputs(cfg, rows, kind, rng), rows);
  be.plan_dispatch(out.r.experts.data(), out.r.weights.data(), rows, cfg.top_k, cfg.num_experts,
                   out.plan);
  return out;
}

std::vector<float> normal_values(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

TEST_F(RouterRules, RouterBackwardIsTheCpus) {
  const int64_t rows = 24;
  int64_t cases = 0, bitwise = 0;
  double worst = 0.0;
  for (const RouterConfig& cfg : every_config(rng_))
    for (Logits kind : {Logits::Normal, Logits::Ties})
      for (bool with_extra : {false, true}) {
        const int64_t E = cfg.num_experts;
        const Routed in = route_and_plan(*cpu_, cfg, rows, kind, rng_);
        const std::vector<float> dweight =
            normal_values(static_cast<size_t>(in.plan.num_assignments()), rng_);
        const std::vector<float> extra = normal_values(static_cast<size_t>(rows * E), rng_);
        const float* ds_extra = with_extra ? extra.data() : nullptr;
        // The layer passes normalize apart from the config (expert choice never renormalises);
        // cover the mismatch too.
        const bool normalize = cases % 4 == 3 ? !cfg.normalize : cfg.normalize;

        std::vector<float> want(static_cast<size_t>(rows * E)), got(want.size());
        cpu_->router_backward(cfg, normalize, in.r.scores.data(), in.plan, dweight.data(), ds_extra,
                              want.data(), rows);
        std::vector<float> scratch(static_cast<size_t>(rows * E));
        const int64_t* to = in.plan.token_offsets.data();
        for (int64_t t = 0; t < rows; ++t)
          rules::router_backward_token(cfg, normalize, in.r.scores.data() + t * E, to[t], to[t + 1],
                                       in.plan.token_assign.data(), in.plan.expert.data(),
                                       dweight.data(), ds_extra ? ds_extra + t * E : nullptr,
                                       scratch.data() + t * E, got.data() + t * E);
        const double err = max_rel_error(got, want);
        EXPECT_LE(err, 1e-6) << describe(cfg);
        worst = std::max(worst, err);
        bitwise += same_bits(got, want);
        ++cases;
      }
  std::printf("router_backward: %lld cases, %lld bitwise equal, worst relative error %.3g\n",
              static_cast<long long>(cases), static_cast<long long>(bitwise), worst);
}

// The auxiliary losses through the backend's two phases (per-chunk statistics, folded per
// sequence on the host, then the gradient), against their definition evaluated in double:
// f_qe = E / (K L_q) * (tokens of q sent to e), P_qe = mean over q of s[t, e] / sum_j s[t, j],
// loss = alpha / N * sum_q sum_e f_qe P_qe over the N sequences that hold rows, and its gradient
// with respect to the scores (f carries none).
struct AuxResult {
  double loss = 0.0;
  std::vector<double> ds;
};

AuxResult aux_reference(const RouterConfig& cfg, const float* scores, const DispatchPlan& plan,
                        const std::vector<int64_t>& seq, double alpha) {
  const int64_t E = cfg.num_experts, K = cfg.top_k, Q = static_cast<int64_t>(seq.size()) - 1;
  const int64_t rows = seq.back();
  std::vector<int64_t> sent(static_cast<size_t>(rows * E), 0);
  for (int64_t a = 0; a < plan.num_assignments(); ++a)
    sent[plan.token.data()[a] * E + plan.expert.data()[a]] = 1;
  int64_t N = 0;
  for (int64_t q = 0; q < Q; ++q) N += seq[q + 1] > seq[q] ? 1 : 0;
  AuxResult out;
  out.ds.assign(static_cast<size_t>(rows * E), 0.0);
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t L = seq[q + 1] - seq[q];
    if (L == 0) continue;
    std::vector<double> f(static_cast<size_t>(E), 0.0), P(static_cast<size_t>(E), 0.0);
    for (int64_t t = seq[q]; t < seq[q + 1]; ++t) {
      double z = 0.0;
      for (int64_t e = 0; e < E; ++e) z += scores[t * E + e];
      for (int64_t e = 0; e < E; ++e) {
        f[e] += static_cast<double>(sent[t * E + e]) * E / static_cast<double>(K * L);
        P[e] += scores[t * E + e] / z / static_cast<double>(L);
      }
    }
    for (int64_t e = 0; e < E; ++e) out.loss += alpha / N * f[e] * P[e];
    for (int64_t t = seq[q]; t < seq[q + 1]; ++t) {
      double z = 0.0, dot = 0.0;
      for (int64_t e = 0; e < E; ++e) z += scores[t * E + e];
      for (int64_t e = 0; e < E; ++e) dot += f[e] * scores[t * E + e] / (z * z);
      for (int64_t e = 0; e < E; ++e)
        out.ds[t * E + e] = alpha / (N * static_cast<double>(L)) * (f[e] / z - dot);
    }
  }
  return out;
}

// Sequences as the session makes them: uniform, uneven (padding taken out), some empty, and the
// whole batch as one.
std::vector<std::vector<int64_t>> sequence_cases(int64_t rows, std::mt19937& rng) {
  std::vector<std::vector<int64_t>> cases{{0, rows}};
  for (int64_t L : {int64_t{1}, int64_t{5}, int64_t{64}, int64_t{130}}) {
    std::vector<int64_t> s{0};
    while (s.back() < rows) s.push_back(std::min(rows, s.back() + L));
    cases.push_back(s);
  }
  std::vector<int64_t> uneven{0};
  std::uniform_int_distribution<int64_t> len(0, 150);
  while (uneven.back() < rows) uneven.push_back(std::min(rows, uneven.back() + len(rng)));
  cases.push_back(uneven);
  return cases;
}

TEST_F(RouterRules, AuxLossesMatchTheirDefinition) {
  const double alpha = 1e-2;
  int64_t cases = 0;
  double worst_loss = 0.0, worst_ds = 0.0;
  const std::vector<RouterConfig> configs = every_config(rng_);
  for (size_t c = 0; c < configs.size(); c += 8) {
    const RouterConfig& cfg = configs[c];
    const int64_t E = cfg.num_experts;
    for (int64_t rows : {int64_t{37}, int64_t{300}}) {
      const Routed in = route_and_plan(*cpu_, cfg, rows, Logits::Normal, rng_);
      for (const auto& seq : sequence_cases(rows, rng_)) {
        const AuxChunks chunks = aux_chunks(seq);
        std::vector<int64_t> counts(static_cast<size_t>(chunks.chunks() * E));
        std::vector<double> psum(counts.size());
        cpu_->aux_partials(cfg, in.r.scores.data(), in.plan, chunks.chunk_offsets.data(),
                           chunks.chunks(), counts.data(), psum.data());
        const AuxTerms t = aux_terms(chunks, counts.data(), psum.data(), E, cfg.top_k, alpha);
        std::vector<float> ds(static_cast<size_t>(rows * E));
        cpu_->aux_grad(cfg, in.r.scores.data(), rows, chunks.seq_offsets.data(), chunks.num_seq(),
                       t.coef.data(), ds.data());
        const AuxResult want = aux_reference(cfg, in.r.scores.data(), in.plan, seq, alpha);
        const double loss_err = std::abs(t.loss - want.loss) / std::abs(want.loss);
        double ds_err = 0.0, ds_max = 0.0;
        for (size_t i = 0; i < ds.size(); ++i) {
          ds_err = std::max(ds_err, std::abs(ds[i] - want.ds[i]));
          ds_max = std::max(ds_max, std::abs(want.ds[i]));
        }
        ds_err /= ds_max;
        EXPECT_LE(loss_err, 1e-12) << describe(cfg) << " rows=" << rows;
        EXPECT_LE(ds_err, 1e-6) << describe(cfg) << " rows=" << rows;
        worst_loss = std::max(worst_loss, loss_err);
        worst_ds = std::max(worst_ds, ds_err);
        ++cases;
      }
    }
  }
  std::printf("aux losses: %lld cases, worst relative error: loss %.3g, ds %.3g\n",
              static_cast<long long>(cases), worst_loss, worst_ds);
}

// The statistics of a chunk do not depend on the rest of the batch: a sequence whose rows are
// split between two calls (two processes holding halves of a global batch) folds to the same bits
// as one call over all of it, as long as the split falls on a chunk boundary.
TEST_F(RouterRules, AuxStatisticsOfASplitBatchAreBitwiseTheSame) {
  const RouterConfig cfg = every_config(rng_)[5];
  const int64_t E = cfg.num_experts, rows = 5 * kReduceRows + 17, split = 3 * kReduceRows;
  const Routed all = route_and_plan(*cpu_, cfg, rows, Logits::Normal, rng_);
  const AuxChunks whole = aux_chunks({0, rows});
  std::vector<int64_t> counts(static_cast<size_t>(whole.chunks() * E));
  std::vector<double> psum(counts.size());
  cpu_->aux_partials(cfg, all.r.scores.data(), all.plan, whole.chunk_offsets.data(), whole.chunks(),
                     counts.data(), psum.data());
  // The two halves, each routed and planned alone, their chunk statistics concatenated.
  std::vector<int64_t> counts2;
  std::vector<double> psum2;
  for (auto [t0, t1] : {std::pair<int64_t, int64_t>{0, split}, {split, rows}}) {
    const int64_t n = t1 - t0;
    std::vector<int32_t> experts(all.r.experts.begin() + t0 * cfg.top_k,
                                 all.r.experts.begin() + t1 * cfg.top_k);
    std::vector<float> weights(all.r.weights.begin() + t0 * cfg.top_k,
                               all.r.weights.begin() + t1 * cfg.top_k);
    DispatchPlan plan;
    cpu_->plan_dispatch(experts.data(), weights.data(), n, cfg.top_k, E, plan);
    const AuxChunks part = aux_chunks({0, n});
    std::vector<int64_t> c(static_cast<size_t>(part.chunks() * E));
    std::vector<double> p(c.size());
    cpu_->aux_partials(cfg, all.r.scores.data() + t0 * E, plan, part.chunk_offsets.data(),
                       part.chunks(), c.data(), p.data());
    counts2.insert(counts2.end(), c.begin(), c.end());
    psum2.insert(psum2.end(), p.begin(), p.end());
  }
  EXPECT_EQ(counts2, counts);
  ASSERT_EQ(psum2.size(), psum.size());
  EXPECT_EQ(std::memcmp(psum2.data(), psum.data(), psum.size() * sizeof(double)), 0);
  const AuxTerms a = aux_terms(whole, counts.data(), psum.data(), E, cfg.top_k, 0.01);
  const AuxTerms b = aux_terms(whole, counts2.data(), psum2.data(), E, cfg.top_k, 0.01);
  EXPECT_EQ(std::memcmp(&a.loss, &b.loss, sizeof(double)), 0);
}

// (sequences, rows per sequence): batch-wide (one sequence of every row) and sequence-wise.
constexpr std::pair<int64_t, int64_t> kScopes[] = {{1, 37}, {1, 300}, {1, 512}, {3, 1},
                                                   {4, 5},  {2, 130}, {3, 128}};

// The count of (sequence, expert) from two binary searches in the expert-major plan, against a
// count through the token-major view, as the CPU backend counts; and, for the whole batch, the
// plan's own per-expert counts.
TEST_F(RouterRules, AuxCountsAreExact) {
  int64_t checked = 0;
  const std::vector<RouterConfig> configs = every_config(rng_);
  for (size_t c = 0; c < configs.size(); c += 4) {
    const RouterConfig& cfg = configs[c];
    const int E = static_cast<int>(cfg.num_experts);
    for (Logits kind : {Logits::Normal, Logits::Ties})
      for (const auto& [num_seq, L] : kScopes) {
        const int64_t rows = num_seq * L;
        const Routed in = route_and_plan(*cpu_, cfg, rows, kind, rng_);
        const DispatchPlan& plan = in.plan;
        const int64_t* to = plan.token_offsets.data();
        for (int64_t q = 0; q < num_seq; ++q) {
          std::vector<int64_t> want(static_cast<size_t>(E), 0);
          for (int64_t t = q * L; t < (q + 1) * L; ++t)
            for (int64_t j = to[t]; j < to[t + 1]; ++j)
              ++want[plan.expert.data()[plan.token_assign.data()[j]]];
          for (int e = 0; e < E; ++e) {
            const int64_t got = rules::expert_tokens_in(plan.expert_offsets.data(),
                                                        plan.token.data(), e, q * L, (q + 1) * L);
            ASSERT_EQ(got, want[e]) << describe(cfg) << " L=" << L << " q=" << q << " e=" << e;
            if (num_seq == 1) {
              ASSERT_EQ(got, plan.count(e));
            }
            ++checked;
          }
        }
      }
  }
  std::printf("aux counts: %lld (sequence, expert) counts exact\n",
              static_cast<long long>(checked));
}

}  // namespace
}  // namespace moert
