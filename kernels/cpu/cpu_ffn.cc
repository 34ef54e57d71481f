// The CPU backend's GEMM layers: linear, dense and grouped SwiGLU FFNs, forward and backward.
//
// Backward runs in two passes. The first goes over row items (one chunk of kReduceRows rows
// each): Dgrad, the SwiGLU derivative, and the chunk's Wgrad operands. The second reduces every
// weight gradient tile by tile over its chunks (row_reduction.h). For weights of 64k elements and
// more the operands are written transposed, chunk by chunk, so that a Wgrad partial dW = dY^T X
// over one chunk is an "nt" GEMM (both operands read along the chunk's rows), and fp32 Dgrad
// multiplies by weights transposed once per call: oneDNN's sgemm runs nt at 85-91 GFLOP/s on this
// project's AVX2 machine against 58-66 for tn and nn at these shapes. Smaller weights read the
// row-major operands directly (tn, nn), where the transposes would cost more than they save, and
// so do all weights where oneDNN runs AVX-512 kernels, whose nn and tn are as fast as nt.
// The fp32 forward multiplies by the transposed copies of the weights where they carry one
// (Weight::f32t, kept on AVX-512): oneDNN's avx512_core sgemm runs a 64-row item as "nn" against
// [in, out] 15-40 % faster than as "nt" against [out, in], which it repacks on every call (Zen 5,
// [64, 512] x [512, 256]: 204 against 145 GFLOP/s; [64, 256] x [256, 512]: 212 against 181).
// The backward's Transposed mode reads the same copies instead of transposing per call. The bf16
// forward likewise multiplies by packed copies (Weight::bf16_packed, oneDNN's blocked layout)
// where the CPU multiplies bf16 natively, so that no call repacks a weight: a decode step then
// streams its experts' weights at the memory's speed.
// FFNs whose three weights carry FP8 copies multiply in FP8 (cpu_ffn_fp8.cc): the forward decides
// segment by segment, the backward when every segment of the call carries them.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <utility>

#include "core/error.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/math.h"
#include "kernels/cpu/wgrad_stride.h"

