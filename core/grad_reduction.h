// How a gradient that sums over rows is reduced, so that its bits depend neither on the thread
// count nor on how many processes share the rows (docs/design.md section 2, "Expert parallelism").
//
// Every weight, bias and norm gradient is a sum over rows (tokens, or an expert's token-expert
// assignments). Its value is defined, on the CPU backend, as:
//   1. The rows, in their global order, are cut into chunks of kReduceRows rows counted from the
//      first row (the last chunk may be shorter); J chunks in all.
//   2. Each chunk's partial P_j is computed alone, from zero, in fp32.
//   3. [0, J) splits into its maximal aligned blocks: [k 2^l, (k + 1) 2^l), left to right, the
//      sizes being the set bits of J from the highest down. Within a block the partials are added
//      as a perfect binary tree: value(block) = value(left half) + value(right half).
//   4. T = ((value(B_1) + value(B_2)) + value(B_3)) + ...; the accumulated gradient gets G += T.
// A process that holds chunks [a, b) of the J can compute, alone, the value of every aligned block
// inside [a, b); the maximal such blocks ("local roots", aligned_blocks(a, b)) are nodes of the
// tree above, so the roots of all processes determine T exactly, whatever the split.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "core/buffer.h"

namespace moert {

// Rows per reduction chunk. Processes that each hold a multiple of it reduce exactly like one.
inline constexpr int64_t kReduceRows = 64;
// The same for experts multiplied in FP8, whose Wgrad quantizes its operands in 128-token tiles
// (DeepSeek-V3's 128x1 tiles along the reduction dimension) from the first row of each list: a
// multiple of kReduceRows, so that a chunk lies inside one tile.
inline constexpr int64_t kFp8ShareRows = 128;
static_assert(kFp8ShareRows % kReduceRows == 0, "a chunk must lie inside one FP8 Wgrad tile");

// Chunks [begin, begin + size): size is a power of two and begin a multiple of it.
struct TreeBlock {
  int64_t begin = 0;
  int64_t size = 0;
  // Written out: the CUDA plugin compiles this header as C++17.
  bool operator==(const TreeBlock& o) const { return begin == o.begin && size == o.size; }
};

// Chunks needed for `rows` rows.
inline int64_t reduce_chunks(int64_t rows) { return (rows + kReduceRows - 1) / kReduceRows; }

// The maximal aligned blocks that tile [a, b), left to right (empty when a >= b).
std::vector<TreeBlock> aligned_blocks(int64_t a, int64_t b);

// The local roots of one reduced gradient: the value of each of aligned_blocks(a, b) for the
// chunks [a, b) this call holds, `n` floats each, in backend memory.
//
// A sparse gradient (the embedding table's, Backend::embedding_backward) has one more field: a
// root then holds only the table rows its chunks touched, rows[i] lists them in ascending order
// (host memory) and values[i] is [rows[i].size(), dim]. Combining two sparse values adds the
// rows both hold and takes x + 0.0f for a row only one holds. Dense roots leave `rows` empty.
struct GradRoots {
  std::vector<TreeBlock> blocks;
  std::vector<Buffer<float>> values;
  std::vector<std::vector<int32_t>> rows;
};

// Where a backward operation puts a gradient it reduces over rows. With `roots` null, every chunk
// of the reduction is in the call: the operation computes T and adds it to `acc`. Otherwise the
// call holds chunks [first_chunk, first_chunk + its chunks) of a larger reduction: the operation
// writes the values of aligned_blocks() of that range into *roots (sized by the operation) and
// leaves `acc` alone; the caller combines the roots of every process (combine_roots).
struct GradOut {
  float* acc = nullptr;
  GradRoots* roots = nullptr;
  int64_t first_chunk = 0;
};

// Adds chunk partials over the tree of [0, J) — the reference definition, on host vectors of
// equal length: returns T for partials[0..J).
std::vector<float> reference_tree_sum(const std::vector<std::vector<float>>& partials);

// Folds chunk partials into the tree incrementally, in chunk order, keeping O(log J) open
// blocks: what a backend needs to reduce a long run of chunks without holding every partial.
// `Value` is a handle to n floats of the caller's storage (a pointer, an index); `Merge` computes
// merge(left, right): left[i] = left[i] + right[i]. After the last push, blocks() are exactly
// aligned_blocks(first_chunk, first_chunk + pushed): the local roots, or, from chunk 0 over all
// J chunks, the blocks B_1, B_2, ... that finish() folds into T.
template <typename Value>
class TreeFold {
 public:
  explicit TreeFold(int64_t first_chunk = 0) : next_(first_chunk) {}

