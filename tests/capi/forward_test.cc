// Forward passes through the C ABI: misuse is refused before any work, leaves the session as the
// last successful pass left it, and a session shared between threads gives the single-threaded
// answers.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "capi_test_util.h"
#include "model_builder.h"

namespace capi_test {
namespace {

constexpr int32_t kInvalid = MOERT_ERR_INVALID_ARGUMENT;
constexpr float kSentinel = -12345.0f;

std::vector<int32_t> token_rows(uint64_t rows, uint32_t context, uint32_t salt) {
  std::vector<int32_t> t(rows * context);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>((i * 13 + salt * 7 + 5) % 64);
  return t;
}

// Per-expert counts of every MoE layer, and the mean MaxVio.
struct Stats {
  std::vector<std::vector<int64_t>> counts;
  double vio = -1;
  bool operator==(const Stats&) const = default;
};

Stats stats_of(const moert_session* s, const std::vector<std::pair<uint32_t, uint32_t>>& moe) {
  Stats st;
  for (const auto& [layer, experts] : moe) {
    std::vector<int64_t> c(experts, -1);
    EXPECT_TRUE(IsOk(moert_session_expert_counts(s, layer, MOERT_COUNTS_LAST, c.data(), c.size())));
    st.counts.push_back(c);
  }
  EXPECT_TRUE(IsOk(moert_session_max_vio(s, MOERT_ALL_LAYERS, MOERT_COUNTS_LAST, &st.vio)));
  return st;
}

// The example model (tokens in: context 4, vocab 64; 64 logits out; MoE layers 2 and 4 with 8
// experts, top_k 2) with one successful forward pass over 5 rows done.
class TokenForward : public testing::Test {
 protected:
  static constexpr uint64_t kRows = 5;
  static constexpr uint32_t kContext = 4, kWidth = 64;

  void SetUp() override {
    moert_model* m = nullptr;
    ASSERT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
    model_.reset(m);
    session_ = make_session(model_.get(), 2);
    ASSERT_TRUE(session_);
    tokens_ = token_rows(kRows, kContext, 0);
    ref_out_.assign(kRows * kWidth, kSentinel);
    ASSERT_TRUE(IsOk(forward(tokens_, kRows, ref_out_)));
    ref_stats_ = stats();
  }

  moert_status* forward(const std::vector<int32_t>& tokens, uint64_t rows,
                        std::vector<float>& out) {
    return moert_session_forward_tokens(session_.get(), tokens.data(), tokens.size(), rows,
                                        out.data(), out.size());
  }

  Stats stats() const { return stats_of(session_.get(), {{2, 8}, {4, 8}}); }

  // After a refused call: the statistics are those of the last successful pass, and the next
  // valid pass gives the reference output again.
  void expect_unchanged() {
    EXPECT_EQ(stats(), ref_stats_);
    std::vector<float> again(kRows * kWidth, kSentinel);
    ASSERT_TRUE(IsOk(forward(tokens_, kRows, again)));
    EXPECT_EQ(again, ref_out_);
    EXPECT_EQ(stats(), ref_stats_);
  }

