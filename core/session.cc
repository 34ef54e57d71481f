#include "core/session.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>

#include "core/error.h"
#include "core/model_loader.h"
#include "core/model_writer.h"

namespace moert {
namespace {

constexpr uint32_t kAllLayers = std::numeric_limits<uint32_t>::max();

double parse_number(const std::string& key, const std::string& value, double lo, double hi) {
  double v = 0.0;
  const char* end = value.data() + value.size();
  auto [ptr, ec] = std::from_chars(value.data(), end, v);
  if (ec != std::errc() || ptr != end || !std::isfinite(v) || v < lo || v > hi)
    fail(Code::InvalidArgument, "option '", key, "' takes a number in [", lo, ", ", hi, "], got '",
         value, "'");
  return v;
}

uint64_t parse_count(const std::string& key, const std::string& value) {
  uint64_t v = 0;
  const char* end = value.data() + value.size();
  auto [ptr, ec] = std::from_chars(value.data(), end, v);
  if (ec != std::errc() || ptr != end)
    fail(Code::InvalidArgument, "option '", key, "' takes a non-negative integer, got '", value,
         "'");
  return v;
}

bool parse_bool(const std::string& key, const std::string& value) {
  if (value == "true" || value == "1") return true;
  if (value == "false" || value == "0") return false;
  fail(Code::InvalidArgument, "option '", key, "' takes true or false, got '", value, "'");
}

void check_len(uint64_t len, int64_t want, const char* what) {
  if (len != static_cast<uint64_t>(want))
    fail(Code::InvalidArgument, what, " buffer holds ", len, " values but ", want, " are needed");
}

}  // namespace

double TrainingConfig::lr_at(uint64_t step) const {
  if (warmup_steps > 0 && step <= warmup_steps)
    return lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  if (total_steps == 0 || total_steps <= warmup_steps) return lr;
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) /
                                            static_cast<double>(total_steps - warmup_steps));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

void SessionOptions::set(const std::string& key, const std::string& value) {
  TrainingConfig& t = training;
  if (key == "check_finite") {
    check_finite = parse_bool(key, value);
  } else if (key == "cuda_plugin") {
    cuda_plugin = value;
  } else if (key == "optimizer") {
    if (value != "adamw" && value != "sgd")
      fail(Code::InvalidArgument, "option 'optimizer' takes adamw or sgd, got '", value, "'");
    t.optimizer = value;
  } else if (key == "lr") {
    t.lr = parse_number(key, value, 0.0, 1e6);
  } else if (key == "min_lr") {
    t.min_lr = parse_number(key, value, 0.0, 1e6);
  } else if (key == "weight_decay") {
    t.weight_decay = parse_number(key, value, 0.0, 1e6);
  } else if (key == "beta1") {
    t.beta1 = parse_number(key, value, 0.0, 0.999999);
  } else if (key == "beta2") {
    t.beta2 = parse_number(key, value, 0.0, 0.999999999);
  } else if (key == "eps") {
    t.eps = parse_number(key, value, 1e-30, 1.0);
  } else if (key == "momentum") {
    t.momentum = parse_number(key, value, 0.0, 0.999999);
  } else if (key == "clip_norm") {
    t.clip_norm = parse_number(key, value, 0.0, 1e12);
  } else if (key == "warmup_steps") {
    t.warmup_steps = parse_count(key, value);
  } else if (key == "total_steps") {
    t.total_steps = parse_count(key, value);
  } else if (key == "sequence_length") {
    t.sequence_length = static_cast<int64_t>(
        std::min<uint64_t>(parse_count(key, value), std::numeric_limits<int32_t>::max()));
  } else {
    fail(Code::InvalidArgument, "unknown session option '", key,
         "' (known: check_finite, cuda_plugin, optimizer, lr, min_lr, weight_decay, beta1, beta2, "
         "eps, "
         "momentum, clip_norm, warmup_steps, total_steps, sequence_length)");
  }
}

