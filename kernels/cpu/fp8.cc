#include "kernels/cpu/fp8.h"

#include <algorithm>
#include <array>

#include "core/error.h"
#include "core/tensor_codec.h"
#include "kernels/cpu/math.h"

namespace moert::cpu::fp8 {
namespace {

namespace rules = moert::fp8;
using rules::blocks_of;

// Rows of an activation panel that Fprop and Dgrad expand at once, and the output tile of Wgrad:
// one block, so that work items cut at multiples of 128 see the same GEMM shapes (fp8.h). An
// expanded weight block (128 x 128 floats) is reused across kPanel rows, so its expansion costs
// 1 / (2 kPanel) of the GEMM's flops in table lookups.
constexpr int64_t kPanel = kBlock;
constexpr int64_t kWgradTile = kBlock;

// The fp32 value of every E4M3 code, from the one decoder (core/tensor_codec.h).
const float* code_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c)
      t[static_cast<size_t>(c)] = e4m3_to_float(static_cast<uint8_t>(c));
    return t;
  }();
  return table.data();
}

// codes [rows, cols] (row stride ld) -> dst [cols, rows] packed: the transpose, as the code values.
// The block GEMMs then all run in the non-transposed form, which the fp32 GEMM does fastest on
// 128-sized blocks (BLIS: about twice its rate for the transposed ones).
void expand_transposed(const uint8_t* codes, int64_t ld, int64_t rows, int64_t cols,
                       float* __restrict dst) {
  const float* __restrict value = code_values();
  constexpr int64_t kStrip = 8;  // rows per pass, so that each column's writes stay together
  for (int64_t r0 = 0; r0 < rows; r0 += kStrip) {
    const int64_t rn = std::min(kStrip, rows - r0);
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = 0; i < rn; ++i) dst[j * rows + r0 + i] = value[codes[(r0 + i) * ld + j]];
  }
}

// codes [rows, cols] (row stride ld) -> dst [rows, cols] packed, as the code values.
void expand(const uint8_t* codes, int64_t ld, int64_t rows, int64_t cols, float* __restrict dst) {
  const float* __restrict value = code_values();
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* __restrict c = codes + r * ld;
    float* __restrict d = dst + r * cols;
    for (int64_t j = 0; j < cols; ++j) d[j] = value[c[j]];
  }
}

// Called when a tile's amax shows a NaN or infinity: names the first one, in row-major order.
[[noreturn]] void first_non_finite(const QuantizeOptions& opt, const float* x, int64_t ldx,
                                   int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < c1; ++c)
      if (!rules::is_finite(x[r * ldx + c])) {
        std::string head =
            cat("FP8 quantization of ", opt.what, ": non-finite value ", x[r * ldx + c], " at ");
        std::string tail =
            cat(", column ", c + opt.col_offset, " (NaN and infinity have no E4M3 code)");
        if (opt.rows_of)
          throw RowError(Code::Numeric, std::move(head), r + opt.row_offset, opt.rows_of,
                         std::move(tail));
        fail(Code::Numeric, head, "row ", r + opt.row_offset, tail);
      }
  fail(Code::Internal, "FP8 quantization of ", opt.what, ": a non-finite amax without its value");
}

void check_shape(const char* what, int64_t rows, int64_t cols, int64_t ld, int64_t ld2) {
  if (rows < 0 || cols < 0 || ld < cols || ld2 < cols)
    fail(Code::Internal, what, ": ", rows, "x", cols, " with row strides ", ld, " and ", ld2,
         " shorter than a row");
}

// acc[rows, cols] += (sa[i] * sb) * p[rows, cols]: a reduction block's partial sums, scaled by
// the scales of its row tile and of its weight block.
void add_scaled_rows(float* __restrict acc, const float* __restrict p, const float* __restrict sa,
                     float sb, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const float s = sa[i] * sb;
    float* __restrict a = acc + i * cols;
    const float* __restrict q = p + i * cols;
    for (int64_t j = 0; j < cols; ++j) a[j] += s * q[j];
  }
}

