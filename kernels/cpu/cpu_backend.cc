#include "kernels/cpu/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <new>
#include <numeric>

#include "core/error.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/large_alloc.h"
#include "kernels/cpu/math.h"
#include "kernels/cpu/optimizer.h"
#include "kernels/router_rules.h"

namespace moert::cpu {
namespace {

int64_t blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

constexpr int64_t kElementBlock = int64_t{1} << 15;
// Rows a combine (or its backward) adds into one token's row per pass over it: a top-K's.
constexpr int kRowsAtOnce = 16;

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

}  // namespace

CpuBackend::CpuBackend(unsigned threads, Precision experts, Fp8Options fp8, LayoutCopies layouts)
    : bf16_(experts == Precision::Bf16),
      transposed_(layouts == LayoutCopies::On || (layouts == LayoutCopies::Auto && avx512_gemms())),
      packed_(layouts != LayoutCopies::Off && Bf16Gemm::default_kernels() == Bf16Kernels::Dnnl),
      precision_(experts),
      fp8_(fp8),
      pool_(threads),
      bf16_gemm_(pool_.size(), Bf16Gemm::default_kernels()),
      reducer_(pool_),
      scratch_(pool_.size()),
      direct_below_(avx512_gemms() ? INT64_MAX : kDirectBelow) {
  // On the pool, whose threads (the caller's included) keep oneDNN serial.
  pool_.parallel_for(1, [](int64_t, unsigned) { warm_up_sgemm(); });
}

// ---- Memory

size_t CpuBackend::work_bytes() const {
  size_t n = held_bytes(t_x_, t_dy_, t_a_, t_dh1_, t_dh3_, t_lin_x_, t_lin_dy_, t_fp8_scales_, t_w_,
                        cut_, cut_x_, src_bf16_);
  for (const Scratch& s : scratch_)
    n += s.f.capacity() * sizeof(float) + s.bytes.capacity() + s.quant.capacity() * sizeof(float);
  return n;
}

void CpuBackend::release_work() {
  clear_buffers(t_x_, t_dy_, t_a_, t_dh1_, t_dh3_, t_lin_x_, t_lin_dy_, t_fp8_scales_, t_w_, cut_,
                cut_x_, src_bf16_);
  for (Scratch& s : scratch_) s = Scratch();
}

// Large buffers are mapped, not taken from malloc (large_alloc.h).
void* CpuBackend::allocate(size_t bytes) {
  void* p = large_alloc(bytes);
  if (!p) fail(Code::OutOfMemory, "out of memory allocating ", bytes, " bytes");
  return p;
}

void CpuBackend::deallocate(void* p, size_t bytes) noexcept { large_free(p, bytes); }

namespace {

// Copies and fills of a pass's activations (the residual, inputs, outputs) are split over the
// threads: one core alone does not reach the memory's bandwidth, and from a few hundred KiB on
// (a small model's residual: 512 rows of 128 floats) one core copying while the others wait
// costs more than handing out the pieces.
constexpr size_t kCopyBlock = size_t{128} << 10;

// rows(t, a, k) for every token t of the plan, a its assignments (token_assign's) in order, up to
// kRowsAtOnce of them per call: the rows a combine, or its backward, adds into token t's row in
// one pass over it. On the pool's threads, in fixed blocks of tokens.
template <typename F>
void by_token_rows(ThreadPool& pool, const DispatchPlan& plan, F&& rows) {
  const int64_t* to = plan.token_offsets.data();
  const int32_t* ta = plan.token_assign.data();
  pool.parallel_for(blocks(plan.rows, kReduceRows), [&](int64_t b, unsigned) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, plan.rows - r0);
    for (int64_t t = r0; t < r0 + n; ++t)
      for (int64_t j = to[t]; j < to[t + 1]; j += kRowsAtOnce)
        rows(t, ta + j, static_cast<int>(std::min<int64_t>(kRowsAtOnce, to[t + 1] - j)));
  });
}

