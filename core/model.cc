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
  for (uint32_t i = 0; i < layers.size(); ++i) {
    const LayerSpec& l = layers[i];
    auto add = [&](const char* field, const Tensor& t) {
      if (!t.values.empty()) out.push_back({l.name + "." + field, i, &t});
    };
    std::visit(
        [&](const auto& s) {
          using S = std::decay_t<decltype(s)>;
          if constexpr (std::is_same_v<S, EmbeddingSpec> || std::is_same_v<S, RMSNormSpec>) {
            add("weight", s.weight);
          } else if constexpr (std::is_same_v<S, DenseFFNSpec>) {
            add("w1", s.w1);
            add("w3", s.w3);
            add("w2", s.w2);
          } else if constexpr (std::is_same_v<S, MoESpec>) {
            add("gate", s.gate);
            add("w1", s.w1);
            add("w3", s.w3);
            add("w2", s.w2);
            add("shared_w1", s.shared_w1);
            add("shared_w3", s.shared_w3);
            add("shared_w2", s.shared_w2);
          } else {
            add("weight", s.weight);
            add("bias", s.bias);
          }
        },
        l.spec);
  }
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
