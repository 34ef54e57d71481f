// The gradient-reduction rule (core/grad_reduction.h) on the CPU backend: for every operation
// that reduces over rows, acc mode over all rows must equal, bit for bit, the fold of the local
// roots of any chunk-aligned split of the rows (what processes holding those rows would give),
// and must not depend on the thread count. Row outputs (dx) of a split must equal the full call's.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/grad_reduction.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/row_reduction.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/wgrad_stride.h"
#include "tests/unit/ffn_fixture.h"
#include "tests/unit/random_tensor.h"

namespace moert {
namespace {

using test::Ffn;
using test::plan_of;
using test::randv;
using test::same_bits;
using test::Vec;

// Aligned cuts of [0, rows): 0 = c_0 < c_1 < ... < c_k = rows, inner cuts multiples of `align`
// (kReduceRows, or kFp8ShareRows for FP8 experts); some parts may be empty.
std::vector<int64_t> random_cuts(int64_t rows, std::mt19937& rng, int64_t align = kReduceRows) {
  const int64_t J = (rows + align - 1) / align;
  std::vector<int64_t> cuts{0, rows};
  const int parts = std::uniform_int_distribution<int>(1, 5)(rng);
  for (int i = 1; i < parts; ++i)
    cuts.push_back(std::min(rows, std::uniform_int_distribution<int64_t>(0, J)(rng) * align));
  std::sort(cuts.begin(), cuts.end());
  return cuts;
}

// Folds the roots of consecutive parts (dense) over the tree and adds the total into acc, as the
// acc mode does: acc[i] = acc[i] + T[i].
void fold_roots_into(std::vector<GradRoots>& parts, Vec& acc) {
  TreeFold<float*> fold(0);
  const size_t n = acc.size();
  auto add = [n](float* l, float* r) {
    for (size_t i = 0; i < n; ++i) l[i] = l[i] + r[i];
  };
  bool any = false;
  for (GradRoots& p : parts)
    for (size_t b = 0; b < p.blocks.size(); ++b) {
      ASSERT_EQ(p.values[b].size(), n);
      fold.push_block(p.blocks[b], p.values[b].data(), add);
      any = true;
    }
  if (!any) return;
  const float* t = fold.finish(add);
  for (size_t i = 0; i < n; ++i) acc[i] = acc[i] + t[i];
}

// Roots of a part must be aligned_blocks of its chunk range.
void expect_blocks(const GradRoots& r, int64_t first, int64_t chunks) {
  EXPECT_EQ(r.blocks, aligned_blocks(first, first + chunks));
  EXPECT_EQ(r.values.size(), r.blocks.size());
}

constexpr int64_t kRows = 5 * kReduceRows + 17;

// Small weights take the direct path (tn Wgrad), large ones the transposed one (nt).
class LinearReduction : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};

TEST_P(LinearReduction, WeightAndBias) {
  std::mt19937 rng(1);
  const auto [in, out] = GetParam();
  const Vec x = randv(kRows * in, rng), dy = randv(kRows * out, rng), w = randv(out * in, rng);
  const Vec dw0 = randv(out * in, rng), db0 = randv(out, rng);
  Vec dx_full(kRows * in), dw_full = dw0, db_full = db0;
  {
    auto be = make_cpu_backend(2);
    const GradOut db{db_full.data()};
    be->linear_backward(x.data(), {w.data(), nullptr}, dy.data(), dx_full.data(), false,
                        GradOut{dw_full.data()}, &db, kRows, in, out);
  }
  for (unsigned threads : {1u, 3u}) {
    auto be = make_cpu_backend(threads);
    Vec dx(kRows * in), dw = dw0, db = db0;
    const GradOut gb{db.data()};
    be->linear_backward(x.data(), {w.data(), nullptr}, dy.data(), dx.data(), false,
                        GradOut{dw.data()}, &gb, kRows, in, out);
    EXPECT_TRUE(same_bits(dw, dw_full) && same_bits(db, db_full) && same_bits(dx, dx_full))
        << threads << " threads";
  }
  for (int trial = 0; trial < 6; ++trial) {
    const auto cuts = random_cuts(kRows, rng);
    auto be = make_cpu_backend(2);
    std::vector<GradRoots> rw(cuts.size() - 1), rb(cuts.size() - 1);
    Vec dx(kRows * in);
    for (size_t p = 0; p + 1 < cuts.size(); ++p) {
      const int64_t r0 = cuts[p], n = cuts[p + 1] - r0;
      if (n == 0) continue;
      const GradOut gw{nullptr, &rw[p], r0 / kReduceRows}, gb{nullptr, &rb[p], r0 / kReduceRows};
      be->linear_backward(x.data() + r0 * in, {w.data(), nullptr}, dy.data() + r0 * out,
                          dx.data() + r0 * in, false, gw, &gb, n, in, out);
      expect_blocks(rw[p], r0 / kReduceRows, reduce_chunks(n));
    }
    Vec dw = dw0, db = db0;
    fold_roots_into(rw, dw);
    fold_roots_into(rb, db);
    EXPECT_TRUE(same_bits(dw, dw_full)) << "trial " << trial;
    EXPECT_TRUE(same_bits(db, db_full)) << "trial " << trial;
    EXPECT_TRUE(same_bits(dx, dx_full)) << "trial " << trial;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, LinearReduction,
                         ::testing::Values(std::pair<int64_t, int64_t>{19, 13},
                                           std::pair<int64_t, int64_t>{264, 250}));

TEST(CpuReduction, RMSNormBackward) {
  std::mt19937 rng(2);
  const int64_t dim = 24;
  const Vec x = randv(kRows * dim, rng), dy = randv(kRows * dim, rng), w = randv(dim, rng);
  const Vec dw0 = randv(dim, rng);
  Vec inv(kRows), y(kRows * dim);
  make_cpu_backend(1)->rmsnorm(x.data(), w.data(), y.data(), inv.data(), kRows, dim, 1e-5f);
  auto full = [&](unsigned threads, Vec& dx) {
    Vec dw = dw0;
    make_cpu_backend(threads)->rmsnorm_backward(x.data(), w.data(), inv.data(), dy.data(),
                                                dx.data(), GradOut{dw.data()}, kRows, dim);
    return dw;
  };
  Vec dx_full(kRows * dim), dx1(kRows * dim);
  const Vec dw_full = full(2, dx_full);
  EXPECT_TRUE(same_bits(full(1, dx1), dw_full));
  EXPECT_TRUE(same_bits(dx1, dx_full));
  for (int trial = 0; trial < 6; ++trial) {
    const auto cuts = random_cuts(kRows, rng);
    auto be = make_cpu_backend(2);
    std::vector<GradRoots> roots(cuts.size() - 1);
    Vec dx(kRows * dim);
    for (size_t p = 0; p + 1 < cuts.size(); ++p) {
      const int64_t r0 = cuts[p], n = cuts[p + 1] - r0;
      if (n == 0) continue;
      be->rmsnorm_backward(x.data() + r0 * dim, w.data(), inv.data() + r0, dy.data() + r0 * dim,
                           dx.data() + r0 * dim, GradOut{nullptr, &roots[p], r0 / kReduceRows}, n,
                           dim);
      expect_blocks(roots[p], r0 / kReduceRows, reduce_chunks(n));
    }
    Vec dw = dw0;
    fold_roots_into(roots, dw);
    EXPECT_TRUE(same_bits(dw, dw_full)) << "trial " << trial;
    EXPECT_TRUE(same_bits(dx, dx_full)) << "trial " << trial;
  }
}

// The experts' precision; the FFN's width and hidden width: small fp32 weights take the CPU
// backend's direct path (nn / tn GEMMs), larger ones its transposed path (nt GEMMs, transposed
// operands); fp8 quantizes Wgrad's operands in 128-token column tiles from each list's first row.
struct FfnCase {
  Precision precision;
  int64_t dim, hidden;
};
class FfnReduction : public ::testing::TestWithParam<FfnCase> {};

// The alignment of the processes' shares of a list: FP8 Wgrad's token tiles must not split.
int64_t share_rows(Precision p) { return p == Precision::Fp8 ? kFp8ShareRows : kReduceRows; }

TEST_P(FfnReduction, DenseSwiGLUBackward) {
  const Precision prec = GetParam().precision;
  std::mt19937 rng(3);
  auto be0 = make_cpu_backend(2, prec);
  const Ffn f(rng, 1, *be0, GetParam().dim, GetParam().hidden);
  const int64_t D = f.dim, H = f.hidden;
  const Vec x = randv(kRows * D, rng), dy = randv(kRows * D, rng);
  Vec y(kRows * D), h1(kRows * H), h3(kRows * H);
  be0->swiglu_ffn(x.data(), f.W(1, prec), f.W(3, prec), f.W(2, prec), y.data(), h1.data(),
                  h3.data(), kRows, D, H, false);
  const Vec g0 = randv(H * D, rng), dx0 = randv(kRows * D, rng);
  auto call = [&](Backend& be, int64_t r0, int64_t n, Vec& dx, const GradOut& g1, const GradOut& g3,
                  const GradOut& g2) {
    be.swiglu_ffn_backward(x.data() + r0 * D, f.W(1, prec), f.W(3, prec), f.W(2, prec),
                           h1.data() + r0 * H, h3.data() + r0 * H, dy.data() + r0 * D,
                           dx.data() + r0 * D, true, g1, g3, g2, n, D, H);
  };
  std::vector<Vec> full(3, g0);
  Vec dx_full = dx0;
  call(*be0, 0, kRows, dx_full, GradOut{full[0].data()}, GradOut{full[1].data()},
       GradOut{full[2].data()});
  for (unsigned threads : {1u, 4u}) {
    auto be = make_cpu_backend(threads, prec);
    std::vector<Vec> g(3, g0);
    Vec dx = dx0;
    call(*be, 0, kRows, dx, GradOut{g[0].data()}, GradOut{g[1].data()}, GradOut{g[2].data()});
    for (int k = 0; k < 3; ++k) EXPECT_TRUE(same_bits(g[k], full[k])) << threads << " threads";
    EXPECT_TRUE(same_bits(dx, dx_full)) << threads << " threads";
  }
  for (int trial = 0; trial < 5; ++trial) {
    const auto cuts = random_cuts(kRows, rng, share_rows(prec));
    auto be = make_cpu_backend(2, prec);
    std::vector<std::vector<GradRoots>> roots(3);
    for (auto& r : roots) r.resize(cuts.size() - 1);
    Vec dx = dx0;
    for (size_t p = 0; p + 1 < cuts.size(); ++p) {
      const int64_t r0 = cuts[p], n = cuts[p + 1] - r0, c0 = r0 / kReduceRows;
      if (n == 0) continue;
      call(*be, r0, n, dx, GradOut{nullptr, &roots[0][p], c0}, GradOut{nullptr, &roots[1][p], c0},
           GradOut{nullptr, &roots[2][p], c0});
    }
    for (int k = 0; k < 3; ++k) {
      Vec g = g0;
      fold_roots_into(roots[k], g);
      EXPECT_TRUE(same_bits(g, full[k])) << "trial " << trial << " gradient " << k;
    }
    EXPECT_TRUE(same_bits(dx, dx_full)) << "trial " << trial;
  }
}

// The Wgrad operands' row stride follows the L1's shape: padded where more of a chunk's 64 rows
// share a set than the set has ways to spare, and at every multiple of 256 floats.
TEST(CpuReduction, WgradRowsArePaddedWhereTheyWouldShareL1Sets) {
  using cpu::L1Geometry;
  const L1Geometry zen5{64, 64, 12}, small{64, 64, 8};
  struct Case {
    int64_t width, on_zen5, on_small;
  };
  // 32 floats: 2 rows a set; 64: 4; 128 and 384: 8; 256 and 512: 16 and 32; 40 and 100 floats
  // do not start their rows on a line boundary.
  for (const Case& c : {Case{32, 32, 32}, Case{64, 64, 64}, Case{128, 128, 144},
                        Case{384, 384, 400}, Case{256, 272, 272}, Case{512, 528, 528},
                        Case{1024, 1040, 1040}, Case{40, 40, 40}, Case{100, 100, 100}}) {
    EXPECT_EQ(cpu::wgrad_row_stride(c.width, zen5), c.on_zen5) << c.width;
    EXPECT_EQ(cpu::wgrad_row_stride(c.width, small), c.on_small) << c.width;
  }
  // A cache of many ways still pads multiples of 256 (oneDNN's "bad" strides); 128 sets halve
  // the rows in each.
  EXPECT_EQ(cpu::wgrad_row_stride(256, L1Geometry{64, 64, 32}), 272);
  EXPECT_EQ(cpu::wgrad_row_stride(128, L1Geometry{64, 128, 8}), 128);
  // This machine's cache, or the default where the system does not say.
  const L1Geometry here = cpu::l1_geometry();
  EXPECT_GT(here.line, 0);
  EXPECT_GT(here.sets, 0);
  EXPECT_GT(here.ways, 0);
}

// The fp32 FFN backward computes the gradients it should: against a float64 backward from the
// same h1, h3 (the forward's), each output within fp32 rounding, dx accumulated into what it
// held. The 20 x 12 FFN takes the direct path (tn Wgrad, x and dy read where they lie); 260 x
// 256 and 256 x 40 take it too where oneDNN runs AVX-512, with some operands at padded row
// strides (hidden 256: a, dh1, dh3; dim 256: x and dy copied there), and the transposed path (nt
// Wgrad on operands transposed chunk by chunk) elsewhere, which the suite's run with oneDNN
// capped below AVX-512 covers on any machine.
TEST(CpuReduction, Fp32FfnBackwardMatchesFloat64) {
  for (const auto& [D, H] : {std::pair<int64_t, int64_t>{20, 12}, {260, 256}, {256, 40}}) {
    std::mt19937 rng(7);
    auto be = make_cpu_backend(2, Precision::Fp32);
    const Ffn f(rng, 1, *be, D, H);
    const Vec x = randv(kRows * D, rng), dy = randv(kRows * D, rng);
    Vec y(kRows * D), h1(kRows * H), h3(kRows * H);
    be->swiglu_ffn(x.data(), f.W(1, Precision::Fp32), f.W(3, Precision::Fp32),
                   f.W(2, Precision::Fp32), y.data(), h1.data(), h3.data(), kRows, D, H, false);
    std::vector<Vec> g(3, Vec(H * D, 0.0f));
    Vec dx = randv(kRows * D, rng);
    const Vec dx0 = dx;
    be->swiglu_ffn_backward(x.data(), f.W(1, Precision::Fp32), f.W(3, Precision::Fp32),
                            f.W(2, Precision::Fp32), h1.data(), h3.data(), dy.data(), dx.data(),
                            true, GradOut{g[0].data()}, GradOut{g[1].data()}, GradOut{g[2].data()},
                            kRows, D, H);
    // float64: a = silu(h1) h3; dA = dy W2; dh1 = dA h3 silu'(h1); dh3 = dA silu(h1); dx adds
    // to what it held.
    std::vector<double> a(kRows * H), dh1(kRows * H), dh3(kRows * H), rdx(dx0.begin(), dx0.end());
    std::vector<std::vector<double>> rg(3, std::vector<double>(H * D, 0.0));
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t h = 0; h < H; ++h) {
        double da = 0.0;
        for (int64_t d = 0; d < D; ++d) da += double{dy[r * D + d]} * f.w2[d * H + h];
        const double z = h1[r * H + h], s = 1.0 / (1.0 + std::exp(-z)), v = h3[r * H + h];
        a[r * H + h] = z * s * v;
        dh1[r * H + h] = da * v * (s + z * s * (1.0 - s));
        dh3[r * H + h] = da * z * s;
      }
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) {
          rdx[r * D + d] += dh1[r * H + h] * f.w1[h * D + d] + dh3[r * H + h] * f.w3[h * D + d];
          rg[0][h * D + d] += dh1[r * H + h] * x[r * D + d];
          rg[1][h * D + d] += dh3[r * H + h] * x[r * D + d];
          rg[2][d * H + h] += dy[r * D + d] * a[r * H + h];
        }
    auto rel = [](const Vec& got, const std::vector<double>& want) {
      double num = 0.0, den = 0.0;
      for (size_t i = 0; i < want.size(); ++i) {
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
      }
      return std::sqrt(num / den);
    };
    const std::string shape = std::to_string(D) + " x " + std::to_string(H);
    EXPECT_LT(rel(dx, rdx), 1e-6) << shape;
    for (int k = 0; k < 3; ++k) EXPECT_LT(rel(g[k], rg[k]), 1e-6) << shape << ", gradient " << k;
  }
}

