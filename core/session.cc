#include "core/session.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"

namespace moert {

void SessionOptions::set(const std::string& key, const std::string& value) {
  if (key == "check_finite") {
    if (value == "true" || value == "1")
      check_finite = true;
    else if (value == "false" || value == "0")
      check_finite = false;
    else
      fail(Code::InvalidArgument, "option 'check_finite' takes true or false, got '", value, "'");
    return;
  }
  fail(Code::InvalidArgument, "unknown session option '", key, "' (known: check_finite)");
}

Session::Session(std::shared_ptr<const Model> model, const SessionOptions& options)
    : model_(std::move(model)), options_(options) {
  if (options_.device == Device::Cuda)
    fail(Code::Unsupported, "CUDA device requested, but this build of moert has no CUDA backend");
  if (options_.mode == Mode::Training)
    fail(Code::Unsupported, "training mode is not available yet in this version of moert");
  backend_ = make_cpu_backend(options_.threads);
  for (const auto& spec : model_->layers) layers_.push_back(make_layer(spec));
  activations_.resize(layers_.size());
}

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
  auto& a0 = activations_[0];
  a0.resize(static_cast<size_t>(n) * model_->layers[0].out_width);
  static_cast<EmbeddingLayer&>(*layers_[0]).forward_tokens(*backend_, tokens, a0.data(), n);
  run_from(1, a0.data(), n, out);
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
  run_from(0, in, n, out);
}

void Session::run_from(size_t first_layer, const float* x, int64_t rows, float* out) {
  for (size_t i = first_layer; i < layers_.size(); ++i) {
    auto& act = activations_[i];
    act.resize(static_cast<size_t>(rows) * model_->layers[i].out_width);
    layers_[i]->forward(*backend_, x, act.data(), rows);
    x = act.data();
  }
  std::memcpy(out, x, sizeof(float) * static_cast<size_t>(rows) * model_->output_width);
  for (auto& l : layers_) l->commit_stats();
}

const MoELayer& Session::moe_layer(uint32_t layer) const {
  if (layer >= layers_.size())
    fail(Code::InvalidArgument, "layer ", layer, " does not exist (the model has ", layers_.size(),
         " layers)");
  if (model_->layers[layer].kind != LayerKind::MoE)
    fail(Code::InvalidArgument, "layer ", layer, " ('", model_->layers[layer].name, "') is a ",
         layer_kind_name(model_->layers[layer].kind), " layer, not a MoE layer");
  return static_cast<const MoELayer&>(*layers_[layer]);
}

const std::vector<int64_t>& Session::expert_counts(uint32_t layer) const {
  return moe_layer(layer).counts();
}

double Session::max_vio(uint32_t layer) const {
  if (layer != std::numeric_limits<uint32_t>::max()) return moe_layer(layer).max_vio();
  double sum = 0.0;
  int n = 0;
  for (uint32_t i = 0; i < layers_.size(); ++i)
    if (model_->layers[i].kind == LayerKind::MoE) {
      sum += static_cast<const MoELayer&>(*layers_[i]).max_vio();
      ++n;
    }
  if (n == 0) fail(Code::InvalidArgument, "the model has no MoE layer");
  return sum / n;
}

}  // namespace moert
