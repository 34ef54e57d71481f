// Description-only loads (moert_load_options_set_description_only): the model answers every call
// that describes it exactly as a full load of the same file does, costs a scan of its description
// whatever its size, needs no data file, and refuses everything that needs its weights while
// leaving the caller's state intact.
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "capi_test_util.h"
#include "model_builder.h"

namespace capi_test {
namespace {

namespace fs = std::filesystem;

LoadOptionsPtr described_only() {
  moert_load_options* raw = nullptr;
  EXPECT_TRUE(IsOk(moert_load_options_create(&raw)));
  LoadOptionsPtr o(raw);
  // Any non-zero value turns it on, as the ABI's other flags.
  EXPECT_TRUE(IsOk(moert_load_options_set_description_only(o.get(), 3)));
  return o;
}

ModelPtr load_described(const std::vector<uint8_t>& bytes, const char* dir = nullptr) {
  moert_model* raw = nullptr;
  EXPECT_TRUE(IsOk(moert_model_load_buffer_with_options(bytes.data(), bytes.size(), dir,
                                                        described_only().get(), &raw)));
  return ModelPtr(raw);
}

ModelPtr load_file(const fs::path& path, const moert_load_options* options) {
  moert_model* raw = nullptr;
  EXPECT_TRUE(IsOk(moert_model_load_file_with_options(path.c_str(), options, &raw))) << path;
  return ModelPtr(raw);
}

// Everything the ABI tells about a model without its values, one line per answer.
std::string describe(const moert_model* m) {
  std::string s;
  auto line = [&](const std::string& what, auto value) {
    s += what + " = " + std::to_string(value) + "\n";
  };
  uint32_t layers = 0;
  EXPECT_TRUE(IsOk(moert_model_num_layers(m, &layers)));
  uint64_t total = 0, activated = 0, resident = 0;
  EXPECT_TRUE(IsOk(moert_model_num_parameters(m, &total, &activated)));
  EXPECT_TRUE(IsOk(moert_model_resident_bytes(m, &resident)));
  line("parameters", total);
  line("activated", activated);
  line("resident", resident);
  int32_t is_checkpoint = 0;
  uint64_t step = 0;
  EXPECT_TRUE(IsOk(moert_model_checkpoint_step(m, &is_checkpoint, &step)));
  line("checkpoint", is_checkpoint);
  line("step", step);
  for (uint32_t i = 0; i < layers; ++i) {
    const std::string at = "layer " + std::to_string(i) + " ";
    int32_t kind = 0;
    uint32_t in = 0, out = 0, tensors = 0;
    EXPECT_TRUE(IsOk(moert_model_layer_kind(m, i, &kind)));
    EXPECT_TRUE(IsOk(moert_model_layer_dims(m, i, &in, &out)));
    EXPECT_TRUE(IsOk(moert_model_num_tensors(m, i, &tensors)));
    line(at + "kind", kind);
    line(at + "in", in);
    line(at + "out", out);
    for (uint32_t t = 0; t < tensors; ++t) {
      const char* name = nullptr;
      int32_t stored = -1, held = -1;
      uint64_t numel = 0, bytes = 0;
      EXPECT_TRUE(IsOk(moert_model_tensor_info(m, i, t, &name, &stored, &held, &numel, &bytes)));
      const std::string tensor = at + name + " ";
      line(tensor + "stored", stored);
      line(tensor + "held", held);
      line(tensor + "numel", numel);
      line(tensor + "bytes", bytes);
    }
    if (kind != MOERT_LAYER_MOE) continue;
    for (int32_t key = MOERT_MOE_DIM; key <= MOERT_MOE_SAVED_BIAS_FROZEN; ++key) {
      int64_t v = 0;
      if (key == MOERT_MOE_SAVED_BIAS_FROZEN && !is_checkpoint) continue;
      EXPECT_TRUE(IsOk(moert_model_moe_int(m, i, key, &v))) << key;
      line(at + "int " + std::to_string(key), v);
    }
    for (int32_t key = MOERT_MOE_ROUTED_SCALING_FACTOR; key <= MOERT_MOE_SAVED_BIAS_UPDATE_RATE;
         ++key) {
      double v = 0;
      if (key == MOERT_MOE_SAVED_BIAS_UPDATE_RATE && !is_checkpoint) continue;
      EXPECT_TRUE(IsOk(moert_model_moe_float(m, i, key, &v))) << key;
      line(at + "float " + std::to_string(key), v);
    }
  }
  return s;
}

// The file at `path` loaded both ways: its description-only answers, which must be the full load's.
std::string described_as_loaded(const fs::path& path) {
  ModelPtr full = load_file(path, nullptr);
  ModelPtr described = load_file(path, described_only().get());
  if (!full || !described) return "";
  const std::string text = describe(described.get());
  EXPECT_EQ(text, describe(full.get())) << path;
  return text;
}

// One optimizer step of a training session over `model`, saved to `path` as a checkpoint.
void save_trained_checkpoint(const moert_model* model, const fs::path& path) {
  SessionPtr s = make_session(model, 1, MOERT_MODE_TRAINING);
  ASSERT_TRUE(s);
  std::vector<float> x(8 * 4, 0.5f), y(16 * 4), dy(16 * 4, 0.01f);
  ASSERT_TRUE(
      IsOk(moert_session_forward_hidden(s.get(), x.data(), x.size(), 4, y.data(), y.size())));
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), dy.data(), dy.size(), nullptr, 0, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_set_bias_update_rate(s.get(), 1, 0.25f)));
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), path.c_str())));
}

