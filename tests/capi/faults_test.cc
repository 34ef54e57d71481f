// Regression tests for the faults outside testing found (overflow from finite inputs, failed
// calls that left a trace, padding, UTF-8 in messages, a router that cannot learn), each the
// exact input of the report and the right result, plus the rest of its kind.
#include <gtest/gtest.h>
#include <moert/moert.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "capi_test_util.h"
#include "model_builder.h"

namespace {

using namespace capi_test;

constexpr float kInf = std::numeric_limits<float>::infinity();

ModelPtr load(const ModelDesc& desc) {
  const std::vector<uint8_t> bytes = build(desc);
  moert_model* m = nullptr;
  moert_status* st = moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &m);
  EXPECT_TRUE(IsOk(st));
  return ModelPtr(m);
}

SessionPtr session(const moert_model* model, int32_t mode, const char* check_finite = "true",
                   const char* precision = "fp32") {
  moert_session_options* o = nullptr;
  EXPECT_TRUE(IsOk(moert_session_options_create(&o)));
  OptionsPtr opts(o);
  EXPECT_TRUE(IsOk(moert_session_options_set_mode(o, mode)));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "check_finite", check_finite)));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "precision", precision)));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "lr", "0.01")));
  moert_session* s = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model, o, &s)));
  return SessionPtr(s);
}

// One MoE layer over hidden states of width `dim` with E experts of hidden 4, every tensor inline.
ModelDesc one_moe(uint32_t dim, uint32_t E, uint32_t K, int8_t score, std::vector<float> gate,
                  float expert_weight) {
  ModelDesc m;
  m.name = "faults";
  m.input_dim = dim;
  LayerDesc l = moe_layer("moe0", dim);
  MoEDesc& e = l.moe;
  e.num_experts = E;
  e.top_k = K;
  e.expert_hidden = 4;
  e.score_function = score;
  e.num_groups = 1;
  e.topk_groups = 1;
  e.normalize_weights = false;
  e.routed_scaling_factor = 1.0f;
  e.gate = TensorDesc::f32(gate);
  e.gate_bias = TensorDesc::f32(std::vector<float>(E, 0.0f));
  e.w1 = TensorDesc::f32(std::vector<float>(E * 4 * dim, expert_weight));
  e.w3 = TensorDesc::f32(std::vector<float>(E * 4 * dim, expert_weight));
  e.w2 = TensorDesc::f32(std::vector<float>(E * dim * 4, expert_weight));
  m.layers.push_back(l);
  return m;
}

// The report's case: 4 routed experts, top-2, hidden width 5, one router weight of 10, the row
// [1e38, 1, 0.5, 0, 0]. Its router logit overflows to +inf.
std::vector<float> report_gate() {
  std::vector<float> gate(4 * 5, 0.0f);
  gate[0] = 10.0f;
  return gate;
}
const std::vector<float> kReportRow{1e38f, 1.0f, 0.5f, 0.0f, 0.0f};

// With experts that output 0 the right result is finite: the infinite logit's limit routes the
// row to expert 0 with weight 1 (softmax) and the output is the residual input itself. Before,
// softmax computed inf - inf and the output was all NaN, with status OK.
TEST(Faults, InfiniteRouterLogitTakesItsLimit) {
  for (int8_t score : {int8_t{0}, int8_t{1}}) {
    ModelPtr m = load(one_moe(5, 4, 2, score, report_gate(), 0.0f));
    SessionPtr s = session(m.get(), MOERT_MODE_INFERENCE);
    std::vector<float> out(5, -1.0f);
    ASSERT_TRUE(IsOk(
        moert_session_forward_hidden(s.get(), kReportRow.data(), 5, 1, out.data(), out.size())))
        << "score function " << int{score};
    EXPECT_EQ(out, kReportRow) << "score function " << int{score};
    std::vector<int64_t> counts(4);
    ASSERT_TRUE(IsOk(moert_session_expert_counts(s.get(), 0, MOERT_COUNTS_LAST, counts.data(), 4)));
    EXPECT_EQ(counts[0], 1);
  }
}

// With ordinary experts, 1e38 overflows inside the expert (W1 x * W3 x exceeds the fp32 range):
// the pass fails with MOERT_ERR_NUMERIC naming the layer, and keeps nothing.
TEST(Faults, OverflowFromFiniteInputIsANumericErrorNamingTheLayer) {
  for (int8_t score : {int8_t{0}, int8_t{1}}) {
    ModelPtr m = load(one_moe(5, 4, 2, score, report_gate(), 0.3f));
    SessionPtr s = session(m.get(), MOERT_MODE_INFERENCE);
    std::vector<float> out(5, -1.0f);
    EXPECT_TRUE(IsError(
        moert_session_forward_hidden(s.get(), kReportRow.data(), 5, 1, out.data(), out.size()),
        MOERT_ERR_NUMERIC, {"layer 0", "moe0", "row 0", "NaN or infinity"}));
    EXPECT_EQ(out, std::vector<float>(5, -1.0f));
    std::vector<int64_t> counts(4, -1);
    ASSERT_TRUE(IsOk(moert_session_expert_counts(s.get(), 0, MOERT_COUNTS_EVAL, counts.data(), 4)));
    EXPECT_EQ(counts, std::vector<int64_t>(4, 0)) << "a refused pass counted its tokens";
    // check_finite off: the caller asked for no checks, and gets the overflowed values.
    SessionPtr unchecked = session(m.get(), MOERT_MODE_INFERENCE, "false");
    ASSERT_TRUE(IsOk(moert_session_forward_hidden(unchecked.get(), kReportRow.data(), 5, 1,
                                                  out.data(), out.size())));
    EXPECT_FALSE(std::isfinite(out[0]) && std::isfinite(out[1]) && std::isfinite(out[2]));
  }
}

