// The 16 x 16 transpose of 16-bit elements in AVX2 registers, shared by the bf16 conversion's
// AVX-512 body (math_avx512.cc) and the transposition of prepared bf16 operands (math.cc).
#pragma once

#include <immintrin.h>

namespace moert::cpu {

// Transposes the 16 x 16 block of 16-bit codes y[0..15] (y[i] a row) in place: y[j] becomes
// column j. Interleaves of 16, 32 and 64 bits leave, in s[j] and s[8 + j], column j (low 128-bit
// lane) and column 8 + j (high lane) of rows 0-7 and 8-15; a lane swap pairs them. On 16-bit
// codes rather than 32-bit lanes: 256-bit shuffles, a fifth faster on Zen 5 than transposing the
// rounded values in zmm registers.
__attribute__((target("avx2"), always_inline)) inline void transpose16x16_epi16(__m256i y[16]) {
  __m256i s[16], t[16];
  for (int p = 0; p < 16; p += 2) {
    s[p] = _mm256_unpacklo_epi16(y[p], y[p + 1]);
    s[p + 1] = _mm256_unpackhi_epi16(y[p], y[p + 1]);
  }
  for (int q = 0; q < 16; q += 4) {
    t[q] = _mm256_unpacklo_epi32(s[q], s[q + 2]);
    t[q + 1] = _mm256_unpackhi_epi32(s[q], s[q + 2]);
    t[q + 2] = _mm256_unpacklo_epi32(s[q + 1], s[q + 3]);
    t[q + 3] = _mm256_unpackhi_epi32(s[q + 1], s[q + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int k = 0; k < 4; ++k) {
      s[h + 2 * k] = _mm256_unpacklo_epi64(t[h + k], t[h + 4 + k]);
      s[h + 2 * k + 1] = _mm256_unpackhi_epi64(t[h + k], t[h + 4 + k]);
    }
  for (int j = 0; j < 8; ++j) {
    y[j] = _mm256_permute2x128_si256(s[j], s[8 + j], 0x20);
    y[8 + j] = _mm256_permute2x128_si256(s[j], s[8 + j], 0x31);
  }
}

}  // namespace moert::cpu
