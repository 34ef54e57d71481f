// Communicators through the C ABI, in one process: argument checks, a one-rank MPI communicator
// (a singleton job: moert initialises MPI, and finalises it with the last reference), the session
// option that attaches it, and NCCL's refusals without a GPU.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

#include "capi_test_util.h"

namespace {

using capi_test::IsError;
using capi_test::IsOk;

std::atomic<int> signals_taken{0};

// How many of `count` process-directed SIGUSR1s reach another thread while this one blocks the
// signal. The library's own threads never take asynchronous signals (moert.h, Signals), so with
// only moert's and MPI's threads besides this one, every signal must stay pending.
int signals_taken_by_other_threads(int count) {
  signals_taken = 0;
  struct sigaction count_it {
  }, old{}, ignore{};
  count_it.sa_handler = [](int) { signals_taken.fetch_add(1); };
  sigaction(SIGUSR1, &count_it, &old);
  sigset_t usr1, saved;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, &saved);
  for (int i = 0; i < count; ++i) kill(getpid(), SIGUSR1);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  // Ignoring a signal discards its pending instance, so this thread does not take it either.
  ignore.sa_handler = SIG_IGN;
  sigaction(SIGUSR1, &ignore, nullptr);
  pthread_sigmask(SIG_SETMASK, &saved, nullptr);
  sigaction(SIGUSR1, &old, nullptr);
  return signals_taken.load();
}

TEST(Comm, NullArgumentsAreRefused) {
  EXPECT_TRUE(
      IsError(moert_comm_create_mpi(nullptr, nullptr), MOERT_ERR_INVALID_ARGUMENT, {"out"}));
  int32_t v = 0;
  EXPECT_TRUE(IsError(moert_comm_rank(nullptr, &v), MOERT_ERR_INVALID_ARGUMENT, {"comm"}));
  EXPECT_TRUE(IsError(moert_comm_size(nullptr, &v), MOERT_ERR_INVALID_ARGUMENT, {"comm"}));
  EXPECT_TRUE(IsError(moert_comm_set_timeout(nullptr, 1.0), MOERT_ERR_INVALID_ARGUMENT, {"comm"}));
  EXPECT_TRUE(IsError(moert_comm_barrier(nullptr), MOERT_ERR_INVALID_ARGUMENT, {"comm"}));
  EXPECT_TRUE(IsError(moert_session_options_set_comm(nullptr, nullptr, 1),
                      MOERT_ERR_INVALID_ARGUMENT, {"options"}));
  moert_comm_free(nullptr);
  EXPECT_STREQ(moert_status_code_name(MOERT_ERR_COMM), "MOERT_ERR_COMM");
  // A creation timeout out of range is refused before MPI or NCCL is touched (this process may
  // initialise MPI only once: the singleton test below does).
  moert_comm* c = nullptr;
  uint8_t id[MOERT_NCCL_UNIQUE_ID_BYTES] = {0};
  for (double bad : {0.0, -1.0, std::nan(""), HUGE_VAL, 31536000.5}) {
    EXPECT_TRUE(IsError(moert_comm_create_mpi_with_timeout(nullptr, bad, &c),
                        MOERT_ERR_INVALID_ARGUMENT, {"timeout"}));
    EXPECT_TRUE(IsError(moert_comm_create_nccl_with_timeout(id, sizeof id, 0, 1, 0, bad, &c),
                        MOERT_ERR_INVALID_ARGUMENT, {"timeout"}));
  }
  EXPECT_TRUE(IsError(moert_comm_create_mpi_with_timeout(nullptr, 1.0, nullptr),
                      MOERT_ERR_INVALID_ARGUMENT, {"out"}));
  EXPECT_EQ(c, nullptr);
}

TEST(Comm, NcclArgumentsAndAbsence) {
  uint8_t id[MOERT_NCCL_UNIQUE_ID_BYTES] = {0};
  EXPECT_TRUE(IsError(moert_comm_nccl_unique_id(id, 16), MOERT_ERR_INVALID_ARGUMENT, {"128"}));
  EXPECT_TRUE(IsError(moert_comm_nccl_unique_id(nullptr, 128), MOERT_ERR_INVALID_ARGUMENT));
  moert_comm* c = nullptr;
  EXPECT_TRUE(
      IsError(moert_comm_create_nccl(id, 64, 0, 1, 0, &c), MOERT_ERR_INVALID_ARGUMENT, {"128"}));
  EXPECT_TRUE(IsError(moert_comm_create_nccl(id, sizeof id, 2, 2, 0, &c),
                      MOERT_ERR_INVALID_ARGUMENT, {"rank 2"}));
  EXPECT_TRUE(IsError(moert_comm_create_nccl(id, sizeof id, 0, 0, 0, &c),
                      MOERT_ERR_INVALID_ARGUMENT, {"size"}));
  EXPECT_TRUE(IsError(moert_comm_create_nccl(id, sizeof id, 0, 1, -1, &c),
                      MOERT_ERR_INVALID_ARGUMENT, {"device"}));
  EXPECT_TRUE(
      IsError(moert_comm_create_nccl(nullptr, sizeof id, 0, 1, 0, &c), MOERT_ERR_INVALID_ARGUMENT));
  // No GPU here (or no plugin): a clear refusal, never a crash. Where a GPU is lent, the GPU
  // tests create a real one.
  moert_status* s = moert_comm_create_nccl(id, sizeof id, 0, 1, 0, &c);
  if (s) {
    EXPECT_TRUE(IsError(s, MOERT_ERR_UNSUPPORTED));
  } else {
    moert_comm_free(c);
  }
  EXPECT_EQ(c == nullptr, true);
}

