#include "core/model_loader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <vector>

#include "core/error.h"
#include "core/model_writer.h"
#include "core/tensor_codec.h"
#include "moert_generated.h"

namespace moert {
namespace {

// FlatBuffers offsets are 32-bit: nothing larger can be a valid buffer.
constexpr size_t kMaxBufferSize = size_t{1} << 31;
constexpr uint64_t kExternalAlignment = 64;

// Reads ranges of the external weight file, opened on first use.
class ExternalFile {
 public:
  explicit ExternalFile(std::string path) : path_(std::move(path)) {}
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
      const ssize_t n = ::pread(fd_, dst, size, static_cast<off_t>(offset));
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
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0)
      fail(Code::Io, "cannot open external weight file '", path_, "': ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode))
      fail(Code::Io, "external weight file '", path_, "' is not a regular file");
    size_ = static_cast<uint64_t>(st.st_size);
  }

  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// A name as it can appear in a message: control characters (a NUL would end a C string) as '?'.
std::string printable(std::string s) {
  for (char& c : s)
    if (static_cast<unsigned char>(c) < 32 || c == 127) c = '?';
  return s;
}

uint64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return std::numeric_limits<uint64_t>::max();
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page);
}

class Loader {
 public:
  Loader(const fb::Model* root, std::string external_dir)
      : root_(root),
        external_dir_(std::move(external_dir)),
        memory_limit_(physical_memory_bytes()) {}

  std::shared_ptr<const Model> run();

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

  ExternalFile& external(const char* field);
  Tensor tensor(const fb::Tensor* t, const char* field, std::vector<int64_t> shape, bool required);
  void decode(const fb::Tensor* t, const char* field, const std::vector<int64_t>& shape,
              uint64_t numel, const uint8_t* bytes, Tensor& out) const;
  void initialise(const fb::Init* init, const char* field, Tensor& out);

  void training_state(const fb::TrainingState* t, Model& model) const;
  LayerSpec embedding(const fb::Embedding* e);
  LayerSpec rmsnorm(const fb::RMSNorm* n, uint32_t width);
  LayerSpec dense(const fb::DenseFFN* f, uint32_t width);
  LayerSpec moe(const fb::MoE* m, uint32_t width);
  LayerSpec head(const fb::OutputHead* h, uint32_t width);
  void check_width(uint32_t dim, uint32_t width, const char* field) const;

  const fb::Model* root_;
  std::string external_dir_;
  std::unique_ptr<ExternalFile> external_;
  uint64_t memory_limit_;
  uint64_t bytes_loaded_ = 0;
  std::string where_ = "model";
  uint32_t layer_index_ = 0;
  uint32_t tensor_slot_ = 0;
  std::string prev_desc_ = "the model's input_dim";
};

ExternalFile& Loader::external(const char* field) {
  if (external_) return *external_;
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
  if (external_dir_.empty())
    fail(Code::InvalidModel, "model: has external weights ('", name->str(),
         "') but was loaded from memory without an external data directory");
  external_ = std::make_unique<ExternalFile>((std::filesystem::path(external_dir_) / rel).string());
  return *external_;
}

void Loader::decode(const fb::Tensor* t, const char* field, const std::vector<int64_t>& shape,
                    uint64_t numel, const uint8_t* bytes, Tensor& out) const {
  out.values.resize(numel);
  float* v = out.values.data();
  switch (t->dtype()) {
    case fb::DType::F32:
      std::memcpy(v, bytes, numel * sizeof(float));
      break;
    case fb::DType::BF16:
      for (uint64_t i = 0; i < numel; ++i) {
        uint16_t b;
        std::memcpy(&b, bytes + 2 * i, 2);
        v[i] = bf16_to_float(b);
      }
      break;
    case fb::DType::F8E4M3: {
      const auto* sc = t->scales();
      const uint64_t rows = static_cast<uint64_t>(shape[shape.size() - 2]);
      const uint64_t cols = static_cast<uint64_t>(shape.back());
      const uint64_t br = sc->block_rows(), bc = sc->block_cols();
      const uint64_t row_blocks = (rows + br - 1) / br, col_blocks = (cols + bc - 1) / bc;
      const uint64_t matrices = numel / (rows * cols);
      for (uint64_t m = 0; m < matrices; ++m)
        for (uint64_t r = 0; r < rows; ++r)
          for (uint64_t c = 0; c < cols; ++c) {
            const uint64_t i = (m * rows + r) * cols + c;
            const float s = sc->scales()->Get(static_cast<flatbuffers::uoffset_t>(
                (m * row_blocks + r / br) * col_blocks + c / bc));
            v[i] = e4m3_to_float(bytes[i]) * s;
          }
      break;
    }
  }
  for (uint64_t i = 0; i < numel; ++i)
    if (!std::isfinite(v[i]))
      bad(field, cat("holds a NaN or infinity at element ", i, " of ", shape_str(shape)));
}

