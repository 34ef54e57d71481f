// The collective cases (collective_cases.h) on MPI communicators, one process per rank, under
// mpirun at 1, 2 and 4 ranks (label mpi). This program plays a host that uses MPI itself: it
// initialises MPI (MPI_THREAD_MULTIPLE) and finalises it, and hands moert its MPI_COMM_WORLD.
// The cases run twice: on a communicator over the host's MPI_COMM_WORLD, and on one over the
// world whose MPI messages are cut at 1000 bytes, so that every transfer is split in pieces.
#include <gtest/gtest.h>
#include <mpi.h>

#include <memory>

#include "core/communicator.h"
#include "tests/comm/collective_cases.h"

namespace moert::testing {
namespace {

std::unique_ptr<Communicator> g_world, g_small;

class Collective : public ::testing::Test {
 public:
  Collective(Communicator* comm, const CollectiveCase* c) : comm_(comm), case_(c) {}
  void TestBody() override {
    if (comm_->size() < case_->min_size)
      GTEST_SKIP() << case_->name << " needs " << case_->min_size << " ranks";
    run_on_rank(*comm_, case_->run);
  }

 private:
  Communicator* comm_;
  const CollectiveCase* case_;
};

// Ranks other than 0 print only failures, each line prefixed with the rank.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.summary());
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace moert::testing

int main(int argc, char** argv) {
  using namespace moert;
  using namespace moert::testing;
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter(rank));
  }
  int result = 1;
  try {
    MpiCommOptions options;
    options.timeout = 120.0;  // bounded: a rank that fails a case must not hold the others long
    options.plugin_path = MOERT_MPI_PLUGIN_PATH;
    MPI_Comm world = MPI_COMM_WORLD;
    g_world = make_mpi_communicator(&world, options);
    options.max_message_bytes = 1000;
    g_small = make_mpi_communicator(nullptr, options);
    for (const auto& c : collective_cases()) {
      ::testing::RegisterTest(
          "MpiCollectives", c.name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
          [&c]() -> ::testing::Test* { return new Collective(g_world.get(), &c); });
      if (c.moves_data)
        ::testing::RegisterTest(
            "MpiSmallMessages", c.name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
            [&c]() -> ::testing::Test* { return new Collective(g_small.get(), &c); });
    }
    result = RUN_ALL_TESTS();
    g_small.reset();
    g_world.reset();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] %s\n", rank, e.what());
  }
  MPI_Finalize();
  return result;
}
