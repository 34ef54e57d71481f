// Expert and data parallelism of device sessions under a demanding user: accumulation over
// micro-batches, failures in the middle of a step, masks, empty and uneven ranks, eval passes,
// parameters by name on a shard, optimizer and configuration changes, clipping, the global
// auxiliary loss, checkpoints moving between world sizes, peers that leave, and FP8. Ranks are
// threads over the in-process communicator presenting device memory, each with a session on the
// simulated device (libmoert_devsim.so), against one plain devsim session over the union of the
// rows (tests/gpu/test_device_parallel.cc has the plain cases).
//
// Bounds. Gradients: core/session_local_gradients.cc bounds a gradient element by a few ulps of
// the sum of the magnitudes of its per-row terms; relative to a tensor's largest element that
// is below 1e-6 for these shapes (kGradientBound, as in test_device_parallel.cc). Parameters
// after a few SGD steps: lr times the gradients' gap per step plus the momentum's carry,
// well within 1e-5 of the largest element (kParamBound; measured 8e-8). AdamW divides by
// sqrt(v) + eps, so an element whose gradient is near zero turns the gradients' gap into up to
// lr times that gap over eps: measured 4.3e-6 after 3 steps at lr 1e-3, within the same bound.
// Forward outputs of even, 64-row aligned splits are bitwise (each row is computed alone); uneven
// splits move a row within the CPU GEMM's blocks and get other bits: 1e-6 relative.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/session.h"
#include "tests/support/inprocess_communicator.h"
#include "tests/unit/session_model.h"

namespace moert {
namespace {

constexpr uint32_t kMoe = 2;  // the MoE layer of test::moe_model
constexpr uint32_t V = test::kSessionVocab;
constexpr double kGradientBound = 1e-6;
constexpr double kParamBound = 1e-5;

using Configure = std::function<void(SessionOptions&)>;

SessionOptions device_options(Mode mode, const Configure& configure = {}) {
  SessionOptions o = test::options(Precision::Bf16, mode);
  o.device = Device::Cuda;
  o.cuda_plugin = MOERT_CUDA_PLUGIN_PATH;
  o.set("optimizer", "sgd");
  o.set("lr", "0.05");
  if (configure) configure(o);
  return o;
}

// Runs body(rank, session) on `world` threads with sessions joined by an in-process device
// communicator; returns each rank's error (construction included), "" where none.
std::vector<std::string> on_ranks(int world, int ep, const std::shared_ptr<const Model>& model,
                                  Mode mode, const std::function<void(int, Session&)>& body,
                                  const Configure& configure = {}, double timeout = 30.0) {
  auto comms = testing::make_inprocess_communicators(world, timeout, CommMemory::Device);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        SessionOptions o = device_options(mode, configure);
        o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), ep);
        Session s(model, o);
        body(r, s);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

void expect_no_errors(const std::vector<std::string>& errors, const std::string& what) {
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << what << " rank " << r;
}

std::string layout_name(int world, int ep) {
  return std::to_string(world) + " ranks, EP " + std::to_string(ep);
}

// max_i |a_i - b_i| / max_i |b_i|.
double relative_gap(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return scale > 0.0 ? diff / scale : diff;
}

// The rank's part of one session's tensor: a routed expert tensor's shard, else all of it.
std::vector<float> part(const std::vector<float>& full, size_t n, int shard) {
  const size_t at = n == full.size() ? 0 : static_cast<size_t>(shard) * n;
  return {full.begin() + static_cast<int64_t>(at), full.begin() + static_cast<int64_t>(at + n)};
}

std::vector<std::vector<float>> gradients(const Session& s) {
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < s.num_parameters(); ++i) {
    out.emplace_back(static_cast<size_t>(s.parameter_size(i)));
    s.read_gradient(i, out.back().data(), out.back().size());
  }
  return out;
}

std::vector<std::vector<float>> parameters(const Session& s) {
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < s.num_parameters(); ++i) {
    out.emplace_back(static_cast<size_t>(s.parameter_size(i)));
    s.read_parameter(i, out.back().data(), out.back().size());
  }
  return out;
}

// Largest relative gap of a rank's tensors against one session's (the rank's shard of experts).
double worst_gap(const std::vector<std::vector<float>>& got,
                 const std::vector<std::vector<float>>& want, int shard) {
  double worst = got.size() == want.size() ? 0.0 : std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < got.size() && i < want.size(); ++i)
    worst = std::max(worst, relative_gap(got[i], part(want[i], got[i].size(), shard)));
  return worst;
}

std::vector<float> bias_of(const Session& s) {
  std::vector<float> b(8);
  s.read_bias(kMoe, b.data(), b.size());
  return b;
}

// What a script records, on one session or on each rank.
struct Record {
  std::vector<std::vector<std::vector<float>>> grads;   // after each backward
  std::vector<std::vector<std::vector<float>>> params;  // after each step
  std::vector<double> losses, norms;
  std::vector<std::vector<float>> biases;
};

// A rank's rows of a micro-batch of `rows` rows split evenly over `world` ranks.
struct Slice {
  int64_t first, n;
};
Slice slice(int rank, int world, int64_t rows) { return {rank * (rows / world), rows / world}; }

void micro_batch(Session& s, const test::Batch& b, int64_t at, Slice sl, Record& rec) {
  std::vector<float> out(static_cast<size_t>(sl.n * V));
  const int64_t first = at + sl.first;
  s.forward_tokens(b.tokens.data() + first * 4, static_cast<uint64_t>(sl.n * 4), nullptr, 0,
                   static_cast<uint64_t>(sl.n), out.data(), out.size());
  rec.losses.push_back(s.backward_loss(b.targets.data() + first, static_cast<uint64_t>(sl.n)));
  rec.grads.push_back(gradients(s));
}

void record_step(Session& s, Record& rec) {
  rec.norms.push_back(s.step().grad_norm);
  rec.params.push_back(parameters(s));
  rec.biases.push_back(bias_of(s));
}

