// A small token-input MoE model and its batches, for the tests of session precisions (bf16, FP8):
// embedding -> RMSNorm -> MoE (2 shared experts, loss-free balancing) -> head.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/model.h"
#include "core/model_loader.h"
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

// Everything a pass leaves: its outputs, then every gradient.
inline std::vector<float> outputs_and_gradients(Session& s, const Batch& b, int64_t rows) {
  std::vector<float> all(rows * kSessionVocab);
  s.forward_tokens(b.tokens.data(), b.tokens.size(), rows, all.data(), all.size());
  s.backward_loss(b.targets.data(), b.targets.size());
  for (size_t p = 0; p < s.num_parameters(); ++p) {
    std::vector<float> g(s.parameter_size(p));
    s.read_gradient(p, g.data(), g.size());
    all.insert(all.end(), g.begin(), g.end());
  }
  return all;
}

// Saves the training session `s` (to `file` in the test's temporary directory), puts it in eval
// mode, and checks that an inference session made from the checkpoint with `inference` options
// (its weight copies made from the saved masters) gives its outputs on `b` bit for bit.
inline void expect_checkpoint_serves_the_same(Session& s, const SessionOptions& inference,
                                              const Batch& b, int64_t rows,
                                              const std::string& file) {
  const std::string path = ::testing::TempDir() + file;
  s.save(path);
  s.set_eval(true);
  std::vector<float> y_train(rows * kSessionVocab), y_inf(y_train.size());
  s.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y_train.data(), y_train.size());
  Session inf(load_model_file(path), inference);
  inf.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y_inf.data(), y_inf.size());
  EXPECT_EQ(0, std::memcmp(y_train.data(), y_inf.data(), y_inf.size() * sizeof(float)));
  std::remove(path.c_str());
}

// The code of the Error f throws; 0 when it throws none.
inline int code_of(auto&& f) {
  try {
    f();
  } catch (const Error& e) {
    return static_cast<int>(e.code());
  }
  return 0;
}

inline int code(Code c) { return static_cast<int>(c); }

inline SessionOptions options(Precision p, Mode mode, uint32_t threads = 2) {
  SessionOptions o;
  o.mode = mode;
  o.threads = threads;
  o.precision = p;
  o.training.lr = 3e-3;
  return o;
}

}  // namespace moert::test
