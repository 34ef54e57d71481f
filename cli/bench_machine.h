// The machine's own limits, measured by `moert bench` in the same run as the figures they bound:
// the fp32 FMA peak and the memory read bandwidth. Independent of libmoert.
#pragma once

#include <cstddef>
#include <string>

namespace moert_cli {

// The CPU as /proc/cpuinfo names it, with its family and model ("AMD EPYC (family 25 model 1)"),
// and the number of CPUs the process may run on.
std::string cpu_name();
unsigned cpu_count();

struct FmaPeak {
  double gflops = 0.0;  // all threads together
  std::string how;      // e.g. "12 chains of vfmadd on ymm registers, 2 threads"
};
// `threads` threads each run 12 independent chains of fused multiply-adds on the widest vector
// registers the CPU has (AVX-512 or AVX2; both are tried where both exist and the faster counts).
FmaPeak fma_peak(unsigned threads);

// GB/s (1e9 bytes) of `threads` threads reading disjoint parts of a `bytes` buffer (far larger
// than the caches), best of three passes.
double read_bandwidth(unsigned threads, size_t bytes);

}  // namespace moert_cli
