// The optimizer's elementwise updates and the squared norm of a gradient, on the CPU. The
// updates compute exactly the scalar formulas (double arithmetic, no fused multiply-add, the same
// order), 8 elements at a time where AVX-512 allows and 4 where AVX2 does; the results do not
// depend on the path taken.
#pragma once

#include <cstdint>

namespace moert::cpu {

struct AdamW {
  double lr, beta1, beta2, eps, wd, gscale, bias_correction1, bias_correction2;
};

// m = beta1 m + (1 - beta1) g'; v = beta2 v + (1 - beta2) g'^2 with g' = g gscale;
// p -= lr ((m / bc1) / (sqrt(v / bc2) + eps) + wd p).
void adamw_update(const AdamW& a, float* p, const float* g, float* m, float* v, int64_t n);

// Sum of x[i]^2 in double over 4 interleaved lanes (lane i % 4), added as (l0 + l1) + (l2 + l3).
double sum_squares_lanes(const float* x, int64_t n);

}  // namespace moert::cpu
