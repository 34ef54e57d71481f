#include "core/batcher.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "kernels/cpu/signal_guard.h"

namespace moert {
namespace {

// The batcher whose callback this thread is running, if any: a blocking request from there
// would wait for a pass that its own thread must run.
thread_local const Batcher* answering = nullptr;
// The batcher whose pool this thread serves, if any: its destructor would have to join it.
thread_local const Batcher* serving = nullptr;

// A session forward pass takes its row count as int32 (BLAS); a batch must fit.
constexpr uint64_t kMaxBatchRows = 1u << 20;
constexpr uint64_t kMaxQueuedRows = uint64_t{1} << 40;

int64_t ns_between(std::chrono::steady_clock::time_point a,
                   std::chrono::steady_clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count();
}

void copy_figures(const int64_t* from, int known, int64_t* to, uint64_t len) {
  if (!to) return;
  for (uint64_t i = 0; i < len; ++i) to[i] = i < static_cast<uint64_t>(known) ? from[i] : -1;
}

}  // namespace

Batcher::Batcher(std::shared_ptr<const Model> model, const BatcherOptions& options)
    : model_(std::move(model)), options_(options) {
  model_->require_weights("serve requests");
  if (options_.sessions < 1 || options_.sessions > 256)
    fail(Code::InvalidArgument, "sessions must be between 1 and 256, got ", options_.sessions);
  if (options_.max_batch_rows < 1 || options_.max_batch_rows > kMaxBatchRows)
    fail(Code::InvalidArgument, "max_batch_rows must be between 1 and ", kMaxBatchRows, ", got ",
         options_.max_batch_rows);
  if (options_.max_wait_us > 1'000'000)
    fail(Code::InvalidArgument, "max_wait_us must be at most 1000000 (1 s), got ",
         options_.max_wait_us);
  if (options_.max_queued_rows > kMaxQueuedRows)
    fail(Code::InvalidArgument, "max_queued_rows must be at most ", kMaxQueuedRows, ", got ",
         options_.max_queued_rows);
  if (options_.max_queued_rows != 0 && options_.max_queued_rows < options_.max_batch_rows)
    fail(Code::InvalidArgument, "max_queued_rows ", options_.max_queued_rows,
         " is below max_batch_rows ", options_.max_batch_rows,
         ": a request of max_batch_rows rows could never be queued");
  if (options_.session.comm)
    fail(Code::InvalidArgument,
         "a batcher's sessions run alone: its session options must not carry a communicator "
         "(each pool session would run its own passes among the ranks at once)");
  if (options_.session.mode != Mode::Inference)
    fail(Code::InvalidArgument,
         "a batcher runs inference sessions: its session options must not ask for training mode");
  for (const auto& l : model_->layers)
    if (const auto* m = std::get_if<MoESpec>(&l.spec))
      if (m->balancing.policy == BalancingPolicy::ExpertChoice) batch_requests_ = false;
  if (model_->token_input) vocab_ = std::get<EmbeddingSpec>(model_->layers[0].spec).vocab_size;

  // Sessions first: if one cannot be created, no thread has started yet.
  workers_.resize(options_.sessions);
  for (size_t i = 0; i < workers_.size(); ++i) {
    try {
      workers_[i].session = std::make_unique<Session>(model_, options_.session);
    } catch (const Error& e) {
      // Which of the pool's sessions failed: a limit is reached by the pool as a whole.
      fail(e.code(), "the batcher's session ", i + 1, " of ", workers_.size(), ": ", e.message());
    }
  }
  const cpu::AsyncSignalScope no_signals;  // the threads start with it (thread_pool.cc)
  try {
    for (size_t i = 0; i < workers_.size(); ++i)
      workers_[i].thread = std::thread([this, i] { serve(i); });
  } catch (const std::exception& e) {
    size_t started = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_.notify_all();
    for (auto& w : workers_)
      if (w.thread.joinable()) {
        w.thread.join();
        ++started;
      }
    fail(Code::OutOfMemory, "cannot start the batcher's ", workers_.size(), " serving threads (",
         started, " were running when starting the next failed: ", e.what(),
         "); ask for fewer sessions or raise the process's limits");
  }
}

Batcher::~Batcher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_.notify_all();
  for (auto& w : workers_)
    if (w.thread.joinable()) w.thread.join();
  Request* submitted = nullptr;  // relinked through `next`
  Request** tail = &submitted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Request* r : queue_) {
      r->error = std::make_exception_ptr(Error(Code::InvalidState, "the batcher was freed"));
      // No pass ran it: its figures are unknown.
      std::fill(std::begin(r->stats), std::end(r->stats), -1);
      ++counts_[kCountRequests];
      ++counts_[kCountFailed];
      if (r->done_callback) {
        r->next = nullptr;
        *tail = r;
        tail = &r->next;
        continue;
      }
      r->done = true;
      r->cv.notify_one();
    }
    queue_.clear();
  }
  // Outside the lock: a callback may call into the batcher (and be refused).
  while (submitted) {
    Request* next = submitted->next;
    answer(submitted);
    submitted = next;
  }
}