// The routed experts' forward straight from unpermuted rows (the CPU backend gathers each item's
// rows itself) gives the bits of dispatch + grouped_swiglu_ffn, for items of many rows and of few
// (the column-unit path of a decode step), whether x_perm is kept and h1, h3 are, on any thread
// count; x_perm holds the dispatched rows when kept and is left alone otherwise. The assignments
// draw their tokens from the first `drawn` of 150: from 40, the items of more than kFewRows rows
// read each of their rows about 3.6 times, so a bf16 pass converts those rows once and copies
// them; from all 150, about 1.6 times, so it converts each gathered row.
class FfnDispatchedForward : public ::testing::TestWithParam<std::tuple<FfnCase, int64_t>> {};

TEST_P(FfnDispatchedForward, EqualsDispatchThenGrouped) {
  const auto [param, drawn] = GetParam();
  const Precision prec = param.precision;
  std::mt19937 rng(5);
  const int64_t E = 5, rows = 150;
  const std::vector<int64_t> counts{2 * kReduceRows + 9, 0, 5, 16, 17};
  auto be0 = make_cpu_backend(2, prec);
  const Ffn f(rng, E, *be0, param.dim, param.hidden);
  const int64_t D = f.dim, H = f.hidden;
  const DispatchPlan plan = plan_of(*be0, rows, counts, [&](int64_t) {
    return std::uniform_int_distribution<int32_t>(0, static_cast<int32_t>(drawn) - 1)(rng);
  });
  const int64_t A = plan.num_assignments();
  const Vec x = randv(rows * D, rng);
  Vec x_perm(A * D), want_y(A * D), want_h1(A * H), want_h3(A * H);
  be0->dispatch(plan, x.data(), x_perm.data(), D);
  be0->grouped_swiglu_ffn(plan, x_perm.data(), f.W(1, prec), f.W(3, prec), f.W(2, prec),
                          want_y.data(), want_h1.data(), want_h3.data(), D, H);
  for (unsigned threads : {1u, 2u, 3u})
    for (bool keep : {false, true})
      for (bool hidden : {false, true}) {
        auto be = make_cpu_backend(threads, prec);
        Vec kept(A * D, -7.0f), y(A * D), h1(A * H), h3(A * H);
        be->dispatch_swiglu_ffn(plan, x.data(), kept.data(), keep, f.W(1, prec), f.W(3, prec),
                                f.W(2, prec), y.data(), hidden ? h1.data() : nullptr,
                                hidden ? h3.data() : nullptr, D, H, D);
        const std::string where = "threads " + std::to_string(threads) + " keep " +
                                  std::to_string(keep) + " hidden " + std::to_string(hidden);
        EXPECT_TRUE(same_bits(y, want_y)) << where;
        if (hidden) {
          EXPECT_TRUE(same_bits(h1, want_h1)) << where;
          EXPECT_TRUE(same_bits(h3, want_h3)) << where;
        }
        EXPECT_TRUE(same_bits(kept, keep ? x_perm : Vec(A * D, -7.0f))) << where;
      }
}

