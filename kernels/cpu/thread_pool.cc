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
    states_ = std::make_unique<State[]>(threads);
    workers_.reserve(threads);
    for (unsigned w = 1; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  } catch (const std::exception& e) {
    // The destructor does not run for a constructor that throws: the workers already started
    // would poll a destroyed pool.
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
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

int64_t ThreadPool::claim(unsigned from, unsigned worker, uint32_t tag) {
  std::atomic<uint64_t>& range = shares_[from].range;
  uint64_t r = range.load();
  for (;;) {
    const uint64_t begin = r >> 16 & kShareItems, end = r & kShareItems;
    if (static_cast<uint32_t>(r >> 32) != tag || begin >= end) return -1;
    const bool own = from == worker;
    const uint64_t taken = own ? begin : end - 1;
    if (range.compare_exchange_weak(r, own ? pack(tag, begin + 1, end) : pack(tag, begin, end - 1)))
      return static_cast<int64_t>(taken);
  }
}

void ThreadPool::run_items(unsigned worker, uint32_t tag) {
  const unsigned threads = size();
  for (unsigned k = 0; k < threads; ++k) {
    const unsigned from = (worker + k) % threads;
    for (;;) {
      if (failed_.load(std::memory_order_relaxed)) return;
      const int64_t i = claim(from, worker, tag);
      if (i < 0) break;
      // Read only once an item of this call is claimed: the call cannot have ended, so its
      // function is still the one published with it.
      const auto* job = job_.load(std::memory_order_acquire);
      try {
        (*job)(i, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true);
      }
    }
  }
}

void ThreadPool::worker_loop(unsigned worker) {
  make_omp_serial();
  block_async_signals();
  uint64_t seen = 0;
  for (;;) {
    spin_until([&] { return stop_.load(std::memory_order_relaxed) || generation_.load() != seen; });
    uint64_t g = generation_.load();
    if (g == seen && !stop_.load()) {
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);
      // Checked after counting itself a sleeper: a call that published its generation before
      // saw the count (and wakes it through the lock), or this sees the generation.
      while (!stop_.load() && (g = generation_.load()) == seen) wake_.wait(lock);
      sleepers_.fetch_sub(1);
    }
    if (stop_.load()) return;
    seen = g;
    // In the call, announced before its generation is read again: the caller, once every share
    // is closed, waits for the workers it sees in its call. One that announces itself later
    // finds the shares closed or tagged for a later call, and claims nothing.
    states_[worker].at.store(2 * g + 1);
    if (generation_.load() == g) run_items(worker, static_cast<uint32_t>(g));
    states_[worker].at.store(2 * g);
    if (caller_waits_.load()) {
      std::lock_guard<std::mutex> lock(mu_);
      done_.notify_all();
    }
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
  // A share's bounds are 16-bit: a call of more items runs as several (items are blocks of rows
  // or elements; a call this large does enough work per item for the few extra calls).
  constexpr auto kMostItems = static_cast<int64_t>(kShareItems);
  if (n > kMostItems) {
    for (int64_t first = 0; first < n; first += kMostItems)
      parallel_for(std::min(kMostItems, n - first),
                   [&](int64_t i, unsigned w) { fn(first + i, w); });
    return;
  }
  const uint64_t g = generation_.load(std::memory_order_relaxed) + 1;
  const auto tag = static_cast<uint32_t>(g);
  const auto threads = static_cast<int64_t>(size());
  job_.store(&fn, std::memory_order_relaxed);
  failed_.store(false, std::memory_order_relaxed);
  for (int64_t w = 0; w < threads; ++w)
    shares_[w].range.store(pack(tag, static_cast<uint64_t>(n * w / threads),
                                static_cast<uint64_t>(n * (w + 1) / threads)),
                           std::memory_order_relaxed);
  generation_.store(g);  // publishes the above
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    wake_.notify_all();
  }
  run_items(0, tag);
  // Closed: no item of this call can be claimed from here on (after a failure some are left).
  for (int64_t w = 0; w < threads; ++w) shares_[w].range.store(pack(tag, 0, 0));
  // Every worker that announced itself in this call is waited for; those that did not yet can
  // claim nothing of it.
  for (size_t w = 1; w < static_cast<size_t>(threads); ++w) {
    auto in_call = [&] { return states_[w].at.load() == 2 * g + 1; };
    if (!in_call()) continue;
    spin_until([&] { return !in_call(); });
    if (!in_call()) continue;
    std::unique_lock<std::mutex> lock(mu_);
    caller_waits_.store(true);
    while (in_call()) done_.wait(lock);
    caller_waits_.store(false);
  }
  if (failed_.load()) {
    std::exception_ptr error;
    {
      std::lock_guard<std::mutex> lock(mu_);
      error = error_;
      error_ = nullptr;
    }
    if (error) std::rethrow_exception(error);
  }
}

}  // namespace moert::cpu