// RMSNorm of values near the fp32 maximum: the sum of squares (3e76) is far beyond fp32 but the
// result is an ordinary number.
TEST(Faults, RMSNormOfHugeValuesIsFinite) {
  ModelDesc d;
  d.input_dim = 4;
  d.layers.push_back(rmsnorm_layer("norm0", 4));
  d.layers.back().rmsnorm.weight = TensorDesc::f32({1.0f, 1.0f, 1.0f, 1.0f});
  ModelPtr m = load(d);
  SessionPtr s = session(m.get(), MOERT_MODE_INFERENCE);
  const std::vector<float> x{3e38f, -2e38f, 1.0f, 0.0f};
  std::vector<float> out(4);
  ASSERT_TRUE(IsOk(moert_session_forward_hidden(s.get(), x.data(), 4, 1, out.data(), 4)));
  const double rms = std::sqrt((9e76 + 4e76 + 1.0) / 4.0);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(out[i], x[i] / rms, 1e-6) << i;
}

// A loss-free model of 2 experts, top-1, gamma 1e-3, whose rows route by their sign: a row
// [1, 0] goes to expert 0, [0, 1] to expert 1. Expert weights of 1 make an output gradient of
// 3e38 overflow the weight and input gradients.
ModelDesc two_expert_lossfree() {
  ModelDesc d = one_moe(2, 2, 1, 0, {4.0f, 0.0f, 0.0f, 4.0f}, 1.0f);
  d.layers[0].moe.balancing.bias_update_rate = 1e-3f;
  return d;
}

std::vector<float> rows_to(const std::vector<int>& experts) {
  std::vector<float> x(experts.size() * 2, 0.0f);
  for (size_t r = 0; r < experts.size(); ++r) x[r * 2 + experts[r]] = 1.0f;
  return x;
}

void forward(moert_session* s, const std::vector<float>& x) {
  std::vector<float> out(x.size());
  ASSERT_TRUE(IsOk(
      moert_session_forward_hidden(s, x.data(), x.size(), x.size() / 2, out.data(), out.size())));
}

std::vector<float> bias(const moert_session* s) {
  std::vector<float> b(2);
  EXPECT_TRUE(IsOk(moert_session_get_expert_bias(s, 0, b.data(), 2)));
  return b;
}

// The report: ten rows to expert 0, an output gradient of 3e38, the step refused; zero_grad; a
// micro-batch with counts [1, 3]; the step. Its counts are [1, 3] and the bias moves by
// [+gamma, -gamma] — before, the refused step's counts reached it ([11, 3]: the other way).
TEST(Faults, ARefusedStepLeavesNoCountsBehind) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  forward(s.get(), rows_to(std::vector<int>(10, 0)));
  const std::vector<float> huge(20, 3e38f);
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), huge.data(), huge.size(), nullptr, 0, nullptr)));
  EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_NUMERIC,
                      {"NaN or infinity"}));
  EXPECT_EQ(bias(s.get()), (std::vector<float>{0.0f, 0.0f}));

  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  std::vector<int64_t> step(2, -1);
  ASSERT_TRUE(IsOk(moert_session_expert_counts(s.get(), 0, MOERT_COUNTS_STEP, step.data(), 2)));
  EXPECT_EQ(step, (std::vector<int64_t>{0, 0}));
  forward(s.get(), rows_to({0, 1, 1, 1}));
  ASSERT_TRUE(IsOk(moert_session_expert_counts(s.get(), 0, MOERT_COUNTS_STEP, step.data(), 2)));
  EXPECT_EQ(step, (std::vector<int64_t>{1, 3}));
  const std::vector<float> g(8, 1.0f);
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
  EXPECT_EQ(bias(s.get()), (std::vector<float>{1e-3f, -1e-3f}));
}

// zero_grad discards a forward pass waiting for its backward: its gradient would otherwise reach
// the new step while its counts did not.
TEST(Faults, ZeroGradDiscardsAPendingForward) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  forward(s.get(), rows_to({0, 0, 1}));
  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  const std::vector<float> g(6, 1.0f);
  EXPECT_TRUE(IsError(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr),
                      MOERT_ERR_INVALID_STATE, {"zero_grad"}));
}

// An eval-mode pass between a training forward and its backward discards the training pass, as
// moert.h says; the refusal says why.
TEST(Faults, AnEvalPassDiscardsThePendingTrainingPass) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  forward(s.get(), rows_to({0, 1}));
  ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), 1)));
  forward(s.get(), rows_to({1, 1}));
  ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), 0)));
  const std::vector<float> g(4, 1.0f);
  EXPECT_TRUE(IsError(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr),
                      MOERT_ERR_INVALID_STATE, {"eval-mode"}));
}

// A step made between a forward and its backward discards the pass: its backward would multiply
// what the forward kept by the updated weights (an outside tester measured gradients 10 % off).
// A refused step leaves it.
TEST(Faults, AStepDiscardsThePendingTrainingPass) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  forward(s.get(), rows_to({0, 1}));
  const std::vector<float> g(4, 1.0f);
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr)));
  forward(s.get(), rows_to({1, 0}));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
  EXPECT_TRUE(IsError(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr),
                      MOERT_ERR_INVALID_STATE, {"a step"}));

  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  forward(s.get(), rows_to({0, 1}));
  ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), 1)));
  EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_INVALID_STATE,
                      {"eval mode"}));
  ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), 0)));
  EXPECT_TRUE(IsOk(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr)));
}

// A backward that fails after it has begun (here: its input gradient overflows) has accumulated
// part of its gradient; the step is refused until zero_grad, then training goes on.
TEST(Faults, ABackwardThatFailsMidwayBlocksTheStepUntilZeroGrad) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  forward(s.get(), rows_to({0, 1}));
  const std::vector<float> huge(4, 3e38f);
  std::vector<float> gin(4, -1.0f);
  EXPECT_TRUE(IsError(
      moert_session_backward(s.get(), huge.data(), huge.size(), gin.data(), gin.size(), nullptr),
      MOERT_ERR_NUMERIC, {"input gradient", "row"}));
  EXPECT_EQ(gin, std::vector<float>(4, -1.0f));
  EXPECT_TRUE(
      IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_NUMERIC, {"zero_grad"}));
  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  forward(s.get(), rows_to({0, 1}));
  const std::vector<float> g(4, 1.0f);
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr)));
  EXPECT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
}

