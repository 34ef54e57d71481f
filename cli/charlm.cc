#include "cli/charlm.h"

#include <cmath>

#include "cli/args.h"
#include "cli/corpus.h"
#include "cli/error.h"
#include "cli/model_codec.h"

namespace moert_cli {

Balancing parse_balancing(const std::string& text, double default_alpha, double default_gamma) {
  Balancing b;
  const size_t colon = text.find(':');
  const std::string kind = text.substr(0, colon);
  b.aux_alpha = default_alpha;
  b.gamma = default_gamma;
  if (kind == "none") {
    b.policy = MOERT_BALANCING_NONE;
  } else if (kind == "aux") {
    b.policy = MOERT_BALANCING_AUX_LOSS;
  } else if (kind == "loss-free") {
    b.policy = MOERT_BALANCING_LOSS_FREE_BIAS;
  } else {
    usage_fail("unknown balancing strategy '", kind, "' (none, aux, loss-free)");
  }
  b.label = kind;
  if (colon == std::string::npos) return b;
  const std::string setting = text.substr(colon + 1);
  const size_t eq = setting.find('=');
  const std::string key = setting.substr(0, eq);
  const std::string value = eq == std::string::npos ? "" : setting.substr(eq + 1);
  if (kind == "aux" && key == "alpha")
    b.aux_alpha = parse_real("aux:alpha", value, 0.0, 1e3);
  else if (kind == "loss-free" && key == "gamma")
    b.gamma = parse_real("loss-free:gamma", value, 0.0, 1e3);
  else
    usage_fail("strategy '", text, "': ",
               kind == "none"  ? "'none' takes no setting"
               : kind == "aux" ? "'aux' takes alpha=X"
                               : "'loss-free' takes gamma=X");
  b.label = cat(kind, "(", key, "=", value, ")");
  return b;
}

namespace {

// PyTorch's default nn.Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), written as the
// schema's Uniform initialiser, which takes the standard deviation bound / sqrt(3).
std::string linear_init(uint32_t fan_in) {
  const double std = 1.0 / std::sqrt(3.0 * fan_in);
  return cat("{ \"init\": { \"kind\": \"Uniform\", \"std\": ", std, " } }");
}

std::string balancing_json(const Balancing& b) {
  switch (b.policy) {
    case MOERT_BALANCING_AUX_LOSS:
      return cat("{ \"policy\": \"AuxLoss\", \"aux_alpha\": ", b.aux_alpha, " }");
    case MOERT_BALANCING_LOSS_FREE_BIAS:
      return cat("{ \"policy\": \"LossFreeBias\", \"bias_update_rate\": ", b.gamma, " }");
    default:
      return "{ \"policy\": \"None\" }";
  }
}

std::string layer(const std::string& name, const std::string& kind, const std::string& body) {
  return cat("    { \"name\": \"", name, "\", \"kind_type\": \"", kind, "\", \"kind\": { ", body,
             " } }");
}

std::string norm_json(const CharLMShape& s) {
  return cat("\"dim\": ", s.width(), ", \"weight\": { \"init\": { \"kind\": \"Ones\" } }");
}

std::string moe_block_json(const CharLMShape& s, const Balancing& balancing, uint32_t b) {
  const uint32_t d = s.width();
  std::string moe = cat("\"dim\": ", d, ", \"num_experts\": ", s.experts, ", \"top_k\": ", s.top_k,
                        ", \"expert_hidden\": ", s.expert_hidden,
                        ", \"score_function\": \"Sigmoid\", \"num_groups\": 1, \"topk_groups\": 1",
                        ", \"normalize_weights\": true, \"routed_scaling_factor\": 1.0",
                        ", \"num_shared_experts\": ", s.shared,
                        ", \"shared_hidden\": ", s.shared > 0 ? s.shared_hidden : 0,
                        ", \"residual\": true, \"balancing\": ", balancing_json(balancing),
                        ", \"gate\": ", linear_init(d), ", \"w1\": ", linear_init(d),
                        ", \"w3\": ", linear_init(d), ", \"w2\": ", linear_init(s.expert_hidden));
  if (s.shared > 0)
    moe += cat(", \"shared_w1\": ", linear_init(d), ", \"shared_w3\": ", linear_init(d),
               ", \"shared_w2\": ", linear_init(s.shared_hidden));
  return layer(cat("moe", b), "MoE", moe);
}

std::string output_json(const CharLMShape& s) {
  return layer("norm_out", "RMSNorm", norm_json(s)) + ",\n" +
         layer("head", "OutputHead",
               cat("\"dim\": ", s.width(), ", \"vocab_size\": ", kVocabSize,
                   ", \"weight\": ", linear_init(s.width())));
}

}  // namespace

std::string charlm_json(const CharLMShape& s, const Balancing& balancing, uint64_t seed,
                        int probe_block) {
  std::string layers = layer(
      "embed", "Embedding",
      cat("\"vocab_size\": ", kVocabSize, ", \"dim\": ", s.embed_dim, ", \"context\": ", s.context,
          ", \"weight\": { \"init\": { \"kind\": \"Normal\", \"std\": 1.0 "
          "} }"));
  for (uint32_t b = 0; b < s.blocks; ++b) {
    layers += ",\n" + layer(cat("norm", b), "RMSNorm", norm_json(s));
    if (static_cast<int>(b) == probe_block) break;
    layers += ",\n" + moe_block_json(s, balancing, b);
  }
  if (probe_block < 0) layers += ",\n" + output_json(s);
  return cat("{\n  \"schema_major\": 1, \"schema_minor\": 0, \"name\": \"charlm\", \"seed\": ",
             seed, ",\n  \"layers\": [\n", layers, "\n  ]\n}\n");
}

std::string charlm_tail_json(const CharLMShape& s, const Balancing& balancing, uint64_t seed,
                             uint32_t after_block) {
  std::string layers;
  for (uint32_t b = after_block + 1; b < s.blocks; ++b)
    layers += layer(cat("norm", b), "RMSNorm", norm_json(s)) + ",\n" +
              moe_block_json(s, balancing, b) + ",\n";
  layers += output_json(s);
  return cat(
      "{\n  \"schema_major\": 1, \"schema_minor\": 0, \"name\": \"charlm-tail\", "
      "\"seed\": ",
      seed, ", \"input_dim\": ", s.width(), ",\n  \"layers\": [\n", layers, "\n  ]\n}\n");
}

ModelPtr charlm_model(const CharLMShape& shape, const Balancing& balancing, uint64_t seed,
                      int probe_block) {
  const std::vector<uint8_t> bytes =
      json_to_binary(charlm_json(shape, balancing, seed, probe_block), "generated model");
  return load_model_bytes(bytes, "", "generated model");
}

ModelPtr charlm_tail_model(const CharLMShape& shape, const Balancing& balancing, uint64_t seed,
                           uint32_t after_block) {
  const std::vector<uint8_t> bytes =
      json_to_binary(charlm_tail_json(shape, balancing, seed, after_block), "generated tail model");
  return load_model_bytes(bytes, "", "generated tail model");
}

}  // namespace moert_cli
