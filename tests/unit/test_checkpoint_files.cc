// Checkpoint files at the core level: crafted training state with a digest that matches it (as a
// crafted file would have), the bounds the loader puts on it, and the arithmetic that uses it.
// Regressions of the coverage-guided campaign (issue 15, part 6).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "core/content_digest.h"
#include "core/error.h"
#include "core/model_loader.h"
#include "core/model_writer.h"
#include "core/session.h"
#include "moert_generated.h"
#include "tests/support/checkpoint_patch.h"

namespace moert {
namespace {

namespace fs = std::filesystem;

class CheckpointFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("moert-unit-ckpt-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    model_ = load_model_file(MOERT_EXAMPLE_MODEL);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<Session> training_session() const {
    SessionOptions o;
    o.mode = Mode::Training;
    return std::make_unique<Session>(model_, o);
  }

  // One training-mode forward and backward: a micro-batch of 16 rows, not yet stepped.
  static void micro_batch(Session& s) {
    std::vector<int32_t> tokens(16 * 4), targets(16);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 7) % 64);
    for (size_t r = 0; r < targets.size(); ++r) targets[r] = tokens[r * 4 + 3];
    std::vector<float> logits(16 * 64);
    s.forward_tokens(tokens.data(), tokens.size(), 16, logits.data(), logits.size());
    s.backward_loss(targets.data(), targets.size());
  }

  // The description of a checkpoint saved mid-step, 8-byte aligned for in-place edits.
  std::vector<uint64_t> saved(size_t& size) const {
    auto s = training_session();
    micro_batch(*s);
    s->save(path());
    std::ifstream in(path(), std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
    size = bytes.size();
    std::vector<uint64_t> out((size + 7) / 8);
    std::memcpy(out.data(), bytes.data(), size);
    return out;
  }

  // Rewrites the step counts of MoE layer 2 (moe0, loss-free balancing) in the saved checkpoint,
  // with the digest of the changed content, as a crafted file would carry it. The digest comes
  // from the content the unchanged file loads to, with the new counts put in.
  void craft_step_counts(const std::vector<int64_t>& counts) const {
    size_t size = 0;
    auto buf = saved(size);
    std::unique_ptr<Model> ck = load_checkpoint_file(path(), {});
    uint64_t digest = 0;
    for (auto& l : ck->training->layers)
      if (l.layer == 2) {
        l.step_counts = counts;
        digest = checkpoint_digest(*ck, view_of(*ck->training));
      }
    ASSERT_NE(digest, 0u);
    const auto* t = fb::GetModel(buf.data())->training();
    for (const fb::LayerBalanceState* l : *t->layers())
      if (l->layer() == 2)
        std::memcpy(const_cast<uint8_t*>(l->step_counts()->Data()), counts.data(),
                    counts.size() * sizeof(int64_t));
    auto* bytes = reinterpret_cast<uint8_t*>(buf.data());
    ASSERT_TRUE(moert_test::set_content_digest(bytes, digest));
    std::ofstream(path(), std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes), static_cast<std::streamsize>(size));
  }

  std::string path() const { return (dir_ / "ck.moert").string(); }

  fs::path dir_;
  std::shared_ptr<const Model> model_;
};

// A checkpoint path that is a directory is refused before anything is written: the data file
// once stayed behind, beside the directory, when the final rename failed.
TEST_F(CheckpointFiles, APathThatIsADirectoryIsRefusedAndLeavesNothingBehind) {
  const fs::path taken = dir_ / "ck.moert";
  fs::create_directories(taken);
  auto s = training_session();
  micro_batch(*s);
  try {
    s->save(taken.string());
    FAIL() << "saved onto a directory";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("is a directory"), std::string::npos) << e.what();
  }
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir_))
    names.push_back(entry.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"ck.moert"});
  EXPECT_TRUE(fs::is_empty(taken));
  // The session is unharmed: a save to a file next to it works.
  s->save((dir_ / "ok.moert").string());
  EXPECT_TRUE(fs::is_regular_file(dir_ / "ok.moert"));
}

