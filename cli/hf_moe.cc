#include "cli/hf_moe.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "cli/error.h"
#include "cli/safetensors.h"

namespace moert_cli {

namespace {

using nlohmann::json;

class Fields {
 public:
  Fields(const json& j, std::string origin) : j_(j), origin_(std::move(origin)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  uint32_t u32(const char* key) const {
    const json& v = need(key);
    if (!v.is_number_unsigned() || v.get<uint64_t>() > UINT32_MAX)
      bad(key, cat("must be an integer in [0, 2^32), got ", v.dump()));
    return static_cast<uint32_t>(v.get<uint64_t>());
  }
  uint32_t positive(const char* key) const {
    const uint32_t x = u32(key);
    if (x == 0) bad(key, "must be at least 1");
    return x;
  }
  bool boolean(const char* key) const {
    const json& v = need(key);
    if (!v.is_boolean()) bad(key, cat("must be true or false, got ", v.dump()));
    return v.get<bool>();
  }
  double number(const char* key) const {
    const json& v = need(key);
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      bad(key, cat("must be a finite number, got ", v.dump()));
    return v.get<double>();
  }
  // A number moert keeps as a float: finite there too.
  float real(const char* key) const {
    const double v = number(key);
    if (std::fabs(v) > std::numeric_limits<float>::max())
      bad(key, cat("is ", v, ", past the largest float"));
    return static_cast<float>(v);
  }
  std::string str(const char* key) const {
    const json& v = need(key);
    if (!v.is_string()) bad(key, cat("must be a string, got ", v.dump()));
    return v.get<std::string>();
  }
  const json& need(const char* key) const {
    if (!has(key)) bad(key, "is missing (moert takes every routing knob from the config)");
    return j_[key];
  }
  [[noreturn]] void bad(const std::string& key, const std::string& why) const {
    fail(origin_, ": field '", key, "' ", why);
  }

 private:
  const json& j_;
  std::string origin_;
};

void require_silu(const Fields& f) {
  const std::string act = f.str("hidden_act");
  if (act != "silu")
    f.bad("hidden_act", cat("is '", act, "'; moert's experts are SwiGLU (silu) only"));
}

void check_top_k(const Fields& f, const HfMoeConfig& c) {
  if (c.top_k > c.experts) f.bad("num_experts_per_tok", cat("exceeds the ", c.experts, " experts"));
}

// config.json nests a few objects (quantization_config, rope_scaling) and short arrays.
constexpr int kMaxConfigDepth = 16;

}  // namespace

HfMoeConfig parse_hf_moe_config(const std::string& text, const std::string& origin) {
  // A key given twice (which nlohmann would keep the last of, silently) is refused as in the
  // safetensors headers: which one the checkpoint's authors meant is unknown.
  const json j = parse_strict(text, origin, kMaxConfigDepth);
  if (!j.is_object()) fail(origin, ": not a JSON object");
  const Fields f(j, origin);
  HfMoeConfig c;
  c.model_type = f.str("model_type");
  c.hidden = f.positive("hidden_size");
  c.num_layers = f.positive("num_hidden_layers");
  if (f.has("rms_norm_eps")) {
    c.rms_norm_eps = f.real("rms_norm_eps");
    if (!(c.rms_norm_eps > 0.0f)) f.bad("rms_norm_eps", "must be > 0 (as a float)");
    c.has_rms_norm_eps = true;
  }
  require_silu(f);
  c.top_k = f.positive("num_experts_per_tok");

  const bool glm = c.model_type == "glm4_moe";
  if (c.model_type == "deepseek_v3" || c.model_type == "kimi_k2" || glm) {
    c.family = glm ? HfFamily::Glm4Moe : HfFamily::DeepSeekV3;
    c.experts = f.positive("n_routed_experts");
    c.expert_hidden = f.positive("moe_intermediate_size");
    // Glm4MoeConfig has neither key (its router is always sigmoid, noaux_tc); one present must
    // still say so.
    if (!glm || f.has("scoring_func")) {
      const std::string scoring = f.str("scoring_func");
      if (scoring != "sigmoid")
        f.bad("scoring_func",
              cat("is '", scoring, "'; DeepSeek-V3's gate defines only 'sigmoid' scoring"));
    }
    c.sigmoid = true;
    if (!glm || f.has("topk_method")) {
      const std::string method = f.str("topk_method");
      if (method != "noaux_tc")
        f.bad("topk_method",
              cat("is '", method,
                  "'; moert routes as 'noaux_tc' (bias-corrected, top-2-sum groups)"));
    }
    c.groups = f.positive("n_group");
    c.topk_groups = f.positive("topk_group");
    if (c.experts % c.groups != 0)
      f.bad("n_group", cat(c.groups, " does not divide n_routed_experts ", c.experts));
    if (c.groups > 1 && c.experts / c.groups < 2)
      f.bad("n_group", "leaves groups of one expert; a group's score is its top-2 sum");
    // Glm4MoeMoE masks the dropped groups' scores to 0, not -inf: a kept expert whose biased
    // score is negative then loses to a dropped one, which moert's router never chooses.
    if (glm && c.groups > 1)
      f.bad("n_group", cat("is ", c.groups,
                           "; GLM-4.5 masks dropped groups to 0 where moert masks them to -inf, "
                           "so moert imports glm4_moe with n_group 1 only"));
    if (c.topk_groups > c.groups) f.bad("topk_group", cat("exceeds n_group ", c.groups));
    // Checked here too, before the groups' check that a top-K past the experts would fail first.
    check_top_k(f, c);
    if (static_cast<uint64_t>(c.topk_groups) * (c.experts / c.groups) < c.top_k)
      f.bad("topk_group", "keeps fewer experts than num_experts_per_tok");
    // DeepseekV3MoE (DeepSeek's code) normalises only when more than one expert is chosen;
    // Glm4MoeMoE whenever norm_topk_prob is set.
    c.normalize = f.boolean("norm_topk_prob") && (glm || c.top_k > 1);
    c.scaling = f.real("routed_scaling_factor");
    if (!(c.scaling > 0.0f)) f.bad("routed_scaling_factor", "must be > 0 (as a float)");
    const uint32_t shared = f.has("n_shared_experts") ? f.u32("n_shared_experts") : 0;
    const uint64_t sh = static_cast<uint64_t>(shared) * c.expert_hidden;
    if (sh > UINT32_MAX) f.bad("n_shared_experts", "makes the shared MLP wider than 2^32");
    c.shared_hidden = static_cast<uint32_t>(sh);
    c.first_k_dense_replace = f.u32("first_k_dense_replace");
    // Glm4MoeDecoderLayer has no layer frequency: every layer from first_k_dense_replace on.
    c.moe_layer_freq = glm ? 1 : f.positive("moe_layer_freq");
  } else if (c.model_type == "qwen3_moe") {
    c.family = HfFamily::Qwen3Moe;
    c.experts = f.positive("num_experts");
    c.expert_hidden = f.positive("moe_intermediate_size");
    c.sigmoid = false;
    c.normalize = f.boolean("norm_topk_prob");
    c.decoder_sparse_step = f.positive("decoder_sparse_step");
    if (f.has("mlp_only_layers")) {
      if (!j["mlp_only_layers"].is_array())
        f.bad("mlp_only_layers", "must be a list of layer indices");
      for (const json& l : j["mlp_only_layers"]) {
        if (!l.is_number_unsigned() || l.get<uint64_t>() > UINT32_MAX)
          f.bad("mlp_only_layers", cat("holds ", l.dump(), ", not a layer index"));
        c.mlp_only_layers.push_back(static_cast<uint32_t>(l.get<uint64_t>()));
      }
    }
    if (f.has("shared_expert_intermediate_size") && f.u32("shared_expert_intermediate_size") != 0)
      f.bad("shared_expert_intermediate_size", "is not part of Qwen3-MoE's sparse block");
  } else if (c.model_type == "mixtral") {
    c.family = HfFamily::Mixtral;
    c.experts = f.positive("num_local_experts");
    c.expert_hidden = f.positive("intermediate_size");
    c.sigmoid = false;
    c.normalize = true;  // MixtralSparseMoeBlock always renormalises the top-K weights
    if (f.has("router_jitter_noise") && f.number("router_jitter_noise") != 0.0)
      f.bad("router_jitter_noise", "is not 0; moert's router has no jitter");
  } else {
    f.bad("model_type",
          cat("is '", c.model_type,
              "'; moert imports deepseek_v3, kimi_k2, glm4_moe, qwen3_moe and mixtral"));
  }
  check_top_k(f, c);

  if (f.has("quantization_config")) {
    const json& q = j["quantization_config"];
    const Fields qf(q, origin + " quantization_config");
    if (!q.is_object()) f.bad("quantization_config", "must be an object");
    const std::string method = qf.str("quant_method");
    if (method != "fp8")
      qf.bad("quant_method", cat("is '", method, "'; moert reads block-scaled fp8 only"));
    if (qf.has("fmt") && qf.str("fmt") != "e4m3")
      qf.bad("fmt", cat("is '", qf.str("fmt"), "'; moert's FP8 is E4M3"));
    const json& b = qf.need("weight_block_size");
    if (!b.is_array() || b.size() != 2 || !b[0].is_number_unsigned() ||
        !b[1].is_number_unsigned() || b[0].get<uint64_t>() == 0 || b[1].get<uint64_t>() == 0 ||
        b[0].get<uint64_t>() > UINT32_MAX || b[1].get<uint64_t>() > UINT32_MAX)
      qf.bad("weight_block_size", "must be [rows, cols] of positive integers");
    c.fp8_block_rows = static_cast<uint32_t>(b[0].get<uint64_t>());
    c.fp8_block_cols = static_cast<uint32_t>(b[1].get<uint64_t>());
  }
  return c;
}

void HfMoeConfig::check_moe_layer(uint32_t layer) const {
  if (layer >= num_layers)
    fail("layer ", layer, " does not exist: num_hidden_layers is ", num_layers);
  switch (family) {
    case HfFamily::DeepSeekV3:
    case HfFamily::Glm4Moe:
      if (layer < first_k_dense_replace || layer % moe_layer_freq != 0)
        fail("layer ", layer,
             " is a dense MLP, not MoE (first_k_dense_replace = ", first_k_dense_replace,
             ", moe_layer_freq = ", moe_layer_freq, ")");
      break;
    case HfFamily::Qwen3Moe:
      if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end())
        fail("layer ", layer, " is a dense MLP, not MoE (it is in mlp_only_layers)");
      if ((layer + 1) % decoder_sparse_step != 0)
        fail("layer ", layer,
             " is a dense MLP, not MoE (decoder_sparse_step = ", decoder_sparse_step, ")");
      break;
    case HfFamily::Mixtral:
      break;
  }
}

std::string HfMoeConfig::moe_prefix(uint32_t layer) const {
  return cat("model.layers.", layer, family == HfFamily::Mixtral ? ".block_sparse_moe." : ".mlp.");
}

std::string HfMoeConfig::expert_weight(uint32_t layer, uint32_t e, int which) const {
  if (family == HfFamily::Mixtral)
    return cat(moe_prefix(layer), "experts.", e, ".w", which, ".weight");
  const char* proj = which == 1 ? "gate_proj" : which == 3 ? "up_proj" : "down_proj";
  return cat(moe_prefix(layer), "experts.", e, ".", proj, ".weight");
}

std::string HfMoeConfig::router_weight(uint32_t layer) const {
  return cat(moe_prefix(layer), "gate.weight");
}

std::string HfMoeConfig::shared_weight(uint32_t layer, int which) const {
  const char* proj = which == 1 ? "gate_proj" : which == 3 ? "up_proj" : "down_proj";
  return cat(moe_prefix(layer), "shared_experts.", proj, ".weight");
}

std::string HfMoeConfig::norm_weight(uint32_t layer) const {
  return cat("model.layers.", layer, ".post_attention_layernorm.weight");
}

}  // namespace moert_cli