  ModelPtr model_;
  SessionPtr session_;
  std::vector<int32_t> tokens_;
  std::vector<float> ref_out_;
  Stats ref_stats_;
};

TEST_F(TokenForward, ReferencePassIsSane) {
  for (float x : ref_out_) ASSERT_TRUE(std::isfinite(x));
  // Token-choice routing: every row goes to top_k = 2 experts of each MoE layer.
  for (const auto& c : ref_stats_.counts) {
    EXPECT_EQ(std::accumulate(c.begin(), c.end(), int64_t{0}), int64_t{kRows * 2});
    for (int64_t x : c) EXPECT_GE(x, 0);
  }
  // MaxVio as the header defines it, averaged over the two MoE layers.
  double sum = 0;
  for (const auto& c : ref_stats_.counts) {
    const double mean = static_cast<double>(kRows * 2) / 8.0;
    sum += (static_cast<double>(*std::max_element(c.begin(), c.end())) - mean) / mean;
  }
  EXPECT_NEAR(ref_stats_.vio, sum / 2, 1e-12);
  double one = -1;
  ASSERT_TRUE(IsOk(moert_session_max_vio(session_.get(), 2, MOERT_COUNTS_LAST, &one)));
  const auto& c2 = ref_stats_.counts[0];
  EXPECT_NEAR(one, (static_cast<double>(*std::max_element(c2.begin(), c2.end())) - 1.25) / 1.25,
              1e-12);
}

TEST_F(TokenForward, WrongTokenCount) {
  for (uint64_t n : {kRows * kContext - 1, kRows * kContext + 1, uint64_t{0}}) {
    std::vector<int32_t> tokens = token_rows(kRows, kContext, 1);
    tokens.resize(n, 1);
    std::vector<float> out(kRows * kWidth, kSentinel);
    EXPECT_TRUE(IsError(forward(tokens, kRows, out), kInvalid, {std::to_string(n), "20", "token"}))
        << n;
    EXPECT_EQ(out, std::vector<float>(kRows * kWidth, kSentinel)) << "output written on error";
    expect_unchanged();
  }
}

TEST_F(TokenForward, WrongOutputLength) {
  const auto tokens = token_rows(kRows, kContext, 2);
  for (uint64_t n : {kRows * kWidth - 1, kRows * kWidth + 1, uint64_t{kWidth}}) {
    std::vector<float> out(n, kSentinel);
    EXPECT_TRUE(
        IsError(forward(tokens, kRows, out), kInvalid, {"output", std::to_string(n), "320"}))
        << n;
    EXPECT_EQ(out, std::vector<float>(n, kSentinel));
    expect_unchanged();
  }
}

TEST_F(TokenForward, ZeroRows) {
  std::vector<float> out(kWidth, kSentinel);
  EXPECT_TRUE(
      IsError(moert_session_forward_tokens(session_.get(), tokens_.data(), 0, 0, out.data(), 0),
              kInvalid, {"rows"}));
  EXPECT_TRUE(IsError(moert_session_forward_tokens(session_.get(), tokens_.data(), tokens_.size(),
                                                   0, out.data(), out.size()),
                      kInvalid, {"rows"}));
  expect_unchanged();
}

// 2^29 rows of 4 tokens is 2^31 token positions: more than 32-bit indices address. Refused from
// the lengths alone, before the (deliberately short) buffers are touched.
TEST_F(TokenForward, RowsWhosePositionsOverflowInt32AreRefused) {
  const uint64_t rows = uint64_t{1} << 29;
  std::vector<float> out(kWidth, kSentinel);
  EXPECT_TRUE(IsError(moert_session_forward_tokens(session_.get(), tokens_.data(), rows * kContext,
                                                   rows, out.data(), rows * kWidth),
                      kInvalid, {"536870912", "embed", "2^31 - 1"}));
  EXPECT_EQ(out, std::vector<float>(kWidth, kSentinel));
  expect_unchanged();
}

TEST_F(TokenForward, TokenIdOutsideTheVocabulary) {
  for (int32_t bad :
       {-1, 64, 65, std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()}) {
    auto tokens = token_rows(kRows, kContext, 3);
    tokens[7] = bad;
    std::vector<float> out(kRows * kWidth, kSentinel);
    EXPECT_TRUE(IsError(forward(tokens, kRows, out), kInvalid,
                        {std::to_string(bad), "row " + std::to_string(7 / kContext),
                         "column " + std::to_string(7 % kContext), "64"}))
        << bad;
    EXPECT_EQ(out, std::vector<float>(kRows * kWidth, kSentinel));
    expect_unchanged();
  }
}

TEST_F(TokenForward, HiddenInputToATokenModel) {
  std::vector<float> in(kRows * kWidth, 0.5f), out(kRows * kWidth, kSentinel);
  EXPECT_TRUE(IsError(moert_session_forward_hidden(session_.get(), in.data(), in.size(), kRows,
                                                   out.data(), out.size()),
                      kInvalid, {"forward_tokens"}));
  EXPECT_EQ(out, std::vector<float>(kRows * kWidth, kSentinel));
  expect_unchanged();
}

TEST_F(TokenForward, StatisticsFollowTheLastSuccessfulPass) {
  // A different batch changes the counts; a refused call after it keeps the new ones.
  const auto other = token_rows(3, kContext, 9);
  std::vector<float> out(3 * kWidth);
  ASSERT_TRUE(IsOk(forward(other, 3, out)));
  const Stats after_other = stats();
  for (const auto& c : after_other.counts)
    EXPECT_EQ(std::accumulate(c.begin(), c.end(), int64_t{0}), 6);
  std::vector<float> short_out(1);
  EXPECT_TRUE(IsError(forward(other, 3, short_out), kInvalid));
  EXPECT_EQ(stats(), after_other);
}

// A model that takes hidden states (width 8) and gives 16 values per row.
class HiddenForward : public testing::Test {
 protected:
  static constexpr uint64_t kRows = 4;
  static constexpr uint32_t kIn = 8, kOut = 16;

