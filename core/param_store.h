// The session's parameters in backend memory. On a host backend the model's own tensors are used
// in place; on a device backend each tensor has a device copy, and the host tensors are brought up
// to date on demand. Weights the backend multiplies in bf16 (Backend::bf16_copies: every GEMM
// weight but the router's on CUDA, the experts' in a CPU session of precision bf16) also have a
// bf16 copy, rounded from the fp32 values (the master weights) and refreshed after every change;
// on a backend whose experts multiply in FP8 (Backend::fp8_experts), the MoE layers' routed and
// shared expert weights have an FP8 copy (E4M3 codes in 128x128 blocks, Backend::
// quantize_weight_blocks), made and refreshed the same way. A weight the model holds in FP8
// (Tensor::fp8, inference only: training decodes its masters) is multiplied from the model's own
// codes where the backend multiplies it in FP8, and decoded into an fp32 copy otherwise. On a
// backend that keeps transposed copies (Backend::transposed_copies), the FFN weights multiplied
// in fp32 also have one (Weight::f32t), and on a backend that packs bf16 weights
// (Backend::packed_bf16_bytes) those with a bf16 copy a packed one (Weight::bf16_packed), made
// and refreshed the same way. An inference store in host memory makes none of these copies for
// itself (the decoded values, transposed, bf16, packed and FP8 copies): it shares them with the
// model's other inference sessions (Model::shared_copies), since nothing writes them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/backend.h"
#include "core/grad_reduction.h"
#include "core/model.h"

namespace moert {

class ParamStore {
 public:
  // Mirrors every tensor of `params` (parameters and MoE biases). `grads`, when training, is the
  // gradient model laid out as `params`: gradients live in backend memory beside the values.
  // Without training, a device backend keeps only the bf16 copy of GEMM weights.
  ParamStore(Backend& be, Model& params, Model* grads);

  Weight weight(const Tensor& t) const;  // t: a tensor of `params`
  const float* f32(const Tensor& t) const;
  float* f32_mutable(const Tensor& t);
  float* grad(const Tensor& t) const;  // null without training

  // Host tensor -> backend, after the host values changed (bf16, FP8 and transposed copies
  // refreshed too).
  void upload(const Tensor& t);
  // Backend -> host tensor (no-op on host backends).
  void download(const Tensor& t) const;
  // Gradient in backend memory <-> host vector.
  void download_grad(const Tensor& t, std::vector<float>& out) const;
  void upload_grad(const Tensor& t, const std::vector<float>& in);
  // bf16, FP8 and transposed copies <- fp32 copy, after the backend changed the fp32 values (an
  // optimizer step). Throws Error(Numeric) where an FP8 copy meets a NaN or infinity.
  void refresh_copies(const Tensor& t);
  // Zeroes every gradient.
  void zero_grads();
  // Points the gradient of `t` at `acc` (backend memory, as many floats) until it is called
  // again with null, which points it back at its own storage: where a backward accumulates a
  // gradient that the session reduces across ranks before adding it to its own.
  void redirect_grad(const Tensor& t, float* acc);

  // Where a backward operation puts the gradient of `t`'s elements [offset, offset + count)
  // (count < 0: to the end; a shared expert's slice, say). Alone (the default) every row is the
  // call's: acc mode, into the gradient. Among ranks (set_row_share) the call holds the job's
  // chunks from `first_chunk` on: roots mode, into roots kept here until the session combines
  // them (take_roots). `sparse`: the embedding table's gradient, whose roots hold table rows.
  GradOut grad_out(const Tensor& t, int64_t offset = 0, int64_t count = -1, bool sparse = false);
  void set_row_share(bool shared, int64_t first_chunk);
  // The roots handed out since the last call, with the gradient each belongs to: `n` floats, or
  // for a sparse one rows of `n` floats.
  struct PendingRoots {
    std::unique_ptr<GradRoots> roots;
    float* acc;
    int64_t n;
    bool sparse;
  };
  std::vector<PendingRoots> take_roots();

  // Registers a tensor whose values live only in backend memory (benchmarks of models too large
  // to hold on the host): `t` gives the shape; any buffer may be empty. fp8_codes and fp8_scales:
  // an FP8 copy (Fp8Weight's layout, matrices of t's last two dimensions).
  void adopt(const Tensor& t, Buffer<float> f32, Buffer<uint16_t> bf16, Buffer<float> grad,
             Buffer<uint8_t> fp8_codes = {}, Buffer<float> fp8_scales = {});

 private:
  struct Entry {
    Tensor* host = nullptr;
    Tensor* host_grad = nullptr;
    Buffer<float> f32;
    Buffer<uint16_t> bf16;
    // The FP8 copy of a stack of `fp8_matrices` matrices [fp8_rows, fp8_cols] (Fp8Weight).
    Buffer<uint8_t> fp8_codes;
    Buffer<float> fp8_scales;
    int64_t fp8_matrices = 0, fp8_rows = 0, fp8_cols = 0;
    // The copies laid out for the forward, of a stack of matrices [t_rows, t_cols]: each matrix
    // transposed (fp32), or its bf16 copy packed, packed_bytes per matrix.
    Buffer<float> f32t;
    // An inference store's copies shared with the model's other inference sessions
    // (Model::shared_copies) in place of f32t, packed and bf16; never refreshed, since nothing
    // writes the model.
    std::shared_ptr<const void> f32t_shared, packed_shared, bf16_shared;
    // The fp32 values decoded from a tensor the model holds in FP8, shared likewise (f32_ptr).
    std::shared_ptr<const void> f32_shared;
    // The FP8 copy shared likewise in place of fp8_codes and fp8_scales: the codes, then the
    // scales from byte fp8_scales_at on.
    std::shared_ptr<const void> fp8_shared;
    size_t fp8_scales_at = 0;
    Buffer<unsigned char> packed;
    int64_t t_rows = 0, t_cols = 0, packed_bytes = 0;
    std::string what;  // "layer.field", named in quantization errors
    // A tensor the model holds in FP8, multiplied as it is (host backends).
    const Fp8Blocks* resident = nullptr;
    Buffer<float> grad;
    float* f32_ptr = nullptr;  // f32 data, in backend memory (the host tensor on host backends)
    float* grad_ptr = nullptr;
  };
  const Entry& entry(const Tensor& t) const;
  void quantize(Entry& e, const char* what);
  void transpose_copy(Entry& e);
  // Throws Error(Internal) for a change to a weight whose copy is shared, once built.
  void refuse_shared(const Entry& e) const;
  void pack_copy(Entry& e);
  // out (e.packed_bytes per matrix) = e's fp32 values (f32_ptr) rounded to bf16 and packed.
  void pack_from_f32(const Entry& e, unsigned char* out);
  // A weight the model holds in FP8 (inference only): its codes as the Weight's FP8 view where
  // `fp8_view`, else decoded into the store's own fp32 copy (and a bf16 one where `bf16`).
  void add_resident(Entry& e, const Tensor& t, bool fp8_view, bool bf16);
  Entry& entry(const Tensor& t);

  Backend& be_;
  std::unordered_map<const Tensor*, Entry> entries_;
  bool built_ = false;  // the constructor has made every copy
  bool shared_rows_ = false;
  int64_t first_chunk_ = 0;
  // Roots of this backward, in the order handed out, with their dense size (or row width).
  std::vector<PendingRoots> roots_;
};

}  // namespace moert
