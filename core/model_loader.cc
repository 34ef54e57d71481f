#include "core/model_loader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#if __has_include(<linux/openat2.h>)
#include <linux/openat2.h>
#else
#undef SYS_openat2  // no struct open_how to call it with: the /proc way only
#endif

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "core/content_digest.h"
#include "core/error.h"
#include "core/model_writer.h"
#include "core/tensor_codec.h"
#include "kernels/cpu/math.h"
#include "kernels/fp8_rules.h"
#include "moert_generated.h"
#include "schemas/saved_files.h"

namespace moert {
namespace {

// Keeps `fd` when it is a regular file, made blocking again, else closes it and fails (Io) naming
// `path` as `what`. Its size goes to *size.
int regular_file(int fd, const std::string& path, const char* what, uint64_t* size) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(Code::Io, what, " '", path, "' is not a regular file");
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd);
    fail(Code::Io, "cannot read ", what, " '", path, "': ", std::strerror(err));
  }
  *size = static_cast<uint64_t>(st.st_size);
  return fd;
}

// Opens `rel`, relative to the directory `dir` (AT_FDCWD: the working directory), for reading
// when it is a regular file, else fails (Io) naming it `path` as `what`. The open does not block:
// a FIFO with no writer (or a device that waits) is refused at once instead of hanging the
// caller. Returns the descriptor; its size goes to *size.
int open_regular_file_at(int dir, const std::string& rel, const std::string& path, const char* what,
                         uint64_t* size) {
  const int fd = ::openat(dir, rel.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(Code::Io, "cannot open ", what, " '", path, "': ", std::strerror(errno));
  return regular_file(fd, path, what, size);
}

int open_regular_file(const std::string& path, const char* what, uint64_t* size) {
  return open_regular_file_at(AT_FDCWD, path, path, what, size);
}

// A descriptor closed on every way out, a thrown bad_alloc included.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  int release() { return std::exchange(fd, -1); }
};

// FlatBuffers offsets are 32-bit: nothing larger can be a valid buffer.
constexpr size_t kMaxBufferSize = size_t{1} << 31;
// The most token-expert assignments a checkpoint may have counted in one layer during one step:
// the largest integer a double holds exactly, so that the bias update's mean and sign and MaxVio
// are exact, and about 10^8 times what one DeepSeek-V3 step counts (15M tokens x 8 experts).
constexpr int64_t kMaxStepAssignments = int64_t{1} << 53;
// External optimizer state that a model load verifies without keeping is read in pieces this big.
constexpr uint64_t kStreamChunkFloats = uint64_t{4} << 20;
// External fp32 arrays are read in pieces this big, each checked (and hashed) while it is still in
// cache: one pass over memory instead of three.
constexpr uint64_t kCachePieceFloats = uint64_t{256} << 10;

// What the loader does with a checkpoint's training state.
enum class StatePolicy {
  Verify,     // a model load: read and check every value and the digest, keep nothing
  Keep,       // a session's checkpoint load: check, and keep it in Model::training
  Recompute,  // fuzzing: as Verify, but only compute the digest
};

uint64_t sat_add(uint64_t a, uint64_t b) {
  uint64_t r;
  return __builtin_add_overflow(a, b, &r) ? std::numeric_limits<uint64_t>::max() : r;
}

uint64_t sat_mul(uint64_t a, uint64_t b) {
  uint64_t r;
  return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<uint64_t>::max() : r;
}

// "8589934592 bytes (8.00 GiB)".
std::string bytes_str(uint64_t b) {
  char buf[64];
  if (b >= (uint64_t{1} << 30))
    std::snprintf(buf, sizeof buf, "%" PRIu64 " bytes (%.2f GiB)", b,
                  static_cast<double>(b) / static_cast<double>(uint64_t{1} << 30));
  else if (b >= (uint64_t{1} << 20))
    std::snprintf(buf, sizeof buf, "%" PRIu64 " bytes (%.2f MiB)", b,
                  static_cast<double>(b) / static_cast<double>(uint64_t{1} << 20));
  else
    std::snprintf(buf, sizeof buf, "%" PRIu64 " bytes", b);
  return buf;
}

constexpr const char* kConfineAdvice =
    " (the load option confine_external_data refuses it; content stores such as the Hugging Face "
    "cache link each file from elsewhere and need it off)";

// Refuses the data file `path` whose links lead to `target` (empty: unknown), outside `root`.
[[noreturn]] void refuse_outside(const std::string& path, const std::string& root,
                                 const std::filesystem::path& target) {
  if (target.empty())
    fail(Code::InvalidModel, "model: external weight file '", path,
         "' leaves the model's directory '", root, "' once its symbolic links are followed",
         kConfineAdvice);
  fail(Code::InvalidModel, "model: external weight file '", path, "' is '", target.string(),
       "' once its symbolic links are followed, outside the model's directory '", root, "'",
       kConfineAdvice);
}

// Whether `file` lies inside the directory `root`, both resolved.
bool lies_inside(const std::filesystem::path& root, const std::filesystem::path& file) {
  const auto [r, f] = std::mismatch(root.begin(), root.end(), file.begin(), file.end());
  return r == root.end() && f != file.end();
}

}  // namespace

int open_directory(const std::string& root) {
  const int dir = ::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0)
    fail(Code::Io, "cannot open the model's directory '", root, "': ", std::strerror(errno));
  return dir;
}

namespace {

// Whether the directory `dir` is the process's root directory, on the same mount. False where the
// kernel cannot say (statx without mount IDs, before Linux 5.8).
bool is_process_root(int dir) {
  struct statx d {
  }, r{};
  if (::statx(dir, "", AT_EMPTY_PATH, STATX_INO | STATX_MNT_ID, &d) != 0 ||
      ::statx(AT_FDCWD, "/", 0, STATX_INO | STATX_MNT_ID, &r) != 0)
    return false;
  if (!(d.stx_mask & r.stx_mask & STATX_MNT_ID)) return false;
  return d.stx_mnt_id == r.stx_mnt_id && d.stx_ino == r.stx_ino &&
         d.stx_dev_major == r.stx_dev_major && d.stx_dev_minor == r.stx_dev_minor;
}

}  // namespace

