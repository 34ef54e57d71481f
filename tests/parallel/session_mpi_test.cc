// Sessions over MPI ranks (issue: expert and data parallelism across processes), through the C ABI
// only, under `mpirun -np N` for N = 1, 2, 4. Every rank also runs one session alone over the
// whole global batch — the reference — and compares: forward outputs, losses, gradients, counts,
// biases and parameters must be bitwise equal, with EP = N and, on 4 ranks, EP 2 x DP 2 and pure
// data parallelism.
#include <gtest/gtest.h>
#include <moert/moert.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "capi_test_util.h"
#include "model_builder.h"
#include "mpi_test_main.h"

// While not zero, the library's backend memory (the aligned nothrow operator new, which this
// program replaces for the whole process, and anonymous mmap) fails from this many bytes on: a
// process that ran out of memory. As libstdc++'s own, it takes memory from aligned_alloc, which the
// aligned delete frees. The sanitizers replace operator new themselves (and pair it with their own
// delete), so there the limit is not installed and the test that uses it skips.
std::atomic<size_t> g_allocation_limit{0};

// The same for new[] (what the MPI communicator's staging buffers come from), while
// g_array_limit is not zero, and for plain new (host vectors), while g_host_limit is not zero.
std::atomic<size_t> g_array_limit{0}, g_host_limit{0};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kAllocationLimits = false;
#else
constexpr bool kAllocationLimits = true;
void* operator new(std::size_t n, std::align_val_t align, const std::nothrow_t&) noexcept {
  const size_t limit = g_allocation_limit.load();
  if (limit != 0 && n >= limit) return nullptr;
  const size_t a = static_cast<size_t>(align);
  return std::aligned_alloc(a, (n + a - 1) / a * a);
}
void* operator new[](std::size_t n) {
  const size_t limit = g_array_limit.load();
  if (limit != 0 && n >= limit) throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void* operator new(std::size_t n) {
  const size_t limit = g_host_limit.load();
  if (limit != 0 && n >= limit) throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
// libstdc++'s operator delete is free(): it stays.
// The library maps its blocks of 1 MiB or more directly (kernels/cpu/large_alloc.h), so the limit
// covers anonymous mappings too; everything else (and everything while no limit is set) goes to
// the kernel unchanged.
extern "C" __attribute__((visibility("default"))) void* mmap(void* addr, size_t len, int prot,
                                                             int flags, int fd,
                                                             off_t off) noexcept {
  const size_t limit = g_allocation_limit.load();
  if (limit != 0 && (flags & MAP_ANONYMOUS) && len >= limit) {
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return reinterpret_cast<void*>(syscall(SYS_mmap, addr, len, prot, flags, fd, off));
}
#endif

namespace {

using namespace capi_test;

int g_rank = 0, g_size = 1;
moert_comm* g_comm = nullptr;

ModelPtr load(const ModelDesc& d) {
  const std::vector<uint8_t> bytes = build(d);
  moert_model* m = nullptr;
  EXPECT_TRUE(IsOk(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &m)));
  return ModelPtr(m);
}

// Token input (vocab 16, context 1): embedding, norm, MoE (4 experts, top-2, groups 2/1, one
// shared expert), dense FFN, head; balancing `policy`.
ModelDesc token_model(int8_t policy) {
  ModelDesc d = token_baseline();
  MoEDesc& m = d.layers[kMoE].moe;
  m.num_shared = 1;
  m.shared_hidden = 6;
  m.shared_w1 = TensorDesc::init(2, 0.2f);
  m.shared_w3 = TensorDesc::init(2, 0.2f);
  m.shared_w2 = TensorDesc::init(2, 0.2f);
  m.balancing.policy = policy;
  m.balancing.aux_alpha = policy == 2 || policy == 3 ? 0.01f : 0.0f;
  m.balancing.bias_update_rate = 1e-3f;
  return d;
}

SessionPtr session(const moert_model* model, bool training, int ep, bool parallel,
                   const std::vector<std::pair<const char*, const char*>>& knobs = {}) {
  moert_session_options* o = nullptr;
  EXPECT_TRUE(IsOk(moert_session_options_create(&o)));
  OptionsPtr opts(o);
  EXPECT_TRUE(IsOk(
      moert_session_options_set_mode(o, training ? MOERT_MODE_TRAINING : MOERT_MODE_INFERENCE)));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "lr", "0.02")));
  for (const auto& [k, v] : knobs) EXPECT_TRUE(IsOk(moert_session_options_set_config(o, k, v)));
  if (parallel) {
    EXPECT_TRUE(IsOk(moert_session_options_set_comm(o, g_comm, ep)));
  }
  moert_session* s = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model, o, &s)));
  return SessionPtr(s);
}

// The expert-parallel sizes this world size tries.
std::vector<int> layouts() {
  std::vector<int> eps{g_size};
  if (g_size == 4) eps.push_back(2);
  if (g_size > 1) eps.push_back(1);
  return eps;
}

// n ids of the vocabulary of 16, (i * stride + rank) % 16: each rank its own.
std::vector<int32_t> rank_ids(int64_t n, int64_t stride) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>((i * stride + g_rank) % 16);
  return ids;
}

