// Among ranks, what must be the same on every rank before a step changes the replicas: the
// micro-batches counted, the training settings, and the tensors written directly. Each of these
// is local to a rank (zero_grad, set_config, set_parameter, ...), and a rank that differed would
// move its replicated parameters away from the others' for good; the checkpoint's save would
// only find out later.
#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "core/content_digest.h"
#include "core/parallel.h"
#include "core/session.h"

namespace moert {

// A field added to TrainingConfig must join fields() too (the ranks' settings digest): the
// listed fields, each padded to 8 bytes, must fill the struct.
template <typename... T>
constexpr size_t padded_size(std::tuple<T...>*) {
  return (((sizeof(std::remove_cvref_t<T>) + 7) / 8 * 8) + ...);
}
static_assert(
    sizeof(TrainingConfig) ==
        padded_size(
            static_cast<decltype(std::declval<const TrainingConfig&>().fields())*>(nullptr)),
    "TrainingConfig has a field that TrainingConfig::fields() does not list");

namespace {

// What every rank creates its session with: each word's name, and how its value is shown
// (not at all for digests). Word 0 is set by a rank that refused its own arguments.
enum class Show { No, Integer, Real };
struct StartField {
  const char* name;
  Show show;
};
// The training settings' words, in the order of TrainingConfig::fields(), named as the session
// options that set them.
constexpr size_t kFirstTrainingWord = 12, kTrainingWords = 12;
static_assert(std::tuple_size_v<decltype(std::declval<const TrainingConfig&>().fields())> ==
                  kTrainingWords,
              "a training setting without its word in kStartFields");
constexpr std::array<StartField, Session::kStartWords> kStartFields{{
    {"a refusal", Show::No},
    {"the expert-parallel size", Show::Integer},
    {"the mode (0 inference, 1 training)", Show::Integer},
    {"the precision (0 fp32, 1 bf16, 2 fp8)", Show::Integer},
    {"fp8_scales (1: ue8m0)", Show::Integer},
    {"the device (0 CPU, 1 CUDA)", Show::Integer},
    {"ep_chunks", Show::Integer},
    {"ep_overlap", Show::Integer},
    {"aux_loss_scope (1: global)", Show::Integer},
    {"the seed", Show::Integer},
    {"check_finite", Show::Integer},
    {"layout_copies (0 auto, 1 on, 2 off)", Show::Integer},
    {"another optimizer", Show::No},
    {"lr", Show::Real},
    {"weight_decay", Show::Real},
    {"beta1", Show::Real},
    {"beta2", Show::Real},
    {"eps", Show::Real},
    {"momentum", Show::Real},
    {"clip_norm", Show::Real},
    {"warmup_steps", Show::Integer},
    {"total_steps", Show::Integer},
    {"min_lr", Show::Real},
    {"sequence_length", Show::Integer},
    {"another model (its layers, tensors or values)", Show::No},
}};
static_assert(kFirstTrainingWord + kTrainingWords + 1 == Session::kStartWords);

// A real setting, from its word: 0.001 and 0.0010000000000000002 must not both read "0.001".
std::string real_text(uint64_t bits) { return exact_text(std::bit_cast<double>(bits)); }

// A setting as one word: a double's bits, an integer, a string's digest.
template <typename T>
uint64_t setting_word(const T& v) {
  if constexpr (std::is_same_v<T, std::string>) {
    ContentHasher h;
    h.str(v);
    return h.digest();
  } else if constexpr (std::is_same_v<T, double>) {
    return std::bit_cast<uint64_t>(v);
  } else {
    return static_cast<uint64_t>(v);
  }
}

// Every training setting as a word, in the order of TrainingConfig::fields(): compared one by one
// when sessions are created, and as one digest before each step.
std::array<uint64_t, kTrainingWords> training_words(const TrainingConfig& t) {
  std::array<uint64_t, kTrainingWords> words{};
  size_t i = 0;
  std::apply([&](const auto&... field) { ((words[i++] = setting_word(field)), ...); }, t.fields());
  return words;
}

}  // namespace

void Session::agree_to_start(Communicator& world, const StartWords& mine) {
  const int size = world.size();
  // In the shape of every call's agreement: a rank still in another call (a forward of a session
  // made before) meets this one by name, and the communicator stays whole.
  CallRecord record;
  std::strncpy(record.call, "session creation", sizeof(record.call) - 1);
  static_assert(sizeof(StartWords) <= sizeof(record.message));
  std::memcpy(record.message, mine.data(), sizeof(StartWords));
  const std::vector<CallRecord> records = gather_call_records(world, record);
  std::vector<StartWords> all(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r)
    std::memcpy(all[r].data(), records[static_cast<size_t>(r)].message, sizeof(StartWords));
  const char* why =
      ": the ranks of a job create their sessions from the same model and options (threads "
      "aside); no session was created on any rank";
  // Every rank reads the same words in the same order, so every rank refuses alike.
  for (int r = 0; r < size; ++r)
    if (all[r][0] != 0)
      fail(Code::InvalidArgument, "rank ", r, " of ", size,
           " passed a bad argument to its session's creation (its own status names it); no "
           "session was created on any rank");
  for (int r = 1; r < size; ++r)
    for (size_t i = 1; i < kStartWords; ++i) {
      if (all[r][i] == all[0][i]) continue;
      if (kStartFields[i].show == Show::Real)
        fail(Code::InvalidArgument, "rank ", r, " of ", size, " creates its session with ",
             kStartFields[i].name, " ", real_text(all[r][i]), " and rank 0 with ",
             real_text(all[0][i]), why);
      if (kStartFields[i].show == Show::Integer)
        fail(Code::InvalidArgument, "rank ", r, " of ", size, " creates its session with ",
             kStartFields[i].name, " ", all[r][i], " and rank 0 with ", all[0][i], why);
      fail(Code::InvalidArgument, "rank ", r, " of ", size, " creates its session with ",
           kStartFields[i].name, " than rank 0", why);
    }
}

void Session::check_ranks_agree_to_start(Communicator& world) const {
  const bool training = options_.mode == Mode::Training;
  const Precision precision = options_.effective_precision();
  ContentHasher model;
  hash_model(model, *model_);
  // What does not change the computation is not compared: training settings of an inference
  // session, the FP8 scale rule of another precision.
  StartWords mine{
      0,
      static_cast<uint64_t>(options_.expert_parallel),
      static_cast<uint64_t>(options_.mode),
      static_cast<uint64_t>(precision),
      precision == Precision::Fp8 ? static_cast<uint64_t>(options_.fp8.power_of_two_scales) : 0,
      static_cast<uint64_t>(options_.device),
      static_cast<uint64_t>(options_.ep_chunks),
      static_cast<uint64_t>(options_.ep_overlap),
      static_cast<uint64_t>(options_.global_aux),
      options_.seed,
      static_cast<uint64_t>(options_.check_finite),
      static_cast<uint64_t>(options_.layouts),
  };
  if (training) {
    const auto words = training_words(options_.training);
    std::copy(words.begin(), words.end(), mine.begin() + kFirstTrainingWord);
  }
  mine[kStartWords - 1] = model.digest();
  agree_to_start(world, mine);
}

void Session::refuse_creation(const SessionOptions& options) {
  const std::shared_ptr<Communicator>& world = options.comm;
  // Where creating would have met the others first: the same all-gather, marked refused.
  if (!world || world->size() < 2 || world->memory() != CommMemory::Host) return;
  StartWords refused{};
  refused[0] = 1;
  try {
    agree_to_start(*world, refused);
  } catch (const Error&) {
    // This rank's own error is the caller's to throw.
  }
}

uint64_t Session::training_settings_digest() const {
  ContentHasher settings;
  for (uint64_t w : training_words(options_.training)) settings.u64(w);
  return settings.digest();
}

uint64_t Session::pass_settings() const {
  // check_finite too: creation compares it, and a rank that stopped checking would let a NaN
  // into collectives the others refuse to start.
  return static_cast<uint64_t>(eval_) | static_cast<uint64_t>(options_.ep_overlap) << 1 |
         static_cast<uint64_t>(options_.check_finite) << 2 |
         static_cast<uint64_t>(options_.ep_chunks) << 3;
}

void Session::note_written(Written what, size_t index, const float* in, uint64_t len) {
  if (!par_) return;
  ContentHasher h;
  h.floats({in, static_cast<size_t>(len)});
  written_[{what, index}] = h.digest();
}

void Session::check_ranks_agree_to_step() {
  ContentHasher settings;
  settings.u64(training_settings_digest());
  settings.u8(options_.global_aux);
  for (const Balance& b : balance_) {
    settings.f32(b.gamma);
    settings.u8(b.frozen);
  }
  // Which tensors were written goes with the replicated state (every rank holds every slot and
  // layer); what an expert shard's tensor was given, with that shard's.
  ContentHasher replicated, shard;
  for (const auto& [key, digest] : written_) {
    const auto [what, index] = key;
    const bool expert = what != Written::Bias && expert_count(slots_[index]) > 0;
    replicated.u8(static_cast<uint8_t>(what));
    replicated.u64(index);
    (expert ? shard : replicated).u64(digest);
  }
  enum { kMicroBatches, kSettings, kReplicated, kShard, kWords };
  std::array<uint64_t, kWords> mine{};
  mine[kMicroBatches] = micro_batches_;
  mine[kSettings] = settings.digest();
  mine[kReplicated] = replicated.digest();
  mine[kShard] = shard.digest();
  const int size = par_->size();
  std::vector<std::array<uint64_t, kWords>> all(static_cast<size_t>(size));
  par_->host().all_gather(mine.data(), sizeof(mine), all.data());
  // Every rank reads the same words in the same order, so every rank refuses alike.
  for (int r = 1; r < size; ++r) {
    const auto& a = all[static_cast<size_t>(r)];
    if (a[kMicroBatches] != all[0][kMicroBatches])
      fail(Code::InvalidState, "rank ", r, " of ", size, " accumulated ", a[kMicroBatches],
           " micro-batches since its zero_grad and rank 0 ", all[0][kMicroBatches],
           ": every rank calls zero_grad, its backwards and step together");
    if (a[kSettings] != all[0][kSettings])
      fail(Code::InvalidState, "rank ", r, " of ", size,
           " has other training settings than rank 0 (set_config, set_bias_update_rate or "
           "set_bias_frozen called on some ranks only): every rank makes the same calls");
    if (a[kReplicated] != all[0][kReplicated])
      fail(Code::InvalidState, "rank ", r, " of ", size,
           " wrote other tensors since the last step than rank 0, or other values into a "
           "replicated one (set_parameter, set_gradient or set_expert_bias called on some ranks "
           "only, or with other values): every rank writes the same tensors, with the same "
           "values but in its own expert shard");
    const int first = r % par_->ep();  // the first replica of rank r's expert shard
    if (first != r && a[kShard] != all[static_cast<size_t>(first)][kShard])
      fail(Code::InvalidState, "rank ", r, " of ", size,
           " wrote other values into its expert shard since the last step than rank ", first,
           ", another replica of the same shard (set_parameter or set_gradient on a routed "
           "expert tensor): write the same values on every replica of a shard");
  }
  written_.clear();
}

}  // namespace moert
