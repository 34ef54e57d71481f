// A fixed pool of worker threads owned by one session. Work is split into items whose boundaries do
// not depend on the thread count, so results are identical whatever the pool size. Every item runs
// with OpenMP limited to its own thread (omp_guard.h): a GEMM inside an item is single-threaded,
// and the caller's thread gets its OpenMP setting back when parallel_for returns.
//
// Each thread first runs the items of its own contiguous share of a call, in order, and then
// takes the last remaining items of the others' shares. A thread so runs the same rows in
// consecutive calls over the same rows (a norm, then the router, then the next layer): on a
// small model most of what an item reads was written by the same core a moment before. Items
// claimed from one shared counter landed on either core: the main job's training then took
// 17 % more CPU time on 2 threads than on 1, nearly all of it inside the items.
//
// Between calls a worker polls for the next one for a while before it sleeps, and the caller
// polls for the workers' last items before it sleeps: a small model's training step makes a
// hundred calls a few microseconds apart, and a sleep and wake through the kernel costs tens of
// microseconds each (the spin_wait_us session option; OpenMP runtimes do the same, for longer).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace moert::cpu {

class ThreadPool {
 public:
  // threads >= 1; the calling thread counts as one, so threads - 1 workers are started. Throws
  // Error(OutOfMemory) when one cannot be started, with those already started stopped again.
  explicit ThreadPool(unsigned threads);
  // How long, in microseconds, a thread polls before it sleeps (see above); 0: it sleeps at once.
  // A pool with more threads than the process may run on never polls. Thread-safe; takes
  // effect from the next wait.
  void set_spin_wait(int64_t microseconds);
  static constexpr int64_t kDefaultSpinWaitUs = 50;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const { return static_cast<unsigned>(workers_.size()) + 1; }

  // Runs fn(i, worker) for i in [0, n), worker in [0, size()). Returns when all are done; the first
  // exception thrown by fn is rethrown here after the others finish. Not reentrant.
  void parallel_for(int64_t n, const std::function<void(int64_t, unsigned)>& fn);

 private:
  void stop_workers() noexcept;
  void worker_loop(unsigned worker);
  void run_items(unsigned worker, const std::function<void(int64_t, unsigned)>* job);
  // Claims the next item of share `from` for thread `worker` (its own share from the front,
  // another's from the back); -1 when that share is empty.
  int64_t claim(unsigned from, unsigned worker);
  // Polls done() until it holds or spin_ns_ has passed.
  template <class Done>
  void spin_until(Done&& done) const;

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t, unsigned)>* job_ = nullptr;
  // Thread w's share of the current call: [begin, end) packed as begin << 32 | end. Its owner
  // takes items from the front, the other threads from the back; both by compare-and-swap,
  // without the lock. One cache line each: the owner's claims do not disturb the others.
  struct alignas(64) Share {
    std::atomic<uint64_t> range{0};
  };
  std::unique_ptr<Share[]> shares_;
  std::atomic<bool> failed_{false};
  // Changed under mu_; the polls read them without it.
  std::atomic<uint64_t> generation_{0};
  std::atomic<unsigned> busy_{0};
  std::atomic<bool> stop_{false};
  const bool may_spin_;  // no more threads than the CPUs the process may run on
  std::atomic<int64_t> spin_ns_{0};
  std::exception_ptr error_;
};

}  // namespace moert::cpu
