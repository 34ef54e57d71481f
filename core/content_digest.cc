#include "core/content_digest.h"

#include <bit>
#include <cstring>
#include <type_traits>
#include <variant>

// Header-only: the library gains no run-time dependency, and the hash is the one xxHash defines.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/error.h"

namespace moert {

// Floats are hashed as the bytes in memory, which are the file's little-endian bytes only here.
static_assert(std::endian::native == std::endian::little, "moert checkpoints are little-endian");

namespace {
// Distinguishes this stream from any other use of XXH3 and versions its layout.
constexpr std::string_view kDomain = "moert checkpoint content v1";
}  // namespace

struct ContentHasher::State {
  XXH3_state_t xxh;
};

ContentHasher::ContentHasher() : state_(std::make_unique<State>()) {
  XXH3_64bits_reset(&state_->xxh);
  str(kDomain);
}

ContentHasher::~ContentHasher() = default;

void ContentHasher::u8(uint8_t v) { XXH3_64bits_update(&state_->xxh, &v, 1); }
void ContentHasher::u32(uint32_t v) { XXH3_64bits_update(&state_->xxh, &v, sizeof v); }
void ContentHasher::u64(uint64_t v) { XXH3_64bits_update(&state_->xxh, &v, sizeof v); }
void ContentHasher::f32(float v) { u32(std::bit_cast<uint32_t>(v)); }

void ContentHasher::str(std::string_view s) {
  u64(s.size());
  if (!s.empty()) XXH3_64bits_update(&state_->xxh, s.data(), s.size());
}

void ContentHasher::floats(std::span<const float> v) {
  floats_begin(v.size());
  floats_chunk(v);
}

void ContentHasher::floats_begin(uint64_t n) { u64(n); }

void ContentHasher::floats_chunk(std::span<const float> v) {
  if (!v.empty()) XXH3_64bits_update(&state_->xxh, v.data(), v.size_bytes());
}

uint64_t ContentHasher::digest() const {
  const uint64_t d = XXH3_64bits_digest(&state_->xxh);
  return d == 0 ? 1 : d;
}

TrainingStateView view_of(const TrainingState& state) {
  TrainingStateView v;
  v.step = state.step;
  v.micro_batches = state.micro_batches;
  v.rng = state.rng;
  v.optimizer = state.optimizer;
  for (const auto& p : state.params) v.params.push_back({p.name, p.grad, p.m, p.v});
  v.layers = state.layers;
  return v;
}

namespace {

// A resident FP8 tensor is hashed as its decoded values: the digest is of the content, whichever
// form the model holds it in (a checkpoint that stores FP8 weights verifies whether its loader
// keeps them FP8 or decodes them).
void hash_tensor(ContentHasher& h, const Tensor& t) {
  h.u8(t.present() ? 1 : 0);
  if (!t.present()) return;
  h.u64(t.shape.size());
  for (int64_t d : t.shape) h.u64(static_cast<uint64_t>(d));
  if (!t.fp8) {
    h.floats(t.values);
    return;
  }
  const Fp8Blocks& q = *t.fp8;
  h.floats_begin(static_cast<uint64_t>(q.numel()));
  // One matrix at a time: no whole fp32 copy of an expert stack.
  std::vector<float> values(static_cast<size_t>(q.rows * q.cols));
  for (int64_t i = 0; i < q.matrices; ++i) {
    q.decode(i, 1, values.data());
    h.floats_chunk(values);
  }
}

void hash_router(ContentHasher& h, const RouterConfig& r) {
  h.u32(r.num_experts);
  h.u32(r.top_k);
  h.u32(static_cast<uint32_t>(r.score));
  h.u32(r.num_groups);
  h.u32(r.topk_groups);
  h.u8(r.normalize);
  h.f32(r.scaling);
}

void hash_balancing(ContentHasher& h, const BalancingSpec& b) {
  h.u32(static_cast<uint32_t>(b.policy));
  h.f32(b.bias_update_rate);
  h.u8(b.bias_centering);
  h.u8(b.bias_frozen);
  h.f32(b.aux_alpha);
  h.f32(b.capacity_factor);
}

}  // namespace

void hash_model(ContentHasher& h, const Model& model) {
  h.str(model.name);
  h.u64(model.seed);
  h.u8(model.token_input);
  h.u32(model.input_width);
  h.u64(model.layers.size());
  for (const LayerSpec& l : model.layers) {
    h.str(l.name);
    h.u32(static_cast<uint32_t>(l.kind));
    h.u32(l.in_width);
    h.u32(l.out_width);
    std::visit(
        [&](const auto& s) {
          using S = std::decay_t<decltype(s)>;
          if constexpr (std::is_same_v<S, EmbeddingSpec>) {
            h.u32(s.vocab_size);
            h.u32(s.dim);
            h.u32(s.context);
          } else if constexpr (std::is_same_v<S, RMSNormSpec>) {
            h.u32(s.dim);
            h.f32(s.eps);
          } else if constexpr (std::is_same_v<S, DenseFFNSpec>) {
            h.u32(s.dim);
            h.u32(s.hidden);
            h.u8(s.residual);
          } else if constexpr (std::is_same_v<S, MoESpec>) {
            h.u32(s.dim);
            h.u32(s.expert_hidden);
            h.u32(s.num_shared);
            h.u32(s.shared_hidden);
            h.u8(s.residual);
            hash_router(h, s.router);
            hash_balancing(h, s.balancing);
            hash_tensor(h, s.gate_bias);
          } else {
            h.u32(s.dim);
            h.u32(s.vocab_size);
            h.u8(s.has_bias);
          }
        },
        l.spec);
    visit_tensors(l, [&](const char*, const Tensor& t) { hash_tensor(h, t); });
  }
}

void hash_state_header(ContentHasher& h, uint64_t step, uint32_t micro_batches,
                       std::span<const uint64_t> rng, std::string_view optimizer,
                       uint64_t num_params) {
  h.u64(step);
  h.u32(micro_batches);
  h.u64(rng.size());
  for (uint64_t w : rng) h.u64(w);
  h.str(optimizer);
  h.u64(num_params);
}

void hash_layer_states(ContentHasher& h, std::span<const LayerBalanceState> layers) {
  h.u64(layers.size());
  for (const auto& l : layers) {
    h.u32(l.layer);
    h.u64(l.step_counts.size());
    for (int64_t c : l.step_counts) h.u64(static_cast<uint64_t>(c));
    h.f32(l.gamma);
    h.u8(l.frozen);
  }
}

uint64_t checkpoint_digest(const Model& model, const TrainingStateView& state) {
  ContentHasher h;
  hash_model(h, model);
  hash_state_header(h, state.step, state.micro_batches, state.rng, state.optimizer,
                    state.params.size());
  for (const auto& p : state.params) {
    h.str(p.name);
    h.floats(p.grad);
    h.floats(p.m);
    h.floats(p.v);
  }
  hash_layer_states(h, state.layers);
  return h.digest();
}

}  // namespace moert
