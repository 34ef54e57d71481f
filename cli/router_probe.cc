#include "cli/router_probe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "cli/error.h"
#include "cli/lm_eval.h"

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

}  // namespace

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
    ModelPtr probe = charlm_model(shape, balancing, seed, static_cast<int>(b));
    SessionConfig config;
    config.threads = threads;
    config.training = true;  // only a training session accepts parameters by name
    SessionPtr s = create_session(probe.get(), config);
    uint32_t n = 0;
    check(moert_session_num_parameters(s.get(), &n), "probe parameters");
    for (uint32_t i = 0; i < n; ++i) {
      const char* name = nullptr;
      uint64_t numel = 0;
      check(moert_session_parameter_info(s.get(), i, &name, &numel), "probe parameters");
      const std::vector<float> v = parameter(trained, name);
      check(moert_session_set_parameter(s.get(), name, v.data(), v.size()), name);
    }
    // The probe's own MoE blocks (those before b) need the trained biases too.
    const std::vector<uint32_t> probe_moe = moe_layer_indices(probe.get());
    std::vector<float> bias(E);
    for (uint32_t l : probe_moe) {
      check(moert_session_get_expert_bias(trained, l, bias.data(), E), "bias");
      check(moert_session_set_expert_bias(s.get(), l, bias.data(), E), "bias");
    }
    check(moert_session_set_eval(s.get(), 1), "eval mode");
    std::vector<float> u(rows * d);
    check(moert_session_forward_tokens(s.get(), tokens.data(), rows * C, rows, u.data(), u.size()),
          "probe forward");

    // Block b is layer 2 + 2b of the full model: embed, then (norm, moe) per block.
    const uint32_t layer = 2 + 2 * b;
    check(moert_session_get_expert_bias(trained, layer, bias.data(), E), "bias");
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
