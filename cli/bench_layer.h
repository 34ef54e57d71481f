// The layer `moert bench` times, and how it times it: shared by the single-process benchmark
// (cmd_bench.cc) and the one over several ranks (bench_parallel.cc), so that both time the same
// layer on the same inputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cli/bench_machine.h"
#include "cli/library.h"

namespace moert_cli {

struct Dims {
  uint32_t tokens, dim, experts, top_k, expert_hidden, shared, shared_hidden;
};

// The model description (JSON) of one MoE layer of shape `d` on hidden-state input: sigmoid
// router, top-K with renormalised weights, SwiGLU experts, residual, no balancing.
std::string moe_json(const Dims& d, uint64_t seed);

// n values uniform in [-1, 1) from a fixed xorshift stream of `seed`.
std::vector<float> random_values(size_t n, uint64_t seed);

double median(std::vector<double> v);

// Runs `pass` once to warm up, then `repeats` times, each timed run after `before` (untimed: a
// measurement to set beside it); the median time in seconds (bench_clock()).
template <typename F, typename B>
double time_median(int repeats, F&& pass, B&& before) {
  pass();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    before();
    const double a = bench_clock();
    pass();
    t.push_back(bench_clock() - a);
  }
  return median(t);
}
template <typename F>
double time_median(int repeats, F&& pass) {
  return time_median(repeats, pass, [] {});
}

// Token-expert assignments of the last pass over every MoE layer; `touched`: experts with any.
uint64_t assignments_of(moert_session* s, const moert_model* model, uint32_t* touched = nullptr);

struct Timing {
  double forward = 0.0, forward_backward = 0.0;  // seconds
  uint64_t assignments = 0;
};

// An inference session times the forward, a training session forward + backward (with the input
// gradient, as a layer inside a network needs it), on `tokens` rows of random_values(seed).
Timing time_layer(const moert_model* model, const SessionConfig& base, uint32_t tokens,
                  uint32_t dim, int repeats, uint64_t seed);

}  // namespace moert_cli
