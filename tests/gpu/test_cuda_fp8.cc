// Block-scaled FP8 on the GPU against the CPU: the quantize kernels (kernels/cuda/fp8_quantize.h)
// against the CPU quantizer bit for bit, codes and scales; cuBLASLt's FP8 GEMMs
// (kernels/cuda/fp8_gemm.h) against the CPU emulation (kernels/cpu/fp8.h) of the same operands,
// for Fprop, Dgrad and Wgrad, sizes that are not multiples of 128 (nor of 4) included; a layout
// cuBLASLt refuses is an Unsupported error; what cuBLASLt does with row counts off multiples of 8
// and with scale pointers aligned to 16 bytes only. Skips (exit 77) without an sm_90 GPU.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "gpu_test_main.h"
#include "kernels/cpu/fp8.h"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/fp8_quantize.h"
#include "kernels/fp8_rules.h"

namespace moert {
namespace {

namespace rules = moert::fp8;
namespace gpu = moert::cuda::fp8;
using rules::blocks_of;
using rules::kBlock;

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Device memory holding a copy of a host vector (or n zero bytes' worth of T).
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    cuda_ok(cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)), "cudaMalloc");
    cuda_ok(cudaMemset(p, 0, std::max<size_t>(1, n) * sizeof(T)), "cudaMemset");
  }
  explicit Dev(const std::vector<T>& v) : Dev(v.size()) {
    cuda_ok(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  std::vector<T> get() const {
    std::vector<T> v(n);
    cuda_ok(cudaDeviceSynchronize(), "sync");
    cuda_ok(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return v;
  }
};

cudaStream_t stream() {
  static cudaStream_t s = [] {
    cudaStream_t t = nullptr;
    cuda_ok(cudaStreamCreate(&t), "cudaStreamCreate");
    return t;
  }();
  return s;
}

std::vector<float> randn(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Tiles of wildly different magnitudes (10^-15 .. 10^15), exact zeros, -0, subnormal floats and
// E4M3 ties: the cases where a quantizer can go wrong.
std::vector<float> hard_values(int64_t rows, int64_t cols, std::mt19937& rng) {
  auto x = randn(static_cast<size_t>(rows * cols), rng);
  std::uniform_real_distribution<double> e(-15, 15);
  std::uniform_int_distribution<int> pick(0, 9);
  for (int64_t r = 0; r < rows; ++r) {
    const double row_scale = std::pow(10.0, e(rng));
    for (int64_t c = 0; c < cols; ++c) {
      float& v = x[static_cast<size_t>(r * cols + c)];
      v = static_cast<float>(v * row_scale * std::pow(10.0, (c / kBlock) % 3 - 1.0));
      switch (pick(rng)) {
        case 0:
          v = 0.0f;
          break;
        case 1:
          v = -0.0f;
          break;
        case 2:
          v = 1e-40f;
          break;
        case 3:
          v = 1.0625f;
          break;  // a tie at scale 1
        default:
          break;
      }
    }
  }
  // A whole zero row (all-zero tiles) and a row of values near 448.
  if (rows > 2) {
    std::fill(x.begin() + cols, x.begin() + 2 * cols, 0.0f);
    for (int64_t c = 0; c < cols; ++c) x[static_cast<size_t>(2 * cols + c)] = 448.0f - c % 20;
  }
  return x;
}

struct Sizes {
  int64_t rows, cols;
};
const Sizes kQuantizeSizes[] = {{1, 1}, {3, 100}, {37, 128}, {130, 129}, {300, 520}, {256, 7168}};

TEST(CudaFp8, RowTilesMatchTheCpuBitForBit) {
  std::mt19937 rng(1);
  for (const Sizes& z : kQuantizeSizes)
    for (bool pow2 : {false, true}) {
      const auto x = hard_values(z.rows, z.cols, rng);
      const int64_t sld = rules::tile_scale_ld(z.rows), ns = blocks_of(z.cols) * sld;
      std::vector<uint8_t> codes(static_cast<size_t>(z.rows * z.cols));
      std::vector<float> scales(static_cast<size_t>(ns), -1.0f);
      cpu::fp8::QuantizeOptions opt;
      opt.power_of_two_scales = pow2;
      cpu::fp8::quantize_row_tiles(x.data(), z.cols, z.rows, z.cols, codes.data(), z.cols,
                                   scales.data(), sld, opt);
      Dev<float> dx(x);
      Dev<uint8_t> dc(codes.size());
      Dev<float> ds(std::vector<float>(static_cast<size_t>(ns), -1.0f));
      Dev<unsigned long long> bad(1);
      gpu::reset_first_bad(bad.p, stream());
      gpu::quantize_row_tiles(dx.p, z.cols, z.rows, z.cols, dc.p, z.cols, ds.p, sld, pow2, bad.p,
                              stream());
      gpu::check_first_bad(bad.p, z.cols, "x", stream());
      EXPECT_EQ(dc.get(), codes) << z.rows << "x" << z.cols << " pow2 " << pow2;
      EXPECT_EQ(std::memcmp(ds.get().data(), scales.data(), scales.size() * 4), 0)
          << z.rows << "x" << z.cols << " pow2 " << pow2;
    }
}

// Every float from 0 to 448 in steps of 2^9 bit patterns, both signs, encoded on the device at
// scale 1 (each tile holds 448): the device's E4M3 rule against the host's.
TEST(CudaFp8, DeviceEncodingMatchesTheHostRule) {
  std::vector<float> values;
  uint32_t top;
  const float limit = 448.0f;
  std::memcpy(&top, &limit, 4);
  for (uint32_t u = 0; u < top; u += 512) {
    float f;
    std::memcpy(&f, &u, 4);
    values.push_back(f);
    values.push_back(-f);
  }
  const int64_t per_tile = kBlock - 1, rows = static_cast<int64_t>(values.size()) / per_tile;
  std::vector<float> x(static_cast<size_t>(rows * kBlock));
  for (int64_t r = 0; r < rows; ++r) {
    x[static_cast<size_t>(r * kBlock)] = 448.0f;
    for (int64_t j = 0; j < per_tile; ++j)
      x[static_cast<size_t>(r * kBlock + 1 + j)] = values[static_cast<size_t>(r * per_tile + j)];
  }
  const int64_t sld = rules::tile_scale_ld(rows);
  Dev<float> dx(x), ds(static_cast<size_t>(sld));
  Dev<uint8_t> dc(x.size());
  Dev<unsigned long long> bad(1);
  gpu::reset_first_bad(bad.p, stream());
  gpu::quantize_row_tiles(dx.p, kBlock, rows, kBlock, dc.p, kBlock, ds.p, sld, false, bad.p,
                          stream());
  const auto codes = dc.get();
  const auto scales = ds.get();
  for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(scales[static_cast<size_t>(r)], 1.0f);
  int64_t mismatches = 0;
  for (size_t i = 0; i < x.size(); ++i)
    if (codes[i] != rules::e4m3_encode(x[i]) && mismatches++ < 5)
      ADD_FAILURE() << "x = " << x[i] << ": device " << int{codes[i]} << ", host "
                    << int{rules::e4m3_encode(x[i])};
  EXPECT_EQ(mismatches, 0);
}

TEST(CudaFp8, TokenTilesTransposedMatchTheCpuBitForBit) {
  std::mt19937 rng(2);
  for (const Sizes& z : kQuantizeSizes)
    for (bool pow2 : {false, true}) {
      const auto x = hard_values(z.rows, z.cols, rng);
      const int64_t sld = rules::tile_scale_ld(z.cols), ns = blocks_of(z.rows) * sld;
      std::vector<uint8_t> codes(static_cast<size_t>(z.rows * z.cols));
      std::vector<float> scales(static_cast<size_t>(ns), -1.0f);
      cpu::fp8::QuantizeOptions opt;
      opt.power_of_two_scales = pow2;
      cpu::fp8::quantize_column_tiles(x.data(), z.cols, z.rows, z.cols, codes.data(), z.cols,
                                      scales.data(), sld, opt);
      // A row stride past the rows, as cuBLASLt wants (a multiple of 16).
      const int64_t ld_t = (z.rows + 15) / 16 * 16;
      Dev<float> dx(x);
      Dev<uint8_t> dc(static_cast<size_t>(z.cols * ld_t));
      Dev<float> ds(std::vector<float>(static_cast<size_t>(ns), -1.0f));
      Dev<unsigned long long> bad(1);
      gpu::reset_first_bad(bad.p, stream());
      gpu::quantize_column_tiles_transposed(dx.p, z.cols, z.rows, z.cols, dc.p, ld_t, ds.p, sld,
                                            pow2, bad.p, stream());
      gpu::check_first_bad(bad.p, z.cols, "x", stream());
      const auto got = dc.get();
      int64_t mismatches = 0;
      for (int64_t r = 0; r < z.rows; ++r)
        for (int64_t c = 0; c < z.cols; ++c)
          mismatches +=
              got[static_cast<size_t>(c * ld_t + r)] != codes[static_cast<size_t>(r * z.cols + c)];
      EXPECT_EQ(mismatches, 0) << z.rows << "x" << z.cols << " pow2 " << pow2;
      EXPECT_EQ(std::memcmp(ds.get().data(), scales.data(), scales.size() * 4), 0)
          << z.rows << "x" << z.cols << " pow2 " << pow2;
    }
}

TEST(CudaFp8, BlocksAndTheirTransposeMatchTheCpuBitForBit) {
  std::mt19937 rng(3);
  for (const Sizes& z : kQuantizeSizes)
    for (bool pow2 : {false, true}) {
      const auto x = hard_values(z.rows, z.cols, rng);
      const int64_t sld = rules::block_scale_ld(z.cols), ns = blocks_of(z.rows) * sld;
      std::vector<uint8_t> codes(static_cast<size_t>(z.rows * z.cols));
      std::vector<float> scales(static_cast<size_t>(ns), -1.0f);
      cpu::fp8::QuantizeOptions opt;
      opt.power_of_two_scales = pow2;
      cpu::fp8::quantize_blocks(x.data(), z.cols, z.rows, z.cols, codes.data(), z.cols,
                                scales.data(), sld, opt);
      Dev<float> dx(x);
      Dev<uint8_t> dc(codes.size());
      Dev<float> ds(std::vector<float>(static_cast<size_t>(ns), -1.0f));
      Dev<unsigned long long> bad(1);
      gpu::reset_first_bad(bad.p, stream());
      gpu::quantize_blocks(dx.p, z.cols, z.rows, z.cols, dc.p, z.cols, ds.p, sld, pow2, bad.p,
                           stream());
      gpu::check_first_bad(bad.p, z.cols, "w", stream());
      EXPECT_EQ(dc.get(), codes) << z.rows << "x" << z.cols;
      EXPECT_EQ(std::memcmp(ds.get().data(), scales.data(), scales.size() * 4), 0)
          << z.rows << "x" << z.cols;

      // The transpose: codes [cols, rows] and the scale grid read the other way.
      const int64_t sld_t = rules::block_scale_ld(z.rows);
      Dev<uint8_t> dct(static_cast<size_t>(z.cols * z.rows));
      Dev<float> dst(static_cast<size_t>(blocks_of(z.cols) * sld_t));
      gpu::transpose_blocks(dc.p, z.cols, ds.p, sld, z.rows, z.cols, dct.p, z.rows, dst.p, sld_t,
                            stream());
      const auto ct = dct.get();
      const auto st = dst.get();
      int64_t mismatches = 0;
      for (int64_t r = 0; r < z.rows; ++r)
        for (int64_t c = 0; c < z.cols; ++c)
          mismatches +=
              ct[static_cast<size_t>(c * z.rows + r)] != codes[static_cast<size_t>(r * z.cols + c)];
      for (int64_t rb = 0; rb < blocks_of(z.rows); ++rb)
        for (int64_t cb = 0; cb < blocks_of(z.cols); ++cb)
          mismatches += st[static_cast<size_t>(cb * sld_t + rb)] !=
                        scales[static_cast<size_t>(rb * sld + cb)];
      EXPECT_EQ(mismatches, 0) << "transpose " << z.rows << "x" << z.cols;
    }
}

TEST(CudaFp8, NonFiniteInputIsANumericErrorNamingWhere) {
  const int64_t rows = 200, cols = 300;
  for (float bad_value :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> x(static_cast<size_t>(rows * cols), 1.0f);
    x[static_cast<size_t>(150 * cols + 260)] = bad_value;
    x[static_cast<size_t>(170 * cols + 3)] = -bad_value;
    Dev<float> dx(x);
    Dev<uint8_t> codes(static_cast<size_t>(rows * cols));
    Dev<float> scales(static_cast<size_t>(4 * 4 * 304));
    Dev<unsigned long long> bad(1);
    auto expect_error = [&](const char* kind) {
      try {
        gpu::check_first_bad(bad.p, cols, "activation", stream());
        ADD_FAILURE() << kind << ": no error";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), Code::Numeric);
        EXPECT_NE(std::string(e.what()).find("row 150, column 260"), std::string::npos)
            << kind << ": " << e.what();
      }
    };
    gpu::reset_first_bad(bad.p, stream());
    gpu::quantize_row_tiles(dx.p, cols, rows, cols, codes.p, cols, scales.p,
                            rules::tile_scale_ld(rows), false, bad.p, stream());
    expect_error("row tiles");
    gpu::reset_first_bad(bad.p, stream());
    gpu::quantize_column_tiles_transposed(dx.p, cols, rows, cols, codes.p, rows, scales.p,
                                          rules::tile_scale_ld(cols), false, bad.p, stream());
    expect_error("token tiles");
    gpu::reset_first_bad(bad.p, stream());
    gpu::quantize_blocks(dx.p, cols, rows, cols, codes.p, cols, scales.p,
                         rules::block_scale_ld(cols), false, bad.p, stream());
    expect_error("blocks");
  }
}

// ---- GEMMs: cuBLASLt against the CPU emulation of the same quantized operands.

double relative(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    const double d = double{got[i]} - want[i];
    num += d * d;
    den += double{want[i]} * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

std::vector<float> bf16_to_f32(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const uint32_t u = static_cast<uint32_t>(v[i]) << 16;
    std::memcpy(&out[i], &u, 4);
  }
  return out;
}

gpu::Fp8Gemm& gemm() {
  static gpu::Fp8Gemm g(stream());
  return g;
}

struct GemmShape {
  int64_t m, n, k;
};
// Row counts that are and are not multiples of 4 and of 128 (run rounded up to 16, as the FFN
// runs them); reductions with a partial last block (k a multiple of 16, as cuBLASLt's FP8 kernels
// need); a DeepSeek-V3 expert's shape.
const GemmShape kGemmShapes[] = {
    {128, 256, 512}, {37, 128, 384}, {130, 384, 336}, {1, 256, 128}, {256, 2048, 7168}};

// The rows a GEMM of m real rows runs with, as the FFN runs it (cuda_ffn_fp8.cu's gemm_rows): m
// rounded up to 16, the rows past m zero codes with zero scales, the tiles' scale stride that
// row count.
int64_t gemm_rows(int64_t m) { return (m + 15) / 16 * 16; }

template <typename T>
std::vector<T> padded(std::vector<T> v, size_t n) {
  v.resize(n, T{});
  return v;
}

// Agreement of the GPU's product with the emulation: both multiply the same codes, scale each
// 128-block's partial sum by the same two fp32 scales and accumulate in fp32. They differ in how a
// block's products are summed: in order in fp32 on the CPU, inside the tensor cores on the GPU,
// whose FP8 accumulation keeps fewer bits (about 14, DeepSeek-V3 report section 3.3.2) until
// cuBLASLt promotes the block's sum. That is ~1e-4 of a block sum; a wrong layout or scale is
// O(1). bf16 output adds its own rounding (2^-9 relative).
constexpr double kF32Tolerance = 2e-3;
constexpr double kBf16Tolerance = 1e-2;

void report(const char* gemm_name, const GemmShape& s, const char* out, double rel) {
  std::printf("  %-6s %5lld x %5lld x %5lld  %-4s  |gpu - cpu| / |cpu| = %.3g\n", gemm_name,
              static_cast<long long>(s.m), static_cast<long long>(s.n), static_cast<long long>(s.k),
              out, rel);
}

TEST(CudaFp8, FpropMatchesTheCpuEmulation) {
  std::mt19937 rng(10);
  for (const GemmShape& s : kGemmShapes) {
    const auto x = randn(static_cast<size_t>(s.m * s.k), rng);
    const auto w = randn(static_cast<size_t>(s.n * s.k), rng);
    const int64_t mr = gemm_rows(s.m), xs_ld = mr, ws_ld = rules::block_scale_ld(s.k);
    std::vector<uint8_t> xc(x.size()), wc(w.size());
    std::vector<float> xs(static_cast<size_t>(blocks_of(s.k) * xs_ld));
    std::vector<float> ws(static_cast<size_t>(blocks_of(s.n) * ws_ld));
    cpu::fp8::quantize_row_tiles(x.data(), s.k, s.m, s.k, xc.data(), s.k, xs.data(), xs_ld, {});
    cpu::fp8::quantize_blocks(w.data(), s.k, s.n, s.k, wc.data(), s.k, ws.data(), ws_ld, {});
    const auto y0 = randn(static_cast<size_t>(s.m * s.n), rng);
    for (bool accumulate : {false, true}) {
      std::vector<float> want = y0;
      std::vector<float> scratch(
          static_cast<size_t>(cpu::fp8::gemm_fprop_scratch_floats(s.m, s.n, s.k)));
      cpu::fp8::gemm_fprop({xc.data(), s.k, xs.data(), xs_ld}, {wc.data(), s.k, ws.data(), ws_ld},
                           want.data(), s.n, s.m, s.n, s.k, accumulate, scratch.data());
      // The GPU quantizes on its own: the same codes (checked above), the same product. Its
      // buffers hold mr rows, zero past m.
      Dev<float> dx(x), dw(w), dy(padded(y0, static_cast<size_t>(mr * s.n)));
      Dev<uint8_t> dxc(static_cast<size_t>(mr * s.k)), dwc(wc.size());
      Dev<float> dxs(xs.size()), dws(ws.size());
      Dev<unsigned long long> bad(1);
      gpu::reset_first_bad(bad.p, stream());
      gpu::quantize_row_tiles(dx.p, s.k, s.m, s.k, dxc.p, s.k, dxs.p, xs_ld, false, bad.p,
                              stream());
      gpu::quantize_blocks(dw.p, s.k, s.n, s.k, dwc.p, s.k, dws.p, ws_ld, false, bad.p, stream());
      gemm().run(mr, s.n, s.k, dxc.p, s.k, dxs.p, dwc.p, s.k, dws.p, gpu::Scaling::Blocks, dy.p,
                 s.n, gpu::Output::F32, accumulate);
      const double rel = relative(padded(dy.get(), want.size()), want);
      report("Fprop", s, "fp32", rel);
      EXPECT_LT(rel, kF32Tolerance) << s.m << "x" << s.n << "x" << s.k;
      if (!accumulate) {
        Dev<uint16_t> dyb(static_cast<size_t>(mr * s.n));
        gemm().run(mr, s.n, s.k, dxc.p, s.k, dxs.p, dwc.p, s.k, dws.p, gpu::Scaling::Blocks, dyb.p,
                   s.n, gpu::Output::BF16, false);
        const double rel16 = relative(padded(bf16_to_f32(dyb.get()), want.size()), want);
        report("Fprop", s, "bf16", rel16);
        EXPECT_LT(rel16, kBf16Tolerance) << s.m << "x" << s.n << "x" << s.k;
      }
    }
  }
}

TEST(CudaFp8, DgradMatchesTheCpuEmulation) {
  std::mt19937 rng(11);
  for (const GemmShape& s : kGemmShapes) {
    // dx[m, k] = dy[m, n] W[n, k]: on the GPU, dy tiles along n times W^T [k, n] in blocks.
    const auto dy = randn(static_cast<size_t>(s.m * s.n), rng);
    const auto w = randn(static_cast<size_t>(s.n * s.k), rng);
    const int64_t mr = gemm_rows(s.m), ds_ld = mr, ws_ld = rules::block_scale_ld(s.k);
    std::vector<uint8_t> dyc(dy.size()), wc(w.size());
    std::vector<float> dys(static_cast<size_t>(blocks_of(s.n) * ds_ld));
    std::vector<float> ws(static_cast<size_t>(blocks_of(s.n) * ws_ld));
    cpu::fp8::quantize_row_tiles(dy.data(), s.n, s.m, s.n, dyc.data(), s.n, dys.data(), ds_ld, {});
    cpu::fp8::quantize_blocks(w.data(), s.k, s.n, s.k, wc.data(), s.k, ws.data(), ws_ld, {});
    std::vector<float> want(static_cast<size_t>(s.m * s.k));
    std::vector<float> scratch(
        static_cast<size_t>(cpu::fp8::gemm_dgrad_scratch_floats(s.m, s.n, s.k)));
    cpu::fp8::gemm_dgrad({dyc.data(), s.n, dys.data(), ds_ld}, {wc.data(), s.k, ws.data(), ws_ld},
                         want.data(), s.k, s.m, s.n, s.k, false, scratch.data());

    Dev<uint8_t> ddyc(padded(dyc, static_cast<size_t>(mr * s.n))), dwc(wc),
        dwt(static_cast<size_t>(s.k * s.n));
    Dev<float> ddys(dys), dws(ws);
    const int64_t wt_ld = rules::block_scale_ld(s.n);
    Dev<float> dwts(static_cast<size_t>(blocks_of(s.k) * wt_ld));
    gpu::transpose_blocks(dwc.p, s.k, dws.p, ws_ld, s.n, s.k, dwt.p, s.n, dwts.p, wt_ld, stream());
    Dev<float> ddx(static_cast<size_t>(mr * s.k));
    gemm().run(mr, s.k, s.n, ddyc.p, s.n, ddys.p, dwt.p, s.n, dwts.p, gpu::Scaling::Blocks, ddx.p,
               s.k, gpu::Output::F32, false);
    const double rel = relative(padded(ddx.get(), want.size()), want);
    report("Dgrad", s, "fp32", rel);
    EXPECT_LT(rel, kF32Tolerance) << s.m << "x" << s.n << "x" << s.k;
  }
}

TEST(CudaFp8, WgradMatchesTheCpuEmulation) {
  std::mt19937 rng(12);
  for (const GemmShape& s : kGemmShapes) {
    // dW[n, k] = dy[t, n]^T x[t, k] over t = m tokens; the GPU takes both transposed, tiled along
    // the tokens, which must then be a multiple of 16 (the transposed row stride).
    const int64_t t = (s.m + 15) / 16 * 16;
    const auto dy = randn(static_cast<size_t>(t * s.n), rng);
    const auto x = randn(static_cast<size_t>(t * s.k), rng);
    const int64_t dys_ld = rules::tile_scale_ld(s.n), xs_ld = rules::tile_scale_ld(s.k);
    std::vector<uint8_t> dyc(dy.size()), xc(x.size());
    std::vector<float> dys(static_cast<size_t>(blocks_of(t) * dys_ld));
    std::vector<float> xs(static_cast<size_t>(blocks_of(t) * xs_ld));
    cpu::fp8::quantize_column_tiles(dy.data(), s.n, t, s.n, dyc.data(), s.n, dys.data(), dys_ld,
                                    {});
    cpu::fp8::quantize_column_tiles(x.data(), s.k, t, s.k, xc.data(), s.k, xs.data(), xs_ld, {});
    std::vector<float> want(static_cast<size_t>(s.n * s.k));
    std::vector<float> scratch(
        static_cast<size_t>(cpu::fp8::gemm_wgrad_scratch_floats(t, s.n, s.k)));
    cpu::fp8::gemm_wgrad({dyc.data(), s.n, dys.data(), dys_ld}, {xc.data(), s.k, xs.data(), xs_ld},
                         want.data(), s.k, t, s.n, s.k, false, scratch.data());

    Dev<float> ddy(dy), dx(x);
    Dev<uint8_t> dyt(static_cast<size_t>(s.n * t)), xt(static_cast<size_t>(s.k * t));
    Dev<float> ddys(dys.size()), dxs(xs.size());
    Dev<unsigned long long> bad(1);
    gpu::reset_first_bad(bad.p, stream());
    gpu::quantize_column_tiles_transposed(ddy.p, s.n, t, s.n, dyt.p, t, ddys.p, dys_ld, false,
                                          bad.p, stream());
    gpu::quantize_column_tiles_transposed(dx.p, s.k, t, s.k, xt.p, t, dxs.p, xs_ld, false, bad.p,
                                          stream());
    Dev<float> ddw(static_cast<size_t>(s.n * s.k));
    gemm().run(s.n, s.k, t, dyt.p, t, ddys.p, xt.p, t, dxs.p, gpu::Scaling::Tiles, ddw.p, s.k,
               gpu::Output::F32, false);
    const double rel = relative(ddw.get(), want);
    report("Wgrad", GemmShape{t, s.n, s.k}, "fp32", rel);
    EXPECT_LT(rel, kF32Tolerance) << t << "x" << s.n << "x" << s.k;

    // As the FFN runs it: accumulated onto a gradient (beta = 1, C = D in fp32, both operands in
    // 1x128 tiles), compared as what the call added.
    const auto dw0 = randn(want.size(), rng);
    Dev<float> ddw_acc(dw0);
    gemm().run(s.n, s.k, t, dyt.p, t, ddys.p, xt.p, t, dxs.p, gpu::Scaling::Tiles, ddw_acc.p, s.k,
               gpu::Output::F32, true);
    auto added = ddw_acc.get();
    for (size_t i = 0; i < added.size(); ++i) added[i] -= dw0[i];
    const double rel_acc = relative(added, want);
    report("Wgrad+", GemmShape{t, s.n, s.k}, "fp32", rel_acc);
    EXPECT_LT(rel_acc, kF32Tolerance) << "accumulating " << t << "x" << s.n << "x" << s.k;
  }
}

TEST(CudaFp8, SameShapeTwiceGivesTheSameBits) {
  std::mt19937 rng(13);
  const int64_t m = 200, n = 256, k = 640;
  const auto x = randn(static_cast<size_t>(m * k), rng), w = randn(static_cast<size_t>(n * k), rng);
  Dev<float> dx(x), dw(w);
  Dev<uint8_t> xc(x.size()), wc(w.size());
  Dev<float> xs(static_cast<size_t>(blocks_of(k) * rules::tile_scale_ld(m)));
  Dev<float> ws(static_cast<size_t>(blocks_of(n) * rules::block_scale_ld(k)));
  Dev<unsigned long long> bad(1);
  gpu::reset_first_bad(bad.p, stream());
  gpu::quantize_row_tiles(dx.p, k, m, k, xc.p, k, xs.p, rules::tile_scale_ld(m), false, bad.p,
                          stream());
  gpu::quantize_blocks(dw.p, k, n, k, wc.p, k, ws.p, rules::block_scale_ld(k), false, bad.p,
                       stream());
  Dev<float> y1(static_cast<size_t>(m * n)), y2(static_cast<size_t>(m * n));
  gemm().run(m, n, k, xc.p, k, xs.p, wc.p, k, ws.p, gpu::Scaling::Blocks, y1.p, n, gpu::Output::F32,
             false);
  gemm().run(m, n, k, xc.p, k, xs.p, wc.p, k, ws.p, gpu::Scaling::Blocks, y2.p, n, gpu::Output::F32,
             false);
  EXPECT_EQ(y1.get(), y2.get());
}

// What cuBLASLt makes of a row count that is not a multiple of 8 (the FFN never runs one:
// cuda_ffn_fp8.cu rounds to 16), and with it which scale stride it reads for the tiles: either it
// refuses the shape (Unsupported, as Transformer Engine's observation of it predicts), or it runs
// it with fp8_gemm.h's documented layout (stride tile_scale_ld(m), m rounded up to 4). The line
// printed says which, and, where the documented layout fails, whether the exact stride m works.
TEST(CudaFp8, RowCountsOffMultiplesOf8AreRefusedOrReadTheDocumentedLayout) {
  std::mt19937 rng(14);
  const int64_t n = 256, k = 384;
  const auto w = randn(static_cast<size_t>(n * k), rng);
  const int64_t ws_ld = rules::block_scale_ld(k);
  std::vector<uint8_t> wc(w.size());
  std::vector<float> ws(static_cast<size_t>(blocks_of(n) * ws_ld));
  cpu::fp8::quantize_blocks(w.data(), k, n, k, wc.data(), k, ws.data(), ws_ld, {});
  Dev<uint8_t> dwc(wc);
  Dev<float> dws(ws);
  for (int64_t m : {int64_t{37}, int64_t{4}, int64_t{1}, int64_t{12}}) {
    const auto x = randn(static_cast<size_t>(m * k), rng);
    // The product of m rows under a scale stride of xs_ld, on the CPU and on the GPU; NaN where
    // cuBLASLt refuses the shape.
    auto run = [&](int64_t xs_ld, std::vector<float>& want) -> double {
      std::vector<uint8_t> xc(x.size());
      std::vector<float> xs(static_cast<size_t>(blocks_of(k) * xs_ld));
      cpu::fp8::quantize_row_tiles(x.data(), k, m, k, xc.data(), k, xs.data(), xs_ld, {});
      want.assign(static_cast<size_t>(m * n), 0.0f);
      std::vector<float> scratch(static_cast<size_t>(cpu::fp8::gemm_fprop_scratch_floats(m, n, k)));
      cpu::fp8::gemm_fprop({xc.data(), k, xs.data(), xs_ld}, {wc.data(), k, ws.data(), ws_ld},
                           want.data(), n, m, n, k, false, scratch.data());
      Dev<uint8_t> dxc(xc);
      Dev<float> dxs(xs), dy(static_cast<size_t>(m * n));
      try {
        gemm().run(m, n, k, dxc.p, k, dxs.p, dwc.p, k, dws.p, gpu::Scaling::Blocks, dy.p, n,
                   gpu::Output::F32, false);
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), Code::Unsupported) << e.what();
        return NAN;
      }
      return relative(dy.get(), want);
    };
    std::vector<float> want;
    const double documented = run(rules::tile_scale_ld(m), want);
    if (std::isnan(documented)) {
      std::printf("  m = %2lld: refused by cuBLASLt (Unsupported)\n", static_cast<long long>(m));
      continue;
    }
    const double exact = documented < kF32Tolerance ? documented : run(m, want);
    std::printf("  m = %2lld: runs; error with scale stride %lld (documented) %.3g, %lld %.3g\n",
                static_cast<long long>(m), static_cast<long long>(rules::tile_scale_ld(m)),
                documented, static_cast<long long>(m), exact);
    EXPECT_LT(documented, kF32Tolerance)
        << "m = " << m << ": cuBLASLt runs it but not with fp8_gemm.h's scale layout";
  }
}

