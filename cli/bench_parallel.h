// `moert bench --expert-parallel EP` under mpirun: the MoE layer sharded over the job's ranks,
// where its time goes (dispatch, experts, combine, gradients) with communication overlapped and
// not, beside the single-process layer on the same global batch, measured in the same run.
#pragma once

#include <cstdint>
#include <string>

#include "cli/args.h"
#include "cli/bench_layer.h"

namespace moert_cli {

// `base`: the CPU session settings of one rank (threads per rank, seed, precision knob). Refuses
// (UsageError) before any work when the process was not started by mpirun, when EP does not
// divide the job's size or the experts, or when the global batch does not split over the ranks.
int run_bench_parallel(const Args& args, const Dims& d, int repeats, uint64_t seed,
                       const SessionConfig& base, const std::string& precision);

}  // namespace moert_cli