// piece(offset, length) over [0, bytes) in kCopyBlock pieces, on the pool's threads.
template <typename F>
void in_pieces(ThreadPool& pool, size_t bytes, F&& piece) {
  pool.parallel_for(static_cast<int64_t>((bytes + kCopyBlock - 1) / kCopyBlock),
                    [&](int64_t b, unsigned) {
                      const size_t at = static_cast<size_t>(b) * kCopyBlock;
                      piece(at, std::min(kCopyBlock, bytes - at));
                    });
}

}  // namespace

void CpuBackend::copy(void* dst, const void* src, size_t bytes) {
  if (!bytes || dst == src) return;
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  if (bytes < 2 * kCopyBlock || (d < s + bytes && s < d + bytes)) {
    std::memmove(dst, src, bytes);  // small, or overlapping
    return;
  }
  in_pieces(pool_, bytes, [&](size_t at, size_t n) { std::memcpy(d + at, s + at, n); });
}

void CpuBackend::zero(void* dst, size_t bytes) {
  if (bytes < 2 * kCopyBlock) {
    if (bytes) std::memset(dst, 0, bytes);
    return;
  }
  zero_many(&dst, &bytes, 1);
}

void CpuBackend::zero_many(void* const* dsts, const size_t* bytes, size_t count) {
  std::vector<std::pair<size_t, size_t>> pieces;  // (array, offset)
  for (size_t a = 0; a < count; ++a)
    for (size_t at = 0; at < bytes[a]; at += kCopyBlock) pieces.push_back({a, at});
  pool_.parallel_for(static_cast<int64_t>(pieces.size()), [&](int64_t k, unsigned) {
    const auto [a, at] = pieces[static_cast<size_t>(k)];
    std::memset(static_cast<unsigned char*>(dsts[a]) + at, 0, std::min(kCopyBlock, bytes[a] - at));
  });
}

void CpuBackend::transpose_matrices(const float* src, int64_t matrices, int64_t rows, int64_t cols,
                                    float* dst) {
  // Column blocks of 64, each read along its rows and written as 64 contiguous rows.
  constexpr int64_t kCols = 64;
  const int64_t per = rows * cols, nb = blocks(cols, kCols);
  pool_.parallel_for(matrices * nb, [&](int64_t i, unsigned) {
    const int64_t mtx = i / nb, c0 = (i % nb) * kCols;
    transpose(src + mtx * per + c0, cols, rows, std::min(kCols, cols - c0),
              dst + mtx * per + c0 * rows, rows);
  });
}

int64_t CpuBackend::packed_bf16_bytes(int64_t rows, int64_t cols) {
  if (!packed_ || rows <= 0 || cols <= 0) return 0;
  const int64_t block = pack_rows(rows), full = rows / block, rest = rows % block;
  return full * static_cast<int64_t>(bf16_gemm_.packed_bytes(block, cols)) +
         (rest ? static_cast<int64_t>(bf16_gemm_.packed_bytes(rest, cols)) : 0);
}

void CpuBackend::pack_bf16(const uint16_t* src, int64_t matrices, int64_t rows, int64_t cols,
                           void* dst) {
  const int64_t per = packed_bf16_bytes(rows, cols), rb = pack_rows(rows), nb = blocks(rows, rb);
  if (per == 0) fail(Code::Internal, "the CPU backend keeps no packed bf16 weights here");
  const auto block = static_cast<int64_t>(bf16_gemm_.packed_bytes(rb, cols));
  pool_.parallel_for(matrices * nb, [&](int64_t i, unsigned worker) {
    const int64_t mtx = i / nb, b = i % nb, r0 = b * rb;
    bf16_gemm_.pack(src + mtx * rows * cols + r0 * cols, cols, std::min(rb, rows - r0), cols,
                    static_cast<unsigned char*>(dst) + mtx * per + b * block, worker);
  });
}

