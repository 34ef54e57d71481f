// The operations of the MPI communicator as state machines the engine advances (engine.h).
//
// Every operation first agrees: one small MPI_Iallreduce, of the same shape for every operation,
// checks that the ranks are at the same operation (kind and sequence number) and that their
// arguments fit together (equal counts, matching per-pair sizes), so that a rank that called
// another operation or passed a wrong size makes every rank fail that same operation instead of
// hanging, truncating or having Open MPI abort the process. Then the data
// moves by point-to-point messages whose tags are the operation's own, so that the phases of
// consecutive operations, posted at different moments on different ranks, never mix; the only
// MPI collectives are those first phases, posted in start order as MPI requires.
//
// Data moves through staging buffers owned by the operation: a rank that gave up on an operation
// (timeout) must not have MPI write into, or read from, caller memory it may since have freed.
// The cost is one copy in and one copy out, on the engine thread. They are allocated before the
// agreement, whose flag word carries a rank that could not allocate them: every rank then fails
// the operation with MOERT_ERR_OUT_OF_MEMORY (AgreedFailure) before any data moves, and the
// communicator stays usable.
#pragma once

#include <memory>

#include "comm/mpi/engine.h"

namespace moert::mpi {

std::shared_ptr<Operation> make_all_reduce(uint64_t seq, void* data, int64_t count,
                                           ReduceType type);
std::shared_ptr<Operation> make_all_to_all_v(uint64_t seq, const void* send, void* recv,
                                             comm::Exchange exchange, int32_t rank, int32_t size);
std::shared_ptr<Operation> make_all_gather(uint64_t seq, const void* send, int64_t bytes,
                                           void* recv, int32_t size);
std::shared_ptr<Operation> make_all_gather_v(uint64_t seq, const void* send, void* recv,
                                             comm::Exchange exchange);
std::shared_ptr<Operation> make_broadcast(uint64_t seq, void* data, int64_t bytes, int32_t root);
std::shared_ptr<Operation> make_barrier(uint64_t seq);
// The answer is in `*all_ok` when the operation is done.
std::shared_ptr<Operation> make_agree(uint64_t seq, bool ok, std::shared_ptr<bool> all_ok);

}  // namespace moert::mpi
