#include "core/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace moert {

void EmbeddingLayer::forward(Backend&, const float*, float*, int64_t) {
  fail(Code::Internal, "an embedding layer takes token ids, not hidden states");
}

void EmbeddingLayer::forward_tokens(Backend& be, const int32_t* tokens, float* y, int64_t rows) {
  be.embedding(tokens, s_.weight.data(), y, rows, s_.context, s_.dim);
}

void RMSNormLayer::forward(Backend& be, const float* x, float* y, int64_t rows) {
  be.rmsnorm(x, s_.weight.data(), y, nullptr, rows, s_.dim, s_.eps);
}

void DenseFFNLayer::forward(Backend& be, const float* x, float* y, int64_t rows) {
  const size_t n = static_cast<size_t>(rows) * s_.dim;
  if (s_.residual) std::memcpy(y, x, n * sizeof(float));
  be.swiglu_ffn(x, s_.w1.data(), s_.w3.data(), s_.w2.data(), y, rows, s_.dim, s_.hidden,
                s_.residual);
}

void OutputHeadLayer::forward(Backend& be, const float* x, float* y, int64_t rows) {
  be.linear(x, s_.weight.data(), s_.has_bias ? s_.bias.data() : nullptr, y, rows, s_.dim,
            s_.vocab_size, false);
}

MoELayer::MoELayer(const MoESpec& s)
    : s_(s), counts_(s.router.num_experts, 0), pending_counts_(s.router.num_experts, 0) {}

void MoELayer::forward(Backend& be, const float* x, float* y, int64_t rows) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts, K = r.top_k, D = s_.dim;
  logits_.resize(static_cast<size_t>(rows * E));
  scores_.resize(logits_.size());
  // Router logits in fp32, whatever the expert precision.
  be.linear(x, s_.gate.data(), nullptr, logits_.data(), rows, D, E, false);

  if (s_.balancing.policy == BalancingPolicy::ExpertChoice) {
    const double want =
        std::ceil(static_cast<double>(s_.balancing.capacity_factor) * static_cast<double>(rows) *
                  static_cast<double>(K) / static_cast<double>(E));
    const int64_t capacity = std::min<int64_t>(rows, static_cast<int64_t>(want));
    be.route_expert_choice(r, logits_.data(), rows, capacity, scores_.data(), plan_);
  } else {
    experts_.resize(static_cast<size_t>(rows * K));
    weights_.resize(experts_.size());
    be.route_topk(r, logits_.data(), s_.gate_bias.data(), rows, scores_.data(), experts_.data(),
                  weights_.data());
    be.plan_dispatch(experts_.data(), weights_.data(), rows, K, E, plan_);
  }

  const int64_t A = plan_.num_assignments();
  x_perm_.resize(static_cast<size_t>(A * D));
  y_perm_.resize(x_perm_.size());
  be.dispatch(plan_, x, x_perm_.data(), D);
  be.grouped_swiglu_ffn(plan_, x_perm_.data(), s_.w1.data(), s_.w3.data(), s_.w2.data(),
                        y_perm_.data(), D, s_.expert_hidden);

  const size_t n = static_cast<size_t>(rows * D);
  if (s_.residual)
    std::memcpy(y, x, n * sizeof(float));
  else
    std::fill(y, y + n, 0.0f);
  const int64_t shared_stride = static_cast<int64_t>(s_.shared_hidden) * D;
  for (uint32_t i = 0; i < s_.num_shared; ++i)
    be.swiglu_ffn(x, s_.shared_w1.data() + i * shared_stride,
                  s_.shared_w3.data() + i * shared_stride, s_.shared_w2.data() + i * shared_stride,
                  y, rows, D, s_.shared_hidden, true);
  be.combine(plan_, y_perm_.data(), y, D);

  for (int64_t e = 0; e < E; ++e) pending_counts_[e] = plan_.count(e);
}

double MoELayer::max_vio() const {
  int64_t total = 0, mx = 0;
  for (int64_t c : counts_) {
    total += c;
    mx = std::max(mx, c);
  }
  if (total == 0) return 0.0;
  const double mean = static_cast<double>(total) / static_cast<double>(counts_.size());
  return (static_cast<double>(mx) - mean) / mean;
}

std::unique_ptr<Layer> make_layer(const LayerSpec& spec) {
  switch (spec.kind) {
    case LayerKind::Embedding:
      return std::make_unique<EmbeddingLayer>(std::get<EmbeddingSpec>(spec.spec));
    case LayerKind::RMSNorm:
      return std::make_unique<RMSNormLayer>(std::get<RMSNormSpec>(spec.spec));
    case LayerKind::MoE:
      return std::make_unique<MoELayer>(std::get<MoESpec>(spec.spec));
    case LayerKind::DenseFFN:
      return std::make_unique<DenseFFNLayer>(std::get<DenseFFNSpec>(spec.spec));
    case LayerKind::OutputHead:
      return std::make_unique<OutputHeadLayer>(std::get<OutputHeadSpec>(spec.spec));
  }
  fail(Code::Internal, "unknown layer kind ", static_cast<int>(spec.kind));
}

}  // namespace moert
