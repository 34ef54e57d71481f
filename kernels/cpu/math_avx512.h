// AVX-512 bodies of math.h's elementwise kernels. Each handles the largest multiple of 16
// elements from the start and returns that count; math.cc finishes the rest on its AVX2 and
// scalar paths. Every element goes through the same operations as on the AVX2 path (one lane of
// the same instructions, FMAs where it has them), so the results are bitwise those of an AVX2
// machine.
#pragma once

#include <cstdint>

namespace moert::cpu {

int64_t add_avx512(float* dst, const float* src, int64_t n);
int64_t axpy_avx512(float* y, float a, const float* x, int64_t n);
// math.h's axpy_rows and add_rows.
int64_t axpy_rows_avx512(float* y, const float* a, const float* const* x, int k, int64_t n);
int64_t add_rows_avx512(float* dst, const float* const* src, int k, int64_t n);
// math.h's softmax_exp in blocks of 8.
int64_t softmax_exp_avx512(const float* z, float max, double* e, int64_t n);
int64_t swiglu_avx512(const float* h1, const float* h3, float* a, int64_t n);
int64_t swiglu_backward_avx512(const float* h1, const float* h3, const float* da, float* dh1,
                               float* dh3, int64_t n);
// out[i] = x[i] rounded to bf16 (math.h's round_to_bf16 on one row): codes, or widened floats.
int64_t round_to_bf16_avx512(const float* x, void* out, int64_t n, bool widened);
// out[c * ldo + r] = x[r * ldx + c] rounded to bf16 (math.h's round_to_bf16, transposed) for
// r < rows / 16 * 16 and c < cols / 16 * 16: the whole 16 x 16 blocks only.
void round_to_bf16_transposed_avx512(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                                     void* out, int64_t ldo, bool widened);

}  // namespace moert::cpu