// Three micro-batches, a step; a step with no backward (parameters must not move); a learning
// rate and clipping change; zero_grad (gradients exactly zero); two micro-batches; a step.
void accumulation_script(Session& s, int rank, int world, const test::Batch& b, int64_t rows,
                         Record& rec) {
  s.zero_grad();
  for (int mb = 0; mb < 3; ++mb) micro_batch(s, b, mb * rows, slice(rank, world, rows), rec);
  record_step(s, rec);
  // A step without zero_grad applies the same accumulated gradients again, as one process does.
  const uint64_t steps = s.step_count();
  record_step(s, rec);
  EXPECT_EQ(s.step_count(), steps + 1);
  s.set_config("lr", "0.02");
  s.set_config("clip_norm", "0.05");
  s.zero_grad();
  for (const auto& g : gradients(s))
    for (float v : g) ASSERT_EQ(v, 0.0f) << "zero_grad left a gradient";
  const auto zeroed = parameters(s);
  s.step();  // a step with nothing accumulated since zero_grad: no parameter moves
  EXPECT_EQ(parameters(s), zeroed);
  for (int mb = 3; mb < 5; ++mb) micro_batch(s, b, mb * rows, slice(rank, world, rows), rec);
  record_step(s, rec);
}

void compare(const Record& got, const Record& want, int shard, const std::string& what) {
  ASSERT_EQ(got.grads.size(), want.grads.size()) << what;
  ASSERT_EQ(got.params.size(), want.params.size()) << what;
  double g = 0.0, p = 0.0;
  for (size_t i = 0; i < got.grads.size(); ++i)
    g = std::max(g, worst_gap(got.grads[i], want.grads[i], shard));
  for (size_t i = 0; i < got.params.size(); ++i)
    p = std::max(p, worst_gap(got.params[i], want.params[i], shard));
  EXPECT_LE(g, kGradientBound) << what;
  EXPECT_LE(p, kParamBound) << what;
  for (size_t i = 0; i < got.losses.size(); ++i)
    EXPECT_NEAR(got.losses[i], want.losses[i], 1e-5 * std::fabs(want.losses[i])) << what;
  ASSERT_EQ(got.norms.size(), want.norms.size());
  for (size_t i = 0; i < got.norms.size(); ++i)
    EXPECT_NEAR(got.norms[i], want.norms[i], 1e-6 * want.norms[i]) << what << " norm " << i;
  EXPECT_EQ(got.biases, want.biases) << what;
  std::printf("%s: gradient gap %.3g, parameter gap %.3g\n", what.c_str(), g, p);
}

TEST(DeviceParallelMisuse, AccumulationEmptyStepsAndConfigChangesFollowOneSession) {
  std::mt19937 rng(201);
  const auto model = test::moe_model(rng);
  const int64_t rows = 128;
  const test::Batch b = test::batch(rng, 5 * rows);
  for (const std::string& optimizer : {std::string("sgd"), std::string("adamw")}) {
    const Configure cfg = [&](SessionOptions& o) {
      o.set("optimizer", optimizer);
      if (optimizer == "adamw") {
        o.set("lr", "0.001");
        o.set("weight_decay", "0.01");
      }
    };
    Record want;
    {
      Session one(model, device_options(Mode::Training, cfg));
      accumulation_script(one, 0, 1, b, rows, want);
    }
    // Clipping must have been active in the last step for the test to say something about it.
    EXPECT_GT(want.norms.back(), 0.05);
    for (auto [world, ep] : std::vector<std::pair<int, int>>{{2, 2}, {4, 2}, {4, 4}}) {
      std::vector<Record> got(static_cast<size_t>(world));
      expect_no_errors(
          on_ranks(
              world, ep, model, Mode::Training,
              [&](int r, Session& s) { accumulation_script(s, r, world, b, rows, got[r]); }, cfg),
          layout_name(world, ep));
      for (int r = 0; r < world; ++r)
        compare(got[r], want, r % ep,
                optimizer + ", " + layout_name(world, ep) + " rank " + std::to_string(r));
    }
  }
}

// Failing calls in the middle of a step, their bad input on the last rank (a row of one session's
// batch where there is one rank): each fails on every rank and leaves the gradients accumulated
// so far bitwise as they were; a step over overflowed gradients fails everywhere and moves
// nothing; then training goes on as one process's does.
void failure_script(Session& s, int rank, int world, const test::Batch& b, int64_t rows,
                    Record& rec, std::vector<std::string>& failures) {
  const Slice sl = slice(rank, world, rows);
  const bool bad = rank == world - 1;
  const auto expect_failure = [&](const std::function<void()>& call, Code code) {
    try {
      call();
      failures.push_back("no failure");
    } catch (const Error& e) {
      failures.push_back(e.code() == code ? "" : e.what());
    }
  };
  std::vector<float> out(static_cast<size_t>(sl.n * V));
  const auto forward = [&](int64_t at) {
    s.forward_tokens(b.tokens.data() + (at + sl.first) * 4, static_cast<uint64_t>(sl.n * 4),
                     nullptr, 0, static_cast<uint64_t>(sl.n), out.data(), out.size());
  };
  s.zero_grad();
  micro_batch(s, b, 0, sl, rec);
  const auto kept = gradients(s);
  // A target outside the vocabulary.
  std::vector<int32_t> targets(b.targets.begin() + rows + sl.first,
                               b.targets.begin() + rows + sl.first + sl.n);
  if (bad) targets[static_cast<size_t>(sl.n / 2)] = static_cast<int32_t>(V);
  forward(rows);
  expect_failure([&] { s.backward_loss(targets.data(), targets.size()); }, Code::InvalidArgument);
  EXPECT_EQ(gradients(s), kept) << "a refused backward_loss changed the gradients";
  // A NaN in the output gradient.
  std::vector<float> dy(out.size(), 1e-3f);
  if (bad) dy[dy.size() / 3] = std::numeric_limits<float>::quiet_NaN();
  forward(rows);
  expect_failure([&] { s.backward(dy.data(), dy.size(), nullptr, 0); }, Code::Numeric);
  EXPECT_EQ(gradients(s), kept) << "a refused backward changed the gradients";
  // The micro-batch again, correctly, and the step.
  micro_batch(s, b, rows, sl, rec);
  record_step(s, rec);
  // Output gradients that overflow the gradients on one rank: the step refuses them on every
  // rank and leaves the parameters as they were.
  s.zero_grad();
  std::fill(dy.begin(), dy.end(), bad ? 3e38f : 0.0f);
  forward(2 * rows);
  s.backward(dy.data(), dy.size(), nullptr, 0);
  const auto before = parameters(s);
  expect_failure([&] { s.step(); }, Code::Numeric);
  EXPECT_EQ(parameters(s), before) << "a refused step moved parameters";
  s.zero_grad();
  micro_batch(s, b, 2 * rows, sl, rec);
  record_step(s, rec);
}