  void SetUp() override {
    model_ = load_ok(build(hidden_baseline()));
    ASSERT_TRUE(model_);
    session_ = make_session(model_.get());
    ASSERT_TRUE(session_);
    in_.resize(kRows * kIn);
    for (size_t i = 0; i < in_.size(); ++i) in_[i] = std::sin(0.7f * static_cast<float>(i));
    ref_out_.assign(kRows * kOut, kSentinel);
    ASSERT_TRUE(IsOk(forward(session_.get(), in_, ref_out_)));
    ref_stats_ = stats();
  }

  static moert_status* forward(moert_session* s, const std::vector<float>& in,
                               std::vector<float>& out) {
    return moert_session_forward_hidden(s, in.data(), in.size(), in.size() / kIn, out.data(),
                                        out.size());
  }

  Stats stats() const { return stats_of(session_.get(), {{1, 4}}); }

  void expect_unchanged() {
    EXPECT_EQ(stats(), ref_stats_);
    std::vector<float> again(kRows * kOut, kSentinel);
    ASSERT_TRUE(IsOk(forward(session_.get(), in_, again)));
    EXPECT_EQ(again, ref_out_);
  }

  ModelPtr model_;
  SessionPtr session_;
  std::vector<float> in_, ref_out_;
  Stats ref_stats_;
};

TEST_F(HiddenForward, TokensToAHiddenModel) {
  std::vector<int32_t> tokens(kRows * kIn, 1);
  std::vector<float> out(kRows * kOut, kSentinel);
  EXPECT_TRUE(IsError(moert_session_forward_tokens(session_.get(), tokens.data(), tokens.size(),
                                                   kRows, out.data(), out.size()),
                      kInvalid, {"forward_hidden"}));
  EXPECT_EQ(out, std::vector<float>(kRows * kOut, kSentinel));
  expect_unchanged();
}

TEST_F(HiddenForward, WrongInputAndOutputLengths) {
  std::vector<float> out(kRows * kOut, kSentinel);
  EXPECT_TRUE(IsError(moert_session_forward_hidden(session_.get(), in_.data(), in_.size() - 1,
                                                   kRows, out.data(), out.size()),
                      kInvalid, {"input", "31", "32"}));
  EXPECT_TRUE(IsError(moert_session_forward_hidden(session_.get(), in_.data(), in_.size(), kRows,
                                                   out.data(), out.size() - 1),
                      kInvalid, {"output", "63", "64"}));
  EXPECT_TRUE(IsError(moert_session_forward_hidden(session_.get(), in_.data(), in_.size(), 0,
                                                   out.data(), out.size()),
                      kInvalid, {"rows"}));
  EXPECT_EQ(out, std::vector<float>(kRows * kOut, kSentinel));
  expect_unchanged();
}

TEST_F(HiddenForward, NonFiniteInputIsNumeric) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    auto in = in_;
    in[1 * kIn + 3] = bad;  // row 1, column 3
    std::vector<float> out(kRows * kOut, kSentinel);
    EXPECT_TRUE(IsError(forward(session_.get(), in, out), MOERT_ERR_NUMERIC, {"row 1", "column 3"}))
        << bad;
    EXPECT_EQ(out, std::vector<float>(kRows * kOut, kSentinel));
    expect_unchanged();
  }
}

TEST_F(HiddenForward, CheckFiniteFalseLetsNonFiniteInputThrough) {
  moert_session_options* raw = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&raw)));
  OptionsPtr options(raw);
  ASSERT_TRUE(IsOk(moert_session_options_set_config(options.get(), "check_finite", "false")));
  moert_session* s = nullptr;
  ASSERT_TRUE(IsOk(moert_session_create(model_.get(), options.get(), &s)));
  SessionPtr unchecked(s);
  auto in = in_;
  in[1 * kIn + 3] = std::numeric_limits<float>::quiet_NaN();
  in[2 * kIn + 0] = std::numeric_limits<float>::infinity();
  std::vector<float> out(kRows * kOut, kSentinel);
  ASSERT_TRUE(IsOk(forward(unchecked.get(), in, out)));
  // Rows are independent: the clean rows 0 and 3 match the reference; row 1 carries the NaN.
  for (uint64_t r : {0u, 3u})
    for (uint32_t c = 0; c < kOut; ++c)
      EXPECT_NEAR(out[r * kOut + c], ref_out_[r * kOut + c],
                  1e-5f * (1.0f + std::fabs(ref_out_[r * kOut + c])))
          << r << "," << c;
  EXPECT_TRUE(std::any_of(out.begin() + kOut, out.begin() + 2 * kOut,
                          [](float x) { return !std::isfinite(x); }));
  // Every row was still routed to top_k experts.
  std::vector<int64_t> counts(4);
  ASSERT_TRUE(
      IsOk(moert_session_expert_counts(unchecked.get(), 1, MOERT_COUNTS_LAST, counts.data(), 4)));
  EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), int64_t{0}), int64_t{kRows * 2});
}

