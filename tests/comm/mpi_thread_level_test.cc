// A host that initialised MPI below MPI_THREAD_MULTIPLE: moert's progress thread would call MPI
// while the host's threads may, so the communicator is refused with a message that says what
// to change. The host's MPI is left as it was and finalises normally.
#include <gtest/gtest.h>
#include <mpi.h>

#include "core/communicator.h"
#include "core/error.h"

namespace moert {
namespace {

TEST(MpiHostThreadLevel, BelowMultipleIsRefused) {
  MpiCommOptions o;
  o.timeout = 30.0;
  o.plugin_path = MOERT_MPI_PLUGIN_PATH;
  MPI_Comm world = MPI_COMM_WORLD;
  for (const void* host : {static_cast<const void*>(&world), static_cast<const void*>(nullptr)}) {
    try {
      make_mpi_communicator(host, o);
      ADD_FAILURE() << "accepted a host MPI at MPI_THREAD_SERIALIZED";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::Unsupported) << e.what();
      const std::string m = e.what();
      EXPECT_NE(m.find("MPI_THREAD_SERIALIZED"), std::string::npos) << m;
      EXPECT_NE(m.find("MPI_THREAD_MULTIPLE"), std::string::npos) << m;
    }
  }
}

}  // namespace
}  // namespace moert

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  const int result = RUN_ALL_TESTS();
  MPI_Finalize();
  return result;
}