// The FFN hands cuBLASLt scale pointers that are 16-byte aligned only (each segment's scales
// start a multiple of 4 floats into one buffer): the same GEMM with its scales 16 bytes off a
// 256-byte boundary must give the same bits (the scale pointers are no part of the algorithm's
// choice, so the same algorithm runs).
TEST(CudaFp8, ScalesOnlySixteenByteAlignedGiveTheSameBits) {
  std::mt19937 rng(15);
  const int64_t m = 48, n = 256, k = 640, xs_ld = gemm_rows(m), ws_ld = rules::block_scale_ld(k);
  const auto x = randn(static_cast<size_t>(m * k), rng), w = randn(static_cast<size_t>(n * k), rng);
  std::vector<uint8_t> xc(x.size()), wc(w.size());
  std::vector<float> xs(static_cast<size_t>(blocks_of(k) * xs_ld));
  std::vector<float> ws(static_cast<size_t>(blocks_of(n) * ws_ld));
  cpu::fp8::quantize_row_tiles(x.data(), k, m, k, xc.data(), k, xs.data(), xs_ld, {});
  cpu::fp8::quantize_blocks(w.data(), k, n, k, wc.data(), k, ws.data(), ws_ld, {});
  Dev<uint8_t> dxc(xc), dwc(wc);
  constexpr size_t kOff = 4;  // floats: 16 bytes
  std::vector<float> xs_off(kOff, -1.0f), ws_off(kOff, -1.0f);
  xs_off.insert(xs_off.end(), xs.begin(), xs.end());
  ws_off.insert(ws_off.end(), ws.begin(), ws.end());
  Dev<float> dxs(xs), dws(ws), dxs_off(xs_off), dws_off(ws_off);
  Dev<float> y1(static_cast<size_t>(m * n)), y2(static_cast<size_t>(m * n));
  gemm().run(m, n, k, dxc.p, k, dxs.p, dwc.p, k, dws.p, gpu::Scaling::Blocks, y1.p, n,
             gpu::Output::F32, false);
  gemm().run(m, n, k, dxc.p, k, dxs_off.p + kOff, dwc.p, k, dws_off.p + kOff, gpu::Scaling::Blocks,
             y2.p, n, gpu::Output::F32, false);
  EXPECT_EQ(y1.get(), y2.get());
}

