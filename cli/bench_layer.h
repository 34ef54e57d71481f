// The layer `moert bench` times, and how it times it: shared by the single-process benchmark
// (cmd_bench.cc) and the one over several ranks (bench_parallel.cc), so that both time the same
// layer on the same inputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cli/bench_machine.h"
#include "cli/library.h"

namespace moert_cli {

struct Dims {
  uint32_t tokens, dim, experts, top_k, expert_hidden, shared, shared_hidden;
};

// The model description (JSON) of one MoE layer of shape `d` on hidden-state input: sigmoid
// router, top-K with renormalised weights (unnormalised at top-1, where renormalising would make
// every weight 1 and leave the router no gradient), SwiGLU experts, residual, no balancing.
std::string moe_json(const Dims& d, uint64_t seed);

// n values uniform in [-1, 1) from a fixed xorshift stream of `seed`.
std::vector<float> random_values(size_t n, uint64_t seed);

double median(std::vector<double> v);

// The seconds (bench_clock()) of `repeats` runs of `pass`, each after `before` (untimed: a
// measurement to set beside it).
template <typename F, typename B>
std::vector<double> time_runs(int repeats, F&& pass, B&& before) {
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    before();
    const double a = bench_clock();
    pass();
    t.push_back(bench_clock() - a);
  }
  return t;
}

// Runs `pass` once to warm up, then `repeats` times, each timed run after `before`; the median
// time in seconds.
template <typename F, typename B>
double time_median(int repeats, F&& pass, B&& before) {
  pass();
  return median(time_runs(repeats, pass, before));
}
template <typename F>
double time_median(int repeats, F&& pass) {
  return time_median(repeats, pass, [] {});
}

// Token-expert assignments of the last pass over every MoE layer; `touched`: experts with any.
uint64_t assignments_of(moert_session* s, const moert_model* model, uint32_t* touched = nullptr);

struct Timing {
  double forward = 0.0, forward_backward = 0.0;  // seconds, medians
  uint64_t assignments = 0;
  // With a GEMM pass to set beside them (LayerTimer::time): each timed pass's seconds, and the
  // GFLOP/s of the GEMM run right before it.
  std::vector<double> forward_runs, forward_backward_runs;
  std::vector<double> gemm_before_forward, gemm_before_forward_backward;
  // Waits between a GEMM and a pass after which other threads still used CPU (see
  // wait_for_idle_threads), and all such waits.
  int busy_waits = 0, waits = 0;
};

// The median over the timed passes of (the pass's GFLOP/s) / (the GEMM's right before it); 0
// without them.
double median_ratio(double flops, const std::vector<double>& seconds,
                    const std::vector<double>& gemm_gflops);

// An inference session times the forward, a training session forward + backward (with the input
// gradient, as a layer inside a network needs it), on `tokens` rows of random_values(seed). The
// constructor creates both sessions and runs each pass once (oneDNN sets up its kernels then).
class LayerTimer {
 public:
  LayerTimer(const moert_model* model, const SessionConfig& base, uint32_t tokens, uint32_t dim,
             uint64_t seed);
  // Assignments of the forward's pass.
  uint64_t assignments() const { return assignments_; }
  // `repeats` timed passes of each kind, each after a run of `gemm` (when there is one) and an
  // untimed pass.
  Timing time(int repeats, const std::function<double()>& gemm = {});

 private:
  void forward();
  void forward_backward();

  uint32_t tokens_;
  std::vector<float> x_, dy_, y_, dx_;
  SessionPtr inference_, training_;
  uint64_t assignments_ = 0;
};

// LayerTimer's medians, without a GEMM beside them.
Timing time_layer(const moert_model* model, const SessionConfig& base, uint32_t tokens,
                  uint32_t dim, int repeats, uint64_t seed);

}  // namespace moert_cli
