// libFuzzer harness: the bf16 and FP8 E4M3 decoders of stored weights (core/tensor_codec.h), fed
// arguments that may disagree with each other, and checked value by value against a reference
// written from the formats' definitions.
//
// Input: byte 0 selects the decoder (even: bf16, odd: FP8). bf16: byte 1 is a length slack (the
// output holds (bytes - 2) / 2 + slack - 8 values, so sizes disagree when slack != 8), the rest
// are the values. FP8: byte 1 the rank (1 to 4), then one byte per dimension, two bytes of block
// rows and columns, a byte of code-count slack and one of scale-count slack (both 8 = agree), then
// the codes and the scales (raw fp32, taken from what is left, cycled).
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/tensor_codec.h"
#include "fuzz_common.h"

namespace {

float bf16_reference(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

// OCP FP8 E4M3 ("fn"): sign, 4 exponent bits of bias 7, 3 mantissa bits; exponent 15 with
// mantissa 7 is NaN; no infinities; exponent 0 is subnormal (m / 8 * 2^-6).
float e4m3_reference(uint8_t code) {
  const int sign = code >> 7, exponent = (code >> 3) & 15, mantissa = code & 7;
  if (exponent == 15 && mantissa == 7) return std::nanf("");
  const double magnitude =
      exponent == 0 ? mantissa / 8.0 / 64.0 : (1.0 + mantissa / 8.0) * std::pow(2.0, exponent - 7);
  return static_cast<float>(sign ? -magnitude : magnitude);
}

bool same(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) ||
         std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b);
}

void fuzz_bf16(const uint8_t* data, size_t size) {
  if (size < 2) return;
  const size_t stored = (size - 2) / 2;
  const int64_t n = static_cast<int64_t>(stored) + data[1] - 8;
  if (n < 0) return;
  std::vector<float> out(static_cast<size_t>(n));
  const bool ok = moert_fuzz::clean("decode_bf16", [&] {
    moert::decode_bf16({data + 2, size - 2}, out);
  });
  if (ok != ((size - 2) % 2 == 0 && static_cast<size_t>(n) == stored))
    moert_fuzz::finding("decode_bf16", "accepted disagreeing sizes or refused agreeing ones");
  if (!ok) return;
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t b;
    std::memcpy(&b, data + 2 + 2 * i, 2);
    if (!same(out[i], bf16_reference(b))) moert_fuzz::finding("decode_bf16", "wrong value");
  }
}

void fuzz_e4m3(const uint8_t* data, size_t size) {
  size_t at = 1;
  auto next = [&]() -> uint8_t { return at < size ? data[at++] : 0; };
  const int rank = 1 + next() % 4;
  std::vector<int64_t> shape(static_cast<size_t>(rank));
  uint64_t numel = 1;
  for (auto& d : shape) {
    d = next() % 24;
    numel *= static_cast<uint64_t>(d);
  }
  const uint32_t block_rows = next() % 40, block_cols = next() % 40;
  const int code_slack = next() % 16 - 8, scale_slack = next() % 16 - 8;
  uint64_t blocks = 0;
  const bool shape_ok = moert_fuzz::clean(
      "e4m3_block_count", [&] { blocks = moert::e4m3_block_count(shape, block_rows, block_cols); });
  if (shape_ok != (rank >= 2 && block_rows > 0 && block_cols > 0))
    moert_fuzz::finding("e4m3_block_count", "wrong verdict on the shape");
  const int64_t n_codes = static_cast<int64_t>(numel) + code_slack;
  const int64_t n_scales = static_cast<int64_t>(shape_ok ? blocks : 1) + scale_slack;
  if (n_codes < 0 || n_scales < 0) return;
  std::vector<uint8_t> codes(static_cast<size_t>(n_codes));
  for (auto& c : codes) c = next();
  std::vector<float> scales(static_cast<size_t>(n_scales));
  for (auto& s : scales) {
    uint32_t u = 0;
    for (int k = 0; k < 4; ++k) u = u << 8 | next();
    s = std::bit_cast<float>(u);
  }
  std::vector<float> out(numel);
  const bool ok = moert_fuzz::clean("decode_e4m3_blocks", [&] {
    moert::decode_e4m3_blocks(codes, shape, block_rows, block_cols, scales, out);
  });
  if (ok != (shape_ok && code_slack == 0 && scale_slack == 0))
    moert_fuzz::finding("decode_e4m3_blocks",
                        "accepted disagreeing sizes or refused agreeing ones");
  if (!ok || numel == 0) return;
  const uint64_t rows = static_cast<uint64_t>(shape[shape.size() - 2]);
  const uint64_t cols = static_cast<uint64_t>(shape.back());
  const uint64_t row_blocks = (rows + block_rows - 1) / block_rows;
  const uint64_t col_blocks = (cols + block_cols - 1) / block_cols;
  for (uint64_t i = 0; i < numel; ++i) {
    const uint64_t m = i / (rows * cols), r = i / cols % rows, c = i % cols;
    const float scale = scales[(m * row_blocks + r / block_rows) * col_blocks + c / block_cols];
    if (!same(out[i], e4m3_reference(codes[i]) * scale))
      moert_fuzz::finding("decode_e4m3_blocks", "wrong value");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  if (data[0] % 2 == 0)
    fuzz_bf16(data, size);
  else
    fuzz_e4m3(data, size);
  return 0;
}
