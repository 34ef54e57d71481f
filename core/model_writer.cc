#include "core/model_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "moert_generated.h"

namespace moert {
namespace {

using flatbuffers::FlatBufferBuilder;
using flatbuffers::Offset;

// FlatBuffers offsets are 32-bit; stay clear of the limit instead of letting the builder assert.
constexpr uint64_t kMaxSerialized = (uint64_t{1} << 31) - (uint64_t{64} << 20);

Offset<fb::Tensor> tensor(FlatBufferBuilder& fbb, const Tensor& t) {
  if (t.values.empty()) return 0;
  std::vector<uint64_t> dims(t.shape.begin(), t.shape.end());
  auto shape = fbb.CreateVector(dims);
  const size_t bytes = t.values.size() * sizeof(float);
  fbb.ForceVectorAlignment(bytes, 1, 32);
  auto data = fbb.CreateVector(reinterpret_cast<const uint8_t*>(t.values.data()), bytes);
  fb::TensorBuilder b(fbb);
  b.add_shape(shape);
  b.add_dtype(fb::DType::F32);
  b.add_data(data);
  return b.Finish();
}

Offset<fb::Layer> layer(FlatBufferBuilder& fbb, const LayerSpec& l) {
  auto name = fbb.CreateString(l.name);
  fb::LayerKind type = fb::LayerKind::NONE;
  Offset<void> body;
  std::visit(
      [&](const auto& s) {
        using S = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<S, EmbeddingSpec>) {
          auto w = tensor(fbb, s.weight);
          body = fb::CreateEmbedding(fbb, s.vocab_size, s.dim, s.context, w).Union();
          type = fb::LayerKind::Embedding;
        } else if constexpr (std::is_same_v<S, RMSNormSpec>) {
          auto w = tensor(fbb, s.weight);
          body = fb::CreateRMSNorm(fbb, s.dim, s.eps, w).Union();
          type = fb::LayerKind::RMSNorm;
        } else if constexpr (std::is_same_v<S, DenseFFNSpec>) {
          auto w1 = tensor(fbb, s.w1), w3 = tensor(fbb, s.w3), w2 = tensor(fbb, s.w2);
          body = fb::CreateDenseFFN(fbb, s.dim, s.hidden, s.residual, w1, w3, w2).Union();
          type = fb::LayerKind::DenseFFN;
        } else if constexpr (std::is_same_v<S, MoESpec>) {
          const BalancingSpec& b = s.balancing;
          auto bal = fb::CreateBalancing(
              fbb, static_cast<fb::BalancingPolicy>(static_cast<int>(b.policy)), b.bias_update_rate,
              b.bias_centering, b.bias_frozen, b.aux_alpha, b.capacity_factor);
          auto gate = tensor(fbb, s.gate), bias = tensor(fbb, s.gate_bias);
          auto w1 = tensor(fbb, s.w1), w3 = tensor(fbb, s.w3), w2 = tensor(fbb, s.w2);
          auto sw1 = tensor(fbb, s.shared_w1), sw3 = tensor(fbb, s.shared_w3),
               sw2 = tensor(fbb, s.shared_w2);
          const RouterConfig& r = s.router;
          body =
              fb::CreateMoE(fbb, s.dim, r.num_experts, r.top_k, s.expert_hidden,
                            r.score == ScoreFunction::Sigmoid ? fb::ScoreFunction::Sigmoid
                                                              : fb::ScoreFunction::Softmax,
                            r.num_groups, r.topk_groups, r.normalize, r.scaling, s.num_shared,
                            s.shared_hidden, s.residual, bal, gate, bias, w1, w3, w2, sw1, sw3, sw2)
                  .Union();
          type = fb::LayerKind::MoE;
        } else {
          auto w = tensor(fbb, s.weight), b = tensor(fbb, s.bias);
          body = fb::CreateOutputHead(fbb, s.dim, s.vocab_size, w, b).Union();
          type = fb::LayerKind::OutputHead;
        }
      },
      l.spec);
  return fb::CreateLayer(fbb, name, type, body);
}

Offset<fb::TrainingState> training_state(FlatBufferBuilder& fbb, const TrainingState& t) {
  std::vector<Offset<fb::ParamState>> params;
  for (const auto& p : t.params)
    params.push_back(fb::CreateParamState(fbb, fbb.CreateString(p.name), fbb.CreateVector(p.grad),
                                          fbb.CreateVector(p.m), fbb.CreateVector(p.v)));
  std::vector<Offset<fb::LayerBalanceState>> layers;
  for (const auto& l : t.layers)
    layers.push_back(fb::CreateLayerBalanceState(fbb, l.layer, fbb.CreateVector(l.step_counts),
                                                 l.gamma, l.frozen));
  return fb::CreateTrainingState(fbb, t.step, t.micro_batches, fbb.CreateVector(t.rng),
                                 fbb.CreateString(t.optimizer), fbb.CreateVector(params),
                                 fbb.CreateVector(layers), t.digest);
}

uint64_t estimate_bytes(const Model& model, const TrainingState* t) {
  uint64_t n = 1 << 20;
  for (const auto& p : model.parameters()) n += static_cast<uint64_t>(p.tensor->numel()) * 4 + 256;
  if (t)
    for (const auto& p : t->params) n += (p.grad.size() + p.m.size() + p.v.size()) * 4 + 256;
  return n;
}

}  // namespace

