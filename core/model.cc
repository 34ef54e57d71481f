#include "core/model.h"

#include "core/error.h"
#include "core/tensor_codec.h"

namespace moert {
namespace {

// Sums of a description-only model's sizes can pass 2^64 (a full load is refused long before):
// they stop at the largest value rather than wrap to a small one.
void add_saturating(uint64_t& sum, uint64_t v) {
  if (__builtin_add_overflow(sum, v, &sum)) sum = UINT64_MAX;
}

}  // namespace

const char* layer_kind_name(LayerKind kind) {
  switch (kind) {
    case LayerKind::Embedding:
      return "Embedding";
    case LayerKind::RMSNorm:
      return "RMSNorm";
    case LayerKind::MoE:
      return "MoE";
    case LayerKind::DenseFFN:
      return "DenseFFN";
    case LayerKind::OutputHead:
      return "OutputHead";
  }
  return "unknown";
}

void Fp8Blocks::decode(int64_t first, int64_t count, float* out) const {
  if (first < 0 || count < 0 || first > matrices || count > matrices - first)
    fail(Code::Internal, "FP8 decode of matrices [", first, ", +", count, ") of ", matrices);
  float table[256];
  for (int i = 0; i < 256; ++i) table[i] = e4m3_to_float(static_cast<uint8_t>(i));
  const int64_t ld = scale_ld(), per = matrix_scales();
  for (int64_t m = first; m < first + count; ++m)
    for (int64_t r = 0; r < rows; ++r) {
      const float* scale_row = scales.data() + m * per + r / fp8::kBlock * ld;
      const uint8_t* code = codes.data() + (m * rows + r) * cols;
      float* y = out + ((m - first) * rows + r) * cols;
      for (int64_t c = 0; c < cols; ++c) y[c] = table[code[c]] * scale_row[c / fp8::kBlock];
    }
}

int64_t Tensor::shape_numel() const {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;  // the loader checked the product against overflow
  return n;
}

void Tensor::refuse_data() const {
  if (unloaded)
    fail(Code::Internal, "the values of a tensor of a description-only model were asked for");
  fail(Code::Internal, "the fp32 values of a tensor held in FP8 were asked for; decode it first");
}

std::vector<float> Tensor::decode_fp32() const {
  if (unloaded) refuse_data();
  if (!fp8) return values;
  std::vector<float> out(static_cast<size_t>(fp8->numel()));
  fp8->decode(0, fp8->matrices, out.data());
  return out;
}

void Tensor::make_fp32() {
  if (!fp8) return;
  values = decode_fp32();
  fp8.reset();
}

uint64_t Model::resident_bytes() const {
  uint64_t n = 0;
  for (const auto& l : layers) {
    visit_tensors(l, [&](const char*, const Tensor& t) { add_saturating(n, t.resident_bytes()); });
    if (const auto* m = std::get_if<MoESpec>(&l.spec))
      add_saturating(n, m->gate_bias.resident_bytes());
  }
  return n;
}

void Model::require_weights(const char* use) const {
  if (description_only)
    fail(Code::InvalidArgument,
         "the model was loaded description-only (moert_load_options_set_description_only): it "
         "holds no weights, so it cannot ",
         use, "; load it without that option");
}

void Model::make_fp32() {
  for (auto& l : layers) visit_tensors(l, [](const char*, Tensor& t) { t.make_fp32(); });
}

std::vector<ParamRef> Model::parameters() const {
  std::vector<ParamRef> out;
  for (uint32_t i = 0; i < layers.size(); ++i)
    visit_tensors(layers[i], [&](const char* field, const Tensor& t) {
      if (t.present()) out.push_back({layers[i].name + "." + field, i, &t});
    });
  return out;
}

uint64_t Model::total_parameters() const {
  uint64_t n = 0;
  for (const auto& p : parameters()) add_saturating(n, static_cast<uint64_t>(p.tensor->numel()));
  return n;
}

uint64_t Model::activated_parameters() const {
  uint64_t n = 0;
  for (const auto& p : parameters()) {
    const LayerSpec& l = layers[p.layer];
    const uint64_t numel = static_cast<uint64_t>(p.tensor->numel());
    if (const auto* e = std::get_if<EmbeddingSpec>(&l.spec)) {
      add_saturating(n, static_cast<uint64_t>(e->context) * e->dim);
    } else if (const auto* m = std::get_if<MoESpec>(&l.spec);
               m && (p.tensor == &m->w1 || p.tensor == &m->w3 || p.tensor == &m->w2)) {
      add_saturating(n, numel / m->router.num_experts * m->router.top_k);
    } else {
      add_saturating(n, numel);
    }
  }
  return n;
}

}  // namespace moert
