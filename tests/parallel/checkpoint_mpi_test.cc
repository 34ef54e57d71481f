// Checkpoints of sessions over MPI ranks, through the C ABI only (issue: expert and data
// parallelism across processes, "Checkpoints"). Two phases, two launches:
//   mpirun -np 2 checkpoint_mpi_test save DIR    3 steps at EP 2, then a collective save: the
//                                                 file is byte for byte one process's after the
//                                                 same 3 steps (rank 0 writes that one too);
//   mpirun -np N checkpoint_mpi_test resume DIR  N = 1: one process resumes the job's file;
//                                                 N = 4: EP 4 and EP 2 x DP 2 resume it; 3 more
//                                                 steps equal one uninterrupted process's bit for
//                                                 bit. A refused load fails every rank and leaves
//                                                 every session as it was.
#include <gtest/gtest.h>
#include <moert/moert.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "capi_test_util.h"
#include "model_builder.h"
#include "mpi_test_main.h"

namespace {

namespace fs = std::filesystem;
using namespace capi_test;

int g_rank = 0, g_size = 1;
moert_comm* g_comm = nullptr;
std::string g_mode;
fs::path g_dir;

constexpr int64_t kRows = 256;  // per micro-batch of the job: 64 per rank at 4 ranks
constexpr int kSaved = 3, kMore = 3;

ModelPtr load(const ModelDesc& d) {
  const std::vector<uint8_t> bytes = build(d);
  moert_model* m = nullptr;
  EXPECT_TRUE(IsOk(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &m)));
  return ModelPtr(m);
}

// Token input (vocab 16): embedding, norm, MoE (4 experts of hidden `hidden`, top-2, one shared
// expert, loss-free balancing), dense FFN, head.
ModelPtr token_model(uint32_t hidden = 4) {
  ModelDesc d = token_baseline();
  MoEDesc& m = d.layers[kMoE].moe;
  m.expert_hidden = hidden;
  m.num_shared = 1;
  m.shared_hidden = 6;
  m.shared_w1 = TensorDesc::init(2, 0.2f);
  m.shared_w3 = TensorDesc::init(2, 0.2f);
  m.shared_w2 = TensorDesc::init(2, 0.2f);
  m.balancing.policy = 1;
  m.balancing.bias_update_rate = 1e-3f;
  return load(d);
}

// ep 0: a session of its own; else over the job with that expert-parallel size.
SessionPtr session(const moert_model* model, int ep) {
  moert_session_options* o = nullptr;
  EXPECT_TRUE(IsOk(moert_session_options_create(&o)));
  OptionsPtr opts(o);
  EXPECT_TRUE(IsOk(moert_session_options_set_mode(o, MOERT_MODE_TRAINING)));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "lr", "0.02")));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "clip_norm", "1")));
  if (ep > 0) {
    EXPECT_TRUE(IsOk(moert_session_options_set_comm(o, g_comm, ep)));
  }
  moert_session* s = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model, o, &s)));
  return SessionPtr(s);
}

struct Data {
  std::vector<int32_t> tokens, targets;
};

Data make_data() {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> id(0, 15);
  Data d;
  d.tokens.resize(5 * kRows);
  d.targets.resize(5 * kRows);
  for (auto& v : d.tokens) v = id(rng);
  for (auto& v : d.targets) v = id(rng);
  return d;
}

struct Trace {
  std::vector<double> losses;
  std::vector<int64_t> counts;  // the last step's
  std::vector<float> bias;
  std::vector<std::vector<float>> params;  // expert tensors: the rank's shard
};

void read_state(moert_session* s, Trace& t) {
  t.bias.resize(4);
  EXPECT_TRUE(IsOk(moert_session_get_expert_bias(s, kMoE, t.bias.data(), 4)));
  uint32_t np = 0;
  EXPECT_TRUE(IsOk(moert_session_num_parameters(s, &np)));
  t.params.clear();
  for (uint32_t i = 0; i < np; ++i) {
    const char* name = nullptr;
    uint64_t numel = 0;
    EXPECT_TRUE(IsOk(moert_session_parameter_info(s, i, &name, &numel)));
    std::vector<float> p(numel);
    EXPECT_TRUE(IsOk(moert_session_get_parameter(s, name, p.data(), numel)));
    t.params.push_back(std::move(p));
  }
}

