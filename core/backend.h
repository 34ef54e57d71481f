// What layers ask of a device. Layers say what (route, dispatch, grouped GEMM); a backend says how.
// Every pointer is the backend's memory (host memory for the CPU backend, device memory for
// CUDA) unless its name says host. Every operation is deterministic for a given input.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/error.h"
#include "core/grad_reduction.h"
#include "core/model.h"
#include "kernels/fp8_rules.h"

namespace moert {

// An FP8 (E4M3) copy of a weight: a stack of matrices [..., rows, cols] (the last two
// dimensions), each quantized in 128x128 blocks as kernels/fp8_rules.h defines them. codes:
// row-major, 1 byte per value. scales: one fp32 dequantization factor per block (value ~
// e4m3_to_float(code) * scale), block (rb, cb) of a matrix at rb * block_scale_ld(cols) + cb; the
// scales of matrix i start at i * matrix_scales (blocks_of(rows) * block_scale_ld(cols)).
struct Fp8Weight {
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;
  int64_t matrix_elements = 0;  // rows * cols
  int64_t matrix_scales = 0;

  explicit operator bool() const { return codes != nullptr; }
};

// A weight matrix as a backend reads it: fp32 values and, on backends that multiply in bf16 or
// FP8, a copy in that precision kept in step with them. Any may be null where the backend does
// not use it; a weight with neither copy is multiplied in fp32 everywhere (the router,
// docs/design.md section 5). A weight loaded from an FP8 file for inference may have the FP8 copy
// alone. f32t: on backends that keep one (Backend::transposed_copies), the fp32 values transposed
// matrix by matrix (each [rows, cols] matrix of a stack as [cols, rows], at the same offset),
// also kept in step with them.
struct Weight {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  Fp8Weight fp8;
  const float* f32t = nullptr;
  // bf16_packed: on backends that keep one (Backend::packed_bf16_bytes), the bf16 copy in the
  // layout the backend's forward reads without repacking, packed_bytes per matrix of
  // packed_elements elements.
  const unsigned char* bf16_packed = nullptr;
  int64_t packed_bytes = 0, packed_elements = 0;

  // The weight from element `elements` on: a whole matrix of a stack (an expert's) when it
  // carries an FP8, transposed or packed copy, whose blocks or matrices do not split.
  Weight offset(int64_t elements) const {
    Weight w{f32 ? f32 + elements : nullptr, bf16 ? bf16 + elements : nullptr, fp8,
             f32t ? f32t + elements : nullptr};
    if (bf16_packed) {
      if (elements % packed_elements != 0)
        fail(Code::Internal, "a packed bf16 weight was offset by ", elements,
             " elements, not a whole number of its ", packed_elements, "-element matrices");
      w.bf16_packed = bf16_packed + elements / packed_elements * packed_bytes;
      w.packed_bytes = packed_bytes;
      w.packed_elements = packed_elements;
    }
    if (fp8) {
      if (fp8.matrix_elements <= 0 || elements % fp8.matrix_elements != 0)
        fail(Code::Internal, "an FP8 weight was offset by ", elements,
             " elements, not a whole number of its ", fp8.matrix_elements, "-element matrices");
      w.fp8.codes += elements;
      w.fp8.scales += elements / fp8.matrix_elements * fp8.matrix_scales;
    }
    return w;
  }
};

// Token-to-expert assignments of one MoE layer, in expert-major order, tokens ascending within an
// expert (a stable sort), so that the same routing always gives the same order.
// A MoE layer's shared expert, run beside its routed experts (Backend::routed_and_shared_ffn).
struct SharedExpert {
  Weight w1, w3, w2;  // [hidden, dim], [hidden, dim], [dim, hidden]
  int64_t hidden = 0;
  // y [rows, dim] = x + FFN(x) with `residual`, else FFN(x): whatever y held is replaced.
  bool residual = false;
  float* y = nullptr;
  // The pre-activations W1 x, W3 x ([rows, hidden]) kept for backward, or null.
  float *h1 = nullptr, *h3 = nullptr;
};

struct DispatchPlan {
  int64_t rows = 0;
  std::vector<int64_t> host_offsets;  // [E + 1] on the host: expert e owns [o[e], o[e + 1])
  Buffer<int64_t> expert_offsets;     // the same, in backend memory
  Buffer<int32_t> token;              // [A]: the token of each assignment
  Buffer<int32_t> expert;             // [A]: its expert
  Buffer<float> weight;               // [A]: its gate weight
  Buffer<int64_t> token_offsets;      // [rows + 1]: token t's assignments are listed in
  Buffer<int32_t> token_assign;       // token_assign[token_offsets[t] .. token_offsets[t + 1]),
                                      // in expert order

