#include "kernels/cpu/math.h"

#include <immintrin.h>

#include <algorithm>

#include "kernels/cpu/bf16.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/math_avx512.h"
#include "kernels/cpu/softmax_exp_steps.h"
#include "kernels/cpu/transpose16.h"

namespace moert::cpu {
namespace {

#define MOERT_AVX2 __attribute__((target("avx2,fma")))

// e^x for 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes'
// expf coefficients), 2^n through the exponent bits; within 2 ulp over the clamped range, whose
// ends give the smallest normal and the largest finite results.
MOERT_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // n is in [-126, 127] after the clamp, so 2^n is a normal number.
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

MOERT_AVX2 inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

MOERT_AVX2 void swiglu_avx2(const float* h1, const float* h3, float* a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 z = _mm256_loadu_ps(h1 + i);
    _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_mul_ps(z, sigmoid8(z)), _mm256_loadu_ps(h3 + i)));
  }
  for (; i < n; ++i) a[i] = silu(h1[i]) * h3[i];
}

MOERT_AVX2 void swiglu_backward_avx2(const float* h1, const float* h3, const float* da, float* dh1,
                                     float* dh3, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 z = _mm256_loadu_ps(h1 + i), g = _mm256_loadu_ps(da + i);
    const __m256 s = sigmoid8(z);
    const __m256 h3v = _mm256_loadu_ps(h3 + i);
    // d silu(z) / dz = s (1 + z (1 - s))
    const __m256 dsilu =
        _mm256_mul_ps(s, _mm256_add_ps(one, _mm256_mul_ps(z, _mm256_sub_ps(one, s))));
    _mm256_storeu_ps(dh3 + i, _mm256_mul_ps(_mm256_mul_ps(g, z), s));
    _mm256_storeu_ps(dh1 + i, _mm256_mul_ps(_mm256_mul_ps(g, h3v), dsilu));
  }
  for (; i < n; ++i) {
    const float s = sigmoid(h1[i]);
    const float g = da[i];
    dh3[i] = g * h1[i] * s;
    dh1[i] = g * h3[i] * s * (1.0f + h1[i] * (1.0f - s));
  }
}

// Exponent bits all ones: infinity or NaN. 32 floats per step, with no branch inside a step.
MOERT_AVX2 bool any_nonfinite_avx2(const float* x, int64_t n) {
  const __m256i exp = _mm256_set1_epi32(0x7F800000);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i hit = _mm256_setzero_si256();
    for (int k = 0; k < 32; k += 8) {
      const __m256i e =
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + k)), exp);
      hit = _mm256_or_si256(hit, _mm256_cmpeq_epi32(e, exp));
    }
    if (!_mm256_testz_si256(hit, hit)) return true;
  }
  for (; i < n; ++i)
    if (!std::isfinite(x[i])) return true;
  return false;
}

MOERT_AVX2 void add_avx2(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = dst[i] + src[i];
}

MOERT_AVX2 void axpy_avx2(float* y, float a, const float* x, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// The tails' `v += a * x` is contracted to an FMA here as axpy_avx2's is, and not in the
// scalar path below, as axpy's.
MOERT_AVX2 void axpy_rows_avx2(float* y, const float* a, const float* const* x, int k, int64_t i,
                               int64_t n) {
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_loadu_ps(y + i);
    for (int j = 0; j < k; ++j)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(a[j]), _mm256_loadu_ps(x[j] + i), acc);
    _mm256_storeu_ps(y + i, acc);
  }
  for (; i < n; ++i) {
    float v = y[i];
    for (int j = 0; j < k; ++j) v += a[j] * x[j][i];
    y[i] = v;
  }
}

MOERT_AVX2 void add_rows_avx2(float* dst, const float* const* src, int k, int64_t i, int64_t n) {
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_loadu_ps(dst + i);
    for (int j = 0; j < k; ++j) acc = _mm256_add_ps(acc, _mm256_loadu_ps(src[j] + i));
    _mm256_storeu_ps(dst + i, acc);
  }
  for (; i < n; ++i) {
    float v = dst[i];
    for (int j = 0; j < k; ++j) v = v + src[j][i];
    dst[i] = v;
  }
}

MOERT_AVX2 double scale_and_dot_avx2(float* out, float a, const float* x, const float* z,
                                     int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i), zv = _mm256_loadu_ps(z + i);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(av, xv));
    s0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)),
                         _mm256_cvtps_pd(_mm256_castps256_ps128(zv)), s0);
    s1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)),
                         _mm256_cvtps_pd(_mm256_extractf128_ps(zv, 1)), s1);
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
  double dot = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) {
    out[i] = a * x[i];
    dot += static_cast<double>(x[i]) * z[i];
  }
  return dot;
}