// A checkpoint may hold moments for some parameters only (the loader accepts none for one). A
// refused step takes back only the moments it allocated itself: it once dropped every moment
// whenever one parameter had none, the checkpoint's too.
TEST_F(CheckpointFiles, ARefusedStepKeepsTheMomentsACheckpointBrought) {
  {
    auto s = training_session();
    micro_batch(*s);
    s->step();
    s->save(path());
  }
  std::unique_ptr<Model> partial = load_checkpoint_file(path(), {});
  ASSERT_GE(partial->training->params.size(), 2u);
  ASSERT_FALSE(partial->training->params[1].m.empty());
  partial->training->params[0].m.clear();
  partial->training->params[0].v.clear();
  const std::string partial_path = (dir_ / "partial.moert").string();
  write_checkpoint(partial_path, *partial, view_of(*partial->training));

  auto s = training_session();
  s->load(partial_path);
  s->set_eval(true);
  EXPECT_THROW(s->step(), Error);
  s->set_eval(false);
  const std::string after_path = (dir_ / "after.moert").string();
  s->save(after_path);
  std::unique_ptr<Model> after = load_checkpoint_file(after_path, {});
  ASSERT_EQ(after->training->params.size(), partial->training->params.size());
  for (size_t i = 0; i < after->training->params.size(); ++i) {
    EXPECT_EQ(after->training->params[i].m, partial->training->params[i].m) << i;
    EXPECT_EQ(after->training->params[i].v, partial->training->params[i].v) << i;
  }
}

// Training state that no run can reach, in a file whose digest matches it (a buggy writer's or
// a crafted one): each is refused as the model loads, naming what is wrong, and a session's load
// of it leaves the session as it was. Each would otherwise resume as something else than the
// run: NaN weights after the next step (a negative second moment, a step count that wraps to 0),
// a sum of gradients taken for their mean (a micro-batch count that wraps), zeros or this
// session's own settings in place of a state left out.
TEST_F(CheckpointFiles, StateNoRunCanReachIsRefused) {
  {
    auto s = training_session();
    micro_batch(*s);
    s->step();
    micro_batch(*s);
    s->save(path());
  }
  struct Case {
    const char* what;
    std::function<void(TrainingState&)> change;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {"a negative second moment", [](TrainingState& t) { t.params.back().v[3] = -1e-6f; },
       "holds a negative value"},
      {"a second moment without the first", [](TrainingState& t) { t.params.front().m.clear(); },
       "has AdamW's second moment v without its m"},
      {"a first moment without the second", [](TrainingState& t) { t.params.front().v.clear(); },
       "has AdamW's first moment m without its v"},
      {"a second moment under SGD", [](TrainingState& t) { t.optimizer = "sgd"; },
       "holds a second moment, which SGD never makes"},
      {"a parameter left out", [](TrainingState& t) { t.params.erase(t.params.begin() + 1); },
       "has no state for parameter"},
      {"no parameter at all", [](TrainingState& t) { t.params.clear(); },
       "has no state for parameter"},
      {"a MoE layer's balancing state left out", [](TrainingState& t) { t.layers.clear(); },
       "has no balancing state for MoE layer"},
      {"a MoE layer's balancing state twice",
       [](TrainingState& t) { t.layers.push_back(t.layers.back()); },
       "repeats the balancing state of layer"},
      {"the generator's state left out", [](TrainingState& t) { t.rng.clear(); },
       "field 'rng' is not a generator state"},
      {"the generator's all-zero state",
       [](TrainingState& t) { std::fill(t.rng.begin(), t.rng.begin() + 4, 0); },
       "field 'rng' is not a generator state"},
      {"a step count at 2^64 - 1",
       [](TrainingState& t) { t.step = std::numeric_limits<uint64_t>::max(); },
       "field 'step' is 2^64 - 1"},
      {"a micro-batch count at 2^32 - 1",
       [](TrainingState& t) { t.micro_batches = std::numeric_limits<uint32_t>::max(); },
       "field 'micro_batches' is 2^32 - 1"},
  };
  const std::string crafted = (dir_ / "crafted.moert").string();
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::unique_ptr<Model> ck = load_checkpoint_file(path(), {});
    c.change(*ck->training);
    write_checkpoint(crafted, *ck, view_of(*ck->training));
    try {
      load_model_file(crafted);
      ADD_FAILURE() << "loaded as a model";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Code::InvalidModel);
      EXPECT_NE(std::string(e.what()).find(c.needle), std::string::npos) << e.what();
    }
    auto s = training_session();
    micro_batch(*s);
    s->step();
    const uint64_t before = s->step_count();
    EXPECT_THROW(s->load(crafted), Error);
    EXPECT_EQ(s->step_count(), before);
    micro_batch(*s);
    s->step();
  }
  // The file unchanged loads, written back the same way; so do moments that are all zero
  // without their pair (older versions left such moments after a refused first step, and
  // set_config could then change the optimizer).
  std::unique_ptr<Model> ck = load_checkpoint_file(path(), {});
  write_checkpoint(crafted, *ck, view_of(*ck->training));
  auto s = training_session();
  s->load(crafted);
  EXPECT_EQ(s->step_count(), 1u);
  for (const char* optimizer : {"adamw", "sgd"}) {
    std::unique_ptr<Model> zeros = load_checkpoint_file(path(), {});
    TrainingState& t = *zeros->training;
    t.step = 0;
    t.optimizer = optimizer;
    for (ParamState& p : t.params) {
      std::fill(p.m.begin(), p.m.end(), 0.0f);
      std::fill(p.v.begin(), p.v.end(), 0.0f);
      if (t.optimizer == "adamw") p.v.clear();
    }
    write_checkpoint(crafted, *zeros, view_of(t));
    EXPECT_NO_THROW(load_model_file(crafted)) << optimizer;
    if (t.optimizer == "adamw") {
      EXPECT_NO_THROW(training_session()->load(crafted));
    }
  }
}