// A checkpoint holds only what a load accepts. A step whose backward failed midway is not saved
// (its partial gradient would be stepped on after the load); zero_grad discards it, then the
// save is whole and loads.
TEST(Faults, ASaveRefusesAStepWhoseBackwardFailedMidway) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  TempDir dir;
  const std::string path = (dir.path() / "c.ckpt").string();
  forward(s.get(), rows_to({0, 1}));
  const std::vector<float> huge(4, 3e38f);
  std::vector<float> gin(4);
  ASSERT_TRUE(IsError(
      moert_session_backward(s.get(), huge.data(), huge.size(), gin.data(), gin.size(), nullptr),
      MOERT_ERR_NUMERIC));
  EXPECT_TRUE(IsError(moert_session_save(s.get(), path.c_str()), MOERT_ERR_INVALID_STATE,
                      {"not written", "zero_grad"}));
  EXPECT_FALSE(std::filesystem::exists(path));
  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), path.c_str())));
  SessionPtr t = session(m.get(), MOERT_MODE_TRAINING);
  EXPECT_TRUE(IsOk(moert_session_load(t.get(), path.c_str())));
}

// A checkpoint loaded after a backward failed midway replaces the gradients that failure left
// half-written: the step and the save no longer blame it, and training goes on as in a session
// that only loaded the file.
TEST(Faults, ALoadAfterABackwardFailedMidwayClearsTheFailure) {
  ModelPtr m = load(two_expert_lossfree());
  TempDir dir;
  const std::string path = (dir.path() / "mid.ckpt").string();
  const std::vector<float> dy = {0.25f, -0.5f, 0.125f, 0.75f};
  // A checkpoint in the middle of an accumulation: one micro-batch, no step yet.
  SessionPtr writer = session(m.get(), MOERT_MODE_TRAINING);
  forward(writer.get(), rows_to({0, 1}));
  ASSERT_TRUE(
      IsOk(moert_session_backward(writer.get(), dy.data(), dy.size(), nullptr, 0, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_save(writer.get(), path.c_str())));

  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  forward(s.get(), rows_to({1, 0}));
  const std::vector<float> huge(4, 3e38f);
  std::vector<float> gin(4);
  ASSERT_TRUE(IsError(
      moert_session_backward(s.get(), huge.data(), huge.size(), gin.data(), gin.size(), nullptr),
      MOERT_ERR_NUMERIC));
  ASSERT_TRUE(IsOk(moert_session_load(s.get(), path.c_str())));
  EXPECT_TRUE(IsOk(moert_session_save(s.get(), (dir.path() / "again.ckpt").c_str())));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));

  SessionPtr fresh = session(m.get(), MOERT_MODE_TRAINING);
  ASSERT_TRUE(IsOk(moert_session_load(fresh.get(), path.c_str())));
  ASSERT_TRUE(IsOk(moert_session_step(fresh.get(), nullptr, nullptr)));
  uint32_t count = 0;
  ASSERT_TRUE(IsOk(moert_session_num_parameters(s.get(), &count)));
  ASSERT_GT(count, 0u);
  for (uint32_t i = 0; i < count; ++i) {
    const char* name = nullptr;
    uint64_t n = 0;
    ASSERT_TRUE(IsOk(moert_session_parameter_info(s.get(), i, &name, &n)));
    std::vector<float> got(n), want(n);
    ASSERT_TRUE(IsOk(moert_session_get_parameter(s.get(), name, got.data(), n)));
    ASSERT_TRUE(IsOk(moert_session_get_parameter(fresh.get(), name, want.data(), n)));
    EXPECT_EQ(got, want) << name;
  }
}

// The bias update rate and its freezing belong to the loss-free bias: a layer balanced otherwise
// has neither, and naming it is refused rather than accepted and ignored.
TEST(Faults, ABiasRateOrFreezeOfALayerWithoutTheLossFreeBiasIsRefused) {
  ModelDesc d = two_expert_lossfree();
  d.layers[0].moe.balancing.policy = 2;  // AuxLoss
  d.layers[0].moe.balancing.aux_alpha = 1e-3f;
  ModelPtr m = load(d);
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  EXPECT_TRUE(IsError(moert_session_set_bias_update_rate(s.get(), 0, 0.5),
                      MOERT_ERR_INVALID_ARGUMENT,
                      {"MoE layer 0 ('moe0')", "AuxLoss", "no bias update rate"}));
  EXPECT_TRUE(IsError(moert_session_set_bias_frozen(s.get(), 0, 1), MOERT_ERR_INVALID_ARGUMENT,
                      {"AuxLoss", "no bias update to freeze"}));
  EXPECT_TRUE(IsError(moert_session_set_bias_update_rate(s.get(), MOERT_ALL_LAYERS, 0.5),
                      MOERT_ERR_INVALID_ARGUMENT, {"no MoE layer", "LossFreeBias"}));
  // Still refused as given first: a rate fp32 cannot hold.
  EXPECT_TRUE(IsError(moert_session_set_bias_update_rate(s.get(), 0, 1e39),
                      MOERT_ERR_INVALID_ARGUMENT, {"fp32"}));
  // The bias itself steers the top-K selection of a layer balanced otherwise too: writing it is
  // taken (moert.h). Not an Expert Choice layer's, whose experts choose their tokens.
  const std::vector<float> bias = {0.5f, -0.5f};
  EXPECT_TRUE(IsOk(moert_session_set_expert_bias(s.get(), 0, bias.data(), bias.size())));
  ModelDesc ec = two_expert_lossfree();
  ec.layers[0].moe.balancing.policy = 4;  // ExpertChoice
  ModelPtr choice = load(ec);
  SessionPtr u = session(choice.get(), MOERT_MODE_TRAINING);
  EXPECT_TRUE(IsError(moert_session_set_expert_bias(u.get(), 0, bias.data(), bias.size()),
                      MOERT_ERR_INVALID_ARGUMENT, {"moe0", "ExpertChoice", "no bias"}));
  // A loss-free layer takes them.
  ModelPtr lossfree = load(two_expert_lossfree());
  SessionPtr t = session(lossfree.get(), MOERT_MODE_TRAINING);
  EXPECT_TRUE(IsOk(moert_session_set_bias_update_rate(t.get(), MOERT_ALL_LAYERS, 0.5)));
  EXPECT_TRUE(IsOk(moert_session_set_bias_frozen(t.get(), 0, 1)));
}

