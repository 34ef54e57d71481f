// fp32 CPU kernels. Every function here is single-threaded and deterministic; the CPU backend
// decides how to split work across its threads. The elementwise kernels use AVX2 where
// kernels/cpu/isa.h allows it (the same inputs then give the same bits on every run of a machine,
// not across machines).
#pragma once

#include <cmath>
#include <cstdint>

namespace moert::cpu {

// y[m, n] = x[m, k] * w[n, k]^T (+ y when accumulate). Row-major, through oneDNN (gemm.h).
void matmul_nt(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               bool accumulate);

// y[m, n] = x[m, k] * w[k, n] (+ y when accumulate).
void matmul_nn(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
               bool accumulate);

// c[m, n] (+)= a[k, m]^T * b[k, n], with leading dimensions (row strides) lda, ldb, ldc.
void matmul_tn(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
               int64_t m, int64_t n, int64_t k, bool accumulate);

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
// silu(-inf) is its limit, 0 (x * sigmoid(x) would be -inf * 0 = NaN after an overflowed GEMM).
inline float silu(float x) { return x == -INFINITY ? 0.0f : x * sigmoid(x); }

// a[i] = silu(h1[i]) * h3[i]
void swiglu(const float* h1, const float* h3, float* a, int64_t n);

// Backward of swiglu: from dA, dh1 and dh3 (dh1 may alias da).
void swiglu_backward(const float* h1, const float* h3, const float* da, float* dh1, float* dh3,
                     int64_t n);

// The index of the first NaN or infinity in x[0, n), or -1.
int64_t first_nonfinite(const float* x, int64_t n);

// dst[i] = dst[i] + src[i]: the one way two partial sums are added (grad_reduction.h).
void add_into(float* dst, const float* src, int64_t n);

// y[i] = y[i] + a * x[i].
void axpy(float* y, float a, const float* x, int64_t n);

// y[i] = (...(y[i] + a[0] * x[0][i]) + ...) + a[k-1] * x[k-1][i]: the bits of axpy(y, a[j],
// x[j], n) for j = 0, ..., k-1 in turn (a combine's order), with y read and written once. The
// rows must not overlap y. Where two NaNs meet, which one's payload comes out is the compiler's
// choice of operand order, here as between axpy's own paths: the bits hold for every other
// result.
void axpy_rows(float* y, const float* a, const float* const* x, int k, int64_t n);

// dst[i] = (...(dst[i] + src[0][i]) + ...) + src[k-1][i]: the bits of add_into(dst, src[j], n)
// for j = 0, ..., k-1 in turn, with dst read and written once; the same conditions.
void add_rows(float* dst, const float* const* src, int k, int64_t n);

// e[i] = e^(z[i] - max) in double for i < n (nothing for n <= 0), from the float difference
// z[i] - max: the terms of a softmax whose largest logit is max, so that every argument is at
// most 0 (a larger one gives 1). Within 1 ulp of the exact value in the default rounding mode
// (0.88 at worst over every float argument); 0 where that would be subnormal (below
// e^-708.4, which beside the softmax's term e^0 = 1 weighs nothing in any sum or float); a NaN
// gives NaN. Every path (scalar, AVX2, AVX-512) and every position in z gives the bits of
// softmax_exp_steps::one, so a training's losses and gradients do not depend on the CPU
// (softmax_exp_steps.h has the method).
void softmax_exp(const float* z, float max, double* e, int64_t n);

// out[i] = a * x[i]; returns the sum of x[i] * z[i] in double.
double scale_and_dot(float* out, float a, const float* x, const float* z, int64_t n);

// out[c * ldo + r] = x[r * ldx + c] for r < rows, c < cols.
void transpose(const float* x, int64_t ldx, int64_t rows, int64_t cols, float* out, int64_t ldo);

// out = x [rows, cols] rounded to bf16 as bf16.h's to_bf16 rounds (to nearest even, NaN kept a
// quiet NaN): out[r * ldo + c], or out[c * ldo + r] when transposed. The elements of out are bf16
// codes (uint16_t), or with `widened` the fp32 values the codes stand for (bit-identical either
// way to the scalar conversion, on every ISA).
void round_to_bf16(const float* x, int64_t ldx, int64_t rows, int64_t cols, void* out, int64_t ldo,
                   bool transposed, bool widened);

// out[c * ldo + r] = x[r * ldx + c] for r < rows, c < cols, elements of round_to_bf16's output
// (codes, or with `widened` floats): the transposed layout from the rows one, the same bits as
// round_to_bf16 with `transposed` of the values x was rounded from.
void transpose_bf16(const void* x, int64_t ldx, int64_t rows, int64_t cols, void* out, int64_t ldo,
                    bool widened);

// out = swiglu(h1, h3) rounded to bf16, codes or (widened) floats: the bits of swiglu followed by
// round_to_bf16, without the fp32 result passing through memory.
void swiglu_to_bf16(const float* h1, const float* h3, void* out, int64_t n, bool widened);

// y = x / sqrt(mean(x^2) + eps) * w for each of `rows` rows of width dim; inv_rms (optional)
// receives 1 / sqrt(mean(x^2) + eps) per row.
void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
             float eps);

// Backward of rmsnorm for `rows` rows: dx (overwritten) and dw (accumulated into, in double for
// the caller to round once).
void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                      float* dx, double* dw, int64_t rows, int64_t dim);

}  // namespace moert::cpu
