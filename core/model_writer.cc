#include "core/model_writer.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>

#include "core/error.h"
#include "kernels/cpu/math.h"
#include "moert_generated.h"
#include "schemas/saved_files.h"

namespace moert {
namespace {

namespace fs = std::filesystem;
using flatbuffers::FlatBufferBuilder;
using flatbuffers::Offset;

// FlatBuffers offsets are 32-bit; stay clear of the limit instead of letting the builder assert.
constexpr uint64_t kMaxDescription = (uint64_t{1} << 31) - (uint64_t{64} << 20);

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// An array bound for the external data file.
struct Placement {
  const void* data;
  uint64_t bytes;
  uint64_t offset;
};

// Builds the description. Every child object is created in its own statement, in one fixed order,
// before the table that refers to it: nothing is left to the unspecified evaluation order of
// function arguments, so the bytes depend on the content alone.
class DescriptionBuilder {
 public:
  DescriptionBuilder(uint64_t initial_bytes, uint64_t digest)
      : digest_(digest), fbb_(static_cast<size_t>(std::min(initial_bytes, kMaxDescription))) {}

  Offset<fb::Model> model(const Model& m, const TrainingStateView* state,
                          const std::string& data_name) {
    std::vector<Offset<fb::Layer>> layers;
    for (const auto& l : m.layers) layers.push_back(layer(l));
    const auto layer_vec = fbb_.CreateVector(layers);
    const auto name = fbb_.CreateString(m.name);
    Offset<fb::TrainingState> training = 0;
    if (state) training = training_state(*state);
    // The data file's name is known only once every array is placed; it is created last.
    Offset<flatbuffers::String> external = 0;
    if (!external_.empty()) external = fbb_.CreateString(data_name);
    fb::ModelBuilder b(fbb_);
    b.add_schema_major(static_cast<uint16_t>(kSchemaMajor));
    b.add_schema_minor(static_cast<uint16_t>(kSchemaMinor));
    b.add_name(name);
    if (!m.token_input) b.add_input_dim(m.input_width);
    b.add_layers(layer_vec);
    b.add_seed(m.seed);
    if (!external_.empty()) b.add_external_data(external);
    if (state) b.add_training(training);
    return b.Finish();
  }

  std::vector<uint8_t> finish(Offset<fb::Model> root) {
    fbb_.Finish(root, fb::ModelIdentifier());
    if (fbb_.GetSize() > kMaxDescription)
      fail(Code::Unsupported, "the checkpoint's description needs ", fbb_.GetSize() >> 20,
           " MiB, more than one FlatBuffers buffer holds (2 GiB)");
    return {fbb_.GetBufferPointer(), fbb_.GetBufferPointer() + fbb_.GetSize()};
  }

  const std::vector<Placement>& external() const { return external_; }
  uint64_t external_bytes() const { return data_size_; }

 private:
  // Whether an array of `bytes` goes to the data file; if so it is placed there and `ref` set.
  bool place(const void* data, uint64_t bytes, fb::ExternalRef& ref) {
    if (bytes < kExternalMinBytes) return false;
    const uint64_t offset = align_up(data_size_, kExternalAlignment);
    external_.push_back({data, bytes, offset});
    data_size_ = offset + bytes;
    ref = fb::ExternalRef(offset, bytes);
    return true;
  }

  Offset<fb::Tensor> tensor(const Tensor& t) {
    if (!t.present()) return 0;
    if (t.fp8) return fp8_tensor(t);
    const std::vector<uint64_t> dims(t.shape.begin(), t.shape.end());
    const auto shape = fbb_.CreateVector(dims);
    const uint64_t bytes = t.values.size() * sizeof(float);
    fb::ExternalRef ref;
    const bool external = place(t.values.data(), bytes, ref);
    Offset<flatbuffers::Vector<uint8_t>> data = 0;
    if (!external) {
      fbb_.ForceVectorAlignment(bytes, 1, 32);
      data = fbb_.CreateVector(reinterpret_cast<const uint8_t*>(t.values.data()), bytes);
    }
    fb::TensorBuilder b(fbb_);
    b.add_shape(shape);
    b.add_dtype(fb::DType::F32);
    if (external)
      b.add_external(&ref);
    else
      b.add_data(data);
    return b.Finish();
  }

