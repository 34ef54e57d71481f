#include "cli/library.h"

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "cli/error.h"

namespace moert_cli {

void check(moert_status* status, const std::string& what) {
  if (!status) return;
  std::string message = moert_status_message(status);
  moert_status_free(status);
  fail(what, ": ", message);
}

ModelPtr load_model_bytes(const std::vector<uint8_t>& bytes, const std::string& external_dir,
                          const std::string& origin, int32_t* refusal, LoadWeights weights) {
  // The command loads what its user names or what it generates itself: the library's default
  // limits, meant for services loading files they did not write, would only refuse large models
  // here. Physical memory remains the bound.
  moert_load_options* raw = nullptr;
  check(moert_load_options_create(&raw), "load options");
  std::unique_ptr<moert_load_options, decltype(&moert_load_options_free)> options(
      raw, moert_load_options_free);
  check(moert_load_options_set_max_memory(options.get(), UINT64_MAX), "load options");
  check(moert_load_options_set_max_file_bytes(options.get(), UINT64_MAX), "load options");
  if (weights == LoadWeights::DescriptionOnly)
    check(moert_load_options_set_description_only(options.get(), 1), "load options");
  moert_model* m = nullptr;
  moert_status* status = moert_model_load_buffer_with_options(
      bytes.data(), bytes.size(), external_dir.empty() ? nullptr : external_dir.c_str(),
      options.get(), &m);
  if (status && refusal) *refusal = moert_status_code(status);
  check(status, origin);
  return ModelPtr(m);
}

Job& Job::operator=(Job&& o) noexcept {
  if (this != &o) {
    moert_comm_free(device_comm);
    moert_comm_free(comm);
    comm = std::exchange(o.comm, nullptr);
    device_comm = std::exchange(o.device_comm, nullptr);
    rank = o.rank;
    size = o.size;
    expert_parallel = o.expert_parallel;
    gpu = o.gpu;
  }
  return *this;
}

void Job::sum(double* values, uint64_t n) const {
  if (comm) check(moert_comm_all_reduce_sum(comm, values, n), "all-reduce");
}

namespace {

// The message of a failed call, or "" (the status is freed).
std::string failure(moert_status* status) {
  if (!status) return "";
  std::string message = moert_status_message(status);
  moert_status_free(status);
  return message.empty() ? "failed" : message;
}

void join_nccl(Job& job, double timeout) {
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const int32_t gpu = job.gpu = local ? std::atoi(local) : 0;
  // Rank 0's id, byte by byte as doubles (exact), summed with the others' zeros.
  std::vector<double> shipped(MOERT_NCCL_UNIQUE_ID_BYTES, 0.0);
  std::string why;
  uint8_t id[MOERT_NCCL_UNIQUE_ID_BYTES] = {};
  if (job.rank == 0) {
    why = failure(moert_comm_nccl_unique_id(id, sizeof id));
    for (size_t i = 0; i < sizeof id; ++i) shipped[i] = id[i];
  }
  // Each rank's GPU, tried alone first (a one-rank NCCL communicator on its own id), so that a
  // rank without one fails every rank now rather than leaving the others in NCCL's creation.
  if (why.empty()) {
    uint8_t own[MOERT_NCCL_UNIQUE_ID_BYTES];
    why = failure(moert_comm_nccl_unique_id(own, sizeof own));
    moert_comm* probe = nullptr;
    if (why.empty()) why = failure(moert_comm_create_nccl(own, sizeof own, 0, 1, gpu, &probe));
    moert_comm_free(probe);
  }
  job.prepare_together("use NCCL on its GPU (--device cuda under mpirun)", [&] {
    if (!why.empty())
      fail("--device cuda under mpirun: cannot use NCCL on GPU ", gpu, " (its local rank): ", why);
  });
  job.sum(shipped.data(), shipped.size());
  for (size_t i = 0; i < sizeof id; ++i) id[i] = static_cast<uint8_t>(shipped[i]);
  check(timeout > 0
            ? moert_comm_create_nccl_with_timeout(id, sizeof id, job.rank, job.size, gpu, timeout,
                                                  &job.device_comm)
            : moert_comm_create_nccl(id, sizeof id, job.rank, job.size, gpu, &job.device_comm),
        "NCCL");
}

}  // namespace

void Job::fail_together(const std::string& line, int code) const {
  // Every rank prints its line before any rank exits: mpirun ends the job when the first rank
  // exits with an error, and a rank it kills before it printed loses its line, the failing
  // rank's own reason with it (seen as a flaky parallel_cli_train under load).
  print_error(command_name(), line);
  std::fflush(stderr);
  double printed = 0.0;
  // The lines are out; a rank gone since the agreement only loses the wait.
  if (comm) moert_status_free(moert_comm_all_reduce_sum(comm, &printed, 1));
  throw ReportedError(line, code);
}

void Job::agree_prepared(const char* what, std::exception_ptr failed) const {
  // This rank's exit code (0: it succeeded) and, when it failed, its line.
  int mine = 0;
  std::string line;
  if (failed) {
    mine = 1;
    const std::string who = cat("rank ", rank, " of the job's ", size, ": ");
    try {
      std::rethrow_exception(failed);
    } catch (const UsageError& e) {
      mine = 2;
      line = who + e.message();
    } catch (const Error& e) {
      line = who + e.message();
    } catch (const std::bad_alloc&) {
      line = who + "out of memory";
    } catch (const std::exception& e) {
      line = who + e.what();
    } catch (...) {
      // Whatever it was, this rank prints and waits like the others: none is left in the sum.
      line = who + "failed (an unknown exception)";
    }
  }
  // Each rank's code, summed: every rank learns which ranks failed, and every rank exits with
  // the first failing rank's code, so that mpirun's does not depend on which rank exits first.
  std::vector<double> codes(static_cast<size_t>(size), 0.0);
  codes[static_cast<size_t>(rank)] = mine;
  sum(codes.data(), codes.size());
  int32_t first = -1;
  for (int32_t r = 0; r < size && first < 0; ++r)
    if (codes[static_cast<size_t>(r)] != 0.0) first = r;
  if (first < 0) return;
  const int code = static_cast<int>(codes[static_cast<size_t>(first)]);
  // Named like the others' messages name it: under mpirun each rank's line is printed apart.
  if (!failed)
    line = cat("rank ", first, " of the job's ", size, " could not ", what,
               " (its own message says why); no rank went on");
  fail_together(line, code);
}

Launch mpirun_launch() {
  Launch l;
  const char* size = std::getenv("OMPI_COMM_WORLD_SIZE");
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  if (size) l.size = std::atoi(size);
  if (rank) l.rank = std::atoi(rank);
  return l;
}

namespace {

// Whether every rank passed the same 64-bit `hash`, learnt through the C ABI's all-reduce of
// doubles: its eight bytes, each summed with its square over the ranks; the bytes are all equal
// exactly when size * sum(v^2) == sum(v)^2, and every figure is an integer that a double holds
// exactly for jobs of up to 300,000 ranks.
bool same_on_every_rank(moert_comm* comm, int32_t size, uint64_t h) {
  double sums[16];
  for (int i = 0; i < 8; ++i) {
    const double v = static_cast<double>((h >> (8 * i)) & 0xFF);
    sums[2 * i] = v;
    sums[2 * i + 1] = v * v;
  }
  check(moert_comm_all_reduce_sum(comm, sums, 16), "MPI");
  for (int i = 0; i < 8; ++i)
    if (static_cast<double>(size) * sums[2 * i + 1] != sums[2 * i] * sums[2 * i]) return false;
  return true;
}

}  // namespace

uint64_t TextHash::add(std::span<const uint8_t> bytes) {
  for (const uint8_t c : bytes) h_ = (h_ ^ c) * 0x100000001b3ull;
  return h_;
}

bool Job::same(uint64_t hash) const { return alone() || same_on_every_rank(comm, size, hash); }

Job join_job(int64_t expert_parallel, int32_t device, double comm_timeout,
             const std::string& arguments) {
  Job job;
  if (expert_parallel == 0) {
    if (const Launch l = mpirun_launch(); l.size > 1)
      usage_fail("started by mpirun with ", l.size,
                 " processes: pass --expert-parallel EP to share the work (EP = 1 for data "
                 "parallelism only), or run one process");
    return job;
  }
  // The creation waits as long as the collectives: a rank that never comes to it fails the
  // others within --comm-timeout.
  check(comm_timeout > 0 ? moert_comm_create_mpi_with_timeout(nullptr, comm_timeout, &job.comm)
                         : moert_comm_create_mpi(nullptr, &job.comm),
        "MPI");
  check(moert_comm_rank(job.comm, &job.rank), "MPI");
  check(moert_comm_size(job.comm, &job.size), "MPI");
  // Refusals every rank makes alike: each prints before any exits (fail_together).
  if (!same_on_every_rank(
          job.comm, job.size,
          TextHash().add({reinterpret_cast<const uint8_t*>(arguments.data()), arguments.size()})))
    job.fail_together(cat("the job's ", job.size,
                          " processes were started with different arguments (threads and "
                          "--comm-timeout aside): every rank takes the same command line"),
                      2);
  if (expert_parallel > job.size || job.size % expert_parallel != 0)
    job.fail_together(
        cat("--expert-parallel ", expert_parallel, " does not divide the job's ", job.size,
            " process", job.size == 1 ? "" : "es",
            job.size == 1 ? ": run a job of N processes (mpirun -np N, N a multiple of EP)" : ""),
        2);
  job.expert_parallel = static_cast<int32_t>(expert_parallel);
  if (device == MOERT_DEVICE_CUDA) {
    // The CUDA sessions' collectives run on the NCCL communicator: it waits as long.
    join_nccl(job, comm_timeout);
  }
  return job;
}

SessionPtr create_session(const moert_model* model, const SessionConfig& config) {
  moert_session_options* raw = nullptr;
  check(moert_session_options_create(&raw), "session options");
  OptionsPtr options(raw);
  // Under mpirun a CUDA session computes on the GPU its rank's NCCL communicator is on.
  const int32_t index = config.job && config.device == MOERT_DEVICE_CUDA ? config.job->gpu : 0;
  check(moert_session_options_set_device(options.get(), config.device, index), "device");
  check(moert_session_options_set_threads(options.get(), config.threads), "threads");
  check(moert_session_options_set_seed(options.get(), config.seed), "seed");
  check(moert_session_options_set_mode(
            options.get(), config.training ? MOERT_MODE_TRAINING : MOERT_MODE_INFERENCE),
        "mode");
  for (const auto& [key, value] : config.knobs)
    check(moert_session_options_set_config(options.get(), key.c_str(), value.c_str()),
          "option " + key);
  if (config.job && !config.job->alone())
    check(moert_session_options_set_comm(options.get(), config.job->session_comm(config.device),
                                         config.job->expert_parallel),
          "expert parallelism");
  moert_session* s = nullptr;
  check(moert_session_create(model, options.get(), &s), "session");
  return SessionPtr(s);
}

std::vector<uint32_t> moe_layer_indices(const moert_model* model) {
  uint32_t n = 0;
  check(moert_model_num_layers(model, &n), "model");
  std::vector<uint32_t> out;
  for (uint32_t i = 0; i < n; ++i) {
    int32_t kind = 0;
    check(moert_model_layer_kind(model, i, &kind), "model");
    if (kind == MOERT_LAYER_MOE) out.push_back(i);
  }
  return out;
}

int64_t moe_int(const moert_model* model, uint32_t layer, int32_t key) {
  int64_t v = 0;
  check(moert_model_moe_int(model, layer, key, &v), "MoE setting");
  return v;
}

double moe_float(const moert_model* model, uint32_t layer, int32_t key) {
  double v = 0.0;
  check(moert_model_moe_float(model, layer, key, &v), "MoE setting");
  return v;
}

}  // namespace moert_cli
