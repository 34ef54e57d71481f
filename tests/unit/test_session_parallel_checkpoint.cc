// Checkpoints of sessions shared among ranks (threads over the in-process communicator): the job
// writes the file one process writes, byte for byte; any world size resumes it and continues as
// one uninterrupted process; a refusal or a failed write on one rank fails every rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/session.h"
#include "tests/support/inprocess_communicator.h"
#include "tests/unit/random_tensor.h"

namespace moert {
namespace {

namespace fs = std::filesystem;
using test::random_tensor;

constexpr uint32_t kVocab = 24, kMoE = 1;

// Tokens (context 2) -> embedding -> MoE (8 experts of hidden `hidden`, top-2, groups 2/1, one
// shared expert, loss-free balancing) -> head.
std::shared_ptr<const Model> token_model(uint32_t seed, int64_t hidden = 6) {
  std::mt19937 rng(seed);
  auto m = std::make_shared<Model>();
  m->name = "ckpt";
  m->token_input = true;
  m->input_width = 2;
  m->output_width = kVocab;
  LayerSpec emb;
  emb.name = "embed";
  emb.kind = LayerKind::Embedding;
  emb.in_width = 2;
  emb.out_width = 8;
  EmbeddingSpec e;
  e.vocab_size = kVocab;
  e.dim = 4;
  e.context = 2;
  e.weight = random_tensor({kVocab, 4}, rng, 1.0f);
  emb.spec = e;
  LayerSpec moe;
  moe.name = "moe";
  moe.kind = LayerKind::MoE;
  moe.in_width = moe.out_width = 8;
  MoESpec s;
  s.dim = 8;
  s.expert_hidden = hidden;
  s.num_shared = 1;
  s.shared_hidden = 5;
  s.router = {8, 2, ScoreFunction::Sigmoid, 2, 1, true, 2.5f};
  s.balancing.policy = BalancingPolicy::LossFreeBias;
  s.balancing.bias_update_rate = 1e-3f;
  s.gate = random_tensor({8, 8}, rng, 0.5f);
  s.gate_bias = random_tensor({8}, rng, 0.05f);
  s.w1 = random_tensor({8, hidden, 8}, rng);
  s.w3 = random_tensor({8, hidden, 8}, rng);
  s.w2 = random_tensor({8, 8, hidden}, rng);
  s.shared_w1 = random_tensor({1, 5, 8}, rng);
  s.shared_w3 = random_tensor({1, 5, 8}, rng);
  s.shared_w2 = random_tensor({1, 8, 5}, rng);
  moe.spec = s;
  LayerSpec head;
  head.name = "head";
  head.kind = LayerKind::OutputHead;
  head.in_width = 8;
  head.out_width = kVocab;
  OutputHeadSpec h;
  h.dim = 8;
  h.vocab_size = kVocab;
  h.weight = random_tensor({kVocab, 8}, rng, 0.3f);
  head.spec = h;
  m->layers = {emb, moe, head};
  return m;
}

SessionOptions options() {
  SessionOptions o;
  o.mode = Mode::Training;
  o.threads = 1;
  o.seed = 7;
  o.set("lr", "0.02");
  o.set("clip_norm", "1");
  return o;
}

// Rows per micro-batch of the job: 64 per rank at 4 ranks, so that every layout reduces exactly
// as one process (moert.h, moert_session_options_set_comm()).
constexpr int64_t kRows = 256;

struct Data {
  std::vector<int32_t> tokens, targets;
};

Data make_data() {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int32_t> id(0, kVocab - 1);
  Data d;
  d.tokens.resize(5 * kRows * 2);
  d.targets.resize(5 * kRows);
  for (auto& v : d.tokens) v = id(rng);
  for (auto& v : d.targets) v = id(rng);
  return d;
}

// What training leaves behind, as every rank sees it (expert tensors: its shard).
struct Trace {
  std::vector<double> losses;
  std::vector<int64_t> counts;  // the last step's, before it
  std::vector<float> bias;
  std::vector<std::vector<float>> params;
};

// Steps [from, to) of two micro-batches each; rank r of `world` feeds its slice of each batch.
void train(Session& s, int rank, int world, const Data& d, int from, int to, Trace& t) {
  const int64_t n = kRows / world, first = rank * n;
  std::vector<float> out(static_cast<size_t>(n * kVocab));
  for (int step = from; step < to; ++step) {
    s.zero_grad();
    for (int mb = 0; mb < 2; ++mb) {
      const int64_t off = (step * 2 + mb) % 5 * kRows + first;
      s.forward_tokens(d.tokens.data() + off * 2, n * 2, n, out.data(), out.size());
      t.losses.push_back(s.backward_loss(d.targets.data() + off, n));
    }
    t.counts = s.expert_counts(kMoE, CountScope::Step);
    s.step();
  }
  t.bias.resize(8);
  s.read_bias(kMoE, t.bias.data(), t.bias.size());
  t.params.clear();
  for (size_t i = 0; i < s.num_parameters(); ++i) {
    std::vector<float> p(static_cast<size_t>(s.parameter_size(i)));
    s.read_parameter(i, p.data(), p.size());
    t.params.push_back(std::move(p));
  }
}

// One forward and backward of the next step, left pending: a checkpoint with gradients.
void half_step(Session& s, int rank, int world, const Data& d, int step) {
  const int64_t n = kRows / world, off = (step * 2) % 5 * kRows + rank * n;
  std::vector<float> out(static_cast<size_t>(n * kVocab));
  s.zero_grad();
  s.forward_tokens(d.tokens.data() + off * 2, n * 2, n, out.data(), out.size());
  s.backward_loss(d.targets.data() + off, n);
}

// Runs body(rank, session) on `world` threads, each with its own session of the job.
void on_ranks(int world, int ep, const std::shared_ptr<const Model>& model,
              const std::function<void(int, Session&)>& body) {
  auto comms = testing::make_inprocess_communicators(world, 60.0);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      SessionOptions o = options();
      o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), ep);
      Session s(model, o);
      body(r, s);
    });
  for (auto& t : threads) t.join();
}

