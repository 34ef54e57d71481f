// Backend::routed_and_shared_ffn on the CPU: a MoE layer's routed experts and its first shared
// expert in one call give the bits of the routed call followed by the shared expert's FFN added
// into y set to x (the residual) or to zero, for every precision and weight layout, items of many
// rows and of few, and a decode step whose shared expert runs as column units; and an error of
// the shared expert names the layer's row.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "tests/unit/ffn_fixture.h"

namespace moert {
namespace {

using test::Ffn;
using test::plan_of;
using test::randv;
using test::same_bits;
using test::Vec;

struct Case {
  Precision precision;
  bool packed;  // bf16 weights as an inference session holds them: packed copies only
  int64_t dim, hidden, shared_hidden;
  int64_t rows;
  std::vector<int64_t> counts;  // assignments per expert
};

std::string case_name(const Case& c) {
  return std::string(c.precision == Precision::Bf16  ? (c.packed ? "bf16packed_" : "bf16_")
                     : c.precision == Precision::Fp8 ? "fp8_"
                                                     : "fp32_") +
         std::to_string(c.dim) + "x" + std::to_string(c.hidden) + "_shared" +
         std::to_string(c.shared_hidden) + "_rows" + std::to_string(c.rows);
}

Weight weight(const Ffn& f, int k, const Case& c) {
  return c.packed ? f.packed(k) : f.W(k, c.precision);
}

// Routed lists of 137 rows (three items), 5 and 16 (column units) and 17 rows; tokens drawn from
// the first 40 of 150 (each gathered row read about 3.6 times) or from all.
const std::vector<int64_t> kCounts{2 * kReduceRows + 9, 0, 5, 16, 17};

class RoutedAndShared : public ::testing::TestWithParam<std::tuple<Case, int64_t>> {};

TEST_P(RoutedAndShared, EqualsTheRoutedCallThenTheSharedExpert) {
  const auto& [c, drawn] = GetParam();
  const Precision prec = c.precision;
  std::mt19937 rng(11);
  const int64_t E = static_cast<int64_t>(c.counts.size()), rows = c.rows;
  auto be0 = make_cpu_backend(2, prec);
  const Ffn f(rng, E, *be0, c.dim, c.hidden), s(rng, 1, *be0, c.dim, c.shared_hidden);
  const int64_t D = c.dim, H = c.hidden, HS = c.shared_hidden;
  const auto pool = static_cast<int32_t>(std::min(drawn, rows));
  const DispatchPlan plan = plan_of(*be0, rows, c.counts, [&](int64_t) {
    return std::uniform_int_distribution<int32_t>(0, pool - 1)(rng);
  });
  const int64_t A = plan.num_assignments();
  const Vec x = randv(rows * D, rng);
  Vec room(A * D), want_perm(A * D), want_h1(A * H), want_h3(A * H);
  be0->dispatch_swiglu_ffn(plan, x.data(), room.data(), false, weight(f, 1, c), weight(f, 3, c),
                           weight(f, 2, c), want_perm.data(), want_h1.data(), want_h3.data(), D, H,
                           D);
  // y = x + shared(x), and y = 0 + shared(x), as the layer computed them in two calls.
  Vec want_y[2] = {Vec(rows * D, 0.0f), x}, want_s1(rows * HS), want_s3(rows * HS);
  for (Vec& y : want_y)
    be0->swiglu_ffn(x.data(), weight(s, 1, c), weight(s, 3, c), weight(s, 2, c), y.data(),
                    want_s1.data(), want_s3.data(), rows, D, HS, true);

  for (unsigned threads : {1u, 2u, 3u})
    for (bool keep : {false, true})
      for (bool hidden : {false, true})
        for (bool residual : {false, true}) {
          auto be = make_cpu_backend(threads, prec);
          const float nan = std::numeric_limits<float>::quiet_NaN();
          Vec kept(A * D, -7.0f), perm(A * D), h1(A * H), h3(A * H);
          Vec y(rows * D, nan), s1(rows * HS), s3(rows * HS);
          SharedExpert shared{weight(s, 1, c), weight(s, 3, c), weight(s, 2, c), HS,
                              residual,        y.data()};
          if (hidden) {
            shared.h1 = s1.data();
            shared.h3 = s3.data();
          }
          be->routed_and_shared_ffn(plan, x.data(), kept.data(), keep, weight(f, 1, c),
                                    weight(f, 3, c), weight(f, 2, c), perm.data(),
                                    hidden ? h1.data() : nullptr, hidden ? h3.data() : nullptr, D,
                                    H, D, shared);
          const std::string where = "threads " + std::to_string(threads) + " keep " +
                                    std::to_string(keep) + " hidden " + std::to_string(hidden) +
                                    " residual " + std::to_string(residual);
          EXPECT_TRUE(same_bits(perm, want_perm)) << where;
          EXPECT_TRUE(same_bits(y, want_y[residual])) << where;
          if (hidden) {
            EXPECT_TRUE(same_bits(h1, want_h1)) << where;
            EXPECT_TRUE(same_bits(h3, want_h3)) << where;
            EXPECT_TRUE(same_bits(s1, want_s1)) << where;
            EXPECT_TRUE(same_bits(s3, want_s3)) << where;
          }
          if (!keep) continue;
          Vec dispatched(A * D);
          be->dispatch(plan, x.data(), dispatched.data(), D);
          EXPECT_TRUE(same_bits(kept, dispatched)) << where;
        }
}

const Case kCases[] = {
    {Precision::Fp32, false, 20, 12, 8, 150, kCounts},
    {Precision::Fp32, false, 256, 40, 72, 150, kCounts},
    {Precision::Bf16, false, 130, 96, 64, 150, kCounts},
    {Precision::Bf16, true, 130, 96, 64, 150, kCounts},
    {Precision::Fp8, false, 200, 136, 128, 150, kCounts},
    // Decode steps: a shared expert of 2^20 weights over few rows runs as column units.
    {Precision::Fp32, false, 1024, 64, 1024, 1, {1, 0, 1, 0}},
    {Precision::Bf16, true, 1024, 64, 1024, 1, {1, 0, 1, 0}},
    {Precision::Bf16, true, 1024, 64, 1024, 8, {8, 4, 0, 4}},
};

INSTANTIATE_TEST_SUITE_P(Precisions, RoutedAndShared,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(int64_t{40}, int64_t{150})),
                         [](const auto& p) {
                           return case_name(std::get<0>(p.param)) + "_drawn" +
                                  std::to_string(std::get<1>(p.param));
                         });

// A NaN that only the shared expert meets (its row routed to no expert) fails an FP8 call with
// the layer's row, as the layer's separate shared call named it; the routed experts' errors keep
// their routing order for the layer to map.
TEST(RoutedAndSharedErrors, TheSharedExpertNamesTheLayersRow) {
  std::mt19937 rng(12);
  auto be = make_cpu_backend(2, Precision::Fp8);
  const int64_t D = 200, H = 136, HS = 128, rows = 150;
  const Ffn f(rng, 5, *be, D, H), s(rng, 1, *be, D, HS);
  const DispatchPlan plan = plan_of(*be, rows, kCounts, [&](int64_t) {
    return std::uniform_int_distribution<int32_t>(0, 39)(rng);
  });
  const int64_t A = plan.num_assignments();
  Vec x = randv(rows * D, rng), room(A * D), perm(A * D), y(rows * D);
  x[97 * D + 31] = std::numeric_limits<float>::quiet_NaN();
  const SharedExpert shared{
      s.W(1, Precision::Fp8), s.W(3, Precision::Fp8), s.W(2, Precision::Fp8), HS, true, y.data()};
  try {
    be->routed_and_shared_ffn(plan, x.data(), room.data(), false, f.W(1, Precision::Fp8),
                              f.W(3, Precision::Fp8), f.W(2, Precision::Fp8), perm.data(), nullptr,
                              nullptr, D, H, D, shared);
    FAIL() << "a NaN reached the FP8 quantizer without an error";
  } catch (const RowError& e) {
    EXPECT_TRUE(e.layer_row());
    EXPECT_EQ(e.row(), 97);
    EXPECT_EQ(e.code(), Code::Numeric);
    EXPECT_NE(std::string(e.what()).find("column 31"), std::string::npos) << e.what();
  }
  // Routed to an expert, the row is named in routing order: the layer maps it.
  x[97 * D + 31] = 0.5f;
  x[7 * D + 3] = std::numeric_limits<float>::infinity();
  bool routed = false;
  for (int64_t a = 0; a < A; ++a) routed = routed || plan.token.data()[a] == 7;
  ASSERT_TRUE(routed);
  try {
    be->routed_and_shared_ffn(plan, x.data(), room.data(), false, f.W(1, Precision::Fp8),
                              f.W(3, Precision::Fp8), f.W(2, Precision::Fp8), perm.data(), nullptr,
                              nullptr, D, H, D, shared);
    FAIL() << "an infinity reached the FP8 quantizer without an error";
  } catch (const RowError& e) {
    if (e.layer_row()) {
      EXPECT_EQ(e.row(), 7);
    } else {
      ASSERT_GE(e.row(), 0);
      ASSERT_LT(e.row(), A);
      EXPECT_EQ(plan.token.data()[e.row()], 7);
    }
  }
}

// Where both fail, the call fails as the separate calls in their order did: the routed experts'
// error first, even when theirs comes in a down GEMM of a column-unit item (the call's second
// pass) and the shared expert's in its first. Row 120, of 1e36 everywhere, overflows both FFNs'
// activations; it is routed once, to the 5-row list (assignment 139), whose item is cut.
TEST(RoutedAndSharedErrors, TheRoutedExpertsFailureComesFirst) {
  std::mt19937 rng(13);
  const int64_t D = 200, H = 136, HS = 128, rows = 150;
  auto be0 = make_cpu_backend(1, Precision::Fp8);
  const Ffn f(rng, 5, *be0, D, H), s(rng, 1, *be0, D, HS);
  const DispatchPlan plan = plan_of(*be0, rows, kCounts, [&](int64_t a) {
    return a == 139 ? 120 : std::uniform_int_distribution<int32_t>(0, 39)(rng);
  });
  const int64_t A = plan.num_assignments();
  Vec x = randv(rows * D, rng), room(A * D), perm(A * D), y(rows * D);
  std::fill(x.begin() + 120 * D, x.begin() + 121 * D, 1e36f);
  const SharedExpert shared{
      s.W(1, Precision::Fp8), s.W(3, Precision::Fp8), s.W(2, Precision::Fp8), HS, true, y.data()};
  for (unsigned threads : {1u, 2u, 3u}) {
    auto be = make_cpu_backend(threads, Precision::Fp8);
    try {
      be->routed_and_shared_ffn(plan, x.data(), room.data(), false, f.W(1, Precision::Fp8),
                                f.W(3, Precision::Fp8), f.W(2, Precision::Fp8), perm.data(),
                                nullptr, nullptr, D, H, D, shared);
      ADD_FAILURE() << "an overflowed activation reached the FP8 quantizer without an error";
    } catch (const RowError& e) {
      EXPECT_FALSE(e.layer_row()) << threads << " threads: " << e.what();
      EXPECT_EQ(e.row(), 139) << threads << " threads: " << e.what();
      EXPECT_NE(std::string(e.what()).find("activation"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace moert
