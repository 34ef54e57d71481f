// Runtime layers: one object per layer of a session, running on the session's backend. Each reads
// its weights from the validated model it was built from.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/model.h"

namespace moert {

class Layer {
 public:
  virtual ~Layer() = default;
  // y[rows, out_width] from x[rows, in_width]. The embedding takes token ids instead.
  virtual void forward(Backend& be, const float* x, float* y, int64_t rows) = 0;
  // Makes the statistics of the last successful forward pass visible (MoE layers).
  virtual void commit_stats() {}
};

class EmbeddingLayer final : public Layer {
 public:
  explicit EmbeddingLayer(const EmbeddingSpec& s) : s_(s) {}
  void forward(Backend&, const float*, float*, int64_t) override;
  void forward_tokens(Backend& be, const int32_t* tokens, float* y, int64_t rows);

 private:
  const EmbeddingSpec& s_;
};

class RMSNormLayer final : public Layer {
 public:
  explicit RMSNormLayer(const RMSNormSpec& s) : s_(s) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows) override;

 private:
  const RMSNormSpec& s_;
};

class DenseFFNLayer final : public Layer {
 public:
  explicit DenseFFNLayer(const DenseFFNSpec& s) : s_(s) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows) override;

 private:
  const DenseFFNSpec& s_;
};

class OutputHeadLayer final : public Layer {
 public:
  explicit OutputHeadLayer(const OutputHeadSpec& s) : s_(s) {}
  void forward(Backend& be, const float* x, float* y, int64_t rows) override;

 private:
  const OutputHeadSpec& s_;
};

class MoELayer final : public Layer {
 public:
  explicit MoELayer(const MoESpec& s);
  void forward(Backend& be, const float* x, float* y, int64_t rows) override;
  void commit_stats() override { counts_ = pending_counts_; }

  // Tokens per routed expert in the last committed forward pass.
  const std::vector<int64_t>& counts() const { return counts_; }
  // (max count - mean count) / mean count of the last committed pass; 0 without tokens.
  double max_vio() const;

 private:
  const MoESpec& s_;
  std::vector<float> logits_, scores_, weights_, x_perm_, y_perm_;
  std::vector<int32_t> experts_;
  DispatchPlan plan_;
  std::vector<int64_t> counts_, pending_counts_;
};

// Builds the runtime layer for a layer description.
std::unique_ptr<Layer> make_layer(const LayerSpec& spec);

}  // namespace moert
