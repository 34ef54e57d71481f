// `moert import`: the MoE blocks of chosen decoder layers of a Hugging Face checkpoint as a moert
// model with hidden-state input, each block's output exactly the checkpoint's MLP module output
// (no residual), weights in their stored precision.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moert_cli {

struct ImportRequest {
  std::string checkpoint_dir;
  std::string out_path;
  std::vector<uint32_t> layers;  // decoder layer indices, in model order
  bool with_norm = false;        // prepend each layer's post_attention_layernorm
};

struct ImportResult {
  std::string family;       // config.json's model_type
  uint64_t tensors = 0;     // checkpoint tensors read
  uint64_t read_bytes = 0;  // their bytes
  uint64_t description_bytes = 0;
  uint64_t data_bytes = 0;
  std::string data_file;  // relative to the model file's directory; empty when none
};

// Throws Error naming the checkpoint, the layer and the tensor or config field at fault; on error
// nothing is left at out_path (a previous file there is untouched).
ImportResult import_checkpoint(const ImportRequest& request);

}  // namespace moert_cli