// hidden_baseline() with every token routed to all 4 experts.
ModelDesc every_expert_model() {
  ModelDesc d = hidden_baseline();
  MoEDesc& moe = d.layers[1].moe;
  moe.top_k = 4;
  moe.num_groups = 1;
  moe.topk_groups = 1;
  return d;
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// Forwards `n` rows of hidden_baseline()'s input through `s`: the output is `want`, bit for bit.
void expect_hidden_forward(moert_session* s, const std::vector<float>& x, int64_t n,
                           const std::vector<float>& want) {
  std::vector<float> out(want.size());
  ASSERT_TRUE(IsOk(moert_session_forward_hidden(s, x.data(), n * 8, n, out.data(), out.size())));
  EXPECT_TRUE(same(out, want));
}

// Every precision: the replicas of a shard split an expert's rows where one process's row items
// start, so every row meets the same GEMM call as in one process -- which matters most where the
// few-row and the full items run different kernels (bf16 on AVX512-BF16 or AMX CPUs).
TEST(SessionMpi, ForwardIsBitwiseOneSessions) {
  ModelPtr m = load(hidden_baseline());
  const int64_t rows = 256, n = rows / g_size;
  std::mt19937 rng(3);
  std::normal_distribution<float> d;
  std::vector<float> x(rows * 8);
  for (float& v : x) v = d(rng);
  std::vector<float> fp32;
  for (const char* precision : {"fp32", "bf16", "fp8"}) {
    std::vector<float> want(rows * 16);
    SessionPtr alone = session(m.get(), false, 1, false, {{"precision", precision}});
    ASSERT_TRUE(IsOk(moert_session_forward_hidden(alone.get(), x.data(), x.size(), rows,
                                                  want.data(), want.size())));
    // The precision took effect: its experts round differently from fp32's.
    if (fp32.empty())
      fp32 = want;
    else
      EXPECT_FALSE(same(want, fp32)) << precision << " gave fp32's bits";
    std::vector<int64_t> counts_want(4);
    ASSERT_TRUE(IsOk(
        moert_session_expert_counts(alone.get(), 1, MOERT_COUNTS_LAST, counts_want.data(), 4)));
    for (int ep : layouts()) {
      SessionPtr s = session(m.get(), false, ep, true, {{"precision", precision}});
      std::vector<float> out(n * 16);
      ASSERT_TRUE(IsOk(moert_session_forward_hidden(s.get(), x.data() + g_rank * n * 8, n * 8, n,
                                                    out.data(), out.size())));
      EXPECT_TRUE(same(out, std::vector<float>(want.begin() + g_rank * n * 16,
                                               want.begin() + (g_rank + 1) * n * 16)))
          << precision << ", EP " << ep;
      std::vector<int64_t> counts(4);
      ASSERT_TRUE(
          IsOk(moert_session_expert_counts(s.get(), 1, MOERT_COUNTS_LAST, counts.data(), 4)));
      EXPECT_EQ(counts, counts_want) << precision << ", EP " << ep;
    }
  }
}

struct Trained {
  std::vector<double> losses;
  std::vector<std::vector<float>> params, grads;
  std::vector<float> bias;
  std::vector<int64_t> counts;
};

// 20 steps of 2 micro-batches; the session sees rows [first, first + n) of each global batch.
Trained train(moert_session* s, const std::vector<int32_t>& tokens,
              const std::vector<int32_t>& targets, int64_t rows, int64_t first, int64_t n) {
  Trained t;
  std::vector<float> out(n * 16);
  for (int step = 0; step < 20; ++step) {
    EXPECT_TRUE(IsOk(moert_session_zero_grad(s)));
    for (int mb = 0; mb < 2; ++mb) {
      const int64_t off = (step * 2 + mb) % 3 * rows + first;
      EXPECT_TRUE(
          IsOk(moert_session_forward_tokens(s, tokens.data() + off, n, n, out.data(), out.size())));
      double loss = 0;
      EXPECT_TRUE(IsOk(moert_session_backward_loss(s, targets.data() + off, n, &loss)));
      t.losses.push_back(loss);
    }
    if (step == 19) {
      t.counts.resize(4);
      EXPECT_TRUE(
          IsOk(moert_session_expert_counts(s, kMoE, MOERT_COUNTS_STEP, t.counts.data(), 4)));
      uint32_t np = 0;
      EXPECT_TRUE(IsOk(moert_session_num_parameters(s, &np)));
      for (uint32_t i = 0; i < np; ++i) {
        const char* name = nullptr;
        uint64_t numel = 0;
        EXPECT_TRUE(IsOk(moert_session_parameter_info(s, i, &name, &numel)));
        std::vector<float> g(numel);
        EXPECT_TRUE(IsOk(moert_session_get_gradient(s, name, g.data(), numel)));
        t.grads.push_back(std::move(g));
      }
    }
    EXPECT_TRUE(IsOk(moert_session_step(s, nullptr, nullptr)));
  }
  t.bias.resize(4);
  EXPECT_TRUE(IsOk(moert_session_get_expert_bias(s, kMoE, t.bias.data(), 4)));
  uint32_t np = 0;
  EXPECT_TRUE(IsOk(moert_session_num_parameters(s, &np)));
  for (uint32_t i = 0; i < np; ++i) {
    const char* name = nullptr;
    uint64_t numel = 0;
    EXPECT_TRUE(IsOk(moert_session_parameter_info(s, i, &name, &numel)));
    std::vector<float> p(numel);
    EXPECT_TRUE(IsOk(moert_session_get_parameter(s, name, p.data(), numel)));
    t.params.push_back(std::move(p));
  }
  return t;
}

// Loss-free balancing, the global-batch Switch loss, the sequence-wise loss and Expert Choice
// (whose experts choose from every rank's rows): 20 steps on the job equal 20 steps of one
// session over the union, bit for bit — losses, last-step gradients,
// the step's counts, the bias and every parameter (a rank's expert tensors are its shard).
TEST(SessionMpi, TrainingIsBitwiseOneSessions) {
  const int64_t rows = 256, n = rows / g_size;
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> id(0, 15);
  std::vector<int32_t> tokens(3 * rows), targets(3 * rows);
  for (auto& v : tokens) v = id(rng);
  for (auto& v : targets) v = id(rng);
  for (int8_t policy : {int8_t{1}, int8_t{2}, int8_t{3}, int8_t{4}}) {
    ModelPtr m = load(token_model(policy));
    const std::vector<std::pair<const char*, const char*>> knobs{
        {"aux_loss_scope", "global"}, {"sequence_length", "32"}, {"clip_norm", "0.5"}};
    SessionPtr alone = session(m.get(), true, 1, false, knobs);
    const Trained want = train(alone.get(), tokens, targets, rows, 0, rows);
    for (int ep : layouts()) {
      SessionPtr s = session(m.get(), true, ep, true, knobs);
      const Trained got = train(s.get(), tokens, targets, rows, g_rank * n, n);
      const std::string what = "policy " + std::to_string(policy) + ", EP " + std::to_string(ep);
      ASSERT_EQ(got.losses.size(), want.losses.size());
      for (size_t i = 0; i < got.losses.size(); ++i)
        EXPECT_EQ(std::memcmp(&got.losses[i], &want.losses[i], 8), 0)
            << what << ": loss " << i << " " << got.losses[i] << " vs " << want.losses[i];
      EXPECT_EQ(got.counts, want.counts) << what;
      EXPECT_TRUE(same(got.bias, want.bias)) << what;
      ASSERT_EQ(got.params.size(), want.params.size());
      for (size_t i = 0; i < got.params.size(); ++i) {
        const size_t k = got.params[i].size();
        const size_t at = k == want.params[i].size() ? 0 : (g_rank % ep) * k;
        auto slice = [&](const std::vector<float>& v) {
          return std::vector<float>(v.begin() + static_cast<int64_t>(at),
                                    v.begin() + static_cast<int64_t>(at + k));
        };
        EXPECT_TRUE(same(got.params[i], slice(want.params[i]))) << what << " parameter " << i;
        EXPECT_TRUE(same(got.grads[i], slice(want.grads[i]))) << what << " gradient " << i;
      }
    }
  }
}

// One rank passes a buffer of the wrong size: that rank gets its own error, every other rank an
// error naming it; nothing is counted, and the next call works everywhere.
TEST(SessionMpi, ABadBufferOnOneRankFailsEveryRank) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(hidden_baseline());
  SessionPtr s = session(m.get(), false, g_size, true);
  const int64_t n = 64;
  std::vector<float> x(n * 8, 0.5f), out(n * 16);
  const uint64_t len = g_rank == 1 ? n * 8 - 1 : n * 8;
  moert_status* st =
      moert_session_forward_hidden(s.get(), x.data(), len, n, out.data(), out.size());
  ASSERT_NE(st, nullptr);
  const std::string msg = moert_status_message(st);
  EXPECT_EQ(moert_status_code(st), MOERT_ERR_INVALID_ARGUMENT) << msg;
  moert_status_free(st);
  const char* want = g_rank == 1 ? "input buffer holds" : "rank 1 of";
  EXPECT_NE(msg.find(want), std::string::npos) << msg;
  std::vector<int64_t> counts(4, -1);
  ASSERT_TRUE(IsOk(moert_session_expert_counts(s.get(), 1, MOERT_COUNTS_EVAL, counts.data(), 4)));
  EXPECT_EQ(counts, std::vector<int64_t>(4, 0));
  EXPECT_TRUE(
      IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size())));
}

