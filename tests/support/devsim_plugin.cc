// libmoert_devsim.so: a test plugin with the CUDA plugin's contract whose "device" is host memory
// run by the CPU backend. It lets machines without a GPU exercise everything the core does for a
// device backend: loading and checking a plugin, a ParamStore with separate device copies (fp32 +
// bf16 for training, bf16 only for inference), uploads and downloads around the optimizer, the
// bias update and checkpoints, and the GPU test programs' own logic. GEMM weights are read from
// their bf16 copies whenever they have one, as the CUDA backend does, so a weight whose bf16 copy
// is stale or missing shows up as a wrong result.
//
// Like the CUDA backend, it gives gradients in acc mode only (no local roots). It also checks
// that every pointer the core hands to an operation lies in memory this backend allocated: on a
// GPU a host pointer in a kernel is an illegal address.
//
// It is not a model of the GPU's numerics (activations stay fp32 here) and proves nothing about
// the CUDA kernels; those are tested on a GPU (label gpu).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "core/backend.h"
#include "core/cuda_plugin.h"
#include "core/error.h"
#include "core/tensor_codec.h"
#include "moert/moert.h"

namespace moert {
namespace {

class DevSimBackend final : public Backend {
 public:
  // Experts in bf16 (the CUDA backend's) or FP8 (the CPU backend's emulation, on FP8 copies only).
  DevSimBackend(Precision experts, Fp8Options fp8)
      : cpu_(
            make_cpu_backend(2, experts == Precision::Fp8 ? Precision::Fp8 : Precision::Fp32, fp8)),
        fp8_(experts == Precision::Fp8) {}
  ~DevSimBackend() override {
    for (auto& [p, n] : blocks_) std::free(const_cast<char*>(p));
  }

  const char* name() const override { return "devsim"; }
  bool host_memory() const override { return false; }
  // As the CUDA plugin's: an fp8 session multiplies its experts in FP8 and the rest in fp32.
  Bf16Copies bf16_copies() const override { return fp8_ ? Bf16Copies::None : Bf16Copies::AllGemms; }
  bool fp8_experts() const override { return fp8_; }
  void quantize_weight_blocks(const float* src, int64_t matrices, int64_t rows, int64_t cols,
                              uint8_t* codes, float* scales, const char* what) override {
    device(src, matrices * rows * cols * 4, "quantize source");
    device(codes, matrices * rows * cols, "quantize codes");
    device(scales, fp8_blocks_scale_floats(matrices, rows, cols) * 4, "quantize scales");
    cpu_->quantize_weight_blocks(src, matrices, rows, cols, codes, scales, what);
  }

  void* allocate(size_t bytes) override {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) fail(Code::OutOfMemory, "devsim: cannot allocate ", bytes, " bytes");
    std::lock_guard<std::mutex> lock(mu_);
    blocks_[static_cast<const char*>(p)] = bytes;
    return p;
  }
  void deallocate(void* p, size_t) noexcept override {
    if (!p) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks_.erase(static_cast<const char*>(p));
    }
    std::free(p);
  }

  void upload(void* dst, const void* src, size_t bytes) override {
    device(dst, bytes, "upload destination");
    host(src, "upload source");
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    host(dst, "download destination");
    device(src, bytes, "download source");
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    device(dst, bytes, "copy destination");
    device(src, bytes, "copy source");
    if (bytes) std::memmove(dst, src, bytes);
  }
  void zero(void* dst, size_t bytes) override {
    device(dst, bytes, "zero");
    if (bytes) std::memset(dst, 0, bytes);
  }
  void to_bf16(const float* src, uint16_t* dst, int64_t n) override {
    device(src, n * 4, "to_bf16 source");
    device(dst, n * 2, "to_bf16 destination");
    cpu_->to_bf16(src, dst, n);
  }

