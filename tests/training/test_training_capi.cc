// Training through the C ABI: the loss-free bias update rule exactly, eval mode, resume
// determinism, corrupt checkpoints, misuse.
#include <gtest/gtest.h>
#include <moert/moert.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/session_tensors.h"

namespace {

namespace fs = std::filesystem;

// Fails the test with the status message; frees the status.
#define MOERT_OK_OR_FAIL(call)                                             \
  do {                                                                     \
    moert_status* st_ = (call);                                            \
    ASSERT_EQ(st_, nullptr) << #call << ": " << moert_status_message(st_); \
  } while (0)

// The code of a call's status (MOERT_OK for success); frees it.
int32_t code_of(moert_status* st, std::string* message = nullptr) {
  const int32_t c = moert_status_code(st);
  if (message) *message = moert_status_message(st);
  moert_status_free(st);
  return c;
}

struct Model {
  moert_model* m = nullptr;
  explicit Model(const char* path) {
    moert_status* st = moert_model_load_file(path, &m);
    EXPECT_EQ(st, nullptr) << moert_status_message(st);
    moert_status_free(st);
  }
  ~Model() { moert_model_free(m); }
};

struct Session {
  moert_session* s = nullptr;
  Session(const moert_model* model, int32_t mode, const char* optimizer = "adamw",
          uint32_t threads = 2) {
    moert_session_options* o = nullptr;
    moert_session_options_create(&o);
    moert_status_free(moert_session_options_set_mode(o, mode));
    moert_status_free(moert_session_options_set_threads(o, threads));
    moert_status_free(moert_session_options_set_config(o, "optimizer", optimizer));
    moert_status_free(moert_session_options_set_config(o, "lr", "0.01"));
    moert_status* st = moert_session_create(model, o, &s);
    EXPECT_EQ(st, nullptr) << moert_status_message(st);
    moert_status_free(st);
    moert_session_options_free(o);
  }
  ~Session() { moert_session_free(s); }
};

// One-hot rows that route to the given experts in the route4 model (gate = 4 * identity).
std::vector<float> one_hot_rows(const std::vector<int>& experts) {
  std::vector<float> x(experts.size() * 4, 0.0f);
  for (size_t r = 0; r < experts.size(); ++r) x[r * 4 + experts[r]] = 1.0f;
  return x;
}

std::vector<int64_t> counts(const moert_session* s, int32_t scope) {
  std::vector<int64_t> c(4);
  moert_status* st = moert_session_expert_counts(s, 0, scope, c.data(), 4);
  EXPECT_EQ(st, nullptr) << moert_status_message(st);
  moert_status_free(st);
  return c;
}

void forward_route4(moert_session* s, const std::vector<int>& experts) {
  auto x = one_hot_rows(experts);
  std::vector<float> y(x.size());
  moert_status* st =
      moert_session_forward_hidden(s, x.data(), x.size(), experts.size(), y.data(), y.size());
  ASSERT_EQ(st, nullptr) << moert_status_message(st);
}

std::vector<float> read_bias(const moert_session* s) {
  std::vector<float> b(4);
  moert_status* st = moert_session_get_expert_bias(s, 0, b.data(), 4);
  EXPECT_EQ(st, nullptr) << moert_status_message(st);
  moert_status_free(st);
  return b;
}

TEST(LossFreeBias, UpdateIsGammaTimesSignOfMeanMinusCountWithSignOfZeroZero) {
  Model model(MOERT_TEST_ROUTE4);
  Session s(model.m, MOERT_MODE_TRAINING);
  const std::vector<float> b0 = {0.05f, -0.02f, 0.0f, 0.125f};
  MOERT_OK_OR_FAIL(moert_session_set_expert_bias(s.s, 0, b0.data(), 4));
  // Counts 3, 2, 2, 1 over 8 tokens: mean 2, so signs -, 0, 0, +.
  forward_route4(s.s, {0, 1, 0, 2, 3, 0, 1, 2});
  EXPECT_EQ(counts(s.s, MOERT_COUNTS_STEP), (std::vector<int64_t>{3, 2, 2, 1}));
  MOERT_OK_OR_FAIL(moert_session_step(s.s, nullptr, nullptr));
  const float g = 0.01f;
  EXPECT_EQ(read_bias(s.s), (std::vector<float>{b0[0] - g, b0[1], b0[2], b0[3] + g}));
  // The step's counts start again from zero.
  EXPECT_EQ(counts(s.s, MOERT_COUNTS_STEP), (std::vector<int64_t>{0, 0, 0, 0}));
}

TEST(LossFreeBias, CountsAccumulateOverMicroBatchesAndNotInEval) {
  Model model(MOERT_TEST_ROUTE4);
  Session s(model.m, MOERT_MODE_TRAINING);
  forward_route4(s.s, {0, 0, 1});
  forward_route4(s.s, {2, 0, 3});
  EXPECT_EQ(counts(s.s, MOERT_COUNTS_STEP), (std::vector<int64_t>{3, 1, 1, 1}));
  EXPECT_EQ(counts(s.s, MOERT_COUNTS_LAST), (std::vector<int64_t>{1, 0, 1, 1}));
  MOERT_OK_OR_FAIL(moert_session_set_eval(s.s, 1));
  forward_route4(s.s, {0, 0, 0, 0, 0, 0});
  EXPECT_EQ(counts(s.s, MOERT_COUNTS_STEP), (std::vector<int64_t>{3, 1, 1, 1}));
  EXPECT_EQ(counts(s.s, MOERT_COUNTS_EVAL), (std::vector<int64_t>{6, 0, 0, 0}));
  double vio = 0;
  MOERT_OK_OR_FAIL(moert_session_max_vio(s.s, 0, MOERT_COUNTS_EVAL, &vio));
  EXPECT_DOUBLE_EQ(vio, 3.0);  // (6 - 1.5) / 1.5
  MOERT_OK_OR_FAIL(moert_session_reset_metrics(s.s));
  EXPECT_EQ(counts(s.s, MOERT_COUNTS_EVAL), (std::vector<int64_t>{0, 0, 0, 0}));
  EXPECT_EQ(code_of(moert_session_step(s.s, nullptr, nullptr)), MOERT_ERR_INVALID_STATE);
  MOERT_OK_OR_FAIL(moert_session_set_eval(s.s, 0));
  MOERT_OK_OR_FAIL(moert_session_step(s.s, nullptr, nullptr));
  // Step counts 3, 1, 1, 1: mean 1.5.
  const float g = 0.01f;
  EXPECT_EQ(read_bias(s.s), (std::vector<float>{-g, g, g, g}));
}

// What keeps a training pass for its backward and what discards it: set_eval and a forward
// refused for its arguments keep it (a refused call changes nothing); an eval-mode forward and
// a forward that fails after accepting its arguments discard it.
TEST(PendingPass, SetEvalAndRefusedArgumentsKeepItAnEvalOrFailedForwardDiscardsIt) {
  Model model(MOERT_TEST_TINY);
  Session s(model.m, MOERT_MODE_TRAINING);
  constexpr uint64_t kRows = 8, kWidth = 4, kVocab = 64;
  std::vector<int32_t> tokens(kRows * kWidth), targets(kRows);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 5) % kVocab);
  for (size_t r = 0; r < kRows; ++r) targets[r] = tokens[r * kWidth];
  std::vector<float> logits(kRows * kVocab);
  auto forward = [&](const std::vector<int32_t>& t, uint64_t out_len, const uint8_t* mask,
                     uint64_t mask_len) {
    return code_of(
        mask
            ? moert_session_forward_tokens_masked(s.s, t.data(), t.size(), mask, mask_len, kRows,
                                                  logits.data(), out_len)
            : moert_session_forward_tokens(s.s, t.data(), t.size(), kRows, logits.data(), out_len));
  };
  auto backward = [&] {
    return code_of(moert_session_backward_loss(s.s, targets.data(), targets.size(), nullptr));
  };
  const uint64_t out_len = logits.size();

  ASSERT_EQ(forward(tokens, out_len, nullptr, 0), MOERT_OK);
  MOERT_OK_OR_FAIL(moert_session_set_eval(s.s, 1));
  MOERT_OK_OR_FAIL(moert_session_set_eval(s.s, 0));
  MOERT_OK_OR_FAIL(moert_session_set_eval(s.s, 0));
  EXPECT_EQ(backward(), MOERT_OK);

  std::vector<int32_t> bad_id = tokens;
  bad_id[5] = static_cast<int32_t>(kVocab);
  const std::vector<uint8_t> mask(kRows, 1);
  ASSERT_EQ(forward(tokens, out_len, nullptr, 0), MOERT_OK);
  EXPECT_EQ(forward(tokens, out_len - 1, nullptr, 0), MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(forward(bad_id, out_len, nullptr, 0), MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(forward(tokens, out_len, mask.data(), kRows - 1), MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(backward(), MOERT_OK);
  // A bad id on a padding row is no error at all.
  std::vector<uint8_t> pad = mask;
  pad[1] = 0;
  EXPECT_EQ(forward(bad_id, out_len, pad.data(), kRows), MOERT_OK);

  MOERT_OK_OR_FAIL(moert_session_set_eval(s.s, 1));
  ASSERT_EQ(forward(tokens, out_len, nullptr, 0), MOERT_OK);
  MOERT_OK_OR_FAIL(moert_session_set_eval(s.s, 0));
  EXPECT_EQ(backward(), MOERT_ERR_INVALID_STATE);

  // A forward that failed after accepting its arguments: a NaN in a hidden-state input, found
  // where the input was already copied in.
  Model r4(MOERT_TEST_ROUTE4);
  Session h(r4.m, MOERT_MODE_TRAINING);
  forward_route4(h.s, {0, 1});
  std::vector<float> x = one_hot_rows({2, 3}), y(x.size()), gout(x.size(), 1.0f);
  x[5] = NAN;
  EXPECT_EQ(code_of(moert_session_forward_hidden(h.s, x.data(), x.size(), 2, y.data(), y.size())),
            MOERT_ERR_NUMERIC);
  EXPECT_EQ(code_of(moert_session_backward(h.s, gout.data(), gout.size(), nullptr, 0, nullptr)),
            MOERT_ERR_INVALID_STATE);
}

// A gradient written with set_gradient and no backward is the step's gradient as written (it
// was once ignored, though read back and counted as a step); a step with neither moves nothing.
TEST(Step, AWrittenGradientWithoutABackwardIsAppliedAsWritten) {
  Model model(MOERT_TEST_TINY);
  Session s(model.m, MOERT_MODE_TRAINING, "sgd");
  MOERT_OK_OR_FAIL(moert_session_set_config(s.s, "momentum", "0"));
  MOERT_OK_OR_FAIL(moert_session_set_config(s.s, "weight_decay", "0"));
  const char* name = "norm0.weight";
  uint64_t n = 0;
  uint32_t count = 0;
  MOERT_OK_OR_FAIL(moert_session_num_parameters(s.s, &count));
  for (uint32_t i = 0; i < count; ++i) {
    const char* pn = nullptr;
    uint64_t numel = 0;
    MOERT_OK_OR_FAIL(moert_session_parameter_info(s.s, i, &pn, &numel));
    if (std::string(pn) == name) n = numel;
  }
  ASSERT_GT(n, 0u);
  std::vector<float> before(n), after(n);
  MOERT_OK_OR_FAIL(moert_session_get_parameter(s.s, name, before.data(), n));

  // Nothing accumulated, nothing written: the parameters stay, the step still counts.
  MOERT_OK_OR_FAIL(moert_session_zero_grad(s.s));
  double lr = 0, norm = -1;
  MOERT_OK_OR_FAIL(moert_session_step(s.s, &lr, &norm));
  EXPECT_EQ(norm, 0.0);
  MOERT_OK_OR_FAIL(moert_session_get_parameter(s.s, name, after.data(), n));
  EXPECT_EQ(after, before);

  const std::vector<float> g(n, 1.0f);
  MOERT_OK_OR_FAIL(moert_session_set_gradient(s.s, name, g.data(), n));
  MOERT_OK_OR_FAIL(moert_session_step(s.s, &lr, &norm));
  EXPECT_DOUBLE_EQ(norm, std::sqrt(static_cast<double>(n)));
  MOERT_OK_OR_FAIL(moert_session_get_parameter(s.s, name, after.data(), n));
  for (uint64_t i = 0; i < n; ++i)
    EXPECT_FLOAT_EQ(after[i], before[i] - static_cast<float>(lr)) << i;
  uint64_t steps = 0;
  MOERT_OK_OR_FAIL(moert_session_step_count(s.s, &steps));
  EXPECT_EQ(steps, 2u);
}

TEST(LossFreeBias, GammaScheduleAndFreeze) {
  Model model(MOERT_TEST_ROUTE4);
  Session s(model.m, MOERT_MODE_TRAINING);
  MOERT_OK_OR_FAIL(moert_session_set_bias_update_rate(s.s, MOERT_ALL_LAYERS, 0.25));
  forward_route4(s.s, {0, 0, 1, 2});
  MOERT_OK_OR_FAIL(moert_session_step(s.s, nullptr, nullptr));
  EXPECT_EQ(read_bias(s.s), (std::vector<float>{-0.25f, 0.0f, 0.0f, 0.25f}));
  // gamma = 0: no update (V3 sets it to zero for the final tokens).
  MOERT_OK_OR_FAIL(moert_session_set_bias_update_rate(s.s, 0, 0.0));
  forward_route4(s.s, {0, 0, 1, 2});
  MOERT_OK_OR_FAIL(moert_session_step(s.s, nullptr, nullptr));
  EXPECT_EQ(read_bias(s.s), (std::vector<float>{-0.25f, 0.0f, 0.0f, 0.25f}));
  MOERT_OK_OR_FAIL(moert_session_set_bias_update_rate(s.s, 0, 0.25));
  MOERT_OK_OR_FAIL(moert_session_set_bias_frozen(s.s, 0, 1));
  forward_route4(s.s, {0, 0, 1, 2});
  MOERT_OK_OR_FAIL(moert_session_step(s.s, nullptr, nullptr));
  EXPECT_EQ(read_bias(s.s), (std::vector<float>{-0.25f, 0.0f, 0.0f, 0.25f}));
  MOERT_OK_OR_FAIL(moert_session_set_bias_frozen(s.s, 0, 0));
  forward_route4(s.s, {3, 3, 3, 3});
  MOERT_OK_OR_FAIL(moert_session_step(s.s, nullptr, nullptr));
  EXPECT_EQ(read_bias(s.s), (std::vector<float>{0.0f, 0.25f, 0.25f, 0.0f}));
  EXPECT_EQ(code_of(moert_session_set_bias_update_rate(s.s, 0, -1.0)), MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(code_of(moert_session_set_bias_update_rate(s.s, 0, NAN)), MOERT_ERR_INVALID_ARGUMENT);
}

TEST(LossFreeBias, CenteringKeepsTheBiasZeroMean) {
  Model model(MOERT_TEST_ROUTE4_CENTERED);
  Session s(model.m, MOERT_MODE_TRAINING);
  const std::vector<float> b0 = {0.5f, 0.25f, -0.25f, 0.0f};
  MOERT_OK_OR_FAIL(moert_session_set_expert_bias(s.s, 0, b0.data(), 4));
  // Counts 3, 1, 0, 0 over 4 tokens: mean 1, signs -, 0, +, +. The update gives
  // {0.49, 0.25, -0.24, 0.01}, whose mean 0.1275 is then subtracted.
  forward_route4(s.s, {0, 0, 0, 1});
  MOERT_OK_OR_FAIL(moert_session_step(s.s, nullptr, nullptr));
  const std::vector<float> b = read_bias(s.s);
  const float g = 0.01f;
  const std::vector<float> updated = {b0[0] - g, b0[1], b0[2] + g, b0[3] + g};
  const float mean =
      static_cast<float>((double{updated[0]} + updated[1] + updated[2] + updated[3]) / 4.0);
  for (int e = 0; e < 4; ++e) EXPECT_EQ(b[e], updated[e] - mean) << e;
  EXPECT_NEAR(b[0] + b[1] + b[2] + b[3], 0.0f, 1e-6f);
}

TEST(Optimizer, ClippingScalesTheGradientToTheConfiguredNorm) {
  Model model(MOERT_TEST_ROUTE4);
  Session s(model.m, MOERT_MODE_TRAINING, "sgd");
  MOERT_OK_OR_FAIL(moert_session_set_config(s.s, "momentum", "0"));
  MOERT_OK_OR_FAIL(moert_session_set_config(s.s, "lr", "1"));
  MOERT_OK_OR_FAIL(moert_session_set_config(s.s, "clip_norm", "0.001"));
  MOERT_OK_OR_FAIL(moert_session_zero_grad(s.s));
  forward_route4(s.s, {0, 1, 2, 3});
  std::vector<float> gout(16, 1.0f);
  MOERT_OK_OR_FAIL(moert_session_backward(s.s, gout.data(), gout.size(), nullptr, 0, nullptr));
  const char* names[] = {"moe.gate", "moe.w1", "moe.w3", "moe.w2"};
  std::vector<std::vector<float>> before, grads;
  double sq = 0.0;
  for (const char* n : names) {
    const size_t len = std::string(n) == "moe.gate" ? 16 : 48;
    std::vector<float> p(len), g(len);
    MOERT_OK_OR_FAIL(moert_session_get_parameter(s.s, n, p.data(), len));
    MOERT_OK_OR_FAIL(moert_session_get_gradient(s.s, n, g.data(), len));
    for (float v : g) sq += double{v} * v;
    before.push_back(p);
    grads.push_back(g);
  }
  double lr = 0, norm = 0;
  MOERT_OK_OR_FAIL(moert_session_step(s.s, &lr, &norm));
  EXPECT_NEAR(norm, std::sqrt(sq), 1e-9 * std::sqrt(sq));
  ASSERT_GT(norm, 0.01);  // well above the clip: clipping really happens
  // Each parameter moved by lr * g * clip / norm.
  double moved = 0.0;
  for (size_t i = 0; i < 4; ++i) {
    std::vector<float> p(before[i].size());
    MOERT_OK_OR_FAIL(moert_session_get_parameter(s.s, names[i], p.data(), p.size()));
    for (size_t j = 0; j < p.size(); ++j) {
      const double d = double{before[i][j]} - p[j];
      // Up to the fp32 rounding of parameters of magnitude up to 4.
      EXPECT_NEAR(d, grads[i][j] * 0.001 / norm, 1e-6) << names[i] << " " << j;
      moved += d * d;
    }
  }
  EXPECT_NEAR(std::sqrt(moved), 0.001, 1e-5);
}

TEST(LossFreeBias, BiasSteersSelectionButGateWeightsStayUnbiased) {
  Model model(MOERT_TEST_ROUTE4);
  Session plain(model.m, MOERT_MODE_TRAINING);
  Session biased(model.m, MOERT_MODE_TRAINING);
  // Row 0 routes to expert 0 (score sigmoid(4)); a bias of +1 on expert 2 moves it there, and its
  // weight must be expert 2's unbiased score sigmoid(0) = 0.5.
  const std::vector<float> b = {0.0f, 0.0f, 1.0f, 0.0f};
  MOERT_OK_OR_FAIL(moert_session_set_expert_bias(biased.s, 0, b.data(), 4));
  MOERT_OK_OR_FAIL(moert_session_set_eval(biased.s, 1));
  forward_route4(biased.s, {0});
  EXPECT_EQ(counts(biased.s, MOERT_COUNTS_LAST), (std::vector<int64_t>{0, 0, 1, 0}));
  // The bias is not a parameter and gets no gradient.
  uint32_t n = 0;
  MOERT_OK_OR_FAIL(moert_session_num_parameters(biased.s, &n));
  for (uint32_t i = 0; i < n; ++i) {
    const char* name = nullptr;
    MOERT_OK_OR_FAIL(moert_session_parameter_info(biased.s, i, &name, nullptr));
    EXPECT_EQ(std::string(name).find("bias"), std::string::npos) << name;
  }
  std::vector<float> w1(4 * 3 * 4), w3(w1.size()), w2(w1.size());
  // y = x + 0.5 * FFN_2(x): compare with the same expert run with weight 1 through a session whose
  // gate makes the unbiased choice: compute FFN_2 directly from the parameters.
  MOERT_OK_OR_FAIL(moert_session_get_parameter(biased.s, "moe.w1", w1.data(), w1.size()));
  MOERT_OK_OR_FAIL(moert_session_get_parameter(biased.s, "moe.w3", w3.data(), w3.size()));
  MOERT_OK_OR_FAIL(moert_session_get_parameter(biased.s, "moe.w2", w2.data(), w2.size()));
  const float x[4] = {1, 0, 0, 0};
  float y[4];
  MOERT_OK_OR_FAIL(moert_session_forward_hidden(biased.s, x, 4, 1, y, 4));
  double h[3];
  for (int j = 0; j < 3; ++j) {
    const double a = w1[(2 * 3 + j) * 4 + 0], c = w3[(2 * 3 + j) * 4 + 0];
    h[j] = a / (1 + std::exp(-a)) * c;
  }
  for (int d = 0; d < 4; ++d) {
    double f = 0;
    for (int j = 0; j < 3; ++j) f += w2[(2 * 4 + d) * 3 + j] * h[j];
    EXPECT_NEAR(y[d], x[d] + 0.5 * f, 1e-6) << d;
  }
}

// Deterministic micro-batches of the tiny example model: rows of 4 token ids and a target each.
struct Batch {
  std::vector<int32_t> tokens, targets;
};

Batch batch(int step, int micro) {
  Batch b;
  const int rows = 32;
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < 4; ++c) b.tokens.push_back((step * 131 + micro * 17 + r * 7 + c * 3) % 64);
    b.targets.push_back((step * 29 + micro * 5 + r * 11) % 64);
  }
  return b;
}

double train_micro(moert_session* s, int step, int micro) {
  const Batch b = batch(step, micro);
  std::vector<float> logits(b.targets.size() * 64);
  moert_status* st = moert_session_forward_tokens(s, b.tokens.data(), b.tokens.size(),
                                                  b.targets.size(), logits.data(), logits.size());
  EXPECT_EQ(st, nullptr) << moert_status_message(st);
  moert_status_free(st);
  double loss = 0;
  st = moert_session_backward_loss(s, b.targets.data(), b.targets.size(), &loss);
  EXPECT_EQ(st, nullptr) << moert_status_message(st);
  moert_status_free(st);
  return loss;
}

std::vector<double> train_steps(moert_session* s, int from, int to) {
  std::vector<double> losses;
  for (int step = from; step < to; ++step) {
    moert_status_free(moert_session_zero_grad(s));
    for (int micro = 0; micro < 2; ++micro) losses.push_back(train_micro(s, step, micro));
    moert_status* st = moert_session_step(s, nullptr, nullptr);
    EXPECT_EQ(st, nullptr) << moert_status_message(st);
    moert_status_free(st);
  }
  return losses;
}

// Every parameter, bias and the step count, for bitwise comparison.
std::vector<float> snapshot(const moert_session* s) {
  std::vector<float> all = moert_test::all_parameters(s);
  for (uint32_t layer : {2u, 4u}) {
    std::vector<float> b(8);
    moert_status_free(moert_session_get_expert_bias(s, layer, b.data(), 8));
    all.insert(all.end(), b.begin(), b.end());
  }
  uint64_t step = 0;
  moert_status_free(moert_session_step_count(s, &step));
  all.push_back(static_cast<float>(step));
  return all;
}

class Checkpoint : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    dir_ =
        fs::temp_directory_path() / ("moert-ckpt-" + std::to_string(::getpid()) + "-" + GetParam());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_P(Checkpoint, ResumeContinuesBitIdentically) {
  Model model(MOERT_TEST_TINY);
  const std::string path = (dir_ / "ck.moert").string();
  Session a(model.m, MOERT_MODE_TRAINING, GetParam());
  train_steps(a.s, 0, 3);
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  const auto tail_a = train_steps(a.s, 3, 6);

  Session b(model.m, MOERT_MODE_TRAINING, GetParam(), 3);
  MOERT_OK_OR_FAIL(moert_session_load(b.s, path.c_str()));
  const auto tail_b = train_steps(b.s, 3, 6);
  EXPECT_EQ(tail_a, tail_b);
  EXPECT_EQ(snapshot(a.s), snapshot(b.s));
  // The loss moved: the run really trained.
  EXPECT_NE(tail_a.front(), tail_a.back());
}

TEST_P(Checkpoint, ResumeBetweenMicroBatchesKeepsTheAccumulatedGradient) {
  Model model(MOERT_TEST_TINY);
  const std::string path = (dir_ / "mid.moert").string();
  Session a(model.m, MOERT_MODE_TRAINING, GetParam());
  train_steps(a.s, 0, 2);
  MOERT_OK_OR_FAIL(moert_session_zero_grad(a.s));
  train_micro(a.s, 2, 0);
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  train_micro(a.s, 2, 1);
  MOERT_OK_OR_FAIL(moert_session_step(a.s, nullptr, nullptr));

  Session b(model.m, MOERT_MODE_TRAINING, GetParam());
  MOERT_OK_OR_FAIL(moert_session_load(b.s, path.c_str()));
  train_micro(b.s, 2, 1);
  MOERT_OK_OR_FAIL(moert_session_step(b.s, nullptr, nullptr));
  EXPECT_EQ(snapshot(a.s), snapshot(b.s));
}

INSTANTIATE_TEST_SUITE_P(Optimizers, Checkpoint, ::testing::Values("adamw", "sgd"));

class CheckpointFiles : public Checkpoint {};

TEST_P(CheckpointFiles, CorruptOrTruncatedCheckpointIsRefusedAndTheSessionKeepsItsState) {
  Model model(MOERT_TEST_TINY);
  const std::string path = (dir_ / "ck.moert").string();
  Session a(model.m, MOERT_MODE_TRAINING);
  train_steps(a.s, 0, 2);
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  ASSERT_GT(bytes.size(), 1000u);

  Session b(model.m, MOERT_MODE_TRAINING);
  train_steps(b.s, 0, 1);
  const auto before = snapshot(b.s);
  const std::string bad = (dir_ / "bad.moert").string();
  // What loading the intact checkpoint gives: a damaged file may only load if it means the same.
  Session ref(model.m, MOERT_MODE_TRAINING);
  MOERT_OK_OR_FAIL(moert_session_load(ref.s, path.c_str()));
  const auto intact = snapshot(ref.s);
  int refusals = 0;
  auto try_load = [&](const std::vector<char>& content, const std::string& what) {
    std::ofstream(bad, std::ios::binary).write(content.data(), static_cast<long>(content.size()));
    std::string msg;
    const int32_t code = code_of(moert_session_load(b.s, bad.c_str()), &msg);
    if (code != MOERT_OK) {
      ++refusals;
      EXPECT_FALSE(msg.empty()) << what;
      EXPECT_EQ(snapshot(b.s), before) << what;
      return;
    }
    // Accepted: the damage hit padding, and the state is exactly the checkpoint's.
    EXPECT_EQ(snapshot(b.s), intact) << what << " was accepted with different content";
    Session fresh(model.m, MOERT_MODE_TRAINING);
    train_steps(fresh.s, 0, 1);
    std::swap(b.s, fresh.s);  // continue with an untouched session
  };
  int tries = 0;
  for (size_t len :
       {size_t{0}, size_t{7}, size_t{100}, bytes.size() / 2, bytes.size() - 8, bytes.size() - 1}) {
    ++tries;
    try_load(std::vector<char>(bytes.begin(), bytes.begin() + static_cast<long>(len)),
             "truncated to " + std::to_string(len));
  }
  // Single damaged bytes across the file, weights and training state included.
  for (size_t pos = 0; pos < bytes.size(); pos += bytes.size() / 97 + 1) {
    ++tries;
    auto c = bytes;
    c[pos] = static_cast<char>(c[pos] ^ 0x10);
    try_load(c, "byte " + std::to_string(pos) + " damaged");
  }
  // Padding is a small part of the file: nearly every damage must be caught.
  EXPECT_GE(refusals, tries * 9 / 10) << refusals << " of " << tries << " damaged files refused";
  // A plain model file is not a checkpoint.
  std::string msg;
  EXPECT_EQ(code_of(moert_session_load(b.s, MOERT_TEST_TINY), &msg), MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(msg.find("not a checkpoint"), std::string::npos) << msg;
  // Another architecture.
  Model other(MOERT_TEST_ROUTE4);
  Session c(other.m, MOERT_MODE_TRAINING);
  const std::string other_path = (dir_ / "other.moert").string();
  MOERT_OK_OR_FAIL(moert_session_save(c.s, other_path.c_str()));
  EXPECT_EQ(code_of(moert_session_load(b.s, other_path.c_str())), MOERT_ERR_INVALID_ARGUMENT);
  // The larger model's trained checkpoint into the smaller one: past the limit the session's
  // own size sets, which no load option raises; the error names the likely cause instead.
  EXPECT_EQ(code_of(moert_session_load(c.s, path.c_str()), &msg), MOERT_ERR_LIMIT);
  EXPECT_NE(msg.find("another, larger model"), std::string::npos) << msg;
  // Another optimizer.
  Session sgd(model.m, MOERT_MODE_TRAINING, "sgd");
  EXPECT_EQ(code_of(moert_session_load(sgd.s, path.c_str()), &msg), MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(msg.find("adamw"), std::string::npos) << msg;
  EXPECT_EQ(snapshot(b.s), before);
  // The session still trains.
  train_steps(b.s, 1, 2);
  (void)before;
}

TEST_P(CheckpointFiles, SaveIsAtomicAndTheCheckpointIsAModel) {
  Model model(MOERT_TEST_TINY);
  Session a(model.m, MOERT_MODE_TRAINING);
  train_steps(a.s, 0, 2);
  const std::string path = (dir_ / "ck.moert").string();
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  train_steps(a.s, 2, 3);
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));  // overwrite in place
  // The description and the data file of its large arrays (the tiny model's expert weights reach
  // 64 KiB); the previous checkpoint's data file is gone, and no temporary file is left.
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir_)) files.push_back(e.path().filename());
  std::sort(files.begin(), files.end());
  ASSERT_EQ(files.size(), 2u) << testing::PrintToString(files);
  EXPECT_EQ(files[0], "ck.moert");
  EXPECT_TRUE(files[1].starts_with("ck.moert.") && files[1].ends_with(".data") &&
              files[1].size() == std::string("ck.moert.").size() + 16 + 5)
      << files[1];
  // Into a directory that does not exist: an I/O error, nothing written.
  EXPECT_EQ(code_of(moert_session_save(a.s, (dir_ / "no" / "such.moert").c_str())), MOERT_ERR_IO);
  // An inference session from the checkpoint computes what the training session computes in eval.
  Model trained(path.c_str());
  moert_session* inf = nullptr;
  MOERT_OK_OR_FAIL(moert_session_create(trained.m, nullptr, &inf));
  MOERT_OK_OR_FAIL(moert_session_set_eval(a.s, 1));
  const Batch b = batch(9, 0);
  std::vector<float> y1(b.targets.size() * 64), y2(y1.size());
  MOERT_OK_OR_FAIL(moert_session_forward_tokens(a.s, b.tokens.data(), b.tokens.size(),
                                                b.targets.size(), y1.data(), y1.size()));
  MOERT_OK_OR_FAIL(moert_session_forward_tokens(inf, b.tokens.data(), b.tokens.size(),
                                                b.targets.size(), y2.data(), y2.size()));
  EXPECT_EQ(y1, y2);
  std::vector<float> bias_a(8), bias_i(8);
  MOERT_OK_OR_FAIL(moert_session_get_expert_bias(a.s, 2, bias_a.data(), 8));
  MOERT_OK_OR_FAIL(moert_session_get_expert_bias(inf, 2, bias_i.data(), 8));
  EXPECT_EQ(bias_a, bias_i);
  moert_session_free(inf);
}

