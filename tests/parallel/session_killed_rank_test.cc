// A rank SIGKILLed in the middle of training (issue: a failing rank): every other rank's call
// fails with MOERT_ERR_COMM within the communicator's timeout, later calls fail at once, and the
// process exits normally — no hang, no abort. Run by tests/comm/kill_test.cmake under
// `mpirun --enable-recovery`; each survivor writes its verdict to <dir>/rank<r>.txt.
#include <moert/moert.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
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

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <output dir> <victim rank>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int victim = std::stoi(argv[2]);
  constexpr double kTimeout = 3.0;
  moert_comm* comm = nullptr;
  if (!take(moert_comm_create_mpi(nullptr, &comm)).empty()) return 1;
  int32_t rank = 0, size = 0;
  take(moert_comm_rank(comm, &rank));
  take(moert_comm_size(comm, &size));
  take(moert_comm_set_timeout(comm, kTimeout));
  std::string verdict = "FAIL: nothing happened";

  const std::vector<uint8_t> bytes = capi_test::build(capi_test::hidden_baseline());
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
  if (!err.empty()) {
    verdict = "FAIL: before the kill: " + err;
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
