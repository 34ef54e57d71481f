// Misuse of handles and arguments: NULL handles and out-pointers for every function of moert.h,
// out-of-range indices and keys, session options and their validation.
#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "capi_test_util.h"
#include "model_builder.h"

namespace capi_test {
namespace {

constexpr int32_t kInvalid = MOERT_ERR_INVALID_ARGUMENT;

// The example model (layers: embed, norm0, moe0, norm1, moe1, head) and a session over it.
class Handles : public testing::Test {
 protected:
  void SetUp() override {
    moert_model* m = nullptr;
    ASSERT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
    model_.reset(m);
    session_ = make_session(model_.get());
    ASSERT_TRUE(session_);
    moert_session_options* o = nullptr;
    ASSERT_TRUE(IsOk(moert_session_options_create(&o)));
    options_.reset(o);
  }

  ModelPtr model_;
  SessionPtr session_;
  OptionsPtr options_;
};

TEST_F(Handles, EveryFreeAcceptsNull) {
  moert_status_free(nullptr);
  moert_model_free(nullptr);
  moert_session_options_free(nullptr);
  moert_session_free(nullptr);
  SUCCEED();
}

TEST_F(Handles, NullArgumentsOfModelLoading) {
  const auto bytes = read_file(example_model_path());
  moert_model* m = nullptr;
  EXPECT_TRUE(IsError(moert_model_load_file(nullptr, &m), kInvalid, {"path"}));
  EXPECT_TRUE(
      IsError(moert_model_load_file(example_model_path().c_str(), nullptr), kInvalid, {"out"}));
  EXPECT_TRUE(
      IsError(moert_model_load_buffer(nullptr, bytes.size(), nullptr, &m), kInvalid, {"data"}));
  EXPECT_TRUE(IsError(moert_model_load_buffer(nullptr, 0, nullptr, &m), kInvalid, {"data"}));
  EXPECT_TRUE(IsError(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, nullptr),
                      kInvalid, {"out"}));
  EXPECT_EQ(m, nullptr);
}

// A description with external weights, from memory: it needs the directory of its data file,
// which the caller must give (the description itself is sound).
TEST_F(Handles, ABufferWithExternalWeightsNeedsItsDirectory) {
  const TempDir dir;
  const std::string path = (dir.path() / "m.moert").string();
  ASSERT_TRUE(IsOk(moert_model_save_file(model_.get(), path.c_str())));
  const auto bytes = read_file(path);
  moert_model* m = nullptr;
  EXPECT_TRUE(IsError(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &m), kInvalid,
                      {"external weights", "external_dir"}));
  EXPECT_EQ(m, nullptr);
  EXPECT_TRUE(load_ok(bytes, dir.path().c_str()));
}

