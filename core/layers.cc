#include "core/layers.h"

#include <algorithm>
#include <cmath>

#include "core/aux_loss.h"
#include "core/error.h"

namespace moert {
namespace {

// FP8 quantizers name a value's row in the rows their FFN was given (RowError). A dense or shared
// FFN is given the layer's rows.
template <typename F>
void in_layer_rows(F&& f) {
  try {
    f();
  } catch (const RowError& e) {
    if (e.layer_row()) throw;
    throw e.at_layer_row(e.row());
  }
}

// The routed experts are given the layer's tokens in routing order: row p is plan.token[p].
template <typename F>
void in_routing_order(Backend& be, const DispatchPlan& plan, F&& f) {
  try {
    f();
  } catch (const RowError& e) {
    if (e.layer_row() || e.row() < 0 || e.row() >= plan.num_assignments()) throw;
    int32_t token = 0;
    be.download(&token, plan.token.data() + e.row(), sizeof token);
    throw e.at_layer_row(token);
  }
}

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
  be.embedding_backward(tokens_, dy, p_.grad_out(s_.weight, 0, -1, true), rows, s_.context, s_.dim,
                        s_.vocab_size);
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
  be.rmsnorm_backward(x_, p_.f32(s_.weight), inv_rms_.data(), dy, dx, p_.grad_out(s_.weight), rows,
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
  in_layer_rows([&] {
    be.swiglu_ffn(x, p_.weight(s_.w1), p_.weight(s_.w3), p_.weight(s_.w2), y, h1, h3, rows, s_.dim,
                  s_.hidden, s_.residual);
  });
}

void DenseFFNLayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  const size_t n = static_cast<size_t>(rows) * s_.dim;
  dx = or_scratch(be, dx, scratch_, n);
  // The residual path passes dy straight through.
  if (s_.residual) be.copy(dx, dy, n * sizeof(float));
  in_layer_rows([&] {
    be.swiglu_ffn_backward(x_, p_.weight(s_.w1), p_.weight(s_.w3), p_.weight(s_.w2), h1_.data(),
                           h3_.data(), dy, dx, s_.residual, p_.grad_out(s_.w1), p_.grad_out(s_.w3),
                           p_.grad_out(s_.w2), rows, s_.dim, s_.hidden);
  });
}

void OutputHeadLayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  if (pass == Pass::Train) x_ = x;
  be.linear(x, p_.weight(s_.weight), s_.has_bias ? p_.f32(s_.bias) : nullptr, y, rows, s_.dim,
            s_.vocab_size, false);
}

void OutputHeadLayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  const GradOut db = s_.has_bias ? p_.grad_out(s_.bias) : GradOut{};
  be.linear_backward(x_, p_.weight(s_.weight), dy, dx, false, p_.grad_out(s_.weight),
                     s_.has_bias ? &db : nullptr, rows, s_.dim, s_.vocab_size);
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

