// The machine's own limits, measured by `moert bench` in the same run as the figures they bound:
// the fp32 FMA and bf16 dot-product peaks and the memory read bandwidth. Independent of libmoert.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>

namespace moert_cli {

// The clock every benchmark figure is read from: wall time, or — for a machine shared with other
// jobs — the process's CPU time divided by the thread count in use (at most the CPUs: threads
// beyond them take turns). CPU time leaves out the time the threads spend descheduled by other
// jobs, and also the time they spend waiting for one another (so it flatters a parallel run's
// balance); it still counts the cache misses that other jobs cause. Seconds.
void use_cpu_time(bool cpu_time, unsigned threads);
bool using_cpu_time();
// What the CPU time is divided by.
unsigned cpu_time_divisor();
double bench_clock();

// Returns once the process's other threads have used almost no CPU for two short windows in a
// row: true then, false after 200 ms of waiting (threads that spin for good, as OpenMP's do under
// OMP_WAIT_POLICY=active). A GEMM library's threads spin after each call before they sleep
// (libgomp's default: 8-9 ms on Zen 5, measured; OpenBLAS's pthreads too), and on a machine of
// few CPUs a spinning thread takes a core from whatever runs next: the bench layer's 4 ms forward
// at 256 tokens ran at 5-9 ms right after the GEMM it is set beside. Called between the two.
bool wait_for_idle_threads();

// Runs `run` at least `least` times, then again while fewer than `seconds` (bench_clock()) have
// passed since the first, `most` times in all at most: a GEMM's first runs after other heavy work
// in the process ran slow for a second or two (docs/cpu-performance.md, stop 58).
void run_for(double seconds, int least, int most, const std::function<void()>& run);

// The CPU as /proc/cpuinfo names it, with its family and model ("AMD EPYC (family 25 model 1)"),
// and the number of CPUs the process may run on.
std::string cpu_name();
unsigned cpu_count();

struct FmaPeak {
  double gflops = 0.0;  // all threads together
  std::string how;      // e.g. "12 chains of vfmadd on ymm registers, 2 threads"
  // fma_peak: the ymm chains' figure alone (0 without AVX2), the limit of moert's widening bf16
  // kernels, which run AVX2 even where the CPU has AVX-512.
  double ymm_gflops = 0.0;
};
// `threads` threads each run 12 independent chains of fused multiply-adds on the widest vector
// registers the CPU has (AVX-512 or AVX2; both are tried where both exist and the faster counts).
FmaPeak fma_peak(unsigned threads);

// The same for bf16 dot products: 24 chains of vdpbf16ps on zmm (AVX512-BF16: 32 bf16 products
// accumulated into 16 fp32 lanes per instruction, 64 FLOP), the instruction oneDNN's
// avx512_core_bf16 GEMMs run on; 12 chains leave Zen 5 8 % short of its rate. gflops is 0 (and
// `how` says why) on a CPU without AVX512-BF16.
FmaPeak bf16_dot_peak(unsigned threads);

// A buffer of about `bytes` (far larger than the caches) that `threads` threads read in disjoint
// parts. It is allocated and touched once, so that a benchmark can measure the bandwidth beside
// each of its passes: on a host shared with other jobs the bandwidth left to this process moves
// by a factor of two within a minute, and a figure measured once at the start does not bound a
// pass timed later. Not thread-safe.
class ReadProbe {
 public:
  ReadProbe(unsigned threads, size_t bytes);
  // GB/s (1e9 bytes) of one read of the whole buffer; 0 if it could not be allocated.
  double measure();

 private:
  unsigned threads_;
  size_t n_;  // floats per thread
  std::unique_ptr<float, decltype(&std::free)> buf_;
};

// The best of three ReadProbe(threads, bytes).measure().
double read_bandwidth(unsigned threads, size_t bytes);

}  // namespace moert_cli