// softmax_exp_steps::one on 4 lanes, step for step.
MOERT_AVX2 inline __m256d softmax_exp4(__m256d x) {
  namespace k = softmax_exp_steps;
  const __m256d below = _mm256_cmp_pd(x, _mm256_set1_pd(k::kLowest), _CMP_LT_OQ);
  // A NaN passes both bounds (the second operand is returned when either is NaN).
  x = _mm256_min_pd(_mm256_setzero_pd(), _mm256_max_pd(_mm256_set1_pd(k::kLowest), x));
  // In the current rounding mode, as std::nearbyint on the scalar path.
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(k::kLog2e)),
                                    _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(k::kLn2Hi), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(k::kLn2Lo), r);
  __m256d p = _mm256_set1_pd(k::kTaylor[0]);
  for (int i = 1; i < 14; ++i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(k::kTaylor[i]));
  const __m256i e = _mm256_slli_epi64(
      _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)), _mm256_set1_epi64x(1023)), 52);
  return _mm256_andnot_pd(below, _mm256_mul_pd(p, _mm256_castsi256_pd(e)));
}

// The whole row, its last partial group of 4 through a padded copy.
MOERT_AVX2 void softmax_exp_avx2(const float* z, float max, double* e, int64_t n) {
  const __m128 m = _mm_set1_ps(max);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    _mm256_storeu_pd(e + i, softmax_exp4(_mm256_cvtps_pd(_mm_sub_ps(_mm_loadu_ps(z + i), m))));
  if (i >= n) return;
  float zt[4] = {max, max, max, max};
  double et[4];
  std::copy(z + i, z + n, zt);
  _mm256_storeu_pd(et, softmax_exp4(_mm256_cvtps_pd(_mm_sub_ps(_mm_loadu_ps(zt), m))));
  std::copy(et, et + (n - i), e + i);
}

// rmsnorm and its backward, 4 doubles at a time; AVX2 without FMA so that every elementwise
// result rounds as the scalar formula's does (the reductions use 4 lanes).
__attribute__((target("avx2"))) double dot_lanes(const float* a, const float* b, int64_t n) {
  __m256d s = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    s = _mm256_add_pd(s, _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i)),
                                       _mm256_cvtps_pd(_mm_loadu_ps(b + i))));
  double l[4];
  _mm256_storeu_pd(l, s);
  for (; i < n; ++i) l[i % 4] += static_cast<double>(a[i]) * b[i];
  return (l[0] + l[1]) + (l[2] + l[3]);
}

__attribute__((target("avx2"))) void rmsnorm_avx2(const float* x, const float* w, float* y,
                                                  float* inv_rms, int64_t rows, int64_t dim,
                                                  float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    const double ss = dot_lanes(xr, xr, dim);
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    if (inv_rms) inv_rms[r] = inv;
    const __m256 iv = _mm256_set1_ps(inv);
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
      _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), iv),
                                             _mm256_loadu_ps(w + i)));
    for (; i < dim; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

__attribute__((target("avx2"))) void rmsnorm_backward_avx2(const float* x, const float* w,
                                                           const float* inv_rms, const float* dy,
                                                           float* dx, double* dw, int64_t rows,
                                                           int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    const float* gr = dy + r * dim;
    const double inv = inv_rms[r];
    const __m256d iv = _mm256_set1_pd(inv);
    __m256d s = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 4 <= dim; i += 4) {
      const __m256d g = _mm256_cvtps_pd(_mm_loadu_ps(gr + i));
      const __m256d xv = _mm256_cvtps_pd(_mm_loadu_ps(xr + i));
      s = _mm256_add_pd(s,
                        _mm256_mul_pd(_mm256_mul_pd(g, _mm256_cvtps_pd(_mm_loadu_ps(w + i))), xv));
      _mm256_storeu_pd(
          dw + i, _mm256_add_pd(_mm256_loadu_pd(dw + i), _mm256_mul_pd(_mm256_mul_pd(g, xv), iv)));
    }
    double l[4];
    _mm256_storeu_pd(l, s);
    for (; i < dim; ++i) {
      l[i % 4] += static_cast<double>(gr[i]) * w[i] * xr[i];
      dw[i] += static_cast<double>(gr[i]) * xr[i] * inv;
    }
    const double dot = (l[0] + l[1]) + (l[2] + l[3]);
    const double k = inv * inv * inv * dot / static_cast<double>(dim);
    const __m256d kv = _mm256_set1_pd(k);
    for (i = 0; i + 4 <= dim; i += 4) {
      const __m256d g = _mm256_cvtps_pd(_mm_loadu_ps(gr + i));
      const __m256d t =
          _mm256_sub_pd(_mm256_mul_pd(_mm256_mul_pd(iv, g), _mm256_cvtps_pd(_mm_loadu_ps(w + i))),
                        _mm256_mul_pd(kv, _mm256_cvtps_pd(_mm_loadu_ps(xr + i))));
      _mm_storeu_ps(dx + r * dim + i, _mm256_cvtpd_ps(t));
    }
    for (; i < dim; ++i) dx[r * dim + i] = static_cast<float>(inv * gr[i] * w[i] - k * xr[i]);
  }
}

