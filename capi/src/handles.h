// What the opaque handles of moert.h hold.
#pragma once

#include <atomic>
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
  // Calls inside the session now, and whether moert_session_free() has begun: a free waits for
  // the calls in progress instead of destroying the session under them (a service shutting down
  // while a request is served), and a call that meets a free is refused.
  mutable std::atomic<uint64_t> calls{0};
  std::atomic<bool> freeing{false};
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
    // Counted before anything else is read of the handle: a free waits only for calls counted.
    session->calls.fetch_add(1);
    // Its last access to the handle: a free waiting for it may destroy the handle right after.
    struct Leave {
      S* session;
      ~Leave() { session->calls.fetch_sub(1); }
    } leave{session};
    auto refuse_if_freeing = [&] {
      if (session->freeing.load())
        fail(Code::InvalidState,
             "this session is being freed (moert_session_free() on another thread): no call may "
             "start on it");
    };
    refuse_if_freeing();
    require_made_here(session->fork_generation, "session");
    std::lock_guard<std::mutex> lock(session->session->mutex());
    refuse_if_freeing();  // a call queued behind the one the free waits for
    const auto device = session->session->use_device();
    session->session->call([&] { body(*session->session); });
  });
}

}  // namespace moert::capi