Session::Session(std::shared_ptr<const Model> model, const SessionOptions& options)
    : model_(std::move(model)), options_(options), rng_(options.seed) {
  backend_ = options_.device == Device::Cuda
                 ? make_cuda_backend(options_.device_index, options_.cuda_plugin)
                 : make_cpu_backend(options_.threads);
  const ActiveDevice device(*backend_);
  const int64_t seq = options_.training.sequence_length;
  if (training()) {
    // The session trains its own copy; gradients mirror its layout.
    params_ = std::make_unique<Model>(*model_);
    params_->training.reset();
    grads_ = std::make_unique<Model>(*params_);
    for (auto& l : grads_->layers) {
      visit_tensors(
          l, [](const char*, Tensor& t) { std::fill(t.values.begin(), t.values.end(), 0.0f); });
      if (auto* m = std::get_if<MoESpec>(&l.spec)) m->gate_bias.values.clear();
    }
    for (auto& pl : params_->layers)
      visit_tensors(pl, [&](const char* field, Tensor& t) {
        if (!t.values.empty())
          slots_.push_back({pl.name + "." + field, &t, t.shape.size() >= 2, {}, {}});
      });
    store_ = std::make_unique<ParamStore>(*backend_, *params_, grads_.get());
  } else {
    // Inference never writes parameters: the shared model's tensors are only read (or, on a
    // device backend, copied once).
    store_ = std::make_unique<ParamStore>(*backend_, const_cast<Model&>(*model_), nullptr);
  }
  const Model& p = params();
  balance_.resize(p.layers.size());
  for (size_t i = 0; i < p.layers.size(); ++i) {
    if (const auto* m = std::get_if<MoESpec>(&p.layers[i].spec))
      balance_[i] = {m->balancing.bias_update_rate, m->balancing.bias_frozen};
    layers_.push_back(make_layer(p.layers[i], *store_, seq));
  }
  activations_.resize(layers_.size());
}

void Session::require_training(const char* what) const {
  if (!training())
    fail(Code::InvalidState, what,
         " needs a session created in training mode (MOERT_MODE_TRAINING)");
}

void Session::require_backward_ready() const {
  require_training("backward");
  if (!pending_backward_)
    fail(Code::InvalidState,
         "backward needs a training-mode forward pass first (and only one backward per forward)");
}

Pass Session::next_pass() const { return training() && !eval_ ? Pass::Train : Pass::Eval; }

int64_t Session::check_rows(uint64_t rows, uint64_t out_len) const {
  if (rows == 0) fail(Code::InvalidArgument, "rows must be at least 1");
  // Row counts reach BLAS as 32-bit integers.
  if (rows > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
    fail(Code::InvalidArgument, "rows = ", rows, " exceeds 2^31 - 1");
  uint64_t need;
  if (__builtin_mul_overflow(rows, static_cast<uint64_t>(model_->output_width), &need) ||
      out_len != need)
    fail(Code::InvalidArgument, "output buffer holds ", out_len, " floats but ", rows,
         " rows of width ", model_->output_width, " need ", rows * model_->output_width);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const int64_t items = layers_[i]->indexed_items(static_cast<int64_t>(rows));
    if (items > std::numeric_limits<int32_t>::max())
      fail(Code::InvalidArgument, "rows = ", rows, " is too many for layer '",
           model_->layers[i].name, "': it would index ", items,
           " token positions or token-expert assignments, more than 2^31 - 1");
  }
  const int64_t seq = options_.training.sequence_length;
  if (training() && seq > 0 && rows % static_cast<uint64_t>(seq) != 0)
    fail(Code::InvalidArgument, "rows = ", rows, " is not a multiple of sequence_length = ", seq);
  return static_cast<int64_t>(rows);
}

void Session::forward_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows, float* out,
                             uint64_t out_len) {
  if (!model_->token_input)
    fail(Code::InvalidArgument,
         "this model takes hidden states (its first layer is not an "
         "Embedding): use forward_hidden");
  if (!tokens) fail(Code::InvalidArgument, "tokens is NULL");
  if (!out) fail(Code::InvalidArgument, "out is NULL");
  const int64_t n = check_rows(rows, out_len);
  if (num_tokens != rows * model_->input_width)
    fail(Code::InvalidArgument, "token buffer holds ", num_tokens, " ids but ", rows, " rows of ",
         model_->input_width, " tokens need ", rows * model_->input_width);
  const auto& emb = std::get<EmbeddingSpec>(model_->layers[0].spec);
  for (uint64_t i = 0; i < num_tokens; ++i)
    if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= emb.vocab_size)
      fail(Code::InvalidArgument, "token id ", tokens[i], " at position ", i,
           " is outside the vocabulary [0, ", emb.vocab_size, ")");
  const Pass pass = next_pass();
  pending_backward_ = false;
  tokens_.resize(*backend_, num_tokens);
  backend_->upload(tokens_.data(), tokens, num_tokens * sizeof(int32_t));
  auto& a0 = activations_[0];
  a0.resize(*backend_, static_cast<size_t>(n) * model_->layers[0].out_width);
  static_cast<EmbeddingLayer&>(*layers_[0])
      .forward_tokens(*backend_, tokens_.data(), a0.data(), n, pass);
  run_from(1, a0.data(), n, out, pass);
}

