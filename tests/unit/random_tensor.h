// Random model tensors for the unit tests.
#pragma once

#include <random>
#include <vector>

#include "core/model.h"

namespace moert::test {

// A tensor of the given shape with N(0, scale) values.
inline Tensor random_tensor(std::vector<int64_t> shape, std::mt19937& rng, float scale = 0.3f) {
  Tensor t;
  t.shape = shape;
  int64_t n = 1;
  for (auto d : shape) n *= d;
  std::normal_distribution<float> dist(0.0f, scale);
  t.values.resize(static_cast<size_t>(n));
  for (auto& v : t.values) v = dist(rng);
  return t;
}

}  // namespace moert::test
