// The CPU backend's whole-buffer operations that run on every pass: the finite scan of inputs and
// outputs, the copies and fills split over the threads, and the elementwise kernels' AVX-512
// bodies. Each is checked against the obvious serial loop, or the AVX2 path, at the sizes and
// positions where a split or a vector step could go wrong.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/math.h"
#include "kernels/cpu/optimizer.h"
#include "kernels/cpu/softmax_exp_steps.h"

namespace moert {
namespace {

int64_t serial_first_nonfinite(const std::vector<float>& x) {
  for (size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i])) return static_cast<int64_t>(i);
  return -1;
}

const float kBad[] = {
    std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
    std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};

TEST(CpuBulkOps, FirstNonfiniteFindsTheFirstBadValueAtEveryPosition) {
  // Lengths around the 32-float vector step and its 8-float lanes, and a scalar tail.
  for (int64_t n : {0, 1, 7, 8, 31, 32, 33, 63, 64, 65, 100, 1000}) {
    std::vector<float> x(static_cast<size_t>(n));
    std::iota(x.begin(), x.end(), -10.0f);
    EXPECT_EQ(cpu::first_nonfinite(x.data(), n), -1) << n;
    for (int64_t at = 0; at < n; ++at)
      for (float bad : kBad) {
        auto y = x;
        y[static_cast<size_t>(at)] = bad;
        if (at + 3 < n) y[static_cast<size_t>(at + 3)] = kBad[0];  // a later one is not reported
        ASSERT_EQ(cpu::first_nonfinite(y.data(), n), at) << n << " " << at << " " << bad;
      }
  }
  // The largest finite values and the smallest subnormals are finite.
  std::vector<float> edge(40, std::numeric_limits<float>::max());
  edge[5] = -std::numeric_limits<float>::max();
  edge[9] = std::numeric_limits<float>::denorm_min();
  edge[33] = -0.0f;
  EXPECT_EQ(cpu::first_nonfinite(edge.data(), 40), -1);
}

TEST(CpuBulkOps, FindNonfiniteAcrossThreadBlocksReportsTheFirst) {
  // 65536-float blocks are scanned by different threads: the lowest index must win.
  for (unsigned threads : {1u, 2u, 3u}) {
    auto be = make_cpu_backend(threads);
    const int64_t n = 3 * 65536 + 123;
    std::vector<float> x(static_cast<size_t>(n), 0.5f);
    EXPECT_EQ(be->find_nonfinite(x.data(), n), -1);
    for (int64_t at :
         {int64_t{0}, int64_t{65535}, int64_t{65536}, int64_t{2 * 65536 + 17}, n - 1}) {
      auto y = x;
      y[static_cast<size_t>(at)] = kBad[2];
      if (at + 70000 < n) y[static_cast<size_t>(at + 70000)] = kBad[0];
      EXPECT_EQ(be->find_nonfinite(y.data(), n), at) << threads << " " << at;
      EXPECT_EQ(be->find_nonfinite(y.data(), n), serial_first_nonfinite(y));
    }
  }
}

TEST(CpuBulkOps, CopyAndZeroOfAnySizeMatchTheSerialOnes) {
  auto be = make_cpu_backend(2);
  const size_t mib = size_t{1} << 20;
  const size_t kib = size_t{1} << 10;
  // Below, at and above the size where the work is split (256 KiB, in 128 KiB pieces), and not a
  // multiple of its block.
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{4097}, 256 * kib - 1, 256 * kib, 256 * kib + 1,
                       2 * mib - 1, 2 * mib, 5 * mib + 3}) {
    std::vector<unsigned char> src(bytes), dst(bytes + 2, 0xAB);
    for (size_t i = 0; i < bytes; ++i) src[i] = static_cast<unsigned char>(i * 131 + 7);
    be->copy(dst.data() + 1, src.data(), bytes);
    // memcmp may not be given the null data() of an empty vector, even for 0 bytes.
    EXPECT_TRUE(bytes == 0 || std::memcmp(dst.data() + 1, src.data(), bytes) == 0) << bytes;
    EXPECT_EQ(dst[0], 0xAB);
    EXPECT_EQ(dst[bytes + 1], 0xAB) << "copy wrote past the end at " << bytes;
    be->zero(dst.data() + 1, bytes);
    for (size_t i = 1; i <= bytes; ++i) ASSERT_EQ(dst[i], 0) << bytes << " " << i;
    EXPECT_EQ(dst[0], 0xAB);
    EXPECT_EQ(dst[bytes + 1], 0xAB) << "zero wrote past the end at " << bytes;
  }
}

