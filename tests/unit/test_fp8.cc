// Block-scaled FP8 on the CPU (kernels/cpu/fp8.h): E4M3 encoding against hand-computed codes and
// an independent nearest-value search; the three quantizers' codes, scales and layouts; the three
// emulated GEMMs against a float64 product of the same dequantized operands; the work-item
// contract; and the quantization error against the unquantized fp32 product, printed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor_codec.h"
#include "kernels/cpu/fp8.h"
#include "kernels/cpu/math.h"
#include "kernels/fp8_rules.h"

namespace moert {
namespace {

namespace rules = moert::fp8;
using cpu::fp8::Blocks;
using cpu::fp8::ColumnTiles;
using cpu::fp8::QuantizeOptions;
using cpu::fp8::RowTiles;
using rules::kBlock;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kEps32 = 0x1p-24;

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---- E4M3 encoding

TEST(Fp8Encode, HandComputedCodes) {
  EXPECT_EQ(rules::e4m3_encode(448.0f), 0x7E);  // largest finite: 1.75 * 2^8
  EXPECT_EQ(rules::e4m3_encode(-448.0f), 0xFE);
  EXPECT_EQ(rules::e4m3_encode(1.0f), 0x38);         // exponent field 7 = bias
  EXPECT_EQ(rules::e4m3_encode(0x1p-6f), 0x08);      // smallest normal
  EXPECT_EQ(rules::e4m3_encode(240.0f), 0x77);       // 1.875 * 2^7
  EXPECT_EQ(rules::e4m3_encode(-224.0f), 0xF6);      // -1.75 * 2^7
  EXPECT_EQ(rules::e4m3_encode(0x1p-9f), 0x01);      // smallest subnormal
  EXPECT_EQ(rules::e4m3_encode(7 * 0x1p-9f), 0x07);  // largest subnormal
  EXPECT_EQ(rules::e4m3_encode(0.0f), 0x00);
  EXPECT_EQ(rules::e4m3_encode(-0.0f), 0x80);  // the sign of zero is kept
}

TEST(Fp8Encode, TiesGoToEven) {
  EXPECT_EQ(rules::e4m3_encode(1.0625f), 0x38);  // between 1 (even) and 1.125
  EXPECT_EQ(rules::e4m3_encode(1.1875f), 0x3A);  // between 1.125 and 1.25 (even)
  EXPECT_EQ(rules::e4m3_encode(-1.0625f), 0xB8);
  EXPECT_EQ(rules::e4m3_encode(0x1p-10f), 0x00);       // half the smallest subnormal: to 0
  EXPECT_EQ(rules::e4m3_encode(3 * 0x1p-10f), 0x02);   // 1.5 steps of 2^-9: to 2
  EXPECT_EQ(rules::e4m3_encode(15 * 0x1p-10f), 0x08);  // 7.5 steps: to 8, the smallest normal
  EXPECT_EQ(rules::e4m3_encode(400.0f), 0x7C);         // between 384 (even) and 416
  EXPECT_EQ(rules::e4m3_encode(std::nextafter(0x1p-10f, 1.0f)), 0x01);
  EXPECT_EQ(rules::e4m3_encode(std::nextafter(1.0625f, 2.0f)), 0x39);
}

TEST(Fp8Encode, SaturatesAndMarksNaN) {
  for (float x : {449.0f, 464.0f, 479.0f, 480.0f, 500.0f, 1e30f, 3.4e38f, kInf})
    EXPECT_EQ(rules::e4m3_encode(x), 0x7E) << x;
  for (float x : {-449.0f, -1e6f, -kInf}) EXPECT_EQ(rules::e4m3_encode(x), 0xFE) << x;
  EXPECT_EQ(rules::e4m3_encode(kNaN), 0x7F);
  EXPECT_EQ(rules::e4m3_encode(-kNaN), 0xFF);
  EXPECT_EQ(rules::e4m3_encode(1e-30f), 0x00);
  EXPECT_EQ(rules::e4m3_encode(from_bits(1)), 0x00);  // the smallest float subnormal
}

TEST(Fp8Encode, EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;  // NaN
    EXPECT_EQ(rules::e4m3_encode(e4m3_to_float(static_cast<uint8_t>(c))), c) << c;
  }
}

// An independent reference: the nearest finite E4M3 value by search over the decoder's values in
// double (codes 0x00..0x7E increase with their values), ties to the even code; from 448 up
// saturated.
uint8_t nearest_code(float x) {
  static const std::vector<double> values = [] {
    std::vector<double> v;
    for (int c = 0; c <= 0x7E; ++c) v.push_back(e4m3_to_float(static_cast<uint8_t>(c)));
    return v;
  }();
  const double v = std::fabs(static_cast<double>(x));
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  if (v >= 448.0) return sign | 0x7E;
  const auto hi = std::lower_bound(values.begin(), values.end(), v);  // first value >= v
  int best = static_cast<int>(hi - values.begin());
  if (best > 0) {
    const double up = values[static_cast<size_t>(best)] - v,
                 down = v - values[static_cast<size_t>(best - 1)];
    if (down < up || (down == up && ((best - 1) & 1) == 0)) --best;
  }
  return static_cast<uint8_t>(sign | best);
}

TEST(Fp8Encode, MatchesNearestValueSearch) {
  // Every 1031st float bit pattern from 0 to 500.0f, both signs, plus every midpoint between two
  // neighbouring codes and the floats either side of it.
  std::vector<float> xs;
  for (uint32_t u = 0; u <= to_bits(500.0f); u += 1031) xs.push_back(from_bits(u));
  for (int c = 0; c < 0x7E; ++c) {
    const float mid =
        (e4m3_to_float(static_cast<uint8_t>(c)) + e4m3_to_float(static_cast<uint8_t>(c + 1))) / 2;
    xs.insert(xs.end(), {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)});
  }
  int checked = 0;
  for (float x : xs)
    for (float s : {x, -x}) {
      ASSERT_EQ(rules::e4m3_encode(s), nearest_code(s)) << s;
      ++checked;
    }
  EXPECT_GT(checked, 100000);
}

