// libFuzzer harness: a checkpoint restored into a training session. Each input is a checkpoint
// description; its content digest is recomputed and written into it first, as a crafted file would
// carry a matching one, so that the fuzzer explores what lies behind the integrity check. The
// checkpoint then goes through Session::load (from a memory-backed file), and a restored session
// must save a checkpoint that loads back, and train on; it is also loaded as a plain model.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/model_loader.h"
#include "fuzz_common.h"
#include "tests/support/checkpoint_patch.h"

namespace {

// The architecture every seed checkpoint was saved from (checkpoint_model.json).
std::shared_ptr<const moert::Model> fixed_model() {
  static const auto model = moert::load_model_file(MOERT_FUZZ_CHECKPOINT_MODEL);
  return model;
}

// A memory-backed file to hand Session::load a path.
const std::string& scratch_path(int& fd) {
  static int file = ::memfd_create("moert-fuzz-checkpoint", 0);
  static const std::string path = "/proc/self/fd/" + std::to_string(file);
  fd = file;
  return path;
}

// Where restored sessions save: memory-backed where the system has it.
const std::string& save_path() {
  static const std::string path = [] {
    namespace fs = std::filesystem;
    const fs::path base = fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    const fs::path dir = base / ("moert-fuzz-" + std::to_string(::getpid()));
    fs::create_directories(dir);
    return (dir / "ck.moert").string();
  }();
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moert::LoadOptions limits;
  limits.max_memory = uint64_t{2} << 20;
  limits.max_file_bytes = uint64_t{1} << 20;
  uint64_t digest = 0;
  if (!moert_fuzz::clean(
          "digest", [&] { digest = moert::recompute_checkpoint_digest(data, size, "", limits); }))
    return 0;
  std::vector<uint64_t> aligned((size + 7) / 8);
  std::memcpy(aligned.data(), data, size);
  auto* bytes = reinterpret_cast<uint8_t*>(aligned.data());
  // Without a content_digest field there is nothing to rewrite: the load refuses it as it is.
  moert_test::set_content_digest(bytes, digest);

  int fd = -1;
  const std::string& path = scratch_path(fd);
  if (fd < 0 || ::ftruncate(fd, 0) != 0 ||
      ::pwrite(fd, bytes, size, 0) != static_cast<ssize_t>(size))
    moert_fuzz::finding("scratch file", "cannot write the memory-backed file");

  const auto model = fixed_model();
  moert::SessionOptions o;
  o.mode = moert::Mode::Training;
  moert::Session session(model, o);
  if (moert_fuzz::clean("session load", [&] { session.load(path, &limits); })) {
    // What was accepted is a state: it saves, and the save restores.
    try {
      session.save(save_path());
      moert::Session again(model, o);
      again.load(save_path(), &limits);
    } catch (const moert::Error& e) {
      if (e.code() != moert::Code::Io) moert_fuzz::finding("save and restore", e.what());
    }
    moert_fuzz::train_step(session, *model);
  }
  std::shared_ptr<const moert::Model> as_model;
  if (moert_fuzz::clean("model load",
                        [&] { as_model = moert::load_model_buffer(bytes, size, "", limits); }))
    moert_fuzz::run_inference(as_model);
  return 0;
}
