// Which instruction sets the CPU kernels use. oneDNN chooses its own from the CPU, capped by
// DNNL_MAX_CPU_ISA; moert's own vector kernels follow the same cap, so that one setting moves
// every kernel of the process down (the tests check the lower paths that way).
#pragma once

#include <string>

namespace moert::cpu {

// AVX2 + FMA kernels: the CPU has them and oneDNN's effective ISA includes AVX2.
bool use_avx2();

// AVX-512 elementwise kernels (math_avx512.h): AVX2 is in use, the CPU has AVX-512F and oneDNN's
// effective ISA includes avx512_core.
bool use_avx512();

// Whether oneDNN's fp32 GEMMs run on AVX-512 kernels (its effective ISA includes avx512_core).
bool avx512_gemms();

// Whether oneDNN multiplies bf16 natively here (AVX512-BF16 or AMX within its effective ISA).
bool native_bf16();

// oneDNN's effective ISA, in its own words ("avx2", "avx512_core_amx", ...).
std::string dnnl_isa_name();

}  // namespace moert::cpu