// The cosine decay runs from lr down to min_lr: a min_lr above lr would make it rise. The step
// says so and changes nothing; with no decay to run (total_steps 0) min_lr is not used.
TEST(Faults, AMinLrAboveLrRefusesTheStepOfADecay) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "lr", "1e-3")));
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "min_lr", "0.1")));
  forward(s.get(), rows_to({0, 1}));
  const std::vector<float> g(4, 1e-3f);
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr)));
  double lr = 0.0;
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), &lr, nullptr)));  // constant: min_lr unused
  EXPECT_EQ(lr, 1e-3);
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "total_steps", "5")));
  std::vector<float> before(16);
  ASSERT_TRUE(IsOk(moert_session_get_parameter(s.get(), "moe0.w1", before.data(), 16)));
  EXPECT_TRUE(IsError(moert_session_step(s.get(), &lr, nullptr), MOERT_ERR_INVALID_STATE,
                      {"min_lr (0.1) exceeds lr (0.001)"}));
  uint64_t steps = 0;
  ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &steps)));
  EXPECT_EQ(steps, 1u);
  std::vector<float> after(16);
  ASSERT_TRUE(IsOk(moert_session_get_parameter(s.get(), "moe0.w1", after.data(), 16)));
  EXPECT_EQ(after, before);
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "min_lr", "1e-4")));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), &lr, nullptr)));
  EXPECT_LT(lr, 1e-3);

  // Options for a decay whose floor is above its peak are refused at creation, where the two
  // are first known together; an inference session never uses them.
  moert_session_options* o = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&o)));
  OptionsPtr opts(o);
  ASSERT_TRUE(IsOk(moert_session_options_set_config(o, "min_lr", "0.1")));
  ASSERT_TRUE(IsOk(moert_session_options_set_config(o, "lr", "1e-3")));
  ASSERT_TRUE(IsOk(moert_session_options_set_config(o, "total_steps", "100")));
  moert_session* refused = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_set_mode(o, MOERT_MODE_TRAINING)));
  EXPECT_TRUE(IsError(moert_session_create(m.get(), o, &refused), MOERT_ERR_INVALID_ARGUMENT,
                      {"min_lr (0.1) exceeds lr (0.001)"}));
  EXPECT_EQ(refused, nullptr);
  ASSERT_TRUE(IsOk(moert_session_options_set_mode(o, MOERT_MODE_INFERENCE)));
  moert_session* inference = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(m.get(), o, &inference)));
  moert_session_free(inference);
}

// The bias update rate is held in fp32: a rate that rounds to infinity or to zero there is
// refused as given. A finite rate that would carry a bias beyond the fp32 range refuses the step
// before anything changes.
TEST(Faults, BiasUpdatesStayInTheFp32Range) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  for (double rate : {1e39, 1e-50})
    EXPECT_TRUE(IsError(moert_session_set_bias_update_rate(s.get(), 0, rate),
                        MOERT_ERR_INVALID_ARGUMENT, {"fp32"}))
        << rate;
  ASSERT_TRUE(IsOk(moert_session_set_bias_update_rate(s.get(), 0, 1e-45)));
  ASSERT_TRUE(IsOk(moert_session_set_bias_update_rate(s.get(), 0, 3e38)));
  const std::vector<float> high{3e38f, 3e38f};
  ASSERT_TRUE(IsOk(moert_session_set_expert_bias(s.get(), 0, high.data(), high.size())));
  forward(s.get(), rows_to({1, 1, 1, 1}));
  const std::vector<float> g(8, 1e-3f);
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr)));
  std::vector<float> before(16), after(16);
  ASSERT_TRUE(IsOk(moert_session_get_parameter(s.get(), "moe0.w1", before.data(), before.size())));
  // Refused before it was made: nothing written to the caller's figures either.
  double lr = -1.0, grad_norm = -1.0;
  EXPECT_TRUE(IsError(moert_session_step(s.get(), &lr, &grad_norm), MOERT_ERR_NUMERIC,
                      {"bias update", "fp32 range", "refused"}));
  EXPECT_EQ(lr, -1.0);
  EXPECT_EQ(grad_norm, -1.0);
  ASSERT_TRUE(IsOk(moert_session_get_parameter(s.get(), "moe0.w1", after.data(), after.size())));
  EXPECT_EQ(after, before);
  EXPECT_EQ(bias(s.get()), high);
}

// A session whose next step takes expert 1's w1 beyond the fp32 range: learning rate 1, weight
// decay 3, that w1 at 3e38 (no row reaches it: its gradient is zero, its decay doubles it), and
// a forward and backward done.
SessionPtr overflowing_session(const moert_model* m, const char* check_finite = "true",
                               const char* precision = "fp32") {
  SessionPtr s = session(m, MOERT_MODE_TRAINING, check_finite, precision);
  EXPECT_TRUE(IsOk(moert_session_set_config(s.get(), "lr", "1")));
  EXPECT_TRUE(IsOk(moert_session_set_config(s.get(), "weight_decay", "3")));
  std::vector<float> w1(16, 1.0f);
  std::fill(w1.begin() + 8, w1.end(), 3e38f);
  EXPECT_TRUE(IsOk(moert_session_set_parameter(s.get(), "moe0.w1", w1.data(), w1.size())));
  forward(s.get(), rows_to({0, 0}));
  const std::vector<float> g(4, 1e-3f);
  EXPECT_TRUE(IsOk(moert_session_backward(s.get(), g.data(), g.size(), nullptr, 0, nullptr)));
  return s;
}