// acc[rows, cols] += (sa[i] * sb[j]) * p[rows, cols]: the same with a scale per output column.
void add_scaled_outer(float* __restrict acc, const float* __restrict p, const float* __restrict sa,
                      const float* __restrict sb, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const float s = sa[i];
    float* __restrict a = acc + i * cols;
    const float* __restrict q = p + i * cols;
    for (int64_t j = 0; j < cols; ++j) a[j] += (s * sb[j]) * q[j];
  }
}

// out[rows, cols] (row stride ld) = acc (+ out when accumulate).
void store(const float* __restrict acc, int64_t rows, int64_t cols, float* out, int64_t ld,
           bool accumulate) {
  for (int64_t i = 0; i < rows; ++i) {
    float* __restrict o = out + i * ld;
    const float* __restrict a = acc + i * cols;
    if (accumulate)
      for (int64_t j = 0; j < cols; ++j) o[j] = a[j] + o[j];
    else
      std::copy(a, a + cols, o);
  }
}

void zero(float* out, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) std::fill(out + i * ld, out + i * ld + cols, 0.0f);
}

// The largest magnitude of x[0, n) as bits (fp8_rules.h's magnitude_bits).
uint32_t amax_bits(const float* __restrict x, int64_t n) {
  uint32_t amax = 0;
  for (int64_t j = 0; j < n; ++j) amax = rules::max_u32(amax, rules::magnitude_bits(x[j]));
  return amax;
}

// codes[j] = the code of x[j] at scale s (one scale, or one per j). The second stays a call of its
// own: inlined into the column-tile loop nest, GCC no longer vectorizes it.
// The cap (rules::max_code) binds only for scales above about 2^119: other spans take the loop
// without it, which vectorizes better.
void quantize_span(const float* __restrict x, float s, uint8_t* __restrict codes, int64_t n) {
  const uint32_t cap = rules::max_code(s);
  if (cap == rules::kE4M3MaxCode) {
    for (int64_t j = 0; j < n; ++j) codes[j] = rules::e4m3_encode(x[j] / s);
    return;
  }
  for (int64_t j = 0; j < n; ++j) codes[j] = rules::quantize_value(x[j], s, cap);
}
[[gnu::noinline]] void quantize_span(const float* __restrict x, const float* __restrict s,
                                     const uint32_t* __restrict cap, bool capped,
                                     uint8_t* __restrict codes, int64_t n) {
  if (!capped) {
    for (int64_t j = 0; j < n; ++j) codes[j] = rules::e4m3_encode(x[j] / s[j]);
    return;
  }
  for (int64_t j = 0; j < n; ++j) codes[j] = rules::quantize_value(x[j], s[j], cap[j]);
}

}  // namespace

// ---- Quantizers

void quantize_row_tiles(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                        int64_t ld_codes, float* scales, int64_t scale_ld,
                        const QuantizeOptions& opt) {
  check_shape("FP8 row tiles", rows, cols, ldx, ld_codes);
  if (scale_ld < rows) fail(Code::Internal, "FP8 row tiles: scale stride ", scale_ld, " < rows");
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < blocks_of(cols); ++t) {
      const int64_t c0 = t * kBlock, cn = std::min(kBlock, cols - c0);
      const float* xt = x + r * ldx + c0;
      const uint32_t amax = amax_bits(xt, cn);
      if (amax >= rules::kNonFiniteBits) first_non_finite(opt, x, ldx, r, r + 1, c0, c0 + cn);
      const float s = rules::tile_scale(rules::bits_float(amax), opt.power_of_two_scales);
      scales[t * scale_ld + r] = s;
      quantize_span(xt, s, codes + r * ld_codes + c0, cn);
    }
  }
}

