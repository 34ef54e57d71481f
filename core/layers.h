// Runtime layers: one object per layer of a session, running on the session's backend. Each reads
// its weights from the session's parameters and, when training, adds into the session's gradients
// (a second set of tensors with the same layout).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/model.h"

namespace moert {

// What a forward pass is for. Train keeps what backward needs and counts tokens for the step's
// balancing update; Eval counts tokens for the evaluation metrics; Inference does neither.
enum class Pass { Inference, Train, Eval };

class Layer {
 public:
  virtual ~Layer() = default;
  // y[rows, out_width] from x[rows, in_width]. With Pass::Train, x must stay valid and unchanged
  // until backward. The embedding takes token ids instead.
  virtual void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) = 0;
  // From dy[rows, out_width] of the last Train pass: dx (overwritten; may be null when nobody needs
  // it) and the parameter gradients (accumulated). Returns nothing; auxiliary losses add their
  // gradient here too.
  virtual void backward(Backend& be, const float* dy, float* dx, int64_t rows) = 0;
  // Auxiliary loss of the last Train pass (0 for layers without one).
  virtual double aux_loss() const { return 0.0; }
  // Makes the statistics of the last successful forward pass visible (MoE layers).
  virtual void commit_stats(Pass) {}
};

class EmbeddingLayer final : public Layer {
 public:
  EmbeddingLayer(const EmbeddingSpec& s, EmbeddingSpec* g) : s_(s), g_(g) {}
  void forward(Backend&, const float*, float*, int64_t, Pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;
  void forward_tokens(Backend& be, const int32_t* tokens, float* y, int64_t rows, Pass pass);

 private:
  const EmbeddingSpec& s_;
  EmbeddingSpec* g_;
  std::vector<int32_t> tokens_;
};

class RMSNormLayer final : public Layer {
 public:
  RMSNormLayer(const RMSNormSpec& s, RMSNormSpec* g) : s_(s), g_(g) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;

 private:
  const RMSNormSpec& s_;
  RMSNormSpec* g_;
  const float* x_ = nullptr;
  std::vector<float> inv_rms_;
};

class DenseFFNLayer final : public Layer {
 public:
  DenseFFNLayer(const DenseFFNSpec& s, DenseFFNSpec* g) : s_(s), g_(g) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;

 private:
  const DenseFFNSpec& s_;
  DenseFFNSpec* g_;
  const float* x_ = nullptr;
  std::vector<float> h1_, h3_;
};

class OutputHeadLayer final : public Layer {
 public:
  OutputHeadLayer(const OutputHeadSpec& s, OutputHeadSpec* g) : s_(s), g_(g) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;

 private:
  const OutputHeadSpec& s_;
  OutputHeadSpec* g_;
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

class MoELayer final : public Layer {
 public:
  // `sequence_length` groups rows into sequences for the sequence-wise auxiliary loss (0: the
  // whole batch is one sequence).
  MoELayer(const MoESpec& s, MoESpec* g, int64_t sequence_length);
  void forward(Backend& be, const float* x, float* y, int64_t rows, Pass pass) override;
  void backward(Backend& be, const float* dy, float* dx, int64_t rows) override;
  double aux_loss() const override { return aux_loss_; }
  void commit_stats(Pass pass) override;

  const ExpertCounts& counts() const { return counts_; }
  ExpertCounts& counts() { return counts_; }

 private:
  bool uses_aux_loss() const;
  // Value and score gradient of the (sequence-wise) auxiliary loss of the last Train pass.
  void aux_loss_forward(int64_t rows);

  const MoESpec& s_;
  MoESpec* g_;
  int64_t sequence_length_;
  const float* x_ = nullptr;
  std::vector<float> logits_, scores_, weights_, x_perm_, y_perm_, h1_, h3_;
  std::vector<std::vector<float>> shared_h1_, shared_h3_;
  std::vector<int32_t> experts_;
  std::vector<float> aux_ds_;  // d aux / d scores [rows, E]
  double aux_loss_ = 0.0;
  DispatchPlan plan_;
  ExpertCounts counts_;
  std::vector<int64_t> pending_;
};

// Builds the runtime layer for a layer description; `grads` (null for inference) is the matching
// gradient layer.
std::unique_ptr<Layer> make_layer(const LayerSpec& spec, LayerSpec* grads, int64_t sequence_length);

}  // namespace moert
