#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/grad_reduction.h"

namespace moert {
namespace {

using Values = std::vector<std::vector<float>>;

TEST(GradReduction, AlignedBlocksAreTheMaximalAlignedTiling) {
  using B = std::vector<TreeBlock>;
  EXPECT_EQ(aligned_blocks(0, 7), (B{{0, 4}, {4, 2}, {6, 1}}));
  EXPECT_EQ(aligned_blocks(0, 8), (B{{0, 8}}));
  EXPECT_EQ(aligned_blocks(1, 4), (B{{1, 1}, {2, 2}}));
  EXPECT_EQ(aligned_blocks(3, 11), (B{{3, 1}, {4, 4}, {8, 2}, {10, 1}}));
  EXPECT_TRUE(aligned_blocks(5, 5).empty());
  EXPECT_EQ(reduce_chunks(1), 1);
  EXPECT_EQ(reduce_chunks(kReduceRows), 1);
  EXPECT_EQ(reduce_chunks(kReduceRows + 1), 2);
}

// Partials whose sums round differently in every order: magnitudes spread over many binades.
Values random_partials(std::mt19937& gen, int64_t chunks, size_t n) {
  std::uniform_real_distribution<float> mant(-1.0f, 1.0f);
  std::uniform_int_distribution<int> expo(-12, 12);
  Values p(static_cast<size_t>(chunks), std::vector<float>(n));
  for (auto& v : p)
    for (float& x : v) x = std::ldexp(mant(gen), expo(gen));
  return p;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Folds chunks [a, b) of `p` the way a backend does: one push per chunk.
TreeFold<std::vector<float>*> fold_range(Values& p, int64_t a, int64_t b) {
  TreeFold<std::vector<float>*> fold(a);
  for (int64_t j = a; j < b; ++j)
    fold.push(&p[static_cast<size_t>(j)], [](std::vector<float>* l, std::vector<float>* r) {
      for (size_t i = 0; i < l->size(); ++i) (*l)[i] = (*l)[i] + (*r)[i];
    });
  return fold;
}

TEST(GradReduction, IncrementalFoldIsTheReferenceTree) {
  std::mt19937 gen(7);
  for (int64_t J = 1; J <= 70; ++J) {
    const Values p = random_partials(gen, J, 9);
    Values work = p;
    auto fold = fold_range(work, 0, J);
    std::vector<TreeBlock> got;
    for (const auto& [b, v] : fold.blocks()) got.push_back(b);
    EXPECT_EQ(got, aligned_blocks(0, J));
    const auto* total = fold.finish([](std::vector<float>* l, std::vector<float>* r) {
      for (size_t i = 0; i < l->size(); ++i) (*l)[i] = (*l)[i] + (*r)[i];
    });
    EXPECT_TRUE(same_bits(*total, reference_tree_sum(p))) << "J = " << J;
  }
}

TEST(GradReduction, AnySplitIntoRangesGivesTheSameBits) {
  std::mt19937 gen(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t J = std::uniform_int_distribution<int64_t>(1, 100)(gen);
    const Values p = random_partials(gen, J, 5);
    const std::vector<float> want = reference_tree_sum(p);
    // Cut [0, J) into up to 6 ranges, some possibly empty, as ranks of a job would hold them.
    std::vector<int64_t> cuts{0, J};
    const int parts = std::uniform_int_distribution<int>(1, 6)(gen);
    for (int i = 1; i < parts; ++i)
      cuts.push_back(std::uniform_int_distribution<int64_t>(0, J)(gen));
    std::sort(cuts.begin(), cuts.end());
    Values work = p;
    TreeFold<std::vector<float>*> combine(0);
    auto add = [](std::vector<float>* l, std::vector<float>* r) {
      for (size_t i = 0; i < l->size(); ++i) (*l)[i] = (*l)[i] + (*r)[i];
    };
    for (size_t r = 0; r + 1 < cuts.size(); ++r) {
      auto local = fold_range(work, cuts[r], cuts[r + 1]);
      std::vector<TreeBlock> got;
      for (const auto& [b, v] : local.blocks()) {
        got.push_back(b);
        combine.push_block(b, v, add);
      }
      EXPECT_EQ(got, aligned_blocks(cuts[r], cuts[r + 1]));
    }
    EXPECT_TRUE(same_bits(*combine.finish(add), want)) << "trial " << trial << " J = " << J;
  }
}

}  // namespace
}  // namespace moert