// A session's gradients are cleared in one call over all of them: each array exactly, none of
// the bytes around or between them, whatever its size (empty, below one piece, several pieces).
TEST(CpuBulkOps, ZeroManyClearsEachArrayAndNothingElse) {
  auto be = make_cpu_backend(2);
  const std::vector<size_t> sizes = {5,   0, 128 << 10, (128 << 10) + 3, 1,
                                     700, 0, 3 << 20,   (1 << 20) - 1,   64};
  std::vector<unsigned char> all;
  std::vector<size_t> at;
  for (size_t n : sizes) {
    at.push_back(all.size() + 1);  // one guard byte before each array
    all.resize(all.size() + n + 1, 0xAB);
  }
  all.push_back(0xAB);
  for (size_t i = 0; i < all.size(); ++i) all[i] = i % 7 ? static_cast<unsigned char>(i) : 0xAB;
  std::vector<unsigned char> want = all;
  std::vector<void*> dsts;
  for (size_t k = 0; k < sizes.size(); ++k) {
    std::fill(want.begin() + static_cast<std::ptrdiff_t>(at[k]),
              want.begin() + static_cast<std::ptrdiff_t>(at[k] + sizes[k]), 0);
    dsts.push_back(all.data() + at[k]);
  }
  be->zero_many(dsts.data(), sizes.data(), sizes.size());
  for (size_t i = 0; i < all.size(); ++i) ASSERT_EQ(all[i], want[i]) << "byte " << i;
  be->zero_many(nullptr, nullptr, 0);
}

TEST(CpuBulkOps, OverlappingCopyMovesLikeMemmove) {
  auto be = make_cpu_backend(2);
  const size_t bytes = 3 * (size_t{1} << 20);
  for (ptrdiff_t shift : {-4099, 4099}) {
    std::vector<unsigned char> buf(bytes + 16384), want;
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<unsigned char>(i * 37 + 1);
    want = buf;
    unsigned char* src = buf.data() + 8192;
    std::memmove(want.data() + 8192 + shift, want.data() + 8192, bytes);
    be->copy(src + shift, src, bytes);
    EXPECT_EQ(buf, want) << shift;
  }
}

