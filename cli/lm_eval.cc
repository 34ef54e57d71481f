#include "cli/lm_eval.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <thread>

#include "cli/error.h"
#include "cli/progress.h"

namespace moert_cli {

std::vector<uint64_t> eval_positions(uint64_t stream_size, uint32_t context, uint64_t max_rows) {
  if (stream_size <= context)
    fail("the evaluation text (", stream_size, " characters) is not longer than the context (",
         context, ")");
  const uint64_t available = stream_size - context;
  const uint64_t n = max_rows == 0 ? available : std::min(available, max_rows);
  std::vector<uint64_t> pos(n);
  for (uint64_t i = 0; i < n; ++i)
    pos[i] =
        context + static_cast<uint64_t>(static_cast<double>(i) * static_cast<double>(available) /
                                        static_cast<double>(n));
  return pos;
}

void gather_rows(const std::vector<int32_t>& stream, uint32_t context, const uint64_t* positions,
                 uint64_t rows, int32_t* tokens, int32_t* targets) {
  for (uint64_t r = 0; r < rows; ++r) {
    const uint64_t p = positions[r];
    std::copy(stream.begin() + static_cast<std::ptrdiff_t>(p - context),
              stream.begin() + static_cast<std::ptrdiff_t>(p), tokens + r * context);
    targets[r] = stream[p];
  }
}

double cross_entropy(const float* logits, const int32_t* targets, uint64_t rows, uint32_t vocab,
                     unsigned threads) {
  if (rows == 0) return 0.0;
  constexpr uint64_t kBlock = 64;  // rows per partial sum
  const uint64_t blocks = (rows + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  auto run = [&](uint64_t first, uint64_t step) {
    for (uint64_t b = first; b < blocks; b += step) {
      double total = 0.0;
      for (uint64_t r = b * kBlock; r < std::min(rows, (b + 1) * kBlock); ++r) {
        const float* z = logits + r * vocab;
        const double mx = *std::max_element(z, z + vocab);
        double sum = 0.0;
        for (uint32_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(z[v]) - mx);
        total += mx + std::log(sum) - static_cast<double>(z[targets[r]]);
      }
      partial[b] = total;
    }
  };
  // The exponentials took 5 % of a step of `moert train`'s model on one thread, while the
  // session's threads waited: they run on as many, at most one per CPU and two blocks each (a
  // thread costs tens of microseconds to start). A thread that cannot be started leaves its
  // blocks to the caller.
  const uint64_t cpus = std::max(1u, std::thread::hardware_concurrency());
  const uint64_t helpers =
      std::min({static_cast<uint64_t>(std::max(threads, 1u)), cpus, (blocks + 1) / 2}) - 1;
  std::vector<std::thread> pool;
  pool.reserve(helpers);
  std::vector<bool> started(helpers, false);
  for (uint64_t t = 0; t < helpers; ++t) try {
      pool.emplace_back(run, t + 1, helpers + 1);
      started[t] = true;
    } catch (const std::exception&) {
    }
  run(0, helpers + 1);
  for (uint64_t t = 0; t < helpers; ++t)
    if (!started[t]) run(t + 1, helpers + 1);
  for (std::thread& th : pool) th.join();
  double total = 0.0;
  for (double p : partial) total += p;
  return total / static_cast<double>(rows);
}

EvalResult evaluate(moert_session* session, const moert_model* model,
                    const std::vector<int32_t>& stream, uint32_t context,
                    const std::vector<uint64_t>& positions, uint64_t batch, bool training_session,
                    unsigned threads, Progress* progress, const Job* job) {
  uint32_t vocab = 0, width = 0;
  check(moert_model_io(model, nullptr, &width, &vocab), "model");
  if (width != context) fail("the model reads ", width, " tokens per row, not ", context);
  if (training_session) check(moert_session_set_eval(session, 1), "eval mode");
  check(moert_session_reset_metrics(session), "metrics");

  EvalResult r;
  const uint64_t n = positions.size();
  const auto ranks = static_cast<uint64_t>(job ? job->size : 1),
             rank = static_cast<uint64_t>(job ? job->rank : 0);
  // Every pass has the same shape, as a service's would: a last, partial batch is padded with
  // masked rows, which the library leaves out of everything. Among ranks each takes an equal
  // slice of every batch.
  batch = (std::min(batch, n) + ranks - 1) / ranks;
  const uint64_t global = batch * ranks;
  std::vector<int32_t> tokens(batch * context), targets(batch);
  std::vector<float> logits(batch * vocab);
  std::vector<uint8_t> mask(batch);
  double loss_sum = 0.0;
  for (uint64_t b = 0; b < n; b += global) {
    const uint64_t first = std::min(n, b + rank * batch);
    const uint64_t rows = std::min(batch, n - first);
    gather_rows(stream, context, positions.data() + first, rows, tokens.data(), targets.data());
    std::fill(mask.begin(), mask.end(), uint8_t{0});
    std::fill(mask.begin(), mask.begin() + static_cast<std::ptrdiff_t>(rows), uint8_t{1});
    // Padding holds an id outside the vocabulary: it must never be read.
    std::fill(tokens.begin() + static_cast<std::ptrdiff_t>(rows * context), tokens.end(), -1);
    check(moert_session_forward_tokens_masked(session, tokens.data(), batch * context, mask.data(),
                                              batch, batch, logits.data(), batch * vocab),
          "forward");
    if (rows > 0)
      loss_sum += cross_entropy(logits.data(), targets.data(), rows, vocab, threads) *
                  static_cast<double>(rows);
    if (progress) progress->update(std::min(n, b + global), "");
  }
  if (job) job->sum(&loss_sum, 1);
  r.tokens = n;
  r.loss = loss_sum / static_cast<double>(n);
  r.perplexity = std::exp(r.loss);

  const std::vector<uint32_t> moe = moe_layer_indices(model);
  for (uint32_t l : moe) {
    const auto experts = static_cast<uint64_t>(moe_int(model, l, MOERT_MOE_NUM_EXPERTS));
    std::vector<int64_t> counts(experts);
    check(moert_session_expert_counts(session, l, MOERT_COUNTS_EVAL, counts.data(), experts),
          "expert counts");
    double vio = 0.0;
    check(moert_session_max_vio(session, l, MOERT_COUNTS_EVAL, &vio), "MaxVio");
    r.layer_max_vio.push_back(vio);
    r.experts += experts;
    r.dead_experts += static_cast<uint64_t>(std::count(counts.begin(), counts.end(), 0));
    r.counts.push_back(std::move(counts));
  }
  if (!moe.empty())
    check(moert_session_max_vio(session, MOERT_ALL_LAYERS, MOERT_COUNTS_EVAL, &r.max_vio_global),
          "MaxVio");
  if (training_session) check(moert_session_set_eval(session, 0), "eval mode");
  return r;
}

std::string perplexity_text(double perplexity) {
  char text[32];
  std::snprintf(text, sizeof text, perplexity < 1e5 ? "%.3f" : "%.2e", perplexity);
  return text;
}

}  // namespace moert_cli
