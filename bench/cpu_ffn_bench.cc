// The CPU backend's routed-expert FFN layer (grouped SwiGLU: Fprop, and Fprop + Dgrad + Wgrad) with
// its experts in fp32, bf16 and FP8 (kernels/cpu/cpu_ffn.cc, cpu_ffn_fp8.cc), GFLOP/s side by side
// on the same operands and threads. fp32 is the baseline; the limit column is the fp32 GEMM's rate
// on one expert's Fprop shape, one thread, times the threads (what the layer's GEMMs could reach if
// they ran at that rate with nothing else to do), measured in the same run.
//
//   moert_cpu_ffn_bench [threads] [assignments]   (defaults: 2 threads, 2048 assignments)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "kernels/cpu/math.h"
#include "kernels/cpu/omp_guard.h"

namespace {

using namespace moert;

double seconds(const std::function<void()>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one;
  return in >> one ? one : "unknown";
}

std::vector<float> randn(int64_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

struct Layer {
  int64_t experts, dim, hidden, assignments;
};

// The weights of one precision: fp32 always (the master copy), bf16 or FP8 copies beside them.
struct Weights {
  std::vector<float> f32[3];  // w1, w3 [E, hidden, dim]; w2 [E, dim, hidden]
  std::vector<uint16_t> bf16[3];
  std::vector<uint8_t> codes[3];
  std::vector<float> scales[3];
  Weight w[3];
};

void make_weights(Backend& be, Precision p, const Layer& l, Weights& ws) {
  const int64_t per = l.hidden * l.dim;
  for (int k = 0; k < 3; ++k) {
    ws.f32[k] = randn(l.experts * per, 10 + static_cast<uint32_t>(k),
                      1.0f / std::sqrt(static_cast<float>(k == 2 ? l.hidden : l.dim)));
    ws.w[k] = Weight{ws.f32[k].data()};
    const int64_t rows = k == 2 ? l.dim : l.hidden, cols = k == 2 ? l.hidden : l.dim;
    if (p == Precision::Bf16) {
      ws.bf16[k].resize(ws.f32[k].size());
      be.to_bf16(ws.f32[k].data(), ws.bf16[k].data(), l.experts * per);
      ws.w[k].bf16 = ws.bf16[k].data();
    } else if (p == Precision::Fp8) {
      ws.codes[k].resize(ws.f32[k].size());
      ws.scales[k].resize(static_cast<size_t>(fp8_blocks_scale_floats(l.experts, rows, cols)));
      be.quantize_weight_blocks(ws.f32[k].data(), l.experts, rows, cols, ws.codes[k].data(),
                                ws.scales[k].data(), "bench weight");
      ws.w[k].fp8 = {ws.codes[k].data(), ws.scales[k].data(), per,
                     fp8_blocks_scale_floats(1, rows, cols)};
    }
  }
}

void run_layer(const Layer& l, unsigned threads, int reps, double limit) {
  DispatchPlan plan;
  plan.host_offsets.assign(static_cast<size_t>(l.experts + 1), 0);
  for (int64_t e = 0; e < l.experts; ++e)  // the assignments spread evenly, remainder to the first
    plan.host_offsets[e + 1] =
        plan.host_offsets[e] + l.assignments / l.experts + (e < l.assignments % l.experts ? 1 : 0);
  const int64_t A = l.assignments, D = l.dim, H = l.hidden;
  const auto x = randn(A * D, 1, 1.0f), dy = randn(A * D, 2, 1.0f);
  std::vector<float> y(static_cast<size_t>(A * D)), h1(static_cast<size_t>(A * H)), h3(h1.size()),
      dx(y.size());
  const double flops = 2.0 * 3.0 * static_cast<double>(A) * static_cast<double>(D * H);
  const Precision precisions[] = {Precision::Fp32, Precision::Bf16, Precision::Fp8};
  struct Run {
    std::unique_ptr<Backend> be;
    Weights ws;
    std::vector<float> g[3];
    std::vector<GradOut> out[3];
    double tf = 1e30, tb = 1e30;
  };
  std::vector<Run> runs(3);
  for (size_t i = 0; i < 3; ++i) {
    Run& r = runs[i];
    r.be = make_cpu_backend(threads, precisions[i]);
    make_weights(*r.be, precisions[i], l, r.ws);
    for (int k = 0; k < 3; ++k) {
      r.g[k].assign(r.ws.f32[k].size(), 0.0f);
      for (int64_t e = 0; e < l.experts; ++e)
        r.out[k].push_back(GradOut{r.g[k].data() + e * H * D});
    }
  }
  // Precisions alternate within each round, so that all see the same machine (other processes
  // come and go on a shared one); the first round warms up.
  for (int rep = 0; rep <= reps; ++rep)
    for (Run& r : runs) {
      const double tf = seconds([&] {
        r.be->grouped_swiglu_ffn(plan, x.data(), r.ws.w[0], r.ws.w[1], r.ws.w[2], y.data(),
                                 h1.data(), h3.data(), D, H);
      });
      const double tb = seconds([&] {
        r.be->grouped_swiglu_ffn_backward(
            plan, x.data(), r.ws.w[0], r.ws.w[1], r.ws.w[2], h1.data(), h3.data(), dy.data(),
            dx.data(), r.out[0].data(), r.out[1].data(), r.out[2].data(), D, H, D);
      });
      if (rep == 0) continue;
      r.tf = std::min(r.tf, tf);
      r.tb = std::min(r.tb, tb);
    }
  for (size_t i = 0; i < 3; ++i) {
    const Precision p = precisions[i];
    const double tf = runs[i].tf, tb = runs[i].tb;
    const char* name = p == Precision::Fp32 ? "fp32" : p == Precision::Bf16 ? "bf16" : "fp8";
    std::printf("%-5s %4lld %5lld %6lld %6lld %10.1f %10.1f %10.1f %10.1f\n", name,
                static_cast<long long>(l.experts), static_cast<long long>(D),
                static_cast<long long>(H), static_cast<long long>(A), flops / tf * 1e-9,
                2.0 * flops / tb * 1e-9, 3.0 * flops / (tf + tb) * 1e-9, limit);
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const long threads = argc > 1 ? std::atol(argv[1]) : 2;
  const long long assignments = argc > 2 ? std::atoll(argv[2]) : 2048;
  if (threads <= 0 || threads > 1024 || assignments <= 0) {
    std::fprintf(stderr, "usage: %s [threads 1..1024] [assignments > 0]\n", argv[0]);
    return 2;
  }
  const int reps = 3;
  std::printf(
      "CPU backend, routed experts' SwiGLU FFN, %ld thread%s of %s (load average %s),\n"
      "best of %d alternating runs. GFLOP/s: Fprop (3 GEMMs), backward (Dgrad + Wgrad, 6 GEMMs)\n"
      "and the training step (9 GEMMs over the sum of both times). bf16: the kernels this machine\n"
      "has (%s); fp8: the exact emulation (kernels/cpu/fp8.h). limit: the fp32 GEMM\n"
      "on one expert's Fprop shape, one thread, times %ld.\n\n",
      threads, threads == 1 ? "" : "s", cpu_model().c_str(), load_average().c_str(), reps,
      cpu_bf16_kernels().c_str(), threads);
  std::printf("%-5s %4s %5s %6s %6s %10s %10s %10s %10s\n", "prec", "E", "dim", "hidden", "rows",
              "fwd GF/s", "bwd GF/s", "step GF/s", "limit");
  struct Case {
    int64_t experts, dim, hidden, assignments;
  };
  const Case cases[] = {
      {8, 1024, 512, assignments},  // a training batch's share per expert
      {8, 1024, 512, 64},           // decode: 8 rows per expert, the column-split forward
  };
  for (const Case& c : cases) {
    const int64_t m = std::max<int64_t>(1, c.assignments / c.experts);
    const auto a = randn(m * c.dim, 3, 1.0f), w = randn(c.hidden * c.dim, 4, 0.03f);
    std::vector<float> out(static_cast<size_t>(m * c.hidden));
    // Fastest of many calls (at least 0.3 s of them): short calls run uninterrupted now and then
    // even on a busy machine, and oneDNN's first calls of a shape are slower.
    const cpu::SerialOmpScope one_thread;  // as the backend runs each GEMM
    double t = 1e30, spent = 0.0;
    for (int i = 0; i < 20 || spent < 0.3; ++i) {
      const double ti = seconds(
          [&] { cpu::matmul_nt(a.data(), w.data(), out.data(), m, c.hidden, c.dim, false); });
      t = std::min(t, ti);
      spent += ti;
    }
    const double limit =
        2.0 * static_cast<double>(m * c.hidden * c.dim) / t * 1e-9 * static_cast<double>(threads);
    run_layer({c.experts, c.dim, c.hidden, c.assignments}, static_cast<unsigned>(threads), reps,
              limit);
  }
  std::printf("\nload average at the end: %s\n", load_average().c_str());
  return 0;
}
