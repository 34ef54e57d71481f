// The CPU backend's GEMM layers: linear, dense and grouped SwiGLU FFNs, forward and backward.
//
// Backward runs in two passes. The first goes over row items (one chunk of kReduceRows rows
// each): Dgrad, the SwiGLU derivative, and the chunk's Wgrad operands written transposed — a
// Wgrad partial dW = dY^T X over one chunk is then an "nt" GEMM (both operands read along the
// chunk's rows), the layout oneDNN's sgemm runs fastest. The second reduces every weight gradient
// tile by tile over its chunks (row_reduction.h).
#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/math.h"

namespace moert::cpu {
namespace {

int64_t blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

const float* f32_of(Weight w) {
  if (!w.f32) fail(Code::Internal, "the CPU backend got a weight without fp32 values");
  return w.f32;
}

bool all_bf16(Weight a, Weight b, Weight c) { return a.bf16 && b.bf16 && c.bf16; }

}  // namespace

std::vector<CpuBackend::Item> CpuBackend::row_items(const std::vector<Segment>& segments) {
  std::vector<Item> items;
  for (size_t s = 0; s < segments.size(); ++s)
    for (int64_t a = 0; a < segments[s].rows; a += kReduceRows)
      items.push_back({s, segments[s].begin + a, std::min(kReduceRows, segments[s].rows - a)});
  return items;
}

// ---- linear

void CpuBackend::linear(const float* x, Weight weight, const float* bias, float* y, int64_t rows,
                        int64_t in, int64_t out, bool accumulate) {
  const float* w = f32_of(weight);
  pool_.parallel_for(blocks(rows, kReduceRows), [&](int64_t b, unsigned) {
    const int64_t r0 = b * kReduceRows, n = std::min(kReduceRows, rows - r0);
    sgemm(false, true, n, out, in, x + r0 * in, in, w, in, y + r0 * out, out, accumulate);
    if (bias)
      for (int64_t r = r0; r < r0 + n; ++r) add_into(y + r * out, bias, out);
  });
}

void CpuBackend::linear_backward(const float* x, Weight weight, const float* dy, float* dx,
                                 bool dx_accumulate, const GradOut& dw, const GradOut* db,
                                 int64_t rows, int64_t in, int64_t out) {
  const float* w = f32_of(weight);
  const int64_t J = reduce_chunks(rows);
  t_dy_.resize(static_cast<size_t>(rows * out) * sizeof(float));
  t_x_.resize(static_cast<size_t>(rows * in) * sizeof(float));
  auto* tdy = reinterpret_cast<float*>(t_dy_.data());
  auto* tx = reinterpret_cast<float*>(t_x_.data());
  std::vector<float> db_partial(db ? static_cast<size_t>(J * out) : 0);
  pool_.parallel_for(J, [&](int64_t j, unsigned) {
    const int64_t r0 = j * kReduceRows, m = chunk_rows(rows, j);
    if (dx)
      sgemm(false, false, m, in, out, dy + r0 * out, out, w, in, dx + r0 * in, in, dx_accumulate);
    transpose(dy + r0 * out, out, m, out, tdy + r0 * out, m);
    transpose(x + r0 * in, in, m, in, tx + r0 * in, m);
    if (db)
      for (int64_t o = 0; o < out; ++o) {
        double sum = 0.0;
        for (int64_t r = r0; r < r0 + m; ++r) sum += dy[r * out + o];
        db_partial[static_cast<size_t>(j * out + o)] = static_cast<float>(sum);
      }
  });
  DenseGrad g;
  g.g = &dw;
  g.chunks = J;
  g.out = out;
  g.in = in;
  g.partial = [&](int64_t j, int64_t o0, int64_t no, int64_t i0, int64_t ni, float* c, int64_t ldc,
                  unsigned) {
    const int64_t r0 = j * kReduceRows, m = chunk_rows(rows, j);
    sgemm(false, true, no, ni, m, tdy + r0 * out + o0 * m, m, tx + r0 * in + i0 * m, m, c, ldc,
          false);
  };
  reducer_.run(*this, {g});
  if (db) reduce_partials(*this, db_partial.data(), J, out, *db);
}

// ---- SwiGLU FFNs

void CpuBackend::swiglu_ffn(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1,
                            float* h3, int64_t rows, int64_t dim, int64_t hidden, bool accumulate) {
  ffn_forward({Segment{w1, w3, w2, 0, rows}}, x, y, h1, h3, dim, hidden, accumulate);
}

void CpuBackend::grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, Weight w1,
                                    Weight w3, Weight w2, float* y_perm, float* h1, float* h3,
                                    int64_t dim, int64_t hidden) {
  const int64_t E = static_cast<int64_t>(plan.host_offsets.size()) - 1, per = hidden * dim;
  std::vector<Segment> segs;
  for (int64_t e = 0; e < E; ++e)
    if (plan.count(e) > 0)
      segs.push_back({w1.offset(e * per), w3.offset(e * per), w2.offset(e * per),
                      plan.host_offsets[e], plan.count(e)});
  ffn_forward(segs, x_perm, y_perm, h1, h3, dim, hidden, false);
}

