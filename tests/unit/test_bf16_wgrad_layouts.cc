// The bf16 Wgrad's operands, against the rules that make its results independent of the thread
// count and of how processes share the rows (core/grad_reduction.h): the transposing conversion
// against the scalar rule on random shapes and strides; the two layouts of the right operand
// (transposed, or as rows where oneDNN's bf16 kernels run) giving the same bits on the reducer's
// tiles; the GEMM's accumulate rounding exactly as c + the partial; and a call split between
// processes by experts, whose tiling and layouts differ from the whole call's, folding to the
// whole call's bits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/grad_reduction.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/math.h"

namespace moert {
namespace {

using Vec = std::vector<float>;

bool same_bits(const Vec& a, const Vec& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

uint32_t interesting_bits(std::mt19937& rng) {
  static const uint32_t special[] = {
      0x00000000u, 0x80000000u, 0x3F808000u, 0x3F818000u, 0x3F807FFFu, 0x7F7FFFFFu,
      0xFF7F8000u, 0x00000001u, 0x80008000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
      0xFF800001u, 0x7F800001u, 0x7FBFFFFFu, 0x007F8000u, 0x00018000u, 0x807FFFFFu,
      0x7F7F8000u, 0x7F7F7FFFu, 0xFFFFFFFFu, 0x7FFF0000u, 0x00008000u, 0x3F80C000u};
  switch (rng() % 4) {
    case 0:
      return special[rng() % (sizeof(special) / sizeof(special[0]))];
    case 1:  // ties and near-ties at random exponents
      return (rng() & 0xFFFF0000u) | (0x7FFFu + rng() % 3);
    default:
      return static_cast<uint32_t>(rng());
  }
}

// Random shapes (block tails on both sides, 16-row and 16-column blocks), row strides wider than
// the rows, output strides wider than the output rows: every element is the scalar rule's, and
// every element of out that is not an output element (padding, and past the last row) keeps its
// sentinel. Buffers are sized exactly, so ASan sees any write past them.
TEST(Bf16Convert, RandomShapesAndStridesMatchTheScalarRule) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 3000; ++trial) {
    const int64_t rows = 1 + static_cast<int64_t>(rng() % 70);
    const int64_t cols = 1 + static_cast<int64_t>(rng() % 70);
    const int64_t ldx = cols + static_cast<int64_t>(rng() % 5);
    const bool transposed = rng() % 4 != 0, widened = rng() % 2;
    const int64_t inner = transposed ? rows : cols, outer = transposed ? cols : rows;
    const int64_t ldo = inner + static_cast<int64_t>(rng() % 4 == 0 ? 0 : rng() % 19);
    Vec x(static_cast<size_t>((rows - 1) * ldx + cols));
    for (float& v : x) {
      const uint32_t u = interesting_bits(rng);
      std::memcpy(&v, &u, 4);
    }
    const int64_t n_out = (outer - 1) * ldo + inner;
    std::vector<uint32_t> wide(widened ? static_cast<size_t>(n_out) : 0, 0xDEADBEEFu);
    std::vector<uint16_t> codes(widened ? 0 : static_cast<size_t>(n_out), 0xBEEFu);
    cpu::round_to_bf16(x.data(), ldx, rows, cols,
                       widened ? static_cast<void*>(wide.data()) : codes.data(), ldo, transposed,
                       widened);
    std::vector<char> is_out(static_cast<size_t>(n_out), 0);
    const std::string what = "rows " + std::to_string(rows) + " cols " + std::to_string(cols) +
                             " ldx " + std::to_string(ldx) + " ldo " + std::to_string(ldo) +
                             (transposed ? " transposed" : "") + (widened ? " widened" : "");
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const uint16_t want = cpu::to_bf16(x[static_cast<size_t>(r * ldx + c)]);
        const size_t at = static_cast<size_t>(transposed ? c * ldo + r : r * ldo + c);
        is_out[at] = 1;
        if (widened)
          ASSERT_EQ(wide[at], static_cast<uint32_t>(want) << 16) << what << " at " << r << "," << c;
        else
          ASSERT_EQ(codes[at], want) << what << " at " << r << "," << c;
      }
    for (size_t i = 0; i < is_out.size(); ++i)
      if (!is_out[i]) {
        if (widened)
          ASSERT_EQ(wide[i], 0xDEADBEEFu) << what << ": padding " << i;
        else
          ASSERT_EQ(codes[i], 0xBEEFu) << what << ": padding " << i;
      }
  }
}

