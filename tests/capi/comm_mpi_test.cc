// Communicators through the C ABI across two MPI processes (label mpi): ranks, the session option,
// the refusal of multi-rank sessions until expert parallelism lands, and a timeout that breaks the
// communicator on both ranks (MOERT_ERR_COMM). moert owns MPI here and, after the timeout, leaves
// it unfinalised (a peer might be dead), so this runs under mpirun --enable-recovery, whose exit
// status says nothing: each rank prints its verdict and the test reads both.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "capi_test_util.h"

namespace {

using capi_test::IsError;
using capi_test::IsOk;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

TEST(CommMpi, TwoRanks) {
  moert_comm* comm = nullptr;
  // Created with its timeout: the barrier below fails after it, with no moert_comm_set_timeout().
  ASSERT_TRUE(IsOk(moert_comm_create_mpi_with_timeout(nullptr, 2.0, &comm)));
  int32_t rank = -1, size = -1;
  ASSERT_TRUE(IsOk(moert_comm_rank(comm, &rank)));
  ASSERT_TRUE(IsOk(moert_comm_size(comm, &size)));
  ASSERT_EQ(size, 2);
  EXPECT_TRUE(IsOk(moert_comm_barrier(comm)));

  moert_session_options* options = nullptr;
  ASSERT_TRUE(IsOk(moert_session_options_create(&options)));
  EXPECT_TRUE(IsError(moert_session_options_set_comm(options, comm, 3), MOERT_ERR_INVALID_ARGUMENT,
                      {"does not divide"}));
  EXPECT_TRUE(IsOk(moert_session_options_set_comm(options, comm, 2)));
  moert_model* model = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(capi_test::example_model_path().c_str(), &model)));
  // A session over both ranks (creation is collective); what it computes is tested in
  // tests/parallel.
  moert_session* session = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model, options, &session)));
  EXPECT_NE(session, nullptr);
  moert_session_free(session);
  moert_model_free(model);
  moert_session_options_free(options);

  // Rank 0 waits in a barrier rank 1 never joins.
  if (rank == 0) {
    const auto t = Clock::now();
    EXPECT_TRUE(
        IsError(moert_comm_barrier(comm), MOERT_ERR_COMM, {"rank 0", "barrier", "within 2 s"}));
    EXPECT_GE(since(t), 1.9);
    EXPECT_LT(since(t), 6.0);
  } else {
    // By now rank 0 has given up and told rank 1, whose barrier then fails at once.
    std::this_thread::sleep_for(std::chrono::seconds(4));
    const auto t = Clock::now();
    EXPECT_TRUE(IsError(moert_comm_barrier(comm), MOERT_ERR_COMM, {"is broken", "rank 0"}));
    EXPECT_LT(since(t), 0.5);
  }
  // Broken for good, on both ranks.
  EXPECT_TRUE(IsError(moert_comm_barrier(comm), MOERT_ERR_COMM, {"is broken"}));
  const auto t = Clock::now();
  moert_comm_free(comm);  // no MPI_Finalize after a timeout: returns at once
  EXPECT_LT(since(t), 1.0);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const int result = RUN_ALL_TESTS();
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  std::printf("comm_mpi_test rank %s: %s\n", rank ? rank : "?", result == 0 ? "PASSED" : "FAILED");
  return result;
}