std::vector<uint8_t> serialize_model(const Model& model, const TrainingState* training) {
  const uint64_t estimate = estimate_bytes(model, training);
  if (estimate > kMaxSerialized)
    fail(Code::Unsupported, "the model with its state needs about ", estimate >> 20,
         " MiB, more than one FlatBuffers file holds (2 GiB); external checkpoint data is not "
         "supported yet");
  FlatBufferBuilder fbb(static_cast<size_t>(estimate));
  std::vector<Offset<fb::Layer>> layers;
  for (const auto& l : model.layers) layers.push_back(layer(fbb, l));
  auto layer_vec = fbb.CreateVector(layers);
  auto name = fbb.CreateString(model.name);
  Offset<fb::TrainingState> state = training ? training_state(fbb, *training) : 0;
  fb::ModelBuilder b(fbb);
  b.add_schema_major(static_cast<uint16_t>(kSchemaMajor));
  b.add_schema_minor(static_cast<uint16_t>(kSchemaMinor));
  b.add_name(name);
  if (!model.token_input) b.add_input_dim(model.input_width);
  b.add_layers(layer_vec);
  b.add_seed(model.seed);
  if (training) b.add_training(state);
  fbb.Finish(b.Finish(), fb::ModelIdentifier());
  return std::vector<uint8_t>(fbb.GetBufferPointer(), fbb.GetBufferPointer() + fbb.GetSize());
}

uint64_t checkpoint_digest(const Model& model, const TrainingState& state) {
  TrainingState zeroed = state;
  zeroed.digest = 0;
  const std::vector<uint8_t> bytes = serialize_model(model, &zeroed);
  // 64-bit words through the splitmix64 finaliser, chained: a damaged byte anywhere changes it.
  uint64_t h = 0x9E3779B97F4A7C15ull ^ bytes.size();
  auto mix = [](uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    h = mix(h ^ w) + 0x632BE59BD9B4E019ull;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, bytes.data() + i, bytes.size() - i);
  h = mix(h ^ tail ^ (static_cast<uint64_t>(bytes.size() - i) << 56));
  return h == 0 ? 1 : h;  // 0 means "no digest"
}

void write_file_atomically(const std::string& path, const std::vector<uint8_t>& bytes) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  // Appended piece by piece: GCC 12 at -O3 warns falsely (-Wrestrict) on the chained operator+.
  std::string hidden = ".";
  hidden.append(target.filename().string());
  hidden.append(".tmp-XXXXXX");
  std::string tmpl = (dir / hidden).string();
  const int fd = ::mkstemp(tmpl.data());
  if (fd < 0)
    fail(Code::Io, "cannot create a temporary file in '", dir.string(),
         "': ", std::strerror(errno));
  auto give_up = [&](const char* what) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    ::unlink(tmpl.c_str());
    fail(Code::Io, "cannot write checkpoint '", path, "': ", what, ": ", why);
  };
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) give_up("write");
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) give_up("fsync");
  if (::close(fd) != 0) {
    ::unlink(tmpl.c_str());
    fail(Code::Io, "cannot write checkpoint '", path, "': close: ", std::strerror(errno));
  }
  if (::rename(tmpl.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmpl.c_str());
    fail(Code::Io, "cannot write checkpoint '", path, "': rename: ", why);
  }
  // Make the rename itself durable.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace moert