void Session::forward_hidden(const float* in, uint64_t in_len, uint64_t rows, float* out,
                             uint64_t out_len) {
  if (model_->token_input)
    fail(Code::InvalidArgument,
         "this model takes token ids (its first layer is an Embedding): "
         "use forward_tokens");
  if (!in) fail(Code::InvalidArgument, "in is NULL");
  if (!out) fail(Code::InvalidArgument, "out is NULL");
  const int64_t n = check_rows(rows, out_len);
  if (in_len != rows * model_->input_width)
    fail(Code::InvalidArgument, "input buffer holds ", in_len, " floats but ", rows,
         " rows of width ", model_->input_width, " need ", rows * model_->input_width);
  if (options_.check_finite)
    for (uint64_t i = 0; i < in_len; ++i)
      if (!std::isfinite(in[i]))
        fail(Code::Numeric, "input holds a NaN or infinity at row ", i / model_->input_width,
             ", column ", i % model_->input_width);
  const Pass pass = next_pass();
  pending_backward_ = false;
  // The caller's buffer is not ours to keep (backward reads the input again).
  input_.resize(*backend_, in_len);
  backend_->upload(input_.data(), in, in_len * sizeof(float));
  run_from(0, input_.data(), n, out, pass);
}

void Session::run_from(size_t first_layer, const float* x, int64_t rows, float* out, Pass pass) {
  for (size_t i = first_layer; i < layers_.size(); ++i) {
    auto& act = activations_[i];
    act.resize(*backend_, static_cast<size_t>(rows) * model_->layers[i].out_width);
    layers_[i]->forward(*backend_, x, act.data(), rows, pass);
    x = act.data();
  }
  backend_->download(out, x, sizeof(float) * static_cast<size_t>(rows) * model_->output_width);
  for (auto& l : layers_) l->commit_stats(pass);
  last_rows_ = rows;
  pending_backward_ = pass == Pass::Train;
}

// dy_ holds the gradient of the outputs; grad_in (backend memory) receives the input's, if asked.
double Session::run_backward(float* grad_in) {
  const int64_t rows = last_rows_;
  double aux = 0.0;
  for (size_t i = layers_.size(); i-- > 0;) {
    aux += layers_[i]->aux_loss();
    float* target = grad_in;  // the first layer's dx: null when nobody needs it
    if (i > 0) {
      dx_.resize(*backend_, static_cast<size_t>(rows) * model_->layers[i].in_width);
      target = dx_.data();
    }
    layers_[i]->backward(*backend_, dy_.data(), target, rows);
    if (i > 0) std::swap(dy_, dx_);
  }
  ++micro_batches_;
  pending_backward_ = false;
  return aux;
}

double Session::backward_loss(const int32_t* targets, uint64_t num_targets) {
  require_backward_ready();
  if (!targets) fail(Code::InvalidArgument, "targets is NULL");
  if (model_->layers.back().kind != LayerKind::OutputHead)
    fail(Code::InvalidState,
         "backward with targets needs an OutputHead as the last layer; use "
         "moert_session_backward with the output gradient instead");
  check_len(num_targets, last_rows_, "targets");
  const uint32_t vocab = model_->output_width;
  for (uint64_t i = 0; i < num_targets; ++i)
    if (targets[i] < 0 || static_cast<uint32_t>(targets[i]) >= vocab)
      fail(Code::InvalidArgument, "target ", targets[i], " at row ", i,
           " is outside the vocabulary [0, ", vocab, ")");
  const auto& logits = activations_.back();
  targets_.resize(*backend_, num_targets);
  backend_->upload(targets_.data(), targets, num_targets * sizeof(int32_t));
  dy_.resize(*backend_, logits.size());
  const double inv_rows = 1.0 / static_cast<double>(last_rows_);
  const double ce = backend_->cross_entropy(logits.data(), targets_.data(), last_rows_, vocab,
                                            dy_.data(), static_cast<float>(inv_rows));
  return ce * inv_rows + run_backward(nullptr);
}

