#include "core/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace moert {

void EmbeddingLayer::forward(Backend&, const float*, float*, int64_t, Pass) {
  fail(Code::Internal, "an embedding layer takes token ids, not hidden states");
}

void EmbeddingLayer::forward_tokens(Backend& be, const int32_t* tokens, float* y, int64_t rows,
                                    Pass pass) {
  be.embedding(tokens, s_.weight.data(), y, rows, s_.context, s_.dim);
  if (pass == Pass::Train) tokens_.assign(tokens, tokens + rows * s_.context);
}

void EmbeddingLayer::backward(Backend& be, const float* dy, float*, int64_t rows) {
  be.embedding_backward(tokens_.data(), dy, g_->weight.data(), rows, s_.context, s_.dim);
}

void RMSNormLayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  const bool keep = pass == Pass::Train;
  if (keep) {
    x_ = x;
    inv_rms_.resize(static_cast<size_t>(rows));
  }
  be.rmsnorm(x, s_.weight.data(), y, keep ? inv_rms_.data() : nullptr, rows, s_.dim, s_.eps);
}

void RMSNormLayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  std::vector<float> scratch;
  if (!dx) {
    scratch.resize(static_cast<size_t>(rows) * s_.dim);
    dx = scratch.data();
  }
  be.rmsnorm_backward(x_, s_.weight.data(), inv_rms_.data(), dy, dx, g_->weight.data(), rows,
                      s_.dim);
}

void DenseFFNLayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  const size_t n = static_cast<size_t>(rows) * s_.dim;
  if (s_.residual) std::memcpy(y, x, n * sizeof(float));
  if (pass == Pass::Train) {
    x_ = x;
    h1_.resize(static_cast<size_t>(rows) * s_.hidden);
    h3_.resize(h1_.size());
    be.swiglu_ffn_train(x, s_.w1.data(), s_.w3.data(), s_.w2.data(), y, h1_.data(), h3_.data(),
                        rows, s_.dim, s_.hidden, s_.residual);
  } else {
    be.swiglu_ffn(x, s_.w1.data(), s_.w3.data(), s_.w2.data(), y, rows, s_.dim, s_.hidden,
                  s_.residual);
  }
}

void DenseFFNLayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  std::vector<float> scratch;
  if (!dx) {
    scratch.resize(static_cast<size_t>(rows) * s_.dim);
    dx = scratch.data();
  }
  // The residual path passes dy straight through.
  if (s_.residual) std::memcpy(dx, dy, sizeof(float) * static_cast<size_t>(rows) * s_.dim);
  be.swiglu_ffn_backward(x_, s_.w1.data(), s_.w3.data(), s_.w2.data(), h1_.data(), h3_.data(), dy,
                         dx, s_.residual, g_->w1.data(), g_->w3.data(), g_->w2.data(), rows, s_.dim,
                         s_.hidden);
}

void OutputHeadLayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  if (pass == Pass::Train) x_ = x;
  be.linear(x, s_.weight.data(), s_.has_bias ? s_.bias.data() : nullptr, y, rows, s_.dim,
            s_.vocab_size, false);
}

void OutputHeadLayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  be.linear_backward(x_, s_.weight.data(), dy, dx, false, g_->weight.data(),
                     s_.has_bias ? g_->bias.data() : nullptr, rows, s_.dim, s_.vocab_size);
}

double max_violation(const std::vector<int64_t>& counts) {
  int64_t total = 0, mx = 0;
  for (int64_t c : counts) {
    total += c;
    mx = std::max(mx, c);
  }
  if (total == 0) return 0.0;
  const double mean = static_cast<double>(total) / static_cast<double>(counts.size());
  return (static_cast<double>(mx) - mean) / mean;
}

