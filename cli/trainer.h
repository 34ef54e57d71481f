// One training run of a character-level model through the C ABI: sampling, the step loop, the
// per-step metrics (CSV), and the final validation.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/library.h"
#include "cli/lm_eval.h"

namespace moert_cli {

struct TrainSettings {
  uint64_t steps = 2500;
  uint64_t batch = 512;
  double lr = 3e-3;
  double min_lr = 3e-4;
  uint64_t warmup = 100;
  double clip_norm = 1.0;
  double weight_decay = 0.0;
  uint32_t threads = 2;
  int32_t device = MOERT_DEVICE_CPU;  // where the trained sessions compute
  std::string precision = "fp32";     // the session option: what the experts' GEMMs multiply in
  std::string fp8_scales = "fp32";    // the session option fp8_scales (precision fp8)
  uint64_t seed = 1;
  double tail_fraction = 0.2;  // the last part of training whose MaxVio_batch is averaged
  uint64_t eval_batch = 2048;
  uint64_t eval_rows = 0;    // 0: every validation position
  uint64_t log_every = 0;    // 0: about ten progress lines when not on a terminal
  const Job* job = nullptr;  // the ranks sharing each batch (expert/data parallelism), if any
};

struct StepRecord {
  uint64_t step = 0;
  double train_loss = 0.0;  // cross-entropy of the step's batch
  double aux_loss = 0.0;    // the auxiliary balancing loss the library added (aux policy only)
  double max_vio_batch = 0.0;
  double lr = 0.0;
  double grad_norm = 0.0;
};

struct RunResult {
  std::string label;
  std::vector<StepRecord> steps;
  double tail_max_vio = 0.0;  // mean MaxVio_batch over the last tail_fraction of the steps
  double train_seconds = 0.0, eval_seconds = 0.0;
  EvalResult validation;
  SessionPtr session;  // the trained session, for diagnostics and checkpoints
};

// Writes the per-step metrics of any number of runs to one CSV file, a row at a time as the runs
// go (`tail -f`, /dev/stdout, a FIFO), so that a run that fails or is killed leaves the rows
// before it, whole. A regular file is locked (flock) while it is written: a second run given the
// same file is refused rather than interleaving its rows.
class StepCsv {
 public:
  explicit StepCsv(const std::string& path);
  ~StepCsv();
  StepCsv(const StepCsv&) = delete;
  StepCsv& operator=(const StepCsv&) = delete;
  void add(const std::string& label, const StepRecord& r);
  // Throws when a row could not be written (a full disk).
  void close();

 private:
  void write(const std::string& row);

  std::string path_;
  int fd_ = -1;
  bool regular_ = false;
  bool failed_ = false;
  int error_ = 0;       // errno of the failed write
  off_t complete_ = 0;  // bytes of whole rows written
};

// Trains `model` (token input, `context` ids per row, an OutputHead over the vocabulary) on the
// `train` stream, then evaluates it on `validation`. Every run with the same settings draws the
// same batches in the same order. With a job of several ranks, every rank draws the same global
// batch and feeds its slice of it (rows [rank B / size, (rank + 1) B / size)): the run is one
// process's over the same batches, and every figure is the job's.
RunResult train_run(const moert_model* model, const std::string& label,
                    const std::vector<int32_t>& train, const std::vector<int32_t>& validation,
                    uint32_t context, const TrainSettings& settings, StepCsv* csv);

}  // namespace moert_cli