// A session never counts the 2^32 - 1 micro-batches the loader refuses: at 2^32 - 2 (from a
// checkpoint) the next backward is refused before it adds anything; a step goes on, and after
// zero_grad so do the backwards.
TEST_F(CheckpointFiles, TheMicroBatchCountStopsBelowWhatTheLoaderRefuses) {
  {
    auto s = training_session();
    micro_batch(*s);
    s->save(path());
  }
  std::unique_ptr<Model> ck = load_checkpoint_file(path(), {});
  ck->training->micro_batches = std::numeric_limits<uint32_t>::max() - 1;
  const std::string crafted = (dir_ / "crafted.moert").string();
  write_checkpoint(crafted, *ck, view_of(*ck->training));
  auto s = training_session();
  s->load(crafted);
  try {
    micro_batch(*s);
    ADD_FAILURE() << "a backward counted 2^32 - 1 micro-batches";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidState);
    EXPECT_NE(std::string(e.what()).find("call zero_grad first"), std::string::npos) << e.what();
  }
  s->step();
  EXPECT_EQ(s->step_count(), 1u);
  s->zero_grad();
  micro_batch(*s);
}

// A refused step leaves the optimizer state as it found it, whatever refuses it: the moments it
// allocated are taken back. Such moments once stayed after a refusal that came late in the step
// (a gradient AdamW would overflow, a bias update past the fp32 range); with the optimizer
// changed before the first step, the session then saved moments of an optimizer that never
// stepped.
TEST_F(CheckpointFiles, ARefusedStepLeavesNoMomentsBehind) {
  auto s = training_session();
  micro_batch(*s);
  const size_t w = s->parameter_index("moe0.w1");
  std::vector<float> huge(s->parameter_size(w), 1e30f);
  s->write_gradient(w, huge.data(), huge.size());
  s->set_config("clip_norm", "0");
  EXPECT_THROW(s->step(), Error);
  EXPECT_EQ(s->step_count(), 0u);
  s->save(path());
  std::unique_ptr<Model> ck = load_checkpoint_file(path(), {});
  for (const ParamState& p : ck->training->params) {
    EXPECT_TRUE(p.m.empty()) << p.name;
    EXPECT_TRUE(p.v.empty()) << p.name;
  }
  // The optimizer can still change, and its checkpoints load.
  s->set_config("optimizer", "sgd");
  s->zero_grad();
  micro_batch(*s);
  s->step();
  s->save(path());
  EXPECT_NO_THROW(load_model_file(path()));
}

