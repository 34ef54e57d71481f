// Sessions over several ranks (threads over the in-process communicator): the same results as
// one session over the union of their rows, and failures that every rank sees.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/batcher.h"
#include "core/error.h"
#include "core/session.h"
#include "tests/support/inprocess_communicator.h"
#include "tests/unit/random_tensor.h"

namespace moert {
namespace {

using test::random_tensor;

// Hidden input of width 16 (or `width`): RMSNorm, MoE (8 experts, top-2, groups 2/1, 1 shared),
// RMSNorm, MoE.
std::shared_ptr<const Model> two_moe_model(std::mt19937& rng, BalancingPolicy policy,
                                           int64_t width = 16) {
  auto m = std::make_shared<Model>();
  m->name = "parallel";
  m->input_width = m->output_width = width;
  auto norm = [&](const char* name) {
    LayerSpec l;
    l.name = name;
    l.kind = LayerKind::RMSNorm;
    l.in_width = l.out_width = width;
    RMSNormSpec s;
    s.dim = width;
    s.weight = random_tensor({width}, rng, 0.2f);
    for (float& v : s.weight.values) v += 1.0f;
    l.spec = s;
    return l;
  };
  auto moe = [&](const char* name) {
    LayerSpec l;
    l.name = name;
    l.kind = LayerKind::MoE;
    l.in_width = l.out_width = width;
    MoESpec s;
    s.dim = width;
    s.expert_hidden = 12;
    s.num_shared = 1;
    s.shared_hidden = 10;
    s.router = {8, 2, ScoreFunction::Sigmoid, 2, 1, true, 2.5f};
    s.balancing.policy = policy;
    s.balancing.aux_alpha = policy == BalancingPolicy::LossFreeBias ? 0.0f : 0.01f;
    s.gate = random_tensor({8, width}, rng, 0.5f);
    s.gate_bias = random_tensor({8}, rng, 0.05f);
    s.w1 = random_tensor({8, 12, width}, rng);
    s.w3 = random_tensor({8, 12, width}, rng);
    s.w2 = random_tensor({8, width, 12}, rng);
    s.shared_w1 = random_tensor({1, 10, width}, rng);
    s.shared_w3 = random_tensor({1, 10, width}, rng);
    s.shared_w2 = random_tensor({1, width, 10}, rng);
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

bool bitwise(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
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

// Expert Choice among ranks: each expert chooses its capacity over the job's rows, not over each
// rank's, so outputs and counts are one session's over the union -- here with a rank whose rows
// are all masked out and ranks of 64 and 192 rows (bitwise: every rank but the last holds a
// multiple of 64 rows). A rank's masked rows come back as zeros.
TEST(SessionParallel, ExpertChoiceChoosesFromEveryRanksRows) {
  std::mt19937 rng(43);
  const auto model = two_moe_model(rng, BalancingPolicy::ExpertChoice);
  const int64_t rows = 256;
  const std::vector<float> x = random_tensor({rows, 16}, rng, 1.0f).values;
  Session one(model, options(Mode::Inference));
  std::vector<float> want(x.size());
  one.forward_hidden(x.data(), x.size(), nullptr, 0, rows, want.data(), want.size());
  const std::vector<int64_t> want_counts = one.expert_counts(3, CountScope::Last);
  const std::vector<int64_t> first{0, 64, 64}, n{64, 32, 192};
  std::vector<std::vector<float>> got(3);
  std::vector<std::vector<int64_t>> counts(3);
  on_ranks(3, 1, model, Mode::Inference, [&](int r, Session& s) {
    got[r].assign(static_cast<size_t>(n[r] * 16), -1.0f);
    // Rank 1's rows are all padding.
    const std::vector<uint8_t> mask(static_cast<size_t>(n[r]), r == 1 ? 0 : 1);
    const float* in = x.data() + first[r] * 16;
    s.forward_hidden(in, static_cast<uint64_t>(n[r] * 16), mask.data(), mask.size(),
                     static_cast<uint64_t>(n[r]), got[r].data(), got[r].size());
    counts[r] = s.expert_counts(3, CountScope::Last);
  });
  EXPECT_TRUE(bitwise(got[0], std::vector<float>(want.begin(), want.begin() + 64 * 16)));
  EXPECT_TRUE(bitwise(got[2], std::vector<float>(want.begin() + 64 * 16, want.end())));
  EXPECT_EQ(got[1], std::vector<float>(32 * 16, 0.0f));
  for (int r = 0; r < 3; ++r) EXPECT_EQ(counts[r], want_counts) << "rank " << r;
  // Each expert took its capacity of the 256 rows: not what any rank alone would choose.
  for (int64_t c : want_counts) EXPECT_EQ(c, 64);
}

// Cutting the exchanges into more chunks (more overlap) changes no bit.
TEST(SessionParallel, ChunkedExchangesChangeNothing) {
  std::mt19937 rng(47);
  const auto model = two_moe_model(rng, BalancingPolicy::LossFreeBias);
  const int64_t rows = 128;
  const std::vector<float> x = random_tensor({rows, 16}, rng, 1.0f).values;
  const std::vector<float> g = random_tensor({rows, 16}, rng, 1.0f).values;
  Session one(model, options(Mode::Training));
  std::vector<float> want(x.size()), want_in(x.size());
  one.forward_hidden(x.data(), x.size(), rows, want.data(), want.size());
  one.backward(g.data(), g.size(), want_in.data(), want_in.size());
  for (const char* chunks : {"1", "3", "4"}) {
    auto comms = testing::make_inprocess_communicators(2, 60.0);
    std::vector<float> got(x.size()), got_in(x.size());
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r)
      threads.emplace_back([&, r] {
        SessionOptions o = options(Mode::Training);
        o.set("ep_chunks", chunks);
        o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), 2);
        Session s(model, o);
        const int64_t n = rows / 2, off = r * n * 16;
        s.forward_hidden(x.data() + off, n * 16, n, got.data() + off, n * 16);
        s.backward(g.data() + off, n * 16, got_in.data() + off, n * 16);
      });
    for (auto& t : threads) t.join();
    EXPECT_EQ(got, want) << chunks << " chunks";
    EXPECT_EQ(got_in, want_in) << chunks << " chunks";
  }
}

// A kernel failing on one rank in the middle of a pass (FP8 quantization of a NaN row, check_finite
// off) over two MoE layers: the rank holds the failure, skips its later computations but makes
// every exchange of both layers, and every rank fails the call at once, the failing rank naming
// the caller's row. Nothing of the failed forward is kept; a failed backward refuses the step
// until zero_grad; then the ranks train on bitwise as one session over the union.
TEST(SessionParallel, AKernelFailureOnOneRankFailsEveryRankAtOnce) {
  std::mt19937 rng(59);
  const auto model = two_moe_model(rng, BalancingPolicy::LossFreeBias);
  // 128-row FP8 Wgrad tiles of the shared experts are one process's on 2 and 4 ranks.
  const int64_t rows = 512;
  const std::vector<float> x = random_tensor({rows, 16}, rng, 1.0f).values;
  const std::vector<float> g = random_tensor({rows, 16}, rng, 0.1f).values;
  auto opts = [] {
    SessionOptions o = options(Mode::Training);
    o.set("precision", "fp8");
    o.set("check_finite", "false");
    return o;
  };
  std::vector<float> want(x.size());
  {
    Session one(model, opts());
    std::vector<float> out(x.size());
    one.forward_hidden(x.data(), x.size(), rows, out.data(), out.size());
    one.backward(g.data(), g.size(), nullptr, 0);
    one.step();
    one.forward_hidden(x.data(), x.size(), rows, want.data(), want.size());
  }
  for (auto [world, ep] : std::vector<std::pair<int, int>>{{2, 2}, {4, 2}}) {
    const std::string what = std::to_string(world) + " ranks, EP " + std::to_string(ep);
    auto comms = testing::make_inprocess_communicators(world, 60.0);
    std::vector<float> got(x.size());
    std::vector<std::vector<std::string>> errors(static_cast<size_t>(world));
    std::vector<int64_t> counted(static_cast<size_t>(world), -1);
    std::vector<std::thread> threads;
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < world; ++r)
      threads.emplace_back([&, r] {
        SessionOptions o = opts();
        o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), ep);
        Session s(model, o);
        const int64_t n = rows / world, off = r * n * 16;
        std::vector<float> bad_x(x.begin() + off, x.begin() + off + n * 16), out(n * 16);
        std::vector<float> bad_g(g.begin() + off, g.begin() + off + n * 16);
        if (r == 1) bad_x[5 * 16 + 3] = std::numeric_limits<float>::quiet_NaN();
        if (r == 0) bad_g[7 * 16 + 2] = std::numeric_limits<float>::quiet_NaN();
        auto expect_numeric = [&](const std::function<void()>& call) {
          try {
            call();
            errors[r].push_back("no failure");
          } catch (const Error& e) {
            errors[r].push_back(e.code() == Code::Numeric ? "" : e.what());
            if (r == 1 && errors[r].size() == 1 &&
                std::string(e.what()).find("at row 5, column") == std::string::npos)
              errors[r].back() = std::string("rank 1 does not name its row: ") + e.what();
          }
        };
        expect_numeric([&] { s.forward_hidden(bad_x.data(), n * 16, n, out.data(), n * 16); });
        int64_t total = 0;
        for (size_t layer : {1, 3})
          for (int64_t c : s.expert_counts(layer, CountScope::Step)) total += c;
        counted[r] = total;
        s.forward_hidden(x.data() + off, n * 16, n, out.data(), n * 16);
        expect_numeric([&] { s.backward(bad_g.data(), n * 16, nullptr, 0); });
        expect_numeric([&] { s.step(); });
        s.zero_grad();
        s.forward_hidden(x.data() + off, n * 16, n, out.data(), n * 16);
        s.backward(g.data() + off, n * 16, nullptr, 0);
        s.step();
        s.forward_hidden(x.data() + off, n * 16, n, got.data() + off, n * 16);
      });
    for (auto& t : threads) t.join();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, 30.0) << what << ": a rank waited for the failing one";
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(errors[r], std::vector<std::string>(3, "")) << what << " rank " << r;
      EXPECT_EQ(counted[r], 0) << what << " rank " << r;
    }
    EXPECT_TRUE(bitwise(got, want)) << what;
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

