// fp32 CPU kernels. Every function here is single-threaded and deterministic; the CPU backend
// decides how to split work across its threads.
#pragma once

#include <cmath>
#include <cstdint>

namespace moert::cpu {

// y[m, n] = x[m, k] * w[n, k]^T (+ y when accumulate). Row-major, through the CPU BLAS.
void matmul_nt(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               bool accumulate);

// y[m, n] = x[m, k] * w[k, n] (+ y when accumulate).
void matmul_nn(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               bool accumulate);

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x * sigmoid(x); }

// a[i] = silu(h1[i]) * h3[i]
void swiglu(const float* h1, const float* h3, float* a, int64_t n);

// y = x / sqrt(mean(x^2) + eps) * w for each of `rows` rows of width dim; inv_rms (optional)
// receives 1 / sqrt(mean(x^2) + eps) per row.
void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
             float eps);

}  // namespace moert::cpu