// ---- Scales

TEST(Fp8Scale, AmaxMapsTo448AndPowerOfTwoRoundsUp) {
  EXPECT_EQ(rules::tile_scale(448.0f, false), 1.0f);
  EXPECT_EQ(rules::tile_scale(896.0f, false), 2.0f);
  EXPECT_EQ(rules::tile_scale(100.0f, false), 100.0f / 448.0f);
  EXPECT_EQ(rules::tile_scale(100.0f, true), 0.25f);  // 0.2232... up to 2^-2
  EXPECT_EQ(rules::tile_scale(56.0f, true), 0.125f);  // already 2^-3: kept
  EXPECT_EQ(rules::tile_scale(0.0f, false), rules::kZeroTileScale);
  EXPECT_EQ(rules::tile_scale(0.0f, true), rules::kZeroTileScale);
  // Tiny tiles: the scale stays a normal float.
  EXPECT_EQ(rules::tile_scale(1e-40f, false), rules::kMinScale);
  EXPECT_EQ(rules::tile_scale(1e-40f, true), rules::kMinScale);
  EXPECT_EQ(rules::tile_scale(3.4e38f, true), 0x1p120f);
}

// ---- Quantizers

// A matrix with a sentinel-filled margin of `pad` columns, to show what is never written.
struct Padded {
  int64_t rows, cols, ld;
  std::vector<uint8_t> codes;
  Padded(int64_t r, int64_t c, int64_t pad)
      : rows(r), cols(c), ld(c + pad), codes(r * (c + pad), 0xAB) {}
  uint8_t at(int64_t r, int64_t c) const { return codes[static_cast<size_t>(r * ld + c)]; }
  bool margin_untouched() const {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = cols; c < ld; ++c)
        if (at(r, c) != 0xAB) return false;
    return true;
  }
};

TEST(Fp8Quantize, RowTilesHandComputed) {
  // Two rows, 130 columns: a full tile and a partial one of 2 columns.
  const int64_t rows = 2, cols = 130;
  std::vector<float> x(rows * cols, 0.0f);
  auto at = [&](int64_t r, int64_t c) -> float& { return x[static_cast<size_t>(r * cols + c)]; };
  at(0, 0) = 448.0f;  // tile (0, 0): amax 448, scale 1
  at(0, 1) = -224.0f;
  at(0, 2) = 0x1p-9f;   // the smallest subnormal survives at scale 1
  at(0, 3) = 0x1p-10f;  // a tie to 0
  at(0, 4) = -0.0f;
  at(1, 0) = 896.0f;   // tile (1, 0): amax 896, scale 2
  at(1, 1) = 1.0f;     // -> 0.5
  at(1, 2) = 1e6f;     // no: amax is then 1e6
  at(1, 2) = -896.0f;  // -> -448
  at(0, 128) = 3.0f;   // partial tile (0, 1): amax 3, scale 3/448
  at(0, 129) = -1.5f;  // -> -224
  // Row 1's partial tile is all zero (one -0): scale 1.
  at(1, 129) = -0.0f;
  Padded q(rows, cols, 5);
  const int64_t sld = rules::tile_scale_ld(rows);
  ASSERT_EQ(sld, 4);
  std::vector<float> scales(2 * sld, -7.0f);
  cpu::fp8::quantize_row_tiles(x.data(), cols, rows, cols, q.codes.data(), q.ld, scales.data(), sld,
                               {});
  EXPECT_EQ(scales[0], 1.0f);
  EXPECT_EQ(scales[1], 2.0f);
  EXPECT_EQ(scales[sld + 0], 3.0f / 448.0f);
  EXPECT_EQ(scales[sld + 1], 1.0f);
  // The scale rows' padding is left alone.
  EXPECT_EQ(scales[2], -7.0f);
  EXPECT_EQ(scales[sld + 3], -7.0f);
  EXPECT_EQ(q.at(0, 0), 0x7E);
  EXPECT_EQ(q.at(0, 1), 0xF6);
  EXPECT_EQ(q.at(0, 2), 0x01);
  EXPECT_EQ(q.at(0, 3), 0x00);
  EXPECT_EQ(q.at(0, 4), 0x80);
  EXPECT_EQ(q.at(0, 5), 0x00);
  EXPECT_EQ(q.at(1, 0), 0x7E);
  EXPECT_EQ(q.at(1, 1), 0x30);  // 0.5
  EXPECT_EQ(q.at(1, 2), 0xFE);
  EXPECT_EQ(q.at(0, 128), 0x7E);
  EXPECT_EQ(q.at(0, 129), 0xF6);
  EXPECT_EQ(q.at(1, 128), 0x00);
  EXPECT_EQ(q.at(1, 129), 0x80);
  EXPECT_TRUE(q.margin_untouched());
}