// Called on 8 elements at a time, math.h's elementwise kernels take their AVX2 path (the AVX-512
// bodies need 16): one call over the whole buffer must give the same bits, element for element,
// on an AVX-512 machine as well (isa.h; elsewhere both sides run the same path).
TEST(CpuBulkOps, ElementwiseKernelsGiveTheAvx2BitsOnEveryIsa) {
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  const int64_t n = 16 * 37 + 13;  // 16-wide blocks, then an 8-wide one, then a scalar tail
  std::vector<float> h1(n), h3(n), da(n), x(n), y0(n);
  for (int64_t i = 0; i < n; ++i) {
    h1[i] = normal(rng);
    h3[i] = normal(rng);
    da[i] = normal(rng);
    x[i] = normal(rng);
    y0[i] = normal(rng);
  }
  // The exponential's clamps, zeros and a subnormal.
  const float special[] = {-100.0f, 100.0f, 88.5f, -87.5f, 0.0f, -0.0f, 1e-40f, 30.0f};
  for (size_t k = 0; k < std::size(special); ++k) h1[3 + 5 * k] = special[k];
  auto in_pieces = [n](auto&& f) {
    for (int64_t i = 0; i < n; i += 8) f(i, std::min<int64_t>(8, n - i));
  };
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  std::vector<float> whole(n), pieces(n);
  cpu::swiglu(h1.data(), h3.data(), whole.data(), n);
  in_pieces([&](int64_t i, int64_t m) { cpu::swiglu(&h1[i], &h3[i], &pieces[i], m); });
  EXPECT_TRUE(same(whole, pieces)) << "swiglu";

  std::vector<float> d1(n), d3(n), p1(n), p3(n);
  cpu::swiglu_backward(h1.data(), h3.data(), da.data(), d1.data(), d3.data(), n);
  in_pieces([&](int64_t i, int64_t m) {
    cpu::swiglu_backward(&h1[i], &h3[i], &da[i], &p1[i], &p3[i], m);
  });
  EXPECT_TRUE(same(d1, p1)) << "swiglu_backward dh1";
  EXPECT_TRUE(same(d3, p3)) << "swiglu_backward dh3";

  auto ya = y0, yb = y0;
  cpu::axpy(ya.data(), 0.37f, x.data(), n);
  in_pieces([&](int64_t i, int64_t m) { cpu::axpy(&yb[i], 0.37f, &x[i], m); });
  EXPECT_TRUE(same(ya, yb)) << "axpy";

  ya = y0;
  yb = y0;
  cpu::add_into(ya.data(), x.data(), n);
  in_pieces([&](int64_t i, int64_t m) { cpu::add_into(&yb[i], &x[i], m); });
  EXPECT_TRUE(same(ya, yb)) << "add_into";
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(ya[i], y0[i] + x[i]) << i;

  // The bf16 forward's fused step: swiglu rounded to bf16 in pieces of its own, the bits of
  // swiglu followed by round_to_bf16, as codes and widened, over lengths that end inside a
  // 16-wide block, an 8-wide one and a piece (512).
  for (const int64_t len : {int64_t{1}, int64_t{15}, int64_t{24}, int64_t{531}, n})
    for (const bool widened : {false, true}) {
      std::vector<uint32_t> want(static_cast<size_t>(len), 0xDEADBEEFu), got = want;
      cpu::swiglu(h1.data(), h3.data(), whole.data(), len);
      cpu::round_to_bf16(whole.data(), len, 1, len, want.data(), len, false, widened);
      cpu::swiglu_to_bf16(h1.data(), h3.data(), got.data(), len, widened);
      EXPECT_EQ(got, want) << "swiglu_to_bf16, " << len << (widened ? " widened" : " codes");
    }
}

// The combine adds a token's top-K rows in one pass over its row, and the dispatch's backward its
// rows' input gradients: each must give the bits of the one-row calls in turn (the order an
// expert-parallel combine adds in), for any count of rows and wherever a row ends (a 16-wide
// block, an 8-wide one, the scalar tail).
TEST(CpuBulkOps, AxpyRowsAndAddRowsGiveTheBitsOfOneRowAtATime) {
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int64_t longest = 16 * 37 + 13;
  std::vector<std::vector<float>> x(17, std::vector<float>(longest));
  std::vector<float> a(17), y0(longest);
  for (auto& row : x)
    for (float& v : row) v = normal(rng);
  for (float& v : a) v = normal(rng);
  for (float& v : y0) v = normal(rng);
  std::vector<const float*> rows;
  for (const auto& row : x) rows.push_back(row.data());
  for (const int k : {0, 1, 2, 3, 8, 16, 17})
    for (const int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{13}, int64_t{16},
                            int64_t{24}, int64_t{31}, longest}) {
      std::vector<float> want = y0, got = y0;
      for (int j = 0; j < k; ++j) cpu::axpy(want.data(), a[static_cast<size_t>(j)], rows[j], n);
      cpu::axpy_rows(got.data(), a.data(), rows.data(), k, n);
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), sizeof(float) * y0.size()))
          << "axpy_rows, k " << k << ", n " << n;
      want = y0;
      got = y0;
      for (int j = 0; j < k; ++j) cpu::add_into(want.data(), rows[j], n);
      cpu::add_rows(got.data(), rows.data(), k, n);
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), sizeof(float) * y0.size()))
          << "add_rows, k " << k << ", n " << n;
    }
}

