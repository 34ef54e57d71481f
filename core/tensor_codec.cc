#include "core/tensor_codec.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <stdexcept>

#include "core/error.h"
#include "kernels/fp8_rules.h"

namespace moert {

float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

float e4m3_to_float(uint8_t bits) { return fp8::e4m3_decode(bits); }

void decode_bf16(std::span<const uint8_t> bytes, std::span<float> out) {
  if (bytes.size() / 2 != out.size() || bytes.size() % 2 != 0)
    fail(Code::InvalidArgument, "bf16 decode: ", bytes.size(), " bytes for ", out.size(),
         " values");
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t b;
    std::memcpy(&b, bytes.data() + 2 * i, 2);
    out[i] = bf16_to_float(b);
  }
}

uint64_t e4m3_block_count(std::span<const int64_t> shape, uint32_t block_rows,
                          uint32_t block_cols) {
  if (shape.size() < 2) fail(Code::InvalidArgument, "FP8 decode: needs at least 2 dimensions");
  if (block_rows == 0 || block_cols == 0)
    fail(Code::InvalidArgument, "FP8 decode: block sizes must be at least 1");
  uint64_t matrices = 1;
  for (size_t i = 0; i + 2 < shape.size(); ++i) {
    if (shape[i] < 0 ||
        __builtin_mul_overflow(matrices, static_cast<uint64_t>(shape[i]), &matrices))
      fail(Code::InvalidArgument, "FP8 decode: shape overflows 64 bits");
  }
  const int64_t rows = shape[shape.size() - 2], cols = shape.back();
  if (rows < 0 || cols < 0) fail(Code::InvalidArgument, "FP8 decode: negative dimension");
  const uint64_t row_blocks = (static_cast<uint64_t>(rows) + block_rows - 1) / block_rows;
  const uint64_t col_blocks = (static_cast<uint64_t>(cols) + block_cols - 1) / block_cols;
  uint64_t n;
  if (__builtin_mul_overflow(matrices, row_blocks, &n) || __builtin_mul_overflow(n, col_blocks, &n))
    fail(Code::InvalidArgument, "FP8 decode: block count overflows 64 bits");
  return n;
}

void decode_e4m3_blocks(std::span<const uint8_t> codes, std::span<const int64_t> shape,
                        uint32_t block_rows, uint32_t block_cols, std::span<const float> scales,
                        std::span<float> out) {
  const uint64_t blocks = e4m3_block_count(shape, block_rows, block_cols);
  uint64_t numel = 1;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel))
      fail(Code::InvalidArgument, "FP8 decode: shape overflows 64 bits");
  if (codes.size() != numel || out.size() != numel || scales.size() != blocks)
    fail(Code::InvalidArgument, "FP8 decode: ", codes.size(), " codes, ", out.size(),
         " outputs and ", scales.size(), " scales for ", numel, " values in ", blocks, " blocks");
  const uint64_t rows = static_cast<uint64_t>(shape[shape.size() - 2]);
  const uint64_t cols = static_cast<uint64_t>(shape.back());
  if (rows == 0 || cols == 0) return;
  const uint64_t row_blocks = (rows + block_rows - 1) / block_rows;
  const uint64_t col_blocks = (cols + block_cols - 1) / block_cols;
  const uint64_t matrices = numel / (rows * cols);
  float table[256];
  for (int i = 0; i < 256; ++i) table[i] = e4m3_to_float(static_cast<uint8_t>(i));
  for (uint64_t m = 0; m < matrices; ++m)
    for (uint64_t r = 0; r < rows; ++r) {
      const float* scale_row = scales.data() + (m * row_blocks + r / block_rows) * col_blocks;
      const uint64_t base = (m * rows + r) * cols;
      for (uint64_t c = 0; c < cols; ++c)
        out[base + c] = table[codes[base + c]] * scale_row[c / block_cols];
    }
}

namespace {
uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

uint64_t mix_seed(uint64_t a, uint64_t b) {
  uint64_t x = a ^ rotl(b, 17) ^ 0x6A09E667F3BCC909ull;
  splitmix64(x);
  return splitmix64(x) ^ b;
}

Rng::Rng(uint64_t seed) {
  for (auto& s : s_) s = splitmix64(seed);
}

uint64_t Rng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

std::vector<uint64_t> Rng::state() const {
  uint64_t spare_bits;
  std::memcpy(&spare_bits, &spare_, sizeof spare_bits);
  return {s_[0], s_[1], s_[2], s_[3], has_spare_ ? 1u : 0u, spare_bits};
}

bool Rng::is_state(const std::vector<uint64_t>& words) {
  if (words.size() != 6 || words[4] > 1) return false;
  if ((words[0] | words[1] | words[2] | words[3]) == 0) return false;
  double spare;
  std::memcpy(&spare, &words[5], sizeof spare);
  return words[4] == 0 || std::isfinite(spare);
}

void Rng::set_state(const std::vector<uint64_t>& words) {
  if (!is_state(words)) throw std::invalid_argument("not a generator state");
  for (int i = 0; i < 4; ++i) s_[i] = words[static_cast<size_t>(i)];
  has_spare_ = words[4] == 1;
  std::memcpy(&spare_, &words[5], sizeof spare_);
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

double Rng::normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  double u1;
  do {
    u1 = uniform();
  } while (u1 <= 0.0);
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double theta = 2.0 * std::numbers::pi * u2;
  spare_ = r * std::sin(theta);
  has_spare_ = true;
  return r * std::cos(theta);
}

}  // namespace moert