// A null argument on one rank (a masked forward's row_mask, save's or load's path) is a bad
// argument like a wrong size: refused inside the call's agreement, so every rank fails that call,
// nothing else, and the communicator stays usable.
TEST(SessionMpi, ANullArgumentOnOneRankFailsEveryRank) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(token_model(1));
  SessionPtr s = session(m.get(), true, g_size, true);
  const int64_t n = 64;
  const std::vector<int32_t> tokens = rank_ids(n, 7), targets = rank_ids(n, 3);
  std::vector<uint8_t> mask(n, 1);
  std::vector<float> out(n * 16);
  const bool bad = g_rank == 1;
  auto expect_every_rank_fails = [&](moert_status* st) {
    ASSERT_NE(st, nullptr);
    const std::string msg = moert_status_message(st);
    EXPECT_EQ(moert_status_code(st), MOERT_ERR_INVALID_ARGUMENT) << msg;
    moert_status_free(st);
    EXPECT_NE(msg.find(bad ? "is NULL" : "rank 1 of"), std::string::npos) << msg;
  };
  expect_every_rank_fails(moert_session_forward_tokens_masked(
      s.get(), tokens.data(), n, bad ? nullptr : mask.data(), n, n, out.data(), out.size()));
  ASSERT_TRUE(IsOk(moert_session_forward_tokens_masked(s.get(), tokens.data(), n, mask.data(), n, n,
                                                       out.data(), out.size())));
  ASSERT_TRUE(IsOk(moert_session_backward_loss(s.get(), targets.data(), n, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
  const std::string path = ::testing::TempDir() + "null_path_" + std::to_string(g_size) + ".moert";
  expect_every_rank_fails(moert_session_save(s.get(), bad ? nullptr : path.c_str()));
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), path.c_str())));
  expect_every_rank_fails(moert_session_load(s.get(), bad ? nullptr : path.c_str()));
  ASSERT_TRUE(IsOk(moert_session_load(s.get(), path.c_str())));
  EXPECT_TRUE(
      IsOk(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size())));
}

// A backward refused on one rank (a wrong targets length) fails on every rank and, as alone,
// leaves the pass waiting for its backward: the corrected call then works everywhere, and the
// step equals that of ranks that never failed.
TEST(SessionMpi, ABackwardRefusedOnOneRankCanBeRetried) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(token_model(1));
  SessionPtr s = session(m.get(), true, g_size, true);
  SessionPtr clean = session(m.get(), true, g_size, true);
  const int64_t n = 64;
  std::vector<int32_t> tokens(n), targets(n + 1);
  for (int64_t i = 0; i < n; ++i) {
    tokens[i] = static_cast<int32_t>((i * 5 + g_rank) % 16);
    targets[i] = static_cast<int32_t>((i * 11 + g_rank) % 16);
  }
  std::vector<float> out(n * 16);
  for (moert_session* x : {s.get(), clean.get()})
    ASSERT_TRUE(IsOk(moert_session_forward_tokens(x, tokens.data(), n, n, out.data(), out.size())));
  moert_status* st =
      moert_session_backward_loss(s.get(), targets.data(), g_rank == 1 ? n + 1 : n, nullptr);
  ASSERT_NE(st, nullptr);
  EXPECT_EQ(moert_status_code(st), MOERT_ERR_INVALID_ARGUMENT) << moert_status_message(st);
  moert_status_free(st);
  for (moert_session* x : {s.get(), clean.get()}) {
    ASSERT_TRUE(IsOk(moert_session_backward_loss(x, targets.data(), n, nullptr)));
    ASSERT_TRUE(IsOk(moert_session_step(x, nullptr, nullptr)));
  }
  ASSERT_TRUE(
      IsOk(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size())));
  std::vector<float> want(out.size());
  ASSERT_TRUE(IsOk(
      moert_session_forward_tokens(clean.get(), tokens.data(), n, n, want.data(), want.size())));
  EXPECT_TRUE(same(out, want));
}

// A first step refused because one rank is in eval mode: the ranks that passed their own checks
// had allocated the optimizer's moments, the refused one had not, and every save then refused
// the replicas as different until a step succeeded. A refused step takes them back.
TEST(SessionMpi, ARefusedFirstStepLeavesTheReplicasAlike) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(token_model(1));
  SessionPtr s = session(m.get(), true, g_size, true);
  const int64_t n = 64;
  const std::vector<int32_t> tokens = rank_ids(n, 5), targets = rank_ids(n, 11);
  std::vector<float> out(n * 16);
  ASSERT_TRUE(
      IsOk(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size())));
  ASSERT_TRUE(IsOk(moert_session_backward_loss(s.get(), targets.data(), n, nullptr)));
  const bool odd = g_rank == g_size - 1;
  if (odd) {
    ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), 1)));
  }
  EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_INVALID_STATE));
  if (odd) {
    ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), 0)));
  }
  const std::string path =
      ::testing::TempDir() + "refused_first_step_" + std::to_string(g_size) + ".moert";
  EXPECT_TRUE(IsOk(moert_session_save(s.get(), path.c_str())));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
}

// Ranks in different calls (one in a forward, the others loading a checkpoint) meet in the same
// agreement: every rank fails with MOERT_ERR_INVALID_STATE naming the calls, the load changes
// nothing, and the communicator stays usable.
TEST(SessionMpi, RanksInDifferentCallsAllFail) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(token_model(1));
  SessionPtr s = session(m.get(), true, g_size, true);
  const int64_t n = 64;
  std::vector<int32_t> tokens(n, 3);
  std::vector<float> before(n * 16), out(n * 16);
  const std::string path = ::testing::TempDir() + "calls_" + std::to_string(g_size) + ".moert";
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), path.c_str())));
  ASSERT_TRUE(IsOk(
      moert_session_forward_tokens(s.get(), tokens.data(), n, n, before.data(), before.size())));
  moert_status* st = g_rank == 0 ? moert_session_forward_tokens(s.get(), tokens.data(), n, n,
                                                                out.data(), out.size())
                                 : moert_session_load(s.get(), path.c_str());
  ASSERT_NE(st, nullptr);
  const std::string msg = moert_status_message(st);
  EXPECT_EQ(moert_status_code(st), MOERT_ERR_INVALID_STATE) << msg;
  moert_status_free(st);
  EXPECT_NE(msg.find("called load where rank 0 called forward"), std::string::npos) << msg;
  ASSERT_TRUE(
      IsOk(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size())));
  EXPECT_TRUE(same(out, before));
}

// A rank that creates a second session while another still forwards through the first: the
// creation's comparison and the forward's agreement had different sizes, and over MPI every rank
// failed with MOERT_ERR_COMM ("the ranks disagree on the block size") and a broken communicator.
// Both now fail by name, and the job goes on: the forward answers again, the creation succeeds.
TEST(SessionMpi, ARankCreatingASessionWhileAnotherForwardsFailsBothAndKeepsTheCommunicator) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(hidden_baseline());
  SessionPtr s = session(m.get(), false, g_size, true);
  const int64_t n = 64;
  std::vector<float> x(n * 8, 0.25f), before(n * 16), out(n * 16);
  ASSERT_TRUE(IsOk(
      moert_session_forward_hidden(s.get(), x.data(), n * 8, n, before.data(), before.size())));
  const bool creating = g_rank == g_size - 1;
  const std::string want = "rank " + std::to_string(g_size - 1) + " of " + std::to_string(g_size) +
                           " called session creation where rank 0 called forward";
  if (creating) {
    moert_session_options* o = nullptr;
    ASSERT_TRUE(IsOk(moert_session_options_create(&o)));
    OptionsPtr opts(o);
    ASSERT_TRUE(IsOk(moert_session_options_set_comm(o, g_comm, g_size)));
    moert_session* second = nullptr;
    EXPECT_TRUE(
        IsError(moert_session_create(m.get(), o, &second), MOERT_ERR_INVALID_STATE, {want}));
    EXPECT_EQ(second, nullptr);
  } else {
    EXPECT_TRUE(
        IsError(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size()),
                MOERT_ERR_INVALID_STATE, {want}));
  }
  expect_hidden_forward(s.get(), x, n, before);
  SessionPtr second = session(m.get(), false, g_size, true);
  ASSERT_NE(second, nullptr);
  expect_hidden_forward(second.get(), x, n, before);
}

