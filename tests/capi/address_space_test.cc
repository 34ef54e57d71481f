// A host process near its address-space or data limit (RLIMIT_AS, RLIMIT_DATA: `ulimit -v`, `-d`)
// gets MOERT_ERR_OUT_OF_MEMORY from the calls that make oneDNN generate kernels, never a crash:
// oneDNN 2.6 crashes when it runs out of address space while it generates code, so moert asks for
// room first (kernels/cpu/gemm.cc). Each case runs in a child, whose limit is its own; CTest runs
// every case in a fresh process, so the first session of the child is the one that sets up oneDNN's
// fp32 GEMMs.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "capi_test_util.h"

namespace {

// What RLIMIT_AS (field 0 of statm) or RLIMIT_DATA (field 5: data and stack) counts now.
uint64_t used(int resource) {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  unsigned long long v[6] = {};
  if (f) {
    if (std::fscanf(f, "%llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) !=
        6)
      v[0] = v[5] = 0;
    std::fclose(f);
  }
  return v[resource == RLIMIT_AS ? 0 : 5] * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

// The soft limit only: the child can lift it again (the hard one stays as it was).
bool limit_to(int resource, uint64_t bytes) {
  rlimit r{};
  if (::getrlimit(resource, &r) != 0) return false;
  r.rlim_cur = bytes;
  return ::setrlimit(resource, &r) == 0;
}

bool lift_limit(int resource) {
  rlimit r{};
  if (::getrlimit(resource, &r) != 0) return false;
  r.rlim_cur = r.rlim_max;
  return ::setrlimit(resource, &r) == 0;
}

// The code and message of a status (freed), "" for success.
std::pair<int32_t, std::string> outcome(moert_status* st) {
  std::pair<int32_t, std::string> r{moert_status_code(st), st ? moert_status_message(st) : ""};
  moert_status_free(st);
  return r;
}

// AddressSanitizer reserves its shadow memory and grows its allocator's regions under the same
// limits: near them it is ASan that runs out (and aborts), whatever moert does.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitizerOwnsMemory = true;
#else
constexpr bool kSanitizerOwnsMemory = false;
#endif

// Runs `body` in a child; the test fails if the child does not exit with 0 (a crash shows as its
// signal). The body reports what went wrong on stderr.
void in_child(const std::function<int()>& body) {
  std::fflush(nullptr);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(body());
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "the child ended by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

moert_session_options* options(const char* precision, uint32_t threads) {
  moert_session_options* o = nullptr;
  moert_status_free(moert_session_options_create(&o));
  moert_status_free(moert_session_options_set_threads(o, threads));
  moert_status_free(moert_session_options_set_config(o, "precision", precision));
  return o;
}

// The first session of a process, created with 12 MiB left under the address-space or the data
// limit (oneDNN's fp32 GEMM set-up needs about 18 and crashed with 16 or less left), fails
// cleanly and names the limit; with the limit lifted, the next creation succeeds and computes.
class Limit : public ::testing::TestWithParam<int> {};

TEST_P(Limit, TheFirstSessionFailsCleanlyNearItAndWorksOnceItIsLifted) {
  if (kSanitizerOwnsMemory) GTEST_SKIP() << "under AddressSanitizer, which needs the room itself";
  const int resource = GetParam();
  in_child([resource] {
    moert_model* model = nullptr;
    if (moert_status_code(moert_model_load_file(MOERT_EXAMPLE_MODEL, &model)) != MOERT_OK) return 2;
    moert_session_options* o = options("fp32", 1);
    if (!limit_to(resource, used(resource) + (uint64_t{12} << 20))) return 3;
    moert_session* s = nullptr;
    const auto [code, message] = outcome(moert_session_create(model, o, &s));
    const char* name = resource == RLIMIT_AS ? "RLIMIT_AS" : "RLIMIT_DATA";
    if (code != MOERT_ERR_OUT_OF_MEMORY || message.find(name) == std::string::npos) {
      std::fprintf(stderr, "near the limit: code %d, '%s'\n", code, message.c_str());
      return 4;
    }
    if (!lift_limit(resource)) return 5;
    const auto [code2, message2] = outcome(moert_session_create(model, o, &s));
    if (code2 != MOERT_OK) {
      std::fprintf(stderr, "after lifting the limit: '%s'\n", message2.c_str());
      return 6;
    }
    int32_t kind = 0;
    uint32_t in = 0, out = 0;
    moert_status_free(moert_model_io(model, &kind, &in, &out));
    std::vector<int32_t> tokens(4 * in, 1);
    std::vector<float> y(4 * out);
    const auto [code3, message3] = outcome(
        moert_session_forward_tokens(s, tokens.data(), tokens.size(), 4, y.data(), y.size()));
    if (code3 != MOERT_OK) {
      std::fprintf(stderr, "forward: '%s'\n", message3.c_str());
      return 7;
    }
    moert_session_free(s);
    moert_session_options_free(o);
    moert_model_free(model);
    return 0;
  });
}

INSTANTIATE_TEST_SUITE_P(AddressSpace, Limit, ::testing::Values(RLIMIT_AS, RLIMIT_DATA),
                         [](const auto& p) {
                           return std::string(p.param == RLIMIT_AS ? "AddressSpace" : "Data");
                         });

// A bf16 session's pass of a row count it has not seen (where oneDNN multiplies bf16, a new
// kernel for the shape) with a few MiB left: succeeds or fails with MOERT_ERR_OUT_OF_MEMORY, and
// the same pass succeeds once the limit is lifted.
TEST(AddressSpace, ABf16PassOfANewShapeNearTheLimitFailsCleanly) {
  if (kSanitizerOwnsMemory) GTEST_SKIP() << "under AddressSanitizer, which needs the room itself";
  in_child([] {
    moert_model* model = nullptr;
    if (moert_status_code(moert_model_load_file(MOERT_EXAMPLE_MODEL, &model)) != MOERT_OK) return 2;
    moert_session_options* o = options("bf16", 2);
    moert_session* s = nullptr;
    if (moert_status_code(moert_session_create(model, o, &s)) != MOERT_OK) return 3;
    int32_t kind = 0;
    uint32_t in = 0, out = 0;
    moert_status_free(moert_model_io(model, &kind, &in, &out));
    const uint64_t rows = 3000;
    std::vector<int32_t> tokens(rows * in);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i % 60);
    std::vector<float> y(rows * out);
    for (const uint64_t left_mib : {4, 8, 16}) {
      if (!limit_to(RLIMIT_AS, used(RLIMIT_AS) + (left_mib << 20))) return 4;
      const auto [code, message] = outcome(
          moert_session_forward_tokens(s, tokens.data(), tokens.size(), rows, y.data(), y.size()));
      if (!lift_limit(RLIMIT_AS)) return 5;
      if (code != MOERT_OK && code != MOERT_ERR_OUT_OF_MEMORY) {
        std::fprintf(stderr, "%llu MiB left: code %d, '%s'\n",
                     static_cast<unsigned long long>(left_mib), code, message.c_str());
        return 6;
      }
    }
    const auto [code, message] = outcome(
        moert_session_forward_tokens(s, tokens.data(), tokens.size(), rows, y.data(), y.size()));
    if (code != MOERT_OK) {
      std::fprintf(stderr, "after lifting the limit: '%s'\n", message.c_str());
      return 7;
    }
    moert_session_free(s);
    moert_session_options_free(o);
    moert_model_free(model);
    return 0;
  });
}

}  // namespace
