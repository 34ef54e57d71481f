// The CPU backend: fp32, single-threaded BLAS calls spread over the session's threads. Work is cut
// into fixed-size items independent of the thread count, so results do not depend on it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <numeric>

#include "core/backend.h"
#include "core/error.h"
#include "kernels/cpu/math.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/router_rules.h"

namespace moert {
namespace {

constexpr int64_t kRowBlock = 64;

int64_t blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Fills the token-major view of a plan from its expert-major lists, and the offsets' copy.
void index_by_token(Allocator& mem, DispatchPlan& plan) {
  const int64_t A = plan.num_assignments();
  plan.expert_offsets.resize(mem, plan.host_offsets.size());
  std::copy(plan.host_offsets.begin(), plan.host_offsets.end(), plan.expert_offsets.data());
  plan.token_offsets.resize(mem, static_cast<size_t>(plan.rows + 1));
  int64_t* to = plan.token_offsets.data();
  std::fill(to, to + plan.rows + 1, 0);
  for (int64_t a = 0; a < A; ++a) ++to[plan.token.data()[a] + 1];
  for (int64_t t = 0; t < plan.rows; ++t) to[t + 1] += to[t];
  plan.token_assign.resize(mem, static_cast<size_t>(A));
  std::vector<int64_t> fill(to, to + plan.rows);
  for (int64_t a = 0; a < A; ++a)
    plan.token_assign.data()[fill[plan.token.data()[a]]++] = static_cast<int32_t>(a);
}

uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(unsigned threads) : pool_(threads), scratch_(threads) {}

  const char* name() const override { return "cpu"; }
  bool host_memory() const override { return true; }
  bool wants_bf16() const override { return false; }

  // ---- Memory

  void* allocate(size_t bytes) override {
    void* p = ::operator new (bytes, std::align_val_t{64}, std::nothrow);
    if (!p) fail(Code::OutOfMemory, "out of memory allocating ", bytes, " bytes");
    return p;
  }
  void deallocate(void* p) noexcept override { ::operator delete (p, std::align_val_t{64}); }
  void upload(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src) std::memmove(dst, src, bytes);
  }
  void zero(void* dst, size_t bytes) override {
    if (bytes) std::memset(dst, 0, bytes);
  }
  void to_bf16(const float* src, uint16_t* dst, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  }

  // ---- Forward