std::vector<cpu::Bf16Kernels> kernels_here() {
  std::vector<cpu::Bf16Kernels> k{cpu::Bf16Kernels::Widen};
  if (cpu::Bf16Gemm::default_kernels() == cpu::Bf16Kernels::Dnnl)
    k.push_back(cpu::Bf16Kernels::Dnnl);
  return k;
}

// A chunk's Wgrad tile c[no, ni] = L[o0.., :k] R[:k, i0..]: from R transposed (act_act_nt on the
// [in, k] copy, ldb = k) or from R as rows (act_act_nn, ldb = in) gives the same bits: the layout
// a process takes follows its own tile_cols (a function of its nonempty segments), so two
// processes holding chunks of one gradient may take different ones. Only oneDNN's bf16 kernels
// take the rows layout: the widening kernels' fp32 sgemm sums nn and nt products in different
// orders (under DNNL_MAX_CPU_ISA=AVX2, 128 x 256 tiles differ), so they always read the
// transposed copy. Shapes: the tiles row_reduction.cc's tiles_of makes (no = min(out, max(64,
// 32768 / min(in, 512))), ni = in or a column slice), k from 1 to 64.
TEST(Bf16WgradLayouts, RowsAndTransposedRightOperandsGiveTheSameBits) {
  if (cpu::Bf16Gemm::default_kernels() != cpu::Bf16Kernels::Dnnl)
    GTEST_SKIP() << "no native bf16: the Wgrad always reads transposed operands";
  std::mt19937 rng(21);
  for (cpu::Bf16Kernels kind : {cpu::Bf16Kernels::Dnnl}) {
    cpu::Bf16Gemm gemm(1, kind);
    const size_t es = gemm.act_bytes();
    int failures = 0;
    for (int trial = 0; trial < 200 && failures < 5; ++trial) {
      const int64_t out = 2 + static_cast<int64_t>(rng() % 600);
      const int64_t in = 2 + static_cast<int64_t>(rng() % 600);
      const int64_t k = 1 + static_cast<int64_t>(rng() % 64);
      const int64_t no = std::min(out, std::max<int64_t>(64, 32768 / std::min<int64_t>(in, 512)));
      // One column slice of the tiling with cols in {64, 128, 256, 512}, and the whole row.
      const int64_t cols = int64_t{64} << (rng() % 4);
      const int64_t ni_slice = std::min(in, cols);
      const int64_t i0 =
          (static_cast<int64_t>(rng() % ((in + ni_slice - 1) / ni_slice))) * ni_slice;
      const int64_t ni = std::min(ni_slice, in - i0);
      if (ni < 2) continue;
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      Vec l(static_cast<size_t>(k * out)), r(static_cast<size_t>(k * in));
      for (float& v : l) v = u(rng);
      for (float& v : r) v = u(rng);
      // Left: [out, k] (transposed), right transposed [in, k] and as rows [k, in].
      std::vector<unsigned char> lt(static_cast<size_t>(out * k) * es),
          rt(static_cast<size_t>(in * k) * es), rr(static_cast<size_t>(in * k) * es);
      gemm.prepare(l.data(), out, k, out, lt.data(), k, true);
      gemm.prepare(r.data(), in, k, in, rt.data(), k, true);
      gemm.prepare(r.data(), in, k, in, rr.data(), in, false);
      const int64_t o0 = 0;
      const unsigned char* pa = lt.data() + static_cast<size_t>(o0 * k) * es;
      for (bool acc : {false, true}) {
        Vec c0(static_cast<size_t>(no * ni)), c1;
        for (float& v : c0) v = u(rng);
        c1 = c0;
        gemm.act_act_nt(pa, k, rt.data() + static_cast<size_t>(i0 * k) * es, k, c0.data(), ni, no,
                        ni, k, acc, 0);
        gemm.act_act_nn(pa, k, rr.data() + static_cast<size_t>(i0) * es, in, c1.data(), ni, no, ni,
                        k, acc, 0);
        if (!same_bits(c0, c1)) {
          ++failures;
          size_t diff = 0;
          for (size_t i = 0; i < c0.size(); ++i) diff += std::memcmp(&c0[i], &c1[i], 4) != 0;
          ADD_FAILURE() << (kind == cpu::Bf16Kernels::Dnnl ? "oneDNN " : "widening ") << "tile "
                        << no << " x " << ni << " (in " << in << ", i0 " << i0 << ") k " << k
                        << (acc ? " accumulate" : "") << ": " << diff << " of " << c0.size()
                        << " elements differ";
        }
      }
    }
  }
}