namespace moert::cpu {
namespace {

int64_t blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

const float* f32_of(Weight w) {
  if (!w.f32) fail(Code::Internal, "the CPU backend got a weight without fp32 values");
  return w.f32;
}

// Multiplied in bf16: a plain bf16 copy, or (inference) only the packed one.
bool bf16_of(Weight w) { return w.bf16 || w.bf16_packed; }
bool all_bf16(Weight a, Weight b, Weight c) { return bf16_of(a) && bf16_of(b) && bf16_of(c); }
bool all_fp8(Weight a, Weight b, Weight c) { return a.fp8 && b.fp8 && c.fp8; }

// Row stride of a Direct-mode Wgrad operand of `width` floats on this CPU (wgrad_stride.h).
int64_t wgrad_ld(int64_t width) {
  static const L1Geometry l1 = l1_geometry();
  return wgrad_row_stride(width, l1);
}

}  // namespace

std::vector<CpuBackend::Item> CpuBackend::row_items(const std::vector<Segment>& segments,
                                                    int64_t unit) {
  std::vector<Item> items;
  for (size_t s = 0; s < segments.size(); ++s)
    for (int64_t a = 0; a < segments[s].rows; a += unit)
      items.push_back({s, segments[s].begin + a, std::min(unit, segments[s].rows - a)});
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
  // As ffn_backward's modes: small weights read their row-major operands directly.
  const bool direct = out * in < direct_below_;
  if (!direct) {
    t_lin_dy_.resize(*this, static_cast<size_t>(rows * out) * sizeof(float));
    t_lin_x_.resize(*this, static_cast<size_t>(rows * in) * sizeof(float));
  }
  auto* tdy = reinterpret_cast<float*>(t_lin_dy_.data());
  auto* tx = reinterpret_cast<float*>(t_lin_x_.data());
  // dx = dy w as an "nt" GEMM against w transposed, where that copy stays small.
  const bool wt = dx && !direct && out * in <= kTransposedWeights;
  if (wt) {
    t_w_.resize(*this, static_cast<size_t>(out * in));
    pool_.parallel_for(blocks(in, 64), [&](int64_t b, unsigned) {
      const int64_t c0 = b * 64;
      transpose(w + c0, in, out, std::min<int64_t>(64, in - c0), t_w_.data() + c0 * out, out);
    });
  }
  std::vector<float> db_partial(db ? static_cast<size_t>(J * out) : 0);
  pool_.parallel_for(J, [&](int64_t j, unsigned) {
    const int64_t r0 = j * kReduceRows, m = chunk_rows(rows, j);
    if (dx && wt)
      sgemm(false, true, m, in, out, dy + r0 * out, out, t_w_.data(), out, dx + r0 * in, in,
            dx_accumulate);
    else if (dx)
      sgemm(false, false, m, in, out, dy + r0 * out, out, w, in, dx + r0 * in, in, dx_accumulate);
    if (!direct) {
      transpose(dy + r0 * out, out, m, out, tdy + r0 * out, m);
      transpose(x + r0 * in, in, m, in, tx + r0 * in, m);
    }
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
                  bool accumulate, unsigned) {
    const int64_t r0 = j * kReduceRows, m = chunk_rows(rows, j);
    if (direct)
      sgemm(true, false, no, ni, m, dy + r0 * out + o0, out, x + r0 * in + i0, in, c, ldc,
            accumulate);
    else
      sgemm(false, true, no, ni, m, tdy + r0 * out + o0 * m, m, tx + r0 * in + i0 * m, m, c, ldc,
            accumulate);
  };
  g.exact_accumulate = true;
  reducer_.run(*this, {g});
  if (db) reduce_partials(*this, db_partial.data(), J, out, *db);
}

// ---- SwiGLU FFNs

void CpuBackend::swiglu_ffn(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1,
                            float* h3, int64_t rows, int64_t dim, int64_t hidden, bool accumulate) {
  ffn_forward({Segment{w1, w3, w2, 0, rows}}, x, y, h1, h3, dim, hidden, accumulate);
}

std::vector<CpuBackend::Segment> CpuBackend::expert_segments(const DispatchPlan& plan, Weight w1,
                                                             Weight w3, Weight w2, int64_t dim,
                                                             int64_t hidden) {
  const int64_t E = static_cast<int64_t>(plan.host_offsets.size()) - 1, per = hidden * dim;
  std::vector<Segment> segs;
  for (int64_t e = 0; e < E; ++e)
    if (plan.count(e) > 0)
      segs.push_back({w1.offset(e * per), w3.offset(e * per), w2.offset(e * per),
                      plan.host_offsets[e], plan.count(e)});
  return segs;
}

void CpuBackend::grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, Weight w1,
                                    Weight w3, Weight w2, float* y_perm, float* h1, float* h3,
                                    int64_t dim, int64_t hidden) {
  ffn_forward(expert_segments(plan, w1, w3, w2, dim, hidden), x_perm, y_perm, h1, h3, dim, hidden,
              false);
}

void CpuBackend::dispatch_swiglu_ffn(const DispatchPlan& plan, const float* x, float* x_perm,
                                     bool keep_x_perm, Weight w1, Weight w3, Weight w2,
                                     float* y_perm, float* h1, float* h3, int64_t dim,
                                     int64_t hidden, int64_t ld) {
  const Gather gather = routed_gather(plan, x, x_perm, keep_x_perm, w1, w3, w2, dim, hidden, ld);
  ffn_forward({routed_ffn(plan, &gather, x_perm, w1, w3, w2, y_perm, h1, h3, dim, hidden)}, dim);
}

void CpuBackend::routed_and_shared_ffn(const DispatchPlan& plan, const float* x, float* x_perm,
                                       bool keep_x_perm, Weight w1, Weight w3, Weight w2,
                                       float* y_perm, float* h1, float* h3, int64_t dim,
                                       int64_t hidden, int64_t ld, const SharedExpert& shared) {
  const Gather gather = routed_gather(plan, x, x_perm, keep_x_perm, w1, w3, w2, dim, hidden, ld);
  const ForwardFfn s{.segs = {Segment{shared.w1, shared.w3, shared.w2, 0, plan.rows}},
                     .x = x,
                     .y = shared.y,
                     .h1 = shared.h1,
                     .h3 = shared.h3,
                     .hidden = shared.hidden,
                     .accumulate = true,
                     .init = shared.residual ? ForwardFfn::Init::Copy : ForwardFfn::Init::Zero,
                     .layer_rows = true};
  ffn_forward({routed_ffn(plan, &gather, x_perm, w1, w3, w2, y_perm, h1, h3, dim, hidden), s}, dim);
}

CpuBackend::Gather CpuBackend::routed_gather(const DispatchPlan& plan, const float* x,
                                             float* x_perm, bool keep_x_perm, Weight w1, Weight w3,
                                             Weight w2, int64_t dim, int64_t hidden,
                                             int64_t ld) const {
  // Only rows kept for a Direct-mode backward come padded: the other modes read them dense.
  if (ld != dim && (!keep_x_perm || kept_rows_stride(w1, w3, w2, dim, hidden) != ld))
    fail(Code::Internal, "dispatch_swiglu_ffn got a row stride ", ld, " for width ", dim,
         " where its rows are not kept padded");
  return Gather{x, plan.token.data(), keep_x_perm ? x_perm : nullptr, plan.rows, ld};
}

CpuBackend::ForwardFfn CpuBackend::routed_ffn(const DispatchPlan& plan, const Gather* gather,
                                              const float* x_perm, Weight w1, Weight w3, Weight w2,
                                              float* y_perm, float* h1, float* h3, int64_t dim,
                                              int64_t hidden) {
  return {.segs = expert_segments(plan, w1, w3, w2, dim, hidden),
          .x = x_perm,
          .y = y_perm,
          .h1 = h1,
          .h3 = h3,
          .hidden = hidden,
          .gather = gather};
}

void CpuBackend::ffn_forward(const std::vector<Segment>& segs, const float* x, float* y, float* h1,
                             float* h3, int64_t dim, int64_t hidden, bool accumulate,
                             const Gather* gather) {
  ffn_forward({{.segs = segs,
                .x = x,
                .y = y,
                .h1 = h1,
                .h3 = h3,
                .hidden = hidden,
                .accumulate = accumulate,
                .gather = gather}},
              dim);
}

void CpuBackend::ffn_forward(const std::vector<ForwardFfn>& ffns, int64_t dim) {
  // m rows from `begin` on of a gather, into `to` (row stride ld).
  auto gather_rows = [&](const Gather& g, int64_t begin, int64_t m, float* to, int64_t ld) {
    for (int64_t r = 0; r < m; ++r)
      std::memcpy(to + r * ld, g.src + static_cast<int64_t>(g.token[begin + r]) * dim,
                  sizeof(float) * static_cast<size_t>(dim));
  };
  // In bf16 the activations a = swiglu(h1, h3) leave the up GEMMs already in the down GEMM's
  // operand form (bf16_gemm_.act_bytes() per element, row stride `hidden` elements, in the same
  // storage), and rows to gather go from x to the up GEMMs' operand form in one step.
  auto in_bf16 = [](const Segment& s) {
    return !all_fp8(s.w1, s.w3, s.w2) && all_bf16(s.w1, s.w3, s.w2);
  };
  // Whether the up and down GEMMs read packed copies: the same test chooses the GEMM and the
  // column units, which for a packed weight must be whole blocks of it.
  auto packed_up = [](const Segment& s) { return s.w1.bf16_packed && s.w3.bf16_packed; };
  auto packed_down = [](const Segment& s) { return s.w2.bf16_packed != nullptr; };
  const size_t es = bf16_gemm_.act_bytes(), row_bytes = static_cast<size_t>(dim) * es;
  const bool widened = bf16_gemm_.kernels() == Bf16Kernels::Widen;

  // What each FFN's items need beyond the FFN itself.
  struct Run {
    std::vector<Item> items;
    std::vector<int64_t> cut_at;  // a cut item's rows among the FFN's cut rows, else -1
    int64_t cut_rows = 0;
    size_t cut_base = 0, cut_x_base = 0;  // floats of cut_, rows of cut_x_ before the FFN's
    bool keep = false;
    bool cut_apart = false;  // its cut items' rows gathered into cut_x_ (not kept)
    int64_t ldk = 0;         // row stride of its x (the kept rows') where gathered rows are kept
    // Its bf16 up GEMMs copy the rows they gather from src_bf16_ (slot[t]: token t's row there).
    bool src_once = false;
    // Its rows already in the up GEMMs' operand form, in order (a shared expert's, where the
    // call converted the whole source it shares with a gathering FFN).
    const unsigned char* x_bf16 = nullptr;
  };
  std::vector<Run> runs(ffns.size());
  std::vector<int32_t> slot;

  // h1, h3 (row stride hidden) = x W1^T, x W3^T on hidden columns [c0, c0 + n), then a there.
  // The rows: `pre` (already in operand form), xr, or (`tokens`, bf16) rows tokens[r] of the
  // gather's source.
  auto up = [&](const ForwardFfn& f, const Run& run, const Segment& s, int64_t m, int64_t row0,
                const float* xr, int64_t ldx, const int32_t* tokens, const unsigned char* pre,
                float* p1, float* p3, float* a, int64_t c0, int64_t n, unsigned worker) {
    const int64_t hidden = f.hidden;
    if (in_bf16(s)) {
      const void* op = pre;
      if (!pre) {
        auto& act = scratch_[worker].bytes;
        act.resize(static_cast<size_t>(m) * row_bytes);
        if (tokens && run.src_once)
          for (int64_t r = 0; r < m; ++r)
            std::memcpy(act.data() + static_cast<size_t>(r) * row_bytes,
                        src_bf16_.data() +
                            static_cast<size_t>(slot[static_cast<size_t>(tokens[r])]) * row_bytes,
                        row_bytes);
        else if (tokens)
          for (int64_t r = 0; r < m; ++r)
            bf16_gemm_.prepare(f.gather->src + static_cast<int64_t>(tokens[r]) * dim, dim, 1, dim,
                               act.data() + static_cast<size_t>(r) * row_bytes, dim, false);
        else
          bf16_gemm_.prepare(xr, ldx, m, dim, act.data(), dim, false);
        op = act.data();
      }
      if (packed_up(s)) {
        packed_nt(op, dim, s.w1.bf16_packed, hidden, p1 + c0, hidden, m, c0, n, dim, false, worker);
        packed_nt(op, dim, s.w3.bf16_packed, hidden, p3 + c0, hidden, m, c0, n, dim, false, worker);
      } else {
        bf16_gemm_.act_weight_nt(op, dim, s.w1.bf16 + c0 * dim, dim, p1 + c0, hidden, m, n, dim,
                                 false, worker);
        bf16_gemm_.act_weight_nt(op, dim, s.w3.bf16 + c0 * dim, dim, p3 + c0, hidden, m, n, dim,
                                 false, worker);
      }
      auto* ab = reinterpret_cast<unsigned char*>(a);
      for (int64_t r = 0; r < m; ++r)
        swiglu_to_bf16(p1 + r * hidden + c0, p3 + r * hidden + c0,
                       ab + static_cast<size_t>(r * hidden + c0) * es, n, widened);
      return;
    }
    if (all_fp8(s.w1, s.w3, s.w2)) {
      if (ldx != dim) fail(Code::Internal, "FP8 rows reached the forward at a padded stride");
      fp8_up(s, m, row0, xr, p1, p3, c0, n, dim, hidden, worker);
    } else if (s.w1.f32t && s.w3.f32t) {
      sgemm(false, false, m, n, dim, xr, ldx, s.w1.f32t + c0, hidden, p1 + c0, hidden, false);
      sgemm(false, false, m, n, dim, xr, ldx, s.w3.f32t + c0, hidden, p3 + c0, hidden, false);
    } else {
      sgemm(false, true, m, n, dim, xr, ldx, f32_of(s.w1) + c0 * dim, dim, p1 + c0, hidden, false);
      sgemm(false, true, m, n, dim, xr, ldx, f32_of(s.w3) + c0 * dim, dim, p3 + c0, hidden, false);
    }
    for (int64_t r = 0; r < m; ++r)
      swiglu(p1 + r * hidden + c0, p3 + r * hidden + c0, a + r * hidden + c0, n);
  };
  // y (row stride `dim`) (+)= a W2^T on output columns [c0, c0 + n), the item's rows of y first
  // set as f.init says.
  auto down = [&](const ForwardFfn& f, const Segment& s, int64_t m, int64_t row0, const float* a,
                  float* yr, int64_t c0, int64_t n, unsigned worker) {
    const int64_t hidden = f.hidden;
    if (f.init != ForwardFfn::Init::None)
      for (int64_t r = 0; r < m; ++r) {
        float* to = yr + r * dim + c0;
        if (f.init == ForwardFfn::Init::Copy)
          std::memcpy(to, f.x + (row0 + r) * dim + c0, sizeof(float) * static_cast<size_t>(n));
        else
          std::memset(to, 0, sizeof(float) * static_cast<size_t>(n));
      }
    if (in_bf16(s)) {
      if (packed_down(s))
        packed_nt(a, hidden, s.w2.bf16_packed, dim, yr + c0, dim, m, c0, n, hidden, f.accumulate,
                  worker);
      else
        bf16_gemm_.act_weight_nt(a, hidden, s.w2.bf16 + c0 * hidden, hidden, yr + c0, dim, m, n,
                                 hidden, f.accumulate, worker);
    } else if (all_fp8(s.w1, s.w3, s.w2)) {
      fp8_down(s, m, row0, a, yr, c0, n, dim, hidden, f.accumulate, worker);
    } else if (s.w2.f32t) {
      sgemm(false, false, m, n, hidden, a, hidden, s.w2.f32t + c0, dim, yr + c0, dim, f.accumulate);
    } else {
      sgemm(false, true, m, n, hidden, a, hidden, f32_of(s.w2) + c0 * hidden, hidden, yr + c0, dim,
            f.accumulate);
    }
  };

  // Items of a few rows (a decode step) do little work each but read their whole weights: they
  // are cut into column blocks, so that every thread streams a share of the weights. So is every
  // item of an FFN with too few items to keep the threads busy on large weights: a decode step's
  // shared expert is one item, 64 rows of 5.6 GFLOP at DeepSeek-V3's width, which alone would
  // run on one thread while the others wait. The cuts depend on each FFN's shapes only, never on
  // the thread count or on the other FFNs of the call. A packed bf16 weight is cut only at its
  // blocks: up to 512 rows it is one unit (CpuBackend::pack_rows).
  struct Unit {
    size_t ffn, item;
    int64_t c0, n;
  };
  std::vector<Unit> units, second;
  size_t cut_floats = 0, cut_x_rows = 0;
  for (size_t g = 0; g < ffns.size(); ++g) {
    const ForwardFfn& f = ffns[g];
    Run& run = runs[g];
    run.items = row_items(f.segs);
    run.keep = f.h1 != nullptr;
    run.ldk = f.gather && f.gather->kept ? f.gather->kept_ld : dim;
    run.cut_apart = f.gather && !f.gather->kept;
    run.cut_at.assign(run.items.size(), -1);
    const int64_t hidden = f.hidden, per_row = hidden * (run.keep ? 1 : 3);
    int64_t rows_in_all = 0;
    for (const Item& it : run.items) rows_in_all += it.rows;
    const bool cut_all = static_cast<int64_t>(run.items.size()) < kCutItems &&
                         hidden * dim >= kCutWeights && rows_in_all * per_row <= kCutFloats;
    for (size_t i = 0; i < run.items.size(); ++i) {
      if (run.items[i].rows > kFewRows && !cut_all) {
        units.push_back({g, i, 0, 0});
        continue;
      }
      run.cut_at[i] = run.cut_rows;
      run.cut_rows += run.items[i].rows;
      // Units of a packed weight are whole blocks of it; other layouts take any columns.
      const Segment& s = f.segs[run.items[i].segment];
      const int64_t up_cols =
          in_bf16(s) && packed_up(s) ? unit_columns(hidden, kUpColumns) : kUpColumns;
      const int64_t down_cols =
          in_bf16(s) && packed_down(s) ? unit_columns(dim, kDownColumns) : kDownColumns;
      for (int64_t c = 0; c < hidden; c += up_cols)
        units.push_back({g, i, c, std::min(up_cols, hidden - c)});
      for (int64_t c = 0; c < dim; c += down_cols)
        second.push_back({g, i, c, std::min(down_cols, dim - c)});
    }
    run.cut_base = cut_floats;
    cut_floats += static_cast<size_t>(run.cut_rows * per_row);
    run.cut_x_base = cut_x_rows;
    if (run.cut_apart) cut_x_rows += static_cast<size_t>(run.cut_rows);
  }
  cut_.resize(*this, cut_floats);
  if (cut_x_rows > 0) cut_x_.resize(*this, cut_x_rows * static_cast<size_t>(dim));
  // A cut item's rows are read by each of its column units: gathered once, before them.
  {
    std::vector<std::pair<size_t, size_t>> cut;
    for (size_t g = 0; g < ffns.size(); ++g)
      if (ffns[g].gather)
        for (size_t i = 0; i < runs[g].items.size(); ++i)
          if (runs[g].cut_at[i] >= 0) cut.emplace_back(g, i);
    if (!cut.empty())
      pool_.parallel_for(static_cast<int64_t>(cut.size()), [&](int64_t c, unsigned) {
        const auto [g, i] = cut[static_cast<size_t>(c)];
        const Run& run = runs[g];
        const Item& it = run.items[i];
        const Gather& ga = *ffns[g].gather;
        if (run.cut_apart)
          gather_rows(ga, it.begin, it.rows, cut_x_.data() + (run.cut_x_base + run.cut_at[i]) * dim,
                      dim);
        else
          gather_rows(ga, it.begin, it.rows, ga.kept + it.begin * run.ldk, run.ldk);
      });
  }
  // An item not cut into units gathers its rows straight into the bf16 up GEMMs' operand, so
  // each token is rounded once per assignment: top-K times. Where those items read each source
  // row twice or more on average, the rows they read are converted once and copied from there
  // (the same bits). No other row is touched (under expert parallelism the rest of the source
  // may still be arriving), unless an FFN of the call reads the whole source in bf16 (a shared
  // expert): then every row is converted, in order, and that FFN multiplies them where they lie.
  for (size_t g = 0; g < ffns.size(); ++g) {
    const ForwardFfn& f = ffns[g];
    if (!f.gather || f.gather->kept) continue;
    const Gather& ga = *f.gather;
    std::vector<size_t> whole;
    for (size_t h = 0; h < ffns.size(); ++h) {
      const ForwardFfn& o = ffns[h];
      if (o.gather || o.x != ga.src || o.segs.empty() || runs[h].items.empty()) continue;
      bool reads = true;
      for (const Segment& s : o.segs)
        reads = reads && in_bf16(s) && s.begin == 0 && s.rows == ga.src_rows;
      if (reads) whole.push_back(h);
    }
    Run& run = runs[g];
    bool any = !whole.empty();
    for (size_t i = 0; i < run.items.size() && !any; ++i)
      any = run.cut_at[i] < 0 && in_bf16(f.segs[run.items[i].segment]);
    if (!any) break;
    // The rows read, in the order they are converted (every row, in order, where `whole`).
    std::vector<int32_t> rows_read;
    int64_t gathered = 0;
    slot.assign(static_cast<size_t>(ga.src_rows), -1);
    if (!whole.empty())
      for (int64_t t = 0; t < ga.src_rows; ++t)
        slot[static_cast<size_t>(t)] = static_cast<int32_t>(t);
    for (size_t i = 0; i < run.items.size(); ++i) {
      if (run.cut_at[i] >= 0 || !in_bf16(f.segs[run.items[i].segment])) continue;
      const Item& it = run.items[i];
      gathered += it.rows;
      if (!whole.empty()) continue;
      for (int64_t r = it.begin; r < it.begin + it.rows; ++r) {
        int32_t& at = slot[static_cast<size_t>(ga.token[r])];
        if (at < 0) {
          at = static_cast<int32_t>(rows_read.size());
          rows_read.push_back(ga.token[r]);
        }
      }
    }
    const int64_t n = whole.empty() ? static_cast<int64_t>(rows_read.size()) : ga.src_rows;
    if (n == 0 || (whole.empty() && gathered < 2 * n)) break;
    run.src_once = gathered > 0;
    src_bf16_.resize(*this, static_cast<size_t>(n) * row_bytes);
    pool_.parallel_for((n + kReduceRows - 1) / kReduceRows, [&](int64_t b, unsigned) {
      const int64_t r0 = b * kReduceRows, m = std::min(n, r0 + kReduceRows) - r0;
      if (!whole.empty()) {
        bf16_gemm_.prepare(ga.src + r0 * dim, dim, m, dim,
                           src_bf16_.data() + static_cast<size_t>(r0) * row_bytes, dim, false);
        return;
      }
      for (int64_t i = r0; i < r0 + m; ++i)
        bf16_gemm_.prepare(ga.src + static_cast<int64_t>(rows_read[i]) * dim, dim, 1, dim,
                           src_bf16_.data() + static_cast<size_t>(i) * row_bytes, dim, false);
    });
    for (size_t h : whole) runs[h].x_bf16 = src_bf16_.data();
    break;  // one source converted per call
  }

  // Runs FFN g's work (nothing once g has failed), an error naming the layer's rows where g's
  // rows are the layer's. Each FFN keeps its first error, and the call fails as the FFNs' own
  // calls in their order would have, each its up pass then its down pass: the first FFN that
  // fails in the first pass stops every later FFN's second pass. Which of one FFN's errors is
  // reported may depend on the threads, as in a call of its own.
  std::vector<std::exception_ptr> errors(ffns.size());
  const std::unique_ptr<std::atomic<bool>[]> failed(new std::atomic<bool>[ffns.size()]());
  std::mutex error_lock;
  auto guarded = [&](size_t g, auto&& work) {
    if (failed[g].load(std::memory_order_relaxed)) return;
    try {
      if (!ffns[g].layer_rows) return work();
      try {
        work();
      } catch (const RowError& e) {
        if (e.layer_row()) throw;
        throw e.at_layer_row(e.row());
      }
    } catch (...) {
      const std::lock_guard<std::mutex> hold(error_lock);
      if (!errors[g]) errors[g] = std::current_exception();
      failed[g].store(true, std::memory_order_relaxed);
    }
  };
  auto first_failed = [&] {
    size_t g = 0;
    while (g < ffns.size() && !errors[g]) ++g;
    return g;
  };
  pool_.parallel_for(static_cast<int64_t>(units.size()), [&](int64_t u, unsigned worker) {
    const Unit& un = units[static_cast<size_t>(u)];
    const ForwardFfn& f = ffns[un.ffn];
    const Run& run = runs[un.ffn];
    const Item& it = run.items[un.item];
    const Segment& s = f.segs[it.segment];
    const int64_t m = it.rows, hidden = f.hidden;
    const Gather* gather = f.gather;
    const unsigned char* pre =
        run.x_bf16 ? run.x_bf16 + static_cast<size_t>(it.begin) * row_bytes : nullptr;
    guarded(un.ffn, [&] {
      const float* xr = f.x + it.begin * run.ldk;
      int64_t ldx = run.ldk;
      if (run.cut_at[un.item] >= 0) {
        if (run.cut_apart) {
          xr = cut_x_.data() + (run.cut_x_base + run.cut_at[un.item]) * dim;
          ldx = dim;
        }
        float* a = cut_.data() + run.cut_base + run.cut_at[un.item] * hidden;
        float* p1 = run.keep ? f.h1 + it.begin * hidden : a + run.cut_rows * hidden;
        float* p3 = run.keep ? f.h3 + it.begin * hidden : a + 2 * run.cut_rows * hidden;
        up(f, run, s, m, it.begin, xr, ldx, nullptr, pre, p1, p3, a, un.c0, un.n, worker);
        return;
      }
      auto& sc = scratch_[worker].f;
      const int64_t act = (run.keep ? 1 : 3) * m * hidden;
      // Rows the bf16 up GEMMs take straight from x: gathered nowhere else.
      const bool convert_gathered = gather && !gather->kept && in_bf16(s);
      sc.resize(
          static_cast<size_t>(act + (gather && !gather->kept && !convert_gathered ? m * dim : 0)));
      if (gather && !convert_gathered) {
        // The item's rows, gathered where its GEMMs read them next (L2), not in a pass of their
        // own.
        float* to = gather->kept ? gather->kept + it.begin * run.ldk : sc.data() + act;
        ldx = gather->kept ? run.ldk : dim;
        gather_rows(*gather, it.begin, m, to, ldx);
        xr = to;
      }
      float* a = sc.data();
      float* p1 = run.keep ? f.h1 + it.begin * hidden : a + m * hidden;
      float* p3 = run.keep ? f.h3 + it.begin * hidden : a + 2 * m * hidden;
      up(f, run, s, m, it.begin, xr, ldx, convert_gathered ? gather->token + it.begin : nullptr,
         pre, p1, p3, a, 0, hidden, worker);
      down(f, s, m, it.begin, a, f.y + it.begin * dim, 0, dim, worker);
    });
  });
  const size_t stop = first_failed();
  const auto later =
      std::find_if(second.begin(), second.end(), [&](const Unit& un) { return un.ffn >= stop; });
  if (later != second.begin())
    pool_.parallel_for(later - second.begin(), [&](int64_t u, unsigned worker) {
      const Unit& un = second[static_cast<size_t>(u)];
      const ForwardFfn& f = ffns[un.ffn];
      const Run& run = runs[un.ffn];
      const Item& it = run.items[un.item];
      guarded(un.ffn, [&] {
        down(f, f.segs[it.segment], it.rows, it.begin,
             cut_.data() + run.cut_base + run.cut_at[un.item] * f.hidden, f.y + it.begin * dim,
             un.c0, un.n, worker);
      });
    });
  if (const size_t g = first_failed(); g < ffns.size()) std::rethrow_exception(errors[g]);
}

void CpuBackend::swiglu_ffn_backward(const float* x, Weight w1, Weight w3, Weight w2,
                                     const float* h1, const float* h3, const float* dy, float* dx,
                                     bool dx_accumulate, const GradOut& dw1, const GradOut& dw3,
                                     const GradOut& dw2, int64_t rows, int64_t dim,
                                     int64_t hidden) {
  ffn_backward({Segment{w1, w3, w2, 0, rows, &dw1, &dw3, &dw2}}, x, h1, h3, dy, dx, dx_accumulate,
               dim, hidden, dim);
}

void CpuBackend::grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm,
                                             Weight w1, Weight w3, Weight w2, const float* h1,
                                             const float* h3, const float* dy_perm, float* dx_perm,
                                             const GradOut* dw1, const GradOut* dw3,
                                             const GradOut* dw2, int64_t dim, int64_t hidden,
                                             int64_t ld) {
  const int64_t E = static_cast<int64_t>(plan.host_offsets.size()) - 1, per = hidden * dim;
  std::vector<Segment> segs;
  for (int64_t e = 0; e < E; ++e)
    segs.push_back({w1.offset(e * per), w3.offset(e * per), w2.offset(e * per),
                    plan.host_offsets[e], plan.count(e), &dw1[e], &dw3[e], &dw2[e]});
  ffn_backward(segs, x_perm, h1, h3, dy_perm, dx_perm, false, dim, hidden, ld);
}