  // The partial of the next chunk; it now belongs to the fold (it may become a merge target).
  template <typename Merge>
  void push(Value value, Merge&& merge) {
    push_block({next_, 1}, value, merge);
  }

  // The value of a whole aligned block starting at the next chunk (another process's local root,
  // when combining): the tree is the same as if its chunks had been pushed one by one.
  template <typename Merge>
  void push_block(TreeBlock b, Value value, Merge&& merge) {
    next_ = b.begin + b.size;
    // Two adjacent blocks of equal size whose union is aligned are the halves of their parent.
    while (!open_.empty() && open_.back().first.size == b.size &&
           open_.back().first.begin % (2 * b.size) == 0) {
      merge(open_.back().second, value);
      b = {open_.back().first.begin, 2 * b.size};
      value = open_.back().second;
      open_.pop_back();
    }
    open_.push_back({b, value});
  }

  const std::vector<std::pair<TreeBlock, Value>>& blocks() const { return open_; }

  // T = ((B_1 + B_2) + B_3) + ..., left to right, into the first block's storage, which it
  // returns. Needs at least one push.
  template <typename Merge>
  Value finish(Merge&& merge) {
    Value total = open_.front().second;
    for (size_t i = 1; i < open_.size(); ++i) merge(total, open_[i].second);
    return total;
  }

 private:
  int64_t next_;
  std::vector<std::pair<TreeBlock, Value>> open_;
};

// A sparse gradient's partial: the rows it touches, ascending, and dim values for each.
struct SparseRows {
  std::vector<int32_t> rows;
  std::vector<float> values;
};

// l = l (+) r over the union of their rows: a row on both sides is added, a row on one side is
// taken plus 0.0f, so that -0.0 ends as it would in a dense sum. The one sparse merge of the
// reduction: the backend's fold of chunk partials and the cross-process combine of roots both
// use it, so their bits agree.
inline void merge_sparse_rows(SparseRows& l, const SparseRows& r, int64_t dim) {
  SparseRows m;
  m.rows.reserve(l.rows.size() + r.rows.size());
  m.values.reserve((l.rows.size() + r.rows.size()) * static_cast<size_t>(dim));
  size_t i = 0, j = 0;
  auto take = [&](const float* v) {
    for (int64_t d = 0; d < dim; ++d) m.values.push_back(v[d] + 0.0f);
  };
  while (i < l.rows.size() || j < r.rows.size()) {
    const float* lv = l.values.data() + i * static_cast<size_t>(dim);
    const float* rv = r.values.data() + j * static_cast<size_t>(dim);
    if (j == r.rows.size() || (i < l.rows.size() && l.rows[i] < r.rows[j])) {
      m.rows.push_back(l.rows[i++]);
      take(lv);
    } else if (i == l.rows.size() || r.rows[j] < l.rows[i]) {
      m.rows.push_back(r.rows[j++]);
      take(rv);
    } else {
      m.rows.push_back(l.rows[i]);
      for (int64_t d = 0; d < dim; ++d) m.values.push_back(lv[d] + rv[d]);
      ++i;
      ++j;
    }
  }
  l = std::move(m);
}

}  // namespace moert
