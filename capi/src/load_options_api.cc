// C entry points for load limits: the options object and the loads that take it.
#include <memory>
#include <mutex>

#include "capi/src/handles.h"
#include "core/model_loader.h"

struct moert_load_options {
  moert::LoadOptions options;
};

using moert::capi::guarded;
using moert::capi::require;

namespace {

moert::LoadOptions options_or_defaults(const moert_load_options* options) {
  return options ? options->options : moert::LoadOptions{};
}

}  // namespace

extern "C" {

moert_status* moert_load_options_create(moert_load_options** out) {
  return guarded([&] {
    require(out, "out");
    *out = new moert_load_options{};
  });
}

void moert_load_options_free(moert_load_options* options) { delete options; }

moert_status* moert_load_options_set_max_memory(moert_load_options* options, uint64_t bytes) {
  return guarded([&] {
    require(options, "options");
    options->options.max_memory = bytes;
  });
}

moert_status* moert_load_options_set_max_file_bytes(moert_load_options* options, uint64_t bytes) {
  return guarded([&] {
    require(options, "options");
    options->options.max_file_bytes = bytes;
  });
}

moert_status* moert_load_options_set_confine_external_data(moert_load_options* options,
                                                           int32_t confine) {
  return guarded([&] {
    require(options, "options");
    options->options.confine_external_data = confine != 0;
  });
}

moert_status* moert_load_options_set_description_only(moert_load_options* options,
                                                      int32_t description_only) {
  return guarded([&] {
    require(options, "options");
    options->options.description_only = description_only != 0;
  });
}

moert_status* moert_model_load_file_with_options(const char* path,
                                                 const moert_load_options* options,
                                                 moert_model** out) {
  return guarded([&] {
    require(path, "path");
    require(out, "out");
    auto m = std::make_unique<moert_model>(
        moert_model{moert::load_model_file(path, options_or_defaults(options))});
    *out = m.release();
  });
}

moert_status* moert_model_load_buffer_with_options(const void* data, size_t size,
                                                   const char* external_dir,
                                                   const moert_load_options* options,
                                                   moert_model** out) {
  return guarded([&] {
    require(data, "data");
    require(out, "out");
    auto m = std::make_unique<moert_model>(moert_model{moert::load_model_buffer(
        data, size, external_dir ? external_dir : "", options_or_defaults(options))});
    *out = m.release();
  });
}

moert_status* moert_session_load_with_options(moert_session* session, const char* path,
                                              const moert_load_options* options) {
  return moert::capi::locked(session, [&](moert::Session& s) {
    // A null path is refused by the session, inside its agreement among ranks.
    s.load(path ? path : "", options ? &options->options : nullptr, path != nullptr);
  });
}

}  // extern "C"
