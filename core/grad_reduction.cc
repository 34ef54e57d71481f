#include "core/grad_reduction.h"

namespace moert {

std::vector<TreeBlock> aligned_blocks(int64_t a, int64_t b) {
  std::vector<TreeBlock> out;
  while (a < b) {
    // The largest power of two that divides a (any, for a = 0) and still fits before b.
    int64_t size = 1;
    while ((a == 0 || a % (2 * size) == 0) && a + 2 * size <= b) size *= 2;
    out.push_back({a, size});
    a += size;
  }
  return out;
}

std::vector<float> reference_tree_sum(const std::vector<std::vector<float>>& partials) {
  const int64_t J = static_cast<int64_t>(partials.size());
  // value(block) by its definition: a single chunk is its partial, a larger block the sum of its
  // halves.
  auto value = [&](auto&& self, TreeBlock b) -> std::vector<float> {
    if (b.size == 1) return partials[static_cast<size_t>(b.begin)];
    std::vector<float> left = self(self, TreeBlock{b.begin, b.size / 2});
    const std::vector<float> right = self(self, TreeBlock{b.begin + b.size / 2, b.size / 2});
    for (size_t i = 0; i < left.size(); ++i) left[i] = left[i] + right[i];
    return left;
  };
  std::vector<float> total;
  for (const TreeBlock& b : aligned_blocks(0, J)) {
    std::vector<float> v = value(value, b);
    if (total.empty()) {
      total = std::move(v);
    } else {
      for (size_t i = 0; i < total.size(); ++i) total[i] = total[i] + v[i];
    }
  }
  return total;
}

}  // namespace moert