void quantize_column_tiles(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                           int64_t ld_codes, float* scales, int64_t scale_ld,
                           const QuantizeOptions& opt) {
  check_shape("FP8 column tiles", rows, cols, ldx, ld_codes);
  if (scale_ld < cols) fail(Code::Internal, "FP8 column tiles: scale stride ", scale_ld, " < cols");
  // Columns in chunks, so that a chunk's running maxima and scales stay in cache while the tile's
  // rows stream past (twice: once for the maxima, once to encode).
  constexpr int64_t kChunk = 256;
  std::array<uint32_t, kChunk> amax;
  std::array<float, kChunk> s;
  std::array<uint32_t, kChunk> cap;
  for (int64_t t = 0; t < blocks_of(rows); ++t) {
    const int64_t r0 = t * kBlock, rn = std::min(kBlock, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
      const int64_t cn = std::min(kChunk, cols - c0);
      std::fill(amax.begin(), amax.begin() + cn, 0u);
      for (int64_t r = r0; r < r0 + rn; ++r) {
        const float* __restrict xr = x + r * ldx + c0;
        uint32_t* __restrict a = amax.data();
        for (int64_t j = 0; j < cn; ++j) a[j] = rules::max_u32(a[j], rules::magnitude_bits(xr[j]));
      }
      uint32_t any = 0;
      for (int64_t j = 0; j < cn; ++j) any = rules::max_u32(any, amax[static_cast<size_t>(j)]);
      if (any >= rules::kNonFiniteBits) first_non_finite(opt, x, ldx, r0, r0 + rn, c0, c0 + cn);
      bool capped = false;
      for (int64_t j = 0; j < cn; ++j) {
        s[static_cast<size_t>(j)] = rules::tile_scale(
            rules::bits_float(amax[static_cast<size_t>(j)]), opt.power_of_two_scales);
        scales[t * scale_ld + c0 + j] = s[static_cast<size_t>(j)];
        cap[static_cast<size_t>(j)] = rules::max_code(s[static_cast<size_t>(j)]);
        capped = capped || cap[static_cast<size_t>(j)] != rules::kE4M3MaxCode;
      }
      for (int64_t r = r0; r < r0 + rn; ++r)
        quantize_span(x + r * ldx + c0, s.data(), cap.data(), capped, codes + r * ld_codes + c0,
                      cn);
    }
  }
}

void quantize_blocks(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                     int64_t ld_codes, float* scales, int64_t scale_ld,
                     const QuantizeOptions& opt) {
  check_shape("FP8 blocks", rows, cols, ldx, ld_codes);
  if (scale_ld < blocks_of(cols))
    fail(Code::Internal, "FP8 blocks: scale stride ", scale_ld, " < column blocks");
  for (int64_t rb = 0; rb < blocks_of(rows); ++rb) {
    const int64_t r0 = rb * kBlock, rn = std::min(kBlock, rows - r0);
    for (int64_t cb = 0; cb < blocks_of(cols); ++cb) {
      const int64_t c0 = cb * kBlock, cn = std::min(kBlock, cols - c0);
      uint32_t amax = 0;
      for (int64_t r = r0; r < r0 + rn; ++r)
        amax = rules::max_u32(amax, amax_bits(x + r * ldx + c0, cn));
      if (amax >= rules::kNonFiniteBits) first_non_finite(opt, x, ldx, r0, r0 + rn, c0, c0 + cn);
      const float s = rules::tile_scale(rules::bits_float(amax), opt.power_of_two_scales);
      scales[rb * scale_ld + cb] = s;
      for (int64_t r = r0; r < r0 + rn; ++r)
        quantize_span(x + r * ldx + c0, s, codes + r * ld_codes + c0, cn);
    }
  }
}

// ---- Dequantizers

void dequantize_row_tiles(const RowTiles& q, int64_t rows, int64_t cols, float* y, int64_t ldy) {
  const float* value = code_values();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      y[r * ldy + j] = value[q.codes[r * q.ld + j]] * q.scales[(j / kBlock) * q.scale_ld + r];
}

void dequantize_column_tiles(const ColumnTiles& q, int64_t rows, int64_t cols, float* y,
                             int64_t ldy) {
  const float* value = code_values();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      y[r * ldy + j] = value[q.codes[r * q.ld + j]] * q.scales[(r / kBlock) * q.scale_ld + j];
}

void dequantize_blocks(const Blocks& q, int64_t rows, int64_t cols, float* y, int64_t ldy) {
  const float* value = code_values();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      y[r * ldy + j] =
          value[q.codes[r * q.ld + j]] * q.scales[(r / kBlock) * q.scale_ld + j / kBlock];
}

// ---- GEMMs

