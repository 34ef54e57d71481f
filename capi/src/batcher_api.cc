// C entry points of the batcher: options, creation, requests from many threads, counters.
#include <atomic>
#include <memory>
#include <thread>

#include "capi/src/handles.h"
#include "core/batcher.h"

using moert::Code;
using moert::fail;
using moert::capi::guarded;
using moert::capi::require;
using moert::capi::status_of;

struct moert_batcher_options {
  moert::BatcherOptions options;
};

struct moert_batcher {
  std::unique_ptr<moert::Batcher> batcher;
  // Set by the first moert_batcher_free(): a callback that the release runs and that frees the
  // handle again is ignored rather than freeing it twice.
  std::atomic<bool> releasing{false};
  uint64_t fork_generation = moert::capi::fork_generation();  // see fork_generation.h
};

namespace {

// The NULL check and the fork check (fork_generation.h) every call on a batcher starts with.
void usable(const moert_batcher* batcher) {
  require(batcher, "batcher");
  moert::capi::require_made_here(batcher->fork_generation, "batcher");
}

}  // namespace

extern "C" {

moert_status* moert_batcher_options_create(moert_batcher_options** out) {
  return guarded([&] {
    require(out, "out");
    *out = new moert_batcher_options{};
  });
}

void moert_batcher_options_free(moert_batcher_options* options) { delete options; }

moert_status* moert_batcher_options_set_sessions(moert_batcher_options* options,
                                                 uint32_t sessions) {
  return guarded([&] {
    require(options, "options");
    if (sessions < 1 || sessions > 256)
      fail(Code::InvalidArgument, "sessions must be between 1 and 256, got ", sessions);
    options->options.sessions = sessions;
  });
}

moert_status* moert_batcher_options_set_max_batch_rows(moert_batcher_options* options,
                                                       uint64_t rows) {
  return guarded([&] {
    require(options, "options");
    if (rows < 1 || rows > (uint64_t{1} << 20))
      fail(Code::InvalidArgument, "max_batch_rows must be between 1 and 1048576, got ", rows);
    options->options.max_batch_rows = rows;
  });
}

moert_status* moert_batcher_options_set_max_queued_rows(moert_batcher_options* options,
                                                        uint64_t rows) {
  return guarded([&] {
    require(options, "options");
    if (rows > (uint64_t{1} << 40))
      fail(Code::InvalidArgument, "max_queued_rows must be at most 2^40 (0: no bound), got ", rows);
    options->options.max_queued_rows = rows;
  });
}

moert_status* moert_batcher_options_set_max_wait_us(moert_batcher_options* options,
                                                    uint64_t microseconds) {
  return guarded([&] {
    require(options, "options");
    if (microseconds > 1'000'000)
      fail(Code::InvalidArgument, "max_wait_us must be at most 1000000 (1 s), got ", microseconds);
    options->options.max_wait_us = microseconds;
  });
}

moert_status* moert_batcher_options_set_session_options(
    moert_batcher_options* options, const moert_session_options* session_options) {
  return guarded([&] {
    require(options, "options");
    require(session_options, "session_options");
    options->options.session = session_options->options;
  });
}

moert_status* moert_batcher_create(const moert_model* model, const moert_batcher_options* options,
                                   moert_batcher** out) {
  return guarded([&] {
    require(model, "model");
    require(out, "out");
    const moert::BatcherOptions opts = options ? options->options : moert::BatcherOptions{};
    auto b = std::make_unique<moert_batcher>();
    b->batcher = std::make_unique<moert::Batcher>(model->model, opts);
    *out = b.release();
  });
}

void moert_batcher_free(moert_batcher* batcher) {
  if (!batcher || batcher->releasing.exchange(true)) return;
  if (moert::capi::inherited(batcher->fork_generation)) {
    // A child of fork(): the batcher's threads, and the requests they would answer, are the
    // parent's. Its memory is left as it is rather than destroyed, which would wait for them.
    static_cast<void>(batcher->batcher.release());
    delete batcher;
    return;
  }
  if (batcher->batcher->serving_on_this_thread()) {
    // A pool thread cannot join itself: the release runs on a thread of its own, which joins
    // this one once the callback returns. Without a thread to spare the batcher is left running
    // rather than the host aborted.
    try {
      std::thread([batcher] { delete batcher; }).detach();
    } catch (...) {
    }
    return;
  }
  delete batcher;
}

moert_status* moert_batcher_forward_tokens(moert_batcher* batcher, const int32_t* tokens,
                                           uint64_t num_tokens, uint64_t rows, float* out,
                                           uint64_t out_len, int64_t* stats, uint64_t stats_len) {
  return guarded([&] {
    usable(batcher);
    batcher->batcher->forward_tokens(tokens, num_tokens, rows, out, out_len, stats, stats_len);
  });
}

moert_status* moert_batcher_forward_hidden(moert_batcher* batcher, const float* in, uint64_t in_len,
                                           uint64_t rows, float* out, uint64_t out_len,
                                           int64_t* stats, uint64_t stats_len) {
  return guarded([&] {
    usable(batcher);
    batcher->batcher->forward_hidden(in, in_len, rows, out, out_len, stats, stats_len);
  });
}

}  // extern "C"

namespace {

// The core's callback for a C one: the error becomes a status the callback owns.
moert::BatcherCallback c_callback(moert_batcher_callback done, void* user_data) {
  return [done, user_data](std::exception_ptr error, const float* out, uint64_t out_len,
                           const int64_t* stats) {
    moert_status* status = error ? status_of(error) : nullptr;
    done(user_data, status, out, out_len, stats, moert::kRequestStats);
  };
}

}  // namespace

extern "C" {

moert_status* moert_batcher_submit_tokens(moert_batcher* batcher, const int32_t* tokens,
                                          uint64_t num_tokens, uint64_t rows,
                                          moert_batcher_callback done, void* user_data) {
  return guarded([&] {
    usable(batcher);
    batcher->batcher->submit_tokens(tokens, num_tokens, rows,
                                    done ? c_callback(done, user_data) : moert::BatcherCallback{});
  });
}

moert_status* moert_batcher_submit_hidden(moert_batcher* batcher, const float* in, uint64_t in_len,
                                          uint64_t rows, moert_batcher_callback done,
                                          void* user_data) {
  return guarded([&] {
    usable(batcher);
    batcher->batcher->submit_hidden(in, in_len, rows,
                                    done ? c_callback(done, user_data) : moert::BatcherCallback{});
  });
}

moert_status* moert_batcher_counters(const moert_batcher* batcher, int64_t* counters,
                                     uint64_t len) {
  return guarded([&] {
    usable(batcher);
    if (len > 0) require(counters, "counters");
    if (counters) batcher->batcher->counters(counters, len);
  });
}

}  // extern "C"