MoELayer::MoELayer(const MoESpec& s, ParamStore& p) : s_(s), p_(p) {
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

namespace {

size_t plan_bytes(const DispatchPlan& p) {
  return held_bytes(p.expert_offsets, p.token, p.expert, p.weight, p.token_offsets,
                    p.token_assign) +
         p.host_offsets.capacity() * sizeof(int64_t);
}

void clear_plan(DispatchPlan& p) {
  clear_buffers(p.expert_offsets, p.token, p.expert, p.weight, p.token_offsets, p.token_assign);
  p = DispatchPlan();
}

}  // namespace

size_t MoELayer::work_bytes() const {
  size_t n =
      held_bytes(logits_, scores_, weights_, x_perm_, y_perm_, h1_, h3_, aux_ds_, all_logits_,
                 all_scores_, dy_perm_, dweight_, dx_perm_, dlogits_, scratch_, experts_) +
      plan_bytes(plan_);
  for (const auto& b : shared_h1_) n += b.capacity_bytes();
  for (const auto& b : shared_h3_) n += b.capacity_bytes();
  const Exchange& e = ex_;
  n += held_bytes(e.x_send, e.x_recv, e.y_ret, e.y_back, e.y_home, e.dy_send, e.dy_recv, e.dx_ret,
                  e.dx_back, e.dx_home, e.meta_send, e.meta_recv) +
       plan_bytes(e.send) + plan_bytes(e.remote) + plan_bytes(e.home);
  for (const auto& p : e.groups) n += plan_bytes(p);
  for (const auto& p : e.ret) n += plan_bytes(p);
  n += (e.slot_token.capacity() + e.slot_expert.capacity() + e.chunk_slots.capacity() +
        e.home_rows.capacity()) *
           sizeof(int32_t) +
       e.slot_weight.capacity() * sizeof(float) + e.chunk_meta.capacity();
  return n;
}

void MoELayer::release_work() {
  clear_buffers(logits_, scores_, weights_, x_perm_, y_perm_, h1_, h3_, aux_ds_, all_logits_,
                all_scores_, dy_perm_, dweight_, dx_perm_, dlogits_, scratch_, experts_);
  clear_plan(plan_);
  shared_h1_.clear();
  shared_h3_.clear();
  Exchange& e = ex_;
  clear_buffers(e.x_send, e.x_recv, e.y_ret, e.y_back, e.y_home, e.dy_send, e.dy_recv, e.dx_ret,
                e.dx_back, e.dx_home, e.meta_send, e.meta_recv);
  clear_plan(e.send);
  clear_plan(e.remote);
  clear_plan(e.home);
  e.groups.clear();
  e.ret.clear();
  e.slot_token = {};
  e.slot_expert = {};
  e.chunk_slots = {};
  e.home_rows = {};
  e.slot_weight = {};
  e.chunk_meta = {};
}

void MoELayer::route(Backend& be, const float* x, int64_t rows) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts, K = r.top_k, D = s_.dim;
  logits_.resize(be, static_cast<size_t>(rows * E));
  scores_.resize(be, logits_.size());
  // Router logits in fp32, whatever the expert precision: the gate has no bf16 copy.
  be.linear(x, Weight{p_.f32(s_.gate), nullptr}, nullptr, logits_.data(), rows, D, E, false);
  if (s_.balancing.policy == BalancingPolicy::ExpertChoice) {
    // Among ranks, forward_parallel routes once every rank's logits have arrived.
    if (par_) return;
    be.route_expert_choice(r, logits_.data(), rows, capacity(rows), scores_.data(), plan_, 0, rows);
  } else {
    experts_.resize(be, static_cast<size_t>(rows * K));
    weights_.resize(be, experts_.size());
    be.route_topk(r, logits_.data(), p_.f32(s_.gate_bias), rows, scores_.data(), experts_.data(),
                  weights_.data());
    be.plan_dispatch(experts_.data(), weights_.data(), rows, K, E, plan_);
  }
}

void MoELayer::experts_forward(Backend& be, const DispatchPlan& plan, int64_t first_expert,
                               const float* x, float* x_perm, bool keep_x_perm, float* y_perm,
                               float* h1, float* h3) {
  const int64_t off = expert_weight_offset(first_expert);
  be.dispatch_swiglu_ffn(plan, x, x_perm, keep_x_perm, p_.weight(s_.w1).offset(off),
                         p_.weight(s_.w3).offset(off), p_.weight(s_.w2).offset(off), y_perm, h1, h3,
                         s_.dim, s_.expert_hidden, keep_x_perm ? kept_ld_ : s_.dim);
}

int64_t MoELayer::kept_rows_stride(const Backend& be) const {
  return be.kept_rows_stride(p_.weight(s_.w1), p_.weight(s_.w3), p_.weight(s_.w2), s_.dim,
                             s_.expert_hidden);
}

