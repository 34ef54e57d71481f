// Sessions of precision fp8 on the CPU: the experts' GEMMs in DeepSeek-V3's block-scaled E4M3
// (the backend's kernels are checked against float64 in test_cpu_fp8_ffn.cc); here the session
// around them: forward and gradients within FP8 bounds of fp32, fp32 masters with FP8 copies
// refreshed after every step, checkpoints that resume bit-identically, thread-count independence,
// the fp8_scales option, and clear refusals.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/model_loader.h"
#include "core/session.h"
#include "tests/unit/session_model.h"

namespace moert {
namespace {

using test::batch;
using test::Batch;
using test::moe_model;
using test::options;
using test::outputs_and_gradients;
using Vec = std::vector<float>;

// Widths that are not multiples of 128 and cross a block: partial tiles and blocks everywhere.
constexpr test::MoeWidths kWidths{160, 136, 72};
constexpr int64_t kVocab = test::kSessionVocab;

double rel(const Vec& got, const Vec& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(den > 0.0 ? num / den : num);
}

SessionOptions fp8_options(Mode mode, uint32_t threads = 2, bool ue8m0 = false) {
  SessionOptions o = options(Precision::Fp8, mode, threads);
  o.fp8.power_of_two_scales = ue8m0;
  return o;
}

Vec parameters(Session& s) {
  Vec all;
  for (size_t p = 0; p < s.num_parameters(); ++p) {
    Vec v(s.parameter_size(p));
    s.read_parameter(p, v.data(), v.size());
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

// Forward and every gradient within FP8 bounds of fp32, and not equal to them. The bounds: E4M3
// keeps 3 mantissa bits, so one rounding moves a value by up to 2^-4 relative and by about 2.6 %
// RMS; a GEMM of two quantized operands is about 3.7 % off fp32 (test_cpu_fp8_ffn.cc measures
// 3.6-3.8 % for h1 and h3), and the SwiGLU block compounds two of them (6-7 % for its output).
// Measured here (widths 160 / 136 / 72, 300 rows): logits 6.1e-2, loss 1e-3 relative, gradients
// 4.5e-2 (the norm) to 1.4e-1 (the experts, the embedding behind them, the head through the
// logits). The bounds leave about 1.5x room.
TEST(Fp8Session, ForwardAndGradientsWithinFp8BoundsOfFp32) {
  std::mt19937 rng(3);
  auto model = moe_model(rng, kWidths);
  const int64_t rows = 300;
  const Batch b = batch(rng, rows);
  Session s32(model, options(Precision::Fp32, Mode::Training));
  Session s8(model, fp8_options(Mode::Training));
  EXPECT_EQ(s8.precision(), Precision::Fp8);
  Vec y32(rows * kVocab), y8(rows * kVocab);
  s32.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y32.data(), y32.size());
  s8.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y8.data(), y8.size());
  const double ey = rel(y8, y32);
  RecordProperty("output_rel_error", std::to_string(ey));
  EXPECT_LT(ey, 1e-1);
  EXPECT_NE(y8, y32);
  // Same routing: the router stays fp32 and its input does not depend on the experts.
  EXPECT_EQ(s8.expert_counts(2, CountScope::Last), s32.expert_counts(2, CountScope::Last));
  const double l32 = s32.backward_loss(b.targets.data(), b.targets.size());
  const double l8 = s8.backward_loss(b.targets.data(), b.targets.size());
  EXPECT_NEAR(l8, l32, 1e-2 * l32);
  for (size_t p = 0; p < s32.num_parameters(); ++p) {
    const int64_t n = s32.parameter_size(p);
    Vec g32(n), g8(n);
    s32.read_gradient(p, g32.data(), n);
    s8.read_gradient(p, g8.data(), n);
    const double e = rel(g8, g32);
    std::printf("fp8 vs fp32 gradient of %-14s %.3e\n", s32.parameter_name(p).c_str(), e);
    EXPECT_LT(e, 2e-1) << s32.parameter_name(p);
  }
}

// Training in FP8: fp32 master weights, FP8 copies refreshed every step, so that an inference
// session built from the checkpoint (copies made from the saved fp32 values) gives the very same
// outputs as the training session in eval mode; and the loss follows the fp32 run's.
TEST(Fp8Session, TrainingKeepsFp32MastersAndFreshCopies) {
  std::mt19937 rng(4);
  auto model = moe_model(rng, kWidths);
  const int64_t rows = 96;
  Session s32(model, options(Precision::Fp32, Mode::Training));
  Session s8(model, fp8_options(Mode::Training));
  double l32 = 0.0, l8 = 0.0;
  Vec y(rows * kVocab);
  for (int step = 0; step < 8; ++step) {
    const Batch b = batch(rng, rows);
    for (Session* s : {&s32, &s8}) {
      s->zero_grad();
      s->forward_tokens(b.tokens.data(), b.tokens.size(), rows, y.data(), y.size());
      (s == &s32 ? l32 : l8) = s->backward_loss(b.targets.data(), b.targets.size());
      s->step();
    }
  }
  EXPECT_NEAR(l8, l32, 2e-2 * l32);
  EXPECT_NE(parameters(s8), parameters(s32));

  const Batch b = batch(rng, rows);
  test::expect_checkpoint_serves_the_same(s8, fp8_options(Mode::Inference), b, rows,
                                          "fp8_session.moert");
  Vec y_train(rows * kVocab);
  s8.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y_train.data(), y_train.size());
  // Stale copies would show here: the inference session of the original model differs.
  Session orig(model, fp8_options(Mode::Inference));
  Vec y_orig(rows * kVocab);
  orig.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y_orig.data(), y_orig.size());
  EXPECT_NE(y_orig, y_train);
}