// One test for everything MPI: moert finalises MPI with the last communicator, and MPI cannot
// be initialised again in this process.
TEST(Comm, MpiSingletonWithSessionOption) {
  moert_comm* comm = nullptr;
  ASSERT_TRUE(IsOk(moert_comm_create_mpi(nullptr, &comm)));
  EXPECT_EQ(signals_taken_by_other_threads(20), 0)
      << "the MPI plugin's progress thread (or a thread MPI started from it) took a "
         "process-directed asynchronous signal";
  int32_t rank = -1, size = -1;
  EXPECT_TRUE(IsOk(moert_comm_rank(comm, &rank)));
  EXPECT_TRUE(IsOk(moert_comm_size(comm, &size)));
  EXPECT_EQ(rank, 0);
  EXPECT_EQ(size, 1);
  EXPECT_TRUE(IsError(moert_comm_rank(comm, nullptr), MOERT_ERR_INVALID_ARGUMENT, {"out"}));
  EXPECT_TRUE(IsOk(moert_comm_barrier(comm)));
  for (double bad : {0.0, -1.0, std::nan(""), HUGE_VAL, 1e12})
    EXPECT_TRUE(
        IsError(moert_comm_set_timeout(comm, bad), MOERT_ERR_INVALID_ARGUMENT, {"timeout"}));
  // Just past the limit: the message shows the value, not the limit rounded to 6 digits.
  EXPECT_TRUE(IsError(moert_comm_set_timeout(comm, 31536000.5), MOERT_ERR_INVALID_ARGUMENT,
                      {"got 31536000.5"}));
  EXPECT_TRUE(IsOk(moert_comm_set_timeout(comm, 31536000.0)));
  EXPECT_TRUE(IsOk(moert_comm_set_timeout(comm, 30.0)));

  moert_session_options* options = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&options)));
  EXPECT_TRUE(IsError(moert_session_options_set_comm(options, comm, 0), MOERT_ERR_INVALID_ARGUMENT,
                      {">= 1"}));
  EXPECT_TRUE(IsError(moert_session_options_set_comm(options, comm, 2), MOERT_ERR_INVALID_ARGUMENT,
                      {"does not divide"}));
  EXPECT_TRUE(IsError(moert_session_options_set_comm(options, nullptr, 2),
                      MOERT_ERR_INVALID_ARGUMENT, {"needs a communicator"}));
  EXPECT_TRUE(IsOk(moert_session_options_set_comm(options, comm, 1)));
  // The options hold their own reference: the handle may go.
  moert_comm_free(comm);

  // A one-rank job runs as a single process does.
  moert_model* model = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(capi_test::example_model_path().c_str(), &model)));
  int32_t input_kind = 0;
  uint32_t in_width = 0, out_width = 0;
  ASSERT_TRUE(IsOk(moert_model_io(model, &input_kind, &in_width, &out_width)));
  ASSERT_EQ(input_kind, MOERT_INPUT_TOKENS);
  moert_session* session = nullptr;
  ASSERT_TRUE(IsOk(moert_session_create(model, options, &session)));
  std::vector<int32_t> tokens(2 * in_width, 3);
  std::vector<float> out(2 * out_width);
  EXPECT_TRUE(IsOk(moert_session_forward_tokens(session, tokens.data(), tokens.size(), 2,
                                                out.data(), out.size())));
  EXPECT_TRUE(IsOk(moert_session_options_set_comm(options, nullptr, 1)));  // detach
  moert_session_options_free(options);
  moert_model_free(model);
  moert_session_free(session);  // the last reference: MPI is finalised here

  EXPECT_TRUE(
      IsError(moert_comm_create_mpi(nullptr, &comm), MOERT_ERR_INVALID_STATE, {"finalised"}));
}

}  // namespace
