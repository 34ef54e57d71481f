// The CPU backend's FP8 experts (DeepSeek-V3's recipe, kernels/cpu/fp8.h): the weights' 128x128
// block copies, and the FFN's Fprop, Dgrad and Wgrad on block-scaled E4M3 operands.
//
// Each GEMM quantizes its activation operand along its own reduction dimension: Fprop and Dgrad
// in 1x128 row tiles (x and a along dim and hidden; dy along dim; dh1, dh3 along hidden), Wgrad
// in 128x1 column tiles along the tokens, as the GPU's: 128 tokens from the first row of each
// segment (an expert's list, or a dense FFN's rows), the last tile partial. The backward's items
// are those tiles (kFp8ShareRows rows), each holding whole reduction chunks, and a chunk's Wgrad
// partial multiplies its rows of its tile's codes with the tile's scales: processes that hold
// shares of a list aligned at kFp8ShareRows rows reduce exactly as one (core/grad_reduction.h;
// expert parallelism aligns replicas' shares so, ExpertLayout).
//
// The Wgrad operands are kept as codes, 1 byte per value, in the t_* buffers (row-major
// [rows, width], not transposed: gemm_wgrad reads column tiles in place), and their scales in
// t_fp8_scales_, item by item.
#include <algorithm>
#include <string>

#include "core/error.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/math.h"