// A token model: embedding (sparse gradient), RMSNorm, MoE, RMSNorm, head (with bias).
std::shared_ptr<const Model> token_model(std::mt19937& rng, BalancingPolicy policy,
                                         int64_t width = 16) {
  auto m = std::make_shared<Model>(*two_moe_model(rng, policy, width));
  m->token_input = true;
  m->input_width = 2;
  LayerSpec emb;
  emb.name = "embed";
  emb.kind = LayerKind::Embedding;
  emb.in_width = 2;
  emb.out_width = width;
  EmbeddingSpec e;
  e.vocab_size = 40;
  e.dim = width / 2;
  e.context = 2;
  e.weight = random_tensor({40, width / 2}, rng, 1.0f);
  emb.spec = e;
  LayerSpec head;
  head.name = "head";
  head.kind = LayerKind::OutputHead;
  head.in_width = width;
  head.out_width = 40;
  OutputHeadSpec h;
  h.dim = width;
  h.vocab_size = 40;
  h.has_bias = true;
  h.weight = random_tensor({40, width}, rng, 0.3f);
  h.bias = random_tensor({40}, rng, 0.1f);
  head.spec = h;
  m->layers.insert(m->layers.begin(), emb);
  m->layers.push_back(head);
  m->output_width = 40;
  return m;
}

