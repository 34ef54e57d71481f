// Evaluation of a character-level model on a token stream: the CLI computes the cross-entropy
// itself from the logits of eval-mode forward passes, and reads the routing metrics the library
// accumulated over the same passes (MOERT_COUNTS_EVAL).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cli/library.h"

namespace moert_cli {

class Progress;

struct EvalResult {
  uint64_t tokens = 0;
  double loss = 0.0;            // mean cross-entropy, nats per character
  double perplexity = 0.0;      // exp(loss)
  double max_vio_global = 0.0;  // mean over MoE layers of MaxVio over the whole evaluation
  std::vector<double> layer_max_vio;
  std::vector<std::vector<int64_t>> counts;  // per MoE layer, tokens per expert
  uint64_t dead_experts = 0, experts = 0;    // dead: no token at all
};

// Positions (indices of predicted characters) of `stream` used for evaluation: every position from
// `context` on, or `max_rows` of them evenly spaced when there are more (0 = no limit).
std::vector<uint64_t> eval_positions(uint64_t stream_size, uint32_t context, uint64_t max_rows);

// Fills rows of `context` ids ending just before each position, and the targets.
void gather_rows(const std::vector<int32_t>& stream, uint32_t context, const uint64_t* positions,
                 uint64_t rows, int32_t* tokens, int32_t* targets);

// Mean softmax cross-entropy of `rows` rows of logits against `targets`, in double precision
// (glibc's exp: a figure to print, not a gradient), on up to `threads` threads (the caller's among
// them); 0 for no rows. Rows are summed in fixed blocks, so the result has the same bits for any
// thread count.
double cross_entropy(const float* logits, const int32_t* targets, uint64_t rows, uint32_t vocab,
                     unsigned threads = 1);

// A perplexity as printed: 3 decimals below 10^5, in exponent form from there (a diverged run's
// exp(loss) has 150 digits, which broke the table).
std::string perplexity_text(double perplexity);

// `training_session`: the session is in training mode and is switched to eval mode for the pass
// (and back); an inference session counts eval metrics as it is. `threads`: the session's, which
// the cross-entropy between its passes uses too. `job` (may be null): the ranks the session's work
// is shared with; each evaluates its slice of every batch, and the figures are the job's.
EvalResult evaluate(moert_session* session, const moert_model* model,
                    const std::vector<int32_t>& stream, uint32_t context,
                    const std::vector<uint64_t>& positions, uint64_t batch, bool training_session,
                    unsigned threads, Progress* progress, const Job* job = nullptr);

}  // namespace moert_cli