// A failing rank's message reaches the others whole up to about 1000 bytes (it was cut at 247,
// losing the cause after a long path), and a longer one ends in "...".
TEST(SessionMpi, AFailingRanksLongMessageReachesTheOthers) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(token_model(1));
  SessionPtr s = session(m.get(), true, g_size, true);
  const std::string saved =
      ::testing::TempDir() + "long_message_" + std::to_string(g_size) + ".moert";
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), saved.c_str())));
  const bool odd = g_rank == g_size - 1;
  for (const size_t length : {400, 2000}) {
    // Appended, not "/" + ...: GCC 12 at -O3 (the cuda preset) takes the chained operator+ of
    // temporaries for an overlapping memcpy (a false -Wrestrict).
    std::string missing = "/";
    missing.append(length, 'd').append("/missing.moert");
    moert_status* st = moert_session_load(s.get(), (odd ? missing : saved).c_str());
    ASSERT_NE(st, nullptr);
    const std::string msg = moert_status_message(st);
    moert_status_free(st);
    if (odd) continue;
    EXPECT_NE(msg.find("rank " + std::to_string(g_size - 1)), std::string::npos) << msg;
    if (length == 400)
      EXPECT_NE(msg.find("missing.moert"), std::string::npos) << msg;
    else
      EXPECT_EQ(msg.substr(msg.size() - 3), "...") << msg;
  }
  // The cut never splits a UTF-8 character: a path of 2-byte characters, at both parities.
  const std::string e_acute = "\xc3\xa9";
  for (const std::string& lead : {std::string(), std::string("x")}) {
    std::string missing = "/" + lead;
    for (int i = 0; i < 1000; ++i) missing += e_acute;
    moert_status* st = moert_session_load(s.get(), (odd ? missing + "/m.moert" : saved).c_str());
    ASSERT_NE(st, nullptr);
    const std::string msg = moert_status_message(st);
    moert_status_free(st);
    if (odd) continue;
    EXPECT_TRUE(msg.ends_with(e_acute + "...")) << msg;
  }
}

// Two sessions over one communicator (A/B serving of two versions of a model), called in a
// different order on one rank: their passes' collectives have the same shapes, so without the
// session's number in the agreement a pass of one would pair with the other's and return wrong
// outputs with OK. Every call fails instead; in the same order everywhere, both answer.
TEST(SessionMpi, TwoSessionsCalledInDifferentOrdersFail) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(hidden_baseline());
  ModelDesc other_desc = hidden_baseline();
  other_desc.seed = 99;
  ModelPtr other = load(other_desc);
  SessionPtr a = session(m.get(), false, g_size, true);
  SessionPtr b = session(other.get(), false, g_size, true);
  const int64_t n = 64;
  std::vector<float> x(n * 8, 0.25f), out(n * 16);
  const bool reversed = g_rank == g_size - 1;
  for (moert_session* s : reversed ? std::vector{b.get(), a.get()} : std::vector{a.get(), b.get()})
    EXPECT_TRUE(IsError(moert_session_forward_hidden(s, x.data(), n * 8, n, out.data(), out.size()),
                        MOERT_ERR_INVALID_STATE, {"session #"}));
  std::vector<float> want_a(out.size()), want_b(out.size());
  SessionPtr alone_a = session(m.get(), false, 1, false),
             alone_b = session(other.get(), false, 1, false);
  ASSERT_TRUE(IsOk(moert_session_forward_hidden(alone_a.get(), x.data(), n * 8, n, want_a.data(),
                                                want_a.size())));
  ASSERT_TRUE(IsOk(moert_session_forward_hidden(alone_b.get(), x.data(), n * 8, n, want_b.data(),
                                                want_b.size())));
  expect_hidden_forward(a.get(), x, n, want_a);
  expect_hidden_forward(b.get(), x, n, want_b);
}

// Ranks that create their sessions from other options or another model are refused on every rank
// at once, with the communicator left usable -- before the split that ranks of other
// expert-parallel sizes would wait in until the timeout.
TEST(SessionMpi, SessionsOfDifferentOptionsOrModelsAreRefusedEverywhere) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(token_model(1));
  ModelDesc other_desc = token_model(1);
  other_desc.seed = 8;
  ModelPtr other = load(other_desc);
  const bool odd = g_rank == g_size - 1;
  struct Case {
    const moert_model* model;
    int ep;
    std::vector<std::pair<const char*, const char*>> knobs;
    const char* want;
  };
  const std::vector<Case> cases = {
      {m.get(), odd ? 1 : g_size, {}, "the expert-parallel size"},
      {m.get(), g_size, {{"precision", odd ? "bf16" : "fp32"}}, "the precision"},
      {m.get(), g_size, {{"ep_chunks", odd ? "3" : "2"}}, "ep_chunks"},
      {m.get(), g_size, {{"lr", odd ? "0.5" : "0.02"}}, "with lr 0.5 and rank 0 with 0.02"},
      {m.get(), g_size, {{"check_finite", odd ? "false" : "true"}}, "check_finite"},
      {m.get(), g_size, {{"layout_copies", odd ? "off" : "on"}}, "layout_copies"},
      {odd ? other.get() : m.get(), g_size, {}, "another model"},
  };
  for (const Case& c : cases) {
    moert_session_options* o = nullptr;
    ASSERT_TRUE(IsOk(moert_session_options_create(&o)));
    OptionsPtr opts(o);
    ASSERT_TRUE(IsOk(moert_session_options_set_mode(o, MOERT_MODE_TRAINING)));
    for (const auto& [k, v] : c.knobs) ASSERT_TRUE(IsOk(moert_session_options_set_config(o, k, v)));
    ASSERT_TRUE(IsOk(moert_session_options_set_comm(o, g_comm, c.ep)));
    moert_session* s = nullptr;
    EXPECT_TRUE(IsError(moert_session_create(c.model, o, &s), MOERT_ERR_INVALID_ARGUMENT,
                        {"rank " + std::to_string(g_size - 1) + " of", c.want}))
        << c.want;
    EXPECT_EQ(s, nullptr);
  }
  // A rank that passes NULL for `out` cannot create its session: it still meets the others in
  // the creation's first collective, so they fail at once rather than at the timeout.
  moert_session_options* o = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&o)));
  OptionsPtr opts(o);
  ASSERT_TRUE(IsOk(moert_session_options_set_comm(o, g_comm, g_size)));
  moert_session* s = nullptr;
  EXPECT_TRUE(IsError(moert_session_create(m.get(), o, odd ? nullptr : &s),
                      MOERT_ERR_INVALID_ARGUMENT,
                      {odd ? "out" : "passed a bad argument to its session's creation"}));
  EXPECT_EQ(s, nullptr);
  ASSERT_TRUE(IsOk(moert_comm_barrier(g_comm)));
}