void CpuBackend::ffn_forward(const std::vector<Segment>& segs, const float* x, float* y, float* h1,
                             float* h3, int64_t dim, int64_t hidden, bool accumulate) {
  const auto items = row_items(segs);
  pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i, unsigned worker) {
    const Item& it = items[static_cast<size_t>(i)];
    const Segment& s = segs[it.segment];
    const int64_t m = it.rows;
    auto& sc = scratch_[worker];
    const bool keep = h1 != nullptr;
    sc.f.resize(static_cast<size_t>((keep ? 1 : 3) * m * hidden));
    float* a = sc.f.data();
    float* p1 = keep ? h1 + it.begin * hidden : a + m * hidden;
    float* p3 = keep ? h3 + it.begin * hidden : a + 2 * m * hidden;
    const float* xr = x + it.begin * dim;
    float* yr = y + it.begin * dim;
    if (all_bf16(s.w1, s.w3, s.w2)) {
      const size_t es = bf16_gemm_.act_bytes();
      sc.bytes.resize(static_cast<size_t>(m * std::max(dim, hidden)) * es);
      bf16_gemm_.prepare(xr, dim, m, dim, sc.bytes.data(), dim, false);
      bf16_gemm_.act_weight_nt(sc.bytes.data(), dim, s.w1.bf16, dim, p1, hidden, m, hidden, dim,
                               false, worker);
      bf16_gemm_.act_weight_nt(sc.bytes.data(), dim, s.w3.bf16, dim, p3, hidden, m, hidden, dim,
                               false, worker);
      swiglu(p1, p3, a, m * hidden);
      bf16_gemm_.prepare(a, hidden, m, hidden, sc.bytes.data(), hidden, false);
      bf16_gemm_.act_weight_nt(sc.bytes.data(), hidden, s.w2.bf16, hidden, yr, dim, m, dim, hidden,
                               accumulate, worker);
    } else {
      sgemm(false, true, m, hidden, dim, xr, dim, f32_of(s.w1), dim, p1, hidden, false);
      sgemm(false, true, m, hidden, dim, xr, dim, f32_of(s.w3), dim, p3, hidden, false);
      swiglu(p1, p3, a, m * hidden);
      sgemm(false, true, m, dim, hidden, a, hidden, f32_of(s.w2), hidden, yr, dim, accumulate);
    }
  });
}

void CpuBackend::swiglu_ffn_backward(const float* x, Weight w1, Weight w3, Weight w2,
                                     const float* h1, const float* h3, const float* dy, float* dx,
                                     bool dx_accumulate, const GradOut& dw1, const GradOut& dw3,
                                     const GradOut& dw2, int64_t rows, int64_t dim,
                                     int64_t hidden) {
  ffn_backward({Segment{w1, w3, w2, 0, rows, &dw1, &dw3, &dw2}}, x, h1, h3, dy, dx, dx_accumulate,
               dim, hidden);
}

void CpuBackend::grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm,
                                             Weight w1, Weight w3, Weight w2, const float* h1,
                                             const float* h3, const float* dy_perm, float* dx_perm,
                                             const GradOut* dw1, const GradOut* dw3,
                                             const GradOut* dw2, int64_t dim, int64_t hidden) {
  const int64_t E = static_cast<int64_t>(plan.host_offsets.size()) - 1, per = hidden * dim;
  std::vector<Segment> segs;
  for (int64_t e = 0; e < E; ++e)
    segs.push_back({w1.offset(e * per), w3.offset(e * per), w2.offset(e * per),
                    plan.host_offsets[e], plan.count(e), &dw1[e], &dw3[e], &dw2[e]});
  ffn_backward(segs, x_perm, h1, h3, dy_perm, dx_perm, false, dim, hidden);
}

