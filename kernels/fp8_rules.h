// The per-element rules of DeepSeek-V3's block-scaled FP8 (technical report section 3.3): E4M3
// encoding and the scale of a tile or block. The CPU quantizer (kernels/cpu/fp8.cc) and the CUDA
// quantize kernels (kernels/cuda/fp8_quantize.cu) both call these, so that the two produce the same
// codes and scales bit for bit. Integer and correctly rounded float operations only: nothing here
// depends on the compiler's contraction or on a math library. Needs no CUDA header on the host.
// Decoding is core/tensor_codec.h's e4m3_to_float.
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

// |x| as a float (clears the sign bit, so it is exact for every input, NaN included).
MOERT_FP8_HOST_DEVICE inline float abs_value(float x) {
  return bits_float(float_bits(x) & 0x7FFFFFFFu);
}

// Neither NaN nor infinite.
MOERT_FP8_HOST_DEVICE inline bool is_finite(float x) {
  return (float_bits(x) & 0x7F800000u) != 0x7F800000u;
}

// The larger of two non-negative, non-NaN magnitudes. Exact and order-independent, so a tile's
// amax is the same whatever order a reduction takes (one thread on the CPU, a warp on the GPU).
MOERT_FP8_HOST_DEVICE inline float max_magnitude(float a, float b) { return b > a ? b : a; }

// x rounded to the nearest E4M3 value, ties to even, saturating: magnitudes from 448 up
// (infinity included) give +-448; a NaN gives the NaN code 0x7F with x's sign (quantizers reject
// NaN before encoding). The sign of zero is kept: -0 encodes as 0x80.
//
// E4M3 values are q * 2^(e - 3) with an integer q: q in [8, 15] for normal numbers (exponent e in
// [-6, 8]) and q in [0, 7] with e = -6 for subnormals (steps of 2^-9). The float's 24-bit
// significand is shifted down to q, and the dropped bits decide the rounding; a carry out of q
// (q = 16, or q = 8 from a subnormal) lands in the exponent field by itself.
MOERT_FP8_HOST_DEVICE inline uint8_t e4m3_encode(float x) {
  const uint32_t bits = float_bits(x);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Fu);
  if (mag >= 0x43E00000u) return static_cast<uint8_t>(sign | kE4M3MaxCode);  // >= 448.0f
  const int e = static_cast<int>(mag >> 23) - 127;
  // Below 2^-10 (half the smallest subnormal 2^-9) everything rounds to zero; 2^-10 itself is a
  // tie that goes to the even 0. Float subnormals and zero land here too.
  if (e < -10) return sign;
  const uint32_t significand = (mag & 0x7FFFFFu) | 0x800000u;  // value = significand * 2^(e - 23)
  const int shift = 20 + (e < -6 ? -6 - e : 0);                // 20..24
  uint32_t q = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (q & 1u))) ++q;
  // Subnormal range: the code is q itself (q = 8 is the smallest normal, code 0x08).
  if (e < -6) return static_cast<uint8_t>(sign | q);
  // Normal: exponent field e + 7, mantissa q - 8; q = 16 carries into the exponent.
  return static_cast<uint8_t>(sign |
                              static_cast<uint32_t>(((e + 7) << 3) + static_cast<int>(q) - 8));
}

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
// dequantize: value ~ e4m3_to_float(code) * scale (DeepSeek-V3's weight_scale_inv convention).
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

// The code of one value x of a tile with the given scale: x / scale (correctly rounded) encoded.
MOERT_FP8_HOST_DEVICE inline uint8_t quantize_value(float x, float scale) {
#ifdef __CUDA_ARCH__
  return e4m3_encode(__fdiv_rn(x, scale));
#else
  return e4m3_encode(x / scale);
#endif
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
