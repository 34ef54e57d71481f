// Load limits (moert_load_options): a model or checkpoint that asks for more memory or more reading
// than allowed is refused with MOERT_ERR_LIMIT before anything is allocated for it; the boundary
// is exact; the defaults refuse the files a coverage-guided campaign found (a few hundred bytes
// asking for gigabytes of initialised weights). Also the campaign's Expert Choice finding.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "capi_test_util.h"
#include "model_builder.h"

namespace capi_test {
namespace {

namespace fs = std::filesystem;

LoadOptionsPtr load_options(uint64_t max_memory, uint64_t max_file_bytes = UINT64_MAX) {
  moert_load_options* raw = nullptr;
  EXPECT_TRUE(IsOk(moert_load_options_create(&raw)));
  LoadOptionsPtr o(raw);
  EXPECT_TRUE(IsOk(moert_load_options_set_max_memory(o.get(), max_memory)));
  EXPECT_TRUE(IsOk(moert_load_options_set_max_file_bytes(o.get(), max_file_bytes)));
  return o;
}

moert_status* load_with(const std::vector<uint8_t>& bytes, const moert_load_options* o,
                        const char* dir = nullptr) {
  moert_model* raw = nullptr;
  moert_status* st = moert_model_load_buffer_with_options(bytes.data(), bytes.size(), dir, o, &raw);
  moert_model_free(raw);
  return st;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// A token model that is one embedding of vocab x dim weights from a Normal initialiser: a few
// hundred bytes of description for 4 * vocab * dim bytes of memory.
std::vector<uint8_t> initialised_embedding(uint32_t vocab, uint32_t dim) {
  ModelDesc d;
  d.name = "init-bomb";
  d.layers.push_back(embedding_layer("embed", vocab, dim, 1));
  return build(d);
}

TEST(LoadLimits, AFewHundredBytesAskingFor8GiBAreRefusedBeforeAllocating) {
  // The campaign's 488-byte file declared an initialised 8 GiB tensor, which the loader allocated
  // and filled. 2^24 x 128 fp32 values are 8 GiB.
  const auto bytes = initialised_embedding(1u << 24, 128);
  EXPECT_LT(bytes.size(), 512u);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(IsError(load_with(bytes, nullptr), MOERT_ERR_LIMIT,
                      {"8589934592 bytes (8.00 GiB)", "layer 0 ('embed', Embedding) field 'weight'",
                       "1073741824 bytes (1.00 GiB)", "moert_load_options_set_max_memory"}));
  moert_model* m = nullptr;
  EXPECT_TRUE(IsError(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &m),
                      MOERT_ERR_LIMIT, {"8.00 GiB"}));
  EXPECT_EQ(m, nullptr);
  // Refused from the declared shapes alone: no time goes into an initialiser.
  EXPECT_LT(seconds_since(start), 1.0);
}

TEST(LoadLimits, AnInitialiserJustOverTheDefaultIsRefusedWithoutRunning) {
  // The campaign's 472-byte file kept the loader's initialiser busy for 14 s. Under the default
  // limit an initialised tensor can be at most 1 GiB; 1 GiB + 4 KiB is refused at once...
  const auto over = initialised_embedding((1u << 18) + 1, 1024);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(IsError(load_with(over, nullptr), MOERT_ERR_LIMIT, {"1073745920 bytes"}));
  EXPECT_LT(seconds_since(start), 1.0);
  // ... and a lower limit bounds the work a file can cause further.
  const auto small = initialised_embedding(1024, 256);  // 1 MiB
  EXPECT_TRUE(IsError(load_with(small, load_options(1u << 19).get()), MOERT_ERR_LIMIT,
                      {"1048576 bytes (1.00 MiB)"}));
  EXPECT_TRUE(IsOk(load_with(small, load_options(1u << 20).get())));
}

TEST(LoadLimits, TheTotalCountsNotEachTensor) {
  // Two layers of 600 MiB each: each under the default, together over it; neither is allocated.
  ModelDesc d;
  d.layers.push_back(embedding_layer("embed", 150u << 10, 1024, 1));
  d.layers.push_back(dense_layer("ffn", 1024, 51200));
  const auto bytes = build(d);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(IsError(load_with(bytes, nullptr), MOERT_ERR_LIMIT, {"GiB", "the largest"}));
  EXPECT_LT(seconds_since(start), 1.0);
}

TEST(LoadLimits, TheMemoryBoundaryIsExact) {
  // hidden_baseline: norm 8 + gate 32 + absent gate bias 4 (zeros, still held) + three expert
  // tensors of 128 + head 128 = 556 fp32 values, 2224 bytes.
  const auto bytes = build(hidden_baseline());
  EXPECT_TRUE(IsError(load_with(bytes, load_options(2223).get()), MOERT_ERR_LIMIT, {"2224 bytes"}));
  EXPECT_TRUE(IsOk(load_with(bytes, load_options(2224).get())));
  EXPECT_TRUE(IsError(load_with(bytes, load_options(0).get()), MOERT_ERR_LIMIT));
  // NULL options are the defaults.
  EXPECT_TRUE(IsOk(load_with(bytes, nullptr)));
}

TEST(LoadLimits, FileBytesCountTheDescriptionAndTheExternalDataRead) {
  TempDir dir;
  const std::vector<float> weights = ramp(1024, 0.02f);
  write_file(dir.path() / "weights.bin", weights.data(), weights.size() * sizeof(float));
  ModelDesc d = token_baseline();
  d.external_data = "weights.bin";
  d.layers[kMoE].moe.gate = TensorDesc::external(256, 4 * 8 * 4);  // 128 bytes read
  const auto bytes = build(d);
  const fs::path path = dir.path() / "model.moert";
  write_file(path, bytes);
  const uint64_t need = bytes.size() + 128;
  auto by_path = [&](uint64_t limit) {
    moert_model* m = nullptr;
    moert_status* st =
        moert_model_load_file_with_options(path.c_str(), load_options(UINT64_MAX, limit).get(), &m);
    moert_model_free(m);
    return st;
  };
  const std::string dir_str = dir.path().string();
  EXPECT_TRUE(IsError(by_path(need - 1), MOERT_ERR_LIMIT,
                      {"external data 128 bytes", "moert_load_options_set_max_file_bytes"}));
  EXPECT_TRUE(IsOk(by_path(need)));
  EXPECT_TRUE(IsError(load_with(bytes, load_options(UINT64_MAX, need - 1).get(), dir_str.c_str()),
                      MOERT_ERR_LIMIT));
  EXPECT_TRUE(IsOk(load_with(bytes, load_options(UINT64_MAX, need).get(), dir_str.c_str())));
  // A description over the limit by itself is refused before it is read.
  EXPECT_TRUE(
      IsError(by_path(bytes.size() - 1), MOERT_ERR_LIMIT, {"model description", "model.moert"}));
}

// A size past max_file_bytes is MOERT_ERR_LIMIT, checked before the bytes are read (so the
// small buffer below is never read past its end); past FlatBuffers' 2 GiB with the limit raised,
// the description cannot be a model at all.
TEST(LoadLimits, ABufferPastTheFileLimitIsALimitBeforeItIsAnInvalidModel) {
  const std::vector<uint8_t> bytes(64, 0);
  moert_model* m = nullptr;
  EXPECT_TRUE(IsError(moert_model_load_buffer(bytes.data(), size_t{5} << 30, nullptr, &m),
                      MOERT_ERR_LIMIT, {"5.00 GiB", "moert_load_options_set_max_file_bytes"}));
  EXPECT_TRUE(IsError(moert_model_load_buffer_with_options(bytes.data(), size_t{3} << 30, nullptr,
                                                           load_options(UINT64_MAX).get(), &m),
                      MOERT_ERR_INVALID_MODEL, {"2 GiB"}));
  EXPECT_EQ(m, nullptr);
}

TEST(LoadLimits, NullArgumentsAndHandles) {
  EXPECT_TRUE(IsError(moert_load_options_create(nullptr), MOERT_ERR_INVALID_ARGUMENT, {"out"}));
  moert_load_options_free(nullptr);
  EXPECT_TRUE(IsError(moert_load_options_set_max_memory(nullptr, 1), MOERT_ERR_INVALID_ARGUMENT,
                      {"options"}));
  EXPECT_TRUE(IsError(moert_load_options_set_max_file_bytes(nullptr, 1), MOERT_ERR_INVALID_ARGUMENT,
                      {"options"}));
  const auto o = load_options(1u << 30);
  moert_model* m = nullptr;
  EXPECT_TRUE(IsError(moert_model_load_file_with_options(nullptr, o.get(), &m),
                      MOERT_ERR_INVALID_ARGUMENT, {"path"}));
  EXPECT_TRUE(
      IsError(moert_model_load_file_with_options(example_model_path().c_str(), o.get(), nullptr),
              MOERT_ERR_INVALID_ARGUMENT, {"out"}));
  EXPECT_TRUE(IsError(moert_model_load_buffer_with_options(nullptr, 8, nullptr, o.get(), &m),
                      MOERT_ERR_INVALID_ARGUMENT, {"data"}));
  EXPECT_TRUE(IsError(moert_session_load_with_options(nullptr, "x", o.get()),
                      MOERT_ERR_INVALID_ARGUMENT, {"session"}));
  EXPECT_TRUE(IsError(moert_load_options_set_confine_external_data(nullptr, 1),
                      MOERT_ERR_INVALID_ARGUMENT, {"options"}));

  EXPECT_TRUE(IsOk(moert_model_load_file_with_options(example_model_path().c_str(), nullptr, &m)));
  moert_model_free(m);
}

uint64_t step_count(const moert_session* s) {
  uint64_t n = 99;
  EXPECT_TRUE(IsOk(moert_session_step_count(s, &n)));
  return n;
}

// hidden_baseline() with 64 routed experts of width `expert_hidden` in one group.
ModelDesc many_experts(uint32_t expert_hidden) {
  ModelDesc d = hidden_baseline();
  d.layers[1].moe.num_experts = 64;
  d.layers[1].moe.expert_hidden = expert_hidden;
  d.layers[1].moe.num_groups = 1;
  return d;
}

TEST(LoadLimits, CheckpointLoadsAreBoundedByTheSessionsArchitectureAndByTheOptions) {
  TempDir dir;
  // A checkpoint of a model 300 times the size of hidden_baseline (64 experts of hidden 256).
  ModelPtr big_model = load_ok(build(many_experts(256)));
  ASSERT_TRUE(big_model);
  SessionPtr writer = make_session(big_model.get(), 1, MOERT_MODE_TRAINING);
  const std::string big_ckpt = (dir.path() / "big.moert").string();
  ASSERT_TRUE(IsOk(moert_session_save(writer.get(), big_ckpt.c_str())));

  ModelPtr small_model = load_ok(build(hidden_baseline()));
  SessionPtr s = make_session(small_model.get(), 1, MOERT_MODE_TRAINING);
  // Refused for its size before anything of it is read into memory, not for its architecture.
  EXPECT_TRUE(IsError(moert_session_load(s.get(), big_ckpt.c_str()), MOERT_ERR_LIMIT,
                      {"big.moert", "another, larger model", "load options only lower"}));

  // The options bound a checkpoint of the right architecture further.
  std::vector<float> x(8 * 4, 0.5f), y(16 * 4);
  ASSERT_TRUE(
      IsOk(moert_session_forward_hidden(s.get(), x.data(), x.size(), 4, y.data(), y.size())));
  std::vector<float> dy(y.size(), 0.01f);
  ASSERT_TRUE(IsOk(moert_session_backward(s.get(), dy.data(), dy.size(), nullptr, 0, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_step(s.get(), nullptr, nullptr)));
  const std::string ckpt = (dir.path() / "small.moert").string();
  ASSERT_TRUE(IsOk(moert_session_save(s.get(), ckpt.c_str())));
  SessionPtr t = make_session(small_model.get(), 1, MOERT_MODE_TRAINING);
  EXPECT_TRUE(
      IsError(moert_session_load_with_options(t.get(), ckpt.c_str(), load_options(2224 * 2).get()),
              MOERT_ERR_LIMIT));
  EXPECT_EQ(step_count(t.get()), 0u);
  EXPECT_TRUE(IsError(
      moert_session_load_with_options(t.get(), ckpt.c_str(), load_options(UINT64_MAX, 100).get()),
      MOERT_ERR_LIMIT, {"moert_load_options_set_max_file_bytes"}));
  EXPECT_EQ(step_count(t.get()), 0u);
  EXPECT_TRUE(IsOk(moert_session_load_with_options(t.get(), ckpt.c_str(), nullptr)));
  EXPECT_EQ(step_count(t.get()), 1u);
}

// A checkpoint's data file is external data too: with confine_external_data a session refuses one
// that a link takes out of the checkpoint's directory, and keeps its state.
TEST(LoadLimits, ConfineExternalDataCoversACheckpointsDataFile) {
  TempDir dir;
  // Experts big enough (256 KiB per weight) that the checkpoint has a data file.
  ModelPtr model = load_ok(build(many_experts(128)));
  ASSERT_TRUE(model);
  SessionPtr writer = make_session(model.get(), 1, MOERT_MODE_TRAINING);
  std::vector<float> x(8 * 4, 0.5f), y(16 * 4), dy(16 * 4, 0.01f);
  ASSERT_TRUE(
      IsOk(moert_session_forward_hidden(writer.get(), x.data(), x.size(), 4, y.data(), y.size())));
  ASSERT_TRUE(
      IsOk(moert_session_backward(writer.get(), dy.data(), dy.size(), nullptr, 0, nullptr)));
  ASSERT_TRUE(IsOk(moert_session_step(writer.get(), nullptr, nullptr)));
  fs::create_directories(dir.path() / "ck");
  const fs::path ckpt = dir.path() / "ck" / "a.moert";
  ASSERT_TRUE(IsOk(moert_session_save(writer.get(), ckpt.c_str())));
  // Move the data file out and leave a link to it in its place.
  fs::path data;
  for (const auto& e : fs::directory_iterator(dir.path() / "ck"))
    if (e.path().extension() == ".data") data = e.path();
  ASSERT_FALSE(data.empty());
  const fs::path moved = dir.path() / "elsewhere.data";
  fs::rename(data, moved);
  fs::create_symlink(moved, data);

  auto confine = load_options(UINT64_MAX);
  // Any non-zero value turns it on, as the ABI's other flags.
  ASSERT_TRUE(IsOk(moert_load_options_set_confine_external_data(confine.get(), 7)));
  SessionPtr s = make_session(model.get(), 1, MOERT_MODE_TRAINING);
  const auto w1 = [&] {
    std::vector<float> w(64 * 128 * 8);
    EXPECT_TRUE(IsOk(moert_session_get_parameter(s.get(), "moe0.w1", w.data(), w.size())));
    return w;
  };
  const std::vector<float> before = w1();
  EXPECT_TRUE(IsError(moert_session_load_with_options(s.get(), ckpt.c_str(), confine.get()),
                      MOERT_ERR_INVALID_MODEL,
                      {"elsewhere.data", "outside the model's directory"}));
  EXPECT_EQ(step_count(s.get()), 0u);
  EXPECT_EQ(w1(), before);
  EXPECT_TRUE(IsOk(moert_session_load_with_options(s.get(), ckpt.c_str(), nullptr)));
  EXPECT_EQ(step_count(s.get()), 1u);
}

// The campaign: an Expert Choice layer with capacity_factor 1e30 loaded, and its first forward
// pass converted an out-of-range double to int64 (UBSan) and returned MOERT_ERR_INTERNAL
// "vector::_M_default_append". A capacity past num_experts cannot be computed: it is refused.
TEST(FuzzRegressions, ExpertChoiceCapacityFactorPastNumExpertsIsRefusedAtLoad) {
  auto model = [](float capacity_factor) {
    ModelDesc d = hidden_baseline();
    d.layers[1].moe.balancing.policy = 4;  // ExpertChoice
    d.layers[1].moe.balancing.capacity_factor = capacity_factor;
    return build(d);
  };
  EXPECT_TRUE(IsError(load_with(model(1e30f), nullptr), MOERT_ERR_INVALID_MODEL,
                      {"layer 1", "'balancing.capacity_factor'", "exceeds num_experts 4"}));
  EXPECT_TRUE(IsError(load_with(model(4.5f), nullptr), MOERT_ERR_INVALID_MODEL,
                      {"'balancing.capacity_factor'"}));
  // At num_experts every expert takes every token: computable, and it runs.
  ModelPtr m = load_ok(model(4.0f));
  ASSERT_TRUE(m);
  SessionPtr s = make_session(m.get());
  std::vector<float> x(8 * 3, 0.25f), y(16 * 3);
  EXPECT_TRUE(
      IsOk(moert_session_forward_hidden(s.get(), x.data(), x.size(), 3, y.data(), y.size())));
  std::vector<int64_t> counts(4);
  EXPECT_TRUE(IsOk(moert_session_expert_counts(s.get(), 1, MOERT_COUNTS_LAST, counts.data(), 4)));
  EXPECT_EQ(counts, std::vector<int64_t>(4, 3));
  // The policy reads it only for Expert Choice: elsewhere a large value is ignored, as before.
  ModelDesc d = hidden_baseline();
  d.layers[1].moe.balancing.capacity_factor = 1e30f;
  EXPECT_TRUE(IsOk(load_with(build(d), nullptr)));
}

}  // namespace
}  // namespace capi_test