// In fp8 a NaN has no E4M3 code: unchecked, the experts' quantizer refuses it. The error names
// where it is in the caller's rows, not in the routed experts' own order of them.
TEST_F(HiddenForward, CheckFiniteFalseInFp8NamesTheCallersRow) {
  moert_session_options* raw = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&raw)));
  OptionsPtr options(raw);
  ASSERT_TRUE(IsOk(moert_session_options_set_config(options.get(), "check_finite", "false")));
  ASSERT_TRUE(IsOk(moert_session_options_set_config(options.get(), "precision", "fp8")));
  moert_session* s = nullptr;
  ASSERT_TRUE(IsOk(moert_session_create(model_.get(), options.get(), &s)));
  SessionPtr unchecked(s);
  for (uint64_t row = 1; row < kRows; ++row) {
    auto in = in_;
    in[row * kIn + 3] = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> out(kRows * kOut, kSentinel);
    // The RMSNorm before the MoE layer spreads the NaN over its row: column 0 is the first.
    EXPECT_TRUE(IsError(forward(unchecked.get(), in, out), MOERT_ERR_NUMERIC,
                        {"layer 1 ('moe0', MoE): its input",
                         "at row " + std::to_string(row) + ", column 0", "check_finite"}))
        << row;
  }
}

// A layer of equal input and output widths may be run in place, `out` being `in`: in inference
// the CPU backend reads the caller's rows where they lie, in training it copies them (backward
// reads them again), and masked passes gather the kept rows first. Each gives what separate
// buffers give.
TEST(InPlaceForward, OutMayBeInInEveryKindOfPass) {
  ModelDesc desc;
  desc.input_dim = 8;
  desc.layers.push_back(moe_layer("moe0", 8));
  desc.layers.push_back(rmsnorm_layer("norm0", 8));
  desc.layers.push_back(moe_layer("moe1", 8));
  ModelPtr model = load_ok(build(desc));
  ASSERT_TRUE(model);
  constexpr uint64_t kRows = 6;
  std::vector<float> in(kRows * 8);
  for (size_t i = 0; i < in.size(); ++i) in[i] = std::cos(0.3f * static_cast<float>(i));
  const std::vector<uint8_t> mask = {1, 0, 1, 1, 0, 1};
  for (const int32_t mode : {MOERT_MODE_INFERENCE, MOERT_MODE_TRAINING}) {
    for (const int32_t eval : {0, 1}) {
      if (mode == MOERT_MODE_INFERENCE && eval) continue;
      for (const bool masked : {false, true}) {
        SCOPED_TRACE(testing::Message()
                     << "mode " << mode << ", eval " << eval << ", masked " << masked);
        SessionPtr s = make_session(model.get(), 1, mode);
        ASSERT_TRUE(s);
        if (mode == MOERT_MODE_TRAINING) {
          ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), eval)));
        }
        auto forward = [&](const float* x, float* y) {
          return masked ? moert_session_forward_hidden_masked(s.get(), x, in.size(), mask.data(),
                                                              mask.size(), kRows, y, in.size())
                        : moert_session_forward_hidden(s.get(), x, in.size(), kRows, y, in.size());
        };
        std::vector<float> apart(in.size(), kSentinel);
        ASSERT_TRUE(IsOk(forward(in.data(), apart.data())));
        std::vector<float> io = in;
        ASSERT_TRUE(IsOk(forward(io.data(), io.data())));
        EXPECT_EQ(io, apart);
        EXPECT_NE(io, in);
        if (mode == MOERT_MODE_TRAINING && !eval) {
          // The backward of the in-place pass reads the input the pass began with: the first
          // layer's weight gradients depend on it.
          const std::vector<float> dy(in.size(), 0.25f);
          auto gradients = [&] {
            std::vector<float> dx(in.size());
            EXPECT_TRUE(IsOk(moert_session_backward(s.get(), dy.data(), dy.size(), dx.data(),
                                                    dx.size(), nullptr)));
            std::vector<float> w1(4 * 4 * 8), gate(4 * 8);
            EXPECT_TRUE(IsOk(moert_session_get_gradient(s.get(), "moe0.w1", w1.data(), w1.size())));
            EXPECT_TRUE(
                IsOk(moert_session_get_gradient(s.get(), "moe0.gate", gate.data(), gate.size())));
            EXPECT_TRUE(IsOk(moert_session_zero_grad(s.get())));
            dx.insert(dx.end(), w1.begin(), w1.end());
            dx.insert(dx.end(), gate.begin(), gate.end());
            return dx;
          };
          const std::vector<float> after_io = gradients();
          ASSERT_TRUE(IsOk(forward(in.data(), apart.data())));
          EXPECT_EQ(after_io, gradients());
        }
      }
    }
  }
}