int64_t MoELayer::expert_weight_offset(int64_t expert) const {
  // A session's tensors hold every expert, or (expert parallelism, training) only its shard's:
  // Session::shard_experts sets the leading dimension to the shard's count. Read from the shape,
  // not the values, which a tensor adopted by the ParamStore (the CUDA benchmark's) lacks.
  const int64_t per_expert = static_cast<int64_t>(s_.expert_hidden) * s_.dim;
  const int64_t E = s_.router.num_experts;
  if (!par_ || (!s_.w1.shape.empty() && s_.w1.shape[0] == E)) return expert * per_expert;
  return (expert - par_->sharding(E).first_expert()) * per_expert;
}

SharedExpert MoELayer::shared_expert(Backend& be, uint32_t i, float* y, int64_t rows, bool train) {
  const int64_t D = s_.dim, HS = s_.shared_hidden, off = i * HS * D;
  shared_h1_.resize(s_.num_shared);
  shared_h3_.resize(s_.num_shared);
  SharedExpert e;
  e.w1 = p_.weight(s_.shared_w1).offset(off);
  e.w3 = p_.weight(s_.shared_w3).offset(off);
  e.w2 = p_.weight(s_.shared_w2).offset(off);
  e.hidden = HS;
  e.residual = s_.residual;
  e.y = y;
  if (train) {
    shared_h1_[i].resize(be, static_cast<size_t>(rows * HS));
    shared_h3_[i].resize(be, shared_h1_[i].size());
    e.h1 = shared_h1_[i].data();
    e.h3 = shared_h3_[i].data();
  }
  return e;
}

void MoELayer::residual_and_shared(Backend& be, const float* x, float* y, int64_t rows, bool train,
                                   uint32_t first) {
  const int64_t D = s_.dim;
  const size_t n = static_cast<size_t>(rows * D);
  if (first == 0) {
    if (s_.residual)
      be.copy(y, x, n * sizeof(float));
    else
      be.zero(y, n * sizeof(float));
  }
  for (uint32_t i = first; i < s_.num_shared; ++i) {
    const SharedExpert e = shared_expert(be, i, y, rows, train);
    in_layer_rows(
        [&] { be.swiglu_ffn(x, e.w1, e.w3, e.w2, y, e.h1, e.h3, rows, D, e.hidden, true); });
  }
}

void MoELayer::forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) {
  const bool train = pass == Pass::Train;
  if (train) x_ = x;
  kept_ld_ = train ? kept_rows_stride(be) : s_.dim;
  if (par_) return forward_parallel(be, x, y, rows, train);
  const int64_t E = s_.router.num_experts, D = s_.dim;
  route(be, x, rows);
  const int64_t A = plan_.num_assignments();
  x_perm_.resize(be, static_cast<size_t>(A * kept_ld_));
  y_perm_.resize(be, static_cast<size_t>(A * D));
  keep_hidden(be, A, train);
  float* h1 = train ? h1_.data() : nullptr;
  float* h3 = train ? h3_.data() : nullptr;
  if (s_.num_shared > 0) {
    // The first shared expert runs beside the routed ones (one parallel stretch; in bf16 one
    // conversion of x for both), the others after it, as residual_and_shared orders them.
    const SharedExpert shared = shared_expert(be, 0, y, rows, train);
    in_routing_order(be, plan_, [&] {
      be.routed_and_shared_ffn(plan_, x, x_perm_.data(), train, p_.weight(s_.w1), p_.weight(s_.w3),
                               p_.weight(s_.w2), y_perm_.data(), h1, h3, D, s_.expert_hidden,
                               kept_ld_, shared);
    });
    residual_and_shared(be, x, y, rows, train, 1);
  } else {
    in_routing_order(be, plan_, [&] {
      experts_forward(be, plan_, 0, x, x_perm_.data(), train, y_perm_.data(), h1, h3);
    });
    residual_and_shared(be, x, y, rows, train);
  }
  be.combine(plan_, y_perm_.data(), y, D);
  for (int64_t e = 0; e < E; ++e) pending_[e] = plan_.count(e);
  aux_loss_ = 0.0;
  if (train && uses_aux_loss()) aux_forward(be, rows);
}

