// Sessions and batchers run threads, and a child of fork() gets a copy of their memory but none
// of their threads: joining the pool's workers or waiting on their condition variables there
// blocks for good, and so does a session's lock that a parent thread held at the fork. Such a
// handle belongs to the process that made it; a child is told so instead of hanging.
#pragma once

#include <cstdint>

namespace moert::capi {

// 0 in the process that first asked, more in each child of fork() after that (a pthread_atfork
// handler installed by the first call). Thread-safe.
uint64_t fork_generation();

// Throws Error(InvalidState) when a handle of kind `what` ("session", "batcher") made at
// generation `made_in` is used in a child of the process that made it.
void require_made_here(uint64_t made_in, const char* what);

// Whether a handle made at `made_in` was inherited through fork(): its release must leave the
// parent's threads, and what they own, alone.
bool inherited(uint64_t made_in);

}  // namespace moert::capi