// A checkpoint loaded as a model tells its step and the loss-free bias's rate and freeze as saved
// (what a resumed run goes on with), where a plain model says it is none.
TEST_P(CheckpointFiles, AModelFromACheckpointTellsItsStepAndBalancingAsSaved) {
  Model model(MOERT_TEST_TINY);
  int32_t is_checkpoint = -1;
  uint64_t step = 9;
  MOERT_OK_OR_FAIL(moert_model_checkpoint_step(model.m, &is_checkpoint, &step));
  EXPECT_EQ(is_checkpoint, 0);
  EXPECT_EQ(step, 0u);
  int64_t frozen = -1;
  double rate = -1.0, described = -1.0;
  std::string message;
  EXPECT_EQ(
      code_of(moert_model_moe_int(model.m, 2, MOERT_MOE_SAVED_BIAS_FROZEN, &frozen), &message),
      MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(message.find("not loaded from a checkpoint"), std::string::npos) << message;
  EXPECT_EQ(code_of(moert_model_checkpoint_step(model.m, nullptr, &step)),
            MOERT_ERR_INVALID_ARGUMENT);
  MOERT_OK_OR_FAIL(moert_model_moe_float(model.m, 2, MOERT_MOE_BIAS_UPDATE_RATE, &described));

  Session a(model.m, MOERT_MODE_TRAINING);
  train_steps(a.s, 0, 3);
  MOERT_OK_OR_FAIL(moert_session_set_bias_update_rate(a.s, 2, 0.25));
  const std::string path = (dir_ / "ck.moert").string();
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  {
    Model saved(path.c_str());
    MOERT_OK_OR_FAIL(moert_model_checkpoint_step(saved.m, &is_checkpoint, &step));
    EXPECT_EQ(is_checkpoint, 1);
    EXPECT_EQ(step, 3u);
    MOERT_OK_OR_FAIL(moert_model_moe_float(saved.m, 2, MOERT_MOE_SAVED_BIAS_UPDATE_RATE, &rate));
    MOERT_OK_OR_FAIL(moert_model_moe_int(saved.m, 2, MOERT_MOE_SAVED_BIAS_FROZEN, &frozen));
    EXPECT_EQ(rate, 0.25);
    EXPECT_EQ(frozen, 0);
    double still = -1.0;  // the description's own rate is the model's, not the run's
    MOERT_OK_OR_FAIL(moert_model_moe_float(saved.m, 2, MOERT_MOE_BIAS_UPDATE_RATE, &still));
    EXPECT_EQ(still, described);
    // A model made from it is not the checkpoint.
    moert_model* q = nullptr;
    MOERT_OK_OR_FAIL(moert_model_quantize_fp8(saved.m, 0, &q, nullptr));
    MOERT_OK_OR_FAIL(moert_model_checkpoint_step(q, &is_checkpoint, &step));
    EXPECT_EQ(is_checkpoint, 0);
    moert_model_free(q);
  }
  MOERT_OK_OR_FAIL(moert_session_set_bias_frozen(a.s, 2, 1));
  train_steps(a.s, 3, 4);
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  Model saved(path.c_str());
  MOERT_OK_OR_FAIL(moert_model_checkpoint_step(saved.m, &is_checkpoint, &step));
  EXPECT_EQ(step, 4u);
  MOERT_OK_OR_FAIL(moert_model_moe_int(saved.m, 2, MOERT_MOE_SAVED_BIAS_FROZEN, &frozen));
  EXPECT_EQ(frozen, 1);
}

// A copy of a checkpoint's description beside it (`cp ck.moert best.moert`, keeping the best
// one while training goes on) names the same data file. Later saves to ck.moert remove the data
// files of their earlier checkpoints, but not one a description still names: the copy loads after
// them. Once nothing names it any more, the next save removes it.
TEST_P(CheckpointFiles, ACopiedDescriptionKeepsItsDataFile) {
  Model model(MOERT_TEST_TINY);
  Session a(model.m, MOERT_MODE_TRAINING);
  train_steps(a.s, 0, 2);
  const std::string path = (dir_ / "ck.moert").string();
  const std::string best = (dir_ / "best.moert").string();
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  const std::vector<float> at_best = snapshot(a.s);
  fs::copy_file(path, best);
  auto data_files = [&] {
    size_t n = 0;
    for (const auto& e : fs::directory_iterator(dir_)) n += e.path().extension() == ".data";
    return n;
  };
  ASSERT_EQ(data_files(), 1u);
  for (int i = 0; i < 2; ++i) {
    train_steps(a.s, 2 + i, 3 + i);
    MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  }
  // best.moert's data file, and the latest checkpoint's; the one in between is gone.
  EXPECT_EQ(data_files(), 2u);
  Session b(model.m, MOERT_MODE_TRAINING);
  MOERT_OK_OR_FAIL(moert_session_load(b.s, best.c_str()));
  EXPECT_EQ(snapshot(b.s), at_best);
  MOERT_OK_OR_FAIL(moert_session_load(b.s, path.c_str()));
  EXPECT_EQ(snapshot(b.s), snapshot(a.s));
  // Files that name nothing: a FIFO (never opened), and the first 16 bytes of the copy, which
  // begin like a description but stop before its data file's name, last written long enough ago
  // not to be a copy in progress.
  ASSERT_EQ(::mkfifo((dir_ / "fifo").c_str(), 0600), 0);
  {
    std::ifstream in(best, std::ios::binary);
    std::vector<char> head(16);
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    std::ofstream(dir_ / "truncated.moert", std::ios::binary)
        .write(head.data(), static_cast<std::streamsize>(head.size()));
    fs::last_write_time(dir_ / "truncated.moert",
                        fs::file_time_type::clock::now() - std::chrono::hours(1));
  }
  fs::remove(best);
  train_steps(a.s, 4, 5);
  MOERT_OK_OR_FAIL(moert_session_save(a.s, path.c_str()));
  EXPECT_EQ(data_files(), 1u) << "nothing names the copy's data file any more";
  MOERT_OK_OR_FAIL(moert_session_load(b.s, path.c_str()));
  EXPECT_EQ(snapshot(b.s), snapshot(a.s));
}

// Two sessions saving to one path at the same time, over and over (two writers, as two
// processes would be): saves into one directory take turns, so each save's clean-up leaves the
// other's files alone. Every save succeeds and the checkpoint left is one of the two, whole.
TEST_P(CheckpointFiles, ConcurrentSavesToOnePathLeaveOneWholeCheckpoint) {
  Model model(MOERT_TEST_TINY);
  Session a(model.m, MOERT_MODE_TRAINING), b(model.m, MOERT_MODE_TRAINING);
  train_steps(a.s, 0, 1);
  train_steps(b.s, 0, 2);
  const std::string path = (dir_ / "ck.moert").string();
  std::vector<std::string> failures;
  std::mutex mu;
  auto saver = [&](moert_session* s) {
    for (int i = 0; i < 12; ++i) {
      std::string msg;
      if (code_of(moert_session_save(s, path.c_str()), &msg) != MOERT_OK) {
        std::lock_guard<std::mutex> lock(mu);
        failures.push_back(msg);
      }
    }
  };
  std::thread ta(saver, a.s), tb(saver, b.s);
  ta.join();
  tb.join();
  EXPECT_TRUE(failures.empty()) << testing::PrintToString(failures);
  Session c(model.m, MOERT_MODE_TRAINING);
  MOERT_OK_OR_FAIL(moert_session_load(c.s, path.c_str()));
  const std::vector<float> got = snapshot(c.s);
  EXPECT_TRUE(got == snapshot(a.s) || got == snapshot(b.s));
  size_t files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 2u) << "the description and its data file, nothing else";
}