TEST(DeviceParallelMisuse, FailuresMidStepKeepTheAccumulatedGradients) {
  std::mt19937 rng(211);
  const auto model = test::moe_model(rng);
  const int64_t rows = 128;
  const test::Batch b = test::batch(rng, 3 * rows);
  Record want;
  std::vector<std::string> one_failures;
  {
    Session one(model, device_options(Mode::Training));
    failure_script(one, 0, 1, b, rows, want, one_failures);
  }
  EXPECT_EQ(one_failures, std::vector<std::string>(3, ""));
  for (auto [world, ep] : std::vector<std::pair<int, int>>{{2, 2}, {4, 2}}) {
    std::vector<Record> got(static_cast<size_t>(world));
    std::vector<std::vector<std::string>> failures(static_cast<size_t>(world));
    expect_no_errors(on_ranks(world, ep, model, Mode::Training,
                              [&](int r, Session& s) {
                                failure_script(s, r, world, b, rows, got[r], failures[r]);
                              }),
                     layout_name(world, ep));
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(failures[r], std::vector<std::string>(3, "")) << layout_name(world, ep);
      compare(got[r], want, r % ep, layout_name(world, ep) + " rank " + std::to_string(r));
    }
  }
}

// A precondition of step that holds on one rank and not on another (eval mode on one): every
// rank refuses the step at once, and the job goes on (the communicator is not left broken by a
// rank waiting alone for a collective); so is a step after zero_grad on one rank only, and one
// with another learning rate on one rank.
TEST(DeviceParallelMisuse, StepRefusedOnOneRankIsRefusedOnEvery) {
  std::mt19937 rng(223);
  const auto model = test::moe_model(rng);
  const test::Batch b = test::batch(rng, 128);
  std::vector<std::string> refused(2);
  std::vector<double> seconds(2);
  std::vector<std::vector<std::vector<float>>> after(2);
  const auto errors = on_ranks(
      2, 2, model, Mode::Training,
      [&](int r, Session& s) {
        std::vector<float> out(64 * V);
        s.forward_tokens(b.tokens.data() + r * 256, 256, 64, out.data(), out.size());
        s.backward_loss(b.targets.data() + r * 64, 64);
        const auto before = parameters(s);
        if (r == 1) s.set_eval(true);
        const auto start = std::chrono::steady_clock::now();
        try {
          s.step();
        } catch (const Error& e) {
          refused[r] = e.what();
        }
        seconds[r] =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        EXPECT_EQ(parameters(s), before) << "rank " << r;
        if (r == 1) s.set_eval(false);
        // zero_grad on one rank only: the ranks disagree on what the step applies.
        if (r == 0) s.zero_grad();
        try {
          s.step();
          ADD_FAILURE() << "rank " << r << " stepped over micro-batches the others did not count";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("micro-batches since its zero_grad"),
                    std::string::npos)
              << e.what();
        }
        EXPECT_EQ(parameters(s), before) << "rank " << r;
        s.zero_grad();
        s.forward_tokens(b.tokens.data() + r * 256, 256, 64, out.data(), out.size());
        s.backward_loss(b.targets.data() + r * 64, 64);
        // Another learning rate on one rank only.
        if (r == 1) s.set_config("lr", "0.07");
        try {
          s.step();
          ADD_FAILURE() << "rank " << r << " stepped with another learning rate than its peer";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("other training settings"), std::string::npos)
              << e.what();
        }
        EXPECT_EQ(parameters(s), before) << "rank " << r;
        if (r == 1) s.set_config("lr", "0.05");
        s.step();
        after[r] = parameters(s);
      },
      {}, 5.0);
  expect_no_errors(errors, "eval on one rank");
  EXPECT_NE(refused[1].find("step in eval mode"), std::string::npos) << refused[1];
  EXPECT_NE(refused[0].find("rank 1 of 2 failed"), std::string::npos) << refused[0];
  for (double t : seconds) EXPECT_LT(t, 2.0) << "a refused step waited for a timeout";
  EXPECT_EQ(after[0][0], after[1][0]) << "replicas diverged";
}

