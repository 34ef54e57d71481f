// The local step of the NCCL communicator's rank-ordered all-reduce: out[i] = slots[0][i] +
// slots[1][i] + ... + slots[ranks - 1][i], added in rank order (the order the MPI communicator and
// the contract in core/communicator.h use), int64 wrapping as two's complement hardware does.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/communicator.h"

namespace moert::cuda {

// slots: `ranks` consecutive arrays of `count` elements of `type`; out: `count` elements (it may
// be one of the slots). Queued on `stream`.
void ordered_sum(const void* slots, int32_t ranks, int64_t count, ReduceType type, void* out,
                 cudaStream_t stream);

}  // namespace moert::cuda