CpuBackend::Mode CpuBackend::backward_mode(bool all_bf16, bool all_fp8, int64_t dim,
                                           int64_t hidden) const {
  return all_fp8                        ? Mode::Fp8
         : all_bf16                     ? Mode::Bf16
         : hidden * dim < direct_below_ ? Mode::Direct
                                        : Mode::Transposed;
}

int64_t CpuBackend::kept_rows_stride(Weight w1, Weight w3, Weight w2, int64_t dim,
                                     int64_t hidden) const {
  return backward_mode(all_bf16(w1, w3, w2), all_fp8(w1, w3, w2), dim, hidden) == Mode::Direct
             ? wgrad_ld(dim)
             : dim;
}

void CpuBackend::ffn_backward(const std::vector<Segment>& segs, const float* x, const float* h1,
                              const float* h3, const float* dy, float* dx, bool dx_accumulate,
                              int64_t dim, int64_t hidden, int64_t ld) {
  bool bf16 = !segs.empty(), fp8 = !segs.empty();
  int64_t end = 0;
  for (const Segment& s : segs) {
    bf16 = bf16 && all_bf16(s.w1, s.w3, s.w2);
    fp8 = fp8 && all_fp8(s.w1, s.w3, s.w2);
    end = std::max(end, s.begin + s.rows);
  }
  const int64_t per = hidden * dim;
  // How the GEMMs read their operands:
  //  Direct (small fp32 weights; all of them on AVX-512): Dgrad nn against the weights as
  //    stored, Wgrad tn on the row-major operands, kept at padded row strides (x and dy copied,
  //    a, dh1 and dh3 written there; wgrad_ld).
  //  Transposed (larger fp32 weights): Dgrad nt against the weights transposed (their copies
  //    where they carry them, else transposed once per call), Wgrad nt on the operands written
  //    chunk by chunk transposed.
  //  Bf16: Dgrad through Bf16Gemm (bf16 weights as stored), Wgrad on operands prepared in
  //    bf16: the left ones transposed, the right ones transposed or as rows (WgradRows).
  //  Fp8: Dgrad and Wgrad on block-scaled E4M3 codes (cpu_ffn_fp8.cc), the Wgrad operands kept
  //    row-major as codes, 1 byte each.
  const Mode mode = backward_mode(bf16, fp8, dim, hidden);
  const size_t es = fp8 ? 1 : bf16 ? bf16_gemm_.act_bytes() : sizeof(float);
  // Direct mode's operands are rows [end, width] with padded strides: x and dy where they lie
  // when they come at that stride (kept_rows_stride) or their rows need no padding, else copied.
  const int64_t ldx = mode == Mode::Direct ? wgrad_ld(dim) : dim;
  const int64_t ldh = mode == Mode::Direct ? wgrad_ld(hidden) : hidden;
  if (ld != dim && ld != ldx)
    fail(Code::Internal, "the FFN backward got rows at stride ", ld, " for width ", dim,
         " where it reads them at ", ldx);
  const bool x_in_place = mode == Mode::Direct && ld == ldx;
  if (!x_in_place)
    for (auto* t : {&t_x_, &t_dy_}) t->resize(*this, static_cast<size_t>(end * ldx) * es);
  for (auto* t : {&t_a_, &t_dh1_, &t_dh3_}) t->resize(*this, static_cast<size_t>(end * ldh) * es);

  // Row items in segment order; with transposed weights, segments go in batches whose
  // transposes fit kTransposedWeights. FP8 items are Wgrad's 128-token tiles, two chunks each.
  const auto items = row_items(segs, mode == Mode::Fp8 ? kFp8ShareRows : kReduceRows);
  std::vector<size_t> first_item_of(segs.size() + 1, 0);  // a segment's items, for FP8 Wgrad
  for (const Item& it : items) ++first_item_of[it.segment + 1];
  for (size_t s = 0; s < segs.size(); ++s) first_item_of[s + 1] += first_item_of[s];
  if (mode == Mode::Fp8)
    t_fp8_scales_.resize(*this, items.size() * static_cast<size_t>(fp8_item_scales(dim, hidden)));
  WgradRows rows;  // set below, once the tiles are known; read by the items and the partials
  // dW = sum over chunks of the chunk's A^T B, as the mode lays the operands out.
  // ka, kb: the operands as fp8_wgrad_operand numbers them.
  auto grad = [&](size_t si, const GradOut* g, Buffer<unsigned char>& ta, int ka, int64_t out,
                  Buffer<unsigned char>& tb, int kb, int64_t in) {
    const Segment& s = segs[si];
    DenseGrad d;
    d.g = g;
    d.chunks = reduce_chunks(s.rows);
    d.out = out;
    d.in = in;
    // Direct mode's row-major operands and their strides.
    auto row_major = [&](Buffer<unsigned char>& t, int k) {
      if (x_in_place && k < 2) return k == 0 ? dy : x;
      return reinterpret_cast<const float*>(t.data());
    };
    const float* ra = row_major(ta, ka);
    const float* rb = row_major(tb, kb);
    const int64_t lda = ka < 2 ? ldx : ldh, ldb = kb < 2 ? ldx : ldh;
    d.exact_accumulate = mode != Mode::Fp8;
    d.partial = [&, s, si, ka, kb, out, in, ra, rb, lda, ldb](
                    int64_t j, int64_t o0, int64_t no, int64_t i0, int64_t ni, float* c,
                    int64_t ldc, bool accumulate, unsigned worker) {
      const int64_t r0 = s.begin + j * kReduceRows, m = chunk_rows(s.rows, j);
      if (mode == Mode::Fp8) {
        // The chunk lies inside one tile, its item; its rows from r0 on, with the tile's scales.
        const size_t item =
            first_item_of[si] + static_cast<size_t>(j * kReduceRows / kFp8ShareRows);
        auto& q = scratch_[worker].quant;
        q.resize(static_cast<size_t>(fp8::gemm_wgrad_scratch_floats(m, no, ni)));
        fp8::gemm_wgrad(fp8_wgrad_operand(ka, item, r0, dim, hidden).tiles().from_column(o0),
                        fp8_wgrad_operand(kb, item, r0, dim, hidden).tiles().from_column(i0), c,
                        ldc, m, no, ni, accumulate, q.data());
        return;
      }
      if (mode == Mode::Direct) {
        sgemm(true, false, no, ni, m, ra + r0 * lda + o0, lda, rb + r0 * ldb + i0, ldb, c, ldc,
              accumulate);
        return;
      }
      const unsigned char* pa = ta.data() + static_cast<size_t>(r0 * out + o0 * m) * es;
      if (mode == Mode::Bf16 && (&tb == &t_x_ ? rows.x : rows.a)) {
        const unsigned char* pb = tb.data() + static_cast<size_t>(r0 * in + i0) * es;
        bf16_gemm_.act_act_nn(pa, m, pb, in, c, ldc, no, ni, m, accumulate, worker);
        return;
      }
      const unsigned char* pb = tb.data() + static_cast<size_t>(r0 * in + i0 * m) * es;
      if (mode == Mode::Bf16)
        bf16_gemm_.act_act_nt(pa, m, pb, m, c, ldc, no, ni, m, accumulate, worker);
      else
        sgemm(false, true, no, ni, m, reinterpret_cast<const float*>(pa), m,
              reinterpret_cast<const float*>(pb), m, c, ldc, accumulate);
    };
    return d;
  };
  std::vector<DenseGrad> grads;
  for (size_t si = 0; si < segs.size(); ++si) {
    const Segment& s = segs[si];
    grads.push_back(grad(si, s.dw2, t_dy_, 0, dim, t_a_, 2, hidden));
    grads.push_back(grad(si, s.dw1, t_dh1_, 3, hidden, t_x_, 1, dim));
    grads.push_back(grad(si, s.dw3, t_dh3_, 4, hidden, t_x_, 1, dim));
  }
  // Bf16 Wgrad's right operands (x, a) as their rows come, where every tile spans whole rows of
  // them: oneDNN reads those as fast as transposed ones, which saves their transposition. A
  // strided [rows, part of a row] operand gets oneDNN 2.6's slower gemm:jit instead of brgemm
  // (AVX512-BF16: 260-280 against 315-330 GFLOP/s), so wider ones stay transposed. A process
  // holding fewer experts can get narrower tiles, and so the other layout, for the same chunk:
  // both must give the same bits (core/grad_reduction.h). oneDNN's bf16 kernels do
  // (Bf16WgradLayouts.RowsAndTransposedRightOperandsGiveTheSameBits); the widening kernels' nn
  // and nt sgemm sum in different orders, so they keep the transposed layout.
  const int64_t cols = DenseReducer::tile_cols(grads);
  const bool dnnl = bf16_gemm_.kernels() == Bf16Kernels::Dnnl;
  rows.x = mode == Mode::Bf16 && dnnl && dim <= cols;
  rows.a = mode == Mode::Bf16 && dnnl && hidden <= cols;
  size_t first_item = 0;
  for (size_t s0 = 0; s0 < segs.size();) {
    size_t s1 = s0;
    std::vector<int64_t> slot(segs.size(), -1);  // a segment's transposed weights in t_w_
    int64_t used = 0;
    auto needs_slot = [&](const Segment& s) {
      return mode == Mode::Transposed && s.rows > 0 && !(s.w1.f32t && s.w3.f32t && s.w2.f32t);
    };
    while (s1 < segs.size() &&
           (!needs_slot(segs[s1]) || s1 == s0 || used + 3 * per <= kTransposedWeights)) {
      if (needs_slot(segs[s1])) {
        slot[s1] = used;
        used += 3 * per;
      }
      ++s1;
    }
    if (mode == Mode::Transposed) {
      t_w_.resize(*this, static_cast<size_t>(used));
      std::vector<std::pair<size_t, int>> jobs;
      for (size_t s = s0; s < s1; ++s)
        if (slot[s] >= 0)
          for (int k = 0; k < 3; ++k) jobs.push_back({s, k});
      pool_.parallel_for(static_cast<int64_t>(jobs.size()), [&](int64_t i, unsigned) {
        const auto [s, k] = jobs[static_cast<size_t>(i)];
        float* out = t_w_.data() + slot[s] + k * per;
        // w1, w3 [hidden, dim] -> [dim, hidden]; w2 [dim, hidden] -> [hidden, dim].
        if (k < 2)
          transpose(f32_of(k == 0 ? segs[s].w1 : segs[s].w3), dim, hidden, dim, out, hidden);
        else
          transpose(f32_of(segs[s].w2), hidden, dim, hidden, out, dim);
      });
    }
    size_t last_item = first_item;
    while (last_item < items.size() && items[last_item].segment < s1) ++last_item;
    pool_.parallel_for(static_cast<int64_t>(last_item - first_item), [&](int64_t i, unsigned w) {
      const size_t item = first_item + static_cast<size_t>(i);
      const Item& it = items[item];
      if (mode == Mode::Fp8) {
        backward_item_fp8(segs[it.segment], it, item, x, h1, h3, dy, dx, dx_accumulate, dim, hidden,
                          w);
        return;
      }
      const Segment& s = segs[it.segment];
      Transposed wt{s.w1.f32t, s.w3.f32t, s.w2.f32t};
      if (slot[it.segment] >= 0) {
        const float* t = t_w_.data() + slot[it.segment];
        wt = {t, t + per, t + 2 * per};
      }
      backward_item(mode, s, it, x, h1, h3, dy, dx, dx_accumulate, dim, hidden, ld, wt, rows, w);
    });
    first_item = last_item;
    s0 = s1;
  }

  reducer_.run(*this, grads);
}

