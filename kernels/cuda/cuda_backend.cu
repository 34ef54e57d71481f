// The CUDA backend (libmoert_cuda.so): bf16 GEMMs with fp32 accumulation through cuBLASLt,
// everything else in fp32 kernels. All work is queued on one stream. The host waits for the
// device only where a value must come back: plan_dispatch (the per-expert counts decide the GEMM
// shapes), downloads, and the scalar results (losses, gradient norm), each summed on the host in
// a fixed order. A session of precision fp8 multiplies its experts through cuda_ffn_fp8.h (which
// also waits once per FFN call, for its NaN check) and its other GEMMs in fp32.
#include <cstdio>
#include <cstring>
#include <cub/device/device_radix_sort.cuh>
#include <new>
#include <vector>

#include "core/backend.h"
#include "core/cuda_plugin.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ffn_fp8.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/kernels.h"
#include "kernels/router_rules.h"
#include "moert/moert.h"

namespace moert::cuda {
namespace {

constexpr int64_t kNormRowBlock = 64;

// Gives the calling thread back the device it had when this was made: the backend selects its own
// device to work, and must not move a host program that uses CUDA itself off its device.
class DeviceRestore {
 public:
  DeviceRestore() {
    if (cudaGetDevice(&outer_) != cudaSuccess) {
      cudaGetLastError();
      outer_ = -1;
    }
  }
  ~DeviceRestore() {
    if (outer_ >= 0) cudaSetDevice(outer_);
  }
  DeviceRestore(const DeviceRestore&) = delete;
  DeviceRestore& operator=(const DeviceRestore&) = delete;