  // A resident FP8 tensor as it was read: its codes, and its block scales without the padding
  // of each row that the resident layout adds.
  Offset<fb::Tensor> fp8_tensor(const Tensor& t) {
    const Fp8Blocks& q = *t.fp8;
    const std::vector<uint64_t> dims(t.shape.begin(), t.shape.end());
    const auto shape = fbb_.CreateVector(dims);
    const int64_t col_blocks = fp8::blocks_of(q.cols), ld = q.scale_ld();
    const int64_t scale_rows = q.matrices * fp8::blocks_of(q.rows);
    std::vector<float> compact(static_cast<size_t>(scale_rows * col_blocks));
    for (int64_t r = 0; r < scale_rows; ++r)
      std::copy_n(q.scales.begin() + r * ld, col_blocks, compact.begin() + r * col_blocks);
    const auto scale_vec = fbb_.CreateVector(compact);
    const auto scales = fb::CreateBlockScales(fbb_, static_cast<uint32_t>(fp8::kBlock),
                                              static_cast<uint32_t>(fp8::kBlock), scale_vec);
    const uint64_t bytes = q.codes.size();
    fb::ExternalRef ref;
    const bool external = place(q.codes.data(), bytes, ref);
    Offset<flatbuffers::Vector<uint8_t>> data = 0;
    if (!external) {
      fbb_.ForceVectorAlignment(bytes, 1, 32);
      data = fbb_.CreateVector(q.codes.data(), bytes);
    }
    fb::TensorBuilder b(fbb_);
    b.add_shape(shape);
    b.add_dtype(fb::DType::F8E4M3);
    if (external)
      b.add_external(&ref);
    else
      b.add_data(data);
    b.add_scales(scales);
    return b.Finish();
  }

  Offset<fb::Layer> layer(const LayerSpec& l) {
    const auto name = fbb_.CreateString(l.name);
    fb::LayerKind type = fb::LayerKind::NONE;
    Offset<void> body;
    std::visit(
        [&](const auto& s) {
          using S = std::decay_t<decltype(s)>;
          if constexpr (std::is_same_v<S, EmbeddingSpec>) {
            const auto w = tensor(s.weight);
            body = fb::CreateEmbedding(fbb_, s.vocab_size, s.dim, s.context, w).Union();
            type = fb::LayerKind::Embedding;
          } else if constexpr (std::is_same_v<S, RMSNormSpec>) {
            const auto w = tensor(s.weight);
            body = fb::CreateRMSNorm(fbb_, s.dim, s.eps, w).Union();
            type = fb::LayerKind::RMSNorm;
          } else if constexpr (std::is_same_v<S, DenseFFNSpec>) {
            const auto w1 = tensor(s.w1);
            const auto w3 = tensor(s.w3);
            const auto w2 = tensor(s.w2);
            body = fb::CreateDenseFFN(fbb_, s.dim, s.hidden, s.residual, w1, w3, w2).Union();
            type = fb::LayerKind::DenseFFN;
          } else if constexpr (std::is_same_v<S, MoESpec>) {
            const BalancingSpec& b = s.balancing;
            // Written where the loader needs it, and wherever it is not 0 (as before it became
            // optional): a file's bytes stay those of its content.
            const bool alpha = b.policy == BalancingPolicy::AuxLoss ||
                               b.policy == BalancingPolicy::SequenceAuxLoss || b.aux_alpha != 0.0f;
            const auto bal = fb::CreateBalancing(
                fbb_, static_cast<fb::BalancingPolicy>(static_cast<int>(b.policy)),
                b.bias_update_rate, b.bias_centering, b.bias_frozen,
                alpha ? flatbuffers::Optional<float>(b.aux_alpha) : flatbuffers::nullopt,
                b.capacity_factor);
            const auto gate = tensor(s.gate);
            const auto bias = tensor(s.gate_bias);
            const auto w1 = tensor(s.w1);
            const auto w3 = tensor(s.w3);
            const auto w2 = tensor(s.w2);
            const auto sw1 = tensor(s.shared_w1);
            const auto sw3 = tensor(s.shared_w3);
            const auto sw2 = tensor(s.shared_w2);
            const RouterConfig& r = s.router;
            const auto score = r.score == ScoreFunction::Sigmoid ? fb::ScoreFunction::Sigmoid
                                                                 : fb::ScoreFunction::Softmax;
            body = fb::CreateMoE(fbb_, s.dim, r.num_experts, r.top_k, s.expert_hidden, score,
                                 r.num_groups, r.topk_groups, r.normalize, r.scaling, s.num_shared,
                                 s.shared_hidden, s.residual, bal, gate, bias, w1, w3, w2, sw1, sw3,
                                 sw2)
                       .Union();
            type = fb::LayerKind::MoE;
          } else {
            const auto w = tensor(s.weight);
            const auto b = tensor(s.bias);
            body = fb::CreateOutputHead(fbb_, s.dim, s.vocab_size, w, b).Union();
            type = fb::LayerKind::OutputHead;
          }
        },
        l.spec);
    return fb::CreateLayer(fbb_, name, type, body);
  }

