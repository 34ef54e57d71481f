#include "core/expert_parallel.h"

#include <algorithm>
#include <utility>

#include "core/error.h"

namespace moert {

ExpertLayout::ExpertLayout(const ExpertSharding& sharding, std::vector<int64_t> counts,
                           int64_t chunk_rows, int64_t align_rows)
    : s_(sharding),
      chunk_(chunk_rows),
      align_(align_rows > 0 ? align_rows : chunk_rows),
      prefix_(std::move(counts)) {
  const int64_t E = s_.experts;
  if (chunk_ < 1 || align_ % chunk_ != 0)
    fail(Code::Internal, "expert layout: ranges aligned at ", align_, " rows cannot hold whole ",
         chunk_, "-row chunks");
  if (s_.ep < 1 || s_.world % s_.ep != 0 || E % s_.ep != 0 ||
      static_cast<int64_t>(prefix_.size()) != s_.world * E)
    fail(Code::Internal, "expert layout: ", s_.world, " ranks, EP ", s_.ep, ", ", E,
         " experts and ", prefix_.size(), " counts do not fit");
  total_.assign(static_cast<size_t>(E), 0);
  // counts -> exclusive prefix over ranks, in place.
  for (int r = 0; r < s_.world; ++r)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t c = prefix_[r * E + e];
      prefix_[r * E + e] = total_[e];
      total_[e] += c;
    }
  const int64_t P = s_.per_shard();
  slot_base_.assign(static_cast<size_t>(s_.world * (P + 1)), 0);
  for (int q = 0; q < s_.world; ++q) {
    const int64_t first = (q % s_.ep) * P;
    const int d = q / s_.ep;
    for (int64_t i = 0; i < P; ++i)
      slot_base_[q * (P + 1) + i + 1] =
          slot_base_[q * (P + 1) + i] + range_end(first + i, d) - range_begin(first + i, d);
  }
}

int64_t ExpertLayout::range_begin(int64_t e, int d) const {
  const int64_t J = (total_[e] + align_ - 1) / align_, dp = s_.dp();
  return std::min(total_[e], align_ * (static_cast<int64_t>(d) * J / dp));
}

int ExpertLayout::replica_of(int64_t e, int64_t p) const {
  int d = 0;
  while (d + 1 < s_.dp() && range_begin(e, d + 1) <= p) ++d;
  return d;
}

std::vector<int64_t> ExpertLayout::slot_offsets(int q) const {
  const int64_t P = s_.per_shard();
  const auto* b = slot_base_.data() + q * (P + 1);
  return std::vector<int64_t>(b, b + P + 1);
}

int64_t ExpertLayout::slot(int q, int64_t e, int64_t p) const {
  const int64_t P = s_.per_shard(), local = e - (q % s_.ep) * P;
  return slot_base_[q * (P + 1) + local] + p - range_begin(e, q / s_.ep);
}

int64_t ExpertLayout::first_chunk(int q, int64_t local) const {
  ExpertSharding on = s_;
  on.rank = q;
  return range_begin(on.first_expert() + local, on.replica()) / chunk_;
}

DispatchRoute route_dispatch(const ExpertLayout& layout, const int32_t* token,
                             const int32_t* expert, const float* weight, int64_t assignments,
                             int64_t rows, int64_t chunks) {
  const ExpertSharding& s = layout.sharding();
  const int world = s.world;
  const int64_t P = s.per_shard();
  chunks = pipeline_chunks(chunks, P);
  DispatchRoute out;
  out.chunks = chunks;
  out.tokens.assign(static_cast<size_t>(chunks),
                    std::vector<std::vector<int32_t>>(static_cast<size_t>(world)));
  out.assignments.assign(
      static_cast<size_t>(chunks),
      std::vector<std::vector<DispatchRoute::Assignment>>(static_cast<size_t>(world)));
  out.dest.resize(static_cast<size_t>(assignments));
  out.chunk.resize(static_cast<size_t>(assignments));
  out.index.resize(static_cast<size_t>(assignments));
  std::vector<int64_t> position(static_cast<size_t>(assignments));
  std::vector<int64_t> next(static_cast<size_t>(s.experts), 0);
  for (int64_t e = 0; e < s.experts; ++e) next[e] = layout.first_position(s.rank, e);
  // first[q * rows + t]: the first chunk in which dest q needs token t (chunks = never); then its
  // row in q's numbering of this rank's rows.
  const size_t cells = static_cast<size_t>(world) * static_cast<size_t>(rows);
  std::vector<int32_t> first(cells, static_cast<int32_t>(chunks)), row_of(cells, -1);
  for (int64_t a = 0; a < assignments; ++a) {
    const int64_t e = expert[a];
    position[a] = next[e]++;
    const int q = layout.owner(e, position[a]);
    const auto c = static_cast<int32_t>(chunk_of_local(e % P, chunks, P));
    out.dest[a] = q;
    out.chunk[a] = c;
    int32_t& f = first[static_cast<size_t>(q) * rows + token[a]];
    f = std::min(f, c);
  }
  for (int q = 0; q < world; ++q) {
    int32_t numbered = 0;
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t t = 0; t < rows; ++t) {
        const size_t i = static_cast<size_t>(q) * rows + t;
        if (first[i] != c) continue;
        row_of[i] = numbered++;
        out.tokens[c][q].push_back(static_cast<int32_t>(t));
      }
  }
  for (int64_t a = 0; a < assignments; ++a) {
    const int q = out.dest[a], c = out.chunk[a];
    auto& list = out.assignments[c][q];
    out.index[a] = static_cast<int32_t>(list.size());
    list.push_back({row_of[static_cast<size_t>(q) * rows + token[a]],
                    static_cast<int32_t>(layout.slot(q, expert[a], position[a])), weight[a]});
  }
  return out;
}

}  // namespace moert
