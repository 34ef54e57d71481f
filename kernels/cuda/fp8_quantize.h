// Fused FP8 (E4M3) quantization kernels of the CUDA plugin: DeepSeek-V3's 1x128 activation tiles
// and 128x128 weight blocks, producing the same codes and scales as the CPU quantizer
// (kernels/cpu/fp8.h) bit for bit, since both call the rules of kernels/fp8_rules.h. The layouts
// are the ones fp8.h describes and cuBLASLt's VEC128_32F / BLK128x128_32F modes read; what the GPU
// multiplies is always K-major (the reduction dimension contiguous in memory), so the operands
// that the CPU reads in place are written transposed here where the GEMM needs them so (the
// token-tiled Wgrad operands, and the weight for Dgrad).
//
// All launches are asynchronous on `s`. Sizes may be 0. A NaN or infinity in an input is recorded
// in `first_bad` (device memory, one value) as the smallest row-major index r * cols + c of an
// offending element (atomicMin), so that checking costs no synchronisation until the caller wants
// the answer: reset it with reset_first_bad(), read it with check_first_bad(), which throws
// Error(Code::Numeric) naming the tensor and the position. The codes and scales of a tile holding
// one are meaningless.
//
// tests/gpu/test_cuda_fp8.cc holds it to the CPU quantizer bit for bit where a GPU is found; it
// did so on an H200 on 2026-12-04 (bench/RESULTS.md).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moert::cuda::fp8 {

// first_bad = "none".
void reset_first_bad(unsigned long long* first_bad, cudaStream_t s);
// Waits for s, reads first_bad and throws Error(Code::Numeric) if a non-finite value was recorded,
// reporting it as row index / cols, column index % cols of `what`.
void check_first_bad(const unsigned long long* first_bad, int64_t cols, const char* what,
                     cudaStream_t s);

// Activation tiles, 1x128 along each row: x [rows, cols] fp32 (row stride ldx) -> codes
// [rows, cols] (row stride ld_codes), scale of row r, tile t at scales[t * scale_ld + r]
// (scale_ld >= rows; cuBLASLt wants tile_scale_ld(rows)). One warp per tile.
void quantize_row_tiles(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                        int64_t ld_codes, float* scales, int64_t scale_ld, bool power_of_two,
                        unsigned long long* first_bad, cudaStream_t s);

// Tiles of 128 rows down each column (along the tokens, for Wgrad), codes written transposed:
// x [rows, cols] -> codes_t [cols, rows] (row stride ld_t >= rows), codes_t[c * ld_t + r] the code
// of x[r, c]; scale of tile t, column c at scales[t * scale_ld + c] (scale_ld >= cols; cuBLASLt
// wants tile_scale_ld(cols)). The CPU's quantize_column_tiles gives the same scales and the same
// codes in place.
void quantize_column_tiles_transposed(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                                      uint8_t* codes_t, int64_t ld_t, float* scales,
                                      int64_t scale_ld, bool power_of_two,
                                      unsigned long long* first_bad, cudaStream_t s);

// Weight blocks, 128x128: x [rows, cols] -> codes [rows, cols], scale of block (rb, cb) at
// scales[rb * scale_ld + cb] (scale_ld >= ceil(cols / 128); cuBLASLt wants block_scale_ld(cols)).
// One thread block per weight block.
void quantize_blocks(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                     int64_t ld_codes, float* scales, int64_t scale_ld, bool power_of_two,
                     unsigned long long* first_bad, cudaStream_t s);

// The transpose of a block-quantized matrix, for Dgrad: the same codes and the same scales, read
// the other way (128x128 blocks make this exact, which is why DeepSeek-V3 chose them for weights):
// codes [rows, cols] (row stride ld) -> codes_t [cols, rows] (row stride ld_t), scale of block
// (rb, cb) -> scales_t[cb * scale_ld_t + rb] (scale_ld_t >= ceil(rows / 128)).
void transpose_blocks(const uint8_t* codes, int64_t ld, const float* scales, int64_t scale_ld,
                      int64_t rows, int64_t cols, uint8_t* codes_t, int64_t ld_t, float* scales_t,
                      int64_t scale_ld_t, cudaStream_t s);

}  // namespace moert::cuda::fp8