// A pass run in place that fails (here the residual of a row of 3e38 overflows in the layer that
// reads the caller's rows) leaves the input as it was, as a failed pass into a separate buffer
// leaves that buffer; the session stays usable, its next pass giving what a fresh session gives.
TEST(InPlaceForward, AFailedPassLeavesTheInputWhole) {
  ModelDesc desc;
  desc.input_dim = 8;
  desc.layers.push_back(moe_layer("moe0", 8));
  ModelPtr model = load_ok(build(desc));
  ASSERT_TRUE(model);
  constexpr uint64_t kRows = 6;
  std::vector<float> in(kRows * 8);
  for (size_t i = 0; i < in.size(); ++i) in[i] = std::cos(0.3f * static_cast<float>(i));
  std::vector<float> huge = in;
  for (size_t c = 0; c < 8; ++c) huge[2 * 8 + c] = 3e38f;
  SessionPtr s = make_session(model.get(), 1, MOERT_MODE_INFERENCE);
  ASSERT_TRUE(s);
  auto forward = [&](const float* x, float* y) {
    return moert_session_forward_hidden(s.get(), x, in.size(), kRows, y, in.size());
  };
  std::vector<float> io = huge;
  EXPECT_TRUE(IsError(forward(io.data(), io.data()), MOERT_ERR_NUMERIC, {"row 2"}));
  EXPECT_EQ(io, huge);
  std::vector<float> apart(in.size(), kSentinel);
  EXPECT_TRUE(IsError(forward(huge.data(), apart.data()), MOERT_ERR_NUMERIC, {"row 2"}));
  EXPECT_EQ(apart, std::vector<float>(in.size(), kSentinel));
  std::vector<float> again(in.size(), kSentinel), fresh(in.size(), kSentinel);
  ASSERT_TRUE(IsOk(forward(in.data(), again.data())));
  SessionPtr s2 = make_session(model.get(), 1, MOERT_MODE_INFERENCE);
  ASSERT_TRUE(s2);
  ASSERT_TRUE(IsOk(moert_session_forward_hidden(s2.get(), in.data(), in.size(), kRows, fresh.data(),
                                                fresh.size())));
  EXPECT_EQ(again, fresh);
}