  // An optimizer-state vector: inline, or placed in the data file.
  struct StateVector {
    Offset<flatbuffers::Vector<float>> inline_values = 0;
    bool external = false;
    fb::ExternalRef ref;
  };
  StateVector state_vector(std::span<const float> v) {
    StateVector out;
    if (v.empty()) return out;
    out.external = place(v.data(), v.size_bytes(), out.ref);
    if (!out.external) out.inline_values = fbb_.CreateVector(v.data(), v.size());
    return out;
  }

  Offset<fb::ParamState> param_state(const ParamStateView& p) {
    const auto name = fbb_.CreateString(p.name.data(), p.name.size());
    const StateVector grad = state_vector(p.grad);
    const StateVector m = state_vector(p.m);
    const StateVector v = state_vector(p.v);
    fb::ParamStateBuilder b(fbb_);
    b.add_name(name);
    if (grad.external) b.add_grad_external(&grad.ref);
    if (!grad.inline_values.IsNull()) b.add_grad(grad.inline_values);
    if (m.external) b.add_m_external(&m.ref);
    if (!m.inline_values.IsNull()) b.add_m(m.inline_values);
    if (v.external) b.add_v_external(&v.ref);
    if (!v.inline_values.IsNull()) b.add_v(v.inline_values);
    return b.Finish();
  }

  Offset<fb::TrainingState> training_state(const TrainingStateView& t) {
    std::vector<Offset<fb::ParamState>> params;
    for (const auto& p : t.params) params.push_back(param_state(p));
    const auto param_vec = fbb_.CreateVector(params);
    std::vector<Offset<fb::LayerBalanceState>> layers;
    for (const auto& l : t.layers) {
      const auto counts = fbb_.CreateVector(l.step_counts);
      layers.push_back(fb::CreateLayerBalanceState(fbb_, l.layer, counts, l.gamma, l.frozen));
    }
    const auto layer_vec = fbb_.CreateVector(layers);
    const auto rng = fbb_.CreateVector(t.rng.data(), t.rng.size());
    const auto optimizer = fbb_.CreateString(t.optimizer.data(), t.optimizer.size());
    fb::TrainingStateBuilder b(fbb_);
    b.add_step(t.step);
    b.add_micro_batches(t.micro_batches);
    b.add_rng(rng);
    b.add_optimizer(optimizer);
    b.add_params(param_vec);
    b.add_layers(layer_vec);
    b.add_content_digest(digest_);
    return b.Finish();
  }