TEST(Fp8Quantize, PowerOfTwoScales) {
  // amax 100: scale 100/448 = 0.223 rounds up to 0.25, so 100 -> 400, a tie between 384 and 416
  // that goes to 384; the largest value now sits below 448.
  std::vector<float> x = {100.0f, -3.0f, 0.0f};
  std::vector<uint8_t> codes(3);
  float scale = 0;
  QuantizeOptions opt;
  opt.power_of_two_scales = true;
  cpu::fp8::quantize_row_tiles(x.data(), 3, 1, 3, codes.data(), 3, &scale, 1, opt);
  EXPECT_EQ(scale, 0.25f);
  EXPECT_EQ(codes[0], 0x7C);                        // 384
  EXPECT_EQ(codes[1], rules::e4m3_encode(-12.0f));  // exact: -12 = -1.5 * 2^3
  EXPECT_EQ(e4m3_to_float(codes[1]) * scale, -3.0f);
  // Without the option the same tile maps 100 to 448 (up to the rounding of 100/448).
  cpu::fp8::quantize_row_tiles(x.data(), 3, 1, 3, codes.data(), 3, &scale, 1, {});
  EXPECT_EQ(scale, 100.0f / 448.0f);
  EXPECT_EQ(codes[0], 0x7E);
}

TEST(Fp8Quantize, ValuesNearTheLargestFloatDecodeFinite) {
  // amax 3.3e38: the power-of-two scale is 2^120, and 3.3e38 / 2^120 = 248.3 rounds to 256,
  // whose value 2^128 is past the largest float: the code stops at 240 instead. Every layout,
  // both kinds of scale, and the largest float itself.
  const float big = std::numeric_limits<float>::max();
  for (const bool power_of_two : {true, false}) {
    QuantizeOptions opt;
    opt.power_of_two_scales = power_of_two;
    for (const float amax : {3.3e38f, 3.2975e38f, big}) {
      // A 2 x 3 matrix whose every row and column holds +-amax.
      const std::vector<float> x = {amax, -amax, 2e38f, -amax, amax, -3e38f};
      std::vector<uint8_t> codes(6);
      std::vector<float> scales(8);
      auto check = [&](const char* layout, auto scale_of) {
        for (size_t i = 0; i < x.size(); ++i) {
          const float v = e4m3_to_float(codes[i]) * scale_of(i / 3, i % 3);
          EXPECT_TRUE(std::isfinite(v)) << layout << " " << x[i] << " -> code 0x" << std::hex
                                        << int{codes[i]} << " power_of_two " << power_of_two;
          EXPECT_LE(std::abs(v - x[i]), 0.07f * std::abs(x[i])) << layout << " " << x[i];
        }
      };
      cpu::fp8::quantize_row_tiles(x.data(), 3, 2, 3, codes.data(), 3, scales.data(), 4, opt);
      check("row tiles", [&](size_t r, size_t) { return scales[r]; });
      cpu::fp8::quantize_column_tiles(x.data(), 3, 2, 3, codes.data(), 3, scales.data(), 4, opt);
      check("column tiles", [&](size_t, size_t c) { return scales[c]; });
      cpu::fp8::quantize_blocks(x.data(), 3, 2, 3, codes.data(), 3, scales.data(), 4, opt);
      check("blocks", [&](size_t, size_t) { return scales[0]; });
    }
  }
  EXPECT_EQ(rules::max_code(0x1p120f), 0x77u);  // 240
  EXPECT_EQ(rules::max_code(0x1p119f), rules::kE4M3MaxCode);
  EXPECT_EQ(rules::quantize_value(3.3e38f, 0x1p120f), 0x77);
  EXPECT_EQ(rules::quantize_value(-3.3e38f, 0x1p120f), 0xF7);
}

TEST(Fp8Quantize, TinyTileKeepsANormalScale) {
  std::vector<float> x = {1e-40f, -5e-41f};
  std::vector<uint8_t> codes(2);
  float scale = 0;
  cpu::fp8::quantize_row_tiles(x.data(), 2, 1, 2, codes.data(), 2, &scale, 1, {});
  EXPECT_EQ(scale, rules::kMinScale);
  // 1e-40 / 2^-126 = 0.00851 = 4.36 steps of 2^-9.
  EXPECT_EQ(codes[0], 0x04);
  EXPECT_EQ(codes[1], 0x82);
}

TEST(Fp8Quantize, NonFiniteIsANumericErrorNamingWhere) {
  const int64_t rows = 3, cols = 200;
  std::vector<float> x(rows * cols, 1.0f);
  std::vector<uint8_t> codes(rows * cols);
  std::vector<float> scales(2 * 4 * 2 * 128);
  QuantizeOptions opt;
  opt.what = "expert 5 W1";
  opt.row_offset = 1000;
  for (float bad : {kNaN, kInf, -kInf}) {
    x[2 * cols + 150] = bad;
    auto expect_error = [&](auto&& call, const std::string& where) {
      try {
        call();
        ADD_FAILURE() << "no error for " << bad;
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), Code::Numeric);
        const std::string msg = e.what();
        EXPECT_NE(msg.find("expert 5 W1"), std::string::npos) << msg;
        EXPECT_NE(msg.find(where), std::string::npos) << msg;
      }
    };
    expect_error(
        [&] {
          cpu::fp8::quantize_row_tiles(x.data(), cols, rows, cols, codes.data(), cols,
                                       scales.data(), 4, opt);
        },
        "row 1002, column 150");
    expect_error(
        [&] {
          cpu::fp8::quantize_column_tiles(x.data(), cols, rows, cols, codes.data(), cols,
                                          scales.data(), cols, opt);
        },
        "row 1002, column 150");
    expect_error(
        [&] {
          cpu::fp8::quantize_blocks(x.data(), cols, rows, cols, codes.data(), cols, scales.data(),
                                    4, opt);
        },
        "row 1002, column 150");
  }
}

