// Block-scaled FP8 (E4M3) as DeepSeek-V3 trains with it (technical report section 3.3, DeepGEMM),
// on the CPU: the quantizers, and an exact emulation of the GPU's three GEMMs.
//
// Quantization. Activations are cut into 1x128 tiles along the reduction dimension of the GEMM
// that reads them, weights into 128x128 blocks; each tile or block has one fp32 scale, the
// dequantization factor: value ~ e4m3_to_float(code) * scale (kernels/fp8_rules.h's tile_scale:
// amax / 448, optionally rounded up to a power of two). The last tile or block of a dimension that
// is not a multiple of 128 is partial: its scale comes from the values it holds, and nothing
// outside the matrix is read or written. A NaN or infinity anywhere is an error
// (Error, Code::Numeric, naming the tensor and the position), never a code.
//
// Scale layouts, chosen to be the layouts cuBLASLt reads (CUDA >= 12.9, sm_90):
//   RowTiles     (1x128 tiles along each row, cuBLASLt VEC128_32F): the scale of row r, tile t is
//                scales[t * scale_ld + r], scale_ld >= rows (tile_scale_ld(rows) pads to 4 floats).
//   ColumnTiles  (128x1 tiles down each column, i.e. along the tokens, for Wgrad): the scale of
//                tile t (rows 128t..128t+127), column c is scales[t * scale_ld + c]. This is the
//                VEC128_32F layout of the transposed matrix, which is what the GPU multiplies
//                (kernels/cuda/fp8_quantize.h writes the codes transposed; here they stay in
//                place, and the scales are identical).
//   Blocks       (128x128 blocks, cuBLASLt BLK128x128_32F): the scale of block (rb, cb) is
//                scales[rb * scale_ld + cb], scale_ld >= ceil(cols / 128) (block_scale_ld(cols)
//                pads to 4 floats).
// A DeepSeek-V3 checkpoint's `weight_scale_inv` for a weight [out, in] is a row-major
// [ceil(out/128), ceil(in/128)] fp32 tensor with dequantized = code value * scale_inv: exactly
// Blocks with scale_ld = ceil(in/128). It is byte for byte the cuBLASLt layout when ceil(in/128)
// is a multiple of 4 (DeepSeek-V3's 7168 and 2048 both are); otherwise each row of scales is
// copied to a row padded to block_scale_ld(in). Codes are the checkpoint's E4M3 bytes as they are.
//
// GEMMs. Exact in the sense of DeepGEMM's promotion scheme: the same codes and scales as the GPU;
// for each 128-long block of the reduction dimension the products of the codes are summed in fp32
// (an fp32 GEMM on the code values, which E4M3 represents exactly), that partial sum is multiplied
// by the product of the two scales and added to an fp32 accumulator, blocks in ascending order;
// the prior output is added last when accumulating. Codes are expanded to fp32 block by block into
// the caller's scratch; no whole fp32 copy of an operand is made.
//
// Threads. Every function here is single-threaded and uses only the scratch it is given. A backend
// cuts the output into work items, each a call on offset pointers (RowTiles::from_row and the
// like), and runs them on its threads. Cuts: Fprop and Dgrad, output rows anywhere, output columns
// at multiples of 128 (a weight's blocks are not split); Wgrad, anywhere; the reduction dimension
// never. Every GEMM works through its output in 128 x 128 tiles from the item's first row and
// column, with fixed fp32 GEMM shapes per tile, so cuts at multiples of 128 rows and columns give
// the same bits as one call. Other cuts are correct too but may change the last bits of some
// elements: the fp32 GEMM underneath picks its kernel by shape (BLIS's small-matrix path does).
// Either way the bits depend only on the operands and the cut, never on which thread runs an item:
// cut the work independently of the thread count, and results do not depend on it.
// tests/unit/test_fp8.cc checks the 128-multiple cuts with the GEMM library linked today; re-run
// it after changing that library.
#pragma once

#include <cstdint>

#include "kernels/fp8_rules.h"

namespace moert::cpu::fp8 {

using moert::fp8::kBlock;

// 1x128 tiles along each row. codes: [rows, >= cols] with row stride ld.
struct RowTiles {
  const uint8_t* codes = nullptr;
  int64_t ld = 0;
  const float* scales = nullptr;
  int64_t scale_ld = 0;

  // The same operand from row r on (any r).
  RowTiles from_row(int64_t r) const { return {codes + r * ld, ld, scales + r, scale_ld}; }
};

// 128x1 tiles down each column. codes: [rows, >= cols] with row stride ld.
struct ColumnTiles {
  const uint8_t* codes = nullptr;
  int64_t ld = 0;
  const float* scales = nullptr;
  int64_t scale_ld = 0;

