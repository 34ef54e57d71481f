// Crafts moert model files for the C ABI tests with the FlatBuffers builder of the schema
// (schemas/moert.fbs). A description below is plain data: a test starts from a valid baseline,
// breaks one field, and serialises it. Every field the loader checks can be set to any raw value,
// including out-of-range enums and absent "required" scalars.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace capi_test {

struct TensorDesc {
  enum class Source { kData, kExternal, kInit, kNothing };
  bool present = true;  // false: the tensor field is absent from its layer
  Source source = Source::kInit;
  std::optional<std::vector<uint64_t>> shape;  // the optional check shape
  int8_t dtype = 0;                            // DType: 0 F32, 1 BF16, 2 F8E4M3
  std::vector<uint8_t> data;                   // kData
  uint64_t ext_offset = 0, ext_size = 0;       // kExternal
  int8_t init_kind = 2;                        // kInit: InitKind, 2 = Normal
  float init_std = 0.1f;
  uint64_t init_seed = 0;
  bool also_init = false;   // an Init table besides the data or external source (invalid)
  bool has_scales = false;  // BlockScales table (FP8)
  uint32_t block_rows = 128, block_cols = 128;
  std::vector<float> scales;

  static TensorDesc absent();
  static TensorDesc init(int8_t kind = 2, float std = 0.1f);
  static TensorDesc f32(const std::vector<float>& values);
  static TensorDesc bf16(const std::vector<float>& values);  // truncated to bf16
  static TensorDesc external(uint64_t offset, uint64_t size);
};

struct EmbeddingDesc {
  uint32_t vocab_size = 16, dim = 8, context = 1;
  TensorDesc weight;
};

struct RMSNormDesc {
  uint32_t dim = 8;
  float eps = 1e-6f;
  TensorDesc weight = TensorDesc::init(1);
};

struct DenseDesc {
  uint32_t dim = 8, hidden = 8;
  bool residual = true;
  TensorDesc w1, w3, w2;
};

struct BalancingDesc {
  bool present = true;
  std::optional<int8_t> policy = 1;  // LossFreeBias
  float bias_update_rate = 1e-3f;
  bool bias_centering = false;
  bool bias_frozen = false;
  float aux_alpha = 0.0f;  // written as moert's writer does: where the policy needs it, or not 0
  bool leave_out_aux_alpha = false;
  float capacity_factor = 1.0f;
};

struct MoEDesc {
  uint32_t dim = 8;
  std::optional<uint32_t> num_experts = 4, top_k = 2, expert_hidden = 4;
  std::optional<int8_t> score_function = 0;  // Sigmoid
  std::optional<uint32_t> num_groups = 2, topk_groups = 1;
  std::optional<bool> normalize_weights = true;
  std::optional<float> routed_scaling_factor = 2.5f;
  uint32_t num_shared = 0, shared_hidden = 0;
  bool residual = true;
  BalancingDesc balancing;
  TensorDesc gate, gate_bias = TensorDesc::absent(), w1, w3, w2;
  TensorDesc shared_w1 = TensorDesc::absent(), shared_w3 = TensorDesc::absent(),
             shared_w2 = TensorDesc::absent();
};

struct HeadDesc {
  uint32_t dim = 8, vocab_size = 16;
  TensorDesc weight, bias = TensorDesc::absent();
};

// Which table a layer's union value holds; independent of the kind_type written beside it, so
// that a test can write a type that disagrees with (or lies outside) the union.
enum class Body { kNone, kEmbedding, kRMSNorm, kMoE, kDenseFFN, kOutputHead };

struct LayerDesc {
  std::optional<std::string> name;
  uint8_t kind_type = 0;  // LayerKind: 1 Embedding .. 5 OutputHead
  Body body = Body::kNone;
  EmbeddingDesc embedding;
  RMSNormDesc rmsnorm;
  MoEDesc moe;
  DenseDesc dense;
  HeadDesc head;
};

struct ModelDesc {
  uint16_t schema_major = 1, schema_minor = 0;
  std::optional<std::string> name = "capi-test";
  uint32_t input_dim = 0;
  std::vector<LayerDesc> layers;
  uint64_t seed = 7;
  std::optional<std::string> external_data;
};

LayerDesc embedding_layer(const std::string& name, uint32_t vocab, uint32_t dim, uint32_t context);
LayerDesc rmsnorm_layer(const std::string& name, uint32_t dim);
LayerDesc moe_layer(const std::string& name, uint32_t dim);
LayerDesc dense_layer(const std::string& name, uint32_t dim, uint32_t hidden);
LayerDesc head_layer(const std::string& name, uint32_t dim, uint32_t vocab);

// Token input: embed (vocab 16, dim 8, inline F32), norm0, moe0 (E 4, K 2, groups 2/1, inline
// gate_bias), ffn0 (BF16 inline w2), head (vocab 16, inline bias). Valid.
ModelDesc token_baseline();
inline constexpr uint32_t kEmbed = 0, kNorm = 1, kMoE = 2, kFfn = 3, kHead = 4;

// Hidden-state input of width 8: norm0, moe0, head (vocab 16). Valid.
ModelDesc hidden_baseline();

// Serialises a description with the schema's file identifier.
std::vector<uint8_t> build(const ModelDesc& model);

// Deterministic small values for inline data.
std::vector<float> ramp(size_t n, float scale = 0.05f);

}  // namespace capi_test
