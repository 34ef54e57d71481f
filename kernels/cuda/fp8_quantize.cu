#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/fp8_quantize.h"
#include "kernels/fp8_rules.h"

namespace moert::cuda::fp8 {
namespace {

namespace rules = moert::fp8;
using rules::blocks_of;
using rules::kBlock;

constexpr unsigned long long kNoneBad = ~0ull;
constexpr unsigned kWarp = 32;
// Grids' y dimension holds at most 65535 blocks; the kernels stride over what does not fit.
constexpr int64_t kMaxGridY = 65535;

unsigned grid_y(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(n, kMaxGridY)));
}

__device__ int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ void record_bad(unsigned long long* first_bad, int64_t index) {
  atomicMin(first_bad, static_cast<unsigned long long>(index));
}

// One warp per 1x128 tile; lane l holds columns l, l + 32, l + 64, l + 96 of it, so that each of
// the four loads and stores is one coalesced run across the warp.
__global__ void row_tiles_kernel(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                                 uint8_t* codes, int64_t ld_codes, float* scales, int64_t scale_ld,
                                 bool power_of_two, unsigned long long* first_bad) {
  const unsigned lane = threadIdx.x % kWarp;
  const int64_t per_row = blocks_of(cols), tiles = rows * per_row;
  const int64_t warps_per_block = blockDim.x / kWarp;
  for (int64_t tile = blockIdx.x * warps_per_block + threadIdx.x / kWarp; tile < tiles;
       tile += gridDim.x * warps_per_block) {
    const int64_t r = tile / per_row, t = tile % per_row;
    const int64_t c0 = t * kBlock, cn = smaller(kBlock, cols - c0);
    const float* xr = x + r * ldx + c0;
    float v[4];
    uint32_t amax = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t j = lane + kWarp * i;
      v[i] = j < cn ? xr[j] : 0.0f;
      amax = rules::max_u32(amax, rules::magnitude_bits(v[i]));
    }
    amax = __reduce_max_sync(0xFFFFFFFFu, amax);
    if (amax >= rules::kNonFiniteBits) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t j = lane + kWarp * i;
        if (j < cn && !rules::is_finite(v[i])) record_bad(first_bad, r * cols + c0 + j);
      }
    }
    const float s = rules::tile_scale(rules::bits_float(amax), power_of_two);
    if (lane == 0) scales[t * scale_ld + r] = s;
    uint8_t* cr = codes + r * ld_codes + c0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t j = lane + kWarp * i;
      if (j < cn) cr[j] = rules::quantize_value(v[i], s);
    }
  }
}

// One thread block of 32 x 8 threads per 128 rows x 32 columns: the slab is read row-wise
// (coalesced across columns) into shared memory, each column's amax is reduced over its 128
// rows, and the codes are written transposed, one output row (an input column) per warp step,
// 32 consecutive tokens per store.
constexpr int kColumnSlab = 32;
__global__ void column_tiles_kernel(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                                    uint8_t* codes_t, int64_t ld_t, float* scales, int64_t scale_ld,
                                    bool power_of_two, unsigned long long* first_bad) {
  __shared__ float slab[kBlock][kColumnSlab + 1];
  __shared__ uint32_t partial[8][kColumnSlab];
  __shared__ float scale[kColumnSlab];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col_slabs = (cols + kColumnSlab - 1) / kColumnSlab;
  for (int64_t tb = blockIdx.y; tb < blocks_of(rows); tb += gridDim.y)
    for (int64_t cs = blockIdx.x; cs < col_slabs; cs += gridDim.x) {
      const int64_t r0 = tb * kBlock, c0 = cs * kColumnSlab;
      const int64_t rn = smaller(kBlock, rows - r0), cn = smaller(kColumnSlab, cols - c0);
      uint32_t amax = 0;
      for (int i = ty; i < kBlock; i += 8) {
        const bool inside = i < rn && tx < cn;
        const float v = inside ? x[(r0 + i) * ldx + c0 + tx] : 0.0f;
        if (inside && !rules::is_finite(v)) record_bad(first_bad, (r0 + i) * cols + c0 + tx);
        slab[i][tx] = v;
        amax = rules::max_u32(amax, rules::magnitude_bits(v));
      }
      partial[ty][tx] = amax;
      __syncthreads();
      if (ty == 0) {
        uint32_t m = partial[0][tx];
        for (int k = 1; k < 8; ++k) m = rules::max_u32(m, partial[k][tx]);
        const float s = rules::tile_scale(rules::bits_float(m), power_of_two);
        scale[tx] = s;
        if (tx < cn) scales[tb * scale_ld + c0 + tx] = s;
      }
      __syncthreads();
      for (int j = ty; j < cn; j += 8) {
        uint8_t* out = codes_t + (c0 + j) * ld_t + r0;
        for (int i = tx; i < rn; i += kWarp) out[i] = rules::quantize_value(slab[i][j], scale[j]);
      }
      __syncthreads();  // the slab and the scales are refilled next
    }
}

