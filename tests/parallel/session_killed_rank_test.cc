// A rank SIGKILLed in the middle of training (issue: a failing rank): every other rank's call
// fails with MOERT_ERR_COMM within the communicator's timeout, later calls fail at once, and the
// process exits normally — no hang, no abort. Run by tests/comm/kill_test.cmake under
// `mpirun --enable-recovery`; each survivor writes its verdict to <dir>/rank<r>.txt.
//
// With a third argument `save`, the victim dies during a collective save, as soon as rank 0
// starts writing the checkpoint: rank 0 finishes writing it and then cannot confirm it with the
// others, so its MOERT_ERR_COMM must say that the file was written, and the file must hold the
// new checkpoint, whole.
#include <moert/moert.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "model_builder.h"

namespace {

using Clock = std::chrono::steady_clock;

std::string take(moert_status* st) {
  std::string m = st ? std::string(moert_status_code_name(moert_status_code(st))) + ": " +
                           moert_status_message(st)
                     : "";
  moert_status_free(st);
  return m;
}

}  // namespace

// Kills this process as soon as a file not in `before` appears in `dir`: the first file of a save.
void die_when_a_file_appears(const std::string& dir, std::set<std::string> before) {
  std::thread([dir, before = std::move(before)] {
    for (;;) {
      for (const auto& e : std::filesystem::directory_iterator(dir))
        if (!before.count(e.path().filename().string())) raise(SIGKILL);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }).detach();
}

// The checkpoint step of the file at `path`, or a description of why it could not be read.
std::string checkpoint_step(const std::string& path) {
  moert_model* m = nullptr;
  moert_load_options* o = nullptr;
  std::string e = take(moert_load_options_create(&o));
  if (e.empty()) e = take(moert_load_options_set_max_memory(o, UINT64_MAX));
  if (e.empty()) e = take(moert_model_load_file_with_options(path.c_str(), o, &m));
  int32_t is_checkpoint = 0;
  uint64_t step = 0;
  if (e.empty()) e = take(moert_model_checkpoint_step(m, &is_checkpoint, &step));
  moert_model_free(m);
  moert_load_options_free(o);
  if (!e.empty()) return "unreadable: " + e;
  return is_checkpoint ? "step " + std::to_string(step) : "not a checkpoint";
}

int main(int argc, char** argv) {
  if (argc != 3 && !(argc == 4 && std::string(argv[3]) == "save")) {
    std::fprintf(stderr, "usage: %s <output dir> <victim rank> [save]\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int victim = std::stoi(argv[2]);
  const bool during_save = argc == 4;
  constexpr double kTimeout = 3.0;
  moert_comm* comm = nullptr;
  if (!take(moert_comm_create_mpi(nullptr, &comm)).empty()) return 1;
  int32_t rank = 0, size = 0;
  take(moert_comm_rank(comm, &rank));
  take(moert_comm_size(comm, &size));
  take(moert_comm_set_timeout(comm, kTimeout));
  std::string verdict = "FAIL: nothing happened";

  capi_test::ModelDesc desc = capi_test::hidden_baseline();
  if (during_save) {
    // 6 MiB of expert weights, 24 MiB with their gradients and moments: writing the checkpoint
    // takes long enough for the victim to die while rank 0 writes.
    desc.layers[1].moe.num_experts = 64;
    desc.layers[1].moe.num_groups = 1;
    desc.layers[1].moe.expert_hidden = 1024;
  }
  const std::vector<uint8_t> bytes = capi_test::build(desc);
  moert_model* model = nullptr;
  moert_session_options* o = nullptr;
  moert_session* s = nullptr;
  std::string err = take(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &model));
  if (err.empty()) err = take(moert_session_options_create(&o));
  if (err.empty()) err = take(moert_session_options_set_mode(o, MOERT_MODE_TRAINING));
  if (err.empty()) err = take(moert_session_options_set_comm(o, comm, size));
  if (err.empty()) err = take(moert_session_create(model, o, &s));
  const int64_t n = 64;
  std::vector<float> x(n * 8, 0.25f), out(n * 16), g(n * 16, 0.01f);
  auto step = [&] {
    std::string e = take(moert_session_zero_grad(s));
    if (e.empty())
      e = take(moert_session_forward_hidden(s, x.data(), x.size(), n, out.data(), out.size()));
    if (e.empty()) e = take(moert_session_backward(s, g.data(), g.size(), nullptr, 0, nullptr));
    if (e.empty()) e = take(moert_session_step(s, nullptr, nullptr));
    return e;
  };
  if (err.empty()) err = step();  // a healthy step first
  const std::string ckpt_dir = dir + "/checkpoints", ckpt = ckpt_dir + "/ckpt.moert";
  if (!err.empty()) {
    verdict = "FAIL: before the kill: " + err;
  } else if (during_save) {
    std::filesystem::create_directories(ckpt_dir);
    if (rank == victim) die_when_a_file_appears(ckpt_dir, {});
    const std::string e = take(moert_session_save(s, ckpt.c_str()));
    const std::string holds = rank == 0 ? checkpoint_step(ckpt) : "";
    if (e.rfind("MOERT_ERR_COMM", 0) != 0)
      verdict = "FAIL: the save during the kill returned '" + e + "'";
    else if (rank == 0 &&
             e.find("checkpoint '" + ckpt + "' was written (step 1)") == std::string::npos)
      verdict = "FAIL: rank 0 wrote the checkpoint but did not say so: " + e;
    else if (rank == 0 && holds != "step 1")
      verdict = "FAIL: the file rank 0 wrote holds " + holds;
    else
      verdict = "ok: " + e;
    if (rank == 0) std::filesystem::remove_all(ckpt_dir);
  } else {
    if (rank == victim) raise(SIGKILL);
    const auto t = Clock::now();
    const std::string e = step();
    const double waited = std::chrono::duration<double>(Clock::now() - t).count();
    const auto t2 = Clock::now();
    const std::string again = step();
    const double again_waited = std::chrono::duration<double>(Clock::now() - t2).count();
    if (e.rfind("MOERT_ERR_COMM", 0) != 0)
      verdict = "FAIL: the step after the kill returned '" + e + "'";
    else if (waited > kTimeout + 10.0)
      verdict = "FAIL: the error came after " + std::to_string(waited) + " s";
    else if (again.rfind("MOERT_ERR_COMM", 0) != 0 || again_waited > 1.0)
      verdict = "FAIL: the next step returned '" + again + "' after " +
                std::to_string(again_waited) + " s";
    else
      verdict = "ok: MOERT_ERR_COMM after " + std::to_string(waited) + " s: " + e;
  }
  std::ofstream(dir + "/rank" + std::to_string(rank) + ".txt") << verdict << "\n";
  // A dead peer: the session and communicator are freed without waiting for it.
  moert_session_free(s);
  moert_session_options_free(o);
  moert_model_free(model);
  moert_comm_free(comm);
  return 0;
}
