// How a session on a device backend talks through a device communicator (NCCL: its buffers are
// device memory, its operations run on its own CUDA stream). A session needs two views of it:
//  - the backend's: operations on backend memory that start after the work the backend has
//    queued (Backend::native_stream), as MoE dispatch and combine exchange rows the backend has
//    just written;
//  - the host's: the session's own bookkeeping (row counts, routing counts, losses, agreement,
//    checkpoint gathers) lives in host memory, staged through backend buffers.
// Neither changes the communicator's own settings for longer than one call, so that the host
// (and other sessions) may keep using it.
#pragma once

#include <memory>

#include "core/communicator.h"

namespace moert {

class Backend;

// A view of `inner` whose operations start after the work queued on `be`'s stream when they are
// started: each start sets `inner`'s stream to the backend's for that call only. Splits are views
// of the split. `inner` and `be` outlive the view.
std::unique_ptr<Communicator> backend_view(std::shared_ptr<Communicator> inner, Backend& be);

// A host-memory view of a device communicator: each operation uploads its host buffers into
// backend buffers (complete when Backend::upload returns), runs on `inner` and downloads the
// results when it completes: staging costs an allocation and two copies per operation, which the
// session's bookkeeping (a few small messages per layer and pass) can afford. Arguments that the
// shared checks refuse reach `inner` unchanged, which refuses them itself (and breaks), as the
// contract asks.
std::unique_ptr<Communicator> host_view(std::shared_ptr<Communicator> inner, Backend& be);

}  // namespace moert
