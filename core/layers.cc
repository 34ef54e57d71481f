#include "core/layers.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace moert {
namespace {

// dx when the caller gave one, else a scratch array of the right size.
float* or_scratch(Backend& be, float* dx, Buffer<float>& scratch, size_t n) {
  if (dx) return dx;
  scratch.resize(be, n);
  return scratch.data();
}

}  // namespace

void EmbeddingLayer::forward(Backend&, const float*, float*, int64_t, Pass) {
  fail(Code::Internal, "an embedding layer takes token ids, not hidden states");
}

void EmbeddingLayer::forward_tokens(Backend& be, const int32_t* tokens, float* y, int64_t rows,
                                    Pass pass) {
  be.embedding(tokens, p_.f32(s_.weight), y, rows, s_.context, s_.dim);
  if (pass == Pass::Train) tokens_ = tokens;
}

void EmbeddingLayer::backward(Backend& be, const float* dy, float*, int64_t rows) {
  be.embedding_backward(tokens_, dy, p_.grad(s_.weight), rows, s_.context, s_.dim, s_.vocab_size);
}

void RMSNormLayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  const bool keep = pass == Pass::Train;
  if (keep) {
    x_ = x;
    inv_rms_.resize(be, static_cast<size_t>(rows));
  }
  be.rmsnorm(x, p_.f32(s_.weight), y, keep ? inv_rms_.data() : nullptr, rows, s_.dim, s_.eps);
}

void RMSNormLayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  dx = or_scratch(be, dx, scratch_, static_cast<size_t>(rows) * s_.dim);
  be.rmsnorm_backward(x_, p_.f32(s_.weight), inv_rms_.data(), dy, dx, p_.grad(s_.weight), rows,
                      s_.dim);
}

void DenseFFNLayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  const size_t n = static_cast<size_t>(rows) * s_.dim;
  if (s_.residual) be.copy(y, x, n * sizeof(float));
  float *h1 = nullptr, *h3 = nullptr;
  if (pass == Pass::Train) {
    x_ = x;
    h1_.resize(be, static_cast<size_t>(rows) * s_.hidden);
    h3_.resize(be, h1_.size());
    h1 = h1_.data();
    h3 = h3_.data();
  }
  be.swiglu_ffn(x, p_.weight(s_.w1), p_.weight(s_.w3), p_.weight(s_.w2), y, h1, h3, rows, s_.dim,
                s_.hidden, s_.residual);
}

void DenseFFNLayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  const size_t n = static_cast<size_t>(rows) * s_.dim;
  dx = or_scratch(be, dx, scratch_, n);
  // The residual path passes dy straight through.
  if (s_.residual) be.copy(dx, dy, n * sizeof(float));
  be.swiglu_ffn_backward(x_, p_.weight(s_.w1), p_.weight(s_.w3), p_.weight(s_.w2), h1_.data(),
                         h3_.data(), dy, dx, s_.residual, p_.grad(s_.w1), p_.grad(s_.w3),
                         p_.grad(s_.w2), rows, s_.dim, s_.hidden);
}

void OutputHeadLayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  if (pass == Pass::Train) x_ = x;
  be.linear(x, p_.weight(s_.weight), s_.has_bias ? p_.f32(s_.bias) : nullptr, y, rows, s_.dim,
            s_.vocab_size, false);
}

void OutputHeadLayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  be.linear_backward(x_, p_.weight(s_.weight), dy, dx, false, p_.grad(s_.weight),
                     s_.has_bias ? p_.grad(s_.bias) : nullptr, rows, s_.dim, s_.vocab_size);
}

double count_total(const std::vector<int64_t>& counts) {
  // In double: exact up to 2^53 (checkpoints cannot hold more), and no signed overflow beyond.
  double total = 0.0;
  for (int64_t c : counts) total += static_cast<double>(c);
  return total;
}

double max_violation(const std::vector<int64_t>& counts) {
  int64_t mx = 0;
  for (int64_t c : counts) mx = std::max(mx, c);
  const double total = count_total(counts);
  if (total == 0) return 0.0;
  const double mean = total / static_cast<double>(counts.size());
  return (static_cast<double>(mx) - mean) / mean;
}