MoELayer::MoELayer(const MoESpec& s, MoESpec* g, int64_t sequence_length)
    : s_(s), g_(g), sequence_length_(sequence_length) {
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

void MoELayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts, K = r.top_k, D = s_.dim;
  const bool train = pass == Pass::Train;
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
  if (train) {
    x_ = x;
    h1_.resize(static_cast<size_t>(A) * s_.expert_hidden);
    h3_.resize(h1_.size());
    be.grouped_swiglu_ffn_train(plan_, x_perm_.data(), s_.w1.data(), s_.w3.data(), s_.w2.data(),
                                y_perm_.data(), h1_.data(), h3_.data(), D, s_.expert_hidden);
  } else {
    be.grouped_swiglu_ffn(plan_, x_perm_.data(), s_.w1.data(), s_.w3.data(), s_.w2.data(),
                          y_perm_.data(), D, s_.expert_hidden);
  }

  const size_t n = static_cast<size_t>(rows * D);
  if (s_.residual)
    std::memcpy(y, x, n * sizeof(float));
  else
    std::fill(y, y + n, 0.0f);
  const int64_t shared_stride = static_cast<int64_t>(s_.shared_hidden) * D;
  shared_h1_.resize(s_.num_shared);
  shared_h3_.resize(s_.num_shared);
  for (uint32_t i = 0; i < s_.num_shared; ++i) {
    const float* w1 = s_.shared_w1.data() + i * shared_stride;
    const float* w3 = s_.shared_w3.data() + i * shared_stride;
    const float* w2 = s_.shared_w2.data() + i * shared_stride;
    if (train) {
      shared_h1_[i].resize(static_cast<size_t>(rows) * s_.shared_hidden);
      shared_h3_[i].resize(shared_h1_[i].size());
      be.swiglu_ffn_train(x, w1, w3, w2, y, shared_h1_[i].data(), shared_h3_[i].data(), rows, D,
                          s_.shared_hidden, true);
    } else {
      be.swiglu_ffn(x, w1, w3, w2, y, rows, D, s_.shared_hidden, true);
    }
  }
  be.combine(plan_, y_perm_.data(), y, D);

  for (int64_t e = 0; e < E; ++e) pending_[e] = plan_.count(e);
  aux_loss_ = 0.0;
  if (train && uses_aux_loss()) aux_loss_forward(rows);
}

void MoELayer::aux_loss_forward(int64_t rows) {
  // alpha * sum_i f_i P_i per sequence, averaged over sequences, with f_i = E / (K L) * tokens of
  // the sequence sent to i and P_i = mean over the sequence of the normalised scores
  // s'_i = s_i / sum_j s_j. With the whole batch as one sequence this is the Switch/GShard loss
  // alpha * E * sum_i (count_i / (K T)) * P_i. Only P carries a gradient.
  const int64_t E = s_.router.num_experts, K = s_.router.top_k;
  const double alpha = s_.balancing.aux_alpha;
  const int64_t L =
      (s_.balancing.policy == BalancingPolicy::SequenceAuxLoss && sequence_length_ > 0)
          ? sequence_length_
          : rows;
  const int64_t num_seq = rows / L;
  aux_ds_.assign(static_cast<size_t>(rows * E), 0.0f);
  std::vector<double> f(static_cast<size_t>(E)), p(static_cast<size_t>(E)),
      dsn(static_cast<size_t>(E));
  double loss = 0.0;
  for (int64_t q = 0; q < num_seq; ++q) {
    const int64_t t0 = q * L;
    std::fill(f.begin(), f.end(), 0.0);
    std::fill(p.begin(), p.end(), 0.0);
    for (int64_t t = t0; t < t0 + L; ++t) {
      for (int64_t j = plan_.token_offsets[t]; j < plan_.token_offsets[t + 1]; ++j)
        f[plan_.expert[plan_.token_assign[j]]] += 1.0;
      const float* s = scores_.data() + t * E;
      double z = 0.0;
      for (int64_t e = 0; e < E; ++e) z += s[e];
      for (int64_t e = 0; e < E; ++e) p[e] += s[e] / z;
    }
    double seq_loss = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      f[e] *= static_cast<double>(E) / static_cast<double>(K * L);
      p[e] /= static_cast<double>(L);
      seq_loss += f[e] * p[e];
    }
    loss += alpha * seq_loss / static_cast<double>(num_seq);
    // d loss / d s'_{t,i} = alpha f_i / (L num_seq); then through s' = s / z.
    for (int64_t t = t0; t < t0 + L; ++t) {
      const float* s = scores_.data() + t * E;
      double z = 0.0;
      for (int64_t e = 0; e < E; ++e) z += s[e];
      double dot = 0.0;
      for (int64_t e = 0; e < E; ++e) {
        dsn[e] = alpha * f[e] / static_cast<double>(L * num_seq);
        dot += dsn[e] * s[e] / z;
      }
      for (int64_t e = 0; e < E; ++e) aux_ds_[t * E + e] = static_cast<float>((dsn[e] - dot) / z);
    }
  }
  aux_loss_ = loss;
}

void MoELayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts, D = s_.dim, A = plan_.num_assignments();
  std::vector<float> dx_local;
  if (!dx) {
    dx_local.resize(static_cast<size_t>(rows * D));
    dx = dx_local.data();
  }
  if (s_.residual)
    std::memcpy(dx, dy, sizeof(float) * static_cast<size_t>(rows * D));
  else
    std::fill(dx, dx + rows * D, 0.0f);

  // Routed experts: through the combine, the experts, the dispatch.
  std::vector<float> dy_perm(static_cast<size_t>(A * D)), dweight(static_cast<size_t>(A));
  be.combine_backward(plan_, y_perm_.data(), dy, dy_perm.data(), dweight.data(), D);
  std::vector<float> dx_perm(static_cast<size_t>(A * D));
  be.grouped_swiglu_ffn_backward(plan_, x_perm_.data(), s_.w1.data(), s_.w3.data(), s_.w2.data(),
                                 h1_.data(), h3_.data(), dy_perm.data(), dx_perm.data(),
                                 g_->w1.data(), g_->w3.data(), g_->w2.data(), D, s_.expert_hidden);
  be.dispatch_backward(plan_, dx_perm.data(), dx, D);

  // Shared experts see every token with weight 1.
  const int64_t shared_stride = static_cast<int64_t>(s_.shared_hidden) * D;
  for (uint32_t i = 0; i < s_.num_shared; ++i) {
    const int64_t off = i * shared_stride;
    be.swiglu_ffn_backward(x_, s_.shared_w1.data() + off, s_.shared_w3.data() + off,
                           s_.shared_w2.data() + off, shared_h1_[i].data(), shared_h3_[i].data(),
                           dy, dx, true, g_->shared_w1.data() + off, g_->shared_w3.data() + off,
                           g_->shared_w2.data() + off, rows, D, s_.shared_hidden);
  }

  // Router: gate weights come from the unbiased scores; the bias gets no gradient.
  const bool normalize = r.normalize && s_.balancing.policy != BalancingPolicy::ExpertChoice;
  std::vector<float> dlogits(static_cast<size_t>(rows * E));
  be.router_backward(r, normalize, scores_.data(), plan_, dweight.data(),
                     uses_aux_loss() ? aux_ds_.data() : nullptr, dlogits.data(), rows);
  be.linear_backward(x_, s_.gate.data(), dlogits.data(), dx, true, g_->gate.data(), nullptr, rows,
                     D, E);
}

void MoELayer::commit_stats(Pass pass) {
  counts_.last = pending_;
  if (pass == Pass::Train)
    for (size_t e = 0; e < pending_.size(); ++e) counts_.step[e] += pending_[e];
  else if (pass == Pass::Eval)
    for (size_t e = 0; e < pending_.size(); ++e) counts_.eval[e] += pending_[e];
}

std::unique_ptr<Layer> make_layer(const LayerSpec& spec, LayerSpec* grads,
                                  int64_t sequence_length) {
  auto g = [&](auto* type) -> decltype(type) {
    return grads ? &std::get<std::remove_pointer_t<decltype(type)>>(grads->spec) : nullptr;
  };
  switch (spec.kind) {
    case LayerKind::Embedding:
      return std::make_unique<EmbeddingLayer>(std::get<EmbeddingSpec>(spec.spec),
                                              g(static_cast<EmbeddingSpec*>(nullptr)));
    case LayerKind::RMSNorm:
      return std::make_unique<RMSNormLayer>(std::get<RMSNormSpec>(spec.spec),
                                            g(static_cast<RMSNormSpec*>(nullptr)));
    case LayerKind::MoE:
      return std::make_unique<MoELayer>(std::get<MoESpec>(spec.spec),
                                        g(static_cast<MoESpec*>(nullptr)), sequence_length);
    case LayerKind::DenseFFN:
      return std::make_unique<DenseFFNLayer>(std::get<DenseFFNSpec>(spec.spec),
                                             g(static_cast<DenseFFNSpec*>(nullptr)));
    case LayerKind::OutputHead:
      return std::make_unique<OutputHeadLayer>(std::get<OutputHeadSpec>(spec.spec),
                                               g(static_cast<OutputHeadSpec*>(nullptr)));
  }
  fail(Code::Internal, "unknown layer kind ", static_cast<int>(spec.kind));
}

}  // namespace moert
