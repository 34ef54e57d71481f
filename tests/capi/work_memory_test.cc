// The working buffers a session's passes size, through the C ABI: the session option
// "kept_work_bytes" bounds what a session keeps between calls, and a call that runs out of
// memory gives back what it grew, so that a smaller retry can succeed. Measured on the process's
// resident and address-space figures (glibc's), with passes large enough (tens of MB) to stand
// out; not under the sanitizers, whose allocators keep freed memory and reserve address space of
// their own.
#include <sys/resource.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "capi_test_util.h"

namespace capi_test {
namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

constexpr uint32_t kContext = 4, kWidth = 64;  // the example model

// A /proc/self/status figure in MiB ("VmRSS", "VmSize"): what the process holds, as a service's
// operator sees it (a large release also hands glibc's free heap memory back: Session::after_call).
double status_mib(const char* field) {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  double kib = -1;
  const size_t n = std::strlen(field);
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, field, n) == 0 && line[n] == ':') kib = std::atof(line + n + 1);
  std::fclose(f);
  return kib / 1024.0;
}

struct Pass {
  std::vector<int32_t> tokens;
  std::vector<float> out;
  explicit Pass(uint64_t rows) : tokens(rows * kContext), out(rows * kWidth) {
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 7 + 3) % 64);
  }
  uint64_t rows() const { return tokens.size() / kContext; }
  moert_status* run(moert_session* s) {
    return moert_session_forward_tokens(s, tokens.data(), tokens.size(), rows(), out.data(),
                                        out.size());
  }
};

SessionPtr session_keeping(const moert_model* model, const char* kept) {
  moert_session_options* o = nullptr;
  EXPECT_TRUE(IsOk(moert_session_options_create(&o)));
  if (kept) {
    EXPECT_TRUE(IsOk(moert_session_options_set_config(o, "kept_work_bytes", kept)));
  }
  moert_session* s = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model, o, &s)));
  moert_session_options_free(o);
  return SessionPtr(s);
}

ModelPtr example_model() {
  moert_model* m = nullptr;
  EXPECT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
  return ModelPtr(m);
}

TEST(WorkMemory, KeptWorkBytesBoundsWhatASessionKeepsAfterALargePass) {
  if (kSanitized) GTEST_SKIP() << "sanitizer allocators keep freed memory";
  const ModelPtr model = example_model();
  Pass large(60000), small(100);

  // Given back after each call: the large pass leaves the process about where it was.
  const SessionPtr lean = session_keeping(model.get(), "0");
  ASSERT_TRUE(IsOk(small.run(lean.get())));
  const double before_lean = status_mib("VmRSS");
  ASSERT_TRUE(IsOk(large.run(lean.get())));
  const std::vector<float> lean_out = large.out;
  const double lean_growth = status_mib("VmRSS") - before_lean;

  // Kept (the default): the large pass's buffers stay through later small passes.
  const SessionPtr keeping = session_keeping(model.get(), nullptr);
  ASSERT_TRUE(IsOk(small.run(keeping.get())));
  const double before_keeping = status_mib("VmRSS");
  ASSERT_TRUE(IsOk(large.run(keeping.get())));
  EXPECT_EQ(large.out, lean_out) << "a session that gives its buffers back computes the same";
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(IsOk(small.run(keeping.get())));
  const double keeping_growth = status_mib("VmRSS") - before_keeping;

  std::printf(
      "resident growth after a %llu-row pass: %.1f MiB kept, %.1f MiB with "
      "kept_work_bytes 0\n",
      static_cast<unsigned long long>(large.rows()), keeping_growth, lean_growth);
  EXPECT_GT(keeping_growth, 40.0);
  EXPECT_LT(lean_growth, keeping_growth / 4);

  // Bounded on a live session too, from that call on.
  const double bounded_before = status_mib("VmRSS");
  ASSERT_TRUE(IsOk(moert_session_set_config(keeping.get(), "kept_work_bytes", "1048576")));
  EXPECT_LT(status_mib("VmRSS"), bounded_before - keeping_growth / 2);
  ASSERT_TRUE(IsOk(large.run(keeping.get())));
  EXPECT_LT(status_mib("VmRSS"), bounded_before - keeping_growth / 2);
  EXPECT_TRUE(IsError(moert_session_set_config(keeping.get(), "kept_work_bytes", "-5"),
                      MOERT_ERR_INVALID_ARGUMENT, {"kept_work_bytes"}));
}

TEST(WorkMemory, APassThatRanOutOfMemoryGivesBackWhatItGrew) {
  if (kSanitized) GTEST_SKIP() << "sanitizers reserve address space of their own";
  const ModelPtr model = example_model();
  const SessionPtr session = session_keeping(model.get(), nullptr);
  Pass too_large(1000000), retry(80000), small(100);
  ASSERT_TRUE(IsOk(small.run(session.get())));  // threads and libraries are up
  // Room for the retry's buffers (about 2.7 KiB a row, 210 MiB) but not for the first pass's.
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_AS, &old), 0);
  rlimit capped = old;
  capped.rlim_cur = static_cast<rlim_t>((status_mib("VmSize") + 300.0) * 1024 * 1024);
  ASSERT_EQ(setrlimit(RLIMIT_AS, &capped), 0);
  moert_status* failed = too_large.run(session.get());
  moert_status* retried = failed ? retry.run(session.get()) : nullptr;
  ASSERT_EQ(setrlimit(RLIMIT_AS, &old), 0);
  ASSERT_TRUE(IsError(failed, MOERT_ERR_OUT_OF_MEMORY, {}));
  EXPECT_TRUE(IsOk(retried)) << "the failed pass kept what it had grown";
}

}  // namespace
}  // namespace capi_test