  // The same operand from column c on (any c).
  ColumnTiles from_column(int64_t c) const { return {codes + c, ld, scales + c, scale_ld}; }
};

// 128x128 blocks. codes: [rows, >= cols] with row stride ld.
struct Blocks {
  const uint8_t* codes = nullptr;
  int64_t ld = 0;
  const float* scales = nullptr;
  int64_t scale_ld = 0;

  // The same operand from block row rb and block column cb on (rows 128 rb, columns 128 cb).
  Blocks from_block(int64_t rb, int64_t cb) const {
    return {codes + rb * kBlock * ld + cb * kBlock, ld, scales + rb * scale_ld + cb, scale_ld};
  }
};

struct QuantizeOptions {
  // Scales rounded up to powers of two (DeepSeek-V3.1's and DeepGEMM's UE8M0).
  bool power_of_two_scales = false;
  // Named in errors, with the position of the offending value plus these offsets (a work item's
  // place in the whole tensor).
  const char* what = "tensor";
  int64_t row_offset = 0;
  int64_t col_offset = 0;
  // What the row counts, when its caller may say it otherwise (a RowError): an FFN's operand
  // rows, which the layer that ran it maps to its own.
  const char* rows_of = nullptr;
};

// ---- Quantizers: x [rows, cols] fp32 with row stride ldx, codes [rows, cols] with row stride
// ld_codes, scales in the layout named above. Work items: RowTiles, any cut of rows and of tiles
// (columns at multiples of 128); ColumnTiles, any cut of columns, rows at multiples of 128;
// Blocks, rows and columns at multiples of 128. Throws Error(Code::Numeric) on a NaN or infinity;
// what was written before it is then unspecified.

void quantize_row_tiles(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                        int64_t ld_codes, float* scales, int64_t scale_ld,
                        const QuantizeOptions& opt);

void quantize_column_tiles(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                           int64_t ld_codes, float* scales, int64_t scale_ld,
                           const QuantizeOptions& opt);

void quantize_blocks(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                     int64_t ld_codes, float* scales, int64_t scale_ld, const QuantizeOptions& opt);

// ---- Dequantizers: y[rows, cols] (row stride ldy) = code value * scale, as the GEMMs see the
// operands (the reference in tests, and FP8 weights read back as fp32).

void dequantize_row_tiles(const RowTiles& q, int64_t rows, int64_t cols, float* y, int64_t ldy);
void dequantize_column_tiles(const ColumnTiles& q, int64_t rows, int64_t cols, float* y,
                             int64_t ldy);
void dequantize_blocks(const Blocks& q, int64_t rows, int64_t cols, float* y, int64_t ldy);

// ---- GEMMs. The output has row stride ld_out; accumulate adds the product to it, else it is
// overwritten. scratch: at least the matching *_scratch_floats() floats, not shared with another
// call running at the same time. Sizes may be 0; an empty reduction zeroes an overwritten output.

// Fprop: y[m, n] (+)= sum_k x[m, k] W[n, k]. x in row tiles along k, W [n, k] in blocks.
void gemm_fprop(const RowTiles& x, const Blocks& w, float* y, int64_t ld_out, int64_t m, int64_t n,
                int64_t k, bool accumulate, float* scratch);
int64_t gemm_fprop_scratch_floats(int64_t m, int64_t n, int64_t k);

// Dgrad: dx[m, k] (+)= sum_n dy[m, n] W[n, k]. dy in row tiles along n; W [n, k] in the blocks
// Fprop reads, here read the other way (block (nb, kb) now spans reduction block nb).
void gemm_dgrad(const RowTiles& dy, const Blocks& w, float* dx, int64_t ld_out, int64_t m,
                int64_t n, int64_t k, bool accumulate, float* scratch);
int64_t gemm_dgrad_scratch_floats(int64_t m, int64_t n, int64_t k);

// Wgrad: dw[n, k] (+)= sum_t dy[t, n] x[t, k] over `tokens` rows t. dy [tokens, n] and
// x [tokens, k] in column tiles along the tokens.
void gemm_wgrad(const ColumnTiles& dy, const ColumnTiles& x, float* dw, int64_t ld_out,
                int64_t tokens, int64_t n, int64_t k, bool accumulate, float* scratch);
int64_t gemm_wgrad_scratch_floats(int64_t tokens, int64_t n, int64_t k);

}  // namespace moert::cpu::fp8