void Batcher::check_rows(uint64_t rows) const {
  if (rows == 0) fail(Code::InvalidArgument, "rows must be at least 1");
  if (rows > options_.max_batch_rows)
    fail(Code::InvalidArgument, "rows = ", rows,
         " exceeds the batcher's max_batch_rows = ", options_.max_batch_rows);
}

bool Batcher::serving_on_this_thread() const { return serving == this; }

void Batcher::check_out(uint64_t rows, const float* out, uint64_t out_len) const {
  // Only blocking requests have an output buffer: from one of this batcher's callbacks, such a
  // request would wait for a pass that its own thread must run.
  if (answering == this)
    fail(Code::InvalidState,
         "a blocking request from inside one of this batcher's callbacks would wait for a pass "
         "its own thread must run: submit it instead");
  if (!out) fail(Code::InvalidArgument, "out is NULL");
  check_rows(rows);
  if (out_len != rows * model_->output_width)
    fail(Code::InvalidArgument, "output buffer holds ", out_len, " floats but ", rows,
         " rows of width ", model_->output_width, " need ", rows * model_->output_width);
}

void Batcher::check_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows) const {
  if (!model_->token_input)
    fail(Code::InvalidArgument,
         "this model takes hidden states (its first layer is not an Embedding): use "
         "forward_hidden");
  check_rows(rows);  // first: a caller's empty slice may come as NULL
  if (!tokens) fail(Code::InvalidArgument, "tokens is NULL");
  const uint64_t width = model_->input_width;
  if (num_tokens != rows * width)
    fail(Code::InvalidArgument, "token buffer holds ", num_tokens, " ids but ", rows, " rows of ",
         width, " tokens need ", rows * width);
  for (uint64_t i = 0; i < num_tokens; ++i)
    if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= vocab_)
      fail(Code::InvalidArgument, "token id ", tokens[i], " at row ", i / width, ", column ",
           i % width, " is outside the vocabulary [0, ", vocab_, ")");
}

void Batcher::check_hidden(const float* in, uint64_t in_len, uint64_t rows) const {
  if (model_->token_input)
    fail(Code::InvalidArgument,
         "this model takes token ids (its first layer is an Embedding): use forward_tokens");
  check_rows(rows);  // first: a caller's empty slice may come as NULL
  if (!in) fail(Code::InvalidArgument, "in is NULL");
  const uint64_t width = model_->input_width;
  if (in_len != rows * width)
    fail(Code::InvalidArgument, "input buffer holds ", in_len, " floats but ", rows,
         " rows of width ", width, " need ", rows * width);
  if (options_.session.check_finite)
    for (uint64_t i = 0; i < in_len; ++i)
      if (!std::isfinite(in[i]))
        fail(Code::Numeric, "input holds a NaN or infinity at row ", i / width, ", column ",
             i % width);
}

void Batcher::refuse() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++counts_[kCountRequests];
    ++counts_[kCountFailed];
  }
  throw;
}

void Batcher::check_stats(const int64_t* stats, uint64_t stats_len) {
  if (!stats && stats_len != 0)
    fail(Code::InvalidArgument, "stats is NULL but stats_len is ", stats_len);
}

void Batcher::forward_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows, float* out,
                             uint64_t out_len, int64_t* stats, uint64_t stats_len) {
  Request r;
  try {
    check_tokens(tokens, num_tokens, rows);
    check_out(rows, out, out_len);
    check_stats(stats, stats_len);
  } catch (...) {
    refuse();
  }
  r.input = tokens;
  r.rows = rows;
  r.out = out;
  submit(r, stats, stats_len);
}

void Batcher::forward_hidden(const float* in, uint64_t in_len, uint64_t rows, float* out,
                             uint64_t out_len, int64_t* stats, uint64_t stats_len) {
  Request r;
  try {
    check_hidden(in, in_len, rows);
    check_out(rows, out, out_len);
    check_stats(stats, stats_len);
  } catch (...) {
    refuse();
  }
  r.input = in;
  r.rows = rows;
  r.out = out;
  submit(r, stats, stats_len);
}

void Batcher::submit_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows,
                            BatcherCallback done) {
  submit_copy([&] { check_tokens(tokens, num_tokens, rows); }, tokens, num_tokens * sizeof(int32_t),
              rows, std::move(done));
}

