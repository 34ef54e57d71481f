// A host's MPI_Comm handle that is no communicator: MPI_COMM_NULL (a rank MPI_Comm_split left
// out) and a handle never assigned (all zero bits, as a static MPI_Comm starts). Both are refused
// with MOERT_ERR_INVALID_ARGUMENT; handed to MPI, the second would run MPI_COMM_WORLD's fatal error
// handler and abort the job. A valid handle works afterwards.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>
#include <string>

#include "core/communicator.h"
#include "core/error.h"

namespace moert {
namespace {

MpiCommOptions options() {
  MpiCommOptions o;
  o.timeout = 30.0;
  o.plugin_path = MOERT_MPI_PLUGIN_PATH;
  return o;
}

void expect_refused(const MPI_Comm& host, const char* says) {
  try {
    make_mpi_communicator(&host, options());
    ADD_FAILURE() << "accepted a handle that is no communicator";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
  }
}

TEST(MpiHostHandle, NullAndNeverAssignedHandlesAreRefused) {
  expect_refused(MPI_COMM_NULL, "MPI_COMM_NULL");
  MPI_Comm never_assigned;
  std::memset(&never_assigned, 0, sizeof never_assigned);
  expect_refused(never_assigned, "never assigned");
  MPI_Comm world = MPI_COMM_WORLD;
  auto comm = make_mpi_communicator(&world, options());
  ASSERT_TRUE(comm);
  EXPECT_EQ(comm->size(), 1);
}

}  // namespace
}  // namespace moert

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  const int result = RUN_ALL_TESTS();
  MPI_Finalize();
  return result;
}