// Rows of very different counts per rank (two ranks all padding), masked rows and
// ignored targets: one session over the concatenation of the ranks' rows, masks and targets.
// Eval passes between the backward and the step: outputs and eval counts bitwise one session's,
// no backward after them, and the step applies the training pass's gradients.
TEST(DeviceParallelMisuse, MasksIgnoredTargetsEmptyRanksAndEval) {
  std::mt19937 rng(227);
  const auto model = test::moe_model(rng);
  const std::vector<int64_t> split = {3, 37, 128, 11};
  const int64_t rows = 179;
  const test::Batch b = test::batch(rng, rows);
  std::vector<uint8_t> mask(static_cast<size_t>(rows), 1);
  std::vector<int32_t> targets = b.targets;
  for (int64_t i = 0; i < rows; ++i) {
    // Ranks 0 and 3: padding only.
    if (i % 5 == 2 || i < 3 || i >= 168) mask[static_cast<size_t>(i)] = 0;
    if (i % 7 == 3) targets[static_cast<size_t>(i)] = kIgnoreTarget;
  }
  const int64_t eval_rows = 64;
  const test::Batch e = test::batch(rng, 4 * eval_rows);
  struct Result {
    std::vector<float> out, eval_out;
    double loss = 0.0;
    std::vector<std::vector<float>> grads, params;
    std::vector<int64_t> counts, eval_counts;
    std::string after_eval;
  };
  const auto run = [&](Session& s, int64_t first, int64_t n, int64_t eval_first, int64_t eval_n,
                       Result& res) {
    res.out.assign(static_cast<size_t>(n * V), -1.0f);
    s.forward_tokens(b.tokens.data() + first * 4, static_cast<uint64_t>(n * 4), mask.data() + first,
                     static_cast<uint64_t>(n), static_cast<uint64_t>(n), res.out.data(),
                     res.out.size());
    res.counts = s.expert_counts(kMoe, CountScope::Last);
    res.loss = s.backward_loss(targets.data() + first, static_cast<uint64_t>(n));
    res.grads = gradients(s);
    // Eval before the step, while the parameters are bitwise one session's.
    s.set_eval(true);
    res.eval_out.resize(static_cast<size_t>(eval_n * V));
    s.forward_tokens(e.tokens.data() + eval_first * 4, static_cast<uint64_t>(eval_n * 4),
                     static_cast<uint64_t>(eval_n), res.eval_out.data(), res.eval_out.size());
    res.eval_counts = s.expert_counts(kMoe, CountScope::Eval);
    s.set_eval(false);
    try {
      s.backward_loss(e.targets.data() + eval_first, static_cast<uint64_t>(eval_n));
      res.after_eval = "accepted";
    } catch (const Error& err) {
      res.after_eval = err.code() == Code::InvalidState ? "refused" : err.what();
    }
    s.step();
    res.params = parameters(s);
  };
  Result want;
  {
    Session one(model, device_options(Mode::Training));
    run(one, 0, rows, 0, 4 * eval_rows, want);
  }
  EXPECT_EQ(want.after_eval, "refused");
  for (int ep : {2, 4}) {
    std::vector<Result> got(4);
    expect_no_errors(on_ranks(4, ep, model, Mode::Training,
                              [&](int r, Session& s) {
                                int64_t first = 0;
                                for (int q = 0; q < r; ++q) first += split[q];
                                run(s, first, split[r], r * eval_rows, eval_rows, got[r]);
                              }),
                     layout_name(4, ep));
    std::vector<float> out;
    std::vector<float> eval_out;
    for (int r = 0; r < 4; ++r) {
      const std::string what = layout_name(4, ep) + " rank " + std::to_string(r);
      out.insert(out.end(), got[r].out.begin(), got[r].out.end());
      eval_out.insert(eval_out.end(), got[r].eval_out.begin(), got[r].eval_out.end());
      EXPECT_EQ(got[r].counts, want.counts) << what;
      EXPECT_NEAR(got[r].loss, want.loss, 1e-6 * want.loss) << what;
      EXPECT_LE(worst_gap(got[r].grads, want.grads, r % ep), kGradientBound) << what;
      EXPECT_LE(worst_gap(got[r].params, want.params, r % ep), kParamBound) << what;
      EXPECT_EQ(got[r].eval_counts, want.eval_counts) << what;
      EXPECT_EQ(got[r].after_eval, "refused") << what;
    }
    // Padding rows are zero exactly; the rest within the uneven-split bound.
    for (int64_t i = 0; i < rows; ++i)
      if (!mask[static_cast<size_t>(i)]) {
        for (uint32_t c = 0; c < V; ++c) ASSERT_EQ(out[static_cast<size_t>(i * V + c)], 0.0f);
      }
    EXPECT_LE(relative_gap(out, want.out), 1e-6) << layout_name(4, ep);
    // The eval rows are 64 per rank: bitwise.
    EXPECT_EQ(eval_out, want.eval_out) << layout_name(4, ep);
  }
}

// A rank with no rows at all is refused (rows >= 1, moert.h: a rank with nothing to feed
// sends a row of padding) on every rank, and the job goes on; padding on every rank passes and
// adds nothing.
TEST(DeviceParallelMisuse, NoRowsOnOneRankAndPaddingEverywhere) {
  std::mt19937 rng(229);
  const auto model = test::moe_model(rng);
  const test::Batch b = test::batch(rng, 128);
  std::vector<std::string> refused(2);
  expect_no_errors(on_ranks(2, 2, model, Mode::Training,
                            [&](int r, Session& s) {
                              std::vector<float> out(64 * V);
                              s.forward_tokens(b.tokens.data() + r * 256, 256, 64, out.data(),
                                               out.size());
                              s.backward_loss(b.targets.data() + r * 64, 64);
                              const auto kept = gradients(s);
                              try {
                                s.forward_tokens(b.tokens.data(), r == 1 ? 0 : 256, r == 1 ? 0 : 64,
                                                 out.data(), r == 1 ? 0 : out.size());
                              } catch (const Error& e) {
                                refused[r] = e.what();
                              }
                              // Rows that are all padding, on every rank.
                              const std::vector<uint8_t> none(64, 0);
                              s.forward_tokens(b.tokens.data(), 256, none.data(), 64, 64,
                                               out.data(), out.size());
                              for (float v : out) ASSERT_EQ(v, 0.0f);
                              EXPECT_EQ(s.backward_loss(b.targets.data(), 64), 0.0);
                              EXPECT_EQ(gradients(s), kept);
                              s.step();
                            }),
                   "empty passes");
  EXPECT_NE(refused[1].find("rows must be at least 1"), std::string::npos) << refused[1];
  EXPECT_NE(refused[0].find("rank 1 of 2 failed"), std::string::npos) << refused[0];
}