void CpuBackend::ffn_backward(const std::vector<Segment>& segs, const float* x, const float* h1,
                              const float* h3, const float* dy, float* dx, bool dx_accumulate,
                              int64_t dim, int64_t hidden) {
  bool bf16 = !segs.empty();
  int64_t end = 0;
  for (const Segment& s : segs) {
    bf16 = bf16 && all_bf16(s.w1, s.w3, s.w2);
    end = std::max(end, s.begin + s.rows);
  }
  const size_t es = bf16 ? bf16_gemm_.act_bytes() : sizeof(float);
  for (auto* t : {&t_x_, &t_dy_}) t->resize(static_cast<size_t>(end * dim) * es);
  for (auto* t : {&t_a_, &t_dh1_, &t_dh3_}) t->resize(static_cast<size_t>(end * hidden) * es);
  // Chunk c's operand of width n, [n, rows of c] from row `begin` on: at begin * n elements.
  auto at = [es](std::vector<unsigned char>& t, int64_t begin, int64_t n) {
    return t.data() + static_cast<size_t>(begin * n) * es;
  };

  const auto items = row_items(segs);
  pool_.parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i, unsigned worker) {
    const Item& it = items[static_cast<size_t>(i)];
    const Segment& s = segs[it.segment];
    const int64_t m = it.rows, b = it.begin, mh = m * hidden;
    auto& sc = scratch_[worker];
    sc.f.resize(static_cast<size_t>(3 * mh));
    float* a = sc.f.data();
    float* dh1 = a + mh;
    float* dh3 = dh1 + mh;
    const float* h1r = h1 + b * hidden;
    const float* h3r = h3 + b * hidden;
    const float* dyr = dy + b * dim;
    float* dxr = dx + b * dim;
    swiglu(h1r, h3r, a, mh);
    if (bf16) {
      sc.bytes.resize(static_cast<size_t>(m * std::max(dim, hidden)) * es);
      void* act = sc.bytes.data();
      // dA = dy W2, into dh1's storage; then dh1, dh3 from it.
      bf16_gemm_.prepare(dyr, dim, m, dim, act, dim, false);
      bf16_gemm_.act_weight_nn(act, dim, s.w2.bf16, hidden, dh1, hidden, m, hidden, dim, false,
                               worker);
      swiglu_backward(h1r, h3r, dh1, dh1, dh3, mh);
      bf16_gemm_.prepare(dh1, hidden, m, hidden, act, hidden, false);
      bf16_gemm_.act_weight_nn(act, hidden, s.w1.bf16, dim, dxr, dim, m, dim, hidden, dx_accumulate,
                               worker);
      bf16_gemm_.prepare(dh3, hidden, m, hidden, act, hidden, false);
      bf16_gemm_.act_weight_nn(act, hidden, s.w3.bf16, dim, dxr, dim, m, dim, hidden, true, worker);
      bf16_gemm_.prepare(dyr, dim, m, dim, at(t_dy_, b, dim), m, true);
      bf16_gemm_.prepare(x + b * dim, dim, m, dim, at(t_x_, b, dim), m, true);
      bf16_gemm_.prepare(a, hidden, m, hidden, at(t_a_, b, hidden), m, true);
      bf16_gemm_.prepare(dh1, hidden, m, hidden, at(t_dh1_, b, hidden), m, true);
      bf16_gemm_.prepare(dh3, hidden, m, hidden, at(t_dh3_, b, hidden), m, true);
    } else {
      sgemm(false, false, m, hidden, dim, dyr, dim, f32_of(s.w2), hidden, dh1, hidden, false);
      swiglu_backward(h1r, h3r, dh1, dh1, dh3, mh);
      sgemm(false, false, m, dim, hidden, dh1, hidden, f32_of(s.w1), dim, dxr, dim, dx_accumulate);
      sgemm(false, false, m, dim, hidden, dh3, hidden, f32_of(s.w3), dim, dxr, dim, true);
      auto tr = [&](const float* src, int64_t n, std::vector<unsigned char>& t) {
        transpose(src, n, m, n, reinterpret_cast<float*>(at(t, b, n)), m);
      };
      tr(dyr, dim, t_dy_);
      tr(x + b * dim, dim, t_x_);
      tr(a, hidden, t_a_);
      tr(dh1, hidden, t_dh1_);
      tr(dh3, hidden, t_dh3_);
    }
  });

  // dW = sum over chunks of A_c^T B_c, with A_c, B_c the chunk's transposed operands.
  auto grad = [&](const Segment& s, const GradOut* g, std::vector<unsigned char>& ta, int64_t out,
                  std::vector<unsigned char>& tb, int64_t in) {
    DenseGrad d;
    d.g = g;
    d.chunks = reduce_chunks(s.rows);
    d.out = out;
    d.in = in;
    d.partial = [&, s, out, in, bf16, es](int64_t j, int64_t o0, int64_t no, int64_t i0, int64_t ni,
                                          float* c, int64_t ldc, unsigned worker) {
      const int64_t r0 = s.begin + j * kReduceRows, m = chunk_rows(s.rows, j);
      const unsigned char* pa = ta.data() + static_cast<size_t>(r0 * out + o0 * m) * es;
      const unsigned char* pb = tb.data() + static_cast<size_t>(r0 * in + i0 * m) * es;
      if (bf16)
        bf16_gemm_.act_act_nt(pa, m, pb, m, c, ldc, no, ni, m, false, worker);
      else
        sgemm(false, true, no, ni, m, reinterpret_cast<const float*>(pa), m,
              reinterpret_cast<const float*>(pb), m, c, ldc, false);
    };
    return d;
  };
  std::vector<DenseGrad> grads;
  for (const Segment& s : segs) {
    grads.push_back(grad(s, s.dw2, t_dy_, dim, t_a_, hidden));
    grads.push_back(grad(s, s.dw1, t_dh1_, hidden, t_x_, dim));
    grads.push_back(grad(s, s.dw3, t_dh3_, hidden, t_x_, dim));
  }
  reducer_.run(*this, grads);
}

}  // namespace moert::cpu