namespace moert::cpu {
namespace {

using moert::fp8::block_scale_ld;
using moert::fp8::blocks_of;
using moert::fp8::kBlock;
using moert::fp8::tile_scale_ld;

// The 128x128 blocks of a [rows, cols] matrix of an FP8 weight.
fp8::Blocks blocks_of_weight(const Fp8Weight& w, int64_t cols) {
  return {w.codes, cols, w.scales, block_scale_ld(cols)};
}

// An FFN operand's rows by default, which the layer maps to its own (RowError).
fp8::QuantizeOptions options(const Fp8Options& o, const char* what, int64_t row0,
                             const char* rows_of = " of the FFN's rows") {
  fp8::QuantizeOptions q;
  q.power_of_two_scales = o.power_of_two_scales;
  q.what = what;
  q.row_offset = row0;
  q.rows_of = rows_of;
  return q;
}

// An activation [m, cols] in row tiles, in the caller's scratch (codes, then scales).
struct RowTileScratch {
  uint8_t* codes;
  float* scales;
  fp8::RowTiles quantize(const float* x, int64_t m, int64_t cols,
                         const fp8::QuantizeOptions& opt) const {
    fp8::quantize_row_tiles(x, cols, m, cols, codes, cols, scales, tile_scale_ld(m), opt);
    return {codes, cols, scales, tile_scale_ld(m)};
  }
};

int64_t row_tile_scales(int64_t m, int64_t cols) { return blocks_of(cols) * tile_scale_ld(m); }

}  // namespace

// ---- Weights

void CpuBackend::quantize_weight_blocks(const float* src, int64_t matrices, int64_t rows,
                                        int64_t cols, uint8_t* codes, float* scales,
                                        const char* what) {
  if (matrices < 0 || rows < 0 || cols < 0)
    fail(Code::Internal, "FP8 copy of ", what, ": ", matrices, " matrices of ", rows, "x", cols);
  const int64_t row_blocks = blocks_of(rows), ld = block_scale_ld(cols);
  const int64_t per = rows * cols, per_scales = row_blocks * ld;
  // One item per 128-row block row of a matrix: a cut at block boundaries, whatever the threads.
  pool_.parallel_for(matrices * row_blocks, [&](int64_t i, unsigned) {
    const int64_t mtx = i / row_blocks, rb = i % row_blocks;
    const int64_t r0 = rb * kBlock, rn = std::min(kBlock, rows - r0);
    const std::string name = matrices > 1 ? cat(what, " (matrix ", mtx, ")") : std::string(what);
    float* s = scales + mtx * per_scales + rb * ld;
    // The layout's padding gets zeros, so that copies compare and hash byte for byte.
    std::fill(s + blocks_of(cols), s + ld, 0.0f);
    fp8::quantize_blocks(src + mtx * per + r0 * cols, cols, rn, cols, codes + mtx * per + r0 * cols,
                         cols, s, ld, options(fp8_, name.c_str(), r0, nullptr));
  });
}

// ---- Forward

void CpuBackend::fp8_up(const Segment& s, int64_t m, int64_t row0, const float* x, float* h1,
                        float* h3, int64_t c0, int64_t n, int64_t dim, int64_t hidden,
                        unsigned worker) {
  static_assert(kUpColumns % kBlock == 0, "column units must not split a weight's blocks");
  auto& sc = scratch_[worker];
  sc.bytes.resize(static_cast<size_t>(m * dim));
  sc.quant.resize(
      static_cast<size_t>(row_tile_scales(m, dim) + fp8::gemm_fprop_scratch_floats(m, n, dim)));
  const RowTileScratch q{sc.bytes.data(), sc.quant.data()};
  float* gemm = sc.quant.data() + row_tile_scales(m, dim);
  const fp8::RowTiles xq = q.quantize(x, m, dim, options(fp8_, "the FFN input", row0));
  fp8::gemm_fprop(xq, blocks_of_weight(s.w1.fp8, dim).from_block(c0 / kBlock, 0), h1 + c0, hidden,
                  m, n, dim, false, gemm);
  fp8::gemm_fprop(xq, blocks_of_weight(s.w3.fp8, dim).from_block(c0 / kBlock, 0), h3 + c0, hidden,
                  m, n, dim, false, gemm);
}

void CpuBackend::fp8_down(const Segment& s, int64_t m, int64_t row0, const float* a, float* y,
                          int64_t c0, int64_t n, int64_t dim, int64_t hidden, bool accumulate,
                          unsigned worker) {
  static_assert(kDownColumns % kBlock == 0, "column units must not split a weight's blocks");
  auto& sc = scratch_[worker];
  sc.bytes.resize(static_cast<size_t>(m * hidden));
  sc.quant.resize(static_cast<size_t>(row_tile_scales(m, hidden) +
                                      fp8::gemm_fprop_scratch_floats(m, n, hidden)));
  const RowTileScratch q{sc.bytes.data(), sc.quant.data()};
  float* gemm = sc.quant.data() + row_tile_scales(m, hidden);
  const fp8::RowTiles aq = q.quantize(a, m, hidden, options(fp8_, "the FFN activation", row0));
  fp8::gemm_fprop(aq, blocks_of_weight(s.w2.fp8, hidden).from_block(c0 / kBlock, 0), y + c0, dim, m,
                  n, hidden, accumulate, gemm);
}

// ---- Backward

CpuBackend::Fp8Operand CpuBackend::fp8_wgrad_operand(int k, size_t item, int64_t row, int64_t dim,
                                                     int64_t hidden) {
  Buffer<unsigned char>* codes[] = {&t_dy_, &t_x_, &t_a_, &t_dh1_, &t_dh3_};
  const int64_t width = k < 2 ? dim : hidden;
  // An item's scales: dy, x (dim each), a, dh1, dh3 (hidden each), kFp8ItemTiles rows of each.
  const int64_t offset = kFp8ItemTiles * (k < 2 ? k * dim : 2 * dim + (k - 2) * hidden);
  return {reinterpret_cast<uint8_t*>(codes[k]->data()) + row * width, width,
          t_fp8_scales_.data() + static_cast<int64_t>(item) * fp8_item_scales(dim, hidden) + offset,
          width};
}

void CpuBackend::backward_item_fp8(const Segment& s, const Item& it, size_t item, const float* x,
                                   const float* h1, const float* h3, const float* dy, float* dx,
                                   bool dx_accumulate, int64_t dim, int64_t hidden,
                                   unsigned worker) {
  const int64_t m = it.rows, b = it.begin, mh = m * hidden, wide = std::max(dim, hidden);
  auto& sc = scratch_[worker];
  sc.f.resize(static_cast<size_t>(3 * mh));
  float* a = sc.f.data();
  float* dh1 = a + mh;
  float* dh3 = dh1 + mh;
  const int64_t gemm_floats = std::max(fp8::gemm_dgrad_scratch_floats(m, dim, hidden),
                                       fp8::gemm_dgrad_scratch_floats(m, hidden, dim));
  sc.bytes.resize(static_cast<size_t>(m * wide));
  sc.quant.resize(static_cast<size_t>(row_tile_scales(m, wide) + gemm_floats));
  const RowTileScratch q{sc.bytes.data(), sc.quant.data()};
  float* gemm = sc.quant.data() + row_tile_scales(m, wide);
  const float* h1r = h1 + b * hidden;
  const float* h3r = h3 + b * hidden;
  const float* dyr = dy + b * dim;
  const float* xr = x + b * dim;
  float* dxr = dx + b * dim;
  swiglu(h1r, h3r, a, mh);

  // Dgrad: dA = dy W2 (into dh1's storage), then dh1, dh3; dx (+)= dh1 W1 + dh3 W3.
  fp8::gemm_dgrad(q.quantize(dyr, m, dim, options(fp8_, "the FFN output gradient", b)),
                  blocks_of_weight(s.w2.fp8, hidden), dh1, hidden, m, dim, hidden, false, gemm);
  swiglu_backward(h1r, h3r, dh1, dh1, dh3, mh);
  fp8::gemm_dgrad(q.quantize(dh1, m, hidden, options(fp8_, "the FFN gradient dh1", b)),
                  blocks_of_weight(s.w1.fp8, dim), dxr, dim, m, hidden, dim, dx_accumulate, gemm);
  fp8::gemm_dgrad(q.quantize(dh3, m, hidden, options(fp8_, "the FFN gradient dh3", b)),
                  blocks_of_weight(s.w3.fp8, dim), dxr, dim, m, hidden, dim, true, gemm);

  // Wgrad operands: column tiles from the item's first row.
  const float* src[] = {dyr, xr, a, dh1, dh3};
  const char* what[] = {"the FFN output gradient", "the FFN input", "the FFN activation",
                        "the FFN gradient dh1", "the FFN gradient dh3"};
  for (int k = 0; k < 5; ++k) {
    const Fp8Operand t = fp8_wgrad_operand(k, item, b, dim, hidden);
    fp8::quantize_column_tiles(src[k], t.ld, m, t.ld, t.codes, t.ld, t.scales, t.scale_ld,
                               options(fp8_, what[k], b));
  }
}

}  // namespace moert::cpu