// set_eval and set_config are local calls: a rank whose pass settings differ, or that loads
// another checkpoint, makes the call fail on every rank and change nothing.
TEST(SessionMpi, RanksThatDivergeAreRefusedAtTheNextCall) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(token_model(1));
  SessionPtr s = session(m.get(), true, g_size, true);
  const int64_t n = 64;
  std::vector<int32_t> tokens(n, 5), targets(n, 2);
  std::vector<float> out(n * 16);
  const bool odd = g_rank == g_size - 1;
  ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), odd ? 1 : 0)));
  EXPECT_TRUE(
      IsError(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size()),
              MOERT_ERR_INVALID_STATE, {"eval mode, check_finite, ep_chunks or ep_overlap"}));
  ASSERT_TRUE(IsOk(moert_session_set_eval(s.get(), 0)));
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "ep_overlap", odd ? "false" : "true")));
  EXPECT_TRUE(
      IsError(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size()),
              MOERT_ERR_INVALID_STATE, {"eval mode, check_finite, ep_chunks or ep_overlap"}));
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "ep_overlap", "true")));
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "check_finite", odd ? "false" : "true")));
  EXPECT_TRUE(
      IsError(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size()),
              MOERT_ERR_INVALID_STATE, {"eval mode, check_finite, ep_chunks or ep_overlap"}));
  ASSERT_TRUE(IsOk(moert_session_set_config(s.get(), "check_finite", "true")));
  const std::string dir = ::testing::TempDir();
  const std::string a = dir + "diverge_a_" + std::to_string(g_size) + ".moert";
  const std::string b = dir + "diverge_b_" + std::to_string(g_size) + ".moert";
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), a.c_str())));
  ASSERT_TRUE(
      IsOk(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size())));
  ASSERT_TRUE(IsOk(moert_session_backward_loss(s.get(), targets.data(), n, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), b.c_str())));
  EXPECT_TRUE(IsError(moert_session_load(s.get(), odd ? a.c_str() : b.c_str()),
                      MOERT_ERR_INVALID_STATE, {"the checkpoint it read"}));
  // Nothing was loaded: saving again writes b's bytes.
  const std::string c = dir + "diverge_c_" + std::to_string(g_size) + ".moert";
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), c.c_str())));
  if (g_rank == 0) {
    std::ifstream fb(b, std::ios::binary), fc(c, std::ios::binary);
    const std::string sb((std::istreambuf_iterator<char>(fb)), {}),
        sc((std::istreambuf_iterator<char>(fc)), {});
    EXPECT_FALSE(sb.empty());
    EXPECT_EQ(sb, sc);
  }
}

// A replicated parameter written on one rank only: the step is refused on every rank with
// MOERT_ERR_INVALID_STATE, naming that rank, and changes nothing; written alike on every rank,
// the step goes on and the replicas stay bitwise the same.
TEST(SessionMpi, AParameterWrittenOnOneRankOnlyRefusesTheStepEverywhere) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ModelPtr m = load(token_model(1));
  SessionPtr s = session(m.get(), true, g_size, true);
  const char* name = nullptr;
  uint64_t numel = 0;
  ASSERT_TRUE(IsOk(moert_session_parameter_info(s.get(), 0, &name, &numel)));
  const std::string param = name;
  const int64_t n = 64;
  std::vector<int32_t> tokens(n), targets(n);
  for (int64_t i = 0; i < n; ++i) {
    tokens[i] = static_cast<int32_t>((i * 7 + g_rank) % 16);
    targets[i] = static_cast<int32_t>((i * 5 + 3) % 16);
  }
  std::vector<float> out(n * 16);
  auto pass = [&] {
    ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
    ASSERT_TRUE(
        IsOk(moert_session_forward_tokens(s.get(), tokens.data(), n, n, out.data(), out.size())));
    double loss = 0.0;
    ASSERT_TRUE(IsOk(moert_session_backward_loss(s.get(), targets.data(), n, &loss)));
  };
  auto read = [&] {
    std::vector<float> v(numel);
    EXPECT_TRUE(IsOk(moert_session_get_parameter(s.get(), param.c_str(), v.data(), numel)));
    return v;
  };
  const std::vector<float> written(numel, 0.125f);
  pass();
  if (g_rank == 1) {
    ASSERT_TRUE(IsOk(moert_session_set_parameter(s.get(), param.c_str(), written.data(), numel)));
  }
  const std::vector<float> before = read();
  moert_status* st = moert_session_step(s.get(), nullptr, nullptr);
  ASSERT_NE(st, nullptr);
  const std::string msg = moert_status_message(st);
  EXPECT_EQ(moert_status_code(st), MOERT_ERR_INVALID_STATE) << msg;
  moert_status_free(st);
  EXPECT_NE(msg.find("rank 1 of " + std::to_string(g_size) + " wrote other tensors"),
            std::string::npos)
      << msg;
  EXPECT_TRUE(same(read(), before));
  ASSERT_TRUE(IsOk(moert_session_set_parameter(s.get(), param.c_str(), written.data(), numel)));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
  // Every rank's copy against rank 0's.
  const std::vector<float> mine = read();
  std::vector<double> as_double(mine.begin(), mine.end()), sum = as_double;
  ASSERT_TRUE(IsOk(moert_comm_all_reduce_sum(g_comm, sum.data(), sum.size())));
  for (size_t i = 0; i < sum.size(); ++i)
    ASSERT_EQ(sum[i], as_double[i] * g_size) << "rank " << g_rank << " element " << i;
}

// A kernel that fails on one rank in the middle of a pass (an FP8 quantizer meeting a NaN, with
// check_finite off) must not leave the other ranks waiting in the layer's exchanges until the
// communicator times out, nor break it: the failing rank finishes the pass's exchanges and every
// rank fails the call with MOERT_ERR_NUMERIC at once (a rank whose quantizer met the NaN row after
// it travelled there names it in its expert's rows, the others name rank 1's row or rank 1).
// A failed forward is discarded; a failed backward leaves the step refused until zero_grad, as in
// one process; the job then trains on as if nothing had happened.
TEST(SessionMpi, AKernelFailureOnOneRankFailsEveryRankAtOnce) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  // Long enough for the slowest CI machine, short enough that a wait for the failed rank fails
  // the test well before the job's own limit (the default is 600 s).
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 60.0)));
  ModelPtr m = load(hidden_baseline());
  const std::vector<std::pair<const char*, const char*>> knobs = {{"precision", "fp8"},
                                                                  {"check_finite", "false"}};
  for (int ep : layouts()) {
    SCOPED_TRACE("ep " + std::to_string(ep));
    SessionPtr s = session(m.get(), true, ep, true, knobs);
    SessionPtr clean = session(m.get(), true, ep, true, knobs);
    const int64_t n = 64;
    std::vector<float> x(n * 8), out(n * 16), want(n * 16), dy(n * 16);
    for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>((i * 7 + g_rank) % 23);
    for (size_t i = 0; i < dy.size(); ++i) dy[i] = 0.02f * static_cast<float>((i * 3) % 11) - 0.1f;
    std::vector<float> bad_x = x, bad_dy = dy;
    if (g_rank == 1) {
      bad_x[3 * 8 + 2] = std::numeric_limits<float>::quiet_NaN();
      bad_dy[5 * 16 + 1] = std::numeric_limits<float>::quiet_NaN();
    }
    const auto start = std::chrono::steady_clock::now();
    EXPECT_TRUE(IsError(
        moert_session_forward_hidden(s.get(), bad_x.data(), n * 8, n, out.data(), out.size()),
        MOERT_ERR_NUMERIC, {"NaN"}));
    // Nothing of the pass is kept: no backward may read it, no counts were taken.
    EXPECT_TRUE(IsError(moert_session_backward(s.get(), dy.data(), dy.size(), nullptr, 0, nullptr),
                        MOERT_ERR_INVALID_STATE));
    std::vector<int64_t> counts(4, -1);
    ASSERT_TRUE(IsOk(moert_session_expert_counts(s.get(), 1, MOERT_COUNTS_STEP, counts.data(), 4)));
    EXPECT_EQ(counts, std::vector<int64_t>(4, 0));
    ASSERT_TRUE(
        IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size())));
    EXPECT_TRUE(
        IsError(moert_session_backward(s.get(), bad_dy.data(), dy.size(), nullptr, 0, nullptr),
                MOERT_ERR_NUMERIC, {"NaN"}));
    EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_NUMERIC));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, 30.0) << "a rank waited for the failing one";
    ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
    for (moert_session* t : {s.get(), clean.get()}) {
      ASSERT_TRUE(
          IsOk(moert_session_forward_hidden(t, x.data(), n * 8, n, out.data(), out.size())));
      ASSERT_TRUE(IsOk(moert_session_backward(t, dy.data(), dy.size(), nullptr, 0, nullptr)));
      ASSERT_TRUE(IsOk(moert_session_step(t, nullptr, nullptr)));
    }
    ASSERT_TRUE(
        IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size())));
    ASSERT_TRUE(IsOk(
        moert_session_forward_hidden(clean.get(), x.data(), n * 8, n, want.data(), want.size())));
    EXPECT_TRUE(same(out, want));
  }
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 600.0)));
}