// Steps [from, to) of two micro-batches; the session sees rows [first, first + n) of each batch.
void train(moert_session* s, const Data& d, int from, int to, int64_t first, int64_t n, Trace& t) {
  std::vector<float> out(n * 16);
  for (int step = from; step < to; ++step) {
    EXPECT_TRUE(IsOk(moert_session_zero_grad(s)));
    for (int mb = 0; mb < 2; ++mb) {
      const int64_t off = (step * 2 + mb) % 5 * kRows + first;
      EXPECT_TRUE(IsOk(
          moert_session_forward_tokens(s, d.tokens.data() + off, n, n, out.data(), out.size())));
      double loss = 0;
      EXPECT_TRUE(IsOk(moert_session_backward_loss(s, d.targets.data() + off, n, &loss)));
      t.losses.push_back(loss);
    }
    t.counts.resize(4);
    EXPECT_TRUE(IsOk(moert_session_expert_counts(s, kMoE, MOERT_COUNTS_STEP, t.counts.data(), 4)));
    EXPECT_TRUE(IsOk(moert_session_step(s, nullptr, nullptr)));
  }
  read_state(s, t);
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

std::string bytes_of(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// Every file of the checkpoint at `path` (its description and any data file), by name suffix.
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

TEST(CheckpointMpi, TheJobWritesOneProcesssFile) {
  if (g_mode != "save") GTEST_SKIP() << "the save phase";
  ASSERT_EQ(g_size, 2) << "the save phase runs on 2 ranks";
  const Data d = make_data();
  ModelPtr m = token_model();
  if (g_rank == 0) {
    fs::create_directories(g_dir / "one");
    SessionPtr one = session(m.get(), 0);
    Trace t;
    train(one.get(), d, 0, kSaved, 0, kRows, t);
    ASSERT_TRUE(IsOk(moert_session_save(one.get(), (g_dir / "one" / "x.moert").c_str())));
    // For the refused load of the resume phase: another architecture (experts of hidden 6).
    ModelPtr other = token_model(6);
    SessionPtr s = session(other.get(), 0);
    ASSERT_TRUE(IsOk(moert_session_save(s.get(), (g_dir / "other.moert").c_str())));
  }
  SessionPtr s = session(m.get(), 2);
  const int64_t n = kRows / g_size;
  Trace t;
  train(s.get(), d, 0, kSaved, g_rank * n, n, t);
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), (g_dir / "job.moert").c_str())));
  if (g_rank != 0) return;
  const auto want = checkpoint_files(g_dir / "one" / "x.moert");
  ASSERT_FALSE(want.empty());
  const auto got = checkpoint_files(g_dir / "job.moert");
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].first, want[i].first);
    EXPECT_TRUE(got[i].second == want[i].second) << "file " << got[i].first << " differs";
  }
}

// Rank 0 copies, gathers and writes the job's whole state while the others wait for it: a
// checkpoint that takes longer than the communicator's timeout to move and write (here 100 MB, in
// gathers of 4 MB from each rank, against 5 ms) is still written and every rank succeeds.
TEST(CheckpointMpi, ASaveLongerThanTheTimeoutIsWritten) {
  if (g_mode != "save") GTEST_SKIP() << "the save phase";
  const Data d = make_data();
  ModelPtr m = token_model(1 << 16);  // 4 experts x 3 x 65536 x 8 weights: 25 MB per state
  SessionPtr s = session(m.get(), 2);
  Trace t;
  train(s.get(), d, 0, 1, g_rank * (kRows / g_size), kRows / g_size, t);
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 0.005)));
  const fs::path path = g_dir / "big.moert";
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(IsOk(moert_session_save(s.get(), path.c_str())));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("rank %d: the save took %.2f s\n", g_rank, seconds);
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 600.0)));
  if (g_rank == 0) {
    // The description and its data file.
    size_t written = 0;
    for (const auto& e : fs::directory_iterator(g_dir))
      if (e.path().filename().string().rfind("big.moert", 0) == 0) {
        ++written;
        fs::remove(e.path());
      }
    EXPECT_EQ(written, 2u);
  }
}

// Rank 0 alone writes, so a rank passing another path is refused on every rank, not ignored;
// paths are compared once normalised.
TEST(CheckpointMpi, EveryRankSavesToTheSamePath) {
  if (g_mode != "save") GTEST_SKIP() << "the save phase";
  ModelPtr m = token_model();
  SessionPtr s = session(m.get(), 2);
  const fs::path mine = g_dir / (g_rank == 0 ? "same.moert" : "elsewhere.moert");
  EXPECT_TRUE(IsError(moert_session_save(s.get(), mine.c_str()), MOERT_ERR_INVALID_STATE,
                      {"checkpoint path"}));
  EXPECT_FALSE(fs::exists(g_dir / "same.moert"));
  const fs::path same = g_dir / "same.moert";
  EXPECT_TRUE(IsOk(moert_session_save(s.get(), same.c_str())));
  // The same file spelled another way is the same path.
  const std::string spelled = g_rank == 0 ? same.string() : (g_dir / "." / "same.moert").string();
  EXPECT_TRUE(IsOk(moert_session_save(s.get(), spelled.c_str())));
}

