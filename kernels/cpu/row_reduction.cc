#include "kernels/cpu/row_reduction.h"

#include <algorithm>
#include <bit>
#include <cstring>

#include "kernels/cpu/math.h"

namespace moert::cpu {
namespace {

// Tiles of up to 512 columns and about 32k floats (128 KiB; at least 64 rows): a tile's open
// partials stay in L2 while its chunks are folded, and its GEMMs (k = a chunk's rows) are large
// enough to run near oneDNN's best rate.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 512;
constexpr int64_t kTileFloats = 32768;
// A call of fewer tiles than this gets narrower ones, down to kMinTileCols columns.
constexpr int64_t kMinTiles = 8;
constexpr int64_t kMinTileCols = 64;

// aligned_blocks(first, first + chunks), from the fold itself (which guarantees they agree):
// this library links below the core and takes only its headers.
std::vector<TreeBlock> local_blocks(int64_t first, int64_t chunks) {
  TreeFold<int> fold(first);
  for (int64_t j = 0; j < chunks; ++j) fold.push(0, [](int, int) {});
  std::vector<TreeBlock> out;
  for (const auto& [block, v] : fold.blocks()) out.push_back(block);
  return out;
}

// Sizes g's roots for chunks [first_chunk, first_chunk + chunks), `n` floats each (dense).
void size_roots(Allocator& mem, const GradOut& g, int64_t chunks, int64_t n) {
  GradRoots& r = *g.roots;
  r.blocks = local_blocks(g.first_chunk, chunks);
  r.rows.clear();
  r.values.resize(r.blocks.size());
  for (auto& v : r.values) v.resize(mem, static_cast<size_t>(n));
}

}  // namespace

namespace {

struct Tile {
  size_t grad;
  int64_t o0, no, i0, ni;
};

// The tiles of a call whose tiles have at most `cols` columns.
std::vector<Tile> tiles_of(const std::vector<DenseGrad>& grads, int64_t cols) {
  std::vector<Tile> tiles;
  for (size_t gi = 0; gi < grads.size(); ++gi) {
    const DenseGrad& d = grads[gi];
    if (d.chunks == 0 || d.out == 0 || d.in == 0) continue;
    const int64_t ni = std::min(d.in, cols);
    const int64_t no =
        std::min(d.out, std::max(kTileRows, kTileFloats / std::min(d.in, kTileCols)));
    for (int64_t o0 = 0; o0 < d.out; o0 += no)
      for (int64_t i0 = 0; i0 < d.in; i0 += ni)
        tiles.push_back({gi, o0, std::min(no, d.out - o0), i0, std::min(ni, d.in - i0)});
  }
  return tiles;
}

}  // namespace

// Tiles of at most kTileCols columns; a call of too few (the router's gradient alone, 16 x 512:
// one tile) gets narrower ones, so that its chunks' partials do not all run on one thread.
int64_t DenseReducer::tile_cols(const std::vector<DenseGrad>& grads) {
  int64_t cols = kTileCols;
  while (static_cast<int64_t>(tiles_of(grads, cols).size()) < kMinTiles && cols / 2 >= kMinTileCols)
    cols /= 2;
  return cols;
}

void DenseReducer::run(Allocator& mem, const std::vector<DenseGrad>& grads) {
  for (const DenseGrad& d : grads)
    if (d.g->roots) size_roots(mem, *d.g, d.chunks, d.out * d.in);
  const std::vector<Tile> tiles = tiles_of(grads, tile_cols(grads));
  pool_.parallel_for(static_cast<int64_t>(tiles.size()), [&](int64_t ti, unsigned worker) {
    const Tile& t = tiles[static_cast<size_t>(ti)];
    const DenseGrad& d = grads[t.grad];
    const GradOut& g = *d.g;
    // oneDNN's matrix-vector products (a tile of one row or column) start their FMA chains from
    // c instead of adding it at the end.
    const bool exact = d.exact_accumulate && t.no > 1 && t.ni > 1;
    // A single chunk's total is its partial, and acc + that partial is what its GEMM makes with
    // an exact accumulate, in place: no partial is written and read back. A call's experts get
    // one chunk each wherever they hold at most kReduceRows rows, as in small batches and in
    // models of many experts.
    if (exact && !g.roots && d.chunks == 1) {
      d.partial(0, t.o0, t.no, t.i0, t.ni, g.acc + t.o0 * d.in + t.i0, d.in, true, worker);
      return;
    }
    const int64_t size = t.no * t.ni;
    // Open blocks of a fold over n chunks: at most 2 per bit of n (an unaligned first chunk),
    // plus the partial being computed.
    const int64_t slots = 2 * std::bit_width(static_cast<uint64_t>(d.chunks)) + 2;
    auto& s = scratch_[worker];
    if (s.size() < static_cast<size_t>(slots * size)) s.resize(static_cast<size_t>(slots * size));
    std::vector<float*> free;
    for (int64_t i = slots - 1; i >= 0; --i) free.push_back(s.data() + i * size);
    // A merge of a value with itself is one the partial's GEMM has already made.
    auto merge = [&](float* l, float* r) {
      if (l == r) return;
      add_into(l, r, size);
      free.push_back(r);
    };
    const int64_t first = g.roots ? g.first_chunk : 0;
    TreeFold<float*> fold(first);
    for (int64_t j = 0; j < d.chunks; ++j) {
      // The second chunk of an aligned pair whose first is open alone merges into it at once:
      // with an exact accumulate, its GEMM adds it there, saving a pass over the tile.
      const auto& open = fold.blocks();
      const bool into_left = exact && (first + j) % 2 == 1 && !open.empty() &&
                             open.back().first == TreeBlock{first + j - 1, 1};
      float* p = into_left ? open.back().second : free.back();
      if (!into_left) free.pop_back();
      d.partial(j, t.o0, t.no, t.i0, t.ni, p, t.ni, into_left, worker);
      fold.push(p, merge);
    }
    if (!g.roots) {
      const float* total = fold.finish(merge);
      for (int64_t o = 0; o < t.no; ++o)
        add_into(g.acc + (t.o0 + o) * d.in + t.i0, total + o * t.ni, t.ni);
      return;
    }
    const auto& open = fold.blocks();
    for (size_t b = 0; b < open.size(); ++b)
      for (int64_t o = 0; o < t.no; ++o)
        std::memcpy(g.roots->values[b].data() + (t.o0 + o) * d.in + t.i0, open[b].second + o * t.ni,
                    sizeof(float) * static_cast<size_t>(t.ni));
  });
}

void reduce_partials(Allocator& mem, float* partials, int64_t chunks, int64_t n, const GradOut& g) {
  if (g.roots) size_roots(mem, g, chunks, n);
  if (chunks == 0) return;
  auto merge = [n](float* l, float* r) { add_into(l, r, n); };
  TreeFold<float*> fold(g.roots ? g.first_chunk : 0);
  for (int64_t j = 0; j < chunks; ++j) fold.push(partials + j * n, merge);
  if (!g.roots) {
    add_into(g.acc, fold.finish(merge), n);
    return;
  }
  const auto& open = fold.blocks();
  for (size_t b = 0; b < open.size(); ++b)
    std::memcpy(g.roots->values[b].data(), open[b].second, sizeof(float) * static_cast<size_t>(n));
}

void reduce_sparse(Allocator& mem, std::vector<SparsePartial>& partials, int64_t dim,
                   const GradOut& g) {
  const int64_t chunks = static_cast<int64_t>(partials.size());
  auto merge = [&](size_t li, size_t ri) {
    merge_sparse_rows(partials[li], partials[ri], dim);
    partials[ri] = SparsePartial{};
  };
  TreeFold<size_t> fold(g.roots ? g.first_chunk : 0);
  for (int64_t j = 0; j < chunks; ++j) fold.push(static_cast<size_t>(j), merge);
  if (!g.roots) {
    if (chunks == 0) return;
    const SparsePartial& t = partials[fold.finish(merge)];
    for (size_t k = 0; k < t.rows.size(); ++k)
      add_into(g.acc + static_cast<int64_t>(t.rows[k]) * dim, t.values.data() + k * dim, dim);
    return;
  }
  GradRoots& r = *g.roots;
  r.blocks.clear();
  r.rows.clear();
  r.values.clear();
  for (const auto& [block, index] : fold.blocks()) {
    SparsePartial& p = partials[index];
    r.blocks.push_back(block);
    r.values.emplace_back(mem, p.values.size());
    if (!p.values.empty())
      std::memcpy(r.values.back().data(), p.values.data(), p.values.size() * sizeof(float));
    r.rows.push_back(std::move(p.rows));
  }
}

}  // namespace moert::cpu
