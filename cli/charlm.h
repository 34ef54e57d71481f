// The character-level MoE language model of `moert train`: an embedding of a fixed window of
// characters, N blocks of RMSNorm -> MoE (shared plus routed SwiGLU experts, DeepSeek-V3 sigmoid
// routing), a final RMSNorm and a linear head over the vocabulary. It is written as FlatBuffers
// JSON against the schema and loaded through the C ABI, so the balancing policy is one field.
#pragma once

#include <cstdint>
#include <string>

#include "cli/library.h"

namespace moert_cli {

struct CharLMShape {
  uint32_t context = 8;     // characters in the window
  uint32_t embed_dim = 16;  // per character; the model width is context * embed_dim
  uint32_t blocks = 2;
  uint32_t experts = 16;
  uint32_t top_k = 4;
  uint32_t expert_hidden = 32;
  uint32_t shared = 1;
  uint32_t shared_hidden = 64;
  uint32_t width() const { return context * embed_dim; }
};

struct Balancing {
  std::string label;  // as printed: "none", "aux", "loss-free", "loss-free(gamma=0.01)"
  int32_t policy = MOERT_BALANCING_NONE;
  double aux_alpha = 0.0;
  double gamma = 0.0;
};

// Parses "none", "aux[:alpha=X]" or "loss-free[:gamma=X]"; the defaults fill what is not given.
Balancing parse_balancing(const std::string& text, double default_alpha, double default_gamma);

// The model as JSON. With `probe_block` >= 0 the description stops after the RMSNorm that feeds
// MoE block `probe_block`: its output is that block's router input (layer names are unchanged, so
// trained parameters copy over by name).
std::string charlm_json(const CharLMShape& shape, const Balancing& balancing, uint64_t seed,
                        int probe_block = -1);

ModelPtr charlm_model(const CharLMShape& shape, const Balancing& balancing, uint64_t seed,
                      int probe_block = -1);

// The part of the model after MoE block `after_block`: hidden-state input (the residual stream
// that block outputs), the remaining blocks, the final RMSNorm and the head, under the same layer
// names. Its input gradient is the gradient of the loss with respect to that block's output.
std::string charlm_tail_json(const CharLMShape& shape, const Balancing& balancing, uint64_t seed,
                             uint32_t after_block);

ModelPtr charlm_tail_model(const CharLMShape& shape, const Balancing& balancing, uint64_t seed,
                           uint32_t after_block);

}  // namespace moert_cli
