// C entry points for session options, sessions, forward passes and routing statistics.
#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "capi/src/handles.h"

using moert::Code;
using moert::fail;
using moert::capi::guarded;
using moert::capi::locked;
using moert::capi::require;

namespace {

moert::CountScope scope_of(int32_t scope) {
  if (scope != MOERT_COUNTS_LAST && scope != MOERT_COUNTS_STEP && scope != MOERT_COUNTS_EVAL)
    fail(Code::InvalidArgument, "count scope ", scope,
         " is not MOERT_COUNTS_LAST, MOERT_COUNTS_STEP or MOERT_COUNTS_EVAL");
  return static_cast<moert::CountScope>(scope);
}

}  // namespace

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
    if (!model || !out) {
      // Among ranks, the others are already on their way into the creation's collective.
      if (options) moert::Session::refuse_creation(options->options);
      require(model, "model");
      require(out, "out");
    }
    const moert::SessionOptions opts = options ? options->options : moert::SessionOptions{};
    auto s = std::make_unique<moert_session>();
    s->session = std::make_unique<moert::Session>(model->model, opts);
    *out = s.release();
  });
}

void moert_session_free(moert_session* session) {
  if (!session) return;
  // In a child of fork(), the session's threads do not exist: its memory is left as it is (a
  // copy of the parent's) rather than destroyed, which would wait for them.
  if (moert::capi::inherited(session->fork_generation)) {
    static_cast<void>(session->session.release());
    delete session;  // a parent thread's call counted in the copy never returns here
    return;
  }
  session->freeing.store(true);
  auto pause = std::chrono::microseconds(50);
  while (session->calls.load() != 0) {
    std::this_thread::sleep_for(pause);
    pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(5));
  }
  delete session;
}

moert_status* moert_session_forward_tokens(moert_session* session, const int32_t* tokens,
                                           uint64_t num_tokens, uint64_t rows, float* out,
                                           uint64_t out_len) {
  return locked(session, [&](moert::Session& s) {
    s.forward_tokens(tokens, num_tokens, nullptr, 0, rows, out, out_len);
  });
}

moert_status* moert_session_forward_tokens_masked(moert_session* session, const int32_t* tokens,
                                                  uint64_t num_tokens, const uint8_t* row_mask,
                                                  uint64_t mask_len, uint64_t rows, float* out,
                                                  uint64_t out_len) {
  return locked(session, [&](moert::Session& s) {
    // A null mask is refused by the session, inside its agreement among ranks.
    s.forward_tokens(tokens, num_tokens, row_mask, mask_len, rows, out, out_len, true);
  });
}

moert_status* moert_session_forward_hidden(moert_session* session, const float* in, uint64_t in_len,
                                           uint64_t rows, float* out, uint64_t out_len) {
  return locked(session, [&](moert::Session& s) {
    s.forward_hidden(in, in_len, nullptr, 0, rows, out, out_len);
  });
}

moert_status* moert_session_forward_hidden_masked(moert_session* session, const float* in,
                                                  uint64_t in_len, const uint8_t* row_mask,
                                                  uint64_t mask_len, uint64_t rows, float* out,
                                                  uint64_t out_len) {
  return locked(session, [&](moert::Session& s) {
    s.forward_hidden(in, in_len, row_mask, mask_len, rows, out, out_len, true);
  });
}

moert_status* moert_session_expert_counts(const moert_session* session, uint32_t layer,
                                          int32_t scope, int64_t* counts, uint64_t len) {
  return locked(session, [&](const moert::Session& s) {
    require(counts, "counts");
    const auto& c = s.expert_counts(layer, scope_of(scope));
    if (len != c.size())
      fail(Code::InvalidArgument, "counts buffer holds ", len, " values but layer ", layer, " has ",
           c.size(), " experts");
    std::copy(c.begin(), c.end(), counts);
  });
}

moert_status* moert_session_max_vio(const moert_session* session, uint32_t layer, int32_t scope,
                                    double* out) {
  return locked(session, [&](const moert::Session& s) {
    require(out, "out");
    *out = s.max_vio(layer, scope_of(scope));
  });
}

moert_status* moert_session_profile(const moert_session* session, double* seconds, uint64_t len) {
  return locked(session, [&](const moert::Session& s) {
    require(seconds, "seconds");
    const std::vector<double> p = s.profile();
    if (len < p.size())
      fail(Code::InvalidArgument, "the profile has ", p.size(), " figures; the buffer holds ", len);
    std::copy(p.begin(), p.end(), seconds);
  });
}

moert_status* moert_session_reset_metrics(moert_session* session) {
  return locked(session, [&](moert::Session& s) { s.reset_eval_metrics(); });
}

moert_status* moert_session_backward_loss(moert_session* session, const int32_t* targets,
                                          uint64_t num_targets, double* loss) {
  return locked(session, [&](moert::Session& s) {
    const double l = s.backward_loss(targets, num_targets);
    if (loss) *loss = l;
  });
}