// 8 x 8 block: rows of x in, columns out. The loops are unrolled so that r and t live in
// registers: left to -O2, GCC 12 kept them on the stack and every shuffle went through memory
// (2.7x slower on Zen 5; the training's weight copies are transposed after every step).
MOERT_AVX2 void transpose8(const float* x, int64_t ldx, float* out, int64_t ldo) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + i * ldx);
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

MOERT_AVX2 void transpose_avx2(const float* x, int64_t ldx, int64_t rows, int64_t cols, float* out,
                               int64_t ldo) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  // Columns outermost: each output row is written whole before the next, and the 8 input
  // columns being read stay in L1 down the rows.
  for (int64_t c = 0; c < c8; c += 8)
    for (int64_t r = 0; r < r8; r += 8) transpose8(x + r * ldx + c, ldx, out + c * ldo + r, ldo);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = (r < r8 ? c8 : 0); c < cols; ++c) out[c * ldo + r] = x[r * ldx + c];
}

// Rounds 8 floats to bf16 as bf16.h's to_bf16 does, the code in the upper 16 bits of each lane.
MOERT_AVX2 inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(rounded, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
}

// Stores 8 rounded lanes at out: 8 codes (16 bytes) or 8 widened floats.
MOERT_AVX2 inline void store_bf16_8(__m256 v, void* out, bool widened) {
  const __m256i b = bf16_bits8(v);
  if (widened) {
    _mm256_storeu_si256(static_cast<__m256i*>(out),
                        _mm256_and_si256(b, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return;
  }
  const __m256i codes = _mm256_srli_epi32(b, 16);  // <= 0xFFFF: the pack does not saturate
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(codes, codes), 0x08);
  _mm_storeu_si128(static_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

// out[i] = v rounded to bf16: its code, or (widened) the code's fp32 value.
inline void store_bf16(void* out, int64_t i, float v, bool widened) {
  const uint16_t code = to_bf16(v);
  if (widened)
    static_cast<float*>(out)[i] = from_bf16(code);
  else
    static_cast<uint16_t*>(out)[i] = code;
}

MOERT_AVX2 void round_to_bf16_avx2(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                                   void* out, int64_t ldo, bool transposed, bool widened) {
  const size_t es = widened ? 4 : 2;
  auto* o = static_cast<unsigned char*>(out);
  auto at = [&](int64_t i) { return o + static_cast<size_t>(i) * es; };
  auto scalar = [&](int64_t i, float v) { store_bf16(out, i, v, widened); };
  if (!transposed) {
    for (int64_t r = 0; r < rows; ++r) {
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8)
        store_bf16_8(_mm256_loadu_ps(x + r * ldx + c), at(r * ldo + c), widened);
      for (; c < cols; ++c) scalar(r * ldo + c, x[r * ldx + c]);
    }
    return;
  }
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  alignas(32) float tile[64];
  for (int64_t c = 0; c < c8; c += 8)
    for (int64_t r = 0; r < r8; r += 8) {
      transpose8(x + r * ldx + c, ldx, tile, 8);
      for (int i = 0; i < 8; ++i)
        store_bf16_8(_mm256_load_ps(tile + 8 * i), at((c + i) * ldo + r), widened);
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = (r < r8 ? c8 : 0); c < cols; ++c) scalar(c * ldo + r, x[r * ldx + c]);
}

// out[c * ldo + r] = x[r * ldx + c], 16-bit elements, for the whole 16 x 16 blocks.
MOERT_AVX2 void transpose_epi16_avx2(const uint16_t* x, int64_t ldx, int64_t rows, int64_t cols,
                                     uint16_t* out, int64_t ldo) {
  __m256i y[16];
  for (int64_t c = 0; c + 16 <= cols; c += 16)
    for (int64_t r = 0; r + 16 <= rows; r += 16) {
      for (int i = 0; i < 16; ++i)
        y[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (r + i) * ldx + c));
      transpose16x16_epi16(y);
      for (int i = 0; i < 16; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (c + i) * ldo + r), y[i]);
    }
}

}  // namespace