  int64_t num_assignments() const { return host_offsets.empty() ? 0 : host_offsets.back(); }
  int64_t count(int64_t e) const { return host_offsets[e + 1] - host_offsets[e]; }
};

// The weights a backend multiplies in bf16: none (fp32 everywhere), the MoE layers' routed and
// shared experts, or every GEMM weight but the router's.
enum class Bf16Copies { None, Experts, AllGemms };

// What a session's experts' GEMMs (routed and shared; Fprop, Dgrad, Wgrad) multiply in
// (docs/design.md section 5). The router, its bias, norms, embedding, master weights and
// optimizer state stay fp32 whatever it is; so does the head on the CPU (a CUDA bf16 session
// multiplies every GEMM but the router's in bf16: Bf16Copies::AllGemms). bf16: operands rounded
// to bf16, fp32 accumulation, bf16 weight copies refreshed after each optimizer step. fp8:
// DeepSeek-V3's block-scaled E4M3 (technical report section 3.3; kernels/cpu/fp8.h): activations in
// 1x128 tiles along each GEMM's reduction dimension, weights in 128x128 blocks, fp32 accumulation,
// FP8 weight copies refreshed after each optimizer step.
enum class Precision : int32_t { Fp32 = 0, Bf16 = 1, Fp8 = 2 };

// How a backend multiplies in FP8.
struct Fp8Options {
  // Scales rounded up to powers of two (DeepSeek-V3.1's and DeepGEMM's UE8M0).
  bool power_of_two_scales = false;
};

class Backend : public Allocator {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Whether backend memory is host memory (the CPU): then host data can be used in place.
  virtual bool host_memory() const = 0;
  // Which GEMM weights carry a bf16 copy, kept in step with their fp32 values by the ParamStore;
  // an operation multiplies a weight in bf16 exactly when it is given the copy.
  virtual Bf16Copies bf16_copies() const = 0;
  // Makes the backend's device current on the calling thread (a session may be called from any
  // thread, e.g. by Go's scheduler) until the matching deactivate(), which gives the thread back
  // the device it had before: a host program that uses CUDA itself keeps its current device.
  // Pairs may nest; activate() throws where the device cannot be selected.
  virtual void activate() {}
  virtual void deactivate() noexcept {}
  // Around a stretch of computation that waits for nothing outside the process (a layer's pass
  // in one process: no exchange, no file), which a backend may prepare the calling thread for
  // once rather than per operation. Pairs may nest; on the same thread.
  virtual void begin_compute() {}
  virtual void end_compute() noexcept {}
  // The CUDA stream (a cudaStream_t) on which the backend queues its work, so that a device
  // communicator's operations start after it (Communicator::set_stream); null where every
  // operation is complete when it returns.
  virtual void* native_stream() const { return nullptr; }
  // The scratch the backend keeps between calls, sized by the largest it served (transposed
  // backward operands, per-worker scratch), and its release: between a session's passes only
  // (Session::after_call).
  virtual size_t work_bytes() const { return 0; }
  virtual void release_work() {}
  // How long the backend's threads poll for more work before they sleep (option spin_wait_us);
  // a backend without threads of its own ignores it.
  virtual void set_spin_wait(int64_t /*microseconds*/) {}

