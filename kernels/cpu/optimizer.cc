#include "kernels/cpu/optimizer.h"

#include <cmath>

#include "kernels/cpu/avx512_intrinsics.h"
#include "kernels/cpu/isa.h"

namespace moert::cpu {
namespace {

inline void adamw_one(const AdamW& a, float* p, const float* g, float* m, float* v) {
  const double gi = *g * a.gscale;
  const double mi = a.beta1 * *m + (1.0 - a.beta1) * gi;
  const double vi = a.beta2 * *v + (1.0 - a.beta2) * gi * gi;
  *m = static_cast<float>(mi);
  *v = static_cast<float>(vi);
  const double update =
      (mi / a.bias_correction1) / (std::sqrt(vi / a.bias_correction2) + a.eps) + a.wd * *p;
  *p = static_cast<float>(*p - a.lr * update);
}

// AVX2 without FMA: every operation rounds as the scalar one does.
__attribute__((target("avx2"))) void adamw_avx2(const AdamW& a, float* p, const float* g, float* m,
                                                float* v, int64_t n) {
  const __m256d gscale = _mm256_set1_pd(a.gscale), b1 = _mm256_set1_pd(a.beta1),
                b2 = _mm256_set1_pd(a.beta2), c1 = _mm256_set1_pd(1.0 - a.beta1),
                c2 = _mm256_set1_pd(1.0 - a.beta2), bc1 = _mm256_set1_pd(a.bias_correction1),
                bc2 = _mm256_set1_pd(a.bias_correction2), eps = _mm256_set1_pd(a.eps),
                wd = _mm256_set1_pd(a.wd), lr = _mm256_set1_pd(a.lr);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d gi = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(g + i)), gscale);
    const __m256d mi = _mm256_add_pd(_mm256_mul_pd(b1, _mm256_cvtps_pd(_mm_loadu_ps(m + i))),
                                     _mm256_mul_pd(c1, gi));
    const __m256d vi = _mm256_add_pd(_mm256_mul_pd(b2, _mm256_cvtps_pd(_mm_loadu_ps(v + i))),
                                     _mm256_mul_pd(_mm256_mul_pd(c2, gi), gi));
    _mm_storeu_ps(m + i, _mm256_cvtpd_ps(mi));
    _mm_storeu_ps(v + i, _mm256_cvtpd_ps(vi));
    const __m256d pi = _mm256_cvtps_pd(_mm_loadu_ps(p + i));
    const __m256d update =
        _mm256_add_pd(_mm256_div_pd(_mm256_div_pd(mi, bc1),
                                    _mm256_add_pd(_mm256_sqrt_pd(_mm256_div_pd(vi, bc2)), eps)),
                      _mm256_mul_pd(wd, pi));
    _mm_storeu_ps(p + i, _mm256_cvtpd_ps(_mm256_sub_pd(pi, _mm256_mul_pd(lr, update))));
  }
  for (; i < n; ++i) adamw_one(a, p + i, g + i, m + i, v + i);
}

// The same operations 8 at a time. The update's divisions and square root bound it (AdamW was
// 7 % of the main job's time on AVX2); zmm halves their count, with the same bits: each is
// correctly rounded, whatever the width.
__attribute__((target("avx512f"))) int64_t adamw_avx512(const AdamW& a, float* p, const float* g,
                                                        float* m, float* v, int64_t n) {
  const __m512d gscale = _mm512_set1_pd(a.gscale), b1 = _mm512_set1_pd(a.beta1),
                b2 = _mm512_set1_pd(a.beta2), c1 = _mm512_set1_pd(1.0 - a.beta1),
                c2 = _mm512_set1_pd(1.0 - a.beta2), bc1 = _mm512_set1_pd(a.bias_correction1),
                bc2 = _mm512_set1_pd(a.bias_correction2), eps = _mm512_set1_pd(a.eps),
                wd = _mm512_set1_pd(a.wd), lr = _mm512_set1_pd(a.lr);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d gi = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(g + i)), gscale);
    const __m512d mi = _mm512_add_pd(_mm512_mul_pd(b1, _mm512_cvtps_pd(_mm256_loadu_ps(m + i))),
                                     _mm512_mul_pd(c1, gi));
    const __m512d vi = _mm512_add_pd(_mm512_mul_pd(b2, _mm512_cvtps_pd(_mm256_loadu_ps(v + i))),
                                     _mm512_mul_pd(_mm512_mul_pd(c2, gi), gi));
    _mm256_storeu_ps(m + i, _mm512_cvtpd_ps(mi));
    _mm256_storeu_ps(v + i, _mm512_cvtpd_ps(vi));
    const __m512d pi = _mm512_cvtps_pd(_mm256_loadu_ps(p + i));
    const __m512d update =
        _mm512_add_pd(_mm512_div_pd(_mm512_div_pd(mi, bc1),
                                    _mm512_add_pd(_mm512_sqrt_pd(_mm512_div_pd(vi, bc2)), eps)),
                      _mm512_mul_pd(wd, pi));
    _mm256_storeu_ps(p + i, _mm512_cvtpd_ps(_mm512_sub_pd(pi, _mm512_mul_pd(lr, update))));
  }
  return i;
}

__attribute__((target("avx2"))) double sum_squares_avx2(const float* x, int64_t n) {
  __m256d s = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d d = _mm256_cvtps_pd(_mm_loadu_ps(x + i));
    s = _mm256_add_pd(s, _mm256_mul_pd(d, d));
  }
  double l[4];
  _mm256_storeu_pd(l, s);
  for (; i < n; ++i) l[i % 4] += static_cast<double>(x[i]) * x[i];
  return (l[0] + l[1]) + (l[2] + l[3]);
}

}  // namespace

void adamw_update(const AdamW& a, float* p, const float* g, float* m, float* v, int64_t n) {
  if (use_avx512()) {
    const int64_t done = adamw_avx512(a, p, g, m, v, n);
    p += done;
    g += done;
    m += done;
    v += done;
    n -= done;
  }
  if (use_avx2()) return adamw_avx2(a, p, g, m, v, n);
  for (int64_t i = 0; i < n; ++i) adamw_one(a, p + i, g + i, m + i, v + i);
}

double sum_squares_lanes(const float* x, int64_t n) {
  if (use_avx2()) return sum_squares_avx2(x, n);
  double l[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) l[i % 4] += static_cast<double>(x[i]) * x[i];
  return (l[0] + l[1]) + (l[2] + l[3]);
}

}  // namespace moert::cpu