TEST_F(Handles, NullArgumentsOfModelInspection) {
  const char* s = "unchanged";
  uint32_t u = 77;
  int32_t i = 77;
  uint64_t u64 = 77;
  int64_t i64 = 77;
  double d = 77.0;
  EXPECT_TRUE(IsError(moert_model_name(nullptr, &s), kInvalid, {"model"}));
  EXPECT_TRUE(IsError(moert_model_name(model_.get(), nullptr), kInvalid, {"out"}));
  EXPECT_TRUE(IsError(moert_model_num_layers(nullptr, &u), kInvalid, {"model"}));
  EXPECT_TRUE(IsError(moert_model_num_layers(model_.get(), nullptr), kInvalid, {"out"}));
  EXPECT_TRUE(IsError(moert_model_layer_kind(nullptr, 0, &i), kInvalid, {"model"}));
  EXPECT_TRUE(IsError(moert_model_layer_kind(model_.get(), 0, nullptr), kInvalid, {"out"}));
  EXPECT_TRUE(IsError(moert_model_layer_name(nullptr, 0, &s), kInvalid, {"model"}));
  EXPECT_TRUE(IsError(moert_model_layer_name(model_.get(), 0, nullptr), kInvalid, {"out"}));
  EXPECT_TRUE(IsError(moert_model_layer_dims(nullptr, 0, &u, &u), kInvalid, {"model"}));
  EXPECT_TRUE(IsError(moert_model_io(nullptr, &i, &u, &u), kInvalid, {"model"}));
  EXPECT_TRUE(IsError(moert_model_num_parameters(nullptr, &u64, &u64), kInvalid, {"model"}));
  EXPECT_TRUE(IsError(moert_model_moe_int(nullptr, 2, MOERT_MOE_TOP_K, &i64), kInvalid, {"model"}));
  EXPECT_TRUE(
      IsError(moert_model_moe_int(model_.get(), 2, MOERT_MOE_TOP_K, nullptr), kInvalid, {"out"}));
  EXPECT_TRUE(
      IsError(moert_model_moe_float(nullptr, 2, MOERT_MOE_AUX_ALPHA, &d), kInvalid, {"model"}));
  EXPECT_TRUE(IsError(moert_model_moe_float(model_.get(), 2, MOERT_MOE_AUX_ALPHA, nullptr),
                      kInvalid, {"out"}));
  // Failures leave the outputs alone.
  EXPECT_STREQ(s, "unchanged");
  EXPECT_EQ(u, 77u);
  EXPECT_EQ(i, 77);
  EXPECT_EQ(u64, 77u);
  EXPECT_EQ(i64, 77);
  EXPECT_EQ(d, 77.0);
}

TEST_F(Handles, OptionalOutPointersMayBeNull) {
  EXPECT_TRUE(IsOk(moert_model_layer_dims(model_.get(), 0, nullptr, nullptr)));
  EXPECT_TRUE(IsOk(moert_model_io(model_.get(), nullptr, nullptr, nullptr)));
  EXPECT_TRUE(IsOk(moert_model_num_parameters(model_.get(), nullptr, nullptr)));
  uint32_t in_width = 0, out_width = 0;
  EXPECT_TRUE(IsOk(moert_model_layer_dims(model_.get(), 0, &in_width, nullptr)));
  EXPECT_TRUE(IsOk(moert_model_layer_dims(model_.get(), 0, nullptr, &out_width)));
  EXPECT_EQ(in_width, 4u);    // the embedding's context
  EXPECT_EQ(out_width, 64u);  // 4 tokens x 16
  uint64_t total = 0, activated = 0;
  EXPECT_TRUE(IsOk(moert_model_num_parameters(model_.get(), &total, nullptr)));
  EXPECT_TRUE(IsOk(moert_model_num_parameters(model_.get(), nullptr, &activated)));
  EXPECT_GT(total, activated);
  EXPECT_GT(activated, 0u);
}

TEST_F(Handles, NullArgumentsOfSessionOptions) {
  EXPECT_TRUE(IsError(moert_session_options_create(nullptr), kInvalid, {"out"}));
  EXPECT_TRUE(IsError(moert_session_options_set_device(nullptr, MOERT_DEVICE_CPU, 0), kInvalid,
                      {"options"}));
  EXPECT_TRUE(IsError(moert_session_options_set_threads(nullptr, 2), kInvalid, {"options"}));
  EXPECT_TRUE(IsError(moert_session_options_set_seed(nullptr, 2), kInvalid, {"options"}));
  EXPECT_TRUE(IsError(moert_session_options_set_mode(nullptr, MOERT_MODE_INFERENCE), kInvalid,
                      {"options"}));
  EXPECT_TRUE(IsError(moert_session_options_set_config(nullptr, "check_finite", "true"), kInvalid,
                      {"options"}));
  EXPECT_TRUE(IsError(moert_session_options_set_config(options_.get(), nullptr, "true"), kInvalid,
                      {"key"}));
  EXPECT_TRUE(IsError(moert_session_options_set_config(options_.get(), "check_finite", nullptr),
                      kInvalid, {"value"}));
}