void CpuBackend::packed_nt(const void* a, int64_t lda, const unsigned char* w, int64_t rows,
                           float* c, int64_t ldc, int64_t m, int64_t c0, int64_t n, int64_t k,
                           bool accumulate, unsigned worker) {
  const int64_t rb = pack_rows(rows);
  if (c0 % rb != 0 || (c0 + n != rows && (c0 + n) % rb != 0))
    fail(Code::Internal, "columns [", c0, ", ", c0 + n, ") of a packed weight of ", rows,
         " rows are not whole blocks of ", rb);
  const auto block = static_cast<int64_t>(bf16_gemm_.packed_bytes(rb, k));
  for (int64_t j = 0; j < n; j += rb)
    bf16_gemm_.act_packed_nt(a, lda, w + (c0 + j) / rb * block, c + j, ldc, m, std::min(rb, n - j),
                             k, accumulate, worker);
}

void CpuBackend::to_bf16(const float* src, uint16_t* dst, int64_t n) {
  constexpr int64_t kBlock = int64_t{1} << 16;
  pool_.parallel_for(blocks(n, kBlock), [&](int64_t b, unsigned) {
    const int64_t i = b * kBlock, m = std::min(kBlock, n - i);
    round_to_bf16(src + i, m, 1, m, dst + i, m, false, false);
    // Saturation: only a finite source rounds to an infinite code (0x7F80 with the sign bit).
    for (int64_t j = i; j < i + m; ++j)
      if ((dst[j] & 0x7FFFu) == 0x7F80u && std::isfinite(src[j]))
        dst[j] = static_cast<uint16_t>((dst[j] & 0x8000u) | 0x7F7Fu);
  });
}

void CpuBackend::add(float* dst, const float* src, int64_t n) {
  constexpr int64_t kBlock = int64_t{1} << 16;
  pool_.parallel_for(blocks(n, kBlock), [&](int64_t b, unsigned) {
    const int64_t i = b * kBlock;
    add_into(dst + i, src + i, std::min(kBlock, n - i));
  });
}

// ---- Forward

void CpuBackend::rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows,
                         int64_t dim, float eps) {
  pool_.parallel_for(blocks(rows, kReduceRows), [&](int64_t b, unsigned) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, rows - r0);
    cpu::rmsnorm(x + r0 * dim, w, y + r0 * dim, inv_rms ? inv_rms + r0 : nullptr, n, dim, eps);
  });
}

void CpuBackend::embedding(const int32_t* tokens, const float* table, float* y, int64_t rows,
                           int64_t context, int64_t dim) {
  pool_.parallel_for(blocks(rows, kReduceRows), [&](int64_t b, unsigned) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, rows - r0);
    for (int64_t r = r0; r < r0 + n; ++r)
      for (int64_t c = 0; c < context; ++c)
        std::memcpy(y + (r * context + c) * dim, table + tokens[r * context + c] * dim,
                    sizeof(float) * static_cast<size_t>(dim));
  });
}

void CpuBackend::route_topk(const RouterConfig& cfg, const float* logits, const float* bias,
                            int64_t rows, float* scores, int32_t* experts, float* weights) {
  const int64_t E = cfg.num_experts, K = cfg.top_k;
  pool_.parallel_for(blocks(rows, kReduceRows), [&](int64_t b, unsigned worker) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, rows - r0);
    auto& s = scratch_[worker];
    s.f.resize(static_cast<size_t>(rules::route_scratch_floats(cfg)));
    for (int64_t r = r0; r < r0 + n; ++r)
      rules::route_token(cfg, logits + r * E, bias, scores + r * E, experts + r * K,
                         weights + r * K, s.f.data());
  });
}

