// The CPU's emulated block-scaled FP8 GEMMs (kernels/cpu/fp8.h) beside the fp32 GEMM of the same
// shape, one thread each, and the FP8 quantizers beside a streaming pass with the same memory
// traffic (read 4 bytes, write 1, per value). Shapes include DeepSeek-V3's expert GEMMs (d = 7168,
// expert width 2048). Prints a table; the fp32 GEMM is the baseline, the streaming pass the
// quantizers' limit on this machine, both measured in the same run.
//
//   moert_fp8_cpu_bench [tokens]     (default 512 tokens for the V3 shapes)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/fp8.h"
#include "kernels/cpu/math.h"
#include "kernels/cpu/omp_guard.h"

namespace {

using namespace moert;
namespace f8 = moert::cpu::fp8;
using moert::fp8::blocks_of;

double seconds(const std::function<void()>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The best of `reps` timed runs of a and of b, after one warm-up each, alternating a and b so
// that both see the same machine (other processes come and go on a shared one).
std::pair<double, double> best_pair(const std::function<void()>& a, const std::function<void()>& b,
                                    int reps) {
  a();
  b();
  double ta = 1e30, tb = 1e30;
  for (int i = 0; i < reps; ++i) {
    ta = std::min(ta, seconds(a));
    tb = std::min(tb, seconds(b));
  }
  return {ta, tb};
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

std::vector<float> randn(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

struct Tiles {  // an operand in 1x128 tiles along its rows
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  int64_t ld, sld;
  Tiles(const std::vector<float>& x, int64_t rows, int64_t cols)
      : codes(static_cast<size_t>(rows * cols)),
        scales(static_cast<size_t>(blocks_of(cols) * moert::fp8::tile_scale_ld(rows))),
        ld(cols),
        sld(moert::fp8::tile_scale_ld(rows)) {
    f8::quantize_row_tiles(x.data(), cols, rows, cols, codes.data(), cols, scales.data(), sld, {});
  }
  f8::RowTiles view() const { return {codes.data(), ld, scales.data(), sld}; }
};

struct ColTiles {  // an operand in 128x1 tiles down its columns
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  int64_t ld;
  ColTiles(const std::vector<float>& x, int64_t rows, int64_t cols)
      : codes(static_cast<size_t>(rows * cols)),
        scales(static_cast<size_t>(blocks_of(rows) * cols)),
        ld(cols) {
    f8::quantize_column_tiles(x.data(), cols, rows, cols, codes.data(), cols, scales.data(), cols,
                              {});
  }
  f8::ColumnTiles view() const { return {codes.data(), ld, scales.data(), ld}; }
};

struct Blocks {  // a weight in 128x128 blocks
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  int64_t ld, sld;
  Blocks(const std::vector<float>& w, int64_t rows, int64_t cols)
      : codes(static_cast<size_t>(rows * cols)),
        scales(static_cast<size_t>(blocks_of(rows) * moert::fp8::block_scale_ld(cols))),
        ld(cols),
        sld(moert::fp8::block_scale_ld(cols)) {
    f8::quantize_blocks(w.data(), cols, rows, cols, codes.data(), cols, scales.data(), sld, {});
  }
  f8::Blocks view() const { return {codes.data(), ld, scales.data(), sld}; }
};

void gemm_row(const char* op, const std::string& name, int64_t m, int64_t n, int64_t k,
              const std::function<void()>& fp32, const std::function<void()>& fp8, int reps,
              double limit) {
  const double flops =
      2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const auto [t32, t8] = best_pair(fp32, fp8, reps);
  std::printf("%-6s %-22s %6lld %6lld %6lld %10.1f %10.1f %8.2f %10.1f\n", op, name.c_str(),
              static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
              flops / t32 * 1e-9, flops / t8 * 1e-9, t32 / t8, limit);
  std::fflush(stdout);
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one;
  return in >> one ? one : "unknown";
}

// GFLOP/s of the fp32 GEMM on one 128x128x128 block in the form the emulation calls it
// (non-transposed), fastest of 2000 calls: each call is short enough to run uninterrupted now and
// then even on a busy machine.
double block_gemm_limit() {
  const int64_t b = moert::fp8::kBlock;
  const auto a = randn(b * b, 5), w = randn(b * b, 6);
  std::vector<float> c(static_cast<size_t>(b * b));
  double best = 1e30;
  for (int i = 0; i < 2000; ++i)
    best = std::min(best,
                    seconds([&] { cpu::matmul_nn(a.data(), w.data(), c.data(), b, b, b, false); }));
  return 2.0 * static_cast<double>(b * b * b) / best * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  // One thread, as the title says: oneDNN would otherwise spread the fp32 GEMMs (the baseline and
  // the emulation's block products) over every OpenMP thread.
  const cpu::SerialOmpScope one_thread;
  const int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 512;
  if (tokens <= 0) {
    std::fprintf(stderr, "usage: %s [tokens > 0]\n", argv[0]);
    return 2;
  }
  const int reps = 5;
  std::printf(
      "Block-scaled FP8 on the CPU, one thread of %s (load average %s): emulated GEMMs\n"
      "(E4M3 codes, fp32 sums per 128-block, scaled fp32 accumulation) against the fp32 GEMM of\n"
      "the same shape (cpu::matmul_*), best of %d alternating runs each. Limit: the fp32 GEMM on\n"
      "one 128x128x128 block, the emulation's inner step, fastest of 2000 calls (a ceiling that\n"
      "a busy machine's preemptions do not lower).\n\n",
      cpu_model().c_str(), load_average().c_str(), reps);
  const double limit = block_gemm_limit();
  std::printf("%-6s %-22s %6s %6s %6s %10s %10s %8s %10s\n", "GEMM", "shape", "m", "n", "k",
              "fp32 GF/s", "fp8 GF/s", "fp8/fp32", "limit");

  struct Case {
    std::string name;
    int64_t m, n, k;
  };
  // Fprop y[m, n] = x[m, k] W[n, k]^T; Dgrad dx[m, k] = dy[m, n] W[n, k]; Wgrad dW[n, k] =
  // dy[m, n]^T x[m, k] (m tokens).
  const Case cases[] = {{"V3 expert W1/W3", tokens, 2048, 7168},
                        {"V3 expert W2", tokens, 7168, 2048},
                        {"square 1024", 256, 1024, 1024},
                        {"odd sizes", 300, 1000, 700}};
  for (const Case& c : cases) {
    const auto x = randn(c.m * c.k, 1), w = randn(c.n * c.k, 2), dy = randn(c.m * c.n, 3);
    const Tiles xq(x, c.m, c.k), dyq(dy, c.m, c.n);
    const Blocks wq(w, c.n, c.k);
    std::vector<float> out(static_cast<size_t>(std::max({c.m * c.n, c.m * c.k, c.n * c.k})));
    std::vector<float> scratch(static_cast<size_t>(std::max(
        {f8::gemm_fprop_scratch_floats(c.m, c.n, c.k), f8::gemm_dgrad_scratch_floats(c.m, c.n, c.k),
         f8::gemm_wgrad_scratch_floats(c.m, c.n, c.k)})));
    gemm_row(
        "Fprop", c.name, c.m, c.n, c.k,
        [&] { cpu::matmul_nt(x.data(), w.data(), out.data(), c.m, c.n, c.k, false); },
        [&] {
          f8::gemm_fprop(xq.view(), wq.view(), out.data(), c.n, c.m, c.n, c.k, false,
                         scratch.data());
        },
        reps, limit);
    gemm_row(
        "Dgrad", c.name, c.m, c.n, c.k,
        [&] { cpu::matmul_nn(dy.data(), w.data(), out.data(), c.m, c.k, c.n, false); },
        [&] {
          f8::gemm_dgrad(dyq.view(), wq.view(), out.data(), c.k, c.m, c.n, c.k, false,
                         scratch.data());
        },
        reps, limit);
    const ColTiles dyt(dy, c.m, c.n), xt(x, c.m, c.k);
    gemm_row(
        "Wgrad", c.name, c.m, c.n, c.k,
        [&] {
          cpu::matmul_tn(dy.data(), c.n, x.data(), c.k, out.data(), c.k, c.n, c.k, c.m, false);
        },
        [&] {
          f8::gemm_wgrad(dyt.view(), xt.view(), out.data(), c.k, c.m, c.n, c.k, false,
                         scratch.data());
        },
        reps, limit);
  }

  // Quantizers: fp32 in, E4M3 codes and scales out.
  std::printf(
      "\nQuantizers, one thread, GB/s of fp32 input; limit: a pass reading 4 bytes and\n"
      "writing 1 per value over the same data (the top byte of each float).\n\n");
  std::printf("%-28s %6s %6s %10s %10s %8s\n", "quantizer", "rows", "cols", "GB/s", "limit",
              "of limit");
  struct QCase {
    const char* name;
    int64_t rows, cols;
    int kind;  // 0 row tiles, 1 column tiles, 2 blocks
  };
  const QCase qcases[] = {{"activation 1x128 tiles", tokens, 7168, 0},
                          {"tokens 128x1 (Wgrad)", tokens, 7168, 1},
                          {"weight 128x128 blocks", 2048, 7168, 2}};
  for (const QCase& q : qcases) {
    const auto x = randn(q.rows * q.cols, 7);
    std::vector<uint8_t> codes(static_cast<size_t>(q.rows * q.cols));
    std::vector<float> scales(static_cast<size_t>((blocks_of(q.rows) + 4) * (q.cols + 4)));
    const double bytes = 4.0 * static_cast<double>(q.rows * q.cols);
    const auto [t, t_limit] = best_pair(
        [&] {
          if (q.kind == 0)
            f8::quantize_row_tiles(x.data(), q.cols, q.rows, q.cols, codes.data(), q.cols,
                                   scales.data(), moert::fp8::tile_scale_ld(q.rows), {});
          else if (q.kind == 1)
            f8::quantize_column_tiles(x.data(), q.cols, q.rows, q.cols, codes.data(), q.cols,
                                      scales.data(), q.cols, {});
          else
            f8::quantize_blocks(x.data(), q.cols, q.rows, q.cols, codes.data(), q.cols,
                                scales.data(), moert::fp8::block_scale_ld(q.cols), {});
        },
        [&] {
          const size_t n = x.size();
          for (size_t i = 0; i < n; ++i) {
            uint32_t u;
            std::memcpy(&u, &x[i], 4);
            codes[i] = static_cast<uint8_t>(u >> 24);
          }
        },
        reps);
    std::printf("%-28s %6lld %6lld %10.2f %10.2f %7.0f%%\n", q.name, static_cast<long long>(q.rows),
                static_cast<long long>(q.cols), bytes / t * 1e-9, bytes / t_limit * 1e-9,
                100.0 * t_limit / t);
    std::fflush(stdout);
  }
  std::printf("\nload average at the end: %s\n", load_average().c_str());
  return 0;
}