double Session::backward(const float* grad_out, uint64_t grad_out_len, float* grad_in,
                         uint64_t grad_in_len) {
  require_backward_ready();
  if (!grad_out) fail(Code::InvalidArgument, "grad_out is NULL");
  check_len(grad_out_len, last_rows_ * model_->output_width, "grad_out");
  if (grad_in) {
    if (model_->token_input)
      fail(Code::InvalidArgument, "grad_in must be NULL for a model that takes token ids");
    check_len(grad_in_len, last_rows_ * model_->input_width, "grad_in");
  }
  if (options_.check_finite)
    for (uint64_t i = 0; i < grad_out_len; ++i)
      if (!std::isfinite(grad_out[i]))
        fail(Code::Numeric, "grad_out holds a NaN or infinity at element ", i);
  dy_.resize(*backend_, grad_out_len);
  backend_->upload(dy_.data(), grad_out, grad_out_len * sizeof(float));
  Buffer<float> gin;
  if (grad_in) gin.resize(*backend_, grad_in_len);
  const double aux = run_backward(grad_in ? gin.data() : nullptr);
  if (grad_in) backend_->download(grad_in, gin.data(), grad_in_len * sizeof(float));
  return aux;
}

void Session::zero_grad() {
  require_training("zero_grad");
  store_->zero_grads();
  micro_batches_ = 0;
}

