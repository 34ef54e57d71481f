#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "core/expert_parallel.h"
#include "core/grad_reduction.h"

namespace moert {
namespace {

// Every (expert, global position) is computed by exactly one rank of its shard, replicas get
// contiguous chunk-aligned ranges in order, and slots tile each rank's layout without gaps.
TEST(ExpertParallel, LayoutGivesEveryAssignmentOneChunkAlignedSlot) {
  std::mt19937 rng(3);
  for (auto [world, ep] :
       std::vector<std::pair<int, int>>{{1, 1}, {2, 2}, {4, 4}, {4, 2}, {4, 1}, {6, 3}, {8, 2}}) {
    const int64_t E = 12;
    std::vector<int64_t> counts(static_cast<size_t>(world * E));
    std::uniform_int_distribution<int64_t> c(0, 300);
    for (auto& x : counts) x = c(rng) < 30 ? 0 : c(rng);
    const ExpertLayout layout({world, ep, 0, E}, counts, kReduceRows);
    for (int64_t e = 0; e < E; ++e) {
      int64_t total = 0;
      for (int r = 0; r < world; ++r) {
        EXPECT_EQ(layout.first_position(r, e), total);
        total += counts[r * E + e];
      }
      EXPECT_EQ(layout.total(e), total);
      const int dp = world / ep;
      EXPECT_EQ(layout.range_begin(e, 0), 0);
      EXPECT_EQ(layout.range_end(e, dp - 1), total);
      for (int d = 0; d < dp; ++d) {
        EXPECT_LE(layout.range_begin(e, d), layout.range_end(e, d));
        if (layout.range_begin(e, d) < total) {
          EXPECT_EQ(layout.range_begin(e, d) % kReduceRows, 0);
        }
        // Balanced to within one chunk.
        const int64_t J = (total + kReduceRows - 1) / kReduceRows;
        const int64_t chunks =
            (layout.range_end(e, d) - layout.range_begin(e, d) + kReduceRows - 1) / kReduceRows;
        EXPECT_LE(chunks, J / dp + 1);
      }
      std::set<std::pair<int, int64_t>> slots;
      for (int64_t p = 0; p < total; ++p) {
        const int q = layout.owner(e, p);
        EXPECT_EQ(q % ep, e / (E / ep));
        EXPECT_TRUE(slots.insert({q, layout.slot(q, e, p)}).second);
      }
    }
    for (int q = 0; q < world; ++q) {
      const auto off = layout.slot_offsets(q);
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e)
        for (int64_t p = 0; p < layout.total(e); ++p)
          if (layout.owner(e, p) == q) {
            const int64_t local = e - (q % ep) * (E / ep);
            const int64_t sl = layout.slot(q, e, p);
            EXPECT_GE(sl, off[local]);
            EXPECT_LT(sl, off[local + 1]);
            ++n;
          }
      EXPECT_EQ(n, off.back());
    }
  }
}

// A rank's dispatch sends each token once per destination — over all chunks — and lists each
// assignment once, in the chunk of its expert's group on the destination.
TEST(ExpertParallel, RouteSendsEachTokenOncePerDestination) {
  const int world = 4, ep = 2;
  const int64_t E = 8, K = 3, rows = 200;
  std::mt19937 rng(9);
  // Every rank routes its rows at random; rank 1 is the one whose route is checked.
  std::vector<std::vector<int32_t>> tok(world), exp(world);
  std::vector<int64_t> counts(static_cast<size_t>(world * E), 0);
  for (int r = 0; r < world; ++r) {
    std::vector<std::vector<int32_t>> by_expert(E);
    for (int64_t t = 0; t < rows; ++t) {
      std::vector<int32_t> pick(E);
      for (int e = 0; e < E; ++e) pick[e] = e;
      std::shuffle(pick.begin(), pick.end(), rng);
      for (int k = 0; k < K; ++k) by_expert[pick[k]].push_back(static_cast<int32_t>(t));
    }
    for (int64_t e = 0; e < E; ++e)
      for (int32_t t : by_expert[e]) {
        tok[r].push_back(t);
        exp[r].push_back(static_cast<int32_t>(e));
        ++counts[r * E + e];
      }
  }
  const ExpertLayout layout({world, ep, 1, E}, counts, kReduceRows);
  std::vector<float> w(tok[1].size(), 0.5f);
  for (int64_t chunks : {1, 2, 3, 4, 9}) {
    const DispatchRoute route = route_dispatch(layout, tok[1].data(), exp[1].data(), w.data(),
                                               static_cast<int64_t>(tok[1].size()), rows, chunks);
    const int64_t C = route.chunks;
    EXPECT_EQ(C, std::min<int64_t>(chunks, E / ep));
    size_t listed = 0;
    std::vector<std::vector<int32_t>> sent(world);  // per destination, in its row numbering
    for (int64_t c = 0; c < C; ++c)
      for (int q = 0; q < world; ++q) {
        EXPECT_TRUE(std::is_sorted(route.tokens[c][q].begin(), route.tokens[c][q].end()));
        sent[q].insert(sent[q].end(), route.tokens[c][q].begin(), route.tokens[c][q].end());
        listed += route.assignments[c][q].size();
      }
    for (int q = 0; q < world; ++q) {
      std::set<int32_t> seen(sent[q].begin(), sent[q].end());
      EXPECT_EQ(seen.size(), sent[q].size()) << "a token sent twice to rank " << q;
    }
    EXPECT_EQ(listed, tok[1].size());
    for (size_t a = 0; a < tok[1].size(); ++a) {
      const int q = route.dest[a];
      const int64_t c = route.chunk[a];
      const auto& as = route.assignments[c][q][route.index[a]];
      EXPECT_EQ(sent[q][as.row], tok[1][a]);
      EXPECT_EQ(q % ep, exp[1][a] / (E / ep));
      EXPECT_EQ(c, chunk_of_local(exp[1][a] % (E / ep), C, E / ep));
      // The row was sent in this chunk or an earlier one.
      int64_t before = 0;
      for (int64_t c2 = 0; c2 <= c; ++c2)
        before += static_cast<int64_t>(route.tokens[c2][q].size());
      EXPECT_LT(as.row, before);
    }
  }
}

}  // namespace
}  // namespace moert