 private:
  int outer_ = -1;
};

int bits_for(uint64_t v) {
  int b = 1;
  while (b < 64 && (uint64_t{1} << b) <= v) ++b;
  return b;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int32_t device, Precision experts, Fp8Options fp8) : device_(device) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0)
      fail(Code::Unsupported,
           "no CUDA device is usable: ", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    if (device < 0 || device >= count)
      fail(Code::InvalidArgument, "CUDA device ", device, " does not exist (", count,
           " device(s))");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    if (prop.major != 9)
      fail(Code::Unsupported, "this CUDA plugin is built for Hopper (sm_90a); device ", device,
           " (", prop.name, ") has compute capability ", prop.major, ".", prop.minor);
    const DeviceRestore restore;
    check(cudaSetDevice(device), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    try {
      gemm_ = std::make_unique<Gemm>(stream_);
      if (experts == Precision::Fp8)
        ffn_fp8_ = std::make_unique<FfnFp8>(*this, *gemm_, stream_, fp8);
    } catch (...) {
      ffn_fp8_.reset();
      gemm_.reset();
      cudaStreamDestroy(stream_);  // no destructor runs for a constructor that throws
      throw;
    }
  }

  ~CudaBackend() override {
    const DeviceRestore restore;
    cudaSetDevice(device_);
    // Scratch buffers free themselves through deallocate(); the stream goes last.
    ffn_fp8_.reset();
    gemm_.reset();
    release_scratch();
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "cuda"; }
  bool host_memory() const override { return false; }
  void* native_stream() const override { return stream_; }
  // An fp8 session multiplies its experts in FP8 and every other GEMM in fp32, as the CPU's does
  // (docs/design.md section 5: embedding, head and dense layers stay fp32); bf16: all in bf16.
  Bf16Copies bf16_copies() const override {
    return ffn_fp8_ ? Bf16Copies::None : Bf16Copies::AllGemms;
  }
  bool fp8_experts() const override { return ffn_fp8_ != nullptr; }
  void quantize_weight_blocks(const float* src, int64_t matrices, int64_t rows, int64_t cols,
                              uint8_t* codes, float* scales, const char* what) override {
    if (!ffn_fp8_)
      return Backend::quantize_weight_blocks(src, matrices, rows, cols, codes, scales, what);
    ffn_fp8_->quantize_weight_blocks(src, matrices, rows, cols, codes, scales, what);
  }
  void activate() override {
    if (depth_ == 0) {
      check(cudaGetDevice(&outer_), "cudaGetDevice");
      if (outer_ != device_) select();
    }
    ++depth_;
  }
  void deactivate() noexcept override {
    if (depth_ > 0 && --depth_ == 0 && outer_ != device_) cudaSetDevice(outer_);
  }

  // ---- Memory

  void* allocate(size_t bytes) override {
    const DeviceRestore restore;
    select();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(e == cudaErrorMemoryAllocation ? Code::OutOfMemory : Code::Internal,
           "CUDA: cannot allocate ", bytes, " bytes on device ", device_, ": ",
           cudaGetErrorString(e));
    }
    return p;
  }
  void deallocate(void* p, size_t) noexcept override {
    // cudaFree waits for the device to finish with p: a scratch buffer may be freed (resized)
    // while kernels queued on the stream still read it.
    const DeviceRestore restore;
    cudaSetDevice(device_);
    // A failure here cannot be reported; clear it, or the next kernel's launch check would
    // report it as its own.
    if (cudaFree(p) != cudaSuccess) cudaGetLastError();
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (!bytes) return;
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "upload");
    sync();
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (!bytes) return;
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
    sync();
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src)
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
  }
  void zero(void* dst, size_t bytes) override {
    if (bytes) check(cudaMemsetAsync(dst, 0, bytes, stream_), "memset");
  }
  void to_bf16(const float* src, uint16_t* dst, int64_t n) override {
    cuda::to_bf16(src, dst, n, /*saturate=*/true, stream_);
  }

  // ---- Forward

  void linear(const float* x, Weight w, const float* bias, float* y, int64_t rows, int64_t in,
              int64_t out, bool accumulate) override {
    matmul_nt(x, w, y, rows, out, in, accumulate ? 1.0f : 0.0f, sx_);
    if (bias) add_bias(y, bias, rows, out, stream_);
  }

  void rmsnorm(const float* x, const float* w, float* y, float* inv_rms, int64_t rows, int64_t dim,
               float eps) override {
    cuda::rmsnorm(x, w, y, inv_rms, rows, dim, eps, stream_);
  }

  void embedding(const int32_t* tokens, const float* table, float* y, int64_t rows, int64_t context,
                 int64_t dim) override {
    cuda::embedding(tokens, table, y, rows * context, dim, stream_);
  }

  void swiglu_ffn(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1, float* h3,
                  int64_t rows, int64_t dim, int64_t hidden, bool accumulate) override {
    if (ffn_fp8_) {  // FP8 experts (shared ones here), fp32 dense FFNs: cuda_ffn_fp8.h
      if (FfnFp8::all_fp8(w1, w3, w2))
        ffn_fp8_->forward({{w1, w3, w2, 0, rows}}, x, y, h1, h3, dim, hidden, accumulate);
      else
        ffn_fp8_->forward_f32(x, w1, w3, w2, y, h1, h3, rows, dim, hidden, accumulate);
      return;
    }
    const size_t n = static_cast<size_t>(rows * hidden);
    if (!h1) {
      f1_.resize(*this, n);
      f2_.resize(*this, n);
      h1 = f1_.data();
      h3 = f2_.data();
    }
    const uint16_t* xb = bf16_of(x, rows * dim, sx_);
    gemm_nt_bf16(xb, dim, w1, h1, rows, hidden, dim, 0.0f);
    gemm_nt_bf16(xb, dim, w3, h3, rows, hidden, dim, 0.0f);
    sa_.resize(*this, n);
    swiglu_bf16(h1, h3, sa_.data(), static_cast<int64_t>(n), stream_);
    gemm_nt_bf16(sa_.data(), hidden, w2, y, rows, dim, hidden, accumulate ? 1.0f : 0.0f);
  }

  void route_topk(const RouterConfig& cfg, const float* logits, const float* bias, int64_t rows,
                  float* scores, int32_t* experts, float* weights) override {
    route_scratch_.resize(*this, static_cast<size_t>(rows * rules::route_scratch_floats(cfg)));
    cuda::route_topk(cfg, logits, bias, rows, scores, experts, weights, route_scratch_.data(),
                     stream_);
  }

  void route_expert_choice(const RouterConfig&, const float*, int64_t, int64_t, float*,
                           DispatchPlan&, int64_t, int64_t) override {
    fail(Code::Unsupported,
         "Expert Choice routing runs on the CPU backend only; the CUDA "
         "backend implements token-choice routing");
  }

  void plan_dispatch(const int32_t* experts, const float* weights, int64_t rows, int64_t top_k,
                     int64_t num_experts, DispatchPlan& plan) override {
    const int64_t A = rows * top_k;
    plan.rows = rows;
    keys_.resize(*this, static_cast<size_t>(A));
    keys_sorted_.resize(*this, static_cast<size_t>(A));
    vals_.resize(*this, static_cast<size_t>(A));
    vals_sorted_.resize(*this, static_cast<size_t>(A));
    make_sort_keys(experts, rows, top_k, keys_.data(), vals_.data(), stream_);
    // A stable radix sort by (expert, token): the order never depends on timing.
    sort_pairs(keys_.data(), keys_sorted_.data(), vals_.data(), vals_sorted_.data(), A,
               bits_for(static_cast<uint64_t>(num_experts) * static_cast<uint64_t>(rows)));
    counts_.resize(*this, static_cast<size_t>(num_experts));
    expert_histogram(experts, A, num_experts, counts_.data(), stream_);
    plan.expert_offsets.resize(*this, static_cast<size_t>(num_experts + 1));
    exclusive_offsets(counts_.data(), num_experts, plan.expert_offsets.data(), stream_);
    plan.token.resize(*this, static_cast<size_t>(A));
    plan.expert.resize(*this, static_cast<size_t>(A));
    plan.weight.resize(*this, static_cast<size_t>(A));
    slot_of_.resize(*this, static_cast<size_t>(A));
    fill_plan(keys_sorted_.data(), vals_sorted_.data(), weights, rows, A, plan.token.data(),
              plan.expert.data(), plan.weight.data(), slot_of_.data(), stream_);
    plan.token_offsets.resize(*this, static_cast<size_t>(rows + 1));
    plan.token_assign.resize(*this, static_cast<size_t>(A));
    token_view(slot_of_.data(), rows, top_k, plan.token_offsets.data(), plan.token_assign.data(),
               stream_);
    // The one wait of a forward pass: the expert GEMMs' row counts come from here.
    plan.host_offsets.resize(static_cast<size_t>(num_experts + 1));
    download(plan.host_offsets.data(), plan.expert_offsets.data(),
             plan.host_offsets.size() * sizeof(int64_t));
  }

  void dispatch(const DispatchPlan& plan, const float* x, float* x_perm, int64_t dim) override {
    gather_rows(x, plan.token.data(), plan.num_assignments(), dim, x_perm, stream_);
  }

  void grouped_swiglu_ffn(const DispatchPlan& plan, const float* x_perm, Weight w1, Weight w3,
                          Weight w2, float* y_perm, float* h1, float* h3, int64_t dim,
                          int64_t hidden) override {
    if (ffn_fp8_ && FfnFp8::all_fp8(w1, w3, w2)) {
      ffn_fp8_->forward(FfnFp8::expert_segments(plan, w1, w3, w2, hidden * dim), x_perm, y_perm, h1,
                        h3, dim, hidden, false);
      return;
    }
    const int64_t A = plan.num_assignments();
    const size_t n = static_cast<size_t>(A * hidden);
    if (!h1) {
      f1_.resize(*this, n);
      f2_.resize(*this, n);
      h1 = f1_.data();
      h3 = f2_.data();
    }
    const uint16_t* xb = bf16_of(x_perm, A * dim, sx_);
    const int64_t per = hidden * dim;
    for_each_expert(plan, [&](int64_t e, int64_t a0, int64_t rows) {
      gemm_nt_bf16(xb + a0 * dim, dim, w1.offset(e * per), h1 + a0 * hidden, rows, hidden, dim,
                   0.0f);
      gemm_nt_bf16(xb + a0 * dim, dim, w3.offset(e * per), h3 + a0 * hidden, rows, hidden, dim,
                   0.0f);
    });
    sa_.resize(*this, n);
    swiglu_bf16(h1, h3, sa_.data(), static_cast<int64_t>(n), stream_);
    for_each_expert(plan, [&](int64_t e, int64_t a0, int64_t rows) {
      gemm_nt_bf16(sa_.data() + a0 * hidden, hidden, w2.offset(e * per), y_perm + a0 * dim, rows,
                   dim, hidden, 0.0f);
    });
  }

  void combine(const DispatchPlan& plan, const float* y_perm, float* y, int64_t dim) override {
    cuda::combine(plan.token_offsets.data(), plan.token_assign.data(), plan.weight.data(), y_perm,
                  y, plan.rows, dim, stream_);
  }

  // ---- Training

  void linear_backward(const float* x, Weight w, const float* dy, float* dx, bool dx_accumulate,
                       const GradOut& dw_out, const GradOut* db_out, int64_t rows, int64_t in,
                       int64_t out) override {
    float* dw = acc_only(dw_out, "linear_backward");
    float* db = db_out ? acc_only(*db_out, "linear_backward") : nullptr;
    if (w.bf16) {
      const uint16_t* dyb = bf16_of(dy, rows * out, sdy_);
      if (dx)
        gemm_->run(false, false, rows, in, out, dyb, out, w.bf16, in, dx, in,
                   dx_accumulate ? 1.0f : 0.0f, true);
      const uint16_t* xb = bf16_of(x, rows * in, sx_);
      gemm_->run(true, false, out, in, rows, dyb, out, xb, in, dw, in, 1.0f, true);
    } else {
      if (dx)
        gemm_->run(false, false, rows, in, out, dy, out, w.f32, in, dx, in,
                   dx_accumulate ? 1.0f : 0.0f, false);
      gemm_->run(true, false, out, in, rows, dy, out, x, in, dw, in, 1.0f, false);
    }
    if (db) column_sums(dy, db, rows, out, stream_);
  }

  void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy,
                        float* dx, const GradOut& dw_out, int64_t rows, int64_t dim) override {
    float* dw = acc_only(dw_out, "rmsnorm_backward");
    const int64_t blocks = (rows + kNormRowBlock - 1) / kNormRowBlock;
    partial_.resize(*this, static_cast<size_t>(blocks * dim));
    cuda::rmsnorm_backward(x, w, inv_rms, dy, dx, dw, partial_.data(), rows, dim, kNormRowBlock,
                           stream_);
  }

  void embedding_backward(const int32_t* tokens, const float* dy, const GradOut& dtable_out,
                          int64_t rows, int64_t context, int64_t dim, int64_t vocab) override {
    float* dtable = acc_only(dtable_out, "embedding_backward");
    const int64_t n = rows * context;
    ekeys_.resize(*this, static_cast<size_t>(n));
    ekeys_sorted_.resize(*this, static_cast<size_t>(n));
    vals_.resize(*this, static_cast<size_t>(n));
    vals_sorted_.resize(*this, static_cast<size_t>(n));
    // (token, position) pairs sorted by token, stable: each vocabulary row then sums its
    // positions in order.
    positions(vals_.data(), n, stream_);
    copy(ekeys_.data(), tokens, static_cast<size_t>(n) * sizeof(int32_t));
    sort_pairs(ekeys_.data(), ekeys_sorted_.data(), vals_.data(), vals_sorted_.data(), n,
               bits_for(static_cast<uint64_t>(vocab)));
    cuda::embedding_backward(ekeys_sorted_.data(), vals_sorted_.data(), n, dy, dtable, vocab, dim,
                             stream_);
  }

  void swiglu_ffn_backward(const float* x, Weight w1, Weight w3, Weight w2, const float* h1,
                           const float* h3, const float* dy, float* dx, bool dx_accumulate,
                           const GradOut& dw1_out, const GradOut& dw3_out, const GradOut& dw2_out,
                           int64_t rows, int64_t dim, int64_t hidden) override {
    if (ffn_fp8_) {
      if (FfnFp8::all_fp8(w1, w3, w2))
        ffn_fp8_->backward({{w1, w3, w2, 0, rows, &dw1_out, &dw3_out, &dw2_out}}, x, h1, h3, dy, dx,
                           dx_accumulate, dim, hidden);
      else
        ffn_fp8_->backward_f32(x, w1, w3, w2, h1, h3, dy, dx, dx_accumulate, dw1_out, dw3_out,
                               dw2_out, rows, dim, hidden);
      return;
    }
    float* dw1 = acc_only(dw1_out, "swiglu_ffn_backward");
    float* dw3 = acc_only(dw3_out, "swiglu_ffn_backward");
    float* dw2 = acc_only(dw2_out, "swiglu_ffn_backward");
    const size_t n = static_cast<size_t>(rows * hidden);
    const uint16_t* dyb = bf16_of(dy, rows * dim, sdy_);
    f1_.resize(*this, n);
    f2_.resize(*this, n);
    // dA = dy W2, then dW2 += dy^T a with a = silu(h1) h3.
    gemm_->run(false, false, rows, hidden, dim, dyb, dim, bf16_weight(w2), hidden, f1_.data(),
               hidden, 0.0f, true);
    sa_.resize(*this, n);
    swiglu_bf16(h1, h3, sa_.data(), static_cast<int64_t>(n), stream_);
    gemm_->run(true, false, dim, hidden, rows, dyb, dim, sa_.data(), hidden, dw2, hidden, 1.0f,
               true);
    cuda::swiglu_backward(h1, h3, f1_.data(), f1_.data(), f2_.data(), static_cast<int64_t>(n),
                          stream_);
    const uint16_t* dh1 = bf16_of(f1_.data(), static_cast<int64_t>(n), sdh1_);
    const uint16_t* dh3 = bf16_of(f2_.data(), static_cast<int64_t>(n), sdh3_);
    const uint16_t* xb = bf16_of(x, rows * dim, sx_);
    gemm_->run(true, false, hidden, dim, rows, dh1, hidden, xb, dim, dw1, dim, 1.0f, true);
    gemm_->run(true, false, hidden, dim, rows, dh3, hidden, xb, dim, dw3, dim, 1.0f, true);
    gemm_->run(false, false, rows, dim, hidden, dh1, hidden, bf16_weight(w1), dim, dx, dim,
               dx_accumulate ? 1.0f : 0.0f, true);
    gemm_->run(false, false, rows, dim, hidden, dh3, hidden, bf16_weight(w3), dim, dx, dim, 1.0f,
               true);
  }

  void grouped_swiglu_ffn_backward(const DispatchPlan& plan, const float* x_perm, Weight w1,
                                   Weight w3, Weight w2, const float* h1, const float* h3,
                                   const float* dy_perm, float* dx_perm, const GradOut* dw1,
                                   const GradOut* dw3, const GradOut* dw2, int64_t dim,
                                   int64_t hidden, int64_t ld) override {
    dense_rows(ld, dim, "grouped_swiglu_ffn_backward");
    if (ffn_fp8_ && FfnFp8::all_fp8(w1, w3, w2)) {
      ffn_fp8_->backward(FfnFp8::expert_segments(plan, w1, w3, w2, hidden * dim, dw1, dw3, dw2),
                         x_perm, h1, h3, dy_perm, dx_perm, false, dim, hidden);
      return;
    }
    for (int64_t e = 0; e + 1 < static_cast<int64_t>(plan.host_offsets.size()); ++e)
      for (const GradOut* g : {dw1, dw3, dw2}) acc_only(g[e], "grouped_swiglu_ffn_backward");
    const int64_t A = plan.num_assignments();
    const size_t n = static_cast<size_t>(A * hidden);
    const int64_t per = hidden * dim;
    const uint16_t* dyb = bf16_of(dy_perm, A * dim, sdy_);
    f1_.resize(*this, n);
    f2_.resize(*this, n);
    sa_.resize(*this, n);
    swiglu_bf16(h1, h3, sa_.data(), static_cast<int64_t>(n), stream_);
    for_each_expert(plan, [&](int64_t e, int64_t a0, int64_t rows) {
      gemm_->run(false, false, rows, hidden, dim, dyb + a0 * dim, dim, bf16_weight(w2) + e * per,
                 hidden, f1_.data() + a0 * hidden, hidden, 0.0f, true);
      gemm_->run(true, false, dim, hidden, rows, dyb + a0 * dim, dim, sa_.data() + a0 * hidden,
                 hidden, dw2[e].acc, hidden, 1.0f, true);
    });
    cuda::swiglu_backward(h1, h3, f1_.data(), f1_.data(), f2_.data(), static_cast<int64_t>(n),
                          stream_);
    const uint16_t* dh1 = bf16_of(f1_.data(), static_cast<int64_t>(n), sdh1_);
    const uint16_t* dh3 = bf16_of(f2_.data(), static_cast<int64_t>(n), sdh3_);
    const uint16_t* xb = bf16_of(x_perm, A * dim, sx_);
    for_each_expert(plan, [&](int64_t e, int64_t a0, int64_t rows) {
      gemm_->run(true, false, hidden, dim, rows, dh1 + a0 * hidden, hidden, xb + a0 * dim, dim,
                 dw1[e].acc, dim, 1.0f, true);
      gemm_->run(true, false, hidden, dim, rows, dh3 + a0 * hidden, hidden, xb + a0 * dim, dim,
                 dw3[e].acc, dim, 1.0f, true);
      gemm_->run(false, false, rows, dim, hidden, dh1 + a0 * hidden, hidden,
                 bf16_weight(w1) + e * per, dim, dx_perm + a0 * dim, dim, 0.0f, true);
      gemm_->run(false, false, rows, dim, hidden, dh3 + a0 * hidden, hidden,
                 bf16_weight(w3) + e * per, dim, dx_perm + a0 * dim, dim, 1.0f, true);
    });
  }

  void combine_backward(const DispatchPlan& plan, const float* y_perm, const float* dy,
                        float* dy_perm, float* dweight, int64_t dim, int64_t ld) override {
    dense_rows(ld, dim, "combine_backward");
    cuda::combine_backward(plan.token.data(), plan.weight.data(), y_perm, dy, dy_perm, dweight,
                           plan.num_assignments(), dim, stream_);
  }

  void dispatch_backward(const DispatchPlan& plan, const float* dx_perm, float* dx,
                         int64_t dim) override {
    cuda::dispatch_backward(plan.token_offsets.data(), plan.token_assign.data(), dx_perm, dx,
                            plan.rows, dim, stream_);
  }

  void router_backward(const RouterConfig& cfg, bool normalize, const float* scores,
                       const DispatchPlan& plan, const float* dweight, const float* ds_extra,
                       float* dlogits, int64_t rows) override {
    route_scratch_.resize(*this, static_cast<size_t>(rows) * cfg.num_experts);
    cuda::router_backward(cfg, normalize, scores, plan.token_offsets.data(),
                          plan.token_assign.data(), plan.expert.data(), dweight, ds_extra, dlogits,
                          route_scratch_.data(), rows, stream_);
  }

  void aux_partials(const RouterConfig& cfg, const float* scores, const DispatchPlan& plan,
                    const int64_t* chunk_offsets, int64_t chunks, int64_t* counts,
                    double* psum) override {
    const int64_t E = cfg.num_experts, rows = chunks > 0 ? chunk_offsets[chunks] : 0;
    const size_t n = static_cast<size_t>(chunks * E);
    ioffsets_.resize(*this, static_cast<size_t>(chunks + 1) + n);
    upload(ioffsets_.data(), chunk_offsets, static_cast<size_t>(chunks + 1) * sizeof(int64_t));
    dscratch_.resize(*this, static_cast<size_t>(rows) + n);
    int64_t* dcounts = ioffsets_.data() + chunks + 1;
    double* dpsum = dscratch_.data() + rows;
    cuda::aux_partials(cfg, scores, rows, ioffsets_.data(), chunks, plan.expert_offsets.data(),
                       plan.token.data(), dscratch_.data(), dcounts, dpsum, stream_);
    download(counts, dcounts, n * sizeof(int64_t));
    download(psum, dpsum, n * sizeof(double));
  }

  void aux_grad(const RouterConfig& cfg, const float* scores, int64_t rows,
                const int64_t* seq_offsets, int64_t num_seq, const double* coef,
                float* ds) override {
    const size_t n = static_cast<size_t>(num_seq) * cfg.num_experts;
    ioffsets_.resize(*this, static_cast<size_t>(num_seq + 1));
    upload(ioffsets_.data(), seq_offsets, ioffsets_.bytes());
    dscratch_.resize(*this, n);
    upload(dscratch_.data(), coef, n * sizeof(double));
    cuda::aux_grad(cfg, scores, rows, ioffsets_.data(), num_seq, dscratch_.data(), ds, stream_);
  }

  int64_t find_nonfinite(const float* x, int64_t n) override {
    flag_.resize(*this, 1);
    auto* first = reinterpret_cast<unsigned long long*>(flag_.data());
    const unsigned long long none = static_cast<unsigned long long>(n);
    upload(first, &none, sizeof(none));
    cuda::find_nonfinite(x, n, first, stream_);
    unsigned long long got = none;
    download(&got, first, sizeof(got));
    return got == none ? -1 : static_cast<int64_t>(got);
  }

  void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                     float* dlogits, float scale, std::vector<double>& chunk_loss) override {
    dscratch_.resize(*this, static_cast<size_t>(rows));
    cuda::cross_entropy(logits, targets, rows, vocab, dlogits, scale, dscratch_.data(), stream_);
    std::vector<double> row_loss(static_cast<size_t>(rows));
    download(row_loss.data(), dscratch_.data(), row_loss.size() * sizeof(double));
    // Each chunk's rows added in order from zero, as grad_reduction.h defines a chunk's partial.
    chunk_loss.assign(static_cast<size_t>(reduce_chunks(rows)), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      chunk_loss[static_cast<size_t>(r / kReduceRows)] += row_loss[r];
  }

  void add(float* dst, const float* src, int64_t n) override { add_into(dst, src, n, stream_); }

  // ---- Optimizer

  double sum_squares(const float* x, int64_t n) override {
    dscratch_.resize(*this, kSumBlocks);
    cuda::sum_squares(x, n, dscratch_.data(), stream_);
    return host_sum(dscratch_.data(), kSumBlocks);
  }

  // Every array's partial sums side by side, one download, then the same additions in the same
  // order as one sum_squares() per array.
  double sum_squares_many(const float* const* xs, const int64_t* ns, size_t count) override {
    if (count == 0) return 0.0;
    dscratch_.resize(*this, count * kSumBlocks);
    for (size_t i = 0; i < count; ++i)
      cuda::sum_squares(xs[i], ns[i], dscratch_.data() + i * kSumBlocks, stream_);
    std::vector<double> partial(count * kSumBlocks);
    download(partial.data(), dscratch_.data(), partial.size() * sizeof(double));
    double total = 0.0;
    for (size_t i = 0; i < count; ++i) {
      double one = 0.0;
      for (unsigned b = 0; b < kSumBlocks; ++b) one += partial[i * kSumBlocks + b];
      total += one;
    }
    return total;
  }

  void adamw(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1,
             double beta2, double eps, double wd, double gscale, double bc1, double bc2) override {
    cuda::adamw(p, g, m, v, n, lr, beta1, beta2, eps, wd, gscale, bc1, bc2, stream_);
  }

  void sgd(float* p, const float* g, float* m, int64_t n, double lr, double momentum, double wd,
           double gscale) override {
    cuda::sgd(p, g, m, n, lr, momentum, wd, gscale, stream_);
  }

 private:
  void select() { check(cudaSetDevice(device_), "cudaSetDevice"); }
  void sync() { check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

  // x (fp32) as bf16 in `scratch`.
  const uint16_t* bf16_of(const float* x, int64_t n, Buffer<uint16_t>& scratch) {
    scratch.resize(*this, static_cast<size_t>(n));
    cuda::to_bf16(x, scratch.data(), n, /*saturate=*/false, stream_);
    return scratch.data();
  }

  // y[m, n] = x[m, k] w[n, k]^T + beta y, in bf16 when w has a bf16 copy, else fp32.
  void matmul_nt(const float* x, Weight w, float* y, int64_t m, int64_t n, int64_t k, float beta,
                 Buffer<uint16_t>& scratch) {
    if (w.bf16)
      gemm_nt_bf16(bf16_of(x, m * k, scratch), k, w, y, m, n, k, beta);
    else
      gemm_->run(false, true, m, n, k, x, k, w.f32, k, y, n, beta, false);
  }

  // Cross-process reduction on CUDA goes through NCCL, not local roots: only acc mode exists here.
  static float* acc_only(const GradOut& g, const char* op) {
    if (g.roots)
      fail(Code::Unsupported, "the CUDA backend's ", op,
           " gives gradients in acc mode only; cross-process reduction on CUDA uses NCCL");
    return g.acc;
  }

  // The bf16 copy every expert and FFN weight has on this backend; a missing one is a bug of the
  // core, reported as such rather than dereferenced on the device.
  static const uint16_t* bf16_weight(Weight w) {
    if (!w.bf16) fail(Code::Internal, "a GEMM weight has no bf16 copy on the CUDA backend");
    return w.bf16;
  }

  void gemm_nt_bf16(const uint16_t* x, int64_t ldx, Weight w, float* y, int64_t m, int64_t n,
                    int64_t k, float beta) {
    gemm_->run(false, true, m, n, k, x, ldx, bf16_weight(w), k, y, n, beta, true);
  }

  template <typename F>
  void for_each_expert(const DispatchPlan& plan, F&& f) {
    const int64_t E = static_cast<int64_t>(plan.host_offsets.size()) - 1;
    for (int64_t e = 0; e < E; ++e)
      if (plan.count(e) > 0) f(e, plan.host_offsets[e], plan.count(e));
  }

  template <typename K>
  void sort_pairs(const K* keys_in, K* keys_out, const int32_t* vals_in, int32_t* vals_out,
                  int64_t n, int end_bit) {
    size_t bytes = 0;
    check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, vals_in, vals_out, n,
                                          0, end_bit, stream_),
          "radix sort size");
    sort_temp_.resize(*this, bytes);
    check(cub::DeviceRadixSort::SortPairs(sort_temp_.data(), bytes, keys_in, keys_out, vals_in,
                                          vals_out, n, 0, end_bit, stream_),
          "radix sort");
  }

  double host_sum(const double* device_values, size_t n) {
    std::vector<double> v(n);
    download(v.data(), device_values, n * sizeof(double));
    double total = 0.0;
    for (double x : v) total += x;
    return total;
  }

  // Frees through deallocate(), whose cudaFree waits for the device to finish with them.
  size_t work_bytes() const override {
    return held_bytes(sx_, sa_, sdy_, sdh1_, sdh3_, f1_, f2_, route_scratch_, ioffsets_, flag_,
                      partial_, dscratch_, keys_, keys_sorted_, ekeys_, ekeys_sorted_, vals_,
                      vals_sorted_, slot_of_, counts_, sort_temp_) +
           (ffn_fp8_ ? ffn_fp8_->work_bytes() : 0);
  }
  void release_work() override {
    const DeviceRestore restore;
    cudaSetDevice(device_);
    if (ffn_fp8_) ffn_fp8_->release_work();
    release_scratch();
  }

  void release_scratch() {
    sx_ = {};
    sa_ = {};
    sdy_ = {};
    sdh1_ = {};
    sdh3_ = {};
    f1_ = {};
    f2_ = {};
    route_scratch_ = {};
    ioffsets_ = {};
    flag_ = {};
    partial_ = {};
    dscratch_ = {};
    keys_ = {};
    keys_sorted_ = {};
    ekeys_ = {};
    ekeys_sorted_ = {};
    vals_ = {};
    vals_sorted_ = {};
    slot_of_ = {};
    counts_ = {};
    sort_temp_ = {};
  }

  int32_t device_;
  int depth_ = 0, outer_ = 0;  // activate() nesting and the device the thread had before
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Gemm> gemm_;
  std::unique_ptr<FfnFp8> ffn_fp8_;  // an fp8 session's FFNs; null in a bf16 session
  Buffer<uint16_t> sx_, sa_, sdy_, sdh1_, sdh3_;
  Buffer<float> f1_, f2_, route_scratch_;
  Buffer<double> partial_, dscratch_;
  Buffer<int64_t> keys_, keys_sorted_, counts_, ioffsets_, flag_;
  Buffer<int32_t> ekeys_, ekeys_sorted_, vals_, vals_sorted_, slot_of_;
  Buffer<unsigned char> sort_temp_;
};

}  // namespace
}  // namespace moert::cuda

