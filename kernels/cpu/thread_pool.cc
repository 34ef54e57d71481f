#include "kernels/cpu/thread_pool.h"

#include "kernels/cpu/omp_guard.h"

namespace moert::cpu {

ThreadPool::ThreadPool(unsigned threads) {
  for (unsigned w = 1; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_items(unsigned worker) {
  for (;;) {
    int64_t i;
    const std::function<void(int64_t, unsigned)>* job;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (next_ >= job_size_ || error_) return;
      i = next_++;
      job = job_;
    }
    try {
      (*job)(i, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::worker_loop(unsigned worker) {
  make_omp_serial();
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      ++busy_;
    }
    run_items(worker);
    {
      std::lock_guard<std::mutex> lock(mu_);
      --busy_;
    }
    done_.notify_all();
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, unsigned)>& fn) {
  if (n <= 0) return;
  const SerialOmpScope serial;
  if (workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    job_size_ = n;
    next_ = 0;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  run_items(0);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mu_);
    // Workers that woke late find no items left and leave at once, so waiting for busy_ == 0 after
    // the counter is exhausted is enough.
    done_.wait(lock, [&] { return busy_ == 0; });
    job_ = nullptr;
    job_size_ = 0;
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace moert::cpu