// A step with nothing to apply makes no moments, and keeps none: one after a forward alone (the
// bias update only), and one over a gradient written as zeros, which makes them in the ranks'
// agreement and takes them back when the sum of squares shows it will not update.
TEST_F(CheckpointFiles, AStepThatDoesNotUpdateLeavesNoMoments) {
  auto s = training_session();
  std::vector<int32_t> tokens(16 * 4);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 5) % 64);
  std::vector<float> logits(16 * 64);
  s->forward_tokens(tokens.data(), tokens.size(), 16, logits.data(), logits.size());
  s->step();
  const size_t w = s->parameter_index("moe0.w1");
  const std::vector<float> zeros(s->parameter_size(w), 0.0f);
  s->write_gradient(w, zeros.data(), zeros.size());
  s->step();
  EXPECT_EQ(s->step_count(), 2u);
  s->save(path());
  std::unique_ptr<Model> ck = load_checkpoint_file(path(), {});
  for (const ParamState& p : ck->training->params) {
    EXPECT_TRUE(p.m.empty()) << p.name;
    EXPECT_TRUE(p.v.empty()) << p.name;
  }
}

TEST_F(CheckpointFiles, StepCountsNear2To63AreRefusedAndTheSessionKeepsItsState) {
  // Each count is positive and below 2^63, but their sum, and the bias update's, overflow int64.
  std::vector<int64_t> counts(8);
  for (int e = 0; e < 8; ++e) counts[e] = (int64_t{1} << 62) + e;
  craft_step_counts(counts);
  auto s = training_session();
  std::vector<float> before(8);
  s->read_bias(2, before.data(), 8);
  try {
    s->load(path());
    FAIL() << "a checkpoint counting 2^65 assignments in one step was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidModel);
    EXPECT_NE(std::string(e.what()).find("2^53"), std::string::npos) << e.what();
  }
  EXPECT_EQ(s->step_count(), 0u);
  std::vector<float> after(8);
  s->read_bias(2, after.data(), 8);
  EXPECT_EQ(before, after);
  EXPECT_EQ(s->expert_counts(2, CountScope::Step), std::vector<int64_t>(8, 0));
}

TEST_F(CheckpointFiles, StepCountsUpTo2To53MoveTheBiasTheRightWayAndGiveTheRightMaxVio) {
  // Sum 2^53 - 28: mean 2^50 - 3.5; experts 0..3 are above it, 4..7 below.
  std::vector<int64_t> want(8);
  for (int e = 0; e < 8; ++e) want[e] = (int64_t{1} << 50) - e;
  craft_step_counts(want);
  auto s = training_session();
  s->load(path());
  EXPECT_EQ(s->expert_counts(2, CountScope::Step), want);
  const long double mean = ((long double)(int64_t{1} << 53) - 28) / 8;
  const double want_vio = static_cast<double>(((long double)(int64_t{1} << 50) - mean) / mean);
  EXPECT_DOUBLE_EQ(s->max_vio(2, CountScope::Step), want_vio);
  EXPECT_GT(s->max_vio(2, CountScope::Step), 0.0);

  std::vector<float> before(8), after(8);
  s->read_bias(2, before.data(), 8);
  s->step();
  s->read_bias(2, after.data(), 8);
  for (int e = 0; e < 8; ++e) {
    const float gamma = 1e-3f;
    EXPECT_FLOAT_EQ(after[e], before[e] + (e < 4 ? -gamma : gamma)) << "expert " << e;
  }
}

TEST_F(CheckpointFiles, NegativeStepCountsAreRefused) {
  std::vector<int64_t> counts(8, 5);
  counts[3] = -1;
  craft_step_counts(counts);
  auto s = training_session();
  EXPECT_THROW(s->load(path()), Error);
}