void Batcher::submit_hidden(const float* in, uint64_t in_len, uint64_t rows, BatcherCallback done) {
  submit_copy([&] { check_hidden(in, in_len, rows); }, in, in_len * sizeof(float), rows,
              std::move(done));
}

void Batcher::submit_copy(const std::function<void()>& check, const void* input, size_t bytes,
                          uint64_t rows, BatcherCallback done) {
  auto r = std::make_unique<Request>();
  try {
    if (!done) fail(Code::InvalidArgument, "done (the callback) is NULL");
    check();
    r->owned.resize(bytes);
  } catch (...) {
    refuse();
  }
  std::memcpy(r->owned.data(), input, bytes);
  r->input = r->owned.data();
  r->rows = rows;
  r->done_callback = std::move(done);
  enqueue(std::move(r));
}

void Batcher::check_room(uint64_t rows) {
  if (options_.max_queued_rows == 0 || queued_rows_ + rows <= options_.max_queued_rows) return;
  ++counts_[kCountRequests];
  ++counts_[kCountFailed];
  fail(Code::Limit, "the batcher's queue holds ", queued_rows_, " rows waiting for a pass and ",
       rows, " more would pass its max_queued_rows = ", options_.max_queued_rows,
       ": the request is refused (retry later, or serve with more sessions)");
}

void Batcher::enqueue(std::unique_ptr<Request> r) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) fail(Code::InvalidState, "the batcher is being freed");
  check_room(r->rows);
  r->enqueued = Clock::now();
  queued_rows_ += r->rows;
  queue_.push_back(r.release());
  work_.notify_one();
}

void Batcher::answer(Request* r) const noexcept {
  const std::unique_ptr<Request> owner(r);
  // The callback's runtime may open signals on this thread (a JVM attaching it does): they must
  // be closed again before the thread's next pass runs a GEMM (signal_guard.h).
  const cpu::KeepSignalMask mask;
  // Callbacks that moert_batcher_free runs are on the host's thread: block the signals there too.
  const cpu::AsyncSignalScope no_signals;
  const Batcher* const outer = answering;
  answering = this;
  try {
    if (r->error)
      r->done_callback(r->error, nullptr, 0, r->stats);
    else
      r->done_callback(nullptr, r->answer, r->rows * model_->output_width, r->stats);
  } catch (...) {
    // A callback must not throw (batcher.h); the worker thread carries on regardless.
  }
  answering = outer;
}

void Batcher::submit(Request& r, int64_t* stats, uint64_t stats_len) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stop_) fail(Code::InvalidState, "the batcher is being freed");
  check_room(r.rows);
  r.enqueued = Clock::now();
  queue_.push_back(&r);
  queued_rows_ += r.rows;
  work_.notify_one();
  r.cv.wait(lock, [&] { return r.done; });
  // The worker is done with r: it notified under the lock, which this thread now holds.
  if (r.error) std::rethrow_exception(r.error);
  copy_figures(r.stats, kRequestStats, stats, stats_len);
}

void Batcher::counters(int64_t* out, uint64_t len) const {
  std::lock_guard<std::mutex> lock(mu_);
  copy_figures(counts_, kBatcherCounters, out, len);
}

void Batcher::serve(size_t index) {
  serving = this;
  cpu::block_async_signals();  // the host's signals go to the host's threads (signal_guard.h)
  const auto max_wait = std::chrono::microseconds(options_.max_wait_us);
  const uint64_t cap = options_.max_batch_rows;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    // Gather: wait, at most max_wait from the oldest queued request's arrival, for a full batch.
    while (batch_requests_ && !stop_ && !queue_.empty() && queued_rows_ < cap) {
      const auto deadline = queue_.front()->enqueued + max_wait;
      if (Clock::now() >= deadline) break;
      work_.wait_until(lock, deadline);
    }
    if (stop_) return;
    if (queue_.empty()) continue;  // another session took them
    // Whole requests, oldest first, while they fit under the cap (the first always does).
    Request* first = queue_.front();
    Request* last = first;
    queue_.pop_front();
    size_t count = 1;
    uint64_t rows = first->rows;
    while (batch_requests_ && !queue_.empty() && rows + queue_.front()->rows <= cap) {
      last->next = queue_.front();
      last = last->next;
      queue_.pop_front();
      rows += last->rows;
      ++count;
    }
    last->next = nullptr;
    queued_rows_ -= rows;
    // What is left is another session's to take.
    if (!queue_.empty()) work_.notify_one();
    lock.unlock();
    const int64_t run_ns = run(index, first, count, rows);
    lock.lock();
    // The batch's submitted requests, relinked through `next` in batch order.
    Request* submitted = nullptr;
    Request** tail = &submitted;
    for (Request* r = first; r;) {
      Request* next = r->next;
      ++counts_[kCountRequests];
      if (r->error) ++counts_[kCountFailed];
      counts_[kCountQueueNs] += r->stats[kStatQueueNs];
      if (r->done_callback) {
        r->next = nullptr;
        *tail = r;
        tail = &r->next;
      } else {
        r->done = true;
        // Under the lock: the caller cannot return (and destroy r) before this completes.
        r->cv.notify_one();
      }
      r = next;
    }
    ++counts_[kCountBatches];
    counts_[kCountRows] += static_cast<int64_t>(rows);
    counts_[kCountRunNs] += run_ns;
    if (!submitted) continue;
    // Outside the lock, before the next pass reuses the answers' buffer: a callback may submit
    // again, and the other sessions keep serving meanwhile.
    lock.unlock();
    while (submitted) {
      Request* next = submitted->next;
      answer(submitted);
      submitted = next;
    }
    lock.lock();
  }
}