TEST(DescriptionOnly, AnswersEveryDescribingCallAsAFullLoadDoes) {
  // Inline F32 and BF16 data, initialisers, an absent loss-free bias (zeros, still counted).
  for (const ModelDesc& d : {token_baseline(), hidden_baseline()}) {
    const auto bytes = build(d);
    ModelPtr full = load_ok(bytes);
    ModelPtr described = load_described(bytes);
    ASSERT_TRUE(full && described);
    EXPECT_EQ(describe(described.get()), describe(full.get()));
  }
  TempDir dir;
  // FP8 experts in 128x128 blocks (held as codes and scales) in an external data file.
  ModelPtr example = load_file(example_model_path(), nullptr);
  ASSERT_TRUE(example);
  moert_model* raw = nullptr;
  ASSERT_TRUE(IsOk(moert_model_quantize_fp8(example.get(), 0, &raw, nullptr)));
  ModelPtr fp8(raw);
  const fs::path fp8_path = dir.path() / "fp8.moert";
  ASSERT_TRUE(IsOk(moert_model_save_file(fp8.get(), fp8_path.c_str())));
  const std::string fp8_text = described_as_loaded(fp8_path);
  EXPECT_NE(fp8_text.find("w1 held = 2"), std::string::npos) << fp8_text;
  // A checkpoint: its step and the balancing state its run saved.
  ModelPtr hidden = load_ok(build(hidden_baseline()));
  const fs::path ckpt = dir.path() / "ckpt.moert";
  save_trained_checkpoint(hidden.get(), ckpt);
  const std::string ckpt_text = described_as_loaded(ckpt);
  EXPECT_NE(ckpt_text.find("step = 1\n"), std::string::npos) << ckpt_text;
  EXPECT_NE(ckpt_text.find("float 105 = 0.25"), std::string::npos) << ckpt_text;
}

