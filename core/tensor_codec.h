// Decoding of stored element types to fp32, and deterministic initialisers.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace moert {

float bf16_to_float(uint16_t bits);
// OCP FP8 E4M3 ("fn" variant: no infinities, 0x7F and 0xFF are NaN).
float e4m3_to_float(uint8_t bits);

// The decoders of stored weights, over whole arrays. Each checks that its arguments agree and
// throws Error(InvalidArgument) instead of reading or writing out of bounds; values are decoded as
// stored (NaN included: finiteness is the caller's check).
//
// bf16: out.size() little-endian values from `bytes` (2 bytes each).
void decode_bf16(std::span<const uint8_t> bytes, std::span<float> out);
// FP8 E4M3 with block scales: one code per byte for a tensor of `shape` (at least 2 dimensions);
// each matrix (the last two dimensions) is split into blocks of block_rows x block_cols (the last
// block of a row or column may be partial), with one fp32 scale per block, row-major over blocks
// and matrices: value = e4m3_to_float(code) * scale.
void decode_e4m3_blocks(std::span<const uint8_t> codes, std::span<const int64_t> shape,
                        uint32_t block_rows, uint32_t block_cols, std::span<const float> scales,
                        std::span<float> out);
// The scales decode_e4m3_blocks() needs for `shape`; throws Error(InvalidArgument) when the count
// does not fit in 64 bits or the arguments are not a block-scaled matrix shape.
uint64_t e4m3_block_count(std::span<const int64_t> shape, uint32_t block_rows, uint32_t block_cols);

// A small, portable random generator (splitmix64 seeding, xoshiro256** stream): standard library
// distributions differ between implementations, and initial weights must not.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  double uniform();  // [0, 1)
  double normal();   // N(0, 1), Box-Muller

  // The whole generator state as words (for checkpoints), and back. set_state throws
  // std::invalid_argument for a vector that is not a state (is_state).
  std::vector<uint64_t> state() const;
  void set_state(const std::vector<uint64_t>& words);
  // Whether `words` is a state a generator can be in: xoshiro256's all-zero state is not (it
  // would draw zeros forever, and normal() loop), nor a spare that is no finite number.
  static bool is_state(const std::vector<uint64_t>& words);

 private:
  uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0.0;
};

// Mixes values into one 64-bit seed.
uint64_t mix_seed(uint64_t a, uint64_t b);

}  // namespace moert
