// Expert and data parallelism of device sessions, without a GPU: ranks are threads, each with a
// session on the simulated device (libmoert_devsim.so, acc-mode gradients only, as the CUDA
// backend), joined by the in-process communicator presenting itself as device memory (as NCCL).
// The core's path is the one a CUDA session over NCCL takes: row exchanges in backend memory,
// bookkeeping staged through host views, gradients all-reduced in rank order
// (core/session_local_gradients.cc). Against one plain devsim session over the union of the rows:
// forward outputs and routing counts bitwise (the CPU backend under devsim computes each row
// alone), gradients within the reassociation bound stated there (uneven row splits too), counts
// and loss-free biases bitwise after 20 steps, failures on every rank, and a checkpoint of 2 ranks
// resumed by 1 that goes on as one process does.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
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

SessionOptions device_options(Mode mode) {
  SessionOptions o = test::options(Precision::Bf16, mode);
  o.device = Device::Cuda;
  o.cuda_plugin = MOERT_CUDA_PLUGIN_PATH;
  o.set("optimizer", "sgd");
  o.set("lr", "0.05");
  return o;
}

// Runs body(rank, session) on `world` threads, each with a device session over the model joined
// by an in-process communicator that moves "device" memory.
void on_ranks(int world, int ep, const std::shared_ptr<const Model>& model, Mode mode,
              const std::function<void(int, Session&)>& body) {
  auto comms = testing::make_inprocess_communicators(world, 60.0, CommMemory::Device);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        SessionOptions o = device_options(mode);
        o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), ep);
        Session s(model, o);
        body(r, s);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

const std::vector<std::pair<int, int>> kLayouts = {{1, 1}, {2, 2}, {4, 4}, {4, 2}, {2, 1}};

std::string layout_name(int world, int ep) {
  return std::to_string(world) + " ranks, EP " + std::to_string(ep);
}

// Token choice, and Expert Choice (each expert choosing from every rank's rows, gathered over the
// device communicator; the simulated device runs it on the CPU backend, the CUDA one refuses it).
TEST(DeviceParallel, ForwardAndCountsAreOneSessionsBitwise) {
  for (const BalancingPolicy policy :
       {BalancingPolicy::LossFreeBias, BalancingPolicy::ExpertChoice}) {
    std::mt19937 rng(71);
    auto m = std::make_shared<Model>(*test::moe_model(rng));
    std::get<MoESpec>(m->layers[kMoe].spec).balancing.policy = policy;
    const std::shared_ptr<const Model> model = m;
    const int64_t rows = 256;
    const test::Batch b = test::batch(rng, rows);
    Session one(model, device_options(Mode::Inference));
    std::vector<float> want(static_cast<size_t>(rows * V));
    one.forward_tokens(b.tokens.data(), b.tokens.size(), nullptr, 0, rows, want.data(),
                       want.size());
    for (auto [world, ep] : kLayouts) {
      std::vector<float> got(want.size());
      std::vector<std::vector<int64_t>> counts(static_cast<size_t>(world));
      on_ranks(world, ep, model, Mode::Inference, [&](int r, Session& s) {
        const int64_t n = rows / world;
        s.forward_tokens(b.tokens.data() + r * n * 4, n * 4, nullptr, 0, n, got.data() + r * n * V,
                         n * V);
        counts[r] = s.expert_counts(kMoe, CountScope::Last);
      });
      const std::string what =
          layout_name(world, ep) + ", policy " + std::to_string(static_cast<int>(policy));
      EXPECT_EQ(got, want) << what;
      for (int r = 0; r < world; ++r)
        EXPECT_EQ(counts[r], one.expert_counts(kMoe, CountScope::Last)) << what;
    }
  }
}

struct Trace {
  std::vector<double> losses;
  std::vector<std::vector<float>> grads;     // after the first backward, by parameter
  std::vector<float> bias;                   // after the last step
  std::vector<std::vector<int64_t>> counts;  // step counts before each step
  std::vector<std::vector<float>> params;    // after the last step (the rank's shard of experts)
};

