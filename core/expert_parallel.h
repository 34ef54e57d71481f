// Expert parallelism: which rank computes which token-expert assignment, so that every world size
// computes the same GEMMs as one process (docs/design.md section 2, "Expert parallelism").
//
// A job of R ranks runs EP-way expert parallelism and DP = R / EP data parallelism. Rank r is
// shard r % EP of the routed experts (a contiguous range of E / EP experts) and replica r / EP of
// that shard. Each rank feeds its own rows; the job's rows, in rank order, are the global batch
// that one process would see.
//
// Expert e's global list is its assignments in global token order: rank 0's, then rank 1's, ...
// (each rank's in its own token order). One process cuts that list into chunks of kReduceRows
// assignments (the items of its grouped GEMMs and of their weight-gradient reduction). Here the
// chunks of expert e are shared out, contiguously and in order, among the DP replicas of e's
// shard: replica d computes chunks [floor(d J / DP), floor((d + 1) J / DP)) of the J. Every chunk
// thus runs the same GEMM, on the same rows, as on one process; the replicas' weight gradients
// combine over the chunk tree (core/grad_reduction.h) to one process's bits; and the work is
// balanced across replicas to within one chunk whatever the routing.
//
// Everything here is a pure function of the per-rank, per-expert counts, which every rank knows
// after one all-gather, so that the ranks agree on the layout without further messages.
#pragma once

#include <cstdint>
#include <vector>

namespace moert {

struct ExpertSharding {
  int world = 1;        // ranks in the job
  int ep = 1;           // expert-parallel size: shards of the routed experts
  int rank = 0;         // this rank
  int64_t experts = 0;  // routed experts per MoE layer, E

  int dp() const { return world / ep; }
  int shard() const { return rank % ep; }
  int replica() const { return rank / ep; }
  int64_t per_shard() const { return experts / ep; }
  int64_t first_expert() const { return shard() * per_shard(); }
  int shard_of(int64_t expert) const { return static_cast<int>(expert / per_shard()); }
  int rank_of(int shard_index, int replica_index) const { return replica_index * ep + shard_index; }
};

// The layout of one MoE layer's assignments over the job for one forward pass.
class ExpertLayout {
 public:
  // counts: [world * E], counts[r * E + e] = rank r's assignments to expert e. The replicas of a
  // shard split each expert's positions into ranges that start at multiples of align_rows (a
  // multiple of the reduction's chunk_rows; 0: chunk_rows).
  ExpertLayout(const ExpertSharding& sharding, std::vector<int64_t> counts, int64_t chunk_rows,
               int64_t align_rows = 0);

  const ExpertSharding& sharding() const { return s_; }
  // Assignments to expert e over the job, and the global position of rank r's first one.
  int64_t total(int64_t e) const { return total_[e]; }
  int64_t first_position(int r, int64_t e) const { return prefix_[r * s_.experts + e]; }
  const std::vector<int64_t>& totals() const { return total_; }

  // The global positions [lo, hi) of expert e that replica d of its shard computes.
  int64_t range_begin(int64_t e, int d) const;
  int64_t range_end(int64_t e, int d) const { return range_begin(e, d + 1); }
  // The replica of e's shard that computes global position p of expert e.
  int replica_of(int64_t e, int64_t p) const;
  // The rank that computes global position p of expert e.
  int owner(int64_t e, int64_t p) const { return s_.rank_of(s_.shard_of(e), replica_of(e, p)); }

  // On rank q: its slot for global position p of its expert e (its assignments are laid out
  // expert-major, each local expert's range in global order), and the slot offsets of its local
  // experts [per_shard + 1] — a DispatchPlan's host_offsets for its grouped GEMMs.
  int64_t slot(int q, int64_t e, int64_t p) const;
  std::vector<int64_t> slot_offsets(int q) const;
  // The index of the first chunk that rank q computes of its local expert `local`, in e's chunk
  // tree (GradOut::first_chunk).
  int64_t first_chunk(int q, int64_t local) const;

 private:
  ExpertSharding s_;
  int64_t chunk_, align_;
  std::vector<int64_t> total_;      // [E]
  std::vector<int64_t> prefix_;     // [world * E]
  std::vector<int64_t> slot_base_;  // [world * (per_shard + 1)]: slot_offsets of every rank
};

// How many chunks a pipelined exchange asking for `chunks` makes of per_shard local experts: at
// least one, at most one per expert. The same on every rank.
inline int64_t pipeline_chunks(int64_t chunks, int64_t per_shard) {
  return chunks < 1 ? 1 : chunks < per_shard ? chunks : per_shard;
}

// The chunks of a pipelined exchange: each rank's local experts cut into `chunks` contiguous
// groups, the same on every rank; group c is local experts [c P / chunks, (c + 1) P / chunks) of
// the P per shard. Every rank computes group c while group c + 1's tokens travel and group c - 1's
// results go back.
inline int64_t chunk_first_local(int64_t c, int64_t chunks, int64_t per_shard) {
  return c * per_shard / chunks;
}
inline int64_t chunk_of_local(int64_t local, int64_t chunks, int64_t per_shard) {
  int64_t c = local * chunks / per_shard;
  while (chunk_first_local(c + 1, chunks, per_shard) <= local) ++c;
  while (chunk_first_local(c, chunks, per_shard) > local) --c;
  return c;
}

// What one rank sends in a dispatch, built from its own assignments in expert-major order
// (a DispatchPlan's token, expert and weight lists over `rows` local tokens).
struct DispatchRoute {
  int64_t chunks = 1;
  // [chunk][dest]: the local tokens first needed by dest in that chunk, each sent once, in token
  // order. A destination numbers the rows it gets from this rank in the order they come: chunk 0's
  // first, then chunk 1's ...
  std::vector<std::vector<std::vector<int32_t>>> tokens;
  // [chunk][dest]: one entry per assignment dest computes in that chunk, in this rank's
  // expert-major order: its token's row (in dest's numbering of this rank's rows), its slot on
  // dest, and its gate weight.
  struct Assignment {
    int32_t row;
    int32_t slot;
    float weight;
  };
  std::vector<std::vector<std::vector<Assignment>>> assignments;
  // Per local assignment a (expert-major order): its destination, chunk and index in
  // assignments[chunk][dest], where the combine finds its output.
  std::vector<int32_t> dest, chunk, index;
};

DispatchRoute route_dispatch(const ExpertLayout& layout, const int32_t* token,
                             const int32_t* expert, const float* weight, int64_t assignments,
                             int64_t rows, int64_t chunks = 1);

}  // namespace moert
