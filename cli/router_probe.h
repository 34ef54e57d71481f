// Why the loss-free bias does or does not balance: for each MoE block of a trained character
// model, the router's unbiased scores on evaluation rows, set against the bias it learned.
//
// The C ABI returns a model's final outputs only, so the router input of block b is obtained from
// a second model that stops at the RMSNorm feeding block b, loaded with the trained parameters
// (copied by name); the CLI then computes logits, sigmoid scores and top-K selections itself. The
// same cut gives the operands on which the GEMM accuracy of a low precision is measured.
#pragma once

#include <cstdint>
#include <vector>

#include "cli/charlm.h"
#include "cli/library.h"
#include "cli/precision_accuracy.h"

namespace moert_cli {

struct RouterStats {
  // max - min over experts of the mean unbiased score: how far apart the experts' pull is.
  double score_spread = 0.0;
  // Median over tokens of the gap between the K-th and (K+1)-th biased score: how far a bias
  // must move to change a typical token's selection.
  double median_boundary_gap = 0.0;
  double bias_range = 0.0;  // max - min of the learned bias
  // MaxVio of this block's selection over the probe rows, with the learned bias and with it set
  // to zero (same inputs): what the bias achieves on its own.
  double max_vio_biased = 0.0, max_vio_unbiased = 0.0;
};

std::vector<RouterStats> probe_routers(const moert_session* trained, const CharLMShape& shape,
                                       const Balancing& balancing, uint64_t seed,
                                       const std::vector<int32_t>& stream,
                                       const std::vector<uint64_t>& positions, uint32_t threads);

// For each MoE block of a trained character model, how far its GEMMs in `low`'s precision land
// from fp32 on trained operands: the block's trained weights and bias in a one-layer model, its
// fp32 input activations on the rows at `positions`, and as output gradient the real one, the
// gradient of the mean cross-entropy on those rows with respect to the block's output (through the
// trained model's later blocks and head, in fp32; with the aux strategy the later blocks'
// auxiliary losses are part of it, as in training).
std::vector<GemmAccuracy> probe_gemm_accuracy(const moert_session* trained,
                                              const CharLMShape& shape, const Balancing& balancing,
                                              uint64_t seed, const std::vector<int32_t>& stream,
                                              const std::vector<uint64_t>& positions,
                                              uint32_t threads, const SessionConfig& low);

}  // namespace moert_cli
