// The per-item bodies of the CUDA router kernels (router.cu): one token, one (sequence, expert)
// or one (sequence, chunk, expert) each. They live here, callable from the host too, so that the
// GPU's routing rules can be checked against the CPU backend on a machine without a GPU
// (tests/unit/test_router_rules.cc). This header needs no CUDA header on the host.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/model.h"

#ifdef __CUDACC__
#define MOERT_HOST_DEVICE __host__ __device__
#else
#define MOERT_HOST_DEVICE
#endif

namespace moert::cuda::rules {

// The device keeps CUDA's own math functions (what the kernels always called); the host takes the
// std:: overloads for float, which are the CPU backend's, so that the host results can be compared
// with the CPU bit for bit.
MOERT_HOST_DEVICE inline float exp_f(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return std::exp(x);
#endif
}

MOERT_HOST_DEVICE inline float max_f(float a, float b) {
#ifdef __CUDA_ARCH__
  return fmaxf(a, b);
#else
  return std::fmax(a, b);
#endif
}

MOERT_HOST_DEVICE inline bool is_nan(float x) {
#ifdef __CUDA_ARCH__
  return isnan(x);
#else
  return std::isnan(x);
#endif
}

// Index of the largest value among those not yet taken, the lower index among equals; -1 if none.
MOERT_HOST_DEVICE inline int argmax_untaken(const float* v, const unsigned char* taken, int n) {
  int best = -1;
  for (int i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

// Floats of scratch one token needs in route_token: biased [E], group scores [G], and the taken
// flags [E + G] as bytes in E more floats.
MOERT_HOST_DEVICE inline int64_t route_scratch_floats(const RouterConfig& cfg) {
  return 2 * static_cast<int64_t>(cfg.num_experts) + cfg.num_groups;
}

// Routes one token (DESIGN.md section 1). z: its logits [E]; bias [E] or null; s (out): its
// scores [E]; experts, weights (out): [top_k]; scratch: route_scratch_floats(cfg).
MOERT_HOST_DEVICE inline void route_token(const RouterConfig& cfg, const float* z,
                                          const float* bias, float* s, int32_t* experts,
                                          float* weights, float* scratch) {
  const int E = static_cast<int>(cfg.num_experts), G = static_cast<int>(cfg.num_groups);
  const int K = static_cast<int>(cfg.top_k);
  float* biased = scratch;
  float* gscore = biased + E;
  unsigned char* taken = reinterpret_cast<unsigned char*>(gscore + G);  // E + G bytes <= E floats

  if (cfg.score == ScoreFunction::Sigmoid) {
    for (int e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + exp_f(-z[e]));
  } else {
    float mx = -INFINITY;
    for (int e = 0; e < E; ++e) mx = max_f(mx, z[e]);
    float sum = 0.0f;
    for (int e = 0; e < E; ++e) {
      s[e] = exp_f(z[e] - mx);
      sum += s[e];
    }
    for (int e = 0; e < E; ++e) s[e] /= sum;
  }
  for (int e = 0; e < E; ++e) {
    float b = s[e] + (bias ? bias[e] : 0.0f);
    if (is_nan(b)) b = -INFINITY;  // ranks below every real score
    biased[e] = b;
    taken[e] = 0;
  }
  if (G > 1 && cfg.topk_groups < cfg.num_groups) {
    const int gs = E / G;
    // A group's score: the sum of its two best biased scores (its one score if it has one).
    for (int g = 0; g < G; ++g) {
      float first = -INFINITY, second = -INFINITY;
      for (int i = 0; i < gs; ++i) {
        const float b = biased[g * gs + i];
        if (b > first) {
          second = first;
          first = b;
        } else if (b > second) {
          second = b;
        }
      }
      gscore[g] = gs >= 2 ? first + second : first;
    }
    unsigned char* gtaken = taken + E;
    for (int g = 0; g < G; ++g) gtaken[g] = 0;
    for (unsigned i = 0; i < cfg.topk_groups; ++i) gtaken[argmax_untaken(gscore, gtaken, G)] = 1;
    // Experts of the groups not kept cannot be chosen: -inf, never 0.
    for (int e = 0; e < E; ++e)
      if (!gtaken[e / gs]) biased[e] = -INFINITY;
  }
  float sum = 0.0f;
  for (int k = 0; k < K; ++k) {
    const int e = argmax_untaken(biased, taken, E);
    taken[e] = 1;
    experts[k] = e;
    weights[k] = s[e];  // from the unbiased score
    sum += s[e];
  }
  for (int k = 0; k < K; ++k) {
    float w = weights[k];
    if (cfg.normalize) w = w / (sum + 1e-20f);
    weights[k] = w * cfg.scaling;
  }
}

// Gradient of one token's logits dl [E] from its scores s [E]. Its assignments are
// token_assign[j0 .. j1) (the plan's token-major view); ds_extra: this token's extra score
// gradient [E] or null; ds: scratch [E].
MOERT_HOST_DEVICE inline void router_backward_token(const RouterConfig& cfg, bool normalize,
                                                    const float* s, int64_t j0, int64_t j1,
                                                    const int32_t* token_assign,
                                                    const int32_t* expert, const float* dweight,
                                                    const float* ds_extra, float* ds, float* dl) {
  const int E = static_cast<int>(cfg.num_experts);
  for (int e = 0; e < E; ++e) ds[e] = ds_extra ? ds_extra[e] : 0.0f;
  if (normalize) {
    double sum = 0.0, dot = 0.0;
    for (int64_t j = j0; j < j1; ++j) sum += s[expert[token_assign[j]]];
    const float denom = static_cast<float>(sum) + 1e-20f;
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t a = token_assign[j];
      dot += double{dweight[a]} * s[expert[a]];
    }
    const double c = cfg.scaling;
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t a = token_assign[j];
      ds[expert[a]] +=
          static_cast<float>(c * dweight[a] / denom - c * dot / (double{denom} * denom));
    }
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t a = token_assign[j];
      ds[expert[a]] += cfg.scaling * dweight[a];
    }
  }
  if (cfg.score == ScoreFunction::Sigmoid) {
    for (int e = 0; e < E; ++e) dl[e] = ds[e] * s[e] * (1.0f - s[e]);
  } else {
    double dot = 0.0;
    for (int e = 0; e < E; ++e) dot += double{ds[e]} * s[e];
    for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(s[e] * (ds[e] - dot));
  }
}