void Loader::initialise(const fb::Init* init, const char* field, Tensor& out) {
  const auto kind = init->kind();
  if (static_cast<int>(kind) < 0 || static_cast<int>(kind) > static_cast<int>(fb::InitKind::MAX))
    bad(field, cat("init.kind ", static_cast<int>(kind), " is not a known initialiser"));
  const float sd = init->std();
  if (!std::isfinite(sd) || sd < 0.0f) bad(field, "init.std must be finite and >= 0");
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
    if (reinterpret_cast<uintptr_t>(t->shape()->Data()) % alignof(uint64_t) != 0)
      bad(field, "shape vector is not 8-byte aligned: the file is corrupt");
    std::vector<int64_t> given;
    for (uint64_t d : *t->shape()) given.push_back(static_cast<int64_t>(d));
    if (given != shape)
      bad(field, cat("has shape ", shape_str(given), " but the layer needs ", shape_str(shape)));
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
  if (fp32_bytes > memory_limit_ || bytes_loaded_ + fp32_bytes > memory_limit_)
    bad(field, cat("needs ", fp32_bytes, " bytes as fp32 (", bytes_loaded_ + fp32_bytes,
                   " for the model so far), more than this machine's ", memory_limit_));
  bytes_loaded_ += fp32_bytes;

  if (t->dtype() == fb::DType::F8E4M3) {
    const auto* sc = t->scales();
    if (!sc || !sc->scales()) bad(field, "is FP8 but has no block scales");
    if (shape.size() < 2) bad(field, "is FP8 but FP8 needs a matrix (at least 2 dimensions)");
    if (sc->block_rows() == 0 || sc->block_cols() == 0)
      bad(field, "scales.block_rows and scales.block_cols must be at least 1");
    const uint64_t rows = static_cast<uint64_t>(shape[shape.size() - 2]);
    const uint64_t cols = static_cast<uint64_t>(shape.back());
    const uint64_t expected = mul(mul(numel / std::max<uint64_t>(rows * cols, 1),
                                      (rows + sc->block_rows() - 1) / sc->block_rows(), field),
                                  (cols + sc->block_cols() - 1) / sc->block_cols(), field);
    if (sc->scales()->size() != expected)
      bad(field, cat("has ", sc->scales()->size(), " block scales but its shape needs ", expected));
    for (float s : *sc->scales())
      if (!std::isfinite(s)) bad(field, "has a NaN or infinite block scale");
  } else if (t->scales()) {
    bad(field, "has block scales but is not FP8");
  }

  if (t->data()) {
    if (t->data()->size() != bytes)
      bad(field, cat("has ", t->data()->size(), " bytes of data but ", shape_str(shape), " of ",
                     fb::EnumNameDType(t->dtype()), " needs ", bytes));
    decode(t, field, shape, numel, t->data()->data(), out);
  } else if (t->external()) {
    const uint64_t offset = t->external()->offset(), size = t->external()->size();
    if (size != bytes)
      bad(field, cat("external.size is ", size, " bytes but ", shape_str(shape), " of ",
                     fb::EnumNameDType(t->dtype()), " needs ", bytes));
    if (offset % kExternalAlignment != 0)
      bad(field, cat("external.offset ", offset, " is not a multiple of ", kExternalAlignment));
    ExternalFile& file = external(field);
    uint64_t end;
    if (__builtin_add_overflow(offset, size, &end) || end > file.size())
      bad(field, cat("external range [", offset, ", +", size, ") runs past the end of '",
                     file.path(), "' (", file.size(), " bytes)"));
    std::vector<uint8_t> raw(bytes);
    file.read(offset, bytes, raw.data());
    decode(t, field, shape, numel, raw.data(), out);
  } else {
    if (t->dtype() != fb::DType::F32) bad(field, "an initialised tensor must have dtype F32");
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
  bs.aux_alpha = finite(b->aux_alpha(), "balancing.aux_alpha");
  if (bs.aux_alpha < 0.0f) bad("balancing.aux_alpha", "must be >= 0");
  bs.capacity_factor = finite(b->capacity_factor(), "balancing.capacity_factor");
  if (bs.capacity_factor <= 0.0f) bad("balancing.capacity_factor", "must be > 0");

  const int64_t E = r.num_experts, H = s.expert_hidden, D = s.dim;
  mul(mul(E, H, "expert_hidden"), D, "expert_hidden");
  s.gate = tensor(m->gate(), "gate", {E, D}, true);
  s.gate_bias = tensor(m->gate_bias(), "gate_bias", {E}, false);
  if (s.gate_bias.values.empty()) s.gate_bias.values.assign(E, 0.0f);
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
  s.has_bias = !s.bias.values.empty();
  LayerSpec l;
  l.kind = LayerKind::OutputHead;
  l.in_width = s.dim;
  l.out_width = s.vocab_size;
  l.spec = std::move(s);
  return l;
}

std::shared_ptr<const Model> Loader::run() {
  if (root_->schema_major() != kSchemaMajor)
    fail(Code::InvalidModel, "model: schema_major is ", root_->schema_major(),
         " but this library reads schema ", kSchemaMajor,
         root_->schema_major() == 0 ? " (the field is missing)" : "");
  auto model = std::make_shared<Model>();
  model->name = root_->name() ? root_->name()->str() : "";
  model->schema_minor = root_->schema_minor();
  model->seed = root_->seed();
  const auto* layers = root_->layers();
  if (!layers || layers->size() == 0) fail(Code::InvalidModel, "model: has no layers");

  std::set<std::string> names;
  uint32_t width = root_->input_dim();
  for (uint32_t i = 0; i < layers->size(); ++i) {
    const fb::Layer* layer = layers->Get(i);
    layer_index_ = i;
    tensor_slot_ = 0;
    std::string name = layer->name() ? layer->name()->str() : "";
    if (name.empty()) name = "layer" + std::to_string(i);
    const auto kind = layer->kind_type();
    const bool known = kind != fb::LayerKind::NONE &&
                       static_cast<int>(kind) <= static_cast<int>(fb::LayerKind::MAX);
    where_ = cat("layer ", i, " ('", printable(name), "', ",
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
        model->layers.back().kind == LayerKind::OutputHead)
      fail(Code::InvalidModel, where_, ": follows an OutputHead, which must be the last layer");

    LayerSpec spec;
    switch (kind) {
      case fb::LayerKind::Embedding:
        if (i != 0) fail(Code::InvalidModel, where_, ": an Embedding must be the first layer");
        spec = embedding(layer->kind_as_Embedding());
        model->token_input = true;
        model->input_width = spec.in_width;
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
    if (i == 0 && !model->token_input) model->input_width = spec.in_width;
    spec.name = std::move(name);
    width = spec.out_width;
    prev_desc_ = where_;
    model->layers.push_back(std::move(spec));
  }
  model->output_width = width;
  if (root_->training()) training_state(root_->training(), *model);
  return model;
}

void Loader::training_state(const fb::TrainingState* t, Model& model) const {
  auto bad_state = [](const std::string& what) {
    fail(Code::InvalidModel, "checkpoint training state: ", what);
  };
  TrainingState st;
  st.step = t->step();
  st.micro_batches = t->micro_batches();
  if (t->rng())
    for (uint64_t w : *t->rng()) st.rng.push_back(w);
  st.optimizer = t->optimizer() ? t->optimizer()->str() : "";
  if (st.optimizer != "adamw" && st.optimizer != "sgd")
    bad_state(cat("field 'optimizer' is '", st.optimizer, "', expected adamw or sgd"));
  std::set<std::string> seen;
  const auto params = model.parameters();
  if (t->params())
    for (const fb::ParamState* p : *t->params()) {
      const std::string name = p->name() ? p->name()->str() : "";
      const ParamRef* ref = nullptr;
      for (const auto& r : params)
        if (r.name == name) ref = &r;
      if (!ref) bad_state(cat("names a parameter '", name, "' the model does not have"));
      if (!seen.insert(name).second) bad_state(cat("repeats parameter '", name, "'"));
      ParamState ps;
      ps.name = name;
      auto take = [&](const flatbuffers::Vector<float>* v, std::vector<float>& out,
                      const char* field) {
        if (!v || v->size() == 0) return;
        if (static_cast<int64_t>(v->size()) != ref->tensor->numel())
          bad_state(cat("parameter '", name, "' field '", field, "' holds ", v->size(),
                        " values, the parameter has ", ref->tensor->numel()));
        out.assign(v->begin(), v->end());
        for (float x : out)
          if (!std::isfinite(x))
            bad_state(cat("parameter '", name, "' field '", field, "' holds a NaN or infinity"));
      };
      take(p->grad(), ps.grad, "grad");
      take(p->m(), ps.m, "m");
      take(p->v(), ps.v, "v");
      st.params.push_back(std::move(ps));
    }
  if (t->layers())
    for (const fb::LayerBalanceState* l : *t->layers()) {
      if (l->layer() >= model.layers.size() || model.layers[l->layer()].kind != LayerKind::MoE)
        bad_state(cat("balancing state names layer ", l->layer(), ", which is not a MoE layer"));
      const auto& moe = std::get<MoESpec>(model.layers[l->layer()].spec);
      LayerBalanceState ls;
      ls.layer = l->layer();
      ls.gamma = l->gamma();
      ls.frozen = l->frozen();
      if (!std::isfinite(ls.gamma) || ls.gamma < 0.0f)
        bad_state(cat("layer ", l->layer(), " field 'gamma' must be finite and >= 0"));
      if (l->step_counts()) {
        if (l->step_counts()->size() != moe.router.num_experts)
          bad_state(cat("layer ", l->layer(), " field 'step_counts' holds ",
                        l->step_counts()->size(), " counts for ", moe.router.num_experts,
                        " experts"));
        for (int64_t c : *l->step_counts()) {
          if (c < 0) bad_state(cat("layer ", l->layer(), " has a negative token count"));
          ls.step_counts.push_back(c);
        }
      }
      st.layers.push_back(std::move(ls));
    }
  st.digest = t->digest();
  if (st.digest == 0) bad_state("field 'digest' is missing");
  if (checkpoint_digest(model, st) != st.digest)
    bad_state("the digest does not match the content: the checkpoint is corrupt");
  model.training = std::move(st);
}

std::shared_ptr<const Model> parse(const void* data, size_t size, const std::string& external_dir) {
  if (size < 8)
    fail(Code::InvalidModel, "model data is ", size, " bytes: too short to be a moert model");
  if (size >= kMaxBufferSize)
    fail(Code::InvalidModel, "model description is ", size,
         " bytes; FlatBuffers stops at 2 GiB (put weights in external data)");
  if (!data) fail(Code::InvalidArgument, "model data is NULL");
  // Copied into 8-byte-aligned storage: the verifier checks field alignment against it.
  std::vector<uint64_t> aligned((size + 7) / 8);
  std::memcpy(aligned.data(), data, size);
  const auto* bytes = reinterpret_cast<const uint8_t*>(aligned.data());
  if (!fb::ModelBufferHasIdentifier(bytes)) {
    std::string id(reinterpret_cast<const char*>(bytes) + 4, 4);
    for (char& c : id)
      if (c < 32 || c > 126) c = '?';
    fail(Code::InvalidModel, "not a moert model: file identifier is '", id, "', expected '",
         fb::ModelIdentifier(), "'");
  }
  flatbuffers::Verifier verifier(bytes, size, 64, 1000000);
  if (!fb::VerifyModelBuffer(verifier))
    fail(Code::InvalidModel,
         "model failed FlatBuffers verification: the file is truncated or corrupt");
  return Loader(fb::GetModel(bytes), external_dir).run();
}

}  // namespace

std::shared_ptr<const Model> load_model_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(Code::Io, "cannot open model file '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(Code::Io, "model file '", path, "' is not a regular file");
  }
  if (static_cast<uint64_t>(st.st_size) >= kMaxBufferSize) {
    ::close(fd);
    fail(Code::InvalidModel, "model file '", path, "' is ", st.st_size,
         " bytes; FlatBuffers stops at 2 GiB (put weights in external data)");
  }
  std::vector<char> buf(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < buf.size()) {
    const ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = n < 0 ? std::strerror(errno) : "unexpected end of file";
      ::close(fd);
      fail(Code::Io, "cannot read model file '", path, "': ", why);
    }
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  try {
    return parse(buf.data(), buf.size(), dir);
  } catch (const Error& e) {
    throw Error(e.code(), cat("'", path, "': ", e.what()));
  }
}

std::shared_ptr<const Model> load_model_buffer(const void* data, size_t size,
                                               const std::string& external_dir) {
  return parse(data, size, external_dir);
}

}  // namespace moert