struct Trace {
  std::vector<double> losses;
  std::vector<std::vector<float>> grads;     // after the first backward, by parameter
  std::vector<std::vector<float>> biases;    // after the last step, per MoE layer
  std::vector<std::vector<int64_t>> counts;  // step counts before the last step
  std::vector<std::vector<float>> params;    // after the last step (local shard for experts)
};

// `steps` steps of two micro-batches each over `rows` rows per micro-batch, on one session whose
// parameters are `names`; ranks see row slices [r * rows / R, (r + 1) * rows / R).
void train(Session& s, int rank, int world, const std::vector<int32_t>& tokens,
           const std::vector<int32_t>& targets, int64_t rows, int steps, Trace& t) {
  const int64_t n = rows / world, first = rank * n;
  std::vector<float> out(static_cast<size_t>(n * 40));
  for (int step = 0; step < steps; ++step) {
    s.zero_grad();
    for (int mb = 0; mb < 2; ++mb) {
      const int64_t off = (step * 2 + mb) % 3 * rows + first;
      s.forward_tokens(tokens.data() + off * 2, n * 2, n, out.data(), out.size());
      t.losses.push_back(s.backward_loss(targets.data() + off, n));
      if (step == 0 && mb == 0)
        for (size_t i = 0; i < s.num_parameters(); ++i) {
          std::vector<float> g(static_cast<size_t>(s.parameter_size(i)));
          s.read_gradient(i, g.data(), g.size());
          t.grads.push_back(std::move(g));
        }
    }
    if (step == steps - 1)
      for (uint32_t l : {2u, 4u}) t.counts.push_back(s.expert_counts(l, CountScope::Step));
    s.step();
  }
  for (uint32_t l : {2u, 4u}) {
    std::vector<float> b(8);
    s.read_bias(l, b.data(), b.size());
    t.biases.push_back(std::move(b));
  }
  for (size_t i = 0; i < s.num_parameters(); ++i) {
    std::vector<float> p(static_cast<size_t>(s.parameter_size(i)));
    s.read_parameter(i, p.data(), p.size());
    t.params.push_back(std::move(p));
  }
}

