#include "cli/library.h"

#include <cstdlib>

#include "cli/error.h"

namespace moert_cli {

void check(moert_status* status, const std::string& what) {
  if (!status) return;
  std::string message = moert_status_message(status);
  moert_status_free(status);
  fail(what, ": ", message);
}

ModelPtr load_model_bytes(const std::vector<uint8_t>& bytes, const std::string& external_dir,
                          const std::string& origin) {
  // The command loads what its user names or what it generates itself: the library's default
  // limits, meant for services loading files they did not write, would only refuse large models
  // here. Physical memory remains the bound.
  moert_load_options* raw = nullptr;
  check(moert_load_options_create(&raw), "load options");
  std::unique_ptr<moert_load_options, decltype(&moert_load_options_free)> options(
      raw, moert_load_options_free);
  check(moert_load_options_set_max_memory(options.get(), UINT64_MAX), "load options");
  check(moert_load_options_set_max_file_bytes(options.get(), UINT64_MAX), "load options");
  moert_model* m = nullptr;
  check(moert_model_load_buffer_with_options(bytes.data(), bytes.size(),
                                             external_dir.empty() ? nullptr : external_dir.c_str(),
                                             options.get(), &m),
        origin);
  return ModelPtr(m);
}

Job& Job::operator=(Job&& o) noexcept {
  if (this != &o) {
    moert_comm_free(comm);
    comm = std::exchange(o.comm, nullptr);
    rank = o.rank;
    size = o.size;
    expert_parallel = o.expert_parallel;
  }
  return *this;
}

void Job::sum(double* values, uint64_t n) const {
  if (comm) check(moert_comm_all_reduce_sum(comm, values, n), "all-reduce");
}

Launch mpirun_launch() {
  Launch l;
  const char* size = std::getenv("OMPI_COMM_WORLD_SIZE");
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  if (size) l.size = std::atoi(size);
  if (rank) l.rank = std::atoi(rank);
  return l;
}

Job join_job(int64_t expert_parallel) {
  Job job;
  if (expert_parallel == 0) {
    if (const Launch l = mpirun_launch(); l.size > 1)
      usage_fail("started by mpirun with ", l.size,
                 " processes: pass --expert-parallel EP to share the work (EP = 1 for data "
                 "parallelism only), or run one process");
    return job;
  }
  check(moert_comm_create_mpi(nullptr, &job.comm), "MPI");
  check(moert_comm_rank(job.comm, &job.rank), "MPI");
  check(moert_comm_size(job.comm, &job.size), "MPI");
  if (expert_parallel > job.size || job.size % expert_parallel != 0)
    usage_fail("--expert-parallel ", expert_parallel, " does not divide the job's ", job.size,
               " processes");
  job.expert_parallel = static_cast<int32_t>(expert_parallel);
  return job;
}

SessionPtr create_session(const moert_model* model, const SessionConfig& config) {
  moert_session_options* raw = nullptr;
  check(moert_session_options_create(&raw), "session options");
  OptionsPtr options(raw);
  check(moert_session_options_set_device(options.get(), config.device, 0), "device");
  check(moert_session_options_set_threads(options.get(), config.threads), "threads");
  check(moert_session_options_set_seed(options.get(), config.seed), "seed");
  check(moert_session_options_set_mode(
            options.get(), config.training ? MOERT_MODE_TRAINING : MOERT_MODE_INFERENCE),
        "mode");
  for (const auto& [key, value] : config.knobs)
    check(moert_session_options_set_config(options.get(), key.c_str(), value.c_str()),
          "option " + key);
  if (config.job && !config.job->alone())
    check(moert_session_options_set_comm(options.get(), config.job->comm,
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