std::vector<float> randn(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Every tile of x (rows x cols) scaled by its own power of ten in [-range, range], so that tiles'
// magnitudes differ by up to 10^(2 range): rows and 128-column groups for row tiles and blocks.
void scale_badly(std::vector<float>& x, int64_t rows, int64_t cols, std::mt19937& rng,
                 double range) {
  std::uniform_real_distribution<double> u(-range, range);
  std::vector<double> row(static_cast<size_t>(rows)),
      group(static_cast<size_t>(rules::blocks_of(cols)));
  for (auto& v : row) v = u(rng);
  for (auto& v : group) v = u(rng);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      x[static_cast<size_t>(r * cols + c)] *= static_cast<float>(std::pow(
          10.0, (row[static_cast<size_t>(r)] + group[static_cast<size_t>(c / kBlock)]) / 2));
}

TEST(Fp8Quantize, ColumnTilesAreRowTilesOfTheTranspose) {
  std::mt19937 rng(3);
  const int64_t rows = 300, cols = 77;
  auto x = randn(rows * cols, rng);
  scale_badly(x, rows, cols, rng, 6);
  std::vector<float> xt(cols * rows);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      xt[static_cast<size_t>(c * rows + r)] = x[static_cast<size_t>(r * cols + c)];
  for (bool pow2 : {false, true}) {
    QuantizeOptions opt;
    opt.power_of_two_scales = pow2;
    const int64_t tiles = rules::blocks_of(rows);
    std::vector<uint8_t> cc(rows * cols), rc(cols * rows);
    std::vector<float> cs(tiles * cols), rs(tiles * cols);
    cpu::fp8::quantize_column_tiles(x.data(), cols, rows, cols, cc.data(), cols, cs.data(), cols,
                                    opt);
    cpu::fp8::quantize_row_tiles(xt.data(), rows, cols, rows, rc.data(), rows, rs.data(), cols,
                                 opt);
    EXPECT_EQ(cs, rs);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        ASSERT_EQ(cc[static_cast<size_t>(r * cols + c)], rc[static_cast<size_t>(c * rows + r)]);
  }
}

TEST(Fp8Quantize, BlocksHandComputedWithPartialBlocks) {
  // 130 x 260: blocks of 128 x 128, 128 x 4, 2 x 128, 2 x 4 at the edges... and 2 x 128 between.
  const int64_t rows = 130, cols = 260;
  std::vector<float> x(rows * cols, 0.0f);
  auto at = [&](int64_t r, int64_t c) -> float& { return x[static_cast<size_t>(r * cols + c)]; };
  at(5, 7) = -448.0f;    // block (0, 0)
  at(100, 200) = 56.0f;  // block (0, 1)
  at(127, 259) = 7.0f;   // block (0, 2), partial in columns: 4 wide
  at(129, 3) = 0.5f;     // block (1, 0), partial in rows: 2 tall
  // block (1, 1) is all zero; block (1, 2) has one value
  at(128, 256) = -896.0f;
  Padded q(rows, cols, 3);
  const int64_t sld = rules::block_scale_ld(cols);
  ASSERT_EQ(sld, 4);
  std::vector<float> scales(2 * sld, -7.0f);
  cpu::fp8::quantize_blocks(x.data(), cols, rows, cols, q.codes.data(), q.ld, scales.data(), sld,
                            {});
  EXPECT_EQ(scales[0], 1.0f);
  EXPECT_EQ(scales[1], 56.0f / 448.0f);
  EXPECT_EQ(scales[2], 7.0f / 448.0f);
  EXPECT_EQ(scales[3], -7.0f);  // padding
  EXPECT_EQ(scales[sld + 0], 0.5f / 448.0f);
  EXPECT_EQ(scales[sld + 1], 1.0f);
  EXPECT_EQ(scales[sld + 2], 2.0f);
  EXPECT_EQ(q.at(5, 7), 0xFE);
  EXPECT_EQ(q.at(100, 200), 0x7E);
  EXPECT_EQ(q.at(127, 259), 0x7E);
  EXPECT_EQ(q.at(129, 3), 0x7E);
  EXPECT_EQ(q.at(128, 256), 0xFE);
  EXPECT_EQ(q.at(0, 0), 0x00);
  EXPECT_TRUE(q.margin_untouched());
}

// Dequantized values lie within half a step of E4M3 of the input: relative 2^-4 for normal codes,
// absolute 2^-10 scale for subnormal ones.
TEST(Fp8Quantize, DequantizedIsWithinHalfAStep) {
  std::mt19937 rng(5);
  const int64_t rows = 150, cols = 300;
  auto x = randn(rows * cols, rng);
  scale_badly(x, rows, cols, rng, 10);
  for (bool pow2 : {false, true}) {
    QuantizeOptions opt;
    opt.power_of_two_scales = pow2;
    std::vector<uint8_t> codes(rows * cols);
    std::vector<float> y(rows * cols);
    auto check = [&](auto scale_of, const char* kind) {
      double worst = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const double v = x[static_cast<size_t>(r * cols + c)], s = scale_of(r, c);
          const double d = std::fabs(double{y[static_cast<size_t>(r * cols + c)]} - v);
          const double bound = std::max(std::fabs(v) * 0x1p-4, s * 0x1p-10) * (1 + 1e-6);
          worst = std::max(worst, d / bound);
        }
      EXPECT_LE(worst, 1.0) << kind << " pow2 " << pow2;
    };
    const int64_t sld = rules::tile_scale_ld(rows);
    std::vector<float> rs(rules::blocks_of(cols) * sld);
    cpu::fp8::quantize_row_tiles(x.data(), cols, rows, cols, codes.data(), cols, rs.data(), sld,
                                 opt);
    cpu::fp8::dequantize_row_tiles({codes.data(), cols, rs.data(), sld}, rows, cols, y.data(),
                                   cols);
    check([&](int64_t r, int64_t c) { return rs[static_cast<size_t>(c / kBlock * sld + r)]; },
          "row tiles");
    const int64_t bld = rules::block_scale_ld(cols);
    std::vector<float> bs(rules::blocks_of(rows) * bld);
    cpu::fp8::quantize_blocks(x.data(), cols, rows, cols, codes.data(), cols, bs.data(), bld, opt);
    cpu::fp8::dequantize_blocks({codes.data(), cols, bs.data(), bld}, rows, cols, y.data(), cols);
    check([&](int64_t r,
              int64_t c) { return bs[static_cast<size_t>(r / kBlock * bld + c / kBlock)]; },
          "blocks");
    std::vector<float> cs(rules::blocks_of(rows) * cols);
    cpu::fp8::quantize_column_tiles(x.data(), cols, rows, cols, codes.data(), cols, cs.data(), cols,
                                    opt);
    cpu::fp8::dequantize_column_tiles({codes.data(), cols, cs.data(), cols}, rows, cols, y.data(),
                                      cols);
    check([&](int64_t r, int64_t c) { return cs[static_cast<size_t>(r / kBlock * cols + c)]; },
          "column tiles");
  }
}