StepInfo Session::step() {
  require_training("step");
  if (eval_) fail(Code::InvalidState, "step in eval mode: switch back to training first");
  const TrainingConfig& c = options_.training;
  StepInfo info;
  info.lr = c.lr_at(step_ + 1);
  if (micro_batches_ > 0) {
    // The gradient of the mean loss over the micro-batches accumulated since zero_grad.
    const double scale = 1.0 / micro_batches_;
    std::vector<const float*> grads;
    std::vector<int64_t> sizes;
    for (const auto& s : slots_) {
      grads.push_back(store_->grad(*s.param));
      sizes.push_back(s.param->numel());
    }
    const double sq = backend_->sum_squares_many(grads.data(), sizes.data(), grads.size());
    info.grad_norm = std::sqrt(sq) * scale;
    if (!std::isfinite(info.grad_norm))
      fail(Code::Numeric, "the gradient holds a NaN or infinity; parameters left unchanged");
    double gscale = scale;
    if (c.clip_norm > 0.0 && info.grad_norm > c.clip_norm) gscale *= c.clip_norm / info.grad_norm;
    const uint64_t t = step_ + 1;
    const double bc1 = 1.0 - std::pow(c.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(c.beta2, static_cast<double>(t));
    const bool adamw = c.optimizer == "adamw";
    // Moments first, for every slot, so that a failed allocation changes no parameter.
    for (auto& s : slots_) {
      const size_t n = s.param->values.size();
      if (s.m.size() != n) {
        s.m.resize(*backend_, n);
        backend_->zero(s.m.data(), n * sizeof(float));
      }
      if (adamw && s.v.size() != n) {
        s.v.resize(*backend_, n);
        backend_->zero(s.v.data(), n * sizeof(float));
      }
    }
    for (auto& s : slots_) {
      float* p = store_->f32_mutable(*s.param);
      const float* g = store_->grad(*s.param);
      const int64_t n = s.param->numel();
      const double wd = s.matrix ? c.weight_decay : 0.0;
      if (adamw)
        backend_->adamw(p, g, s.m.data(), s.v.data(), n, info.lr, c.beta1, c.beta2, c.eps, wd,
                        gscale, bc1, bc2);
      else
        backend_->sgd(p, g, s.m.data(), n, info.lr, c.momentum, wd, gscale);
      store_->refresh_bf16(*s.param);
    }
  }
  update_biases();
  ++step_;
  return info;
}

void Session::update_biases() {
  for (uint32_t i = 0; i < layers_.size(); ++i) {
    if (model_->layers[i].kind != LayerKind::MoE) continue;
    auto& layer = static_cast<MoELayer&>(*layers_[i]);
    auto& counts = layer.counts().step;
    auto& spec = std::get<MoESpec>(params_->layers[i].spec);
    const Balance& b = balance_[i];
    if (spec.balancing.policy == BalancingPolicy::LossFreeBias && !b.frozen && b.gamma > 0.0f) {
      // b_i += gamma * sign(mean - count_i), from integer counts over the whole step.
      const double mean = count_total(counts) / static_cast<double>(counts.size());
      auto& bias = spec.gate_bias.values;
      for (size_t e = 0; e < counts.size(); ++e) {
        const double diff = mean - static_cast<double>(counts[e]);
        if (diff > 0.0)
          bias[e] += b.gamma;
        else if (diff < 0.0)
          bias[e] -= b.gamma;
      }
      if (spec.balancing.bias_centering) {
        double sum = 0.0;
        for (float v : bias) sum += v;
        const float centre = static_cast<float>(sum / static_cast<double>(bias.size()));
        for (float& v : bias) v -= centre;
      }
      // The update is computed on the host, the same code for every backend, then mirrored.
      store_->upload(spec.gate_bias);
    }
    std::fill(counts.begin(), counts.end(), 0);
  }
}

void Session::set_eval(bool eval) {
  require_training("set_eval");
  eval_ = eval;
  pending_backward_ = false;
}

void Session::set_config(const std::string& key, const std::string& value) {
  SessionOptions updated = options_;
  updated.set(key, value);
  if (key == "optimizer" && updated.training.optimizer != options_.training.optimizer && step_ > 0)
    fail(Code::InvalidState,
         "the optimizer cannot change after the first step (its state would "
         "not carry over)");
  if (key == "sequence_length" && pending_backward_)
    fail(Code::InvalidState, "sequence_length cannot change between a forward and its backward");
  options_ = updated;
  if (key == "sequence_length")
    for (size_t i = 0; i < layers_.size(); ++i)
      if (model_->layers[i].kind == LayerKind::MoE)
        layers_[i] = make_layer(params().layers[i], *store_, options_.training.sequence_length);
}

const std::string& Session::parameter_name(size_t index) const {
  require_training("parameter access");
  if (index >= slots_.size())
    fail(Code::InvalidArgument, "parameter index ", index, " is out of range (", slots_.size(),
         " parameters)");
  return slots_[index].name;
}

int64_t Session::parameter_size(size_t index) const {
  parameter_name(index);
  return slots_[index].param->numel();
}

size_t Session::parameter_index(const std::string& name) const {
  require_training("parameter access");
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].name == name) return i;
  fail(Code::InvalidArgument, "no parameter named '", name, "'");
}

void Session::read_parameter(size_t index, float* out, uint64_t len) const {
  check_len(len, parameter_size(index), "parameter");
  store_->download(*slots_[index].param);
  std::copy(slots_[index].param->values.begin(), slots_[index].param->values.end(), out);
}

void Session::write_parameter(size_t index, const float* in, uint64_t len) {
  check_len(len, parameter_size(index), "parameter");
  for (uint64_t i = 0; i < len; ++i)
    if (!std::isfinite(in[i]))
      fail(Code::Numeric, "parameter '", slots_[index].name, "' value ", i, " is not finite");
  if (pending_backward_)
    fail(Code::InvalidState, "parameters cannot change between a forward and its backward");
  std::copy(in, in + len, slots_[index].param->values.begin());
  store_->upload(*slots_[index].param);
}

void Session::read_gradient(size_t index, float* out, uint64_t len) const {
  check_len(len, parameter_size(index), "gradient");
  std::vector<float> g;
  store_->download_grad(*slots_[index].param, g);
  std::copy(g.begin(), g.end(), out);
}

void Session::write_gradient(size_t index, const float* in, uint64_t len) {
  check_len(len, parameter_size(index), "gradient");
  for (uint64_t i = 0; i < len; ++i)
    if (!std::isfinite(in[i]))
      fail(Code::Numeric, "gradient of '", slots_[index].name, "' value ", i, " is not finite");
  store_->upload_grad(*slots_[index].param, std::vector<float>(in, in + len));
}