// One thread block of 256 threads per 128x128 weight block: thread t holds column t % 128 of
// every other row, so that loads and stores run along rows.
constexpr unsigned kBlockThreads = 256;
__global__ void blocks_kernel(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                              uint8_t* codes, int64_t ld_codes, float* scales, int64_t scale_ld,
                              bool power_of_two, unsigned long long* first_bad) {
  __shared__ uint32_t warp_max[kBlockThreads / kWarp];
  const int col = threadIdx.x % kBlock, first_row = threadIdx.x / kBlock;
  constexpr int kRowStep = kBlockThreads / kBlock;
  for (int64_t rb = blockIdx.y; rb < blocks_of(rows); rb += gridDim.y)
    for (int64_t cb = blockIdx.x; cb < blocks_of(cols); cb += gridDim.x) {
      const int64_t r0 = rb * kBlock, c0 = cb * kBlock;
      const int64_t rn = smaller(kBlock, rows - r0), cn = smaller(kBlock, cols - c0);
      uint32_t amax = 0;
      if (col < cn)
        for (int64_t i = first_row; i < rn; i += kRowStep) {
          const float v = x[(r0 + i) * ldx + c0 + col];
          if (!rules::is_finite(v)) record_bad(first_bad, (r0 + i) * cols + c0 + col);
          amax = rules::max_u32(amax, rules::magnitude_bits(v));
        }
      amax = __reduce_max_sync(0xFFFFFFFFu, amax);
      if (threadIdx.x % kWarp == 0) warp_max[threadIdx.x / kWarp] = amax;
      __syncthreads();
      uint32_t m = warp_max[0];
      for (unsigned w = 1; w < kBlockThreads / kWarp; ++w) m = rules::max_u32(m, warp_max[w]);
      const float s = rules::tile_scale(rules::bits_float(m), power_of_two);
      if (threadIdx.x == 0) scales[rb * scale_ld + cb] = s;
      if (col < cn)
        for (int64_t i = first_row; i < rn; i += kRowStep)
          codes[(r0 + i) * ld_codes + c0 + col] =
              rules::quantize_value(x[(r0 + i) * ldx + c0 + col], s);
      __syncthreads();  // warp_max is refilled next
    }
}

// A byte transpose through shared memory, 32 x 32 tiles, 32 x 8 threads.
constexpr int kTile = 32;
__global__ void transpose_codes_kernel(const uint8_t* in, int64_t ld, int64_t rows, int64_t cols,
                                       uint8_t* out, int64_t ld_t) {
  __shared__ uint8_t tile[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  for (int64_t bt = blockIdx.y; bt < row_tiles; bt += gridDim.y)
    for (int64_t ct = blockIdx.x; ct < col_tiles; ct += gridDim.x) {
      const int64_t r0 = bt * kTile, c0 = ct * kTile;
      for (int i = ty; i < kTile; i += 8)
        if (r0 + i < rows && c0 + tx < cols) tile[i][tx] = in[(r0 + i) * ld + c0 + tx];
      __syncthreads();
      for (int i = ty; i < kTile; i += 8)
        if (c0 + i < cols && r0 + tx < rows) out[(c0 + i) * ld_t + r0 + tx] = tile[tx][i];
      __syncthreads();
    }
}

__global__ void transpose_scales_kernel(const float* scales, int64_t scale_ld, int64_t row_blocks,
                                        int64_t col_blocks, float* scales_t, int64_t scale_ld_t) {
  const int64_t n = row_blocks * col_blocks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rb = i / col_blocks, cb = i % col_blocks;
    scales_t[cb * scale_ld_t + rb] = scales[rb * scale_ld + cb];
  }
}

void check_sizes(const char* what, int64_t rows, int64_t cols, int64_t ld_in, int64_t ld_out,
                 int64_t out_cols) {
  if (rows < 0 || cols < 0 || ld_in < cols || ld_out < out_cols)
    fail(Code::Internal, what, ": ", rows, "x", cols, " with row strides ", ld_in, " and ", ld_out,
         " shorter than a row");
}

}  // namespace

void reset_first_bad(unsigned long long* first_bad, cudaStream_t s) {
  check(cudaMemsetAsync(first_bad, 0xFF, sizeof(unsigned long long), s), "reset FP8 check");
}

