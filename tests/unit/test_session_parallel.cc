// Sessions over several ranks (threads over the in-process communicator): the same results as
// one session over the union of their rows, and failures that every rank sees.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/session.h"
#include "tests/support/inprocess_communicator.h"
#include "tests/unit/random_tensor.h"

namespace moert {
namespace {

using test::random_tensor;

// Hidden input of width 16: RMSNorm, MoE (8 experts, top-2, groups 2/1, 1 shared), RMSNorm, MoE.
std::shared_ptr<const Model> two_moe_model(std::mt19937& rng, BalancingPolicy policy) {
  auto m = std::make_shared<Model>();
  m->name = "parallel";
  m->input_width = m->output_width = 16;
  auto norm = [&](const char* name) {
    LayerSpec l;
    l.name = name;
    l.kind = LayerKind::RMSNorm;
    l.in_width = l.out_width = 16;
    RMSNormSpec s;
    s.dim = 16;
    s.weight = random_tensor({16}, rng, 0.2f);
    for (float& v : s.weight.values) v += 1.0f;
    l.spec = s;
    return l;
  };
  auto moe = [&](const char* name) {
    LayerSpec l;
    l.name = name;
    l.kind = LayerKind::MoE;
    l.in_width = l.out_width = 16;
    MoESpec s;
    s.dim = 16;
    s.expert_hidden = 12;
    s.num_shared = 1;
    s.shared_hidden = 10;
    s.router = {8, 2, ScoreFunction::Sigmoid, 2, 1, true, 2.5f};
    s.balancing.policy = policy;
    s.balancing.aux_alpha = policy == BalancingPolicy::LossFreeBias ? 0.0f : 0.01f;
    s.gate = random_tensor({8, 16}, rng, 0.5f);
    s.gate_bias = random_tensor({8}, rng, 0.05f);
    s.w1 = random_tensor({8, 12, 16}, rng);
    s.w3 = random_tensor({8, 12, 16}, rng);
    s.w2 = random_tensor({8, 16, 12}, rng);
    s.shared_w1 = random_tensor({1, 10, 16}, rng);
    s.shared_w3 = random_tensor({1, 10, 16}, rng);
    s.shared_w2 = random_tensor({1, 16, 10}, rng);
    l.spec = s;
    return l;
  };
  m->layers = {norm("norm0"), moe("moe0"), norm("norm1"), moe("moe1")};
  return m;
}

SessionOptions options(Mode mode) {
  SessionOptions o;
  o.mode = mode;
  o.threads = 1;
  return o;
}

// Runs body(rank, session) on `world` ranks at once, each with its own session over the model.
void on_ranks(int world, int ep, const std::shared_ptr<const Model>& model, Mode mode,
              const std::function<void(int, Session&)>& body) {
  auto comms = testing::make_inprocess_communicators(world, 60.0);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      SessionOptions o = options(mode);
      o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), ep);
      Session s(model, o);
      body(r, s);
    });
  for (auto& t : threads) t.join();
}

TEST(SessionParallel, ForwardAndCountsAreOneSessionsForEveryLayout) {
  std::mt19937 rng(41);
  const auto model = two_moe_model(rng, BalancingPolicy::LossFreeBias);
  const int64_t rows = 256;
  const std::vector<float> x = random_tensor({rows, 16}, rng, 1.0f).values;
  Session one(model, options(Mode::Inference));
  std::vector<float> want(x.size());
  one.forward_hidden(x.data(), x.size(), nullptr, 0, rows, want.data(), want.size());
  for (auto [world, ep] : std::vector<std::pair<int, int>>{{2, 2}, {4, 4}, {4, 2}, {2, 1}}) {
    std::vector<float> got(x.size());
    std::vector<std::vector<int64_t>> counts(static_cast<size_t>(world));
    on_ranks(world, ep, model, Mode::Inference, [&](int r, Session& s) {
      const int64_t n = rows / world;
      s.forward_hidden(x.data() + r * n * 16, n * 16, nullptr, 0, n, got.data() + r * n * 16,
                       n * 16);
      counts[r] = s.expert_counts(3, CountScope::Last);
    });
    EXPECT_EQ(got, want) << world << " ranks, EP " << ep;
    for (int r = 0; r < world; ++r) EXPECT_EQ(counts[r], one.expert_counts(3, CountScope::Last));
  }
}

// A rank fed a buffer of the wrong size fails with its own error; every other rank fails too,
// naming it, and nothing is counted anywhere. The ranks stay usable.
TEST(SessionParallel, BadInputOnOneRankFailsTheCallOnEveryRank) {
  std::mt19937 rng(43);
  const auto model = two_moe_model(rng, BalancingPolicy::LossFreeBias);
  const std::vector<float> x = random_tensor({128, 16}, rng, 1.0f).values;
  std::vector<std::string> errors(3);
  std::vector<int64_t> after(3, -1);
  on_ranks(3, 1, model, Mode::Inference, [&](int r, Session& s) {
    std::vector<float> out(64 * 16);
    try {
      s.forward_hidden(x.data(), r == 1 ? 64 * 16 - 1 : 64 * 16, nullptr, 0, 64, out.data(),
                       out.size());
    } catch (const Error& e) {
      errors[r] = e.what();
    }
    int64_t total = 0;
    for (int64_t c : s.expert_counts(1, CountScope::Eval)) total += c;
    after[r] = total;
    // Still usable: a good call works on every rank.
    s.forward_hidden(x.data(), 64 * 16, nullptr, 0, 64, out.data(), out.size());
  });
  EXPECT_NE(errors[1].find("input buffer holds 1023"), std::string::npos) << errors[1];
  for (int r : {0, 2})
    EXPECT_NE(errors[r].find("rank 1 of 3 failed"), std::string::npos) << errors[r];
  EXPECT_EQ(after, (std::vector<int64_t>{0, 0, 0}));
}

}  // namespace
}  // namespace moert
