// Checkpoints survive SIGKILL: a process saving over an existing checkpoint (description plus
// external data file) is killed at random points of the save, many times, and every time the
// path holds the old checkpoint or the new one, whole: byte for byte one of the two as written
// by an uninterrupted save, and it loads into exactly that state (never a mixture, never a
// checkpoint whose digest lies).
#include <gtest/gtest.h>
#include <moert/moert.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// The files of a checkpoint directory: name -> bytes.
std::map<std::string, std::vector<char>> files_of(const fs::path& dir) {
  std::map<std::string, std::vector<char>> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename()] = read_bytes(e.path());
  return out;
}

// A running saver: its pid and the read end of its stdout.
struct Saver {
  pid_t pid = -1;
  int out = -1;
};

Saver spawn_saver(const fs::path& checkpoint, int steps) {
  int pipe_fds[2];
  EXPECT_EQ(::pipe(pipe_fds), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, pipe_fds[0]);
  const std::string steps_arg = std::to_string(steps);
  const std::string ckpt = checkpoint.string();
  const char* argv[] = {MOERT_CHECKPOINT_SAVER, MOERT_KILL_MODEL, ckpt.c_str(), steps_arg.c_str(),
                        nullptr};
  Saver s;
  EXPECT_EQ(posix_spawn(&s.pid, MOERT_CHECKPOINT_SAVER, &actions, nullptr, const_cast<char**>(argv),
                        environ),
            0);
  posix_spawn_file_actions_destroy(&actions);
  ::close(pipe_fds[1]);
  s.out = pipe_fds[0];
  return s;
}

// Reads the saver's stdout up to `word`; false at end of file.
bool wait_for(const Saver& s, const std::string& word) {
  std::string line;
  char c;
  while (::read(s.out, &c, 1) == 1) {
    if (c != '\n') {
      line += c;
      continue;
    }
    if (line == word) return true;
    line.clear();
  }
  return false;
}

int finish(Saver& s) {
  int status = 0;
  ::waitpid(s.pid, &status, 0);
  ::close(s.out);
  return status;
}