MoELayer::MoELayer(const MoESpec& s, ParamStore& p, int64_t sequence_length)
    : s_(s), p_(p), sequence_length_(sequence_length) {
  const size_t E = s.router.num_experts;
  counts_.last.assign(E, 0);
  counts_.step.assign(E, 0);
  counts_.eval.assign(E, 0);
  pending_.assign(E, 0);
}

bool MoELayer::uses_aux_loss() const {
  return (s_.balancing.policy == BalancingPolicy::AuxLoss ||
          s_.balancing.policy == BalancingPolicy::SequenceAuxLoss) &&
         s_.balancing.aux_alpha > 0.0f;
}

int64_t MoELayer::capacity(int64_t rows) const {
  const RouterConfig& r = s_.router;
  const double want =
      std::ceil(static_cast<double>(s_.balancing.capacity_factor) * static_cast<double>(rows) *
                static_cast<double>(r.top_k) / static_cast<double>(r.num_experts));
  return std::min<int64_t>(rows, static_cast<int64_t>(want));
}

int64_t MoELayer::indexed_items(int64_t rows) const {
  return s_.balancing.policy == BalancingPolicy::ExpertChoice
             ? capacity(rows) * s_.router.num_experts
             : rows * s_.router.top_k;
}

void MoELayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts, K = r.top_k, D = s_.dim;
  const bool train = pass == Pass::Train;
  logits_.resize(be, static_cast<size_t>(rows * E));
  scores_.resize(be, logits_.size());
  // Router logits in fp32, whatever the expert precision: the gate has no bf16 copy.
  be.linear(x, Weight{p_.f32(s_.gate), nullptr}, nullptr, logits_.data(), rows, D, E, false);

  if (s_.balancing.policy == BalancingPolicy::ExpertChoice) {
    be.route_expert_choice(r, logits_.data(), rows, capacity(rows), scores_.data(), plan_);
  } else {
    experts_.resize(be, static_cast<size_t>(rows * K));
    weights_.resize(be, experts_.size());
    be.route_topk(r, logits_.data(), p_.f32(s_.gate_bias), rows, scores_.data(), experts_.data(),
                  weights_.data());
    be.plan_dispatch(experts_.data(), weights_.data(), rows, K, E, plan_);
  }

  const int64_t A = plan_.num_assignments();
  const int64_t H = s_.expert_hidden;
  x_perm_.resize(be, static_cast<size_t>(A * D));
  y_perm_.resize(be, x_perm_.size());
  be.dispatch(plan_, x, x_perm_.data(), D);
  float *h1 = nullptr, *h3 = nullptr;
  if (train) {
    x_ = x;
    h1_.resize(be, static_cast<size_t>(A * H));
    h3_.resize(be, h1_.size());
    h1 = h1_.data();
    h3 = h3_.data();
  }
  be.grouped_swiglu_ffn(plan_, x_perm_.data(), p_.weight(s_.w1), p_.weight(s_.w3), p_.weight(s_.w2),
                        y_perm_.data(), h1, h3, D, H);

  const size_t n = static_cast<size_t>(rows * D);
  if (s_.residual)
    be.copy(y, x, n * sizeof(float));
  else
    be.zero(y, n * sizeof(float));
  const int64_t HS = s_.shared_hidden, shared_stride = HS * D;
  shared_h1_.resize(s_.num_shared);
  shared_h3_.resize(s_.num_shared);
  for (uint32_t i = 0; i < s_.num_shared; ++i) {
    const int64_t off = i * shared_stride;
    float *sh1 = nullptr, *sh3 = nullptr;
    if (train) {
      shared_h1_[i].resize(be, static_cast<size_t>(rows * HS));
      shared_h3_[i].resize(be, shared_h1_[i].size());
      sh1 = shared_h1_[i].data();
      sh3 = shared_h3_[i].data();
    }
    be.swiglu_ffn(x, p_.weight(s_.shared_w1).offset(off), p_.weight(s_.shared_w3).offset(off),
                  p_.weight(s_.shared_w2).offset(off), y, sh1, sh3, rows, D, HS, true);
  }
  be.combine(plan_, y_perm_.data(), y, D);

  for (int64_t e = 0; e < E; ++e) pending_[e] = plan_.count(e);
  aux_loss_ = 0.0;
  if (train && uses_aux_loss()) {
    // The whole batch is one sequence for AuxLoss (the Switch form), and for SequenceAuxLoss
    // without a sequence length.
    const int64_t L =
        s_.balancing.policy == BalancingPolicy::SequenceAuxLoss && sequence_length_ > 0
            ? sequence_length_
            : rows;
    aux_ds_.resize(be, static_cast<size_t>(rows * E));
    aux_loss_ =
        be.aux_loss(r, scores_.data(), plan_, rows, L, s_.balancing.aux_alpha, aux_ds_.data());
  }
}

void MoELayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts, D = s_.dim, A = plan_.num_assignments();
  const size_t n = static_cast<size_t>(rows * D);
  dx = or_scratch(be, dx, scratch_, n);
  if (s_.residual)
    be.copy(dx, dy, n * sizeof(float));
  else
    be.zero(dx, n * sizeof(float));

  // Routed experts: through the combine, the experts, the dispatch.
  dy_perm_.resize(be, static_cast<size_t>(A * D));
  dweight_.resize(be, static_cast<size_t>(A));
  dx_perm_.resize(be, dy_perm_.size());
  be.combine_backward(plan_, y_perm_.data(), dy, dy_perm_.data(), dweight_.data(), D);
  be.grouped_swiglu_ffn_backward(plan_, x_perm_.data(), p_.weight(s_.w1), p_.weight(s_.w3),
                                 p_.weight(s_.w2), h1_.data(), h3_.data(), dy_perm_.data(),
                                 dx_perm_.data(), p_.grad(s_.w1), p_.grad(s_.w3), p_.grad(s_.w2), D,
                                 s_.expert_hidden);
  be.dispatch_backward(plan_, dx_perm_.data(), dx, D);

  // Shared experts see every token with weight 1.
  const int64_t HS = s_.shared_hidden, shared_stride = HS * D;
  for (uint32_t i = 0; i < s_.num_shared; ++i) {
    const int64_t off = i * shared_stride;
    be.swiglu_ffn_backward(x_, p_.weight(s_.shared_w1).offset(off),
                           p_.weight(s_.shared_w3).offset(off), p_.weight(s_.shared_w2).offset(off),
                           shared_h1_[i].data(), shared_h3_[i].data(), dy, dx, true,
                           p_.grad(s_.shared_w1) + off, p_.grad(s_.shared_w3) + off,
                           p_.grad(s_.shared_w2) + off, rows, D, HS);
  }

  // Router: gate weights come from the unbiased scores; the bias gets no gradient.
  const bool normalize = r.normalize && s_.balancing.policy != BalancingPolicy::ExpertChoice;
  dlogits_.resize(be, static_cast<size_t>(rows * E));
  be.router_backward(r, normalize, scores_.data(), plan_, dweight_.data(),
                     uses_aux_loss() ? aux_ds_.data() : nullptr, dlogits_.data(), rows);
  be.linear_backward(x_, Weight{p_.f32(s_.gate), nullptr}, dlogits_.data(), dx, true,
                     p_.grad(s_.gate), nullptr, rows, D, E);
}

void MoELayer::commit_stats(Pass pass) {
  counts_.last = pending_;
  auto& into = pass == Pass::Train ? counts_.step : counts_.eval;
  for (size_t e = 0; e < pending_.size(); ++e) into[e] += pending_[e];
}

std::unique_ptr<Layer> make_layer(const LayerSpec& spec, ParamStore& params,
                                  int64_t sequence_length) {
  switch (spec.kind) {
    case LayerKind::Embedding:
      return std::make_unique<EmbeddingLayer>(std::get<EmbeddingSpec>(spec.spec), params);
    case LayerKind::RMSNorm:
      return std::make_unique<RMSNormLayer>(std::get<RMSNormSpec>(spec.spec), params);
    case LayerKind::MoE:
      return std::make_unique<MoELayer>(std::get<MoESpec>(spec.spec), params, sequence_length);
    case LayerKind::DenseFFN:
      return std::make_unique<DenseFFNLayer>(std::get<DenseFFNSpec>(spec.spec), params);
    case LayerKind::OutputHead:
      return std::make_unique<OutputHeadLayer>(std::get<OutputHeadSpec>(spec.spec), params);
  }
  fail(Code::Internal, "unknown layer kind ", static_cast<int>(spec.kind));
}

}  // namespace moert