int open_confined(int dir, const std::string& root, const std::string& rel, uint64_t* size,
                  bool use_openat2) {
  namespace fs = std::filesystem;
  const std::string path = (fs::path(root) / rel).string();
  // Everything lies inside the process's root directory, which the kernel's rule against
  // absolute links would refuse to leave. Known by identity, mount included, not by name: the
  // root of another mount namespace, or of a detached mount, also reads "/" in /proc, and a bind
  // mount of "/" elsewhere has its inode but not its view of the mounts below.
  if (is_process_root(dir))
    return open_regular_file_at(dir, rel, path, "external weight file", size);
  std::error_code ec;
  const fs::path inside = fs::read_symlink("/proc/self/fd/" + std::to_string(dir), ec);
#ifdef SYS_openat2
  if (use_openat2) {
    // The kernel resolves every component beneath the directory and refuses a step out of it
    // ("..", an absolute link, a link leading out) before anything outside is opened, so a link
    // swapped in meanwhile changes nothing. EAGAIN: a rename elsewhere on the system raced a
    // ".." of the resolution, and the call is to be retried; with a pause once it keeps racing.
    open_how how{};
    how.flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK;
    how.resolve = RESOLVE_BENEATH;
    int err = EAGAIN;
    constexpr int kAttempts = 64;
    for (int attempt = 0; attempt < kAttempts && (err == EAGAIN || err == EINTR); ++attempt) {
      if (attempt >= 8) ::usleep(1u << std::min(attempt - 8, 10));  // 1 us up to 1 ms
      const long fd = ::syscall(SYS_openat2, dir, rel.c_str(), &how, sizeof how);
      if (fd >= 0) return regular_file(static_cast<int>(fd), path, "external weight file", size);
      err = errno;
    }
    if (err == EAGAIN || err == EINTR)
      fail(Code::Io, "cannot open external weight file '", path,
           "' confined to the model's directory: renames elsewhere on the system raced its "
           "lookup ",
           kAttempts, " times (openat2 ", err == EAGAIN ? "EAGAIN" : "EINTR",
           "); the load may be retried");
    if (err == EXDEV) {
      // Where it leads, for the message only: nothing there is opened. Looked up by name, after
      // the refusal: a link swapped meanwhile can make it name another file.
      const fs::path target = fs::canonical(path, ec);
      std::error_code of_root;
      const fs::path root_now = inside.empty() ? fs::canonical(root, of_root) : inside;
      if (!ec && !of_root && lies_inside(root_now, target))
        fail(Code::InvalidModel, "model: external weight file '", path, "' is '", target.string(),
             "', inside the model's directory '", root,
             "', but reached by a way out of it (an absolute symbolic link, or '..' out and back "
             "in), which the load option confine_external_data refuses: a link relative to its "
             "own folder that stays inside loads");
      refuse_outside(path, root, ec ? fs::path{} : target);
    }
    if (err != ENOSYS && err != EPERM)
      fail(Code::Io, "cannot open external weight file '", path, "': ", std::strerror(err));
  }
#else
  (void)use_openat2;
#endif
  // No openat2 (a kernel before 5.6, a sandbox that filters it): the file opened is refused
  // unless /proc/self/fd shows it inside the directory. Paths as /proc shows them are compared.
  const auto unprovable = [&] {
    fail(Code::InvalidModel, "model: external weight file '", path,
         "' cannot be shown to lie inside the model's directory '", root,
         "' (openat2 could not be used, and /proc/self/fd says: ", ec.message(), ")",
         kConfineAdvice);
  };
  if (ec) unprovable();
  // Not a regular file (the directory itself, a FIFO) is Io, as without the option.
  Fd file{open_regular_file_at(dir, rel, path, "external weight file", size)};
  const fs::path opened = fs::read_symlink("/proc/self/fd/" + std::to_string(file.fd), ec);
  if (ec) unprovable();
  if (!lies_inside(inside, opened)) refuse_outside(path, inside.string(), opened);
  return file.release();
}

int open_confined(const std::string& root, const std::string& rel, uint64_t* size,
                  bool use_openat2) {
  const Fd dir{open_directory(root)};
  return open_confined(dir.fd, root, rel, size, use_openat2);
}

namespace {

// Reads ranges of the external weight file, opened on first use.
class ExternalFile {
 public:
  // `confine_to`, when not empty, is the directory whose file `rel` is and which its resolution
  // may not leave (LoadOptions::confine_external_data); `confine_fd`, when not -1, that
  // directory already opened (the one the model file was read from), borrowed.
  ExternalFile(std::string path, std::string rel, std::string confine_to, int confine_fd)
      : path_(std::move(path)),
        rel_(std::move(rel)),
        confine_to_(std::move(confine_to)),
        confine_fd_(confine_fd) {}
  ~ExternalFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  ExternalFile(const ExternalFile&) = delete;
  ExternalFile& operator=(const ExternalFile&) = delete;

  const std::string& path() const { return path_; }

  uint64_t size() {
    open_once();
    return size_;
  }