// A finite input whose activation overflows inside an fp8 MoE layer: E4M3 has no infinity, so the
// experts' quantizer refuses it. The error names the layer, the caller's row (not the row's place
// in an expert's list) and the cause, whether check_finite is on or off. A norm weight of `scale`
// on column 3 makes a row's hidden values large only where its input's column 3 is not zero: with
// 1e25 its activation overflows in the forward; with 1e18 the forward holds, and an output
// gradient of 1e24 on that row overflows dh1 and dh3 in the backward.
TEST(Fp8Overflow, NamesTheLayerTheCallersRowAndTheCause) {
  constexpr uint64_t kRows = 5;
  auto session = [](float scale, const char* check) {
    ModelDesc d = hidden_baseline();
    std::vector<float> norm(8, 1.0f);
    norm[3] = scale;
    d.layers[0].rmsnorm.weight = TensorDesc::f32(norm);
    ModelPtr m = load_ok(build(d));
    moert_session_options* raw = nullptr;
    EXPECT_TRUE(IsOk(moert_session_options_create(&raw)));
    OptionsPtr options(raw);
    EXPECT_TRUE(IsOk(moert_session_options_set_config(options.get(), "check_finite", check)));
    EXPECT_TRUE(IsOk(moert_session_options_set_config(options.get(), "precision", "fp8")));
    EXPECT_TRUE(IsOk(moert_session_options_set_mode(options.get(), MOERT_MODE_TRAINING)));
    moert_session* s = nullptr;
    EXPECT_TRUE(m && IsOk(moert_session_create(m.get(), options.get(), &s)));
    return SessionPtr(s);
  };
  std::vector<float> in(kRows * 8), out(kRows * 16);
  for (size_t i = 0; i < in.size(); ++i)
    in[i] = i % 8 == 3 ? 0.0f : std::sin(0.7f * static_cast<float>(i));
  for (const char* check : {"true", "false"}) {
    SessionPtr forward = session(1e25f, check), backward = session(1e18f, check);
    ASSERT_TRUE(forward && backward);
    for (uint64_t row = 0; row < kRows; ++row) {
      auto x = in;
      x[row * 8 + 3] = 1.0f;
      EXPECT_TRUE(IsError(moert_session_forward_hidden(forward.get(), x.data(), x.size(), kRows,
                                                       out.data(), out.size()),
                          MOERT_ERR_NUMERIC,
                          {"layer 1 ('moe0', MoE): FP8 quantization of the FFN activation",
                           "at row " + std::to_string(row) + ", column",
                           "the layer's input is finite, so a value computed from it exceeded"}))
          << row << " check_finite " << check;
      ASSERT_TRUE(IsOk(moert_session_zero_grad(backward.get())));
      ASSERT_TRUE(IsOk(moert_session_forward_hidden(backward.get(), x.data(), x.size(), kRows,
                                                    out.data(), out.size())));
      std::vector<float> grad_out(out.size(), 0.0f);
      std::fill_n(grad_out.begin() + static_cast<std::ptrdiff_t>(row * 16), 16, 1e24f);
      EXPECT_TRUE(IsError(moert_session_backward(backward.get(), grad_out.data(), grad_out.size(),
                                                 nullptr, 0, nullptr),
                          MOERT_ERR_NUMERIC,
                          {"layer 1 ('moe0', MoE): FP8 quantization of the FFN",
                           "at row " + std::to_string(row) + ", column",
                           "output gradient is finite, so a value computed from it exceeded"}))
          << row << " check_finite " << check;
    }
  }
}

// ---- Routing variants ---------------------------------------------------------------------------

TEST(RoutingVariants, EveryPolicyAndScoreFunctionRuns) {
  constexpr uint64_t kRows = 5;
  for (int8_t policy = 0; policy <= 4; ++policy) {
    for (int8_t score = 0; score <= 1; ++score) {
      ModelDesc d = hidden_baseline();
      MoEDesc& moe = d.layers[1].moe;
      moe.balancing.policy = policy;
      moe.score_function = score;
      moe.balancing.aux_alpha = 0.01f;
      moe.num_shared = 1;
      moe.shared_hidden = 4;
      moe.shared_w1 = moe.shared_w3 = moe.shared_w2 = TensorDesc::init(2, 0.2f);
      ModelPtr m = load_ok(build(d));
      ASSERT_TRUE(m) << int{policy} << " " << int{score};
      int64_t v = -1;
      ASSERT_TRUE(IsOk(moert_model_moe_int(m.get(), 1, MOERT_MOE_BALANCING_POLICY, &v)));
      EXPECT_EQ(v, policy);
      ASSERT_TRUE(IsOk(moert_model_moe_int(m.get(), 1, MOERT_MOE_SCORE_FUNCTION, &v)));
      EXPECT_EQ(v, score);
      SessionPtr s = make_session(m.get(), 2);
      ASSERT_TRUE(s);
      std::vector<float> in(kRows * 8), out(kRows * 16, kSentinel);
      for (size_t i = 0; i < in.size(); ++i) in[i] = std::cos(0.37f * static_cast<float>(i));
      ASSERT_TRUE(IsOk(moert_session_forward_hidden(s.get(), in.data(), in.size(), kRows,
                                                    out.data(), out.size())))
          << int{policy} << " " << int{score};
      for (float x : out) EXPECT_TRUE(std::isfinite(x));
      std::vector<int64_t> counts(4, -1);
      ASSERT_TRUE(
          IsOk(moert_session_expert_counts(s.get(), 1, MOERT_COUNTS_LAST, counts.data(), 4)));
      const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
      if (policy == MOERT_BALANCING_EXPERT_CHOICE) {
        // Each expert takes the same capacity, about capacity_factor * rows * top_k / E = 2.5.
        for (int64_t c : counts) {
          EXPECT_EQ(c, counts[0]);
          EXPECT_GE(c, 2);
          EXPECT_LE(c, 3);
        }
      } else {
        EXPECT_EQ(total, int64_t{kRows * 2}) << int{policy} << " " << int{score};
      }
    }
  }
}