// A checkpoint taken mid-run resumes bit-identically: the FP8 copies are made from the saved
// masters, so 4 + 4 steps with a save and load between equal 8 steps in one session.
TEST(Fp8Session, CheckpointResumesBitIdentically) {
  std::mt19937 rng(7);
  auto model = moe_model(rng, kWidths);
  const int64_t rows = 64;
  std::vector<Batch> batches;
  for (int i = 0; i < 8; ++i) batches.push_back(batch(rng, rows));
  auto train = [&](Session& s, int from, int to, std::vector<double>& losses) {
    Vec y(rows * kVocab);
    for (int i = from; i < to; ++i) {
      const Batch& b = batches[static_cast<size_t>(i)];
      s.zero_grad();
      s.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y.data(), y.size());
      losses.push_back(s.backward_loss(b.targets.data(), b.targets.size()));
      s.step();
    }
  };
  std::vector<double> straight, resumed;
  Session a(model, fp8_options(Mode::Training));
  train(a, 0, 8, straight);

  const std::string path = ::testing::TempDir() + "fp8_resume.moert";
  {
    Session b(model, fp8_options(Mode::Training));
    train(b, 0, 4, resumed);
    b.save(path);
  }
  Session c(model, fp8_options(Mode::Training));
  c.load(path);
  train(c, 4, 8, resumed);
  EXPECT_EQ(straight, resumed);
  const Vec pa = parameters(a), pc = parameters(c);
  ASSERT_EQ(pa.size(), pc.size());
  EXPECT_EQ(0, std::memcmp(pa.data(), pc.data(), pa.size() * sizeof(float)));
  std::remove(path.c_str());
}

TEST(Fp8Session, ResultsDoNotDependOnTheThreadCount) {
  std::mt19937 rng(5);
  auto model = moe_model(rng, kWidths);
  const int64_t rows = 300;
  const Batch b = batch(rng, rows);
  std::vector<Vec> runs;
  for (uint32_t threads : {1u, 3u}) {
    Session s(model, fp8_options(Mode::Training, threads));
    runs.push_back(outputs_and_gradients(s, b, rows));
  }
  ASSERT_EQ(runs[0].size(), runs[1].size());
  EXPECT_EQ(0, std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)));
}

