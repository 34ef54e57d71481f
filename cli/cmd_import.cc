// `moert import`: MoE layers of a Hugging Face checkpoint as a moert model.
#include <chrono>
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/error.h"
#include "cli/hf_import.h"

namespace moert_cli {

const CommandSpec kImportSpec = {
    "import",
    "CHECKPOINT_DIR OUT.moert --layer L [--layer M ...] [--with-norm]",
    "import the MoE blocks of a Hugging Face checkpoint (DeepSeek-V3, GLM-4.5, Qwen3-MoE, Mixtral)",
    "CHECKPOINT_DIR holds config.json and model.safetensors or model.safetensors.index.json\n"
    "with its shards. OUT.moert becomes a model with hidden-state input whose layers are the MLP\n"
    "modules of the named decoder layers, in the order given: router, e_score_correction_bias,\n"
    "routed and shared experts, each layer's output exactly what the checkpoint's MLP module\n"
    "returns (no residual). Every routing knob comes from config.json; a field moert cannot\n"
    "honour, a dense layer or a tensor of the module that has no place in moert is refused.\n"
    "Weights keep their stored dtype (F32, BF16, or F8_E4M3 with its weight_scale_inv blocks);\n"
    "those of 64 KiB or more go to OUT.moert.<hash>.data beside it, 64-byte aligned. What the\n"
    "library would refuse to load is refused before anything is written: a NaN or infinity in\n"
    "a weight (an FP8 NaN code, or a code times its scale past the largest float), a block\n"
    "scale that is not finite and at least 2^-126.\n"
    "Families: deepseek_v3, kimi_k2 and glm4_moe (sigmoid, groups, bias, shared experts; glm4_moe\n"
    "with n_group 1), qwen3_moe and mixtral (softmax).",
    2,
    2,
    {
        {"layer", "L", "decoder layer to import (repeat for several)", "", true},
        {"with-norm", "", "prepend each layer's post_attention_layernorm (RMSNorm)", ""},
    },
};

int run_import(const Args& args) {
  ImportRequest r;
  r.checkpoint_dir = args.positional()[0];
  r.out_path = args.positional()[1];
  for (const std::string& l : args.every("layer"))
    r.layers.push_back(static_cast<uint32_t>(parse_integer("--layer", l, 0, UINT32_MAX)));
  if (r.layers.empty()) usage_fail("name at least one --layer (see 'moert import --help')");
  r.with_norm = args.has("with-norm");
  const auto start = std::chrono::steady_clock::now();
  const ImportResult res = import_checkpoint(r);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "%s: %llu tensors (%.1f MiB) of %s -> %s (%llu bytes)%s%s (%.1f MiB) in %.2f s (%.0f "
      "MiB/s)\n",
      r.checkpoint_dir.c_str(), static_cast<unsigned long long>(res.tensors),
      res.read_bytes / 1048576.0, res.family.c_str(), r.out_path.c_str(),
      static_cast<unsigned long long>(res.description_bytes), res.data_file.empty() ? "" : " + ",
      res.data_file.c_str(), res.data_bytes / 1048576.0, s,
      s > 0 ? res.read_bytes / 1048576.0 / s : 0.0);
  return 0;
}

}  // namespace moert_cli