// Runs a saver to completion.
void save(const fs::path& checkpoint, int steps) {
  Saver s = spawn_saver(checkpoint, steps);
  ASSERT_TRUE(wait_for(s, "saved"));
  const int status = finish(s);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// Everything the C ABI can read back of a training session.
struct State {
  uint64_t step = 0;
  std::vector<float> values;  // parameters, gradients, biases
  std::vector<int64_t> counts;
  bool operator==(const State&) const = default;
};

struct Loaded {
  bool ok = false;
  std::string error;
  State state;
};

Loaded load(const fs::path& checkpoint) {
  Loaded out;
  moert_model* model = nullptr;
  moert_status_free(moert_model_load_file(MOERT_KILL_MODEL, &model));
  moert_session_options* o = nullptr;
  moert_session_options_create(&o);
  moert_status_free(moert_session_options_set_mode(o, MOERT_MODE_TRAINING));
  moert_session* s = nullptr;
  moert_status_free(moert_session_create(model, o, &s));
  moert_session_options_free(o);
  moert_model_free(model);
  if (moert_status* st = moert_session_load(s, checkpoint.c_str())) {
    out.error = moert_status_message(st);
    moert_status_free(st);
    moert_session_free(s);
    return out;
  }
  out.ok = true;
  moert_status_free(moert_session_step_count(s, &out.state.step));
  uint32_t n = 0;
  moert_status_free(moert_session_num_parameters(s, &n));
  for (uint32_t i = 0; i < n; ++i) {
    const char* name = nullptr;
    uint64_t numel = 0;
    moert_status_free(moert_session_parameter_info(s, i, &name, &numel));
    std::vector<float> v(numel), g(numel);
    moert_status_free(moert_session_get_parameter(s, name, v.data(), numel));
    moert_status_free(moert_session_get_gradient(s, name, g.data(), numel));
    out.state.values.insert(out.state.values.end(), v.begin(), v.end());
    out.state.values.insert(out.state.values.end(), g.begin(), g.end());
  }
  std::vector<float> bias(8);
  moert_status_free(moert_session_get_expert_bias(s, 1, bias.data(), bias.size()));
  out.state.values.insert(out.state.values.end(), bias.begin(), bias.end());
  out.state.counts.resize(8);
  moert_status_free(
      moert_session_expert_counts(s, 1, MOERT_COUNTS_STEP, out.state.counts.data(), 8));
  moert_session_free(s);
  return out;
}

TEST(CheckpointKill, SigkillAtAnyPointOfASaveLeavesTheOldOrTheNewCheckpointWhole) {
  const fs::path root = fs::temp_directory_path() / ("moert-kill-" + std::to_string(::getpid()));
  fs::remove_all(root);
  // The two states, each saved once without interruption, in directories of their own under the
  // same file name: a deterministic writer makes the kill directory's files equal to one of them.
  constexpr int kSteps[2] = {1, 2};
  std::map<std::string, std::vector<char>> ref_files[2];
  State ref_state[2];
  double save_seconds = 0;
  for (int k = 0; k < 2; ++k) {
    const fs::path dir = root / ("ref" + std::to_string(k));
    fs::create_directories(dir);
    Saver s = spawn_saver(dir / "ck.moert", kSteps[k]);
    ASSERT_TRUE(wait_for(s, "ready"));
    const auto start = Clock::now();
    ASSERT_TRUE(wait_for(s, "saved"));
    save_seconds =
        std::max(save_seconds, std::chrono::duration<double>(Clock::now() - start).count());
    finish(s);
    ref_files[k] = files_of(dir);
    ASSERT_EQ(ref_files[k].size(), 2u) << "a description and its data file";
    const Loaded l = load(dir / "ck.moert");
    ASSERT_TRUE(l.ok) << l.error;
    ref_state[k] = l.state;
  }
  ASSERT_NE(ref_state[0], ref_state[1]);
  ASSERT_NE(ref_files[0], ref_files[1]);

  const fs::path dir = root / "kill";
  fs::create_directories(dir);
  const fs::path path = dir / "ck.moert";
  save(path, kSteps[0]);
  int holds = 0;  // which state `path` holds
  std::mt19937_64 rng(12345);
  // Kill points spread uniformly over the save and a little past it. A save's time follows the
  // machine's load, which the reference saves only sampled: when the planned kills have missed a
  // kind of outcome (all before the rename, say), more follow over a range moved towards it.
  double latest = 1.25 * save_seconds;
  // Fewer under the sanitizers, whose processes start and run several times slower.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  constexpr int kKills = 30;
#else
  constexpr int kKills = 60;
#endif
  int old_found = 0, new_found = 0, mid_write = 0, kills = 0;
  for (; kills < 4 * kKills; ++kills) {
    const int i = kills;
    if (i >= kKills) {
      if (old_found > 0 && new_found > 0 && mid_write > 0) break;
      // Later kills for no new checkpoint, earlier for no old one; a kill amid the writing lies
      // between, so a missing partly written file alone moves nothing.
      if (new_found == 0)
        latest = std::min(latest * 1.25, 4.0 * save_seconds);
      else if (old_found == 0)
        latest = std::max(latest * 0.8, 0.25 * save_seconds);
    }
    const int target = 1 - holds;
    Saver s = spawn_saver(path, kSteps[target]);
    ASSERT_TRUE(wait_for(s, "ready"));
    std::this_thread::sleep_for(
        std::chrono::duration<double>(std::uniform_real_distribution<double>(0.0, latest)(rng)));
    ::kill(s.pid, SIGKILL);
    finish(s);

    // The description and the data file it names are one of the two checkpoints, byte for byte;
    // anything else in the directory is a leftover of the killed save.
    const auto files = files_of(dir);
    ASSERT_TRUE(files.count("ck.moert")) << "kill " << i << ": no checkpoint at the path";
    int found = -1;
    for (int k = 0; k < 2; ++k) {
      bool all = true;
      for (const auto& [name, bytes] : ref_files[k]) {
        const auto it = files.find(name);
        all = all && it != files.end() && it->second == bytes;
      }
      if (all) found = k;
    }
    ASSERT_NE(found, -1) << "kill " << i << ": the files match neither checkpoint";
    // A temporary file is the trace of a kill inside the writing itself.
    for (const auto& [name, bytes] : files)
      if (name.starts_with(".ck.moert.")) {
        ++mid_write;
        break;
      }
    ASSERT_TRUE(found == holds || found == target);
    // It loads, into exactly that state.
    const Loaded l = load(path);
    ASSERT_TRUE(l.ok) << "kill " << i << ": " << l.error;
    ASSERT_EQ(l.state, ref_state[found]) << "kill " << i << ": a loaded state that is neither";
    (found == holds ? old_found : new_found)++;
    holds = found;
  }
  std::printf(
      "%d kills over a %.1f ms save: the old checkpoint %d times, the new one %d times; %d kills "
      "left a partly written temporary file\n",
      kills, save_seconds * 1e3, old_found, new_found, mid_write);
  // The kills landed inside the save, not all before or after it.
  EXPECT_GT(old_found, 0);
  EXPECT_GT(new_found, 0);
  EXPECT_GT(mid_write, 0);

  // An uninterrupted save clears what killed saves left behind.
  save(path, kSteps[1 - holds]);
  EXPECT_EQ(files_of(dir), ref_files[1 - holds]);
  fs::remove_all(root);
}

}  // namespace
