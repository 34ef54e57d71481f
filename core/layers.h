// Runtime layers: one object per layer of a session, running on the session's backend. Each takes
// its shapes from the layer description and its weights and gradients from the session's
// parameter store, and keeps its working arrays in backend memory.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <vector>

#include "core/aux_loss.h"
#include "core/backend.h"
#include "core/expert_parallel.h"
#include "core/model.h"
#include "core/parallel.h"
#include "core/param_store.h"

namespace moert {

// What a forward pass is for. Train keeps what backward needs and counts tokens for the step's
// balancing update; Eval counts tokens for the evaluation metrics.
enum class Pass { Train, Eval };

class Layer {
 public:
  virtual ~Layer() = default;
  // y[rows, out_width] from x[rows, in_width] (backend memory). With Pass::Train, x must stay
  // valid and unchanged until backward. The embedding takes token ids instead.
  virtual void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) = 0;
  // From dy[rows, out_width] of the last Train pass: dx (overwritten; may be null when nobody
  // needs it) and the parameter gradients (accumulated). Auxiliary losses add their gradient here.
  virtual void backward(Backend& be, const float* dy, float* dx, int64_t rows) = 0;
  // Auxiliary loss of the last Train pass (0 for layers without one).
  virtual double aux_loss() const { return 0.0; }
  // Makes the statistics of the last successful forward pass visible (MoE layers).
  virtual void commit_stats(Pass) {}
  // The pass had no rows (all padding): the layer did not run, and its statistics say so.
  virtual void skip_pass() {}
  // How many items a pass over `rows` rows addresses by 32-bit index (token positions, token-expert
  // assignments); the session refuses row counts that would take it past 2^31 - 1.
  virtual int64_t indexed_items(int64_t rows) const { return rows; }
  // Sizes what a backward of the last Train pass's `rows` rows allocates outside the
  // computations that ParallelContext::compute holds (dx_given: whether backward gets a dx), so
  // that among ranks a rank that cannot have them fails the call's opening agreement, before any
  // exchange. Only layers with exchanges of their own need it.
  virtual void reserve_backward(Backend&, int64_t /*rows*/, bool /*dx_given*/) {}
  // The working buffers that passes size to their rows (never parameters or gradients): the
  // bytes they hold, and their release, made only between passes (no backward pending); the next
  // pass sizes them again.
  virtual size_t work_bytes() const { return 0; }
  virtual void release_work() {}
};

class EmbeddingLayer final : public Layer {
 public:
  EmbeddingLayer(const EmbeddingSpec& s, ParamStore& p) : s_(s), p_(p) {}
  void forward(Backend&, const float*, float*, int64_t, Pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;
  // tokens: backend memory, range-checked; kept by pointer until backward.
  void forward_tokens(Backend& be, const int32_t* tokens, float* y, int64_t rows, Pass pass);
  int64_t indexed_items(int64_t rows) const override { return rows * s_.context; }

 private:
  const EmbeddingSpec& s_;
  ParamStore& p_;
  const int32_t* tokens_ = nullptr;
};

class RMSNormLayer final : public Layer {
 public:
  RMSNormLayer(const RMSNormSpec& s, ParamStore& p) : s_(s), p_(p) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;
  size_t work_bytes() const override { return held_bytes(inv_rms_, scratch_); }
  void release_work() override { clear_buffers(inv_rms_, scratch_); }

 private:
  const RMSNormSpec& s_;
  ParamStore& p_;
  const float* x_ = nullptr;
  Buffer<float> inv_rms_, scratch_;
};

class DenseFFNLayer final : public Layer {
 public:
  DenseFFNLayer(const DenseFFNSpec& s, ParamStore& p) : s_(s), p_(p) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;
  size_t work_bytes() const override { return held_bytes(h1_, h3_, scratch_); }
  void release_work() override { clear_buffers(h1_, h3_, scratch_); }

 private:
  const DenseFFNSpec& s_;
  ParamStore& p_;
  const float* x_ = nullptr;
  Buffer<float> h1_, h3_, scratch_;
};

class OutputHeadLayer final : public Layer {
 public:
  OutputHeadLayer(const OutputHeadSpec& s, ParamStore& p) : s_(s), p_(p) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;

