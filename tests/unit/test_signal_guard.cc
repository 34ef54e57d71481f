// The host's signals and the CPU backend's GEMMs (kernels/cpu/signal_guard.h): oneDNN's generated
// GEMM kernels must never take a signal, and the caller's own signal mask survives every call.
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/time.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kernels/cpu/gemm.h"
#include "kernels/cpu/signal_guard.h"
#include "kernels/cpu/thread_pool.h"

namespace moert::cpu {
namespace {

sigset_t current_mask() {
  sigset_t s;
  pthread_sigmask(SIG_SETMASK, nullptr, &s);
  return s;
}

bool same_mask(const sigset_t& a, const sigset_t& b) {
  for (int s = 1; s < SIGRTMIN; ++s)
    if (sigismember(&a, s) != sigismember(&b, s)) return false;
  return true;
}

// Asynchronous signals are closed inside the work, synchronous ones open.
bool work_mask_ok(const sigset_t& s) {
  for (int sig : {SIGPROF, SIGINT, SIGTERM, SIGURG, SIGUSR1, SIGALRM, SIGCHLD})
    if (!sigismember(&s, sig)) return false;
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL})
    if (sigismember(&s, sig)) return false;
  return true;
}

TEST(SignalGuard, WorkItemsTakeNoAsynchronousSignalsAndTheCallersMaskSurvives) {
  const sigset_t original = current_mask();
  // A host mask of its own: SIGUSR2 blocked, SIGPROF open.
  sigset_t host = original;
  sigaddset(&host, SIGUSR2);
  sigdelset(&host, SIGPROF);
  pthread_sigmask(SIG_SETMASK, &host, nullptr);
  for (unsigned threads : {1u, 2u, 4u}) {
    ThreadPool pool(threads);
    std::atomic<int> wrong{0};
    pool.parallel_for(64, [&](int64_t, unsigned) {
      if (!work_mask_ok(current_mask())) wrong++;
    });
    EXPECT_EQ(wrong.load(), 0) << threads << " threads";
    EXPECT_TRUE(same_mask(current_mask(), host)) << threads << " threads";
    EXPECT_THROW(pool.parallel_for(4, [](int64_t, unsigned) { throw std::runtime_error("x"); }),
                 std::runtime_error);
    EXPECT_TRUE(same_mask(current_mask(), host)) << "after a throwing item, " << threads;
  }
  {
    const AsyncSignalScope outer;
    EXPECT_TRUE(work_mask_ok(current_mask()));
    {
      const AsyncSignalScope inner;
      EXPECT_TRUE(work_mask_ok(current_mask()));
    }
    EXPECT_TRUE(work_mask_ok(current_mask())) << "an inner scope reopened the signals";
  }
  EXPECT_TRUE(same_mask(current_mask(), host));
  pthread_sigmask(SIG_SETMASK, &original, nullptr);
}

std::atomic<long> profiler_ticks{0};
void on_profiler_tick(int) { profiler_ticks.fetch_add(1, std::memory_order_relaxed); }

// The failure this guards against, as a host meets it: a profiler's SIGPROF timer (Go's pprof,
// async-profiler) while several threads run GEMMs. Before the guard this corrupted the heap within
// a second on an AVX2 machine (glibc aborted with "corrupted size vs. prev_size"); now every
// product stays bitwise what it was without signals.
std::atomic<int> g_usr1{0};
void count_usr1(int) { g_usr1.fetch_add(1); }