// The auxiliary loss over the job's batch (aux_loss_scope global) equals one process's over the
// union; set_config switches it on a live session (not only at creation).
TEST(DeviceParallelMisuse, GlobalAuxLossMatchesOneSessionAndFollowsSetConfig) {
  std::mt19937 rng(233);
  auto aux_model = test::moe_model(rng);
  auto& moe = std::get<MoESpec>(aux_model->layers[kMoe].spec);
  moe.balancing.policy = BalancingPolicy::AuxLoss;
  moe.balancing.aux_alpha = 0.05f;
  const std::shared_ptr<const Model> model = aux_model;
  const int64_t rows = 256;
  const test::Batch b = test::batch(rng, rows);
  struct Result {
    double loss = 0.0;
    std::vector<std::vector<float>> grads;
  };
  const auto run = [&](Session& s, Slice sl, Result& res) {
    std::vector<float> out(static_cast<size_t>(sl.n * V));
    s.forward_tokens(b.tokens.data() + sl.first * 4, static_cast<uint64_t>(sl.n * 4),
                     static_cast<uint64_t>(sl.n), out.data(), out.size());
    res.loss = s.backward_loss(b.targets.data() + sl.first, static_cast<uint64_t>(sl.n));
    res.grads = gradients(s);
  };
  Result want;
  {
    Session one(model, device_options(Mode::Training));
    run(one, {0, rows}, want);
  }
  for (const char* how : {"created", "set_config", "local"}) {
    std::vector<Result> got(4);
    expect_no_errors(on_ranks(
                         4, 2, model, Mode::Training,
                         [&](int r, Session& s) {
                           if (std::string(how) == "set_config")
                             s.set_config("aux_loss_scope", "global");
                           run(s, slice(r, 4, rows), got[r]);
                         },
                         [&](SessionOptions& o) {
                           if (std::string(how) == "created") o.set("aux_loss_scope", "global");
                         }),
                     how);
    for (int r = 0; r < 4; ++r) {
      const double gap = worst_gap(got[r].grads, want.grads, r % 2);
      if (std::string(how) == "local") {
        // Each rank's own f_i: another loss (the test would say nothing if the scopes agreed).
        EXPECT_GT(std::fabs(got[r].loss - want.loss), 1e-5 * want.loss) << how;
        continue;
      }
      EXPECT_NEAR(got[r].loss, want.loss, 1e-6 * want.loss) << how << " rank " << r;
      EXPECT_LE(gap, kGradientBound) << how << " rank " << r;
    }
  }
}

// A peer that destroys its session (and its communicator) while the other computes: the other
// fails with a communicator error within the timeout instead of hanging; its communicator then
// stays broken: the next call and a new session over it fail at once.
TEST(DeviceParallelMisuse, APeerThatLeavesFailsTheOthersWithinTheTimeout) {
  std::mt19937 rng(239);
  const auto model = test::moe_model(rng);
  const test::Batch b = test::batch(rng, 128);
  const double timeout = 1.0;
  auto comms = testing::make_inprocess_communicators(2, timeout, CommMemory::Device);
  std::shared_ptr<Communicator> mine(std::move(comms[0]));
  std::string first, second, again;
  double first_s = 0.0, second_s = 0.0;
  std::thread leaver([&] {
    SessionOptions o = device_options(Mode::Training);
    o.set_comm(std::shared_ptr<Communicator>(std::move(comms[1])), 2);
    Session s(model, o);  // the creation is collective; then the session and the rank go
  });
  {
    SessionOptions o = device_options(Mode::Training);
    o.set_comm(mine, 2);
    Session s(model, o);
    leaver.join();
    std::vector<float> out(64 * V);
    const auto timed = [&](std::string& error, double& seconds) {
      const auto start = std::chrono::steady_clock::now();
      try {
        s.forward_tokens(b.tokens.data(), 256, 64, out.data(), out.size());
        error = "no error";
      } catch (const Error& e) {
        error = e.code() == Code::Comm ? "" : e.what();
      }
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    timed(first, first_s);
    timed(second, second_s);
  }
  EXPECT_EQ(first, "");
  EXPECT_EQ(second, "");
  EXPECT_LT(first_s, timeout + 2.0);
  EXPECT_LT(second_s, 0.5 * timeout) << "a broken communicator waited again";
  EXPECT_TRUE(mine->broken());
  const auto start = std::chrono::steady_clock::now();
  try {
    SessionOptions o = device_options(Mode::Training);
    o.set_comm(mine, 2);
    Session s(model, o);
    again = "no error";
  } catch (const Error& e) {
    again = e.code() == Code::Comm ? "" : e.what();
  }
  EXPECT_EQ(again, "");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
            0.5 * timeout);
}

// Layouts that cannot work are refused on every rank, within the timeout: an EP that does not
// divide the ranks (set_comm), one that does not divide the experts (8 over 3), and ranks that
// disagree on EP.
TEST(DeviceParallelMisuse, ImpossibleLayoutsAreRefusedOnEveryRank) {
  std::mt19937 rng(241);
  const auto model = test::moe_model(rng);
  {
    auto comms = testing::make_inprocess_communicators(4, 1.0, CommMemory::Device);
    SessionOptions o = device_options(Mode::Training);
    try {
      o.set_comm(std::shared_ptr<Communicator>(std::move(comms[0])), 3);
      ADD_FAILURE() << "EP 3 over 4 ranks accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::InvalidArgument);
    }
  }
  const auto start = std::chrono::steady_clock::now();
  const auto errors = on_ranks(
      3, 3, model, Mode::Training, [](int, Session&) {}, {}, 1.0);
  for (const auto& e : errors)
    EXPECT_TRUE(e.find("routed experts, which an expert-parallel size of 3 does not divide") !=
                    std::string::npos ||
                e.find("failed:") != std::string::npos)
        << e;
  EXPECT_NE(errors[0].find("does not divide"), std::string::npos) << errors[0];
  // EP 2 on rank 0, 1 on rank 1: no session may come up on either.
  auto comms = testing::make_inprocess_communicators(2, 1.0, CommMemory::Device);
  std::vector<std::string> mixed(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      try {
        SessionOptions o = device_options(Mode::Training);
        o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), r == 0 ? 2 : 1);
        Session s(model, o);
        mixed[r] = "created";
      } catch (const Error& e) {
        mixed[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& e : mixed) EXPECT_NE(e, "created");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
}

