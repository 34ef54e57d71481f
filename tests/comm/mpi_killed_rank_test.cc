// A rank killed mid-operation (SIGKILL, no chance to say goodbye): the others must fail with a
// clear error within their timeout, find the communicator broken, and exit cleanly -- no hang, no
// abort. Run by kill_test.cmake under `mpirun --enable-recovery`: without it Open MPI 4.1's mpirun
// kills the whole job as soon as one rank dies (the default errmgr), so nobody could observe the
// failure. With it, mpirun's exit status no longer reports the ranks' results, so each survivor
// writes its verdict to <dir>/rank<r>.txt and the script reads them.
//
// moert owns MPI here (the program never calls MPI itself): moert initialises it, and after the
// timeout -- a peer may be dead -- leaves it initialised, since MPI_Finalize would wait for the
// dead rank.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "core/communicator.h"
#include "core/error.h"

using namespace moert;
using Clock = std::chrono::steady_clock;

namespace {

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <output dir> <victim rank>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int victim = std::stoi(argv[2]);
  constexpr double kTimeout = 3.0;
  std::string verdict = "FAIL: nothing happened";
  int rank = -1;
  try {
    MpiCommOptions options;
    options.timeout = 120.0;  // starting MPI may take a while on a loaded machine
    options.plugin_path = MOERT_MPI_PLUGIN_PATH;
    auto comm = make_mpi_communicator(nullptr, options);
    comm->set_timeout(kTimeout);
    rank = comm->rank();
    const int size = comm->size();
    // Healthy first.
    int64_t one = 1;
    comm->all_reduce_sum(&one, 1, ReduceType::I64);
    if (one != size) throw Error(Code::Internal, "the healthy all-reduce gave a wrong sum");
    // A large all-to-all, in flight when the victim dies.
    const int64_t block = int64_t{16} << 20;
    std::vector<int64_t> bytes(size, block), offsets(size);
    for (int p = 0; p < size; ++p) offsets[p] = p * block;
    std::vector<char> send(size * block, 1), recv(size * block, 0);
    auto req = comm->start_all_to_all_v(send.data(), bytes.data(), offsets.data(), recv.data(),
                                        bytes.data(), offsets.data());
    if (rank == victim) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      raise(SIGKILL);
    }
    const auto t = Clock::now();
    try {
      req->wait();
      // The victim may have died after its part of the exchange was through; the next
      // operation cannot complete without it.
      comm->barrier();
      verdict = "FAIL: the operations completed without the killed rank";
    } catch (const Error& e) {
      const double waited = since(t);
      const std::string m = e.what();
      if (e.code() != Code::Comm)
        verdict = "FAIL: error code " + std::to_string(static_cast<int>(e.code())) + ": " + m;
      else if (waited > kTimeout + 5.0)
        verdict = "FAIL: the error came after " + std::to_string(waited) + " s: " + m;
      else if (m.find("rank " + std::to_string(rank)) == std::string::npos)
        verdict = "FAIL: the message does not name this rank: " + m;
      else if (!comm->broken())
        verdict = "FAIL: the communicator is not broken after the error";
      else {
        verdict = "ok after " + std::to_string(waited) + " s: " + m;
        // Every later operation fails at once.
        const auto t2 = Clock::now();
        try {
          comm->barrier();
          verdict = "FAIL: a barrier on the broken communicator completed";
        } catch (const Error& e2) {
          if (since(t2) > 0.5)
            verdict = "FAIL: the broken communicator took its time: " + std::string(e2.what());
        }
      }
    }
    const auto t3 = Clock::now();
    comm.reset();  // must not wait for the dead rank (MPI stays initialised)
    if (since(t3) > 1.0 && verdict.rfind("ok", 0) == 0)
      verdict = "FAIL: freeing the broken communicator took " + std::to_string(since(t3)) + " s";
  } catch (const std::exception& e) {
    verdict = std::string("FAIL: ") + e.what();
  }
  if (rank < 0) {
    std::fprintf(stderr, "%s\n", verdict.c_str());
    return 1;
  }
  std::ofstream(dir + "/rank" + std::to_string(rank) + ".txt") << verdict << "\n";
  std::printf("rank %d: %s\n", rank, verdict.c_str());
  return verdict.rfind("ok", 0) == 0 ? 0 : 1;
}
