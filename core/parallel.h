// What a session that shares its work with other ranks knows, and the collectives it runs on
// top of a Communicator: which rows are whose, agreement on failure, and the exact combination of
// gradients reduced over rows (docs/design.md section 2, "Expert parallelism").
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "core/communicator.h"
#include "core/error.h"
#include "core/expert_parallel.h"
#include "core/grad_reduction.h"

namespace moert {

class Backend;

// Where a session's time among ranks goes, in seconds since the last reset: the waits are the
// communication that computation did not hide.
struct CommTimes {
  double dispatch = 0.0;   // waiting for tokens (or their output gradients) to arrive
  double combine = 0.0;    // waiting for the experts' results to come back
  double experts = 0.0;    // computing this rank's routed experts
  double gradients = 0.0;  // combining gradients across ranks after a backward
};

// One rank's record in a call's agreement (ParallelContext::agree, and the comparison that opens
// a session's creation): one size for every call, so that ranks in different calls -- one
// creating a session, another in a forward -- meet in the same all-gather and fail by name,
// instead of meeting in collectives of different sizes, which breaks the communicator.
struct CallRecord {
  int32_t failed = 0;
  int32_t code = 0;
  uint64_t session = 0;  // which of the communicator's sessions (number_session()); 0: creation
  char call[24] = {};    // the public function the rank is in
  uint64_t same = 0;     // what every rank must hold alike for this call
  // The failing rank's message, for the others to name; a longer one is cut and ends in "...".
  char message[1000] = {};
};

// Collective over `host` (host memory): every rank's record, in rank order. When the ranks are in
// different calls, every rank throws MOERT_ERR_INVALID_STATE naming them (rank r against rank 0):
// every rank reads the same records in the same order, so every rank refuses alike.
std::vector<CallRecord> gather_call_records(Communicator& host, const CallRecord& mine);

class ParallelContext {
 public:
  // `world`: the job's communicator; `ep` divides its size and the experts of every MoE layer
  // (checked by the session). Collective: splits the world into the data-parallel replicas of
  // each expert shard.
  ParallelContext(std::shared_ptr<Communicator> world, int ep);

  // Collective: binds the context to the session's backend, once it exists. A device
  // communicator (CommMemory::Device) then gets its two views (core/device_comm.h).
  void attach(Backend& be);
  // Numbers the session this context serves among those created over its world communicator
  // (1, 2, ...): the same number on every rank, since creating a session is collective. Every
  // agree() then carries it, so that ranks calling two sessions of one communicator in different
  // orders fail instead of pairing one session's pass with the other's.
  void number_session();
  // The job's ranks, for buffers in backend memory (which is host memory on the CPU).
  Communicator& world() const { return device_world_ ? *device_world_ : *world_; }
  // The job's ranks, for buffers in host memory: the session's own bookkeeping.
  Communicator& host() const { return host_world_ ? *host_world_ : *world_; }
  // How gradients that sum over rows are reduced across ranks. Host backends: by local roots
  // (core/grad_reduction.h), bitwise one process's. Device backends: each rank accumulates its
  // own rows' gradients in acc mode and the session all-reduces them in rank order
  // (Session::reduce_local_gradients): the CUDA backend's GEMMs sum over rows as cuBLASLt
  // chooses, so no split of rows could match one process bit for bit anyway, and roots would
  // need every Wgrad cut into 64-row GEMMs; the result agrees with one process to fp32
  // reassociation of the sum over rows.
  bool root_reduction() const { return root_reduction_; }
  int rank() const { return world_->rank(); }
  int size() const { return world_->size(); }
  int ep() const { return ep_; }
  int dp() const { return size() / ep_; }
  // The replicas of this rank's expert shard (rank order = replica order), for buffers in
  // backend memory; null when DP = 1.
  Communicator* replicas() const {
    return device_replicas_ ? device_replicas_.get() : replicas_.get();
  }
  ExpertSharding sharding(int64_t experts) const { return {size(), ep_, rank(), experts}; }
  // Chunks of every MoE exchange (core/moe_parallel.cc): more overlap communication with the
  // experts' compute, at more, smaller messages; 1: none. Any value gives the same results.
  int64_t chunks() const { return overlap_ ? chunks_ : 1; }
  void set_chunks(int64_t chunks) { chunks_ = chunks; }
  // Whether communication overlaps computation at all (the shared experts and the chunks); off,
  // every exchange is waited for before anything else runs (for measuring what overlap hides).
  bool overlap() const { return overlap_; }
  void set_overlap(bool overlap) { overlap_ = overlap; }

  // Collective: every rank's row count of this pass (rows that take part), and this rank's first
  // row in the global batch.
  void exchange_rows(int64_t rows);
  const std::vector<int64_t>& rows() const { return rows_; }
  int64_t first_row() const { return first_row_; }
  int64_t total_rows() const { return total_rows_; }
  // The global chunk index of this rank's first row, when every rank before it holds a multiple
  // of kReduceRows rows (then the job reduces exactly like one process); otherwise the ranks'
  // chunks are simply laid end to end.
  int64_t first_chunk() const { return first_chunk_; }
  bool aligned() const { return aligned_; }

