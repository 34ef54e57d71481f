// The CPU backend's FP8 experts (kernels/cpu/cpu_ffn_fp8.cc): the FFN's forward, dx and weight
// gradients against a float64 reference computed from the same quantized operands (the codes and
// scales of kernels/cpu/fp8.h's quantizers, dequantized exactly, products summed in double), and
// against the fp32 backend; thread-count independence; power-of-two scales; errors.
//
// The backward's dh1 and dh3 are quantized from dA = dy W2, which the backend computes in fp32 and
// does not return. The reference recomputes dA with the same kernel call as the backend's (one
// call per row item, so the same bits), checks it against float64, and quantizes dh1 and dh3 from
// it: a float64 dA would move some values across an E4M3 rounding boundary, and a code flipped
// there changes a product by up to 1/16 of itself, far beyond the bound checked here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/grad_reduction.h"
#include "core/tensor_codec.h"
#include "kernels/cpu/fp8.h"
#include "kernels/cpu/math.h"
#include "tests/unit/random_tensor.h"

namespace moert {
namespace {

namespace f8 = cpu::fp8;
using fp8::block_scale_ld;
using fp8::blocks_of;
using fp8::kBlock;
using fp8::tile_scale_ld;
using Vec = std::vector<float>;
using Dbl = std::vector<double>;

// The bound on ||out - reference|| / ||reference|| for every output, with the reference built from
// the same quantized operands. The emulation sums each 128-long block of code products in fp32:
// measured errors are below 1e-7 (printed by the tests).
constexpr double kSameOperandsBound = 1e-6;

Vec randv(int64_t n, std::mt19937& rng, float scale) {
  return test::random_tensor({n}, rng, scale).values;
}

bool same_bits(const Vec& a, const Vec& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

template <typename R>
double rel_err(const Vec& c, const R& ref) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < c.size(); ++i) {
    const double d = static_cast<double>(c[i]) - static_cast<double>(ref[i]);
    num += d * d;
    den += static_cast<double>(ref[i]) * static_cast<double>(ref[i]);
  }
  return den == 0.0 ? std::sqrt(num) : std::sqrt(num / den);
}

f8::QuantizeOptions opts(bool pow2) {
  f8::QuantizeOptions o;
  o.power_of_two_scales = pow2;
  return o;
}

// x [rows, cols] in 1x128 row tiles (Fprop's and Dgrad's activations), dequantized exactly.
Dbl row_tiles(const float* x, int64_t rows, int64_t cols, bool pow2) {
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  const int64_t sld = tile_scale_ld(rows);
  Vec scales(static_cast<size_t>(blocks_of(cols) * sld));
  f8::quantize_row_tiles(x, cols, rows, cols, codes.data(), cols, scales.data(), sld, opts(pow2));
  Dbl v(codes.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      v[r * cols + c] =
          static_cast<double>(e4m3_to_float(codes[r * cols + c])) * scales[(c / kBlock) * sld + r];
  return v;
}

// x [rows, cols] in 128x1 column tiles from row 0 (Wgrad's operands), dequantized exactly.
Dbl column_tiles(const float* x, int64_t rows, int64_t cols, bool pow2) {
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  Vec scales(static_cast<size_t>(blocks_of(rows) * cols));
  f8::quantize_column_tiles(x, cols, rows, cols, codes.data(), cols, scales.data(), cols,
                            opts(pow2));
  Dbl v(codes.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      v[r * cols + c] =
          static_cast<double>(e4m3_to_float(codes[r * cols + c])) * scales[(r / kBlock) * cols + c];
  return v;
}

// A stack of fp32 matrices [E, rows, cols] and the FP8 copy a backend made of it.
struct Fp8Stack {
  int64_t experts, rows, cols;
  Vec f32;
  std::vector<uint8_t> codes;
  Vec scales;
  Fp8Stack(Backend& be, Vec values, int64_t e, int64_t r, int64_t c, const char* what)
      : experts(e), rows(r), cols(c), f32(std::move(values)) {
    codes.resize(f32.size());
    scales.resize(static_cast<size_t>(fp8_blocks_scale_floats(e, r, c)));
    be.quantize_weight_blocks(f32.data(), e, r, c, codes.data(), scales.data(), what);
  }
  Fp8Weight fp8() const {
    return {codes.data(), scales.data(), rows * cols, blocks_of(rows) * block_scale_ld(cols)};
  }
  // FP8 alone (an FP8 file's weight for inference), or beside the fp32 values.
  Weight weight(bool with_f32) const { return {with_f32 ? f32.data() : nullptr, nullptr, fp8()}; }
  // Matrix e, dequantized exactly.
  Dbl value(int64_t e) const {
    const Fp8Weight w = fp8();
    const int64_t ld = block_scale_ld(cols);
    Dbl v(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        v[r * cols + c] =
            static_cast<double>(e4m3_to_float(w.codes[e * rows * cols + r * cols + c])) *
            w.scales[e * w.matrix_scales + (r / kBlock) * ld + c / kBlock];
    return v;
  }
  f8::Blocks blocks(int64_t e) const {
    const Fp8Weight w = fp8();
    return {w.codes + e * w.matrix_elements, cols, w.scales + e * w.matrix_scales,
            block_scale_ld(cols)};
  }
};

// c[m, n] = a[m, k] b[n, k]^T in double.
Dbl ref_nt(const Dbl& a, const Dbl& b, int64_t m, int64_t n, int64_t k) {
  Dbl c(static_cast<size_t>(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t l = 0; l < k; ++l) s += a[i * k + l] * b[j * k + l];
      c[i * n + j] = s;
    }
  return c;
}

// c[m, n] += a[m, k] b[k, n] in double.
void ref_nn_acc(const Dbl& a, const Dbl& b, Dbl& c, int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t l = 0; l < k; ++l)
      for (int64_t j = 0; j < n; ++j) c[i * n + j] += a[i * k + l] * b[l * n + j];
}

// c[n, k] += a[t, n]^T b[t, k] in double, into c at offset.
void ref_tn_acc(const Dbl& a, const Dbl& b, double* c, int64_t t, int64_t n, int64_t k) {
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) c[i * k + j] += a[r * n + i] * b[r * k + j];
}

// One FFN layer's problem: experts' row counts (dense: one FFN over all rows), weights, inputs.
struct FfnProblem {
  bool dense;
  int64_t dim, hidden;
  std::vector<int64_t> counts;
  bool pow2;
};

std::string name_of(const FfnProblem& p) {
  std::string s = (p.dense ? "dense_d" : "experts_d") + std::to_string(p.dim) + "_h" +
                  std::to_string(p.hidden) + (p.pow2 ? "_pow2" : "");
  return s;
}

// A layer's outputs: forward (y, h1, h3) and backward (dx, dW1, dW3, dW2 [E, ...]).
struct FfnRun {
  Vec y, h1, h3, dx, dw1, dw3, dw2;
};

struct FfnLayer {
  const FfnProblem& p;
  int64_t E, A, D, H;
  DispatchPlan plan;
  Vec x, dy;
  std::unique_ptr<Fp8Stack> w1, w3, w2;

  FfnLayer(const FfnProblem& prob, Backend& quantizer, uint32_t seed)
      : p(prob), E(static_cast<int64_t>(prob.counts.size())), D(prob.dim), H(prob.hidden) {
    std::mt19937 rng(seed);
    plan.host_offsets.assign(static_cast<size_t>(E + 1), 0);
    for (int64_t e = 0; e < E; ++e) plan.host_offsets[e + 1] = plan.host_offsets[e] + p.counts[e];
    A = plan.num_assignments();
    const float ws = 1.0f / std::sqrt(static_cast<float>(D));
    w1 = std::make_unique<Fp8Stack>(quantizer, randv(E * H * D, rng, ws), E, H, D, "w1");
    w3 = std::make_unique<Fp8Stack>(quantizer, randv(E * H * D, rng, ws), E, H, D, "w3");
    w2 = std::make_unique<Fp8Stack>(quantizer, randv(E * D * H, rng, ws), E, D, H, "w2");
    x = randv(A * D, rng, 1.0f);
    dy = randv(A * D, rng, 1.0f);
  }

  // Forward and backward on `be`; FP8 weights (fp32 values absent) or fp32 weights.
  FfnRun run(Backend& be, bool fp8) const {
    FfnRun r;
    r.y.assign(static_cast<size_t>(A * D), 0.0f);
    r.h1.resize(static_cast<size_t>(A * H));
    r.h3.resize(r.h1.size());
    r.dx.assign(r.y.size(), 0.0f);
    for (Vec* g : {&r.dw1, &r.dw3, &r.dw2}) g->assign(static_cast<size_t>(E * H * D), 0.0f);
    const Weight W1 = fp8 ? w1->weight(false) : Weight{w1->f32.data()};
    const Weight W3 = fp8 ? w3->weight(false) : Weight{w3->f32.data()};
    const Weight W2 = fp8 ? w2->weight(false) : Weight{w2->f32.data()};
    if (p.dense) {
      be.swiglu_ffn(x.data(), W1, W3, W2, r.y.data(), r.h1.data(), r.h3.data(), A, D, H, false);
      be.swiglu_ffn_backward(x.data(), W1, W3, W2, r.h1.data(), r.h3.data(), dy.data(), r.dx.data(),
                             false, GradOut{r.dw1.data()}, GradOut{r.dw3.data()},
                             GradOut{r.dw2.data()}, A, D, H);
      return r;
    }
    be.grouped_swiglu_ffn(plan, x.data(), W1, W3, W2, r.y.data(), r.h1.data(), r.h3.data(), D, H);
    std::vector<GradOut> g1, g3, g2;
    for (int64_t e = 0; e < E; ++e) {
      g1.push_back(GradOut{r.dw1.data() + e * H * D});
      g3.push_back(GradOut{r.dw3.data() + e * H * D});
      g2.push_back(GradOut{r.dw2.data() + e * D * H});
    }
    be.grouped_swiglu_ffn_backward(plan, x.data(), W1, W3, W2, r.h1.data(), r.h3.data(), dy.data(),
                                   r.dx.data(), g1.data(), g3.data(), g2.data(), D, H, D);
    return r;
  }
};

// The float64 reference of `run`'s outputs from the operands the backend quantized, given its
// forward's h1 and h3 (from which a is formed as the backend forms it).
struct Reference {
  Dbl y, h1, h3, dx, dw1, dw3, dw2;
  double da_err = 0.0;  // the recomputed dA against float64
};

Reference reference(const FfnLayer& L, const FfnRun& run) {
  const int64_t D = L.D, H = L.H, A = L.A;
  const bool pow2 = L.p.pow2;
  Reference ref;
  ref.y.assign(static_cast<size_t>(A * D), 0.0);
  ref.h1.assign(static_cast<size_t>(A * H), 0.0);
  ref.h3 = ref.h1;
  ref.dx = ref.y;
  for (Dbl* g : {&ref.dw1, &ref.dw3, &ref.dw2}) g->assign(static_cast<size_t>(L.E * H * D), 0.0);
  // Row tiles are per row: quantizing all rows at once gives every item's codes and scales.
  const Dbl xq = row_tiles(L.x.data(), A, D, pow2);
  const Dbl dyq = row_tiles(L.dy.data(), A, D, pow2);
  // a as the forward forms it (row by row) and quantizes it.
  Vec a(static_cast<size_t>(A * H));
  for (int64_t r = 0; r < A; ++r)
    cpu::swiglu(run.h1.data() + r * H, run.h3.data() + r * H, a.data() + r * H, H);
  const Dbl aq = row_tiles(a.data(), A, H, pow2);
  double da_num = 0.0, da_den = 0.0;
  for (int64_t e = 0; e < L.E; ++e) {
    const int64_t b0 = L.plan.host_offsets[e], n = L.p.counts[e];
    if (n == 0) continue;
    const Dbl W1 = L.w1->value(e), W3 = L.w3->value(e), W2 = L.w2->value(e);
    auto rows = [](const Dbl& v, int64_t r0, int64_t m, int64_t w) {
      return Dbl(v.begin() + r0 * w, v.begin() + (r0 + m) * w);
    };
    const Dbl h1 = ref_nt(rows(xq, b0, n, D), W1, n, H, D);
    const Dbl h3 = ref_nt(rows(xq, b0, n, D), W3, n, H, D);
    const Dbl y = ref_nt(rows(aq, b0, n, H), W2, n, D, H);
    std::copy(h1.begin(), h1.end(), ref.h1.begin() + b0 * H);
    std::copy(h3.begin(), h3.end(), ref.h3.begin() + b0 * H);
    std::copy(y.begin(), y.end(), ref.y.begin() + b0 * D);
    // Backward, row item by row item: 128-token Wgrad tiles (kFp8ShareRows rows) from the
    // expert's first row.
    for (int64_t i0 = 0; i0 < n; i0 += kFp8ShareRows) {
      const int64_t b = b0 + i0, m = std::min(kFp8ShareRows, n - i0), mh = m * H;
      Vec ai(static_cast<size_t>(mh)), da(static_cast<size_t>(mh)), dh1(da.size()), dh3(da.size());
      cpu::swiglu(run.h1.data() + b * H, run.h3.data() + b * H, ai.data(), mh);
      // dA with the backend's kernel call, checked against float64.
      {
        std::vector<uint8_t> codes(static_cast<size_t>(m * D));
        Vec scales(static_cast<size_t>(blocks_of(D) * tile_scale_ld(m)));
        f8::quantize_row_tiles(L.dy.data() + b * D, D, m, D, codes.data(), D, scales.data(),
                               tile_scale_ld(m), opts(pow2));
        Vec scratch(static_cast<size_t>(f8::gemm_dgrad_scratch_floats(m, D, H)));
        f8::gemm_dgrad({codes.data(), D, scales.data(), tile_scale_ld(m)}, L.w2->blocks(e),
                       da.data(), H, m, D, H, false, scratch.data());
        Dbl da_ref(static_cast<size_t>(mh), 0.0);
        ref_nn_acc(rows(dyq, b, m, D), W2, da_ref, m, H, D);
        for (int64_t j = 0; j < mh; ++j) {
          da_num += (da[j] - da_ref[j]) * (da[j] - da_ref[j]);
          da_den += da_ref[j] * da_ref[j];
        }
      }
      cpu::swiglu_backward(run.h1.data() + b * H, run.h3.data() + b * H, da.data(), dh1.data(),
                           dh3.data(), mh);
      Dbl dx(static_cast<size_t>(m * D), 0.0);
      ref_nn_acc(row_tiles(dh1.data(), m, H, pow2), W1, dx, m, D, H);
      ref_nn_acc(row_tiles(dh3.data(), m, H, pow2), W3, dx, m, D, H);
      std::copy(dx.begin(), dx.end(), ref.dx.begin() + b * D);
      // Wgrad: one column tile from the item's first row.
      const Dbl dyc = column_tiles(L.dy.data() + b * D, m, D, pow2);
      const Dbl xc = column_tiles(L.x.data() + b * D, m, D, pow2);
      ref_tn_acc(dyc, column_tiles(ai.data(), m, H, pow2), ref.dw2.data() + e * D * H, m, D, H);
      ref_tn_acc(column_tiles(dh1.data(), m, H, pow2), xc, ref.dw1.data() + e * H * D, m, H, D);
      ref_tn_acc(column_tiles(dh3.data(), m, H, pow2), xc, ref.dw3.data() + e * H * D, m, H, D);
    }
  }
  ref.da_err = da_den == 0.0 ? 0.0 : std::sqrt(da_num / da_den);
  return ref;
}

class CpuFp8Ffn : public ::testing::TestWithParam<FfnProblem> {};

// Every output against the float64 reference of the same quantized operands, and against the
// fp32 backend; the same bits with 1, 2 and 3 threads.
TEST_P(CpuFp8Ffn, MatchesSameOperandReferenceAndFp32) {
  const FfnProblem& p = GetParam();
  Fp8Options o;
  o.power_of_two_scales = p.pow2;
  auto be = make_cpu_backend(2, Precision::Fp8, o);
  ASSERT_TRUE(be->fp8_experts());
  const FfnLayer L(p, *be, 11);
  const FfnRun run = L.run(*be, true);
  const Reference ref = reference(L, run);
  const char* names[] = {"y", "h1", "h3", "dx", "dW1", "dW3", "dW2"};
  const Vec* outs[] = {&run.y, &run.h1, &run.h3, &run.dx, &run.dw1, &run.dw3, &run.dw2};
  const Dbl* refs[] = {&ref.y, &ref.h1, &ref.h3, &ref.dx, &ref.dw1, &ref.dw3, &ref.dw2};
  EXPECT_LE(ref.da_err, kSameOperandsBound) << "dA";
  std::printf("[fp8 ffn %s] vs float64 of the same operands: dA %.2e", name_of(p).c_str(),
              ref.da_err);
  for (int k = 0; k < 7; ++k) {
    const double err = rel_err(*outs[k], *refs[k]);
    EXPECT_LE(err, kSameOperandsBound) << names[k];
    std::printf(", %s %.2e", names[k], err);
    RecordProperty(std::string("same_operands_") + names[k], std::to_string(err));
  }
  std::printf("\n");

  // Against the fp32 backend: the error FP8 adds to the layer.
  auto be32 = make_cpu_backend(2);
  const FfnRun run32 = L.run(*be32, false);
  const Vec* outs32[] = {&run32.y,   &run32.h1,  &run32.h3, &run32.dx,
                         &run32.dw1, &run32.dw3, &run32.dw2};
  std::printf("[fp8 ffn %s] vs fp32:", name_of(p).c_str());
  for (int k = 0; k < 7; ++k) {
    const double err = rel_err(*outs[k], *outs32[k]);
    // E4M3 keeps 3 mantissa bits: each operand is off by up to 2^-4 of itself, about 2-3 %
    // in a product's norm; 0.1 would mean a wrong operand, not rounding.
    EXPECT_LT(err, 0.1) << names[k];
    std::printf(" %s %.2e", names[k], err);
    RecordProperty(std::string("vs_fp32_") + names[k], std::to_string(err));
  }
  std::printf("\n");

  for (unsigned threads : {1u, 3u}) {
    auto bt = make_cpu_backend(threads, Precision::Fp8, o);
    const FfnRun rt = L.run(*bt, true);
    const Vec* t[] = {&rt.y, &rt.h1, &rt.h3, &rt.dx, &rt.dw1, &rt.dw3, &rt.dw2};
    for (int k = 0; k < 7; ++k)
      EXPECT_TRUE(same_bits(*t[k], *outs[k])) << names[k] << ", " << threads << " threads";
    // The weights' FP8 copies do not depend on the thread count either.
    const Fp8Stack again(*bt, L.w2->f32, L.E, L.D, L.H, "w2");
    EXPECT_EQ(again.codes, L.w2->codes);
    EXPECT_TRUE(same_bits(again.scales, L.w2->scales));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CpuFp8Ffn,
    ::testing::Values(
        // Partial tiles and blocks in both dimensions; an empty expert; items of a few rows
        // (the column-split forward) beside full and partial 64-row items.
        FfnProblem{false, 200, 72, {150, 0, 64, 9}, false},
        FfnProblem{false, 256, 384, {70, 0, 130}, true},
        FfnProblem{false, 256, 384, {3, 16, 1}, false},
        // A decode step: 5 rows, the up GEMMs in two column units (256 + 8), the down GEMM
        // in two (512 + 128).
        FfnProblem{true, 640, 264, {5}, false}, FfnProblem{true, 136, 200, {203}, true}),
    [](const ::testing::TestParamInfo<FfnProblem>& i) { return name_of(i.param); });

// The copies of the weights: codes and scales as fp8.h's block quantizer gives them, padding
// zeroed; power-of-two scales on request.
TEST(CpuFp8Weights, BlocksPerMatrixAndPowerOfTwoScales) {
  std::mt19937 rng(5);
  const int64_t E = 3, R = 200, C = 300;
  const Vec w = randv(E * R * C, rng, 0.05f);
  for (bool pow2 : {false, true}) {
    Fp8Options o;
    o.power_of_two_scales = pow2;
    auto be = make_cpu_backend(3, Precision::Fp8, o);
    const Fp8Stack s(*be, w, E, R, C, "w");
    const int64_t ld = block_scale_ld(C), ms = blocks_of(R) * ld;
    for (int64_t e = 0; e < E; ++e) {
      std::vector<uint8_t> codes(static_cast<size_t>(R * C));
      Vec scales(static_cast<size_t>(ms), 0.0f);
      f8::quantize_blocks(w.data() + e * R * C, C, R, C, codes.data(), C, scales.data(), ld,
                          opts(pow2));
      EXPECT_EQ(0, std::memcmp(codes.data(), s.codes.data() + e * R * C, codes.size()));
      EXPECT_TRUE(
          same_bits(scales, Vec(s.scales.begin() + e * ms, s.scales.begin() + (e + 1) * ms)));
    }
    int non_pow2 = 0;
    for (float v : s.scales) {
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      if (v != 0.0f && (bits & 0x7FFFFFu) != 0) ++non_pow2;
    }
    if (pow2)
      EXPECT_EQ(non_pow2, 0);
    else
      EXPECT_GT(non_pow2, 0);
  }
  auto be32 = make_cpu_backend(1);
  EXPECT_FALSE(be32->fp8_experts());
}

Code code_of(const std::function<void()>& fn, std::string* message = nullptr) {
  try {
    fn();
  } catch (const Error& e) {
    if (message) *message = e.what();
    return e.code();
  }
  return Code{};
}

// NaN and infinity have no E4M3 code: an error naming the tensor and the position.
TEST(CpuFp8Errors, NonFiniteIsNumericError) {
  const FfnProblem p{false, 200, 72, {70, 0, 30}, false};
  auto be = make_cpu_backend(2, Precision::Fp8);
  FfnLayer L(p, *be, 12);
  std::string msg;
  Vec w = L.w1->f32;
  w[2 * 72 * 200 + 5 * 200 + 17] = NAN;
  std::vector<uint8_t> codes(w.size());
  Vec scales(static_cast<size_t>(fp8_blocks_scale_floats(3, 72, 200)));
  EXPECT_EQ(Code::Numeric, code_of(
                               [&] {
                                 be->quantize_weight_blocks(w.data(), 3, 72, 200, codes.data(),
                                                            scales.data(), "layer 1 w1");
                               },
                               &msg));
  EXPECT_NE(msg.find("layer 1 w1 (matrix 2)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("row 5, column 17"), std::string::npos) << msg;

  L.x[83 * 200 + 150] = NAN;  // expert 2's 14th row
  EXPECT_EQ(Code::Numeric, code_of([&] { L.run(*be, true); }, &msg));
  EXPECT_NE(msg.find("FFN input"), std::string::npos) << msg;
  EXPECT_NE(msg.find("row 83 of the FFN's rows, column 150"), std::string::npos) << msg;

  // In the backward only: dy.
  L.x[83 * 200 + 150] = 0.5f;
  Vec y(static_cast<size_t>(L.A * 200)), h1(static_cast<size_t>(L.A * 72)), h3(h1.size());
  be->grouped_swiglu_ffn(L.plan, L.x.data(), L.w1->weight(true), L.w3->weight(true),
                         L.w2->weight(true), y.data(), h1.data(), h3.data(), 200, 72);
  L.dy[7 * 200 + 3] = INFINITY;
  Vec dx(y.size()), g(static_cast<size_t>(3 * 72 * 200));
  std::vector<GradOut> go;
  for (int e = 0; e < 3; ++e) go.push_back(GradOut{g.data() + e * 72 * 200});
  EXPECT_EQ(Code::Numeric, code_of(
                               [&] {
                                 be->grouped_swiglu_ffn_backward(
                                     L.plan, L.x.data(), L.w1->weight(true), L.w3->weight(true),
                                     L.w2->weight(true), h1.data(), h3.data(), L.dy.data(),
                                     dx.data(), go.data(), go.data(), go.data(), 200, 72, 200);
                               },
                               &msg));
  EXPECT_NE(msg.find("row 7 of the FFN's rows, column 3"), std::string::npos) << msg;
}

// A weight from an FP8 file (no fp32 values) runs forward as the same weight with them does, and
// the fp32 values beside an FP8 copy are not read.
TEST(CpuFp8Weights, Fp8AloneRunsForward) {
  const FfnProblem p{true, 136, 200, {40}, false};
  auto be = make_cpu_backend(2, Precision::Fp8);
  const FfnLayer L(p, *be, 13);
  const int64_t A = L.A, D = L.D, H = L.H;
  Vec y(static_cast<size_t>(A * D)), y2 = y;
  be->swiglu_ffn(L.x.data(), L.w1->weight(false), L.w3->weight(false), L.w2->weight(false),
                 y.data(), nullptr, nullptr, A, D, H, false);
  be->swiglu_ffn(L.x.data(), L.w1->weight(true), L.w3->weight(true), L.w2->weight(true), y2.data(),
                 nullptr, nullptr, A, D, H, false);
  EXPECT_TRUE(same_bits(y, y2));
  // Inference keeps no h1, h3; the same bits as training's forward.
  Vec y3(y.size()), h1(static_cast<size_t>(A * H)), h3(h1.size());
  be->swiglu_ffn(L.x.data(), L.w1->weight(false), L.w3->weight(false), L.w2->weight(false),
                 y3.data(), h1.data(), h3.data(), A, D, H, false);
  EXPECT_TRUE(same_bits(y, y3));
  // Accumulating (the shared experts' call) adds the product to y last, as fp8.h's GEMMs do.
  for (int64_t rows : {A, int64_t{3}}) {
    std::mt19937 rng(14);
    const Vec y0 = randv(rows * D, rng, 1.0f);
    Vec plain(static_cast<size_t>(rows * D)), acc = y0;
    be->swiglu_ffn(L.x.data(), L.w1->weight(false), L.w3->weight(false), L.w2->weight(false),
                   plain.data(), nullptr, nullptr, rows, D, H, false);
    be->swiglu_ffn(L.x.data(), L.w1->weight(false), L.w3->weight(false), L.w2->weight(false),
                   acc.data(), nullptr, nullptr, rows, D, H, true);
    for (size_t i = 0; i < plain.size(); ++i) plain[i] = plain[i] + y0[i];
    EXPECT_TRUE(same_bits(acc, plain)) << rows << " rows";
  }
  double norm = 0.0;
  for (float v : y) norm += static_cast<double>(v) * v;
  EXPECT_GT(norm, 0.0);
}

}  // namespace
}  // namespace moert
