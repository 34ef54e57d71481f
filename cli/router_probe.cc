#include "cli/router_probe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "cli/bench_layer.h"
#include "cli/corpus.h"
#include "cli/error.h"
#include "cli/lm_eval.h"
#include "cli/model_codec.h"

namespace moert_cli {
namespace {

std::vector<float> parameter(const moert_session* s, const std::string& name) {
  uint32_t n = 0;
  check(moert_session_num_parameters(s, &n), "parameters");
  for (uint32_t i = 0; i < n; ++i) {
    const char* pname = nullptr;
    uint64_t numel = 0;
    check(moert_session_parameter_info(s, i, &pname, &numel), "parameters");
    if (name != pname) continue;
    std::vector<float> v(numel);
    check(moert_session_get_parameter(s, pname, v.data(), numel), name);
    return v;
  }
  fail("the trained model has no parameter '", name, "'");
}

double max_vio(const std::vector<int64_t>& counts) {
  const double total =
      static_cast<double>(std::accumulate(counts.begin(), counts.end(), int64_t{0}));
  if (total == 0) return 0.0;
  const double mean = total / static_cast<double>(counts.size());
  return (static_cast<double>(*std::max_element(counts.begin(), counts.end())) - mean) / mean;
}

// Top-K of `v` (ties to the lower index, as the library's router), counted into `counts`.
void count_top_k(const std::vector<double>& v, uint32_t k, std::vector<uint32_t>& order,
                 std::vector<int64_t>& counts) {
  std::iota(order.begin(), order.end(), 0u);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](uint32_t a, uint32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  for (uint32_t j = 0; j < k; ++j) ++counts[order[j]];
}

// Block b is layer 2 + 2b of the full model: embed, then (norm, moe) per block.
uint32_t block_layer(uint32_t b) { return 2 + 2 * b; }

// Loads `s` with the trained parameters (copied by name) and gives its MoE layers, in order, the
// trained biases of blocks first_block, first_block + 1, ...
void copy_trained(const moert_session* trained, moert_session* s, uint32_t experts,
                  const moert_model* s_model, uint32_t first_block) {
  uint32_t n = 0;
  check(moert_session_num_parameters(s, &n), "probe parameters");
  for (uint32_t i = 0; i < n; ++i) {
    const char* name = nullptr;
    uint64_t numel = 0;
    check(moert_session_parameter_info(s, i, &name, &numel), "probe parameters");
    const std::vector<float> v = parameter(trained, name);
    check(moert_session_set_parameter(s, name, v.data(), v.size()), name);
  }
  std::vector<float> bias(experts);
  uint32_t b = first_block;
  for (uint32_t l : moe_layer_indices(s_model)) {
    check(moert_session_get_expert_bias(trained, block_layer(b++), bias.data(), experts), "bias");
    check(moert_session_set_expert_bias(s, l, bias.data(), experts), "bias");
  }
}

// The router input of block b (the RMSNorm output feeding it) on `rows` rows of `tokens`, from a
// copy of the trained model cut before the block, in fp32.
std::vector<float> block_input(const moert_session* trained, const CharLMShape& shape,
                               const Balancing& balancing, uint64_t seed,
                               const std::vector<int32_t>& tokens, uint64_t rows, uint32_t b,
                               uint32_t threads) {
  ModelPtr probe = charlm_model(shape, balancing, seed, static_cast<int>(b));
  SessionConfig config;
  config.threads = threads;
  config.training = true;  // only a training session accepts parameters by name
  SessionPtr s = create_session(probe.get(), config);
  copy_trained(trained, s.get(), shape.experts, probe.get(), 0);
  check(moert_session_set_eval(s.get(), 1), "eval mode");
  std::vector<float> u(rows * shape.width());
  check(
      moert_session_forward_tokens(s.get(), tokens.data(), tokens.size(), rows, u.data(), u.size()),
      "probe forward");
  return u;
}

// The gradient of the trained model's mean cross-entropy on `targets` with respect to the output
// of block b (`y`, rows x width), through a copy of the model's part after the block, in fp32.
std::vector<float> block_output_gradient(const moert_session* trained, const CharLMShape& shape,
                                         const Balancing& balancing, uint64_t seed,
                                         const std::vector<float>& y,
                                         const std::vector<int32_t>& targets, uint32_t b,
                                         uint32_t threads) {
  ModelPtr tail = charlm_tail_model(shape, balancing, seed, b);
  SessionConfig config;
  config.threads = threads;
  config.training = true;
  SessionPtr s = create_session(tail.get(), config);
  copy_trained(trained, s.get(), shape.experts, tail.get(), b + 1);
  const uint64_t rows = targets.size();
  std::vector<float> logits(rows * kVocabSize);
  check(
      moert_session_forward_hidden(s.get(), y.data(), y.size(), rows, logits.data(), logits.size()),
      "tail forward");
  // d mean(-log softmax(z)[t]) / dz = (softmax(z) - onehot(t)) / rows.
  for (uint64_t r = 0; r < rows; ++r) {
    float* z = logits.data() + r * kVocabSize;
    double top = z[0], sum = 0.0;
    for (int v = 1; v < kVocabSize; ++v) top = std::max<double>(top, z[v]);
    for (int v = 0; v < kVocabSize; ++v) sum += std::exp(z[v] - top);
    for (int v = 0; v < kVocabSize; ++v)
      z[v] = static_cast<float>((std::exp(z[v] - top) / sum - (v == targets[r] ? 1.0 : 0.0)) /
                                static_cast<double>(rows));
  }
  std::vector<float> dy(y.size());
  check(
      moert_session_backward(s.get(), logits.data(), logits.size(), dy.data(), dy.size(), nullptr),
      "tail backward");
  return dy;
}

}  // namespace

std::vector<GemmAccuracy> probe_gemm_accuracy(const moert_session* trained,
                                              const CharLMShape& shape, const Balancing& balancing,
                                              uint64_t seed, const std::vector<int32_t>& stream,
                                              const std::vector<uint64_t>& positions,
                                              uint32_t threads, const SessionConfig& low) {
  const uint64_t rows = positions.size();
  std::vector<int32_t> tokens(rows * shape.context), targets(rows);
  gather_rows(stream, shape.context, positions.data(), rows, tokens.data(), targets.data());
  const Dims dims{static_cast<uint32_t>(rows), shape.width(), shape.experts,      shape.top_k,
                  shape.expert_hidden,         shape.shared,  shape.shared_hidden};
  ModelPtr layer = load_model_bytes(json_to_binary(moe_json(dims, seed), "one-layer model"), "",
                                    "one-layer model");
  SessionConfig fp32;
  fp32.threads = threads;
  fp32.seed = seed;
  std::vector<GemmAccuracy> out;
  for (uint32_t b = 0; b < shape.blocks; ++b) {
    LayerOperands ops;
    ops.rows = static_cast<uint32_t>(rows);
    ops.x = block_input(trained, shape, balancing, seed, tokens, rows, b, threads);
    for (const char* t : {"gate", "w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2"}) {
      if (shape.shared == 0 && std::string(t).rfind("shared", 0) == 0) continue;
      ops.parameters.emplace_back(cat("moe.", t), parameter(trained, cat("moe", b, ".", t)));
    }
    ops.expert_bias.resize(shape.experts);
    check(moert_session_get_expert_bias(trained, block_layer(b), ops.expert_bias.data(),
                                        shape.experts),
          "bias");
    ops.dy = block_output_gradient(trained, shape, balancing, seed,
                                   layer_output(layer.get(), fp32, ops), targets, b, threads);
    out.push_back(gemm_accuracy(layer.get(), fp32, low, ops));
  }
  return out;
}

std::vector<RouterStats> probe_routers(const moert_session* trained, const CharLMShape& shape,
                                       const Balancing& balancing, uint64_t seed,
                                       const std::vector<int32_t>& stream,
                                       const std::vector<uint64_t>& positions, uint32_t threads) {
  const uint32_t d = shape.width(), E = shape.experts, K = shape.top_k, C = shape.context;
  const uint64_t rows = positions.size();
  std::vector<int32_t> tokens(rows * C), targets(rows);
  gather_rows(stream, C, positions.data(), rows, tokens.data(), targets.data());

  std::vector<RouterStats> out;
  for (uint32_t b = 0; b < shape.blocks; ++b) {
    const std::vector<float> u =
        block_input(trained, shape, balancing, seed, tokens, rows, b, threads);
    std::vector<float> bias(E);
    check(moert_session_get_expert_bias(trained, block_layer(b), bias.data(), E), "bias");
    const std::vector<float> gate = parameter(trained, cat("moe", b, ".gate"));

    RouterStats st;
    std::vector<double> mean_score(E, 0.0), score(E), biased(E), gaps(rows);
    std::vector<uint32_t> order(E);
    std::vector<int64_t> with_bias(E, 0), without_bias(E, 0);
    for (uint64_t r = 0; r < rows; ++r) {
      const float* x = u.data() + r * d;
      for (uint32_t e = 0; e < E; ++e) {
        double logit = 0.0;
        for (uint32_t k = 0; k < d; ++k)
          logit += static_cast<double>(x[k]) * gate[static_cast<size_t>(e) * d + k];
        score[e] = 1.0 / (1.0 + std::exp(-logit));
        biased[e] = score[e] + bias[e];
        mean_score[e] += score[e];
      }
      count_top_k(score, K, order, without_bias);
      count_top_k(biased, K, order, with_bias);
      // order now ranks the biased scores; the K-th and (K+1)-th are order[K-1] and the best of
      // the rest.
      double next = -INFINITY;
      for (uint32_t j = K; j < E; ++j) next = std::max(next, biased[order[j]]);
      gaps[r] = biased[order[K - 1]] - next;
    }
    for (double& m : mean_score) m /= static_cast<double>(rows);
    st.score_spread = *std::max_element(mean_score.begin(), mean_score.end()) -
                      *std::min_element(mean_score.begin(), mean_score.end());
    std::nth_element(gaps.begin(), gaps.begin() + static_cast<std::ptrdiff_t>(rows / 2),
                     gaps.end());
    st.median_boundary_gap = gaps[rows / 2];
    st.bias_range =
        *std::max_element(bias.begin(), bias.end()) - *std::min_element(bias.begin(), bias.end());
    st.max_vio_biased = max_vio(with_bias);
    st.max_vio_unbiased = max_vio(without_bias);
    out.push_back(st);
  }
  return out;
}

}  // namespace moert_cli
