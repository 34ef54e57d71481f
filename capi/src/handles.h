// What the opaque handles of moert.h hold.
#pragma once

#include <memory>
#include <mutex>

#include "capi/src/fork_generation.h"
#include "capi/src/status.h"
#include "core/communicator.h"
#include "core/model.h"
#include "core/session.h"

struct moert_model {
  std::shared_ptr<const moert::Model> model;
};

struct moert_session_options {
  moert::SessionOptions options;
};

struct moert_session {
  std::unique_ptr<moert::Session> session;
  uint64_t fork_generation = moert::capi::fork_generation();  // see fork_generation.h
};

struct moert_comm {
  std::shared_ptr<moert::Communicator> comm;
};

namespace moert::capi {

// Runs body(session) under the session's lock, on its device, after the NULL check and the
// fork check (fork_generation.h): every entry point that takes a session goes through here.
template <typename S, typename F>
moert_status* locked(S* session, F&& body) {
  return guarded([&] {
    require(session, "session");
    require_made_here(session->fork_generation, "session");
    std::lock_guard<std::mutex> lock(session->session->mutex());
    const auto device = session->session->use_device();
    session->session->call([&] { body(*session->session); });
  });
}

}  // namespace moert::capi