// The data file is covered by the digest like the description: one damaged byte anywhere in it,
// a truncation or its absence is refused, and the session keeps its state.
TEST_F(CheckpointFiles, DamagedTruncatedOrMissingDataFileIsRefused) {
  size_t size = 0;
  saved(size);
  fs::path data;
  for (const auto& e : fs::directory_iterator(dir_))
    if (e.path().extension() == ".data") data = e.path();
  ASSERT_FALSE(data.empty()) << "the example's 64 KiB expert weights go to a data file";
  const uint64_t data_size = fs::file_size(data);
  std::ifstream in(data, std::ios::binary);
  const std::vector<char> original((std::istreambuf_iterator<char>(in)), {});
  auto s = training_session();
  auto expect_refused = [&](const std::string& what, Code code) {
    try {
      s->load(path());
      ADD_FAILURE() << what << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << what << ": " << e.what();
    }
    EXPECT_EQ(s->step_count(), 0u);
    EXPECT_EQ(s->expert_counts(2, CountScope::Step), std::vector<int64_t>(8, 0));
  };
  for (uint64_t pos : {uint64_t{0}, data_size / 3, data_size - 1}) {
    auto damaged = original;
    damaged[pos] = static_cast<char>(damaged[pos] ^ 0x01);
    std::ofstream(data, std::ios::binary).write(damaged.data(), static_cast<long>(damaged.size()));
    expect_refused("data byte " + std::to_string(pos) + " damaged", Code::InvalidModel);
  }
  std::ofstream(data, std::ios::binary).write(original.data(), static_cast<long>(data_size - 4));
  expect_refused("a truncated data file", Code::InvalidModel);
  fs::remove(data);
  expect_refused("a missing data file", Code::Io);
  std::ofstream(data, std::ios::binary).write(original.data(), static_cast<long>(data_size));
  s->load(path());
  EXPECT_EQ(s->expert_counts(2, CountScope::Step).size(), 8u);
}

// A checkpoint of a hidden-input model (one MoE layer of 2 experts over width 4) whose rng or
// step_counts [ulong]/[long] vector starts at an address that is 4 mod 8: the FlatBuffers verifier
// accepts it (it checks only the 4-byte alignment of the length), so reading its elements as
// 8-byte values would be a misaligned load. Built by aiming the vector one word into a [uint].
std::vector<uint64_t> misaligned_checkpoint(bool misalign_rng, size_t& size) {
  for (int pad = 0; pad < 2; ++pad) {
    flatbuffers::FlatBufferBuilder b;
    auto init = [&] {
      const auto how = fb::CreateInit(b);
      return fb::CreateTensor(b, 0, fb::DType::F32, 0, nullptr, how);
    };
    const auto gate = init();
    const auto w1 = init();
    const auto w3 = init();
    const auto w2 = init();
    const auto balancing = fb::CreateBalancing(b, fb::BalancingPolicy::LossFreeBias);
    const auto moe = fb::CreateMoE(b, 4, 2u, 1u, 2u, fb::ScoreFunction::Sigmoid, 1u, 1u, false,
                                   1.0f, 0, 0, true, balancing, gate, 0, w1, w3, w2);
    const auto name = b.CreateString("moe");
    const auto layer = fb::CreateLayer(b, name, fb::LayerKind::MoE, moe.Union());
    const auto layers = b.CreateVector(std::vector<flatbuffers::Offset<fb::Layer>>{layer});
    // Six 8-byte words (a generator state) or two counts, carried by a [uint] vector whose first
    // element is the fake vector's length.
    b.StartVector(0, sizeof(uint64_t));
    b.EndVector(0);
    if (pad) b.PushElement(uint32_t{0});
    const uint32_t n = misalign_rng ? 6 : 2;
    std::vector<uint32_t> words(1 + 2 * n, 0);
    words[0] = n;
    const auto carrier = b.CreateVector(words);
    const uint32_t fake = carrier.o - 4;
    const auto good_rng = misalign_rng ? 0 : b.CreateVector(std::vector<uint64_t>(6, 1));
    flatbuffers::Offset<fb::LayerBalanceState> balance;
    if (misalign_rng) {
      balance = fb::CreateLayerBalanceState(b, 0, 0, 0.001f);
    } else {
      balance = fb::CreateLayerBalanceState(
          b, 0, flatbuffers::Offset<flatbuffers::Vector<int64_t>>(fake), 0.001f);
    }
    const auto balances = b.CreateVector(std::vector{balance});
    const auto optimizer = b.CreateString("adamw");
    fb::TrainingStateBuilder tb(b);
    tb.add_rng(misalign_rng ? flatbuffers::Offset<flatbuffers::Vector<uint64_t>>(fake) : good_rng);
    tb.add_optimizer(optimizer);
    tb.add_layers(balances);
    tb.add_content_digest(12345);
    const auto training = tb.Finish();
    fb::ModelBuilder mb(b);
    mb.add_schema_major(1);
    mb.add_schema_minor(1);
    mb.add_input_dim(4);
    mb.add_layers(layers);
    mb.add_seed(1);
    mb.add_training(training);
    fb::FinishModelBuffer(b, mb.Finish());
    const size_t element = b.GetSize() - fake + sizeof(uint32_t);
    if (element % 8 != 4) continue;
    size = b.GetSize();
    std::vector<uint64_t> out((size + 7) / 8);
    std::memcpy(out.data(), b.GetBufferPointer(), size);
    return out;
  }
  ADD_FAILURE() << "could not place the vector at 4 mod 8";
  return {};
}

