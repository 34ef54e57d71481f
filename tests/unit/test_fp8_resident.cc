// FP8 weights held as they are stored (issue 11): a model whose experts were quantized to E4M3 in
// 128x128 blocks keeps 1 byte per value plus the block scales, computes in fp32 on exactly the
// decoded values, trains from them, and writes back the same bytes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/model_loader.h"
#include "core/model_quantize.h"
#include "core/model_writer.h"
#include "core/param_store.h"
#include "core/session.h"
#include "tests/unit/session_model.h"

namespace moert {
namespace {

namespace fs = std::filesystem;
using test::batch;
using test::Batch;
using test::moe_model;
using test::options;

// Widths that are no multiples of 128: partial blocks in both dimensions of every expert matrix.
constexpr test::MoeWidths kWidths{200, 136, 72};
constexpr int64_t kExperts = 8, kShared = 2;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::path(::testing::TempDir()) / ("fp8_resident_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// The data file a model file at `path` wrote beside it.
fs::path data_file_of(const fs::path& path) {
  for (const auto& e : fs::directory_iterator(path.parent_path())) {
    const std::string name = e.path().filename().string();
    if (name.rfind(path.filename().string() + ".", 0) == 0 && name.size() > 5 &&
        name.substr(name.size() - 5) == ".data")
      return e.path();
  }
  return {};
}

const MoESpec& moe_of(const Model& m) { return std::get<MoESpec>(m.layers[2].spec); }

std::vector<const Tensor*> experts_of(const Model& m) {
  const MoESpec& s = moe_of(m);
  return {&s.w1, &s.w3, &s.w2, &s.shared_w1, &s.shared_w3, &s.shared_w2};
}

// The bytes of a stack of `matrices` [rows, cols] in 128x128 blocks, by the layout's definition:
// a code per value, and per matrix ceil(rows/128) rows of ceil(cols/128) scales padded to 4.
uint64_t fp8_bytes(int64_t matrices, int64_t rows, int64_t cols) {
  const int64_t row_blocks = (rows + 127) / 128, col_blocks = (cols + 127) / 128;
  const int64_t ld = (col_blocks + 3) / 4 * 4;
  return static_cast<uint64_t>(matrices * rows * cols + matrices * row_blocks * ld * 4);
}

// The fp32 model, its experts quantized and written, and that file loaded back.
struct Fp8Files {
  std::shared_ptr<Model> fp32;
  fs::path path;
  std::shared_ptr<const Model> loaded;
};

Fp8Files make_fp8_model(const std::string& name, bool power_of_two = false) {
  std::mt19937 rng(11);
  Fp8Files f;
  f.fp32 = moe_model(rng, kWidths);
  uint32_t quantized = 0;
  const std::unique_ptr<Model> q = quantize_experts_fp8(*f.fp32, {power_of_two}, &quantized);
  EXPECT_EQ(quantized, 6u);
  f.path = fresh_dir(name) / "fp8.moert";
  write_model(f.path.string(), *q);
  f.loaded = load_model_file(f.path.string());
  return f;
}

TEST(Fp8Resident, ExpertsHeldAtOneBytePerValuePlusScales) {
  const Fp8Files f = make_fp8_model("bytes");
  const Model& m = *f.loaded;
  const int64_t D = kWidths.dim, H = kWidths.expert_hidden, S = kWidths.shared_hidden;
  const MoESpec& moe = moe_of(m);
  EXPECT_EQ(moe.w1.resident_bytes(), fp8_bytes(kExperts, H, D));
  EXPECT_EQ(moe.w2.resident_bytes(), fp8_bytes(kExperts, D, H));
  EXPECT_EQ(moe.shared_w1.resident_bytes(), fp8_bytes(kShared, S, D));
  EXPECT_EQ(moe.shared_w2.resident_bytes(), fp8_bytes(kShared, D, S));
  for (const Tensor* t : experts_of(m)) {
    ASSERT_TRUE(t->fp8);
    EXPECT_TRUE(t->values.empty());
    EXPECT_TRUE(t->present());
    EXPECT_EQ(t->stored, StoredType::F8E4M3);
  }
  // Everything else is fp32 as before: the total is the experts' FP8 bytes plus 4 per other value.
  const uint64_t experts = 2 * fp8_bytes(kExperts, H, D) + fp8_bytes(kExperts, D, H) +
                           2 * fp8_bytes(kShared, S, D) + fp8_bytes(kShared, D, S);
  uint64_t other_values = 0;
  for (const auto& p : m.parameters())
    if (!p.tensor->fp8) other_values += static_cast<uint64_t>(p.tensor->numel());
  other_values += kExperts;  // the loss-free bias
  EXPECT_EQ(m.resident_bytes(), experts + 4 * other_values);
  const uint64_t expert_values = static_cast<uint64_t>(3 * kExperts * H * D + 3 * kShared * S * D);
  EXPECT_EQ(f.fp32->resident_bytes(), 4 * (expert_values + other_values));
  // About a quarter of the fp32 bytes for the experts: the scales add under 1 %.
  EXPECT_LT(experts, expert_values + expert_values / 100);
  std::printf("resident bytes: fp32 model %llu, FP8 experts %llu (experts %llu -> %llu)\n",
              static_cast<unsigned long long>(f.fp32->resident_bytes()),
              static_cast<unsigned long long>(m.resident_bytes()),
              static_cast<unsigned long long>(4 * expert_values),
              static_cast<unsigned long long>(experts));

  // The load limit counts what is held: the FP8 model fits in exactly its resident bytes.
  LoadOptions exact;
  exact.max_memory = m.resident_bytes();
  EXPECT_NO_THROW(load_model_file(f.path.string(), exact));
  LoadOptions short_by_one;
  short_by_one.max_memory = m.resident_bytes() - 1;
  try {
    load_model_file(f.path.string(), short_by_one);
    ADD_FAILURE() << "a load over max_memory was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Limit) << e.what();
  }
}

TEST(Fp8Resident, WritingBackGivesTheSameBytes) {
  const Fp8Files f = make_fp8_model("write");
  // Under the same file name (the description names its data file), in another directory.
  const fs::path again = fresh_dir("write_again") / f.path.filename();
  write_model(again.string(), *f.loaded);
  EXPECT_EQ(slurp(f.path), slurp(again));
  const fs::path d1 = data_file_of(f.path), d2 = data_file_of(again);
  ASSERT_FALSE(d1.empty());
  ASSERT_FALSE(d2.empty());
  EXPECT_EQ(slurp(d1), slurp(d2));
  // And the codes and scales read back are those quantized.
  const auto reread = load_model_file(again.string());
  const auto a = experts_of(*f.loaded), b = experts_of(*reread);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]->fp8->codes, b[i]->fp8->codes);
    EXPECT_EQ(0, std::memcmp(a[i]->fp8->scales.data(), b[i]->fp8->scales.data(),
                             a[i]->fp8->scales.size() * sizeof(float)));
  }
}

