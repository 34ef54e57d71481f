// The unit tests' FFN operands: random weights with the copies each expert precision reads,
// random rows, dispatch plans, and bitwise comparison.
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "tests/unit/random_tensor.h"

namespace moert::test {

using Vec = std::vector<float>;

inline Vec randv(int64_t n, std::mt19937& rng, float scale = 1.0f) {
  return test::random_tensor({n}, rng, scale).values;
}

inline bool same_bits(const Vec& a, const Vec& b) {
  // memcmp may not be given the null data() of an empty vector, even for 0 bytes.
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// A stack of `experts` SwiGLU FFNs [hidden, dim] (w1, w3) and [dim, hidden] (w2), N(0, 0.3).
struct Ffn {
  int64_t dim, hidden;
  Vec w1, w3, w2;
  std::vector<uint16_t> b1, b3, b2;  // bf16 copies, for the bf16 variant
  // FP8 copies (codes, block scales), for the fp8 variant.
  std::vector<uint8_t> c1, c3, c2;
  Vec s1, s3, s2;
  // Packed bf16 copies (Backend::pack_bf16), where the backend keeps them; bytes per matrix.
  std::vector<unsigned char> p1, p3, p2;
  int64_t packed_up = 0, packed_down = 0;
  Ffn(std::mt19937& rng, int64_t experts, Backend& be, int64_t d, int64_t h) : dim(d), hidden(h) {
    w1 = randv(experts * hidden * dim, rng, 0.3f);
    w3 = randv(experts * hidden * dim, rng, 0.3f);
    w2 = randv(experts * dim * hidden, rng, 0.3f);
    for (auto [f, b] : {std::pair{&w1, &b1}, std::pair{&w3, &b3}, std::pair{&w2, &b2}}) {
      b->resize(f->size());
      be.to_bf16(f->data(), b->data(), static_cast<int64_t>(f->size()));
    }
    packed_up = be.packed_bf16_bytes(hidden, dim);
    packed_down = be.packed_bf16_bytes(dim, hidden);
    if (packed_up > 0 && packed_down > 0)
      for (auto [b, pk, rows, cols, bytes] : {std::tuple{&b1, &p1, hidden, dim, packed_up},
                                              std::tuple{&b3, &p3, hidden, dim, packed_up},
                                              std::tuple{&b2, &p2, dim, hidden, packed_down}}) {
        pk->resize(static_cast<size_t>(experts * bytes));
        be.pack_bf16(b->data(), experts, rows, cols, pk->data());
      }
    if (!be.fp8_experts()) return;
    for (auto [f, c, s, rows, cols] :
         {std::tuple{&w1, &c1, &s1, hidden, dim}, std::tuple{&w3, &c3, &s3, hidden, dim},
          std::tuple{&w2, &c2, &s2, dim, hidden}}) {
      c->resize(f->size());
      s->resize(static_cast<size_t>(fp8_blocks_scale_floats(experts, rows, cols)));
      be.quantize_weight_blocks(f->data(), experts, rows, cols, c->data(), s->data(), "w");
    }
  }
  // Weight k (1, 3 or 2) as a backend of precision p reads it.
  Weight W(int k, Precision p) const {
    const Vec& f = k == 1 ? w1 : k == 3 ? w3 : w2;
    const auto& b = k == 1 ? b1 : k == 3 ? b3 : b2;
    Weight w{f.data(), p == Precision::Bf16 ? b.data() : nullptr};
    if (p == Precision::Fp8) {
      const auto& c = k == 1 ? c1 : k == 3 ? c3 : c2;
      const auto& s = k == 1 ? s1 : k == 3 ? s3 : s2;
      const int64_t rows = k == 2 ? dim : hidden, cols = k == 2 ? hidden : dim;
      w.fp8 = {c.data(), s.data(), rows * cols, fp8_blocks_scale_floats(1, rows, cols)};
    }
    return w;
  }
  // Weight k as an inference session's bf16 forward reads it: the packed copy alone (the plain
  // bf16 one where the backend keeps no packed copies).
  Weight packed(int k) const {
    if (p1.empty()) return W(k, Precision::Bf16);
    Weight w{(k == 1 ? w1 : k == 3 ? w3 : w2).data()};
    w.bf16_packed = (k == 1 ? p1 : k == 3 ? p3 : p2).data();
    w.packed_bytes = k == 2 ? packed_down : packed_up;
    w.packed_elements = dim * hidden;
    return w;
  }
};

// A plan of `rows` tokens over counts.size() experts, counts[e] assignments each; assignment a
// takes token token(a).
template <typename Token>
DispatchPlan plan_of(Backend& be, int64_t rows, const std::vector<int64_t>& counts, Token token) {
  DispatchPlan plan;
  plan.rows = rows;
  plan.host_offsets.assign(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e)
    plan.host_offsets[e + 1] = plan.host_offsets[e] + counts[e];
  const int64_t A = plan.num_assignments();
  plan.token.resize(be, static_cast<size_t>(A));
  for (int64_t a = 0; a < A; ++a) plan.token.data()[a] = token(a);
  return plan;
}

}  // namespace moert::test
