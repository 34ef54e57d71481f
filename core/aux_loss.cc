#include "core/aux_loss.h"

#include <algorithm>
#include <utility>

#include "core/grad_reduction.h"

namespace moert {

AuxChunks aux_chunks(std::vector<int64_t> seq_offsets) {
  AuxChunks c;
  c.seq_offsets = std::move(seq_offsets);
  c.chunk_offsets.push_back(c.seq_offsets.empty() ? 0 : c.seq_offsets[0]);
  for (int64_t q = 0; q < c.num_seq(); ++q)
    for (int64_t t = c.seq_offsets[q]; t < c.seq_offsets[q + 1];) {
      // Cut from the sequence's own first row, so that the chunks of a sequence do not depend on
      // the sequences before it.
      t = std::min(t + kReduceRows, c.seq_offsets[q + 1]);
      c.chunk_offsets.push_back(t);
      c.chunk_seq.push_back(q);
    }
  return c;
}

AuxTerms aux_terms(const AuxChunks& chunks, const int64_t* counts, const double* psum,
                   int64_t num_experts, int64_t top_k, double alpha) {
  const int64_t E = num_experts, Q = chunks.num_seq();
  int64_t nonempty = 0;
  for (int64_t q = 0; q < Q; ++q)
    if (chunks.seq_offsets[q + 1] > chunks.seq_offsets[q]) ++nonempty;
  AuxTerms t;
  t.coef.assign(static_cast<size_t>(Q * E), 0.0);
  if (nonempty == 0) return t;
  std::vector<int64_t> cnt(static_cast<size_t>(E));
  std::vector<double> ps(static_cast<size_t>(E));
  int64_t c = 0;
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t L = chunks.seq_offsets[q + 1] - chunks.seq_offsets[q];
    std::fill(cnt.begin(), cnt.end(), 0);
    std::fill(ps.begin(), ps.end(), 0.0);
    for (; c < chunks.chunks() && chunks.chunk_seq[c] == q; ++c)
      for (int64_t e = 0; e < E; ++e) {
        cnt[e] += counts[c * E + e];
        ps[e] += psum[c * E + e];
      }
    if (L == 0) continue;
    double seq_loss = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      const double f =
          static_cast<double>(E) / static_cast<double>(top_k * L) * static_cast<double>(cnt[e]);
      const double p = ps[e] / static_cast<double>(L);
      seq_loss += f * p;
      t.coef[q * E + e] = alpha * f / (static_cast<double>(L) * static_cast<double>(nonempty));
    }
    t.loss += alpha * seq_loss / static_cast<double>(nonempty);
  }
  return t;
}

}  // namespace moert
