// The CPU backend: fp32, single-threaded BLAS calls spread over the session's threads. Work is cut
// into fixed-size items independent of the thread count, so results do not depend on it.
#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/backend.h"
#include "kernels/cpu/math.h"
#include "kernels/cpu/router.h"
#include "kernels/cpu/thread_pool.h"

namespace moert {
namespace {

constexpr int64_t kRowBlock = 64;

int64_t blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Fills the token-major view of a plan from its expert-major lists.
void index_by_token(DispatchPlan& plan) {
  plan.token_offsets.assign(plan.rows + 1, 0);
  for (int64_t t : plan.token) ++plan.token_offsets[t + 1];
  for (int64_t t = 0; t < plan.rows; ++t) plan.token_offsets[t + 1] += plan.token_offsets[t];
  plan.token_assign.resize(plan.token.size());
  std::vector<int64_t> fill(plan.token_offsets.begin(), plan.token_offsets.end() - 1);
  for (int64_t a = 0; a < plan.num_assignments(); ++a) plan.token_assign[fill[plan.token[a]]++] = a;
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(unsigned threads) : pool_(threads), scratch_(threads) {}

  const char* name() const override { return "cpu"; }

  void linear(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t in,
              int64_t out, bool accumulate) override {
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      cpu::matmul_nt(x + r0 * in, w, y + r0 * out, n, out, in, accumulate);
      if (bias)
        for (int64_t r = r0; r < r0 + n; ++r)
          for (int64_t o = 0; o < out; ++o) y[r * out + o] += bias[o];
    });
  }

