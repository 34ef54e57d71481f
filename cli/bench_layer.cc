#include "cli/bench_layer.h"

#include <cmath>

#include "cli/bench_machine.h"
#include "cli/error.h"

namespace moert_cli {
namespace {

std::string uniform(uint32_t fan_in) {
  return cat("{ \"init\": { \"kind\": \"Uniform\", \"std\": ", 1.0 / std::sqrt(3.0 * fan_in),
             " } }");
}

}  // namespace

std::string moe_json(const Dims& d, uint64_t seed) {
  std::string moe =
      cat("\"dim\": ", d.dim, ", \"num_experts\": ", d.experts, ", \"top_k\": ", d.top_k,
          ", \"expert_hidden\": ", d.expert_hidden,
          ", \"score_function\": \"Sigmoid\", \"num_groups\": 1, \"topk_groups\": 1",
          ", \"normalize_weights\": ", d.top_k > 1 ? "true" : "false",
          ", \"routed_scaling_factor\": 1.0", ", \"num_shared_experts\": ", d.shared,
          ", \"shared_hidden\": ", d.shared ? d.shared_hidden : 0, ", \"residual\": true",
          ", \"balancing\": { \"policy\": \"None\" }, \"gate\": ", uniform(d.dim),
          ", \"w1\": ", uniform(d.dim), ", \"w3\": ", uniform(d.dim),
          ", \"w2\": ", uniform(d.expert_hidden));
  if (d.shared)
    moe += cat(", \"shared_w1\": ", uniform(d.dim), ", \"shared_w3\": ", uniform(d.dim),
               ", \"shared_w2\": ", uniform(d.shared_hidden));
  return cat(
      "{ \"schema_major\": 1, \"schema_minor\": 0, \"name\": \"bench-moe\", \"seed\": ", seed,
      ", \"input_dim\": ", d.dim,
      ", \"layers\": [ { \"name\": \"moe\", \"kind_type\": \"MoE\", \"kind\": { ", moe, " } } ] }");
}

std::vector<float> random_values(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (float& f : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    f = static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
  }
  return v;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

uint64_t assignments_of(moert_session* s, const moert_model* model, uint32_t* touched) {
  uint64_t total = 0;
  if (touched) *touched = 0;
  for (uint32_t l : moe_layer_indices(model)) {
    std::vector<int64_t> c(static_cast<size_t>(moe_int(model, l, MOERT_MOE_NUM_EXPERTS)));
    check(moert_session_expert_counts(s, l, MOERT_COUNTS_LAST, c.data(), c.size()), "counts");
    for (int64_t v : c) {
      total += static_cast<uint64_t>(v);
      if (touched && v > 0) ++*touched;
    }
  }
  return total;
}

double median_ratio(double flops, const std::vector<double>& seconds,
                    const std::vector<double>& gemm_gflops) {
  std::vector<double> r;
  for (size_t i = 0; i < seconds.size() && i < gemm_gflops.size(); ++i)
    if (seconds[i] > 0 && gemm_gflops[i] > 0)
      r.push_back(flops / seconds[i] / 1e9 / gemm_gflops[i]);
  return r.empty() ? 0.0 : median(r);
}

LayerTimer::LayerTimer(const moert_model* model, const SessionConfig& base, uint32_t tokens,
                       uint32_t dim, uint64_t seed)
    : tokens_(tokens),
      x_(random_values(static_cast<size_t>(tokens) * dim, seed)),
      dy_(random_values(x_.size(), seed + 1)),
      y_(x_.size()),
      dx_(x_.size()) {
  inference_ = create_session(model, base);
  SessionConfig train = base;
  train.training = true;
  training_ = create_session(model, train);
  forward();
  assignments_ = assignments_of(inference_.get(), model);
  forward_backward();
}

void LayerTimer::forward() {
  check(moert_session_forward_hidden(inference_.get(), x_.data(), x_.size(), tokens_, y_.data(),
                                     y_.size()),
        "forward");
}

void LayerTimer::forward_backward() {
  check(moert_session_forward_hidden(training_.get(), x_.data(), x_.size(), tokens_, y_.data(),
                                     y_.size()),
        "forward");
  check(moert_session_backward(training_.get(), dy_.data(), dy_.size(), dx_.data(), dx_.size(),
                               nullptr),
        "backward");
}

Timing LayerTimer::time(int repeats, const std::function<double()>& gemm) {
  Timing t;
  t.assignments = assignments_;
  // The GEMM's operands (80 MB at the default shape) push the layer's weights out of the caches,
  // where back-to-back passes find them: an untimed pass after it puts them back (the forward
  // was 9 % slower without it). Each side starts once the other's threads have stopped spinning.
  auto wait = [&] {
    ++t.waits;
    if (!wait_for_idle_threads()) ++t.busy_waits;
  };
  auto runs = [&](auto pass, std::vector<double>& gemm_gflops) {
    return time_runs(repeats, pass, [&] {
      if (!gemm) return;
      wait();
      gemm_gflops.push_back(gemm());
      wait();
      pass();
    });
  };
  t.forward_runs = runs([&] { forward(); }, t.gemm_before_forward);
  t.forward_backward_runs = runs([&] { forward_backward(); }, t.gemm_before_forward_backward);
  t.forward = median(t.forward_runs);
  t.forward_backward = median(t.forward_backward_runs);
  return t;
}

Timing time_layer(const moert_model* model, const SessionConfig& base, uint32_t tokens,
                  uint32_t dim, int repeats, uint64_t seed) {
  return LayerTimer(model, base, tokens, dim, seed).time(repeats);
}

}  // namespace moert_cli
