// C entry points for models: loading and inspection.
#include <ios>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "capi/src/handles.h"
#include "core/model_loader.h"
#include "core/model_quantize.h"
#include "core/model_writer.h"

using moert::Code;
using moert::fail;
using moert::capi::guarded;
using moert::capi::require;

namespace {

const moert::LayerSpec& layer_at(const moert_model* model, uint32_t index) {
  require(model, "model");
  const auto& layers = model->model->layers;
  if (index >= layers.size())
    fail(Code::InvalidArgument, "layer index ", index, " is out of range (the model has ",
         layers.size(), layers.size() == 1 ? " layer)" : " layers)");
  return layers[index];
}

const moert::MoESpec& moe_at(const moert_model* model, uint32_t index) {
  const auto& l = layer_at(model, index);
  const auto* m = std::get_if<moert::MoESpec>(&l.spec);
  if (!m)
    fail(Code::InvalidArgument, "layer ", index, " ('", l.name, "', kind ",
         moert::layer_kind_name(l.kind), ") is not a MoE layer");
  return *m;
}

// The balancing state a checkpoint saved for MoE layer `index`.
const moert::LayerBalanceState& saved_balance(const moert_model* model, uint32_t index) {
  const auto& checkpoint = model->model->checkpoint;
  if (!checkpoint)
    fail(Code::InvalidArgument, "layer ", index,
         ": a MOERT_MOE_SAVED_* key reads a checkpoint's training state, and this model was not "
         "loaded from a checkpoint");
  for (const moert::LayerBalanceState& l : checkpoint->layers)
    if (l.layer == index) return l;
  fail(Code::Internal, "layer ", index, ": the checkpoint kept no balancing state for it");
}

// The present weight tensors of a layer, in the order moert_model_tensor_info() numbers them.
std::vector<std::pair<const char*, const moert::Tensor*>> tensors_of(const moert::LayerSpec& l) {
  std::vector<std::pair<const char*, const moert::Tensor*>> out;
  moert::visit_tensors(l, [&](const char* field, const moert::Tensor& t) {
    if (t.present()) out.emplace_back(field, &t);
  });
  if (const auto* m = std::get_if<moert::MoESpec>(&l.spec))
    if (m->gate_bias.present()) out.emplace_back("gate_bias", &m->gate_bias);
  return out;
}

}  // namespace

