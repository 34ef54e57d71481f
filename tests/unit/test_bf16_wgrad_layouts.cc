// The bf16 Wgrad's operands, against the rules that make its results independent of the thread
// count and of how processes share the rows (core/grad_reduction.h): the transposing conversion
// against the scalar rule on random shapes and strides; the two layouts of the right operand
// (transposed, or as rows where oneDNN's bf16 kernels run) giving the same bits on the reducer's
// tiles; and the GEMM's accumulate rounding exactly as c + the partial. (A call split between
// processes by experts: test_cpu_reduction.cc's Bf16ExpertSplit.)
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

// As CpuReduction.GemmAccumulateRoundsAsAddingThePartial for the bf16 Wgrad's products (nt, and
// rows): the reducer merges pairs of chunks inside the GEMM in bf16 too. Every kernel this CPU
// runs, random tile shapes, every k from 1 to 64, and strided destinations (ldc > n: oneDNN may
// route those through a dense copy).
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

}  // namespace
}  // namespace moert