// `steps` steps of two micro-batches of `rows` rows each; rank r feeds rows
// [r rows / R, (r + 1) rows / R) of each.
void train(Session& s, int rank, int world, const test::Batch& b, int64_t rows, int steps,
           Trace& t) {
  const int64_t n = rows / world, first = rank * n;
  std::vector<float> out(static_cast<size_t>(n * V));
  for (int step = 0; step < steps; ++step) {
    s.zero_grad();
    for (int mb = 0; mb < 2; ++mb) {
      const int64_t off = (step * 2 + mb) % 3 * rows + first;
      s.forward_tokens(b.tokens.data() + off * 4, n * 4, nullptr, 0, n, out.data(), out.size());
      t.losses.push_back(s.backward_loss(b.targets.data() + off, n));
      if (step == 0 && mb == 0)
        for (size_t i = 0; i < s.num_parameters(); ++i) {
          std::vector<float> g(static_cast<size_t>(s.parameter_size(i)));
          s.read_gradient(i, g.data(), g.size());
          t.grads.push_back(std::move(g));
        }
    }
    t.counts.push_back(s.expert_counts(kMoe, CountScope::Step));
    s.step();
  }
  t.bias.resize(8);
  s.read_bias(kMoe, t.bias.data(), t.bias.size());
  for (size_t i = 0; i < s.num_parameters(); ++i) {
    std::vector<float> p(static_cast<size_t>(s.parameter_size(i)));
    s.read_parameter(i, p.data(), p.size());
    t.params.push_back(std::move(p));
  }
}

// The rank's part of one session's tensor: a routed expert tensor's shard, else all of it.
std::vector<float> part(const std::vector<float>& full, size_t n, int shard) {
  const size_t at = n == full.size() ? 0 : static_cast<size_t>(shard) * n;
  return {full.begin() + static_cast<int64_t>(at), full.begin() + static_cast<int64_t>(at + n)};
}

// max_i |a_i - b_i| / max_i |b_i|.
double relative_gap(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return scale > 0.0 ? diff / scale : diff;
}

// The bound of core/session_local_gradients.cc for these shapes (at most 256 rows over 4 ranks)
// is a few ulps of sum |t_i|; the 1e-6 of the tensor's largest element holds it (measured:
// 0 at 1 and 2 ranks, whose rank-ordered sums are nodes of the chunk tree, 9.4e-8 at 4 ranks).
constexpr double kGradientBound = 1e-6;

TEST(DeviceParallel, TrainingMatchesOneSession) {
  std::mt19937 rng(73);
  const auto model = test::moe_model(rng);
  const int64_t rows = 256;
  const int steps = 20;
  const test::Batch b = test::batch(rng, 3 * rows);
  Trace want;
  {
    Session one(model, device_options(Mode::Training));
    train(one, 0, 1, b, rows, steps, want);
  }
  for (auto [world, ep] : kLayouts) {
    std::vector<Trace> got(static_cast<size_t>(world));
    on_ranks(world, ep, model, Mode::Training,
             [&](int r, Session& s) { train(s, r, world, b, rows, steps, got[r]); });
    const std::string what = layout_name(world, ep);
    double worst = 0.0, worst_param = 0.0;
    for (int r = 0; r < world; ++r) {
      const Trace& g = got[r];
      ASSERT_EQ(g.losses.size(), want.losses.size()) << what;
      // The loss sums per-row terms over chunks in a fixed tree: bitwise while the parameters
      // are; afterwards the gradients' rounding reaches it.
      EXPECT_EQ(g.losses[0], want.losses[0]) << what;
      for (size_t i = 0; i < g.losses.size(); ++i)
        EXPECT_NEAR(g.losses[i], want.losses[i], 1e-5 * std::fabs(want.losses[i])) << what;
      EXPECT_EQ(g.counts, want.counts) << what << " rank " << r;
      EXPECT_EQ(g.bias, want.bias) << what << " rank " << r;
      ASSERT_EQ(g.grads.size(), want.grads.size());
      for (size_t i = 0; i < g.grads.size(); ++i) {
        const auto ref = part(want.grads[i], g.grads[i].size(), r % ep);
        const double gap = relative_gap(g.grads[i], ref);
        worst = std::max(worst, gap);
        EXPECT_LE(gap, kGradientBound) << what << " rank " << r << " gradient " << i;
        const auto pref = part(want.params[i], g.params[i].size(), r % ep);
        worst_param = std::max(worst_param, relative_gap(g.params[i], pref));
      }
      // Every replica of the job holds bitwise the same replicated state.
      if (r > 0)
        for (size_t i = 0; i < g.params.size(); ++i)
          if (g.params[i].size() == want.params[i].size()) {
            EXPECT_EQ(g.params[i], got[0].params[i]) << what << " rank " << r << " param " << i;
          }
    }
    std::printf("%s: largest gradient gap %.3g, parameter gap after %d steps %.3g (relative)\n",
                what.c_str(), worst, steps, worst_param);
  }
}

