#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/thread_pool.h"

#if MOERT_DNNL_OPENMP
#include <omp.h>
#endif

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

#if MOERT_DNNL_OPENMP
// oneDNN runs a GEMM with the calling thread's OpenMP thread count: inside every work item it must
// be one, on the workers and on the caller's thread alike, and the caller's own setting must be
// back when parallel_for returns.
TEST(ThreadPool, ItemsRunWithOneOpenMPThreadAndTheCallersSettingSurvives) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(3);
  for (unsigned threads : {1u, 2u, 4u}) {
    ThreadPool pool(threads);
    std::atomic<int> wrong{0};
    pool.parallel_for(64, [&](int64_t, unsigned) {
      if (omp_get_max_threads() != 1) wrong++;
    });
    EXPECT_EQ(wrong.load(), 0) << threads << " threads";
    EXPECT_EQ(omp_get_max_threads(), 3) << threads << " threads";
    // Also when an item throws.
    EXPECT_THROW(pool.parallel_for(4, [](int64_t, unsigned) { throw std::runtime_error("x"); }),
                 std::runtime_error);
    EXPECT_EQ(omp_get_max_threads(), 3);
  }
  omp_set_num_threads(before);
}
#endif

}  // namespace
}  // namespace moert::cpu