TEST(Fp8Resident, QuantizerScalesAndPowerOfTwoOption) {
  const Fp8Files f = make_fp8_model("pow2", true);
  for (const Tensor* t : experts_of(*f.loaded)) {
    const Fp8Blocks& q = *t->fp8;
    for (int64_t i = 0; i < q.matrices; ++i)
      for (int64_t rb = 0; rb < fp8::blocks_of(q.rows); ++rb)
        for (int64_t cb = 0; cb < q.scale_ld(); ++cb) {
          const float s =
              q.scales[static_cast<size_t>(i * q.matrix_scales() + rb * q.scale_ld() + cb)];
          if (cb >= fp8::blocks_of(q.cols)) {
            EXPECT_EQ(s, 0.0f);  // padding
            continue;
          }
          int e = 0;
          EXPECT_EQ(std::frexp(s, &e), 0.5f) << s << " is not a power of two";
        }
  }
}

TEST(Fp8Resident, Fp32ForwardEqualsTheDecodedModelBitwise) {
  const Fp8Files f = make_fp8_model("forward");
  auto decoded = std::make_shared<Model>(*f.loaded);
  decoded->make_fp32();
  for (const Tensor* t : experts_of(*decoded)) EXPECT_FALSE(t->fp8);
  std::mt19937 rng(5);
  const int64_t rows = 37;
  const Batch b = batch(rng, rows);
  std::vector<float> y8(rows * test::kSessionVocab), y32(y8.size());
  Session s8(f.loaded, options(Precision::Fp32, Mode::Inference));
  Session s32(decoded, options(Precision::Fp32, Mode::Inference));
  s8.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y8.data(), y8.size());
  s32.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y32.data(), y32.size());
  EXPECT_EQ(0, std::memcmp(y8.data(), y32.data(), y8.size() * sizeof(float)));
  // The decoded values are within E4M3's half-ulp (2^-4 relative, plus the subnormal step) of
  // the fp32 weights they were quantized from.
  const auto src = experts_of(*f.fp32), dec = experts_of(*decoded);
  for (size_t i = 0; i < src.size(); ++i) {
    const Fp8Blocks& q = *experts_of(*f.loaded)[i]->fp8;
    for (size_t k = 0; k < src[i]->values.size(); ++k) {
      const int64_t r = static_cast<int64_t>(k) / q.cols % q.rows,
                    c = static_cast<int64_t>(k) % q.cols;
      const int64_t m = static_cast<int64_t>(k) / (q.rows * q.cols);
      const float scale =
          q.scales[static_cast<size_t>(m * q.matrix_scales() + r / 128 * q.scale_ld() + c / 128)];
      const float x = src[i]->values[k], y = dec[i]->values[k];
      ASSERT_LE(std::fabs(x - y), std::fabs(x) * (1.0f / 16 + 1e-6f) + scale * 0x1p-10f)
          << i << " " << k;
    }
  }
}