std::string s_name(size_t i) { return "#" + std::to_string(i); }

// One session against each layout of ranks (world, EP) over `steps` steps of `model`: losses,
// counts, biases, the first gradients and the final parameters, bit for bit.
void expect_training_is_one_sessions(const std::shared_ptr<const Model>& model,
                                     BalancingPolicy policy, std::mt19937& rng, int steps,
                                     const std::vector<std::pair<int, int>>& layouts) {
  const int64_t rows = 256;
  std::vector<int32_t> tokens(3 * rows * 2), targets(3 * rows);
  std::uniform_int_distribution<int32_t> id(0, 39);
  for (auto& v : tokens) v = id(rng);
  for (auto& v : targets) v = id(rng);
  auto opts = [&](SessionOptions o) {
    o.set("lr", "0.01");
    o.set("clip_norm", "1");
    o.set("aux_loss_scope", "global");
    if (policy == BalancingPolicy::SequenceAuxLoss) o.set("sequence_length", "32");
    return o;
  };
  Trace want;
  {
    Session one(model, opts(options(Mode::Training)));
    train(one, 0, 1, tokens, targets, rows, steps, want);
  }
  for (auto [world, ep] : layouts) {
    auto comms = testing::make_inprocess_communicators(world, 60.0);
    std::vector<Trace> got(static_cast<size_t>(world));
    std::vector<std::thread> threads;
    for (int r = 0; r < world; ++r)
      threads.emplace_back([&, r] {
        SessionOptions o = opts(options(Mode::Training));
        o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), ep);
        Session s(model, o);
        train(s, r, world, tokens, targets, rows, steps, got[r]);
      });
    for (auto& t : threads) t.join();
    const std::string what = std::to_string(world) + " ranks, EP " + std::to_string(ep) +
                             ", policy " + std::to_string(static_cast<int>(policy));
    for (int r = 0; r < world; ++r) {
      const Trace& g = got[r];
      ASSERT_EQ(g.losses.size(), want.losses.size());
      for (size_t i = 0; i < g.losses.size(); ++i)
        EXPECT_EQ(std::memcmp(&g.losses[i], &want.losses[i], 8), 0)
            << what << " rank " << r << " loss " << i << ": " << g.losses[i] << " vs "
            << want.losses[i];
      EXPECT_EQ(g.counts, want.counts) << what;
      for (size_t l = 0; l < g.biases.size(); ++l)
        EXPECT_TRUE(bitwise(g.biases[l], want.biases[l])) << what << " bias " << l;
      ASSERT_EQ(g.params.size(), want.params.size());
      for (size_t i = 0; i < g.params.size(); ++i) {
        // Expert tensors hold the rank's shard: compare it with that slice of one session's.
        const auto& full = want.params[i];
        const size_t n = g.params[i].size();
        const size_t at = n == full.size() ? 0 : (r % ep) * n;
        EXPECT_TRUE(
            bitwise(g.params[i], std::vector<float>(full.begin() + static_cast<int64_t>(at),
                                                    full.begin() + static_cast<int64_t>(at + n))))
            << what << " rank " << r << " parameter " << s_name(i);
        const auto& gfull = want.grads[i];
        EXPECT_TRUE(
            bitwise(g.grads[i], std::vector<float>(gfull.begin() + static_cast<int64_t>(at),
                                                   gfull.begin() + static_cast<int64_t>(at + n))))
            << what << " rank " << r << " gradient " << s_name(i);
      }
    }
  }
}