// A training pass keeps the routed experts' rows (x_perm, dy_perm) at the stride the backend asks
// for (kept_rows_stride): fp32 rows of 256 floats, which the Wgrad's reads down a chunk would map
// onto few L1 sets, at 272, where the backward reads them in place instead of copying them; bf16
// rows dense. Kept padded, the forward, the combine's backward and the experts' backward give the
// bits of dense rows, and leave the padding alone; a stride the backend did not ask for is
// refused.
TEST(CpuReduction, ExpertRowsKeptAtThePaddedStrideGiveTheSameBits) {
  std::mt19937 rng(12);
  const int64_t E = 3, rows = 200, D = 256, H = 40;
  auto be = make_cpu_backend(2);
  const Ffn f(rng, E, *be, D, H);
  const Weight w1 = f.W(1, Precision::Fp32), w3 = f.W(3, Precision::Fp32),
               w2 = f.W(2, Precision::Fp32);
  const int64_t ld = be->kept_rows_stride(w1, w3, w2, D, H);
  ASSERT_EQ(ld, D + 16);
  auto bf = make_cpu_backend(2, Precision::Bf16);
  EXPECT_EQ(bf->kept_rows_stride(f.W(1, Precision::Bf16), f.W(3, Precision::Bf16),
                                 f.W(2, Precision::Bf16), D, H),
            D);
  DispatchPlan plan = plan_of(*be, rows, {2 * kReduceRows + 9, 17, kReduceRows}, [&](int64_t) {
    return std::uniform_int_distribution<int32_t>(0, rows - 1)(rng);
  });
  const int64_t A = plan.num_assignments(), per = H * D;
  plan.weight.resize(*be, static_cast<size_t>(A));
  const Vec gate = randv(A, rng);
  std::copy(gate.begin(), gate.end(), plan.weight.data());
  const Vec x = randv(rows * D, rng), dy = randv(rows * D, rng), g0 = randv(E * per, rng);
  struct Pass {
    Vec kept, y, h1, h3, dy_perm, dweight, dx;
    std::vector<Vec> g;
  };
  auto run = [&](int64_t stride) {
    Pass r{Vec(A * stride, -7.0f), Vec(A * D), Vec(A * H), Vec(A * H),
           Vec(A * stride, -7.0f), Vec(A),     Vec(A * D), std::vector<Vec>(3, g0)};
    be->dispatch_swiglu_ffn(plan, x.data(), r.kept.data(), true, w1, w3, w2, r.y.data(),
                            r.h1.data(), r.h3.data(), D, H, stride);
    be->combine_backward(plan, r.y.data(), dy.data(), r.dy_perm.data(), r.dweight.data(), D,
                         stride);
    std::vector<GradOut> out[3];
    for (int k = 0; k < 3; ++k)
      for (int64_t e = 0; e < E; ++e) out[k].push_back(GradOut{r.g[k].data() + e * per});
    be->grouped_swiglu_ffn_backward(plan, r.kept.data(), w1, w3, w2, r.h1.data(), r.h3.data(),
                                    r.dy_perm.data(), r.dx.data(), out[0].data(), out[1].data(),
                                    out[2].data(), D, H, stride);
    return r;
  };
  const Pass dense = run(D), padded = run(ld);
  EXPECT_TRUE(same_bits(padded.y, dense.y));
  EXPECT_TRUE(same_bits(padded.h1, dense.h1));
  EXPECT_TRUE(same_bits(padded.h3, dense.h3));
  EXPECT_TRUE(same_bits(padded.dweight, dense.dweight));
  EXPECT_TRUE(same_bits(padded.dx, dense.dx));
  for (int k = 0; k < 3; ++k) EXPECT_TRUE(same_bits(padded.g[k], dense.g[k])) << "gradient " << k;
  for (const auto& [p, d] :
       {std::pair{&padded.kept, &dense.kept}, std::pair{&padded.dy_perm, &dense.dy_perm}})
    for (int64_t a = 0; a < A; ++a) {
      EXPECT_TRUE(std::equal(d->begin() + a * D, d->begin() + (a + 1) * D, p->begin() + a * ld,
                             [](float u, float v) { return std::memcmp(&u, &v, 4) == 0; }))
          << "row " << a;
      EXPECT_TRUE(std::all_of(p->begin() + a * ld + D, p->begin() + (a + 1) * ld,
                              [](float v) { return v == -7.0f; }))
          << "padding of row " << a;
    }
  auto refused = [](const std::function<void()>& call, const char* what) {
    try {
      call();
      ADD_FAILURE() << what << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::Internal) << what << ": " << e.what();
    }
  };
  Vec room(A * ld), y(A * D), h1(A * H), h3(A * H), dx(A * D), dweight(A);
  refused(
      [&] {
        be->dispatch_swiglu_ffn(plan, x.data(), room.data(), true, w1, w3, w2, y.data(), h1.data(),
                                h3.data(), D, H, D + 8);
      },
      "a stride it did not ask for");
  refused(
      [&] {
        be->dispatch_swiglu_ffn(plan, x.data(), room.data(), false, w1, w3, w2, y.data(), nullptr,
                                nullptr, D, H, ld);
      },
      "a padded stride for rows it does not keep");
  refused(
      [&] {
        std::vector<Vec> g(3, g0);
        std::vector<GradOut> out[3];
        for (int k = 0; k < 3; ++k)
          for (int64_t e = 0; e < E; ++e) out[k].push_back(GradOut{g[k].data() + e * per});
        bf->grouped_swiglu_ffn_backward(plan, room.data(), f.W(1, Precision::Bf16),
                                        f.W(3, Precision::Bf16), f.W(2, Precision::Bf16), h1.data(),
                                        h3.data(), room.data(), dx.data(), out[0].data(),
                                        out[1].data(), out[2].data(), D, H, ld);
      },
      "a padded stride in bf16");
}