// Rows split unevenly (not multiples of the 64-row chunks) over 3 data-parallel ranks: one
// process's forward and gradients within the bound.
TEST(DeviceParallel, UnevenRowsStayWithinTheBound) {
  std::mt19937 rng(101);
  const auto model = test::moe_model(rng);
  const std::vector<int64_t> split = {50, 93, 57};
  const int64_t rows = 200;
  const test::Batch b = test::batch(rng, rows);
  Session one(model, device_options(Mode::Training));
  std::vector<float> want(static_cast<size_t>(rows * V)), got(want.size());
  one.forward_tokens(b.tokens.data(), b.tokens.size(), nullptr, 0, rows, want.data(), want.size());
  one.backward_loss(b.targets.data(), rows);
  std::vector<std::vector<float>> want_grads;
  for (size_t i = 0; i < one.num_parameters(); ++i) {
    want_grads.emplace_back(static_cast<size_t>(one.parameter_size(i)));
    one.read_gradient(i, want_grads.back().data(), want_grads.back().size());
  }
  std::vector<double> gaps(3, 0.0);
  on_ranks(3, 1, model, Mode::Training, [&](int r, Session& s) {
    int64_t first = 0;
    for (int q = 0; q < r; ++q) first += split[q];
    const int64_t n = split[r];
    s.forward_tokens(b.tokens.data() + first * 4, n * 4, nullptr, 0, n, got.data() + first * V,
                     n * V);
    s.backward_loss(b.targets.data() + first, n);
    for (size_t i = 0; i < s.num_parameters(); ++i) {
      std::vector<float> g(static_cast<size_t>(s.parameter_size(i)));
      s.read_gradient(i, g.data(), g.size());
      gaps[r] = std::max(gaps[r], relative_gap(g, want_grads[i]));
    }
  });
  // The CPU backend's GEMMs under devsim give a row other bits where it sits elsewhere in a
  // 64-row block (the CPU sessions among MPI ranks agree to 1e-6 there too).
  const double out_gap = relative_gap(got, want);
  EXPECT_LE(out_gap, 1e-6);
  for (double g : gaps) EXPECT_LE(g, kGradientBound);
  std::printf("3 ranks, rows 50/93/57: output gap %.3g, largest gradient gap %.3g (relative)\n",
              out_gap, *std::max_element(gaps.begin(), gaps.end()));
}

TEST(DeviceParallel, BadInputOnOneRankFailsEveryRank) {
  std::mt19937 rng(79);
  const auto model = test::moe_model(rng);
  const test::Batch b = test::batch(rng, 128);
  std::vector<std::string> errors(2);
  on_ranks(2, 2, model, Mode::Training, [&](int r, Session& s) {
    std::vector<float> out(64 * V);
    try {
      s.forward_tokens(b.tokens.data(), r == 1 ? 64 * 4 - 1 : 64 * 4, nullptr, 0, 64, out.data(),
                       out.size());
    } catch (const Error& e) {
      errors[r] = e.what();
    }
    // Still usable together.
    s.forward_tokens(b.tokens.data(), 64 * 4, nullptr, 0, 64, out.data(), out.size());
    s.backward_loss(b.targets.data(), 64);
    s.step();
  });
  EXPECT_NE(errors[1].find("token buffer holds 255"), std::string::npos) << errors[1];
  EXPECT_NE(errors[0].find("rank 1 of 2 failed"), std::string::npos) << errors[0];
}

