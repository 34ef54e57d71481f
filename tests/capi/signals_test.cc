// The host's signals through the C ABI (moert.h, Signals), as an embedding host meets them: a
// profiler's SIGPROF timer while several host threads run sessions, a batcher and a training
// session on a model whose GEMMs reach oneDNN's generated kernels (oneDNN issue 4845). Results stay
// bit for bit the signal-free ones, every call (failing ones included) hands the caller's mask
// back, and moert's own threads never take a process-directed signal. Bounded to about 2 s.
#include <pthread.h>
#include <signal.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "capi_test_util.h"

namespace {

using capi_test::IsOk;

// Beside the tiny example model; its GEMMs (512 x 1024 experts) are large enough for oneDNN's
// generated kernels.
const std::string kModel =
    (std::filesystem::path(MOERT_EXAMPLE_MODEL).parent_path() / "serve_bench.moert").string();

std::atomic<long> ticks{0};
std::atomic<int> taken_elsewhere{0};

// Runs `call` under a host mask of its own (SIGUSR2 blocked, SIGPROF open) and reports whether the
// mask came back unchanged; the call's status goes to *status.
bool keeps_mask(const std::function<moert_status*()>& call, moert_status** status) {
  sigset_t host, after;
  sigemptyset(&host);
  sigaddset(&host, SIGUSR2);
  pthread_sigmask(SIG_SETMASK, &host, nullptr);
  *status = call();
  pthread_sigmask(SIG_SETMASK, nullptr, &after);
  for (int s = 1; s < SIGRTMIN; ++s)
    if (sigismember(&host, s) != sigismember(&after, s)) return false;
  return true;
}

moert_session* new_session(moert_model* model, uint32_t threads, const char* precision,
                           bool training) {
  moert_session_options* o = nullptr;
  EXPECT_TRUE(IsOk(moert_session_options_create(&o)));
  EXPECT_TRUE(IsOk(moert_session_options_set_threads(o, threads)));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "precision", precision)));
  if (training) {
    EXPECT_TRUE(IsOk(moert_session_options_set_mode(o, MOERT_MODE_TRAINING)));
  }
  moert_session* s = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model, o, &s)));
  moert_session_options_free(o);
  return s;
}

std::vector<int32_t> tokens(int seed, uint64_t rows) {
  std::vector<int32_t> t(rows);
  for (uint64_t i = 0; i < rows; ++i) t[i] = static_cast<int32_t>((i * 131 + seed * 977) % 1024);
  return t;
}

struct Forward {
  uint32_t threads;
  const char* precision;
  uint64_t rows;
};

class Signals : public testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(IsOk(moert_model_load_file(kModel.c_str(), &model_)));
    int32_t kind = 0;
    uint32_t in = 0;
    ASSERT_TRUE(IsOk(moert_model_io(model_, &kind, &in, &width_)));
    ASSERT_EQ(in, 1u);
  }
  void TearDown() override { moert_model_free(model_); }

  // One call's output; every call is checked to hand the mask back, bad inputs included.
  std::vector<float> forward(moert_session* s, const Forward& f, int seed) {
    const std::vector<int32_t> t = tokens(seed, f.rows);
    std::vector<float> out(f.rows * width_);
    moert_status* st = nullptr;
    if (!keeps_mask(
            [&] {
              return moert_session_forward_tokens(s, t.data(), t.size(), f.rows, out.data(),
                                                  out.size());
            },
            &st))
      ++mask_lost_;
    EXPECT_TRUE(IsOk(st));
    std::vector<int32_t> bad = t;
    bad[0] = 1 << 20;  // outside the vocabulary
    if (!keeps_mask(
            [&] {
              return moert_session_forward_tokens(s, bad.data(), bad.size(), f.rows, out.data(),
                                                  out.size());
            },
            &st))
      ++mask_lost_;
    EXPECT_NE(st, nullptr);
    moert_status_free(st);
    return out;
  }

  // Every parameter after `steps` optimizer steps of a fresh training session.
  std::vector<float> train(int steps) {
    moert_session* s = new_session(model_, 2, "fp32", true);
    const uint64_t rows = 32;
    for (int k = 0; k < steps; ++k) {
      const std::vector<int32_t> t = tokens(100 + k, rows), target = tokens(200 + k, rows);
      std::vector<float> out(rows * width_);
      moert_status* st = nullptr;
      const std::function<moert_status*()> calls[] = {
          [&] { return moert_session_zero_grad(s); },
          [&] {
            return moert_session_forward_tokens(s, t.data(), t.size(), rows, out.data(),
                                                out.size());
          },
          [&] { return moert_session_backward_loss(s, target.data(), rows, nullptr); },
          [&] { return moert_session_step(s, nullptr, nullptr); }};
      for (const auto& call : calls) {
        if (!keeps_mask(call, &st)) ++mask_lost_;
        EXPECT_TRUE(IsOk(st));
      }
    }
    uint32_t n = 0;
    EXPECT_TRUE(IsOk(moert_session_num_parameters(s, &n)));
    std::vector<float> all;
    for (uint32_t i = 0; i < n; ++i) {
      const char* name = nullptr;
      uint64_t numel = 0;
      EXPECT_TRUE(IsOk(moert_session_parameter_info(s, i, &name, &numel)));
      std::vector<float> p(numel);
      EXPECT_TRUE(IsOk(moert_session_get_parameter(s, name, p.data(), numel)));
      all.insert(all.end(), p.begin(), p.end());
    }
    moert_session_free(s);
    return all;
  }

  moert_model* model_ = nullptr;
  uint32_t width_ = 0;
  std::atomic<int> mask_lost_{0};
};

