// The CPU backend's side of core/grad_reduction.h: gradients summed over rows are built from
// per-chunk partials (kReduceRows rows each, computed alone from zero) folded over the fixed tree,
// then added into GradOut::acc or left as local roots in GradOut::roots.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/buffer.h"
#include "core/grad_reduction.h"
#include "kernels/cpu/thread_pool.h"

namespace moert::cpu {

// The chunks of `rows` rows: chunk j covers rows [j kReduceRows, min(rows, (j + 1) kReduceRows)).
inline int64_t chunk_rows(int64_t rows, int64_t j) {
  return rows - j * kReduceRows < kReduceRows ? rows - j * kReduceRows : kReduceRows;
}

// One dense gradient G [out, in] of a call, whose `chunks` chunks each contribute a partial.
struct DenseGrad {
  const GradOut* g = nullptr;
  int64_t chunks = 0;
  int64_t out = 0, in = 0;
  // Writes the tile [o0, o0 + no) x [i0, i0 + ni) of chunk j's partial into c (row stride ldc),
  // from zero, on thread `worker`; with `accumulate`, adds it to c instead.
  std::function<void(int64_t j, int64_t o0, int64_t no, int64_t i0, int64_t ni, float* c,
                     int64_t ldc, bool accumulate, unsigned worker)>
      partial;
  // Whether `accumulate` rounds each element exactly as c + (the partial from zero) would, so
  // that the fold's first merge of a pair of chunks can happen inside the partial's GEMM, and a
  // one-chunk gradient's partial can be added into GradOut::acc by its GEMM (ldc: acc's width).
  // oneDNN's sgemm with beta = 1 does on tiles of at least 2 x 2, and so do the bf16 Wgrad
  // products (oneDNN's matmul with a sum post-op, or the widening kernels' sgemm); the reducer
  // asks no more (CpuReduction.GemmAccumulateRoundsAsAddingThePartial and
  // Bf16WgradLayouts.AccumulateRoundsAsAddingThePartialOnMoreShapes check it).
  bool exact_accumulate = false;
};

// Reduces dense gradients, every tile of every gradient a work item: a tile's chunk partials are
// computed and folded in chunk order, keeping O(log J) tiles open, so no gradient ever needs a
// whole partial per chunk. Tiles depend on the gradient's shape only, so the bits do not depend
// on the thread count.
class DenseReducer {
 public:
  explicit DenseReducer(ThreadPool& pool) : pool_(pool), scratch_(pool.size()) {}
  void run(Allocator& mem, const std::vector<DenseGrad>& grads);
  // The most columns a tile of `grads` spans in run(): a gradient of at most that many columns
  // is tiled by rows only, so that a tile's partials read whole rows of their right operand.
  // Depends on the shapes only (out, in, chunks), not on `partial`.
  static int64_t tile_cols(const std::vector<DenseGrad>& grads);

 private:
  ThreadPool& pool_;
  std::vector<std::vector<float>> scratch_;  // per worker
};

// A gradient whose chunk partials are small and already computed: partials [chunks, n] (host
// memory, the CPU backend's), folded and delivered to g.
void reduce_partials(Allocator& mem, float* partials, int64_t chunks, int64_t n, const GradOut& g);

// One chunk's partial of a sparse gradient (the embedding table's): the table rows it touched,
// ascending, and their values [rows.size(), dim].
using SparsePartial = SparseRows;

// Folds sparse chunk partials (consumed) as Backend::embedding_backward defines it: a merge adds
// rows present on both sides and takes x + 0.0f for a row present on one; acc gets += on the
// rows of the total only; roots carry their rows.
void reduce_sparse(Allocator& mem, std::vector<SparsePartial>& partials, int64_t dim,
                   const GradOut& g);

}  // namespace moert::cpu