// Parameters by name on a shard: the names are one session's; a routed expert tensor is the
// rank's E / EP experts (shard rank % EP) and refuses the whole tensor's length; writing the same
// values on every rank, as one session does, gives one session's forward.
TEST(DeviceParallelMisuse, ParametersByNameOnAShard) {
  std::mt19937 rng(251);
  const auto model = test::moe_model(rng);
  const test::Batch b = test::batch(rng, 256);
  Session one(model, device_options(Mode::Training));
  const auto full = parameters(one);
  const size_t w1 = one.parameter_index("moe.w1");
  std::vector<float> changed = full[w1];
  for (size_t i = 0; i < changed.size(); ++i) changed[i] += 0.01f * static_cast<float>(i % 7);
  one.write_parameter(w1, changed.data(), changed.size());
  std::vector<float> want(256 * V);
  one.forward_tokens(b.tokens.data(), 1024, 256, want.data(), want.size());
  std::vector<float> got(want.size());
  expect_no_errors(on_ranks(4, 2, model, Mode::Training,
                            [&](int r, Session& s) {
                              ASSERT_EQ(s.num_parameters(), one.num_parameters());
                              for (size_t i = 0; i < s.num_parameters(); ++i)
                                EXPECT_EQ(s.parameter_name(i), one.parameter_name(i));
                              const size_t i = s.parameter_index("moe.w1");
                              EXPECT_EQ(s.parameter_size(i), one.parameter_size(i) / 2);
                              std::vector<float> shard(static_cast<size_t>(s.parameter_size(i)));
                              s.read_parameter(i, shard.data(), shard.size());
                              EXPECT_EQ(shard, part(full[i], shard.size(), r % 2));
                              try {
                                s.write_parameter(i, changed.data(), changed.size());
                                ADD_FAILURE() << "a shard took the whole tensor";
                              } catch (const Error& e) {
                                EXPECT_EQ(e.code(), Code::InvalidArgument);
                              }
                              const auto mine = part(changed, shard.size(), r % 2);
                              s.write_parameter(i, mine.data(), mine.size());
                              s.forward_tokens(b.tokens.data() + r * 256, 256, 64,
                                               got.data() + r * 64 * V, 64 * V);
                            }),
                   "parameters by name");
  EXPECT_EQ(got, want);
}

// `steps` steps of two micro-batches of `rows` rows (rank r feeds its even share) from step
// `from` of the batch's cycle of 3.
void train_steps(Session& s, int rank, int world, const test::Batch& b, int64_t rows, int from,
                 int steps) {
  Record unused;
  for (int step = from; step < from + steps; ++step) {
    s.zero_grad();
    for (int mb = 0; mb < 2; ++mb)
      micro_batch(s, b, (step * 2 + mb) % 3 * rows, slice(rank, world, rows), unused);
    s.step();
  }
}

// A checkpoint of 4 ranks, EP 2 x DP 2, resumed by 2 ranks (EP 2) and by 1: each goes on as one
// process from the same file does; the file itself is one process's after the same steps to
// the parameters' rounding, its loss-free biases bitwise. Then one process's file resumed by 4.
TEST(DeviceParallelMisuse, CheckpointOfFourRanksResumesOnTwoAndOne) {
  std::mt19937 rng(257);
  const auto model = test::moe_model(rng);
  const int64_t rows = 128;
  const test::Batch b = test::batch(rng, 3 * rows);
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("moert_device_misuse_" + std::to_string(::getpid()) + ".moert"))
                               .string();
  expect_no_errors(on_ranks(4, 2, model, Mode::Training,
                            [&](int r, Session& s) {
                              train_steps(s, r, 4, b, rows, 0, 3);
                              s.save(path);
                            }),
                   "4 ranks save");
  Session straight(model, device_options(Mode::Training));
  train_steps(straight, 0, 1, b, rows, 0, 3);
  Session from_file(model, device_options(Mode::Training));
  from_file.load(path);
  EXPECT_EQ(from_file.step_count(), 3u);
  EXPECT_EQ(bias_of(from_file), bias_of(straight));
  EXPECT_LE(worst_gap(parameters(from_file), parameters(straight), 0), kParamBound);
  // One process from the file: the reference for both continuations.
  train_steps(from_file, 0, 1, b, rows, 3, 2);
  const auto want = parameters(from_file);
  const auto want_bias = bias_of(from_file);
  std::vector<std::vector<std::vector<float>>> two(2);
  std::vector<std::vector<float>> two_bias(2);
  expect_no_errors(on_ranks(2, 2, model, Mode::Training,
                            [&](int r, Session& s) {
                              s.load(path);
                              EXPECT_EQ(s.step_count(), 3u);
                              train_steps(s, r, 2, b, rows, 3, 2);
                              two[r] = parameters(s);
                              two_bias[r] = bias_of(s);
                            }),
                   "2 ranks resume");
  for (int r = 0; r < 2; ++r) {
    EXPECT_LE(worst_gap(two[r], want, r), kParamBound) << "rank " << r;
    EXPECT_EQ(two_bias[r], want_bias) << "rank " << r;
  }
  Session one(model, device_options(Mode::Training));
  one.load(path);
  train_steps(one, 0, 1, b, rows, 3, 2);
  EXPECT_EQ(parameters(one), want) << "one process from the same file is deterministic";
  // And back: one process's checkpoint resumed by 4 ranks.
  one.save(path);
  train_steps(one, 0, 1, b, rows, 5, 2);
  const auto want4 = parameters(one);
  const auto want4_bias = bias_of(one);
  std::vector<std::vector<std::vector<float>>> four(4);
  std::vector<std::vector<float>> four_bias(4);
  expect_no_errors(on_ranks(4, 2, model, Mode::Training,
                            [&](int r, Session& s) {
                              s.load(path);
                              EXPECT_EQ(s.step_count(), 5u);
                              train_steps(s, r, 4, b, rows, 5, 2);
                              four[r] = parameters(s);
                              four_bias[r] = bias_of(s);
                            }),
                   "4 ranks resume");
  std::filesystem::remove(path);
  for (int r = 0; r < 4; ++r) {
    EXPECT_LE(worst_gap(four[r], want4, r % 2), kParamBound) << "rank " << r;
    EXPECT_EQ(four_bias[r], want4_bias) << "rank " << r;
  }
}