TEST_F(Handles, NullArgumentsOfSessions) {
  moert_session* s = nullptr;
  EXPECT_TRUE(IsError(moert_session_create(nullptr, options_.get(), &s), kInvalid, {"model"}));
  EXPECT_TRUE(
      IsError(moert_session_create(model_.get(), options_.get(), nullptr), kInvalid, {"out"}));
  EXPECT_EQ(s, nullptr);
  // NULL options mean the defaults.
  ASSERT_TRUE(IsOk(moert_session_create(model_.get(), nullptr, &s)));
  moert_session_free(s);

  std::vector<int32_t> tokens(4, 1);
  std::vector<float> hidden(64, 0.5f), out(64, 0.0f);
  EXPECT_TRUE(IsError(moert_session_forward_tokens(nullptr, tokens.data(), 4, 1, out.data(), 64),
                      kInvalid, {"session"}));
  EXPECT_TRUE(IsError(moert_session_forward_tokens(session_.get(), nullptr, 4, 1, out.data(), 64),
                      kInvalid, {"tokens"}));
  EXPECT_TRUE(
      IsError(moert_session_forward_tokens(session_.get(), tokens.data(), 4, 1, nullptr, 64),
              kInvalid, {"out"}));
  EXPECT_TRUE(IsError(moert_session_forward_hidden(nullptr, hidden.data(), 64, 1, out.data(), 64),
                      kInvalid, {"session"}));

  // forward_hidden's NULL checks, on a model that takes hidden states.
  ModelPtr hidden_model = load_ok(build(hidden_baseline()));
  ASSERT_TRUE(hidden_model);
  SessionPtr hs = make_session(hidden_model.get());
  ASSERT_TRUE(hs);
  std::vector<float> hin(8, 0.5f), hout(16, 0.0f);
  EXPECT_TRUE(IsError(moert_session_forward_hidden(hs.get(), nullptr, 8, 1, hout.data(), 16),
                      kInvalid, {"in"}));
  EXPECT_TRUE(IsError(moert_session_forward_hidden(hs.get(), hin.data(), 8, 1, nullptr, 16),
                      kInvalid, {"out"}));

  std::vector<int64_t> counts(8, 0);
  double vio = 7.0;
  EXPECT_TRUE(IsError(moert_session_expert_counts(nullptr, 2, MOERT_COUNTS_LAST, counts.data(), 8),
                      kInvalid, {"session"}));
  EXPECT_TRUE(IsError(moert_session_expert_counts(session_.get(), 2, MOERT_COUNTS_LAST, nullptr, 8),
                      kInvalid, {"counts"}));
  EXPECT_TRUE(
      IsError(moert_session_max_vio(nullptr, 2, MOERT_COUNTS_LAST, &vio), kInvalid, {"session"}));
  EXPECT_TRUE(IsError(moert_session_max_vio(session_.get(), 2, MOERT_COUNTS_LAST, nullptr),
                      kInvalid, {"out"}));
  EXPECT_EQ(vio, 7.0);
}

TEST_F(Handles, LayerIndexOutOfRange) {
  int32_t kind = 0;
  const char* name = nullptr;
  uint32_t w = 0;
  int64_t v = 0;
  double f = 0;
  for (uint32_t index : {6u, 7u, 1000u, 0xFFFFFFFFu}) {
    const std::string idx = std::to_string(index);
    EXPECT_TRUE(IsError(moert_model_layer_kind(model_.get(), index, &kind), kInvalid, {idx}));
    EXPECT_TRUE(IsError(moert_model_layer_name(model_.get(), index, &name), kInvalid, {idx}));
    EXPECT_TRUE(IsError(moert_model_layer_dims(model_.get(), index, &w, &w), kInvalid, {idx}));
    EXPECT_TRUE(
        IsError(moert_model_moe_int(model_.get(), index, MOERT_MOE_TOP_K, &v), kInvalid, {idx}));
    EXPECT_TRUE(
        IsError(moert_model_moe_float(model_.get(), index, MOERT_MOE_ROUTED_SCALING_FACTOR, &f),
                kInvalid, {idx}));
    std::vector<int64_t> counts(8);
    EXPECT_TRUE(IsError(moert_session_expert_counts(session_.get(), index, MOERT_COUNTS_LAST,
                                                    counts.data(), counts.size()),
                        kInvalid, {idx}));
    if (index != MOERT_ALL_LAYERS) {
      EXPECT_TRUE(IsError(moert_session_max_vio(session_.get(), index, MOERT_COUNTS_LAST, &f),
                          kInvalid, {idx}));
    }
  }
}