void Batcher::run_one(Session& s, const void* input, uint64_t rows, float* out) {
  const uint64_t in_len = rows * model_->input_width;
  const uint64_t out_len = rows * model_->output_width;
  // As a C call on the session: "kept_work_bytes" of the batcher's session options applies.
  s.call([&] {
    if (model_->token_input)
      s.forward_tokens(static_cast<const int32_t*>(input), in_len, rows, out, out_len);
    else
      s.forward_hidden(static_cast<const float*>(input), in_len, rows, out, out_len);
  });
}

int64_t Batcher::run(size_t index, Request* first, size_t count, uint64_t rows) noexcept {
  Worker& w = workers_[index];
  Session& s = *w.session;
  const auto start = Clock::now();
  for (Request* r = first; r; r = r->next) {
    r->stats[kStatQueueNs] = ns_between(r->enqueued, start);
    r->stats[kStatBatchRows] = static_cast<int64_t>(rows);
    r->stats[kStatBatchRequests] = static_cast<int64_t>(count);
    r->stats[kStatSession] = static_cast<int64_t>(index);
  }
  const size_t in_w = model_->input_width, out_w = model_->output_width;
  bool isolate = false;
  try {
    const auto device = s.use_device();
    if (count == 1 && first->out) {
      // Nothing to gather: the caller's buffers serve directly.
      run_one(s, first->input, rows, first->out);
    } else if (count == 1) {
      w.out.resize(rows * out_w);
      run_one(s, first->input, rows, w.out.data());
      first->answer = w.out.data();
    } else {
      const void* input;
      if (model_->token_input) {
        w.tokens.resize(rows * in_w);
        size_t at = 0;
        for (const Request* r = first; r; r = r->next) {
          std::memcpy(w.tokens.data() + at, r->input, r->rows * in_w * sizeof(int32_t));
          at += r->rows * in_w;
        }
        input = w.tokens.data();
      } else {
        w.hidden.resize(rows * in_w);
        size_t at = 0;
        for (const Request* r = first; r; r = r->next) {
          std::memcpy(w.hidden.data() + at, r->input, r->rows * in_w * sizeof(float));
          at += r->rows * in_w;
        }
        input = w.hidden.data();
      }
      w.out.resize(rows * out_w);
      run_one(s, input, rows, w.out.data());
      size_t at = 0;
      for (Request* r = first; r; r = r->next) {
        if (r->out)
          std::memcpy(r->out, w.out.data() + at, r->rows * out_w * sizeof(float));
        else
          r->answer = w.out.data() + at;
        at += r->rows * out_w;
      }
    }
  } catch (...) {
    // A pass can fail on what no request shows alone (a result that overflows, memory for the
    // whole batch): each request is rerun by itself so that it gets its own answer and status.
    if (count == 1)
      first->error = std::current_exception();
    else
      isolate = true;
  }
  const int64_t run_ns = ns_between(start, Clock::now());
  for (Request* r = first; r; r = r->next) r->stats[kStatRunNs] = run_ns;
  if (!isolate) return run_ns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++counts_[kCountIsolated];
  }
  for (Request* r = first; r; r = r->next) {
    const auto solo = Clock::now();
    try {
      const auto device = s.use_device();
      float* out = r->out;
      if (!out) {
        r->result.resize(r->rows * out_w);
        out = r->result.data();
        r->answer = out;
      }
      run_one(s, r->input, r->rows, out);
    } catch (...) {
      r->error = std::current_exception();
    }
    r->stats[kStatRunNs] = ns_between(solo, Clock::now());
    r->stats[kStatBatchRows] = static_cast<int64_t>(r->rows);
    r->stats[kStatBatchRequests] = 1;
  }
  return ns_between(start, Clock::now());
}
}  // namespace moert