  // Collective: `local` is this rank's failure in the step just done (null if none), `call` the
  // public function it is in. When any rank failed, every rank throws: the failing ranks their
  // own error, the others an error of the same code naming the first failing rank and its
  // message; when the ranks are in different calls, or passed different `same` (what the call
  // needs every rank to hold alike, described by `same_what`), every rank throws
  // MOERT_ERR_INVALID_STATE naming them. Use at every point where a rank may have failed alone,
  // before the next collective would leave the others waiting.
  void agree(std::exception_ptr local, const char* call, uint64_t same = 0,
             const char* same_what = nullptr);
  // While alive, around a call where some ranks do file I/O of about `io_bytes` that the others
  // wait for (rank 0 gathering and writing a checkpoint, a slow rank reading one): every
  // communicator the session waits on allows its timeout plus those bytes at 10 MB/s (a slow
  // network file system), so that a large file does not time the waiting ranks out while a live
  // rank writes it. Each timeout is restored at the end unless it was changed meanwhile
  // (moert_comm_set_timeout on another thread): then the caller's value stays.
  class IoAllowance {
   public:
    IoAllowance(ParallelContext& par, double io_bytes);
    ~IoAllowance();
    IoAllowance(const IoAllowance&) = delete;
    IoAllowance& operator=(const IoAllowance&) = delete;

   private:
    struct Extended {
      Communicator* comm;
      double before, during;
    };
    std::vector<Extended> extended_;
  };

  // Runs this rank's own computation in the middle of a layer's exchanges (its experts, its
  // shared experts). A failure there (an FP8 quantizer meeting a NaN with check_finite off, a
  // kernel's scratch memory) is held instead of thrown: the rank still makes every exchange of
  // the pass, so that its peers are not left waiting for it until the timeout, and the session
  // raises the failure at the call's closing agreement (held_failure()), where every rank fails
  // the call. Once a failure is held, the call's later computations are skipped: their results
  // are discarded with it. A communication failure is thrown at once.
  // Returns whether f ran and succeeded: where it did not, the caller zeroes what f would have
  // sent to the other ranks, so that they meet no garbage of a discarded pass.
  template <typename F>
  bool compute(F&& f) {
    if (held_) return false;
    try {
      f();
      return true;
    } catch (const Error& e) {
      if (e.code() == Code::Comm) throw;
      held_ = std::current_exception();
    } catch (const std::bad_alloc&) {
      held_ = std::make_exception_ptr(Error(Code::OutOfMemory, "out of memory"));
    } catch (const std::exception& e) {
      held_ = std::make_exception_ptr(Error(Code::Internal, cat("internal error: ", e.what())));
    }
    return false;
  }
  // The failure compute() holds, or null; the session drops it when a call begins and ends.
  std::exception_ptr held_failure() const { return held_; }
  void drop_held_failure() { held_ = nullptr; }

  // One gradient's local roots and where its total goes: `acc` (backend memory) of n floats, or
  // for a sparse gradient (the embedding table's: GradRoots::rows) rows of n floats.
  struct Roots {
    GradRoots* roots;
    float* acc;
    int64_t n;
    bool sparse;
  };
  // Collective over `comm`: adds to each gradient's acc the tree sum of the roots every rank of
  // `comm` holds for it (their chunk ranges tile the whole reduction). The result has the bits one
  // process gets reducing every chunk itself (core/grad_reduction.h).
  void combine(Backend& be, Communicator& comm, const std::vector<Roots>& grads);

  // Collective: every rank's values, concatenated in rank order.
  std::vector<double> gather(const std::vector<double>& mine);

  // Collective: one expert tensor's shards, `n` floats from each shard's first replica (ranks
  // 0 .. EP - 1; the other replicas hold copies and send nothing), laid end to end in shard order
  // in `full` on rank 0 (EP * n floats; unused elsewhere, may be null).
  void gather_shards(const float* mine, int64_t n, float* full);

  CommTimes times;

 private:
  uint64_t session_ = 0;  // number_session()
  std::shared_ptr<Communicator> world_;
  std::shared_ptr<Communicator> replicas_;
  // Device communicators' views: backend memory after the backend's queued work, host memory.
  std::unique_ptr<Communicator> device_world_, host_world_, device_replicas_;
  bool root_reduction_ = true;
  int ep_;
  int64_t chunks_ = 2;
  bool overlap_ = true;
  std::vector<int64_t> rows_;
  int64_t first_row_ = 0, total_rows_ = 0, first_chunk_ = 0;
  bool aligned_ = true;
  std::exception_ptr held_;  // compute()
};

}  // namespace moert