  // ---- Memory. Transfers are complete when they return (host buffers may be reused at once).
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void zero(void* dst, size_t bytes) = 0;
  // zero(dsts[i], bytes[i]) for i < count, as one call: a session's gradients are many small
  // arrays, which a backend with threads clears together rather than one after another.
  virtual void zero_many(void* const* dsts, const size_t* bytes, size_t count) {
    for (size_t i = 0; i < count; ++i) zero(dsts[i], bytes[i]);
  }
  // dst[i] = bf16(src[i]), round to nearest even, for the bf16 copies of weights: a finite
  // value beyond bf16's largest (3.3895e38; fp32 goes to 3.4028e38) saturates to it rather than
  // rounding to infinity, so that a finite weight has a finite copy (within the same 0.4 % as
  // any rounding); infinities and NaN stay what they are.
  virtual void to_bf16(const float* src, uint16_t* dst, int64_t n) = 0;

  // ---- FP8. Backends without FP8 GEMMs keep the defaults (no copies; quantizing refused).
  // Whether the MoE layers' routed and shared experts carry FP8 copies, kept in step with their
  // fp32 values by the ParamStore; an FFN multiplies in FP8 exactly when all three of its weights
  // carry the copy.
  virtual bool fp8_experts() const { return false; }
  // The rule quantize_weight_blocks() scales by (copies made under another rule differ). Read
  // where copies are shared between sessions, on host backends only: device backends keep the
  // default.
  virtual Fp8Options fp8_options() const { return {}; }
  // The FP8 copy of `matrices` fp32 matrices [rows, cols] at src: codes [matrices, rows, cols],
  // scales in Fp8Weight's layout, as fp8_blocks_scale_floats() counts them. Throws
  // Error(Numeric) naming `what` and the position on a NaN or infinity.
  virtual void quantize_weight_blocks(const float* /*src*/, int64_t /*matrices*/, int64_t /*rows*/,
                                      int64_t /*cols*/, uint8_t* /*codes*/, float* /*scales*/,
                                      const char* what) {
    fail(Code::Unsupported, "the ", name(), " backend does not multiply in FP8 (quantizing ", what,
         ")");
  }

  // ---- Transposed fp32 copies. Whether the FFN weights that carry neither a bf16 nor an FP8
  // copy (the MoE layers' routed and shared experts, dense FFNs) also carry a transposed fp32 copy
  // (Weight::f32t), kept in step with their fp32 values by the ParamStore: where the backend's
  // GEMMs multiply the forward's layout faster that way.
  virtual bool transposed_copies() const { return false; }
  // dst = each of `matrices` matrices [rows, cols] at src transposed to [cols, rows].
  virtual void transpose_matrices(const float* /*src*/, int64_t /*matrices*/, int64_t /*rows*/,
                                  int64_t /*cols*/, float* /*dst*/) {
    fail(Code::Internal, "the ", name(), " backend keeps no transposed weight copies");
  }

  // ---- Packed bf16 copies. Bytes of one bf16 weight matrix [rows, cols] (a linear layer's
  // [out, in]) in the layout the backend's forward reads without repacking; 0 where the backend
  // keeps no such copies. The ParamStore keeps one for every FFN weight with a bf16 copy.
  virtual int64_t packed_bf16_bytes(int64_t /*rows*/, int64_t /*cols*/) { return 0; }
  // dst (matrices x packed_bf16_bytes(rows, cols)) = each of `matrices` bf16 matrices at src
  // packed.
  virtual void pack_bf16(const uint16_t* /*src*/, int64_t /*matrices*/, int64_t /*rows*/,
                         int64_t /*cols*/, void* /*dst*/) {
    fail(Code::Internal, "the ", name(), " backend keeps no packed bf16 weights");
  }