// An overflow among ranks, check_finite on, in fp8: every rank fails the forward at once, naming
// the layer. Through a norm weight of `scale` on column 3, the row of rank 1 whose column 3 is not
// zero overflows: with 1e25 the MoE layer's activation overflows inside it; with 3e38 the norm's
// own output does, which among ranks does not stop the pass there, and the MoE layer's quantizer
// then meets it (on whichever rank holds its experts). The routed experts' rows came from every
// rank: their message counts them as the FFN's and claims no cause (one process names the
// caller's row and the cause: Fp8Overflow.*).
TEST(SessionMpi, AnFp8OverflowOnOneRankFailsEveryRankNamingTheLayer) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 60.0)));
  const std::vector<std::pair<const char*, const char*>> knobs = {{"precision", "fp8"}};
  for (const float scale : {1e25f, 3e38f}) {
    ModelDesc d = hidden_baseline();
    std::vector<float> norm(8, 1.0f);
    norm[3] = scale;
    d.layers[0].rmsnorm.weight = TensorDesc::f32(norm);
    ModelPtr m = load(d);
    for (int ep : layouts()) {
      SCOPED_TRACE("scale " + std::to_string(scale) + ", ep " + std::to_string(ep));
      SessionPtr s = session(m.get(), true, ep, true, knobs);
      const int64_t n = 6;
      std::vector<float> x(n * 8), out(n * 16);
      for (size_t i = 0; i < x.size(); ++i)
        x[i] = i % 8 == 3 ? 0.0f : std::sin(0.3f * static_cast<float>(i + 7 * g_rank));
      if (g_rank == 1) x[4 * 8 + 3] = 1.0f;
      moert_status* st =
          moert_session_forward_hidden(s.get(), x.data(), x.size(), n, out.data(), out.size());
      ASSERT_NE(st, nullptr);
      EXPECT_EQ(moert_status_code(st), MOERT_ERR_NUMERIC);
      const std::string msg = moert_status_message(st);
      moert_status_free(st);
      EXPECT_TRUE(msg.find("layer 1 ('moe0', MoE): FP8 quantization of the FFN") !=
                      std::string::npos ||
                  (scale > 1e30f && msg.find("layer 0 ('norm0', RMSNorm): its output holds a NaN "
                                             "or infinity") != std::string::npos))
          << msg;
      EXPECT_EQ(msg.find("is finite,"), std::string::npos) << msg;
      // The pass is discarded everywhere and the job goes on.
      x[4 * 8 + 3] = 0.0f;
      EXPECT_TRUE(IsOk(
          moert_session_forward_hidden(s.get(), x.data(), x.size(), n, out.data(), out.size())));
    }
  }
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 600.0)));
}

// Sets g_allocation_limit for the scope.
class AllocationLimit {
 public:
  explicit AllocationLimit(size_t bytes) { g_allocation_limit = bytes; }
  ~AllocationLimit() { g_allocation_limit = 0; }
  AllocationLimit(const AllocationLimit&) = delete;
  AllocationLimit& operator=(const AllocationLimit&) = delete;
};

// A layer outside the experts failing on one rank (a dense FFN that cannot allocate its hidden
// activations, between two MoE layers) is held like an expert's failure: the rank makes the rest
// of the pass's exchanges and every rank fails the call with MOERT_ERR_OUT_OF_MEMORY at once,
// the communicator intact. Forward and backward; then the job trains on as one that never failed.
TEST(SessionMpi, AnAllocationFailureOutsideTheExpertsFailsEveryRankAtOnce) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  if (!kAllocationLimits) GTEST_SKIP() << "the sanitizers replace operator new themselves";
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 60.0)));
  ModelDesc d = hidden_baseline();
  // 256 rows x 2048 hidden: 2 MiB per hidden activation, against allocations failing from 1 MiB.
  d.layers.insert(d.layers.begin() + 2, dense_layer("ffn", 8, 2048));
  d.layers.insert(d.layers.begin() + 3, moe_layer("moe1", 8));
  ModelPtr m = load(d);
  const size_t limit = 1u << 20;
  const int64_t n = 256;
  std::vector<float> x(n * 8), out(n * 16), want(n * 16), dy(n * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>((i * 7 + g_rank) % 23);
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = 0.02f * static_cast<float>((i * 3) % 11) - 0.1f;
  // One training step, then the output of the trained session.
  const auto train = [&](moert_session* t, std::vector<float>& result) {
    std::vector<float> first(result.size());
    ASSERT_TRUE(
        IsOk(moert_session_forward_hidden(t, x.data(), n * 8, n, first.data(), first.size())));
    ASSERT_TRUE(IsOk(moert_session_backward(t, dy.data(), dy.size(), nullptr, 0, nullptr)));
    ASSERT_TRUE(IsOk(moert_session_step(t, nullptr, nullptr)));
    ASSERT_TRUE(
        IsOk(moert_session_forward_hidden(t, x.data(), n * 8, n, result.data(), result.size())));
  };
  const char* named = g_rank == 1 ? "memory" : "rank 1";
  for (int ep : layouts()) {
    SCOPED_TRACE("ep " + std::to_string(ep));
    {
      SessionPtr s = session(m.get(), true, ep, true);
      const auto start = std::chrono::steady_clock::now();
      {
        const AllocationLimit cap(g_rank == 1 ? limit : 0);
        EXPECT_TRUE(IsError(
            moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size()),
            MOERT_ERR_OUT_OF_MEMORY, {named, "2097152 bytes"}));
      }
      EXPECT_TRUE(
          IsError(moert_session_backward(s.get(), dy.data(), dy.size(), nullptr, 0, nullptr),
                  MOERT_ERR_INVALID_STATE));
      ASSERT_TRUE(
          IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size())));
      {
        // The backward's Wgrad operands need as much again as the forward kept, their rows
        // padded to 2064 floats (the fp32 Wgrad's row stride, wgrad_ld in cpu_ffn.cc).
        const AllocationLimit cap(g_rank == 1 ? limit : 0);
        EXPECT_TRUE(
            IsError(moert_session_backward(s.get(), dy.data(), dy.size(), nullptr, 0, nullptr),
                    MOERT_ERR_OUT_OF_MEMORY, {named, "2113536 bytes"}));
      }
      EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_OUT_OF_MEMORY,
                          {"zero_grad"}));
      ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
      // The pass's own buffers (inputs, activations, the loss gradient: 8 KiB and more here) are
      // sized in its opening agreement, so a rank that cannot have them fails every rank there:
      // twice the rows need larger ones.
      {
        const AllocationLimit cap(g_rank == 1 ? 8192 : 0);
        std::vector<float> x2(2 * x.size()), out2(2 * out.size());
        EXPECT_TRUE(IsError(moert_session_forward_hidden(s.get(), x2.data(), x2.size(), 2 * n,
                                                         out2.data(), out2.size()),
                            MOERT_ERR_OUT_OF_MEMORY, {named}));
      }
      ASSERT_TRUE(
          IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size())));
      {
        const AllocationLimit cap(g_rank == 1 ? 8192 : 0);
        std::vector<int32_t> targets(static_cast<size_t>(n));
        for (size_t i = 0; i < targets.size(); ++i) targets[i] = static_cast<int32_t>(i % 16);
        EXPECT_TRUE(
            IsError(moert_session_backward_loss(s.get(), targets.data(), targets.size(), nullptr),
                    MOERT_ERR_OUT_OF_MEMORY, {named}));
      }
      // The optimizer's moments too (the first step makes them): no rank steps.
      ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
      ASSERT_TRUE(
          IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size())));
      ASSERT_TRUE(IsOk(moert_session_backward(s.get(), dy.data(), dy.size(), nullptr, 0, nullptr)));
      {
        const AllocationLimit cap(g_rank == 1 ? 8192 : 0);
        EXPECT_TRUE(IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_OUT_OF_MEMORY,
                            {named}));
      }
      uint64_t steps = 7;
      ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &steps)));
      EXPECT_EQ(steps, 0u);
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_LT(seconds, 30.0) << "a rank waited for the failing one";
      ASSERT_TRUE(IsOk(moert_session_zero_grad(s.get())));
      train(s.get(), out);
    }
    SessionPtr clean = session(m.get(), true, ep, true);
    train(clean.get(), want);
    EXPECT_TRUE(same(out, want));
  }
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 600.0)));
}