// A softmax's exponentials run 8 at a time on AVX-512, 4 on AVX2 (the row's end through a padded
// block) and one by one on the scalar path: every element must have the scalar steps' bits,
// wherever it lies in the row, or a training's loss and gradients would depend on the CPU. And
// the steps must be e^x to 1 ulp (against long double) down to the smallest normal result.
TEST(CpuBulkOps, SoftmaxExpGivesTheScalarBitsWithin1Ulp) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 30.0f);
  const float inf = std::numeric_limits<float>::infinity();
  const double lowest = cpu::softmax_exp_steps::kLowest;
  // The float arguments on both sides of the smallest normal result, and the far ends.
  const float at_lowest = static_cast<float>(lowest);
  const float beside[] = {std::nextafter(at_lowest, 0.0f),
                          at_lowest,
                          std::nextafter(at_lowest, -inf),
                          -1000.0f,
                          -inf,
                          -1e-30f};
  auto same_bits = [](double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; };
  double worst_ulp = 0.0;
  int64_t checked = 0;
  auto check = [&](const std::vector<float>& z, float mx, const std::string& what) {
    std::vector<double> e(z.size(), -1.0);
    cpu::softmax_exp(z.data(), mx, e.data(), static_cast<int64_t>(z.size()));
    for (size_t i = 0; i < z.size(); ++i) {
      const double x = static_cast<double>(z[i] - mx);
      ASSERT_TRUE(same_bits(e[i], cpu::softmax_exp_steps::one(x)))
          << what << ", element " << i << ": " << e[i] << " for e^" << x;
      if (std::isnan(x)) continue;
      if (x < lowest) {
        ASSERT_EQ(e[i], 0.0) << what << ": e^" << x;
        continue;
      }
      ASSERT_GE(e[i], std::numeric_limits<double>::min()) << what << ": e^" << x;
      const long double exact = std::exp(static_cast<long double>(x));
      const double ulp =
          std::nextafter(static_cast<double>(exact), INFINITY) - static_cast<double>(exact);
      worst_ulp = std::max(worst_ulp, static_cast<double>(std::fabs(e[i] - exact) / ulp));
      ++checked;
    }
  };
  // Rows of every length that ends inside an 8-wide block, a 4-wide one or a padded tail, the
  // special arguments placed relative to the row's maximum.
  for (const int64_t len : {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 98, 531}) {
    std::vector<float> z(static_cast<size_t>(len));
    for (float& v : z) v = normal(rng);
    const float mx = *std::max_element(z.begin(), z.end());
    for (size_t k = 0; k < std::size(beside) && 2 * k + 1 < z.size(); ++k)
      z[2 * k + 1] = mx + beside[k];
    check(z, mx, "length " + std::to_string(len));
  }
  // The boundary itself (against a maximum of 0, where z - max is z exactly), in a vector block
  // and in a tail.
  std::vector<float> edge(std::begin(beside), std::end(beside));
  edge.insert(edge.end(), std::begin(beside), std::end(beside));
  check(edge, 0.0f, "the smallest normal result");
  EXPECT_GT(cpu::softmax_exp_steps::one(beside[0]), 0.0);
  EXPECT_EQ(cpu::softmax_exp_steps::one(beside[2]), 0.0);
  // A dense sweep of the arguments' range.
  std::vector<float> sweep(4099);
  for (size_t i = 0; i < sweep.size(); ++i) sweep[i] = -708.0f * static_cast<float>(i) / 4098.0f;
  check(sweep, 0.0f, "sweep");
  EXPECT_LE(worst_ulp, 1.0) << "over " << checked << " arguments";
  // The same bits in the directed rounding modes too (a host may set one), on arguments around
  // the points where x / ln2 rounds to one integer or the next.
  std::vector<float> halves;
  for (int k = -1022; k <= 0; k += 7) {
    const float at = static_cast<float>((k - 0.5) * 0.6931471805599453);
    halves.push_back(std::nextafter(at, -inf));
    halves.push_back(at);
    halves.push_back(std::nextafter(at, 0.0f));
  }
  for (const int mode : {FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO}) {
    ASSERT_EQ(std::fesetround(mode), 0);
    std::vector<double> e(halves.size());
    cpu::softmax_exp(halves.data(), 0.0f, e.data(), static_cast<int64_t>(halves.size()));
    std::vector<double> want(halves.size());
    for (size_t i = 0; i < halves.size(); ++i) want[i] = cpu::softmax_exp_steps::one(halves[i]);
    std::fesetround(FE_TONEAREST);
    for (size_t i = 0; i < halves.size(); ++i)
      ASSERT_TRUE(same_bits(e[i], want[i])) << "rounding mode " << mode << ", e^" << halves[i];
  }
  // A NaN gives NaN, with the scalar steps' bits, in a vector block and in a tail.
  std::vector<float> bad(11, -1.0f);
  bad[2] = std::numeric_limits<float>::quiet_NaN();
  bad[9] = -std::numeric_limits<float>::quiet_NaN();
  check(bad, 0.0f, "NaN");
  std::vector<double> out(bad.size());
  cpu::softmax_exp(bad.data(), 0.0f, out.data(), static_cast<int64_t>(bad.size()));
  EXPECT_TRUE(std::isnan(out[2]) && std::isnan(out[9]));
  EXPECT_EQ(out[0], std::exp(-1.0));
}