// FP8 experts across ranks. Activations are quantized in 1 x 128 tiles along each row for
// Fprop and Dgrad, so outputs agree with one session to rounding for any split (bitwise for
// 64-row aligned ones). Wgrad reduces over rows and quantizes its operands in 128-row tiles: the
// routed experts' token lists are one process's (EP aligns the replicas' shares), but the
// shared experts' Wgrad runs over each rank's own rows, whose tiles are one process's only when
// every rank but the last feeds a multiple of 128 rows (then within kGradientBound); otherwise a
// 128-row tile's scale spans two ranks and their gradients agree only to FP8's quantization:
// E4M3 keeps 3 mantissa bits, each operand within 2^-4 relative, a product within 2^-3; measured
// 2.6e-2 of the largest element here.
TEST(DeviceParallelMisuse, Fp8AcrossRanks) {
  std::mt19937 rng(263);
  const auto model = test::moe_model(rng, {128, 128, 128});
  const test::Batch b = test::batch(rng, 256);
  const Configure fp8 = [](SessionOptions& o) { o.set("precision", "fp8"); };
  for (const std::vector<int64_t>& split :
       {std::vector<int64_t>{128, 128}, std::vector<int64_t>{128, 100},
        std::vector<int64_t>{64, 192}, std::vector<int64_t>{50, 206},
        std::vector<int64_t>{93, 57, 106}}) {
    const int world = static_cast<int>(split.size());
    int64_t rows = 0;
    bool aligned128 = true;
    for (size_t r = 0; r < split.size(); ++r) {
      rows += split[r];
      if (r + 1 < split.size() && split[r] % 128 != 0) aligned128 = false;
    }
    Session one(model, device_options(Mode::Training, fp8));
    std::vector<float> want(static_cast<size_t>(rows * V)), got(want.size());
    one.forward_tokens(b.tokens.data(), static_cast<uint64_t>(rows * 4),
                       static_cast<uint64_t>(rows), want.data(), want.size());
    one.backward_loss(b.targets.data(), static_cast<uint64_t>(rows));
    const auto want_grads = gradients(one);
    std::vector<double> shared_gaps(split.size()), other_gaps(split.size());
    expect_no_errors(on_ranks(
                         world, world == 2 ? 2 : 1, model, Mode::Training,
                         [&](int r, Session& s) {
                           int64_t first = 0;
                           for (int q = 0; q < r; ++q) first += split[q];
                           const int64_t n = split[r];
                           s.forward_tokens(b.tokens.data() + first * 4,
                                            static_cast<uint64_t>(n * 4), static_cast<uint64_t>(n),
                                            got.data() + first * V, static_cast<uint64_t>(n * V));
                           s.backward_loss(b.targets.data() + first, static_cast<uint64_t>(n));
                           const auto g = gradients(s);
                           for (size_t i = 0; i < g.size(); ++i) {
                             const double gap = relative_gap(
                                 g[i], part(want_grads[i], g[i].size(), world == 2 ? r : 0));
                             double& worst = s.parameter_name(i).rfind("moe.shared_", 0) == 0
                                                 ? shared_gaps[r]
                                                 : other_gaps[r];
                             worst = std::max(worst, gap);
                           }
                         },
                         fp8),
                     "fp8");
    const std::string what =
        "fp8, first rank " + std::to_string(split[0]) + " of " + std::to_string(rows) + " rows";
    const double out_gap = relative_gap(got, want);
    if (split[0] % 64 == 0 && world == 2) {
      EXPECT_EQ(got, want) << what;
    }
    EXPECT_LE(out_gap, 1e-6) << what;
    const double shared = *std::max_element(shared_gaps.begin(), shared_gaps.end());
    const double other = *std::max_element(other_gaps.begin(), other_gaps.end());
    EXPECT_LE(other, kGradientBound) << what;
    EXPECT_LE(shared, aligned128 ? kGradientBound : 0.125) << what;
    std::printf("%s: output gap %.3g, shared experts' gradients %.3g, the rest %.3g\n",
                what.c_str(), out_gap, shared, other);
  }
}

// A kernel failing on one rank in the middle of a pass (FP8 quantization of a NaN, check_finite
// off): the rank finishes the pass's exchanges and every rank fails the call at once with
// MOERT_ERR_NUMERIC; the communicator is neither broken nor timed out. A forward fails where a
// weight written on one rank overflows; a backward where one rank's output gradient holds a NaN,
// which leaves the step refused until zero_grad; then training goes on alike.
TEST(DeviceParallelMisuse, AKernelFailureOnOneRankFailsEveryRankAtOnce) {
  std::mt19937 rng(271);
  const auto model = test::moe_model(rng, {128, 128, 128});
  const test::Batch b = test::batch(rng, 256);
  const Configure fp8 = [](SessionOptions& o) {
    o.set("precision", "fp8");
    o.set("check_finite", "false");
  };
  std::vector<std::vector<std::string>> failures(2);
  std::vector<std::vector<std::vector<float>>> after(2);
  const auto start = std::chrono::steady_clock::now();
  expect_no_errors(on_ranks(
                       2, 2, model, Mode::Training,
                       [&](int r, Session& s) {
                         const Slice sl = slice(r, 2, 256);
                         std::vector<float> out(static_cast<size_t>(sl.n * V));
                         const auto forward = [&] {
                           s.forward_tokens(b.tokens.data() + sl.first * 4,
                                            static_cast<uint64_t>(sl.n * 4), nullptr, 0,
                                            static_cast<uint64_t>(sl.n), out.data(), out.size());
                         };
                         const auto expect_numeric = [&](const std::function<void()>& call) {
                           try {
                             call();
                             failures[r].push_back("no failure");
                           } catch (const Error& e) {
                             failures[r].push_back(e.code() == Code::Numeric ? "" : e.what());
                           }
                         };
                         // The shared expert's w1 at 1e38 on rank 1 overflows its hidden values to
                         // infinity, whose SwiGLU the down projection's quantizer meets. Both ranks
                         // write it (rank 0 its own values), and write it back alike, so that the
                         // step sees equal writes.
                         size_t w1 = 0;
                         while (s.parameter_name(w1) != "moe.shared_w1") ++w1;
                         std::vector<float> kept(static_cast<size_t>(s.parameter_size(w1)));
                         s.read_parameter(w1, kept.data(), kept.size());
                         std::vector<float> huge(kept.size(), 1e38f);
                         s.write_parameter(w1, r == 1 ? huge.data() : kept.data(), kept.size());
                         expect_numeric(forward);
                         s.write_parameter(w1, kept.data(), kept.size());
                         forward();
                         std::vector<float> dy(out.size(), 1e-3f);
                         if (r == 1) dy[dy.size() / 3] = std::numeric_limits<float>::quiet_NaN();
                         expect_numeric([&] { s.backward(dy.data(), dy.size(), nullptr, 0); });
                         expect_numeric([&] { s.step(); });
                         s.zero_grad();
                         forward();
                         s.backward_loss(b.targets.data() + sl.first, static_cast<uint64_t>(sl.n));
                         s.step();
                         after[r] = parameters(s);
                       },
                       fp8),
                   "kernel failure");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 20.0) << "a rank waited for the failing one";
  // One session that makes the same successful step (128 rows a rank: FP8's 128-row Wgrad tiles
  // of the shared experts are one process's, Fp8AcrossRanks).
  Session one(model, device_options(Mode::Training, fp8));
  std::vector<float> out(256 * V);
  one.forward_tokens(b.tokens.data(), 256 * 4, nullptr, 0, 256, out.data(), out.size());
  one.backward_loss(b.targets.data(), 256);
  one.step();
  const auto want = parameters(one);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(failures[r], std::vector<std::string>(3, "")) << "rank " << r;
    EXPECT_LE(worst_gap(after[r], want, r), kParamBound) << "rank " << r;
  }
}

