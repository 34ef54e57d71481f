#include "cli/trainer.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <string>

#include "cli/error.h"
#include "cli/progress.h"

namespace moert_cli {
namespace {

// SplitMix64: a small, well-mixed generator whose sequence is fixed by the seed alone, so every
// strategy sees the same batches.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n); the modulo bias is below n / 2^64, far under any effect measured here.
  uint64_t below(uint64_t n) { return next() % n; }

 private:
  uint64_t state_;
};

std::string number(double v) { return cat(v); }

}  // namespace

StepCsv::StepCsv(const std::string& path) : path_(path) {
  // Opened without truncating, so that a file another run is writing (it holds the lock) keeps
  // its rows: two runs writing one file interleaved their rows, both "succeeding". A FIFO or a
  // device (/dev/stdout) is written as it is, unlocked.
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0666);
  if (fd_ < 0) fail(path, ": cannot open for writing: ", std::strerror(errno));
  struct stat st {};
  regular_ = ::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode);
  if (regular_) {
    int locked = 0;
    do {
      locked = ::flock(fd_, LOCK_EX | LOCK_NB);
    } while (locked != 0 && errno == EINTR);
    if (locked != 0 && errno == EWOULDBLOCK) {
      ::close(fd_);
      fd_ = -1;
      fail(path,
           ": another process is writing its per-step rows there (a --csv of another run): "
           "name another file");
    }
    // Other failures (a file system without locks): written unlocked, as before.
    if (::ftruncate(fd_, 0) != 0) {
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      fail(path, ": cannot truncate it: ", std::strerror(err));
    }
  }
  write("strategy,step,train_loss,aux_loss,max_vio_batch,lr,grad_norm\n");
}

StepCsv::~StepCsv() {
  if (fd_ >= 0) ::close(fd_);  // also releases the lock
}

// A row at a time, straight to the file (no buffer): `tail -f` sees whole rows as they come, and
// a run killed midway leaves whole rows behind.
void StepCsv::write(const std::string& row) {
  if (failed_) return;
  size_t done = 0;
  while (done < row.size()) {
    const ssize_t n = ::write(fd_, row.data() + done, row.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      // A full disk: the row went in part. The file is cut back to its last whole row, so that
      // what it holds reads as a CSV; close() reports the failure.
      error_ = n < 0 ? errno : ENOSPC;
      failed_ = true;
      if (regular_ && ::ftruncate(fd_, complete_) != 0) {
        // The write error is reported all the same.
      }
      return;
    }
    done += static_cast<size_t>(n);
  }
  complete_ += static_cast<off_t>(row.size());
}

void StepCsv::add(const std::string& label, const StepRecord& r) {
  // Labels such as "loss-free(gamma=0.01)" hold no comma or quote, so they need no quoting.
  char numbers[512];  // %.6f of fp32's largest value takes 46 characters
  std::snprintf(numbers, sizeof numbers, ",%llu,%.6f,%.6g,%.6f,%.6g,%.6g\n",
                static_cast<unsigned long long>(r.step), r.train_loss, r.aux_loss, r.max_vio_batch,
                r.lr, r.grad_norm);
  write(label + numbers);
}

void StepCsv::close() {
  if (fd_ < 0) return;
  const bool closed = ::close(fd_) == 0;
  const int err = errno;
  fd_ = -1;
  if (failed_)
    fail(path_, ": cannot write: ", std::strerror(error_),
         " (it holds the rows written before, whole)");
  if (!closed) fail(path_, ": cannot write: ", std::strerror(err));
}

