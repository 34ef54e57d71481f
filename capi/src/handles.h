// What the opaque handles of moert.h hold.
#pragma once

#include <memory>

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
