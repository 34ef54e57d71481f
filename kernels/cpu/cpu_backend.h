// The CPU backend: single-threaded GEMMs (oneDNN, or the bf16 widening kernels) spread over the
// session's threads. Work is cut into fixed items independent of the thread count, so results do
// not depend on it; items over rows never straddle a multiple of kReduceRows (counted from the
// first row, or from the start of an expert's list), so that a process holding a chunk-aligned
// part of the rows runs the very same GEMM calls on them.
//
// Internal to kernels/cpu: the rest of moert sees it as a Backend (make_cpu_backend).
#pragma once

#include <memory>
#include <vector>

#include "core/backend.h"
#include "kernels/cpu/fp8.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/row_reduction.h"
#include "kernels/cpu/signal_guard.h"
#include "kernels/cpu/thread_pool.h"

namespace moert::cpu {

class CpuBackend final : public Backend {
 public:
  CpuBackend(unsigned threads, Precision experts, Fp8Options fp8, LayoutCopies layouts);

  const char* name() const override { return "cpu"; }
  bool host_memory() const override { return true; }
  // The asynchronous signals blocked once for the stretch (signal_guard.h): its parallel_for
  // calls and GEMMs then find the mask set instead of changing it twice each.
  void begin_compute() override { block_async_signals_for_now(); }
  void end_compute() noexcept override { restore_async_signals(); }
  Bf16Copies bf16_copies() const override { return bf16_ ? Bf16Copies::Experts : Bf16Copies::None; }
  bool fp8_experts() const override { return precision_ == Precision::Fp8; }
  Fp8Options fp8_options() const override { return fp8_; }
  bool transposed_copies() const override { return transposed_; }
  void transpose_matrices(const float* src, int64_t matrices, int64_t rows, int64_t cols,
                          float* dst) override;
  // A packed matrix: its rows in blocks of pack_rows(rows) (the forward's column units), each
  // packed alone (Bf16Gemm::pack), block b at b * packed_bytes(pack_rows(rows), cols).
  int64_t packed_bf16_bytes(int64_t rows, int64_t cols) override;
  void pack_bf16(const uint16_t* src, int64_t matrices, int64_t rows, int64_t cols,
                 void* dst) override;

  // ---- Memory (cpu_backend.cc)
  size_t work_bytes() const override;
  void release_work() override;
  void set_spin_wait(int64_t microseconds) override { pool_.set_spin_wait(microseconds); }
  void* allocate(size_t bytes) override;
  void deallocate(void* p, size_t bytes) noexcept override;
  void upload(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override;
  void zero(void* dst, size_t bytes) override;
  void zero_many(void* const* dsts, const size_t* bytes, size_t count) override;
  void to_bf16(const float* src, uint16_t* dst, int64_t n) override;
  void add(float* dst, const float* src, int64_t n) override;
  // (cpu_ffn_fp8.cc)
  void quantize_weight_blocks(const float* src, int64_t matrices, int64_t rows, int64_t cols,
                              uint8_t* codes, float* scales, const char* what) override;

  // ---- Forward (cpu_backend.cc; the GEMM layers in cpu_ffn.cc)
  void linear(const float* x, Weight w, const float* bias, float* y, int64_t rows, int64_t in,
              int64_t out, bool accumulate) override;
  void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
               float eps) override;
  void embedding(const int32_t* tokens, const float* table, float* y, int64_t rows, int64_t context,
                 int64_t dim) override;
  void swiglu_ffn(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1, float* h3,
                  int64_t rows, int64_t dim, int64_t hidden, bool accumulate) override;
  void route_topk(const RouterConfig& cfg, const float* logits, const float* bias, int64_t rows,
                  float* scores, int32_t* experts, float* weights) override;
  void route_expert_choice(const RouterConfig& cfg, const float* logits, int64_t rows,
                           int64_t capacity, float* scores, DispatchPlan& plan, int64_t first,
                           int64_t plan_rows) override;
  void plan_dispatch(const int32_t* experts, const float* weights, int64_t rows, int64_t top_k,
                     int64_t num_experts, DispatchPlan& plan) override;
  void dispatch(const DispatchPlan& plan, const float* x, float* x_perm, int64_t dim) override;
  void grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, Weight w1, Weight w3,
                          Weight w2, float* y_perm, float* h1, float* h3, int64_t dim,
                          int64_t hidden) override;
  void dispatch_swiglu_ffn(const DispatchPlan& plan, const float* x, float* x_perm,
                           bool keep_x_perm, Weight w1, Weight w3, Weight w2, float* y_perm,
                           float* h1, float* h3, int64_t dim, int64_t hidden, int64_t ld) override;
  // Both FFNs' items in one parallel stretch; in bf16 inference x is converted once for both.
  void routed_and_shared_ffn(const DispatchPlan& plan, const float* x, float* x_perm,
                             bool keep_x_perm, Weight w1, Weight w3, Weight w2, float* y_perm,
                             float* h1, float* h3, int64_t dim, int64_t hidden, int64_t ld,
                             const SharedExpert& shared) override;
  // Direct mode's padded stride (wgrad_ld) where the experts' backward runs in Direct mode.
  int64_t kept_rows_stride(Weight w1, Weight w3, Weight w2, int64_t dim,
                           int64_t hidden) const override;
  void combine(const DispatchPlan& plan, const float* y_perm, float* y, int64_t dim) override;