// ---- GEMMs

// Quantized operands and their dequantized values in double (code value times scale, exact).
struct QRows {
  int64_t rows, cols, sld;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<double> deq;
  QRows(const std::vector<float>& x, int64_t r, int64_t c, bool pow2)
      : rows(r),
        cols(c),
        sld(rules::tile_scale_ld(r)),
        codes(r * c),
        scales(rules::blocks_of(c) * sld),
        deq(r * c) {
    QuantizeOptions opt;
    opt.power_of_two_scales = pow2;
    cpu::fp8::quantize_row_tiles(x.data(), c, r, c, codes.data(), c, scales.data(), sld, opt);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j)
        deq[static_cast<size_t>(i * c + j)] =
            double{e4m3_to_float(codes[static_cast<size_t>(i * c + j)])} *
            scales[static_cast<size_t>(j / kBlock * sld + i)];
  }
  RowTiles view() const { return {codes.data(), cols, scales.data(), sld}; }
};

struct QBlocks {
  int64_t rows, cols, sld;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<double> deq;
  QBlocks(const std::vector<float>& x, int64_t r, int64_t c, bool pow2)
      : rows(r),
        cols(c),
        sld(rules::block_scale_ld(c)),
        codes(r * c),
        scales(rules::blocks_of(r) * sld),
        deq(r * c) {
    QuantizeOptions opt;
    opt.power_of_two_scales = pow2;
    cpu::fp8::quantize_blocks(x.data(), c, r, c, codes.data(), c, scales.data(), sld, opt);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j)
        deq[static_cast<size_t>(i * c + j)] =
            double{e4m3_to_float(codes[static_cast<size_t>(i * c + j)])} *
            scales[static_cast<size_t>(i / kBlock * sld + j / kBlock)];
  }
  Blocks view() const { return {codes.data(), cols, scales.data(), sld}; }
};

struct QColumns {
  int64_t rows, cols;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<double> deq;
  QColumns(const std::vector<float>& x, int64_t r, int64_t c, bool pow2)
      : rows(r), cols(c), codes(r * c), scales(rules::blocks_of(r) * c), deq(r * c) {
    QuantizeOptions opt;
    opt.power_of_two_scales = pow2;
    cpu::fp8::quantize_column_tiles(x.data(), c, r, c, codes.data(), c, scales.data(), c, opt);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j)
        deq[static_cast<size_t>(i * c + j)] =
            double{e4m3_to_float(codes[static_cast<size_t>(i * c + j)])} *
            scales[static_cast<size_t>(i / kBlock * c + j)];
  }
  ColumnTiles view() const { return {codes.data(), cols, scales.data(), cols}; }
};

