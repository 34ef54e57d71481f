#include "cli/model_info.h"

#include <algorithm>
#include <cstdint>

#include "cli/error.h"

namespace moert_cli {

const char* const kFlopsFormula =
    "Forward FLOPs per token count 2 FLOPs per multiply-add of the GEMMs a token passes\n"
    "through (d = layer width, V = vocabulary):\n"
    "  MoE        2*d*E (router) + K*6*d*h (K routed SwiGLU experts of hidden h: W1, W3, W2)\n"
    "             + S*6*d*hs (S shared experts of hidden hs)\n"
    "  DenseFFN   6*d*h\n"
    "  OutputHead 2*d*V\n"
    "Embedding lookups, norms, activations and the softmax are not counted. The dense-equivalent\n"
    "figure is the same sum with K replaced by E (every routed expert active). Under Expert "
    "Choice\n"
    "K is the average capacity_factor*top_k.";

double MoEInfo::experts_per_token() const {
  if (policy == MOERT_BALANCING_EXPERT_CHOICE) return capacity_factor * static_cast<double>(top_k);
  return static_cast<double>(top_k);
}

const char* layer_kind_name(int32_t kind) {
  switch (kind) {
    case MOERT_LAYER_EMBEDDING:
      return "Embedding";
    case MOERT_LAYER_RMSNORM:
      return "RMSNorm";
    case MOERT_LAYER_MOE:
      return "MoE";
    case MOERT_LAYER_DENSE_FFN:
      return "DenseFFN";
    case MOERT_LAYER_OUTPUT_HEAD:
      return "OutputHead";
  }
  return "unknown";
}

const char* balancing_name(int64_t policy) {
  switch (policy) {
    case MOERT_BALANCING_NONE:
      return "none";
    case MOERT_BALANCING_LOSS_FREE_BIAS:
      return "loss-free bias";
    case MOERT_BALANCING_AUX_LOSS:
      return "auxiliary loss";
    case MOERT_BALANCING_SEQUENCE_AUX_LOSS:
      return "sequence-wise auxiliary loss";
    case MOERT_BALANCING_EXPERT_CHOICE:
      return "expert choice";
  }
  return "unknown";
}

const char* score_name(int64_t score) {
  return score == MOERT_SCORE_SIGMOID ? "sigmoid" : score == MOERT_SCORE_SOFTMAX ? "softmax" : "?";
}

namespace {

MoEInfo read_moe(const moert_model* m, uint32_t i) {
  MoEInfo o;
  o.num_experts = moe_int(m, i, MOERT_MOE_NUM_EXPERTS);
  o.top_k = moe_int(m, i, MOERT_MOE_TOP_K);
  o.expert_hidden = moe_int(m, i, MOERT_MOE_EXPERT_HIDDEN);
  o.score_function = moe_int(m, i, MOERT_MOE_SCORE_FUNCTION);
  o.num_groups = moe_int(m, i, MOERT_MOE_NUM_GROUPS);
  o.topk_groups = moe_int(m, i, MOERT_MOE_TOPK_GROUPS);
  o.normalize = moe_int(m, i, MOERT_MOE_NORMALIZE_WEIGHTS);
  o.num_shared = moe_int(m, i, MOERT_MOE_NUM_SHARED_EXPERTS);
  o.shared_hidden = moe_int(m, i, MOERT_MOE_SHARED_HIDDEN);
  o.residual = moe_int(m, i, MOERT_MOE_RESIDUAL);
  o.policy = moe_int(m, i, MOERT_MOE_BALANCING_POLICY);
  o.bias_centering = moe_int(m, i, MOERT_MOE_BIAS_CENTERING);
  o.bias_frozen = moe_int(m, i, MOERT_MOE_BIAS_FROZEN);
  o.scaling = moe_float(m, i, MOERT_MOE_ROUTED_SCALING_FACTOR);
  o.gamma = moe_float(m, i, MOERT_MOE_BIAS_UPDATE_RATE);
  o.aux_alpha = moe_float(m, i, MOERT_MOE_AUX_ALPHA);
  o.capacity_factor = moe_float(m, i, MOERT_MOE_CAPACITY_FACTOR);
  return o;
}

// Element counts of each parameter tensor (the loss-free bias is state, not a parameter), keyed by
// layer and field name.
struct TensorSizes {
  std::vector<std::vector<std::pair<std::string, uint64_t>>> by_layer;
  uint64_t get(uint32_t layer, const std::string& tensor) const {
    for (const auto& [n, size] : by_layer[layer])
      if (n == tensor) return size;
    return 0;
  }
};

const char* dtype_name(int32_t dtype) {
  switch (dtype) {
    case MOERT_DTYPE_F32:
      return "f32";
    case MOERT_DTYPE_BF16:
      return "bf16";
    case MOERT_DTYPE_F8E4M3:
      return "fp8 e4m3";
    default:
      return "unknown";
  }
}

// Every weight tensor of layer i as the model holds it.
std::vector<TensorInfo> layer_tensors(const moert_model* model, uint32_t i) {
  uint32_t n = 0;
  check(moert_model_num_tensors(model, i, &n), "model");
  std::vector<TensorInfo> out(n);
  for (uint32_t k = 0; k < n; ++k) {
    TensorInfo& t = out[k];
    const char* field = nullptr;
    check(moert_model_tensor_info(model, i, k, &field, &t.stored, &t.held, &t.numel, &t.bytes),
          "model");
    t.field = field;
  }
  return out;
}

}  // namespace

std::string TensorInfo::stored_text() const { return dtype_name(stored); }

std::string TensorInfo::held_text() const {
  // The loader keeps FP8 weights resident exactly when their blocks are 128x128.
  return held == MOERT_DTYPE_F8E4M3 ? "fp8 e4m3 128x128" : dtype_name(held);
}

ModelInfo describe_model(const moert_model* model) {
  ModelInfo info;
  const char* name = nullptr;
  check(moert_model_name(model, &name), "model");
  info.name = name;
  check(moert_model_io(model, &info.input_kind, &info.input_width, &info.output_width), "model");
  check(moert_model_num_parameters(model, &info.total_parameters, &info.activated_parameters),
        "model");
  uint32_t n = 0;
  check(moert_model_num_layers(model, &n), "model");
  std::vector<std::string> names(n);
  for (uint32_t i = 0; i < n; ++i) {
    const char* lname = nullptr;
    check(moert_model_layer_name(model, i, &lname), "model");
    names[i] = lname;
  }
  TensorSizes sizes;
  sizes.by_layer.resize(n);
  std::vector<std::vector<TensorInfo>> tensors(n);
  for (uint32_t i = 0; i < n; ++i) {
    tensors[i] = layer_tensors(model, i);
    for (const TensorInfo& t : tensors[i])
      if (t.field != "gate_bias") sizes.by_layer[i].emplace_back(t.field, t.numel);
  }
  check(moert_model_resident_bytes(model, &info.resident_bytes), "model");
  int32_t is_checkpoint = 0;
  check(moert_model_checkpoint_step(model, &is_checkpoint, &info.checkpoint_step), "model");
  info.checkpoint = is_checkpoint != 0;

  for (uint32_t i = 0; i < n; ++i) {
    LayerInfo l;
    l.index = i;
    l.name = names[i];
    l.tensors = std::move(tensors[i]);
    check(moert_model_layer_kind(model, i, &l.kind), "model");
    check(moert_model_layer_dims(model, i, &l.in_width, &l.out_width), "model");
    // A described-only model may declare more than 2^64 values: the sums stop at the largest.
    const auto sum = [](uint64_t a, uint64_t b) {
      uint64_t r;
      return __builtin_add_overflow(a, b, &r) ? UINT64_MAX : r;
    };
    for (const auto& [t, size] : sizes.by_layer[i]) l.parameters = sum(l.parameters, size);
    const double d = l.in_width;
    switch (l.kind) {
      case MOERT_LAYER_EMBEDDING: {
        const uint64_t context = l.in_width, dim = l.out_width / l.in_width;
        const uint64_t vocab = sizes.get(i, "weight") / dim;
        l.activated = context * dim;
        l.detail = cat("vocab ", vocab, ", dim ", dim, ", context ", context);
        break;
      }
      case MOERT_LAYER_RMSNORM:
        l.activated = l.parameters;
        l.detail = cat("dim ", l.in_width);
        break;
      case MOERT_LAYER_DENSE_FFN: {
        const uint64_t hidden = sizes.get(i, "w1") / l.in_width;
        l.activated = l.parameters;
        l.flops = l.dense_flops = 6.0 * d * static_cast<double>(hidden);
        l.detail = cat("SwiGLU hidden ", hidden);
        break;
      }
      case MOERT_LAYER_OUTPUT_HEAD: {
        const bool bias = sizes.get(i, "bias") > 0;
        l.activated = l.parameters;
        l.flops = l.dense_flops = 2.0 * d * l.out_width;
        l.detail = cat("vocab ", l.out_width, bias ? ", with bias" : ", no bias");
        break;
      }
      case MOERT_LAYER_MOE: {
        l.is_moe = true;
        MoEInfo& m = l.moe = read_moe(model, i);
        if (info.checkpoint) {
          m.saved_bias_frozen = moe_int(model, i, MOERT_MOE_SAVED_BIAS_FROZEN);
          m.saved_gamma = moe_float(model, i, MOERT_MOE_SAVED_BIAS_UPDATE_RATE);
        }
        const uint64_t routed =
            sum(sum(sizes.get(i, "w1"), sizes.get(i, "w3")), sizes.get(i, "w2"));
        l.activated =
            sum(l.parameters - std::min(routed, l.parameters),
                routed / static_cast<uint64_t>(m.num_experts) * static_cast<uint64_t>(m.top_k));
        const double expert = 6.0 * d * static_cast<double>(m.expert_hidden);
        const double fixed =
            2.0 * d * static_cast<double>(m.num_experts) +
            static_cast<double>(m.num_shared) * 6.0 * d * static_cast<double>(m.shared_hidden);
        l.flops = fixed + m.experts_per_token() * expert;
        l.dense_flops = fixed + static_cast<double>(m.num_experts) * expert;
        l.detail = cat(m.num_experts, " experts x hidden ", m.expert_hidden, ", top-", m.top_k);
        if (m.num_shared > 0)
          l.detail += cat(", ", m.num_shared, " shared x hidden ", m.shared_hidden);
        break;
      }
      default:
        fail("layer ", i, " has a kind (", l.kind, ") this moert command does not know");
    }
    info.flops += l.flops;
    info.dense_flops += l.dense_flops;
    info.layers.push_back(std::move(l));
  }
  return info;
}

}  // namespace moert_cli