TEST_F(Handles, MoeQueriesOnNonMoeLayers) {
  int64_t v = -1;
  double f = -1;
  const struct {
    uint32_t index;
    const char* name;
  } non_moe[] = {{0, "'embed'"}, {1, "'norm0'"}, {3, "'norm1'"}, {5, "'head'"}};
  for (const auto& l : non_moe) {
    EXPECT_TRUE(IsError(moert_model_moe_int(model_.get(), l.index, MOERT_MOE_NUM_EXPERTS, &v),
                        kInvalid, {l.name, "not a MoE layer"}));
    EXPECT_TRUE(
        IsError(moert_model_moe_float(model_.get(), l.index, MOERT_MOE_ROUTED_SCALING_FACTOR, &f),
                kInvalid, {l.name, "not a MoE layer"}));
    std::vector<int64_t> counts(8);
    EXPECT_TRUE(IsError(moert_session_expert_counts(session_.get(), l.index, MOERT_COUNTS_LAST,
                                                    counts.data(), counts.size()),
                        kInvalid, {l.name, "not a MoE layer"}));
    EXPECT_TRUE(IsError(moert_session_max_vio(session_.get(), l.index, MOERT_COUNTS_LAST, &f),
                        kInvalid, {l.name, "not a MoE layer"}));
  }
  EXPECT_EQ(v, -1);
  EXPECT_EQ(f, -1);
}

TEST_F(Handles, UnknownMoeKeys) {
  int64_t v = -1;
  double f = -1;
  // Integer keys are 1..15, floating-point keys 101..105; each getter refuses the other's keys.
  for (int32_t key : {0, 16, 100, MOERT_MOE_ROUTED_SCALING_FACTOR, -1, 1 << 30}) {
    EXPECT_TRUE(
        IsError(moert_model_moe_int(model_.get(), 2, key, &v), kInvalid, {std::to_string(key)}))
        << key;
  }
  for (int32_t key : {0, 100, 106, MOERT_MOE_TOP_K, -101}) {
    EXPECT_TRUE(
        IsError(moert_model_moe_float(model_.get(), 2, key, &f), kInvalid, {std::to_string(key)}))
        << key;
  }
  EXPECT_EQ(v, -1);
  EXPECT_EQ(f, -1);
  // Every documented key answers.
  for (int32_t key = MOERT_MOE_DIM; key <= MOERT_MOE_BIAS_FROZEN; ++key)
    EXPECT_TRUE(IsOk(moert_model_moe_int(model_.get(), 2, key, &v))) << key;
  for (int32_t key = MOERT_MOE_ROUTED_SCALING_FACTOR; key <= MOERT_MOE_CAPACITY_FACTOR; ++key)
    EXPECT_TRUE(IsOk(moert_model_moe_float(model_.get(), 2, key, &f))) << key;
}

TEST_F(Handles, ExpertCountsBufferLength) {
  std::vector<int64_t> counts(9, -5);
  EXPECT_TRUE(
      IsError(moert_session_expert_counts(session_.get(), 2, MOERT_COUNTS_LAST, counts.data(), 7),
              kInvalid, {"counts", "7", "8"}));
  EXPECT_TRUE(
      IsError(moert_session_expert_counts(session_.get(), 2, MOERT_COUNTS_LAST, counts.data(), 9),
              kInvalid, {"counts", "9", "8"}));
  EXPECT_EQ(counts, std::vector<int64_t>(9, -5));
  // Before any forward pass: zeros, and MaxVio 0.
  EXPECT_TRUE(
      IsOk(moert_session_expert_counts(session_.get(), 2, MOERT_COUNTS_LAST, counts.data(), 8)));
  EXPECT_EQ(std::vector<int64_t>(counts.begin(), counts.begin() + 8), std::vector<int64_t>(8, 0));
  double vio = -1;
  EXPECT_TRUE(
      IsOk(moert_session_max_vio(session_.get(), MOERT_ALL_LAYERS, MOERT_COUNTS_LAST, &vio)));
  EXPECT_EQ(vio, 0.0);
}

