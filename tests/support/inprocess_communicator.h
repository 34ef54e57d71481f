// A Communicator whose ranks are threads of one process, for unit tests only (never part of
// libmoert: the issue forbids a home-made transport). It keeps the contract of
// core/communicator.h exactly as the MPI communicator does -- rank-ordered sums, argument
// agreement checked on every rank, a broken state shared by the group, timeouts from the call
// to wait() -- so that the same test cases hold for both (tests/comm).
//
// An operation completes in the start_* call of the last rank to arrive, which moves every
// rank's data under the group's lock; a rank that gave up (timeout) breaks the group first, so
// that a late arrival never writes into buffers their owner may have freed.
#pragma once

#include <memory>
#include <vector>

#include "core/communicator.h"

namespace moert::testing {

// The `size` ranks of one group; ranks()[r] has rank r. Each is used by one thread at a time.
// `memory` is what they say they move: CommMemory::Device stands in for NCCL in tests of device
// sessions over the simulated device (tests/support/devsim_plugin.cc), whose "device" memory is
// host memory that the threads can copy; `device` is the device they say they are on there (-1:
// not said).
std::vector<std::unique_ptr<Communicator>> make_inprocess_communicators(
    int32_t size, double timeout = kDefaultCommTimeoutSeconds, CommMemory memory = CommMemory::Host,
    int32_t device = -1);

}  // namespace moert::testing
