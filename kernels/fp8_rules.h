// The per-element rules of DeepSeek-V3's block-scaled FP8 (technical report section 3.3): E4M3
// encoding and the scale of a tile or block. The CPU quantizer (kernels/cpu/fp8.cc) and the CUDA
// quantize kernels (kernels/cuda/fp8_quantize.cu) both call these, so that the two produce the same
// codes and scales bit for bit. Integer and correctly rounded float operations only: nothing here
// depends on the compiler's contraction or on a math library. Needs no CUDA header on the host.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define MOERT_FP8_HOST_DEVICE __host__ __device__
#else
#define MOERT_FP8_HOST_DEVICE
#endif

namespace moert::fp8 {

// Tiles and blocks are 128 long along each blocked dimension (DeepSeek-V3, DeepGEMM, cuBLASLt's
// VEC128_32F and BLK128x128_32F scale modes).
inline constexpr int64_t kBlock = 128;
// E4M3 "fn": largest finite magnitude 448 = 1.75 * 2^8; no infinities; 0x7F / 0xFF are NaN.
inline constexpr float kE4M3Max = 448.0f;
inline constexpr uint8_t kE4M3MaxCode = 0x7E;
// The smallest scale a tile with a nonzero amax gets: FLT_MIN = 2^-126, the smallest normal
// float. Below it amax / 448 would lose bits to gradual underflow (and reach 0 for amax < 448 *
// 2^-149, dividing by zero); 2^-126 is a power of two and an exact UE8M0 value.
inline constexpr float kMinScale = 0x1p-126f;
// The scale of a tile whose values are all zero (either sign): any finite scale dequantizes its
// zero codes to zero, and 1 keeps the product of two scales far from underflow.
inline constexpr float kZeroTileScale = 1.0f;

MOERT_FP8_HOST_DEVICE inline uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

MOERT_FP8_HOST_DEVICE inline float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// The bits of |x|. Magnitudes of non-NaN floats order like their bit patterns as unsigned
// integers, so a tile's amax is an integer maximum of these: exact, order-independent (one thread
// on the CPU, a warp on the GPU give the same), vectorizable, and NaN and infinity show in it as
// bits >= kNonFiniteBits.
MOERT_FP8_HOST_DEVICE inline uint32_t magnitude_bits(float x) {
  return float_bits(x) & 0x7FFFFFFFu;
}
inline constexpr uint32_t kNonFiniteBits = 0x7F800000u;

MOERT_FP8_HOST_DEVICE inline bool is_finite(float x) { return magnitude_bits(x) < kNonFiniteBits; }

MOERT_FP8_HOST_DEVICE inline uint32_t max_u32(uint32_t a, uint32_t b) { return b > a ? b : a; }

// x rounded to the nearest E4M3 value, ties to even, saturating: magnitudes from 448 up
// (infinity included) give +-448; a NaN gives the NaN code 0x7F with x's sign (quantizers reject
// NaN before encoding). The sign of zero is kept: -0 encodes as 0x80.
//
// Branch-free, so that the CPU quantizer's loops vectorize. For |x| in [2^e, 2^(e+1)), e >= -6,
// adding c = 2^(e+20) leaves a float whose unit in the last place is 2^(e-3), the spacing of E4M3
// values there: (|x| + c) - c is |x| rounded to E4M3 by the hardware's round-to-nearest-even
// (a carry to 2^(e+1) included). Below 2^-6 (E4M3's subnormals, steps of 2^-9) c = 2^14 does the
// same. Every intermediate is a normal float or zero, so flush-to-zero and denormals-are-zero
// modes change nothing but inputs below 2^-126, which round to zero either way. The rounded value
// r then gives the code: its exponent and top 3 mantissa bits (rebiased from 127 to 7) when
// r >= 2^-6, else r / 2^-9.
MOERT_FP8_HOST_DEVICE inline uint8_t e4m3_encode(float x) {
  const uint32_t bits = float_bits(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t mag = bits & 0x7FFFFFFFu;
  const uint32_t exponent = max_u32(mag & 0x7F800000u, 0x3C800000u);  // 2^max(e, -6)
  const float c = bits_float(exponent + (20u << 23));
#ifdef __CUDA_ARCH__
  const float r = __fsub_rn(__fadd_rn(bits_float(mag), c), c);
#else
  const float r = (bits_float(mag) + c) - c;
#endif
  const uint32_t rbits = float_bits(r);
  // Only r < 2^-6 is converted (the rest, NaN and infinity from non-finite x included, would be
  // out of range for the conversion), and it is a multiple of 2^-9: the product is exact.
  const float small = rbits < 0x3C800000u ? r : 0.0f;
#ifdef __CUDA_ARCH__
  const uint32_t subnormal = static_cast<uint32_t>(__float2int_rz(__fmul_rn(small, 512.0f)));
#else
  const uint32_t subnormal = static_cast<uint32_t>(static_cast<int32_t>(small * 512.0f));
#endif
  uint32_t code = rbits >= 0x3C800000u ? (rbits >> 20) - (120u << 3) : subnormal;
  code = mag >= 0x43E00000u ? kE4M3MaxCode : code;  // >= 448.0f, infinity: saturate
  code = mag > kNonFiniteBits ? 0x7Fu : code;       // NaN
  return static_cast<uint8_t>(sign | code);
}

// The value of an E4M3 code, exactly: 0x7F and 0xFF are NaN; exponent field 0 holds the
// subnormals mantissa * 2^-9; otherwise (1 + mantissa / 8) * 2^(exponent - 7).
MOERT_FP8_HOST_DEVICE inline float e4m3_decode(uint8_t code) {
  const uint32_t sign = uint32_t{code & 0x80u} << 24;
  const uint32_t exponent = (code >> 3) & 15u, mantissa = code & 7u;
  if (exponent == 15u && mantissa == 7u) return bits_float(sign | 0x7FC00000u);
  if (exponent == 0u) return bits_float(sign | float_bits(static_cast<float>(mantissa) * 0x1p-9f));
  return bits_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// Whether a stored block or tile scale is one a quantizer makes: finite and at least kMinScale
// (tile_scale's range). Zero, negative, subnormal, NaN and infinite scales are corrupt data: a
// negative scale would flip its block's sign, a zero one erase it.
MOERT_FP8_HOST_DEVICE inline bool is_valid_scale(float s) { return s >= kMinScale && is_finite(s); }

// The smallest power of two >= s, for a positive normal float s: DeepSeek-V3.1's and DeepGEMM's
// UE8M0 scales (an 8-bit exponent, no mantissa). Exact: s already a power of two is kept.
MOERT_FP8_HOST_DEVICE inline float round_up_to_power_of_two(float s) {
  const uint32_t bits = float_bits(s);
  if ((bits & 0x7FFFFFu) == 0) return s;
  return bits_float(((bits >> 23) + 1u) << 23);
}

// The dequantization scale of a tile or block whose largest magnitude is amax (finite, >= 0):
// amax / 448, so that the tile's largest value encodes as +-448; at least kMinScale; rounded up to
// a power of two when power_of_two is set (then the largest value encodes at or below 448);
// kZeroTileScale for an all-zero tile. Stored scales are what codes are multiplied by to
// dequantize: value ~ e4m3_decode(code) * scale (DeepSeek-V3's weight_scale_inv convention).
MOERT_FP8_HOST_DEVICE inline float tile_scale(float amax, bool power_of_two) {
  if (amax == 0.0f) return kZeroTileScale;
#ifdef __CUDA_ARCH__
  float s = __fdiv_rn(amax, kE4M3Max);
#else
  float s = amax / kE4M3Max;
#endif
  if (!(s >= kMinScale)) s = kMinScale;
  return power_of_two ? round_up_to_power_of_two(s) : s;
}

// The largest code magnitude whose value times `scale` is a finite float: kE4M3MaxCode (448)
// unless the scale exceeds about 2^119. A power-of-two scale of 2^120 (a block whose largest
// magnitude exceeds 448 * 2^119) would otherwise round values from 248 * 2^120 on up to
// 256 * 2^120 = 2^128, which decodes to infinity.
MOERT_FP8_HOST_DEVICE inline uint32_t max_code(float scale) {
  uint32_t c = kE4M3MaxCode;
  while (c > 0u && !is_finite(e4m3_decode(static_cast<uint8_t>(c)) * scale)) --c;
  return c;
}

// The code of one value x of a tile with the given scale: x / scale (correctly rounded) encoded,
// its magnitude at most `cap` (max_code(scale)): so code * scale is finite for finite x.
MOERT_FP8_HOST_DEVICE inline uint8_t quantize_value(float x, float scale, uint32_t cap) {
#ifdef __CUDA_ARCH__
  const uint32_t code = e4m3_encode(__fdiv_rn(x, scale));
#else
  const uint32_t code = e4m3_encode(x / scale);
#endif
  const uint32_t mag = code & 0x7Fu;
  // The NaN code (never reached by the quantizers, which refuse NaN first) stays NaN.
  return static_cast<uint8_t>((code & 0x80u) | (mag > cap && mag != 0x7Fu ? cap : mag));
}
MOERT_FP8_HOST_DEVICE inline uint8_t quantize_value(float x, float scale) {
  return quantize_value(x, scale, max_code(scale));
}

// Rows of the scale tensor of activation tiles (cuBLASLt's VEC128_32F layout): the scales of one
// 128-long block of the reduction dimension, for all `outer` rows, lie contiguous, and each such
// run starts on a 16-byte boundary (rows rounded up to a multiple of 4 floats).
MOERT_FP8_HOST_DEVICE inline int64_t tile_scale_ld(int64_t outer) { return (outer + 3) / 4 * 4; }
// The same for 128x128 blocks (BLK128x128_32F): one row of scales per 128 rows of the matrix,
// ceil(inner / 128) blocks in it, rounded up to a multiple of 4.
MOERT_FP8_HOST_DEVICE inline int64_t block_scale_ld(int64_t inner) {
  return ((inner + kBlock - 1) / kBlock + 3) / 4 * 4;
}
MOERT_FP8_HOST_DEVICE inline int64_t blocks_of(int64_t n) { return (n + kBlock - 1) / kBlock; }

}  // namespace moert::fp8