void CpuBackend::route_expert_choice(const RouterConfig& cfg, const float* logits, int64_t rows,
                                     int64_t capacity, float* scores, DispatchPlan& plan,
                                     int64_t first, int64_t plan_rows) {
  const int64_t E = cfg.num_experts;
  pool_.parallel_for(blocks(rows, kReduceRows), [&](int64_t b, unsigned) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, rows - r0);
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
  plan.rows = plan_rows;
  plan.host_offsets.assign(E + 1, 0);
  size_t A = 0;
  for (auto& c : chosen) {
    std::erase_if(c, [&](int64_t t) { return t < first || t >= first + plan_rows; });
    A += c.size();
  }
  plan.token.resize(*this, A);
  plan.expert.resize(*this, A);
  plan.weight.resize(*this, A);
  size_t a = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t : chosen[static_cast<size_t>(e)]) {
      plan.token.data()[a] = static_cast<int32_t>(t - first);
      plan.expert.data()[a] = static_cast<int32_t>(e);
      plan.weight.data()[a] = scores[t * E + e] * cfg.scaling;
      ++a;
    }
    plan.host_offsets[e + 1] = static_cast<int64_t>(a);
  }
  index_by_token(*this, plan);
}

void CpuBackend::plan_dispatch(const int32_t* experts, const float* weights, int64_t rows,
                               int64_t top_k, int64_t num_experts, DispatchPlan& plan) {
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

void CpuBackend::dispatch(const DispatchPlan& plan, const float* x, float* x_perm, int64_t dim) {
  const int64_t A = plan.num_assignments();
  const int32_t* token = plan.token.data();
  pool_.parallel_for(blocks(A, kReduceRows), [&](int64_t b, unsigned) {
    const int64_t a0 = b * kReduceRows, n = std::min(kReduceRows, A - a0);
    for (int64_t a = a0; a < a0 + n; ++a)
      std::memcpy(x_perm + a * dim, x + static_cast<int64_t>(token[a]) * dim,
                  sizeof(float) * static_cast<size_t>(dim));
  });
}

void CpuBackend::combine(const DispatchPlan& plan, const float* y_perm, float* y, int64_t dim) {
  const float* weight = plan.weight.data();
  by_token_rows(pool_, plan, [&](int64_t t, const int32_t* a, int k) {
    float w[kRowsAtOnce];
    const float* rows[kRowsAtOnce];
    for (int i = 0; i < k; ++i) {
      w[i] = weight[a[i]];
      rows[i] = y_perm + static_cast<int64_t>(a[i]) * dim;
    }
    axpy_rows(y + t * dim, w, rows, k, dim);
  });
}

void CpuBackend::combine_backward(const DispatchPlan& plan, const float* y_perm, const float* dy,
                                  float* dy_perm, float* dweight, int64_t dim, int64_t ld) {
  const int64_t A = plan.num_assignments();
  const int32_t* token = plan.token.data();
  const float* weight = plan.weight.data();
  if (!dy_perm && !dweight) return;
  pool_.parallel_for(blocks(A, kReduceRows), [&](int64_t b, unsigned worker) {
    const int64_t a0 = b * kReduceRows, n = std::min(kReduceRows, A - a0);
    // Without dy_perm, each row's scaled copy goes to a row of the worker's (in L1), so that
    // dweight is scale_and_dot's, bit for bit; without dweight, only the scaling runs.
    auto& row = scratch_[worker].f;
    if (!dy_perm) row.resize(static_cast<size_t>(dim));
    for (int64_t a = a0; a < a0 + n; ++a) {
      const float* g = dy + static_cast<int64_t>(token[a]) * dim;
      if (!dweight) {
        // The gate weight in a register: `out` could alias `weight` as far as the compiler knows.
        const float w = weight[a];
        float* out = dy_perm + a * ld;
        for (int64_t i = 0; i < dim; ++i) out[i] = w * g[i];
        continue;
      }
      float* out = dy_perm ? dy_perm + a * ld : row.data();
      dweight[a] = static_cast<float>(scale_and_dot(out, weight[a], g, y_perm + a * dim, dim));
    }
  });
}

void CpuBackend::dispatch_backward(const DispatchPlan& plan, const float* dx_perm, float* dx,
                                   int64_t dim) {
  by_token_rows(pool_, plan, [&](int64_t t, const int32_t* a, int k) {
    const float* rows[kRowsAtOnce];
    for (int i = 0; i < k; ++i) rows[i] = dx_perm + static_cast<int64_t>(a[i]) * dim;
    add_rows(dx + t * dim, rows, k, dim);
  });
}

void CpuBackend::router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                                 const DispatchPlan& plan, const float* dweight,
                                 const float* ds_extra, float* dlogits, int64_t rows) {
  const int64_t E = cfg.num_experts;
  const int64_t* to = plan.token_offsets.data();
  const int32_t* ta = plan.token_assign.data();
  const int32_t* expert = plan.expert.data();
  pool_.parallel_for(blocks(rows, kReduceRows), [&](int64_t b, unsigned worker) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, rows - r0);
    auto& ds = scratch_[worker].f;
    ds.resize(static_cast<size_t>(E));
    for (int64_t t = r0; t < r0 + n; ++t)
      rules::router_backward_token(cfg, normalize, scores + t * E, to[t], to[t + 1], ta, expert,
                                   dweight, ds_extra ? ds_extra + t * E : nullptr, ds.data(),
                                   dlogits + t * E);
  });
}

