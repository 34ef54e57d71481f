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
  // Runs the items of call `tag` that thread `worker` can claim (its own share first), until
  // none is left or an item failed.
  void run_items(unsigned worker, uint32_t tag);
  // Claims the next item of call `tag` from share `from` for thread `worker` (its own share
  // from the front, another's from the back); -1 when that share holds none of that call.
  int64_t claim(unsigned from, unsigned worker, uint32_t tag);
  // Polls done() until it holds or spin_ns_ has passed.
  template <class Done>
  void spin_until(Done&& done) const;

  // A call hands its items to the workers without the lock: it writes the shares, then the
  // generation; a worker that sees the generation announces itself (state), checks the
  // generation again and claims items. Each share carries its call's tag (the generation's low
  // 32 bits), so a worker that looked in late, after its call ended, can claim nothing of a
  // later one (unless it stalled between two of its instructions for 2^32 calls); and the caller
  // waits only for the workers that announced themselves. The lock and condition variables serve
  // only threads that stopped polling and sleep.
  static constexpr uint64_t kShareItems = 0xffff;  // a share's bounds are 16-bit
  static uint64_t pack(uint32_t tag, uint64_t begin, uint64_t end) {
    return uint64_t{tag} << 32 | begin << 16 | end;
  }
  // Per thread, one cache line each: its share of the current call ([begin, end) and the call's
  // tag, packed by pack()), and (workers) what it is doing: 2g + 1 while in call g, 2g once
  // out of it.
  struct alignas(64) Share {
    std::atomic<uint64_t> range{0};
  };
  struct alignas(64) State {
    std::atomic<uint64_t> at{0};
  };

  std::vector<std::thread> workers_;
  std::unique_ptr<Share[]> shares_;
  std::unique_ptr<State[]> states_;
  std::atomic<const std::function<void(int64_t, unsigned)>*> job_{nullptr};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> failed_{false};
  std::atomic<bool> stop_{false};
  std::mutex mu_;  // error_, and the sleeping threads' condition variables
  std::condition_variable wake_;
  std::condition_variable done_;
  std::atomic<unsigned> sleepers_{0};      // workers asleep on wake_
  std::atomic<bool> caller_waits_{false};  // the caller asleep on done_
  const bool may_spin_;                    // no more threads than the CPUs the process may run on
  std::atomic<int64_t> spin_ns_{0};
  std::exception_ptr error_;
};

}  // namespace moert::cpu