// Scratch: the panel's codes as values, block-major (reduction block kb's [rr, kk] values start at
// rr * 128 kb), one weight block transposed to [kk, nn], the partial sums of one block and the
// accumulator.
int64_t gemm_fprop_scratch_floats(int64_t m, int64_t /*n*/, int64_t k) {
  const int64_t rows = std::min(m, kPanel);
  return rows * k + kBlock * kBlock + 2 * rows * kBlock;
}

void gemm_fprop(const RowTiles& x, const Blocks& w, float* y, int64_t ld_out, int64_t m, int64_t n,
                int64_t k, bool accumulate, float* scratch) {
  if (m < 0 || n < 0 || k < 0 || x.ld < k || w.ld < k || ld_out < n || x.scale_ld < m ||
      w.scale_ld < blocks_of(k))
    fail(Code::Internal, "FP8 Fprop ", m, "x", n, "x", k, ": strides ", x.ld, ", ", w.ld, ", ",
         ld_out, ", scale strides ", x.scale_ld, ", ", w.scale_ld, " too short");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) zero(y, ld_out, m, n);
    return;
  }
  const int64_t panel = std::min(m, kPanel);
  float* xv = scratch;
  float* wv = xv + panel * k;
  float* p = wv + kBlock * kBlock;
  float* acc = p + panel * kBlock;
  for (int64_t r0 = 0; r0 < m; r0 += panel) {
    const int64_t rr = std::min(panel, m - r0);
    for (int64_t kb = 0; kb < blocks_of(k); ++kb) {
      const int64_t k0 = kb * kBlock;
      expand(x.codes + r0 * x.ld + k0, x.ld, rr, std::min(kBlock, k - k0), xv + rr * k0);
    }
    for (int64_t nb = 0; nb < blocks_of(n); ++nb) {
      const int64_t n0 = nb * kBlock, nn = std::min(kBlock, n - n0);
      std::fill(acc, acc + rr * nn, 0.0f);
      for (int64_t kb = 0; kb < blocks_of(k); ++kb) {
        const int64_t k0 = kb * kBlock, kk = std::min(kBlock, k - k0);
        expand_transposed(w.codes + n0 * w.ld + k0, w.ld, nn, kk, wv);
        matmul_nn(xv + rr * k0, wv, p, rr, nn, kk, false);
        add_scaled_rows(acc, p, x.scales + kb * x.scale_ld + r0, w.scales[nb * w.scale_ld + kb], rr,
                        nn);
      }
      store(acc, rr, nn, y + r0 * ld_out + n0, ld_out, accumulate);
    }
  }
}

// Scratch: the panel's dy values block-major over the reduction blocks nb, one weight block, the
// partial sums and the accumulator.
int64_t gemm_dgrad_scratch_floats(int64_t m, int64_t n, int64_t /*k*/) {
  const int64_t rows = std::min(m, kPanel);
  return rows * n + kBlock * kBlock + 2 * rows * kBlock;
}

void gemm_dgrad(const RowTiles& dy, const Blocks& w, float* dx, int64_t ld_out, int64_t m,
                int64_t n, int64_t k, bool accumulate, float* scratch) {
  if (m < 0 || n < 0 || k < 0 || dy.ld < n || w.ld < k || ld_out < k || dy.scale_ld < m ||
      w.scale_ld < blocks_of(k))
    fail(Code::Internal, "FP8 Dgrad ", m, "x", n, "x", k, ": strides ", dy.ld, ", ", w.ld, ", ",
         ld_out, ", scale strides ", dy.scale_ld, ", ", w.scale_ld, " too short");
  if (m == 0 || k == 0) return;
  if (n == 0) {
    if (!accumulate) zero(dx, ld_out, m, k);
    return;
  }
  const int64_t panel = std::min(m, kPanel);
  float* dyv = scratch;
  float* wv = dyv + panel * n;
  float* p = wv + kBlock * kBlock;
  float* acc = p + panel * kBlock;
  for (int64_t r0 = 0; r0 < m; r0 += panel) {
    const int64_t rr = std::min(panel, m - r0);
    for (int64_t nb = 0; nb < blocks_of(n); ++nb) {
      const int64_t n0 = nb * kBlock;
      expand(dy.codes + r0 * dy.ld + n0, dy.ld, rr, std::min(kBlock, n - n0), dyv + rr * n0);
    }
    for (int64_t kb = 0; kb < blocks_of(k); ++kb) {
      const int64_t k0 = kb * kBlock, kk = std::min(kBlock, k - k0);
      std::fill(acc, acc + rr * kk, 0.0f);
      for (int64_t nb = 0; nb < blocks_of(n); ++nb) {
        const int64_t n0 = nb * kBlock, nn = std::min(kBlock, n - n0);
        expand(w.codes + n0 * w.ld + k0, w.ld, nn, kk, wv);
        matmul_nn(dyv + rr * n0, wv, p, rr, kk, nn, false);
        add_scaled_rows(acc, p, dy.scales + nb * dy.scale_ld + r0, w.scales[nb * w.scale_ld + kb],
                        rr, kk);
      }
      store(acc, rr, kk, dx + r0 * ld_out + k0, ld_out, accumulate);
    }
  }
}

