// Owning wrappers over the handles of the public C ABI (moert.h), and the conversion of a returned
// status into an Error. This is the only way the CLI reaches the library.
#pragma once

#include <moert/moert.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace moert_cli {

// Throws Error("<what>: <library message>") when `status` is not NULL; frees it either way.
void check(moert_status* status, const std::string& what);

struct ModelDeleter {
  void operator()(moert_model* m) const { moert_model_free(m); }
};
struct SessionDeleter {
  void operator()(moert_session* s) const { moert_session_free(s); }
};
struct OptionsDeleter {
  void operator()(moert_session_options* o) const { moert_session_options_free(o); }
};
using ModelPtr = std::unique_ptr<moert_model, ModelDeleter>;
using SessionPtr = std::unique_ptr<moert_session, SessionDeleter>;
using OptionsPtr = std::unique_ptr<moert_session_options, OptionsDeleter>;

// What a load builds: the model whole, or its description alone (no tensor read or initialised;
// moert_load_options_set_description_only), for commands that only describe it.
enum class LoadWeights { Yes, DescriptionOnly };

// Loads a binary model description held in memory; `external_dir` resolves external weights.
// A refusal throws Error, its status code first stored in `*refusal` when given.
ModelPtr load_model_bytes(const std::vector<uint8_t>& bytes, const std::string& external_dir,
                          const std::string& origin, int32_t* refusal = nullptr,
                          LoadWeights weights = LoadWeights::Yes);

// The processes a command shares its work with (`mpirun -np N moert ... --expert-parallel EP`):
// rank 0 prints; every rank computes its share. Alone: rank 0 of 1, no communicator.
struct Job {
  moert_comm* comm = nullptr;  // MPI: the command's own sums, and CPU sessions
  // NCCL over the same ranks, for CUDA sessions (--device cuda): one GPU per rank.
  moert_comm* device_comm = nullptr;
  int32_t rank = 0, size = 1, expert_parallel = 1;
  int32_t gpu = 0;  // this rank's CUDA device (its local rank): device_comm's and its sessions'

  Job() = default;
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;
  Job(Job&& o) noexcept { *this = std::move(o); }
  Job& operator=(Job&& o) noexcept;
  // Frees the handle; MPI is finalised once the sessions holding the communicator are gone too.
  ~Job() {
    moert_comm_free(device_comm);
    moert_comm_free(comm);
  }

  bool alone() const { return comm == nullptr; }
  // The communicator of a session on `device` (MOERT_DEVICE_CPU or MOERT_DEVICE_CUDA).
  moert_comm* session_comm(int32_t device) const {
    return device == MOERT_DEVICE_CUDA && device_comm ? device_comm : comm;
  }
  // In-place sum over the ranks (in rank order: the same bits everywhere); alone, nothing.
  void sum(double* values, uint64_t n) const;
  // Whether every rank holds the same `hash` (a TextHash of what must be alike); alone, true.
  bool same(uint64_t hash) const;
  // A refusal every rank makes alike (after same(), say): prints `line` as this rank's error,
  // waits until every rank has printed, then throws ReportedError(line, code), so that mpirun
  // tearing the job down at the first exit loses no rank's line. Collective; alone, it prints
  // and throws at once.
  [[noreturn]] void fail_together(const std::string& line, int code) const;
  // Runs `prepare` (what a rank reads or opens of its own before the job's work: files, output
  // directories) and then learns whether every rank succeeded, so that no rank waits for a failed
  // one until the communicator's timeout. If one did not, a rank that failed prints its own
  // error, the others one naming the first failing rank; once every rank has printed, each
  // throws ReportedError with the first failing rank's exit code (2 for a usage error, else 1),
  // so that mpirun's is the same whichever rank exits first. Collective; alone, prepare runs as
  // it is and its error is thrown unchanged.
  template <typename F>
  void prepare_together(const char* what, F&& prepare) const {
    std::exception_ptr failed;
    try {
      prepare();
    } catch (...) {
      if (alone()) throw;
      failed = std::current_exception();
    }
    agree_prepared(what, failed);
  }

 private:
  void agree_prepared(const char* what, std::exception_ptr failed) const;
};

// FNV-1a over bytes added piece by piece: the same on every build, unlike std::hash, so that
// ranks compare what they hold (Job::same) without a copy of it.
class TextHash {
 public:
  // Adds `bytes`; returns the hash of everything added so far.
  uint64_t add(std::span<const uint8_t> bytes);
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
};

// What mpirun told this process before MPI is initialised (Open MPI's environment): its rank and
// the job's size; size 0 when the process was not started by mpirun.
struct Launch {
  int32_t rank = 0, size = 0;
};
Launch mpirun_launch();

// Joins the MPI job as the command's --expert-parallel asks (0: not given). Refuses to run one copy
// per rank by accident: under mpirun with more than one rank, --expert-parallel is required. For
// CUDA sessions (`device` MOERT_DEVICE_CUDA) it also creates an NCCL communicator over the same
// ranks: rank 0's NCCL unique id travels over MPI, and each rank takes the GPU of its local rank
// on its node (Open MPI's OMPI_COMM_WORLD_LOCAL_RANK). Where a rank has no NCCL or no such GPU,
// every rank fails with the reason (the ranks agree over MPI before NCCL's collective creation,
// which would wait for the missing rank until its timeout).
// `comm_timeout`: seconds the communicators' creation and every collective of the job wait for
// the other ranks (0: the library's default, 600); a dead rank makes the others fail after it.
// `arguments` (Args::canonical) must be the same on every rank: a rank started with others (another
// --batch, say) would train another job than rank 0 reports; refused on every rank.
Job join_job(int64_t expert_parallel, int32_t device = MOERT_DEVICE_CPU, double comm_timeout = 0,
             const std::string& arguments = "");

struct SessionConfig {
  int32_t device = MOERT_DEVICE_CPU;
  uint32_t threads = 1;
  uint64_t seed = 0;
  bool training = false;
  // Training knobs for moert_session_options_set_config(), applied in order.
  std::vector<std::pair<std::string, std::string>> knobs;
  const Job* job = nullptr;  // sessions over several ranks
};

SessionPtr create_session(const moert_model* model, const SessionConfig& config);

// Indices of the model's MoE layers, in order.
std::vector<uint32_t> moe_layer_indices(const moert_model* model);

int64_t moe_int(const moert_model* model, uint32_t layer, int32_t key);
double moe_float(const moert_model* model, uint32_t layer, int32_t key);

}  // namespace moert_cli