TEST_F(Signals, AProfilerTimerChangesNoResultAndEveryCallKeepsTheCallersMask) {
  const Forward jobs[] = {{1, "fp32", 64}, {2, "fp32", 48}, {1, "bf16", 32}, {2, "fp8", 32}};
  std::vector<std::vector<float>> expect;
  for (size_t j = 0; j < std::size(jobs); ++j) {
    moert_session* s = new_session(model_, jobs[j].threads, jobs[j].precision, false);
    expect.push_back(forward(s, jobs[j], static_cast<int>(j)));
    moert_session_free(s);
  }
  constexpr int kSteps = 2;
  const std::vector<float> trained = train(kSteps);
  moert_batcher* batcher = nullptr;
  ASSERT_TRUE(IsOk(moert_batcher_create(model_, nullptr, &batcher)));

  struct sigaction tick {
  }, previous{};
  tick.sa_handler = [](int) { ticks.fetch_add(1, std::memory_order_relaxed); };
  tick.sa_flags = 0;  // no SA_RESTART: interrupted waits must be retried by the library
  sigemptyset(&tick.sa_mask);
  ASSERT_EQ(sigaction(SIGPROF, &tick, &previous), 0);
  const itimerval every_100us{{0, 100}, {0, 100}}, off{};
  ASSERT_EQ(setitimer(ITIMER_PROF, &every_100us, nullptr), 0);

  std::atomic<int> differ{0};
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500);
  std::vector<std::thread> hosts;
  for (size_t j = 0; j < std::size(jobs); ++j)
    hosts.emplace_back([&, j] {
      moert_session* s = new_session(model_, jobs[j].threads, jobs[j].precision, false);
      while (std::chrono::steady_clock::now() < until)
        if (forward(s, jobs[j], static_cast<int>(j)) != expect[j]) ++differ;
      moert_session_free(s);
    });
  hosts.emplace_back([&] {
    // A request alone in its pass is bit for bit the solo call (moert.h, Batching).
    const Forward one{1, "fp32", 64};
    const std::vector<int32_t> t = tokens(0, one.rows);
    while (std::chrono::steady_clock::now() < until) {
      std::vector<float> out(one.rows * width_);
      moert_status* st = nullptr;
      if (!keeps_mask(
              [&] {
                return moert_batcher_forward_tokens(batcher, t.data(), t.size(), one.rows,
                                                    out.data(), out.size(), nullptr, 0);
              },
              &st))
        ++mask_lost_;
      EXPECT_TRUE(IsOk(st));
      if (out != expect[0]) ++differ;
    }
  });
  hosts.emplace_back([&] {
    while (std::chrono::steady_clock::now() < until)
      if (train(kSteps) != trained) ++differ;
  });
  for (auto& h : hosts) h.join();
  setitimer(ITIMER_PROF, &off, nullptr);
  sigaction(SIGPROF, &previous, nullptr);
  moert_batcher_free(batcher);

  EXPECT_GT(ticks.load(), 100) << "the timer hardly fired: the test proved nothing";
  EXPECT_EQ(differ.load(), 0) << "a result changed under signals";
  EXPECT_EQ(mask_lost_.load(), 0) << "a call did not hand the caller's signal mask back";
}

TEST_F(Signals, TheLibrarysThreadsTakeNoProcessDirectedSignal) {
  // A session's pool workers and a batcher's threads exist; this thread declines SIGUSR1, so a
  // signal sent to the process must stay pending rather than reach one of them.
  moert_session* s = new_session(model_, 4, "fp32", false);
  moert_batcher* batcher = nullptr;
  ASSERT_TRUE(IsOk(moert_batcher_create(model_, nullptr, &batcher)));
  taken_elsewhere = 0;
  struct sigaction count_it {
  }, previous{}, ignore{};
  count_it.sa_handler = [](int) { taken_elsewhere.fetch_add(1); };
  sigaction(SIGUSR1, &count_it, &previous);
  sigset_t usr1, saved;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, &saved);
  for (int i = 0; i < 20; ++i) kill(getpid(), SIGUSR1);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ignore.sa_handler = SIG_IGN;  // discards the pending signal
  sigaction(SIGUSR1, &ignore, nullptr);
  pthread_sigmask(SIG_SETMASK, &saved, nullptr);
  sigaction(SIGUSR1, &previous, nullptr);
  EXPECT_EQ(taken_elsewhere.load(), 0);
  moert_batcher_free(batcher);
  moert_session_free(s);
}

}  // namespace