// ---- Session options ----------------------------------------------------------------------------

// Whether sessions made with `options` refuse NaN in hidden inputs (check_finite).
bool refuses_nan(const moert_session_options* options) {
  ModelPtr model = load_ok(build(hidden_baseline()));
  if (!model) return false;
  moert_session* raw = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model.get(), options, &raw)));
  SessionPtr s(raw);
  if (!s) return false;
  std::vector<float> in(8, 0.25f), out(16);
  in[3] = std::numeric_limits<float>::quiet_NaN();
  StatusPtr st(moert_session_forward_hidden(s.get(), in.data(), 8, 1, out.data(), 16));
  EXPECT_TRUE(!st || moert_status_code(st.get()) == MOERT_ERR_NUMERIC)
      << moert_status_message(st.get());
  return st != nullptr;
}

TEST_F(Handles, SetConfigUnknownKeyAndBadValueKeepThePreviousValue) {
  EXPECT_TRUE(refuses_nan(options_.get()));  // the default is check_finite = true
  EXPECT_TRUE(IsOk(moert_session_options_set_config(options_.get(), "check_finite", "false")));
  EXPECT_FALSE(refuses_nan(options_.get()));
  EXPECT_TRUE(IsError(moert_session_options_set_config(options_.get(), "no_such_knob", "true"),
                      kInvalid, {"no_such_knob"}));
  EXPECT_TRUE(IsError(moert_session_options_set_config(options_.get(), "", "true"), kInvalid));
  for (const char* bad : {"maybe", "", "TRUE ", "yes please"}) {
    EXPECT_TRUE(IsError(moert_session_options_set_config(options_.get(), "check_finite", bad),
                        kInvalid, {"check_finite"}))
        << bad;
  }
  // Still false after the refused calls.
  EXPECT_FALSE(refuses_nan(options_.get()));
  EXPECT_TRUE(IsOk(moert_session_options_set_config(options_.get(), "check_finite", "true")));
  EXPECT_TRUE(refuses_nan(options_.get()));
}

TEST_F(Handles, Threads) {
  for (uint32_t bad : {0u, 1025u, 2000u, 0xFFFFFFFFu}) {
    EXPECT_TRUE(IsError(moert_session_options_set_threads(options_.get(), bad), kInvalid,
                        {"threads", std::to_string(bad)}))
        << bad;
  }
  for (uint32_t good : {1u, 3u, 1024u}) {
    EXPECT_TRUE(IsOk(moert_session_options_set_threads(options_.get(), good))) << good;
  }
  // The last accepted value (1024 threads) still makes a working session after the refusals.
  EXPECT_TRUE(IsError(moert_session_options_set_threads(options_.get(), 0), kInvalid));
  EXPECT_TRUE(IsOk(moert_session_options_set_threads(options_.get(), 4)));
  moert_session* s = nullptr;
  ASSERT_TRUE(IsOk(moert_session_create(model_.get(), options_.get(), &s)));
  SessionPtr session(s);
  std::vector<int32_t> tokens(8, 3);
  std::vector<float> out(2 * 64);
  EXPECT_TRUE(IsOk(
      moert_session_forward_tokens(s, tokens.data(), tokens.size(), 2, out.data(), out.size())));
}