// One row item of ffn_backward: a = swiglu(h1, h3); dA = dy W2; dh1, dh3; dx (+)= dh1 W1 + dh3 W3;
// and the item's Wgrad operands, laid out as `mode` needs them.
void CpuBackend::backward_item(Mode mode, const Segment& s, const Item& it, const float* x,
                               const float* h1, const float* h3, const float* dy, float* dx,
                               bool dx_accumulate, int64_t dim, int64_t hidden, int64_t ld,
                               Transposed wt, WgradRows rows, unsigned worker) {
  const int64_t m = it.rows, b = it.begin, mh = m * hidden;
  const size_t es = mode == Mode::Bf16 ? bf16_gemm_.act_bytes() : sizeof(float);
  // Chunk operand of width n, [n, m] from row b on: at b * n elements.
  auto at = [&](Buffer<unsigned char>& t, int64_t n) {
    return t.data() + static_cast<size_t>(b * n) * es;
  };
  const float* h1r = h1 + b * hidden;
  const float* h3r = h3 + b * hidden;
  const float* dyr = dy + b * ld;
  const float* xr = x + b * ld;
  float* dxr = dx + b * dim;
  if (mode == Mode::Direct) {
    // The Wgrad operands, rows at padded strides (wgrad_ld): x and dy copied (unless they come
    // at that stride: then they are read where they lie), a, dh1 and dh3 written there; the
    // Dgrad GEMMs read them from there too.
    const int64_t lx = wgrad_ld(dim), lh = wgrad_ld(hidden);
    const float* dyc = dyr;
    if (lx != ld) {
      auto* xc = reinterpret_cast<float*>(at(t_x_, lx));
      auto* dyp = reinterpret_cast<float*>(at(t_dy_, lx));
      for (int64_t r = 0; r < m; ++r) {
        std::memcpy(xc + r * lx, xr + r * ld, static_cast<size_t>(dim) * sizeof(float));
        std::memcpy(dyp + r * lx, dyr + r * ld, static_cast<size_t>(dim) * sizeof(float));
      }
      dyc = dyp;
    }
    auto* a = reinterpret_cast<float*>(at(t_a_, lh));
    auto* dh1 = reinterpret_cast<float*>(at(t_dh1_, lh));
    auto* dh3 = reinterpret_cast<float*>(at(t_dh3_, lh));
    for (int64_t r = 0; r < m; ++r) swiglu(h1r + r * hidden, h3r + r * hidden, a + r * lh, hidden);
    sgemm(false, false, m, hidden, dim, dyc, lx, f32_of(s.w2), hidden, dh1, lh, false);
    for (int64_t r = 0; r < m; ++r)
      swiglu_backward(h1r + r * hidden, h3r + r * hidden, dh1 + r * lh, dh1 + r * lh, dh3 + r * lh,
                      hidden);
    sgemm(false, false, m, dim, hidden, dh1, lh, f32_of(s.w1), dim, dxr, dim, dx_accumulate);
    sgemm(false, false, m, dim, hidden, dh3, lh, f32_of(s.w3), dim, dxr, dim, true);
    return;
  }
  auto& sc = scratch_[worker];
  sc.f.resize(static_cast<size_t>(3 * mh));
  float* a = sc.f.data();
  float* dh1 = a + mh;
  float* dh3 = dh1 + mh;
  swiglu(h1r, h3r, a, mh);
  switch (mode) {
    case Mode::Bf16: {
      sc.bytes.resize(static_cast<size_t>(m * std::max(dim, hidden)) * es);
      void* act = sc.bytes.data();
      // dA = dy W2, into dh1's storage; then dh1, dh3 from it. Each of dy, dh1 and dh3, once
      // prepared as rows for its Dgrad, is transposed from there for the Wgrad: moving bf16
      // codes costs less than rounding the fp32 values again.
      bf16_gemm_.prepare(dyr, dim, m, dim, act, dim, false);
      bf16_gemm_.act_weight_nn(act, dim, s.w2.bf16, hidden, dh1, hidden, m, hidden, dim, false,
                               worker);
      bf16_gemm_.transpose_prepared(act, dim, m, dim, at(t_dy_, dim), m);
      swiglu_backward(h1r, h3r, dh1, dh1, dh3, mh);
      bf16_gemm_.prepare(dh1, hidden, m, hidden, act, hidden, false);
      bf16_gemm_.act_weight_nn(act, hidden, s.w1.bf16, dim, dxr, dim, m, dim, hidden, dx_accumulate,
                               worker);
      bf16_gemm_.transpose_prepared(act, hidden, m, hidden, at(t_dh1_, hidden), m);
      bf16_gemm_.prepare(dh3, hidden, m, hidden, act, hidden, false);
      bf16_gemm_.act_weight_nn(act, hidden, s.w3.bf16, dim, dxr, dim, m, dim, hidden, true, worker);
      bf16_gemm_.transpose_prepared(act, hidden, m, hidden, at(t_dh3_, hidden), m);
      bf16_gemm_.prepare(xr, dim, m, dim, at(t_x_, dim), rows.x ? dim : m, !rows.x);
      bf16_gemm_.prepare(a, hidden, m, hidden, at(t_a_, hidden), rows.a ? hidden : m, !rows.a);
      return;
    }
    case Mode::Transposed: {
      sgemm(false, true, m, hidden, dim, dyr, dim, wt.w2, dim, dh1, hidden, false);
      swiglu_backward(h1r, h3r, dh1, dh1, dh3, mh);
      sgemm(false, true, m, dim, hidden, dh1, hidden, wt.w1, hidden, dxr, dim, dx_accumulate);
      sgemm(false, true, m, dim, hidden, dh3, hidden, wt.w3, hidden, dxr, dim, true);
      auto tr = [&](const float* src, int64_t n, Buffer<unsigned char>& t) {
        transpose(src, n, m, n, reinterpret_cast<float*>(at(t, n)), m);
      };
      tr(dyr, dim, t_dy_);
      tr(xr, dim, t_x_);
      tr(a, hidden, t_a_);
      tr(dh1, hidden, t_dh1_);
      tr(dh3, hidden, t_dh3_);
      return;
    }
    case Mode::Direct:
    case Mode::Fp8:
      fail(Code::Internal, "an FP8 or Direct row item reached the transposing backward");
  }
}

}  // namespace moert::cpu
