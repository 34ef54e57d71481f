// Decoding of stored element types to fp32, and deterministic initialisers.
#pragma once

#include <cstdint>
#include <vector>

namespace moert {

float bf16_to_float(uint16_t bits);
// OCP FP8 E4M3 ("fn" variant: no infinities, 0x7F and 0xFF are NaN).
float e4m3_to_float(uint8_t bits);

// A small, portable random generator (splitmix64 seeding, xoshiro256** stream): standard library
// distributions differ between implementations, and initial weights must not.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  double uniform();  // [0, 1)
  double normal();   // N(0, 1), Box-Muller

  // The whole generator state as words (for checkpoints), and back. set_state throws
  // std::invalid_argument for a vector that is not a state.
  std::vector<uint64_t> state() const;
  void set_state(const std::vector<uint64_t>& words);

 private:
  uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0.0;
};

// Mixes values into one 64-bit seed.
uint64_t mix_seed(uint64_t a, uint64_t b);

}  // namespace moert
