// How far a low-precision MoE layer (bf16 or fp8 experts) lands from fp32, per GEMM kind: the
// same layer, weights and operands run in fp32 and in the low precision, ||C - C_fp32|| /
// ||C_fp32|| of what each kind of GEMM produces. `moert bench` measures it on random operands,
// `moert train` on a trained model's weights and activations.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cli/library.h"

namespace moert_cli {

struct GemmAccuracy {
  double fprop = 0.0;  // the layer's output without its residual
  double dgrad = 0.0;  // the input gradient without its residual part
  // Each expert weight gradient, by tensor ("w1", "w3", "w2", "shared_w1", ...).
  std::vector<std::pair<std::string, double>> wgrad;
};

// What one pass of a one-MoE-layer model (hidden-state input, layer named "moe", residual) runs on.
struct LayerOperands {
  uint32_t rows = 0;
  std::vector<float> x;   // rows x dim, the layer input
  std::vector<float> dy;  // rows x dim, the gradient of the layer output
  // Values loaded into the layer before the pass, by parameter name ("moe.w1", ...); empty: the
  // model's own initial values.
  std::vector<std::pair<std::string, std::vector<float>>> parameters;
  std::vector<float> expert_bias;  // the router's selection bias; empty: the model's own
};

// ||a - ref|| / ||ref|| in double precision (||a - ref|| when ref is zero).
double relative_distance(const std::vector<float>& a, const std::vector<float>& ref);

// Runs the layer forward and backward on `ops` in `fp32` and in `low` (training sessions are made
// of both configurations) and compares the results.
GemmAccuracy gemm_accuracy(const moert_model* layer, const SessionConfig& fp32,
                           const SessionConfig& low, const LayerOperands& ops);

// The layer's output on ops.x (residual included) in `config`'s precision, for an output gradient
// that depends on it.
std::vector<float> layer_output(const moert_model* layer, const SessionConfig& config,
                                const LayerOperands& ops);

}  // namespace moert_cli
