// The GEMM libraries a CPU backend could use, measured side by side by `moert bench` on the
// layer's GEMM shape: oneDNN (what libmoert links), BLIS and OpenBLAS, each from Debian's
// packages when installed. They are loaded at run time (dlopen), so the command needs none of
// them and reports those that are missing.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moert_cli {

struct GemmLibrary {
  std::string name;     // "oneDNN 2.6.3 sgemm", "BLIS (blis-serial)", ...
  std::string kernels;  // what the library says it dispatched to ("avx2", "zen3", "Haswell")
  std::string how;      // how it was run: single-threaded calls on row blocks, or its own threads
  bool available = false;
  std::string missing;  // why not, when unavailable
  double nt = 0.0;      // GFLOP/s of C = X W^T (the forward GEMM)
  double trio = 0.0;    // GFLOP/s of the forward plus both backward GEMMs (nt + nn + tn)
};

// One more forward GEMM of the best library, run the way it ran best, after a warm-up run as in
// the comparison (a single cold run of a small GEMM, its operands evicted by the layer's pass,
// ran at a fifth of the compared rate): its GFLOP/s. A shared host moves a machine's rates within
// minutes, so the bench sets each timed pass of its layer against one of these run right before
// it, not against a rate measured once.
using GemmPass = std::function<double()>;

struct GemmComparison {
  std::vector<GemmLibrary> libraries;
  GemmPass best_pass;  // empty when no library ran
};

// Measures C[m, n] = X[m, k] W[n, k]^T (and the backward pair dX = dC W, dW = dC^T X) with
// `threads` threads: as `threads` concurrent single-threaded calls on row blocks (how moert runs
// GEMMs, for libraries that allow concurrent calls) and as one call with the library's own
// threads; each library's better way counts. Median of `repeats` after a warm-up.
GemmComparison measure_gemm_libraries(int64_t m, int64_t n, int64_t k, unsigned threads,
                                      int repeats);

}  // namespace moert_cli
