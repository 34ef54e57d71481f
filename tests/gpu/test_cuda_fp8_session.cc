// The CUDA backend's FP8 experts (kernels/cuda/cuda_ffn_fp8.h) against the CPU backend's exact
// emulation (kernels/cpu/cpu_ffn_fp8.cc): the weights' block copies bit for bit; the grouped and
// the dense FP8 FFN, forward and backward, with empty experts, row counts that are not multiples
// of 128 (nor of 4) and widths that are not multiples of 128 (nor of 16, so that every padding
// path runs); the fp32 FFN of an fp8 session's dense layers; NaN refusals; then whole sessions of
// precision fp8, CUDA against CPU: logits, every gradient, training steps, FP8 copies refreshed
// after a step, a NaN weight write refused. Skips (exit 77) without a usable sm_90 GPU.
// Passed on an H200 on 2026-12-04 (bench/RESULTS.md); its devsim twin (label devsim) runs the
// same program against the CPU backend behind the plugin contract, which checks its own logic.
//
// The bounds. Both sides quantize the same fp32 inputs with the same rules (kernels/fp8_rules.h),
// so a GEMM whose operands are inputs of the call multiplies identical codes and scales: the GPU
// differs from the CPU only in how it sums a 128-block of products (inside the tensor cores, with
// fewer accumulator bits until cuBLASLt promotes the block's sum, DeepSeek-V3 report section
// 3.3.2) and in the order of fp32 additions: about 1e-4 relative (tests/gpu/test_cuda_fp8.cc holds
// each GEMM to 2e-3). Operands computed inside the call (a = silu(h1) h3; dh1, dh3 from dA) carry
// that 1e-4 and the GPU's expf; an element that lies within it of an E4M3 rounding boundary
// (codes are 6-12 % apart) takes the neighbouring code, with probability about 2e-3 per element,
// and moves by one step, ~9 % of itself. Summed over a GEMM's reduction that is
// sqrt(2e-3) x 9 % ~ 4e-3 relative RMS. Hence: 2e-3 for Fprop outputs of the inputs (h1, h3),
// 2e-2 for everything downstream of a recomputed operand (y, dx, dW), 5x the estimate. A wrong
// layout, scale or transpose is O(1). Sessions compound a layer: see the session tests.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/session.h"
#include "gpu_test_main.h"
#include "tests/unit/session_model.h"