// ---- The sequence-wise auxiliary loss, over sequences of L rows.

// The sum of one token's scores s [E], which normalises them for P.
MOERT_HOST_DEVICE inline double score_sum(const float* s, int E) {
  double sum = 0.0;
  for (int e = 0; e < E; ++e) sum += s[e];
  return sum;
}

// Item i = q * E + e: f (scaled count) and P (mean normalised score) of expert e in sequence q,
// into f_table[i], and the partial loss f * P * alpha / num_seq into loss_part[i]. z: every
// token's score sum; the assignments are read through the plan's token-major view.
MOERT_HOST_DEVICE inline void aux_stats(const float* scores, const double* z,
                                        const int64_t* token_offsets, const int32_t* token_assign,
                                        const int32_t* expert, int64_t i, int64_t num_seq,
                                        int64_t L, int E, int K, double alpha, double* f_table,
                                        double* loss_part) {
  const int64_t q = i / E;
  const int e = static_cast<int>(i % E);
  double f = 0.0, p = 0.0;
  for (int64_t t = q * L; t < (q + 1) * L; ++t) {
    for (int64_t j = token_offsets[t]; j < token_offsets[t + 1]; ++j)
      if (expert[token_assign[j]] == e) f += 1.0;
    p += scores[t * E + e] / z[t];
  }
  f *= static_cast<double>(E) / static_cast<double>(K * L);
  p /= static_cast<double>(L);
  f_table[i] = f;
  loss_part[i] = alpha * f * p / static_cast<double>(num_seq);
}

// Gradient ds [E] of the loss with respect to one token's scores s [E] (z: their sum; f: its
// sequence's f_table row), through s' = s / z.
MOERT_HOST_DEVICE inline void aux_grad_token(const float* s, double z, const double* f, int64_t L,
                                             int64_t num_seq, int E, double alpha, float* ds) {
  const double c = alpha / static_cast<double>(L * num_seq);
  double dot = 0.0;
  for (int e = 0; e < E; ++e) dot += c * f[e] * s[e] / z;
  for (int e = 0; e < E; ++e) ds[e] = static_cast<float>((c * f[e] - dot) / z);
}

}  // namespace moert::cuda::rules