  void linear(const float* x, Weight weight, const float* bias, float* y, int64_t rows, int64_t in,
              int64_t out, bool accumulate) override {
    const float* w = weight.f32;
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

  void swiglu_ffn(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1, float* h3,
                  int64_t rows, int64_t dim, int64_t hidden, bool accumulate) override {
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned worker) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      ffn_rows(x + r0 * dim, w1.f32, w3.f32, w2.f32, y + r0 * dim, h1 ? h1 + r0 * hidden : nullptr,
               h3 ? h3 + r0 * hidden : nullptr, n, dim, hidden, accumulate, worker);
    });
  }

  void route_topk(const RouterConfig& cfg, const float* logits, const float* bias, int64_t rows,
                  float* scores, int32_t* experts, float* weights) override {
    const int64_t E = cfg.num_experts, K = cfg.top_k;
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned worker) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      auto& s = scratch_[worker];
      s.f.resize(static_cast<size_t>(rules::route_scratch_floats(cfg)));
      for (int64_t r = r0; r < r0 + n; ++r)
        rules::route_token(cfg, logits + r * E, bias, scores + r * E, experts + r * K,
                           weights + r * K, s.f.data());
    });
  }

  void route_expert_choice(const RouterConfig& cfg, const float* logits, int64_t rows,
                           int64_t capacity, float* scores, DispatchPlan& plan) override {
    const int64_t E = cfg.num_experts;
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      for (int64_t r = r0; r < r0 + n; ++r)
        rules::score_token(cfg.score, logits + r * E, scores + r * E, static_cast<int>(E));
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
    plan.host_offsets.assign(E + 1, 0);
    const size_t A = static_cast<size_t>(E * capacity);
    plan.token.resize(*this, A);
    plan.expert.resize(*this, A);
    plan.weight.resize(*this, A);
    size_t a = 0;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t t : chosen[static_cast<size_t>(e)]) {
        plan.token.data()[a] = static_cast<int32_t>(t);
        plan.expert.data()[a] = static_cast<int32_t>(e);
        plan.weight.data()[a] = scores[t * E + e] * cfg.scaling;
        ++a;
      }
      plan.host_offsets[e + 1] = static_cast<int64_t>(a);
    }
    index_by_token(*this, plan);
  }

  void plan_dispatch(const int32_t* experts, const float* weights, int64_t rows, int64_t top_k,
                     int64_t num_experts, DispatchPlan& plan) override {
    plan.rows = rows;
    auto& off = plan.host_offsets;
    off.assign(num_experts + 1, 0);
    const int64_t A = rows * top_k;
    for (int64_t a = 0; a < A; ++a) ++off[experts[a] + 1];
    for (int64_t e = 0; e < num_experts; ++e) off[e + 1] += off[e];
    plan.token.resize(*this, static_cast<size_t>(A));
    plan.expert.resize(*this, static_cast<size_t>(A));
    plan.weight.resize(*this, static_cast<size_t>(A));
    std::vector<int64_t> fill(off.begin(), off.end() - 1);
    for (int64_t a = 0; a < A; ++a) {
      const int64_t slot = fill[experts[a]]++;
      plan.token.data()[slot] = static_cast<int32_t>(a / top_k);
      plan.expert.data()[slot] = experts[a];
      plan.weight.data()[slot] = weights[a];
    }
    index_by_token(*this, plan);
  }

  void dispatch(const DispatchPlan& plan, const float* x, float* x_perm, int64_t dim) override {
    const int64_t A = plan.num_assignments();
    const int32_t* token = plan.token.data();
    pool_.parallel_for(blocks(A, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t a0 = b * kRowBlock, n = std::min(kRowBlock, A - a0);
      for (int64_t a = a0; a < a0 + n; ++a)
        std::memcpy(x_perm + a * dim, x + static_cast<int64_t>(token[a]) * dim,
                    sizeof(float) * static_cast<size_t>(dim));
    });
  }

  void grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, Weight w1, Weight w3,
                          Weight w2, float* y_perm, float* h1, float* h3, int64_t dim,
                          int64_t hidden) override {
    const auto items = row_items(plan);
    const int64_t per_expert = hidden * dim;
    pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i, unsigned worker) {
      const Item& it = items[static_cast<size_t>(i)];
      const int64_t off = it.expert * per_expert;
      ffn_rows(x_perm + it.begin * dim, w1.f32 + off, w3.f32 + off, w2.f32 + off,
               y_perm + it.begin * dim, h1 ? h1 + it.begin * hidden : nullptr,
               h3 ? h3 + it.begin * hidden : nullptr, it.rows, dim, hidden, false, worker);
    });
  }

  void combine(const DispatchPlan& plan, const float* y_perm, float* y, int64_t dim) override {
    const int64_t* to = plan.token_offsets.data();
    const int32_t* ta = plan.token_assign.data();
    const float* weight = plan.weight.data();
    pool_.parallel_for(blocks(plan.rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, plan.rows - r0);
      for (int64_t t = r0; t < r0 + n; ++t)
        for (int64_t j = to[t]; j < to[t + 1]; ++j) {
          const int64_t a = ta[j];
          const float w = weight[a];
          const float* src = y_perm + a * dim;
          float* dst = y + t * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] += w * src[d];
        }
    });
  }

  // ---- Training

  void linear_backward(const float* x, Weight weight, const float* dy, float* dx,
                       bool dx_accumulate, float* dw, float* db, int64_t rows, int64_t in,
                       int64_t out) override {
    const float* w = weight.f32;
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
                          int64_t context, int64_t dim, int64_t) override {
    // Serial in token order: rows that share a token add into the same table row.
    for (int64_t i = 0; i < rows * context; ++i) {
      float* dst = dtable + static_cast<int64_t>(tokens[i]) * dim;
      const float* src = dy + i * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
    }
  }

  void swiglu_ffn_backward(const float* x, Weight w1, Weight w3, Weight w2, const float* h1,
                           const float* h3, const float* dy, float* dx, bool dx_accumulate,
                           float* dw1, float* dw3, float* dw2, int64_t rows, int64_t dim,
                           int64_t hidden) override {
    const size_t n = static_cast<size_t>(rows * hidden);
    std::vector<float> a(n), dh1(n), dh3(n);
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, m = std::min(kRowBlock, rows - r0);
      ffn_backward_rows(h1 + r0 * hidden, h3 + r0 * hidden, w2.f32, dy + r0 * dim,
                        a.data() + r0 * hidden, dh1.data() + r0 * hidden, dh3.data() + r0 * hidden,
                        m, dim, hidden);
    });
    ffn_weight_grads(x, dy, a.data(), dh1.data(), dh3.data(), dw1, dw3, dw2, rows, dim, hidden);
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, m = std::min(kRowBlock, rows - r0);
      cpu::matmul_nn(dh1.data() + r0 * hidden, w1.f32, dx + r0 * dim, m, dim, hidden,
                     dx_accumulate);
      cpu::matmul_nn(dh3.data() + r0 * hidden, w3.f32, dx + r0 * dim, m, dim, hidden, true);
    });
  }

  void grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm, Weight w1,
                                   Weight w3, Weight w2, const float* h1, const float* h3,
                                   const float* dy_perm, float* dx_perm, float* dw1, float* dw3,
                                   float* dw2, int64_t dim, int64_t hidden) override {
    const int64_t A = plan.num_assignments();
    const size_t n = static_cast<size_t>(A * hidden);
    std::vector<float> a(n), dh1(n), dh3(n);
    const auto items = row_items(plan);
    const int64_t per_expert = hidden * dim;
    pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i, unsigned) {
      const Item& it = items[static_cast<size_t>(i)];
      const int64_t o = it.begin * hidden;
      ffn_backward_rows(h1 + o, h3 + o, w2.f32 + it.expert * per_expert, dy_perm + it.begin * dim,
                        a.data() + o, dh1.data() + o, dh3.data() + o, it.rows, dim, hidden);
    });
    // Weight gradients: one item per (expert, block of output rows), each reducing over all of
    // the expert's assignments.
    struct WItem {
      int64_t expert, which, begin, count;  // which: 0 = w2 rows (dim), 1 = w1/w3 rows (hidden)
    };
    std::vector<WItem> witems;
    const int64_t E = static_cast<int64_t>(plan.host_offsets.size()) - 1;
    for (int64_t e = 0; e < E; ++e) {
      if (plan.count(e) == 0) continue;
      for (int64_t d = 0; d < dim; d += kRowBlock)
        witems.push_back({e, 0, d, std::min(kRowBlock, dim - d)});
      for (int64_t h = 0; h < hidden; h += kRowBlock)
        witems.push_back({e, 1, h, std::min(kRowBlock, hidden - h)});
    }
    pool_.parallel_for(static_cast<int64_t>(witems.size()), [&](int64_t i, unsigned) {
      const WItem& w = witems[static_cast<size_t>(i)];
      const int64_t a0 = plan.host_offsets[w.expert], rows = plan.count(w.expert);
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
      cpu::matmul_nn(dh1.data() + o, w1.f32 + off, dx_perm + it.begin * dim, it.rows, dim, hidden,
                     false);
      cpu::matmul_nn(dh3.data() + o, w3.f32 + off, dx_perm + it.begin * dim, it.rows, dim, hidden,
                     true);
    });
  }

  void combine_backward(const DispatchPlan& plan, const float* y_perm, const float* dy,
                        float* dy_perm, float* dweight, int64_t dim) override {
    const int64_t A = plan.num_assignments();
    const int32_t* token = plan.token.data();
    const float* weight = plan.weight.data();
    pool_.parallel_for(blocks(A, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t a0 = b * kRowBlock, n = std::min(kRowBlock, A - a0);
      for (int64_t a = a0; a < a0 + n; ++a) {
        const float* g = dy + static_cast<int64_t>(token[a]) * dim;
        const float* yp = y_perm + a * dim;
        const float w = weight[a];
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
    const int64_t* to = plan.token_offsets.data();
    const int32_t* ta = plan.token_assign.data();
    pool_.parallel_for(blocks(plan.rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, plan.rows - r0);
      for (int64_t t = r0; t < r0 + n; ++t)
        for (int64_t j = to[t]; j < to[t + 1]; ++j) {
          const float* src = dx_perm + static_cast<int64_t>(ta[j]) * dim;
          float* dst = dx + t * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
        }
    });
  }

  void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                       const DispatchPlan& plan, const float* dweight, const float* ds_extra,
                       float* dlogits, int64_t rows) override {
    const int64_t E = cfg.num_experts;
    const int64_t* to = plan.token_offsets.data();
    const int32_t* ta = plan.token_assign.data();
    const int32_t* expert = plan.expert.data();
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned worker) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      auto& ds = scratch_[worker].f;
      ds.resize(static_cast<size_t>(E));
      for (int64_t t = r0; t < r0 + n; ++t)
        rules::router_backward_token(cfg, normalize, scores + t * E, to[t], to[t + 1], ta, expert,
                                     dweight, ds_extra ? ds_extra + t * E : nullptr, ds.data(),
                                     dlogits + t * E);
    });
  }

  void aux_partials(const RouterConfig& cfg, const float* scores, const DispatchPlan& plan,
                    const int64_t* chunk_offsets, int64_t chunks, int64_t* counts,
                    double* psum) override {
    const int E = static_cast<int>(cfg.num_experts);
    const int64_t rows = chunks > 0 ? chunk_offsets[chunks] : 0;
    std::vector<double> z(static_cast<size_t>(rows));
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      for (int64_t t = r0; t < r0 + n; ++t) z[t] = rules::score_sum(scores + t * E, E);
    });
    pool_.parallel_for(chunks, [&](int64_t c, unsigned) {
      const int64_t t0 = chunk_offsets[c], t1 = chunk_offsets[c + 1];
      for (int e = 0; e < E; ++e) {
        counts[c * E + e] =
            rules::expert_tokens_in(plan.expert_offsets.data(), plan.token.data(), e, t0, t1);
        psum[c * E + e] = rules::aux_psum(scores, z.data(), t0, t1, e, E);
      }
    });
  }

  void aux_grad(const RouterConfig& cfg, const float* scores, int64_t rows,
                const int64_t* seq_offsets, int64_t num_seq, const double* coef,
                float* ds) override {
    const int E = static_cast<int>(cfg.num_experts);
    pool_.parallel_for(blocks(rows, kRowBlock), [&](int64_t b, unsigned) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      for (int64_t t = r0; t < r0 + n; ++t) {
        const float* s = scores + t * E;
        const int64_t q = rules::sequence_of(seq_offsets, num_seq, t);
        if (q < 0)
          std::fill(ds + t * E, ds + (t + 1) * E, 0.0f);
        else
          rules::aux_grad_token(s, rules::score_sum(s, E), coef + q * E, E, ds + t * E);
      }
    });
  }

  int64_t find_nonfinite(const float* x, int64_t n) override {
    constexpr int64_t kBlock = 1 << 16;
    const int64_t nb = blocks(n, kBlock);
    std::vector<int64_t> first(static_cast<size_t>(nb), -1);
    pool_.parallel_for(nb, [&](int64_t b, unsigned) {
      const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
      for (int64_t i = i0; i < i1; ++i)
        if (!std::isfinite(x[i])) {
          first[static_cast<size_t>(b)] = i;
          return;
        }
    });
    for (int64_t f : first)
      if (f >= 0) return f;
    return -1;
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
        if (targets[r] < 0) {
          if (dlogits) std::fill(dlogits + r * vocab, dlogits + (r + 1) * vocab, 0.0f);
          continue;
        }
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

  // ---- Optimizer

  double sum_squares(const float* x, int64_t n) override {
    double sq = 0.0;
    for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(x[i]) * x[i];
    return sq;
  }

  void adamw(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
             double beta2, double eps, double wd, double gscale, double bc1, double bc2) override {
    for (int64_t i = 0; i < n; ++i) {
      const double gi = g[i] * gscale;
      const double mi = beta1 * m[i] + (1.0 - beta1) * gi;
      const double vi = beta2 * v[i] + (1.0 - beta2) * gi * gi;
      m[i] = static_cast<float>(mi);
      v[i] = static_cast<float>(vi);
      const double update = (mi / bc1) / (std::sqrt(vi / bc2) + eps) + wd * p[i];
      p[i] = static_cast<float>(p[i] - lr * update);
    }
  }

  void sgd(float* p, const float* g, float* m, int64_t n, double lr, double momentum, double wd,
           double gscale) override {
    for (int64_t i = 0; i < n; ++i) {
      const double gi = g[i] * gscale + wd * p[i];
      const double buf = momentum * m[i] + gi;
      m[i] = static_cast<float>(buf);
      p[i] = static_cast<float>(p[i] - lr * buf);
    }
  }

 private:
  struct Item {
    int64_t expert, begin, rows;
  };

  // Work items of a grouped expert pass: each expert's assignments cut into row blocks.
  static std::vector<Item> row_items(const DispatchPlan& plan) {
    std::vector<Item> items;
    const auto& off = plan.host_offsets;
    const int64_t E = static_cast<int64_t>(off.size()) - 1;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t a = off[e]; a < off[e + 1]; a += kRowBlock)
        items.push_back({e, a, std::min(kRowBlock, off[e + 1] - a)});
    return items;
  }

  // SwiGLU FFN over a block of rows; keeps h1 and h3 when given, else uses the worker's scratch.
  void ffn_rows(const float* x, const float* w1, const float* w3, const float* w2, float* y,
                float* h1, float* h3, int64_t rows, int64_t dim, int64_t hidden, bool accumulate,
                unsigned worker) {
    auto& s = scratch_[worker].f;
    const bool keep = h1 != nullptr;
    s.resize(static_cast<size_t>((keep ? 1 : 3) * rows * hidden));
    float* a = s.data();
    if (!keep) {
      h1 = a + rows * hidden;
      h3 = h1 + rows * hidden;
    }
    cpu::matmul_nt(x, w1, h1, rows, hidden, dim, false);
    cpu::matmul_nt(x, w3, h3, rows, hidden, dim, false);
    cpu::swiglu(h1, h3, a, rows * hidden);
    cpu::matmul_nt(a, w2, y, rows, dim, hidden, accumulate);
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
  };

  cpu::ThreadPool pool_;
  std::vector<Scratch> scratch_;  // one per worker
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(unsigned threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace moert