  void read(uint64_t offset, uint64_t size, void* out) {
    open_once();
    auto* dst = static_cast<char*>(out);
    while (size > 0) {
      const size_t chunk = static_cast<size_t>(std::min<uint64_t>(size, uint64_t{1} << 30));
      const ssize_t n = ::pread(fd_, dst, chunk, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        fail(Code::Io, "cannot read external weight file '", path_, "' at offset ", offset, ": ",
             n < 0 ? std::strerror(errno) : "unexpected end of file");
      dst += n;
      offset += static_cast<uint64_t>(n);
      size -= static_cast<uint64_t>(n);
    }
  }

 private:
  void open_once() {
    if (fd_ >= 0) return;
    if (confine_to_.empty())
      fd_ = open_regular_file(path_, "external weight file", &size_);
    else if (confine_fd_ >= 0)
      fd_ = open_confined(confine_fd_, confine_to_, rel_, &size_, true);
    else
      fd_ = open_confined(confine_to_, rel_, &size_, true);
  }

  std::string path_, rel_, confine_to_;
  int confine_fd_ = -1;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// Reads n fp32 values at `offset` into out, calling piece(values, index of the first) on each
// piece right after it is read.
template <typename F>
void read_floats(ExternalFile& file, uint64_t offset, float* out, uint64_t n, F&& piece) {
  for (uint64_t done = 0; done < n;) {
    const uint64_t k = std::min(n - done, kCachePieceFloats);
    file.read(offset + done * sizeof(float), k * sizeof(float), out + done);
    piece(std::span<const float>(out + done, k), done);
    done += k;
  }
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The index of the first NaN or infinity in v, or -1 (the CPU backend's vectorised scan).
int64_t first_nonfinite(std::span<const float> v) {
  return cpu::first_nonfinite(v.data(), static_cast<int64_t>(v.size()));
}

// Vectors of 8-byte scalars: the FlatBuffers verifier checks only the alignment of their 4-byte
// length, so their elements are checked here before any 8-byte load.
template <typename T>
bool aligned_elements(const flatbuffers::Vector<T>* v) {
  return reinterpret_cast<uintptr_t>(v->Data()) % alignof(T) == 0;
}

template <typename T>
std::vector<T> copy_out(const flatbuffers::Vector<T>* v) {
  std::vector<T> out(v->size());
  if (!out.empty()) std::memcpy(out.data(), v->Data(), out.size() * sizeof(T));
  return out;
}

class Loader {
 public:
  // `external_dir_fd`: external_dir already opened (O_PATH), borrowed, or -1.
  Loader(const fb::Model* root, uint64_t description_bytes, std::string external_dir,
         int external_dir_fd, const LoadOptions& options, StatePolicy policy)
      : root_(root),
        description_bytes_(description_bytes),
        external_dir_(std::move(external_dir)),
        external_dir_fd_(external_dir_fd),
        options_(options),
        policy_(policy) {}

  std::unique_ptr<Model> run();
  uint64_t computed_digest() const { return computed_digest_; }

 private:
  [[noreturn]] void bad(const char* field, const std::string& what) const {
    fail(Code::InvalidModel, where_, ": field '", field, "' ", what);
  }

  uint64_t mul(uint64_t a, uint64_t b, const char* field) const {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) bad(field, "shape overflows 64 bits");
    return r;
  }

  uint32_t positive(uint32_t v, const char* field) const {
    if (v == 0) bad(field, "must be at least 1");
    return v;
  }

  template <typename T>
  T required(flatbuffers::Optional<T> v, const char* field) const {
    if (!v.has_value()) bad(field, "is required: routing knobs are never implied");
    return *v;
  }

  float finite(float v, const char* field) const {
    if (!std::isfinite(v)) bad(field, "must be a finite number");
    return v;
  }

  // Planning pass: memory the model will hold and bytes it will read, before anything is done.
  void plan_memory(uint64_t bytes, const char* field) {
    planned_memory_ = sat_add(planned_memory_, bytes);
    if (bytes > largest_bytes_) {
      largest_bytes_ = bytes;
      largest_ = cat(where_, " field '", field, "'");
    }
  }
  void plan_state();
  void check_plan() const;

  void layers(Model& model);
  ExternalFile& external(const char* field);
  // The external data file's name, checked (relative, inside the directory, no NUL).
  std::filesystem::path external_name(const char* field) const;
  bool description_only() const { return options_.description_only; }
  Tensor tensor(const fb::Tensor* t, const char* field, std::vector<int64_t> shape, bool required);
  void decode(const fb::Tensor* t, const char* field, const std::vector<int64_t>& shape,
              uint64_t numel, const uint8_t* bytes, Tensor& out) const;
  void initialise(const fb::Init* init, const char* field, Tensor& out);
  // The scale floats of a resident FP8 tensor of `shape` (Fp8Blocks' padded layout).
  uint64_t fp8_scale_floats(const std::vector<int64_t>& shape) const;
  // The codes of an FP8 tensor in 128x128 blocks with its scales re-laid, checked as decoding
  // checks them.
  std::shared_ptr<const Fp8Blocks> resident_fp8(const fb::Tensor* t, const char* field,
                                                const std::vector<int64_t>& shape) const;

  void training_state(const fb::TrainingState* t, Model& model);
  LayerSpec embedding(const fb::Embedding* e);
  LayerSpec rmsnorm(const fb::RMSNorm* n, uint32_t width);
  LayerSpec dense(const fb::DenseFFN* f, uint32_t width);
  LayerSpec moe(const fb::MoE* m, uint32_t width);
  LayerSpec head(const fb::OutputHead* h, uint32_t width);
  void check_width(uint32_t dim, uint32_t width, const char* field) const;

  const fb::Model* root_;
  uint64_t description_bytes_;
  std::string external_dir_;
  int external_dir_fd_;
  LoadOptions options_;
  StatePolicy policy_;
  std::unique_ptr<ExternalFile> external_;
  bool planning_ = false;
  uint64_t planned_memory_ = 0, planned_reads_ = 0, largest_bytes_ = 0;
  std::string largest_;
  uint64_t computed_digest_ = 0;
  std::string where_ = "model";
  uint32_t layer_index_ = 0;
  uint32_t tensor_slot_ = 0;
  std::string prev_desc_ = "the model's input_dim";
};

std::filesystem::path Loader::external_name(const char* field) const {
  const auto* name = root_->external_data();
  if (!name || name->size() == 0)
    bad(field, "refers to external data but the model's 'external_data' file name is not set");
  const std::filesystem::path rel(name->str());
  if (rel.is_absolute())
    fail(Code::InvalidModel, "model: field 'external_data' must be a relative path, got '",
         name->str(), "'");
  for (const auto& part : rel)
    if (part == "..")
      fail(Code::InvalidModel,
           "model: field 'external_data' must stay inside the model's "
           "directory, got '",
           name->str(), "'");
  if (name->str().find('\0') != std::string::npos)
    fail(Code::InvalidModel, "model: field 'external_data' contains a NUL byte");
  return rel;
}

ExternalFile& Loader::external(const char* field) {
  if (external_) return *external_;
  const std::filesystem::path rel = external_name(field);
  const auto* name = root_->external_data();
  // The description is sound; the caller left out the argument it needs (moert.h).
  if (external_dir_.empty())
    fail(Code::InvalidArgument, "model: has external weights ('", name->str(),
         "') but was loaded from memory without an external data directory (external_dir)");
  external_ = std::make_unique<ExternalFile>(
      (std::filesystem::path(external_dir_) / rel).string(), name->str(),
      options_.confine_external_data ? external_dir_ : "", external_dir_fd_);
  return *external_;
}

void Loader::decode(const fb::Tensor* t, const char* field, const std::vector<int64_t>& shape,
                    uint64_t numel, const uint8_t* bytes, Tensor& out) const {
  out.values.resize(numel);
  switch (t->dtype()) {
    case fb::DType::F32:
      if (bytes != reinterpret_cast<const uint8_t*>(out.values.data()))
        std::memcpy(out.values.data(), bytes, numel * sizeof(float));
      break;
    case fb::DType::BF16:
      decode_bf16({bytes, numel * 2}, out.values);
      break;
    case fb::DType::F8E4M3: {
      const auto* sc = t->scales();
      decode_e4m3_blocks({bytes, numel}, shape, sc->block_rows(), sc->block_cols(),
                         {sc->scales()->data(), sc->scales()->size()}, out.values);
      break;
    }
  }
  if (const int64_t at = first_nonfinite(out.values); at >= 0)
    bad(field, cat("holds a NaN or infinity at element ", at, " of ", shape_str(shape)));
}

uint64_t Loader::fp8_scale_floats(const std::vector<int64_t>& shape) const {
  uint64_t matrices = 1;
  for (size_t i = 0; i + 2 < shape.size(); ++i)
    matrices = mul(matrices, static_cast<uint64_t>(shape[i]), "shape");
  const int64_t rows = shape[shape.size() - 2], cols = shape.back();
  return mul(matrices,
             static_cast<uint64_t>(fp8::blocks_of(rows)) *
                 static_cast<uint64_t>(fp8::block_scale_ld(cols)),
             "shape");
}

std::shared_ptr<const Fp8Blocks> Loader::resident_fp8(const fb::Tensor* t, const char* field,
                                                      const std::vector<int64_t>& shape) const {
  auto q = std::make_shared<Fp8Blocks>();
  q->rows = shape[shape.size() - 2];
  q->cols = shape.back();
  q->matrices = 1;
  for (size_t i = 0; i + 2 < shape.size(); ++i) q->matrices *= shape[i];
  const uint64_t numel = static_cast<uint64_t>(q->numel());
  q->codes.resize(numel);
  if (t->data())
    std::memcpy(q->codes.data(), t->data()->data(), numel);
  else
    external_->read(t->external()->offset(), numel, q->codes.data());
  // The file's scales are row-major over blocks, blocks_of(cols) to a row; resident rows are
  // padded to scale_ld() floats, the layout the FP8 GEMMs read.
  const int64_t row_blocks = fp8::blocks_of(q->rows), col_blocks = fp8::blocks_of(q->cols);
  const int64_t ld = q->scale_ld();
  q->scales.assign(fp8_scale_floats(shape), 0.0f);
  const float* file_scales = t->scales()->scales()->data();
  for (int64_t r = 0; r < q->matrices * row_blocks; ++r)
    std::memcpy(q->scales.data() + r * ld, file_scales + r * col_blocks,
                static_cast<size_t>(col_blocks) * sizeof(float));
  // The checks decoding makes: every value finite (a NaN code, or a code times its scale past
  // the largest float, is refused as a decoded NaN or infinity is).
  float table[256];
  for (int i = 0; i < 256; ++i) table[i] = e4m3_to_float(static_cast<uint8_t>(i));
  std::vector<float> row(static_cast<size_t>(q->cols));
  for (int64_t r = 0; r < q->matrices * q->rows; ++r) {
    const uint8_t* code = q->codes.data() + r * q->cols;
    const float* scale =
        q->scales.data() + (r / q->rows * row_blocks + r % q->rows / fp8::kBlock) * ld;
    for (int64_t c = 0; c < q->cols; ++c) row[c] = table[code[c]] * scale[c / fp8::kBlock];
    if (const int64_t at = first_nonfinite(row); at >= 0)
      bad(field,
          cat("holds a NaN or infinity at element ", r * q->cols + at, " of ", shape_str(shape)));
  }
  return q;
}

void Loader::initialise(const fb::Init* init, const char* field, Tensor& out) {
  const auto kind = init->kind();
  if (static_cast<int>(kind) < 0 || static_cast<int>(kind) > static_cast<int>(fb::InitKind::MAX))
    bad(field, cat("init.kind ", static_cast<int>(kind), " is not a known initialiser"));
  const float sd = init->std();
  if (!std::isfinite(sd) || sd < 0.0f) bad(field, "init.std must be finite and >= 0");
  if (planning_) return;
  uint64_t seed = mix_seed(mix_seed(root_->seed(), layer_index_), tensor_slot_);
  if (init->seed() != 0) seed = mix_seed(seed, init->seed());
  Rng rng(seed);
  auto& v = out.values;
  switch (kind) {
    case fb::InitKind::Zeros:
      std::fill(v.begin(), v.end(), 0.0f);
      break;
    case fb::InitKind::Ones:
      std::fill(v.begin(), v.end(), 1.0f);
      break;
    case fb::InitKind::Normal:
      for (auto& x : v) x = static_cast<float>(rng.normal() * sd);
      break;
    case fb::InitKind::Uniform: {
      const double bound = sd * std::sqrt(3.0);
      for (auto& x : v) x = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
      break;
    }
  }
  // A std near the fp32 range draws values past it, which inline data could not hold.
  if (const int64_t at = first_nonfinite(v); at >= 0)
    bad(field, cat("init.std ", sd, " draws a value beyond the fp32 range (element ", at, ")"));
}

Tensor Loader::tensor(const fb::Tensor* t, const char* field, std::vector<int64_t> shape,
                      bool is_required) {
  ++tensor_slot_;
  Tensor out;
  out.shape = shape;
  if (!t) {
    if (is_required) bad(field, "is missing: give data, external or init");
    return out;
  }
  uint64_t numel = 1;
  for (int64_t d : shape) numel = mul(numel, static_cast<uint64_t>(d), field);
  if (t->shape()) {
    if (!aligned_elements(t->shape()))
      bad(field, "shape vector is not 8-byte aligned: the file is corrupt");
    // Compared as the file stores them (unsigned): a dimension of 2^63 or more is no int64_t.
    const std::vector<uint64_t> given = copy_out(t->shape());
    std::string given_str = "[";
    for (size_t i = 0; i < given.size(); ++i) given_str += cat(i ? ", " : "", given[i]);
    given_str += "]";
    if (!std::equal(given.begin(), given.end(), shape.begin(), shape.end(),
                    [](uint64_t g, int64_t s) { return g == static_cast<uint64_t>(s); }))
      bad(field, cat("has shape ", given_str, " but the layer needs ", shape_str(shape)));
  }
  const int sources = (t->data() != nullptr) + (t->external() != nullptr) + (t->init() != nullptr);
  if (sources != 1)
    bad(field, sources == 0 ? "has no values: give data, external or init"
                            : "gives more than one of data, external and init");

  const int dt = static_cast<int>(t->dtype());
  if (dt < 0 || dt > static_cast<int>(fb::DType::MAX))
    bad(field, cat("dtype ", dt, " is not a known element type"));
  const uint64_t elem = t->dtype() == fb::DType::F32 ? 4 : t->dtype() == fb::DType::BF16 ? 2 : 1;
  const uint64_t bytes = mul(numel, elem, field);
  const uint64_t fp32_bytes = mul(numel, sizeof(float), field);

  if (t->dtype() == fb::DType::F8E4M3) {
    const auto* sc = t->scales();
    if (!sc || !sc->scales()) bad(field, "is FP8 but has no block scales");
    if (shape.size() < 2) bad(field, "is FP8 but FP8 needs a matrix (at least 2 dimensions)");
    if (sc->block_rows() == 0 || sc->block_cols() == 0)
      bad(field, "scales.block_rows and scales.block_cols must be at least 1");
    uint64_t expected = 0;
    try {
      expected = e4m3_block_count(shape, sc->block_rows(), sc->block_cols());
    } catch (const Error& e) {
      bad(field, e.message());
    }
    if (sc->scales()->size() != expected)
      bad(field, cat("has ", sc->scales()->size(), " block scales but its shape needs ", expected));
    for (uint32_t i = 0; i < sc->scales()->size(); ++i)
      if (const float s = sc->scales()->Get(i); !fp8::is_valid_scale(s))
        bad(field, cat("has block scale ", s, " at element ", i,
                       ": a scale must be finite and at least 2^-126 (a negative or zero scale "
                       "would flip or erase its block)"));
  } else if (t->scales()) {
    bad(field, "has block scales but is not FP8");
  }

  const bool is_external = t->external() != nullptr;
  if (t->data()) {
    if (t->data()->size() != bytes)
      bad(field, cat("has ", t->data()->size(), " bytes of data but ", shape_str(shape), " of ",
                     fb::EnumNameDType(t->dtype()), " needs ", bytes));
  } else if (is_external) {
    const uint64_t offset = t->external()->offset(), size = t->external()->size();
    if (size != bytes)
      bad(field, cat("external.size is ", size, " bytes but ", shape_str(shape), " of ",
                     fb::EnumNameDType(t->dtype()), " needs ", bytes));
    if (offset % kExternalAlignment != 0)
      bad(field, cat("external.offset ", offset, " is not a multiple of ", kExternalAlignment));
    uint64_t end;
    const bool overflows = __builtin_add_overflow(offset, size, &end);
    if (description_only()) {
      // Nothing is read: the data file is neither opened nor needed.
      external_name(field);
      if (overflows) bad(field, cat("external range [", offset, ", +", size, ") overflows"));
    } else if (ExternalFile& file = external(field); overflows || end > file.size()) {
      bad(field, cat("external range [", offset, ", +", size, ") runs past the end of '",
                     file.path(), "' (", file.size(), " bytes)"));
    }
  } else if (t->dtype() != fb::DType::F32) {
    bad(field, "an initialised tensor must have dtype F32");
  }
  // A model keeps FP8 weights in 128x128 blocks as they are (1 byte per value); a checkpoint a
  // session resumes from decodes them into the fp32 masters it assigns.
  const bool resident = t->dtype() == fb::DType::F8E4M3 && policy_ != StatePolicy::Keep &&
                        t->scales()->block_rows() == fp8::kBlock &&
                        t->scales()->block_cols() == fp8::kBlock;
  if (planning_) {
    plan_memory(
        resident ? sat_add(numel, sat_mul(fp8_scale_floats(shape), sizeof(float))) : fp32_bytes,
        field);
    if (is_external) planned_reads_ = sat_add(planned_reads_, bytes);
    if (t->init()) initialise(t->init(), field, out);
    return out;
  }

  out.stored = static_cast<StoredType>(t->dtype());
  if (description_only()) {
    out.unloaded = Tensor::Unloaded{
        resident ? sat_add(numel, sat_mul(fp8_scale_floats(shape), sizeof(float))) : fp32_bytes,
        resident};
    return out;
  }
  if (resident) {
    out.fp8 = resident_fp8(t, field, shape);
  } else if (t->data()) {
    decode(t, field, shape, numel, t->data()->data(), out);
  } else if (is_external) {
    if (t->dtype() == fb::DType::F32) {
      // Read straight into place: no staging copy of the largest tensors.
      out.values.resize(numel);
      read_floats(*external_, t->external()->offset(), out.values.data(), numel,
                  [&](std::span<const float> piece, uint64_t first) {
                    if (const int64_t at = first_nonfinite(piece); at >= 0)
                      bad(field, cat("holds a NaN or infinity at element ",
                                     first + static_cast<uint64_t>(at), " of ", shape_str(shape)));
                  });
    } else {
      std::vector<uint8_t> raw(bytes);
      external_->read(t->external()->offset(), bytes, raw.data());
      decode(t, field, shape, numel, raw.data(), out);
    }
  } else {
    out.values.resize(numel);
    initialise(t->init(), field, out);
  }
  return out;
}

void Loader::check_width(uint32_t dim, uint32_t width, const char* field) const {
  if (dim != width)
    bad(field, cat("is ", dim, " but ", prev_desc_, " produces rows of width ", width));
}

LayerSpec Loader::embedding(const fb::Embedding* e) {
  EmbeddingSpec s;
  s.vocab_size = positive(e->vocab_size(), "vocab_size");
  s.dim = positive(e->dim(), "dim");
  s.context = positive(e->context(), "context");
  const uint64_t out = mul(s.context, s.dim, "context");
  if (out > std::numeric_limits<int32_t>::max()) bad("context", "times dim exceeds 2^31 - 1");
  s.weight = tensor(e->weight(), "weight", {s.vocab_size, s.dim}, true);
  LayerSpec l;
  l.kind = LayerKind::Embedding;
  l.in_width = s.context;
  l.out_width = static_cast<uint32_t>(out);
  l.spec = std::move(s);
  return l;
}

LayerSpec Loader::rmsnorm(const fb::RMSNorm* n, uint32_t width) {
  RMSNormSpec s;
  s.dim = positive(n->dim(), "dim");
  check_width(s.dim, width, "dim");
  s.eps = finite(n->eps(), "eps");
  if (s.eps <= 0.0f) bad("eps", "must be > 0");
  s.weight = tensor(n->weight(), "weight", {s.dim}, true);
  LayerSpec l;
  l.kind = LayerKind::RMSNorm;
  l.in_width = l.out_width = s.dim;
  l.spec = std::move(s);
  return l;
}

LayerSpec Loader::dense(const fb::DenseFFN* f, uint32_t width) {
  DenseFFNSpec s;
  s.dim = positive(f->dim(), "dim");
  check_width(s.dim, width, "dim");
  s.hidden = positive(f->hidden(), "hidden");
  s.residual = f->residual();
  s.w1 = tensor(f->w1(), "w1", {s.hidden, s.dim}, true);
  s.w3 = tensor(f->w3(), "w3", {s.hidden, s.dim}, true);
  s.w2 = tensor(f->w2(), "w2", {s.dim, s.hidden}, true);
  LayerSpec l;
  l.kind = LayerKind::DenseFFN;
  l.in_width = l.out_width = s.dim;
  l.spec = std::move(s);
  return l;
}

LayerSpec Loader::moe(const fb::MoE* m, uint32_t width) {
  MoESpec s;
  s.dim = positive(m->dim(), "dim");
  check_width(s.dim, width, "dim");
  RouterConfig& r = s.router;
  r.num_experts = positive(required(m->num_experts(), "num_experts"), "num_experts");
  r.top_k = positive(required(m->top_k(), "top_k"), "top_k");
  s.expert_hidden = positive(required(m->expert_hidden(), "expert_hidden"), "expert_hidden");
  const auto score = required(m->score_function(), "score_function");
  if (score != fb::ScoreFunction::Sigmoid && score != fb::ScoreFunction::Softmax)
    bad("score_function", cat(static_cast<int>(score), " is not a known score function"));
  r.score = score == fb::ScoreFunction::Sigmoid ? ScoreFunction::Sigmoid : ScoreFunction::Softmax;
  r.num_groups = positive(required(m->num_groups(), "num_groups"), "num_groups");
  r.topk_groups = positive(required(m->topk_groups(), "topk_groups"), "topk_groups");
  r.normalize = required(m->normalize_weights(), "normalize_weights");
  r.scaling = finite(required(m->routed_scaling_factor(), "routed_scaling_factor"),
                     "routed_scaling_factor");
  if (r.scaling <= 0.0f) bad("routed_scaling_factor", "must be > 0");
  if (r.top_k > r.num_experts) bad("top_k", cat(r.top_k, " exceeds num_experts ", r.num_experts));
  if (r.num_experts % r.num_groups != 0)
    bad("num_groups", cat(r.num_groups, " does not divide num_experts ", r.num_experts));
  if (r.topk_groups > r.num_groups)
    bad("topk_groups", cat(r.topk_groups, " exceeds num_groups ", r.num_groups));
  if (static_cast<uint64_t>(r.topk_groups) * (r.num_experts / r.num_groups) < r.top_k)
    bad("topk_groups", cat(r.topk_groups, " groups of ", r.num_experts / r.num_groups,
                           " experts hold fewer than top_k = ", r.top_k));

  s.num_shared = m->num_shared_experts();
  s.shared_hidden = m->shared_hidden();
  if (s.num_shared > 0 && s.shared_hidden == 0)
    bad("shared_hidden", "must be at least 1 when num_shared_experts > 0");
  s.residual = m->residual();

  const auto* b = m->balancing();
  if (!b) bad("balancing", "is required: name the balancing policy, even if it is None");
  const auto policy = required(b->policy(), "balancing.policy");
  if (static_cast<int>(policy) < 0 ||
      static_cast<int>(policy) > static_cast<int>(fb::BalancingPolicy::MAX))
    bad("balancing.policy", cat(static_cast<int>(policy), " is not a known policy"));
  BalancingSpec& bs = s.balancing;
  bs.policy = static_cast<BalancingPolicy>(static_cast<int>(policy));
  bs.bias_update_rate = finite(b->bias_update_rate(), "balancing.bias_update_rate");
  if (bs.bias_update_rate < 0.0f) bad("balancing.bias_update_rate", "must be >= 0");
  bs.bias_centering = b->bias_centering();
  bs.bias_frozen = b->bias_frozen();
  const bool aux_loss =
      bs.policy == BalancingPolicy::AuxLoss || bs.policy == BalancingPolicy::SequenceAuxLoss;
  // Left out, the loss would weigh nothing. Writers before the alpha became optional left out an
  // alpha of exactly 0 too: the message says how to keep such a file's meaning.
  if (aux_loss && !b->aux_alpha().has_value())
    bad("balancing.aux_alpha",
        "is required by an auxiliary-loss policy: routing knobs are never implied (a file "
        "written by an earlier moert with an alpha of 0 left it out: render it with `moert "
        "convert --no-check`, add \"aux_alpha\": 0, and convert it back)");
  bs.aux_alpha = finite(b->aux_alpha().value_or(0.0f), "balancing.aux_alpha");
  if (bs.aux_alpha < 0.0f) bad("balancing.aux_alpha", "must be >= 0");
  bs.capacity_factor = finite(b->capacity_factor(), "balancing.capacity_factor");
  if (bs.capacity_factor <= 0.0f) bad("balancing.capacity_factor", "must be > 0");
  // Expert Choice computes capacity_factor * rows * top_k / num_experts tokens per expert as a
  // 64-bit integer; from num_experts / top_k on every expert already takes every token, and past
  // num_experts the product would leave the integers a session can count.
  if (bs.policy == BalancingPolicy::ExpertChoice &&
      static_cast<double>(bs.capacity_factor) > static_cast<double>(r.num_experts))
    bad("balancing.capacity_factor",
        cat(bs.capacity_factor, " exceeds num_experts ", r.num_experts,
            " (from num_experts / top_k = ", static_cast<double>(r.num_experts) / r.top_k,
            " on, every expert takes every token)"));

  const int64_t E = r.num_experts, H = s.expert_hidden, D = s.dim;
  mul(mul(E, H, "expert_hidden"), D, "expert_hidden");
  s.gate = tensor(m->gate(), "gate", {E, D}, true);
  s.gate_bias = tensor(m->gate_bias(), "gate_bias", {E}, false);
  if (!m->gate_bias()) {
    if (planning_)
      plan_memory(static_cast<uint64_t>(E) * sizeof(float), "gate_bias");
    else if (description_only())
      s.gate_bias.unloaded = Tensor::Unloaded{static_cast<uint64_t>(E) * sizeof(float), false};
    else
      s.gate_bias.values.assign(E, 0.0f);
  }
  s.w1 = tensor(m->w1(), "w1", {E, H, D}, true);
  s.w3 = tensor(m->w3(), "w3", {E, H, D}, true);
  s.w2 = tensor(m->w2(), "w2", {E, D, H}, true);
  const int64_t S = s.num_shared, HS = s.shared_hidden;
  if (S > 0) {
    mul(mul(S, HS, "shared_hidden"), D, "shared_hidden");
    s.shared_w1 = tensor(m->shared_w1(), "shared_w1", {S, HS, D}, true);
    s.shared_w3 = tensor(m->shared_w3(), "shared_w3", {S, HS, D}, true);
    s.shared_w2 = tensor(m->shared_w2(), "shared_w2", {S, D, HS}, true);
  } else if (m->shared_w1() || m->shared_w3() || m->shared_w2()) {
    bad("shared_w1", "shared expert weights are given but num_shared_experts is 0");
  }
  LayerSpec l;
  l.kind = LayerKind::MoE;
  l.in_width = l.out_width = s.dim;
  l.spec = std::move(s);
  return l;
}

LayerSpec Loader::head(const fb::OutputHead* h, uint32_t width) {
  OutputHeadSpec s;
  s.dim = positive(h->dim(), "dim");
  check_width(s.dim, width, "dim");
  s.vocab_size = positive(h->vocab_size(), "vocab_size");
  s.weight = tensor(h->weight(), "weight", {s.vocab_size, s.dim}, true);
  s.bias = tensor(h->bias(), "bias", {s.vocab_size}, false);
  s.has_bias = h->bias() != nullptr;
  LayerSpec l;
  l.kind = LayerKind::OutputHead;
  l.in_width = s.dim;
  l.out_width = s.vocab_size;
  l.spec = std::move(s);
  return l;
}

void Loader::layers(Model& model) {
  const auto* layers = root_->layers();
  if (!layers || layers->size() == 0) fail(Code::InvalidModel, "model: has no layers");
  std::set<std::string> names;
  uint32_t width = root_->input_dim();
  where_ = "model";
  prev_desc_ = "the model's input_dim";
  for (uint32_t i = 0; i < layers->size(); ++i) {
    const fb::Layer* layer = layers->Get(i);
    layer_index_ = i;
    tensor_slot_ = 0;
    std::string name = layer->name() ? layer->name()->str() : "";
    if (name.empty()) name = "layer" + std::to_string(i);
    const auto kind = layer->kind_type();
    const bool known = kind != fb::LayerKind::NONE &&
                       static_cast<int>(kind) <= static_cast<int>(fb::LayerKind::MAX);
    where_ = cat("layer ", i, " ('", name, "', ",
                 known ? fb::EnumNameLayerKind(kind) : "unknown kind", ")");
    if (!known || !layer->kind())
      fail(Code::InvalidModel, where_, ": field 'kind' ", static_cast<int>(kind),
           " is not a known layer kind");
    if (name.find('\0') != std::string::npos)
      fail(Code::InvalidModel, where_, ": field 'name' contains a NUL byte");
    if (!names.insert(name).second)
      fail(Code::InvalidModel, where_, ": field 'name' repeats an earlier layer's name");
    if (i == 0 && kind != fb::LayerKind::Embedding && width == 0)
      fail(Code::InvalidModel,
           "model: field 'input_dim' must be set when the first layer is not "
           "an Embedding");
    if (kind != fb::LayerKind::OutputHead && i > 0 &&
        model.layers.back().kind == LayerKind::OutputHead)
      fail(Code::InvalidModel, where_, ": follows an OutputHead, which must be the last layer");

    LayerSpec spec;
    switch (kind) {
      case fb::LayerKind::Embedding:
        if (i != 0) fail(Code::InvalidModel, where_, ": an Embedding must be the first layer");
        spec = embedding(layer->kind_as_Embedding());
        model.token_input = true;
        model.input_width = spec.in_width;
        break;
      case fb::LayerKind::RMSNorm:
        spec = rmsnorm(layer->kind_as_RMSNorm(), width);
        break;
      case fb::LayerKind::MoE:
        spec = moe(layer->kind_as_MoE(), width);
        break;
      case fb::LayerKind::DenseFFN:
        spec = dense(layer->kind_as_DenseFFN(), width);
        break;
      case fb::LayerKind::OutputHead:
        spec = head(layer->kind_as_OutputHead(), width);
        break;
      default:
        fail(Code::Internal, where_, ": unhandled layer kind");
    }
    if (i == 0 && !model.token_input) model.input_width = spec.in_width;
    spec.name = std::move(name);
    width = spec.out_width;
    prev_desc_ = where_;
    model.layers.push_back(std::move(spec));
  }
  model.output_width = width;
  where_ = "model";
}

// The training state's vectors, counted from what the file declares (their sizes are checked
// against the parameters in the real pass, before anything is allocated for them).
void Loader::plan_state() {
  const fb::TrainingState* t = root_->training();
  if (!t) return;
  const bool keep = policy_ == StatePolicy::Keep;
  uint64_t largest_stream = 0;
  auto vec = [&](uint64_t inline_floats, const fb::ExternalRef* ext) {
    const uint64_t bytes = ext ? ext->size() : sat_mul(inline_floats, sizeof(float));
    if (ext) planned_reads_ = sat_add(planned_reads_, ext->size());
    if (keep)
      planned_memory_ = sat_add(planned_memory_, bytes);
    else if (ext)
      largest_stream = std::max(largest_stream, std::min(bytes, kStreamChunkFloats * 4));
  };
  if (t->params())
    for (const fb::ParamState* p : *t->params()) {
      vec(p->grad() ? p->grad()->size() : 0, p->grad_external());
      vec(p->m() ? p->m()->size() : 0, p->m_external());
      vec(p->v() ? p->v()->size() : 0, p->v_external());
    }
  planned_memory_ = sat_add(planned_memory_, largest_stream);
  if (keep && t->layers())
    for (const fb::LayerBalanceState* l : *t->layers())
      if (l->step_counts())
        planned_memory_ = sat_add(planned_memory_, sat_mul(l->step_counts()->size(), 8));
}

void Loader::check_plan() const {
  // A description-only model holds none of it and reads only its description, whose size was
  // checked against max_file_bytes before it was read.
  if (description_only()) return;
  const uint64_t physical = physical_memory_bytes();
  const bool by_option = options_.max_memory <= physical;
  const uint64_t memory_limit = std::min(options_.max_memory, physical);
  if (planned_memory_ > memory_limit)
    fail(Code::Limit, "model: needs ", bytes_str(planned_memory_),
         policy_ == StatePolicy::Keep ? " for its tensors and training state" : " for its tensors",
         " (the largest: ", largest_, ", ", bytes_str(largest_bytes_), "), more than ",
         by_option ? "the load limit of " : "this machine's physical memory, ",
         bytes_str(memory_limit),
         by_option ? " (moert_load_options_set_max_memory raises it for a trusted model)" : "");
  const uint64_t reads = sat_add(description_bytes_, planned_reads_);
  if (reads > options_.max_file_bytes)
    fail(Code::Limit, "model: reading it takes ", bytes_str(reads), " (description ",
         bytes_str(description_bytes_), ", external data ", bytes_str(planned_reads_),
         "), more than the load limit of ", bytes_str(options_.max_file_bytes),
         " (moert_load_options_set_max_file_bytes raises it for a trusted model)");
}

std::unique_ptr<Model> Loader::run() {
  if (root_->schema_major() != kSchemaMajor)
    fail(Code::InvalidModel, "model: schema_major is ", root_->schema_major(),
         " but this library reads schema ", kSchemaMajor,
         root_->schema_major() == 0 ? " (the field is missing)" : "");
  // moert_model_name() returns a C string, which would end at the NUL.
  if (root_->name() && root_->name()->string_view().find('\0') != std::string_view::npos)
    fail(Code::InvalidModel, "model: field 'name' contains a NUL byte");
  if (description_only() && policy_ != StatePolicy::Verify)
    fail(Code::InvalidArgument,
         "a checkpoint to resume from, or to digest, is read with its values: the load option "
         "description_only does not apply to it");
  // Every check first, with nothing allocated or read: the limits are enforced on the totals.
  {
    planning_ = true;
    Model plan;
    layers(plan);
    plan_state();
    check_plan();
    planning_ = false;
  }
  auto model = std::make_unique<Model>();
  model->name = root_->name() ? root_->name()->str() : "";
  model->schema_minor = root_->schema_minor();
  model->seed = root_->seed();
  model->description_only = description_only();
  layers(*model);
  if (root_->training()) training_state(root_->training(), *model);
  return model;
}

void Loader::training_state(const fb::TrainingState* t, Model& model) {
  auto bad_state = [](const std::string& what) {
    fail(Code::InvalidModel, "checkpoint training state: ", what);
  };
  const bool keep = policy_ == StatePolicy::Keep;
  const uint64_t stored_digest = t->content_digest();
  if (stored_digest == 0 && policy_ != StatePolicy::Recompute) {
    if (t->digest() != 0)
      bad_state(
          "has only a schema 1.0 digest, which depended on the compiler of the moert that wrote "
          "it; this version verifies content digests (schema 1.1) and cannot verify it");
    bad_state("field 'content_digest' is missing");
  }
  TrainingState st;
  st.step = t->step();
  st.micro_batches = t->micro_batches();
  // Counters at their type's end: the next step or backward would wrap them (a step count of 0
  // divides AdamW's bias correction by zero; a micro-batch count of 0 sums instead of averaging).
  if (st.step == std::numeric_limits<uint64_t>::max())
    bad_state("field 'step' is 2^64 - 1: no step can follow it");
  if (st.micro_batches == std::numeric_limits<uint32_t>::max())
    bad_state("field 'micro_batches' is 2^32 - 1: no backward can follow it");
  if (t->rng()) {
    if (!aligned_elements(t->rng())) bad_state("field 'rng' is not 8-byte aligned: corrupt file");
    st.rng = copy_out(t->rng());
  }
  if (!Rng::is_state(st.rng))
    bad_state(t->rng() ? "field 'rng' is not a generator state" : "field 'rng' is missing");
  st.optimizer = t->optimizer() ? t->optimizer()->str() : "";
  if (st.optimizer != "adamw" && st.optimizer != "sgd")
    bad_state(cat("field 'optimizer' is '", st.optimizer, "', expected adamw or sgd"));
  const bool adamw = st.optimizer == "adamw";

  // Described only, the state's parameters are not read (they are the size of the weights) and
  // the digest, which covers the weights, cannot be computed: the step and the balancing state
  // are what such a model shows.
  const bool described = description_only();
  ContentHasher h;
  if (!described) hash_model(h, model);
  const uint32_t num_params = described || !t->params() ? 0 : t->params()->size();
  hash_state_header(h, st.step, st.micro_batches, st.rng, st.optimizer, num_params);

  std::set<std::string> seen;
  const auto params = model.parameters();
  std::vector<float> chunk;
  for (uint32_t pi = 0; pi < num_params; ++pi) {
    const fb::ParamState* p = t->params()->Get(pi);
    const std::string name = p->name() ? p->name()->str() : "";
    const ParamRef* ref = nullptr;
    for (const auto& r : params)
      if (r.name == name) ref = &r;
    if (!ref) bad_state(cat("names a parameter '", name, "' the model does not have"));
    if (!seen.insert(name).second) bad_state(cat("repeats parameter '", name, "'"));
    const uint64_t numel = static_cast<uint64_t>(ref->tensor->numel());
    ParamState ps;
    ps.name = name;
    h.str(name);
    // What a field held: any value, any value other than zero.
    struct Held {
      bool any = false, nonzero = false;
    };
    auto take = [&](const flatbuffers::Vector<float>* v, const fb::ExternalRef* ext,
                    std::vector<float>& out, const char* field) {
      Held held;
      const std::string what = cat("parameter '", name, "' field '", field, "'");
      if (v && ext) bad_state(what + " is given both inline and as external data");
      const uint64_t n = ext ? ext->size() / sizeof(float) : v ? v->size() : 0;
      if (ext && ext->size() % sizeof(float) != 0)
        bad_state(cat(what, " external.size ", ext->size(), " is not a whole number of floats"));
      if (n != 0 && n != numel)
        bad_state(cat(what, " holds ", n, " values, the parameter has ", numel));
      h.floats_begin(n);
      if (n == 0) return held;
      held.any = true;
      // AdamW's second moment is a running mean of squares: a negative value would make the
      // next update's square root a NaN.
      const bool second_moment = std::string_view(field) == "v";
      auto check = [&](std::span<const float> values) {
        if (first_nonfinite(values) >= 0) bad_state(what + " holds a NaN or infinity");
        if (second_moment)
          for (size_t i = 0; i < values.size(); ++i)
            if (values[i] < 0.0f)
              bad_state(cat(what, " holds a negative value (", values[i],
                            "), which a second moment (a mean of squares) cannot"));
        if (!held.nonzero)
          held.nonzero = std::any_of(values.begin(), values.end(), [](float x) { return x != 0; });
      };
      if (v) {
        const std::span<const float> values(v->data(), n);
        check(values);
        h.floats_chunk(values);
        if (keep) out.assign(values.begin(), values.end());
        return held;
      }
      if (ext->offset() % kExternalAlignment != 0)
        bad_state(cat(what, " external.offset ", ext->offset(), " is not a multiple of ",
                      kExternalAlignment));
      ExternalFile& file = external(field);
      uint64_t end;
      if (__builtin_add_overflow(ext->offset(), ext->size(), &end) || end > file.size())
        bad_state(cat(what, " external range [", ext->offset(), ", +", ext->size(),
                      ") runs past the end of '", file.path(), "' (", file.size(), " bytes)"));
      if (keep) {
        out.resize(n);
        read_floats(file, ext->offset(), out.data(), n,
                    [&](std::span<const float> piece, uint64_t) {
                      check(piece);
                      h.floats_chunk(piece);
                    });
        return held;
      }
      for (uint64_t done = 0; done < n;) {
        const uint64_t k = std::min(n - done, kStreamChunkFloats);
        chunk.resize(k);
        file.read(ext->offset() + done * sizeof(float), k * sizeof(float), chunk.data());
        check(chunk);
        h.floats_chunk(chunk);
        done += k;
      }
      return held;
    };
    take(p->grad(), p->grad_external(), ps.grad, "grad");
    const Held m = take(p->m(), p->m_external(), ps.m, "m");
    const Held v = take(p->v(), p->v_external(), ps.v, "v");
    // Moments only a step makes non-zero: AdamW's m and v come from its first step together,
    // and SGD makes no v. (Zeros alone may stand: a refused first step of older versions left
    // the moments it allocated, and set_config could then change the optimizer.)
    if (!adamw && v.nonzero)
      bad_state(
          cat("parameter '", name, "' field 'v' holds a second moment, which SGD never makes"));
    if (adamw && (m.nonzero && !v.any))
      bad_state(cat("parameter '", name, "' has AdamW's first moment m without its v"));
    if (adamw && (v.nonzero && !m.any))
      bad_state(cat("parameter '", name, "' has AdamW's second moment v without its m"));
    if (keep) st.params.push_back(std::move(ps));
  }
  std::set<uint32_t> balanced;
  if (t->layers())
    for (const fb::LayerBalanceState* l : *t->layers()) {
      if (l->layer() >= model.layers.size() || model.layers[l->layer()].kind != LayerKind::MoE)
        bad_state(cat("balancing state names layer ", l->layer(), ", which is not a MoE layer"));
      if (!balanced.insert(l->layer()).second)
        bad_state(cat("repeats the balancing state of layer ", l->layer()));
      const auto& moe = std::get<MoESpec>(model.layers[l->layer()].spec);
      LayerBalanceState ls;
      ls.layer = l->layer();
      ls.gamma = l->gamma();
      ls.frozen = l->frozen();
      if (!std::isfinite(ls.gamma) || ls.gamma < 0.0f)
        bad_state(cat("layer ", l->layer(), " field 'gamma' must be finite and >= 0"));
      if (const auto* counts = l->step_counts()) {
        if (counts->size() != moe.router.num_experts)
          bad_state(cat("layer ", l->layer(), " field 'step_counts' holds ", counts->size(),
                        " counts for ", moe.router.num_experts, " experts"));
        if (!aligned_elements(counts))
          bad_state(cat("layer ", l->layer(),
                        " field 'step_counts' is not 8-byte aligned: corrupt file"));
        ls.step_counts = copy_out(counts);
        int64_t total = 0;
        for (int64_t c : ls.step_counts) {
          if (c < 0) bad_state(cat("layer ", l->layer(), " has a negative token count"));
          if (c > kMaxStepAssignments - total)
            bad_state(cat("layer ", l->layer(), " counts more than 2^53 token-expert assignments ",
                          "in one step, more than a step can count"));
          total += c;
        }
      }
      st.layers.push_back(std::move(ls));
    }
  // The writer names every parameter and every MoE layer: a state left out would resume from
  // zeros (or this session's own settings) instead of the run's.
  if (!described)
    for (const auto& r : params)
      if (!seen.count(r.name)) bad_state(cat("has no state for parameter '", r.name, "'"));
  for (uint32_t i = 0; i < model.layers.size(); ++i)
    if (model.layers[i].kind == LayerKind::MoE && !balanced.count(i))
      bad_state(cat("has no balancing state for MoE layer ", i, " ('", model.layers[i].name, "')"));
  hash_layer_states(h, st.layers);
  computed_digest_ = h.digest();
  if (policy_ == StatePolicy::Recompute) return;
  if (!described && computed_digest_ != stored_digest)
    bad_state("the digest does not match the content: the checkpoint is corrupt");
  st.digest = stored_digest;
  CheckpointSummary summary{st.step, {}};
  for (const LayerBalanceState& l : st.layers)
    summary.layers.push_back({l.layer, {}, l.gamma, l.frozen});
  model.checkpoint = std::move(summary);
  if (keep) model.training = std::move(st);
}

// Copies `size` bytes into 8-byte-aligned storage: the verifier checks field alignment against it.
std::vector<uint64_t> aligned_copy(const void* data, size_t size) {
  std::vector<uint64_t> aligned((size + 7) / 8);
  if (size) std::memcpy(aligned.data(), data, size);
  return aligned;
}

// Verifies the buffer (already 8-byte aligned) and runs the loader over it.
std::unique_ptr<Model> parse(const uint64_t* aligned, size_t size, const std::string& external_dir,
                             const LoadOptions& options, StatePolicy policy,
                             uint64_t* computed_digest = nullptr, int external_dir_fd = -1) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(aligned);
  if (size < 8)
    fail(Code::InvalidModel, "model data is ", size, " bytes: too short to be a moert model");
  if (!fb::ModelBufferHasIdentifier(bytes)) {
    std::string id(reinterpret_cast<const char*>(bytes) + 4, 4);
    for (char& c : id)
      if (c < 32 || c > 126) c = '?';
    fail(Code::InvalidModel, "not a moert model: file identifier is '", id, "', expected '",
         fb::ModelIdentifier(), "'");
  }
  // The verifier's bounds on nesting and on tables visited keep a crafted buffer's verification
  // short; a sound description past the table bound (about 250000 layers) is told apart from a
  // corrupt one by a second pass with a larger bound, which only a refused buffer pays for.
  constexpr flatbuffers::uoffset_t kMaxDepth = 64, kMaxTables = 1000000;
  flatbuffers::Verifier verifier(bytes, size, kMaxDepth, kMaxTables);
  if (!fb::VerifyModelBuffer(verifier)) {
    flatbuffers::Verifier larger(bytes, size, kMaxDepth, 16 * kMaxTables);
    if (fb::VerifyModelBuffer(larger))
      fail(Code::InvalidModel, "model description holds more than ", kMaxTables,
           " tables (layers, tensors and their parts), more than this library reads");
    fail(Code::InvalidModel,
         "model failed FlatBuffers verification: the file is truncated or corrupt");
  }
  Loader loader(fb::GetModel(bytes), size, external_dir, external_dir_fd, options, policy);
  auto model = loader.run();
  if (computed_digest) *computed_digest = loader.computed_digest();
  return model;
}

void check_buffer_size(size_t size, const LoadOptions& options) {
  // The limit first: a load past it is MOERT_ERR_LIMIT whatever else is wrong (moert.h).
  if (size > options.max_file_bytes)
    fail(Code::Limit, "model description is ", bytes_str(size), ", more than the load limit of ",
         bytes_str(options.max_file_bytes), " (moert_load_options_set_max_file_bytes)");
  if (size >= kMaxBufferSize)
    fail(Code::InvalidModel, "model description is ", size,
         " bytes; FlatBuffers stops at 2 GiB (put weights in external data)");
}

// One load of the description at `path` and its data; `read` receives the identity of the file
// the description was read from.
std::unique_ptr<Model> load_file_once(const std::string& path, const LoadOptions& options,
                                      StatePolicy policy, struct stat& read) {
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  // Confined, the directory is opened once, and the model file and its data are both found in
  // it: a link on the way to it swapped between the two cannot pair this description with
  // another directory's data.
  Fd confined, file;
  uint64_t file_size = 0;
  if (options.confine_external_data) {
    confined.fd = open_directory(dir);
    std::string name = std::filesystem::path(path).filename().string();
    if (name.empty()) name = ".";  // "models/": the directory, which is no regular file
    file.fd = open_regular_file_at(confined.fd, name, path, "model file", &file_size);
  } else {
    file.fd = open_regular_file(path, "model file", &file_size);
  }
  const int fd = file.fd;
  if (::fstat(fd, &read) != 0) read = {};
  const size_t size = static_cast<size_t>(file_size);
  try {
    check_buffer_size(size, options);
  } catch (const Error& e) {
    throw Error(e.code(), cat("'", path, "': ", e.message()));
  }
  // Read straight into aligned storage: one copy of the description in memory.
  std::vector<uint64_t> aligned((size + 7) / 8);
  auto* buf = reinterpret_cast<char*>(aligned.data());
  size_t got = 0;
  while (got < size) {
    const ssize_t n = ::read(fd, buf + got, size - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = n < 0 ? std::strerror(errno) : "unexpected end of file";
      fail(Code::Io, "cannot read model file '", path, "': ", why);
    }
    got += static_cast<size_t>(n);
  }
  if (size == 0) {
    // /proc and /sys files report a size of 0 whatever they hold: "0 bytes" would be wrong.
    char byte = 0;
    ssize_t n = 0;
    do {
      n = ::read(fd, &byte, 1);
    } while (n < 0 && errno == EINTR);
    if (n > 0)
      fail(Code::InvalidModel, "'", path,
           "': its file system reports a size of 0 bytes, but it holds data (a /proc or /sys "
           "file?): a model file must report its true size");
  }
  ::close(file.release());
  try {
    return parse(aligned.data(), size, dir, options, policy, nullptr, confined.fd);
  } catch (const Error& e) {
    throw Error(e.code(), cat("'", path, "': ", e.message()));
  }
}

// A save to the same path renames a new description into place and then removes the data file
// of the one before: a load that read the previous description and opens its data file after
// that fails. When a load fails and `path` has meanwhile come to name another file, it is tried
// again on the new one, up to kLoadAttempts in all (a reader racing a trainer that saves without
// pause), and only then reports the last failure.
constexpr int kLoadAttempts = 4;

std::unique_ptr<Model> load_file(const std::string& path, const LoadOptions& options,
                                 StatePolicy policy) {
  for (int attempt = 1;; ++attempt) {
    struct stat read {};
    try {
      return load_file_once(path, options, policy, read);
    } catch (const Error&) {
      struct stat now {};
      const bool replaced =
          read.st_ino != 0 && ::stat(path.c_str(), &now) == 0 && !format::same_file(read, now);
      if (!replaced || attempt == kLoadAttempts) throw;
    }
  }
}

}  // namespace

std::shared_ptr<const Model> load_model_file(const std::string& path, const LoadOptions& options) {
  return load_file(path, options, StatePolicy::Verify);
}

std::shared_ptr<const Model> load_model_buffer(const void* data, size_t size,
                                               const std::string& external_dir,
                                               const LoadOptions& options) {
  if (!data) fail(Code::InvalidArgument, "model data is NULL");
  check_buffer_size(size, options);
  const std::vector<uint64_t> aligned = aligned_copy(data, size);
  return parse(aligned.data(), size, external_dir, options, StatePolicy::Verify);
}

std::unique_ptr<Model> load_checkpoint_file(const std::string& path, const LoadOptions& options) {
  auto model = load_file(path, options, StatePolicy::Keep);
  if (!model->training)
    fail(Code::InvalidArgument, "'", path,
         "' is a model file without training state, not a checkpoint");
  return model;
}

uint64_t recompute_checkpoint_digest(const void* data, size_t size, const std::string& external_dir,
                                     const LoadOptions& options) {
  if (!data) fail(Code::InvalidArgument, "model data is NULL");
  check_buffer_size(size, options);
  const std::vector<uint64_t> aligned = aligned_copy(data, size);
  uint64_t digest = 0;
  parse(aligned.data(), size, external_dir, options, StatePolicy::Recompute, &digest);
  return digest;
}

uint64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return std::numeric_limits<uint64_t>::max();
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page);
}

}  // namespace moert