namespace moert {
namespace {

using Vec = std::vector<float>;

std::string plugin_path() {
#ifdef MOERT_DEVSIM
  return MOERT_CUDA_PLUGIN_PATH;
#else
  const char* env = std::getenv("MOERT_CUDA_PLUGIN");
  return env ? env : MOERT_CUDA_PLUGIN_PATH;
#endif
}

struct Backends {
  std::unique_ptr<Backend> cpu, gpu;
  explicit Backends(bool pow2) {
    Fp8Options o;
    o.power_of_two_scales = pow2;
    cpu = make_cpu_backend(2, Precision::Fp8, o);
    gpu = make_cuda_backend(0, plugin_path(), Precision::Fp8, o);
  }
};

Backends& backends(bool pow2 = false) {
  static Backends plain(false), ue8m0(true);
  return pow2 ? ue8m0 : plain;
}
Backend& cpu() { return *backends().cpu; }
Backend& gpu() { return *backends().gpu; }

template <typename T>
Buffer<T> up(const std::vector<T>& v, Backend& g = gpu()) {
  Buffer<T> b(g, std::max<size_t>(1, v.size()));
  g.upload(b.data(), v.data(), v.size() * sizeof(T));
  return b;
}

template <typename T>
std::vector<T> down(const T* p, size_t n, Backend& g = gpu()) {
  std::vector<T> v(n);
  g.download(v.data(), p, n * sizeof(T));
  return v;
}

Vec randn(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  Vec v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

double rel(const Vec& got, const Vec& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    const double d = double{got[i]} - want[i];
    num += d * d;
    den += double{want[i]} * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

constexpr double kSameOperands = 2e-3;  // GEMMs of the call's inputs
constexpr double kDownstream = 2e-2;    // after an operand the call computed
constexpr double kF32 = 2e-5;           // fp32 GEMMs

// A stack of `matrices` weights [rows, cols] with its FP8 copies, made by each backend.
struct Fp8W {
  int64_t matrices, rows, cols;
  Vec host;
  std::vector<uint8_t> ccodes;
  Vec cscales;
  Buffer<float> f32;
  Buffer<uint8_t> gcodes;
  Buffer<float> gscales;
  Fp8W(int64_t m, int64_t r, int64_t c, std::mt19937& rng, bool pow2 = false)
      : matrices(m), rows(r), cols(c), host(randn(static_cast<size_t>(m * r * c), rng, 0.15f)) {
    Backends& b = backends(pow2);
    const auto ns = static_cast<size_t>(fp8_blocks_scale_floats(m, r, c));
    ccodes.resize(host.size());
    cscales.assign(ns, -1.0f);
    b.cpu->quantize_weight_blocks(host.data(), m, r, c, ccodes.data(), cscales.data(), "w");
    f32 = up(host, *b.gpu);
    gcodes.resize(*b.gpu, std::max<size_t>(1, host.size()));
    gscales.resize(*b.gpu, std::max<size_t>(1, ns));
    b.gpu->quantize_weight_blocks(f32.data(), m, r, c, gcodes.data(), gscales.data(), "w");
  }
  Fp8Weight copy(const uint8_t* codes, const float* scales) const {
    return {codes, scales, rows * cols, fp8_blocks_scale_floats(1, rows, cols)};
  }
  Weight on_cpu() const { return {host.data(), nullptr, copy(ccodes.data(), cscales.data())}; }
  Weight on_gpu() const { return {f32.data(), nullptr, copy(gcodes.data(), gscales.data())}; }
};

TEST(CudaFp8Backend, ChoosesFp8ExpertsAndFp32ElsewhereAsTheCpu) {
  EXPECT_TRUE(gpu().fp8_experts());
  EXPECT_EQ(gpu().bf16_copies(), cpu().bf16_copies());
  EXPECT_EQ(gpu().bf16_copies(), Bf16Copies::None);
}

TEST(CudaFp8Backend, WeightBlocksMatchTheCpuBitForBit) {
  std::mt19937 rng(1);
  struct Shape {
    int64_t m, r, c;
  };
  for (bool pow2 : {false, true})
    for (const Shape& s : {Shape{1, 1, 1}, Shape{3, 40, 72}, Shape{2, 300, 136}, Shape{1, 256, 512},
                           Shape{3, 128, 200}}) {
      Fp8W w(s.m, s.r, s.c, rng, pow2);
      EXPECT_EQ(down(w.gcodes.data(), w.ccodes.size(), *backends(pow2).gpu), w.ccodes)
          << s.m << "x" << s.r << "x" << s.c << " pow2 " << pow2;
      const Vec gs = down(w.gscales.data(), w.cscales.size(), *backends(pow2).gpu);
      EXPECT_EQ(0, std::memcmp(gs.data(), w.cscales.data(), gs.size() * sizeof(float)))
          << s.m << "x" << s.r << "x" << s.c << " pow2 " << pow2;
    }
}

// Both ways of quantizing a stack: matrix by matrix (rows not whole 128-row blocks) and as one
// (rows of whole blocks).
TEST(CudaFp8Backend, NonFiniteWeightIsANumericErrorNamingWhere) {
  std::mt19937 rng(2);
  struct Case {
    int64_t m, r, c, bad_matrix, bad_row, bad_col;
  };
  for (const Case& k : {Case{3, 200, 150, 1, 45, 70}, Case{3, 256, 150, 2, 130, 7}}) {
    Vec v = randn(static_cast<size_t>(k.m * k.r * k.c), rng);
    v[static_cast<size_t>((k.bad_matrix * k.r + k.bad_row) * k.c + k.bad_col)] = std::nanf("");
    auto f32 = up(v);
    Buffer<uint8_t> codes(gpu(), v.size());
    Buffer<float> scales(gpu(), static_cast<size_t>(fp8_blocks_scale_floats(k.m, k.r, k.c)));
    try {
      gpu().quantize_weight_blocks(f32.data(), k.m, k.r, k.c, codes.data(), scales.data(),
                                   "moe.w1");
      ADD_FAILURE() << "a NaN weight was quantized";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::Numeric) << e.what();
      const std::string what = e.what();
      EXPECT_NE(what.find("moe.w1 (matrix " + std::to_string(k.bad_matrix) + ")"),
                std::string::npos)
          << what;
      EXPECT_NE(
          what.find("row " + std::to_string(k.bad_row) + ", column " + std::to_string(k.bad_col)),
          std::string::npos)
          << what;
    }
  }
}

// A grouped FFN's plan: only the per-expert offsets are read by the FFNs.
DispatchPlan plan_of(const std::vector<int64_t>& counts) {
  DispatchPlan p;
  p.host_offsets.assign(1, 0);
  for (int64_t c : counts) p.host_offsets.push_back(p.host_offsets.back() + c);
  p.rows = p.host_offsets.back();
  return p;
}

void report(const char* what, double e) {
  std::printf("  %-28s |gpu - cpu| / |cpu| = %.3e\n", what, e);
}

TEST(CudaFp8Backend, GroupedFfnMatchesTheCpuEmulation) {
  std::mt19937 rng(3);
  // Widths 136 and 72: neither a multiple of 128 nor of 16. Experts: empty, one row, 130, 37,
  // empty, 300 rows.
  const int64_t dim = 136, hidden = 72;
  const std::vector<int64_t> counts = {0, 1, 130, 37, 0, 300};
  const int64_t E = static_cast<int64_t>(counts.size());
  const DispatchPlan plan = plan_of(counts);
  const int64_t A = plan.num_assignments(), per = hidden * dim;
  Fp8W w1(E, hidden, dim, rng), w3(E, hidden, dim, rng), w2(E, dim, hidden, rng);
  const Vec x = randn(static_cast<size_t>(A * dim), rng);
  Vec y(A * dim), h1(A * hidden), h3(A * hidden);
  cpu().grouped_swiglu_ffn(plan, x.data(), w1.on_cpu(), w3.on_cpu(), w2.on_cpu(), y.data(),
                           h1.data(), h3.data(), dim, hidden);
  auto gx = up(x);
  Buffer<float> gy(gpu(), y.size()), gh1(gpu(), h1.size()), gh3(gpu(), h3.size());
  gpu().grouped_swiglu_ffn(plan, gx.data(), w1.on_gpu(), w3.on_gpu(), w2.on_gpu(), gy.data(),
                           gh1.data(), gh3.data(), dim, hidden);
  const double eh1 = rel(down(gh1.data(), h1.size()), h1);
  const double eh3 = rel(down(gh3.data(), h3.size()), h3);
  const double ey = rel(down(gy.data(), y.size()), y);
  report("Fprop h1", eh1);
  report("Fprop h3", eh3);
  report("FFN output", ey);
  EXPECT_LT(eh1, kSameOperands);
  EXPECT_LT(eh3, kSameOperands);
  EXPECT_LT(ey, kDownstream);

  // Backward from the CPU's h1, h3 on both sides; weight gradients accumulate onto a start value.
  const Vec dy = randn(static_cast<size_t>(A * dim), rng);
  const Vec dw1_0 = randn(static_cast<size_t>(E * per), rng, 0.1f);
  const Vec dw2_0 = randn(static_cast<size_t>(E * per), rng, 0.1f);
  Vec dx(A * dim), dw1 = dw1_0, dw3 = dw1_0, dw2 = dw2_0;
  auto grads = [&](float* g1, float* g3, float* g2, std::vector<GradOut>& o1,
                   std::vector<GradOut>& o3, std::vector<GradOut>& o2) {
    for (int64_t e = 0; e < E; ++e) {
      o1.push_back(GradOut{g1 + e * per});
      o3.push_back(GradOut{g3 + e * per});
      o2.push_back(GradOut{g2 + e * per});
    }
  };
  std::vector<GradOut> c1, c3, c2, g1, g3, g2;
  grads(dw1.data(), dw3.data(), dw2.data(), c1, c3, c2);
  cpu().grouped_swiglu_ffn_backward(plan, x.data(), w1.on_cpu(), w3.on_cpu(), w2.on_cpu(),
                                    h1.data(), h3.data(), dy.data(), dx.data(), c1.data(),
                                    c3.data(), c2.data(), dim, hidden, dim);
  auto gdy = up(dy), gph1 = up(h1), gph3 = up(h3), gdw1 = up(dw1_0), gdw3 = up(dw1_0),
       gdw2 = up(dw2_0);
  Buffer<float> gdx(gpu(), dx.size());
  grads(gdw1.data(), gdw3.data(), gdw2.data(), g1, g3, g2);
  gpu().grouped_swiglu_ffn_backward(plan, gx.data(), w1.on_gpu(), w3.on_gpu(), w2.on_gpu(),
                                    gph1.data(), gph3.data(), gdy.data(), gdx.data(), g1.data(),
                                    g3.data(), g2.data(), dim, hidden, dim);
  // Gradients are compared as what this call added (the start values would dilute the error).
  auto added = [](const Vec& after, const Vec& before) {
    Vec d(after.size());
    for (size_t i = 0; i < d.size(); ++i) d[i] = after[i] - before[i];
    return d;
  };
  const double edx = rel(down(gdx.data(), dx.size()), dx);
  const double e1 = rel(added(down(gdw1.data(), dw1.size()), dw1_0), added(dw1, dw1_0));
  const double e3 = rel(added(down(gdw3.data(), dw3.size()), dw1_0), added(dw3, dw1_0));
  const double e2 = rel(added(down(gdw2.data(), dw2.size()), dw2_0), added(dw2, dw2_0));
  report("Dgrad dx", edx);
  report("Wgrad dw1", e1);
  report("Wgrad dw3", e3);
  report("Wgrad dw2", e2);
  EXPECT_LT(edx, kDownstream);
  EXPECT_LT(e1, kDownstream);
  EXPECT_LT(e3, kDownstream);
  EXPECT_LT(e2, kDownstream);
  // Empty experts' gradients are untouched, bit for bit.
  const Vec got1 = down(gdw1.data(), dw1.size());
  for (int64_t e : {int64_t{0}, int64_t{4}})
    EXPECT_EQ(0, std::memcmp(got1.data() + e * per, dw1_0.data() + e * per, per * sizeof(float)))
        << "expert " << e;
}

// Power-of-two (UE8M0) scales reach the FFN's activation quantizers as well as the weights'.
TEST(CudaFp8Backend, PowerOfTwoScalesFollowTheCpu) {
  std::mt19937 rng(10);
  const int64_t dim = 96, hidden = 80;
  const DispatchPlan plan = plan_of({45, 0, 131});
  const int64_t A = plan.num_assignments();
  Fp8W w1(3, hidden, dim, rng, true), w3(3, hidden, dim, rng, true), w2(3, dim, hidden, rng, true);
  Backend& c = *backends(true).cpu;
  Backend& g = *backends(true).gpu;
  const Vec x = randn(static_cast<size_t>(A * dim), rng);
  Vec y(A * dim), h1(A * hidden), h3(A * hidden);
  c.grouped_swiglu_ffn(plan, x.data(), w1.on_cpu(), w3.on_cpu(), w2.on_cpu(), y.data(), h1.data(),
                       h3.data(), dim, hidden);
  auto gx = up(x, g);
  Buffer<float> gy(g, y.size()), gh1(g, h1.size()), gh3(g, h3.size());
  g.grouped_swiglu_ffn(plan, gx.data(), w1.on_gpu(), w3.on_gpu(), w2.on_gpu(), gy.data(),
                       gh1.data(), gh3.data(), dim, hidden);
  const double eh1 = rel(down(gh1.data(), h1.size(), g), h1);
  const double ey = rel(down(gy.data(), y.size(), g), y);
  report("UE8M0 Fprop h1", eh1);
  report("UE8M0 FFN output", ey);
  EXPECT_LT(eh1, kSameOperands);
  EXPECT_LT(ey, kDownstream);
}

// A dense FFN with FP8 weights (a shared expert): one segment, outputs and dx accumulated.
TEST(CudaFp8Backend, SharedExpertFfnAccumulatesLikeTheCpu) {
  std::mt19937 rng(4);
  const int64_t rows = 200, dim = 64, hidden = 48;
  Fp8W w1(1, hidden, dim, rng), w3(1, hidden, dim, rng), w2(1, dim, hidden, rng);
  const Vec x = randn(static_cast<size_t>(rows * dim), rng), y0 = randn(rows * dim, rng);
  Vec y = y0, h1(rows * hidden), h3(rows * hidden);
  cpu().swiglu_ffn(x.data(), w1.on_cpu(), w3.on_cpu(), w2.on_cpu(), y.data(), h1.data(), h3.data(),
                   rows, dim, hidden, true);
  auto gx = up(x), gy = up(y0);
  Buffer<float> gh1(gpu(), h1.size()), gh3(gpu(), h3.size());
  gpu().swiglu_ffn(gx.data(), w1.on_gpu(), w3.on_gpu(), w2.on_gpu(), gy.data(), gh1.data(),
                   gh3.data(), rows, dim, hidden, true);
  const double ey = rel(down(gy.data(), y.size()), y);
  report("shared FFN output (+=)", ey);
  EXPECT_LT(ey, kDownstream);

  const Vec dy = randn(static_cast<size_t>(rows * dim), rng), dx0 = randn(rows * dim, rng);
  Vec dx = dx0, dw1(hidden * dim, 0.0f), dw3(hidden * dim, 0.0f), dw2(dim * hidden, 0.0f);
  cpu().swiglu_ffn_backward(x.data(), w1.on_cpu(), w3.on_cpu(), w2.on_cpu(), h1.data(), h3.data(),
                            dy.data(), dx.data(), true, GradOut{dw1.data()}, GradOut{dw3.data()},
                            GradOut{dw2.data()}, rows, dim, hidden);
  auto gdy = up(dy), gdx = up(dx0), gph1 = up(h1), gph3 = up(h3), gdw1 = up(Vec(dw1.size())),
       gdw3 = up(Vec(dw3.size())), gdw2 = up(Vec(dw2.size()));
  gpu().swiglu_ffn_backward(gx.data(), w1.on_gpu(), w3.on_gpu(), w2.on_gpu(), gph1.data(),
                            gph3.data(), gdy.data(), gdx.data(), true, GradOut{gdw1.data()},
                            GradOut{gdw3.data()}, GradOut{gdw2.data()}, rows, dim, hidden);
  const double edx = rel(down(gdx.data(), dx.size()), dx);
  report("shared FFN dx (+=)", edx);
  EXPECT_LT(edx, kDownstream);
  for (auto [name, g, c] : {std::tuple{"dw1", &gdw1, &dw1}, std::tuple{"dw3", &gdw3, &dw3},
                            std::tuple{"dw2", &gdw2, &dw2}}) {
    const double e = rel(down(g->data(), c->size()), *c);
    report(name, e);
    EXPECT_LT(e, kDownstream) << name;
  }
}

// In an fp8 session the FFNs of dense layers have neither copy: fp32, as on the CPU.
TEST(CudaFp8Backend, DenseFfnWithoutCopiesRunsInFp32) {
  std::mt19937 rng(5);
  const int64_t rows = 70, dim = 40, hidden = 24;
  const Vec w1 = randn(hidden * dim, rng, 0.2f), w3 = randn(hidden * dim, rng, 0.2f),
            w2 = randn(dim * hidden, rng, 0.2f), x = randn(rows * dim, rng);
  auto g1 = up(w1), g3 = up(w3), g2 = up(w2), gx = up(x);
  Vec y(rows * dim), h1(rows * hidden), h3(rows * hidden);
  cpu().swiglu_ffn(x.data(), {w1.data()}, {w3.data()}, {w2.data()}, y.data(), h1.data(), h3.data(),
                   rows, dim, hidden, false);
  Buffer<float> gy(gpu(), y.size()), gh1(gpu(), h1.size()), gh3(gpu(), h3.size());
  gpu().swiglu_ffn(gx.data(), {g1.data()}, {g3.data()}, {g2.data()}, gy.data(), gh1.data(),
                   gh3.data(), rows, dim, hidden, false);
  EXPECT_LT(rel(down(gy.data(), y.size()), y), kF32);
  const Vec dy = randn(rows * dim, rng);
  Vec dx(rows * dim), dw1(hidden * dim, 0.0f), dw3(hidden * dim, 0.0f), dw2(dim * hidden, 0.0f);
  cpu().swiglu_ffn_backward(x.data(), {w1.data()}, {w3.data()}, {w2.data()}, h1.data(), h3.data(),
                            dy.data(), dx.data(), false, GradOut{dw1.data()}, GradOut{dw3.data()},
                            GradOut{dw2.data()}, rows, dim, hidden);
  auto gdy = up(dy), gdw1 = up(Vec(dw1.size())), gdw3 = up(Vec(dw3.size())),
       gdw2 = up(Vec(dw2.size()));
  Buffer<float> gdx(gpu(), dx.size());
  gpu().swiglu_ffn_backward(gx.data(), {g1.data()}, {g3.data()}, {g2.data()}, gh1.data(),
                            gh3.data(), gdy.data(), gdx.data(), false, GradOut{gdw1.data()},
                            GradOut{gdw3.data()}, GradOut{gdw2.data()}, rows, dim, hidden);
  EXPECT_LT(rel(down(gdx.data(), dx.size()), dx), kF32);
  EXPECT_LT(rel(down(gdw1.data(), dw1.size()), dw1), kF32);
  EXPECT_LT(rel(down(gdw3.data(), dw3.size()), dw3), kF32);
  EXPECT_LT(rel(down(gdw2.data(), dw2.size()), dw2), kF32);
}

TEST(CudaFp8Backend, NonFiniteActivationIsANumericErrorNamingWhere) {
  std::mt19937 rng(6);
  const int64_t dim = 64, hidden = 32;
  const DispatchPlan plan = plan_of({20, 0, 50});
  Fp8W w1(3, hidden, dim, rng), w3(3, hidden, dim, rng), w2(3, dim, hidden, rng);
  Vec x = randn(static_cast<size_t>(70 * dim), rng);
  x[static_cast<size_t>(33 * dim + 17)] = INFINITY;
  auto gx = up(x);
  Buffer<float> gy(gpu(), x.size());
  try {
    gpu().grouped_swiglu_ffn(plan, gx.data(), w1.on_gpu(), w3.on_gpu(), w2.on_gpu(), gy.data(),
                             nullptr, nullptr, dim, hidden);
    ADD_FAILURE() << "an infinite FFN input was quantized";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Numeric) << e.what();
    const std::string what = e.what();
    EXPECT_NE(what.find("the FFN input"), std::string::npos) << what;
    EXPECT_NE(what.find("row 33 of the FFN's rows, column 17"), std::string::npos) << what;
  }
}

// ---- Sessions

// Widths that are not multiples of 128 and cross a block, as the CPU's FP8 session tests.
constexpr test::MoeWidths kWidths{160, 136, 72};
constexpr int64_t kVocab = test::kSessionVocab;

SessionOptions fp8_session(Device device) {
  SessionOptions o = test::options(Precision::Fp8, Mode::Training);
  o.device = device;
  o.cuda_plugin = device == Device::Cuda ? plugin_path() : std::string();
  return o;
}

Vec logits(Session& s, const test::Batch& b, int64_t rows) {
  Vec y(static_cast<size_t>(rows * kVocab));
  s.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y.data(), y.size());
  return y;
}

// One layer of FP8 experts between fp32 layers on both sides: the logits inherit the FFN's
// ~4e-3 (kDownstream's estimate) diluted by the residual path and mixed by the fp32 head; the
// gradients of the experts carry the FFN backward's, the others receive it through dx. Bounds
// 3e-2 and 5e-2 leave room for a routing near-tie resolved differently (the router's input
// differs by fp32 rounding only: rare, and one token's share of an expert's gradient).
TEST(CudaFp8Session, ForwardAndGradientsFollowTheCpuFp8Session) {
  std::mt19937 rng(7);
  auto model = test::moe_model(rng, kWidths);
  const int64_t rows = 300;
  const test::Batch b = test::batch(rng, rows);
  Session c(model, fp8_session(Device::Cpu)), g(model, fp8_session(Device::Cuda));
  EXPECT_EQ(g.precision(), Precision::Fp8);
  const double ey = rel(logits(g, b, rows), logits(c, b, rows));
  report("logits", ey);
  EXPECT_LT(ey, 3e-2);
  const double lc = c.backward_loss(b.targets.data(), b.targets.size());
  const double lg = g.backward_loss(b.targets.data(), b.targets.size());
  std::printf("  loss cpu %.6f gpu %.6f\n", lc, lg);
  EXPECT_NEAR(lg, lc, 5e-3 * lc);
  for (size_t p = 0; p < c.num_parameters(); ++p) {
    const int64_t n = c.parameter_size(p);
    Vec gc(n), gg(n);
    c.read_gradient(p, gc.data(), n);
    g.read_gradient(p, gg.data(), n);
    const double e = rel(gg, gc);
    report(c.parameter_name(p).c_str(), e);
    EXPECT_LT(e, 5e-2) << c.parameter_name(p);
  }
}

// Steps: the losses follow the CPU's; the stepped session's FP8 copies are the ones a fresh
// session makes from its masters (refreshed after every step: the same outputs, bit for bit).
TEST(CudaFp8Session, TrainingStepsFollowTheCpuAndRefreshTheCopies) {
  std::mt19937 rng(8);
  auto model = test::moe_model(rng, kWidths);
  const int64_t rows = 96;
  Session c(model, fp8_session(Device::Cpu)), g(model, fp8_session(Device::Cuda));
  for (int step = 0; step < 4; ++step) {
    const test::Batch b = test::batch(rng, rows);
    double lc = 0, lg = 0;
    for (auto [s, l] : {std::pair{&c, &lc}, std::pair{&g, &lg}}) {
      s->zero_grad();
      logits(*s, b, rows);
      *l = s->backward_loss(b.targets.data(), b.targets.size());
      s->step();
    }
    std::printf("  step %d loss cpu %.6f gpu %.6f\n", step, lc, lg);
    EXPECT_NEAR(lg, lc, 1e-2 * lc) << "step " << step;
  }
  const test::Batch b = test::batch(rng, rows);
  g.set_eval(true);
  const Vec stepped = logits(g, b, rows);
  Session fresh(model, fp8_session(Device::Cuda));
  fresh.set_eval(true);
  EXPECT_NE(logits(fresh, b, rows), stepped) << "training changed nothing";
  for (size_t p = 0; p < g.num_parameters(); ++p) {
    Vec v(g.parameter_size(p));
    g.read_parameter(p, v.data(), v.size());
    fresh.write_parameter(p, v.data(), v.size());
  }
  // The loss-free bias moved too: carry it over.
  Vec bias(8);
  g.read_bias(2, bias.data(), bias.size());
  fresh.write_bias(2, bias.data(), bias.size());
  const Vec remade = logits(fresh, b, rows);
  EXPECT_EQ(0, std::memcmp(stepped.data(), remade.data(), stepped.size() * sizeof(float)))
      << "the stepped session's FP8 copies are not its masters'";
}

// A NaN written into an expert weight is refused and changes nothing; a finite write refreshes
// the device copy.
TEST(CudaFp8Session, NonFiniteWeightWriteIsRefusedAndLeavesTheCopiesIntact) {
  std::mt19937 rng(9);
  auto model = test::moe_model(rng, kWidths);
  const int64_t rows = 40;
  const test::Batch b = test::batch(rng, rows);
  Session g(model, fp8_session(Device::Cuda));
  g.set_eval(true);
  const Vec before = logits(g, b, rows);
  const size_t w2 = g.parameter_index("moe.w2");
  Vec v(g.parameter_size(w2));
  g.read_parameter(w2, v.data(), v.size());
  v[777] = std::nanf("");
  try {
    g.write_parameter(w2, v.data(), v.size());
    ADD_FAILURE() << "a NaN expert weight was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Numeric) << e.what();
  }
  const Vec after = logits(g, b, rows);
  EXPECT_EQ(0, std::memcmp(before.data(), after.data(), after.size() * sizeof(float)));
  v[777] = 3.0f;
  g.write_parameter(w2, v.data(), v.size());
  EXPECT_NE(logits(g, b, rows), before);
}

}  // namespace
}  // namespace moert

std::string moert_gpu_test::gpu_unavailable_reason() {
  try {
    moert::backends();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

int main(int argc, char** argv) { return moert_gpu_test::run(argc, argv); }
