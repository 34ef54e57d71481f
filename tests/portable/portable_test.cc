// Files written by a build of another compiler (tests/portable/files, made by a clang-14 build
// with make_portable_files.cc) load here, and this build, running the same program, writes them
// byte for byte: a file's bytes depend on its content alone, and what is verified on load is the
// content. (Before schema 1.1, a GCC and a clang build refused each other's checkpoints.)
#include <gtest/gtest.h>
#include <moert/moert.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

const fs::path kFiles = MOERT_PORTABLE_FILES;

std::map<std::string, std::vector<char>> files_of(const fs::path& dir) {
  std::map<std::string, std::vector<char>> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::ifstream in(e.path(), std::ios::binary);
    out[e.path().filename()] = {std::istreambuf_iterator<char>(in), {}};
  }
  return out;
}

std::string message_of(moert_status* st) {
  std::string m = st ? moert_status_message(st) : "";
  moert_status_free(st);
  return m;
}

TEST(Portable, CheckpointsAndAModelFromAnotherCompilerLoadAndTrainOn) {
  for (const char* name : {"external.moert", "inline.moert"}) {
    SCOPED_TRACE(name);
    const std::string path = (kFiles / name).string();
    moert_model* model = nullptr;
    ASSERT_EQ(message_of(moert_model_load_file(path.c_str(), &model)), "");
    moert_session_options* o = nullptr;
    moert_session_options_create(&o);
    moert_status_free(moert_session_options_set_mode(o, MOERT_MODE_TRAINING));
    moert_session* s = nullptr;
    ASSERT_EQ(message_of(moert_session_create(model, o, &s)), "");
    moert_session_options_free(o);
    ASSERT_EQ(message_of(moert_session_load(s, path.c_str())), "");
    uint64_t step = 0;
    moert_status_free(moert_session_step_count(s, &step));
    EXPECT_EQ(step, 1u);
    uint32_t width = 0, out_width = 0;
    moert_status_free(moert_model_io(model, nullptr, &width, &out_width));
    std::vector<float> x(4 * width, 0.25f), y(4 * out_width), dy(y.size(), 0.01f);
    EXPECT_EQ(
        message_of(moert_session_forward_hidden(s, x.data(), x.size(), 4, y.data(), y.size())), "");
    EXPECT_EQ(message_of(moert_session_backward(s, dy.data(), dy.size(), nullptr, 0, nullptr)), "");
    EXPECT_EQ(message_of(moert_session_step(s, nullptr, nullptr)), "");
    moert_session_free(s);
    moert_model_free(model);
  }
  moert_model* model = nullptr;
  EXPECT_EQ(message_of(moert_model_load_file((kFiles / "model.moert").c_str(), &model)), "");
  moert_model_free(model);
}

TEST(Portable, ThisBuildWritesTheSameBytes) {
  const fs::path out = fs::temp_directory_path() / ("moert-portable-" + std::to_string(::getpid()));
  const std::string command = std::string(MOERT_PORTABLE_GENERATOR) + " " + out.string();
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  const auto committed = files_of(kFiles);
  const auto written = files_of(out);
  ASSERT_EQ(committed.size(), 4u);
  for (const auto& [name, bytes] : committed) {
    const auto it = written.find(name);
    ASSERT_NE(it, written.end()) << name << " is not written by this build";
    // A difference here means either a writer whose bytes depend on more than the content, or
    // arithmetic that differs between machines (make_portable_files.cc keeps to exact IEEE
    // operations for this reason): compare the files' content with moert inspect.
    EXPECT_TRUE(it->second == bytes) << name << " differs from the committed file";
  }
  EXPECT_EQ(written.size(), committed.size());
  fs::remove_all(out);
}

}  // namespace