// The float64 product C[i, j] = sum_t A(i, t) B(j, t) of dequantized operands given as
// accessors, with sum_t |A(i, t) B(j, t)| beside it for the elementwise bound.
template <typename A, typename B>
void reference(int64_t m, int64_t n, int64_t k, A a, B b, std::vector<double>& c,
               std::vector<double>& mag) {
  c.assign(static_cast<size_t>(m * n), 0.0);
  mag.assign(static_cast<size_t>(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0, t = 0;
      for (int64_t l = 0; l < k; ++l) {
        const double p = a(i, l) * b(j, l);
        s += p;
        t += std::fabs(p);
      }
      c[static_cast<size_t>(i * n + j)] = s;
      mag[static_cast<size_t>(i * n + j)] = t;
    }
}

// Norm-wise relative error against the float64 product, and the largest elementwise error in units
// of the fp32 bound (block length + number of blocks + 3 roundings) * 2^-24 * sum |products|.
struct Agreement {
  double normwise = 0, elementwise = 0;
};
Agreement agree(const std::vector<float>& got, const std::vector<double>& want,
                const std::vector<double>& mag, int64_t k) {
  const double gamma = static_cast<double>(kBlock + rules::blocks_of(k) + 3) * kEps32;
  double num = 0, den = 0, worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = double{got[i]} - want[i];
    num += d * d;
    den += want[i] * want[i];
    // The fp32 result's own rounding and the smallest normal float bound what tiny sums can show.
    const double bound = gamma * mag[i] + std::fabs(want[i]) * kEps32 + 1e-37;
    worst = std::max(worst, std::fabs(d) / bound);
  }
  return {den > 0 ? std::sqrt(num / den) : std::sqrt(num), worst};
}

struct Shape {
  int64_t m, n, k;
};
// Sizes that are and are not multiples of 128, partial blocks in every dimension, and 1s.
const Shape kShapes[] = {{1, 1, 1},       {3, 5, 7},      {37, 53, 300},  {128, 128, 128},
                         {130, 257, 129}, {200, 64, 384}, {64, 300, 1000}};

enum class Operands { Random, BadlyScaled };

std::vector<float> operand(int64_t rows, int64_t cols, std::mt19937& rng, Operands kind) {
  auto x = randn(static_cast<size_t>(rows * cols), rng);
  if (kind == Operands::BadlyScaled) scale_badly(x, rows, cols, rng, 15);
  return x;
}

class Fp8Gemm : public ::testing::TestWithParam<std::tuple<Operands, bool>> {};

TEST_P(Fp8Gemm, FpropMatchesFloat64OfDequantized) {
  const auto [kind, pow2] = GetParam();
  std::mt19937 rng(11);
  for (const Shape& s : kShapes) {
    QRows x(operand(s.m, s.k, rng, kind), s.m, s.k, pow2);
    QBlocks w(operand(s.n, s.k, rng, kind), s.n, s.k, pow2);
    std::vector<double> want, mag;
    reference(
        s.m, s.n, s.k,
        [&](int64_t i, int64_t l) { return x.deq[static_cast<size_t>(i * s.k + l)]; },
        [&](int64_t j, int64_t l) { return w.deq[static_cast<size_t>(j * s.k + l)]; }, want, mag);
    for (bool accumulate : {false, true}) {
      auto y0 = randn(static_cast<size_t>(s.m * s.n), rng);
      std::vector<float> y = y0;
      std::vector<float> scratch(cpu::fp8::gemm_fprop_scratch_floats(s.m, s.n, s.k));
      cpu::fp8::gemm_fprop(x.view(), w.view(), y.data(), s.n, s.m, s.n, s.k, accumulate,
                           scratch.data());
      std::vector<double> target = want;
      if (accumulate)
        for (size_t i = 0; i < target.size(); ++i) target[i] += y0[i];
      const Agreement a = agree(y, target, mag, s.k);
      EXPECT_LE(a.normwise, 1e-6) << s.m << "x" << s.n << "x" << s.k;
      EXPECT_LE(a.elementwise, 1.0) << s.m << "x" << s.n << "x" << s.k;
    }
  }
}

TEST_P(Fp8Gemm, DgradMatchesFloat64OfDequantized) {
  const auto [kind, pow2] = GetParam();
  std::mt19937 rng(12);
  for (const Shape& s : kShapes) {
    // dx[m, k] = dy[m, n] W[n, k]: the reduction is n.
    QRows dy(operand(s.m, s.n, rng, kind), s.m, s.n, pow2);
    QBlocks w(operand(s.n, s.k, rng, kind), s.n, s.k, pow2);
    std::vector<double> want, mag;
    reference(
        s.m, s.k, s.n,
        [&](int64_t i, int64_t l) { return dy.deq[static_cast<size_t>(i * s.n + l)]; },
        [&](int64_t j, int64_t l) { return w.deq[static_cast<size_t>(l * s.k + j)]; }, want, mag);
    for (bool accumulate : {false, true}) {
      auto dx0 = randn(static_cast<size_t>(s.m * s.k), rng);
      std::vector<float> dx = dx0;
      std::vector<float> scratch(cpu::fp8::gemm_dgrad_scratch_floats(s.m, s.n, s.k));
      cpu::fp8::gemm_dgrad(dy.view(), w.view(), dx.data(), s.k, s.m, s.n, s.k, accumulate,
                           scratch.data());
      if (accumulate)
        for (size_t i = 0; i < want.size(); ++i) want[i] += dx0[i];
      const Agreement a = agree(dx, want, mag, s.n);
      if (accumulate)
        for (size_t i = 0; i < want.size(); ++i) want[i] -= dx0[i];
      EXPECT_LE(a.normwise, 1e-6) << s.m << "x" << s.n << "x" << s.k;
      EXPECT_LE(a.elementwise, 1.0) << s.m << "x" << s.n << "x" << s.k;
    }
  }
}

