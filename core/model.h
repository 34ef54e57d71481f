// The validated in-memory model: what the loader produces from a description and what sessions are
// built from. Every invariant the loader checks holds here, so consumers need not re-check.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "core/shared_copies.h"
#include "kernels/fp8_rules.h"

namespace moert {

// The schema version this library reads (schemas/moert.fbs): any minor of this major.
inline constexpr uint32_t kSchemaMajor = 1;
inline constexpr uint32_t kSchemaMinor = 1;

enum class LayerKind : int32_t {
  Embedding = 1,
  RMSNorm = 2,
  MoE = 3,
  DenseFFN = 4,
  OutputHead = 5
};
enum class ScoreFunction : int32_t { Sigmoid = 0, Softmax = 1 };
enum class BalancingPolicy : int32_t {
  None = 0,
  LossFreeBias = 1,
  AuxLoss = 2,
  SequenceAuxLoss = 3,
  ExpertChoice = 4,
};

const char* layer_kind_name(LayerKind kind);

// A stack of matrices [..., rows, cols] as block-scaled FP8 (E4M3) codes in 128x128 blocks
// (kernels/fp8_rules.h), as a model file stores them: 1 byte per value plus one fp32 scale per
// block, kept so instead of being decoded to fp32 (docs/design.md section 5). The scales are laid
// out as core/backend.h's Fp8Weight reads them, so that a backend multiplies these very bytes:
// block (rb, cb) of matrix i at i * matrix_scales() + rb * scale_ld() + cb; the padding of each
// row of scales (scale_ld() - blocks_of(cols) floats) is 0 and never read.
struct Fp8Blocks {
  int64_t matrices = 0, rows = 0, cols = 0;
  std::vector<uint8_t> codes;  // [matrices, rows, cols]
  std::vector<float> scales;   // matrices * matrix_scales()

  int64_t numel() const { return matrices * rows * cols; }
  int64_t scale_ld() const { return fp8::block_scale_ld(cols); }
  int64_t matrix_scales() const { return fp8::blocks_of(rows) * scale_ld(); }
  uint64_t bytes() const { return codes.size() + scales.size() * sizeof(float); }
  // The values of matrices [first, first + count) as fp32, e4m3_to_float(code) * scale, into
  // out[count * rows * cols].
  void decode(int64_t first, int64_t count, float* out) const;
};

// The element type a tensor was read as (the schema's DType; initialised tensors are F32): what
// `moert inspect` reports beside what is held in memory.
enum class StoredType : uint8_t { F32 = 0, BF16 = 1, F8E4M3 = 2 };

// A host tensor, row-major: fp32 values, or (a weight read from an FP8 file) resident FP8 codes.
// An absent tensor (an optional bias, the shared experts of a layer without any) has neither.
// Read through present(), numel() and decode_fp32() unless the representation matters: `values`
// is empty for a resident FP8 tensor, and data() refuses one rather than hand out no values.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> values;
  // Set, with `values` empty, for a resident FP8 tensor. Never modified once loaded: copies of a
  // model share the codes.
  std::shared_ptr<const Fp8Blocks> fp8;
  StoredType stored = StoredType::F32;
  // Set, with `values` empty and `fp8` null, by a description-only load (LoadOptions) for a
  // tensor its file gives values to: how a full load would hold it. Its values were neither read
  // nor initialised.
  struct Unloaded {
    uint64_t bytes = 0;
    bool fp8 = false;  // as resident FP8 codes and scales
  };
  std::optional<Unloaded> unloaded;

  bool present() const { return !values.empty() || fp8 != nullptr || unloaded; }
  int64_t numel() const {
    if (fp8) return fp8->numel();
    if (unloaded) return shape_numel();
    return static_cast<int64_t>(values.size());
  }
  // Whether it is (or, unloaded, would be) held as resident FP8 codes and scales.
  bool held_fp8() const { return fp8 != nullptr || (unloaded && unloaded->fp8); }
  // Bytes the values take in memory: 4 per fp32 value, or the FP8 codes and scales.
  uint64_t resident_bytes() const {
    if (unloaded) return unloaded->bytes;
    return fp8 ? fp8->bytes() : static_cast<uint64_t>(values.size()) * sizeof(float);
  }
  // The fp32 values; throws Error(Internal) for a resident FP8 tensor (decode it first) or an
  // unloaded one.
  float* data() {
    if (fp8 || unloaded) refuse_data();
    return values.data();
  }
  const float* data() const {
    if (fp8 || unloaded) refuse_data();
    return values.data();
  }
  // The values as fp32 whatever the representation (a copy).
  std::vector<float> decode_fp32() const;
  // Turns a resident FP8 tensor into fp32 values (decoded as decode_fp32() does); no-op otherwise.
  void make_fp32();

 private:
  int64_t shape_numel() const;
  [[noreturn]] void refuse_data() const;
};

struct EmbeddingSpec {
  uint32_t vocab_size = 0;
  uint32_t dim = 0;      // per token
  uint32_t context = 1;  // tokens per row; the output row is context * dim wide
  Tensor weight;         // [vocab_size, dim]
};

struct RMSNormSpec {
  uint32_t dim = 0;
  float eps = 1e-6f;
  Tensor weight;  // [dim]
};

struct DenseFFNSpec {
  uint32_t dim = 0;
  uint32_t hidden = 0;
  bool residual = true;
  Tensor w1, w3;  // [hidden, dim]
  Tensor w2;      // [dim, hidden]
};