// Scratch: one token block of dy (128 output rows, transposed to [nn, tt]) and of x (128 output
// columns) as values, the partial sums of one 128 x 128 tile, and the accumulator of a whole
// 128-row panel of dW, so that each block of dy is expanded once per panel, not once per tile.
int64_t gemm_wgrad_scratch_floats(int64_t /*tokens*/, int64_t n, int64_t k) {
  const int64_t rows = std::min(n, kWgradTile), cols = std::min(k, kWgradTile);
  return kBlock * (rows + cols) + rows * cols + rows * k;
}

void gemm_wgrad(const ColumnTiles& dy, const ColumnTiles& x, float* dw, int64_t ld_out,
                int64_t tokens, int64_t n, int64_t k, bool accumulate, float* scratch) {
  if (tokens < 0 || n < 0 || k < 0 || dy.ld < n || x.ld < k || ld_out < k || dy.scale_ld < n ||
      x.scale_ld < k)
    fail(Code::Internal, "FP8 Wgrad ", n, "x", k, " over ", tokens, " tokens: strides ", dy.ld,
         ", ", x.ld, ", ", ld_out, ", scale strides ", dy.scale_ld, ", ", x.scale_ld, " too short");
  if (n == 0 || k == 0) return;
  if (tokens == 0) {
    if (!accumulate) zero(dw, ld_out, n, k);
    return;
  }
  const int64_t tile_rows = std::min(n, kWgradTile), tile_cols = std::min(k, kWgradTile);
  float* dyv = scratch;
  float* xv = dyv + kBlock * tile_rows;
  float* p = xv + kBlock * tile_cols;
  float* acc = p + tile_rows * tile_cols;  // [nn, k]: tile (n0, k0) at acc + nn * k0
  for (int64_t n0 = 0; n0 < n; n0 += tile_rows) {
    const int64_t nn = std::min(tile_rows, n - n0);
    std::fill(acc, acc + nn * k, 0.0f);
    for (int64_t tb = 0; tb < blocks_of(tokens); ++tb) {
      const int64_t t0 = tb * kBlock, tt = std::min(kBlock, tokens - t0);
      expand_transposed(dy.codes + t0 * dy.ld + n0, dy.ld, tt, nn, dyv);
      for (int64_t k0 = 0; k0 < k; k0 += tile_cols) {
        const int64_t kk = std::min(tile_cols, k - k0);
        expand(x.codes + t0 * x.ld + k0, x.ld, tt, kk, xv);
        matmul_nn(dyv, xv, p, nn, kk, tt, false);
        add_scaled_outer(acc + nn * k0, p, dy.scales + tb * dy.scale_ld + n0,
                         x.scales + tb * x.scale_ld + k0, nn, kk);
      }
    }
    for (int64_t k0 = 0; k0 < k; k0 += tile_cols) {
      const int64_t kk = std::min(tile_cols, k - k0);
      store(acc + nn * k0, nn, kk, dw + n0 * ld_out + k0, ld_out, accumulate);
    }
  }
}

}  // namespace moert::cpu::fp8
