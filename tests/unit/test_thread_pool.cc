#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/thread_pool.h"

namespace moert::cpu {
namespace {

TEST(ThreadPool, RunsEveryItemOnceWithValidWorkerIds) {
  ThreadPool pool(4);
  for (int round = 0; round < 50; ++round) {
    std::vector<std::atomic<int>> hits(1000);
    std::atomic<bool> bad_worker{false};
    pool.parallel_for(1000, [&](int64_t i, unsigned w) {
      hits[i]++;
      if (w >= pool.size()) bad_worker = true;
    });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1);
    ASSERT_FALSE(bad_worker);
  }
}

TEST(ThreadPool, RethrowsTheFirstErrorAndStaysUsable) {
  ThreadPool pool(3);
  EXPECT_THROW(pool.parallel_for(100,
                                 [](int64_t i, unsigned) {
                                   if (i == 42) throw std::runtime_error("boom");
                                 }),
               std::runtime_error);
  std::atomic<int> n{0};
  pool.parallel_for(10, [&](int64_t, unsigned) { n++; });
  EXPECT_EQ(n.load(), 10);
}

TEST(ThreadPool, SingleThreadRunsInline) {
  ThreadPool pool(1);
  EXPECT_EQ(pool.size(), 1u);
  int64_t sum = 0;
  pool.parallel_for(5, [&](int64_t i, unsigned w) {
    EXPECT_EQ(w, 0u);
    sum += i;
  });
  EXPECT_EQ(sum, 10);
}

}  // namespace
}  // namespace moert::cpu