// As CpuReduction.Bf16GemmAccumulateRoundsAsAddingThePartial, on the reducer's tile shapes, every
// k from 1 to 64, and strided destinations (ldc > n: oneDNN may route those through a dense copy).
TEST(Bf16WgradLayouts, AccumulateRoundsAsAddingThePartialOnMoreShapes) {
  std::mt19937 rng(31);
  for (cpu::Bf16Kernels kind : kernels_here()) {
    cpu::Bf16Gemm gemm(1, kind);
    const size_t es = gemm.act_bytes();
    int failures = 0;
    for (int trial = 0; trial < 200 && failures < 5; ++trial) {
      const int64_t m = 2 + static_cast<int64_t>(rng() % 300);
      const int64_t n = 2 + static_cast<int64_t>(rng() % 520);
      const int64_t k = 1 + static_cast<int64_t>(rng() % 64);
      const int64_t ldc = n + (rng() % 3 == 0 ? static_cast<int64_t>(1 + rng() % 40) : 0);
      const bool b_rows = rng() % 2;
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      auto prepared = [&](int64_t rows, int64_t cols) {
        Vec v(static_cast<size_t>(rows * cols));
        for (float& x : v) x = u(rng);
        std::vector<unsigned char> o(static_cast<size_t>(rows * cols) * es);
        gemm.prepare(v.data(), cols, rows, cols, o.data(), cols, false);
        return o;
      };
      const auto a0 = prepared(m, k), a1 = prepared(m, k);
      const auto b0 = b_rows ? prepared(k, n) : prepared(n, k);
      const auto b1 = b_rows ? prepared(k, n) : prepared(n, k);
      auto product = [&](const std::vector<unsigned char>& a, const std::vector<unsigned char>& b,
                         Vec& c, bool accumulate) {
        if (b_rows)
          gemm.act_act_nn(a.data(), k, b.data(), n, c.data(), ldc, m, n, k, accumulate, 0);
        else
          gemm.act_act_nt(a.data(), k, b.data(), k, c.data(), ldc, m, n, k, accumulate, 0);
      };
      Vec left(static_cast<size_t>(m * ldc), 0.0f), right = left;
      product(a0, b0, left, false);
      product(a1, b1, right, false);
      Vec want = left;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) want[i * ldc + j] = left[i * ldc + j] + right[i * ldc + j];
      Vec fused = left;
      product(a1, b1, fused, true);
      if (!same_bits(fused, want)) {
        ++failures;
        ADD_FAILURE() << (kind == cpu::Bf16Kernels::Dnnl ? "oneDNN " : "widening ")
                      << (b_rows ? "nn " : "nt ") << m << " x " << n << " x " << k << " ldc "
                      << ldc;
      }
    }
  }
}

void fold_into(std::vector<GradRoots>& parts, Vec& acc) {
  TreeFold<float*> fold(0);
  const size_t n = acc.size();
  auto add = [n](float* l, float* r) {
    for (size_t i = 0; i < n; ++i) l[i] = l[i] + r[i];
  };
  bool any = false;
  for (GradRoots& p : parts)
    for (size_t b = 0; b < p.blocks.size(); ++b) {
      fold.push_block(p.blocks[b], p.values[b].data(), add);
      any = true;
    }
  if (!any) return;
  const float* t = fold.finish(add);
  for (size_t i = 0; i < n; ++i) acc[i] = acc[i] + t[i];
}

// The grouped bf16 FFN backward over 4 experts (one empty), whole, then split between two
// processes by experts: process 0 holds expert 0's list, process 1 experts 2 and 3. Each process
// has fewer nonempty segments than the whole call, so DenseReducer::tile_cols (and with it
// WgradRows) can differ from the whole call's: the folded roots must still give the whole call's
// bits (core/grad_reduction.h).
class Bf16ExpertSplit : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};