MOERT_DEFINE_CUDA_PLUGIN_IDENTITY()

extern "C" {

__attribute__((visibility("default"))) moert::Backend* moert_cuda_plugin_create(
    int32_t device, int32_t precision, int32_t fp8_power_of_two_scales, int32_t* code,
    char* message, size_t message_len) {
  auto say = [&](moert::Code c, const char* what) {
    if (code) *code = static_cast<int32_t>(c);
    if (message && message_len) std::snprintf(message, message_len, "%s", what);
  };
  if (precision != static_cast<int32_t>(moert::Precision::Bf16) &&
      precision != static_cast<int32_t>(moert::Precision::Fp8)) {
    say(moert::Code::Unsupported,
        "the CUDA backend multiplies in bf16 or fp8 (fp32 runs on the CPU)");
    return nullptr;
  }
  try {
    moert::Fp8Options fp8;
    fp8.power_of_two_scales = fp8_power_of_two_scales != 0;
    return new moert::cuda::CudaBackend(device, static_cast<moert::Precision>(precision), fp8);
  } catch (const moert::Error& e) {
    say(e.code(), e.what());
  } catch (const std::bad_alloc&) {
    say(moert::Code::OutOfMemory, "out of host memory");
  } catch (const std::exception& e) {
    say(moert::Code::Internal, e.what());
  } catch (...) {
    say(moert::Code::Internal, "unknown error");
  }
  return nullptr;
}

}  // extern "C"
