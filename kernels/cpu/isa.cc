#include "kernels/cpu/isa.h"

#include <oneapi/dnnl/dnnl.h>

namespace moert::cpu {
namespace {

// dnnl_cpu_isa_t values are bit sets: an ISA includes another when it has all of its bits.
bool includes(dnnl_cpu_isa_t isa, dnnl_cpu_isa_t part) {
  return (static_cast<unsigned>(isa) & static_cast<unsigned>(part)) == static_cast<unsigned>(part);
}

}  // namespace

bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          includes(dnnl_get_effective_cpu_isa(), dnnl_cpu_isa_avx2);
  return yes;
}

bool use_avx512() {
  static const bool yes = use_avx2() && __builtin_cpu_supports("avx512f") &&
                          includes(dnnl_get_effective_cpu_isa(), dnnl_cpu_isa_avx512_core);
  return yes;
}

bool avx512_gemms() {
  static const bool yes = includes(dnnl_get_effective_cpu_isa(), dnnl_cpu_isa_avx512_core);
  return yes;
}

bool native_bf16() {
  static const bool yes = includes(dnnl_get_effective_cpu_isa(), dnnl_cpu_isa_avx512_core_bf16);
  return yes;
}

std::string dnnl_isa_name() {
  switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_all:
      return "all";
    case dnnl_cpu_isa_sse41:
      return "sse41";
    case dnnl_cpu_isa_avx:
      return "avx";
    case dnnl_cpu_isa_avx2:
      return "avx2";
    case dnnl_cpu_isa_avx512_mic:
      return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops:
      return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core:
      return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx:
      return "avx512_core_amx";
    case dnnl_cpu_isa_avx2_vnni:
      return "avx2_vnni";
  }
  return "isa " + std::to_string(static_cast<unsigned>(dnnl_get_effective_cpu_isa()));
}

}  // namespace moert::cpu