TEST_P(Bf16ExpertSplit, ExpertSplitMatchesTheWholeCall) {
  const auto [D, H] = GetParam();
  std::mt19937 rng(4);
  const int64_t E = 4, per = H * D;
  const std::vector<int64_t> counts{3 * kReduceRows + 5, 0, kReduceRows, 2 * kReduceRows + 40};
  auto be0 = make_cpu_backend(2, Precision::Bf16);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto rv = [&](int64_t n, float scale) {
    Vec v(static_cast<size_t>(n));
    for (float& x : v) x = scale * u(rng);
    return v;
  };
  const Vec w1 = rv(E * per, 0.3f), w3 = rv(E * per, 0.3f), w2 = rv(E * per, 0.3f);
  std::vector<uint16_t> b1(w1.size()), b3(w3.size()), b2(w2.size());
  be0->to_bf16(w1.data(), b1.data(), static_cast<int64_t>(w1.size()));
  be0->to_bf16(w3.data(), b3.data(), static_cast<int64_t>(w3.size()));
  be0->to_bf16(w2.data(), b2.data(), static_cast<int64_t>(w2.size()));
  const Weight W1{w1.data(), b1.data()}, W3{w3.data(), b3.data()}, W2{w2.data(), b2.data()};
  DispatchPlan plan;
  plan.host_offsets.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) plan.host_offsets[e + 1] = plan.host_offsets[e] + counts[e];
  const int64_t A = plan.num_assignments();
  const Vec x = rv(A * D, 1.0f), dy = rv(A * D, 1.0f);
  Vec y(A * D), h1(A * H), h3(A * H);
  be0->grouped_swiglu_ffn(plan, x.data(), W1, W3, W2, y.data(), h1.data(), h3.data(), D, H);
  std::vector<Vec> full(3, Vec(E * per, 0.0f));
  {
    Vec dx(A * D);
    std::vector<GradOut> out[3];
    for (int k = 0; k < 3; ++k)
      for (int64_t e = 0; e < E; ++e) out[k].push_back(GradOut{full[k].data() + e * per});
    be0->grouped_swiglu_ffn_backward(plan, x.data(), W1, W3, W2, h1.data(), h3.data(), dy.data(),
                                     dx.data(), out[0].data(), out[1].data(), out[2].data(), D, H);
  }
  // roots[k][e][p]
  const int parts = 2;
  const std::vector<std::vector<int64_t>> holds{{0}, {2, 3}};
  // The backends own the roots' memory: declared first, destroyed last.
  std::vector<std::unique_ptr<Backend>> bes;
  for (int p = 0; p < parts; ++p) bes.push_back(make_cpu_backend(2, Precision::Bf16));
  std::vector<std::vector<std::vector<GradRoots>>> roots(3);
  for (auto& k : roots) {
    k.resize(E);
    for (auto& e : k) e.resize(parts);
  }
  for (int p = 0; p < parts; ++p) {
    DispatchPlan part;
    part.host_offsets.assign(E + 1, 0);
    Vec px, pdy, ph1, ph3;
    std::vector<GradOut> out[3];
    for (int64_t e = 0; e < E; ++e) {
      const bool mine = std::find(holds[p].begin(), holds[p].end(), e) != holds[p].end();
      const int64_t a0 = plan.host_offsets[e], a1 = mine ? plan.host_offsets[e + 1] : a0;
      part.host_offsets[e + 1] = part.host_offsets[e] + (a1 - a0);
      px.insert(px.end(), x.begin() + a0 * D, x.begin() + a1 * D);
      pdy.insert(pdy.end(), dy.begin() + a0 * D, dy.begin() + a1 * D);
      ph1.insert(ph1.end(), h1.begin() + a0 * H, h1.begin() + a1 * H);
      ph3.insert(ph3.end(), h3.begin() + a0 * H, h3.begin() + a1 * H);
      for (int k = 0; k < 3; ++k) out[k].push_back(GradOut{nullptr, &roots[k][e][p], 0});
    }
    Vec pdx(px.size());
    bes[static_cast<size_t>(p)]->grouped_swiglu_ffn_backward(
        part, px.data(), W1, W3, W2, ph1.data(), ph3.data(), pdy.data(), pdx.data(), out[0].data(),
        out[1].data(), out[2].data(), D, H);
  }
  const char* names[] = {"dw1", "dw3", "dw2"};
  for (int k = 0; k < 3; ++k)
    for (int64_t e = 0; e < E; ++e) {
      Vec ge(static_cast<size_t>(per), 0.0f);
      fold_into(roots[k][e], ge);
      const Vec want(full[k].begin() + e * per, full[k].begin() + (e + 1) * per);
      size_t diff = 0;
      for (size_t i = 0; i < ge.size(); ++i) diff += std::memcmp(&ge[i], &want[i], 4) != 0;
      EXPECT_EQ(diff, 0u) << names[k] << " expert " << e << " (D " << D << ", H " << H << ")";
    }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Bf16ExpertSplit,
    ::testing::Values(std::pair<int64_t, int64_t>{130, 96}, std::pair<int64_t, int64_t>{130, 8},
                      std::pair<int64_t, int64_t>{8, 130}, std::pair<int64_t, int64_t>{256, 128},
                      std::pair<int64_t, int64_t>{128, 256}, std::pair<int64_t, int64_t>{200, 136},
                      std::pair<int64_t, int64_t>{512, 256}),
    [](const auto& p) {
      return std::to_string(p.param.first) + "x" + std::to_string(p.param.second);
    });

}  // namespace
}  // namespace moert