void check_first_bad(const unsigned long long* first_bad, int64_t cols, const char* what,
                     cudaStream_t s) {
  unsigned long long index = kNoneBad;
  check(cudaMemcpyAsync(&index, first_bad, sizeof index, cudaMemcpyDeviceToHost, s),
        "read FP8 check");
  check(cudaStreamSynchronize(s), "read FP8 check");
  if (index == kNoneBad) return;
  const auto i = static_cast<int64_t>(index);
  fail(Code::Numeric, "FP8 quantization of ", what, ": non-finite value at row ",
       cols > 0 ? i / cols : i, ", column ", cols > 0 ? i % cols : 0,
       " (NaN and infinity have no E4M3 code)");
}

void quantize_row_tiles(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                        int64_t ld_codes, float* scales, int64_t scale_ld, bool power_of_two,
                        unsigned long long* first_bad, cudaStream_t s) {
  check_sizes("FP8 row tiles", rows, cols, ldx, ld_codes, cols);
  if (scale_ld < rows) fail(Code::Internal, "FP8 row tiles: scale stride ", scale_ld, " < rows");
  if (rows == 0 || cols == 0) return;
  constexpr unsigned kThreads = 256;
  const int64_t tiles = rows * blocks_of(cols);
  row_tiles_kernel<<<grid_for(tiles, kThreads / kWarp), kThreads, 0, s>>>(
      x, ldx, rows, cols, codes, ld_codes, scales, scale_ld, power_of_two, first_bad);
  check_launch("fp8 row tiles");
}

void quantize_column_tiles_transposed(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                                      uint8_t* codes_t, int64_t ld_t, float* scales,
                                      int64_t scale_ld, bool power_of_two,
                                      unsigned long long* first_bad, cudaStream_t s) {
  check_sizes("FP8 column tiles", rows, cols, ldx, ld_t, rows);
  if (scale_ld < cols) fail(Code::Internal, "FP8 column tiles: scale stride ", scale_ld, " < cols");
  if (rows == 0 || cols == 0) return;
  const dim3 grid(grid_for(cols, kColumnSlab), grid_y(blocks_of(rows)));
  column_tiles_kernel<<<grid, dim3(kColumnSlab, 8), 0, s>>>(
      x, ldx, rows, cols, codes_t, ld_t, scales, scale_ld, power_of_two, first_bad);
  check_launch("fp8 column tiles");
}

void quantize_blocks(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* codes,
                     int64_t ld_codes, float* scales, int64_t scale_ld, bool power_of_two,
                     unsigned long long* first_bad, cudaStream_t s) {
  check_sizes("FP8 blocks", rows, cols, ldx, ld_codes, cols);
  if (scale_ld < blocks_of(cols))
    fail(Code::Internal, "FP8 blocks: scale stride ", scale_ld, " < column blocks");
  if (rows == 0 || cols == 0) return;
  const dim3 grid(grid_for(blocks_of(cols), 1), grid_y(blocks_of(rows)));
  blocks_kernel<<<grid, kBlockThreads, 0, s>>>(x, ldx, rows, cols, codes, ld_codes, scales,
                                               scale_ld, power_of_two, first_bad);
  check_launch("fp8 blocks");
}

void transpose_blocks(const uint8_t* codes, int64_t ld, const float* scales, int64_t scale_ld,
                      int64_t rows, int64_t cols, uint8_t* codes_t, int64_t ld_t, float* scales_t,
                      int64_t scale_ld_t, cudaStream_t s) {
  check_sizes("FP8 block transpose", rows, cols, ld, ld_t, rows);
  if (scale_ld < blocks_of(cols) || scale_ld_t < blocks_of(rows))
    fail(Code::Internal, "FP8 block transpose: scale strides ", scale_ld, ", ", scale_ld_t,
         " too short");
  if (rows == 0 || cols == 0) return;
  const dim3 grid(grid_for(cols, kTile), grid_y((rows + kTile - 1) / kTile));
  transpose_codes_kernel<<<grid, dim3(kTile, 8), 0, s>>>(codes, ld, rows, cols, codes_t, ld_t);
  check_launch("fp8 transpose codes");
  const int64_t n = blocks_of(rows) * blocks_of(cols);
  transpose_scales_kernel<<<grid_for(n, 256), 256, 0, s>>>(scales, scale_ld, blocks_of(rows),
                                                           blocks_of(cols), scales_t, scale_ld_t);
  check_launch("fp8 transpose scales");
}

}  // namespace moert::cuda::fp8
