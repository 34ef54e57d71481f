// Runtime layers: one object per layer of a session, running on the session's backend. Each takes
// its shapes from the layer description and its weights and gradients from the session's
// parameter store, and keeps its working arrays in backend memory.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/model.h"
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
  // How many items a pass over `rows` rows addresses by 32-bit index (token positions, token-expert
  // assignments); the session refuses row counts that would take it past 2^31 - 1.
  virtual int64_t indexed_items(int64_t rows) const { return rows; }
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
  // `sequence_length` groups rows into sequences for the sequence-wise auxiliary loss (0: the
  // whole batch is one sequence).
  MoELayer(const MoESpec& s, ParamStore& p, int64_t sequence_length);
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;
  double aux_loss() const override { return aux_loss_; }
  void commit_stats(Pass pass) override;
  int64_t indexed_items(int64_t rows) const override;

  const ExpertCounts& counts() const { return counts_; }
  // Expert Choice: the tokens each expert takes from `rows`.
  int64_t capacity(int64_t rows) const;
  ExpertCounts& counts() { return counts_; }

 private:
  bool uses_aux_loss() const;

  const MoESpec& s_;
  ParamStore& p_;
  int64_t sequence_length_;
  const float* x_ = nullptr;
  Buffer<float> logits_, scores_, weights_, x_perm_, y_perm_, h1_, h3_, aux_ds_;
  Buffer<float> dy_perm_, dweight_, dx_perm_, dlogits_, scratch_;
  std::vector<Buffer<float>> shared_h1_, shared_h3_;
  Buffer<int32_t> experts_;
  double aux_loss_ = 0.0;
  DispatchPlan plan_;
  ExpertCounts counts_;
  std::vector<int64_t> pending_;
};

// Builds the runtime layer for a layer description of the session's parameters.
std::unique_ptr<Layer> make_layer(const LayerSpec& spec, ParamStore& params,
                                  int64_t sequence_length);

}  // namespace moert