TEST(RoutingVariants, OutputDoesNotDependOnTheThreadCount) {
  moert_model* m = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
  ModelPtr model(m);
  const auto tokens = token_rows(37, 4, 5);
  std::vector<float> ref;
  std::vector<int64_t> ref_counts;
  for (uint32_t threads : {1u, 2u, 3u, 8u}) {
    SessionPtr s = make_session(model.get(), threads);
    ASSERT_TRUE(s);
    std::vector<float> out(37 * 64, kSentinel);
    ASSERT_TRUE(IsOk(moert_session_forward_tokens(s.get(), tokens.data(), tokens.size(), 37,
                                                  out.data(), out.size())));
    std::vector<int64_t> counts(8);
    ASSERT_TRUE(IsOk(moert_session_expert_counts(s.get(), 4, MOERT_COUNTS_LAST, counts.data(), 8)));
    if (ref.empty()) {
      ref = out;
      ref_counts = counts;
    } else {
      EXPECT_EQ(out, ref) << threads << " threads";
      EXPECT_EQ(counts, ref_counts) << threads << " threads";
    }
  }
}

// ---- Threads ------------------------------------------------------------------------------------

TEST(ConcurrentForward, SharedSessionMatchesSingleThreadedRun) {
  moert_model* m = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
  ModelPtr model(m);
  SessionPtr session = make_session(model.get(), 2);
  ASSERT_TRUE(session);
  constexpr int kThreads = 4, kIters = 20;
  constexpr uint32_t kContext = 4, kWidth = 64;
  auto rows_of = [](int t, int i) { return static_cast<uint64_t>(1 + (t * 3 + i) % 7); };
  auto input_of = [&](int t, int i) {
    return token_rows(rows_of(t, i), kContext, static_cast<uint32_t>(t * kIters + i));
  };

  // Reference outputs, one call at a time.
  std::vector<std::vector<std::vector<float>>> ref(kThreads,
                                                   std::vector<std::vector<float>>(kIters));
  for (int t = 0; t < kThreads; ++t)
    for (int i = 0; i < kIters; ++i) {
      const auto tokens = input_of(t, i);
      auto& out = ref[t][i];
      out.assign(rows_of(t, i) * kWidth, kSentinel);
      ASSERT_TRUE(IsOk(moert_session_forward_tokens(session.get(), tokens.data(), tokens.size(),
                                                    rows_of(t, i), out.data(), out.size())));
    }

  // The same calls from four threads at once on the same session, with readers of the
  // statistics and of the (immutable) model interleaved.
  std::vector<std::vector<std::vector<float>>> got(kThreads,
                                                   std::vector<std::vector<float>>(kIters));
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIters; ++i) {
        const auto tokens = input_of(t, i);
        auto& out = got[t][i];
        out.assign(rows_of(t, i) * kWidth, kSentinel);
        StatusPtr st(moert_session_forward_tokens(session.get(), tokens.data(), tokens.size(),
                                                  rows_of(t, i), out.data(), out.size()));
        if (st) ++failures[t];
        std::vector<int64_t> counts(8);
        StatusPtr cs(
            moert_session_expert_counts(session.get(), 2, MOERT_COUNTS_LAST, counts.data(), 8));
        if (cs) ++failures[t];
        // Every successful pass routes rows * top_k tokens: the counts are one pass's, never torn.
        const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
        if (total % 2 != 0 || total < 2 || total > 14) ++failures[t];
        uint32_t layers = 0;
        StatusPtr ls(moert_model_num_layers(model.get(), &layers));
        if (ls || layers != 6) ++failures[t];
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(failures[t], 0) << "thread " << t;
    for (int i = 0; i < kIters; ++i)
      EXPECT_EQ(got[t][i], ref[t][i]) << "thread " << t << " call " << i;
  }
}