// Under expert parallelism the token's rank asks combine_backward for the gate-weight gradients
// only and the expert's rank for dy_perm only: each alone has the bits it has beside the other,
// at a dense and a padded stride, and with neither nothing is written.
TEST(CpuReduction, CombineBackwardGivesEitherOutputAloneWithTheSameBits) {
  std::mt19937 rng(14);
  const int64_t rows = 150, D = 130;
  auto be = make_cpu_backend(2);
  DispatchPlan plan = plan_of(*be, rows, {kReduceRows + 7, 0, 2 * kReduceRows + 3}, [&](int64_t) {
    return std::uniform_int_distribution<int32_t>(0, rows - 1)(rng);
  });
  const int64_t A = plan.num_assignments();
  plan.weight.resize(*be, static_cast<size_t>(A));
  const Vec gate = randv(A, rng);
  std::copy(gate.begin(), gate.end(), plan.weight.data());
  const Vec y_perm = randv(A * D, rng), dy = randv(rows * D, rng);
  for (int64_t ld : {D, D + 16}) {
    Vec both(A * ld, -7.0f), dweight(A), alone(A * ld, -7.0f), dweight_alone(A, -7.0f);
    be->combine_backward(plan, y_perm.data(), dy.data(), both.data(), dweight.data(), D, ld);
    be->combine_backward(plan, y_perm.data(), dy.data(), alone.data(), nullptr, D, ld);
    EXPECT_TRUE(same_bits(alone, both)) << "dy_perm alone, stride " << ld;
    be->combine_backward(plan, y_perm.data(), dy.data(), nullptr, dweight_alone.data(), D, ld);
    EXPECT_TRUE(same_bits(dweight_alone, dweight)) << "dweight alone, stride " << ld;
    be->combine_backward(plan, y_perm.data(), dy.data(), nullptr, nullptr, D, ld);
  }
}