// After such a step: w1 written back, a training step goes through.
void write_back_and_train(moert_session* s) {
  const std::vector<float> ones(16, 1.0f), g(4, 1e-3f);
  ASSERT_TRUE(IsOk(moert_session_set_parameter(s, "moe0.w1", ones.data(), ones.size())));
  ASSERT_TRUE(IsOk(moert_session_zero_grad(s)));
  forward(s, rows_to({0, 1}));
  ASSERT_TRUE(IsOk(moert_session_backward(s, g.data(), g.size(), nullptr, 0, nullptr)));
  EXPECT_TRUE(IsOk(moert_session_step(s, nullptr, nullptr)));
}

// A learning rate and weight decay within their ranges but too large for a parameter (expert 1's
// w1 at 3e38, which no row reaches: its gradient is zero, its decay doubles it): the step that
// takes it beyond the fp32 range says so (it cannot be undone), and a save of it is refused,
// writing nothing, rather than leave a checkpoint no load accepts.
TEST(Faults, AStepBeyondTheFp32RangeIsReportedAndNotSaved) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = overflowing_session(m.get());
  TempDir dir;
  const std::string path = (dir.path() / "c.ckpt").string();
  // The step was made: the caller learns its learning rate and gradient norm.
  double lr = -1.0, grad_norm = -1.0;
  EXPECT_TRUE(IsError(moert_session_step(s.get(), &lr, &grad_norm), MOERT_ERR_NUMERIC,
                      {"'moe0.w1'", "beyond the fp32 range", "element 8", "cannot be undone"}));
  EXPECT_EQ(lr, 1.0);
  EXPECT_GT(grad_norm, 0.0);
  EXPECT_TRUE(std::isfinite(grad_norm));
  EXPECT_TRUE(IsError(moert_session_save(s.get(), path.c_str()), MOERT_ERR_NUMERIC,
                      {"'moe0'", "'w1'", "NaN or infinity", "nothing was written"}));
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
  // Written back, training goes on.
  write_back_and_train(s.get());
  EXPECT_TRUE(IsOk(moert_session_save(s.get(), path.c_str())));
}

// In bf16 and FP8 sessions the step also refreshes the weights' copies, and the FP8 quantizer
// refuses a weight beyond the fp32 range: the step still updates every parameter and the biases
// and is counted, reports the parameter, and no pass reads a stale copy; written back, the
// copies are made again and training goes on.
TEST(Faults, AStepBeyondTheFp32RangeInEveryPrecisionIsWholeAndReported) {
  ModelPtr m = load(two_expert_lossfree());
  for (const char* precision : {"bf16", "fp8"}) {
    SCOPED_TRACE(precision);
    SessionPtr s = overflowing_session(m.get(), "true", precision);
    std::vector<float> w2_before(16), w2_after(16);
    ASSERT_TRUE(IsOk(moert_session_get_parameter(s.get(), "moe0.w2", w2_before.data(), 16)));
    const std::vector<float> b0 = bias(s.get());
    EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_NUMERIC,
                        {"'moe0.w1'", "beyond the fp32 range", "cannot be undone"}));
    uint64_t steps = 0;
    ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &steps)));
    EXPECT_EQ(steps, 1u);
    // The parameters after w1 were updated too (weight decay moves every one), and the biases.
    ASSERT_TRUE(IsOk(moert_session_get_parameter(s.get(), "moe0.w2", w2_after.data(), 16)));
    EXPECT_NE(w2_after, w2_before);
    EXPECT_NE(bias(s.get()), b0);
    // No pass reads the copies the step could not make (FP8: the quantizer refused w1).
    std::vector<float> x = rows_to({0, 1}), out(x.size());
    const bool fp8 = std::string(precision) == "fp8";
    EXPECT_TRUE(IsError(
        moert_session_forward_hidden(s.get(), x.data(), x.size(), 2, out.data(), out.size()),
        MOERT_ERR_NUMERIC, {fp8 ? "'moe0.w1' has no up-to-date copy" : "NaN or infinity"}));
    write_back_and_train(s.get());
  }
  // Without check_finite the overflow goes unseen, but not the copy FP8 cannot make.
  SessionPtr s = overflowing_session(m.get(), "false", "fp8");
  EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_NUMERIC,
                      {"step 1 was made and counted", "'moe0.w1'", "FP8 quantization"}));
  std::vector<float> x = rows_to({0, 1}), out(x.size());
  EXPECT_TRUE(
      IsError(moert_session_forward_hidden(s.get(), x.data(), x.size(), 2, out.data(), out.size()),
              MOERT_ERR_NUMERIC, {"'moe0.w1' has no up-to-date copy", "set_parameter"}));
  // Another step remakes every copy and reports its own first failure.
  ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
  const std::vector<float> small(16, 1e-3f);
  ASSERT_TRUE(IsOk(moert_session_set_gradient(s.get(), "moe0.w2", small.data(), small.size())));
  EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_NUMERIC,
                      {"step 2 was made and counted", "'moe0.w1'", "FP8 quantization of moe0.w1"}));
  const std::vector<float> ones(16, 1.0f);
  ASSERT_TRUE(IsOk(moert_session_set_parameter(s.get(), "moe0.w1", ones.data(), ones.size())));
  EXPECT_TRUE(
      IsOk(moert_session_forward_hidden(s.get(), x.data(), x.size(), 2, out.data(), out.size())));
}

// SGD's momentum can pass the fp32 range while the parameter stays finite (a gradient element of
// 2e38 twice: 0.9 * 2e38 + 2e38): the step says so, naming the momentum.
TEST(Faults, AnSgdMomentumBeyondTheFp32RangeIsReported) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "optimizer", "sgd")));
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "lr", "1e-30")));
  std::vector<float> g(16, 0.0f);
  g[0] = 2e38f;
  ASSERT_TRUE(IsOk(moert_session_set_gradient(s.get(), "moe0.w1", g.data(), g.size())));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_set_gradient(s.get(), "moe0.w1", g.data(), g.size())));
  EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_NUMERIC,
                      {"the momentum of parameter 'moe0.w1'", "element 0", "step was made"}));
  uint64_t steps = 0;
  ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &steps)));
  EXPECT_EQ(steps, 2u);
}

