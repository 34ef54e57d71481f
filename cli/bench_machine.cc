#include "cli/bench_machine.h"

#include <immintrin.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

namespace moert_cli {
namespace {

bool g_cpu_time = false;
unsigned g_threads = 1;

double seconds_since(double t0) { return bench_clock() - t0; }

// Runs f(i) on `threads` threads at once; the time of the whole, in seconds.
template <typename F>
double concurrently(unsigned threads, F&& f) {
  std::vector<std::thread> pool;
  const double t0 = bench_clock();
  for (unsigned i = 1; i < threads; ++i) pool.emplace_back([&f, i] { f(i); });
  f(0);
  for (auto& t : pool) t.join();
  return seconds_since(t0);
}

// 12 chains x 8 lanes x 2 FLOP per iteration. The result is returned so that nothing is elided.
__attribute__((target("avx2,fma"))) float fma_chains_avx2(long iterations) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + 1e-3f * static_cast<float>(i));
  const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  for (long n = 0; n < iterations; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
  float s = 0.0f;
  for (int i = 0; i < 12; ++i) s += _mm256_cvtss_f32(a[i]);
  return s;
}

__attribute__((target("avx512f"))) float fma_chains_avx512(long iterations) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.0f + 1e-3f * static_cast<float>(i));
  const __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
  for (long n = 0; n < iterations; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], m, c);
  float s = 0.0f;
  for (int i = 0; i < 12; ++i) s += _mm512_cvtss_f32(a[i]);
  return s;
}

// 24 chains x 32 bf16 products x 2 FLOP per iteration (16 fp32 lanes, two products each). Twice
// the FMA chains: vdpbf16ps's latency times its throughput exceeds 12 on Zen 5, where 12 chains
// reach 424 GFLOP/s per core and 24 reach 458, the rate oneDNN's own bf16 GEMMs attain (463 on
// [64, 512] x [512, 256]).
constexpr int kDotChains = 24;
__attribute__((target("avx512f,avx512bf16"))) float dot_chains_avx512_bf16(long iterations) {
  __m512 a[kDotChains];
  for (int i = 0; i < kDotChains; ++i) a[i] = _mm512_set1_ps(1e-3f * static_cast<float>(i));
  // bf16 1.0 and 2^-20: the sums grow by 2^-19 per step and stay far from overflow.
  const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3f80));
  const __m512bh y = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3580));
  for (long n = 0; n < iterations; ++n)
#pragma GCC unroll 24
    for (int i = 0; i < kDotChains; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
  float s = 0.0f;
  for (int i = 0; i < kDotChains; ++i) s += _mm512_cvtss_f32(a[i]);
  return s;
}

// GFLOP/s of `threads` threads running `chains` (`flops` per iteration) for about 0.3 s.
template <typename F>
double peak_of(unsigned threads, double flops, F&& chains) {
  long iterations = 1 << 20;
  // Calibrate on one thread so that the timed run lasts long enough to reach full clock.
  for (;;) {
    const double t0 = bench_clock();
    volatile float sink = chains(iterations);
    (void)sink;
    if (seconds_since(t0) > 0.05 || iterations > (1l << 34)) break;
    iterations *= 2;
  }
  iterations *= 6;
  // More threads than CPUs take turns: each runs its share of one CPU's work, so that the probe
  // still lasts about 0.3 s a CPU (1024 threads on 2 CPUs took 15 minutes with the full count).
  const unsigned cpus = std::max(1u, cpu_count());
  if (threads > cpus) iterations = std::max(1l, iterations * cpus / threads);
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    const double t = concurrently(threads, [&](unsigned) {
      volatile float sink = chains(iterations);
      (void)sink;
    });
    best = std::max(best, flops * static_cast<double>(iterations) * threads / t / 1e9);
  }
  return best;
}

__attribute__((target("avx2"))) double sum_avx2(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  return _mm256_cvtss_f32(s);
}

double sum_plain(const float* p, size_t n) {
  float s[8] = {};
  for (size_t i = 0; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += p[i + j];
  return s[0];
}

}  // namespace

void use_cpu_time(bool cpu_time, unsigned threads) {
  g_cpu_time = cpu_time;
  // Threads beyond the CPUs take turns and add no CPU time: the process's CPU time is that of the
  // CPUs it runs on.
  g_threads = std::max(1u, std::min(threads, cpu_count()));
}

bool using_cpu_time() { return g_cpu_time; }

unsigned cpu_time_divisor() { return g_threads; }

