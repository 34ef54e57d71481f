// The router on the GPU: one fused kernel for scores, bias, group-limited top-k, renormalisation
// and scaling (DESIGN.md section 1, the same rules as the CPU's), its backward, and the
// auxiliary loss.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/kernels.h"

namespace moert::cuda {
namespace {

constexpr unsigned kThreads = 128;

// Index of the largest value among those not yet taken, the lower index among equals; -1 if none.
__device__ int argmax_untaken(const float* v, const unsigned char* taken, int n) {
  int best = -1;
  for (int i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

// One thread per token. scratch per token: biased [E], group scores [G], taken flags [E + G] (as
// bytes in the float area).
__global__ void route_topk_k(RouterConfig cfg, const float* logits, const float* bias, int64_t rows,
                             float* scores, int32_t* experts, float* weights, float* scratch) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  const int E = static_cast<int>(cfg.num_experts), G = static_cast<int>(cfg.num_groups);
  const int K = static_cast<int>(cfg.top_k);
  const float* z = logits + t * E;
  float* s = scores + t * E;
  float* biased = scratch + t * (2 * E + G);
  float* gscore = biased + E;
  unsigned char* taken = reinterpret_cast<unsigned char*>(gscore + G);  // E + G bytes <= E floats

  if (cfg.score == ScoreFunction::Sigmoid) {
    for (int e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + expf(-z[e]));
  } else {
    float mx = -INFINITY;
    for (int e = 0; e < E; ++e) mx = fmaxf(mx, z[e]);
    float sum = 0.0f;
    for (int e = 0; e < E; ++e) {
      s[e] = expf(z[e] - mx);
      sum += s[e];
    }
    for (int e = 0; e < E; ++e) s[e] /= sum;
  }
  for (int e = 0; e < E; ++e) {
    float b = s[e] + (bias ? bias[e] : 0.0f);
    if (isnan(b)) b = -INFINITY;  // ranks below every real score
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
    experts[t * K + k] = e;
    weights[t * K + k] = s[e];  // from the unbiased score
    sum += s[e];
  }
  for (int k = 0; k < K; ++k) {
    float w = weights[t * K + k];
    if (cfg.normalize) w = w / (sum + 1e-20f);
    weights[t * K + k] = w * cfg.scaling;
  }
}

// One thread per token. ds scratch: E floats per token.
__global__ void router_backward_k(RouterConfig cfg, bool normalize, const float* scores,
                                  const int64_t* token_offsets, const int32_t* token_assign,
                                  const int32_t* expert, const float* dweight,
                                  const float* ds_extra, float* dlogits, float* scratch,
                                  int64_t rows) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  const int E = static_cast<int>(cfg.num_experts);
  const float* s = scores + t * E;
  float* ds = scratch + t * E;
  for (int e = 0; e < E; ++e) ds[e] = ds_extra ? ds_extra[t * E + e] : 0.0f;
  const int64_t j0 = token_offsets[t], j1 = token_offsets[t + 1];
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
  float* dl = dlogits + t * E;
  if (cfg.score == ScoreFunction::Sigmoid) {
    for (int e = 0; e < E; ++e) dl[e] = ds[e] * s[e] * (1.0f - s[e]);
  } else {
    double dot = 0.0;
    for (int e = 0; e < E; ++e) dot += double{ds[e]} * s[e];
    for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(s[e] * (ds[e] - dot));
  }
}

// One thread per token: z = sum of its scores, computed once for every expert's statistics.
__global__ void score_sums_k(const float* scores, int64_t rows, int E, double* z) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  double sum = 0.0;
  for (int e = 0; e < E; ++e) sum += scores[t * E + e];
  z[t] = sum;
}

// One thread per (sequence, expert): f (scaled count) and P (mean normalised score), and the
// partial loss f * P * alpha / num_seq.
__global__ void aux_stats_k(const float* scores, const double* z, const int64_t* token_offsets,
                            const int32_t* token_assign, const int32_t* expert, int64_t num_seq,
                            int64_t L, int E, int K, double alpha, double* f_table,
                            double* loss_part) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= num_seq * E) return;
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

// One thread per token: d loss / d s through s' = s / z.
__global__ void aux_grad_k(const float* scores, const double* z_all, const double* f_table,
                           int64_t rows, int64_t L, int64_t num_seq, int E, double alpha,
                           float* ds) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= rows) return;
  const double* f = f_table + (t / L) * E;
  const float* s = scores + t * E;
  const double z = z_all[t];
  const double c = alpha / static_cast<double>(L * num_seq);
  double dot = 0.0;
  for (int e = 0; e < E; ++e) dot += c * f[e] * s[e] / z;
  for (int e = 0; e < E; ++e) ds[t * E + e] = static_cast<float>((c * f[e] - dot) / z);
}

}  // namespace

void route_topk(const RouterConfig& cfg, const float* logits, const float* bias, int64_t rows,
                float* scores, int32_t* experts, float* weights, float* scratch, cudaStream_t s) {
  if (rows == 0) return;
  route_topk_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(cfg, logits, bias, rows, scores,
                                                             experts, weights, scratch);
  check_launch("route_topk");
}

void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                     const int64_t* token_offsets, const int32_t* token_assign,
                     const int32_t* expert, const float* dweight, const float* ds_extra,
                     float* dlogits, float* scratch, int64_t rows, cudaStream_t s) {
  if (rows == 0) return;
  router_backward_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(
      cfg, normalize, scores, token_offsets, token_assign, expert, dweight, ds_extra, dlogits,
      scratch, rows);
  check_launch("router_backward");
}

void aux_loss(const RouterConfig& cfg, const float* scores, const int64_t* token_offsets,
              const int32_t* token_assign, const int32_t* expert, int64_t rows, int64_t seq_len,
              double alpha, float* ds, double* z, double* f_table, double* loss_part,
              cudaStream_t s) {
  const int E = static_cast<int>(cfg.num_experts), K = static_cast<int>(cfg.top_k);
  const int64_t num_seq = rows / seq_len;
  score_sums_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(scores, rows, E, z);
  check_launch("aux_loss score sums");
  aux_stats_k<<<grid_for(num_seq * E, kThreads), kThreads, 0, s>>>(
      scores, z, token_offsets, token_assign, expert, num_seq, seq_len, E, K, alpha, f_table,
      loss_part);
  check_launch("aux_loss stats");
  aux_grad_k<<<grid_for(rows, kThreads), kThreads, 0, s>>>(scores, z, f_table, rows, seq_len,
                                                           num_seq, E, alpha, ds);
  check_launch("aux_loss grad");
}

}  // namespace moert::cuda
