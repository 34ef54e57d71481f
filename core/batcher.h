// Dynamic batching for inference: many threads call one Batcher at once, each with its own rows;
// the batcher gathers the requests that arrive within a bounded wait (and under a row cap) into
// one forward pass on one of a pool of inference sessions over the same model, then hands every
// caller exactly its own output rows and its own status.
//
// Why it pays: an MoE forward pass costs far less per row on many rows than on one (every
// expert's GEMM gets more rows), while a session runs one pass at a time.
//
// Exactness: rows do not interact in an inference pass of a token-choice MoE model (routing,
// norms and every GEMM are per row), so a request's outputs are those of a solo call up to the
// GEMMs' rounding, which depends on the row count of each call with oneDNN (the CPU backend's
// GEMMs): tests/capi/batcher_test.cc checks batched answers within 1e-5 per row of solo calls,
// and bit for bit where a pass carried one request. Expert Choice layers let experts pick tokens
// across the batch: models with one are never batched across requests (one request per pass).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/model.h"
#include "core/session.h"

namespace moert {

struct BatcherOptions {
  uint32_t sessions = 1;          // inference sessions in the pool, each with its own thread
  uint64_t max_batch_rows = 256;  // rows of one forward pass; also the largest request
  uint64_t max_wait_us = 0;       // how long a free session waits for more rows
  // The most rows waiting for a pass (0: no bound); a request that would queue more is refused
  // with Code::Limit at once, so that a service under overload sheds load instead of growing.
  uint64_t max_queued_rows = 0;
  SessionOptions session;  // options of every pool session (inference mode only)
};

// Per-request figures, indices of the caller's stats array (values match MOERT_REQUEST_*).
enum RequestStat : int {
  kStatQueueNs = 0,        // from entering the batcher to the start of its pass
  kStatRunNs = 1,          // the forward pass that carried the request
  kStatBatchRows = 2,      // rows of that pass
  kStatBatchRequests = 3,  // requests of that pass
  kStatSession = 4,        // pool index of the session that ran it
  kRequestStats = 5,
};

// Cumulative figures of a batcher (values match MOERT_BATCHER_*).
enum BatcherCounter : int {
  kCountRequests = 0,  // requests answered, failed ones included
  kCountFailed = 1,    // requests answered with an error (validation or the pass)
  kCountBatches = 2,   // forward passes run for batches
  kCountRows = 3,      // rows of those passes
  kCountQueueNs = 4,   // sum over answered requests of their queue time
  kCountRunNs = 5,     // sum over passes of their run time
  kCountIsolated = 6,  // batches that failed and were rerun request by request
  kBatcherCounters = 7,
};

// The answer to a request submitted with submit_*(): `error` null on success; `out` (out_len
// floats) and `stats` (kRequestStats figures) are valid only during the call. Runs on one of the
// batcher's threads (or, for requests still queued when the batcher is destroyed, on the
// destroying thread) and must not throw.
using BatcherCallback = std::function<void(std::exception_ptr error, const float* out,
                                           uint64_t out_len, const int64_t* stats)>;

class Batcher {
 public:
  // Creates the pool's sessions and their threads. Throws InvalidArgument for options it cannot
  // serve (training mode, zero sessions or rows) and whatever session creation throws.
  Batcher(std::shared_ptr<const Model> model, const BatcherOptions& options);
  // Stops the pool's threads. Requests still queued (a caller racing the destruction, which the
  // ABI forbids) are answered with InvalidState.
  ~Batcher();
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // One request: validated in the calling thread (sizes, row cap, token range, finiteness), then
  // queued; returns when its pass is done, or throws the request's own error. `stats` (may be
  // null) receives min(stats_len, kRequestStats) figures; entries past those are set to -1.
  void forward_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows, float* out,
                      uint64_t out_len, int64_t* stats, uint64_t stats_len);
  void forward_hidden(const float* in, uint64_t in_len, uint64_t rows, float* out, uint64_t out_len,
                      int64_t* stats, uint64_t stats_len);

  // One request that returns at once: validated in the calling thread as forward_*() (a bad
  // request throws and `done` is never called), its input copied, then queued; `done` is called
  // exactly once, when its pass is over. A caller waiting for many requests need not hold a
  // thread for each (an event loop, goroutines parked on channels, futures).
  void submit_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows,
                     BatcherCallback done);
  void submit_hidden(const float* in, uint64_t in_len, uint64_t rows, BatcherCallback done);

  // min(len, kBatcherCounters) counters into out; entries past those are set to -1.
  void counters(int64_t* out, uint64_t len) const;
  // Whether the calling thread is one of this batcher's pool threads (running one of its
  // callbacks, or one of another batcher's that a callback of this one freed), which the
  // destructor would have to join.
  bool serving_on_this_thread() const;

  const BatcherOptions& options() const { return options_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Request {
    const void* input = nullptr;  // caller memory valid until the request is done, or `owned`
    uint64_t rows = 0;
    float* out = nullptr;  // a waiting caller's output; null for a submitted request
    // A submitted request: its input, its callback, and where its answer lies once computed (the
    // worker's batch output, or `result` after a rerun alone).
    std::vector<unsigned char> owned;
    BatcherCallback done_callback;
    const float* answer = nullptr;
    std::vector<float> result;
    Clock::time_point enqueued;
    int64_t stats[kRequestStats] = {};
    std::exception_ptr error;
    bool done = false;
    std::condition_variable cv;
    Request* next = nullptr;  // the next request of its batch: a worker allocates nothing
  };
  struct Worker {
    std::unique_ptr<Session> session;
    std::vector<int32_t> tokens;  // the gathered input of a batch
    std::vector<float> hidden;
    std::vector<float> out;  // the batch's output, also submitted requests' answers
    std::thread thread;
  };

  void check_rows(uint64_t rows) const;
  void check_out(uint64_t rows, const float* out, uint64_t out_len) const;
  static void check_stats(const int64_t* stats, uint64_t stats_len);
  void check_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows) const;
  void check_hidden(const float* in, uint64_t in_len, uint64_t rows) const;
  // Counts a request refused before it was queued, and rethrows its error.
  [[noreturn]] void refuse();
  void submit(Request& r, int64_t* stats, uint64_t stats_len);
  // A submitted request: check() validates it, then `bytes` of `input` are copied and queued.
  void submit_copy(const std::function<void()>& check, const void* input, size_t bytes,
                   uint64_t rows, BatcherCallback done);
  void enqueue(std::unique_ptr<Request> r);
  // Under mu_: refuses (and counts) a request of `rows` rows the queue has no room for.
  void check_room(uint64_t rows);
  // Calls a submitted request's callback and deletes it.
  void answer(Request* r) const noexcept;
  void serve(size_t index);
  // Runs one batch (`first` and its `next` chain, `count` requests, `rows` rows) on session
  // `index`; returns the nanoseconds spent. Never throws: every error lands in its request.
  int64_t run(size_t index, Request* first, size_t count, uint64_t rows) noexcept;
  void run_one(Session& s, const void* input, uint64_t rows, float* out);

  std::shared_ptr<const Model> model_;
  BatcherOptions options_;
  bool batch_requests_ = true;  // false for Expert Choice models
  uint32_t vocab_ = 0;          // token models: ids are in [0, vocab_)
  std::vector<Worker> workers_;

  mutable std::mutex mu_;
  std::condition_variable work_;
  std::deque<Request*> queue_;
  uint64_t queued_rows_ = 0;
  bool stop_ = false;
  int64_t counts_[kBatcherCounters] = {};
};

}  // namespace moert
