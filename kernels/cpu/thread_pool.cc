#include "kernels/cpu/thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <exception>

#include "core/error.h"
#include "kernels/cpu/omp_guard.h"
#include "kernels/cpu/signal_guard.h"

namespace moert::cpu {
namespace {

// The CPUs this process may run on (its affinity mask, as a container or taskset limits it).
unsigned usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<unsigned>(CPU_COUNT(&set));
  return std::thread::hardware_concurrency();
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

ThreadPool::ThreadPool(unsigned threads) : may_spin_(threads <= usable_cpus()) {
  set_spin_wait(kDefaultSpinWaitUs);
  // A thread starts with its creator's mask: created under the scope, a worker never has the
  // asynchronous signals open, not even before its first instruction.
  const AsyncSignalScope no_signals;
  try {
    shares_ = std::make_unique<Share[]>(threads);
    workers_.reserve(threads);
    for (unsigned w = 1; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  } catch (const std::exception& e) {
    // The destructor does not run for a constructor that throws: the workers already started
    // would wait forever on a destroyed condition variable.
    const size_t started = workers_.size() + 1;
    stop_workers();
    fail(Code::OutOfMemory, "cannot start the CPU backend's ", threads, " threads (", started,
         " were running when starting the next failed: ", e.what(),
         "); ask for fewer threads or raise the process's limits");
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::set_spin_wait(int64_t microseconds) {
  spin_ns_.store(may_spin_ && microseconds > 0 ? microseconds * 1000 : 0,
                 std::memory_order_relaxed);
}

template <class Done>
void ThreadPool::spin_until(Done&& done) const {
  const int64_t ns = spin_ns_.load(std::memory_order_relaxed);
  if (ns <= 0) return;
  const auto end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(ns);
  for (;;) {
    // The clock is read every few microseconds, not on every poll.
    for (int i = 0; i < 64; ++i) {
      if (done()) return;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= end) return;
  }
}

void ThreadPool::stop_workers() noexcept {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

int64_t ThreadPool::claim(unsigned from, unsigned worker) {
  std::atomic<uint64_t>& range = shares_[from].range;
  uint64_t r = range.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t begin = r >> 32, end = r & 0xffffffffu;
    if (begin >= end) return -1;
    const bool own = from == worker;
    const uint64_t taken = own ? begin : end - 1;
    const uint64_t rest = own ? (begin + 1) << 32 | end : begin << 32 | (end - 1);
    if (range.compare_exchange_weak(r, rest, std::memory_order_relaxed))
      return static_cast<int64_t>(taken);
  }
}

void ThreadPool::run_items(unsigned worker, const std::function<void(int64_t, unsigned)>* job) {
  // A worker that woke after its call ended holds no job; the shares are reset only once every
  // thread that took the call's job has left it, so none can take an item of the next call.
  if (!job) return;
  const unsigned threads = size();
  for (unsigned k = 0; k < threads; ++k) {
    const unsigned from = (worker + k) % threads;
    for (;;) {
      if (failed_.load(std::memory_order_relaxed)) return;
      const int64_t i = claim(from, worker);
      if (i < 0) break;
      try {
        (*job)(i, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true, std::memory_order_relaxed);
      }
    }
  }
}

void ThreadPool::worker_loop(unsigned worker) {
  make_omp_serial();
  block_async_signals();
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int64_t, unsigned)>* job;
    // A hint only: what the job is, is read under the lock below.
    spin_until([&] {
      return stop_.load(std::memory_order_relaxed) ||
             generation_.load(std::memory_order_relaxed) != seen;
    });
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
      ++busy_;
    }
    run_items(worker, job);
    {
      std::lock_guard<std::mutex> lock(mu_);
      --busy_;
    }
    done_.notify_all();
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, unsigned)>& fn) {
  if (n <= 0) return;
  let_pending_signals_in();
  const SerialOmpScope serial;
  const AsyncSignalScope no_signals;
  if (workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  // A share's bounds are 32-bit: a call of more items runs as several (none does: items are
  // blocks of rows).
  constexpr int64_t kMostItems = 0xffffffff;
  if (n > kMostItems) {
    for (int64_t first = 0; first < n; first += kMostItems)
      parallel_for(std::min(kMostItems, n - first),
                   [&](int64_t i, unsigned w) { fn(first + i, w); });
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    const auto threads = static_cast<int64_t>(size());
    for (int64_t w = 0; w < threads; ++w) {
      const auto begin = static_cast<uint64_t>(n * w / threads),
                 end = static_cast<uint64_t>(n * (w + 1) / threads);
      shares_[w].range.store(begin << 32 | end, std::memory_order_relaxed);
    }
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  run_items(0, &fn);
  spin_until([&] { return busy_.load(std::memory_order_relaxed) == 0; });
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mu_);
    // Workers that woke late find no items left and leave at once, so waiting for busy_ == 0 after
    // every share is empty is enough.
    done_.wait(lock, [&] { return busy_ == 0; });
    job_ = nullptr;
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace moert::cpu