// Training over 2 and 4 ranks (EP = size, EP 2 x DP 2, pure DP): every gradient, the losses, the
// step counts and biases after 20 steps and every parameter are bitwise one session's over the
// same global batches, for every balancing policy (Expert Choice's experts choosing from every
// rank's rows). Expert tensors are each rank's shard.
TEST(SessionParallel, TrainingIsBitwiseOneSessionsForEveryLayout) {
  for (BalancingPolicy policy : {BalancingPolicy::LossFreeBias, BalancingPolicy::AuxLoss,
                                 BalancingPolicy::SequenceAuxLoss, BalancingPolicy::ExpertChoice}) {
    std::mt19937 rng(53);
    expect_training_is_one_sessions(token_model(rng, policy), policy, rng, 20,
                                    {{2, 2}, {4, 4}, {4, 2}, {2, 1}});
  }
}

// Width 256: the CPU backend keeps the routed experts' rows (x_perm, dy_perm) at a padded row
// stride (kept_rows_stride), sharded and gathered chunk by chunk among ranks as in one session.
TEST(SessionParallel, TrainingWithPaddedExpertRowsIsOneSessions) {
  std::mt19937 rng(59);
  const auto model = token_model(rng, BalancingPolicy::LossFreeBias, 256);
  expect_training_is_one_sessions(model, BalancingPolicy::LossFreeBias, rng, 3,
                                  {{2, 2}, {4, 2}, {2, 1}});
}

