// Routing, defined once (docs/design.md section 1): the per-item bodies that the CPU backend calls
// for every token and the CUDA router kernels (kernels/cuda/router.cu) run one thread per item —
// one token, one (sequence, expert) or one (sequence, chunk, expert) each. Being shared, they hold
// the two backends to the same selection bit for bit (tests/unit/test_router_rules.cc). This
// header needs no CUDA header on the host.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/model.h"

#ifdef __CUDACC__
#define MOERT_HOST_DEVICE __host__ __device__
#else
#define MOERT_HOST_DEVICE
#endif

namespace moert::rules {

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

// The k largest of v [n] (1 <= k <= n), largest first, the lower index first among equals: the
// indices that k successive argmax_untaken calls take, in their order, from one pass over v
// (insertion into the sorted best k; k passes took 1.5x as long for 4 of 16 values, 2.4x for
// DeepSeek-V3's 8 of 256).
// idx (out) [k]; best (out) [k]: their values. v holds no NaN (the callers rank NaN as -inf).
MOERT_HOST_DEVICE inline void top_k_of(const float* v, int n, int k, int32_t* idx, float* best) {
  int filled = 0;
  for (int i = 0; i < n; ++i) {
    const float x = v[i];
    if (filled == k && !(x > best[k - 1])) continue;
    int j = filled < k ? filled++ : k - 1;
    for (; j > 0 && best[j - 1] < x; --j) {
      best[j] = best[j - 1];
      idx[j] = idx[j - 1];
    }
    best[j] = x;
    idx[j] = i;
  }
}

// Floats of scratch one token needs in route_token: biased [E], group scores [G], and the groups'
// taken flags [G] as bytes in E more floats.
MOERT_HOST_DEVICE inline int64_t route_scratch_floats(const RouterConfig& cfg) {
  return 2 * static_cast<int64_t>(cfg.num_experts) + cfg.num_groups;
}

// Scores of one token, s [E], from its logits z [E]: sigmoid, or softmax. Both take the limit at
// infinite logits (an overflowed router GEMM) rather than producing NaN: sigmoid(+-inf) is 1 or
// 0; a softmax with +inf logits shares the whole mass equally among them, and one whose logits are
// all -inf is uniform. A NaN logit gives NaN scores (the session refuses NaN logits first when it
// checks values).
MOERT_HOST_DEVICE inline void score_token(ScoreFunction fn, const float* z, float* s, int E) {
  if (fn == ScoreFunction::Sigmoid) {
    for (int e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + exp_f(-z[e]));
    return;
  }
  float mx = -INFINITY;
  for (int e = 0; e < E; ++e) mx = max_f(mx, z[e]);
  if (mx == INFINITY || mx == -INFINITY) {
    // exp(z - mx) would be inf - inf = NaN at the maximum: the limit, directly.
    int n = 0;
    for (int e = 0; e < E; ++e) n += z[e] == mx ? 1 : 0;
    for (int e = 0; e < E; ++e) s[e] = z[e] == mx ? 1.0f / static_cast<float>(n) : 0.0f;
    return;
  }
  float sum = 0.0f;
  for (int e = 0; e < E; ++e) {
    s[e] = exp_f(z[e] - mx);
    sum += s[e];
  }
  for (int e = 0; e < E; ++e) s[e] /= sum;
}

// Gradient of one token's logits dl [E] from the gradient ds [E] of its scores s [E].
MOERT_HOST_DEVICE inline void scores_backward_token(ScoreFunction fn, const float* s,
                                                    const float* ds, float* dl, int E) {
  if (fn == ScoreFunction::Sigmoid) {
    for (int e = 0; e < E; ++e) dl[e] = ds[e] * s[e] * (1.0f - s[e]);
    return;
  }
  double dot = 0.0;
  for (int e = 0; e < E; ++e) dot += double{ds[e]} * s[e];
  for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(s[e] * (ds[e] - dot));
}

// Routes one token (docs/design.md section 1). z: its logits [E]; bias [E] or null; s (out): its
// scores [E]; experts, weights (out): [top_k]; scratch: route_scratch_floats(cfg).
MOERT_HOST_DEVICE inline void route_token(const RouterConfig& cfg, const float* z,
                                          const float* bias, float* s, int32_t* experts,
                                          float* weights, float* scratch) {
  const int E = static_cast<int>(cfg.num_experts), G = static_cast<int>(cfg.num_groups);
  const int K = static_cast<int>(cfg.top_k);
  float* biased = scratch;
  float* gscore = biased + E;
  unsigned char* gtaken = reinterpret_cast<unsigned char*>(gscore + G);  // G bytes <= E floats

  score_token(cfg.score, z, s, E);
  for (int e = 0; e < E; ++e) {
    float b = s[e] + (bias ? bias[e] : 0.0f);
    if (is_nan(b)) b = -INFINITY;  // ranks below every real score
    biased[e] = b;
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
    for (int g = 0; g < G; ++g) gtaken[g] = 0;
    for (unsigned i = 0; i < cfg.topk_groups; ++i) gtaken[argmax_untaken(gscore, gtaken, G)] = 1;
    // Experts of the groups not kept cannot be chosen: -inf, never 0.
    for (int e = 0; e < E; ++e)
      if (!gtaken[e / gs]) biased[e] = -INFINITY;
  }
  if (K > 0) top_k_of(biased, E, K, experts, weights);  // weights: the biased scores, for now
  float sum = 0.0f;
  for (int k = 0; k < K; ++k) {
    const int e = experts[k];
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
  scores_backward_token(cfg.score, s, ds, dl, E);
}

// ---- The auxiliary balancing losses (their statistics per chunk of rows; core/aux_loss.h folds
// them into sequences).

// The sum of one token's scores s [E], which normalises them for P.
MOERT_HOST_DEVICE inline double score_sum(const float* s, int E) {
  double sum = 0.0;
  for (int e = 0; e < E; ++e) sum += s[e];
  return sum;
}

// The first position in token[lo .. hi) (ascending) whose token is >= v; hi if none.
MOERT_HOST_DEVICE inline int64_t first_token_at_least(const int32_t* token, int64_t lo, int64_t hi,
                                                      int64_t v) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (token[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// How many of expert e's assignments have a token in [t0, t1). The plan lists each expert's
// assignments by ascending token, so two binary searches count them exactly, without reading the
// other assignments of the batch.
MOERT_HOST_DEVICE inline int64_t expert_tokens_in(const int64_t* expert_offsets,
                                                  const int32_t* token, int e, int64_t t0,
                                                  int64_t t1) {
  const int64_t lo = expert_offsets[e], hi = expert_offsets[e + 1];
  return first_token_at_least(token, lo, hi, t1) - first_token_at_least(token, lo, hi, t0);
}

// Sum of s[t, e] / z[t] over rows [t0, t1), in row order; z: every row's score sum. A row whose
// scores are all 0 (every logit -inf under sigmoid) has no distribution to normalise and adds 0.
MOERT_HOST_DEVICE inline double aux_psum(const float* scores, const double* z, int64_t t0,
                                         int64_t t1, int e, int E) {
  double p = 0.0;
  for (int64_t t = t0; t < t1; ++t)
    if (z[t] > 0.0) p += scores[t * E + e] / z[t];
  return p;
}

// Gradient ds [E] of sum_e coef[e] * s[e] / z with respect to one token's scores s [E] (z: their
// sum), through s' = s / z; 0 where z = 0, as aux_psum takes nothing from such a token.
MOERT_HOST_DEVICE inline void aux_grad_token(const float* s, double z, const double* coef, int E,
                                             float* ds) {
  if (!(z > 0.0)) {
    for (int e = 0; e < E; ++e) ds[e] = 0.0f;
    return;
  }
  double dot = 0.0;
  for (int e = 0; e < E; ++e) dot += coef[e] * s[e] / z;
  for (int e = 0; e < E; ++e) ds[e] = static_cast<float>((coef[e] - dot) / z);
}

// The sequence of row t: the q with seq_offsets[q] <= t < seq_offsets[q + 1], or -1 when t lies
// in none (offsets ascending, num_seq + 1 of them).
MOERT_HOST_DEVICE inline int64_t sequence_of(const int64_t* seq_offsets, int64_t num_seq,
                                             int64_t t) {
  int64_t lo = 0, hi = num_seq;  // the last q with seq_offsets[q] <= t
  if (num_seq == 0 || t < seq_offsets[0] || t >= seq_offsets[num_seq]) return -1;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (seq_offsets[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  return t < seq_offsets[lo + 1] ? lo : -1;
}

}  // namespace moert::rules
