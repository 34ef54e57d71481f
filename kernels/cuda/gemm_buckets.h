// Shape buckets for cuBLASLt's heuristic, shared by the GEMMs of the CUDA plugin (gemm.cu,
// fp8_gemm.cu): the heuristic is asked once per bucket, and each exact shape then runs the
// bucket's algorithm when it fits.
#pragma once

#include <cstdint>

namespace moert::cuda {

// x rounded up to its three leading bits (x itself up to 8): four buckets per doubling, each at
// most 25% above the sizes it stands for, so the bucket's algorithm still suits them. Common model
// dimensions (768, 1024, 3072, 4096, ...) are their own bucket, so fixed-shape GEMMs get exactly
// the heuristic's answer for their shape.
inline int64_t bucket(int64_t x) {
  int64_t step = 1;
  while ((x >> 3) >= step) step <<= 1;
  return (x + step - 1) / step * step;
}

// A leading dimension of at least `rows`: a bucket's rows can exceed the leading dimension of the
// shapes in it (A stored [k, m] has lda = m when it is packed). Only whole 256-byte steps are
// added, so the row stride keeps the alignment the key's alignments were computed with.
inline int64_t widen(int64_t ld, int64_t rows, int64_t elem) {
  if (ld >= rows) return ld;
  const int64_t step = 256 / elem;
  return ld + (rows - ld + step - 1) / step * step;
}

}  // namespace moert::cuda