// A bf16 forward that converts the gathered rows once reads no source row its items do not
// gather: under expert parallelism, the receive area of a later chunk may still be being written.
// Here the rows past those gathered lie on a page that cannot be read.
TEST(CpuBf16Gather, ConvertsOnlyTheRowsItsItemsRead) {
  std::mt19937 rng(8);
  const int64_t E = 5, rows = 300, read_rows = 150, D = 130, H = 96;
  auto be = make_cpu_backend(2, Precision::Bf16);
  const Ffn f(rng, E, *be, D, H);
  const DispatchPlan plan = plan_of(*be, rows, {2 * kReduceRows + 9, 0, 5, 16, 17}, [&](int64_t) {
    return std::uniform_int_distribution<int32_t>(0, 39)(rng);
  });
  const int64_t A = plan.num_assignments();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t read_bytes = static_cast<size_t>(read_rows * D) * sizeof(float);
  const size_t open = (read_bytes + page - 1) / page * page, guarded = open;
  void* map =
      mmap(nullptr, open + guarded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(map, MAP_FAILED);
  auto* base = static_cast<unsigned char*>(map);
  ASSERT_EQ(mprotect(base + open, guarded, PROT_NONE), 0);
  // Rows [0, read_rows) end where the unreadable page begins.
  auto* src = reinterpret_cast<float*>(base + open - read_bytes);
  const Vec x = randv(read_rows * D, rng);
  std::memcpy(src, x.data(), read_bytes);
  Vec x_perm(A * D), want(A * D), y(A * D);
  be->dispatch(plan, src, x_perm.data(), D);
  be->grouped_swiglu_ffn(plan, x_perm.data(), f.W(1, Precision::Bf16), f.W(3, Precision::Bf16),
                         f.W(2, Precision::Bf16), want.data(), nullptr, nullptr, D, H);
  be->dispatch_swiglu_ffn(plan, src, nullptr, false, f.W(1, Precision::Bf16),
                          f.W(3, Precision::Bf16), f.W(2, Precision::Bf16), y.data(), nullptr,
                          nullptr, D, H, D);
  EXPECT_TRUE(same_bits(y, want));
  munmap(map, open + guarded);
}

// The converted rows count as the backend's working memory and are given back with it.
TEST(CpuBf16Gather, ConvertedRowsAreWorkingMemory) {
  std::mt19937 rng(9);
  const int64_t rows = 4096, D = 130, H = 96;
  auto be = make_cpu_backend(2, Precision::Bf16);
  const Ffn f(rng, 4, *be, D, H);
  // Every token twice, in items of 64 rows.
  const DispatchPlan plan = plan_of(*be, rows, {2048, 2048, 2048, 2048},
                                    [&](int64_t a) { return static_cast<int32_t>(a % rows); });
  const Vec x = randv(rows * D, rng);
  Vec y(plan.num_assignments() * D);
  be->dispatch_swiglu_ffn(plan, x.data(), nullptr, false, f.W(1, Precision::Bf16),
                          f.W(3, Precision::Bf16), f.W(2, Precision::Bf16), y.data(), nullptr,
                          nullptr, D, H, D);
  // At least 2 bytes for each of the 4096 rows' 130 values; the items' own scratch is a tenth.
  EXPECT_GE(be->work_bytes(), static_cast<size_t>(rows * D * 2));
  be->release_work();
  EXPECT_EQ(be->work_bytes(), 0u);
}

// Experts' lists of very different lengths (one empty); a split hands each process a
// chunk-aligned part of every expert's list.
TEST_P(FfnReduction, GroupedSwiGLUBackwardPerExpert) {
  const Precision prec = GetParam().precision;
  std::mt19937 rng(4);
  const int64_t E = 4;
  const std::vector<int64_t> counts{3 * kReduceRows + 5, 0, kReduceRows, 2 * kReduceRows + 40};
  auto be0 = make_cpu_backend(2, prec);
  const Ffn f(rng, E, *be0, GetParam().dim, GetParam().hidden);
  const int64_t D = f.dim, H = f.hidden, per = H * D;
  DispatchPlan plan;
  plan.host_offsets.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) plan.host_offsets[e + 1] = plan.host_offsets[e] + counts[e];
  const int64_t A = plan.num_assignments();
  const Vec x = randv(A * D, rng), dy = randv(A * D, rng);
  Vec y(A * D), h1(A * H), h3(A * H);
  be0->grouped_swiglu_ffn(plan, x.data(), f.W(1, prec), f.W(3, prec), f.W(2, prec), y.data(),
                          h1.data(), h3.data(), D, H);
  const Vec g0 = randv(E * per, rng);
  auto acc_mode = [&](unsigned threads, std::vector<Vec>& g, Vec& dx) {
    auto be = make_cpu_backend(threads, prec);
    std::vector<GradOut> out[3];
    for (int k = 0; k < 3; ++k)
      for (int64_t e = 0; e < E; ++e) out[k].push_back(GradOut{g[k].data() + e * per});
    be->grouped_swiglu_ffn_backward(plan, x.data(), f.W(1, prec), f.W(3, prec), f.W(2, prec),
                                    h1.data(), h3.data(), dy.data(), dx.data(), out[0].data(),
                                    out[1].data(), out[2].data(), D, H, D);
  };
  std::vector<Vec> full(3, g0);
  Vec dx_full(A * D);
  acc_mode(2, full, dx_full);
  {
    std::vector<Vec> g(3, g0);
    Vec dx(A * D);
    acc_mode(3, g, dx);
    for (int k = 0; k < 3; ++k) EXPECT_TRUE(same_bits(g[k], full[k]));
    EXPECT_TRUE(same_bits(dx, dx_full));
  }
  for (int trial = 0; trial < 4; ++trial) {
    const int parts = 3;
    // cut[e][p]: where part p's share of expert e's list starts, in rows of that list.
    std::vector<std::vector<int64_t>> cut(E);
    for (int64_t e = 0; e < E; ++e) {
      cut[e] = random_cuts(counts[e], rng, share_rows(prec));
      cut[e].resize(parts + 1, counts[e]);
      std::sort(cut[e].begin(), cut[e].end());
      cut[e].back() = counts[e];
    }
    auto be = make_cpu_backend(2, prec);
    // roots[k][e][p]
    std::vector<std::vector<std::vector<GradRoots>>> roots(3);
    for (auto& k : roots) {
      k.resize(E);
      for (auto& e : k) e.resize(parts);
    }
    Vec dx(A * D);
    for (int p = 0; p < parts; ++p) {
      DispatchPlan part;
      part.host_offsets.assign(E + 1, 0);
      Vec px, pdy, ph1, ph3;
      std::vector<int64_t> src;  // the full plan's assignment of each of the part's rows
      std::vector<GradOut> out[3];
      for (int64_t e = 0; e < E; ++e) {
        const int64_t a0 = cut[e][p], a1 = cut[e][p + 1];
        for (int64_t a = a0; a < a1; ++a) src.push_back(plan.host_offsets[e] + a);
        part.host_offsets[e + 1] = part.host_offsets[e] + (a1 - a0);
        for (int k = 0; k < 3; ++k)
          out[k].push_back(GradOut{nullptr, &roots[k][e][p], a0 / kReduceRows});
      }
      for (int64_t a : src) {
        px.insert(px.end(), x.begin() + a * D, x.begin() + (a + 1) * D);
        pdy.insert(pdy.end(), dy.begin() + a * D, dy.begin() + (a + 1) * D);
        ph1.insert(ph1.end(), h1.begin() + a * H, h1.begin() + (a + 1) * H);
        ph3.insert(ph3.end(), h3.begin() + a * H, h3.begin() + (a + 1) * H);
      }
      Vec pdx(px.size());
      be->grouped_swiglu_ffn_backward(part, px.data(), f.W(1, prec), f.W(3, prec), f.W(2, prec),
                                      ph1.data(), ph3.data(), pdy.data(), pdx.data(), out[0].data(),
                                      out[1].data(), out[2].data(), D, H, D);
      for (size_t i = 0; i < src.size(); ++i)
        std::copy(pdx.begin() + i * D, pdx.begin() + (i + 1) * D, dx.begin() + src[i] * D);
      // The forward over the part's rows runs the same GEMM calls: the same bits.
      Vec py(px.size()), q1(ph1.size()), q3(ph3.size());
      be->grouped_swiglu_ffn(part, px.data(), f.W(1, prec), f.W(3, prec), f.W(2, prec), py.data(),
                             q1.data(), q3.data(), D, H);
      EXPECT_TRUE(same_bits(q1, ph1) && same_bits(q3, ph3));
      for (size_t i = 0; i < src.size(); ++i)
        EXPECT_EQ(0, std::memcmp(py.data() + i * D, y.data() + src[i] * D, D * sizeof(float)));
    }
    for (int k = 0; k < 3; ++k) {
      Vec g = g0;
      for (int64_t e = 0; e < E; ++e) {
        Vec ge(g.begin() + e * per, g.begin() + (e + 1) * per);
        fold_roots_into(roots[k][e], ge);
        std::copy(ge.begin(), ge.end(), g.begin() + e * per);
      }
      EXPECT_TRUE(same_bits(g, full[k])) << "trial " << trial << " gradient " << k;
    }
    EXPECT_TRUE(same_bits(dx, dx_full)) << "trial " << trial;
  }
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
                                     dx.data(), out[0].data(), out[1].data(), out[2].data(), D, H,
                                     D);
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
        out[1].data(), out[2].data(), D, H, D);
  }
  const char* names[] = {"dw1", "dw3", "dw2"};
  for (int k = 0; k < 3; ++k)
    for (int64_t e = 0; e < E; ++e) {
      Vec ge(static_cast<size_t>(per), 0.0f);
      fold_roots_into(roots[k][e], ge);
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

// Fp32 256 x 40: on AVX-512 (the direct path) x and dy copied to a padded row stride, a, dh1
// and dh3 not; 260 x 256 the other way round; 20 x 12 reads x and dy where they lie
// (cpu_ffn.cc, wgrad_ld).
const FfnCase kFfnCases[] = {{Precision::Fp32, 20, 12},   {Precision::Bf16, 20, 12},
                             {Precision::Fp32, 260, 256}, {Precision::Fp32, 256, 40},
                             {Precision::Bf16, 130, 96},  {Precision::Fp8, 20, 12},
                             {Precision::Fp8, 200, 136}};

std::string ffn_case_name(const FfnCase& c) {
  return std::string(c.precision == Precision::Bf16  ? "bf16_"
                     : c.precision == Precision::Fp8 ? "fp8_"
                                                     : "fp32_") +
         std::to_string(c.dim) + "x" + std::to_string(c.hidden);
}

INSTANTIATE_TEST_SUITE_P(Precisions, FfnReduction, ::testing::ValuesIn(kFfnCases),
                         [](const auto& p) { return ffn_case_name(p.param); });
INSTANTIATE_TEST_SUITE_P(Precisions, FfnDispatchedForward,
                         ::testing::Combine(::testing::ValuesIn(kFfnCases),
                                            ::testing::Values(int64_t{40}, int64_t{150})),
                         [](const auto& p) {
                           return ffn_case_name(std::get<0>(p.param)) + "_drawn" +
                                  std::to_string(std::get<1>(p.param));
                         });

// A call of few items on large weights (a decode step's shared expert: one 64-row item) runs as
// column units, like few-row items: same bits on every thread count, h1/h3 kept or not, the
// float64 result within fp32 (or bf16) rounding; and the backward of a training pass reads the
// h1, h3 it kept as the whole-item forward would have written them.
TEST(CpuReduction, FewItemsOnLargeWeightsRunAsColumnUnits) {
  std::mt19937 rng(11);
  const int64_t D = 1024, H = 1024, rows = 100;  // 2 items; weights of 2^20 elements
  // The float64 reference is computed for every 5th row and for each item's first and last row
  // (items of kReduceRows): over all 100 it was most of the test's time under ASan with the ISA
  // capped.
  std::vector<int64_t> checked;
  for (int64_t r = 0; r < rows; ++r)
    if (r % 5 == 0 || r % kReduceRows == 0 || r % kReduceRows == kReduceRows - 1 || r == rows - 1)
      checked.push_back(r);
  for (Precision prec : {Precision::Fp32, Precision::Bf16}) {
    auto be0 = make_cpu_backend(1, prec);
    const Ffn f(rng, 1, *be0, D, H);
    const Vec x = randv(rows * D, rng);
    Vec want(rows * D);
    {
      // float64 reference on the operands the precision multiplies (bf16-rounded weights and
      // activations for bf16).
      auto rounded = [&](const Vec& v) {
        std::vector<double> out(v.size());
        std::vector<uint16_t> b(v.size());
        if (prec == Precision::Bf16)
          be0->to_bf16(v.data(), b.data(), static_cast<int64_t>(v.size()));
        for (size_t i = 0; i < v.size(); ++i) {
          if (prec != Precision::Bf16) {
            out[i] = v[i];
            continue;
          }
          const uint32_t u = static_cast<uint32_t>(b[i]) << 16;
          float r;
          std::memcpy(&r, &u, 4);
          out[i] = r;
        }
        return out;
      };
      const auto qx = rounded(x), q1 = rounded(f.w1), q3 = rounded(f.w3), q2 = rounded(f.w2);
      Vec a(static_cast<size_t>(H));
      for (const int64_t r : checked) {
        for (int64_t h = 0; h < H; ++h) {
          double s1 = 0, s3 = 0;
          for (int64_t d = 0; d < D; ++d) {
            s1 += qx[r * D + d] * q1[h * D + d];
            s3 += qx[r * D + d] * q3[h * D + d];
          }
          a[h] = static_cast<float>(s1 / (1.0 + std::exp(-s1)) * s3);
        }
        const auto qa = rounded(a);
        for (int64_t d = 0; d < D; ++d) {
          double y = 0;
          for (int64_t h = 0; h < H; ++h) y += qa[h] * q2[d * H + h];
          want[r * D + d] = static_cast<float>(y);
        }
      }
    }
    Vec first;
    for (unsigned threads : {1u, 2u, 3u})
      for (bool keep : {false, true}) {
        auto be = make_cpu_backend(threads, prec);
        Vec y(rows * D), h1(rows * H), h3(rows * H);
        be->swiglu_ffn(x.data(), f.W(1, prec), f.W(3, prec), f.W(2, prec), y.data(),
                       keep ? h1.data() : nullptr, keep ? h3.data() : nullptr, rows, D, H, false);
        if (first.empty()) first = y;
        EXPECT_TRUE(same_bits(y, first)) << threads << " threads, keep " << keep;
        double err = 0, norm = 0;
        for (const int64_t r : checked)
          for (int64_t i = r * D; i < (r + 1) * D; ++i) {
            err += (y[i] - want[i]) * (y[i] - want[i]);
            norm += want[i] * want[i];
          }
        // fp32 sums over 1024 terms; bf16 operands round each activation of a once more.
        EXPECT_LT(std::sqrt(err / norm), prec == Precision::Bf16 ? 1e-2 : 1e-5)
            << threads << " threads";
      }
  }
}

// The sparse reduction against the dense definition (reference_tree_sum over whole-table chunk
// partials, each summed from zero in position order), and splits against the whole.
TEST(CpuReduction, EmbeddingBackwardIsTheDenseSumOnTouchedRows) {
  std::mt19937 rng(5);
  const int64_t vocab = 40, dim = 6, context = 3;
  std::vector<int32_t> tokens(kRows * context);
  std::uniform_int_distribution<int32_t> tok(0, 29);  // rows 30..39 never touched
  for (auto& t : tokens) t = tok(rng);
  Vec dy = randv(kRows * context * dim, rng);
  for (int64_t i = 0; i < 40; ++i) dy[static_cast<size_t>(i * 7)] = -0.0f;  // signed zeros
  Vec g0 = randv(vocab * dim, rng);
  // Dense reference.
  const int64_t J = reduce_chunks(kRows);
  std::vector<Vec> partials(J, Vec(vocab * dim, 0.0f));
  for (int64_t p = 0; p < kRows * context; ++p) {
    Vec& P = partials[p / (kReduceRows * context)];
    for (int64_t d = 0; d < dim; ++d)
      P[tokens[p] * dim + d] = P[tokens[p] * dim + d] + dy[p * dim + d];
  }
  std::vector<std::vector<float>> ps(partials.begin(), partials.end());
  const auto T = reference_tree_sum(ps);
  Vec want = g0;
  for (int64_t v = 0; v < 30; ++v)
    for (int64_t d = 0; d < dim; ++d) want[v * dim + d] = want[v * dim + d] + T[v * dim + d];
  for (unsigned threads : {1u, 2u, 3u}) {
    Vec got = g0;
    make_cpu_backend(threads)->embedding_backward(tokens.data(), dy.data(), GradOut{got.data()},
                                                  kRows, context, dim, vocab);
    EXPECT_TRUE(same_bits(got, want)) << threads << " threads";
  }
  // Splits: sparse roots folded with the same merge rule.
  using Sparse = std::pair<std::vector<int32_t>, Vec>;
  auto merge = [dim](Sparse* l, Sparse* r) {
    Sparse m;
    const size_t L = l->first.size(), R = r->first.size();
    size_t i = 0, j = 0;
    auto take = [&](int32_t row, const float* a, const float* b) {
      m.first.push_back(row);
      for (int64_t d = 0; d < dim; ++d) m.second.push_back(b ? a[d] + b[d] : a[d] + 0.0f);
    };
    while (i < L || j < R) {
      if (j == R || (i < L && l->first[i] < r->first[j])) {
        take(l->first[i], &l->second[i * dim], nullptr);
        ++i;
      } else if (i == L || r->first[j] < l->first[i]) {
        take(r->first[j], &r->second[j * dim], nullptr);
        ++j;
      } else {
        take(l->first[i], &l->second[i * dim], &r->second[j * dim]);
        ++i;
        ++j;
      }
    }
    *l = std::move(m);
  };
  for (int trial = 0; trial < 6; ++trial) {
    const auto cuts = random_cuts(kRows, rng);
    auto be = make_cpu_backend(2);
    std::vector<GradRoots> roots(cuts.size() - 1);
    for (size_t p = 0; p + 1 < cuts.size(); ++p) {
      const int64_t r0 = cuts[p], n = cuts[p + 1] - r0;
      if (n == 0) continue;
      be->embedding_backward(tokens.data() + r0 * context, dy.data() + r0 * context * dim,
                             GradOut{nullptr, &roots[p], r0 / kReduceRows}, n, context, dim, vocab);
      expect_blocks(roots[p], r0 / kReduceRows, reduce_chunks(n));
      ASSERT_EQ(roots[p].rows.size(), roots[p].blocks.size());
    }
    std::vector<Sparse> store;
    store.reserve(64);
    TreeFold<Sparse*> fold(0);
    for (auto& r : roots)
      for (size_t b = 0; b < r.blocks.size(); ++b) {
        ASSERT_TRUE(std::is_sorted(r.rows[b].begin(), r.rows[b].end()));
        ASSERT_EQ(r.values[b].size(), r.rows[b].size() * dim);
        store.push_back(
            {r.rows[b], Vec(r.values[b].data(), r.values[b].data() + r.values[b].size())});
        fold.push_block(r.blocks[b], &store.back(), merge);
      }
    const Sparse* t = fold.finish(merge);
    Vec got = g0;
    for (size_t k = 0; k < t->first.size(); ++k)
      for (int64_t d = 0; d < dim; ++d) {
        float& v = got[t->first[k] * dim + d];
        v = v + t->second[k * dim + d];
      }
    EXPECT_TRUE(same_bits(got, want)) << "trial " << trial;
  }
}

TEST(CpuReduction, CrossEntropyGivesOneSumPerChunk) {
  std::mt19937 rng(6);
  const int64_t vocab = 17;
  const Vec logits = randv(kRows * vocab, rng, 2.0f);
  std::vector<int32_t> targets(kRows);
  for (int64_t r = 0; r < kRows; ++r) targets[r] = static_cast<int32_t>((r * 5) % vocab);
  std::vector<double> full;
  Vec dl_full(kRows * vocab);
  make_cpu_backend(2)->cross_entropy(logits.data(), targets.data(), kRows, vocab, dl_full.data(),
                                     0.5f, full);
  ASSERT_EQ(static_cast<int64_t>(full.size()), reduce_chunks(kRows));
  for (int64_t j = 0; j < reduce_chunks(kRows); ++j) {
    double chunk = 0.0;
    for (int64_t r = j * kReduceRows; r < std::min(kRows, (j + 1) * kReduceRows); ++r) {
      const float* z = logits.data() + r * vocab;
      double m = z[0];
      for (int64_t v = 1; v < vocab; ++v) m = std::max<double>(m, z[v]);
      double s = 0.0;
      for (int64_t v = 0; v < vocab; ++v) s += std::exp(z[v] - m);
      chunk += m + std::log(s) - z[targets[r]];
    }
    EXPECT_NEAR(full[j], chunk, 1e-9 * std::abs(chunk));
  }
  // A split's chunk sums are the whole call's, chunk for chunk.
  const int64_t r0 = 2 * kReduceRows;
  std::vector<double> a, b;
  Vec dl(kRows * vocab);
  auto be = make_cpu_backend(1);
  be->cross_entropy(logits.data(), targets.data(), r0, vocab, dl.data(), 0.5f, a);
  be->cross_entropy(logits.data() + r0 * vocab, targets.data() + r0, kRows - r0, vocab,
                    dl.data() + r0 * vocab, 0.5f, b);
  a.insert(a.end(), b.begin(), b.end());
  EXPECT_EQ(a, full);
  EXPECT_TRUE(same_bits(dl, dl_full));
}

// Tile shapes (m x n) of the accumulation checks below: the bench layer's, odd ones, the
// smallest the reducer fuses.
const std::pair<int64_t, int64_t> kAccumulateTiles[] = {{64, 512},  {128, 256}, {16, 512}, {64, 64},
                                                        {100, 300}, {2, 7},     {5, 2},    {2, 2}};

// The reducer lets a Wgrad partial's GEMM make the first merge of a pair of chunks (sgemm with
// accumulate, DenseGrad::exact_accumulate), and a gradient of one chunk add its partial into the
// gradient's tile in place (row stride: the gradient's width, wider than the tile). That is only
// the tree's sum if oneDNN rounds c + (the product from zero) once per element, as add_into does:
// checked at the tiles' shapes, in both layouts the backward uses (tn direct, nt transposed),
// with full and short chunks, dense and strided destinations, down to tiles of 2 x 2 (the reducer
// never fuses a tile of one row or column: oneDNN's matrix-vector path starts its FMA chains
// from c).
TEST(CpuReduction, GemmAccumulateRoundsAsAddingThePartial) {
  std::mt19937 rng(11);
  for (bool trans_a : {true, false})
    for (auto [m, n] : kAccumulateTiles)
      for (int64_t k : {kReduceRows, int64_t{17}, int64_t{1}})
        for (int64_t ldc : {n, n + 9, 2 * n}) {
          const bool trans_b = !trans_a;
          const int64_t lda = trans_a ? m : k, ldb = trans_b ? k : n;
          const Vec a0 = randv(m * k, rng), b0 = randv(k * n, rng);
          const Vec a1 = randv(m * k, rng), b1 = randv(k * n, rng);
          // The destinations' gaps (ldc > n) hold values the GEMMs must leave alone.
          const Vec gaps = randv(m * ldc, rng);
          Vec left = gaps, right = gaps;
          cpu::sgemm(trans_a, trans_b, m, n, k, a0.data(), lda, b0.data(), ldb, left.data(), ldc,
                     false);
          cpu::sgemm(trans_a, trans_b, m, n, k, a1.data(), lda, b1.data(), ldb, right.data(), ldc,
                     false);
          Vec want = left;
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j)
              want[i * ldc + j] = left[i * ldc + j] + right[i * ldc + j];
          Vec fused = left;
          cpu::sgemm(trans_a, trans_b, m, n, k, a1.data(), lda, b1.data(), ldb, fused.data(), ldc,
                     true);
          EXPECT_TRUE(same_bits(fused, want))
              << (trans_a ? "tn " : "nt ") << m << " x " << n << " x " << k << " ldc " << ldc;
        }
}