TEST(CudaFp8, ARefusedLayoutIsUnsupportedNotAFallback) {
  // A row stride of 40 codes is not a multiple of 16 bytes: cuBLASLt's FP8 kernels refuse it.
  const int64_t m = 64, n = 128, k = 40;
  Dev<uint8_t> a(static_cast<size_t>(m * k)), b(static_cast<size_t>(n * k));
  Dev<float> as(static_cast<size_t>(rules::tile_scale_ld(m))),
      bs(static_cast<size_t>(rules::block_scale_ld(k)));
  Dev<float> d(static_cast<size_t>(m * n));
  try {
    gemm().run(m, n, k, a.p, k, as.p, b.p, k, bs.p, gpu::Scaling::Blocks, d.p, n, gpu::Output::F32,
               false);
    cuda_ok(cudaDeviceSynchronize(), "sync");
    ADD_FAILURE() << "cuBLASLt ran an FP8 GEMM with a row stride of 40 codes";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Unsupported) << e.what();
    EXPECT_NE(std::string(e.what()).find("row strides 40, 40"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moert

std::string moert_gpu_test::gpu_unavailable_reason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
  if (count == 0) return "no CUDA device";
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  if (major != 9)
    return "device 0 is sm_" + std::to_string(major) + std::to_string(minor) +
           "; these kernels are built for sm_90a";
  try {
    moert::gemm();
  } catch (const std::exception& ex) {
    return ex.what();
  }
  return "";
}

int main(int argc, char** argv) { return moert_gpu_test::run(argc, argv); }
