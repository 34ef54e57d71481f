// `moert export`: the MoE layers of a moert model or checkpoint back to a Hugging Face checkpoint
// in one family's layout (config.json, one safetensors shard per decoder layer, and
// model.safetensors.index.json), so that a model trained or fine-tuned with moert goes back to
// the Python world. The family is the one `moert import` recorded as the first word of the
// model's name ("qwen3_moe MoE layers 1,3"), or --layout, or else follows the routing: sigmoid
// routers as DeepSeek-V3, softmax ones as Qwen3-MoE (which expresses either norm_topk_prob).
#pragma once

#include <cstdint>
#include <string>

namespace moert_cli {

// How weights are written: as stored in the moert file (byte for byte: import -> export ->
// import gives the same moert file), or converted. Conversions apply to the router, norms and
// experts; the bias stays fp32. fp8 writes the experts in 128x128-block E4M3 with
// weight_scale_inv and the router and norms in bf16, as DeepSeek-V3's FP8 checkpoint does.
enum class ExportDType { AsStored, F32, BF16, FP8 };

struct ExportRequest {
  std::string model_path;  // binary or JSON moert model, or a moert checkpoint
  std::string out_dir;     // created if absent; its files of the same names are replaced
  ExportDType dtype = ExportDType::AsStored;
  // deepseek_v3, kimi_k2, glm4_moe, qwen3_moe or mixtral; empty: as recorded or from the routing.
  std::string layout;
};

struct ExportResult {
  uint32_t moe_layers = 0;
  uint32_t norms = 0;
  uint32_t skipped_layers = 0;  // layers other than MoE and their RMSNorms
  uint64_t tensors = 0;
  uint64_t bytes = 0;
  bool residual = false;  // some MoE layer added its input (the decoder layer does that in HF)
  std::string layout;     // the model_type written
};

// Throws Error naming the layer and field that the layout cannot express (a softmax router in a
// sigmoid family or the reverse, groups, scaling, shared experts or a bias in a softmax family,
// layers that disagree on a routing knob, a tensor without stored values).
ExportResult export_checkpoint(const ExportRequest& request);

}  // namespace moert_cli