  void linear(const float* x, Weight w, const float* bias, float* y, int64_t rows, int64_t in,
              int64_t out, bool accumulate) override {
    device(x, rows * in * 4, "linear x");
    device(bias, out * 4, "linear bias");
    device(y, rows * out * 4, "linear y");
    cpu_->linear(x, weight(w, out * in, w_[0]), bias, y, rows, in, out, accumulate);
  }
  void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
               float eps) override {
    device(x, rows * dim * 4, "rmsnorm x");
    device(w, dim * 4, "rmsnorm weight");
    device(y, rows * dim * 4, "rmsnorm y");
    device(inv_rms, rows * 4, "rmsnorm inv_rms");
    cpu_->rmsnorm(x, w, y, inv_rms, rows, dim, eps);
  }
  void embedding(const int32_t* tokens, const float* table, float* y, int64_t rows, int64_t context,
                 int64_t dim) override {
    device(tokens, rows * context * 4, "embedding tokens");
    device(table, 4, "embedding table");
    device(y, rows * context * dim * 4, "embedding y");
    cpu_->embedding(tokens, table, y, rows, context, dim);
  }
  void swiglu_ffn(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1, float* h3,
                  int64_t rows, int64_t dim, int64_t hidden, bool accumulate) override {
    device(x, rows * dim * 4, "swiglu x");
    device(y, rows * dim * 4, "swiglu y");
    device(h1, rows * hidden * 4, "swiglu h1");
    device(h3, rows * hidden * 4, "swiglu h3");
    const int64_t n = hidden * dim;
    cpu_->swiglu_ffn(x, weight(w1, n, w_[0]), weight(w3, n, w_[1]), weight(w2, n, w_[2]), y, h1, h3,
                     rows, dim, hidden, accumulate);
  }
  void route_topk(const RouterConfig& cfg, const float* logits, const float* bias, int64_t rows,
                  float* scores, int32_t* experts, float* weights) override {
    device(logits, rows * cfg.num_experts * 4, "route logits");
    device(bias, cfg.num_experts * 4, "route bias");
    device(scores, rows * cfg.num_experts * 4, "route scores");
    device(experts, rows * cfg.top_k * 4, "route experts");
    device(weights, rows * cfg.top_k * 4, "route weights");
    cpu_->route_topk(cfg, logits, bias, rows, scores, experts, weights);
  }
  void route_expert_choice(const RouterConfig& cfg, const float* logits, int64_t rows,
                           int64_t capacity, float* scores, DispatchPlan& plan, int64_t first,
                           int64_t plan_rows) override {
    device(logits, rows * cfg.num_experts * 4, "expert choice logits");
    device(scores, rows * cfg.num_experts * 4, "expert choice scores");
    cpu_->route_expert_choice(cfg, logits, rows, capacity, scores, cpu_plan_, first, plan_rows);
    adopt(plan);
  }
  void plan_dispatch(const int32_t* experts, const float* weights, int64_t rows, int64_t top_k,
                     int64_t num_experts, DispatchPlan& plan) override {
    device(experts, rows * top_k * 4, "plan experts");
    device(weights, rows * top_k * 4, "plan weights");
    cpu_->plan_dispatch(experts, weights, rows, top_k, num_experts, cpu_plan_);
    adopt(plan);
  }
  void dispatch(const DispatchPlan& plan, const float* x, float* x_perm, int64_t dim) override {
    device(x, plan.rows * dim * 4, "dispatch x");
    device(x_perm, plan.num_assignments() * dim * 4, "dispatch x_perm");
    cpu_->dispatch(plan, x, x_perm, dim);
  }
  void grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, Weight w1, Weight w3,
                          Weight w2, float* y_perm, float* h1, float* h3, int64_t dim,
                          int64_t hidden) override {
    const int64_t A = plan.num_assignments(), n = experts(plan) * hidden * dim;
    device(x_perm, A * dim * 4, "grouped x_perm");
    device(y_perm, A * dim * 4, "grouped y_perm");
    device(h1, A * hidden * 4, "grouped h1");
    device(h3, A * hidden * 4, "grouped h3");
    cpu_->grouped_swiglu_ffn(plan, x_perm, weight(w1, n, w_[0]), weight(w3, n, w_[1]),
                             weight(w2, n, w_[2]), y_perm, h1, h3, dim, hidden);
  }
  void combine(const DispatchPlan& plan, const float* y_perm, float* y, int64_t dim) override {
    device(y_perm, plan.num_assignments() * dim * 4, "combine y_perm");
    device(y, plan.rows * dim * 4, "combine y");
    cpu_->combine(plan, y_perm, y, dim);
  }

  void linear_backward(const float* x, Weight w, const float* dy, float* dx, bool dx_accumulate,
                       const GradOut& dw, const GradOut* db, int64_t rows, int64_t in,
                       int64_t out) override {
    device(x, rows * in * 4, "linear_backward x");
    device(dy, rows * out * 4, "linear_backward dy");
    device(dx, rows * in * 4, "linear_backward dx");
    device(dw.acc, out * in * 4, "linear_backward dw");
    if (db) device(db->acc, out * 4, "linear_backward db");
    acc_only(dw, "linear_backward");
    if (db) acc_only(*db, "linear_backward");
    cpu_->linear_backward(x, weight(w, out * in, w_[0]), dy, dx, dx_accumulate, dw, db, rows, in,
                          out);
  }
  void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                        float* dx, const GradOut& dw, int64_t rows, int64_t dim) override {
    for (const float* p : {x, dy, static_cast<const float*>(dx)})
      device(p, rows * dim * 4, "rmsnorm_backward rows");
    device(w, dim * 4, "rmsnorm_backward w");
    device(dw.acc, dim * 4, "rmsnorm_backward dw");
    device(inv_rms, rows * 4, "rmsnorm_backward inv_rms");
    acc_only(dw, "rmsnorm_backward");
    cpu_->rmsnorm_backward(x, w, inv_rms, dy, dx, dw, rows, dim);
  }
  void embedding_backward(const int32_t* tokens, const float* dy, const GradOut& dtable,
                          int64_t rows, int64_t context, int64_t dim, int64_t vocab) override {
    device(tokens, rows * context * 4, "embedding_backward tokens");
    device(dy, rows * context * dim * 4, "embedding_backward dy");
    device(dtable.acc, vocab * dim * 4, "embedding_backward dtable");
    acc_only(dtable, "embedding_backward");
    cpu_->embedding_backward(tokens, dy, dtable, rows, context, dim, vocab);
  }
  void swiglu_ffn_backward(const float* x, Weight w1, Weight w3, Weight w2, const float* h1,
                           const float* h3, const float* dy, float* dx, bool dx_accumulate,
                           const GradOut& dw1, const GradOut& dw3, const GradOut& dw2, int64_t rows,
                           int64_t dim, int64_t hidden) override {
    const int64_t n = hidden * dim;
    for (const float* p : {x, dy, static_cast<const float*>(dx)})
      device(p, rows * dim * 4, "swiglu_backward rows");
    for (const float* p : {h1, h3}) device(p, rows * hidden * 4, "swiglu_backward h");
    for (const GradOut* g : {&dw1, &dw3, &dw2}) device(g->acc, n * 4, "swiglu_backward dw");
    for (const GradOut* g : {&dw1, &dw3, &dw2}) acc_only(*g, "swiglu_ffn_backward");
    cpu_->swiglu_ffn_backward(x, weight(w1, n, w_[0]), weight(w3, n, w_[1]), weight(w2, n, w_[2]),
                              h1, h3, dy, dx, dx_accumulate, dw1, dw3, dw2, rows, dim, hidden);
  }
  void grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm, Weight w1,
                                   Weight w3, Weight w2, const float* h1, const float* h3,
                                   const float* dy_perm, float* dx_perm, const GradOut* dw1,
                                   const GradOut* dw3, const GradOut* dw2, int64_t dim,
                                   int64_t hidden, int64_t ld) override {
    dense_rows(ld, dim, "grouped_swiglu_ffn_backward");
    const int64_t A = plan.num_assignments(), E = experts(plan), n = E * hidden * dim;
    for (const float* p : {x_perm, dy_perm, static_cast<const float*>(dx_perm)})
      device(p, A * dim * 4, "grouped_backward rows");
    for (const float* p : {h1, h3}) device(p, A * hidden * 4, "grouped_backward h");
    for (const GradOut* g : {dw1, dw3, dw2})
      for (int64_t e = 0; e < E; ++e) {
        device(g[e].acc, hidden * dim * 4, "grouped_backward dw");
        acc_only(g[e], "grouped_swiglu_ffn_backward");
      }
    cpu_->grouped_swiglu_ffn_backward(plan, x_perm, weight(w1, n, w_[0]), weight(w3, n, w_[1]),
                                      weight(w2, n, w_[2]), h1, h3, dy_perm, dx_perm, dw1, dw3, dw2,
                                      dim, hidden, ld);
  }
  void combine_backward(const DispatchPlan& plan, const float* y_perm, const float* dy,
                        float* dy_perm, float* dweight, int64_t dim, int64_t ld) override {
    dense_rows(ld, dim, "combine_backward");
    const int64_t A = plan.num_assignments();
    device(y_perm, A * dim * 4, "combine_backward y_perm");
    device(dy, plan.rows * dim * 4, "combine_backward dy");
    device(dy_perm, A * dim * 4, "combine_backward dy_perm");
    device(dweight, A * 4, "combine_backward dweight");
    cpu_->combine_backward(plan, y_perm, dy, dy_perm, dweight, dim, ld);
  }
  void dispatch_backward(const DispatchPlan& plan, const float* dx_perm, float* dx,
                         int64_t dim) override {
    device(dx_perm, plan.num_assignments() * dim * 4, "dispatch_backward dx_perm");
    device(dx, plan.rows * dim * 4, "dispatch_backward dx");
    cpu_->dispatch_backward(plan, dx_perm, dx, dim);
  }
  void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                       const DispatchPlan& plan, const float* dweight, const float* ds_extra,
                       float* dlogits, int64_t rows) override {
    const int64_t n = rows * cfg.num_experts * 4;
    device(scores, n, "router_backward scores");
    device(ds_extra, n, "router_backward ds_extra");
    device(dlogits, n, "router_backward dlogits");
    device(dweight, plan.num_assignments() * 4, "router_backward dweight");
    cpu_->router_backward(cfg, normalize, scores, plan, dweight, ds_extra, dlogits, rows);
  }
  void aux_partials(const RouterConfig& cfg, const float* scores, const DispatchPlan& plan,
                    const int64_t* chunk_offsets, int64_t chunks, int64_t* counts,
                    double* psum) override {
    // chunk_offsets, counts and psum are host arrays by contract; the scores are the device's.
    host(chunk_offsets, "aux_partials chunk offsets");
    host(counts, "aux_partials counts");
    host(psum, "aux_partials psum");
    const int64_t rows = chunks > 0 ? chunk_offsets[chunks] : 0;
    device(scores, rows * cfg.num_experts * 4, "aux_partials scores");
    cpu_->aux_partials(cfg, scores, plan, chunk_offsets, chunks, counts, psum);
  }
  void aux_grad(const RouterConfig& cfg, const float* scores, int64_t rows,
                const int64_t* seq_offsets, int64_t num_seq, const double* coef,
                float* ds) override {
    host(seq_offsets, "aux_grad sequence offsets");
    host(coef, "aux_grad coefficients");
    device(scores, rows * cfg.num_experts * 4, "aux_grad scores");
    device(ds, rows * cfg.num_experts * 4, "aux_grad ds");
    cpu_->aux_grad(cfg, scores, rows, seq_offsets, num_seq, coef, ds);
  }
  int64_t find_nonfinite(const float* x, int64_t n) override {
    device(x, n * 4, "find_nonfinite");
    return cpu_->find_nonfinite(x, n);
  }
  void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                     float* dlogits, float scale, std::vector<double>& chunk_loss) override {
    device(logits, rows * vocab * 4, "cross_entropy logits");
    device(targets, rows * 4, "cross_entropy targets");
    device(dlogits, rows * vocab * 4, "cross_entropy dlogits");
    cpu_->cross_entropy(logits, targets, rows, vocab, dlogits, scale, chunk_loss);
  }
  void add(float* dst, const float* src, int64_t n) override {
    device(dst, n * 4, "add destination");
    device(src, n * 4, "add source");
    cpu_->add(dst, src, n);
  }
  double sum_squares(const float* x, int64_t n) override {
    device(x, n * 4, "sum_squares");
    return cpu_->sum_squares(x, n);
  }
  void adamw(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
             double beta2, double eps, double wd, double gscale, double bc1, double bc2) override {
    for (const float* q : {static_cast<const float*>(p), g, static_cast<const float*>(m),
                           static_cast<const float*>(v)})
      device(q, n * 4, "adamw");
    cpu_->adamw(p, g, m, v, n, lr, beta1, beta2, eps, wd, gscale, bc1, bc2);
  }
  void sgd(float* p, const float* g, float* m, int64_t n, double lr, double momentum, double wd,
           double gscale) override {
    for (const float* q : {static_cast<const float*>(p), g, static_cast<const float*>(m)})
      device(q, n * 4, "sgd");
    cpu_->sgd(p, g, m, n, lr, momentum, wd, gscale);
  }

 private:
  // Fails unless [p, p + bytes) lies inside one allocation of this backend (null passes: the
  // operations take optional pointers).
  void device(const void* p, int64_t bytes, const char* what) const {
    if (!p) return;
    const char* c = static_cast<const char*>(p);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = blocks_.upper_bound(c);
    if (it == blocks_.begin() || c + bytes > std::prev(it)->first + std::prev(it)->second)
      fail(Code::Internal, "devsim: ", what, " (", bytes,
           " bytes) is not in memory of this backend");
  }
  void host(const void* p, const char* what) const {
    const char* c = static_cast<const char*>(p);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = blocks_.upper_bound(c);
    if (it != blocks_.begin() && c < std::prev(it)->first + std::prev(it)->second)
      fail(Code::Internal, "devsim: ", what, " is device memory, not host memory");
  }

  // The CPU backend fills plans in its own memory; the caller's plan gets this backend's.
  void adopt(DispatchPlan& plan) {
    const DispatchPlan& c = cpu_plan_;
    plan.rows = c.rows;
    plan.host_offsets = c.host_offsets;
    auto take = [&](auto& dst, const auto& src) {
      dst.resize(*this, src.size());
      if (src.size()) std::memcpy(dst.data(), src.data(), src.bytes());
    };
    take(plan.expert_offsets, c.expert_offsets);
    take(plan.token, c.token);
    take(plan.expert, c.expert);
    take(plan.weight, c.weight);
    take(plan.token_offsets, c.token_offsets);
    take(plan.token_assign, c.token_assign);
  }

  // As the CUDA backend: gradients in acc mode only (no local roots), so that device sessions
  // among ranks take the path they take on a GPU (core/session_local_gradients.cc).
  static void acc_only(const GradOut& g, const char* op) {
    if (g.roots)
      fail(Code::Unsupported, "devsim: ", op,
           " gives gradients in acc mode only, as the CUDA backend does (no local roots)");
  }

  int64_t experts(const DispatchPlan& plan) const {
    return static_cast<int64_t>(plan.host_offsets.size()) - 1;
  }

  // The weight as the CUDA backend multiplies it: its FP8 copy when it has one (alone, so that a
  // stale or missing copy shows), else its bf16 copy (decoded into `scratch`), else its fp32
  // values.
  Weight weight(Weight w, int64_t n, std::vector<float>& scratch) const {
    device(w.f32, n * 4, "weight (fp32)");
    device(w.bf16, n * 2, "weight (bf16)");
    if (w.fp8) {
      device(w.fp8.codes, n, "weight (FP8 codes)");
      device(w.fp8.scales, n / w.fp8.matrix_elements * w.fp8.matrix_scales * 4,
             "weight (FP8 scales)");
      return {nullptr, nullptr, w.fp8};
    }
    if (!w.bf16) {
      if (!w.f32) fail(Code::Internal, "devsim: a weight has neither fp32 nor bf16 values");
      return w;
    }
    scratch.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) scratch[i] = bf16_to_float(w.bf16[i]);
    return {scratch.data(), nullptr};
  }

  std::unique_ptr<Backend> cpu_;
  bool fp8_;
  mutable std::mutex mu_;
  std::map<const char*, size_t> blocks_;
  std::vector<float> w_[3];
  DispatchPlan cpu_plan_;
};

}  // namespace
}  // namespace moert

