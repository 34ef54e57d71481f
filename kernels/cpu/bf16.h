// bf16 <-> fp32 for the CPU kernels: round to nearest even, NaN kept a (quiet) NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace moert::cpu {

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// f rounded to the nearest bf16 value, as an fp32 (exact: bf16 is a prefix of fp32).
inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

}  // namespace moert::cpu