TEST_F(Handles, DeviceValues) {
  EXPECT_TRUE(
      IsError(moert_session_options_set_device(options_.get(), 2, 0), kInvalid, {"device", "2"}));
  EXPECT_TRUE(
      IsError(moert_session_options_set_device(options_.get(), -1, 0), kInvalid, {"device", "-1"}));
  EXPECT_TRUE(IsError(moert_session_options_set_device(options_.get(), MOERT_DEVICE_CUDA, -1),
                      kInvalid, {"index", "-1"}));
  EXPECT_TRUE(IsError(moert_session_options_set_device(options_.get(), MOERT_DEVICE_CPU, 1),
                      kInvalid, {"index", "1"}));
  EXPECT_TRUE(IsOk(moert_session_options_set_device(options_.get(), MOERT_DEVICE_CPU, 0)));
  // The refusals left the CPU device in place: a session can be made.
  moert_session* s = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model_.get(), options_.get(), &s)));
  moert_session_free(s);
}

TEST_F(Handles, ModeValues) {
  for (int32_t bad : {2, -1, 100}) {
    EXPECT_TRUE(IsError(moert_session_options_set_mode(options_.get(), bad), kInvalid,
                        {"mode", std::to_string(bad)}))
        << bad;
  }
  EXPECT_TRUE(IsOk(moert_session_options_set_mode(options_.get(), MOERT_MODE_INFERENCE)));
}

TEST_F(Handles, CudaDeviceIsUnsupportedAtSessionCreation) {
  ASSERT_TRUE(IsOk(moert_session_options_set_device(options_.get(), MOERT_DEVICE_CUDA, 0)));
  moert_session* s = reinterpret_cast<moert_session*>(this);
  EXPECT_TRUE(IsError(moert_session_create(model_.get(), options_.get(), &s), MOERT_ERR_UNSUPPORTED,
                      {"CUDA"}));
  EXPECT_EQ(s, reinterpret_cast<moert_session*>(this));  // *out unchanged
  // Back to the CPU, the same options work.
  ASSERT_TRUE(IsOk(moert_session_options_set_device(options_.get(), MOERT_DEVICE_CPU, 0)));
  s = nullptr;
  EXPECT_TRUE(IsOk(moert_session_create(model_.get(), options_.get(), &s)));
  moert_session_free(s);
}

// Without the NVIDIA driver no GPU is usable, and the CUDA plugin is not loaded to say so: its
// CUDA libraries took about 150 MB of resident memory for the life of the process, and the
// runtime's message was "CUDA driver version is insufficient".
TEST_F(Handles, ACudaSessionWithoutTheDriverIsRefusedWithoutLoadingThePlugin) {
  if (void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL)) {
    dlclose(driver);
    GTEST_SKIP() << "this machine has the NVIDIA driver";
  }
  // The plugin beside libmoert, where moert_session_create() looks for it.
  Dl_info library{};
  ASSERT_NE(dladdr(reinterpret_cast<void*>(&moert_session_create), &library), 0);
  const std::string plugin =
      (std::filesystem::path(library.dli_fname).parent_path() / "libmoert_cuda.so.1").string();
  if (!std::filesystem::exists(plugin)) GTEST_SKIP() << "moert was built without CUDA";
  ASSERT_TRUE(IsOk(moert_session_options_set_device(options_.get(), MOERT_DEVICE_CUDA, 0)));
  for (int i = 0; i < 3; ++i) {
    moert_session* s = nullptr;
    EXPECT_TRUE(IsError(moert_session_create(model_.get(), options_.get(), &s),
                        MOERT_ERR_UNSUPPORTED, {"no NVIDIA driver", "libcuda.so.1"}));
    EXPECT_EQ(s, nullptr);
  }
  void* loaded = dlopen(plugin.c_str(), RTLD_NOW | RTLD_NOLOAD);
  EXPECT_EQ(loaded, nullptr) << "the CUDA plugin was loaded";
  if (loaded) dlclose(loaded);
}