MOERT_DEFINE_CUDA_PLUGIN_IDENTITY()

extern "C" {

__attribute__((visibility("default"))) moert::Backend* moert_cuda_plugin_create(
    int32_t device, int32_t precision, int32_t fp8_power_of_two_scales, int32_t* code,
    char* message, size_t message_len) {
  if (device != 0) {
    if (code) *code = static_cast<int32_t>(moert::Code::InvalidArgument);
    if (message && message_len)
      std::snprintf(message, message_len, "devsim: CUDA device %d does not exist (1 device(s))",
                    device);
    return nullptr;
  }
  try {
    const auto experts = static_cast<moert::Precision>(precision);
    if (experts != moert::Precision::Bf16 && experts != moert::Precision::Fp8) {
      if (code) *code = static_cast<int32_t>(moert::Code::Unsupported);
      if (message && message_len)
        std::snprintf(message, message_len, "devsim: experts multiply in bf16 or fp8, not %d",
                      precision);
      return nullptr;
    }
    return new moert::DevSimBackend(experts, {fp8_power_of_two_scales != 0});
  } catch (const std::exception& e) {
    if (code) *code = static_cast<int32_t>(moert::Code::Internal);
    if (message && message_len) std::snprintf(message, message_len, "%s", e.what());
    return nullptr;
  }
}

}  // extern "C"