// A session of precision fp8 multiplies the file's codes and scales themselves; they are those
// it would have made from the fp32 weights (the same quantizer), so the forward is bit for bit
// that of an fp8 session on the fp32 model the file was quantized from. With UE8M0 scales too.
TEST(Fp8Resident, Fp8ForwardOnTheFileEqualsQuantizingInMemory) {
  for (bool pow2 : {false, true}) {
    const Fp8Files f = make_fp8_model(pow2 ? "fp8_ue8m0" : "fp8_fp32_scales", pow2);
    SessionOptions o = options(Precision::Fp8, Mode::Inference);
    o.fp8.power_of_two_scales = pow2;
    Session from_file(f.loaded, o);
    Session in_memory(f.fp32, o);
    std::mt19937 rng(8);
    const int64_t rows = 150;  // activation tiles of 128 rows and a partial one
    const Batch b = batch(rng, rows);
    std::vector<float> y1(rows * test::kSessionVocab), y2(y1.size());
    from_file.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y1.data(), y1.size());
    in_memory.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y2.data(), y2.size());
    EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float))) << pow2;
  }
}

TEST(Fp8Resident, TrainingStartsFromTheDecodedValues) {
  const Fp8Files f = make_fp8_model("train");
  auto decoded = std::make_shared<Model>(*f.loaded);
  decoded->make_fp32();
  Session s8(f.loaded, options(Precision::Fp32, Mode::Training));
  Session s32(decoded, options(Precision::Fp32, Mode::Training));
  for (const char* name :
       {"moe.w1", "moe.w3", "moe.w2", "moe.shared_w1", "moe.shared_w3", "moe.shared_w2"}) {
    const size_t i = s8.parameter_index(name);
    std::vector<float> a(static_cast<size_t>(s8.parameter_size(i))), b(a.size());
    s8.read_parameter(i, a.data(), a.size());
    s32.read_parameter(s32.parameter_index(name), b.data(), b.size());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << name;
  }
  std::mt19937 rng(6);
  const int64_t rows = 64;
  std::vector<float> y(rows * test::kSessionVocab);
  for (int step = 0; step < 2; ++step) {
    const Batch b = batch(rng, rows);
    for (Session* s : {&s8, &s32}) {
      s->zero_grad();
      s->forward_tokens(b.tokens.data(), b.tokens.size(), rows, y.data(), y.size());
      s->backward_loss(b.targets.data(), b.targets.size());
      s->step();
    }
  }
  const size_t i = s8.parameter_index("moe.w1");
  std::vector<float> a(static_cast<size_t>(s8.parameter_size(i))), b(a.size());
  s8.read_parameter(i, a.data(), a.size());
  s32.read_parameter(i, b.data(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
  // The loaded model itself is untouched by training: still FP8.
  EXPECT_TRUE(moe_of(*f.loaded).w1.fp8);
  // A checkpoint of the session holds fp32 masters; its model loads like any.
  const fs::path ck = f.path.parent_path() / "ck.moert";
  s8.save(ck.string());
  const auto reloaded = load_model_file(ck.string());
  EXPECT_FALSE(moe_of(*reloaded).w1.fp8);
  EXPECT_NO_THROW(s32.load(ck.string()));
}

// Session::load compares a checkpoint's layers with the session's model, where the model's
// experts are FP8 and the checkpoint's fp32: present either way.
TEST(Fp8Resident, CheckpointOfAnFp8ModelResumes) {
  const Fp8Files f = make_fp8_model("resume");
  Session s(f.loaded, options(Precision::Fp32, Mode::Training));
  const fs::path ck = f.path.parent_path() / "ck.moert";
  s.save(ck.string());
  EXPECT_NO_THROW(s.load(ck.string()));
}

TEST(Fp8Resident, ParamStoreMultipliesTheResidentCodesOrItsOwnDecodedCopy) {
  const Fp8Files f = make_fp8_model("store");
  Model& m = const_cast<Model&>(*f.loaded);
  const MoESpec& moe = moe_of(m);
  const std::vector<float> w1 = moe.w1.decode_fp32();
  for (Precision p : {Precision::Fp32, Precision::Bf16, Precision::Fp8}) {
    const auto be = make_cpu_backend(1, p);
    const ParamStore store(*be, m, nullptr);
    const Weight w = store.weight(moe.w1);
    if (be->fp8_experts()) {
      // No fp32 copy at all: the backend reads the model's own codes and scales.
      EXPECT_EQ(w.f32, nullptr);
      EXPECT_EQ(w.fp8.codes, moe.w1.fp8->codes.data());
      EXPECT_EQ(w.fp8.scales, moe.w1.fp8->scales.data());
      EXPECT_EQ(w.fp8.matrix_elements, kWidths.expert_hidden * kWidths.dim);
      EXPECT_EQ(w.fp8.matrix_scales, moe.w1.fp8->matrix_scales());
      EXPECT_EQ(w.offset(2 * w.fp8.matrix_elements).fp8.codes,
                moe.w1.fp8->codes.data() + 2 * w.fp8.matrix_elements);
    } else {
      ASSERT_NE(w.f32, nullptr);
      EXPECT_FALSE(w.fp8);
      EXPECT_EQ(0, std::memcmp(w.f32, w1.data(), w1.size() * sizeof(float)));
      // Multiplied in bf16: a plain bf16 copy, or (this inference store) a packed one alone
      // where the backend packs bf16 weights.
      EXPECT_EQ(w.bf16 != nullptr || w.bf16_packed != nullptr,
                be->bf16_copies() != Bf16Copies::None);
      if (w.bf16_packed) {
        EXPECT_EQ(w.packed_bytes, be->packed_bf16_bytes(kWidths.expert_hidden, kWidths.dim));
      }
    }
  }
}

// Inference stores over an FP8 model that multiply in fp32 or bf16 decode each weight once
// between them, and share the copies made from the decoded values.
TEST(Fp8Resident, InferenceStoresShareTheDecodedValuesAndTheirCopies) {
  const Fp8Files f = make_fp8_model("shared");
  Model& m = const_cast<Model&>(*f.loaded);
  const MoESpec& moe = moe_of(m);
  const std::vector<float> w1 = moe.w1.decode_fp32();
  for (Precision p : {Precision::Fp32, Precision::Bf16}) {
    const auto one = make_cpu_backend(1, p, {}, LayoutCopies::On);
    const auto two = make_cpu_backend(2, p, {}, LayoutCopies::On);
    const ParamStore a(*one, m, nullptr), b(*two, m, nullptr);
    const Weight wa = a.weight(moe.w1), wb = b.weight(moe.w1);
    ASSERT_NE(wa.f32, nullptr);
    EXPECT_EQ(wa.f32, wb.f32);
    EXPECT_EQ(0, std::memcmp(wa.f32, w1.data(), w1.size() * sizeof(float)));
    EXPECT_EQ(wa.f32t, wb.f32t);
    EXPECT_EQ(wa.bf16, wb.bf16);
    EXPECT_EQ(wa.bf16_packed, wb.bf16_packed);
    EXPECT_EQ(p == Precision::Fp32, wa.f32t != nullptr);
    EXPECT_EQ(p == Precision::Bf16, wa.bf16 != nullptr || wa.bf16_packed != nullptr);
  }
  // Sessions answer as one alone, and as sessions over the decoded model do (their copies come
  // from fp32 values the model holds, not from decoded ones), bit for bit: a copy built wrong
  // from the shared decoded values would agree with itself but not with these.
  auto decoded = std::make_shared<Model>(*f.loaded);
  decoded->make_fp32();
  const Batch bt = [] {
    std::mt19937 rng(3);
    return batch(rng, 70);
  }();
  auto forward = [&](Session& s) {
    std::vector<float> out(70 * test::kSessionVocab);
    s.forward_tokens(bt.tokens.data(), bt.tokens.size(), 70, out.data(), out.size());
    return out;
  };
  auto with = [](Precision p, uint32_t threads, const char* layouts) {
    SessionOptions o = test::options(p, Mode::Inference, threads);
    o.set("layout_copies", layouts);
    return o;
  };
  for (Precision p : {Precision::Fp32, Precision::Bf16})
    for (const char* layouts : {"on", "off"}) {
      std::vector<float> reference;
      {
        Session s(decoded, with(p, 2, layouts));
        reference = forward(s);
      }
      Session x(f.loaded, with(p, 1, layouts));
      Session y(f.loaded, with(p, 3, layouts));
      EXPECT_EQ(forward(x), reference) << layouts;
      EXPECT_EQ(forward(y), reference) << layouts;
    }
}

TEST(Fp8Resident, QuantizingANanIsRefusedNamingTheTensor) {
  std::mt19937 rng(12);
  auto m = moe_model(rng, kWidths);
  MoESpec& moe = std::get<MoESpec>(m->layers[2].spec);
  // Expert 3, row 130 (the second block row), column 7.
  moe.w2.values[static_cast<size_t>((3 * kWidths.dim + 130) * kWidths.expert_hidden + 7)] = NAN;
  try {
    quantize_experts_fp8(*m, {});
    ADD_FAILURE() << "a NaN was quantized";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Numeric);
    EXPECT_NE(std::string(e.what()).find("moe.w2"), std::string::npos) << e.what();
    EXPECT_NE(
        std::string(e.what()).find("row " + std::to_string(3 * kWidths.dim + 130) + ", column 7"),
        std::string::npos)
        << e.what();
  }
  // The model itself is untouched.
  EXPECT_FALSE(moe.w1.fp8);
}

TEST(Fp8Resident, NanCodeInTheFileIsRefused) {
  const Fp8Files f = make_fp8_model("nan");
  const fs::path data = data_file_of(f.path);
  ASSERT_FALSE(data.empty());
  std::string bytes = slurp(data);
  // The first array of the data file is the first large one written: moe.w1's codes.
  bytes[5] = static_cast<char>(0x7F);
  std::ofstream(data, std::ios::binary | std::ios::trunc) << bytes;
  try {
    load_model_file(f.path.string());
    ADD_FAILURE() << "a NaN code was loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidModel);
    EXPECT_NE(std::string(e.what()).find("NaN or infinity at element 5"), std::string::npos)
        << e.what();
  }
}

TEST(Fp8Resident, DataOfAResidentTensorIsRefusedNotEmpty) {
  const Fp8Files f = make_fp8_model("data");
  const Tensor& t = moe_of(*f.loaded).w1;
  try {
    (void)t.data();
    ADD_FAILURE() << "data() of a resident FP8 tensor returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::Internal);
  }
  EXPECT_EQ(t.numel(), kExperts * kWidths.expert_hidden * kWidths.dim);
}

}  // namespace
}  // namespace moert