MoELayer& Session::moe_layer(uint32_t layer) const {
  if (layer >= layers_.size())
    fail(Code::InvalidArgument, "layer ", layer, " does not exist (the model has ", layers_.size(),
         " layers)");
  if (model_->layers[layer].kind != LayerKind::MoE)
    fail(Code::InvalidArgument, "layer ", layer, " ('", model_->layers[layer].name, "') is a ",
         layer_kind_name(model_->layers[layer].kind), " layer, not a MoE layer");
  return static_cast<MoELayer&>(*layers_[layer]);
}

std::vector<uint32_t> Session::moe_layers(uint32_t layer) const {
  if (layer != kAllLayers) {
    moe_layer(layer);
    return {layer};
  }
  std::vector<uint32_t> out;
  for (uint32_t i = 0; i < layers_.size(); ++i)
    if (model_->layers[i].kind == LayerKind::MoE) out.push_back(i);
  if (out.empty()) fail(Code::InvalidArgument, "the model has no MoE layer");
  return out;
}

void Session::read_bias(uint32_t layer, float* out, uint64_t len) const {
  moe_layer(layer);
  const auto& bias = std::get<MoESpec>(params().layers[layer].spec).gate_bias.values;
  check_len(len, static_cast<int64_t>(bias.size()), "bias");
  std::copy(bias.begin(), bias.end(), out);
}

void Session::write_bias(uint32_t layer, const float* in, uint64_t len) {
  require_training("writing the expert bias");
  moe_layer(layer);
  auto& bias = std::get<MoESpec>(params_->layers[layer].spec).gate_bias.values;
  check_len(len, static_cast<int64_t>(bias.size()), "bias");
  for (uint64_t i = 0; i < len; ++i)
    if (!std::isfinite(in[i])) fail(Code::Numeric, "bias value ", i, " is not finite");
  if (pending_backward_)
    fail(Code::InvalidState, "the bias cannot change between a forward and its backward");
  std::copy(in, in + len, bias.begin());
  store_->upload(std::get<MoESpec>(params_->layers[layer].spec).gate_bias);
}

void Session::set_bias_update_rate(uint32_t layer, double gamma) {
  require_training("the bias update rate");
  if (!std::isfinite(gamma) || gamma < 0.0)
    fail(Code::InvalidArgument, "the bias update rate must be finite and >= 0, got ", gamma);
  for (uint32_t i : moe_layers(layer)) balance_[i].gamma = static_cast<float>(gamma);
}

void Session::set_bias_frozen(uint32_t layer, bool frozen) {
  require_training("freezing the bias");
  for (uint32_t i : moe_layers(layer)) balance_[i].frozen = frozen;
}

const std::vector<int64_t>& Session::expert_counts(uint32_t layer, CountScope scope) const {
  const auto& c = moe_layer(layer).counts();
  switch (scope) {
    case CountScope::Last:
      return c.last;
    case CountScope::Step:
      return c.step;
    case CountScope::Eval:
      return c.eval;
  }
  fail(Code::InvalidArgument, "unknown count scope ", static_cast<int>(scope));
}

double Session::max_vio(uint32_t layer, CountScope scope) const {
  const auto ids = moe_layers(layer);
  double sum = 0.0;
  for (uint32_t i : ids) sum += max_violation(expert_counts(i, scope));
  return sum / static_cast<double>(ids.size());
}

void Session::reset_eval_metrics() {
  for (auto& l : layers_)
    if (auto* m = dynamic_cast<MoELayer*>(l.get()))
      std::fill(m->counts().eval.begin(), m->counts().eval.end(), 0);
}

void Session::sync_to_host() const {
  for (const auto& s : slots_) store_->download(*s.param);
}

// What save writes: views of the session's own memory where the backend's memory is the host's,
// so a checkpoint of any size is written without a copy of the state; host copies otherwise.
struct Session::SavedState {
  TrainingStateView view;
  std::vector<uint64_t> rng;
  std::vector<LayerBalanceState> layers;
  std::vector<std::vector<float>> host;  // downloads from a device backend
};