extern "C" {

void moert_schema_version(uint32_t* major, uint32_t* minor) {
  if (major) *major = moert::kSchemaMajor;
  if (minor) *minor = moert::kSchemaMinor;
}

moert_status* moert_model_load_file(const char* path, moert_model** out) {
  return guarded([&] {
    require(path, "path");
    require(out, "out");
    auto m = std::make_unique<moert_model>(moert_model{moert::load_model_file(path)});
    *out = m.release();
  });
}

moert_status* moert_model_load_buffer(const void* data, size_t size, const char* external_dir,
                                      moert_model** out) {
  return guarded([&] {
    require(data, "data");
    require(out, "out");
    auto m = std::make_unique<moert_model>(
        moert_model{moert::load_model_buffer(data, size, external_dir ? external_dir : "")});
    *out = m.release();
  });
}

void moert_model_free(moert_model* model) { delete model; }

moert_status* moert_model_name(const moert_model* model, const char** out) {
  return guarded([&] {
    require(model, "model");
    require(out, "out");
    *out = model->model->name.c_str();
  });
}

moert_status* moert_model_num_layers(const moert_model* model, uint32_t* out) {
  return guarded([&] {
    require(model, "model");
    require(out, "out");
    *out = static_cast<uint32_t>(model->model->layers.size());
  });
}

moert_status* moert_model_layer_kind(const moert_model* model, uint32_t index, int32_t* out) {
  return guarded([&] {
    const auto& l = layer_at(model, index);
    require(out, "out");
    *out = static_cast<int32_t>(l.kind);
  });
}

moert_status* moert_model_layer_name(const moert_model* model, uint32_t index, const char** out) {
  return guarded([&] {
    const auto& l = layer_at(model, index);
    require(out, "out");
    *out = l.name.c_str();
  });
}

moert_status* moert_model_layer_dims(const moert_model* model, uint32_t index, uint32_t* in_width,
                                     uint32_t* out_width) {
  return guarded([&] {
    const auto& l = layer_at(model, index);
    if (in_width) *in_width = l.in_width;
    if (out_width) *out_width = l.out_width;
  });
}

moert_status* moert_model_io(const moert_model* model, int32_t* input_kind, uint32_t* input_width,
                             uint32_t* output_width) {
  return guarded([&] {
    require(model, "model");
    const auto& m = *model->model;
    if (input_kind) *input_kind = m.token_input ? MOERT_INPUT_TOKENS : MOERT_INPUT_HIDDEN;
    if (input_width) *input_width = m.input_width;
    if (output_width) *output_width = m.output_width;
  });
}

moert_status* moert_model_vocab_size(const moert_model* model, uint32_t* out) {
  return guarded([&] {
    require(model, "model");
    require(out, "out");
    const auto& m = *model->model;
    if (!m.token_input)
      fail(Code::InvalidArgument, "this model takes hidden states, not token ids: no vocabulary");
    *out = std::get<moert::EmbeddingSpec>(m.layers[0].spec).vocab_size;
  });
}

moert_status* moert_model_num_parameters(const moert_model* model, uint64_t* total,
                                         uint64_t* activated) {
  return guarded([&] {
    require(model, "model");
    if (total) *total = model->model->total_parameters();
    if (activated) *activated = model->model->activated_parameters();
  });
}

moert_status* moert_model_moe_int(const moert_model* model, uint32_t index, int32_t key,
                                  int64_t* out) {
  return guarded([&] {
    const auto& m = moe_at(model, index);
    require(out, "out");
    int64_t v;
    switch (key) {
      case MOERT_MOE_DIM:
        v = m.dim;
        break;
      case MOERT_MOE_NUM_EXPERTS:
        v = m.router.num_experts;
        break;
      case MOERT_MOE_TOP_K:
        v = m.router.top_k;
        break;
      case MOERT_MOE_EXPERT_HIDDEN:
        v = m.expert_hidden;
        break;
      case MOERT_MOE_SCORE_FUNCTION:
        v = static_cast<int64_t>(m.router.score);
        break;
      case MOERT_MOE_NUM_GROUPS:
        v = m.router.num_groups;
        break;
      case MOERT_MOE_TOPK_GROUPS:
        v = m.router.topk_groups;
        break;
      case MOERT_MOE_NORMALIZE_WEIGHTS:
        v = m.router.normalize ? 1 : 0;
        break;
      case MOERT_MOE_NUM_SHARED_EXPERTS:
        v = m.num_shared;
        break;
      case MOERT_MOE_SHARED_HIDDEN:
        v = m.shared_hidden;
        break;
      case MOERT_MOE_RESIDUAL:
        v = m.residual ? 1 : 0;
        break;
      case MOERT_MOE_BALANCING_POLICY:
        v = static_cast<int64_t>(m.balancing.policy);
        break;
      case MOERT_MOE_BIAS_CENTERING:
        v = m.balancing.bias_centering ? 1 : 0;
        break;
      case MOERT_MOE_BIAS_FROZEN:
        v = m.balancing.bias_frozen ? 1 : 0;
        break;
      case MOERT_MOE_SAVED_BIAS_FROZEN:
        v = saved_balance(model, index).frozen ? 1 : 0;
        break;
      default:
        fail(Code::InvalidArgument, "unknown integer MoE key ", key);
    }
    *out = v;
  });
}

moert_status* moert_model_moe_float(const moert_model* model, uint32_t index, int32_t key,
                                    double* out) {
  return guarded([&] {
    const auto& m = moe_at(model, index);
    require(out, "out");
    double v;
    switch (key) {
      case MOERT_MOE_ROUTED_SCALING_FACTOR:
        v = m.router.scaling;
        break;
      case MOERT_MOE_BIAS_UPDATE_RATE:
        v = m.balancing.bias_update_rate;
        break;
      case MOERT_MOE_AUX_ALPHA:
        v = m.balancing.aux_alpha;
        break;
      case MOERT_MOE_CAPACITY_FACTOR:
        v = m.balancing.capacity_factor;
        break;
      case MOERT_MOE_SAVED_BIAS_UPDATE_RATE:
        v = saved_balance(model, index).gamma;
        break;
      default:
        fail(Code::InvalidArgument, "unknown floating-point MoE key ", key);
    }
    *out = v;
  });
}

moert_status* moert_model_checkpoint_step(const moert_model* model, int32_t* is_checkpoint,
                                          uint64_t* step) {
  return guarded([&] {
    require(model, "model");
    require(is_checkpoint, "is_checkpoint");
    require(step, "step");
    const auto& checkpoint = model->model->checkpoint;
    *is_checkpoint = checkpoint ? 1 : 0;
    *step = checkpoint ? checkpoint->step : 0;
  });
}

moert_status* moert_model_num_tensors(const moert_model* model, uint32_t index, uint32_t* out) {
  return guarded([&] {
    const auto& l = layer_at(model, index);
    require(out, "out");
    *out = static_cast<uint32_t>(tensors_of(l).size());
  });
}

moert_status* moert_model_tensor_info(const moert_model* model, uint32_t index, uint32_t tensor,
                                      const char** name, int32_t* stored_dtype, int32_t* held_dtype,
                                      uint64_t* numel, uint64_t* bytes) {
  return guarded([&] {
    const auto& l = layer_at(model, index);
    const auto tensors = tensors_of(l);
    if (tensor >= tensors.size())
      fail(Code::InvalidArgument, "tensor index ", tensor, " is out of range (layer ", index, " ('",
           l.name, "') has ", tensors.size(), " tensors)");
    const auto& [field, t] = tensors[tensor];
    if (name) *name = field;
    if (stored_dtype) *stored_dtype = static_cast<int32_t>(t->stored);
    if (held_dtype) *held_dtype = t->held_fp8() ? MOERT_DTYPE_F8E4M3 : MOERT_DTYPE_F32;
    if (numel) *numel = static_cast<uint64_t>(t->numel());
    if (bytes) *bytes = t->resident_bytes();
  });
}

moert_status* moert_model_resident_bytes(const moert_model* model, uint64_t* out) {
  return guarded([&] {
    require(model, "model");
    require(out, "out");
    *out = model->model->resident_bytes();
  });
}

moert_status* moert_model_quantize_fp8(const moert_model* model, uint32_t flags, moert_model** out,
                                       uint32_t* quantized) {
  return guarded([&] {
    require(model, "model");
    require(out, "out");
    if (flags & ~static_cast<uint32_t>(MOERT_FP8_POWER_OF_TWO_SCALES))
      fail(Code::InvalidArgument, "unknown FP8 quantization flags 0x", std::hex, flags);
    moert::Fp8QuantizeOptions options;
    options.power_of_two_scales = (flags & MOERT_FP8_POWER_OF_TWO_SCALES) != 0;
    uint32_t count = 0;
    std::shared_ptr<const moert::Model> q =
        moert::quantize_experts_fp8(*model->model, options, &count);
    auto m = std::make_unique<moert_model>(moert_model{std::move(q)});
    *out = m.release();
    if (quantized) *quantized = count;
  });
}

moert_status* moert_model_save_file(const moert_model* model, const char* path) {
  return guarded([&] {
    require(model, "model");
    require(path, "path");
    moert::write_model(path, *model->model);
  });
}

}  // extern "C"
