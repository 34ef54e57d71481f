// The process the kill test kills: trains a model for a given number of steps (deterministically:
// the same steps give the same state), says "ready" on stdout, saves a checkpoint, says "saved".
// Usage: moert_checkpoint_saver MODEL CHECKPOINT STEPS
#include <moert/moert.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

void check(moert_status* st, const char* what) {
  if (!st) return;
  std::fprintf(stderr, "moert_checkpoint_saver: %s: %s\n", what, moert_status_message(st));
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s MODEL CHECKPOINT STEPS\n", argv[0]);
    return 2;
  }
  const int steps = std::atoi(argv[3]);
  moert_model* model = nullptr;
  check(moert_model_load_file(argv[1], &model), "model");
  moert_session_options* o = nullptr;
  check(moert_session_options_create(&o), "options");
  check(moert_session_options_set_mode(o, MOERT_MODE_TRAINING), "mode");
  check(moert_session_options_set_seed(o, 5), "seed");
  moert_session* s = nullptr;
  check(moert_session_create(model, o, &s), "session");
  constexpr uint64_t kRows = 32, kDim = 64;
  std::vector<float> x(kRows * kDim), y(x.size()), dy(x.size());
  for (int step = 0; step < steps; ++step) {
    check(moert_session_zero_grad(s), "zero_grad");
    for (int micro = 0; micro < 2; ++micro) {
      for (size_t i = 0; i < x.size(); ++i)
        x[i] = static_cast<float>((i * 31 + static_cast<size_t>(step * 7 + micro)) % 97) / 97.0f -
               0.5f;
      check(moert_session_forward_hidden(s, x.data(), x.size(), kRows, y.data(), y.size()),
            "forward");
      for (size_t i = 0; i < dy.size(); ++i) dy[i] = 0.01f * y[i];
      check(moert_session_backward(s, dy.data(), dy.size(), nullptr, 0, nullptr), "backward");
    }
    check(moert_session_step(s, nullptr, nullptr), "step");
  }
  std::printf("ready\n");
  std::fflush(stdout);
  check(moert_session_save(s, argv[2]), "save");
  std::printf("saved\n");
  std::fflush(stdout);
  moert_session_free(s);
  moert_session_options_free(o);
  moert_model_free(model);
  return 0;
}