// ep_chunks and ep_overlap changed on a live session (on every rank, 7 chunks of 128 rows
// included) run and change no result: outputs and gradients bitwise as with the defaults.
TEST(DeviceParallelMisuse, ChunksAndOverlapChangedLiveChangeNoResult) {
  std::mt19937 rng(269);
  const auto model = test::moe_model(rng);
  const test::Batch b = test::batch(rng, 256);
  expect_no_errors(
      on_ranks(2, 2, model, Mode::Training,
               [&](int r, Session& s) {
                 std::vector<float> out(128 * V);
                 std::vector<std::vector<float>> outs;
                 std::vector<std::vector<std::vector<float>>> grads;
                 for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
                          {"ep_chunks", "2"}, {"ep_chunks", "7"}, {"ep_overlap", "false"}}) {
                   s.set_config(key, value);
                   s.zero_grad();
                   s.forward_tokens(b.tokens.data() + r * 512, 512, 128, out.data(), out.size());
                   s.backward_loss(b.targets.data() + r * 128, 128);
                   outs.push_back(out);
                   grads.push_back(gradients(s));
                 }
                 for (size_t i = 1; i < outs.size(); ++i) {
                   EXPECT_EQ(outs[i], outs[0]) << "setting " << i;
                   EXPECT_EQ(grads[i], grads[0]) << "setting " << i;
                 }
               }),
      "chunks");
}

// A hidden-state model (no embedding): a NaN input on the last rank fails the forward on every
// rank; an input gradient that overflows on the last rank fails the backward on every rank after
// the gradients were accumulated, so every rank refuses the step until zero_grad; then training
// goes on as one process's does over the same calls.
TEST(DeviceParallelMisuse, HiddenInputFailuresAfterAccumulationPoisonEveryRank) {
  std::mt19937 rng(271);
  auto hidden = test::moe_model(rng);
  hidden->layers.erase(hidden->layers.begin());
  hidden->token_input = false;
  hidden->input_width = 64;
  const std::shared_ptr<const Model> model = hidden;
  const int64_t rows = 128;
  std::vector<float> x(static_cast<size_t>(3 * rows * 64));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : x) v = nd(rng);
  std::vector<float> dy(static_cast<size_t>(3 * rows * V));
  for (auto& v : dy) v = 1e-2f * nd(rng);
  const auto script = [&](Session& s, int rank, int world, std::vector<std::string>& failures) {
    const Slice sl = slice(rank, world, rows);
    const bool bad = rank == world - 1;
    std::vector<float> out(static_cast<size_t>(sl.n * V)), gin(static_cast<size_t>(sl.n * 64));
    const auto pass = [&](int mb, float poison_x, float big_dy) {
      std::vector<float> in(x.begin() + (mb * rows + sl.first) * 64,
                            x.begin() + (mb * rows + sl.first + sl.n) * 64);
      std::vector<float> g(dy.begin() + (mb * rows + sl.first) * V,
                           dy.begin() + (mb * rows + sl.first + sl.n) * V);
      if (bad && poison_x != 0.0f) in[in.size() / 2] = poison_x;
      if (bad && big_dy != 0.0f) std::fill(g.begin(), g.end(), big_dy);
      s.forward_hidden(in.data(), in.size(), static_cast<uint64_t>(sl.n), out.data(), out.size());
      s.backward(g.data(), g.size(), gin.data(), gin.size());
    };
    const auto expect_failure = [&](const std::function<void()>& call, Code code) {
      try {
        call();
        failures.push_back("no failure");
      } catch (const Error& e) {
        failures.push_back(e.code() == code ? "" : e.what());
      }
    };
    s.zero_grad();
    pass(0, 0.0f, 0.0f);
    const auto kept = gradients(s);
    expect_failure([&] { pass(1, std::numeric_limits<float>::quiet_NaN(), 0.0f); }, Code::Numeric);
    EXPECT_EQ(gradients(s), kept);
    expect_failure([&] { pass(1, 0.0f, 3e38f); }, Code::Numeric);
    const auto before = parameters(s);
    expect_failure([&] { s.step(); }, Code::Numeric);
    EXPECT_EQ(parameters(s), before);
    s.zero_grad();
    pass(2, 0.0f, 0.0f);
    s.step();
  };
  std::vector<std::string> one_failures;
  std::vector<std::vector<float>> want;
  {
    Session one(model, device_options(Mode::Training));
    script(one, 0, 1, one_failures);
    want = parameters(one);
  }
  EXPECT_EQ(one_failures, std::vector<std::string>(3, ""));
  std::vector<std::vector<std::string>> failures(2);
  std::vector<std::vector<std::vector<float>>> got(2);
  expect_no_errors(on_ranks(2, 2, model, Mode::Training,
                            [&](int r, Session& s) {
                              script(s, r, 2, failures[r]);
                              got[r] = parameters(s);
                            }),
                   "hidden");
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(failures[r], std::vector<std::string>(3, "")) << "rank " << r;
    EXPECT_LE(worst_gap(got[r], want, r), kParamBound) << "rank " << r;
  }
}

}  // namespace
}  // namespace moert
