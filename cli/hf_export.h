// `moert export`: the MoE layers of a moert model or checkpoint back to a Hugging Face checkpoint
// in the DeepSeek-V3 layout (config.json, one safetensors shard per decoder layer, and
// model.safetensors.index.json), so that a model trained or fine-tuned with moert goes back to
// the Python world.
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
};

struct ExportResult {
  uint32_t moe_layers = 0;
  uint32_t norms = 0;
  uint32_t skipped_layers = 0;  // layers other than MoE and their RMSNorms
  uint64_t tensors = 0;
  uint64_t bytes = 0;
  bool residual = false;  // some MoE layer added its input (the decoder layer does that in HF)
};

// Throws Error naming the layer and field that the DeepSeek-V3 layout cannot express (a softmax
// router, layers that disagree on a routing knob, a tensor without stored values).
ExportResult export_checkpoint(const ExportRequest& request);

}  // namespace moert_cli
