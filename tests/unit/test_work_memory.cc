// The working buffers a session's passes size (activations, dispatched rows, backward scratch,
// the CPU backend's transposed operands): kept between calls up to "kept_work_bytes" and given
// back past it, or after a call that ran out of memory, once no backward is pending. A session
// that gave them back computes the same bits as one that kept them. Session::after_call is what
// every C entry point runs after its body.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "tests/unit/session_model.h"

namespace moert::test {
namespace {

constexpr int64_t kBig = 1024, kSmall = 16;

std::vector<float> forward(Session& s, const Batch& b, int64_t rows) {
  std::vector<float> y(rows * kSessionVocab);
  s.forward_tokens(b.tokens.data(), static_cast<uint64_t>(rows) * 4, nullptr, 0, rows, y.data(),
                   y.size());
  return y;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Two sessions over one model: one keeps its working memory (the default), one keeps none.
struct KeptAndGiven {
  KeptAndGiven(uint32_t seed, Precision p, Mode mode)
      : rng(seed),
        model(moe_model(rng)),
        big(batch(rng, kBig)),
        kept(model, options(p, mode)),
        given(model, options(p, mode)) {
    given.set_config("kept_work_bytes", "0");
  }
  std::mt19937 rng;
  std::shared_ptr<Model> model;
  Batch big;
  Session kept, given;
};

class WorkMemory : public ::testing::TestWithParam<Precision> {};

TEST_P(WorkMemory, InferenceKeepsWhatTheLimitAllowsAndComputesTheSameAfterARelease) {
  KeptAndGiven pair(7, GetParam(), Mode::Inference);
  const auto& model = pair.model;
  const Batch& big = pair.big;
  Session& kept = pair.kept;
  Session& given = pair.given;

  const auto y_kept = forward(kept, big, kBig);
  kept.after_call(false);
  const size_t big_bytes = kept.work_bytes();
  EXPECT_GT(big_bytes, size_t{kBig} * 64 * sizeof(float)) << "the pass's activations alone";
  forward(kept, big, kSmall);
  kept.after_call(false);
  // (A pass of few rows may add a buffer of its own kernels' on top.)
  EXPECT_GE(kept.work_bytes(), big_bytes) << "unlimited: a smaller pass keeps the largest's";

  const auto y_given = forward(given, big, kBig);
  EXPECT_GT(given.work_bytes(), 0u);
  given.after_call(false);
  EXPECT_EQ(given.work_bytes(), 0u);
  EXPECT_TRUE(same_bits(y_kept, y_given));
  EXPECT_TRUE(same_bits(forward(given, big, kBig), y_kept)) << "after a release";

  // A limit between the two passes' needs: the large pass's buffers go, the small one's stay.
  Session bounded(model, options(GetParam(), Mode::Inference));
  forward(bounded, big, kSmall);
  const size_t small_bytes = bounded.work_bytes();
  bounded.set_config("kept_work_bytes", std::to_string(small_bytes));
  bounded.after_call(false);
  EXPECT_EQ(bounded.work_bytes(), small_bytes);
  forward(bounded, big, kBig);
  bounded.after_call(false);
  EXPECT_EQ(bounded.work_bytes(), 0u);
  bounded.set_config("kept_work_bytes", "unlimited");
  forward(bounded, big, kBig);
  bounded.after_call(false);
  EXPECT_GT(bounded.work_bytes(), small_bytes);

  // A call that ran out of memory gives them back whatever the limit.
  kept.after_call(true);
  EXPECT_EQ(kept.work_bytes(), 0u);
}

TEST_P(WorkMemory, TrainingKeepsAPendingPassAndGivesBackAfterItsBackward) {
  KeptAndGiven pair(11, GetParam(), Mode::Training);
  const Batch& b = pair.big;
  Session& kept = pair.kept;
  Session& given = pair.given;
  for (int step = 0; step < 2; ++step) {
    std::vector<std::vector<float>> results;
    for (Session* s : {&kept, &given}) {
      std::vector<float> y = forward(*s, b, kBig);
      s->after_call(false);
      // The pass waits for its backward: nothing is given back, even after a failed call.
      const size_t pending = s->work_bytes();
      EXPECT_GT(pending, 0u);
      s->after_call(true);
      EXPECT_EQ(s->work_bytes(), pending);
      s->backward_loss(b.targets.data(), b.targets.size());
      s->after_call(false);
      if (s == &given) {
        EXPECT_EQ(s->work_bytes(), 0u);
      }
      for (size_t p = 0; p < s->num_parameters(); ++p) {
        std::vector<float> g(s->parameter_size(p));
        s->read_gradient(p, g.data(), g.size());
        y.insert(y.end(), g.begin(), g.end());
      }
      s->step();
      s->after_call(false);
      results.push_back(std::move(y));
    }
    EXPECT_GT(kept.work_bytes(), 0u);
    EXPECT_TRUE(same_bits(results[0], results[1])) << "step " << step;
  }
}

INSTANTIATE_TEST_SUITE_P(Precisions, WorkMemory,
                         ::testing::Values(Precision::Fp32, Precision::Bf16, Precision::Fp8),
                         [](const ::testing::TestParamInfo<Precision>& p) {
                           return std::string(p.param == Precision::Fp32   ? "Fp32"
                                              : p.param == Precision::Bf16 ? "Bf16"
                                                                           : "Fp8");
                         });

TEST(WorkMemoryOption, TakesBytesOrUnlimited) {
  SessionOptions o;
  EXPECT_EQ(o.kept_work_bytes, std::numeric_limits<uint64_t>::max());
  o.set("kept_work_bytes", "1048576");
  EXPECT_EQ(o.kept_work_bytes, 1048576u);
  o.set("kept_work_bytes", "unlimited");
  EXPECT_EQ(o.kept_work_bytes, std::numeric_limits<uint64_t>::max());
  for (const char* bad : {"-1", "1e6", "lots", ""})
    EXPECT_EQ(code_of([&] { o.set("kept_work_bytes", bad); }), code(Code::InvalidArgument)) << bad;
}

}  // namespace
}  // namespace moert::test