  // ---- Training
  void linear_backward(const float* x, Weight w, const float* dy, float* dx, bool dx_accumulate,
                       const GradOut& dw, const GradOut* db, int64_t rows, int64_t in,
                       int64_t out) override;
  void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                        float* dx, const GradOut& dw, int64_t rows, int64_t dim) override;
  void embedding_backward(const int32_t* tokens, const float* dy, const GradOut& dtable,
                          int64_t rows, int64_t context, int64_t dim, int64_t vocab) override;
  void swiglu_ffn_backward(const float* x, Weight w1, Weight w3, Weight w2, const float* h1,
                           const float* h3, const float* dy, float* dx, bool dx_accumulate,
                           const GradOut& dw1, const GradOut& dw3, const GradOut& dw2, int64_t rows,
                           int64_t dim, int64_t hidden) override;
  void grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm, Weight w1,
                                   Weight w3, Weight w2, const float* h1, const float* h3,
                                   const float* dy_perm, float* dx_perm, const GradOut* dw1,
                                   const GradOut* dw3, const GradOut* dw2, int64_t dim,
                                   int64_t hidden, int64_t ld) override;
  void combine_backward(const DispatchPlan& plan, const float* y_perm, const float* dy,
                        float* dy_perm, float* dweight, int64_t dim, int64_t ld) override;
  void dispatch_backward(const DispatchPlan& plan, const float* dx_perm, float* dx,
                         int64_t dim) override;
  void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                       const DispatchPlan& plan, const float* dweight, const float* ds_extra,
                       float* dlogits, int64_t rows) override;
  void aux_partials(const RouterConfig& cfg, const float* scores, const DispatchPlan& plan,
                    const int64_t* chunk_offsets, int64_t chunks, int64_t* counts,
                    double* psum) override;
  void aux_grad(const RouterConfig& cfg, const float* scores, int64_t rows,
                const int64_t* seq_offsets, int64_t num_seq, const double* coef,
                float* ds) override;
  int64_t find_nonfinite(const float* x, int64_t n) override;
  void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                     float* dlogits, float scale, std::vector<double>& chunk_loss) override;

  // ---- Optimizer
  double sum_squares(const float* x, int64_t n) override;
  // Every array's blocks in one parallel_for (the gradient norm and the step's overflow check
  // visit every parameter, most of them one block), summed as sum_squares() each, in order.
  double sum_squares_many(const float* const* xs, const int64_t* ns, size_t count) override;
  bool any_nonfinite_many(const float* const* xs, const int64_t* ns, size_t count) override;
  void adamw(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
             double beta2, double eps, double wd, double gscale, double bias_correction1,
             double bias_correction2) override;
  // Every tensor's blocks in one parallel_for: the main job's step updates about twenty
  // parameters, most of one block, which one call each ran on one thread while the others
  // waited.
  void adamw_many(const AdamWTensor* tensors, size_t count, double lr, double beta1, double beta2,
                  double eps, double gscale, double bc1, double bc2) override;
  void sgd(float* p, const float* g, float* m, int64_t n, double lr, double momentum, double wd,
           double gscale) override;

 private:
  // A run of rows multiplied by one FFN's weights: the token rows of a dense FFN, or one expert's
  // assignments. first_chunk numbers its chunks in roots mode.
  struct Segment {
    Weight w1, w3, w2;
    int64_t begin = 0, rows = 0;
    const GradOut *dw1 = nullptr, *dw3 = nullptr, *dw2 = nullptr;
  };
  // Work items over rows: [begin, begin + rows) of a segment, `unit` rows (the last may be
  // shorter) from its first row on: a chunk (kReduceRows), or FP8 Wgrad's token tile
  // (kFp8ShareRows: whole chunks).
  struct Item {
    size_t segment;
    int64_t begin, rows;
  };
  static std::vector<Item> row_items(const std::vector<Segment>& segments,
                                     int64_t unit = kReduceRows);

  // Rows an FFN forward gathers itself: row r of its input is src[token[r]], written to kept
  // (row stride kept_ld) when that is set. The call's x is then not read.
  struct Gather {
    const float* src = nullptr;
    const int32_t* token = nullptr;
    float* kept = nullptr;
    int64_t src_rows = 0;  // rows of src (the plan's tokens)
    int64_t kept_ld = 0;
  };
  // The experts of `plan` (weights from expert 0 of w1, w3, w2) as segments, those without rows
  // left out.
  static std::vector<Segment> expert_segments(const DispatchPlan& plan, Weight w1, Weight w3,
                                              Weight w2, int64_t dim, int64_t hidden);
  // One FFN of a forward call: its segments, where their rows come from and where they go.
  struct ForwardFfn {
    std::vector<Segment> segs;
    const float* x = nullptr;  // the rows (row stride dim), unless gathered
    float *y = nullptr, *h1 = nullptr, *h3 = nullptr;
    int64_t hidden = 0;
    bool accumulate = false;
    const Gather* gather = nullptr;
    // Before the down GEMM adds to y's columns, they are set to x's (Copy) or to zero (Zero): a
    // shared expert's residual, written where its GEMM reads it next. Needs accumulate and x.
    enum class Init { None, Copy, Zero } init = Init::None;
    // Errors name rows of the layer (a shared expert's), not of the call's segments.
    bool layer_rows = false;
  };
  // A routed call's gather of its rows from x (Code::Internal for a stride it does not keep),
  // and its FFN.
  Gather routed_gather(const DispatchPlan& plan, const float* x, float* x_perm, bool keep_x_perm,
                       Weight w1, Weight w3, Weight w2, int64_t dim, int64_t hidden,
                       int64_t ld) const;
  static ForwardFfn routed_ffn(const DispatchPlan& plan, const Gather* gather, const float* x_perm,
                               Weight w1, Weight w3, Weight w2, float* y_perm, float* h1, float* h3,
                               int64_t dim, int64_t hidden);
  // The FFN forward of each item of every FFN (cpu_ffn.cc) in one parallel stretch, their rows
  // from x or gathered. An FFN without a gather whose x is a gathering FFN's source reads that
  // source's bf16 conversion where the call converts it (a MoE layer's shared expert).
  void ffn_forward(const std::vector<ForwardFfn>& ffns, int64_t dim);
  void ffn_forward(const std::vector<Segment>& segs, const float* x, float* y, float* h1, float* h3,
                   int64_t dim, int64_t hidden, bool accumulate, const Gather* gather = nullptr);
  // FP8 Fprop of an item of m rows (cpu_ffn_fp8.cc): h1, h3 (row stride hidden) = x W1^T, x W3^T
  // on hidden columns [c0, c0 + n); y (row stride dim) (+)= a W2^T on output columns [c0, c0 + n).
  // row0: the item's first row, named in errors.
  void fp8_up(const Segment& s, int64_t m, int64_t row0, const float* x, float* h1, float* h3,
              int64_t c0, int64_t n, int64_t dim, int64_t hidden, unsigned worker);
  void fp8_down(const Segment& s, int64_t m, int64_t row0, const float* a, float* y, int64_t c0,
                int64_t n, int64_t dim, int64_t hidden, bool accumulate, unsigned worker);
  // How ffn_backward's GEMMs read their operands (cpu_ffn.cc).
  enum class Mode { Direct, Transposed, Bf16, Fp8 };
  // An FFN's weights transposed (Transposed mode): w1, w3 as [dim, hidden], w2 as [hidden, dim].
  struct Transposed {
    const float *w1, *w3, *w2;
  };
  // Bf16 mode: whether the Wgrad's right operands x and a are kept as rows ([rows, width], row
  // stride width) rather than transposed per chunk like the left ones (dy, dh1, dh3).
  struct WgradRows {
    bool x = false, a = false;
  };
  void backward_item(Mode mode, const Segment& s, const Item& it, const float* x, const float* h1,
                     const float* h3, const float* dy, float* dx, bool dx_accumulate, int64_t dim,
                     int64_t hidden, int64_t ld, Transposed wt, WgradRows rows, unsigned worker);
  // backward_item in FP8 (cpu_ffn_fp8.cc), on an item of one 128-token tile (kFp8ShareRows
  // rows): Dgrad on row tiles; the Wgrad operands quantized in column tiles, the item being one
  // tile, into t_x_ ... t_dh3_ (codes [rows, width]) and t_fp8_scales_ (item `item`'s scales).
  void backward_item_fp8(const Segment& s, const Item& it, size_t item, const float* x,
                         const float* h1, const float* h3, const float* dy, float* dx,
                         bool dx_accumulate, int64_t dim, int64_t hidden, unsigned worker);
  // Operand k (0 dy, 1 x, 2 a, 3 dh1, 4 dh3) of FP8 Wgrad, in column tiles, from the first row of
  // item `item` (which begins at row `row`) on.
  struct Fp8Operand {
    uint8_t* codes;
    int64_t ld;
    float* scales;
    int64_t scale_ld;
    fp8::ColumnTiles tiles() const { return {codes, ld, scales, scale_ld}; }
  };
  Fp8Operand fp8_wgrad_operand(int k, size_t item, int64_t row, int64_t dim, int64_t hidden);
  // Column tiles per item, and an item's scales.
  static_assert(kFp8ShareRows == fp8::kBlock, "an FP8 backward item is one Wgrad token tile");
  static constexpr int64_t kFp8ItemTiles = 1;
  static int64_t fp8_item_scales(int64_t dim, int64_t hidden) {
    return kFp8ItemTiles * (2 * dim + 3 * hidden);
  }
  // The mode ffn_backward runs weights in: FP8 or bf16 where all of them carry such copies, else
  // by their size (cpu_ffn.cc).
  Mode backward_mode(bool all_bf16, bool all_fp8, int64_t dim, int64_t hidden) const;
  // The FFN backward of every segment: dx (+)= and the weight gradients (cpu_ffn.cc); x and dy
  // at row stride ld (dim, or Direct mode's wgrad_ld).
  void ffn_backward(const std::vector<Segment>& segs, const float* x, const float* h1,
                    const float* h3, const float* dy, float* dx, bool dx_accumulate, int64_t dim,
                    int64_t hidden, int64_t ld);

  bool bf16_;
  // The fp32 forward multiplies by Weight::f32t ("nn") where a weight carries it; the bf16
  // forward by Weight::bf16_packed.
  bool transposed_, packed_;
  Precision precision_;
  Fp8Options fp8_;
  ThreadPool pool_;
  Bf16Gemm bf16_gemm_;
  DenseReducer reducer_;
  struct Scratch {
    std::vector<float> f;
    std::vector<unsigned char> bytes;
    std::vector<float> quant;  // FP8 tile scales and the FP8 GEMMs' scratch
  };
  std::vector<Scratch> scratch_;  // one per worker
  // Backward operands of the Wgrad partials: chunk by chunk transposed, or (Direct mode) rows at
  // padded strides (kept between calls, never initialised).
  Buffer<unsigned char> t_x_, t_dy_, t_a_, t_dh1_, t_dh3_, t_lin_x_, t_lin_dy_;
  // FP8 Wgrad: the column-tile scales of every item's five operands (fp8_wgrad_operand).
  Buffer<float> t_fp8_scales_;
  // fp32 Dgrad reads its weights transposed, as the "nt" GEMM oneDNN's AVX2 kernels run fastest:
  // where the weights carry no transposed copies, made once per backward call, for as many
  // weights at a time as kTransposedWeights floats allow.
  Buffer<float> t_w_;
  // Forward items of at most kFewRows rows are cut into column units of the up (w1, w3) and down
  // (w2) GEMMs (a packed weight of up to kWholeRows rows is one unit); their activations live in
  // cut_ between the two.
  static constexpr int64_t kFewRows = 16, kUpColumns = 256, kDownColumns = 512;
  // So are all items of a call of fewer than kCutItems items on weights of kCutWeights elements
  // or more, where their activations (kept in cut_ between the two) take at most kCutFloats.
  static constexpr int64_t kCutItems = 8, kCutWeights = int64_t{1} << 20,
                           kCutFloats = int64_t{1} << 24;
  // Rows of a weight (output columns of its GEMM) packed together: a weight of up to kWholeRows
  // rows whole, so that one GEMM writes its output rows in place (oneDNN 2.6 has only its
  // reference kernel for a packed weight's product into a longer row stride: Bf16Gemm then
  // computes into a dense block and copies it: with the gathers, a fifth of the bench layer's
  // bf16 forward went to memmove on AMX); larger ones in blocks of kPackRows, so that every column
  // unit above is a whole number of blocks.
  static constexpr int64_t kPackRows = 256, kWholeRows = 512;
  static_assert(kUpColumns % kPackRows == 0 && kDownColumns % kPackRows == 0);
  static int64_t pack_rows(int64_t rows) { return rows <= kWholeRows ? rows : kPackRows; }
  // The column units of a packed weight of `rows` rows cut into units of `unit`: the whole
  // weight where it is packed whole (other layouts take units of `unit` at any width).
  static int64_t unit_columns(int64_t rows, int64_t unit) {
    return rows <= kWholeRows ? rows : unit;
  }
  // c[m, n] (+)= a[m, k] w^T on the output columns [c0, c0 + n) of a weight w of `rows` rows
  // packed as pack_bf16 packs it (c and w from column c0): whole blocks of pack_rows(rows), the
  // last one possibly shorter (Code::Internal otherwise).
  void packed_nt(const void* a, int64_t lda, const unsigned char* w, int64_t rows, float* c,
                 int64_t ldc, int64_t m, int64_t c0, int64_t n, int64_t k, bool accumulate,
                 unsigned worker);
  Buffer<float> cut_;
  // The gathered rows of those items, when the call does not keep them in its x.
  Buffer<float> cut_x_;
  // The source rows a bf16 forward's items gather, in the up GEMMs' operand form, each converted
  // once per call (ffn_forward): a token's row is copied to its top-K items, not rounded K times.
  Buffer<unsigned char> src_bf16_;
  static constexpr int64_t kTransposedWeights = int64_t{64} << 20;
  // Below this many elements a weight's fp32 GEMMs are small enough that oneDNN's nn and tn
  // kernels run as fast as nt, and the transposes would cost more than they save: Dgrad and
  // Wgrad then read the row-major operands directly. On AVX-512 every size does: oneDNN 2.6's
  // avx512_core sgemm runs nn and tn at the layer's 64-row shapes as fast as nt or faster (Zen 5:
  // nn 199 against nt 163 GFLOP/s, tn 213 against nt 198), unlike its AVX2 kernels.
  static constexpr int64_t kDirectBelow = 65536;
  const int64_t direct_below_;
};

}  // namespace moert::cpu
