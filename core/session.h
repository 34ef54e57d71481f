// A session: a model bound to a backend, with the buffers and statistics of its forward passes.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/layers.h"
#include "core/model.h"

namespace moert {

enum class Device : int32_t { Cpu = 0, Cuda = 1 };
enum class Mode : int32_t { Inference = 0, Training = 1 };

struct SessionOptions {
  Device device = Device::Cpu;
  int32_t device_index = 0;
  uint32_t threads = 1;
  uint64_t seed = 0;
  Mode mode = Mode::Inference;
  bool check_finite = true;

  // Applies a backend knob by name; throws InvalidArgument for an unknown key or value.
  void set(const std::string& key, const std::string& value);
};

class Session {
 public:
  Session(std::shared_ptr<const Model> model, const SessionOptions& options);

  const Model& model() const { return *model_; }

  // Forward passes; sizes are element counts of the caller's buffers and are checked first. On
  // any error the session's statistics are those of the last successful pass.
  void forward_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows, float* out,
                      uint64_t out_len);
  void forward_hidden(const float* in, uint64_t in_len, uint64_t rows, float* out,
                      uint64_t out_len);

  const std::vector<int64_t>& expert_counts(uint32_t layer) const;
  // MaxVio of one MoE layer, or the mean over all MoE layers for UINT32_MAX.
  double max_vio(uint32_t layer) const;

  // Serialises the public entry points: a session may be shared between threads.
  std::mutex& mutex() const { return mu_; }

 private:
  const MoELayer& moe_layer(uint32_t layer) const;
  int64_t check_rows(uint64_t rows, uint64_t out_len) const;
  void run_from(size_t first_layer, const float* x, int64_t rows, float* out);

  std::shared_ptr<const Model> model_;
  SessionOptions options_;
  std::unique_ptr<Backend> backend_;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<std::vector<float>> activations_;  // output of each layer
  mutable std::mutex mu_;
};

}  // namespace moert