// Direct writes are local to a rank, so the step compares them: a replicated tensor written on
// some ranks only or with other values, or an expert shard written differently on two of its
// replicas, is refused on every rank before anything changes; writing the same values everywhere
// (zero_grad for a gradient) lets the step go on, and the replicas stay the same. 4 ranks, EP 2 x
// DP 2: shard r % 2, replica r / 2.
TEST(SessionParallel, WritesThatDifferAcrossRanksAreRefusedAtTheStep) {
  std::mt19937 rng(61);
  const auto model = two_moe_model(rng, BalancingPolicy::LossFreeBias);
  const std::vector<float> x = random_tensor({256, 16}, rng, 1.0f).values;
  const std::vector<float> dy = random_tensor({64, 16}, rng, 0.1f).values;
  constexpr int kWorld = 4;
  std::vector<std::vector<std::string>> refusals(kWorld);
  std::vector<std::vector<std::vector<float>>> final_params(kWorld);
  std::vector<std::vector<float>> final_bias(kWorld);
  std::vector<std::string> names;
  on_ranks(kWorld, 2, model, Mode::Training, [&](int r, Session& s) {
    std::vector<float> out(64 * 16);
    auto pass = [&] {
      s.forward_hidden(x.data() + r * 64 * 16, 64 * 16, nullptr, 0, 64, out.data(), out.size());
      s.backward(dy.data(), dy.size(), nullptr, 0);
    };
    auto all_params = [&] {
      std::vector<std::vector<float>> p;
      for (size_t i = 0; i < s.num_parameters(); ++i) {
        p.emplace_back(static_cast<size_t>(s.parameter_size(i)));
        s.read_parameter(i, p.back().data(), p.back().size());
      }
      return p;
    };
    auto write = [&](const char* name, float value) {
      const size_t i = s.parameter_index(name);
      s.write_parameter(i,
                        std::vector<float>(static_cast<size_t>(s.parameter_size(i)), value).data(),
                        static_cast<uint64_t>(s.parameter_size(i)));
    };
    // A step that must be refused: its message, and nothing changed.
    auto refused = [&] {
      const auto before = all_params();
      std::vector<float> bias_before(8), bias_after(8);
      s.read_bias(1, bias_before.data(), 8);
      try {
        s.step();
        refusals[r].push_back("stepped");
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), Code::InvalidState) << e.what();
        refusals[r].push_back(e.what());
      }
      s.read_bias(1, bias_after.data(), 8);
      EXPECT_EQ(all_params(), before) << "rank " << r;
      EXPECT_EQ(bias_after, bias_before) << "rank " << r;
    };

    // A replicated parameter written on one rank only, then on every rank alike.
    pass();
    if (r == 3) write("norm0.weight", 0.5f);
    refused();
    write("norm0.weight", 0.5f);
    s.step();

    // The expert shards: each shard's replicas alike (the shards apart) is fine; a replica that
    // differs from its shard's first is not.
    s.zero_grad();
    pass();
    write("moe0.w1", 0.01f * static_cast<float>(r % 2 + 1));
    s.step();
    s.zero_grad();
    pass();
    write("moe0.w1", r == 2 ? 0.07f : 0.03f);
    refused();
    if (r == 2) write("moe0.w1", 0.03f);
    s.step();

    // A gradient written on one rank only; zero_grad discards it.
    s.zero_grad();
    pass();
    if (r == 1) {
      const size_t i = s.parameter_index("moe1.gate");
      std::vector<float> g(static_cast<size_t>(s.parameter_size(i)), 1.0f);
      s.write_gradient(i, g.data(), g.size());
    }
    refused();
    s.zero_grad();
    pass();
    s.step();

    // The loss-free bias written on one rank only, then on every rank alike.
    s.zero_grad();
    pass();
    const std::vector<float> bias(8, r == 0 ? 0.25f : 0.0f);
    s.write_bias(1, bias.data(), bias.size());
    refused();
    const std::vector<float> same(8, 0.25f);
    s.write_bias(1, same.data(), same.size());
    s.step();

    final_params[r] = all_params();
    if (r == 0)
      for (size_t i = 0; i < s.num_parameters(); ++i) names.push_back(s.parameter_name(i));
    final_bias[r].resize(8);
    s.read_bias(1, final_bias[r].data(), 8);
  });
  const char* kinds[] = {"parameter", "expert shard", "gradient", "bias"};
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_EQ(refusals[r].size(), 4u) << "rank " << r;
    for (size_t k = 0; k < 4; ++k) {
      const std::string& m = refusals[r][k];
      const std::string who = k == 0 ? "rank 3 of 4" : k == 1 ? "rank 2 of 4" : "rank 1 of 4";
      EXPECT_NE(m.find(who), std::string::npos) << kinds[k] << ", rank " << r << ": " << m;
      EXPECT_NE(m.find(k == 1 ? "into its expert shard" : "wrote other tensors"), std::string::npos)
          << kinds[k] << ", rank " << r << ": " << m;
    }
  }
  // Replicated tensors bitwise alike on every rank; expert shards on each shard's replicas.
  for (int r = 1; r < kWorld; ++r) {
    EXPECT_EQ(final_bias[r], final_bias[0]) << "rank " << r;
    for (size_t i = 0; i < names.size(); ++i) {
      const bool expert =
          names[i].ends_with(".w1") || names[i].ends_with(".w2") || names[i].ends_with(".w3");
      EXPECT_EQ(final_params[r][i], final_params[expert ? r % 2 : 0][i])
          << "rank " << r << " parameter " << names[i];
    }
  }
}

// A batcher's pool sessions run their passes at once and alone: session options holding a
// communicator would make each a member of the job, and are refused when the batcher is created.
TEST(SessionParallel, ABatcherRefusesSessionOptionsWithACommunicator) {
  std::mt19937 rng(5);
  auto comms = testing::make_inprocess_communicators(1, 60.0);
  BatcherOptions o;
  o.session = options(Mode::Inference);
  o.session.set_comm(std::shared_ptr<Communicator>(std::move(comms[0])), 1);
  try {
    Batcher b(two_moe_model(rng, BalancingPolicy::LossFreeBias), o);
    ADD_FAILURE() << "a batcher took session options with a communicator";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("communicator"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moert
