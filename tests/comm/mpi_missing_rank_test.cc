// A timeout must say which rank is missing and why, on every rank that gives up: the peers'
// engines answer a probe whatever their hosts are doing, so a live rank that never calls the
// operation ("has not reached #N") is told apart from a stopped one ("does not answer").
// Run under mpirun with 3 ranks; the program initialises and finalises MPI itself, so the job
// ends cleanly after the timeouts. Each rank prints its verdict and exits non-zero on failure.
//
// Phase 1: rank 2 stays away from all-reduce #1; ranks 0 and 1 time out naming it, then rank 2
// calls it late and fails too.
// Phase 2: rank 1 stops itself (SIGSTOP) before barrier #0 of a second communicator; ranks 0 and
// 2 time out naming it as silent, then rank 0 continues it (SIGCONT).
// Phase 3: ranks 0 and 1 wait on two all-reduces from two threads each while rank 2 stays away.
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "core/communicator.h"
#include "core/error.h"

using namespace moert;

namespace {

// The error an operation on `comm` throws, or "" when it completes.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code() == Code::Comm ? e.what() : "wrong code: " + std::string(e.what());
  }
  return "";
}

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::vector<std::string> failures;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok) failures.push_back(what);
  };
  if (size != 3) {
    std::fprintf(stderr, "run with 3 ranks\n");
    MPI_Finalize();
    return 2;
  }
  // Long enough for the probe's window (a quarter of it) on a loaded machine.
  constexpr double kTimeout = 4.0;
  // Rank 2 stays away from an operation until ranks 0 and 1 have given up on it, and no longer:
  // they tell it so through the world communicator, which moert's communicators do not use.
  constexpr int kGivenUp = 77;
  auto given_up = [&] {
    int none = 0;
    MPI_Send(&none, 1, MPI_INT, 2, kGivenUp, MPI_COMM_WORLD);
  };
  auto wait_until_given_up = [&] {
    for (int from : {0, 1}) {
      int none = 0;
      MPI_Recv(&none, 1, MPI_INT, from, kGivenUp, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
  };
  MpiCommOptions options;
  options.timeout = 120.0;  // creation and the healthy operations
  options.plugin_path = MOERT_MPI_PLUGIN_PATH;
  MPI_Comm world = MPI_COMM_WORLD;
  try {
    // Phase 1: a live rank that never calls.
    {
      auto comm = make_mpi_communicator(&world, options);
      int64_t one = 1;
      comm->all_reduce_sum(&one, 1, ReduceType::I64);  // #0, healthy
      comm->set_timeout(kTimeout);
      if (rank == 2) {
        wait_until_given_up();
        const std::string e = error_of([&] { comm->all_reduce_sum(&one, 1, ReduceType::I64); });
        expect(!e.empty(), "rank 2's late all-reduce completed");
        std::printf("rank 2, late: %s\n", e.c_str());
      } else {
        const std::string e = error_of([&] { comm->all_reduce_sum(&one, 1, ReduceType::I64); });
        std::printf("rank %d, phase 1: %s\n", rank, e.c_str());
        // This rank's own timeout, or the other one's relayed (whichever came first).
        expect(has(e, "all-reduce #1 did not complete") || has(e, "all-reduce #1 timed out"),
               "phase 1: no timeout: " + e);
        expect(has(e, "rank 2 (last started #0) has not reached #1"),
               "phase 1: the message does not name rank 2 as behind: " + e);
        expect(has(e, "reached #1 too"),
               "phase 1: the message does not say that the other peer waits too: " + e);
        given_up();
      }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    // Phase 2: a stopped rank.
    {
      auto comm = make_mpi_communicator(&world, options);
      std::vector<int> pids(3);
      int pid = getpid();
      MPI_Allgather(&pid, 1, MPI_INT, pids.data(), 1, MPI_INT, MPI_COMM_WORLD);
      comm->set_timeout(kTimeout / 2);
      if (rank == 1) {
        raise(SIGSTOP);
        const std::string e = error_of([&] { comm->barrier(); });
        expect(!e.empty(), "rank 1's barrier after SIGCONT completed");
        std::printf("rank 1, continued: %s\n", e.c_str());
      } else {
        const std::string e = error_of([&] { comm->barrier(); });
        std::printf("rank %d, phase 2: %s\n", rank, e.c_str());
        expect(has(e, "barrier #0 did not complete") || has(e, "barrier #0 timed out"),
               "phase 2: no timeout: " + e);
        expect(has(e, "rank 1 does not answer"),
               "phase 2: the message does not name rank 1 as silent: " + e);
        if (rank == 0) {
          // Both survivors have given up by now, or soon; rank 1 goes on.
          std::this_thread::sleep_for(std::chrono::duration<double>(kTimeout / 2));
          kill(pids[1], SIGCONT);
        }
      }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    // Phase 3: two threads of each present rank give up on two operations at once; each error
    // comes within the timeout and the probe's window and names the absent rank.
    {
      auto comm = make_mpi_communicator(&world, options);
      const double timeout = kTimeout;  // the probe's window: 1 s
      comm->set_timeout(timeout);
      if (rank == 2) {
        wait_until_given_up();
      } else {
        int64_t a = 1, b = 1;
        auto first = comm->start_all_reduce_sum(&a, 1, ReduceType::I64);
        auto second = comm->start_all_reduce_sum(&b, 1, ReduceType::I64);
        const auto t0 = std::chrono::steady_clock::now();
        std::string errors[2];
        double waited[2] = {0, 0};
        auto wait = [&](Request& r, int k) {
          errors[k] = error_of([&] { r->wait(); });
          waited[k] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        };
        std::thread t1([&] { wait(first, 0); });
        std::thread t2([&] { wait(second, 1); });
        t1.join();
        t2.join();
        for (int k = 0; k < 2; ++k) {
          std::printf("rank %d, phase 3, #%d after %.2f s: %s\n", rank, k, waited[k],
                      errors[k].c_str());
          expect(has(errors[k], "rank 2"),
                 cat("phase 3: #", k, " does not name the absent rank: ", errors[k]));
          // Both probes are answered at once (the peers' progress threads answer within
          // milliseconds): well before the window's end, where a probe left unserved would
          // keep its thread waiting (timeout + 1.25 s).
          expect(waited[k] < timeout + 0.75, cat("phase 3: #", k, " took ", waited[k], " s"));
        }
        given_up();
      }
    }
  } catch (const std::exception& e) {
    failures.push_back(std::string("unexpected: ") + e.what());
  }
  for (const auto& f : failures) std::printf("rank %d FAIL: %s\n", rank, f.c_str());
  if (failures.empty()) std::printf("rank %d ok\n", rank);
  std::fflush(stdout);
  int bad = failures.empty() ? 0 : 1, any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
