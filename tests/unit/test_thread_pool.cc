#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/thread_pool.h"
#include "tests/unit/sanitized.h"

#if MOERT_DNNL_OPENMP
#include <omp.h>
#endif

namespace moert::cpu {
namespace {

TEST(ThreadPool, RunsEveryItemOnceWithValidWorkerIds) {
  ThreadPool pool(4);
  for (int round = 0; round < 60; ++round) {
    // Workers that poll between calls, that sleep at once, and that poll for long.
    pool.set_spin_wait(round < 20 ? ThreadPool::kDefaultSpinWaitUs : round < 40 ? 0 : 100000);
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

// Each thread runs its own contiguous share of a call first, from its front and in order; what
// it takes from another's share comes from that share's back, in decreasing order. So a thread
// runs the same items in consecutive calls of the same size (unless another took them first),
// and every item still runs once.
TEST(ThreadPool, ThreadsRunTheirOwnSharesFromTheFrontAndTakeOthersFromTheBack) {
  for (unsigned threads : {2u, 3u, 4u}) {
    ThreadPool pool(threads);
    for (int64_t n : {2, 7, 64, 1001}) {
      for (int round = 0; round < 20; ++round) {
        pool.set_spin_wait(round % 2 ? 0 : ThreadPool::kDefaultSpinWaitUs);
        std::vector<std::vector<int64_t>> ran(threads);  // each written by its own thread
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        pool.parallel_for(n, [&](int64_t i, unsigned w) {
          hits[static_cast<size_t>(i)]++;
          ran[w].push_back(i);
          // Items long enough that the workers wake before the caller ran them all.
          std::atomic<int> spin{0};
          while (spin.fetch_add(1, std::memory_order_relaxed) < 2000) {
          }
        });
        for (auto& h : hits) ASSERT_EQ(h.load(), 1);
        const auto share = [&](int64_t i) {
          int64_t w = 0;
          while (i >= n * (w + 1) / threads) ++w;
          return static_cast<unsigned>(w);
        };
        for (unsigned w = 0; w < threads; ++w) {
          const int64_t begin = n * w / threads;
          int64_t own = 0;
          std::vector<int64_t> last_taken(threads, INT64_MAX);
          for (int64_t i : ran[w]) {
            const unsigned from = share(i);
            if (from == w) {
              ASSERT_EQ(i, begin + own) << threads << " threads, n " << n << ", thread " << w;
              ++own;
            } else {
              ASSERT_LT(i, last_taken[from]) << threads << " threads, n " << n << ", thread " << w;
              last_taken[from] = i;
            }
          }
        }
      }
    }
  }
}

// A call of more items than a share's 16-bit bounds hold runs as several calls: every item
// still runs once, with its own index.
TEST(ThreadPool, ACallOfMoreItemsThanAShareHoldsRunsEveryItemOnce) {
  ThreadPool pool(3);
  for (int64_t n : {int64_t{65535}, int64_t{65536}, int64_t{200003}}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    pool.parallel_for(n, [&](int64_t i, unsigned) { hits[static_cast<size_t>(i)]++; });
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1) << n << " " << i;
  }
}

// A session asking for more threads than the process may start gets an error, not a hang: the
// workers started before the failure are stopped (they once waited on a destroyed condition
// variable). Run in a child whose address space is capped so that thread stacks run out.
TEST(ThreadPool, ThreadsThatCannotStartAreAnErrorNotAHang) {
#ifdef MOERT_TEST_SANITIZED
  GTEST_SKIP() << "the sanitizers' runtimes abort when their own mappings fail";
#else
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    alarm(30);  // a hang ends the child with SIGALRM
    rlimit original{};
    if (getrlimit(RLIMIT_AS, &original) != 0) _exit(10);
    long pages = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(f, "%ld", &pages) != 1) pages = 0;
      std::fclose(f);
    }
    if (pages <= 0) _exit(11);
    // Room for a few 8 MiB stacks beyond what the process maps now.
    rlimit capped = original;
    capped.rlim_cur = static_cast<rlim_t>(pages) * static_cast<rlim_t>(sysconf(_SC_PAGESIZE)) +
                      (rlim_t{64} << 20);
    if (setrlimit(RLIMIT_AS, &capped) != 0) _exit(12);
    try {
      ThreadPool pool(1000);
      _exit(13);  // 1000 stacks fit in 64 MiB: the cap did not hold
    } catch (const Error& e) {
      if (e.code() != Code::OutOfMemory) _exit(14);
      if (std::string(e.what()).find("cannot start the CPU backend's 1000 threads") ==
          std::string::npos)
        _exit(15);
    } catch (...) {
      _exit(16);
    }
    if (setrlimit(RLIMIT_AS, &original) != 0) _exit(17);
    ThreadPool pool(3);
    std::atomic<int> n{0};
    pool.parallel_for(10, [&](int64_t, unsigned) { n++; });
    _exit(n.load() == 10 ? 0 : 18);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "the child ended by signal "
                                 << (WIFSIGNALED(status) ? WTERMSIG(status) : 0)
                                 << " (SIGALRM: the pool hung)";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "see the child's exit codes in the test";
#endif
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