void MoELayer::aux_forward(Backend& be, int64_t rows) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts;
  // The whole batch is one sequence for AuxLoss (the Switch form), and for SequenceAuxLoss
  // without sequences.
  const bool per_sequence =
      s_.balancing.policy == BalancingPolicy::SequenceAuxLoss && sequences_ != nullptr;
  const AuxChunks chunks = aux_chunks(per_sequence ? *sequences_ : std::vector<int64_t>{0, rows});
  std::vector<int64_t> counts(static_cast<size_t>(chunks.chunks() * E));
  std::vector<double> psum(counts.size());
  const auto partials = [&] {
    be.aux_partials(r, scores_.data(), plan_, chunks.chunk_offsets.data(), chunks.chunks(),
                    counts.data(), psum.data());
  };
  // Among ranks the partials are this rank's own computation, between the layer's exchanges and
  // the statistics' gathers: a failure is held (the zeros travel, and the call fails at its end).
  if (par_) {
    par_->compute(partials);
    return aux_parallel(be, rows, chunks, counts, psum);
  }
  partials();
  const AuxTerms t =
      aux_terms(chunks, counts.data(), psum.data(), E, r.top_k, s_.balancing.aux_alpha);
  aux_ds_.resize(be, static_cast<size_t>(rows * E));
  be.aux_grad(r, scores_.data(), rows, chunks.seq_offsets.data(), chunks.num_seq(), t.coef.data(),
              aux_ds_.data());
  aux_loss_ = t.loss;
}

void MoELayer::shared_backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  // Shared experts see every token with weight 1.
  const int64_t D = s_.dim, HS = s_.shared_hidden, shared_stride = HS * D;
  for (uint32_t i = 0; i < s_.num_shared; ++i) {
    const int64_t off = i * shared_stride;
    in_layer_rows([&] {
      be.swiglu_ffn_backward(
          x_, p_.weight(s_.shared_w1).offset(off), p_.weight(s_.shared_w3).offset(off),
          p_.weight(s_.shared_w2).offset(off), shared_h1_[i].data(), shared_h3_[i].data(), dy, dx,
          true, p_.grad_out(s_.shared_w1, off, shared_stride),
          p_.grad_out(s_.shared_w3, off, shared_stride),
          p_.grad_out(s_.shared_w2, off, shared_stride), rows, D, HS);
    });
  }
}

void MoELayer::router_backward(Backend& be, float* dx, int64_t rows) {
  // Gate weights come from the unbiased scores; the bias gets no gradient.
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts, D = s_.dim;
  const bool normalize = r.normalize && s_.balancing.policy != BalancingPolicy::ExpertChoice;
  dlogits_.resize(be, static_cast<size_t>(rows * E));
  be.router_backward(r, normalize, scores_.data(), plan_, dweight_.data(),
                     uses_aux_loss() ? aux_ds_.data() : nullptr, dlogits_.data(), rows);
  be.linear_backward(x_, Weight{p_.f32(s_.gate), nullptr}, dlogits_.data(), dx, true,
                     p_.grad_out(s_.gate), nullptr, rows, D, E);
}

void MoELayer::keep_hidden(Backend& be, int64_t assignments, bool train) {
  if (!train) return;
  h1_.resize(be, static_cast<size_t>(assignments * s_.expert_hidden));
  h3_.resize(be, h1_.size());
}

