#include "capi_test_util.h"

#include <stdlib.h>

#include <fstream>
#include <iterator>
#include <stdexcept>

namespace capi_test {

std::vector<uint8_t> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const std::filesystem::path& path, const void* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

TempDir::TempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "moert_capi_XXXXXX").string();
  if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

ModelPtr load_ok(const std::vector<uint8_t>& bytes, const char* external_dir) {
  moert_model* m = nullptr;
  const bool ok = IsOk(moert_model_load_buffer(bytes.data(), bytes.size(), external_dir, &m));
  EXPECT_TRUE(ok) << "the model should load";
  EXPECT_EQ(ok, m != nullptr);
  return ModelPtr(m);
}

SessionPtr make_session(const moert_model* model, uint32_t threads, int32_t mode) {
  moert_session_options* raw = nullptr;
  if (!IsOk(moert_session_options_create(&raw))) {
    ADD_FAILURE() << "moert_session_options_create failed";
    return nullptr;
  }
  OptionsPtr options(raw);
  const auto threads_ok = IsOk(moert_session_options_set_threads(options.get(), threads));
  EXPECT_TRUE(threads_ok);
  EXPECT_TRUE(IsOk(moert_session_options_set_mode(options.get(), mode)));
  moert_session* s = nullptr;
  const auto created = IsOk(moert_session_create(model, options.get(), &s));
  EXPECT_TRUE(created);
  return SessionPtr(s);
}

}  // namespace capi_test