INSTANTIATE_TEST_SUITE_P(Files, CheckpointFiles, ::testing::Values("files"));

TEST(TrainingMisuse, ClearStatusesAndNoStateChange) {
  Model model(MOERT_TEST_TINY);
  Session inf(model.m, MOERT_MODE_INFERENCE);
  const Batch b = batch(0, 0);
  double loss;
  EXPECT_EQ(code_of(moert_session_backward_loss(inf.s, b.targets.data(), b.targets.size(), &loss)),
            MOERT_ERR_INVALID_STATE);
  EXPECT_EQ(code_of(moert_session_step(inf.s, nullptr, nullptr)), MOERT_ERR_INVALID_STATE);
  EXPECT_EQ(code_of(moert_session_save(inf.s, "/tmp/never.moert")), MOERT_ERR_INVALID_STATE);

  Session t(model.m, MOERT_MODE_TRAINING);
  std::string msg;
  EXPECT_EQ(
      code_of(moert_session_backward_loss(t.s, b.targets.data(), b.targets.size(), &loss), &msg),
      MOERT_ERR_INVALID_STATE);
  EXPECT_NE(msg.find("forward"), std::string::npos) << msg;
  std::vector<float> logits(b.targets.size() * 64);
  MOERT_OK_OR_FAIL(moert_session_forward_tokens(t.s, b.tokens.data(), b.tokens.size(),
                                                b.targets.size(), logits.data(), logits.size()));
  EXPECT_EQ(code_of(moert_session_backward_loss(t.s, b.targets.data(), 5, &loss)),
            MOERT_ERR_INVALID_ARGUMENT);
  std::vector<int32_t> wrong = b.targets;
  wrong[3] = 64;
  EXPECT_EQ(code_of(moert_session_backward_loss(t.s, wrong.data(), wrong.size(), &loss), &msg),
            MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(msg.find("row 3"), std::string::npos) << msg;
  // The failed calls left the forward pass usable.
  MOERT_OK_OR_FAIL(moert_session_backward_loss(t.s, b.targets.data(), b.targets.size(), &loss));
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_EQ(code_of(moert_session_backward_loss(t.s, b.targets.data(), b.targets.size(), &loss)),
            MOERT_ERR_INVALID_STATE);
  std::vector<float> g(4);
  EXPECT_EQ(code_of(moert_session_get_gradient(t.s, "no.such", g.data(), 4), &msg),
            MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(msg.find("no.such"), std::string::npos) << msg;
  EXPECT_EQ(code_of(moert_session_get_gradient(t.s, "head.weight", g.data(), 4)),
            MOERT_ERR_INVALID_ARGUMENT);
  std::vector<float> nan_param(64 * 16, NAN);
  EXPECT_EQ(
      code_of(moert_session_set_parameter(t.s, "embed.weight", nan_param.data(), nan_param.size())),
      MOERT_ERR_NUMERIC);
  MOERT_OK_OR_FAIL(moert_session_step(t.s, nullptr, nullptr));
  EXPECT_EQ(code_of(moert_session_set_config(t.s, "optimizer", "sgd")), MOERT_ERR_INVALID_STATE);
  EXPECT_EQ(code_of(moert_session_set_config(t.s, "lr", "-1")), MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(code_of(moert_session_set_config(t.s, "no_such_knob", "1")),
            MOERT_ERR_INVALID_ARGUMENT);
  MOERT_OK_OR_FAIL(moert_session_set_config(t.s, "lr", "0.5"));
  // sequence_length counts rows in 32 bits: more is refused, not cut to 2^31 - 1.
  MOERT_OK_OR_FAIL(moert_session_set_config(t.s, "sequence_length", "2147483647"));
  for (const char* v : {"2147483648", "4294967304", "18446744073709551615"}) {
    EXPECT_EQ(code_of(moert_session_set_config(t.s, "sequence_length", v), &msg),
              MOERT_ERR_INVALID_ARGUMENT)
        << v;
    EXPECT_NE(msg.find("[0, 2147483647]"), std::string::npos) << msg;
  }
  MOERT_OK_OR_FAIL(moert_session_set_config(t.s, "sequence_length", "0"));
  // A training pass's rows are whole sequences; an eval-mode pass computes no sequence-wise loss
  // and takes a batch that ends in a partial one.
  {
    Model r4(MOERT_TEST_ROUTE4);
    Session e(r4.m, MOERT_MODE_TRAINING);
    MOERT_OK_OR_FAIL(moert_session_set_config(e.s, "sequence_length", "4"));
    const auto x = one_hot_rows({0, 1, 2, 3, 0, 1});
    std::vector<float> y(x.size());
    EXPECT_EQ(
        code_of(moert_session_forward_hidden(e.s, x.data(), x.size(), 6, y.data(), y.size()), &msg),
        MOERT_ERR_INVALID_ARGUMENT);
    EXPECT_NE(msg.find("multiple of sequence_length = 4"), std::string::npos) << msg;
    MOERT_OK_OR_FAIL(moert_session_set_eval(e.s, 1));
    MOERT_OK_OR_FAIL(moert_session_forward_hidden(e.s, x.data(), x.size(), 6, y.data(), y.size()));
  }
  EXPECT_EQ(code_of(moert_session_set_config(t.s, "cuda_plugin", "/elsewhere/libmoert_cuda.so")),
            MOERT_ERR_INVALID_STATE);
  // An inference session takes the knobs that act on it, and refuses the training ones (once
  // accepted and never used).
  EXPECT_EQ(code_of(moert_session_set_config(inf.s, "lr", "0.1"), &msg), MOERT_ERR_INVALID_STATE);
  EXPECT_NE(msg.find("inference mode"), std::string::npos) << msg;
  EXPECT_EQ(code_of(moert_session_set_config(inf.s, "sequence_length", "4")),
            MOERT_ERR_INVALID_STATE);
  EXPECT_EQ(code_of(moert_session_set_config(inf.s, "lr", "-1")), MOERT_ERR_INVALID_STATE);
  MOERT_OK_OR_FAIL(moert_session_set_config(inf.s, "check_finite", "false"));
  MOERT_OK_OR_FAIL(moert_session_set_config(inf.s, "ep_chunks", "4"));

  // A hidden-state model: NaN in the output gradient; grad_in of the wrong size.
  Model r4(MOERT_TEST_ROUTE4);
  Session h(r4.m, MOERT_MODE_TRAINING);
  forward_route4(h.s, {0, 1});
  std::vector<float> gout(8, 1.0f), gin(8);
  gout[5] = NAN;
  EXPECT_EQ(code_of(moert_session_backward(h.s, gout.data(), 8, gin.data(), 8, nullptr)),
            MOERT_ERR_NUMERIC);
  gout[5] = 1.0f;
  EXPECT_EQ(code_of(moert_session_backward(h.s, gout.data(), 8, gin.data(), 7, nullptr)),
            MOERT_ERR_INVALID_ARGUMENT);
  // A length without its buffer is refused, not taken for "no input gradient wanted".
  std::string why;
  EXPECT_EQ(code_of(moert_session_backward(h.s, gout.data(), 8, nullptr, 8, nullptr), &why),
            MOERT_ERR_INVALID_ARGUMENT);
  EXPECT_NE(why.find("grad_in is NULL but grad_in_len is 8"), std::string::npos) << why;
  MOERT_OK_OR_FAIL(moert_session_backward(h.s, gout.data(), 8, gin.data(), 8, nullptr));
  // Residual: the input gradient is at least the output gradient's pass-through plus the experts.
  bool differs = false;
  for (int i = 0; i < 8; ++i) differs |= gin[i] != gout[i];
  EXPECT_TRUE(differs);
}

}  // namespace
