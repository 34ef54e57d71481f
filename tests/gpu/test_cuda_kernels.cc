// Every operation of the CUDA backend against the fp32 CPU backend on random inputs: exact where
// the operation is exact (routing decisions, plans, integer counts), within bf16 tolerances where
// the GPU multiplies in bf16, within fp32 rounding elsewhere.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "core/aux_loss.h"
#include "core/backend.h"
#include "core/error.h"
#include "core/layers.h"
#include "core/model.h"
#include "core/param_store.h"
#include "gpu_test_main.h"

namespace moert {
namespace {

std::string plugin_path() {
#ifdef MOERT_DEVSIM
  return MOERT_CUDA_PLUGIN_PATH;
#else
  const char* env = std::getenv("MOERT_CUDA_PLUGIN");
  return env ? env : MOERT_CUDA_PLUGIN_PATH;
#endif
}

// Both backends, built once.
struct Backends {
  std::unique_ptr<Backend> cpu = make_cpu_backend(2);
  std::unique_ptr<Backend> gpu = make_cuda_backend(0, plugin_path());
};

Backends& backends() {
  static Backends b;
  return b;
}

template <typename T>
Buffer<T> up(const std::vector<T>& v) {
  Backend& g = *backends().gpu;
  Buffer<T> b(g, v.size());
  g.upload(b.data(), v.data(), v.size() * sizeof(T));
  return b;
}

template <typename T>
std::vector<T> down(const Buffer<T>& b) {
  std::vector<T> v(b.size());
  backends().gpu->download(v.data(), b.data(), b.bytes());
  return v;
}

std::vector<float> randn(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

double rel(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = double{got[i]} - want[i];
    num += d * d;
    den += double{want[i]} * want[i];
    if (!std::isfinite(got[i])) return INFINITY;
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

// A gradient accumulated in place (acc mode of grad_reduction.h).
GradOut acc(float* p) { return GradOut{p}; }

// Per-expert gradients of a stacked [E, per] tensor, in acc mode.
std::vector<GradOut> per_expert(float* base, int64_t experts, int64_t per) {
  std::vector<GradOut> g(static_cast<size_t>(experts));
  for (int64_t e = 0; e < experts; ++e) g[e].acc = base + e * per;
  return g;
}

// The summed loss of a backend's cross_entropy (its chunk sums added in order).
double loss_sum(Backend& be, const float* logits, const int32_t* targets, int64_t rows,
                int64_t vocab, float* dlogits, float scale) {
  std::vector<double> chunks;
  be.cross_entropy(logits, targets, rows, vocab, dlogits, scale, chunks);
  double total = 0.0;
  for (double c : chunks) total += c;
  return total;
}

// A weight on both sides: fp32 on the CPU; fp32 and bf16 on the GPU.
struct W {
  std::vector<float> host;
  Buffer<float> f32;
  Buffer<uint16_t> bf16;
  explicit W(std::vector<float> v) : host(std::move(v)) {
    f32 = up(host);
    bf16.resize(*backends().gpu, host.size());
    backends().gpu->to_bf16(f32.data(), bf16.data(), static_cast<int64_t>(host.size()));
  }
  Weight cpu() const { return {host.data(), nullptr}; }
  Weight gpu(bool with_bf16 = true) const {
    return {f32.data(), with_bf16 ? bf16.data() : nullptr};
  }
};

constexpr double kBf16 = 2e-2;  // bf16 operands, fp32 accumulation
constexpr double kF32 = 2e-5;

TEST(CudaKernels, LinearInBf16AndFp32WithBias) {
  std::mt19937 rng(1);
  const int64_t rows = 300, in = 96, out = 80;
  auto x = randn(rows * in, rng);
  W w(randn(out * in, rng, 0.1f));
  auto bias = randn(out, rng);
  auto y0 = randn(rows * out, rng);
  for (bool bf16 : {true, false}) {
    std::vector<float> ref = y0;
    backends().cpu->linear(x.data(), w.cpu(), bias.data(), ref.data(), rows, in, out, true);
    auto dx = up(x), db = up(bias);
    auto dy = up(y0);
    backends().gpu->linear(dx.data(), w.gpu(bf16), db.data(), dy.data(), rows, in, out, true);
    EXPECT_LT(rel(down(dy), ref), bf16 ? kBf16 : kF32) << "bf16 " << bf16;
  }
}

// Odd sizes: rows of 37 bf16 values start on 2-byte boundaries only.
TEST(CudaKernels, LinearBackwardInBf16AndFp32) {
  std::mt19937 rng(11);
  const int64_t rows = 101, in = 37, out = 23;
  auto x = randn(rows * in, rng), dy = randn(rows * out, rng);
  W w(randn(out * in, rng, 0.2f));
  const auto dx0 = randn(rows * in, rng), dw0 = randn(out * in, rng), db0 = randn(out, rng);
  for (bool bf16 : {true, false}) {
    for (bool accumulate : {true, false}) {
      std::vector<float> dx = dx0, dw = dw0, db = db0;
      auto X = up(x), DY = up(dy), DX = up(dx0), DW = up(dw0), DB = up(db0);
      const GradOut cdb = acc(db.data()), gdb = acc(DB.data());
      backends().cpu->linear_backward(x.data(), w.cpu(), dy.data(), dx.data(), accumulate,
                                      acc(dw.data()), &cdb, rows, in, out);
      backends().gpu->linear_backward(X.data(), w.gpu(bf16), DY.data(), DX.data(), accumulate,
                                      acc(DW.data()), &gdb, rows, in, out);
      const double tol = bf16 ? kBf16 : kF32;
      EXPECT_LT(rel(down(DX), dx), tol) << "bf16 " << bf16 << " accumulate " << accumulate;
      EXPECT_LT(rel(down(DW), dw), tol) << "bf16 " << bf16 << " accumulate " << accumulate;
      EXPECT_LT(rel(down(DB), db), kF32) << "bf16 " << bf16 << " accumulate " << accumulate;
    }
    // Without dx (the first layer's input needs none) and without a bias.
    std::vector<float> dw = dw0;
    auto X = up(x), DY = up(dy), DW = up(dw0);
    backends().cpu->linear_backward(x.data(), w.cpu(), dy.data(), nullptr, false, acc(dw.data()),
                                    nullptr, rows, in, out);
    backends().gpu->linear_backward(X.data(), w.gpu(bf16), DY.data(), nullptr, false,
                                    acc(DW.data()), nullptr, rows, in, out);
    EXPECT_LT(rel(down(DW), dw), bf16 ? kBf16 : kF32) << "bf16 " << bf16 << " without dx";
  }
}

TEST(CudaKernels, RMSNormForwardAndBackward) {
  std::mt19937 rng(2);
  const int64_t rows = 200, dim = 192;
  auto x = randn(rows * dim, rng), w = randn(dim, rng), g = randn(rows * dim, rng);
  std::vector<float> y(rows * dim), inv(rows), dx(rows * dim), dw(dim, 0.5f);
  Backend& c = *backends().cpu;
  c.rmsnorm(x.data(), w.data(), y.data(), inv.data(), rows, dim, 1e-6f);
  c.rmsnorm_backward(x.data(), w.data(), inv.data(), g.data(), dx.data(), acc(dw.data()), rows,
                     dim);
  auto X = up(x), Wt = up(w), G = up(g), Y = up(y), I = up(inv), DX = up(dx);
  auto DW = up(std::vector<float>(dim, 0.5f));
  Backend& d = *backends().gpu;
  d.rmsnorm(X.data(), Wt.data(), Y.data(), I.data(), rows, dim, 1e-6f);
  d.rmsnorm_backward(X.data(), Wt.data(), I.data(), G.data(), DX.data(), acc(DW.data()), rows, dim);
  EXPECT_LT(rel(down(Y), y), kF32);
  EXPECT_LT(rel(down(I), inv), kF32);
  EXPECT_LT(rel(down(DX), dx), kF32);
  EXPECT_LT(rel(down(DW), dw), kF32);
}

TEST(CudaKernels, EmbeddingForwardAndBackwardWithRepeatedTokens) {
  std::mt19937 rng(3);
  const int64_t vocab = 50, dim = 24, rows = 90, context = 3;
  auto table = randn(vocab * dim, rng);
  std::vector<int32_t> tokens(rows * context);
  std::uniform_int_distribution<int32_t> tok(0, 9);  // few distinct: many repeats
  for (auto& t : tokens) t = tok(rng) * 5;
  auto g = randn(rows * context * dim, rng);
  std::vector<float> y(rows * context * dim), dt(vocab * dim, 0.25f);
  backends().cpu->embedding(tokens.data(), table.data(), y.data(), rows, context, dim);
  backends().cpu->embedding_backward(tokens.data(), g.data(), acc(dt.data()), rows, context, dim,
                                     vocab);
  auto T = up(tokens);
  auto Tb = up(table), G = up(g), Y = up(y);
  auto DT = up(std::vector<float>(vocab * dim, 0.25f));
  backends().gpu->embedding(T.data(), Tb.data(), Y.data(), rows, context, dim);
  backends().gpu->embedding_backward(T.data(), G.data(), acc(DT.data()), rows, context, dim, vocab);
  EXPECT_EQ(down(Y), y);
  EXPECT_LT(rel(down(DT), dt), 1e-6);
}

TEST(CudaKernels, SwiGLUForwardAndBackward) {
  std::mt19937 rng(4);
  const int64_t rows = 257, dim = 64, hidden = 96;
  auto x = randn(rows * dim, rng);
  W w1(randn(hidden * dim, rng, 0.15f)), w3(randn(hidden * dim, rng, 0.15f)),
      w2(randn(dim * hidden, rng, 0.15f));
  auto g = randn(rows * dim, rng);
  Backend& c = *backends().cpu;
  // Non-zero starting gradients and dx: weight gradients accumulate, and dx accumulates here too.
  const auto dw0 = randn(hidden * dim, rng), dx0 = randn(rows * dim, rng);
  std::vector<float> y(rows * dim, 0.0f), h1(rows * hidden), h3(rows * hidden),
      dx = dx0, dw1 = dw0, dw3 = dw0, dw2 = dw0;
  // Both sides start from the same values: upload before the CPU accumulates into them.
  auto DX = up(dx0), DW1 = up(dw0), DW3 = up(dw0), DW2 = up(dw0);
  c.swiglu_ffn(x.data(), w1.cpu(), w3.cpu(), w2.cpu(), y.data(), h1.data(), h3.data(), rows, dim,
               hidden, false);
  c.swiglu_ffn_backward(x.data(), w1.cpu(), w3.cpu(), w2.cpu(), h1.data(), h3.data(), g.data(),
                        dx.data(), true, acc(dw1.data()), acc(dw3.data()), acc(dw2.data()), rows,
                        dim, hidden);
  Backend& d = *backends().gpu;
  auto X = up(x), G = up(g), Y = up(y), H1 = up(h1), H3 = up(h3);
  d.swiglu_ffn(X.data(), w1.gpu(), w3.gpu(), w2.gpu(), Y.data(), H1.data(), H3.data(), rows, dim,
               hidden, false);
  d.swiglu_ffn_backward(X.data(), w1.gpu(), w3.gpu(), w2.gpu(), H1.data(), H3.data(), G.data(),
                        DX.data(), true, acc(DW1.data()), acc(DW3.data()), acc(DW2.data()), rows,
                        dim, hidden);
  EXPECT_LT(rel(down(Y), y), kBf16);
  EXPECT_LT(rel(down(H1), h1), kBf16);
  EXPECT_LT(rel(down(H3), h3), kBf16);
  EXPECT_LT(rel(down(DX), dx), kBf16);
  EXPECT_LT(rel(down(DW1), dw1), kBf16);
  EXPECT_LT(rel(down(DW3), dw3), kBf16);
  EXPECT_LT(rel(down(DW2), dw2), kBf16);
}

struct RouteCase {
  ScoreFunction score;
  uint32_t groups, keep;
  bool normalize;
};

class CudaRouting : public ::testing::TestWithParam<RouteCase> {};

// Routing, the plan, the grouped experts, combine and every backward, in one MoE layer's order.
TEST_P(CudaRouting, MoEPipelineMatchesTheCpu) {
  const RouteCase rc = GetParam();
  std::mt19937 rng(5 + rc.groups);
  const int64_t rows = 333, dim = 64, hidden = 48, E = 16, K = 4;
  RouterConfig cfg{E, K, rc.score, rc.groups, rc.keep, rc.normalize, 2.5f};
  // Well separated logits: routing decisions must agree exactly, not up to near-ties.
  std::vector<float> logits(rows * E);
  std::vector<int> perm(E);
  for (int64_t t = 0; t < rows; ++t) {
    for (int e = 0; e < E; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int e = 0; e < E; ++e) logits[t * E + e] = 0.25f * static_cast<float>(perm[e]) - 2.0f;
  }
  auto bias = randn(E, rng, 0.01f);
  Backend& c = *backends().cpu;
  Backend& d = *backends().gpu;
  std::vector<float> scores(rows * E), weights(rows * K);
  std::vector<int32_t> experts(rows * K);
  c.route_topk(cfg, logits.data(), bias.data(), rows, scores.data(), experts.data(),
               weights.data());
  auto L = up(logits), B = up(bias), S = up(scores), Wg = up(weights);
  auto Ex = up(experts);
  d.route_topk(cfg, L.data(), B.data(), rows, S.data(), Ex.data(), Wg.data());
  ASSERT_EQ(down(Ex), experts);
  EXPECT_LT(rel(down(S), scores), 1e-6);
  EXPECT_LT(rel(down(Wg), weights), 1e-6);

  DispatchPlan cp, gp;
  c.plan_dispatch(experts.data(), weights.data(), rows, K, E, cp);
  d.plan_dispatch(Ex.data(), Wg.data(), rows, K, E, gp);
  ASSERT_EQ(gp.host_offsets, cp.host_offsets);
  const int64_t A = cp.num_assignments();
  auto host = [](const auto& buf) { return std::vector(buf.data(), buf.data() + buf.size()); };
  EXPECT_EQ(down(gp.token), host(cp.token));
  EXPECT_EQ(down(gp.expert), host(cp.expert));
  EXPECT_EQ(down(gp.token_offsets), host(cp.token_offsets));
  EXPECT_EQ(down(gp.token_assign), host(cp.token_assign));
  EXPECT_LT(rel(down(gp.weight), host(cp.weight)), 1e-6);

  auto x = randn(rows * dim, rng);
  W w1(randn(E * hidden * dim, rng, 0.15f)), w3(randn(E * hidden * dim, rng, 0.15f)),
      w2(randn(E * dim * hidden, rng, 0.15f));
  std::vector<float> xp(A * dim), yp(A * dim), h1(A * hidden), h3(A * hidden), y(rows * dim, 0.0f);
  c.dispatch(cp, x.data(), xp.data(), dim);
  c.grouped_swiglu_ffn(cp, xp.data(), w1.cpu(), w3.cpu(), w2.cpu(), yp.data(), h1.data(), h3.data(),
                       dim, hidden);
  c.combine(cp, yp.data(), y.data(), dim);
  auto X = up(x), XP = up(xp), YP = up(yp), H1 = up(h1), H3 = up(h3);
  auto Y = up(std::vector<float>(rows * dim, 0.0f));  // combine adds into y
  d.dispatch(gp, X.data(), XP.data(), dim);
  d.grouped_swiglu_ffn(gp, XP.data(), w1.gpu(), w3.gpu(), w2.gpu(), YP.data(), H1.data(), H3.data(),
                       dim, hidden);
  d.combine(gp, YP.data(), Y.data(), dim);
  EXPECT_EQ(down(XP), xp);
  EXPECT_LT(rel(down(YP), yp), kBf16);
  EXPECT_LT(rel(down(Y), y), kBf16);

  // Backward, fed the CPU's forward values on both sides so that each step is compared alone.
  auto gy = randn(rows * dim, rng);
  std::vector<float> dyp(A * dim), dwt(A), dxp(A * dim), dx(rows * dim, 0.0f),
      dw1(E * hidden * dim, 0.0f), dw3(E * hidden * dim, 0.0f), dw2(E * dim * hidden, 0.0f),
      dl(rows * E);
  // What dispatch_backward and the weight gradients add into, as it was before the CPU did.
  auto DX = up(dx), DW1 = up(dw1), DW3 = up(dw3), DW2 = up(dw2);
  c.combine_backward(cp, yp.data(), gy.data(), dyp.data(), dwt.data(), dim, dim);
  const int64_t per = hidden * dim;
  c.grouped_swiglu_ffn_backward(cp, xp.data(), w1.cpu(), w3.cpu(), w2.cpu(), h1.data(), h3.data(),
                                dyp.data(), dxp.data(), per_expert(dw1.data(), E, per).data(),
                                per_expert(dw3.data(), E, per).data(),
                                per_expert(dw2.data(), E, per).data(), dim, hidden, dim);
  c.dispatch_backward(cp, dxp.data(), dx.data(), dim);
  // The sequence-wise auxiliary loss over 3 sequences of 111 rows: statistics per chunk, folded
  // on the host, then the gradient through P.
  const AuxChunks ach = aux_chunks({0, 111, 222, rows});
  const size_t nstat = static_cast<size_t>(ach.chunks() * E);
  std::vector<int64_t> counts(nstat), gcounts(nstat);
  std::vector<double> psum(nstat), gpsum(nstat);
  c.aux_partials(cfg, scores.data(), cp, ach.chunk_offsets.data(), ach.chunks(), counts.data(),
                 psum.data());
  const AuxTerms at = aux_terms(ach, counts.data(), psum.data(), E, K, 0.1);
  std::vector<float> ds(rows * E);
  c.aux_grad(cfg, scores.data(), rows, ach.seq_offsets.data(), ach.num_seq(), at.coef.data(),
             ds.data());
  c.router_backward(cfg, rc.normalize, scores.data(), cp, dwt.data(), ds.data(), dl.data(), rows);
  auto YPc = up(yp), XPc = up(xp), H1c = up(h1), H3c = up(h3), GY = up(gy), DYP = up(dyp),
       DWT = up(dwt), DXP = up(dxp), DL = up(dl), DS = up(ds), Sc = up(scores);
  d.combine_backward(gp, YPc.data(), GY.data(), DYP.data(), DWT.data(), dim, dim);
  // dy_perm is one product per element, exact on both sides, but of each side's own routing
  // weight: the GPU's sigmoid rounds differently (within 1e-6, checked above), so compare with
  // the GPU's weights exactly and with the CPU's result within that.
  {
    const auto gw = down(gp.weight);
    const auto gtok = down(gp.token);
    std::vector<float> want(A * dim);
    for (int64_t a = 0; a < A; ++a)
      for (int64_t j = 0; j < dim; ++j) want[a * dim + j] = gw[a] * gy[gtok[a] * dim + j];
    EXPECT_EQ(down(DYP), want);
  }
  EXPECT_LT(rel(down(DYP), dyp), 1e-6);
  EXPECT_LT(rel(down(DWT), dwt), 1e-5);
  auto DYPc = up(dyp), DWTc = up(dwt);
  d.grouped_swiglu_ffn_backward(
      gp, XPc.data(), w1.gpu(), w3.gpu(), w2.gpu(), H1c.data(), H3c.data(), DYPc.data(), DXP.data(),
      per_expert(DW1.data(), E, per).data(), per_expert(DW3.data(), E, per).data(),
      per_expert(DW2.data(), E, per).data(), dim, hidden, dim);
  EXPECT_LT(rel(down(DXP), dxp), kBf16);
  EXPECT_LT(rel(down(DW1), dw1), kBf16);
  EXPECT_LT(rel(down(DW3), dw3), kBf16);
  EXPECT_LT(rel(down(DW2), dw2), kBf16);
  auto DXPc = up(dxp);
  d.dispatch_backward(gp, DXPc.data(), DX.data(), dim);
  EXPECT_LT(rel(down(DX), dx), 1e-6);
  d.aux_partials(cfg, Sc.data(), gp, ach.chunk_offsets.data(), ach.chunks(), gcounts.data(),
                 gpsum.data());
  EXPECT_EQ(gcounts, counts);
  for (size_t i = 0; i < nstat; ++i) EXPECT_NEAR(gpsum[i], psum[i], 1e-12 * std::abs(psum[i]));
  d.aux_grad(cfg, Sc.data(), rows, ach.seq_offsets.data(), ach.num_seq(), at.coef.data(),
             DS.data());
  EXPECT_LT(rel(down(DS), ds), 1e-5);
  auto DSc = up(ds);
  d.router_backward(cfg, rc.normalize, Sc.data(), gp, DWTc.data(), DSc.data(), DL.data(), rows);
  EXPECT_LT(rel(down(DL), dl), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Routers, CudaRouting,
                         ::testing::Values(RouteCase{ScoreFunction::Sigmoid, 4, 2, true},
                                           RouteCase{ScoreFunction::Sigmoid, 1, 1, false},
                                           RouteCase{ScoreFunction::Softmax, 2, 1, true}));

// Experts that receive no token, odd widths, and the inference forward (no h1/h3 kept).
TEST(CudaKernels, GroupedExpertsWithEmptyExpertsAndOddShapes) {
  std::mt19937 rng(12);
  const int64_t rows = 77, dim = 36, hidden = 21, E = 8, K = 2;
  RouterConfig cfg{E, K, ScoreFunction::Sigmoid, 1, 1, true, 1.0f};
  // Experts 5, 6 and 7 always score lowest: they get no rows.
  std::vector<float> logits(rows * E);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t e = 0; e < E; ++e)
      logits[t * E + e] = e >= 5 ? -8.0f - 0.5f * e : 0.3f * ((t * 7 + e * 3) % 11) - 1.0f;
  Backend& c = *backends().cpu;
  Backend& d = *backends().gpu;
  std::vector<float> scores(rows * E), weights(rows * K);
  std::vector<int32_t> experts(rows * K);
  c.route_topk(cfg, logits.data(), nullptr, rows, scores.data(), experts.data(), weights.data());
  DispatchPlan cp, gp;
  c.plan_dispatch(experts.data(), weights.data(), rows, K, E, cp);
  auto Ex = up(experts);
  auto Wg = up(weights);
  d.plan_dispatch(Ex.data(), Wg.data(), rows, K, E, gp);
  ASSERT_EQ(gp.host_offsets, cp.host_offsets);
  for (int64_t e = 5; e < E; ++e) ASSERT_EQ(cp.count(e), 0);
  const int64_t A = cp.num_assignments();
  auto xp = randn(A * dim, rng);
  W w1(randn(E * hidden * dim, rng, 0.2f)), w3(randn(E * hidden * dim, rng, 0.2f)),
      w2(randn(E * dim * hidden, rng, 0.2f));
  std::vector<float> yp(A * dim), h1(A * hidden), h3(A * hidden);
  c.grouped_swiglu_ffn(cp, xp.data(), w1.cpu(), w3.cpu(), w2.cpu(), yp.data(), h1.data(), h3.data(),
                       dim, hidden);
  auto XP = up(xp), YP = up(std::vector<float>(A * dim, 0.0f));
  d.grouped_swiglu_ffn(gp, XP.data(), w1.gpu(), w3.gpu(), w2.gpu(), YP.data(), nullptr, nullptr,
                       dim, hidden);
  EXPECT_LT(rel(down(YP), yp), kBf16);

  auto dyp = randn(A * dim, rng);
  const auto dw0 = randn(E * hidden * dim, rng);
  std::vector<float> dxp(A * dim), dw1 = dw0, dw3 = dw0, dw2 = dw0;
  auto DW1 = up(dw0), DW3 = up(dw0), DW2 = up(dw0);
  const int64_t per = hidden * dim;
  c.grouped_swiglu_ffn_backward(cp, xp.data(), w1.cpu(), w3.cpu(), w2.cpu(), h1.data(), h3.data(),
                                dyp.data(), dxp.data(), per_expert(dw1.data(), E, per).data(),
                                per_expert(dw3.data(), E, per).data(),
                                per_expert(dw2.data(), E, per).data(), dim, hidden, dim);
  auto H1 = up(h1), H3 = up(h3), DYP = up(dyp), DXP = up(std::vector<float>(A * dim, 0.0f));
  d.grouped_swiglu_ffn_backward(gp, XP.data(), w1.gpu(), w3.gpu(), w2.gpu(), H1.data(), H3.data(),
                                DYP.data(), DXP.data(), per_expert(DW1.data(), E, per).data(),
                                per_expert(DW3.data(), E, per).data(),
                                per_expert(DW2.data(), E, per).data(), dim, hidden, dim);
  EXPECT_LT(rel(down(DXP), dxp), kBf16);
  EXPECT_LT(rel(down(DW1), dw1), kBf16);
  EXPECT_LT(rel(down(DW3), dw3), kBf16);
  EXPECT_LT(rel(down(DW2), dw2), kBf16);
  // The empty experts' gradients are untouched.
  const auto got = down(DW1);
  EXPECT_TRUE(std::equal(got.begin() + 5 * per, got.end(), dw0.begin() + 5 * per));
}

// The CUDA benchmark's way of building a layer: tensors with shapes and no host values, their
// device copies adopted by the ParamStore. Such a layer must compute what the same weights loaded
// from a model's values compute (it once dereferenced a missing parallel context instead).
TEST(CudaKernels, AnMoELayerOverAdoptedCopiesMatchesTheLoadedOne) {
  constexpr int64_t E = 8, D = 64, H = 32, rows = 96;
  std::mt19937 rng(11);
  auto make = [&](Model& m) -> MoESpec& {
    MoESpec spec;
    spec.dim = D;
    spec.expert_hidden = H;
    spec.num_shared = 1;
    spec.shared_hidden = H;
    spec.residual = false;  // the output is the experts' alone: not x again
    spec.router = {static_cast<uint32_t>(E), 2, ScoreFunction::Sigmoid, 2, 1, true, 2.5f};
    spec.balancing.policy = BalancingPolicy::LossFreeBias;
    m.layers.push_back({"moe", LayerKind::MoE, D, D, spec});
    return std::get<MoESpec>(m.layers[0].spec);
  };
  Model loaded, adopted;
  MoESpec& l = make(loaded);
  MoESpec& a = make(adopted);
  struct Field {
    Tensor MoESpec::*t;
    std::vector<int64_t> shape;
    float scale;
  };
  const Field fields[] = {
      {&MoESpec::gate, {E, D}, 0.125f},         {&MoESpec::gate_bias, {E}, 0.01f},
      {&MoESpec::w1, {E, H, D}, 0.125f},        {&MoESpec::w3, {E, H, D}, 0.125f},
      {&MoESpec::w2, {E, D, H}, 0.18f},         {&MoESpec::shared_w1, {1, H, D}, 0.125f},
      {&MoESpec::shared_w3, {1, H, D}, 0.125f}, {&MoESpec::shared_w2, {1, D, H}, 0.18f}};
  for (const Field& f : fields) {
    int64_t n = 1;
    for (int64_t d : f.shape) n *= d;
    (l.*f.t).shape = (a.*f.t).shape = f.shape;
    (l.*f.t).values = randn(static_cast<size_t>(n), rng, f.scale);
  }
  Backend& g = *backends().gpu;
  ParamStore from_values(g, loaded, nullptr);
  ParamStore from_copies(g, adopted, nullptr);  // every tensor empty on the host: adopted below
  for (const Field& f : fields) {
    const Tensor& src = l.*f.t;
    const bool expert = f.t != &MoESpec::gate && f.t != &MoESpec::gate_bias;
    if (!expert) {
      from_copies.adopt(a.*f.t, up(src.values), {}, {});
      continue;
    }
    // The experts as the benchmark holds them: a bf16 copy alone.
    Buffer<float> f32 = up(src.values);
    Buffer<uint16_t> bf16(g, src.values.size());
    g.to_bf16(f32.data(), bf16.data(), static_cast<int64_t>(src.values.size()));
    from_copies.adopt(a.*f.t, {}, std::move(bf16), {});
  }
  MoELayer want_layer(l, from_values), got_layer(a, from_copies);
  auto X = up(randn(rows * D, rng));
  Buffer<float> Y1(g, rows * D), Y2(g, rows * D);
  want_layer.forward(g, X.data(), Y1.data(), rows, Pass::Eval);
  got_layer.forward(g, X.data(), Y2.data(), rows, Pass::Eval);
  const auto want = down(Y1);
  EXPECT_LT(rel(down(Y2), want), 1e-6);
  // The experts' output is not all zeros (rel against zeros is the norm itself).
  EXPECT_GT(rel(want, std::vector<float>(want.size(), 0.0f)), 0.1);
}

TEST(CudaKernels, CrossEntropyAndOptimizers) {
  std::mt19937 rng(6);
  const int64_t rows = 123, vocab = 77;
  auto logits = randn(rows * vocab, rng, 2.0f);
  std::vector<int32_t> targets(rows);
  for (int64_t r = 0; r < rows; ++r) targets[r] = static_cast<int32_t>((r * 7) % vocab);
  Backend& c = *backends().cpu;
  Backend& d = *backends().gpu;
  std::vector<float> g(rows * vocab);
  const double loss = loss_sum(c, logits.data(), targets.data(), rows, vocab, g.data(), 0.01f);
  auto Lg = up(logits), G = up(g);
  auto T = up(targets);
  const double gloss = loss_sum(d, Lg.data(), T.data(), rows, vocab, G.data(), 0.01f);
  EXPECT_NEAR(gloss, loss, 1e-9 * loss);
  EXPECT_LT(rel(down(G), g), 1e-6);

  const int64_t n = 10007;
  auto p = randn(n, rng), grad = randn(n, rng), m = randn(n, rng, 0.1f), v = randn(n, rng, 0.1f);
  for (auto& x : v) x = std::abs(x);
  EXPECT_NEAR(d.sum_squares(up(grad).data(), n), c.sum_squares(grad.data(), n),
              1e-9 * c.sum_squares(grad.data(), n));
  // Several arrays at once: the same sum, bitwise, as one call per array added in order.
  {
    auto G1 = up(grad), G2 = up(p);
    const float* xs[] = {G1.data(), G2.data(), G1.data() + 17};
    const int64_t ns[] = {n, n, 5};
    const double each =
        d.sum_squares(xs[0], ns[0]) + d.sum_squares(xs[1], ns[1]) + d.sum_squares(xs[2], ns[2]);
    EXPECT_EQ(d.sum_squares_many(xs, ns, 3), each);
    const float* hs[] = {grad.data(), p.data(), grad.data() + 17};
    EXPECT_NEAR(each, c.sum_squares_many(hs, ns, 3), 1e-9 * each);
  }
  auto P = up(p), Gr = up(grad), M = up(m), V = up(v);
  c.adamw(p.data(), grad.data(), m.data(), v.data(), n, 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.5, 0.1,
          0.001);
  d.adamw(P.data(), Gr.data(), M.data(), V.data(), n, 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.5, 0.1, 0.001);
  EXPECT_LT(rel(down(P), p), 1e-7);
  EXPECT_LT(rel(down(M), m), 1e-7);
  EXPECT_LT(rel(down(V), v), 1e-7);
  c.sgd(p.data(), grad.data(), m.data(), n, 0.1, 0.9, 0.01, 0.5);
  d.sgd(P.data(), Gr.data(), M.data(), n, 0.1, 0.9, 0.01, 0.5);
  EXPECT_LT(rel(down(P), p), 1e-7);
  EXPECT_LT(rel(down(M), m), 1e-7);
}

#ifndef MOERT_DEVSIM  // the simulated device runs Expert Choice on the CPU backend
TEST(CudaKernels, ExpertChoiceIsRefusedClearly) {
  RouterConfig cfg{8, 2, ScoreFunction::Softmax, 1, 1, false, 1.0f};
  DispatchPlan plan;
  try {
    backends().gpu->route_expert_choice(cfg, nullptr, 4, 1, nullptr, plan, 0, 4);
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Unsupported);
    EXPECT_NE(std::string(e.what()).find("Expert Choice"), std::string::npos);
  }
}
#endif

}  // namespace
}  // namespace moert

std::string moert_gpu_test::gpu_unavailable_reason() {
  try {
    moert::backends();
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

int main(int argc, char** argv) { return moert_gpu_test::run(argc, argv); }
