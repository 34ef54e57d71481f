// C entry points for session options, sessions, forward passes and routing statistics.
#include <memory>
#include <mutex>

#include "capi/src/handles.h"

using moert::Code;
using moert::fail;
using moert::capi::guarded;
using moert::capi::require;

extern "C" {

moert_status* moert_session_options_create(moert_session_options** out) {
  return guarded([&] {
    require(out, "out");
    *out = new moert_session_options{};
  });
}

void moert_session_options_free(moert_session_options* options) { delete options; }

moert_status* moert_session_options_set_device(moert_session_options* options, int32_t device,
                                               int32_t index) {
  return guarded([&] {
    require(options, "options");
    if (device != MOERT_DEVICE_CPU && device != MOERT_DEVICE_CUDA)
      fail(Code::InvalidArgument, "device ", device,
           " is not MOERT_DEVICE_CPU or MOERT_DEVICE_CUDA");
    if (index < 0) fail(Code::InvalidArgument, "device index ", index, " is negative");
    if (device == MOERT_DEVICE_CPU && index != 0)
      fail(Code::InvalidArgument, "the CPU device has index 0 only, got ", index);
    options->options.device = static_cast<moert::Device>(device);
    options->options.device_index = index;
  });
}

moert_status* moert_session_options_set_threads(moert_session_options* options, uint32_t threads) {
  return guarded([&] {
    require(options, "options");
    if (threads < 1 || threads > 1024)
      fail(Code::InvalidArgument, "threads must be between 1 and 1024, got ", threads);
    options->options.threads = threads;
  });
}

moert_status* moert_session_options_set_seed(moert_session_options* options, uint64_t seed) {
  return guarded([&] {
    require(options, "options");
    options->options.seed = seed;
  });
}

moert_status* moert_session_options_set_mode(moert_session_options* options, int32_t mode) {
  return guarded([&] {
    require(options, "options");
    if (mode != MOERT_MODE_INFERENCE && mode != MOERT_MODE_TRAINING)
      fail(Code::InvalidArgument, "mode ", mode,
           " is not MOERT_MODE_INFERENCE or MOERT_MODE_TRAINING");
    options->options.mode = static_cast<moert::Mode>(mode);
  });
}

moert_status* moert_session_options_set_config(moert_session_options* options, const char* key,
                                               const char* value) {
  return guarded([&] {
    require(options, "options");
    require(key, "key");
    require(value, "value");
    moert::SessionOptions updated = options->options;
    updated.set(key, value);
    options->options = updated;
  });
}

moert_status* moert_session_create(const moert_model* model, const moert_session_options* options,
                                   moert_session** out) {
  return guarded([&] {
    require(model, "model");
    require(out, "out");
    const moert::SessionOptions opts = options ? options->options : moert::SessionOptions{};
    auto s = std::make_unique<moert_session>(
        moert_session{std::make_unique<moert::Session>(model->model, opts)});
    *out = s.release();
  });
}

void moert_session_free(moert_session* session) { delete session; }

moert_status* moert_session_forward_tokens(moert_session* session, const int32_t* tokens,
                                           uint64_t num_tokens, uint64_t rows, float* out,
                                           uint64_t out_len) {
  return guarded([&] {
    require(session, "session");
    std::lock_guard<std::mutex> lock(session->session->mutex());
    session->session->forward_tokens(tokens, num_tokens, rows, out, out_len);
  });
}

moert_status* moert_session_forward_hidden(moert_session* session, const float* in, uint64_t in_len,
                                           uint64_t rows, float* out, uint64_t out_len) {
  return guarded([&] {
    require(session, "session");
    std::lock_guard<std::mutex> lock(session->session->mutex());
    session->session->forward_hidden(in, in_len, rows, out, out_len);
  });
}

moert_status* moert_session_expert_counts(const moert_session* session, uint32_t layer,
                                          int64_t* counts, uint64_t len) {
  return guarded([&] {
    require(session, "session");
    require(counts, "counts");
    std::lock_guard<std::mutex> lock(session->session->mutex());
    const auto& c = session->session->expert_counts(layer);
    if (len != c.size())
      fail(Code::InvalidArgument, "counts buffer holds ", len, " values but layer ", layer, " has ",
           c.size(), " experts");
    std::copy(c.begin(), c.end(), counts);
  });
}

moert_status* moert_session_max_vio(const moert_session* session, uint32_t layer, double* out) {
  return guarded([&] {
    require(session, "session");
    require(out, "out");
    std::lock_guard<std::mutex> lock(session->session->mutex());
    *out = session->session->max_vio(layer);
  });
}

}  // extern "C"
