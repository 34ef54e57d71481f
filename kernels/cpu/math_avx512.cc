#include "kernels/cpu/math_avx512.h"

#include "kernels/cpu/avx512_intrinsics.h"
#include "kernels/cpu/softmax_exp_steps.h"
#include "kernels/cpu/transpose16.h"

namespace moert::cpu {
namespace {

#define MOERT_AVX512 __attribute__((target("avx512f")))

// math.cc's exp8 on 16 lanes, step for step (the same constants, clamp, rounding and FMAs).
MOERT_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.37626f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

MOERT_AVX512 inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// math.cc's bf16_bits8 on 16 lanes: the rounded value's code in the upper 16 bits of each lane.
MOERT_AVX512 inline __m512i bf16_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
}

}  // namespace

MOERT_AVX512 void round_to_bf16_transposed_avx512(const float* x, int64_t ldx, int64_t rows,
                                                  int64_t cols, void* out, int64_t ldo,
                                                  bool widened) {
  __m256i y[16];
  for (int64_t c = 0; c + 16 <= cols; c += 16)
    for (int64_t r = 0; r + 16 <= rows; r += 16) {
      // Rounded first, on rows, so that each lane goes through round_to_bf16_avx512's steps.
      for (int i = 0; i < 16; ++i)
        y[i] = _mm512_cvtepi32_epi16(
            _mm512_srli_epi32(bf16_bits16(_mm512_loadu_ps(x + (r + i) * ldx + c)), 16));
      transpose16x16_epi16(y);
      for (int i = 0; i < 16; ++i) {
        const int64_t at = (c + i) * ldo + r;
        if (widened)
          _mm512_storeu_si512(static_cast<float*>(out) + at,
                              _mm512_slli_epi32(_mm512_cvtepu16_epi32(y[i]), 16));
        else
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + at), y[i]);
      }
    }
}

MOERT_AVX512 int64_t round_to_bf16_avx512(const float* x, void* out, int64_t n, bool widened) {
  int64_t i = 0;
  if (widened) {
    auto* o = static_cast<float*>(out);
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_si512(o + i,
                          _mm512_and_si512(bf16_bits16(_mm512_loadu_ps(x + i)),
                                           _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return i;
  }
  auto* o = static_cast<uint16_t*>(out);
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(o + i),
        _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits16(_mm512_loadu_ps(x + i)), 16)));
  return i;
}

MOERT_AVX512 int64_t softmax_exp_avx512(const float* z, float max, double* e, int64_t n) {
  namespace k = softmax_exp_steps;
  const __m256 m = _mm256_set1_ps(max);
  int64_t i = 0;
  // math.cc's softmax_exp4 on 8 lanes, step for step.
  for (; i + 8 <= n; i += 8) {
    __m512d x = _mm512_cvtps_pd(_mm256_sub_ps(_mm256_loadu_ps(z + i), m));
    const __mmask8 below = _mm512_cmp_pd_mask(x, _mm512_set1_pd(k::kLowest), _CMP_LT_OQ);
    x = _mm512_min_pd(_mm512_setzero_pd(), _mm512_max_pd(_mm512_set1_pd(k::kLowest), x));
    const __m512d nn = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(k::kLog2e)),
                                            _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(nn, _mm512_set1_pd(k::kLn2Hi), x);
    r = _mm512_fnmadd_pd(nn, _mm512_set1_pd(k::kLn2Lo), r);
    __m512d p = _mm512_set1_pd(k::kTaylor[0]);
    for (int j = 1; j < 14; ++j) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(k::kTaylor[j]));
    const __m512i ex = _mm512_slli_epi64(
        _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_cvtpd_epi32(nn)), _mm512_set1_epi64(1023)),
        52);
    _mm512_storeu_pd(e + i, _mm512_maskz_mov_pd(static_cast<__mmask8>(~below),
                                                _mm512_mul_pd(p, _mm512_castsi512_pd(ex))));
  }
  return i;
}

MOERT_AVX512 int64_t add_avx512(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i), _mm512_loadu_ps(src + i)));
  return i;
}

MOERT_AVX512 int64_t axpy_avx512(float* y, float a, const float* x, int64_t n) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  return i;
}

MOERT_AVX512 int64_t axpy_rows_avx512(float* y, const float* a, const float* const* x, int k,
                                      int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 acc = _mm512_loadu_ps(y + i);
    for (int j = 0; j < k; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(a[j]), _mm512_loadu_ps(x[j] + i), acc);
    _mm512_storeu_ps(y + i, acc);
  }
  return i;
}

MOERT_AVX512 int64_t add_rows_avx512(float* dst, const float* const* src, int k, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 acc = _mm512_loadu_ps(dst + i);
    for (int j = 0; j < k; ++j) acc = _mm512_add_ps(acc, _mm512_loadu_ps(src[j] + i));
    _mm512_storeu_ps(dst + i, acc);
  }
  return i;
}

MOERT_AVX512 int64_t swiglu_avx512(const float* h1, const float* h3, float* a, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 z = _mm512_loadu_ps(h1 + i);
    _mm512_storeu_ps(a + i, _mm512_mul_ps(_mm512_mul_ps(z, sigmoid16(z)), _mm512_loadu_ps(h3 + i)));
  }
  return i;
}

MOERT_AVX512 int64_t swiglu_backward_avx512(const float* h1, const float* h3, const float* da,
                                            float* dh1, float* dh3, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 z = _mm512_loadu_ps(h1 + i), g = _mm512_loadu_ps(da + i);
    const __m512 s = sigmoid16(z);
    const __m512 h3v = _mm512_loadu_ps(h3 + i);
    const __m512 dsilu =
        _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_mul_ps(z, _mm512_sub_ps(one, s))));
    _mm512_storeu_ps(dh3 + i, _mm512_mul_ps(_mm512_mul_ps(g, z), s));
    _mm512_storeu_ps(dh1 + i, _mm512_mul_ps(_mm512_mul_ps(g, h3v), dsilu));
  }
  return i;
}

}  // namespace moert::cpu
