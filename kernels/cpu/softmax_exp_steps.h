// The steps of math.h's softmax_exp, shared by its scalar, AVX2 and AVX-512 paths so that each
// lane of a vector goes through exactly the scalar operations, in any rounding mode: x = n ln2 + r
// with n = x / ln2 rounded to an integer (to nearest in the default mode, where |r| <= ln2 / 2 and
// a little more, x / ln2 being rounded) and r reduced in two FMAs (fdlibm's split of ln2, whose
// high part ends in zeros), e^r by its Taylor polynomial to degree 13 in Horner form (the
// remainder, below 5e-18 there, is under a twentieth of an ulp; each FMA rounds once), then 2^n
// through the exponent bits. Arguments run from kLowest to 0, where n stays in [-1022, 0] and 2^n
// is a normal number. The directed rounding modes keep the bits the same on every path, not the
// accuracy.
#pragma once

#include <cmath>

namespace moert::cpu::softmax_exp_steps {

// ln of the smallest normal double: below it e^x is subnormal, and the result is 0 instead.
constexpr double kLowest = -708.3964185322641;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;
// 1 / k! for k = 13 down to 0: the Horner order.
constexpr double kTaylor[14] = {1.6059043836821613e-10,
                                2.08767569878681e-09,
                                2.505210838544172e-08,
                                2.755731922398589e-07,
                                2.7557319223985893e-06,
                                2.48015873015873e-05,
                                0.0001984126984126984,
                                0.001388888888888889,
                                0.008333333333333333,
                                0.041666666666666664,
                                0.16666666666666666,
                                0.5,
                                1.0,
                                1.0};

// One argument, in the order the vector paths take: the reference every path's bits equal.
inline double one(double x) {
  if (x < kLowest) return 0.0;
  if (x > 0.0) x = 0.0;  // outside the domain; a NaN stays NaN
  if (std::isnan(x)) return x;
  const double n = std::nearbyint(x * kLog2e);
  double r = std::fma(-n, kLn2Hi, x);
  r = std::fma(-n, kLn2Lo, r);
  double p = kTaylor[0];
  for (int k = 1; k < 14; ++k) p = std::fma(p, r, kTaylor[k]);
  return p * std::ldexp(1.0, static_cast<int>(n));
}

}  // namespace moert::cpu::softmax_exp_steps