std::string bytes_of(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// Every file of a checkpoint (its description and any data file), by name relative to its own.
std::vector<std::pair<std::string, std::string>> checkpoint_files(const fs::path& path) {
  std::vector<std::pair<std::string, std::string>> out;
  const std::string stem = path.filename().string();
  for (const auto& e : fs::directory_iterator(path.parent_path())) {
    const std::string name = e.path().filename().string();
    if (name.rfind(stem, 0) == 0) out.emplace_back(name.substr(stem.size()), bytes_of(e.path()));
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool bitwise(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

std::vector<float> slice(const std::vector<float>& full, size_t n, int shard) {
  const size_t at = n == full.size() ? 0 : static_cast<size_t>(shard) * n;
  return {full.begin() + static_cast<int64_t>(at), full.begin() + static_cast<int64_t>(at + n)};
}

class SessionParallelCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("moert_ep_ckpt_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
            "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void the_job_writes_one_processs_file(int64_t hidden);
  fs::path dir_;
};

// After 3 steps, and again in the middle of the 4th (gradients accumulated), the job's file is
// one process's, byte for byte, for every layout: EP = size, EP 2 x DP 2, pure DP. Experts of
// hidden 256 make arrays of 64 KiB, which go to the data file beside the description.
TEST_F(SessionParallelCheckpoint, TheJobWritesOneProcesssFile) {
  for (int64_t hidden : {6, 256}) {
    SCOPED_TRACE("experts of hidden " + std::to_string(hidden));
    fs::remove_all(dir_);
    the_job_writes_one_processs_file(hidden);
  }
}

void SessionParallelCheckpoint::the_job_writes_one_processs_file(int64_t hidden) {
  const auto model = token_model(3, hidden);
  const Data d = make_data();
  {
    Session one(model, options());
    Trace t;
    train(one, 0, 1, d, 0, 3, t);
    fs::create_directories(dir_ / "one");
    one.save((dir_ / "one" / "a.moert").string());
    half_step(one, 0, 1, d, 3);
    one.save((dir_ / "one" / "b.moert").string());
  }
  const auto want_a = checkpoint_files(dir_ / "one" / "a.moert");
  const auto want_b = checkpoint_files(dir_ / "one" / "b.moert");
  ASSERT_EQ(want_a.size(), hidden < 256 ? 1u : 2u);
  for (auto [world, ep] : std::vector<std::pair<int, int>>{{2, 2}, {4, 4}, {4, 2}, {2, 1}}) {
    const fs::path at = dir_ / ("job" + std::to_string(world) + "_" + std::to_string(ep));
    fs::create_directories(at);
    on_ranks(world, ep, model, [&](int r, Session& s) {
      Trace t;
      train(s, r, world, d, 0, 3, t);
      s.save((at / "a.moert").string());
      half_step(s, r, world, d, 3);
      s.save((at / "b.moert").string());
    });
    EXPECT_EQ(checkpoint_files(at / "a.moert"), want_a) << world << " ranks, EP " << ep;
    EXPECT_EQ(checkpoint_files(at / "b.moert"), want_b) << world << " ranks, EP " << ep;
  }
}

// A checkpoint the job wrote at 2 ranks resumes at 1, at 4 (EP 4, EP 2 x DP 2) and at 2, and the
// next 3 steps are those of one process that never stopped: losses, counts, bias, parameters.
TEST_F(SessionParallelCheckpoint, ResumesAtAnyWorldSizeAsOneUninterruptedProcess) {
  const auto model = token_model(5);
  const Data d = make_data();
  Trace want;
  {
    Session one(model, options());
    train(one, 0, 1, d, 0, 6, want);
  }
  const std::string path = (dir_ / "job.moert").string();
  on_ranks(2, 2, model, [&](int r, Session& s) {
    Trace t;
    train(s, r, 2, d, 0, 3, t);
    s.save(path);
  });
  auto check = [&](const Trace& got, int rank, int ep, const std::string& what) {
    ASSERT_EQ(got.losses.size(), 6u) << what;
    for (size_t i = 0; i < 6; ++i)
      EXPECT_EQ(std::memcmp(&got.losses[i], &want.losses[6 + i], 8), 0)
          << what << " loss " << i << ": " << got.losses[i] << " vs " << want.losses[6 + i];
    EXPECT_EQ(got.counts, want.counts) << what;
    EXPECT_TRUE(bitwise(got.bias, want.bias)) << what;
    ASSERT_EQ(got.params.size(), want.params.size());
    for (size_t i = 0; i < got.params.size(); ++i)
      EXPECT_TRUE(bitwise(got.params[i], slice(want.params[i], got.params[i].size(), rank % ep)))
          << what << " parameter " << i;
  };
  {
    Session one(model, options());
    one.load(path);
    EXPECT_EQ(one.step_count(), 3u);
    Trace t;
    train(one, 0, 1, d, 3, 6, t);
    check(t, 0, 1, "1 rank");
  }
  for (auto [world, ep] : std::vector<std::pair<int, int>>{{4, 4}, {4, 2}, {2, 1}, {2, 2}}) {
    std::vector<Trace> got(static_cast<size_t>(world));
    on_ranks(world, ep, model, [&](int r, Session& s) {
      s.load(path);
      train(s, r, world, d, 3, 6, got[r]);
    });
    for (int r = 0; r < world; ++r)
      check(got[r], r, ep,
            std::to_string(world) + " ranks, EP " + std::to_string(ep) + ", rank " +
                std::to_string(r));
  }
}

// A checkpoint of another architecture, or a file that one rank cannot read while the others
// read a good one: every rank fails, with its own error or one naming the rank that refused, and
// every session goes on as if the load had not been tried.
TEST_F(SessionParallelCheckpoint, ARefusedLoadFailsEveryRankAndChangesNothing) {
  const auto model = token_model(7);
  const auto other = token_model(7, 4);  // experts of another hidden size
  const Data d = make_data();
  const std::string wrong = (dir_ / "other.moert").string(), good = (dir_ / "good.moert").string();
  {
    Session s(other, options());
    s.save(wrong);
    Session fresh(model, options());
    fresh.save(good);
  }
  Trace want;
  {
    Session one(model, options());
    train(one, 0, 1, d, 0, 4, want);
  }
  const int world = 4, ep = 2;
  std::vector<std::vector<std::string>> errors(world);
  std::vector<std::vector<Code>> codes(world);
  std::vector<Trace> got(world);
  on_ranks(world, ep, model, [&](int r, Session& s) {
    train(s, r, world, d, 0, 2, got[r]);
    auto attempt = [&](const std::string& path) {
      try {
        s.load(path);
        errors[r].push_back("");
      } catch (const Error& e) {
        errors[r].push_back(e.what());
        codes[r].push_back(e.code());
      }
    };
    attempt(wrong);
    // Loaded on the other ranks, the good file would take the job back to step 0.
    attempt(r == 2 ? (dir_ / "missing.moert").string() : good);
    train(s, r, world, d, 2, 4, got[r]);
  });
  for (int r = 0; r < world; ++r) {
    ASSERT_EQ(errors[r].size(), 2u);
    EXPECT_NE(errors[r][0].find("differs from this session's model in its tensor shapes"),
              std::string::npos)
        << errors[r][0];
    EXPECT_EQ(codes[r][0], Code::InvalidArgument);
    if (r == 2)
      EXPECT_NE(errors[r][1].find("missing.moert"), std::string::npos) << errors[r][1];
    else
      EXPECT_NE(errors[r][1].find("rank 2 of 4 failed"), std::string::npos) << errors[r][1];
    // The continuation is one uninterrupted process's: nothing of the refused loads remained.
    ASSERT_EQ(got[r].losses.size(), want.losses.size());
    for (size_t i = 0; i < want.losses.size(); ++i)
      EXPECT_EQ(std::memcmp(&got[r].losses[i], &want.losses[i], 8), 0) << "rank " << r;
    EXPECT_TRUE(bitwise(got[r].bias, want.bias));
    for (size_t i = 0; i < want.params.size(); ++i)
      EXPECT_TRUE(bitwise(got[r].params[i], slice(want.params[i], got[r].params[i].size(), r % ep)))
          << "rank " << r << " parameter " << i;
  }
}

// The writer cannot write: every rank fails with its code, the others naming rank 0, and the
// sessions stay usable (the next save works).
TEST_F(SessionParallelCheckpoint, AFailedWriteFailsEveryRank) {
  const auto model = token_model(9);
  const Data d = make_data();
  std::vector<std::string> errors(2);
  std::vector<Code> codes(2, Code::Internal);
  on_ranks(2, 2, model, [&](int r, Session& s) {
    Trace t;
    train(s, r, 2, d, 0, 1, t);
    try {
      s.save((dir_ / "no" / "such" / "dir" / "x.moert").string());
    } catch (const Error& e) {
      errors[r] = e.what();
      codes[r] = e.code();
    }
    s.save((dir_ / "x.moert").string());
  });
  EXPECT_EQ(codes[0], Code::Io) << errors[0];
  EXPECT_EQ(codes[1], Code::Io) << errors[1];
  EXPECT_NE(errors[1].find("rank 0 of 2 failed"), std::string::npos) << errors[1];
  EXPECT_TRUE(fs::exists(dir_ / "x.moert"));
}

// Ranks that no longer hold the same replicated state (a parameter written on one rank only)
// cannot make one process's checkpoint: refused on every rank, nothing written.
TEST_F(SessionParallelCheckpoint, RanksThatDisagreeAreRefused) {
  const auto model = token_model(13);
  std::vector<std::string> errors(4);
  on_ranks(4, 2, model, [&](int r, Session& s) {
    if (r == 3) {
      const size_t head = s.parameter_index("head.weight");
      std::vector<float> w(static_cast<size_t>(s.parameter_size(head)), 0.25f);
      s.write_parameter(head, w.data(), w.size());
    }
    try {
      s.save((dir_ / "x.moert").string());
    } catch (const Error& e) {
      errors[r] = e.what();
      EXPECT_EQ(e.code(), Code::InvalidState);
    }
  });
  for (int r = 0; r < 4; ++r)
    EXPECT_NE(
        errors[r].find("rank 3 of 4 holds other values of a replicated parameter than rank 0"),
        std::string::npos)
        << errors[r];
  EXPECT_FALSE(fs::exists(dir_ / "x.moert"));
}

// zero_grad is local: a rank that alone discarded its micro-batch is named for what differs.
TEST_F(SessionParallelCheckpoint, ARankThatAloneZeroedItsGradientsIsNamedForIt) {
  const auto model = token_model(13);
  const Data d = make_data();
  std::vector<std::string> errors(2);
  on_ranks(2, 2, model, [&](int r, Session& s) {
    half_step(s, r, 2, d, 0);
    if (r == 1) s.zero_grad();
    try {
      s.save((dir_ / "x.moert").string());
    } catch (const Error& e) {
      errors[r] = e.what();
      EXPECT_EQ(e.code(), Code::InvalidState);
    }
  });
  for (int r = 0; r < 2; ++r)
    EXPECT_NE(errors[r].find("rank 1 of 2 holds another count of micro-batches since zero_grad "
                             "than rank 0"),
              std::string::npos)
        << errors[r];
  EXPECT_FALSE(fs::exists(dir_ / "x.moert"));
}

// What each of a job's two ranks hears when it creates its session with options set(r) (the
// communicator attached): "" where the creation succeeds.
std::vector<std::string> creation_errors(const std::shared_ptr<const Model>& model,
                                         const std::function<void(int, SessionOptions&)>& set) {
  std::vector<std::string> errors(2);
  auto comms = testing::make_inprocess_communicators(2, 60.0);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      SessionOptions o = options();
      set(r, o);
      o.set_comm(std::shared_ptr<Communicator>(std::move(comms[r])), 2);
      try {
        Session s(model, o);
      } catch (const Error& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

// One process's checkpoint holds one generator: ranks given different seeds are refused when
// the session is created, on every rank.
TEST(SessionParallelSeed, RanksOfOneJobShareTheSeed) {
  const auto errors = creation_errors(
      token_model(17), [](int r, SessionOptions& o) { o.seed = 7 + static_cast<uint64_t>(r); });
  for (int r = 0; r < 2; ++r)
    EXPECT_NE(errors[r].find("rank 1 of 2 creates its session with the seed 8 and rank 0 with 7"),
              std::string::npos)
        << errors[r];
}

// A training setting that differs is named with both values, as its session option spells it.
TEST(SessionParallelSeed, RanksOfOneJobAreToldWhichTrainingSettingDiffers) {
  const auto model = token_model(17);
  struct Case {
    const char* key;
    std::string values[2];
    std::string want;
  };
  const std::vector<Case> cases = {
      {"lr",
       {"0.001", "0.0010000000000000002"},
       "rank 1 of 2 creates its session with lr 0.0010000000000000002 and rank 0 with 0.001"},
      {"optimizer", {"adamw", "sgd"}, "rank 1 of 2 creates its session with another optimizer"},
      {"sequence_length",
       {"8", "4"},
       "rank 1 of 2 creates its session with sequence_length 4 and rank 0 with 8"},
      {"clip_norm",
       {"0", "1"},
       "rank 1 of 2 creates its session with clip_norm 1 and rank 0 with 0"},
  };
  for (const Case& c : cases) {
    const auto errors =
        creation_errors(model, [&](int r, SessionOptions& o) { o.set(c.key, c.values[r]); });
    for (int r = 0; r < 2; ++r)
      EXPECT_NE(errors[r].find(c.want), std::string::npos) << c.key << ": " << errors[r];
  }
}

}  // namespace
}  // namespace moert
