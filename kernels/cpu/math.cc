#include "kernels/cpu/math.h"

#include <cblas.h>

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