// A gradient that only a checkpoint brought (written with set_gradient before it was saved, no
// micro-batch since) is stepped on after a load; the moments that step makes are made inside the
// step's agreement too, so a rank that cannot have them fails every rank at once instead of
// leaving the others to update alone and wait.
TEST(SessionMpi, MomentsForAGradientACheckpointBroughtFailEveryRankAtOnce) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  if (!kAllocationLimits) GTEST_SKIP() << "the sanitizers replace operator new themselves";
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 60.0)));
  ModelDesc d = hidden_baseline();
  d.layers.insert(d.layers.begin() + 2, dense_layer("ffn", 8, 2048));  // w1: 64 KiB
  ModelPtr m = load(d);
  std::vector<float> grad(2048 * 8);
  for (size_t i = 0; i < grad.size(); ++i) grad[i] = 0.001f * static_cast<float>(i % 17) - 0.008f;
  const char* named = g_rank == 1 ? "memory" : "rank 1";
  for (int ep : layouts()) {
    SCOPED_TRACE("ep " + std::to_string(ep));
    SessionPtr writer = session(m.get(), true, ep, true);
    ASSERT_TRUE(IsOk(moert_session_set_gradient(writer.get(), "ffn.w1", grad.data(), grad.size())));
    const std::string path = ::testing::TempDir() + "checkpoint_gradient_" +
                             std::to_string(g_size) + "_" + std::to_string(ep) + ".moert";
    ASSERT_TRUE(IsOk(moert_session_save(writer.get(), path.c_str())));
    SessionPtr s = session(m.get(), true, ep, true);
    ASSERT_TRUE(IsOk(moert_session_load(s.get(), path.c_str())));
    const auto start = std::chrono::steady_clock::now();
    {
      const AllocationLimit cap(g_rank == 1 ? 8192 : 0);
      EXPECT_TRUE(
          IsError(moert_session_step(s.get(), nullptr, nullptr), MOERT_ERR_OUT_OF_MEMORY, {named}));
    }
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 30.0)
        << "a rank waited for the failing one";
    uint64_t steps = 7;
    ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &steps)));
    EXPECT_EQ(steps, 0u);
    // Then the step is made, as the writer makes it from the gradient it wrote.
    ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
    ASSERT_TRUE(IsOk(moert_session_step(writer.get(), nullptr, nullptr)));
    std::vector<float> got(grad.size()), want(grad.size());
    ASSERT_TRUE(IsOk(moert_session_get_parameter(s.get(), "ffn.w1", got.data(), got.size())));
    ASSERT_TRUE(
        IsOk(moert_session_get_parameter(writer.get(), "ffn.w1", want.data(), want.size())));
    EXPECT_TRUE(same(got, want));
    std::remove(path.c_str());
  }
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 600.0)));
}

// A MoE layer's own buffers are sized by its routing, in the middle of a pass: a rank that cannot
// have them fails every rank in one agreement before any row travels (forward), or in the call's
// opening agreement (backward), instead of leaving the others waiting in the exchanges. Every
// token picks all 4 experts, so that every layout gives each rank 1024 assignments.
TEST(SessionMpi, AMoELayerThatCannotSizeItsExchangesFailsEveryRankAtOnce) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  if (!kAllocationLimits) GTEST_SKIP() << "the sanitizers replace operator new themselves";
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 60.0)));
  ModelDesc d = every_expert_model();
  d.layers[1].moe.expert_hidden = 2048;
  ModelPtr m = load(d);
  const int64_t n = 256;
  std::vector<float> x(n * 8), out(n * 16), want(n * 16), dy(n * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>((i * 5 + g_rank) % 19);
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = 0.02f * static_cast<float>((i * 3) % 13) - 0.1f;
  const auto forward = [&](moert_session* s, std::vector<float>& y) {
    return moert_session_forward_hidden(s, x.data(), x.size(), n, y.data(), y.size());
  };
  const auto backward = [&](moert_session* s) {
    return moert_session_backward(s, dy.data(), dy.size(), nullptr, 0, nullptr);
  };
  const char* named = g_rank == 1 ? "memory" : "rank 1";
  for (int ep : layouts()) {
    SCOPED_TRACE("ep " + std::to_string(ep));
    SessionPtr s = session(m.get(), true, ep, true);
    const auto start = std::chrono::steady_clock::now();
    {
      // The experts' pre-activations, kept for backward: 1024 x 2048 floats.
      const AllocationLimit cap(g_rank == 1 ? 1u << 20 : 0);
      EXPECT_TRUE(
          IsError(forward(s.get(), out), MOERT_ERR_OUT_OF_MEMORY, {named, "8388608 bytes"}));
    }
    EXPECT_TRUE(IsError(backward(s.get()), MOERT_ERR_INVALID_STATE));
    ASSERT_TRUE(IsOk(forward(s.get(), out)));
    {
      // The first backward's exchange buffers: the experts' 1024 x 8 input gradients (32 KiB)
      // among them; the session's own (16 KiB) fit.
      const AllocationLimit cap(g_rank == 1 ? 24u << 10 : 0);
      EXPECT_TRUE(IsError(backward(s.get()), MOERT_ERR_OUT_OF_MEMORY, {named, "32768 bytes"}));
    }
    // Refused in its opening agreement, the backward changed nothing: it may be retried.
    ASSERT_TRUE(IsOk(backward(s.get())));
    ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
    ASSERT_TRUE(IsOk(forward(s.get(), out)));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, 30.0) << "a rank waited for the failing one";
    SessionPtr clean = session(m.get(), true, ep, true);
    ASSERT_TRUE(IsOk(forward(clean.get(), want)));
    ASSERT_TRUE(IsOk(backward(clean.get())));
    ASSERT_TRUE(IsOk(moert_session_step(clean.get(), nullptr, nullptr)));
    ASSERT_TRUE(IsOk(forward(clean.get(), want)));
    EXPECT_TRUE(same(out, want));
  }
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 600.0)));
}

