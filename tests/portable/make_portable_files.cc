// Writes the files of tests/portable/files: checkpoints and a model, made by one build of moert
// and loaded by another (the committed ones were made by a clang-14 build; CTest runs the suite's
// own build, g++, which must load them and, running this program itself, write the same bytes).
//
//   moert_portable_files OUT_DIR
//
// How the committed files were made (README, "Checkpoints"):
//   cmake -S . -B build/clang -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_COMPILER=clang-14
//     -DCMAKE_CXX_COMPILER=clang++-14 -DMOERT_BUILD_CUDA=OFF -DMOERT_BUILD_BINDINGS=OFF
//   cmake --build build/clang --target moert_portable_files
//   build/clang/tests/portable/moert_portable_files tests/portable/files
//
// The content must not depend on the machine either, or the comparison would test the CPU: every
// weight is given (no initialiser, whose normal draws go through libm), the gradients an optimizer
// step uses are set exactly through the C ABI (not computed), and routing separates experts by
// wide margins, so that the token counts cannot flip. What remains is IEEE arithmetic: AdamW's
// updates and the bias update.
//   external.moert + external.moert.<digest>.data   mid-step checkpoint, 64 KiB expert tensors
//   inline.moert                                    a checkpoint small enough to be one file
//   model.moert                                     external's model rendered to JSON and
//                                                   converted back by the CLI's converter
#include <moert/moert.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "cli/error.h"
#include "cli/model_codec.h"
#include "tests/capi/model_builder.h"

namespace {

namespace fs = std::filesystem;
using namespace capi_test;

void check(moert_status* st, const char* what) {
  if (!st) return;
  std::fprintf(stderr, "moert_portable_files: %s: %s\n", what, moert_status_message(st));
  std::exit(1);
}

// Exact small binary fractions: (k mod 13 - 6) / 64 * scale.
std::vector<float> exact(size_t n, float scale, size_t phase = 0) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = scale * static_cast<float>(static_cast<int>((i * 5 + phase) % 13) - 6) / 64.0f;
  return v;
}

// Hidden input of width 64 -> RMSNorm -> MoE (8 experts of hidden 32, top-2, softmax, loss-free
// bias): its expert tensors are [8, 32, 64] fp32, 64 KiB each, so they go to the data file. The
// gate reads the first 8 input columns: expert e's logit is 4 * x_e.
ModelDesc external_model() {
  ModelDesc d;
  d.name = "portable-external";
  d.input_dim = 64;
  LayerDesc norm = rmsnorm_layer("norm", 64);
  norm.rmsnorm.weight = TensorDesc::f32(std::vector<float>(64, 1.0f));
  d.layers.push_back(norm);
  LayerDesc moe = moe_layer("moe", 64);
  MoEDesc& m = moe.moe;
  m.num_experts = 8;
  m.top_k = 2;
  m.expert_hidden = 32;
  m.score_function = 1;
  m.num_groups = 1;
  m.topk_groups = 1;
  m.normalize_weights = false;
  m.routed_scaling_factor = 1.0f;
  m.balancing.bias_update_rate = 0.01f;
  std::vector<float> gate(8 * 64, 0.0f);
  for (int e = 0; e < 8; ++e) gate[e * 64 + e] = 4.0f;
  m.gate = TensorDesc::f32(gate);
  m.w1 = TensorDesc::f32(exact(8 * 32 * 64, 0.5f, 1));
  m.w3 = TensorDesc::f32(exact(8 * 32 * 64, 0.5f, 2));
  m.w2 = TensorDesc::f32(exact(8 * 64 * 32, 0.5f, 3));
  d.layers.push_back(moe);
  return d;
}