  // ---- Forward.

  // y[rows, out] = x[rows, in] * w[out, in]^T (+ bias[out]) (+ y when accumulate).
  virtual void linear(const float* x, Weight w, const float* bias, float* y, int64_t rows,
                      int64_t in, int64_t out, bool accumulate) = 0;

  // y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; inv_rms[r] (optional) keeps the scale.
  virtual void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows,
                       int64_t dim, float eps) = 0;

  // y[r] = concat over c of table[tokens[r * context + c]]; ids already range-checked.
  virtual void embedding(const int32_t* tokens, const float* table, float* y, int64_t rows,
                         int64_t context, int64_t dim) = 0;

  // y[rows, dim] (+)= W2 (silu(W1 x) * W3 x) with w1, w3 [hidden, dim] and w2 [dim, hidden]. With
  // h1 and h3 not null, the pre-activations W1 x and W3 x ([rows, hidden]) are kept for backward.
  virtual void swiglu_ffn(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1,
                          float* h3, int64_t rows, int64_t dim, int64_t hidden,
                          bool accumulate) = 0;

  // Token-choice routing of `rows` tokens: scores [rows, E] (unbiased), experts and weights
  // [rows, top_k], exactly as docs/design.md section 1.
  virtual void route_topk(const RouterConfig& cfg, const float* logits, const float* bias,
                          int64_t rows, float* scores, int32_t* experts, float* weights) = 0;

  // Expert-choice routing: scores [rows, E]; each expert takes its `capacity` best tokens of the
  // `rows` (the lower token index among equals); the plan's weights are the scaled scores. The
  // plan keeps the assignments of tokens [first, first + plan_rows) only, numbered from 0
  // (plan.rows = plan_rows): among ranks, each routes every rank's rows alike and keeps its own.
  virtual void route_expert_choice(const RouterConfig& cfg, const float* logits, int64_t rows,
                                   int64_t capacity, float* scores, DispatchPlan& plan,
                                   int64_t first, int64_t plan_rows) = 0;

  // Builds the plan of a token-choice routing (experts/weights [rows, top_k]), host offsets
  // included (the one place a device backend waits for the device: GEMM shapes need counts).
  virtual void plan_dispatch(const int32_t* experts, const float* weights, int64_t rows,
                             int64_t top_k, int64_t num_experts, DispatchPlan& plan) = 0;

  // x_perm[a] = x[plan.token[a]] for every assignment.
  virtual void dispatch(const DispatchPlan& plan, const float* x, float* x_perm, int64_t dim) = 0;