 private:
  const OutputHeadSpec& s_;
  ParamStore& p_;
  const float* x_ = nullptr;
};

// Token statistics of one MoE layer, as integers.
struct ExpertCounts {
  std::vector<int64_t> last;  // the last committed forward pass
  std::vector<int64_t> step;  // Train passes since the last optimizer step
  std::vector<int64_t> eval;  // Eval passes since the last metrics reset
};

// (max - mean) / mean of a count vector; 0 when it is all zero.
double max_violation(const std::vector<int64_t>& counts);
// The sum of a count vector, as a double (exact up to 2^53; never overflows).
double count_total(const std::vector<int64_t>& counts);

class MoELayer final : public Layer {
 public:
  MoELayer(const MoESpec& s, ParamStore& p);
  // The sequences of the next forward passes' rows, [num_seq + 1] contiguous offsets from 0, for
  // the sequence-wise auxiliary loss; null (the default): the whole batch is one sequence. The
  // vector must outlive those passes.
  void set_sequences(const std::vector<int64_t>* offsets) { sequences_ = offsets; }
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;
  double aux_loss() const override { return aux_loss_; }
  void commit_stats(Pass pass) override;
  void skip_pass() override;
  int64_t indexed_items(int64_t rows) const override;
  void reserve_backward(Backend& be, int64_t rows, bool dx_given) override;
  size_t work_bytes() const override;
  void release_work() override;

  const ExpertCounts& counts() const { return counts_; }
  // Expert Choice: the tokens each expert takes from `rows`.
  int64_t capacity(int64_t rows) const;
  ExpertCounts& counts() { return counts_; }

  // Expert and data parallelism (core/expert_parallel.h): the layer's passes become collective
  // over `par`'s ranks, each computing its shard's experts; null (the default) runs alone.
  void set_parallel(ParallelContext* par) { par_ = par; }
  // Data parallelism: adds to the routed experts' gradients the roots that this shard's replicas
  // computed in the last backward (collective over the replicas).
  void combine_expert_gradients(Backend& be);
  // Whether the auxiliary losses take the global batch as theirs (f and P over every rank's rows;
  // arXiv 2501.11873) rather than each rank's rows.
  void set_global_aux(bool global) { global_aux_ = global; }

 private:
  bool uses_aux_loss() const;
  // The router and the local plan of this pass's rows; for Expert Choice among ranks, the
  // router's logits only (forward_parallel routes once every rank's have arrived).
  void route(Backend& be, const float* x, int64_t rows);
  // The grouped SwiGLU experts [first_expert, ...) over `plan`'s segments, their rows dispatched
  // from x (into x_perm, which keeps them for backward when keep_x_perm); h1, h3 (may be null)
  // keep the pre-activations for backward.
  void experts_forward(Backend& be, const DispatchPlan& plan, int64_t first_expert, const float* x,
                       float* x_perm, bool keep_x_perm, float* y_perm, float* h1, float* h3);
  // The backend's kept_rows_stride for this layer's routed experts.
  int64_t kept_rows_stride(const Backend& be) const;
  // Where expert `expert`'s weights (and gradients) start in this session's stacked tensors.
  int64_t expert_weight_offset(int64_t expert) const;
  // Room for the experts' pre-activations of `assignments` assignments (training passes).
  void keep_hidden(Backend& be, int64_t assignments, bool train);
  // y = x (residual) or 0, plus the shared experts; from shared expert `first` on, y already
  // holding the residual and the shared experts before it.
  void residual_and_shared(Backend& be, const float* x, float* y, int64_t rows, bool train,
                           uint32_t first = 0);
  // Shared expert i writing y ([rows, dim]), with room for its pre-activations in training.
  SharedExpert shared_expert(Backend& be, uint32_t i, float* y, int64_t rows, bool train);
  void aux_forward(Backend& be, int64_t rows);
  void shared_backward(Backend& be, const float* dy, float* dx, int64_t rows);
  void router_backward(Backend& be, float* dx, int64_t rows);
  // The grouped experts' backward over `plan` (experts [first_expert, ...)); `roots` (3 per
  // expert of the plan: w1, w3, w2), when given, receive each expert's local roots from chunk
  // first_chunk[e] on instead of its gradient.
  void experts_backward(Backend& be, const DispatchPlan& plan, int64_t first_expert,
                        const float* x_perm, const float* h1, const float* h3, const float* dy_perm,
                        float* dx_perm, GradRoots* roots, const int64_t* first_chunk);
  // Expert Choice among ranks, after route(): each expert chooses from every rank's rows. `failed`:
  // this rank's failure so far in the pass (see forward_parallel), agreed on before the logits
  // travel; a local failure after that is left in it.
  void route_expert_choice_parallel(Backend& be, int64_t rows, std::exception_ptr& failed);
  void forward_parallel(Backend& be, const float* x, float* y, int64_t rows, bool train);
  void backward_parallel(Backend& be, const float* dy, float* dx, int64_t rows);
  void aux_parallel(Backend& be, int64_t rows, const AuxChunks& chunks,
                    const std::vector<int64_t>& counts, const std::vector<double>& psum);