  void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
               float eps) override {
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      cpu::rmsnorm(x + r0 * dim, w, y + r0 * dim, inv_rms ? inv_rms + r0 : nullptr, n, dim, eps);
    });
  }

  void embedding(const int32_t* tokens, const float* table, float* y, int64_t rows, int64_t context,
                 int64_t dim) override {
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      for (int64_t r = r0; r < r0 + n; ++r)
        for (int64_t c = 0; c < context; ++c)
          std::memcpy(y + (r * context + c) * dim, table + tokens[r * context + c] * dim,
                      sizeof(float) * static_cast<size_t>(dim));
    });
  }

  void swiglu_ffn(const float* x, const float* w1, const float* w3, const float* w2, float* y,
                  int64_t rows, int64_t dim, int64_t hidden, bool accumulate) override {
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned worker) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      ffn_rows(x + r0 * dim, w1, w3, w2, y + r0 * dim, n, dim, hidden, accumulate, worker);
    });
  }

  void route_topk(const RouterConfig& cfg, const float* logits, const float* bias, int64_t rows,
                  float* scores, int32_t* experts, float* weights) override {
    const int64_t E = cfg.num_experts, K = cfg.top_k;
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned worker) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      auto& s = scratch_[worker];
      s.f.resize(static_cast<size_t>(cpu::route_scratch_floats(cfg)));
      s.i.resize(static_cast<size_t>(cpu::route_scratch_ints(cfg)));
      for (int64_t r = r0; r < r0 + n; ++r)
        cpu::route_token(cfg, logits + r * E, bias, scores + r * E, experts + r * K,
                         weights + r * K, s.f.data(), s.i.data());
    });
  }

  void route_expert_choice(const RouterConfig& cfg, const float* logits, int64_t rows,
                           int64_t capacity, float* scores, DispatchPlan& plan) override {
    const int64_t E = cfg.num_experts;
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      for (int64_t r = r0; r < r0 + n; ++r)
        cpu::router_scores(cfg.score, logits + r * E, scores + r * E, E);
    });
    capacity = std::min(capacity, rows);
    std::vector<std::vector<int64_t>> chosen(static_cast<size_t>(E));
    pool_.parallel_for(E, [&](int64_t e, unsigned) {
      std::vector<int64_t> order(static_cast<size_t>(rows));
      std::iota(order.begin(), order.end(), 0);
      auto better = [&](int64_t a, int64_t c) {
        const float sa = scores[a * E + e], sc = scores[c * E + e];
        return sa > sc || (sa == sc && a < c);
      };
      std::partial_sort(order.begin(), order.begin() + capacity, order.end(), better);
      order.resize(static_cast<size_t>(capacity));
      std::sort(order.begin(), order.end());
      chosen[static_cast<size_t>(e)] = std::move(order);
    });
    plan.rows = rows;
    plan.expert_offsets.assign(E + 1, 0);
    plan.token.clear();
    plan.weight.clear();
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t t : chosen[static_cast<size_t>(e)]) {
        plan.token.push_back(t);
        plan.weight.push_back(scores[t * E + e] * cfg.scaling);
      }
      plan.expert_offsets[e + 1] = plan.num_assignments();
    }
    index_by_token(plan);
  }

  void plan_dispatch(const int32_t* experts, const float* weights, int64_t rows, int64_t top_k,
                     int64_t num_experts, DispatchPlan& plan) override {
    plan.rows = rows;
    plan.expert_offsets.assign(num_experts + 1, 0);
    const int64_t A = rows * top_k;
    for (int64_t a = 0; a < A; ++a) ++plan.expert_offsets[experts[a] + 1];
    for (int64_t e = 0; e < num_experts; ++e) plan.expert_offsets[e + 1] += plan.expert_offsets[e];
    plan.token.resize(A);
    plan.weight.resize(A);
    std::vector<int64_t> fill(plan.expert_offsets.begin(), plan.expert_offsets.end() - 1);
    for (int64_t a = 0; a < A; ++a) {
      const int64_t slot = fill[experts[a]]++;
      plan.token[slot] = a / top_k;
      plan.weight[slot] = weights[a];
    }
    index_by_token(plan);
  }

  void dispatch(const DispatchPlan& plan, const float* x, float* x_perm, int64_t dim) override {
    const int64_t A = plan.num_assignments();
    pool_.parallel_for(blocks(A, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t a0 = b * kRowBlock, n = std::min(kRowBlock, A - a0);
      for (int64_t a = a0; a < a0 + n; ++a)
        std::memcpy(x_perm + a * dim, x + plan.token[a] * dim,
                    sizeof(float) * static_cast<size_t>(dim));
    });
  }

  void grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, const float* w1,
                          const float* w3, const float* w2, float* y_perm, int64_t dim,
                          int64_t hidden) override {
    struct Item {
      int64_t expert, begin, rows;
    };
    std::vector<Item> items;
    const int64_t E = static_cast<int64_t>(plan.expert_offsets.size()) - 1;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t a = plan.expert_offsets[e]; a < plan.expert_offsets[e + 1]; a += kRowBlock)
        items.push_back({e, a, std::min(kRowBlock, plan.expert_offsets[e + 1] - a)});
    const int64_t per_expert = hidden * dim;
    pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i, unsigned worker) {
      const Item& it = items[static_cast<size_t>(i)];
      const int64_t off = it.expert * per_expert;
      ffn_rows(x_perm + it.begin * dim, w1 + off, w3 + off, w2 + off, y_perm + it.begin * dim,
               it.rows, dim, hidden, false, worker);
    });
  }

  void combine(const DispatchPlan& plan, const float* y_perm, float* y, int64_t dim) override {
    pool_.parallel_for(blocks(plan.rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, plan.rows - r0);
      for (int64_t t = r0; t < r0 + n; ++t)
        for (int64_t j = plan.token_offsets[t]; j < plan.token_offsets[t + 1]; ++j) {
          const int64_t a = plan.token_assign[j];
          const float w = plan.weight[a];
          const float* src = y_perm + a * dim;
          float* dst = y + t * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] += w * src[d];
        }
    });
  }

 private:
  struct Scratch {
    std::vector<float> f;
    std::vector<int32_t> i;
  };

  // One block of rows through a SwiGLU FFN, with the worker's scratch for the hidden activations.
  void ffn_rows(const float* x, const float* w1, const float* w3, const float* w2, float* y,
                int64_t rows, int64_t dim, int64_t hidden, bool accumulate, unsigned worker) {
    auto& s = scratch_[worker].f;
    s.resize(static_cast<size_t>(2 * rows * hidden));
    float* h1 = s.data();
    float* h3 = h1 + rows * hidden;
    cpu::matmul_nt(x, w1, h1, rows, hidden, dim, false);
    cpu::matmul_nt(x, w3, h3, rows, hidden, dim, false);
    cpu::swiglu(h1, h3, h1, rows * hidden);
    cpu::matmul_nt(h1, w2, y, rows, dim, hidden, accumulate);
  }

  cpu::ThreadPool pool_;
  std::vector<Scratch> scratch_;  // one per worker
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(unsigned threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace moert