void MoELayer::experts_backward(Backend& be, const DispatchPlan& plan, int64_t first_expert,
                                const float* x_perm, const float* h1, const float* h3,
                                const float* dy_perm, float* dx_perm, GradRoots* roots,
                                const int64_t* first_chunk) {
  // Each expert's gradient is its own reduction, into its slice of the stacked tensor.
  const int64_t per_expert = s_.expert_hidden * s_.dim;
  const int64_t n = static_cast<int64_t>(plan.host_offsets.size()) - 1;
  const int64_t base = expert_weight_offset(first_expert);
  std::vector<GradOut> g1(static_cast<size_t>(n)), g3(g1.size()), g2(g1.size());
  for (int64_t e = 0; e < n; ++e) {
    const int64_t off = base + e * per_expert;
    g1[e].acc = p_.grad(s_.w1) + off;
    g3[e].acc = p_.grad(s_.w3) + off;
    g2[e].acc = p_.grad(s_.w2) + off;
    if (roots) {
      // The replicas of this shard each hold some of expert e's chunks.
      g1[e].roots = &roots[3 * e];
      g3[e].roots = &roots[3 * e + 1];
      g2[e].roots = &roots[3 * e + 2];
      g1[e].first_chunk = g3[e].first_chunk = g2[e].first_chunk = first_chunk[e];
    }
  }
  be.grouped_swiglu_ffn_backward(plan, x_perm, p_.weight(s_.w1).offset(base),
                                 p_.weight(s_.w3).offset(base), p_.weight(s_.w2).offset(base), h1,
                                 h3, dy_perm, dx_perm, g1.data(), g3.data(), g2.data(), s_.dim,
                                 s_.expert_hidden, kept_ld_);
}

void MoELayer::backward(Backend& be, const float* dy, float* dx, int64_t rows) {
  const int64_t D = s_.dim, A = plan_.num_assignments();
  const size_t n = static_cast<size_t>(rows * D);
  dx = or_scratch(be, dx, scratch_, n);
  if (s_.residual)
    be.copy(dx, dy, n * sizeof(float));
  else
    be.zero(dx, n * sizeof(float));
  if (par_) return backward_parallel(be, dy, dx, rows);

  // dx gets the shared experts, then the routed ones, then the router: the order expert
  // parallelism keeps while the routed experts' exchange is under way.
  shared_backward(be, dy, dx, rows);
  dy_perm_.resize(be, static_cast<size_t>(A * kept_ld_));
  dweight_.resize(be, static_cast<size_t>(A));
  dx_perm_.resize(be, static_cast<size_t>(A * D));
  be.combine_backward(plan_, y_perm_.data(), dy, dy_perm_.data(), dweight_.data(), D, kept_ld_);
  in_routing_order(be, plan_, [&] {
    experts_backward(be, plan_, 0, x_perm_.data(), h1_.data(), h3_.data(), dy_perm_.data(),
                     dx_perm_.data(), nullptr, nullptr);
  });
  be.dispatch_backward(plan_, dx_perm_.data(), dx, D);
  router_backward(be, dx, rows);
}

void MoELayer::skip_pass() {
  std::fill(pending_.begin(), pending_.end(), 0);
  aux_loss_ = 0.0;
}

void MoELayer::commit_stats(Pass pass) {
  counts_.last = pending_;
  auto& into = pass == Pass::Train ? counts_.step : counts_.eval;
  for (size_t e = 0; e < pending_.size(); ++e) into[e] += pending_[e];
}

std::unique_ptr<Layer> make_layer(const LayerSpec& spec, ParamStore& params) {
  switch (spec.kind) {
    case LayerKind::Embedding:
      return std::make_unique<EmbeddingLayer>(std::get<EmbeddingSpec>(spec.spec), params);
    case LayerKind::RMSNorm:
      return std::make_unique<RMSNormLayer>(std::get<RMSNormSpec>(spec.spec), params);
    case LayerKind::MoE:
      return std::make_unique<MoELayer>(std::get<MoESpec>(spec.spec), params);
    case LayerKind::DenseFFN:
      return std::make_unique<DenseFFNLayer>(std::get<DenseFFNSpec>(spec.spec), params);
    case LayerKind::OutputHead:
      return std::make_unique<OutputHeadLayer>(std::get<OutputHeadSpec>(spec.spec), params);
  }
  fail(Code::Internal, "unknown layer kind ", static_cast<int>(spec.kind));
}

}  // namespace moert