// Everything the router needs; see docs/design.md section 1.
struct RouterConfig {
  uint32_t num_experts = 0;
  uint32_t top_k = 0;
  ScoreFunction score = ScoreFunction::Sigmoid;
  uint32_t num_groups = 1;
  uint32_t topk_groups = 1;
  bool normalize = false;
  float scaling = 1.0f;
};

struct BalancingSpec {
  BalancingPolicy policy = BalancingPolicy::None;
  float bias_update_rate = 1e-3f;
  bool bias_centering = false;
  bool bias_frozen = false;
  float aux_alpha = 0.0f;
  float capacity_factor = 1.0f;
};

struct MoESpec {
  uint32_t dim = 0;
  uint32_t expert_hidden = 0;
  uint32_t num_shared = 0;
  uint32_t shared_hidden = 0;
  bool residual = true;
  RouterConfig router;
  BalancingSpec balancing;
  Tensor gate;                  // [E, dim]
  Tensor gate_bias;             // [E], never a trained parameter
  Tensor w1, w3;                // [E, expert_hidden, dim]
  Tensor w2;                    // [E, dim, expert_hidden]
  Tensor shared_w1, shared_w3;  // [S, shared_hidden, dim]
  Tensor shared_w2;             // [S, dim, shared_hidden]
};

struct OutputHeadSpec {
  uint32_t dim = 0;
  uint32_t vocab_size = 0;
  bool has_bias = false;
  Tensor weight;  // [vocab_size, dim]
  Tensor bias;    // [vocab_size] when has_bias
};

struct LayerSpec {
  std::string name;
  LayerKind kind = LayerKind::RMSNorm;
  uint32_t in_width = 0;   // values per input row (tokens for an embedding)
  uint32_t out_width = 0;  // values per output row
  std::variant<EmbeddingSpec, RMSNormSpec, MoESpec, DenseFFNSpec, OutputHeadSpec> spec;
};

// A named view of one trainable tensor of a model, in a fixed order shared by every consumer.
struct ParamRef {
  std::string name;  // "<layer name>.<tensor>"
  uint32_t layer = 0;
  const Tensor* tensor = nullptr;
};

// Calls f(field name, tensor) for every trainable tensor of a layer, present or not, in the
// fixed order of the schema. Works on const and mutable layers alike.
template <typename LayerSpecT, typename F>
void visit_tensors(LayerSpecT& layer, F&& f) {
  std::visit(
      [&](auto& s) {
        using S = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<S, EmbeddingSpec> || std::is_same_v<S, RMSNormSpec>) {
          f("weight", s.weight);
        } else if constexpr (std::is_same_v<S, DenseFFNSpec>) {
          f("w1", s.w1);
          f("w3", s.w3);
          f("w2", s.w2);
        } else if constexpr (std::is_same_v<S, MoESpec>) {
          f("gate", s.gate);
          f("w1", s.w1);
          f("w3", s.w3);
          f("w2", s.w2);
          f("shared_w1", s.shared_w1);
          f("shared_w3", s.shared_w3);
          f("shared_w2", s.shared_w2);
        } else {
          f("weight", s.weight);
          f("bias", s.bias);
        }
      },
      layer.spec);
}

// Optimizer state of one parameter in a checkpoint; empty vectors where the state has none.
struct ParamState {
  std::string name;
  std::vector<float> grad, m, v;
};

// Balancing state of one MoE layer in a checkpoint.
struct LayerBalanceState {
  uint32_t layer = 0;
  std::vector<int64_t> step_counts;
  float gamma = 0.0f;
  bool frozen = false;
};

// What a checkpoint adds to a model description.
struct TrainingState {
  uint64_t step = 0;
  uint32_t micro_batches = 0;
  std::vector<uint64_t> rng;  // generator words
  std::string optimizer;
  std::vector<ParamState> params;
  std::vector<LayerBalanceState> layers;
  uint64_t digest = 0;
};

// What a checkpoint loaded as a plain model still says of its training state, the rest being
// dropped: for inspection (moert_model_checkpoint_step(), the MOERT_MOE_SAVED_* keys).
struct CheckpointSummary {
  uint64_t step = 0;
  std::vector<LayerBalanceState> layers;  // their counts left out
};

struct Model {
  std::string name;
  uint32_t schema_minor = 0;
  bool token_input = false;  // first layer is an Embedding
  uint32_t input_width = 0;  // tokens per row, or hidden width
  uint32_t output_width = 0;
  uint64_t seed = 0;
  std::vector<LayerSpec> layers;
  std::optional<TrainingState> training;        // checkpoints only
  std::optional<CheckpointSummary> checkpoint;  // loaded from a checkpoint, whatever the policy
  // The copies derived from its weights (decoded, layout, bf16, FP8) that the inference
  // sessions over this model share.
  SharedCopiesSlot shared_copies;
  // Loaded description-only (LoadOptions::description_only): its tensors are unloaded (shapes,
  // element types and sizes only), so it can be inspected but not run, trained, saved or
  // quantized (require_weights).
  bool description_only = false;

  uint64_t total_parameters() const;
  uint64_t activated_parameters() const;
  // Every trainable tensor (the loss-free bias is state, not a parameter), in layer order.
  std::vector<ParamRef> parameters() const;
  // Bytes every tensor (the loss-free bias included) takes in memory as held: fp32 values, or
  // resident FP8 codes and scales.
  uint64_t resident_bytes() const;
  // Decodes every resident FP8 tensor to fp32 (a training session's master weights).
  void make_fp32();
  // Throws Error(InvalidArgument) naming `use` for a description-only model.
  void require_weights(const char* use) const;
};

}  // namespace moert
