// Writes the seed corpus of the fuzz targets (tests/fuzz/corpus, committed):
//   model_load/       descriptions crafted to reach every layer kind, dtype, initialiser and
//                     balancing policy, the example model, and a checkpoint
//   checkpoint_load/  checkpoints of checkpoint_model.json: fresh, after steps, between
//                     micro-batches, with a scheduled and frozen bias
//   json_convert/     the JSON rendering of every model seed
//   tensor_decode/    bf16 and FP8 inputs in the harness's format
// Usage: moert_fuzz_make_corpus OUT_DIR CHECKPOINT_MODEL EXAMPLE_MODEL
// It reaches the library through moert.h only, and builds descriptions with the C ABI tests'
// builder. Its output is deterministic: rerunning it rewrites the same files.
#include <moert/moert.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli/error.h"
#include "cli/model_codec.h"
#include "tests/capi/model_builder.h"

namespace {

namespace fs = std::filesystem;
using namespace capi_test;

void ok(moert_status* st, const char* what) {
  if (!st) return;
  const std::string message = moert_status_message(st);
  moert_status_free(st);
  throw std::runtime_error(std::string(what) + ": " + message);
}

std::vector<uint8_t> read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void write(const fs::path& p, const std::vector<uint8_t>& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::pair<std::string, std::vector<uint8_t>>> model_seeds(const fs::path& example) {
  std::vector<std::pair<std::string, std::vector<uint8_t>>> seeds;
  seeds.emplace_back("example", read(example));
  seeds.emplace_back("token", build(token_baseline()));
  seeds.emplace_back("hidden", build(hidden_baseline()));
  {
    // Inline FP8 experts with block scales, a shared expert, a BF16 dense layer.
    ModelDesc d = token_baseline();
    MoEDesc& moe = d.layers[kMoE].moe;
    moe.w1.source = TensorDesc::Source::kData;
    moe.w1.dtype = 2;
    moe.w1.data.resize(4 * 4 * 8);
    for (size_t i = 0; i < moe.w1.data.size(); ++i)
      moe.w1.data[i] = static_cast<uint8_t>(0x30 + i % 16);
    moe.w1.has_scales = true;
    moe.w1.block_rows = 2;
    moe.w1.block_cols = 4;
    moe.w1.scales.assign(4 * 2 * 2, 0.5f);
    moe.num_shared = 1;
    moe.shared_hidden = 4;
    moe.shared_w1 = TensorDesc::init(3, 0.2f);
    moe.shared_w3 = TensorDesc::init(2, 0.2f);
    moe.shared_w2 = TensorDesc::f32(ramp(8 * 4, 0.1f));
    seeds.emplace_back("fp8", build(d));
  }
  for (int8_t policy : {0, 2, 3, 4}) {
    ModelDesc d = hidden_baseline();
    d.layers[1].moe.balancing.policy = policy;
    d.layers[1].moe.balancing.aux_alpha = 0.01f;
    d.layers[1].moe.balancing.capacity_factor = 1.25f;
    d.layers[1].moe.score_function = policy % 2;
    seeds.emplace_back("policy" + std::to_string(policy), build(d));
  }
  return seeds;
}

struct Session {
  moert_session* s = nullptr;
  explicit Session(const moert_model* m) {
    moert_session_options* o = nullptr;
    ok(moert_session_options_create(&o), "options");
    ok(moert_session_options_set_mode(o, MOERT_MODE_TRAINING), "mode");
    ok(moert_session_options_set_seed(o, 3), "seed");
    ok(moert_session_create(m, o, &s), "session");
    moert_session_options_free(o);
  }
  ~Session() { moert_session_free(s); }

  void micro_batch(int seed) {
    std::vector<int32_t> tokens(8 * 2), targets(8);
    for (size_t i = 0; i < tokens.size(); ++i)
      tokens[i] = static_cast<int32_t>((i * 5 + seed) % 16);
    for (size_t r = 0; r < targets.size(); ++r) targets[r] = tokens[r * 2 + 1];
    std::vector<float> logits(8 * 16);
    ok(moert_session_forward_tokens(s, tokens.data(), tokens.size(), 8, logits.data(),
                                    logits.size()),
       "forward");
    ok(moert_session_backward_loss(s, targets.data(), targets.size(), nullptr), "backward");
  }
  void step(int seed) {
    ok(moert_session_zero_grad(s), "zero_grad");
    micro_batch(seed);
    micro_batch(seed + 1);
    ok(moert_session_step(s, nullptr, nullptr), "step");
  }
};

std::vector<uint8_t> checkpoint(Session& s, const fs::path& scratch) {
  ok(moert_session_save(s.s, scratch.c_str()), "save");
  for (const auto& e : fs::directory_iterator(scratch.parent_path()))
    if (e.path().extension() == ".data")
      throw std::runtime_error("a seed checkpoint has external data: it must fit inline");
  return read(scratch);
}

std::vector<uint8_t> decode_seed(std::initializer_list<int> bytes) {
  std::vector<uint8_t> out;
  for (int b : bytes) out.push_back(static_cast<uint8_t>(b));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s OUT_DIR CHECKPOINT_MODEL EXAMPLE_MODEL\n", argv[0]);
    return 2;
  }
  try {
    const fs::path out = argv[1];
    for (const auto& [name, bytes] : model_seeds(argv[3])) {
      write(out / "model_load" / (name + ".moert"), bytes);
      const std::string json = moert_cli::binary_to_json(bytes, name);
      write(out / "json_convert" / (name + ".json"),
            std::vector<uint8_t>(json.begin(), json.end()));
    }

    moert_model* model = nullptr;
    ok(moert_model_load_file(argv[2], &model), "checkpoint model");
    const fs::path scratch_dir = fs::temp_directory_path() / "moert-fuzz-corpus";
    fs::remove_all(scratch_dir);
    fs::create_directories(scratch_dir);
    const fs::path scratch = scratch_dir / "ck.moert";
    {
      Session s(model);
      write(out / "checkpoint_load" / "fresh.moert", checkpoint(s, scratch));
      s.step(0);
      write(out / "checkpoint_load" / "step1.moert", checkpoint(s, scratch));
      s.step(2);
      ok(moert_session_zero_grad(s.s), "zero_grad");
      s.micro_batch(4);
      const auto mid = checkpoint(s, scratch);
      write(out / "checkpoint_load" / "mid_step.moert", mid);
      write(out / "model_load" / "checkpoint.moert", mid);
      ok(moert_session_set_bias_update_rate(s.s, 2, 0.5), "gamma");
      ok(moert_session_set_bias_frozen(s.s, 2, 1), "freeze");
      ok(moert_session_step(s.s, nullptr, nullptr), "step");
      write(out / "checkpoint_load" / "scheduled.moert", checkpoint(s, scratch));
    }
    fs::remove_all(scratch_dir);
    moert_model_free(model);

    write(out / "tensor_decode" / "bf16", decode_seed({0, 8, 0x80, 0x3F, 0x00, 0xC0, 0x80, 0x7F}));
    write(out / "tensor_decode" / "fp8_matrix",
          decode_seed({1,    1,    4,    6,    2,    4,    8,    8,    0x38, 0xB8,
                       0x7E, 0x01, 0x00, 0x7F, 0xFF, 0x40, 0x38, 0x38, 0x38, 0x38,
                       0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38,
                       0x38, 0x38, 0x3F, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00}));
    write(out / "tensor_decode" / "fp8_stack",
          decode_seed({1,    2,    3,    5,    7,    3,    3,    8,    8,    0x11, 0x22, 0x33, 0x44,
                       0x55, 0x66, 0x77, 0x88, 0x3E, 0x80, 0x00, 0x00, 0xBF, 0x00, 0x00, 0x00}));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moert_fuzz_make_corpus: %s\n", e.what());
    return 1;
  }
  return 0;
}