// AdamW's update runs 8 elements at a time on AVX-512, 4 on AVX2 and one by one on the scalar
// path (calls of 1 element): each must give the scalar formula's bits, or a training's weights
// would depend on the CPU it ran on. Lengths end inside an 8-wide block and a 4-wide one.
TEST(CpuBulkOps, AdamWUpdateGivesTheScalarBitsOnEveryPath) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = 8 * 29 + 4 + 3;
  std::vector<float> p0(n), g(n), m0(n), v0(n);
  for (int64_t i = 0; i < n; ++i) {
    p0[i] = normal(rng);
    g[i] = normal(rng) * 1e-2f;
    m0[i] = normal(rng) * 1e-3f;
    v0[i] = std::abs(normal(rng)) * 1e-5f;
  }
  g[5] = 0.0f;
  v0[5] = 0.0f;  // the update is then eps-bound
  // Step 3 of lr 1e-3, betas (0.9, 0.95), eps 1e-8, decay 0.1, gradients scaled by 0.5.
  cpu::AdamW a{1e-3, 0.9, 0.95, 1e-8, 0.1, 0.5, 1.0 - 0.9 * 0.9 * 0.9, 1.0 - 0.95 * 0.95 * 0.95};
  for (const int64_t piece : {n, int64_t{4}, int64_t{1}}) {
    auto p = p0, m = m0, v = v0;
    for (int64_t i = 0; i < n; i += piece)
      cpu::adamw_update(a, &p[i], &g[i], &m[i], &v[i], std::min(piece, n - i));
    for (int64_t i = 0; i < n; ++i) {
      const double gi = static_cast<double>(g[i]) * a.gscale;
      const double mi = a.beta1 * m0[i] + (1.0 - a.beta1) * gi;
      const double vi = a.beta2 * v0[i] + (1.0 - a.beta2) * gi * gi;
      const double want =
          p0[i] - a.lr * ((mi / a.bias_correction1) / (std::sqrt(vi / a.bias_correction2) + a.eps) +
                          a.wd * p0[i]);
      ASSERT_EQ(m[i], static_cast<float>(mi)) << "m, pieces of " << piece << ", element " << i;
      ASSERT_EQ(v[i], static_cast<float>(vi)) << "v, pieces of " << piece << ", element " << i;
      ASSERT_EQ(p[i], static_cast<float>(want)) << "p, pieces of " << piece << ", element " << i;
    }
  }
}