  // For every expert e, y_perm over its assignments = SwiGLU FFN of expert e applied to x_perm
  // (grouped GEMM over the contiguous segments). w1, w3 [E, hidden, dim]; w2 [E, dim, hidden].
  // h1, h3 ([A, hidden]) kept for backward when not null.
  virtual void grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, Weight w1,
                                  Weight w3, Weight w2, float* y_perm, float* h1, float* h3,
                                  int64_t dim, int64_t hidden) = 0;

  // dispatch() then grouped_swiglu_ffn(), for experts whose tokens lie unpermuted in x [plan.rows,
  // dim]. x_perm [A, ld] holds the dispatched rows on return when keep_x_perm (a training pass
  // reads them in backward), at row stride ld (kept_rows_stride, or dim); otherwise it is room
  // the backend may leave unwritten. Same results as the two calls. The CPU backend gathers each
  // GEMM item's rows where the item reads them, instead of in a pass of their own over memory.
  virtual void dispatch_swiglu_ffn(const DispatchPlan& plan, const float* x, float* x_perm,
                                   [[maybe_unused]] bool keep_x_perm, Weight w1, Weight w3,
                                   Weight w2, float* y_perm, float* h1, float* h3, int64_t dim,
                                   int64_t hidden, int64_t ld) {
    dense_rows(ld, dim, "dispatch_swiglu_ffn");
    dispatch(plan, x, x_perm, dim);
    grouped_swiglu_ffn(plan, x_perm, w1, w3, w2, y_perm, h1, h3, dim, hidden);
  }

  // dispatch_swiglu_ffn(), and a shared expert on the same rows x [plan.rows, dim]: shared.y =
  // (shared.residual ? x : 0) + its SwiGLU FFN of x. Same results as those two calls (the shared
  // one accumulating into y set to x or zero), errors included: where both fail, the routed
  // experts' error is raised; a row named by an error of the shared expert is the layer's
  // (RowError::layer_row()), one of the routed experts' is in routing order as
  // dispatch_swiglu_ffn names it. The CPU backend runs both FFNs' items in one parallel stretch,
  // feeds both from one bf16 conversion of x in inference, and writes y's residual where the
  // shared expert's down GEMM adds to it.
  virtual void routed_and_shared_ffn(const DispatchPlan& plan, const float* x, float* x_perm,
                                     bool keep_x_perm, Weight w1, Weight w3, Weight w2,
                                     float* y_perm, float* h1, float* h3, int64_t dim,
                                     int64_t hidden, int64_t ld, const SharedExpert& shared) {
    dispatch_swiglu_ffn(plan, x, x_perm, keep_x_perm, w1, w3, w2, y_perm, h1, h3, dim, hidden, ld);
    const size_t bytes = static_cast<size_t>(plan.rows * dim) * sizeof(float);
    if (shared.residual)
      copy(shared.y, x, bytes);
    else
      zero(shared.y, bytes);
    try {
      swiglu_ffn(x, shared.w1, shared.w3, shared.w2, shared.y, shared.h1, shared.h3, plan.rows, dim,
                 shared.hidden, true);
    } catch (const RowError& e) {
      if (e.layer_row()) throw;
      throw e.at_layer_row(e.row());
    }
  }

  // The row stride (floats, at least dim) at which a training pass keeps the routed experts'
  // rows for their backward: x_perm as dispatch_swiglu_ffn keeps it, dy_perm as combine_backward
  // writes it, both as grouped_swiglu_ffn_backward reads them, for experts of these weights
  // ([E, hidden, dim] w1, w3; [E, dim, hidden] w2). The CPU backend pads rows whose stride would
  // make its Wgrad GEMMs' reads down a chunk collide in L1 (kernels/cpu/wgrad_stride.h), so that
  // it reads them where they lie rather than copying them; other backends keep them dense.
  virtual int64_t kept_rows_stride(Weight /*w1*/, Weight /*w3*/, Weight /*w2*/, int64_t dim,
                                   int64_t /*hidden*/) const {
    return dim;
  }

  // y[t] += sum over t's assignments a (in expert order) of plan.weight[a] * y_perm[a].
  virtual void combine(const DispatchPlan& plan, const float* y_perm, float* y, int64_t dim) = 0;

  // ---- Training. Every gradient that sums over rows is a GradOut and is reduced as
  // core/grad_reduction.h defines (chunks of kReduceRows rows, fp32 partials, a fixed tree), so
  // its bits depend neither on the thread count nor on how processes split the rows. A backend
  // that cannot give local roots (GradOut::roots) throws Error(Unsupported).

  // dx (+)= dy * w (when dx is not null); dw gets dy^T x; db (when not null) the column sums of
  // dy.
  virtual void linear_backward(const float* x, Weight w, const float* dy, float* dx,
                               bool dx_accumulate, const GradOut& dw, const GradOut* db,
                               int64_t rows, int64_t in, int64_t out) = 0;

  // dx = d rmsnorm / dx applied to dy (overwritten); dw gets d / dw (a chunk's partial may be
  // summed in double and rounded to fp32 once).
  virtual void rmsnorm_backward(const float* x, const float* w, const float* inv_rms,
                                const float* dy, float* dx, const GradOut& dw, int64_t rows,
                                int64_t dim) = 0;

  // dtable gets, for each table row, the slices of dy its tokens produced. Sparse: a chunk's
  // partial holds only the table rows its tokens touch; where one side of a merge lacks a row the
  // other side's value is taken plus 0.0f (so -0.0 ends as in a dense sum); acc changes only on
  // rows some token touched; roots carry their row ids (GradRoots::rows).
  virtual void embedding_backward(const int32_t* tokens, const float* dy, const GradOut& dtable,
                                  int64_t rows, int64_t context, int64_t dim, int64_t vocab) = 0;

  // Backward of swiglu_ffn: dx (+)= d/dx; dw1, dw3, dw2 get d/dw. dx aliases none of x, h1,
  // h3, dy: the Wgrad reads x and dy after dx is written (the CPU backend in place).
  virtual void swiglu_ffn_backward(const float* x, Weight w1, Weight w3, Weight w2, const float* h1,
                                   const float* h3, const float* dy, float* dx, bool dx_accumulate,
                                   const GradOut& dw1, const GradOut& dw3, const GradOut& dw2,
                                   int64_t rows, int64_t dim, int64_t hidden) = 0;

  // Backward of grouped_swiglu_ffn: dx_perm [A, dim] (overwritten; aliasing none of the inputs,
  // as for swiglu_ffn_backward) and, per expert e, dw1[e], dw3[e], dw2[e] (arrays of E; acc is
  // that expert's slice). x_perm and dy_perm are [A, ld] (row stride ld: kept_rows_stride, or
  // dim). An expert's rows are its assignments, in plan order; its chunks are counted from the
  // start of its list (in roots mode from that GradOut's first_chunk).
  virtual void grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm, Weight w1,
                                           Weight w3, Weight w2, const float* h1, const float* h3,
                                           const float* dy_perm, float* dx_perm, const GradOut* dw1,
                                           const GradOut* dw3, const GradOut* dw2, int64_t dim,
                                           int64_t hidden, int64_t ld) = 0;

  // Backward of combine: dy_perm[a] = weight[a] * dy[token[a]] (dy_perm at row stride ld >= dim),
  // dweight[a] = <dy[token[a]], y_perm[a]>. Either output may be null: it is then not computed
  // (under expert parallelism the token's rank needs only dweight and the expert's only dy_perm),
  // and the other has the bits it has when both are.
  virtual void combine_backward(const DispatchPlan& plan, const float* y_perm, const float* dy,
                                float* dy_perm, float* dweight, int64_t dim, int64_t ld) = 0;

  // Backward of dispatch: dx[t] += sum over t's assignments of dx_perm[a].
  virtual void dispatch_backward(const DispatchPlan& plan, const float* dx_perm, float* dx,
                                 int64_t dim) = 0;

  // Gradient of the router logits [rows, E]. dweight [A] is the gradient of each assignment's gate
  // weight; it flows through the scaling, the renormalisation (when `normalize`) and the score
  // function. ds_extra [rows, E] (optional) is added to the gradient of the scores first (the
  // auxiliary losses). The bias receives nothing.
  virtual void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                               const DispatchPlan& plan, const float* dweight,
                               const float* ds_extra, float* dlogits, int64_t rows) = 0;

  // Statistics of the auxiliary balancing losses, per chunk of rows: chunk c is rows
  // [chunk_offsets[c], chunk_offsets[c + 1]) (host array, ascending). For
  // every chunk and expert e, counts[c * E + e] = the chunk's tokens routed to e, and
  // psum[c * E + e] = the sum over the chunk's tokens, in row order and in double, of
  // s[t, e] / z[t] with z[t] = sum_j s[t, j] (a token whose scores are all 0 adds 0). counts and
  // psum are host arrays of chunks * E. The caller folds chunks into sequences (core/aux_loss.h),
  // so that a sequence split between calls — or processes — gives the same statistics.
  virtual void aux_partials(const RouterConfig& cfg, const float* scores, const DispatchPlan& plan,
                            const int64_t* chunk_offsets, int64_t chunks, int64_t* counts,
                            double* psum) = 0;

  // Gradient ds [rows, E] of an auxiliary loss sum_q sum_e coef[q, e] sum_{t in q} s[t, e] / z[t]
  // with respect to the scores (coef holds the loss's derivative through P, f carrying none):
  // sequence q is rows [seq_offsets[q], seq_offsets[q + 1]); rows outside every sequence get 0.
  // seq_offsets (num_seq + 1) and coef (num_seq * E) are host arrays.
  virtual void aux_grad(const RouterConfig& cfg, const float* scores, int64_t rows,
                        const int64_t* seq_offsets, int64_t num_seq, const double* coef,
                        float* ds) = 0;

  // Index of the first NaN or infinity among x[0 .. n), or -1 when all are finite (the session's
  // value checks, docs/design.md section 3: a result is checked, not only the inputs).
  virtual int64_t find_nonfinite(const float* x, int64_t n) = 0;

  // Softmax cross-entropy over `rows` rows of logits with one target each. chunk_loss (host)
  // receives one double per chunk of kReduceRows rows: the chunk's summed loss, its rows added in
  // order from zero (the caller folds them over the tree of grad_reduction.h). dlogits (optional)
  // = scale * (softmax - onehot). A row whose target is negative (an ignored target,
  // MOERT_IGNORE_TARGET, or padding) adds no loss and gets a zero gradient.
  virtual void cross_entropy(const float* logits, const int32_t* targets, int64_t rows,
                             int64_t vocab, float* dlogits, float scale,
                             std::vector<double>& chunk_loss) = 0;

  // dst[i] = dst[i] + src[i] for i < n: how partial sums of one gradient held by different
  // processes are combined.
  virtual void add(float* dst, const float* src, int64_t n) = 0;

  // ---- Optimizer.

  // Sum of squares of n values, in double, in a fixed order.
  virtual double sum_squares(const float* x, int64_t n) = 0;

  // The sum over i < count of sum_squares(xs[i], ns[i]), added in order. A device backend
  // overrides it to wait for the device once rather than once per array (the gradient norm).
  virtual double sum_squares_many(const float* const* xs, const int64_t* ns, size_t count) {
    double total = 0.0;
    for (size_t i = 0; i < count; ++i) total += sum_squares(xs[i], ns[i]);
    return total;
  }

  // Whether any of the count arrays xs[i] (ns[i] values each) holds a NaN or infinity: the check
  // of the parameters after an optimizer step. By default through sum_squares_many (the square
  // of every finite float is finite in double); a backend with a scan of its own overrides it.
  virtual bool any_nonfinite_many(const float* const* xs, const int64_t* ns, size_t count) {
    return !std::isfinite(sum_squares_many(xs, ns, count));
  }

  // One AdamW update of n parameters from gradient g * gscale (decoupled weight decay wd).
  virtual void adamw(float* p, const float* g, float* m, float* v, int64_t n, double lr,
                     double beta1, double beta2, double eps, double wd, double gscale,
                     double bias_correction1, double bias_correction2) = 0;

  // One parameter's AdamW update in adamw_many(): its values, gradient, moments, count and weight
  // decay.
  struct AdamWTensor {
    float* p;
    const float* g;
    float* m;
    float* v;
    int64_t n;
    double wd;
  };

  // adamw() on each of `count` tensors with the same step's hyperparameters. A model has many
  // small parameters (norms, routers, shared experts): a backend may update them as one piece of
  // work rather than each on its own. The default calls adamw() for each, in order.
  virtual void adamw_many(const AdamWTensor* tensors, size_t count, double lr, double beta1,
                          double beta2, double eps, double gscale, double bias_correction1,
                          double bias_correction2) {
    for (size_t i = 0; i < count; ++i) {
      const AdamWTensor& t = tensors[i];
      adamw(t.p, t.g, t.m, t.v, t.n, lr, beta1, beta2, eps, t.wd, gscale, bias_correction1,
            bias_correction2);
    }
  }

  // One SGD update with momentum buffer m and L2 weight decay wd.
  virtual void sgd(float* p, const float* g, float* m, int64_t n, double lr, double momentum,
                   double wd, double gscale) = 0;

 protected:
  // For a backend that keeps the routed experts' rows dense (kept_rows_stride's default): a row
  // stride other than dim reaching `call` is a caller's error.
  void dense_rows(int64_t ld, int64_t dim, const char* call) const {
    if (ld != dim)
      fail(Code::Internal, "the ", name(), " backend got rows at stride ", ld, " for width ", dim,
           " in ", call, ": it keeps them dense");
  }
};