// A save replaces a regular file only: a FIFO (or a device, as root) at the path stays what it is.
TEST(Faults, ASaveDoesNotReplaceAFifo) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  TempDir dir;
  const std::filesystem::path fifo = dir.path() / "c.fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_TRUE(IsError(moert_session_save(s.get(), fifo.c_str()), MOERT_ERR_INVALID_ARGUMENT,
                      {"not a regular file"}));
  EXPECT_TRUE(IsError(moert_model_save_file(m.get(), fifo.c_str()), MOERT_ERR_INVALID_ARGUMENT,
                      {"model", "not a regular file"}));
  EXPECT_TRUE(std::filesystem::is_fifo(fifo));
  // An I/O failure names what it was writing.
  const std::string missing = (dir.path() / "no-dir" / "m.moert").string();
  EXPECT_TRUE(IsError(moert_model_save_file(m.get(), missing.c_str()), MOERT_ERR_IO,
                      {"cannot write model"}));
}

std::string file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The rename would replace a symbolic link itself: a "latest" link would become a file of its
// own. Refused, the link and its target left as they were.
TEST(Faults, ASaveDoesNotReplaceASymbolicLink) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  TempDir dir;
  const std::filesystem::path target = dir.path() / "step-1.moert", link = dir.path() / "latest";
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), target.c_str())));
  std::filesystem::create_symlink("step-1.moert", link);
  const std::string before = file_bytes(target);
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "lr", "0.5")));
  forward(s.get(), rows_to({0, 1}));
  EXPECT_TRUE(IsError(moert_session_save(s.get(), link.c_str()), MOERT_ERR_INVALID_ARGUMENT,
                      {"latest", "symbolic link"}));
  EXPECT_TRUE(IsError(moert_model_save_file(m.get(), link.c_str()), MOERT_ERR_INVALID_ARGUMENT,
                      {"model", "symbolic link"}));
  EXPECT_TRUE(std::filesystem::is_symlink(link));
  EXPECT_EQ(file_bytes(target), before);
  // A dangling link is no more a file to replace.
  std::filesystem::create_symlink("nowhere.moert", dir.path() / "dangling");
  EXPECT_TRUE(IsError(moert_session_save(s.get(), (dir.path() / "dangling").c_str()),
                      MOERT_ERR_INVALID_ARGUMENT, {"symbolic link"}));
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "nowhere.moert"));
}

// A name the file system takes can still be too long for the files written beside it: the
// temporary description ".<name>.tmp-XXXXXX" adds 12 bytes, the data file of the arrays of
// 64 KiB or more "<name>.<16 hex digits>.data" 22. Refused before anything is written, rather
// than failing at a rename with "File name too long".
TEST(Faults, ANameTooLongForTheFilesBesideItIsRefusedBeforeAnythingIsWritten) {
  TempDir dir;
  const long name_max = pathconf(dir.path().c_str(), _PC_NAME_MAX);
  ASSERT_GT(name_max, 40);
  auto named = [&](long bytes) {
    return (dir.path() / (std::string(static_cast<size_t>(bytes) - 6, 'n') + ".moert")).string();
  };
  auto entries = [&] { return std::distance(std::filesystem::directory_iterator(dir.path()), {}); };
  ModelPtr small = load(two_expert_lossfree());
  EXPECT_TRUE(IsError(moert_model_save_file(small.get(), named(name_max - 11).c_str()),
                      MOERT_ERR_INVALID_ARGUMENT,
                      {"file name is", "temporary file", "adds 12", "fits"}));
  EXPECT_EQ(entries(), 0);
  ASSERT_TRUE(IsOk(moert_model_save_file(small.get(), named(name_max - 12).c_str())));
  EXPECT_EQ(entries(), 1);
  // w1, w3 and w2 of 2 * 4 * 2048 floats: 64 KiB each, in the data file.
  ModelPtr big = load(one_moe(2048, 2, 1, 0, std::vector<float>(4096, 0.01f), 0.01f));
  EXPECT_TRUE(IsError(moert_model_save_file(big.get(), named(name_max - 21).c_str()),
                      MOERT_ERR_INVALID_ARGUMENT, {"data file", "adds 22"}));
  EXPECT_EQ(entries(), 1);
  const std::string fits = named(name_max - 22);
  ASSERT_TRUE(IsOk(moert_model_save_file(big.get(), fits.c_str())));
  EXPECT_EQ(entries(), 3);  // the small model, the big one and its data file
  moert_model* back = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(fits.c_str(), &back)));
  moert_model_free(back);
}

// top_k = 1 with renormalisation: every gate weight is the scaling factor, the router gets no
// gradient. Training refuses it and says why; inference runs it.
// Creates a training session of `model` (the status, owned by the caller).
moert_status* create_training(const moert_model* model, moert_session** s) {
  moert_session_options* raw = nullptr;
  if (moert_status* st = moert_session_options_create(&raw)) return st;
  OptionsPtr o(raw);
  if (moert_status* st = moert_session_options_set_mode(raw, MOERT_MODE_TRAINING)) return st;
  return moert_session_create(model, raw, s);
}

TEST(Faults, ARouterThatCannotLearnIsRefusedForTraining) {
  ModelDesc d = two_expert_lossfree();
  d.layers[0].moe.normalize_weights = true;
  ModelPtr m = load(d);
  moert_session* s = nullptr;
  EXPECT_TRUE(IsError(create_training(m.get(), &s), MOERT_ERR_INVALID_ARGUMENT,
                      {"moe0", "top_k = 1", "normalize_weights", "no gradient"}));
  EXPECT_EQ(s, nullptr);
  SessionPtr inference = session(m.get(), MOERT_MODE_INFERENCE);
  forward(inference.get(), rows_to({0, 1}));
}

// Whether a byte string is well-formed UTF-8 (RFC 3629), checked independently of the library.
bool is_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const int n = c < 0x80                 ? 1
                  : c >= 0xC2 && c <= 0xDF ? 2
                  : c >= 0xE0 && c <= 0xEF ? 3
                  : c >= 0xF0 && c <= 0xF4 ? 4
                                           : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (int k = 1; k < n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += n;
  }
  return true;
}