// hidden_baseline with every tensor given: norm 8, MoE of 4 experts of hidden 4, head of 16.
ModelDesc inline_model() {
  ModelDesc d = hidden_baseline();
  d.name = "portable-inline";
  d.layers[0].rmsnorm.weight = TensorDesc::f32(std::vector<float>(8, 1.0f));
  MoEDesc& m = d.layers[1].moe;
  std::vector<float> gate(4 * 8, 0.0f);
  for (int e = 0; e < 4; ++e) gate[e * 8 + e] = 4.0f;
  m.gate = TensorDesc::f32(gate);
  m.w1 = TensorDesc::f32(exact(4 * 4 * 8, 1.0f, 4));
  m.w3 = TensorDesc::f32(exact(4 * 4 * 8, 1.0f, 5));
  m.w2 = TensorDesc::f32(exact(4 * 8 * 4, 1.0f, 6));
  d.layers[2].head.weight = TensorDesc::f32(exact(16 * 8, 1.0f, 7));
  return d;
}

struct Trainer {
  moert_model* model = nullptr;
  moert_session* s = nullptr;
  uint32_t width = 0, out_width = 0;

  explicit Trainer(const std::vector<uint8_t>& bytes) {
    check(moert_model_load_buffer(bytes.data(), bytes.size(), nullptr, &model), "model");
    check(moert_model_io(model, nullptr, &width, &out_width), "io");
    moert_session_options* o = nullptr;
    check(moert_session_options_create(&o), "options");
    check(moert_session_options_set_mode(o, MOERT_MODE_TRAINING), "mode");
    check(moert_session_options_set_config(o, "lr", "0.01"), "lr");
    check(moert_session_create(model, o, &s), "session");
    moert_session_options_free(o);
  }
  ~Trainer() {
    moert_session_free(s);
    moert_model_free(model);
  }

  // A forward and backward over rows whose routing is unambiguous: row r puts 1 on input column
  // r % experts and 0.5 on the next one, so its top-2 are those two experts by a logit margin of
  // 2; then every gradient is overwritten with exact values.
  void micro_batch(uint32_t experts, size_t rows, size_t phase) {
    std::vector<float> x(rows * width, 0.0f), y(rows * out_width);
    for (size_t r = 0; r < rows; ++r) {
      x[r * width + (r + phase) % experts] = 1.0f;
      x[r * width + (r + phase + 1) % experts] = 0.5f;
    }
    check(moert_session_forward_hidden(s, x.data(), x.size(), rows, y.data(), y.size()), "fwd");
    std::vector<float> dy(y.size(), 1.0f / 128);
    check(moert_session_backward(s, dy.data(), dy.size(), nullptr, 0, nullptr), "backward");
    uint32_t n = 0;
    check(moert_session_num_parameters(s, &n), "parameters");
    for (uint32_t i = 0; i < n; ++i) {
      const char* name = nullptr;
      uint64_t numel = 0;
      check(moert_session_parameter_info(s, i, &name, &numel), "parameter");
      const auto g = exact(numel, 1.0f / 16, i + phase);
      check(moert_session_set_gradient(s, name, g.data(), g.size()), "gradient");
    }
  }
};

void write(const fs::path& p, const std::vector<uint8_t>& bytes) {
  std::ofstream(p, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const fs::path out = argv[1];
  fs::create_directories(out);
  for (const auto& e : fs::directory_iterator(out)) fs::remove(e.path());
  try {
    const auto external = build(external_model());
    {
      Trainer t(external);
      check(moert_session_zero_grad(t.s), "zero_grad");
      t.micro_batch(8, 21, 0);
      check(moert_session_step(t.s, nullptr, nullptr), "step");
      check(moert_session_zero_grad(t.s), "zero_grad");
      t.micro_batch(8, 16, 3);
      check(moert_session_save(t.s, (out / "external.moert").c_str()), "save external");
    }
    {
      Trainer t(build(inline_model()));
      check(moert_session_zero_grad(t.s), "zero_grad");
      t.micro_batch(4, 12, 1);
      check(moert_session_step(t.s, nullptr, nullptr), "step");
      check(moert_session_save(t.s, (out / "inline.moert").c_str()), "save inline");
    }
    const std::string json = moert_cli::binary_to_json(external, "external model");
    write(out / "model.moert", moert_cli::json_to_binary(json, "external model JSON"));
  } catch (const moert_cli::Error& e) {
    std::fprintf(stderr, "moert_portable_files: %s\n", e.what());
    return 1;
  }
  return 0;
}