TEST(DescriptionOnly, A8GiBModelLoadsInAMomentUnderTheDefaultLimits) {
  // A few hundred bytes declaring an initialised 8 GiB embedding: refused by the default
  // max_memory when loaded whole, described in a moment (max_memory does not apply).
  ModelDesc d;
  d.name = "8-gib";
  d.layers.push_back(embedding_layer("embed", 1u << 24, 128, 1));
  const auto bytes = build(d);
  moert_model* raw = nullptr;
  EXPECT_TRUE(IsError(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &raw),
                      MOERT_ERR_LIMIT, {"8.00 GiB"}));
  const auto start = std::chrono::steady_clock::now();
  ModelPtr m = load_described(bytes);
  ASSERT_TRUE(m);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 1.0);
  uint64_t resident = 0, total = 0;
  ASSERT_TRUE(IsOk(moert_model_resident_bytes(m.get(), &resident)));
  ASSERT_TRUE(IsOk(moert_model_num_parameters(m.get(), &total, nullptr)));
  EXPECT_EQ(resident, uint64_t{8} << 30);
  EXPECT_EQ(total, uint64_t{1} << 31);
  // max_file_bytes still bounds the description itself.
  LoadOptionsPtr tight = described_only();
  ASSERT_TRUE(IsOk(moert_load_options_set_max_file_bytes(tight.get(), bytes.size() - 1)));
  EXPECT_TRUE(IsError(
      moert_model_load_buffer_with_options(bytes.data(), bytes.size(), nullptr, tight.get(), &raw),
      MOERT_ERR_LIMIT, {"moert_load_options_set_max_file_bytes"}));
}

TEST(DescriptionOnly, TotalsPast2To64StopAtTheLargestValue) {
  // Three shared-expert tensors of 2^61 - 2^29 values (2^63 - 2^31 bytes) each: every size fits
  // 64 bits, their sum of bytes does not. A full load is refused by its limits; described, the
  // total must not wrap to a small number (a tool would then load it whole).
  ModelDesc d = hidden_baseline();
  d.layers[1].moe.num_shared = 1u << 26;
  d.layers[1].moe.shared_hidden = 0xFFFFFFFFu;
  for (TensorDesc* t :
       {&d.layers[1].moe.shared_w1, &d.layers[1].moe.shared_w3, &d.layers[1].moe.shared_w2})
    *t = TensorDesc::init();
  const auto bytes = build(d);
  moert_model* raw = nullptr;
  EXPECT_TRUE(
      IsError(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &raw), MOERT_ERR_LIMIT));
  ModelPtr m = load_described(bytes);
  ASSERT_TRUE(m);
  uint64_t resident = 0, tensor_bytes = 0;
  ASSERT_TRUE(IsOk(moert_model_resident_bytes(m.get(), &resident)));
  EXPECT_EQ(resident, UINT64_MAX);
  uint32_t tensors = 0;
  ASSERT_TRUE(IsOk(moert_model_num_tensors(m.get(), 1, &tensors)));
  for (uint32_t t = 0; t < tensors; ++t) {
    const char* name = nullptr;
    ASSERT_TRUE(IsOk(
        moert_model_tensor_info(m.get(), 1, t, &name, nullptr, nullptr, nullptr, &tensor_bytes)));
    if (std::string(name) == "shared_w1") {
      EXPECT_EQ(tensor_bytes, (uint64_t{1} << 63) - (1u << 31));
    }
  }
}

TEST(DescriptionOnly, TheDataFileIsNeitherOpenedNorNeededButItsNameIsChecked) {
  // hidden_baseline with its experts' w1 in an external file that is not there.
  ModelDesc d = hidden_baseline();
  d.external_data = "weights.bin";
  d.layers[1].moe.w1 = TensorDesc::external(0, 4 * 4 * 8 * sizeof(float));
  const auto bytes = build(d);
  TempDir dir;
  moert_model* raw = nullptr;
  EXPECT_TRUE(IsError(moert_model_load_buffer(bytes.data(), bytes.size(), dir.path().c_str(), &raw),
                      MOERT_ERR_IO, {"weights.bin"}));
  // Described, from a directory without the file, or from memory with no directory at all.
  ModelPtr m = load_described(bytes, dir.path().c_str());
  ASSERT_TRUE(m);
  ModelPtr from_memory = load_described(bytes);
  ASSERT_TRUE(from_memory);
  EXPECT_EQ(describe(m.get()), describe(from_memory.get()));
  uint64_t numel = 0;
  ASSERT_TRUE(IsOk(moert_model_tensor_info(m.get(), 1, 1, nullptr, nullptr, nullptr, &numel,
                                           nullptr)));  // tensor 1 of a MoE layer: w1
  EXPECT_EQ(numel, 4u * 4 * 8);
  // A name that leaves the directory is refused all the same.
  d.external_data = "../weights.bin";
  const auto outside = build(d);
  EXPECT_TRUE(IsError(moert_model_load_buffer_with_options(outside.data(), outside.size(), nullptr,
                                                           described_only().get(), &raw),
                      MOERT_ERR_INVALID_MODEL, {"must stay inside"}));
  // The description's meaning is checked as in a full load.
  ModelDesc wrong = hidden_baseline();
  wrong.layers[1].moe.top_k = 9;
  const auto bad = build(wrong);
  EXPECT_TRUE(IsError(moert_model_load_buffer_with_options(bad.data(), bad.size(), nullptr,
                                                           described_only().get(), &raw),
                      MOERT_ERR_INVALID_MODEL, {"top_k", "exceeds num_experts"}));
  EXPECT_EQ(raw, nullptr);
}

