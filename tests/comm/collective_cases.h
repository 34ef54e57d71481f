// The expectations every Communicator implementation must meet, written once and run against
// each: MPI processes under mpirun (mpi_collectives_test.cc), threads of one process
// (inprocess_collectives_test.cc). A case runs on every rank of a communicator at once and
// checks with GoogleTest's EXPECT macros; cases that break a communicator do it on a split of
// the one they are given, which stays healthy.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "core/communicator.h"

namespace moert::testing {

struct CollectiveCase {
  std::string name;
  int32_t min_size = 1;     // the case needs at least this many ranks
  bool moves_data = false;  // worth running again with small MPI messages (cut transfers)
  // Expects disagreeing arguments to fail every rank (MPI, in-process; NCCL cannot check them).
  bool checks_agreement = false;
  // Expects a rank that breaks the communicator to tell its peers at once (MPI, in-process; an
  // NCCL rank cannot: its peers fail at their own timeout).
  bool tells_peers = false;
  std::function<void(Communicator&)> run;
};

const std::vector<CollectiveCase>& collective_cases();

// Runs `body`, turning an exception into a test failure that names the rank.
void run_on_rank(Communicator& comm, const std::function<void(Communicator&)>& body);

}  // namespace moert::testing
