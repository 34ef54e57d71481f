// `moert convert --quantize fp8`: a model's expert weights as block-scaled FP8, the way
// DeepSeek-V3 ships its weights (E4M3 codes in 128x128 blocks, one fp32 scale per block).
#pragma once

#include <cstdint>
#include <memory>

#include "core/model.h"

namespace moert {

struct Fp8QuantizeOptions {
  // Scales rounded up to powers of two (DeepSeek-V3.1's and DeepGEMM's UE8M0).
  bool power_of_two_scales = false;
};

// A copy of `model` whose MoE layers' routed and shared expert weights (w1, w3, w2, shared_w1,
// shared_w3, shared_w2) are resident FP8, quantized from their fp32 values by
// kernels/cpu/fp8.h's quantize_blocks; every other tensor is shared unchanged, and an expert
// weight that is FP8 already is kept as it is. `quantized` (optional) receives the number of
// tensors quantized: 0 for a model without MoE layers. Throws Error(Numeric) naming the tensor
// and the position of a NaN or infinity (a loaded model has none).
std::unique_ptr<Model> quantize_experts_fp8(const Model& model, const Fp8QuantizeOptions& options,
                                            uint32_t* quantized = nullptr);

}  // namespace moert
