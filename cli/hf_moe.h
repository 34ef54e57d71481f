// The MoE blocks of Hugging Face checkpoints, as `moert import` and `moert export` see them: the
// routing knobs of a config.json, and the tensor names of each family's MLP module.
//
// Families and the published model code each one follows (transformers' modeling files):
//   DeepSeek-V3 (model_type deepseek_v3 or kimi_k2; also DeepSeek-R1/V3.1, Moonlight, Kimi K2):
//     DeepseekV3MoE. Sigmoid scores; selection on score + e_score_correction_bias with n_group
//     groups scored by their top-2 sum, topk_group kept; weights from the unbiased scores,
//     normalised when norm_topk_prob and top-K > 1, times routed_scaling_factor; one shared MLP of
//     width moe_intermediate_size * n_shared_experts added. MoE at layer L when
//     L >= first_k_dense_replace and L % moe_layer_freq == 0.
//   Qwen3-MoE (qwen3_moe): Qwen3MoeSparseMoeBlock. Softmax, top-K, normalised when
//     norm_topk_prob; no shared expert. MoE at L unless L is in mlp_only_layers, when
//     (L + 1) % decoder_sparse_step == 0.
//   GLM-4.5 (glm4_moe; also GLM-4.5-Air, GLM-4.6): Glm4MoeMoE, DeepseekV3MoE's routing with
//     transformers' semantics: normalised whenever norm_topk_prob (top-K 1 included), dropped
//     groups masked to 0, which moert's -inf masking matches only for n_group 1 (the released
//     configs); no scoring_func/topk_method keys. MoE at L when L >= first_k_dense_replace.
//   Mixtral (mixtral): MixtralSparseMoeBlock. Softmax, top-K, always normalised; every layer.
// The expert MLP is down(silu(gate(x)) * up(x)) everywhere: gate/w1 -> moert w1, up/w3 -> w3,
// down/w2 -> w2.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moert_cli {

enum class HfFamily { DeepSeekV3, Glm4Moe, Qwen3Moe, Mixtral };

struct HfMoeConfig {
  HfFamily family = HfFamily::DeepSeekV3;
  std::string model_type;
  uint32_t hidden = 0;
  uint32_t num_layers = 0;
  uint32_t experts = 0;
  uint32_t top_k = 0;
  uint32_t expert_hidden = 0;
  bool sigmoid = true;
  uint32_t groups = 1, topk_groups = 1;
  bool normalize = false;  // as moert applies it (already combined with top-K > 1 where needed)
  float scaling = 1.0f;
  uint32_t shared_hidden = 0;  // width of the one shared MLP; 0: none
  float rms_norm_eps = 0.0f;
  bool has_rms_norm_eps = false;
  // FP8 checkpoints: quantization_config.weight_block_size [rows, cols].
  std::optional<uint32_t> fp8_block_rows, fp8_block_cols;
  // Which decoder layers are MoE (see the families above).
  uint32_t first_k_dense_replace = 0, moe_layer_freq = 1;  // DeepSeek-V3, GLM-4.5
  uint32_t decoder_sparse_step = 1;                        // Qwen3-MoE
  std::vector<uint32_t> mlp_only_layers;                   // Qwen3-MoE

  // Throws Error naming the layer and the config fields that make it dense or out of range.
  void check_moe_layer(uint32_t layer) const;
  // "model.layers.L.mlp." or "model.layers.L.block_sparse_moe."
  std::string moe_prefix(uint32_t layer) const;
  // Tensor names of expert e's projections (which: 1, 3 or 2), of the router, of the shared MLP.
  std::string expert_weight(uint32_t layer, uint32_t e, int which) const;
  std::string router_weight(uint32_t layer) const;
  std::string shared_weight(uint32_t layer, int which) const;
  std::string norm_weight(uint32_t layer) const;
};

// Reads the routing knobs of config.json. Refuses, naming the field: a model_type outside the
// families above, a missing or mistyped knob, and any value moert cannot honour (a score function,
// a top-K method or an activation other than the family's, router jitter, groups that do not
// divide the experts).
HfMoeConfig parse_hf_moe_config(const std::string& text, const std::string& origin);

}  // namespace moert_cli
