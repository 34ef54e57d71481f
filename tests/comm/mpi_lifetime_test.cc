// MPI's lifetime when moert owns it: the program never calls MPI itself. moert initialises MPI
// (MPI_THREAD_MULTIPLE) with the first communicator, keeps it while any communicator lives and
// finalises it with the last; MPI cannot be initialised twice, so a later creation fails with a
// message that says so. The host's signal handlers are untouched (Open MPI's MPI_Init installs
// its own for SIGSEGV, SIGBUS, SIGFPE and SIGABRT; moert puts the host's back). Run under
// mpirun (whose exit status reports a rank that exits without MPI_Finalize) and as a singleton.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <thread>

#include "core/communicator.h"
#include "core/error.h"

namespace moert {
namespace {

MpiCommOptions options() {
  MpiCommOptions o;
  o.timeout = 60.0;
  o.plugin_path = MOERT_MPI_PLUGIN_PATH;
  return o;
}

void on_signal(int) {}

TEST(MpiLifetime, InitialisedWithTheFirstFinalisedWithTheLast) {
  // A host with its own SIGSEGV handler, and SIGBUS left to the default.
  struct sigaction mine {};
  mine.sa_handler = on_signal;
  sigemptyset(&mine.sa_mask);
  ASSERT_EQ(sigaction(SIGSEGV, &mine, nullptr), 0);
  struct sigaction before_bus {};
  sigaction(SIGBUS, nullptr, &before_bus);

  auto world = make_mpi_communicator(nullptr, options());
  struct sigaction after {};
  sigaction(SIGSEGV, nullptr, &after);
  EXPECT_EQ(after.sa_handler, &on_signal) << "MPI_Init replaced the host's SIGSEGV handler";
  sigaction(SIGBUS, nullptr, &after);
  EXPECT_EQ(after.sa_handler, before_bus.sa_handler) << "MPI_Init left a SIGBUS handler";

  EXPECT_STREQ(world->kind(), "mpi");
  EXPECT_EQ(world->memory(), CommMemory::Host);
  EXPECT_EQ(world->timeout(), 60.0);
  int64_t ranks = 1;
  world->all_reduce_sum(&ranks, 1, ReduceType::I64);
  EXPECT_EQ(ranks, world->size());

  // A second world communicator and a split: MPI stays up until the last of them goes.
  auto second = make_mpi_communicator(nullptr, options());
  auto child = world->split(0, world->rank());
  world.reset();
  second->barrier();
  second.reset();
  child->barrier();
  // The last: MPI_Finalize, waited for however long the other ranks' own work takes them, past
  // the communicator's timeout (a rank that exited before its peers came to MPI_Finalize would
  // make mpirun end the job).
  child->set_timeout(0.5);
  if (child->rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(2));
  const auto freed = std::chrono::steady_clock::now();
  const int rank = child->rank(), size = child->size();
  child.reset();
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - freed).count();
  if (rank == 0 && size > 1) {
    EXPECT_GT(waited, 1.5) << "rank 0 did not wait for rank 1's MPI_Finalize";
  }

  try {
    make_mpi_communicator(nullptr, options());
    ADD_FAILURE() << "a communicator was created after moert finalised MPI";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidState) << e.what();
    EXPECT_NE(std::string(e.what()).find("finalised"), std::string::npos) << e.what();
  }
}

TEST(MpiLifetime, RefusesBadOptions) {
  auto o = options();
  o.timeout = -1.0;
  EXPECT_THROW(make_mpi_communicator(nullptr, o), Error);
  o = options();
  o.plugin_path = "/nonexistent/libmoert_mpi.so";
  try {
    make_mpi_communicator(nullptr, o);
    ADD_FAILURE();
  } catch (const Error& e) {
    // The plugin is already loaded (the test above) from elsewhere: a second path is refused.
    EXPECT_EQ(e.code(), Code::InvalidArgument) << e.what();
  }
}

}  // namespace
}  // namespace moert
