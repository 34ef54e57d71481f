// The CPU backend: fp32, single-threaded BLAS calls spread over the session's threads. Work is cut
// into fixed-size items independent of the thread count, so results do not depend on it.
#include <algorithm>
#include <cmath>
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
    plan.expert.clear();
    plan.weight.clear();
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t t : chosen[static_cast<size_t>(e)]) {
        plan.token.push_back(t);
        plan.expert.push_back(static_cast<int32_t>(e));
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
    plan.expert.resize(A);
    plan.weight.resize(A);
    std::vector<int64_t> fill(plan.expert_offsets.begin(), plan.expert_offsets.end() - 1);
    for (int64_t a = 0; a < A; ++a) {
      const int64_t slot = fill[experts[a]]++;
      plan.token[slot] = a / top_k;
      plan.expert[slot] = experts[a];
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
    const auto items = row_items(plan);
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

  void linear_backward(const float* x, const float* w, const float* dy, float* dx,
                       bool dx_accumulate, float* dw, float* db, int64_t rows, int64_t in,
                       int64_t out) override {
    if (dx)
      pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
        const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
        cpu::matmul_nn(dy + r0 * out, w, dx + r0 * in, n, in, out, dx_accumulate);
      });
    pool_.parallel_for(blocks(out, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t o0 = b * kRowBlock, n = std::min(kRowBlock, out - o0);
      cpu::matmul_tn(dy + o0, out, x, in, dw + o0 * in, in, n, in, rows, true);
      if (db)
        for (int64_t o = o0; o < o0 + n; ++o) {
          double sum = 0.0;
          for (int64_t r = 0; r < rows; ++r) sum += dy[r * out + o];
          db[o] += static_cast<float>(sum);
        }
    });
  }

  void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                        float* dx, float* dw, int64_t rows, int64_t dim) override {
    const int64_t nb = blocks(rows, kRowBlock);
    std::vector<double> partial(static_cast<size_t>(nb * dim), 0.0);
    pool_.parallel_for(nb, [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      cpu::rmsnorm_backward(x + r0 * dim, w, inv_rms + r0, dy + r0 * dim, dx + r0 * dim,
                            partial.data() + b * dim, n, dim);
    });
    for (int64_t i = 0; i < dim; ++i) {
      double sum = 0.0;
      for (int64_t b = 0; b < nb; ++b) sum += partial[b * dim + i];
      dw[i] += static_cast<float>(sum);
    }
  }

  void embedding_backward(const int32_t* tokens, const float* dy, float* dtable, int64_t rows,
                          int64_t context, int64_t dim) override {
    // Serial in token order: rows that share a token add into the same table row.
    for (int64_t i = 0; i < rows * context; ++i) {
      float* dst = dtable + static_cast<int64_t>(tokens[i]) * dim;
      const float* src = dy + i * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
    }
  }

  void swiglu_ffn_train(const float* x, const float* w1, const float* w3, const float* w2, float* y,
                        float* h1, float* h3, int64_t rows, int64_t dim, int64_t hidden,
                        bool accumulate) override {
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned worker) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      ffn_rows_keep(x + r0 * dim, w1, w3, w2, y + r0 * dim, h1 + r0 * hidden, h3 + r0 * hidden, n,
                    dim, hidden, accumulate, worker);
    });
  }

  void swiglu_ffn_backward(const float* x, const float* w1, const float* w3, const float* w2,
                           const float* h1, const float* h3, const float* dy, float* dx,
                           bool dx_accumulate, float* dw1, float* dw3, float* dw2, int64_t rows,
                           int64_t dim, int64_t hidden) override {
    const size_t n = static_cast<size_t>(rows * hidden);
    std::vector<float> a(n), dh1(n), dh3(n);
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, m = std::min(kRowBlock, rows - r0);
      ffn_backward_rows(h1 + r0 * hidden, h3 + r0 * hidden, w2, dy + r0 * dim,
                        a.data() + r0 * hidden, dh1.data() + r0 * hidden, dh3.data() + r0 * hidden,
                        m, dim, hidden);
    });
    ffn_weight_grads(x, dy, a.data(), dh1.data(), dh3.data(), dw1, dw3, dw2, rows, dim, hidden);
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, m = std::min(kRowBlock, rows - r0);
      cpu::matmul_nn(dh1.data() + r0 * hidden, w1, dx + r0 * dim, m, dim, hidden, dx_accumulate);
      cpu::matmul_nn(dh3.data() + r0 * hidden, w3, dx + r0 * dim, m, dim, hidden, true);
    });
  }

  void grouped_swiglu_ffn_train(const DispatchPlan& plan, const float* x_perm, const float* w1,
                                const float* w3, const float* w2, float* y_perm, float* h1,
                                float* h3, int64_t dim, int64_t hidden) override {
    const auto items = row_items(plan);
    const int64_t per_expert = hidden * dim;
    pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i, unsigned worker) {
      const Item& it = items[static_cast<size_t>(i)];
      const int64_t off = it.expert * per_expert;
      ffn_rows_keep(x_perm + it.begin * dim, w1 + off, w3 + off, w2 + off, y_perm + it.begin * dim,
                    h1 + it.begin * hidden, h3 + it.begin * hidden, it.rows, dim, hidden, false,
                    worker);
    });
  }

  void grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm, const float* w1,
                                   const float* w3, const float* w2, const float* h1,
                                   const float* h3, const float* dy_perm, float* dx_perm,
                                   float* dw1, float* dw3, float* dw2, int64_t dim,
                                   int64_t hidden) override {
    const int64_t A = plan.num_assignments();
    const size_t n = static_cast<size_t>(A * hidden);
    std::vector<float> a(n), dh1(n), dh3(n);
    const auto items = row_items(plan);
    const int64_t per_expert = hidden * dim;
    pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i, unsigned) {
      const Item& it = items[static_cast<size_t>(i)];
      const int64_t o = it.begin * hidden;
      ffn_backward_rows(h1 + o, h3 + o, w2 + it.expert * per_expert, dy_perm + it.begin * dim,
                        a.data() + o, dh1.data() + o, dh3.data() + o, it.rows, dim, hidden);
    });
    // Weight gradients: one item per (expert, block of output rows), each reducing over all of
    // the expert's assignments.
    struct WItem {
      int64_t expert, which, begin, count;  // which: 0 = w2 rows (dim), 1 = w1/w3 rows (hidden)
    };
    std::vector<WItem> witems;
    const int64_t E = static_cast<int64_t>(plan.expert_offsets.size()) - 1;
    for (int64_t e = 0; e < E; ++e) {
      if (plan.count(e) == 0) continue;
      for (int64_t d = 0; d < dim; d += kRowBlock)
        witems.push_back({e, 0, d, std::min(kRowBlock, dim - d)});
      for (int64_t h = 0; h < hidden; h += kRowBlock)
        witems.push_back({e, 1, h, std::min(kRowBlock, hidden - h)});
    }
    pool_.parallel_for(static_cast<int64_t>(witems.size()), [&](int64_t i, unsigned) {
      const WItem& w = witems[static_cast<size_t>(i)];
      const int64_t a0 = plan.expert_offsets[w.expert], rows = plan.count(w.expert);
      const int64_t off = w.expert * per_expert;
      if (w.which == 0) {
        cpu::matmul_tn(dy_perm + a0 * dim + w.begin, dim, a.data() + a0 * hidden, hidden,
                       dw2 + off + w.begin * hidden, hidden, w.count, hidden, rows, true);
      } else {
        cpu::matmul_tn(dh1.data() + a0 * hidden + w.begin, hidden, x_perm + a0 * dim, dim,
                       dw1 + off + w.begin * dim, dim, w.count, dim, rows, true);
        cpu::matmul_tn(dh3.data() + a0 * hidden + w.begin, hidden, x_perm + a0 * dim, dim,
                       dw3 + off + w.begin * dim, dim, w.count, dim, rows, true);
      }
    });
    pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i, unsigned) {
      const Item& it = items[static_cast<size_t>(i)];
      const int64_t o = it.begin * hidden, off = it.expert * per_expert;
      cpu::matmul_nn(dh1.data() + o, w1 + off, dx_perm + it.begin * dim, it.rows, dim, hidden,
                     false);
      cpu::matmul_nn(dh3.data() + o, w3 + off, dx_perm + it.begin * dim, it.rows, dim, hidden,
                     true);
    });
  }

  void combine_backward(const DispatchPlan& plan, const float* y_perm, const float* dy,
                        float* dy_perm, float* dweight, int64_t dim) override {
    const int64_t A = plan.num_assignments();
    pool_.parallel_for(blocks(A, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t a0 = b * kRowBlock, n = std::min(kRowBlock, A - a0);
      for (int64_t a = a0; a < a0 + n; ++a) {
        const float* g = dy + plan.token[a] * dim;
        const float* yp = y_perm + a * dim;
        const float w = plan.weight[a];
        double dot = 0.0;
        for (int64_t d = 0; d < dim; ++d) {
          dy_perm[a * dim + d] = w * g[d];
          dot += static_cast<double>(g[d]) * yp[d];
        }
        dweight[a] = static_cast<float>(dot);
      }
    });
  }

  void dispatch_backward(const DispatchPlan& plan, const float* dx_perm, float* dx,
                         int64_t dim) override {
    pool_.parallel_for(blocks(plan.rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, plan.rows - r0);
      for (int64_t t = r0; t < r0 + n; ++t)
        for (int64_t j = plan.token_offsets[t]; j < plan.token_offsets[t + 1]; ++j) {
          const float* src = dx_perm + plan.token_assign[j] * dim;
          float* dst = dx + t * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
        }
    });
  }

  void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                       const DispatchPlan& plan, const float* dweight, const float* ds_extra,
                       float* dlogits, int64_t rows) override {
    const int64_t E = cfg.num_experts;
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned worker) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      auto& ds = scratch_[worker].f;
      ds.resize(static_cast<size_t>(E));
      for (int64_t t = r0; t < r0 + n; ++t) {
        const float* s = scores + t * E;
        if (ds_extra)
          std::copy(ds_extra + t * E, ds_extra + (t + 1) * E, ds.begin());
        else
          std::fill(ds.begin(), ds.end(), 0.0f);
        const int64_t j0 = plan.token_offsets[t], j1 = plan.token_offsets[t + 1];
        if (normalize) {
          // w_k = c s_k / (S + 1e-20), S = sum of the selected scores.
          double sum = 0.0, dot = 0.0;
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t a = plan.token_assign[j];
            sum += s[plan.expert[a]];
          }
          const float denom = static_cast<float>(sum) + 1e-20f;
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t a = plan.token_assign[j];
            dot += static_cast<double>(dweight[a]) * s[plan.expert[a]];
          }
          const double c = cfg.scaling;
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t a = plan.token_assign[j];
            ds[plan.expert[a]] += static_cast<float>(
                c * dweight[a] / denom - c * dot / (static_cast<double>(denom) * denom));
          }
        } else {
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t a = plan.token_assign[j];
            ds[plan.expert[a]] += cfg.scaling * dweight[a];
          }
        }
        cpu::scores_backward(cfg.score, s, ds.data(), dlogits + t * E, E);
      }
    });
  }

  double cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                       float* dlogits, float scale) override {
    const int64_t nb = blocks(rows, kRowBlock);
    std::vector<double> partial(static_cast<size_t>(nb), 0.0);
    pool_.parallel_for(nb, [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      double loss = 0.0;
      for (int64_t r = r0; r < r0 + n; ++r) {
        const float* z = logits + r * vocab;
        const float mx = *std::max_element(z, z + vocab);
        double sum = 0.0;
        for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(z[v] - mx));
        const double lse = mx + std::log(sum);
        loss += lse - z[targets[r]];
        if (dlogits) {
          float* g = dlogits + r * vocab;
          for (int64_t v = 0; v < vocab; ++v)
            g[v] = static_cast<float>(scale * std::exp(static_cast<double>(z[v]) - lse));
          g[targets[r]] -= scale;
        }
      }
      partial[static_cast<size_t>(b)] = loss;
    });
    double total = 0.0;
    for (double p : partial) total += p;
    return total;
  }

 private:
  struct Item {
    int64_t expert, begin, rows;
  };

  // Work items of a grouped expert pass: each expert's assignments cut into row blocks.
  static std::vector<Item> row_items(const DispatchPlan& plan) {
    std::vector<Item> items;
    const int64_t E = static_cast<int64_t>(plan.expert_offsets.size()) - 1;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t a = plan.expert_offsets[e]; a < plan.expert_offsets[e + 1]; a += kRowBlock)
        items.push_back({e, a, std::min(kRowBlock, plan.expert_offsets[e + 1] - a)});
    return items;
  }

  // SwiGLU FFN over a block of rows keeping h1 and h3 for backward.
  void ffn_rows_keep(const float* x, const float* w1, const float* w3, const float* w2, float* y,
                     float* h1, float* h3, int64_t rows, int64_t dim, int64_t hidden,
                     bool accumulate, unsigned worker) {
    auto& s = scratch_[worker].f;
    s.resize(static_cast<size_t>(rows * hidden));
    cpu::matmul_nt(x, w1, h1, rows, hidden, dim, false);
    cpu::matmul_nt(x, w3, h3, rows, hidden, dim, false);
    cpu::swiglu(h1, h3, s.data(), rows * hidden);
    cpu::matmul_nt(s.data(), w2, y, rows, dim, hidden, accumulate);
  }

  // First half of a SwiGLU backward over a block of rows: a = silu(h1) h3, dA = dy W2, and
  // dh1, dh3 from dA.
  static void ffn_backward_rows(const float* h1, const float* h3, const float* w2, const float* dy,
                                float* a, float* dh1, float* dh3, int64_t rows, int64_t dim,
                                int64_t hidden) {
    cpu::swiglu(h1, h3, a, rows * hidden);
    cpu::matmul_nn(dy, w2, dh1, rows, hidden, dim, false);
    cpu::swiglu_backward(h1, h3, dh1, dh1, dh3, rows * hidden);
  }

  // dw2 += dy^T a, dw1 += dh1^T x, dw3 += dh3^T x over all rows, split by output-row blocks.
  void ffn_weight_grads(const float* x, const float* dy, const float* a, const float* dh1,
                        const float* dh3, float* dw1, float* dw3, float* dw2, int64_t rows,
                        int64_t dim, int64_t hidden) {
    const int64_t nd = blocks(dim, kRowBlock), nh = blocks(hidden, kRowBlock);
    pool_.parallel_for(nd + nh, [&](int64_t i, unsigned) {
      if (i < nd) {
        const int64_t d0 = i * kRowBlock, n = std::min(kRowBlock, dim - d0);
        cpu::matmul_tn(dy + d0, dim, a, hidden, dw2 + d0 * hidden, hidden, n, hidden, rows, true);
      } else {
        const int64_t h0 = (i - nd) * kRowBlock, n = std::min(kRowBlock, hidden - h0);
        cpu::matmul_tn(dh1 + h0, hidden, x, dim, dw1 + h0 * dim, dim, n, dim, rows, true);
        cpu::matmul_tn(dh3 + h0, hidden, x, dim, dw3 + h0 * dim, dim, n, dim, rows, true);
      }
    });
  }

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
