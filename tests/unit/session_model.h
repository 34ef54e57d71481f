// A small token-input MoE model and its batches, for the tests of session precisions (bf16, FP8):
// embedding -> RMSNorm -> MoE (2 shared experts, loss-free balancing) -> head.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "core/model.h"
#include "core/session.h"
#include "tests/unit/random_tensor.h"

namespace moert::test {

// Widths of the MoE layer: the model dimension, a routed and a shared expert's hidden width.
struct MoeWidths {
  uint32_t dim = 64, expert_hidden = 48, shared_hidden = 32;
};

inline constexpr uint32_t kSessionVocab = 29;

inline std::shared_ptr<Model> moe_model(std::mt19937& rng, MoeWidths w = {}) {
  auto m = std::make_shared<Model>();
  m->token_input = true;
  const uint32_t V = kSessionVocab, D = w.dim, E = 8, H = w.expert_hidden, S = w.shared_hidden;
  m->input_width = 4;
  m->output_width = V;
  // 4 tokens per row, each embedded D / 4 wide: the row is D wide.
  const uint32_t per_token = D / 4;
  m->layers.push_back({"emb", LayerKind::Embedding, 4, D,
                       EmbeddingSpec{V, per_token, 4, random_tensor({V, per_token}, rng)}});
  RMSNormSpec norm{D, 1e-5f, random_tensor({D}, rng, 0.1f)};
  for (auto& v : norm.weight.values) v += 1.0f;
  m->layers.push_back({"norm", LayerKind::RMSNorm, D, D, norm});
  MoESpec moe;
  moe.dim = D;
  moe.expert_hidden = H;
  moe.num_shared = 2;
  moe.shared_hidden = S;
  moe.router = {E, 2, ScoreFunction::Sigmoid, 1, 1, true, 1.0f};
  moe.balancing.policy = BalancingPolicy::LossFreeBias;
  moe.balancing.bias_update_rate = 1e-3f;
  moe.gate = random_tensor({E, D}, rng, 0.2f);
  moe.gate_bias = random_tensor({E}, rng, 0.0f);
  moe.w1 = random_tensor({E, H, D}, rng, 0.15f);
  moe.w3 = random_tensor({E, H, D}, rng, 0.15f);
  moe.w2 = random_tensor({E, D, H}, rng, 0.15f);
  moe.shared_w1 = random_tensor({2, S, D}, rng, 0.15f);
  moe.shared_w3 = random_tensor({2, S, D}, rng, 0.15f);
  moe.shared_w2 = random_tensor({2, D, S}, rng, 0.15f);
  m->layers.push_back({"moe", LayerKind::MoE, D, D, moe});
  m->layers.push_back({"head", LayerKind::OutputHead, D, V,
                       OutputHeadSpec{D, V, false, random_tensor({V, D}, rng, 0.2f), {}}});
  return m;
}

struct Batch {
  std::vector<int32_t> tokens, targets;
};

inline Batch batch(std::mt19937& rng, int64_t rows) {
  Batch b{std::vector<int32_t>(rows * 4), std::vector<int32_t>(rows)};
  std::uniform_int_distribution<int32_t> tok(0, kSessionVocab - 1);
  for (auto& t : b.tokens) t = tok(rng);
  for (auto& t : b.targets) t = tok(rng);
  return b;
}

inline SessionOptions options(Precision p, Mode mode, uint32_t threads = 2) {
  SessionOptions o;
  o.mode = mode;
  o.threads = threads;
  o.precision = p;
  o.training.lr = 3e-3;
  return o;
}

}  // namespace moert::test
