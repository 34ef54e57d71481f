// A host that calls MPI_Finalize while moert communicators are still alive, directly and through
// an expert-parallel session. moert.h forbids it, but a service's shutdown path can do it anyway;
// before moert watched for it, its progress thread called MPI after the finalisation and Open MPI
// aborted the process. Now MPI_Finalize returns, the communicators are broken with a message
// naming the cause, every later operation and creation is refused, and freeing returns at once.
// Two modes: the host initialised MPI itself, or moert did with the first communicator
// (--moert-initialises).
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "capi_test_util.h"

namespace {

using capi_test::IsError;
using capi_test::IsOk;

bool g_host_initialises = true;

TEST(CommMpiHostFinalize, LiveCommunicatorsBreakAndNothingAborts) {
  if (g_host_initialises) {
    int provided = 0;
    ASSERT_EQ(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided), MPI_SUCCESS);
    ASSERT_EQ(provided, MPI_THREAD_MULTIPLE);
  }
  moert_comm* comm = nullptr;
  ASSERT_TRUE(IsOk(moert_comm_create_mpi(nullptr, &comm)));
  int32_t size = 0;
  ASSERT_TRUE(IsOk(moert_comm_size(comm, &size)));
  double x = 1.0;
  ASSERT_TRUE(IsOk(moert_comm_all_reduce_sum(comm, &x, 1)));
  EXPECT_EQ(x, size);

  // An expert-parallel session over every rank, whose forward works before the finalisation.
  moert_session_options* options = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&options)));
  ASSERT_TRUE(IsOk(moert_session_options_set_comm(options, comm, size)));
  moert_model* model = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(capi_test::example_model_path().c_str(), &model)));
  int32_t input_kind = 0;
  uint32_t in_width = 0, out_width = 0;
  ASSERT_TRUE(IsOk(moert_model_io(model, &input_kind, &in_width, &out_width)));
  moert_session* session = nullptr;
  ASSERT_TRUE(IsOk(moert_session_create(model, options, &session)));
  std::vector<int32_t> tokens(2 * in_width, 3);
  std::vector<float> out(2 * out_width);
  EXPECT_TRUE(IsOk(moert_session_forward_tokens(session, tokens.data(), tokens.size(), 2,
                                                out.data(), out.size())));

  // Threads that keep starting all-reduces on communicators of their own (in the same order on
  // every rank) while the host finalises: a call started as the engine stops must fail at once,
  // not wait out the communicator's timeout (60 s here).
  constexpr int kThreads = 3, kPerThread = 4;
  std::vector<moert_comm*> busy(kThreads * kPerThread);
  for (auto& c : busy) ASSERT_TRUE(IsOk(moert_comm_create_mpi_with_timeout(nullptr, 60.0, &c)));
  std::atomic<bool> finalised{false};
  std::atomic<double> longest_after{0.0};
  std::atomic<int> calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0;; ++i) {
        double y = 1.0;
        const auto start = std::chrono::steady_clock::now();
        moert_status* st = moert_comm_all_reduce_sum(busy[t * kPerThread + i % kPerThread], &y, 1);
        const double took =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        calls.fetch_add(1);
        moert_status_free(st);
        if (finalised.load()) {
          longest_after.store(std::max(longest_after.load(), took));
          if (st) return;  // broken: every later call is refused as well
        }
      }
    });
  while (calls.load() < 50) std::this_thread::sleep_for(std::chrono::milliseconds(1));

  // The host's MPI is whole until it finalises: its own collectives still work.
  int one = 1, sum = 0;
  ASSERT_EQ(MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD), MPI_SUCCESS);
  EXPECT_EQ(sum, size);

  ASSERT_EQ(MPI_Finalize(), MPI_SUCCESS);
  finalised.store(true);
  for (auto& t : threads) t.join();
  EXPECT_LT(longest_after.load(), 5.0) << "a call made as MPI finalised waited for its timeout";
  for (auto* c : busy) moert_comm_free(c);
  int finalized = 0;
  MPI_Finalized(&finalized);
  EXPECT_TRUE(finalized);

  EXPECT_TRUE(IsError(moert_comm_all_reduce_sum(comm, &x, 1), MOERT_ERR_COMM,
                      {"is broken", "MPI_Finalize"}));
  EXPECT_TRUE(IsError(moert_comm_barrier(comm), MOERT_ERR_COMM, {"MPI_Finalize"}));
  EXPECT_TRUE(IsError(moert_session_forward_tokens(session, tokens.data(), tokens.size(), 2,
                                                   out.data(), out.size()),
                      MOERT_ERR_COMM, {"MPI_Finalize"}));
  moert_comm* again = nullptr;
  EXPECT_TRUE(
      IsError(moert_comm_create_mpi(nullptr, &again), MOERT_ERR_INVALID_STATE, {"MPI_Finalize"}));
  EXPECT_EQ(again, nullptr);

  // Freeing makes no MPI call and waits for nothing.
  const auto start = std::chrono::steady_clock::now();
  moert_session_free(session);
  moert_session_options_free(options);
  moert_comm_free(comm);
  moert_model_free(model);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--moert-initialises") == 0) g_host_initialises = false;
  return RUN_ALL_TESTS();
}
