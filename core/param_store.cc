#include "core/param_store.h"

#include <algorithm>

#include "core/error.h"

namespace moert {
namespace {

// Whether a tensor is one of a MoE layer's routed or shared expert weights.
bool is_expert_weight(const LayerSpec& layer, const std::string& field) {
  return layer.kind == LayerKind::MoE &&
         (field == "w1" || field == "w3" || field == "w2" || field == "shared_w1" ||
          field == "shared_w3" || field == "shared_w2");
}

// Whether a tensor is a weight of an FFN: a MoE layer's routed or shared expert, a dense FFN.
bool is_ffn_weight(const LayerSpec& layer, const std::string& field) {
  return is_expert_weight(layer, field) ||
         (layer.kind == LayerKind::DenseFFN && (field == "w1" || field == "w3" || field == "w2"));
}

// Whether a tensor of a layer gets a bf16 copy on a backend that keeps `copies`.
bool wants_bf16(Bf16Copies copies, const LayerSpec& layer, const std::string& field) {
  if (copies == Bf16Copies::None) return false;
  const bool expert = is_expert_weight(layer, field);
  if (copies == Bf16Copies::Experts) return expert;
  switch (layer.kind) {
    case LayerKind::DenseFFN:
      return true;
    case LayerKind::MoE:
      // The router and its bias stay fp32 (docs/design.md section 5): only the experts take bf16.
      return expert;
    case LayerKind::OutputHead:
      return field == "weight";
    default:
      return false;
  }
}

}  // namespace

ParamStore::ParamStore(Backend& be, Model& params, Model* grads) : be_(be) {
  const bool training = grads != nullptr;
  for (size_t li = 0; li < params.layers.size(); ++li) {
    LayerSpec& layer = params.layers[li];
    std::vector<Tensor*> gs;
    if (grads) visit_tensors(grads->layers[li], [&](const char*, Tensor& t) { gs.push_back(&t); });
    size_t k = 0;
    auto add = [&](const std::string& field, Tensor& t, Tensor* g) {
      if (!t.present()) return;
      Entry& e = entries_[&t];
      e.host = &t;
      e.host_grad = g;
      // An inference session in host memory shares the copies it derives from the model's
      // values (the values decoded from FP8, the layout copies, the bf16 copies) with the
      // model's other inference sessions (SharedCopies). Each is made from e.f32_ptr.
      const bool shares = !training && be.host_memory();
      auto shared = [&](SharedCopies::Kind kind, size_t bytes, const char* what,
                        const std::function<void(void*)>& fill) {
        e.what = layer.name + "." + field;
        auto copy = params.shared_copies.get().get(t, kind, bytes, fill);
        if (!copy)
          fail(Code::OutOfMemory, "out of memory allocating ", bytes, " bytes for the ", what,
               " copy of '", e.what, "'");
        return copy;
      };
      // An FFN weight's copies laid out for the forward: transposed where it is multiplied in
      // fp32, packed where in bf16, on backends that keep them.
      auto layout_copies = [&](bool bf16, bool fp8) {
        if (fp8 || !is_ffn_weight(layer, field) || t.shape.size() < 2) return;
        const int64_t rows = t.shape[t.shape.size() - 2], cols = t.shape.back();
        const int64_t matrices = t.numel() / (rows * cols);
        e.t_rows = rows;
        e.t_cols = cols;
        const auto n = static_cast<size_t>(t.numel());
        if (!bf16 && be.transposed_copies()) {
          if (shares)
            e.f32t_shared = shared(
                SharedCopies::Kind::Transposed, n * sizeof(float), "transposed", [&](void* out) {
                  be.transpose_matrices(e.f32_ptr, matrices, rows, cols, static_cast<float*>(out));
                });
          else
            e.f32t.resize(be, n);
        }
        e.packed_bytes = bf16 ? be.packed_bf16_bytes(rows, cols) : 0;
        if (e.packed_bytes <= 0) return;
        const auto bytes = static_cast<size_t>(matrices * e.packed_bytes);
        if (!shares) {
          e.packed.resize(be, bytes);
          return;
        }
        e.packed_shared =
            shared(SharedCopies::Kind::PackedBf16, bytes, "packed bf16",
                   [&](void* out) { pack_from_f32(e, static_cast<unsigned char*>(out)); });
      };
      // The plain bf16 copy of e.f32_ptr's values, shared.
      auto shared_bf16 = [&](size_t n) {
        e.bf16_shared =
            shared(SharedCopies::Kind::Bf16, n * sizeof(uint16_t), "bf16", [&](void* out) {
              be.to_bf16(e.f32_ptr, static_cast<uint16_t*>(out), static_cast<int64_t>(n));
            });
      };
      if (t.fp8) {
        if (training) fail(Code::Internal, "a training session's weight is held in FP8");
        const bool fp8 = be.fp8_experts() && is_expert_weight(layer, field);
        const bool bf16 = wants_bf16(be.bf16_copies(), layer, field);
        if (fp8 || !shares) {
          add_resident(e, t, fp8, bf16);
        } else {
          // Multiplied in fp32 or bf16: the values decoded once for every inference session.
          const Fp8Blocks& q = *t.fp8;
          const auto n = static_cast<size_t>(q.numel());
          e.f32_shared =
              shared(SharedCopies::Kind::DecodedF32, n * sizeof(float), "decoded fp32",
                     [&](void* out) { q.decode(0, q.matrices, static_cast<float*>(out)); });
          // Read only: nothing writes an inference session's weights (refuse_shared).
          e.f32_ptr = const_cast<float*>(static_cast<const float*>(e.f32_shared.get()));
        }
        if (!e.resident) {
          layout_copies(bf16, fp8);
          transpose_copy(e);
          pack_copy(e);
          if (e.packed.size()) e.bf16 = Buffer<uint16_t>();  // inference: the packed copy serves
          if (e.f32_shared && bf16 && !e.packed_shared) shared_bf16(static_cast<size_t>(t.numel()));
        }
        return;
      }
      const size_t n = t.values.size();
      const bool fp8 = be.fp8_experts() && is_expert_weight(layer, field);
      // A weight multiplied in FP8 needs no bf16 copy as well.
      const bool bf16 = !fp8 && wants_bf16(be.bf16_copies(), layer, field);
      if (be.host_memory()) {
        e.f32_ptr = t.data();
        e.grad_ptr = g ? g->data() : nullptr;
      } else {
        // Inference on a device keeps GEMM weights in bf16 or FP8 only: a DeepSeek-V3 layer's
        // routed experts are 22 GB in bf16 and would not fit beside their fp32 values.
        if (training || !(bf16 || fp8)) {
          e.f32.resize(be, n);
          e.f32_ptr = e.f32.data();
        }
        if (g) {
          e.grad.resize(be, n);
          e.grad_ptr = e.grad.data();
        }
      }
      layout_copies(bf16, fp8);
      // Without training only the forward reads the weight, from its packed copy where it has
      // one: the plain bf16 copy is then made only on the way to it (pack_copy).
      if (bf16 && (training || !(e.packed.size() || e.packed_shared))) {
        if (shares)
          shared_bf16(n);
        else
          e.bf16.resize(be, n);
      }
      if (fp8) {
        if (t.shape.size() < 2)
          fail(Code::Internal, "expert weight '", layer.name, ".", field, "' is not a matrix");
        e.fp8_cols = t.shape.back();
        e.fp8_rows = t.shape[t.shape.size() - 2];
        e.fp8_matrices = static_cast<int64_t>(n) / (e.fp8_rows * e.fp8_cols);
        const auto scales =
            static_cast<size_t>(fp8_blocks_scale_floats(e.fp8_matrices, e.fp8_rows, e.fp8_cols));
        e.what = layer.name + "." + field;
        if (shares) {
          // Quantized once for every inference session under the same scale rule.
          e.fp8_scales_at = (n + 63) / 64 * 64;
          const auto kind = be.fp8_options().power_of_two_scales ? SharedCopies::Kind::Fp8Ue8m0
                                                                 : SharedCopies::Kind::Fp8;
          e.fp8_shared =
              shared(kind, e.fp8_scales_at + scales * sizeof(float), "FP8", [&](void* out) {
                auto* codes = static_cast<uint8_t*>(out);
                be.quantize_weight_blocks(e.f32_ptr, e.fp8_matrices, e.fp8_rows, e.fp8_cols, codes,
                                          reinterpret_cast<float*>(codes + e.fp8_scales_at),
                                          e.what.c_str());
              });
        } else {
          e.fp8_codes.resize(be, n);
          e.fp8_scales.resize(be, scales);
        }
      }
      upload(t);
      if (e.grad_ptr && !be.host_memory()) be.zero(e.grad_ptr, n * sizeof(float));
    };
    visit_tensors(layer, [&](const char* field, Tensor& t) {
      Tensor* g = grads ? gs[k] : nullptr;
      ++k;
      add(field, t, g);
    });
    if (auto* m = std::get_if<MoESpec>(&layer.spec)) add("gate_bias", m->gate_bias, nullptr);
  }
  built_ = true;
}

const ParamStore::Entry& ParamStore::entry(const Tensor& t) const {
  auto it = entries_.find(&t);
  if (it == entries_.end()) fail(Code::Internal, "tensor not in the parameter store");
  return it->second;
}

ParamStore::Entry& ParamStore::entry(const Tensor& t) {
  return const_cast<Entry&>(static_cast<const ParamStore*>(this)->entry(t));
}

Weight ParamStore::weight(const Tensor& t) const {
  const Entry& e = entry(t);
  Weight w{e.f32_ptr,
           e.bf16.size() ? e.bf16.data() : static_cast<const uint16_t*>(e.bf16_shared.get()),
           {},
           e.f32t.size() ? e.f32t.data() : static_cast<const float*>(e.f32t_shared.get())};
  if (e.packed.size() || e.packed_shared) {
    w.bf16_packed = e.packed.size() ? e.packed.data()
                                    : static_cast<const unsigned char*>(e.packed_shared.get());
    w.packed_bytes = e.packed_bytes;
    w.packed_elements = e.t_rows * e.t_cols;
  }
  if (e.resident)
    w.fp8 = {e.resident->codes.data(), e.resident->scales.data(),
             e.resident->rows * e.resident->cols, e.resident->matrix_scales()};
  else if (e.fp8_codes.size())
    w.fp8 = {e.fp8_codes.data(), e.fp8_scales.data(), e.fp8_rows * e.fp8_cols,
             fp8_blocks_scale_floats(1, e.fp8_rows, e.fp8_cols)};
  else if (e.fp8_shared) {
    const auto* codes = static_cast<const uint8_t*>(e.fp8_shared.get());
    w.fp8 = {codes, reinterpret_cast<const float*>(codes + e.fp8_scales_at),
             e.fp8_rows * e.fp8_cols, fp8_blocks_scale_floats(1, e.fp8_rows, e.fp8_cols)};
  }
  return w;
}

void ParamStore::add_resident(Entry& e, const Tensor& t, bool fp8_view, bool bf16) {
  const Fp8Blocks& q = *t.fp8;
  const auto n = static_cast<size_t>(q.numel());
  if (fp8_view) {
    // The backend multiplies the model's own codes: no fp32 copy at all.
    if (be_.host_memory()) {
      e.resident = &q;
      return;
    }
    e.fp8_matrices = q.matrices;
    e.fp8_rows = q.rows;
    e.fp8_cols = q.cols;
    e.fp8_codes.resize(be_, n);
    e.fp8_scales.resize(be_, q.scales.size());
    be_.upload(e.fp8_codes.data(), q.codes.data(), n);
    be_.upload(e.fp8_scales.data(), q.scales.data(), q.scales.size() * sizeof(float));
    return;
  }
  // Multiplied in fp32 or bf16 here: decoded into the store's own fp32 copy, a matrix at a time.
  e.f32.resize(be_, n);
  e.f32_ptr = e.f32.data();
  const auto per = static_cast<size_t>(q.rows * q.cols);
  std::vector<float> matrix(be_.host_memory() ? 0 : per);
  for (int64_t i = 0; i < q.matrices; ++i) {
    float* dst = e.f32_ptr + static_cast<size_t>(i) * per;
    q.decode(i, 1, be_.host_memory() ? dst : matrix.data());
    if (!be_.host_memory()) be_.upload(dst, matrix.data(), per * sizeof(float));
  }
  if (bf16) {
    e.bf16.resize(be_, n);
    be_.to_bf16(e.f32_ptr, e.bf16.data(), static_cast<int64_t>(n));
  }
}

void ParamStore::quantize(Entry& e, const char* what) {
  if (!e.fp8_codes.size()) return;
  const int64_t per = e.fp8_rows * e.fp8_cols,
                per_scales = fp8_blocks_scale_floats(1, e.fp8_rows, e.fp8_cols);
  if (e.f32_ptr) {
    be_.quantize_weight_blocks(e.f32_ptr, e.fp8_matrices, e.fp8_rows, e.fp8_cols,
                               e.fp8_codes.data(), e.fp8_scales.data(), what);
    return;
  }
  // No fp32 copy in backend memory: a matrix at a time through a temporary one, as for bf16.
  Buffer<float> tmp(be_, static_cast<size_t>(per));
  for (int64_t i = 0; i < e.fp8_matrices; ++i) {
    be_.upload(tmp.data(), e.host->data() + i * per, static_cast<size_t>(per) * sizeof(float));
    be_.quantize_weight_blocks(tmp.data(), 1, e.fp8_rows, e.fp8_cols, e.fp8_codes.data() + i * per,
                               e.fp8_scales.data() + i * per_scales, what);
  }
}

const float* ParamStore::f32(const Tensor& t) const { return entry(t).f32_ptr; }
float* ParamStore::f32_mutable(const Tensor& t) { return entry(t).f32_ptr; }
float* ParamStore::grad(const Tensor& t) const { return entry(t).grad_ptr; }

void ParamStore::upload(const Tensor& t) {
  Entry& e = entry(t);
  refuse_shared(e);
  const size_t n = t.values.size();
  if (e.f32_ptr && e.f32_ptr != t.data()) be_.upload(e.f32_ptr, t.data(), n * sizeof(float));
  if (e.bf16.size()) {
    if (e.f32_ptr) {
      be_.to_bf16(e.f32_ptr, e.bf16.data(), static_cast<int64_t>(n));
    } else {
      // No fp32 copy on the device: convert through a temporary one, a slice at a time, so that
      // loading never needs more than the bf16 weights plus one slice (a V3 layer's routed w1 is
      // 15 GB in fp32).
      constexpr size_t kSlice = size_t{16} << 20;  // floats: 64 MiB
      Buffer<float> tmp(be_, std::min(n, kSlice));
      for (size_t i = 0; i < n; i += kSlice) {
        const size_t len = std::min(kSlice, n - i);
        be_.upload(tmp.data(), t.data() + i, len * sizeof(float));
        be_.to_bf16(tmp.data(), e.bf16.data() + i, static_cast<int64_t>(len));
      }
    }
  }
  quantize(e, e.what.c_str());
  transpose_copy(e);
  pack_copy(e);
}

void ParamStore::refuse_shared(const Entry& e) const {
  // Other sessions read the copy: a change would leave it stale for them, and for this store.
  if (built_ && (e.f32_shared || e.f32t_shared || e.packed_shared || e.bf16_shared || e.fp8_shared))
    fail(Code::Internal, "weight '", e.what,
         "' cannot change: the model's inference sessions share the copies made of it");
}

void ParamStore::transpose_copy(Entry& e) {
  if (!e.f32t.size() || !e.f32_ptr) return;
  be_.transpose_matrices(e.f32_ptr, static_cast<int64_t>(e.f32t.size()) / (e.t_rows * e.t_cols),
                         e.t_rows, e.t_cols, e.f32t.data());
}

void ParamStore::pack_copy(Entry& e) {
  if (!e.packed.size() || !e.f32_ptr) return;
  const int64_t n = e.host->numel(), per = e.t_rows * e.t_cols;
  if (e.bf16.size()) {
    be_.pack_bf16(e.bf16.data(), n / per, e.t_rows, e.t_cols, e.packed.data());
    return;
  }
  pack_from_f32(e, e.packed.data());
}

void ParamStore::pack_from_f32(const Entry& e, unsigned char* out) {
  // A matrix at a time through a temporary bf16 copy.
  const int64_t n = e.host->numel(), per = e.t_rows * e.t_cols;
  Buffer<uint16_t> tmp(be_, static_cast<size_t>(per));
  for (int64_t i = 0; i < n / per; ++i) {
    be_.to_bf16(e.f32_ptr + i * per, tmp.data(), per);
    be_.pack_bf16(tmp.data(), 1, e.t_rows, e.t_cols, out + i * e.packed_bytes);
  }
}

void ParamStore::download(const Tensor& t) const {
  const Entry& e = entry(t);
  if (e.f32_ptr && e.f32_ptr != t.data())
    be_.download(const_cast<float*>(t.data()), e.f32_ptr, t.values.size() * sizeof(float));
}

void ParamStore::download_grad(const Tensor& t, std::vector<float>& out) const {
  const Entry& e = entry(t);
  out.resize(t.values.size());
  be_.download(out.data(), e.grad_ptr, out.size() * sizeof(float));
}

void ParamStore::upload_grad(const Tensor& t, const std::vector<float>& in) {
  const Entry& e = entry(t);
  be_.upload(e.grad_ptr, in.data(), in.size() * sizeof(float));
}

void ParamStore::refresh_copies(const Tensor& t) {
  Entry& e = entry(t);
  refuse_shared(e);
  if (e.bf16.size() && e.f32_ptr)
    be_.to_bf16(e.f32_ptr, e.bf16.data(), static_cast<int64_t>(t.values.size()));
  if (e.f32_ptr) quantize(e, e.what.c_str());
  transpose_copy(e);
  pack_copy(e);
}

void ParamStore::zero_grads() {
  std::vector<void*> grads;
  std::vector<size_t> bytes;
  for (auto& [key, e] : entries_) {
    const size_t n = e.grad.size() ? e.grad.size() : e.host->values.size();
    if (!e.grad_ptr) continue;
    grads.push_back(e.grad_ptr);
    bytes.push_back(n * sizeof(float));
  }
  be_.zero_many(grads.data(), bytes.data(), grads.size());
}

}  // namespace moert

