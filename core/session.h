// A session: a model bound to a backend, with the buffers and statistics of its forward passes
// and, in training mode, its own parameters, gradients, optimizer and balancing state.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/layers.h"
#include "core/model.h"
#include "core/param_store.h"
#include "core/tensor_codec.h"

namespace moert {

struct LoadOptions;

enum class Device : int32_t { Cpu = 0, Cuda = 1 };
enum class Mode : int32_t { Inference = 0, Training = 1 };

struct TrainingConfig {
  std::string optimizer = "adamw";  // or "sgd"
  double lr = 1e-3;
  double weight_decay = 0.0;                      // decoupled (AdamW) or L2 (SGD); matrices only
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // AdamW
  double momentum = 0.9;                          // SGD
  double clip_norm = 0.0;                         // global gradient norm; 0 = off
  uint64_t warmup_steps = 0;                      // linear warmup from lr / warmup_steps
  uint64_t total_steps = 0;  // cosine decay to min_lr over total_steps; 0 = constant
  double min_lr = 0.0;
  int64_t sequence_length = 0;  // rows per sequence for SequenceAuxLoss; 0 = the whole batch

  // Learning rate of optimizer step `step` (counted from 1).
  double lr_at(uint64_t step) const;
};

struct SessionOptions {
  Device device = Device::Cpu;
  int32_t device_index = 0;
  std::string cuda_plugin;  // explicit path of libmoert_cuda.so; empty: beside libmoert.so
  uint32_t threads = 1;
  uint64_t seed = 0;
  Mode mode = Mode::Inference;
  bool check_finite = true;
  TrainingConfig training;

  // Applies a knob by name; throws InvalidArgument for an unknown key or a value it refuses.
  void set(const std::string& key, const std::string& value);
};

// Which token counts a metrics query reads.
enum class CountScope : int32_t { Last = 0, Step = 1, Eval = 2 };

struct StepInfo {
  double lr = 0.0;
  double grad_norm = 0.0;  // before clipping, of the micro-batch-averaged gradient
};

class Session {
 public:
  Session(std::shared_ptr<const Model> model, const SessionOptions& options);

  const Model& model() const { return *model_; }
  bool training() const { return options_.mode == Mode::Training; }

  // Forward passes; sizes are element counts of the caller's buffers and are checked first. On
  // any error the session's statistics are those of the last successful pass.
  void forward_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows, float* out,
                      uint64_t out_len);
  void forward_hidden(const float* in, uint64_t in_len, uint64_t rows, float* out,
                      uint64_t out_len);

  // Training. backward_loss: softmax cross-entropy of the last forward's logits against one
  // target per row (mean over rows) plus the auxiliary losses; returns that loss. backward: from a
  // caller-given gradient of the outputs; writes the input gradient when asked; returns the
  // auxiliary losses. Both accumulate into the gradients.
  double backward_loss(const int32_t* targets, uint64_t num_targets);
  double backward(const float* grad_out, uint64_t grad_out_len, float* grad_in,
                  uint64_t grad_in_len);
  void zero_grad();
  StepInfo step();
  void set_eval(bool eval);
  bool eval() const { return eval_; }
  uint64_t step_count() const { return step_; }
  void set_config(const std::string& key, const std::string& value);

  // Parameters and gradients by index or name.
  size_t num_parameters() const { return slots_.size(); }
  const std::string& parameter_name(size_t index) const;
  int64_t parameter_size(size_t index) const;
  size_t parameter_index(const std::string& name) const;
  void read_parameter(size_t index, float* out, uint64_t len) const;
  void write_parameter(size_t index, const float* in, uint64_t len);
  void read_gradient(size_t index, float* out, uint64_t len) const;
  void write_gradient(size_t index, const float* in, uint64_t len);

  // Loss-free balancing state of MoE layer `layer`, or of every MoE layer for UINT32_MAX.
  void read_bias(uint32_t layer, float* out, uint64_t len) const;
  void write_bias(uint32_t layer, const float* in, uint64_t len);
  void set_bias_update_rate(uint32_t layer, double gamma);
  void set_bias_frozen(uint32_t layer, bool frozen);

  // Metrics.
  const std::vector<int64_t>& expert_counts(uint32_t layer, CountScope scope) const;
  // MaxVio of one MoE layer, or the mean over all MoE layers for UINT32_MAX.
  double max_vio(uint32_t layer, CountScope scope) const;
  void reset_eval_metrics();

  // Checkpoints: the model with this session's parameters and training state, written atomically;
  // load refuses a checkpoint of another architecture and leaves the session as it was. Load reads
  // at most what this session's architecture can hold, and within `limits` when given.
  void save(const std::string& path) const;
  void load(const std::string& path, const LoadOptions* limits = nullptr);

  // Serialises the public entry points: a session may be shared between threads.
  std::mutex& mutex() const { return mu_; }
  // Taken by every entry point after the lock: the backend's device on this thread for the call.
  ActiveDevice use_device() const { return ActiveDevice(*backend_); }

 private:
  struct Slot {
    std::string name;
    Tensor* param = nullptr;  // the host tensor of params_
    bool matrix = false;      // weight decay applies
    Buffer<float> m, v;       // optimizer moments in backend memory, allocated at the first step
  };
  struct Balance {
    float gamma = 0.0f;
    bool frozen = false;
  };

  const Model& params() const { return params_ ? *params_ : *model_; }
  void sync_to_host() const;
  MoELayer& moe_layer(uint32_t layer) const;
  std::vector<uint32_t> moe_layers(uint32_t layer) const;
  int64_t check_rows(uint64_t rows, uint64_t out_len) const;
  void require_training(const char* what) const;
  void require_backward_ready() const;
  void run_from(size_t first_layer, const float* x, int64_t rows, float* out, Pass pass);
  Pass next_pass() const;
  double run_backward(float* grad_in);
  void update_biases();
  struct SavedState;
  void training_state(SavedState& out) const;
  LoadOptions checkpoint_limits(const LoadOptions* limits) const;

  std::shared_ptr<const Model> model_;
  std::unique_ptr<Model> params_;  // training: the session's own parameters
  std::unique_ptr<Model> grads_;   // training: gradients, laid out as params_
  SessionOptions options_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<ParamStore> store_;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<Buffer<float>> activations_;  // output of each layer, backend memory
  Buffer<float> input_, dy_, dx_;           // hidden-state input; backward scratch
  Buffer<int32_t> tokens_, targets_;
  std::vector<Slot> slots_;
  std::vector<Balance> balance_;  // by layer index
  Rng rng_;
  uint64_t step_ = 0;
  uint32_t micro_batches_ = 0;
  bool eval_ = false;
  bool pending_backward_ = false;
  int64_t last_rows_ = 0;
  mutable std::mutex mu_;
};

}  // namespace moert