void CpuBackend::aux_partials(const RouterConfig& cfg, const float* scores,
                              const DispatchPlan& plan, const int64_t* chunk_offsets,
                              int64_t chunks, int64_t* counts, double* psum) {
  const int E = static_cast<int>(cfg.num_experts);
  const int64_t rows = chunks > 0 ? chunk_offsets[chunks] : 0;
  std::vector<double> z(static_cast<size_t>(rows));
  pool_.parallel_for(blocks(rows, kReduceRows), [&](int64_t b, unsigned) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, rows - r0);
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

void CpuBackend::aux_grad(const RouterConfig& cfg, const float* scores, int64_t rows,
                          const int64_t* seq_offsets, int64_t num_seq, const double* coef,
                          float* ds) {
  const int E = static_cast<int>(cfg.num_experts);
  pool_.parallel_for(blocks(rows, kReduceRows), [&](int64_t b, unsigned) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, rows - r0);
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

int64_t CpuBackend::find_nonfinite(const float* x, int64_t n) {
  constexpr int64_t kBlock = 1 << 16;
  const int64_t nb = blocks(n, kBlock);
  std::vector<int64_t> first(static_cast<size_t>(nb), -1);
  pool_.parallel_for(nb, [&](int64_t b, unsigned) {
    const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
    const int64_t at = first_nonfinite(x + i0, i1 - i0);
    if (at >= 0) first[static_cast<size_t>(b)] = i0 + at;
  });
  for (int64_t f : first)
    if (f >= 0) return f;
  return -1;
}

// ---- Training: the reductions that are not GEMMs

void CpuBackend::rmsnorm_backward(const float* x, const float* w, const float* inv_rms,
                                  const float* dy, float* dx, const GradOut& dw, int64_t rows,
                                  int64_t dim) {
  const int64_t J = reduce_chunks(rows);
  std::vector<float> partial(static_cast<size_t>(J * dim));
  pool_.parallel_for(J, [&](int64_t j, unsigned worker) {
    const int64_t r0 = j * kReduceRows, n = chunk_rows(rows, j);
    auto& sum = scratch_[worker].bytes;
    sum.assign(static_cast<size_t>(dim) * sizeof(double), 0);
    double* s = reinterpret_cast<double*>(sum.data());
    cpu::rmsnorm_backward(x + r0 * dim, w, inv_rms + r0, dy + r0 * dim, dx + r0 * dim, s, n, dim);
    for (int64_t i = 0; i < dim; ++i) partial[j * dim + i] = static_cast<float>(s[i]);
  });
  reduce_partials(*this, partial.data(), J, dim, dw);
}

void CpuBackend::embedding_backward(const int32_t* tokens, const float* dy, const GradOut& dtable,
                                    int64_t rows, int64_t context, int64_t dim, int64_t) {
  const int64_t J = reduce_chunks(rows);
  std::vector<SparsePartial> partials(static_cast<size_t>(J));
  pool_.parallel_for(J, [&](int64_t j, unsigned) {
    // The chunk's token positions, stably sorted by token: each table row then sums its slices
    // of dy in position order, from zero.
    const int64_t p0 = j * kReduceRows * context, np = chunk_rows(rows, j) * context;
    std::vector<int64_t> pos(static_cast<size_t>(np));
    std::iota(pos.begin(), pos.end(), p0);
    std::stable_sort(pos.begin(), pos.end(),
                     [&](int64_t a, int64_t b) { return tokens[a] < tokens[b]; });
    SparsePartial& p = partials[static_cast<size_t>(j)];
    for (size_t k = 0; k < pos.size(); ++k) {
      const int32_t t = tokens[pos[k]];
      if (p.rows.empty() || p.rows.back() != t) {
        p.rows.push_back(t);
        p.values.resize(p.values.size() + static_cast<size_t>(dim), 0.0f);
      }
      float* dst = p.values.data() + (p.rows.size() - 1) * static_cast<size_t>(dim);
      add_into(dst, dy + pos[k] * dim, dim);
    }
  });
  reduce_sparse(*this, partials, dim, dtable);
}

void CpuBackend::cross_entropy(const float* logits, const int32_t* targets, int64_t rows,
                               int64_t vocab, float* dlogits, float scale,
                               std::vector<double>& chunk_loss) {
  const int64_t J = reduce_chunks(rows);
  chunk_loss.assign(static_cast<size_t>(J), 0.0);
  pool_.parallel_for(J, [&](int64_t j, unsigned worker) {
    const int64_t r0 = j * kReduceRows, n = chunk_rows(rows, j);
    double loss = 0.0;
    for (int64_t r = r0; r < r0 + n; ++r) {
      const float* z = logits + r * vocab;
      if (targets[r] < 0) {  // an ignored target: no loss, no gradient
        if (dlogits) std::fill(dlogits + r * vocab, dlogits + (r + 1) * vocab, 0.0f);
        continue;
      }
      const float mx = *std::max_element(z, z + vocab);
      // e^(z - max) once per logit, kept for the gradient (softmax = e / sum).
      auto& e = scratch_[worker].bytes;
      e.resize(static_cast<size_t>(vocab) * sizeof(double));
      double* ev = reinterpret_cast<double*>(e.data());
      softmax_exp(z, mx, ev, vocab);
      double sum = 0.0;
      for (int64_t v = 0; v < vocab; ++v) sum += ev[v];
      loss += mx + std::log(sum) - z[targets[r]];
      if (dlogits) {
        float* g = dlogits + r * vocab;
        const double s = scale / sum;
        for (int64_t v = 0; v < vocab; ++v) g[v] = static_cast<float>(s * ev[v]);
        g[targets[r]] -= scale;
      }
    }
    chunk_loss[static_cast<size_t>(j)] = loss;
  });
}

// ---- Optimizer

// Elementwise work is cut into blocks of kElementBlock: parallel, and for sums a fixed order of
// fixed partials, whatever the thread count.

namespace {

// (array, first element) of every kElementBlock block of `count` arrays of sizes[a] elements, in
// order: the items of one parallel_for over all of them.
std::vector<std::pair<size_t, int64_t>> element_blocks(const int64_t* sizes, size_t count) {
  std::vector<std::pair<size_t, int64_t>> items;
  for (size_t a = 0; a < count; ++a)
    for (int64_t i = 0; i < sizes[a]; i += kElementBlock) items.push_back({a, i});
  return items;
}

}  // namespace

double CpuBackend::sum_squares(const float* x, int64_t n) { return sum_squares_many(&x, &n, 1); }

double CpuBackend::sum_squares_many(const float* const* xs, const int64_t* ns, size_t count) {
  const auto items = element_blocks(ns, count);
  std::vector<double> partial(items.size());
  pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t k, unsigned) {
    const auto [a, i] = items[static_cast<size_t>(k)];
    partial[static_cast<size_t>(k)] =
        sum_squares_lanes(xs[a] + i, std::min(kElementBlock, ns[a] - i));
  });
  // Each array's partials in block order from zero, then the arrays' sums in order: the bits of
  // Backend's default, one sum_squares() per array.
  double total = 0.0;
  for (size_t k = 0; k < items.size();) {
    double one = 0.0;
    const size_t a = items[k].first;
    for (; k < items.size() && items[k].first == a; ++k) one += partial[k];
    total += one;
  }
  return total;
}