RunResult train_run(const moert_model* model, const std::string& label,
                    const std::vector<int32_t>& train, const std::vector<int32_t>& validation,
                    uint32_t context, const TrainSettings& st, StepCsv* csv) {
  int32_t input_kind = 0;
  uint32_t width = 0, vocab = 0;
  check(moert_model_io(model, &input_kind, &width, &vocab), "model");
  if (input_kind != MOERT_INPUT_TOKENS || width != context)
    fail("the model must read rows of ", context, " token ids");
  if (train.size() <= context) fail("the training text is shorter than the context");

  const Job alone;
  const Job& job = st.job ? *st.job : alone;
  SessionConfig config;
  config.job = &job;
  config.device = st.device;
  config.threads = st.threads;
  config.seed = st.seed;
  config.training = true;
  config.knobs = {{"optimizer", "adamw"},
                  {"lr", number(st.lr)},
                  {"min_lr", number(st.min_lr)},
                  {"warmup_steps", cat(st.warmup)},
                  {"total_steps", cat(st.steps)},
                  {"clip_norm", number(st.clip_norm)},
                  {"weight_decay", number(st.weight_decay)},
                  {"precision", st.precision},
                  {"fp8_scales", st.fp8_scales},
                  // The auxiliary loss of the whole batch, not of each rank's slice: a job of
                  // any size then trains as one process does.
                  {"aux_loss_scope", "global"}};
  RunResult result;
  result.label = label;
  result.session = create_session(model, config);
  moert_session* s = result.session.get();

  bool has_aux = false;
  for (uint32_t l : moe_layer_indices(model)) {
    const int64_t p = moe_int(model, l, MOERT_MOE_BALANCING_POLICY);
    has_aux = has_aux || p == MOERT_BALANCING_AUX_LOSS || p == MOERT_BALANCING_SEQUENCE_AUX_LOSS;
  }

  SplitMix64 rng(st.seed);
  const uint64_t B = st.batch;
  if (B % static_cast<uint64_t>(job.size) != 0)
    fail("a batch of ", B, " rows does not split evenly over ", job.size, " ranks");
  // Every rank draws the global batch; this rank feeds rows [first, first + n).
  const uint64_t n = B / static_cast<uint64_t>(job.size),
                 first = n * static_cast<uint64_t>(job.rank);
  std::vector<uint64_t> positions(B);
  std::vector<int32_t> tokens(n * context), targets(n);
  std::vector<float> logits(n * vocab);
  result.steps.reserve(st.steps);
  Progress progress(label, st.steps, st.log_every);
  double loss_window = 0.0, vio_window = 0.0;
  constexpr uint64_t kWindow =
      50;  // live figures are means over the last steps, not one noisy batch
  auto live = [&](uint64_t done) {
    const double w = static_cast<double>(std::min<uint64_t>(done, kWindow));
    char buf[64];
    std::snprintf(buf, sizeof buf, "loss %.3f  MaxVio %.3f", loss_window / w, vio_window / w);
    return std::string(buf);
  };

  for (uint64_t step = 1; step <= st.steps; ++step) {
    for (uint64_t r = 0; r < B; ++r) positions[r] = context + rng.below(train.size() - context);
    gather_rows(train, context, positions.data() + first, n, tokens.data(), targets.data());
    check(moert_session_zero_grad(s), "zero_grad");
    check(moert_session_forward_tokens(s, tokens.data(), n * context, n, logits.data(), n * vocab),
          cat("step ", step, ": forward"));
    StepRecord rec;
    rec.step = step;
    // The batch's cross-entropy. Without an auxiliary loss it is the library's loss, computed in
    // parallel over the whole job's rows. With one, the library returns the sum: the
    // cross-entropy is then computed here too, on as many threads as the session's (one took 5 %
    // of a step while the session's threads waited), this rank's rows' sum summed over the ranks.
    if (has_aux) {
      rec.train_loss = cross_entropy(logits.data(), targets.data(), n, vocab, st.threads) *
                       static_cast<double>(n);
      job.sum(&rec.train_loss, 1);
      rec.train_loss /= static_cast<double>(B);
    }
    double total = 0.0;
    check(moert_session_backward_loss(s, targets.data(), n, &total),
          cat("step ", step, ": backward"));
    if (has_aux)
      rec.aux_loss = total - rec.train_loss;
    else
      rec.train_loss = total;
    check(moert_session_max_vio(s, MOERT_ALL_LAYERS, MOERT_COUNTS_LAST, &rec.max_vio_batch),
          "MaxVio");
    check(moert_session_step(s, &rec.lr, &rec.grad_norm), cat("step ", step, ": optimizer"));
    if (csv) csv->add(label, rec);
    result.steps.push_back(rec);

    loss_window += rec.train_loss;
    vio_window += rec.max_vio_batch;
    if (step > kWindow) {
      loss_window -= result.steps[step - kWindow - 1].train_loss;
      vio_window -= result.steps[step - kWindow - 1].max_vio_batch;
    }
    progress.update(step, live(step));
  }
  progress.finish(live(st.steps));
  result.train_seconds = progress.elapsed_seconds();

  const uint64_t tail = std::max<uint64_t>(
      1, static_cast<uint64_t>(std::ceil(st.tail_fraction * static_cast<double>(st.steps))));
  double sum = 0.0;
  for (uint64_t i = st.steps - std::min(tail, st.steps); i < st.steps; ++i)
    sum += result.steps[i].max_vio_batch;
  result.tail_max_vio = sum / static_cast<double>(std::min(tail, st.steps));

  const std::vector<uint64_t> pos = eval_positions(validation.size(), context, st.eval_rows);
  Progress eval_progress(label + " validation", pos.size(), pos.size(), "row");
  result.validation = evaluate(s, model, validation, context, pos, st.eval_batch, true, st.threads,
                               &eval_progress, &job);
  eval_progress.finish(cat("loss ", std::round(result.validation.loss * 1e4) / 1e4));
  result.eval_seconds = eval_progress.elapsed_seconds();
  return result;
}

}  // namespace moert_cli