void matmul_nt(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               bool accumulate) {
  sgemm(false, true, m, n, k, x, k, w, k, y, n, accumulate);
}

void matmul_nn(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               bool accumulate) {
  sgemm(false, false, m, n, k, x, k, w, n, y, n, accumulate);
}

void matmul_tn(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
               int64_t m, int64_t n, int64_t k, bool accumulate) {
  sgemm(true, false, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

void swiglu(const float* h1, const float* h3, float* a, int64_t n) {
  if (use_avx512()) {
    const int64_t done = swiglu_avx512(h1, h3, a, n);
    h1 += done;
    h3 += done;
    a += done;
    n -= done;
  }
  if (use_avx2()) return swiglu_avx2(h1, h3, a, n);
  for (int64_t i = 0; i < n; ++i) a[i] = silu(h1[i]) * h3[i];
}

void swiglu_backward(const float* h1, const float* h3, const float* da, float* dh1, float* dh3,
                     int64_t n) {
  if (use_avx512()) {
    const int64_t done = swiglu_backward_avx512(h1, h3, da, dh1, dh3, n);
    h1 += done;
    h3 += done;
    da += done;
    dh1 += done;
    dh3 += done;
    n -= done;
  }
  if (use_avx2()) return swiglu_backward_avx2(h1, h3, da, dh1, dh3, n);
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(h1[i]);
    const float g = da[i];
    dh3[i] = g * h1[i] * s;
    // d silu(z) / dz = s (1 + z (1 - s))
    dh1[i] = g * h3[i] * s * (1.0f + h1[i] * (1.0f - s));
  }
}

int64_t first_nonfinite(const float* x, int64_t n) {
  if (use_avx2() && !any_nonfinite_avx2(x, n)) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return i;
  return -1;
}

void add_into(float* dst, const float* src, int64_t n) {
  if (use_avx512()) {
    const int64_t done = add_avx512(dst, src, n);
    dst += done;
    src += done;
    n -= done;
  }
  if (use_avx2()) return add_avx2(dst, src, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = dst[i] + src[i];
}

void axpy(float* y, float a, const float* x, int64_t n) {
  if (use_avx512()) {
    const int64_t done = axpy_avx512(y, a, x, n);
    y += done;
    x += done;
    n -= done;
  }
  if (use_avx2()) return axpy_avx2(y, a, x, n);
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void axpy_rows(float* y, const float* a, const float* const* x, int k, int64_t n) {
  const int64_t done = use_avx512() ? axpy_rows_avx512(y, a, x, k, n) : 0;
  if (use_avx2()) return axpy_rows_avx2(y, a, x, k, done, n);
  for (int64_t i = done; i < n; ++i) {
    float v = y[i];
    for (int j = 0; j < k; ++j) v += a[j] * x[j][i];
    y[i] = v;
  }
}

void add_rows(float* dst, const float* const* src, int k, int64_t n) {
  const int64_t done = use_avx512() ? add_rows_avx512(dst, src, k, n) : 0;
  if (use_avx2()) return add_rows_avx2(dst, src, k, done, n);
  for (int64_t i = done; i < n; ++i) {
    float v = dst[i];
    for (int j = 0; j < k; ++j) v = v + src[j][i];
    dst[i] = v;
  }
}

void softmax_exp(const float* z, float max, double* e, int64_t n) {
  if (use_avx512()) {
    const int64_t done = softmax_exp_avx512(z, max, e, n);
    z += done;
    e += done;
    n -= done;
  }
  if (use_avx2()) return softmax_exp_avx2(z, max, e, n);
  for (int64_t i = 0; i < n; ++i) e[i] = softmax_exp_steps::one(static_cast<double>(z[i] - max));
}

double scale_and_dot(float* out, float a, const float* x, const float* z, int64_t n) {
  if (use_avx2()) return scale_and_dot_avx2(out, a, x, z, n);
  double dot = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = a * x[i];
    dot += static_cast<double>(x[i]) * z[i];
  }
  return dot;
}

void transpose(const float* x, int64_t ldx, int64_t rows, int64_t cols, float* out, int64_t ldo) {
  if (use_avx2()) return transpose_avx2(x, ldx, rows, cols, out, ldo);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * ldo + r] = x[r * ldx + c];
}

namespace {

void round_to_bf16_narrow(const float* x, int64_t ldx, int64_t rows, int64_t cols, void* out,
                          int64_t ldo, bool transposed, bool widened) {
  if (use_avx2()) return round_to_bf16_avx2(x, ldx, rows, cols, out, ldo, transposed, widened);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      store_bf16(out, transposed ? c * ldo + r : r * ldo + c, x[r * ldx + c], widened);
}

}  // namespace

void round_to_bf16(const float* x, int64_t ldx, int64_t rows, int64_t cols, void* out, int64_t ldo,
                   bool transposed, bool widened) {
  if (!use_avx512()) return round_to_bf16_narrow(x, ldx, rows, cols, out, ldo, transposed, widened);
  const size_t es = widened ? 4 : 2;
  auto* o = static_cast<unsigned char*>(out);
  if (transposed) {
    // The 16 x 16 blocks, then the columns right of them and the rows below, on the narrow path.
    const int64_t r16 = rows / 16 * 16, c16 = cols / 16 * 16;
    round_to_bf16_transposed_avx512(x, ldx, rows, cols, out, ldo, widened);
    if (c16 < cols && r16 > 0)
      round_to_bf16_narrow(x + c16, ldx, r16, cols - c16, o + static_cast<size_t>(c16 * ldo) * es,
                           ldo, true, widened);
    if (r16 < rows)
      round_to_bf16_narrow(x + r16 * ldx, ldx, rows - r16, cols, o + static_cast<size_t>(r16) * es,
                           ldo, true, widened);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    unsigned char* row = o + static_cast<size_t>(r * ldo) * es;
    const int64_t done = round_to_bf16_avx512(x + r * ldx, row, cols, widened);
    if (done < cols)
      round_to_bf16_narrow(x + r * ldx + done, ldx, 1, cols - done,
                           row + static_cast<size_t>(done) * es, ldo, false, widened);
  }
}

void transpose_bf16(const void* x, int64_t ldx, int64_t rows, int64_t cols, void* out, int64_t ldo,
                    bool widened) {
  if (widened)
    return transpose(static_cast<const float*>(x), ldx, rows, cols, static_cast<float*>(out), ldo);
  const auto* xc = static_cast<const uint16_t*>(x);
  auto* oc = static_cast<uint16_t*>(out);
  const int64_t r16 = use_avx2() ? rows / 16 * 16 : 0, c16 = use_avx2() ? cols / 16 * 16 : 0;
  if (r16 > 0 && c16 > 0) transpose_epi16_avx2(xc, ldx, r16, c16, oc, ldo);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = (r < r16 ? c16 : 0); c < cols; ++c) oc[c * ldo + r] = xc[r * ldx + c];
}