TEST(CheckpointMpi, ResumesAsOneUninterruptedProcess) {
  if (g_mode != "resume") GTEST_SKIP() << "the resume phase";
  const Data d = make_data();
  ModelPtr m = token_model();
  Trace want;
  {
    SessionPtr one = session(m.get(), 0);
    train(one.get(), d, 0, kSaved + kMore, 0, kRows, want);
  }
  const std::vector<int> layouts = g_size == 1 ? std::vector<int>{0} : std::vector<int>{g_size, 2};
  for (int ep : layouts) {
    const std::string what = "EP " + std::to_string(ep) + ", rank " + std::to_string(g_rank);
    SessionPtr s = session(m.get(), ep);
    ASSERT_TRUE(IsOk(moert_session_load(s.get(), (g_dir / "job.moert").c_str()))) << what;
    uint64_t step = 0;
    ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &step)));
    EXPECT_EQ(step, static_cast<uint64_t>(kSaved));
    const int64_t n = kRows / g_size;
    Trace got;
    train(s.get(), d, kSaved, kSaved + kMore, g_rank * n, n, got);
    ASSERT_EQ(got.losses.size(), 2u * kMore);
    for (size_t i = 0; i < got.losses.size(); ++i) {
      const double w = want.losses[2 * kSaved + i];
      EXPECT_EQ(std::memcmp(&got.losses[i], &w, 8), 0)
          << what << ": loss " << i << " " << got.losses[i] << " vs " << w;
    }
    EXPECT_EQ(got.counts, want.counts) << what;
    EXPECT_TRUE(same(got.bias, want.bias)) << what;
    ASSERT_EQ(got.params.size(), want.params.size());
    for (size_t i = 0; i < got.params.size(); ++i) {
      const size_t k = got.params[i].size();
      const size_t at = k == want.params[i].size() ? 0 : (g_rank % ep) * k;
      EXPECT_TRUE(same(got.params[i],
                       std::vector<float>(want.params[i].begin() + static_cast<int64_t>(at),
                                          want.params[i].begin() + static_cast<int64_t>(at + k))))
          << what << " parameter " << i;
    }
  }
}

// Another architecture's checkpoint, then a file only one rank cannot read: every rank fails
// (the one that refused with its reason, the others naming it), and nothing changed.
TEST(CheckpointMpi, ARefusedLoadFailsEveryRankAndChangesNothing) {
  if (g_mode != "resume" || g_size == 1) GTEST_SKIP() << "the resume phase, among ranks";
  const Data d = make_data();
  ModelPtr m = token_model();
  SessionPtr s = session(m.get(), 2);
  const int64_t n = kRows / g_size;
  Trace before, after;
  train(s.get(), d, 0, 1, g_rank * n, n, before);
  EXPECT_TRUE(IsError(moert_session_load(s.get(), (g_dir / "other.moert").c_str()),
                      MOERT_ERR_INVALID_ARGUMENT, {"differs from this session's model"}));
  const fs::path path = g_rank == 1 ? g_dir / "missing.moert" : g_dir / "job.moert";
  moert_status* st = moert_session_load(s.get(), path.c_str());
  ASSERT_NE(st, nullptr);
  const std::string msg = moert_status_message(st);
  moert_status_free(st);
  EXPECT_NE(msg.find(g_rank == 1 ? "missing.moert" : "rank 1 of"), std::string::npos) << msg;
  read_state(s.get(), after);
  EXPECT_TRUE(same(after.bias, before.bias));
  ASSERT_EQ(after.params.size(), before.params.size());
  for (size_t i = 0; i < after.params.size(); ++i)
    EXPECT_TRUE(same(after.params[i], before.params[i])) << "parameter " << i;
  uint64_t step = 0;
  ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &step)));
  EXPECT_EQ(step, 1u);
  // Still one job: the next step works everywhere.
  train(s.get(), d, 1, 2, g_rank * n, n, after);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc != 3 || (std::string(argv[1]) != "save" && std::string(argv[1]) != "resume")) {
    std::fprintf(stderr, "usage: %s save|resume DIR\n", argv[0]);
    return 2;
  }
  g_mode = argv[1];
  g_dir = argv[2];
  moert_status* st = moert_comm_create_mpi(nullptr, &g_comm);
  if (st) {
    std::fprintf(stderr, "moert_comm_create_mpi: %s\n", moert_status_message(st));
    return 1;
  }
  moert_status_free(moert_comm_rank(g_comm, &g_rank));
  moert_status_free(moert_comm_size(g_comm, &g_size));
  // A rank that fails an assertion early leaves the others waiting: bounded well inside CTest's.
  moert_status_free(moert_comm_set_timeout(g_comm, 120.0));
  if (g_mode == "save" && g_rank == 0) {
    fs::remove_all(g_dir);
    fs::create_directories(g_dir);
  }
  moert_status_free(moert_comm_barrier(g_comm));
  const int rc = parallel_test::run_tests_on_every_rank(g_comm, g_rank);
  moert_comm_free(g_comm);
  return rc;
}