double bench_clock() {
  timespec t{};
  if (g_cpu_time) {
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec)) / g_threads;
  }
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

bool wait_for_idle_threads() {
  constexpr auto kWindow = std::chrono::milliseconds(2);
  constexpr double kIdleSeconds = 1e-4;  // CPU the other threads may use in a quiet window
  constexpr int kMostWindows = 100;
  auto seconds = [](clockid_t clock) {
    timespec t{};
    clock_gettime(clock, &t);
    return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
  };
  auto others = [&] {
    return seconds(CLOCK_PROCESS_CPUTIME_ID) - seconds(CLOCK_THREAD_CPUTIME_ID);
  };
  double before = others();
  int quiet = 0;
  for (int i = 0; i < kMostWindows && quiet < 2; ++i) {
    std::this_thread::sleep_for(kWindow);
    const double now = others();
    quiet = now - before < kIdleSeconds ? quiet + 1 : 0;
    before = now;
  }
  return quiet >= 2;
}

void run_for(double seconds, int least, int most, const std::function<void()>& run) {
  const double start = bench_clock();
  for (int i = 0; i < most && (i < least || bench_clock() - start < seconds); ++i) run();
}

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, model, family, number;
  auto value = [](const std::string& l) {
    const size_t colon = l.find(':');
    std::string v = colon == std::string::npos ? "" : l.substr(colon + 1);
    v.erase(0, v.find_first_not_of(" \t"));
    return v;
  };
  while (std::getline(in, line) && (model.empty() || family.empty() || number.empty())) {
    if (line.rfind("model name", 0) == 0 && model.empty()) model = value(line);
    if (line.rfind("cpu family", 0) == 0 && family.empty()) family = value(line);
    if (line.rfind("model\t", 0) == 0 && number.empty()) number = value(line);
  }
  if (model.empty()) model = "unknown CPU";
  if (!family.empty()) model += " (family " + family + " model " + number + ")";
  return model;
}

unsigned cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<unsigned>(CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

namespace {

// ", N threads", for a peak's description.
std::string on_threads(unsigned threads) {
  return ", " + std::to_string(threads) + " thread" + (threads == 1 ? "" : "s");
}

}  // namespace

FmaPeak fma_peak(unsigned threads) {
  FmaPeak p;
  const std::string per = on_threads(threads);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    p.gflops = p.ymm_gflops = peak_of(threads, 12 * 8 * 2, fma_chains_avx2);
    p.how = "12 chains of vfmadd on ymm" + per;
  }
  if (__builtin_cpu_supports("avx512f")) {
    const double z = peak_of(threads, 12 * 16 * 2, fma_chains_avx512);
    if (z > p.gflops) {
      p.gflops = z;
      p.how = "12 chains of vfmadd on zmm" + per;
    }
  }
  if (p.how.empty()) p.how = "no AVX2: not measured";
  return p;
}

FmaPeak bf16_dot_peak(unsigned threads) {
  FmaPeak p;
  if (!__builtin_cpu_supports("avx512bf16")) {
    p.how = "no AVX512-BF16: not measured";
    return p;
  }
  p.gflops = peak_of(threads, kDotChains * 32 * 2, dot_chains_avx512_bf16);
  p.how = std::to_string(kDotChains) + " chains of vdpbf16ps on zmm" + on_threads(threads);
  return p;
}

ReadProbe::ReadProbe(unsigned threads, size_t bytes)
    : threads_(std::max(1u, threads)),
      n_(bytes / sizeof(float) / threads_ / 32 * 32),
      buf_(static_cast<float*>(std::aligned_alloc(64, n_ * threads_ * sizeof(float))), &std::free) {
  if (!buf_) return;
  // Touched by the threads that read it, in the parts they read.
  concurrently(threads_,
               [&](unsigned i) { std::memset(buf_.get() + i * n_, 0, n_ * sizeof(float)); });
}

double ReadProbe::measure() {
  if (!buf_ || n_ == 0) return 0.0;
  const bool avx2 = __builtin_cpu_supports("avx2");
  std::vector<double> sink(threads_);
  const double t = concurrently(threads_, [&](unsigned i) {
    const float* part = buf_.get() + i * n_;
    sink[i] = avx2 ? sum_avx2(part, n_) : sum_plain(part, n_);
  });
  return static_cast<double>(n_ * threads_ * sizeof(float)) / t / 1e9;
}

double read_bandwidth(unsigned threads, size_t bytes) {
  ReadProbe probe(threads, bytes);
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) best = std::max(best, probe.measure());
  return best;
}

}  // namespace moert_cli