  uint64_t digest_;
  FlatBufferBuilder fbb_;
  std::vector<Placement> external_;
  uint64_t data_size_ = 0;
};

// `kind`: what the file is ("checkpoint", "model"); `step`: what failed.
[[noreturn]] void io_failure(const char* kind, const std::string& path, const char* step, int err) {
  fail(Code::Io, "cannot write ", kind, " '", path, "': ", step, ": ", std::strerror(err));
}

// Six characters that make a temporary name unlikely to exist already.
std::string unique_suffix(uint64_t attempt) {
  static std::atomic<uint64_t> counter{0};
  uint64_t x = (static_cast<uint64_t>(::getpid()) << 32) ^ counter.fetch_add(1) ^
               static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
               (attempt * 0x9E3779B97F4A7C15ull);
  x = (x ^ (x >> 31)) * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  static const char digits[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  std::string out(6, '0');
  for (char& c : out) {
    c = digits[x % 62];
    x /= 62;
  }
  return out;
}

// A write past the process's file size limit (RLIMIT_FSIZE: `ulimit -f`, systemd's LimitFSIZE)
// raises SIGXFSZ at the writing thread, whose default action ends the host process. For the
// scope this thread blocks it: such a write fails with EFBIG instead. After a refused write the
// signal it left pending is taken back; one that another process sent (kill -XFSZ) meanwhile is
// sent again, to the process, so that the host still gets it.
class NoFileSizeSignal {
 public:
  NoFileSizeSignal() {
    sigemptyset(&xfsz_);
    sigaddset(&xfsz_, SIGXFSZ);
    pthread_sigmask(SIG_BLOCK, &xfsz_, &saved_);
  }
  ~NoFileSizeSignal() {
    siginfo_t info{};
    const timespec now{0, 0};
    // The kernel sends the limit's signal as from the writing process itself.
    if (refused_ && sigtimedwait(&xfsz_, &info, &now) == SIGXFSZ &&
        !(info.si_code == SI_USER && info.si_pid == ::getpid()))
      ::kill(::getpid(), SIGXFSZ);
    pthread_sigmask(SIG_SETMASK, &saved_, nullptr);
  }
  // A write failed with EFBIG: its signal is pending.
  void refused() { refused_ = true; }
  NoFileSizeSignal(const NoFileSizeSignal&) = delete;
  NoFileSizeSignal& operator=(const NoFileSizeSignal&) = delete;

 private:
  sigset_t xfsz_, saved_;
  bool refused_ = false;
};

// A file written under a temporary name in the destination's directory, then renamed into place.
// Created like any file (mode 0666 less the umask), not with mkstemp's 0600: a checkpoint is a
// model that other users' processes may be meant to read. Its writer holds it under flock until
// it is renamed, so that another save's clean-up knows it is not a killed save's leftover
// (format::held_by_a_writer).
class TempFile {
 public:
  TempFile(const fs::path& dir, const std::string& prefix, std::string destination,
           const char* kind)
      : destination_(std::move(destination)), kind_(kind) {
    for (uint64_t attempt = 0; fd() < 0; ++attempt) {
      name_ = (dir / (prefix + unique_suffix(attempt))).string();
      file_.emplace(name_.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0666);
      if (fd() < 0 && (errno != EEXIST || attempt == 100))
        io_failure(kind_, destination_, "cannot create a temporary file", errno);
    }
    // Where the file system cannot lock, clean-ups take it for a leftover, as before.
    while (::flock(fd(), LOCK_EX | LOCK_NB) != 0 && errno == EINTR) {
    }
  }
  ~TempFile() {
    file_.reset();
    if (!renamed_) ::unlink(name_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  void write(const void* data, uint64_t bytes) {
    NoFileSizeSignal no_sigxfsz;
    const auto* p = static_cast<const char*>(data);
    while (bytes > 0) {
      // One write() moves at most about 2 GiB.
      const size_t chunk = static_cast<size_t>(std::min<uint64_t>(bytes, uint64_t{1} << 30));
      const ssize_t n = ::write(fd(), p, chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EFBIG) no_sigxfsz.refused();
      if (n <= 0) io_failure(kind_, destination_, "write", n < 0 ? errno : EIO);
      p += n;
      bytes -= static_cast<uint64_t>(n);
    }
  }

  // Makes the content durable: before the directory lock is taken, whose holders wait on it.
  void sync() {
    if (!synced_ && ::fsync(fd()) != 0) io_failure(kind_, destination_, "fsync", errno);
    synced_ = true;
  }

  // sync, rename over `target`, close: renamed while still open, so that its lock lasts as long
  // as its temporary name. A failed close after the rename is not reported: the content was
  // already durable, and the file at `target` is whole (a report would have the caller undo a
  // save that took place).
  void commit(const std::string& target) {
    sync();
    if (::rename(name_.c_str(), target.c_str()) != 0)
      io_failure(kind_, destination_, "rename", errno);
    renamed_ = true;
    file_.reset();
  }

 private:
  std::string destination_;
  const char* kind_;
  std::string name_;
  int fd() const { return file_ ? file_->fd() : -1; }

  // Its copy in a child of fork() is closed at the fork: the child does not hold its lock.
  std::optional<format::ForkClosedFd> file_;
  bool synced_ = false;
  bool renamed_ = false;
};

// Makes the renames in `dir` durable.
void sync_directory(const fs::path& dir) {
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

fs::path directory_of(const fs::path& target) {
  return target.has_parent_path() ? target.parent_path() : fs::path(".");
}

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// Removes the data files of earlier checkpoints at `file` (all but `keep`) that no description in
// `dir` still names, and temporary files that killed saves left. Failures are ignored: the new
// checkpoint is already in place.
void remove_stale(const fs::path& dir, const std::string& file, const std::string& keep) {
  format::remove_unnamed_data_files(dir, file, keep);
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  std::vector<std::string> doomed;
  try {
    while (const dirent* e = ::readdir(d))
      if (format::is_save_temporary_of(e->d_name, file)) doomed.emplace_back(e->d_name);
  } catch (...) {
    // Memory: the temporary files stay until the next save.
  }
  ::closedir(d);
  for (const auto& name : doomed)
    if (!format::held_by_a_writer(dir / name)) ::unlink((dir / name).c_str());
}

// Fails when another process held the directory's lock past its patience (a save stopped or
// stuck inside its commit), naming the directory.
void check_lock(const format::DirectoryLock& lock, const fs::path& dir, const std::string& path,
                const char* what) {
  if (lock.timed_out())
    fail(Code::Io, "cannot write ", what, " '", path,
         "': another save, import or export has held the lock of directory '", dir.string(),
         "' for ", format::DirectoryLock::kPatience.count() / 1000,
         " s (a process stopped or stuck there?); "
         "nothing was replaced");
}

}  // namespace

namespace {

// Fails (Numeric) when a value the file would hold is a NaN or an infinity, naming it.
void refuse_nonfinite(const std::string& path, const char* what, const Model& model,
                      const TrainingStateView* state) {
  auto check = [&](std::span<const float> v, const auto&... name) {
    const int64_t at = cpu::first_nonfinite(v.data(), static_cast<int64_t>(v.size()));
    if (at >= 0)
      fail(Code::Numeric, "cannot write ", what, " '", path, "': ", name...,
           " holds a NaN or infinity at element ", at, "; nothing was written");
  };
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const LayerSpec& l = model.layers[i];
    visit_tensors(l, [&](const char* field, const Tensor& t) {
      if (!t.fp8) check(t.values, "layer ", i, " ('", l.name, "') field '", field, "'");
    });
    if (const auto* m = std::get_if<MoESpec>(&l.spec))
      check(m->gate_bias.values, "layer ", i, " ('", l.name, "') field 'gate_bias'");
  }
  if (!state) return;
  for (const auto& p : state->params) {
    check(p.grad, "the gradient of '", p.name, "'");
    check(p.m, "the optimizer's first moment of '", p.name, "'");
    check(p.v, "the optimizer's second moment of '", p.name, "'");
  }
}

// Fails (InvalidArgument) when a name this save creates beside `file` would pass the file
// system's limit: the data file "<file>.<16 hex digits>.data" adds 22 bytes to the name, the
// temporary description ".<file>.tmp-XXXXXX" 12. Said before anything is written, rather than as
// "File name too long" from a rename after the data file was.
void refuse_long_names(const fs::path& dir, const std::string& file, const std::string& path,
                       const char* what, bool data_file) {
  const long limit = ::pathconf(dir.c_str(), _PC_NAME_MAX);
  if (limit <= 0) return;  // no such directory, or no limit: the writing says what is wrong
  const uint64_t added = data_file ? 22 : 12;
  if (file.size() + added > static_cast<uint64_t>(limit))
    fail(Code::InvalidArgument, "cannot write ", what, " '", path, "': its file name is ",
         file.size(), " bytes and the ", data_file ? "data file" : "temporary file",
         " written beside it adds ", added, ", past this file system's ", limit,
         " (a name of at most ", static_cast<uint64_t>(limit) - added, " bytes fits)");
}

// write_checkpoint and write_model: `state` null for a model file.
void write_description(const std::string& path, const Model& model,
                       const TrainingStateView* state) {
  const fs::path target(path);
  const fs::path dir = directory_of(target);
  const std::string file = target.filename().string();
  const char* what = state ? "checkpoint" : "model";
  if (file.empty()) fail(Code::InvalidArgument, what, " path '", path, "' names no file");
  // Refused before anything is written: the data file would otherwise be left beside it.
  std::error_code ec;
  if (fs::is_directory(target, ec))
    fail(Code::InvalidArgument, "cannot write ", what, " '", path,
         "': it is a directory (name a file in it)");
  // The rename at the end replaces what the path names: a device or a FIFO would be lost (as
  // root, /dev/full became a regular file).
  if (const fs::file_status st = fs::status(target, ec); fs::exists(st) && !fs::is_regular_file(st))
    fail(Code::InvalidArgument, "cannot write ", what, " '", path,
         "': it exists and is not a regular file (a save replaces only a regular file)");
  // The rename replaces a symbolic link itself, not what it points to: a "latest" link would
  // silently become a file of its own.
  if (fs::is_symlink(fs::symlink_status(target, ec)))
    fail(Code::InvalidArgument, "cannot write ", what, " '", path,
         "': it is a symbolic link, which the save would replace by a file (name the link's "
         "target, or remove the link first)");
  // What the loader would refuse is not written: a file that cannot be loaded back loses the
  // work it was meant to keep.
  refuse_nonfinite(path, what, model, state);

  uint64_t digest = 0;
  if (state) {
    digest = checkpoint_digest(model, *state);
  } else {
    ContentHasher h;
    hash_model(h, model);
    digest = h.digest();
  }
  const std::string data_name = cat(file, ".", hex16(digest), ".data");

  // What stays inline, with room for the tables around it: the builder must never reach 2 GiB.
  // An FP8 tensor's block scales always stay inline (the schema has them nowhere else).
  uint64_t inline_bytes = uint64_t{1} << 16;
  auto count = [&](uint64_t bytes) {
    if (bytes < kExternalMinBytes) inline_bytes += bytes + 256;
  };
  for (const auto& l : model.layers) {
    visit_tensors(l, [&](const char*, const Tensor& t) {
      if (!t.fp8) return count(t.values.size() * 4);
      count(t.fp8->codes.size());
      inline_bytes += t.fp8->scales.size() * sizeof(float) + 256;
    });
    if (const auto* m = std::get_if<MoESpec>(&l.spec)) count(m->gate_bias.values.size() * 4);
  }
  if (state) {
    for (const auto& p : state->params) {
      count(p.grad.size_bytes());
      count(p.m.size_bytes());
      count(p.v.size_bytes());
    }
    for (const auto& l : state->layers) inline_bytes += l.step_counts.size() * 8 + 64;
  }
  if (inline_bytes > kMaxDescription)
    fail(Code::Unsupported, "the ", what, "'s description would need ", inline_bytes >> 20,
         " MiB of small arrays, more than one FlatBuffers buffer holds (2 GiB)");
  DescriptionBuilder builder(inline_bytes, digest);
  const auto root = builder.model(model, state, data_name);
  const std::vector<uint8_t> description = builder.finish(root);
  refuse_long_names(dir, file, path, what, !builder.external().empty());

  // The data file, which may take minutes, is written outside the directory lock (a save then
  // holds it only while it commits, and a bounded wait for it is enough), under a temporary name
  // created under it: a clean-up would otherwise be able to find it before its writer locks it.
  std::optional<TempFile> data;
  if (!builder.external().empty()) {
    {
      const format::DirectoryLock lock(dir);
      check_lock(lock, dir, path, what);
      data.emplace(dir, "." + file + ".data-", path, what);
    }
    static const char zeros[kExternalAlignment] = {};
    uint64_t at = 0;
    for (const Placement& p : builder.external()) {
      data->write(zeros, p.offset - at);
      data->write(p.data, p.bytes);
      at = p.offset + p.bytes;
    }
    data->sync();
  }
  const format::DirectoryLock lock(dir);
  check_lock(lock, dir, path, what);
  // The data file is named by its content: an earlier checkpoint with the same content may
  // already use it, and then it must stay whatever happens to this save.
  const fs::path data_path = dir / data_name;
  const bool data_existed = data && fs::exists(data_path, ec);
  if (data) {
    data->commit(data_path.string());
    sync_directory(dir);
  }
  try {
    write_file_atomically(path, description, what);
  } catch (...) {
    // No description refers to a data file this save created.
    if (!builder.external().empty() && !data_existed) ::unlink(data_path.c_str());
    throw;
  }
  remove_stale(dir, file, builder.external().empty() ? "" : data_name);
}

}  // namespace

void write_checkpoint(const std::string& path, const Model& model, const TrainingStateView& state) {
  write_description(path, model, &state);
}

void write_model(const std::string& path, const Model& model) {
  model.require_weights("be saved");
  write_description(path, model, nullptr);
}

void write_file_atomically(const std::string& path, const std::vector<uint8_t>& bytes,
                           const char* kind) {
  const fs::path target(path);
  const fs::path dir = directory_of(target);
  // Appended piece by piece: GCC 12 at -O3 warns falsely (-Wrestrict) on the chained operator+.
  std::string prefix = ".";
  prefix.append(target.filename().string());
  prefix.append(".tmp-");
  TempFile tmp(dir, prefix, path, kind);
  tmp.write(bytes.data(), bytes.size());
  tmp.commit(path);
  sync_directory(dir);
}

}  // namespace moert
