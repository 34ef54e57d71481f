#include "kernels/cpu/math.h"

#include <cblas.h>

#include <algorithm>

namespace moert::cpu {

void matmul_nt(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               bool accumulate) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<f77_int>(m),
              static_cast<f77_int>(n), static_cast<f77_int>(k), 1.0f, x, static_cast<f77_int>(k), w,
              static_cast<f77_int>(k), accumulate ? 1.0f : 0.0f, y, static_cast<f77_int>(n));
}

void matmul_nn(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               bool accumulate) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<f77_int>(m),
              static_cast<f77_int>(n), static_cast<f77_int>(k), 1.0f, x, static_cast<f77_int>(k), w,
              static_cast<f77_int>(n), accumulate ? 1.0f : 0.0f, y, static_cast<f77_int>(n));
}

void matmul_tn(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
               int64_t m, int64_t n, int64_t k, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<f77_int>(m),
              static_cast<f77_int>(n), static_cast<f77_int>(k), 1.0f, a, static_cast<f77_int>(lda),
              b, static_cast<f77_int>(ldb), accumulate ? 1.0f : 0.0f, c, static_cast<f77_int>(ldc));
}

void swiglu_backward(const float* h1, const float* h3, const float* da, float* dh1, float* dh3,
                     int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(h1[i]);
    const float g = da[i];
    dh3[i] = g * h1[i] * s;
    // d silu(z) / dz = s (1 + z (1 - s))
    dh1[i] = g * h3[i] * s * (1.0f + h1[i] * (1.0f - s));
  }
}

void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                      float* dx, double* dw, int64_t rows, int64_t dim) {
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

void swiglu(const float* h1, const float* h3, float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = silu(h1[i]) * h3[i];
}

void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
             float eps) {
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
