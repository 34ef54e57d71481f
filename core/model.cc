#include "core/model.h"

namespace moert {

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

std::vector<ParamRef> Model::parameters() const {
  std::vector<ParamRef> out;
  for (uint32_t i = 0; i < layers.size(); ++i)
    visit_tensors(layers[i], [&](const char* field, const Tensor& t) {
      if (!t.values.empty()) out.push_back({layers[i].name + "." + field, i, &t});
    });
  return out;
}

uint64_t Model::total_parameters() const {
  uint64_t n = 0;
  for (const auto& p : parameters()) n += static_cast<uint64_t>(p.tensor->numel());
  return n;
}

uint64_t Model::activated_parameters() const {
  uint64_t n = 0;
  for (const auto& p : parameters()) {
    const LayerSpec& l = layers[p.layer];
    const uint64_t numel = static_cast<uint64_t>(p.tensor->numel());
    if (const auto* e = std::get_if<EmbeddingSpec>(&l.spec)) {
      n += static_cast<uint64_t>(e->context) * e->dim;
    } else if (const auto* m = std::get_if<MoESpec>(&l.spec);
               m && (p.tensor == &m->w1 || p.tensor == &m->w3 || p.tensor == &m->w2)) {
      n += numel / m->router.num_experts * m->router.top_k;
    } else {
      n += numel;
    }
  }
  return n;
}

}  // namespace moert