// Four threads each create their own session over one model, at once, and run the same input:
// every output matches one session's. `rows` of 64 give the experts of a bf16 session more rows
// than the widening kernels take, so on CPUs that multiply bf16 natively the sessions create
// oneDNN matmul primitives concurrently (the process-wide primitive cache, under TSan).
void sessions_per_thread_match_one(const char* precision, uint64_t rows,
                                   const char* layout_copies = "auto") {
  moert_model* m = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
  ModelPtr model(m);
  const auto tokens = token_rows(rows, 4, 42);
  auto create = [&](moert_session** s) {
    moert_session_options* raw = nullptr;
    if (moert_status* st = moert_session_options_create(&raw)) return StatusPtr(st);
    OptionsPtr options(raw);
    if (moert_status* st = moert_session_options_set_config(raw, "precision", precision))
      return StatusPtr(st);
    if (moert_status* st = moert_session_options_set_config(raw, "layout_copies", layout_copies))
      return StatusPtr(st);
    return StatusPtr(moert_session_create(model.get(), options.get(), s));
  };
  std::vector<float> ref(rows * 64);
  {
    moert_session* s = nullptr;
    ASSERT_TRUE(IsOk(create(&s).release()));
    SessionPtr session(s);
    ASSERT_TRUE(IsOk(moert_session_forward_tokens(s, tokens.data(), tokens.size(), rows, ref.data(),
                                                  ref.size())));
  }
  std::vector<std::vector<float>> got(4, std::vector<float>(rows * 64, kSentinel));
  std::vector<std::string> errors(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      moert_session* s = nullptr;
      if (StatusPtr cs = create(&s)) {
        errors[t] = moert_status_message(cs.get());
        return;
      }
      for (int i = 0; i < 5; ++i) {
        StatusPtr fs(moert_session_forward_tokens(s, tokens.data(), tokens.size(), rows,
                                                  got[t].data(), got[t].size()));
        if (fs) {
          errors[t] = moert_status_message(fs.get());
          break;
        }
      }
      moert_session_free(s);
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) {
    EXPECT_EQ(errors[t], "") << t;
    EXPECT_EQ(got[t], ref) << t;
  }
}

TEST(ConcurrentForward, SessionsPerThreadOverOneModel) { sessions_per_thread_match_one("fp32", 6); }

// With transposed copies on any CPU: the sessions make and share one copy of each FFN weight
// (the model's cache, under TSan), while earlier sessions' copies are being released.
TEST(ConcurrentForward, SessionsPerThreadShareTransposedCopies) {
  sessions_per_thread_match_one("fp32", 6, "on");
}

TEST(ConcurrentForward, Bf16SessionsPerThreadOverOneModel) {
  sessions_per_thread_match_one("bf16", 64);
}

// ---- spin_wait_us: how long a session's threads poll for more work before they sleep ----------

TEST(SpinWait, TakesMicrosecondsUpToATenthOfASecond) {
  moert_session_options* raw = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&raw)));
  OptionsPtr o(raw);
  for (const char* ok : {"0", "50", "100000"})
    EXPECT_TRUE(IsOk(moert_session_options_set_config(o.get(), "spin_wait_us", ok))) << ok;
  for (const char* bad : {"100001", "-1", "50us", "", "1e3"})
    EXPECT_TRUE(IsError(moert_session_options_set_config(o.get(), "spin_wait_us", bad), kInvalid,
                        {"spin_wait_us"}))
        << bad;
}

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// Polling changes no result, a live session takes a new value, and the poll ends: threads left
// idle after a call sleep once their time is up (a pool whose threads outnumber the CPUs the
// process may use never polls, and then this holds trivially).
TEST(SpinWait, ChangesNoResultAndIdleThreadsSleepWhenTheirTimeIsUp) {
  moert_model* m = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
  ModelPtr model(m);
  const auto tokens = token_rows(37, 4, 9);
  auto forward = [&](moert_session* s) {
    std::vector<float> out(37 * 64, kSentinel);
    EXPECT_TRUE(IsOk(
        moert_session_forward_tokens(s, tokens.data(), tokens.size(), 37, out.data(), out.size())));
    return out;
  };
  const unsigned threads = std::max(2u, std::min(3u, std::thread::hardware_concurrency()));
  SessionPtr s = make_session(model.get(), threads);
  ASSERT_TRUE(s);
  const std::vector<float> ref = forward(s.get());
  for (const char* spin : {"0", "100000", "2000"}) {
    ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "spin_wait_us", spin))) << spin;
    EXPECT_EQ(forward(s.get()), ref) << spin;
  }
  EXPECT_TRUE(IsError(moert_session_set_config(s.get(), "spin_wait_us", "100001"), kInvalid,
                      {"spin_wait_us"}));
  // Still polling for 2 ms after each call, not the refused value's 0.1 s or for ever.
  forward(s.get());
  const double before = process_cpu_seconds();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_LT(process_cpu_seconds() - before, 0.1);
}

}  // namespace
}  // namespace capi_test
