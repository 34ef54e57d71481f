// The auxiliary balancing losses (docs/design.md section 1, item 7) from per-chunk statistics.
//
// Sequence q (rows [seq_offsets[q], seq_offsets[q + 1]), L_q of them; for the Switch/GShard loss
// the whole batch is one sequence) has f_qe = E / (K L_q) * (tokens of q routed to e) and
// P_qe = (1 / L_q) * sum_{t in q} s[t, e] / sum_j s[t, j]; the loss is
// alpha / N * sum_q sum_e f_qe P_qe over the N sequences that hold rows (DeepSeek-V3 report,
// eq. 17-20; Switch Transformer eq. 4-6 with one sequence). The backend computes counts and
// normalised-score sums per chunk of kReduceRows rows (Backend::aux_partials); this folds them per
// sequence, chunk after chunk in row order, so a sequence's statistics have the same bits however
// its chunks were computed — on one process, or gathered from several.
#pragma once

#include <cstdint>
#include <vector>

namespace moert {

// How a batch's sequences are cut into chunks for Backend::aux_partials.
struct AuxChunks {
  std::vector<int64_t> seq_offsets;    // [num_seq + 1]
  std::vector<int64_t> chunk_offsets;  // [chunks + 1]: each sequence cut into kReduceRows rows
  std::vector<int64_t> chunk_seq;      // [chunks]: the sequence of each chunk
  int64_t num_seq() const { return static_cast<int64_t>(seq_offsets.size()) - 1; }
  int64_t chunks() const { return static_cast<int64_t>(chunk_seq.size()); }
};

// Chunks of the sequences [seq_offsets[q], seq_offsets[q + 1]): contiguous, ascending, empty
// ones allowed.
AuxChunks aux_chunks(std::vector<int64_t> seq_offsets);

// The loss and its derivative through P, coef[q * E + e] = alpha f_qe / (L_q N) (0 for an empty
// sequence), for Backend::aux_grad.
struct AuxTerms {
  double loss = 0.0;
  std::vector<double> coef;
};

// counts and psum: [chunks * E], as Backend::aux_partials fills them for `chunks`.
AuxTerms aux_terms(const AuxChunks& chunks, const int64_t* counts, const double* psum,
                   int64_t num_experts, int64_t top_k, double alpha);

}  // namespace moert
