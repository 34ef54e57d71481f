// GEMMs of fp32 activations with bf16 weights, for CPUs without bf16 instructions: each weight
// is read from its bf16 copy and widened to fp32 in registers, so the weights stream from memory
// once per call at 2 bytes a value, with no converted or repacked copy (a decode step's cost is
// that stream). The activations must hold bf16 values already (round_bf16): every product is then
// exact in fp32 and the sums are fp32, as a bf16 GEMM with fp32 accumulation defines them.
//
// Single-threaded and deterministic: the summation order depends on the shapes only. AVX2 + FMA
// where the CPU has them, a scalar loop otherwise.
#pragma once

#include <cstdint>

namespace moert::cpu {

// c[m, n] (+)= a[m, k] * w[n, k]^T  (w row-major [n, k]: a linear layer's weight).
void widen_gemm_nt(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                   int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate);

// c[m, n] (+)= a[m, k] * w[k, n]  (w row-major [k, n]: the same weight seen from its output side).
void widen_gemm_nn(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                   int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate);

// Whether the AVX2 kernels run on this CPU (else the scalar ones).
bool widen_gemm_uses_avx2();

}  // namespace moert::cpu
