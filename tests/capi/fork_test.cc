// A child of fork() and the handles it inherits: sessions and batchers run threads, which a
// child does not get. Every call on an inherited one is refused with MOERT_ERR_INVALID_STATE,
// even while a parent thread held the session's lock at the fork, and freeing one waits for
// nothing; the child's own sessions work. Before, freeing either hung in the child for good.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "capi_test_util.h"

namespace capi_test {
namespace {

constexpr uint64_t kRows = 8;

// What a child reports through its exit status.
enum ChildResult : int {
  kAllHeld = 0,
  kSessionCallNotRefused = 10,
  kBatcherCallNotRefused,
  kNewSessionFailed,
  kNewSessionDiffers,
};

bool refused_as_inherited(moert_status* status) {
  StatusPtr s(status);
  return s && moert_status_code(s.get()) == MOERT_ERR_INVALID_STATE &&
         std::strstr(moert_status_message(s.get()), "fork()") != nullptr;
}

class Fork : public testing::Test {
 protected:
  void SetUp() override {
    moert_model* m = nullptr;
    ASSERT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
    model_.reset(m);
    uint32_t width = 0;
    ASSERT_TRUE(IsOk(moert_model_io(model_.get(), nullptr, &width, &out_width_)));
    tokens_.resize(kRows * width);
    for (size_t i = 0; i < tokens_.size(); ++i) tokens_[i] = static_cast<int32_t>((i * 7) % 50);
  }

  moert_status* forward(moert_session* s, std::vector<float>& out) const {
    out.assign(kRows * out_width_, 0.0f);
    return moert_session_forward_tokens(s, tokens_.data(), tokens_.size(), kRows, out.data(),
                                        out.size());
  }

  // Runs in the child: no gtest assertions, an exit status instead. A hang is the parent's to
  // end: an alarm could wait, blocked, until the call returns.
  int child(moert_session* inherited, moert_batcher* inherited_batcher,
            const std::vector<float>& want) const {
    std::vector<float> out;
    if (!refused_as_inherited(forward(inherited, out))) return kSessionCallNotRefused;
    std::vector<float> b(kRows * out_width_);
    if (!refused_as_inherited(moert_batcher_forward_tokens(inherited_batcher, tokens_.data(),
                                                           tokens_.size(), kRows, b.data(),
                                                           b.size(), nullptr, 0)))
      return kBatcherCallNotRefused;
    moert_session_free(inherited);
    moert_batcher_free(inherited_batcher);
    // One thread: the sanitizers' runtimes do not support starting threads after a fork of a
    // multi-threaded process.
    SessionPtr own = make_session(model_.get(), 1);
    if (!own) return kNewSessionFailed;
    StatusPtr done(forward(own.get(), out));
    if (done) return kNewSessionFailed;
    return out == want ? kAllHeld : kNewSessionDiffers;
  }

  ModelPtr model_;
  uint32_t out_width_ = 0;
  std::vector<int32_t> tokens_;
};

TEST_F(Fork, InheritedSessionsAndBatchersAreRefusedAndFreedWithoutWaiting) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // GCC 12's sanitizer allocators are not fork-safe: a child forked while the parent's other
  // thread allocates waits for good on the allocator's lock (gdb: SizeClassAllocator64::
  // GetFromAllocator under dnnl_sgemm), whatever moert does.
  GTEST_SKIP() << "the sanitizer runtime's allocator does not survive fork() with threads";
#endif
  SessionPtr session = make_session(model_.get(), 2);
  ASSERT_TRUE(session);
  moert_batcher* raw = nullptr;
  ASSERT_TRUE(IsOk(moert_batcher_create(model_.get(), nullptr, &raw)));
  std::unique_ptr<moert_batcher, void (*)(moert_batcher*)> batcher(raw, &moert_batcher_free);
  std::vector<float> want;
  ASSERT_TRUE(IsOk(forward(session.get(), want)));
  std::vector<float> b(want.size());
  ASSERT_TRUE(IsOk(moert_batcher_forward_tokens(batcher.get(), tokens_.data(), tokens_.size(),
                                                kRows, b.data(), b.size(), nullptr, 0)));

  // A parent thread keeps calling the session, so that some forks happen while it holds the
  // session's lock (a child that took the lock would wait for it for good).
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::thread busy([&] {
    std::vector<float> out;
    while (!stop.load())
      if (!IsOk(forward(session.get(), out)) || out != want) failures.fetch_add(1);
  });
  for (int round = 0; round < 4; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3 + 5 * round));
    const pid_t pid = fork();
    ASSERT_GE(pid, 0) << std::strerror(errno);
    if (pid == 0) _exit(child(session.get(), batcher.get(), want));
    int status = 0;
    pid_t ended = 0;
    for (int waited_ms = 0; (ended = waitpid(pid, &status, WNOHANG)) == 0 && waited_ms < 30000;
         waited_ms += 10)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (ended == 0) {
      // Where it waits, for the log (a hang here has been seen once in CI, never reproduced).
      const std::string where = "gdb -batch -nx -p " + std::to_string(pid) +
                                " -ex 'thread apply all bt 30' 2>&1 | grep -E '^(#|Thread)' | "
                                "head -120";
      if (std::system(where.c_str()) != 0) std::printf("(no stacks: gdb failed)\n");
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ADD_FAILURE() << "round " << round << ": the child hung (killed after 30 s)";
      continue;
    }
    ASSERT_EQ(ended, pid);
    ASSERT_TRUE(WIFEXITED(status)) << "round " << round << ": the child died";
    EXPECT_EQ(WEXITSTATUS(status), kAllHeld) << "round " << round;
  }
  stop.store(true);
  busy.join();
  EXPECT_EQ(failures.load(), 0);
  // The parent's handles are untouched by what the children did.
  std::vector<float> after;
  ASSERT_TRUE(IsOk(forward(session.get(), after)));
  EXPECT_EQ(after, want);
}

}  // namespace
}  // namespace capi_test
