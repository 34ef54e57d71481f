// What `moert inspect` reports about a model: its layers, routing settings, parameter counts,
// weights as held in memory and forward FLOPs per token, all obtained through the public C ABI.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cli/library.h"

namespace moert_cli {

struct MoEInfo {
  int64_t num_experts = 0, top_k = 0, expert_hidden = 0, score_function = 0;
  int64_t num_groups = 0, topk_groups = 0, normalize = 0, num_shared = 0, shared_hidden = 0;
  int64_t residual = 0, policy = 0, bias_centering = 0, bias_frozen = 0;
  double scaling = 0.0, gamma = 0.0, aux_alpha = 0.0, capacity_factor = 0.0;
  // A checkpoint's balancing state as saved (ModelInfo::checkpoint): what a resumed run uses.
  int64_t saved_bias_frozen = 0;
  double saved_gamma = 0.0;
  // Routed experts a token passes through on average: top_k, or capacity_factor * top_k under
  // Expert Choice (each expert takes capacity_factor * tokens * top_k / num_experts tokens).
  double experts_per_token() const;
};

// One weight tensor as the loaded model holds it (moert_model_tensor_info).
struct TensorInfo {
  std::string field;                // "w1", "gate_bias"
  int32_t stored = 0, held = 0;     // MOERT_DTYPE_*: in the file, in memory
  uint64_t numel = 0, bytes = 0;    // bytes in memory
  std::string stored_text() const;  // "bf16"
  std::string held_text() const;    // "fp8 e4m3 128x128"
};

struct LayerInfo {
  uint32_t index = 0;
  std::string name;
  int32_t kind = 0;
  uint32_t in_width = 0, out_width = 0;
  uint64_t parameters = 0;  // every trainable value of the layer
  uint64_t activated = 0;   // those one token (input row) uses
  // Forward FLOPs per token of the GEMMs executed (2 per multiply-add), and the same if every
  // routed expert were active.
  double flops = 0.0, dense_flops = 0.0;
  std::string detail;  // a short description of the layer's shape
  bool is_moe = false;
  MoEInfo moe;
  std::vector<TensorInfo> tensors;
};

struct ModelInfo {
  std::string name;
  int32_t input_kind = 0;
  uint32_t input_width = 0, output_width = 0;
  std::vector<LayerInfo> layers;
  uint64_t total_parameters = 0, activated_parameters = 0;  // as the library reports them
  uint64_t resident_bytes = 0;                              // every weight in memory, as held
  bool checkpoint = false;                                  // loaded from a checkpoint
  uint64_t checkpoint_step = 0;                             // its run's optimizer steps
  bool weights_loaded = true;  // false: described only (moert_load_options_set_description_only)
  double flops = 0.0, dense_flops = 0.0;
};

ModelInfo describe_model(const moert_model* model);

const char* layer_kind_name(int32_t kind);
const char* balancing_name(int64_t policy);
const char* score_name(int64_t score);

// The FLOP formula, for --help and the README.
extern const char* const kFlopsFormula;

}  // namespace moert_cli
