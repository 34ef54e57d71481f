// Helpers shared by the C ABI tests: status assertions, files and temporary directories. Everything
// here goes through the public header only.
#pragma once

#include <gtest/gtest.h>
#include <moert/moert.h>

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace capi_test {

// Frees the status it holds.
struct StatusDeleter {
  void operator()(moert_status* s) const { moert_status_free(s); }
};
using StatusPtr = std::unique_ptr<moert_status, StatusDeleter>;

// Passes when `status` is NULL; otherwise reports its code and message. Frees the status.
inline testing::AssertionResult IsOk(moert_status* status) {
  StatusPtr s(status);
  if (!s) return testing::AssertionSuccess();
  return testing::AssertionFailure()
         << "expected success, got " << moert_status_code_name(moert_status_code(s.get())) << ": "
         << moert_status_message(s.get());
}

// Passes when `status` carries `code`, a non-empty message, and every one of `needles` occurs in
// the message. Frees the status.
template <typename Needles>
testing::AssertionResult IsErrorWith(moert_status* status, int32_t code, const Needles& needles) {
  StatusPtr s(status);
  if (!s)
    return testing::AssertionFailure()
           << "expected " << moert_status_code_name(code) << ", got success (NULL status)";
  const int32_t got = moert_status_code(s.get());
  const std::string message = moert_status_message(s.get());
  if (got != code)
    return testing::AssertionFailure() << "expected " << moert_status_code_name(code) << ", got "
                                       << moert_status_code_name(got) << ": " << message;
  if (message.empty())
    return testing::AssertionFailure() << moert_status_code_name(code) << " with an empty message";
  for (const auto& n : needles)
    if (message.find(n) == std::string::npos)
      return testing::AssertionFailure()
             << moert_status_code_name(code) << " message does not mention \"" << n
             << "\": " << message;
  return testing::AssertionSuccess() << message;
}

inline testing::AssertionResult IsError(moert_status* status, int32_t code,
                                        std::initializer_list<std::string_view> needles = {}) {
  return IsErrorWith(status, code, needles);
}

struct ModelDeleter {
  void operator()(moert_model* m) const { moert_model_free(m); }
};
struct SessionDeleter {
  void operator()(moert_session* s) const { moert_session_free(s); }
};
struct OptionsDeleter {
  void operator()(moert_session_options* o) const { moert_session_options_free(o); }
};
using ModelPtr = std::unique_ptr<moert_model, ModelDeleter>;
using SessionPtr = std::unique_ptr<moert_session, SessionDeleter>;
using OptionsPtr = std::unique_ptr<moert_session_options, OptionsDeleter>;
struct LoadOptionsDeleter {
  void operator()(moert_load_options* o) const { moert_load_options_free(o); }
};
using LoadOptionsPtr = std::unique_ptr<moert_load_options, LoadOptionsDeleter>;

// The example model shipped with the sources (tokens in, context 4, vocab 64).
inline std::string example_model_path() { return MOERT_EXAMPLE_MODEL; }

std::vector<uint8_t> read_file(const std::filesystem::path& path);
void write_file(const std::filesystem::path& path, const void* data, size_t size);
inline void write_file(const std::filesystem::path& path, const std::vector<uint8_t>& bytes) {
  write_file(path, bytes.data(), bytes.size());
}

// A fresh directory under the system temporary directory, removed with everything in it.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Loads a model from memory; on failure fails the current test and returns NULL.
ModelPtr load_ok(const std::vector<uint8_t>& bytes, const char* external_dir = nullptr);

// A session with default options except `threads` and `mode` (MOERT_MODE_*); NULL (and a test
// failure) on error.
SessionPtr make_session(const moert_model* model, uint32_t threads = 1,
                        int32_t mode = MOERT_MODE_INFERENCE);

}  // namespace capi_test