// A rank whose communicator cannot allocate the staging buffers of an exchange (MPI moves data
// through buffers of its own) says so in the exchange's agreement, before any data moves: every
// rank fails the call with MOERT_ERR_OUT_OF_MEMORY naming it, and the communicator stays whole.
// It broke before (MOERT_ERR_COMM on every rank, for good).
TEST(SessionMpi, ARankOutOfMemoryForItsStagingBuffersFailsEveryRankAndKeepsTheCommunicator) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  if (!kAllocationLimits) GTEST_SKIP() << "the sanitizers replace operator new themselves";
  ModelPtr m = load(hidden_baseline());
  SessionPtr s = session(m.get(), false, g_size, true);
  const int64_t small = 16, n = 8192;
  std::vector<float> x(n * 8), want(n * 16), out(n * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  ASSERT_TRUE(IsOk(
      moert_session_forward_hidden(s.get(), x.data(), small * 8, small, out.data(), small * 16)));
  ASSERT_TRUE(
      IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, want.data(), want.size())));
  // The staging pool keeps what the passes above used: a pass of more rows needs new buffers.
  const int64_t more = 4 * n;
  std::vector<float> x_more(more * 8), out_more(more * 16);
  for (size_t i = 0; i < x_more.size(); ++i) x_more[i] = x[i % x.size()];
  const bool starved = g_rank == g_size - 1;
  if (starved) g_array_limit = 64 << 10;
  moert_status* st = moert_session_forward_hidden(s.get(), x_more.data(), x_more.size(), more,
                                                  out_more.data(), out_more.size());
  g_array_limit = 0;
  const std::string own = "on rank " + std::to_string(g_rank) + ": out of memory for its";
  const std::string want_msg = starved ? own : "ran out of memory for its staging";
  EXPECT_TRUE(IsError(st, MOERT_ERR_OUT_OF_MEMORY, {want_msg, "the communicator stays usable"}));
  ASSERT_TRUE(
      IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size())));
  EXPECT_TRUE(same(out, want));
  ASSERT_TRUE(IsOk(moert_session_forward_hidden(s.get(), x_more.data(), x_more.size(), more,
                                                out_more.data(), out_more.size())));
  // Two ranks starved at once: each names itself (the others learn of the higher one).
  const int64_t most = 2 * more;
  std::vector<float> x_most(most * 8), out_most(most * 16);
  for (size_t i = 0; i < x_most.size(); ++i) x_most[i] = x[i % x.size()];
  const bool also_starved = g_rank >= g_size - 2;
  if (also_starved) g_array_limit = 64 << 10;
  st = moert_session_forward_hidden(s.get(), x_most.data(), x_most.size(), most, out_most.data(),
                                    out_most.size());
  g_array_limit = 0;
  EXPECT_TRUE(IsError(st, MOERT_ERR_OUT_OF_MEMORY,
                      {also_starved ? own : "ran out of memory for its staging"}));
  ASSERT_TRUE(IsOk(moert_session_forward_hidden(s.get(), x_most.data(), x_most.size(), most,
                                                out_most.data(), out_most.size())));
}

// The host memory a MoE layer fills once rows travel (its slots' tokens and weights, of the
// routing's size) is sized with its buffers before the layer's agreement: a rank that cannot have
// it fails every rank at once. The last rank feeds 64 rows and computes the experts of its shard
// for every rank's rows: its slots (4 x 32 KiB floats at 2 ranks) need memory its own routing
// does not. Before, it failed alone after the rows had left, and the others waited for the timeout.
TEST(SessionMpi, AHostBufferOfTheRoutingsSizeThatCannotBeHadFailsEveryRankAtOnce) {
  if (g_size == 1) GTEST_SKIP() << "needs two ranks or more";
  if (!kAllocationLimits) GTEST_SKIP() << "the sanitizers replace operator new themselves";
  ASSERT_TRUE(IsOk(moert_comm_set_timeout(g_comm, 60.0)));
  // Every expert: each rank's slots are its shard's share of every row.
  ModelPtr m = load(every_expert_model());
  const bool last = g_rank == g_size - 1;
  const int64_t n = last ? 64 : 32768;
  std::vector<float> x(n * 8), out(n * 16), want(n * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.11f * static_cast<float>(i + g_rank));
  SessionPtr s = session(m.get(), false, g_size, true);
  // The session's first pass: the layer has sized nothing yet.
  const auto start = std::chrono::steady_clock::now();
  if (last) g_host_limit = 64 << 10;
  moert_status* st =
      moert_session_forward_hidden(s.get(), x.data(), x.size(), n, out.data(), out.size());
  g_host_limit = 0;
  const std::string named = "rank " + std::to_string(g_size - 1);
  EXPECT_TRUE(IsError(st, MOERT_ERR_OUT_OF_MEMORY, {last ? "memory" : named.c_str()}));
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 30.0)
      << "a rank waited for the failing one";
  ASSERT_TRUE(
      IsOk(moert_session_forward_hidden(s.get(), x.data(), x.size(), n, out.data(), out.size())));
  SessionPtr clean = session(m.get(), false, g_size, true);
  ASSERT_TRUE(IsOk(
      moert_session_forward_hidden(clean.get(), x.data(), x.size(), n, want.data(), want.size())));
  EXPECT_TRUE(same(out, want));
}

// The profile: zero alone; among ranks the experts' compute and the waits are counted, overlap
// or not, and moert_session_reset_metrics() zeroes them.
TEST(SessionMpi, ProfileCountsTheExchanges) {
  ModelPtr m = load(hidden_baseline());
  const int64_t n = 64;
  std::vector<float> x(n * 8, 0.5f), out(n * 16);
  double p[MOERT_PROFILE_COUNT + 1] = {-1, -1, -1, -1, 7};
  SessionPtr alone = session(m.get(), false, 1, false);
  ASSERT_TRUE(
      IsOk(moert_session_forward_hidden(alone.get(), x.data(), n * 8, n, out.data(), out.size())));
  ASSERT_TRUE(IsOk(moert_session_profile(alone.get(), p, MOERT_PROFILE_COUNT + 1)));
  for (int i = 0; i < MOERT_PROFILE_COUNT; ++i) EXPECT_EQ(p[i], 0.0);
  EXPECT_EQ(p[MOERT_PROFILE_COUNT], 7);
  EXPECT_TRUE(IsError(moert_session_profile(alone.get(), p, MOERT_PROFILE_COUNT - 1),
                      MOERT_ERR_INVALID_ARGUMENT, {"4 figures"}));
  if (g_size == 1) return;
  for (const char* overlap : {"true", "false"}) {
    SessionPtr s = session(m.get(), false, g_size, true, {{"ep_overlap", overlap}});
    ASSERT_TRUE(
        IsOk(moert_session_forward_hidden(s.get(), x.data(), n * 8, n, out.data(), out.size())));
    ASSERT_TRUE(IsOk(moert_session_profile(s.get(), p, MOERT_PROFILE_COUNT)));
    EXPECT_GT(p[MOERT_PROFILE_EXPERTS], 0.0) << overlap;
    EXPECT_GE(p[MOERT_PROFILE_DISPATCH], 0.0);
    EXPECT_GE(p[MOERT_PROFILE_COMBINE], 0.0);
    ASSERT_TRUE(IsOk(moert_session_reset_metrics(s.get())));
    ASSERT_TRUE(IsOk(moert_session_profile(s.get(), p, MOERT_PROFILE_COUNT)));
    for (int i = 0; i < MOERT_PROFILE_COUNT; ++i) EXPECT_EQ(p[i], 0.0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  moert_status* st = moert_comm_create_mpi(nullptr, &g_comm);
  if (st) {
    std::fprintf(stderr, "moert_comm_create_mpi: %s\n", moert_status_message(st));
    return 1;
  }
  moert_status_free(moert_comm_rank(g_comm, &g_rank));
  moert_status_free(moert_comm_size(g_comm, &g_size));
  const int rc = parallel_test::run_tests_on_every_rank(g_comm, g_rank);
  moert_comm_free(g_comm);
  return rc;
}