namespace moert {

void ParamStore::adopt(const Tensor& t, Buffer<float> f32, Buffer<uint16_t> bf16,
                       Buffer<float> grad, Buffer<uint8_t> fp8_codes, Buffer<float> fp8_scales) {
  Entry& e = entries_[&t];
  e.host = const_cast<Tensor*>(&t);
  e.f32 = std::move(f32);
  e.bf16 = std::move(bf16);
  e.grad = std::move(grad);
  if (fp8_codes.size()) {
    if (t.shape.size() < 2)
      fail(Code::Internal, "an adopted FP8 copy of a tensor that is not a matrix");
    e.fp8_cols = t.shape.back();
    e.fp8_rows = t.shape[t.shape.size() - 2];
    int64_t n = 1;  // from the shape: an adopted tensor holds no values on the host
    for (int64_t d : t.shape) n *= d;
    e.fp8_matrices = n / (e.fp8_rows * e.fp8_cols);
    e.fp8_codes = std::move(fp8_codes);
    e.fp8_scales = std::move(fp8_scales);
  }
  e.f32_ptr = e.f32.size() ? e.f32.data() : nullptr;
  e.grad_ptr = e.grad.size() ? e.grad.data() : nullptr;
}

}  // namespace moert

namespace moert {

void ParamStore::redirect_grad(const Tensor& t, float* acc) {
  Entry& e = entry(t);
  float* own = e.grad.size() ? e.grad.data() : e.host_grad ? e.host_grad->data() : nullptr;
  e.grad_ptr = acc ? acc : own;
}

void ParamStore::set_row_share(bool shared, int64_t first_chunk) {
  shared_rows_ = shared;
  first_chunk_ = first_chunk;
}

GradOut ParamStore::grad_out(const Tensor& t, int64_t offset, int64_t count, bool sparse) {
  float* acc = grad(t) + offset;
  if (!shared_rows_) return GradOut{acc};
  const int64_t n = sparse ? t.shape.back() : count < 0 ? t.numel() - offset : count;
  roots_.push_back({std::make_unique<GradRoots>(), acc, n, sparse});
  return GradOut{acc, roots_.back().roots.get(), first_chunk_};
}

std::vector<ParamStore::PendingRoots> ParamStore::take_roots() {
  std::vector<PendingRoots> out = std::move(roots_);
  roots_.clear();
  return out;
}

}  // namespace moert