// A step's AdamW updates as one call (Backend::adamw_many): each tensor's bits are those of its
// own adamw() call, for tensors of no element, of part of a block and of several blocks (32768
// elements each), with their own weight decay.
TEST(CpuBulkOps, AdamWManyGivesEachTensorItsOwnUpdate) {
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::vector<int64_t> sizes = {70001, 0, 1, 4096, 32768};
  struct Tensor {
    std::vector<float> p, g, m, v;
  };
  std::vector<Tensor> one(sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t)
    for (int64_t i = 0; i < sizes[t]; ++i) {
      one[t].p.push_back(normal(rng));
      one[t].g.push_back(normal(rng) * 1e-2f);
      one[t].m.push_back(normal(rng) * 1e-3f);
      one[t].v.push_back(std::abs(normal(rng)) * 1e-5f);
    }
  auto many = one;
  auto be = make_cpu_backend(2);
  const double lr = 1e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, gscale = 0.5;
  const double bc1 = 1.0 - b1 * b1, bc2 = 1.0 - b2 * b2;
  std::vector<Backend::AdamWTensor> list;
  for (size_t t = 0; t < sizes.size(); ++t) {
    const double wd = t % 2 ? 0.0 : 0.1;
    be->adamw(one[t].p.data(), one[t].g.data(), one[t].m.data(), one[t].v.data(), sizes[t], lr, b1,
              b2, eps, wd, gscale, bc1, bc2);
    list.push_back(
        {many[t].p.data(), many[t].g.data(), many[t].m.data(), many[t].v.data(), sizes[t], wd});
  }
  be->adamw_many(list.data(), list.size(), lr, b1, b2, eps, gscale, bc1, bc2);
  for (size_t t = 0; t < sizes.size(); ++t) {
    EXPECT_EQ(many[t].p, one[t].p) << "tensor " << t;
    EXPECT_EQ(many[t].m, one[t].m) << "tensor " << t;
    EXPECT_EQ(many[t].v, one[t].v) << "tensor " << t;
  }
}

// The check of the parameters after a step: a NaN or infinity at any position of any array
// (first and last element, a block's edges, the last array's tail) is found, the largest
// finite values are not, and neither are empty arrays.
TEST(CpuBulkOps, AnyNonfiniteManyFindsEveryBadValueAndNoFiniteOne) {
  const std::vector<int64_t> sizes = {5, 0, 70001, 1, 32768, 40000};
  std::vector<std::vector<float>> arrays;
  std::vector<const float*> ptrs;
  for (const int64_t n : sizes) {
    arrays.emplace_back(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      arrays.back()[static_cast<size_t>(i)] =
          i % 3 ? std::numeric_limits<float>::max() : -std::numeric_limits<float>::denorm_min();
  }
  for (const auto& a : arrays) ptrs.push_back(a.data());
  auto be = make_cpu_backend(2);
  EXPECT_FALSE(be->any_nonfinite_many(ptrs.data(), sizes.data(), sizes.size()));
  EXPECT_FALSE(be->any_nonfinite_many(nullptr, nullptr, 0));
  for (size_t a = 0; a < sizes.size(); ++a)
    for (const int64_t at :
         {int64_t{0}, int64_t{4095}, int64_t{4096}, int64_t{32767}, int64_t{65536}, sizes[a] - 1}) {
      if (at < 0 || at >= sizes[a]) continue;
      for (const float bad : kBad) {
        float& x = arrays[a][static_cast<size_t>(at)];
        const float kept = x;
        x = bad;
        EXPECT_TRUE(be->any_nonfinite_many(ptrs.data(), sizes.data(), sizes.size()))
            << "array " << a << ", element " << at << ", value " << bad;
        x = kept;
      }
    }
}

// The gradient norm's sum over many arrays in one call: the bits of sum_squares() on each, added
// in order (Backend's default), for arrays of no element, part of a block and several blocks.
TEST(CpuBulkOps, SumSquaresManyAddsEachArraysSumInOrder) {
  std::mt19937 rng(19);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const std::vector<int64_t> sizes = {5, 0, 70001, 1, 32768, 40000};
  std::vector<std::vector<float>> arrays;
  std::vector<const float*> ptrs;
  for (const int64_t n : sizes) {
    arrays.emplace_back();
    for (int64_t i = 0; i < n; ++i) arrays.back().push_back(normal(rng));
  }
  for (const auto& a : arrays) ptrs.push_back(a.data());
  auto be = make_cpu_backend(2);
  double want = 0.0;
  for (size_t a = 0; a < sizes.size(); ++a) want += be->sum_squares(ptrs[a], sizes[a]);
  const double got = be->sum_squares_many(ptrs.data(), sizes.data(), sizes.size());
  EXPECT_EQ(std::memcmp(&got, &want, sizeof got), 0) << got << " against " << want;
}

}  // namespace
}  // namespace moert