TEST(CheckpointVectors, MisalignedRngAndStepCountsAreRefusedBeforeAnyLoad) {
  for (bool rng : {true, false}) {
    SCOPED_TRACE(rng ? "rng" : "step_counts");
    size_t size = 0;
    const auto buf = misaligned_checkpoint(rng, size);
    ASSERT_FALSE(buf.empty());
    flatbuffers::Verifier verifier(reinterpret_cast<const uint8_t*>(buf.data()), size);
    ASSERT_TRUE(fb::VerifyModelBuffer(verifier)) << "the crafted file must pass the verifier";
    // As a model and through the fuzzer's digest path: a clean refusal, no 8-byte load (UBSan
    // reports one in the sanitizer build).
    for (int path = 0; path < 2; ++path) {
      try {
        if (path == 0)
          load_model_buffer(buf.data(), size, "");
        else
          recompute_checkpoint_digest(buf.data(), size, "", {});
        ADD_FAILURE() << "a misaligned vector was accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), Code::InvalidModel);
        EXPECT_NE(std::string(e.what()).find(rng ? "'rng'" : "'step_counts'"), std::string::npos)
            << e.what();
        EXPECT_NE(std::string(e.what()).find("aligned"), std::string::npos) << e.what();
      }
    }
  }
}

// A checkpoint of schema 1.0 carries only the old byte digest, which depended on the writer's
// compiler: it is refused as unverifiable, with a message that says so.
TEST(CheckpointVectors, ASchema10DigestIsRefusedAsUnverifiable) {
  flatbuffers::FlatBufferBuilder b;
  const auto how = fb::CreateInit(b, fb::InitKind::Ones);
  const auto weight = fb::CreateTensor(b, 0, fb::DType::F32, 0, nullptr, how);
  const auto norm = fb::CreateRMSNorm(b, 4, 1e-6f, weight);
  const auto name = b.CreateString("norm");
  const auto layer = fb::CreateLayer(b, name, fb::LayerKind::RMSNorm, norm.Union());
  const auto layers = b.CreateVector(std::vector{layer});
  const auto optimizer = b.CreateString("adamw");
  fb::TrainingStateBuilder tb(b);
  tb.add_optimizer(optimizer);
  tb.add_digest(0x1234567890ABCDEFull);
  const auto training = tb.Finish();
  fb::ModelBuilder mb(b);
  mb.add_schema_major(1);
  mb.add_input_dim(4);
  mb.add_layers(layers);
  mb.add_training(training);
  fb::FinishModelBuffer(b, mb.Finish());
  try {
    load_model_buffer(b.GetBufferPointer(), b.GetSize(), "");
    FAIL() << "a schema 1.0 digest was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidModel);
    EXPECT_NE(std::string(e.what()).find("schema 1.0 digest"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moert