TEST(DescriptionOnly, WhatNeedsTheWeightsIsRefusedAndStateIsKept) {
  const auto bytes = build(hidden_baseline());
  ModelPtr m = load_described(bytes);
  ASSERT_TRUE(m);
  // What every refusal says: the reason, and the way out.
#define WHY \
  { "description-only", "load it without that option" }
  for (int32_t mode : {MOERT_MODE_INFERENCE, MOERT_MODE_TRAINING}) {
    moert_session_options* raw_options = nullptr;
    ASSERT_TRUE(IsOk(moert_session_options_create(&raw_options)));
    OptionsPtr options(raw_options);
    ASSERT_TRUE(IsOk(moert_session_options_set_mode(options.get(), mode)));
    moert_session* s = nullptr;
    EXPECT_TRUE(
        IsError(moert_session_create(m.get(), options.get(), &s), MOERT_ERR_INVALID_ARGUMENT, WHY));
    EXPECT_EQ(s, nullptr);
  }
  moert_batcher_options* raw_batcher_options = nullptr;
  ASSERT_TRUE(IsOk(moert_batcher_options_create(&raw_batcher_options)));
  moert_batcher* b = nullptr;
  EXPECT_TRUE(IsError(moert_batcher_create(m.get(), raw_batcher_options, &b),
                      MOERT_ERR_INVALID_ARGUMENT, WHY));
  EXPECT_EQ(b, nullptr);
  moert_batcher_options_free(raw_batcher_options);
  moert_model* q = nullptr;
  EXPECT_TRUE(
      IsError(moert_model_quantize_fp8(m.get(), 0, &q, nullptr), MOERT_ERR_INVALID_ARGUMENT, WHY));
  EXPECT_EQ(q, nullptr);
  TempDir dir;
  const fs::path out = dir.path() / "out.moert";
  EXPECT_TRUE(
      IsError(moert_model_save_file(m.get(), out.c_str()), MOERT_ERR_INVALID_ARGUMENT, WHY));
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(fs::is_empty(dir.path()));
#undef WHY

  // A session resuming a checkpoint reads its values: such options are refused, and the session
  // keeps its state.
  ModelPtr full = load_ok(bytes);
  const fs::path ckpt = dir.path() / "ckpt.moert";
  save_trained_checkpoint(full.get(), ckpt);
  SessionPtr s = make_session(full.get(), 1, MOERT_MODE_TRAINING);
  ASSERT_TRUE(s);
  EXPECT_TRUE(
      IsError(moert_session_load_with_options(s.get(), ckpt.c_str(), described_only().get()),
              MOERT_ERR_INVALID_ARGUMENT, {"description_only"}));
  uint64_t steps = 7;
  ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &steps)));
  EXPECT_EQ(steps, 0u);
  EXPECT_TRUE(IsOk(moert_session_load(s.get(), ckpt.c_str())));
  ASSERT_TRUE(IsOk(moert_session_step_count(s.get(), &steps)));
  EXPECT_EQ(steps, 1u);
}

TEST(DescriptionOnly, NullOptionsAreRefused) {
  EXPECT_TRUE(IsError(moert_load_options_set_description_only(nullptr, 1),
                      MOERT_ERR_INVALID_ARGUMENT, {"options"}));
}

}  // namespace
}  // namespace capi_test