// DenseReducer against the rule's definition, not only against itself split: for any count of
// chunks, from any first chunk, with and without the partials' GEMMs merging pairs of chunks,
// the result is bit for bit the reference tree's: acc + T, or each aligned block's tree sum as
// a root. Two gradients, one of several tiles in both directions with short edge tiles, on two
// threads.
TEST(CpuReduction, DenseFoldIsTheReferenceTreeForAnyChunkCount) {
  std::mt19937 rng(23);
  cpu::ThreadPool pool(2);
  cpu::DenseReducer reducer(pool);
  const auto mem = make_cpu_backend(1);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{70, 600}, {3, 40}};
  for (int64_t chunks : {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 31, 33})
    for (int64_t first : {int64_t{-1}, int64_t{0}, int64_t{3}, int64_t{8}})  // -1: acc mode
      for (bool exact : {true, false}) {
        std::vector<std::vector<Vec>> parts(shapes.size());
        std::vector<Vec> acc(shapes.size());
        std::vector<GradRoots> roots(shapes.size());
        std::vector<GradOut> outs(shapes.size());
        std::vector<cpu::DenseGrad> grads;
        for (size_t s = 0; s < shapes.size(); ++s) {
          const auto [out, in] = shapes[s];
          for (int64_t j = 0; j < chunks; ++j) parts[s].push_back(randv(out * in, rng));
          acc[s] = randv(out * in, rng);
          outs[s] = {acc[s].data(), first < 0 ? nullptr : &roots[s], std::max<int64_t>(first, 0)};
          cpu::DenseGrad d;
          d.g = &outs[s];
          d.chunks = chunks;
          d.out = out;
          d.in = in;
          d.exact_accumulate = exact;
          d.partial = [&, s, in](int64_t j, int64_t o0, int64_t no, int64_t i0, int64_t ni,
                                 float* c, int64_t ldc, bool accumulate, unsigned) {
            const float* p = parts[s][static_cast<size_t>(j)].data();
            for (int64_t o = 0; o < no; ++o)
              for (int64_t i = 0; i < ni; ++i) {
                const float v = p[(o0 + o) * in + i0 + i];
                c[o * ldc + i] = accumulate ? c[o * ldc + i] + v : v;
              }
          };
          grads.push_back(std::move(d));
        }
        const std::vector<Vec> acc0 = acc;
        reducer.run(*mem, grads);
        for (size_t s = 0; s < shapes.size(); ++s) {
          const std::string what = "gradient " + std::to_string(s) + ", " + std::to_string(chunks) +
                                   " chunks from " + std::to_string(first) +
                                   (exact ? ", exact" : "");
          if (first < 0) {
            Vec want = acc0[s];
            const Vec total = reference_tree_sum(parts[s]);
            for (size_t i = 0; i < want.size(); ++i) want[i] = want[i] + total[i];
            EXPECT_TRUE(same_bits(acc[s], want)) << what;
            continue;
          }
          EXPECT_TRUE(same_bits(acc[s], acc0[s])) << what << ": acc written in roots mode";
          const auto blocks = aligned_blocks(first, first + chunks);
          ASSERT_EQ(roots[s].blocks.size(), blocks.size()) << what;
          for (size_t b = 0; b < blocks.size(); ++b) {
            EXPECT_EQ(roots[s].blocks[b], blocks[b]) << what;
            const auto begin = parts[s].begin() + (blocks[b].begin - first);
            const Vec want = reference_tree_sum({begin, begin + blocks[b].size});
            const Vec got(roots[s].values[b].data(),
                          roots[s].values[b].data() + roots[s].values[b].size());
            EXPECT_TRUE(same_bits(got, want)) << what << ", block " << b;
          }
        }
      }
}

TEST(CpuBackend, AddIsElementwise) {
  std::mt19937 rng(7);
  const int64_t n = 100003;
  Vec a = randv(n, rng), b = randv(n, rng), want = a;
  for (int64_t i = 0; i < n; ++i) want[i] = want[i] + b[i];
  make_cpu_backend(2)->add(a.data(), b.data(), n);
  EXPECT_TRUE(same_bits(a, want));
}

}  // namespace
}  // namespace moert