void swiglu_to_bf16(const float* h1, const float* h3, void* out, int64_t n, bool widened) {
  // In pieces that stay in L1 between the two steps.
  constexpr int64_t kPiece = 512;
  alignas(64) float a[kPiece];
  auto* o = static_cast<unsigned char*>(out);
  const size_t es = widened ? 4 : 2;
  for (int64_t i = 0; i < n; i += kPiece) {
    const int64_t len = std::min(kPiece, n - i);
    swiglu(h1 + i, h3 + i, a, len);
    round_to_bf16(a, len, 1, len, o + static_cast<size_t>(i) * es, len, false, widened);
  }
}

void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                      float* dx, double* dw, int64_t rows, int64_t dim) {
  if (use_avx2()) return rmsnorm_backward_avx2(x, w, inv_rms, dy, dx, dw, rows, dim);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    const float* gr = dy + r * dim;
    const double inv = inv_rms[r];
    double dot = 0.0;  // sum_i dy_i w_i x_i
    for (int64_t i = 0; i < dim; ++i) {
      dot += static_cast<double>(gr[i]) * w[i] * xr[i];
      dw[i] += static_cast<double>(gr[i]) * xr[i] * inv;
    }
    const double k = inv * inv * inv * dot / static_cast<double>(dim);
    for (int64_t i = 0; i < dim; ++i)
      dx[r * dim + i] = static_cast<float>(inv * gr[i] * w[i] - k * xr[i]);
  }
}

void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
             float eps) {
  if (use_avx2()) return rmsnorm_avx2(x, w, y, inv_rms, rows, dim, eps);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    // Accumulated in double: the mean of squares is the one reduction whose rounding the reference
    // should not carry.
    double ss = 0.0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    if (inv_rms) inv_rms[r] = inv;
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

}  // namespace moert::cpu
