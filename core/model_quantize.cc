#include "core/model_quantize.h"

#include <string>

#include "core/error.h"
#include "kernels/cpu/fp8.h"

namespace moert {
namespace {

std::shared_ptr<const Fp8Blocks> quantize_tensor(const Tensor& t, const std::string& what,
                                                 const Fp8QuantizeOptions& options) {
  if (t.shape.size() < 2)
    fail(Code::Internal, "FP8 quantization of '", what, "': not a stack of matrices");
  auto q = std::make_shared<Fp8Blocks>();
  q->rows = t.shape[t.shape.size() - 2];
  q->cols = t.shape.back();
  q->matrices = 1;
  for (size_t i = 0; i + 2 < t.shape.size(); ++i) q->matrices *= t.shape[i];
  if (q->numel() != t.numel())
    fail(Code::Internal, "FP8 quantization of '", what, "': shape and values disagree");
  q->codes.resize(static_cast<size_t>(q->numel()));
  q->scales.assign(static_cast<size_t>(q->matrices * q->matrix_scales()), 0.0f);
  cpu::fp8::QuantizeOptions opt;
  opt.power_of_two_scales = options.power_of_two_scales;
  opt.what = what.c_str();
  const int64_t per = q->rows * q->cols;
  for (int64_t i = 0; i < q->matrices; ++i) {
    opt.row_offset = i * q->rows;  // errors name the row of the whole stack
    cpu::fp8::quantize_blocks(t.values.data() + i * per, q->cols, q->rows, q->cols,
                              q->codes.data() + i * per, q->cols,
                              q->scales.data() + i * q->matrix_scales(), q->scale_ld(), opt);
  }
  return q;
}

}  // namespace

std::unique_ptr<Model> quantize_experts_fp8(const Model& model, const Fp8QuantizeOptions& options,
                                            uint32_t* quantized) {
  model.require_weights("be quantized");
  auto out = std::make_unique<Model>(model);
  out->checkpoint.reset();  // a new model, not the checkpoint it came from
  uint32_t count = 0;
  for (auto& layer : out->layers) {
    auto* m = std::get_if<MoESpec>(&layer.spec);
    if (!m) continue;
    for (auto [field, t] : {std::pair<const char*, Tensor*>{"w1", &m->w1},
                            {"w3", &m->w3},
                            {"w2", &m->w2},
                            {"shared_w1", &m->shared_w1},
                            {"shared_w3", &m->shared_w3},
                            {"shared_w2", &m->shared_w2}}) {
      if (!t->present() || t->fp8) continue;
      t->fp8 = quantize_tensor(*t, layer.name + "." + field, options);
      std::vector<float>().swap(t->values);
      t->stored = StoredType::F8E4M3;
      ++count;
    }
  }
  if (quantized) *quantized = count;
  return out;
}

}  // namespace moert