bool CpuBackend::any_nonfinite_many(const float* const* xs, const int64_t* ns, size_t count) {
  // A scan, not a sum: no chain of additions to wait on (the sum of squares runs one dependent
  // add per 4 values; on the main job's parameters the scan takes a quarter of its time).
  const auto items = element_blocks(ns, count);
  std::atomic<bool> found{false};
  pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t k, unsigned) {
    if (found.load(std::memory_order_relaxed)) return;
    const auto [a, i] = items[static_cast<size_t>(k)];
    if (first_nonfinite(xs[a] + i, std::min(kElementBlock, ns[a] - i)) >= 0)
      found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

void CpuBackend::adamw(float* p, const float* g, float* m, float* v, int64_t n, double lr,
                       double beta1, double beta2, double eps, double wd, double gscale, double bc1,
                       double bc2) {
  const AdamWTensor one{p, g, m, v, n, wd};
  adamw_many(&one, 1, lr, beta1, beta2, eps, gscale, bc1, bc2);
}

void CpuBackend::adamw_many(const AdamWTensor* tensors, size_t count, double lr, double beta1,
                            double beta2, double eps, double gscale, double bc1, double bc2) {
  std::vector<int64_t> sizes(count);
  for (size_t t = 0; t < count; ++t) sizes[t] = tensors[t].n;
  const auto items = element_blocks(sizes.data(), count);
  pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t k, unsigned) {
    const auto [t, i] = items[static_cast<size_t>(k)];
    const AdamWTensor& x = tensors[t];
    const AdamW a{lr, beta1, beta2, eps, x.wd, gscale, bc1, bc2};
    adamw_update(a, x.p + i, x.g + i, x.m + i, x.v + i, std::min(kElementBlock, x.n - i));
  });
}

void CpuBackend::sgd(float* p, const float* g, float* m, int64_t n, double lr, double momentum,
                     double wd, double gscale) {
  pool_.parallel_for(blocks(n, kElementBlock), [&](int64_t b, unsigned) {
    for (int64_t i = b * kElementBlock; i < std::min(n, (b + 1) * kElementBlock); ++i) {
      const double gi = g[i] * gscale + wd * p[i];
      const double buf = momentum * m[i] + gi;
      m[i] = static_cast<float>(buf);
      p[i] = static_cast<float>(p[i] - lr * buf);
    }
  });
}

}  // namespace moert::cpu

namespace moert {

std::unique_ptr<Backend> make_cpu_backend(unsigned threads, Precision experts, Fp8Options fp8,
                                          LayoutCopies layouts) {
  return std::make_unique<cpu::CpuBackend>(threads, experts, fp8, layouts);
}

std::string cpu_gemm_isa() { return cpu::dnnl_isa_name(); }

std::string cpu_bf16_kernels() {
  return cpu::Bf16Gemm::default_kernels() == cpu::Bf16Kernels::Dnnl
             ? "onednn"
             : (cpu::use_avx2() ? "widening (avx2)" : "widening (scalar)");
}

}  // namespace moert