// One of Backend's pairs, Begin now and End when the object goes.
template <void (Backend::*Begin)(), void (Backend::*End)() noexcept>
class BackendScope {
 public:
  explicit BackendScope(Backend& b) : b_(b) { (b_.*Begin)(); }
  ~BackendScope() { (b_.*End)(); }
  BackendScope(const BackendScope&) = delete;
  BackendScope& operator=(const BackendScope&) = delete;

 private:
  Backend& b_;
};

// A backend's device, current on this thread for the life of the object.
using ActiveDevice = BackendScope<&Backend::activate, &Backend::deactivate>;
// A stretch of computation (Backend::begin_compute) for the life of the object.
using ComputeStretch = BackendScope<&Backend::begin_compute, &Backend::end_compute>;

// The floats of the block scales of `matrices` matrices [rows, cols] (Fp8Weight's layout).
inline int64_t fp8_blocks_scale_floats(int64_t matrices, int64_t rows, int64_t cols) {
  return matrices * fp8::blocks_of(rows) * fp8::block_scale_ld(cols);
}

// The CPU backend with `threads` worker threads (the caller's included). The MoE experts' GEMMs
// run in `experts` precision: fp32; bf16 (bf16 copies of their weights, fp32 accumulation); or
// FP8 (FP8 copies, the exact emulation of kernels/cpu/fp8.h).
// `layouts`: whether FFN weights carry copies laid out as the forward's GEMMs read them without
// repacking. Auto: the fp32 ones a transposed copy where oneDNN runs AVX-512 kernels, whose sgemm
// multiplies the forward's rows by a weight read as [in, out] ("nn") 15-40 % faster than by one
// read as [out, in] ("nt", which it repacks on every call); the bf16 ones a packed copy where
// oneDNN multiplies bf16 natively (Backend::packed_bf16_bytes). On: the transposed copies on any
// CPU too. Off: neither.
enum class LayoutCopies { Auto, On, Off };
std::unique_ptr<Backend> make_cpu_backend(unsigned threads, Precision experts = Precision::Fp32,
                                          Fp8Options fp8 = {},
                                          LayoutCopies layouts = LayoutCopies::Auto);

// What the CPU backend multiplies with on this machine, for reports: oneDNN's effective ISA and
// the kernels of a bf16 session ("onednn" or "widening").
std::string cpu_gemm_isa();
std::string cpu_bf16_kernels();

// The CUDA backend from the plugin libmoert_cuda.so, loaded on first use: beside libmoert.so, or
// at `plugin_path` when not empty. Throws Error(Unsupported) with the reason when the plugin, the
// CUDA libraries or a usable GPU are missing.
// `experts`: what the experts multiply in (bf16, the CUDA backend's; a plugin refuses what it does
// not run with Unsupported).
std::unique_ptr<Backend> make_cuda_backend(int32_t device, const std::string& plugin_path,
                                           Precision experts = Precision::Bf16,
                                           Fp8Options fp8 = {});

}  // namespace moert