// A model file whose layer name holds bytes that are not UTF-8 (a lone continuation byte, an
// overlong '/', a surrogate, a truncated sequence): the message that quotes it is valid UTF-8,
// the bad bytes written as \xNN, the good characters kept.
TEST(Faults, StatusMessagesAreValidUtf8) {
  ModelDesc d = two_expert_lossfree();
  const std::string name = "caf\xC3\xA9-\x80-\xC0\xAF-\xED\xA0\x80-\xE2\x82";
  d.layers[0].name = name;
  d.layers[0].moe.top_k = 3;  // more than its 2 experts: refused, naming the layer
  const std::vector<uint8_t> bytes = build(d);
  moert_model* m = nullptr;
  moert_status* st = moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &m);
  ASSERT_NE(st, nullptr);
  const std::string msg = moert_status_message(st);
  moert_status_free(st);
  EXPECT_TRUE(is_utf8(msg)) << msg;
  EXPECT_NE(msg.find("caf\xC3\xA9-\\x80-\\xC0\\xAF-\\xED\\xA0\\x80-\\xE2\\x82"), std::string::npos)
      << msg;
}

// Control characters in a layer's name (a newline, a tab, DEL, NUL) would split a message over
// lines or end it early: every message quotes them as \xNN, whether a session refuses to train
// the model or the loader refuses the name (a NUL).
TEST(Faults, StatusMessagesAreOneLine) {
  ModelDesc d = two_expert_lossfree();
  d.layers[0].name = "moe\n0\tx\x7Fy";
  d.layers[0].moe.normalize_weights = true;  // top_k = 1: a router that cannot learn
  ModelPtr m = load(d);
  moert_session* s = nullptr;
  moert_status* st = create_training(m.get(), &s);
  ASSERT_NE(st, nullptr);
  std::string msg = moert_status_message(st);
  moert_status_free(st);
  EXPECT_NE(msg.find("'moe\\x0A0\\x09x\\x7Fy'"), std::string::npos) << msg;
  EXPECT_EQ(msg.find_first_of(std::string("\n\t\x7F", 3)), std::string::npos) << msg;

  d.layers[0].name = std::string("moe\0y", 5);
  const std::vector<uint8_t> bytes = build(d);
  moert_model* refused = nullptr;
  EXPECT_TRUE(IsError(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &refused),
                      MOERT_ERR_INVALID_MODEL, {"'moe\\x00y'", "NUL"}));
}

// ---- Padding

// A masked pass equals a pass over the rows that take part alone, bit for bit: outputs (zero on
// padding), counts, gradients, input gradients (zero on padding) and the step's bias update.
TEST(Faults, PaddedRowsTakeNoPart) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr padded = session(m.get(), MOERT_MODE_TRAINING);
  SessionPtr alone = session(m.get(), MOERT_MODE_TRAINING);
  // Rows 1 and 3 are padding, and hold what a padded batch may hold: garbage and NaN.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x{1.0f, 0.0f, nan, 5.0f, 0.0f, 1.0f, 7.0f, kInf, 0.0f, 1.0f};
  const std::vector<uint8_t> mask{1, 0, 1, 0, 1};
  const std::vector<float> xv{1.0f, 0.0f, 0.0f, 1.0f, 0.0f, 1.0f};
  std::vector<float> out(10, -1.0f), out_alone(6);
  ASSERT_TRUE(IsOk(moert_session_forward_hidden_masked(padded.get(), x.data(), 10, mask.data(), 5,
                                                       5, out.data(), 10)));
  ASSERT_TRUE(
      IsOk(moert_session_forward_hidden(alone.get(), xv.data(), 6, 3, out_alone.data(), 6)));
  const std::vector<float> want{out_alone[0], out_alone[1], 0, 0, out_alone[2], out_alone[3], 0, 0,
                                out_alone[4], out_alone[5]};
  EXPECT_EQ(out, want);
  std::vector<int64_t> c1(2), c2(2);
  ASSERT_TRUE(IsOk(moert_session_expert_counts(padded.get(), 0, MOERT_COUNTS_STEP, c1.data(), 2)));
  ASSERT_TRUE(IsOk(moert_session_expert_counts(alone.get(), 0, MOERT_COUNTS_STEP, c2.data(), 2)));
  EXPECT_EQ(c1, c2);
  EXPECT_EQ(c1, (std::vector<int64_t>{1, 2}));

  const std::vector<float> g{0.5f, -1.0f, nan, nan, 2.0f, 0.25f, kInf, 1.0f, -0.5f, 3.0f};
  const std::vector<float> gv{0.5f, -1.0f, 2.0f, 0.25f, -0.5f, 3.0f};
  std::vector<float> gin(10, -1.0f), gin_alone(6);
  ASSERT_TRUE(IsOk(moert_session_backward(padded.get(), g.data(), 10, gin.data(), 10, nullptr)));
  ASSERT_TRUE(
      IsOk(moert_session_backward(alone.get(), gv.data(), 6, gin_alone.data(), 6, nullptr)));
  EXPECT_EQ(gin, (std::vector<float>{gin_alone[0], gin_alone[1], 0, 0, gin_alone[2], gin_alone[3],
                                     0, 0, gin_alone[4], gin_alone[5]}));
  uint32_t n = 0;
  ASSERT_TRUE(IsOk(moert_session_num_parameters(padded.get(), &n)));
  for (uint32_t i = 0; i < n; ++i) {
    const char* name = nullptr;
    uint64_t numel = 0;
    ASSERT_TRUE(IsOk(moert_session_parameter_info(padded.get(), i, &name, &numel)));
    std::vector<float> a(numel), b(numel);
    ASSERT_TRUE(IsOk(moert_session_get_gradient(padded.get(), name, a.data(), numel)));
    ASSERT_TRUE(IsOk(moert_session_get_gradient(alone.get(), name, b.data(), numel)));
    EXPECT_EQ(a, b) << name;
  }
  ASSERT_TRUE(IsOk(moert_session_step(padded.get(), nullptr, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_step(alone.get(), nullptr, nullptr)));
  EXPECT_EQ(bias(padded.get()), bias(alone.get()));
}