// UE8M0 scales (powers of two) quantize differently from amax / 448 scales: results differ,
// stay within the FP8 bounds of fp32, and the option is fixed when the session is created.
TEST(Fp8Session, Ue8m0ScalesAreAnOptionFixedAtCreation) {
  std::mt19937 rng(8);
  auto model = moe_model(rng, kWidths);
  const int64_t rows = 200;
  const Batch b = batch(rng, rows);
  Session s32(model, options(Precision::Fp32, Mode::Inference));
  Session plain(model, fp8_options(Mode::Inference));
  Session pow2(model, fp8_options(Mode::Inference, 2, true));
  Vec y32(rows * kVocab), yp(rows * kVocab), y2(rows * kVocab);
  s32.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y32.data(), y32.size());
  plain.forward_tokens(b.tokens.data(), b.tokens.size(), rows, yp.data(), yp.size());
  pow2.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y2.data(), y2.size());
  EXPECT_NE(yp, y2);
  EXPECT_LT(rel(y2, y32), 1e-1);
  EXPECT_THROW(plain.set_config("fp8_scales", "ue8m0"), Error);
  plain.set_config("fp8_scales", "fp32");  // what it already is
  SessionOptions o;
  o.set("fp8_scales", "ue8m0");
  EXPECT_TRUE(o.fp8.power_of_two_scales);
  o.set("fp8_scales", "fp32");
  EXPECT_FALSE(o.fp8.power_of_two_scales);
  try {
    o.set("fp8_scales", "e8m0");
    ADD_FAILURE() << "fp8_scales e8m0 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("fp32 or ue8m0"), std::string::npos) << e.what();
  }
}

TEST(Fp8Session, PrecisionOptionAndRefusals) {
  SessionOptions o;
  o.set("precision", "fp8");
  EXPECT_EQ(o.precision, Precision::Fp8);
  EXPECT_STREQ(precision_name(Precision::Fp8), "fp8");
  for (const char* bad : {"FP8", "fp8_e4m3", "e4m3"})
    EXPECT_THROW(o.set("precision", bad), Error) << bad;
  std::mt19937 rng(6);
  auto model = moe_model(rng);
  Session s(model, fp8_options(Mode::Training));
  EXPECT_THROW(s.set_config("precision", "fp32"), Error);
  // Where there is no usable GPU (or plugin) a CUDA session of precision fp8 is refused as
  // Unsupported, never made on another device or in another precision; where there is one it
  // multiplies its experts in FP8 (tests/gpu/test_cuda_fp8_session.cc).
  SessionOptions cuda;
  cuda.device = Device::Cuda;
  cuda.precision = Precision::Fp8;
  try {
    Session c(model, cuda);
    EXPECT_EQ(c.precision(), Precision::Fp8);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Unsupported) << e.what();
  }
}

// A NaN written into an expert weight is refused before the master or its FP8 copy changes: the
// session computes exactly what it did before.
TEST(Fp8Session, RefusedWriteLeavesMastersAndCopiesIntact) {
  std::mt19937 rng(9);
  auto model = moe_model(rng, kWidths);
  const int64_t rows = 40;
  const Batch b = batch(rng, rows);
  Session t(model, fp8_options(Mode::Training));
  t.set_eval(true);
  Vec before(rows * kVocab), after(rows * kVocab);
  t.forward_tokens(b.tokens.data(), b.tokens.size(), rows, before.data(), before.size());
  const size_t w2 = t.parameter_index("moe.w2");
  Vec v(t.parameter_size(w2));
  t.read_parameter(w2, v.data(), v.size());
  v[777] = std::nanf("");
  try {
    t.write_parameter(w2, v.data(), v.size());
    ADD_FAILURE() << "a NaN expert weight was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Numeric) << e.what();
  }
  t.forward_tokens(b.tokens.data(), b.tokens.size(), rows, after.data(), after.size());
  EXPECT_EQ(0, std::memcmp(before.data(), after.data(), after.size() * sizeof(float)));
  // A finite write refreshes the copy: the output changes.
  v[777] = 3.0f;
  t.write_parameter(w2, v.data(), v.size());
  t.forward_tokens(b.tokens.data(), b.tokens.size(), rows, after.data(), after.size());
  EXPECT_NE(before, after);
}

}  // namespace
}  // namespace moert