TEST_F(Handles, TrainingCallsNeedATrainingSession) {
  moert_session* s = nullptr;
  ASSERT_TRUE(IsOk(moert_session_create(model_.get(), options_.get(), &s)));
  EXPECT_TRUE(IsError(moert_session_zero_grad(s), MOERT_ERR_INVALID_STATE, {"training mode"}));
  EXPECT_TRUE(
      IsError(moert_session_step(s, nullptr, nullptr), MOERT_ERR_INVALID_STATE, {"training mode"}));
  EXPECT_TRUE(IsError(moert_session_set_eval(s, 1), MOERT_ERR_INVALID_STATE, {"training mode"}));
  moert_session_free(s);
  ASSERT_TRUE(IsOk(moert_session_options_set_mode(options_.get(), MOERT_MODE_TRAINING)));
  s = nullptr;
  ASSERT_TRUE(IsOk(moert_session_create(model_.get(), options_.get(), &s)));
  EXPECT_TRUE(IsOk(moert_session_zero_grad(s)));
  moert_session_free(s);
}

TEST_F(Handles, SessionOutlivesItsModel) {
  moert_model* m = nullptr;
  ASSERT_TRUE(IsOk(moert_model_load_file(example_model_path().c_str(), &m)));
  SessionPtr s = make_session(m);
  ASSERT_TRUE(s);
  std::vector<int32_t> tokens = {1, 2, 3, 4};
  std::vector<float> before(64), after(64);
  ASSERT_TRUE(IsOk(moert_session_forward_tokens(s.get(), tokens.data(), 4, 1, before.data(), 64)));
  moert_model_free(m);
  ASSERT_TRUE(IsOk(moert_session_forward_tokens(s.get(), tokens.data(), 4, 1, after.data(), 64)));
  EXPECT_EQ(before, after);
}

TEST_F(Handles, MaxVioOnAModelWithoutMoeLayers) {
  ModelDesc d;
  d.input_dim = 8;
  d.layers.push_back(rmsnorm_layer("norm", 8));
  ModelPtr m = load_ok(build(d));
  ASSERT_TRUE(m);
  SessionPtr s = make_session(m.get());
  ASSERT_TRUE(s);
  double vio = -1;
  EXPECT_TRUE(IsError(moert_session_max_vio(s.get(), MOERT_ALL_LAYERS, MOERT_COUNTS_LAST, &vio),
                      kInvalid, {"MoE"}));
  EXPECT_TRUE(
      IsError(moert_session_max_vio(s.get(), 0, MOERT_COUNTS_LAST, &vio), kInvalid, {"'norm'"}));
  EXPECT_EQ(vio, -1);
}

// A service that frees a session while another thread is inside a call on it (shutting down
// mid-request): the free waits for that call, which completes, and a call queued behind it is
// refused instead of running on a session being destroyed. (The free destroyed the session
// under the running call before: a crash, or a use after free under AddressSanitizer.)
TEST_F(Handles, AFreeWaitsForTheCallInProgressAndRefusesTheOneQueued) {
  SessionPtr owned = make_session(model_.get());
  ASSERT_TRUE(owned);
  moert_session* s = owned.release();
  using Clock = std::chrono::steady_clock;
  // Long enough that the free below begins while it runs (about 1 s here, more under sanitizers).
  constexpr uint64_t kRows = 1 << 18;
  std::vector<int32_t> tokens(kRows * 4);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i % 64);
  std::vector<float> out(kRows * 64), queued_out(64);
  std::atomic<int> started{0};
  Clock::time_point call_end;
  moert_status* call_status = nullptr;
  moert_status* queued_status = nullptr;
  std::thread call([&] {
    started = 1;
    call_status = moert_session_forward_tokens(s, tokens.data(), tokens.size(), kRows, out.data(),
                                               out.size());
    call_end = Clock::now();
  });
  while (started < 1) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::thread queued([&] {
    started = 2;
    queued_status =
        moert_session_forward_tokens(s, tokens.data(), 4, 1, queued_out.data(), queued_out.size());
  });
  while (started < 2) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  moert_session_free(s);
  const Clock::time_point free_end = Clock::now();
  call.join();
  queued.join();
  EXPECT_TRUE(IsOk(call_status));
  EXPECT_GE(free_end, call_end) << "the free returned before the call it raced";
  EXPECT_TRUE(IsError(queued_status, MOERT_ERR_INVALID_STATE, {"being freed"}));
}

}  // namespace
}  // namespace capi_test