void Session::training_state(SavedState& out) const {
  const bool host = backend_->host_memory();
  out.rng = rng_.state();
  out.host.reserve(slots_.size() * 3);
  auto view = [&](const float* data, size_t n) -> std::span<const float> {
    if (!data || n == 0) return {};
    if (host) return {data, n};
    auto& copy = out.host.emplace_back(n);
    backend_->download(copy.data(), data, n * sizeof(float));
    return copy;
  };
  TrainingStateView& v = out.view;
  v.step = step_;
  v.micro_batches = micro_batches_;
  v.rng = out.rng;
  v.optimizer = options_.training.optimizer;
  for (const auto& s : slots_) {
    ParamStateView ps;
    ps.name = s.name;
    ps.grad = view(store_->grad(*s.param), s.param->values.size());
    // A gradient that is all zero between steps is no state: it is left out.
    if (micro_batches_ == 0 &&
        std::all_of(ps.grad.begin(), ps.grad.end(), [](float g) { return g == 0.0f; }))
      ps.grad = {};
    ps.m = view(s.m.data(), s.m.size());
    ps.v = view(s.v.data(), s.v.size());
    v.params.push_back(ps);
  }
  for (uint32_t i = 0; i < layers_.size(); ++i)
    if (model_->layers[i].kind == LayerKind::MoE)
      out.layers.push_back({i, static_cast<const MoELayer&>(*layers_[i]).counts().step,
                            balance_[i].gamma, balance_[i].frozen});
  v.layers = out.layers;
}

void Session::save(const std::string& path) const {
  require_training("saving a checkpoint");
  sync_to_host();
  SavedState st;
  training_state(st);
  write_checkpoint(path, *params_, st.view);
}

namespace {

// Whether two layers describe the same computation, tensors aside.
std::string layer_mismatch(const LayerSpec& a, const LayerSpec& b) {
  if (a.kind != b.kind) return "kind";
  if (a.name != b.name) return "name";
  if (a.in_width != b.in_width || a.out_width != b.out_width) return "width";
  std::vector<std::vector<int64_t>> sa, sb;
  visit_tensors(a, [&](const char*, const Tensor& t) {
    sa.push_back(t.values.empty() ? std::vector<int64_t>{} : t.shape);
  });
  visit_tensors(b, [&](const char*, const Tensor& t) {
    sb.push_back(t.values.empty() ? std::vector<int64_t>{} : t.shape);
  });
  if (sa != sb) return "tensor shapes";
  if (const auto* ma = std::get_if<MoESpec>(&a.spec)) {
    const auto& mb = std::get<MoESpec>(b.spec);
    const RouterConfig &ra = ma->router, &rb = mb.router;
    if (ra.num_experts != rb.num_experts || ra.top_k != rb.top_k || ra.score != rb.score ||
        ra.num_groups != rb.num_groups || ra.topk_groups != rb.topk_groups ||
        ra.normalize != rb.normalize || ra.scaling != rb.scaling)
      return "routing configuration";
    if (ma->balancing.policy != mb.balancing.policy) return "balancing policy";
    if (ma->residual != mb.residual || ma->num_shared != mb.num_shared) return "structure";
  }
  if (const auto* da = std::get_if<DenseFFNSpec>(&a.spec))
    if (da->residual != std::get<DenseFFNSpec>(b.spec).residual) return "residual";
  return "";
}

}  // namespace

// The most a checkpoint of this session's architecture can need: parameters, gradients and two
// moment vectors of each (with the biases), the balancing counts, and room for the description's
// tables; `limits`, when given, lower it further.
LoadOptions Session::checkpoint_limits(const LoadOptions* limits) const {
  uint64_t values = 0, tensors = 0;
  for (const auto& l : params_->layers) {
    visit_tensors(l, [&](const char*, const Tensor& t) {
      values += t.values.size();
      ++tensors;
    });
    if (const auto* m = std::get_if<MoESpec>(&l.spec))
      values += m->gate_bias.values.size() + 2 * m->router.num_experts;
  }
  LoadOptions need;
  need.max_memory = 4 * values * sizeof(float) + (uint64_t{1} << 20);
  need.max_file_bytes = 4 * values * sizeof(float) + (uint64_t{1} << 20) + 4096 * tensors;
  if (limits) {
    need.max_memory = std::min(need.max_memory, limits->max_memory);
    need.max_file_bytes = std::min(need.max_file_bytes, limits->max_file_bytes);
  }
  return need;
}

