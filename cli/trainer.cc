#include "cli/trainer.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

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
  f_ = std::fopen(path.c_str(), "w");
  if (!f_) fail(path, ": cannot open for writing: ", std::strerror(errno));
  std::fputs("strategy,step,train_loss,aux_loss,max_vio_batch,lr,grad_norm\n", f_);
}

StepCsv::~StepCsv() {
  if (f_) std::fclose(f_);
}

void StepCsv::add(const std::string& label, const StepRecord& r) {
  // Labels such as "loss-free(gamma=0.01)" hold no comma or quote, so they need no quoting.
  std::fprintf(f_, "%s,%llu,%.6f,%.6g,%.6f,%.6g,%.6g\n", label.c_str(),
               static_cast<unsigned long long>(r.step), r.train_loss, r.aux_loss, r.max_vio_batch,
               r.lr, r.grad_norm);
}

void StepCsv::close() {
  if (!f_) return;
  const bool bad = std::ferror(f_) != 0;
  const bool closed = std::fclose(f_) == 0;
  f_ = nullptr;
  if (bad || !closed) fail(path_, ": write error");
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
    // parallel over the whole job's rows (computing it here too, on this thread alone, took 5 %
    // of a step while the session's threads waited). With one, the library returns the sum:
    // the cross-entropy is then this rank's rows' sum, summed over the ranks.
    if (has_aux) {
      rec.train_loss =
          cross_entropy(logits.data(), targets.data(), n, vocab) * static_cast<double>(n);
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
  result.validation =
      evaluate(s, model, validation, context, pos, st.eval_batch, true, &eval_progress, &job);
  eval_progress.finish(cat("loss ", std::round(result.validation.loss * 1e4) / 1e4));
  result.eval_seconds = eval_progress.elapsed_seconds();
  return result;
}

}  // namespace moert_cli