// A stretch of work (a single-process pass: Session::run_from) blocks the signals once, and a
// parallel_for that starts 10 ms or more after they were last open lets the pending ones in on
// the caller's own stack, then blocks them again; the caller's mask survives the stretch. A
// thread the library owns never opens them.
TEST(SignalGuard, AStretchOfWorkLetsPendingSignalsInEvery10Ms) {
  struct sigaction act {
  }, old{};
  act.sa_handler = count_usr1;
  sigemptyset(&act.sa_mask);
  ASSERT_EQ(sigaction(SIGUSR1, &act, &old), 0);
  const sigset_t original = current_mask();
  ThreadPool pool(2);
  g_usr1 = 0;
  block_async_signals_for_now();
  EXPECT_TRUE(work_mask_ok(current_mask()));
  pthread_kill(pthread_self(), SIGUSR1);
  pool.parallel_for(4, [](int64_t, unsigned) {});
  EXPECT_EQ(g_usr1.load(), 0) << "delivered inside the stretch's first 10 ms";
  std::this_thread::sleep_for(std::chrono::milliseconds(15));
  EXPECT_EQ(g_usr1.load(), 0) << "delivered while blocked";
  pool.parallel_for(4, [](int64_t, unsigned) {});
  EXPECT_EQ(g_usr1.load(), 1) << "still pending 15 ms into the stretch";
  EXPECT_TRUE(work_mask_ok(current_mask())) << "not blocked again after letting it in";
  restore_async_signals();
  EXPECT_TRUE(same_mask(current_mask(), original));

  int owned_got = -1;
  std::thread([&] {
    block_async_signals();
    pthread_kill(pthread_self(), SIGUSR1);
    std::this_thread::sleep_for(std::chrono::milliseconds(15));
    let_pending_signals_in();
    owned_got = g_usr1.load() - 1;
    // Taken from the pending set without a handler run, so that it does not outlive the thread.
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    const timespec now{};
    sigtimedwait(&usr1, nullptr, &now);
  }).join();
  EXPECT_EQ(owned_got, 0) << "a thread the library owns let a signal in";
  sigaction(SIGUSR1, &old, nullptr);
}

TEST(SignalGuard, GemmsOnSeveralThreadsSurviveAProfilerTimer) {
  constexpr int64_t n = 256, k = 512;
  const int64_t shapes[] = {8, 16, 64};
  std::vector<float> w(n * k), x(64 * k);
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.01f * static_cast<float>(i));
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.02f * static_cast<float>(i));
  std::vector<std::vector<float>> reference;
  for (int64_t m : shapes) {
    reference.emplace_back(m * n);
    sgemm(false, true, m, n, k, x.data(), k, w.data(), k, reference.back().data(), n, false);
  }

  struct sigaction action = {}, previous = {};
  action.sa_handler = on_profiler_tick;
  action.sa_flags = SA_RESTART;
  sigemptyset(&action.sa_mask);
  ASSERT_EQ(sigaction(SIGPROF, &action, &previous), 0);
  const itimerval every_100us{{0, 100}, {0, 100}}, off{};
  ASSERT_EQ(setitimer(ITIMER_PROF, &every_100us, nullptr), 0);

  std::atomic<int> mismatches{0};
  std::atomic<long> products{0};
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  auto host_thread = [&](bool through_pool) {
    ThreadPool pool(2);
    while (std::chrono::steady_clock::now() < until) {
      auto one = [&](int64_t item, unsigned) {
        const size_t s = static_cast<size_t>(item) % std::size(shapes);
        const int64_t m = shapes[s];
        std::vector<float> c(m * n);
        sgemm(false, true, m, n, k, x.data(), k, w.data(), k, c.data(), n, false);
        if (c != reference[s]) mismatches++;
        products++;
      };
      if (through_pool)
        pool.parallel_for(6, one);
      else
        for (int64_t i = 0; i < 6; ++i) one(i, 0);  // the host's own thread, outside any pool
    }
  };
  std::thread a(host_thread, true), b(host_thread, true), c(host_thread, false);
  a.join();
  b.join();
  c.join();
  setitimer(ITIMER_PROF, &off, nullptr);
  sigaction(SIGPROF, &previous, nullptr);

  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_GT(products.load(), 100);
  // The timer did fire; the signals went to this thread, which waited in join().
  EXPECT_GT(profiler_ticks.load(), 0);
  std::printf("%ld products on 3 host threads (two with a pool of 2), %ld profiler signals\n",
              products.load(), profiler_ticks.load());
}

}  // namespace
}  // namespace moert::cpu