  const MoESpec& s_;
  ParamStore& p_;
  const std::vector<int64_t>* sequences_ = nullptr;
  const float* x_ = nullptr;
  Buffer<float> logits_, scores_, weights_, x_perm_, y_perm_, h1_, h3_, aux_ds_;
  Buffer<float> all_logits_, all_scores_;  // Expert Choice among ranks: every rank's rows
  Buffer<float> dy_perm_, dweight_, dx_perm_, dlogits_, scratch_;
  // Row stride of x_perm_ and dy_perm_, the rows the experts' backward reads: the backend's
  // kept_rows_stride in a training pass (set by forward), else dim.
  int64_t kept_ld_ = 0;
  std::vector<Buffer<float>> shared_h1_, shared_h3_;
  Buffer<int32_t> experts_;
  double aux_loss_ = 0.0;
  DispatchPlan plan_;
  ExpertCounts counts_;
  std::vector<int64_t> pending_;

  // Expert parallelism.
  ParallelContext* par_ = nullptr;
  bool global_aux_ = false;
  // One pass's exchanges (core/expert_parallel.h), cut into chunks of this rank's experts that
  // are computed while the next chunks' tokens and the previous chunks' results travel. Buffers
  // are laid out chunk-major: chunk 0's blocks for each peer, then chunk 1's ...
  struct Exchange {
    DispatchRoute route;  // what this rank sent where
    int64_t chunks = 1;
    // [chunk * world + peer]: rows and assignments this rank sends each peer, and receives.
    std::vector<int64_t> send_rows, send_asg, recv_rows, recv_asg;
    DispatchPlan send;  // gathers the rows this rank sends (chunk-major)
    DispatchPlan
        remote;  // the assignments this rank computes, in its slots: received rows, weights
    std::vector<int64_t> slot_off;     // [local experts + 1]: the slots of each local expert
    std::vector<DispatchPlan> groups;  // per chunk: its experts' part of `remote`
    std::vector<DispatchPlan> ret;     // per chunk: gathers its results in its sources' order
    DispatchPlan home;  // places the returned results in this rank's assignment order
    std::vector<int64_t> first_chunk;     // per local expert: its first chunk in the expert's tree
    std::vector<GradRoots> expert_roots;  // per local expert: w1, w3, w2 (data parallel only)
    Buffer<float> x_send, x_recv, y_ret, y_back, y_home;
    Buffer<float> dy_send, dy_recv, dx_ret, dx_back, dx_home;
    Buffer<char> meta_send, meta_recv;
    // Host memory the pass fills once the rows travel, sized with the buffers above before the
    // layer's agreement: the slots' tokens, weights and local experts; a chunk's received
    // assignments and their slots; where each of this rank's assignments comes back.
    std::vector<int32_t> slot_token, slot_expert, chunk_slots, home_rows;
    std::vector<float> slot_weight;
    std::vector<char> chunk_meta;
  } ex_;
};

// Builds the runtime layer for a layer description of the session's parameters.
std::unique_ptr<Layer> make_layer(const LayerSpec& spec, ParamStore& params);

}  // namespace moert