// A mask of all zeros: zero outputs, nothing counted, a backward that adds nothing.
TEST(Faults, AnAllPaddingPassCountsNothing) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_TRAINING);
  const std::vector<float> x(6, 1.0f);
  const std::vector<uint8_t> mask(3, 0);
  std::vector<float> out(6, -1.0f);
  ASSERT_TRUE(IsOk(
      moert_session_forward_hidden_masked(s.get(), x.data(), 6, mask.data(), 3, 3, out.data(), 6)));
  EXPECT_EQ(out, std::vector<float>(6, 0.0f));
  std::vector<int64_t> c(2, -1);
  ASSERT_TRUE(IsOk(moert_session_expert_counts(s.get(), 0, MOERT_COUNTS_LAST, c.data(), 2)));
  EXPECT_EQ(c, (std::vector<int64_t>{0, 0}));
  std::vector<float> gin(6, -1.0f);
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), x.data(), 6, gin.data(), 6, nullptr)));
  EXPECT_EQ(gin, std::vector<float>(6, 0.0f));
  std::vector<float> gw(4, -1.0f);
  ASSERT_TRUE(IsOk(moert_session_get_gradient(s.get(), "moe0.gate", gw.data(), 4)));
  EXPECT_EQ(gw, std::vector<float>(4, 0.0f));
}

TEST(Faults, AMaskOfTheWrongLengthIsRefused) {
  ModelPtr m = load(two_expert_lossfree());
  SessionPtr s = session(m.get(), MOERT_MODE_INFERENCE);
  const std::vector<float> x(6, 1.0f);
  const std::vector<uint8_t> mask(2, 1);
  std::vector<float> out(6);
  EXPECT_TRUE(IsError(
      moert_session_forward_hidden_masked(s.get(), x.data(), 6, mask.data(), 2, 3, out.data(), 6),
      MOERT_ERR_INVALID_ARGUMENT, {"row mask", "2", "3"}));
  EXPECT_TRUE(IsError(
      moert_session_forward_hidden_masked(s.get(), x.data(), 6, nullptr, 3, 3, out.data(), 6),
      MOERT_ERR_INVALID_ARGUMENT, {"row_mask"}));
}

// Token models: padding positions may hold a pad id outside the vocabulary; targets may be
// MOERT_IGNORE_TARGET; the loss is the mean over the rows that count, and equals that of the
// batch without padding whose ignored targets are left out of the mean.
TEST(Faults, PaddedTokenRowsAndIgnoredTargets) {
  ModelDesc d = token_baseline();
  ModelPtr m = load(d);
  SessionPtr padded = session(m.get(), MOERT_MODE_TRAINING);
  SessionPtr alone = session(m.get(), MOERT_MODE_TRAINING);
  const std::vector<int32_t> tokens{1, -1, 3, 9, 99};
  const std::vector<uint8_t> mask{1, 0, 1, 1, 0};
  const std::vector<int32_t> targets{2, 12345, MOERT_IGNORE_TARGET, 7, -5};
  std::vector<float> out(5 * 16), out_alone(3 * 16);
  ASSERT_TRUE(IsOk(moert_session_forward_tokens_masked(padded.get(), tokens.data(), 5, mask.data(),
                                                       5, 5, out.data(), out.size())));
  const std::vector<int32_t> tv{1, 3, 9};
  ASSERT_TRUE(IsOk(moert_session_forward_tokens(alone.get(), tv.data(), 3, 3, out_alone.data(),
                                                out_alone.size())));
  double loss = 0, loss_alone = 0;
  ASSERT_TRUE(IsOk(moert_session_backward_loss(padded.get(), targets.data(), 5, &loss)));
  const std::vector<int32_t> targets_alone{2, MOERT_IGNORE_TARGET, 7};
  ASSERT_TRUE(IsOk(moert_session_backward_loss(alone.get(), targets_alone.data(), 3, &loss_alone)));
  EXPECT_EQ(loss, loss_alone);
  // The loss is the mean of the two counted rows' cross-entropies.
  auto ce = [&](int row, int target) {
    const float* z = out_alone.data() + row * 16;
    double mx = z[0], sum = 0;
    for (int v = 0; v < 16; ++v) mx = std::max(mx, double{z[v]});
    for (int v = 0; v < 16; ++v) sum += std::exp(z[v] - mx);
    return mx + std::log(sum) - z[target];
  };
  EXPECT_NEAR(loss, (ce(0, 2) + ce(2, 7)) / 2.0, 1e-5);
  std::vector<float> ga(8 * 16), gb(8 * 16);
  ASSERT_TRUE(IsOk(moert_session_get_gradient(padded.get(), "head.weight", ga.data(), ga.size())));
  ASSERT_TRUE(IsOk(moert_session_get_gradient(alone.get(), "head.weight", gb.data(), gb.size())));
  EXPECT_EQ(ga, gb);
  // A target outside the vocabulary on a row that counts is still an error.
  ASSERT_TRUE(IsOk(moert_session_forward_tokens_masked(padded.get(), tokens.data(), 5, mask.data(),
                                                       5, 5, out.data(), out.size())));
  const std::vector<int32_t> bad{2, 0, -7, 7, 0};
  EXPECT_TRUE(IsError(moert_session_backward_loss(padded.get(), bad.data(), 5, nullptr),
                      MOERT_ERR_INVALID_ARGUMENT, {"-7", "row 2"}));
}

// A refused option value is told the bounds it missed as they are: beta2's upper bound,
// 0.999999999, printed to 6 digits read "1", the very value refused.
TEST(Faults, ARefusedOptionValueNamesItsBoundsExactly) {
  moert_session_options* o = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&o)));
  OptionsPtr opts(o);
  EXPECT_TRUE(IsError(moert_session_options_set_config(o, "beta2", "1"), MOERT_ERR_INVALID_ARGUMENT,
                      {"'beta2'", "[0, 0.999999999]", "got '1'"}));
  EXPECT_TRUE(IsError(moert_session_options_set_config(o, "eps", "0"), MOERT_ERR_INVALID_ARGUMENT,
                      {"'eps'", "[1e-30, 1]", "got '0'"}));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "beta2", "0.999999999")));
}

}  // namespace