moert_status* moert_session_backward(moert_session* session, const float* grad_out,
                                     uint64_t grad_out_len, float* grad_in, uint64_t grad_in_len,
                                     double* aux_loss) {
  return locked(session, [&](moert::Session& s) {
    const double aux = s.backward(grad_out, grad_out_len, grad_in, grad_in_len);
    if (aux_loss) *aux_loss = aux;
  });
}

moert_status* moert_session_zero_grad(moert_session* session) {
  return locked(session, [&](moert::Session& s) { s.zero_grad(); });
}

moert_status* moert_session_step(moert_session* session, double* lr, double* grad_norm) {
  return locked(session, [&](moert::Session& s) {
    // Written once the step is made, also when the call then fails (moert.h).
    std::optional<moert::StepInfo> made;
    struct Report {
      const std::optional<moert::StepInfo>& made;
      double *lr, *grad_norm;
      ~Report() {
        if (!made) return;
        if (lr) *lr = made->lr;
        if (grad_norm) *grad_norm = made->grad_norm;
      }
    } report{made, lr, grad_norm};
    s.step(&made);
  });
}

moert_status* moert_session_step_count(const moert_session* session, uint64_t* out) {
  return locked(session, [&](const moert::Session& s) {
    require(out, "out");
    *out = s.step_count();
  });
}

moert_status* moert_session_set_eval(moert_session* session, int32_t eval) {
  return locked(session, [&](moert::Session& s) { s.set_eval(eval != 0); });
}

moert_status* moert_session_set_config(moert_session* session, const char* key, const char* value) {
  return locked(session, [&](moert::Session& s) {
    require(key, "key");
    require(value, "value");
    s.set_config(key, value);
  });
}

moert_status* moert_session_num_parameters(const moert_session* session, uint32_t* out) {
  return locked(session, [&](const moert::Session& s) {
    require(out, "out");
    if (!s.training())
      fail(Code::InvalidState, "parameter access needs a session created in training mode");
    *out = static_cast<uint32_t>(s.num_parameters());
  });
}

moert_status* moert_session_parameter_info(const moert_session* session, uint32_t index,
                                           const char** name, uint64_t* numel) {
  return locked(session, [&](const moert::Session& s) {
    const std::string& n = s.parameter_name(index);
    if (name) *name = n.c_str();
    if (numel) *numel = static_cast<uint64_t>(s.parameter_size(index));
  });
}

moert_status* moert_session_get_parameter(const moert_session* session, const char* name,
                                          float* out, uint64_t len) {
  return locked(session, [&](const moert::Session& s) {
    require(name, "name");
    require(out, "out");
    s.read_parameter(s.parameter_index(name), out, len);
  });
}

moert_status* moert_session_set_parameter(moert_session* session, const char* name, const float* in,
                                          uint64_t len) {
  return locked(session, [&](moert::Session& s) {
    require(name, "name");
    require(in, "in");
    s.write_parameter(s.parameter_index(name), in, len);
  });
}

moert_status* moert_session_get_gradient(const moert_session* session, const char* name, float* out,
                                         uint64_t len) {
  return locked(session, [&](const moert::Session& s) {
    require(name, "name");
    require(out, "out");
    s.read_gradient(s.parameter_index(name), out, len);
  });
}

moert_status* moert_session_set_gradient(moert_session* session, const char* name, const float* in,
                                         uint64_t len) {
  return locked(session, [&](moert::Session& s) {
    require(name, "name");
    require(in, "in");
    s.write_gradient(s.parameter_index(name), in, len);
  });
}

moert_status* moert_session_get_expert_bias(const moert_session* session, uint32_t layer,
                                            float* out, uint64_t len) {
  return locked(session, [&](const moert::Session& s) {
    require(out, "out");
    s.read_bias(layer, out, len);
  });
}

moert_status* moert_session_set_expert_bias(moert_session* session, uint32_t layer, const float* in,
                                            uint64_t len) {
  return locked(session, [&](moert::Session& s) {
    require(in, "in");
    s.write_bias(layer, in, len);
  });
}

moert_status* moert_session_set_bias_update_rate(moert_session* session, uint32_t layer,
                                                 double gamma) {
  return locked(session, [&](moert::Session& s) { s.set_bias_update_rate(layer, gamma); });
}

moert_status* moert_session_set_bias_frozen(moert_session* session, uint32_t layer,
                                            int32_t frozen) {
  return locked(session, [&](moert::Session& s) { s.set_bias_frozen(layer, frozen != 0); });
}

moert_status* moert_session_save(const moert_session* session, const char* path) {
  return locked(session, [&](const moert::Session& s) {
    // A null path is refused by the session, inside its agreement among ranks.
    s.save(path ? path : "", path != nullptr);
  });
}

moert_status* moert_session_load(moert_session* session, const char* path) {
  return locked(session,
                [&](moert::Session& s) { s.load(path ? path : "", nullptr, path != nullptr); });
}

}  // extern "C"