TEST_P(Fp8Gemm, WgradMatchesFloat64OfDequantized) {
  const auto [kind, pow2] = GetParam();
  std::mt19937 rng(13);
  for (const Shape& s : kShapes) {
    // dW[n, k] = dy[t, n]^T x[t, k] over t = m tokens.
    QColumns dy(operand(s.m, s.n, rng, kind), s.m, s.n, pow2);
    QColumns x(operand(s.m, s.k, rng, kind), s.m, s.k, pow2);
    std::vector<double> want, mag;
    reference(
        s.n, s.k, s.m,
        [&](int64_t i, int64_t t) { return dy.deq[static_cast<size_t>(t * s.n + i)]; },
        [&](int64_t j, int64_t t) { return x.deq[static_cast<size_t>(t * s.k + j)]; }, want, mag);
    for (bool accumulate : {false, true}) {
      auto dw0 = randn(static_cast<size_t>(s.n * s.k), rng);
      std::vector<float> dw = dw0;
      std::vector<float> scratch(cpu::fp8::gemm_wgrad_scratch_floats(s.m, s.n, s.k));
      cpu::fp8::gemm_wgrad(dy.view(), x.view(), dw.data(), s.k, s.m, s.n, s.k, accumulate,
                           scratch.data());
      if (accumulate)
        for (size_t i = 0; i < want.size(); ++i) want[i] += dw0[i];
      const Agreement a = agree(dw, want, mag, s.m);
      if (accumulate)
        for (size_t i = 0; i < want.size(); ++i) want[i] -= dw0[i];
      EXPECT_LE(a.normwise, 1e-6) << s.m << "x" << s.n << "x" << s.k;
      EXPECT_LE(a.elementwise, 1.0) << s.m << "x" << s.n << "x" << s.k;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    OperandsAndScales, Fp8Gemm,
    ::testing::Combine(::testing::Values(Operands::Random, Operands::BadlyScaled),
                       ::testing::Bool()),
    [](const auto& param_info) {
      return std::string(std::get<0>(param_info.param) == Operands::Random ? "Random"
                                                                           : "BadlyScaled") +
             (std::get<1>(param_info.param) ? "PowerOfTwoScales" : "ExactScales");
    });

TEST(Fp8GemmSizes, EmptyReductionZeroesOrKeeps) {
  std::vector<float> y(6, 3.0f), scratch(1);
  cpu::fp8::gemm_fprop({nullptr, 0, nullptr, 2}, {nullptr, 0, nullptr, 0}, y.data(), 3, 2, 3, 0,
                       true, scratch.data());
  EXPECT_EQ(y, std::vector<float>(6, 3.0f));
  cpu::fp8::gemm_fprop({nullptr, 0, nullptr, 2}, {nullptr, 0, nullptr, 0}, y.data(), 3, 2, 3, 0,
                       false, scratch.data());
  EXPECT_EQ(y, std::vector<float>(6, 0.0f));
  std::fill(y.begin(), y.end(), 3.0f);
  cpu::fp8::gemm_wgrad({nullptr, 2, nullptr, 2}, {nullptr, 3, nullptr, 3}, y.data(), 3, 0, 2, 3,
                       false, scratch.data());
  EXPECT_EQ(y, std::vector<float>(6, 0.0f));
  EXPECT_THROW(cpu::fp8::gemm_fprop({nullptr, 1, nullptr, 2}, {nullptr, 4, nullptr, 1}, y.data(), 3,
                                    2, 3, 4, false, scratch.data()),
               Error);
}

// ---- The work-item contract: cutting the output at multiples of 128 leaves every bit unchanged.

TEST(Fp8WorkItems, CutsOfTheOutputGiveTheSameBits) {
  std::mt19937 rng(21);
  const int64_t m = 300, n = 384, k = 520;
  QRows x(operand(m, k, rng, Operands::Random), m, k, false);
  QBlocks w(operand(n, k, rng, Operands::Random), n, k, false);
  QRows dy(operand(m, n, rng, Operands::Random), m, n, false);
  QColumns dyt(operand(m, n, rng, Operands::Random), m, n, false);
  QColumns xt(operand(m, k, rng, Operands::Random), m, k, false);
  const std::vector<int64_t> row_cuts = {0, 128, 256, m};

  std::vector<float> whole(m * n), cut(m * n);
  std::vector<float> scratch(cpu::fp8::gemm_fprop_scratch_floats(m, n, k));
  cpu::fp8::gemm_fprop(x.view(), w.view(), whole.data(), n, m, n, k, false, scratch.data());
  for (size_t i = 0; i + 1 < row_cuts.size(); ++i)
    for (int64_t nb = 0; nb < rules::blocks_of(n); ++nb) {
      const int64_t r0 = row_cuts[i], r1 = row_cuts[i + 1], n0 = nb * kBlock;
      cpu::fp8::gemm_fprop(x.view().from_row(r0), w.view().from_block(nb, 0),
                           cut.data() + r0 * n + n0, n, r1 - r0, std::min(kBlock, n - n0), k, false,
                           scratch.data());
    }
  EXPECT_EQ(std::memcmp(whole.data(), cut.data(), whole.size() * 4), 0) << "Fprop";

  whole.assign(m * k, 0);
  cut.assign(m * k, 0);
  scratch.resize(cpu::fp8::gemm_dgrad_scratch_floats(m, n, k));
  cpu::fp8::gemm_dgrad(dy.view(), w.view(), whole.data(), k, m, n, k, false, scratch.data());
  for (size_t i = 0; i + 1 < row_cuts.size(); ++i)
    for (int64_t kb = 0; kb < rules::blocks_of(k); kb += 2) {
      const int64_t r0 = row_cuts[i], r1 = row_cuts[i + 1], k0 = kb * kBlock;
      cpu::fp8::gemm_dgrad(dy.view().from_row(r0), w.view().from_block(0, kb),
                           cut.data() + r0 * k + k0, k, r1 - r0, n, std::min(2 * kBlock, k - k0),
                           false, scratch.data());
    }
  EXPECT_EQ(std::memcmp(whole.data(), cut.data(), whole.size() * 4), 0) << "Dgrad";

  whole.assign(n * k, 0);
  cut.assign(n * k, 0);
  scratch.resize(cpu::fp8::gemm_wgrad_scratch_floats(m, n, k));
  cpu::fp8::gemm_wgrad(dyt.view(), xt.view(), whole.data(), k, m, n, k, false, scratch.data());
  const std::vector<int64_t> n_cuts = {0, 128, 256, n}, k_cuts = {0, 128, 384, k};
  for (size_t i = 0; i + 1 < n_cuts.size(); ++i)
    for (size_t j = 0; j + 1 < k_cuts.size(); ++j) {
      const int64_t n0 = n_cuts[i], k0 = k_cuts[j];
      cpu::fp8::gemm_wgrad(dyt.view().from_column(n0), xt.view().from_column(k0),
                           cut.data() + n0 * k + k0, k, m, n_cuts[i + 1] - n0, k_cuts[j + 1] - k0,
                           false, scratch.data());
    }
  EXPECT_EQ(std::memcmp(whole.data(), cut.data(), whole.size() * 4), 0) << "Wgrad";
}

// ---- Quantization error: the emulated FP8 products against the unquantized fp32 products.

double relative(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = double{got[i]} - want[i];
    num += d * d;
    den += double{want[i]} * want[i];
  }
  return std::sqrt(num / den);
}

TEST(Fp8Accuracy, QuantizationErrorAgainstFp32IsReportedAndBounded) {
  // E4M3 keeps 3 mantissa bits: each value is off by up to 2^-4 relative (about 2.4 % RMS for
  // Gaussian values), so a product of two quantized operands lands a few percent from the fp32
  // product. The bound is twice the figure expected for Gaussian operands.
  std::mt19937 rng(31);
  const int64_t m = 96, n = 160, k = 640;
  std::printf("%-24s %-6s %14s\n", "FP8 GEMM vs fp32", "scales", "|C-C32|/|C32|");
  for (bool pow2 : {false, true}) {
    auto xf = operand(m, k, rng, Operands::Random), wf = operand(n, k, rng, Operands::Random);
    auto dyf = operand(m, n, rng, Operands::Random);
    QRows x(xf, m, k, pow2);
    QBlocks w(wf, n, k, pow2);
    QRows dy(dyf, m, n, pow2);
    QColumns dyt(dyf, m, n, pow2), xt(xf, m, k, pow2);

    std::vector<float> y(m * n), ref(m * n);
    std::vector<float> scratch(cpu::fp8::gemm_fprop_scratch_floats(m, n, k));
    cpu::fp8::gemm_fprop(x.view(), w.view(), y.data(), n, m, n, k, false, scratch.data());
    cpu::matmul_nt(xf.data(), wf.data(), ref.data(), m, n, k, false);
    const double fprop = relative(y, ref);

    std::vector<float> dx(m * k), dx_ref(m * k);
    scratch.resize(cpu::fp8::gemm_dgrad_scratch_floats(m, n, k));
    cpu::fp8::gemm_dgrad(dy.view(), w.view(), dx.data(), k, m, n, k, false, scratch.data());
    cpu::matmul_nn(dyf.data(), wf.data(), dx_ref.data(), m, k, n, false);
    const double dgrad = relative(dx, dx_ref);

    std::vector<float> dw(n * k), dw_ref(n * k);
    scratch.resize(cpu::fp8::gemm_wgrad_scratch_floats(m, n, k));
    cpu::fp8::gemm_wgrad(dyt.view(), xt.view(), dw.data(), k, m, n, k, false, scratch.data());
    cpu::matmul_tn(dyf.data(), n, xf.data(), k, dw_ref.data(), k, n, k, m, false);
    const double wgrad = relative(dw, dw_ref);

    const char* sc = pow2 ? "pow2" : "exact";
    std::printf("%-24s %-6s %14.5f\n", "Fprop  y = x W^T", sc, fprop);
    std::printf("%-24s %-6s %14.5f\n", "Dgrad  dx = dy W", sc, dgrad);
    std::printf("%-24s %-6s %14.5f\n", "Wgrad  dW = dy^T x", sc, wgrad);
    for (double e : {fprop, dgrad, wgrad}) {
      EXPECT_GT(e, 1e-3);  // it is quantized: an unquantized path would show ~1e-7
      EXPECT_LT(e, 0.07);
    }
  }
}

}  // namespace
}  // namespace moert