TEST(DeviceParallel, CheckpointOfTwoRanksResumesOnOne) {
  std::mt19937 rng(83);
  const auto model = test::moe_model(rng);
  const int64_t rows = 128;
  const test::Batch b = test::batch(rng, 3 * rows);
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("moert_device_parallel_" + std::to_string(::getpid()) + ".moert"))
                               .string();
  std::vector<Trace> two(2);
  on_ranks(2, 2, model, Mode::Training, [&](int r, Session& s) {
    train(s, r, 2, b, rows, 3, two[r]);
    s.save(path);
  });
  Session one(model, device_options(Mode::Training));
  one.load(path);
  std::filesystem::remove(path);
  // The file holds the job's state: every expert from its shard, everything else as every rank.
  for (size_t i = 0; i < one.num_parameters(); ++i) {
    std::vector<float> p(static_cast<size_t>(one.parameter_size(i)));
    one.read_parameter(i, p.data(), p.size());
    for (int r = 0; r < 2; ++r)
      EXPECT_EQ(part(p, two[r].params[i].size(), r), two[r].params[i]) << "parameter " << i;
  }
  std::vector<float> bias(8);
  one.read_bias(kMoe, bias.data(), bias.size());
  EXPECT_EQ(bias, two[0].bias);
  EXPECT_EQ(one.step_count(), 3u);
  // Training goes on from it as one process would have gone on from the same state.
  Trace resumed;
  train(one, 0, 1, b, rows, 2, resumed);
  Trace straight;
  {
    Session s(model, device_options(Mode::Training));
    train(s, 0, 1, b, rows, 5, straight);
  }
  for (size_t i = 0; i < resumed.params.size(); ++i)
    EXPECT_LE(relative_gap(resumed.params[i], straight.params[i]), 1e-5) << "parameter " << i;
  EXPECT_EQ(resumed.bias, straight.bias);
}

// Device sessions created at once over `comms`, one per rank: each rank's refusal ("" if none).
std::vector<std::string> device_sessions_refused(const std::shared_ptr<const Model>& model,
                                                 std::vector<std::unique_ptr<Communicator>> comms) {
  std::vector<std::string> errors(comms.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < comms.size(); ++r)
    threads.emplace_back([&, r] {
      SessionOptions d = device_options(Mode::Training);
      d.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), 1);
      try {
        Session s(model, d);
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), Code::InvalidArgument) << e.what();
        errors[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

TEST(DeviceParallel, CommunicatorMemoryMustMatchTheDevice) {
  std::mt19937 rng(89);
  const auto model = test::moe_model(rng);
  // A host communicator of several ranks on a device session.
  for (const auto& e : device_sessions_refused(
           model, testing::make_inprocess_communicators(2, 60.0, CommMemory::Host)))
    EXPECT_NE(e.find("moves host memory, which a CUDA session does not compute in"),
              std::string::npos)
        << e;
  // A device communicator on a CPU session.
  auto dev = testing::make_inprocess_communicators(1, 60.0, CommMemory::Device);
  SessionOptions c = test::options(Precision::Fp32, Mode::Training);
  c.set_comm(std::shared_ptr<Communicator>(std::move(dev[0])), 1);
  try {
    Session s(model, c);
    ADD_FAILURE() << "a CPU session accepted a device communicator";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("moves device memory, which a CPU session"),
              std::string::npos)
        << e.what();
  }
  // A device communicator on another GPU than the session's (NCCL on GPU 1, session on GPU 0):
  // refused on every rank; on the session's own GPU, accepted.
  const auto elsewhere = device_sessions_refused(
      model, testing::make_inprocess_communicators(2, 60.0, CommMemory::Device, 1));
  for (int r = 0; r < 2; ++r)
    EXPECT_NE(elsewhere[r].find("communicator of rank " + std::to_string(r) +
                                " is on CUDA device 1 but the session on device 0"),
              std::string::npos)
        << elsewhere[r];
  EXPECT_EQ(device_sessions_refused(
                model, testing::make_inprocess_communicators(1, 60.0, CommMemory::Device, 0)),
            std::vector<std::string>{""});
}

}  // namespace
}  // namespace moert
