#include "kernels/cpu/wgrad_stride.h"

#include <unistd.h>

#include <numeric>

#include "core/grad_reduction.h"

namespace moert::cpu {

L1Geometry l1_geometry() {
  const long size = sysconf(_SC_LEVEL1_DCACHE_SIZE), ways = sysconf(_SC_LEVEL1_DCACHE_ASSOC),
             line = sysconf(_SC_LEVEL1_DCACHE_LINESIZE);
  if (size <= 0 || ways <= 0 || line <= 0 || size % (ways * line) != 0) return L1Geometry{};
  return L1Geometry{line, size / (ways * line), ways};
}

int64_t wgrad_row_stride(int64_t width, const L1Geometry& l1) {
  const int64_t bytes = width * static_cast<int64_t>(sizeof(float));
  if (width % 256 == 0) return width + 16;
  if (l1.line <= 0 || l1.sets <= 0 || bytes % l1.line != 0) return width;
  const int64_t rows_per_set = kReduceRows * std::gcd(bytes / l1.line, l1.sets) / l1.sets;
  return rows_per_set > l1.ways - 4 ? width + 16 : width;
}

}  // namespace moert::cpu
