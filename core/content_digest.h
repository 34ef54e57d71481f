// The checkpoint digest: XXH3-64 over a checkpoint's content (model and training state) in one
// canonical order, independent of how a file lays the content out (inline or in external data,
// field order, padding, the writer's compiler). The writer and the loader both feed a
// ContentHasher through the same functions, so what is verified on load is the content itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "core/model.h"

namespace moert {

// One parameter's optimizer state as save sees it: views of memory the caller keeps alive
// (backend memory on host backends, so saving copies nothing). An empty span is an absent vector.
struct ParamStateView {
  std::string_view name;
  std::span<const float> grad, m, v;
};

// A checkpoint's training state, viewed.
struct TrainingStateView {
  uint64_t step = 0;
  uint32_t micro_batches = 0;
  std::span<const uint64_t> rng;
  std::string_view optimizer;
  std::vector<ParamStateView> params;
  std::span<const LayerBalanceState> layers;
};

// A view of an owned state (valid while `state` is).
TrainingStateView view_of(const TrainingState& state);

// Streams values into XXH3-64. Every variable-length item carries its length, so that two
// different contents never produce the same stream.
class ContentHasher {
 public:
  ContentHasher();
  ~ContentHasher();
  ContentHasher(const ContentHasher&) = delete;
  ContentHasher& operator=(const ContentHasher&) = delete;

  void u8(uint8_t v);
  void u32(uint32_t v);
  void u64(uint64_t v);
  void f32(float v);
  void str(std::string_view s);
  // A float array: its length, then its elements. floats_begin + floats_chunk in pieces adding up
  // to n give the same digest as floats() over the whole array.
  void floats(std::span<const float> v);
  void floats_begin(uint64_t n);
  void floats_chunk(std::span<const float> v);

  // The digest; never 0, which files use for "no digest".
  uint64_t digest() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The model's part of the stream: its name, seed, every layer's configuration and tensor.
void hash_model(ContentHasher& h, const Model& model);
// The training state's part: header, then each parameter's state, then each MoE layer's.
void hash_state_header(ContentHasher& h, uint64_t step, uint32_t micro_batches,
                       std::span<const uint64_t> rng, std::string_view optimizer,
                       uint64_t num_params);
void hash_layer_states(ContentHasher& h, std::span<const LayerBalanceState> layers);

// The digest of a checkpoint of `model` with `state`.
uint64_t checkpoint_digest(const Model& model, const TrainingStateView& state);

}  // namespace moert
