// The MPI communicator's all-to-all-v against Open MPI's own MPI_Alltoallv (the baseline), and how
// much of it stays exposed when the caller computes while it moves (the overlap the expert-
// parallel layers rely on). Run under mpirun:
//   mpirun -np 2 build/release/bench/moert_comm_bench [bytes per peer ...]
// Rank 0 prints one row per size. Times are the slowest rank's, median of the repetitions.
//   MPI_Alltoallv  the baseline: Open MPI's blocking all-to-all-v over the same buffers
//   moert          start + wait at once (agreement, staging copies, the progress thread)
//   compute        the caller's work alone: a loop sized to twice moert's time
//   overlapped     start, compute, wait; exposed = overlapped - compute (0 when hidden)
//   memcpy floor   the bytes a rank sends and receives, copied once at this machine's memcpy
//                  rate measured in the same run: a lower bound for any shared-memory transport
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/communicator.h"
#include "core/error.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The slowest rank's time.
double slowest(double t) {
  double out = 0;
  MPI_Allreduce(&t, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Work that does not touch the communicator: `iterations` rounds of a dependent chain.
double compute(int64_t iterations) {
  volatile double x = 1.0;
  double acc = 0.0;
  for (int64_t i = 0; i < iterations; ++i) acc += std::sqrt(x + static_cast<double>(i & 1023));
  return acc;
}

// Iterations of compute() that take about `target` seconds.
int64_t calibrate(double target) {
  int64_t n = 1 << 16;
  for (;;) {
    const auto t = Clock::now();
    compute(n);
    const double took = seconds(t, Clock::now());
    if (took > 0.02 || n > (int64_t{1} << 40))
      return std::max<int64_t>(1, static_cast<int64_t>(n * target / took));
    n *= 4;
  }
}

// Bytes per second of one memcpy of `bytes`, best of a few.
double memcpy_rate(size_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 2);
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    best = std::min(best, seconds(t, Clock::now()));
  }
  return static_cast<double>(bytes) / best;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
  if (sizes.empty()) sizes = {4 << 10, 64 << 10, 1 << 20, 8 << 20};
  constexpr int kReps = 9;
  int status = 0;
  try {
    moert::MpiCommOptions options;
    options.plugin_path = MOERT_MPI_PLUGIN_PATH;
    MPI_Comm world = MPI_COMM_WORLD;
    auto comm = moert::make_mpi_communicator(&world, options);
    if (rank == 0) {
      char name[MPI_MAX_PROCESSOR_NAME] = {0};
      int len = 0;
      MPI_Get_processor_name(name, &len);
      std::printf("all-to-all-v, %d ranks on %s (%ld cores online), median of %d, slowest rank\n",
                  size, name, sysconf(_SC_NPROCESSORS_ONLN), kReps);
      std::printf("%12s %14s %10s %7s %10s %11s %9s %9s %13s\n", "bytes/peer", "MPI_Alltoallv",
                  "moert", "ratio", "compute", "overlapped", "exposed", "exposed%", "memcpy floor");
    }
    for (const int64_t bytes : sizes) {
      std::vector<char> send(bytes * size, static_cast<char>(rank)), recv(bytes * size);
      std::vector<int64_t> b(size, bytes), off(size);
      std::vector<int> ib(size, static_cast<int>(bytes)), ioff(size);
      for (int p = 0; p < size; ++p) {
        off[p] = p * bytes;
        ioff[p] = static_cast<int>(p * bytes);
      }
      auto mpi_once = [&] {
        MPI_Alltoallv(send.data(), ib.data(), ioff.data(), MPI_BYTE, recv.data(), ib.data(),
                      ioff.data(), MPI_BYTE, MPI_COMM_WORLD);
      };
      auto start = [&] {
        return comm->start_all_to_all_v(send.data(), b.data(), off.data(), recv.data(), b.data(),
                                        off.data());
      };
      std::vector<double> t_mpi, t_moert, t_compute, t_overlap;
      mpi_once();
      start()->wait();
      for (int r = 0; r < kReps; ++r) {
        MPI_Barrier(MPI_COMM_WORLD);
        auto t = Clock::now();
        mpi_once();
        t_mpi.push_back(slowest(seconds(t, Clock::now())));
        MPI_Barrier(MPI_COMM_WORLD);
        t = Clock::now();
        start()->wait();
        t_moert.push_back(slowest(seconds(t, Clock::now())));
      }
      const double moert_time = median(t_moert);
      // Every rank computes the same amount: rank 0's calibration.
      int64_t iterations = calibrate(std::max(2.0 * moert_time, 1e-3));
      MPI_Bcast(&iterations, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
      for (int r = 0; r < kReps; ++r) {
        MPI_Barrier(MPI_COMM_WORLD);
        auto t = Clock::now();
        compute(iterations);
        t_compute.push_back(slowest(seconds(t, Clock::now())));
        MPI_Barrier(MPI_COMM_WORLD);
        t = Clock::now();
        auto req = start();
        compute(iterations);
        req->wait();
        t_overlap.push_back(slowest(seconds(t, Clock::now())));
      }
      const double floor_s =
          static_cast<double>(2 * bytes * (size - 1)) / memcpy_rate(static_cast<size_t>(bytes));
      if (rank == 0) {
        const double mpi = median(t_mpi), c = median(t_compute), o = median(t_overlap);
        const double exposed = std::max(0.0, o - c);
        std::printf(
            "%12lld %11.3f ms %7.3f ms %6.2fx %7.3f ms %8.3f ms %6.3f ms %8.1f%% %10.3f ms\n",
            static_cast<long long>(bytes), mpi * 1e3, moert_time * 1e3, moert_time / mpi, c * 1e3,
            o * 1e3, exposed * 1e3, 100.0 * exposed / moert_time, floor_s * 1e3);
        std::fflush(stdout);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
