// The GEMM libraries a CPU backend could use, measured side by side by `moert bench` on the
// layer's GEMM shape: oneDNN (what libmoert links), BLIS and OpenBLAS, each from Debian's
// packages when installed. They are loaded at run time (dlopen), so the command needs none of
// them and reports those that are missing.
#pragma once

#include <cstdint>
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

// Measures C[m, n] = X[m, k] W[n, k]^T (and the backward pair dX = dC W, dW = dC^T X) with
// `threads` threads: as `threads` concurrent single-threaded calls on row blocks (how moert runs
// GEMMs, for libraries that allow concurrent calls) and as one call with the library's own
// threads; each library's better way counts. Median of `repeats` after a warm-up.
std::vector<GemmLibrary> measure_gemm_libraries(int64_t m, int64_t n, int64_t k, unsigned threads,
                                                int repeats);

}  // namespace moert_cli