void Session::load(const std::string& path, const LoadOptions* limits) {
  require_training("loading a checkpoint");
  std::unique_ptr<Model> ck = load_checkpoint_file(path, checkpoint_limits(limits));
  if (ck->layers.size() != params_->layers.size())
    fail(Code::InvalidArgument, "checkpoint '", path, "' has ", ck->layers.size(),
         " layers, this session's model ", params_->layers.size());
  for (size_t i = 0; i < ck->layers.size(); ++i) {
    const std::string what = layer_mismatch(ck->layers[i], params_->layers[i]);
    if (!what.empty())
      fail(Code::InvalidArgument, "checkpoint '", path, "' layer ", i, " ('", ck->layers[i].name,
           "') differs from this session's model in its ", what);
  }
  TrainingState& st = *ck->training;
  if (st.optimizer != options_.training.optimizer)
    fail(Code::InvalidArgument, "checkpoint '", path, "' was trained with ", st.optimizer,
         " but this session uses ", options_.training.optimizer);
  Rng rng(0);
  try {
    rng.set_state(st.rng);
  } catch (const std::invalid_argument&) {
    fail(Code::InvalidModel, "checkpoint '", path, "': field 'rng' is not a generator state");
  }

  // Everything is staged before anything changes, so a refusal leaves the session intact. Each
  // state vector is released once staged, so that the peak stays near one copy of the state.
  std::vector<Buffer<float>> m(slots_.size()), v(slots_.size());
  std::vector<std::vector<float>> grads(slots_.size());
  auto stage = [&](std::vector<float>& values, Buffer<float>& into) {
    if (values.empty()) return;
    into.resize(*backend_, values.size());
    backend_->upload(into.data(), values.data(), values.size() * sizeof(float));
    std::vector<float>().swap(values);
  };
  for (auto& ps : st.params) {
    const size_t i = parameter_index(ps.name);
    grads[i] = std::move(ps.grad);
    stage(ps.m, m[i]);
    stage(ps.v, v[i]);
  }
  std::vector<Balance> balance = balance_;
  std::vector<std::vector<int64_t>> step_counts(layers_.size());
  for (auto& l : st.layers) {
    balance[l.layer] = {l.gamma, l.frozen};
    step_counts[l.layer] = std::move(l.step_counts);
  }

  // Commit: copies into storage the session already owns (the parameter store points into the
  // host tensors on host backends, so their storage must stay where it is).
  auto assign = [](Tensor& dst, const Tensor& src) {
    std::copy(src.values.begin(), src.values.end(), dst.values.begin());
  };
  for (size_t li = 0; li < ck->layers.size(); ++li) {
    std::vector<Tensor*> src, dst;
    visit_tensors(ck->layers[li], [&](const char*, Tensor& t) { src.push_back(&t); });
    visit_tensors(params_->layers[li], [&](const char*, Tensor& t) { dst.push_back(&t); });
    for (size_t k = 0; k < src.size(); ++k) assign(*dst[k], *src[k]);
    if (auto* moe = std::get_if<MoESpec>(&params_->layers[li].spec)) {
      assign(moe->gate_bias, std::get<MoESpec>(ck->layers[li].spec).gate_bias);
      store_->upload(moe->gate_bias);
    }
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    store_->upload(*slots_[i].param);
    slots_[i].m = std::move(m[i]);
    slots_[i].v = std::move(v[i]);
    if (grads[i].empty()) grads[i].assign(slots_[i].param->values.size(), 0.0f);
    store_->upload_grad(*slots_[i].param, grads[i]);
  }
  balance_.swap(balance);
  for (size_t i = 0; i < layers_.size(); ++i)
    if (auto* moe = dynamic_cast<MoELayer*>(layers_[i].get())) {
      auto& step = moe->counts().step;
      if (step_counts[i].empty())
        std::fill(step.begin(), step.end(), 0);
      else
        step.swap(step_counts[i]);
    }
  rng_ = rng;
  step_ = st.step;
  micro_batches_ = st.micro_batches;
  pending_backward_ = false;
}

}  // namespace moert
