// Byte-mutation fuzzing of model descriptions through moert_model_load_buffer_with_options: every
// single-byte change (each bit flipped, set to 0x00, set to 0xFF) of a valid model must give either
// a model that then inspects and runs (or refuses to run) cleanly, or a status with a code and a
// message.
// Run under ASan/UBSan this also checks that nothing reads outside the buffer.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "capi_test_util.h"
#include "model_builder.h"
#include "moert_generated.h"

namespace capi_test {
namespace {

namespace fb = moert::fb;

// One flipped bit in a vocabulary size can ask for gigabytes of initialised weights. The load
// limit refuses such a mutant before it allocates (MOERT_ERR_LIMIT, a clean refusal), which keeps a
// loop of thousands of loads fast; the bound is that of a model a few times the baselines' size.
constexpr uint64_t kMaxMemory = uint64_t{4} << 20;

// Counts, for the report at the end of each run.
struct Tally {
  size_t loads = 0, refused = 0, limited = 0, loaded = 0, ran = 0, run_refused = 0;
  std::set<int32_t> codes;
};

// Runs one pass on a model that loaded from a mutant: inspection and forward must succeed or
// fail cleanly. Returns a description of the first unclean result, or "".
std::string exercise(const moert_model* model, Tally& tally) {
  auto clean = [](moert_status* s, const char* what) -> std::string {
    StatusPtr st(s);
    if (!st) return "";
    const int32_t code = moert_status_code(st.get());
    if (code < MOERT_ERR_INVALID_ARGUMENT || code > MOERT_ERR_LIMIT || code == MOERT_ERR_INTERNAL ||
        std::strlen(moert_status_message(st.get())) == 0)
      return std::string(what) + ": " + moert_status_code_name(code) + ": " +
             moert_status_message(st.get());
    return "";
  };
  uint32_t layers = 0;
  if (auto e = clean(moert_model_num_layers(model, &layers), "num_layers"); !e.empty()) return e;
  for (uint32_t i = 0; i < layers; ++i) {
    int32_t kind = 0;
    const char* name = nullptr;
    uint32_t a = 0, b = 0;
    StatusPtr ks(moert_model_layer_kind(model, i, &kind));
    StatusPtr ns(moert_model_layer_name(model, i, &name));
    StatusPtr ds(moert_model_layer_dims(model, i, &a, &b));
    if (ks || ns || ds || !name) return "inspection of a loaded model failed";
    if (kind == MOERT_LAYER_MOE) {
      for (int32_t key = MOERT_MOE_DIM; key <= MOERT_MOE_BIAS_FROZEN; ++key) {
        int64_t v = 0;
        if (StatusPtr s(moert_model_moe_int(model, i, key, &v)); s) return "moe_int failed";
      }
    }
  }
  uint64_t total = 0, activated = 0;
  if (auto e = clean(moert_model_num_parameters(model, &total, &activated), "num_parameters");
      !e.empty())
    return e;

  int32_t input_kind = 0;
  uint32_t in_width = 0, out_width = 0;
  if (auto e = clean(moert_model_io(model, &input_kind, &in_width, &out_width), "io"); !e.empty())
    return e;
  constexpr uint64_t kRows = 2;
  if (uint64_t{in_width} * kRows > (1u << 20) || uint64_t{out_width} * kRows > (1u << 20))
    return "";
  moert_session* raw = nullptr;
  if (auto e = clean(moert_session_create(model, nullptr, &raw), "session_create"); !e.empty())
    return e;
  if (!raw) {
    ++tally.run_refused;
    return "";
  }
  SessionPtr session(raw);
  std::vector<float> out(kRows * out_width);
  moert_status* st;
  if (input_kind == MOERT_INPUT_TOKENS) {
    // Id 0 is in every vocabulary; 1 may not be.
    std::vector<int32_t> tokens(kRows * in_width, 0);
    for (size_t i = 1; i < tokens.size(); i += 2) tokens[i] = 1;
    st = moert_session_forward_tokens(session.get(), tokens.data(), tokens.size(), kRows,
                                      out.data(), out.size());
  } else {
    std::vector<float> in(kRows * in_width);
    for (size_t i = 0; i < in.size(); ++i) in[i] = 0.1f * static_cast<float>(i % 11) - 0.5f;
    st = moert_session_forward_hidden(session.get(), in.data(), in.size(), kRows, out.data(),
                                      out.size());
  }
  (st ? tally.run_refused : tally.ran)++;
  if (auto e = clean(st, "forward"); !e.empty()) return e;
  // Statistics of every MoE layer are readable after the pass.
  for (uint32_t i = 0; i < layers; ++i) {
    int32_t kind = 0;
    StatusPtr ks(moert_model_layer_kind(model, i, &kind));
    if (kind != MOERT_LAYER_MOE) continue;
    int64_t experts = 0;
    StatusPtr es(moert_model_moe_int(model, i, MOERT_MOE_NUM_EXPERTS, &experts));
    std::vector<int64_t> counts(static_cast<size_t>(experts));
    double vio = 0;
    if (auto e = clean(moert_session_expert_counts(session.get(), i, MOERT_COUNTS_LAST,
                                                   counts.data(), counts.size()),
                       "expert_counts");
        !e.empty())
      return e;
    if (auto e = clean(moert_session_max_vio(session.get(), i, MOERT_COUNTS_LAST, &vio), "max_vio");
        !e.empty())
      return e;
  }
  return "";
}

// Loads one mutant (an exact-size heap buffer, so that ASan sees any read past its end) and checks
// the outcome. Returns a description of the first unclean result, or "".
std::string check_mutant(const uint8_t* buf, size_t size, Tally& tally) {
  ++tally.loads;
  moert_load_options* raw_options = nullptr;
  if (StatusPtr st(moert_load_options_create(&raw_options)); st) return "load options failed";
  std::unique_ptr<moert_load_options, decltype(&moert_load_options_free)> options(
      raw_options, moert_load_options_free);
  if (StatusPtr st(moert_load_options_set_max_memory(options.get(), kMaxMemory)); st)
    return "set_max_memory failed";
  moert_model* raw = nullptr;
  StatusPtr st(moert_model_load_buffer_with_options(buf, size, nullptr, options.get(), &raw));
  ModelPtr model(raw);
  if (st) {
    ++tally.refused;
    const int32_t code = moert_status_code(st.get());
    tally.codes.insert(code);
    if (code == MOERT_ERR_LIMIT) ++tally.limited;
    if (code != MOERT_ERR_INVALID_MODEL && code != MOERT_ERR_OUT_OF_MEMORY &&
        code != MOERT_ERR_LIMIT)
      return std::string("load gave ") + moert_status_code_name(code) + ": " +
             moert_status_message(st.get());
    if (std::strlen(moert_status_message(st.get())) == 0)
      return "load failed with an empty message";
    if (model) return "load failed but returned a model";
    return "";
  }
  if (!model) return "load succeeded without a model";
  ++tally.loaded;
  return exercise(model.get(), tally);
}

// Checks the tally of a loop and prints it.
void report(const Tally& tally, size_t failures, double seconds, const char* what, size_t size) {
  EXPECT_EQ(failures, 0u);
  // The loop must have exercised both outcomes, or it tests nothing.
  EXPECT_GT(tally.refused, 0u);
  EXPECT_GT(tally.loaded, 0u);
  EXPECT_GT(tally.ran, 0u);
  std::string codes;
  for (int32_t c : tally.codes) codes += std::string(" ") + moert_status_code_name(c);
  std::printf(
      "%s: %zu bytes, %zu loads in %.2f s: %zu refused (%s ; %zu over the %llu-byte memory "
      "limit), %zu loaded, %zu ran, %zu runs refused\n",
      what, size, tally.loads, seconds, tally.refused, codes.c_str(), tally.limited,
      static_cast<unsigned long long>(kMaxMemory), tally.loaded, tally.ran, tally.run_refused);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Applies every single-byte mutation of `base`: each bit flipped, 0x00 and 0xFF.
void fuzz_every_byte(const std::vector<uint8_t>& base, const char* what) {
  const auto start = std::chrono::steady_clock::now();
  Tally tally;
  size_t failures = 0;
  for (size_t pos = 0; pos < base.size(); ++pos) {
    std::vector<uint8_t> values;
    for (int bit = 0; bit < 8; ++bit)
      values.push_back(static_cast<uint8_t>(base[pos] ^ (1u << bit)));
    if (base[pos] != 0x00) values.push_back(0x00);
    if (base[pos] != 0xFF) values.push_back(0xFF);
    for (uint8_t v : values) {
      auto buf = std::make_unique<uint8_t[]>(base.size());
      std::memcpy(buf.get(), base.data(), base.size());
      buf[pos] = v;
      const std::string problem = check_mutant(buf.get(), base.size(), tally);
      if (!problem.empty() && ++failures <= 20)
        ADD_FAILURE() << what << ": byte " << pos << " 0x" << std::hex << int{base[pos]} << " -> 0x"
                      << int{v} << std::dec << ": " << problem;
    }
  }
  report(tally, failures, seconds_since(start), what, base.size());
}

// Applies `count` random mutations of 2 to 4 bytes each, from a fixed seed.
void fuzz_random(const std::vector<uint8_t>& base, const char* what, int count) {
  const auto start = std::chrono::steady_clock::now();
  Tally tally;
  size_t failures = 0;
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&state] {  // xorshift64
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  for (int it = 0; it < count; ++it) {
    auto buf = std::make_unique<uint8_t[]>(base.size());
    std::memcpy(buf.get(), base.data(), base.size());
    const int changes = 2 + static_cast<int>(next() % 3);
    for (int c = 0; c < changes; ++c) {
      const size_t pos = next() % base.size();
      switch (next() % 4) {
        case 0:
          buf[pos] = static_cast<uint8_t>(buf[pos] ^ (1u << (next() % 8)));
          break;
        case 1:
          buf[pos] = 0x00;
          break;
        case 2:
          buf[pos] = 0xFF;
          break;
        default:
          buf[pos] = static_cast<uint8_t>(next());
      }
    }
    const std::string problem = check_mutant(buf.get(), base.size(), tally);
    if (!problem.empty() && ++failures <= 20)
      ADD_FAILURE() << what << ": random mutant " << it << ": " << problem;
  }
  report(tally, failures, seconds_since(start), what, base.size());
}

// Inline F32 and BF16 weights, an inline gate bias, FP8 experts with block scales, a shared expert
// and a dense layer: every decoder and every check on the way.
std::vector<uint8_t> inline_data_model() {
  ModelDesc d = token_baseline();
  MoEDesc& moe = d.layers[kMoE].moe;
  moe.w1.source = TensorDesc::Source::kData;
  moe.w1.dtype = 2;
  moe.w1.data.resize(4 * 4 * 8);
  for (size_t i = 0; i < moe.w1.data.size(); ++i)
    moe.w1.data[i] = static_cast<uint8_t>(0x30 + i % 16);
  moe.w1.has_scales = true;
  moe.w1.scales = {0.5f, 0.25f, 1.0f, 0.125f};
  moe.w2.shape = std::vector<uint64_t>{4, 8, 4};
  moe.num_shared = 1;
  moe.shared_hidden = 4;
  moe.shared_w1 = TensorDesc::init(3, 0.2f);
  moe.shared_w3 = TensorDesc::init(2, 0.2f);
  moe.shared_w2 = TensorDesc::f32(ramp(8 * 4, 0.1f));
  return build(d);
}

TEST(Fuzz, EverySingleByteMutationOfTheExampleModel) {
  fuzz_every_byte(read_file(example_model_path()), "tiny_moe.moert");
}

TEST(Fuzz, EverySingleByteMutationOfAnInlineDataModel) {
  const auto base = inline_data_model();
  ModelPtr check = load_ok(base);
  ASSERT_TRUE(check) << "the fuzz baseline must be valid";
  fuzz_every_byte(base, "inline-data model");
}

TEST(Fuzz, RandomMultiByteMutations) {
  fuzz_random(read_file(example_model_path()), "tiny_moe.moert, random", 2000);
  fuzz_random(inline_data_model(), "inline-data model, random", 4000);
}

}  // namespace
}  // namespace capi_test
