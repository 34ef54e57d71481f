// The status object behind moert_status, and the guard every entry point runs its body in.
#pragma once

#include <exception>
#include <new>
#include <string>

#include "core/error.h"
#include "moert/moert.h"

struct moert_status {
  int32_t code;
  std::string message;
};

namespace moert::capi {

// Returned when even the status for an allocation failure cannot be allocated; never freed.
extern moert_status g_out_of_memory;

moert_status* make_status(int32_t code, const std::string& message) noexcept;

// The text with every byte that is not part of well-formed UTF-8, and every ASCII control
// character, written as \xNN (messages quote names and bytes from files; moert.h promises one
// line of valid UTF-8).
std::string printable_utf8(const std::string& text);

// Runs body(); maps every exception to a status. Nothing escapes across the C ABI.
template <typename F>
moert_status* guarded(F&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Error& e) {
    return make_status(static_cast<int32_t>(e.code()), e.message());
  } catch (const std::bad_alloc&) {
    return make_status(MOERT_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return make_status(MOERT_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return make_status(MOERT_ERR_INTERNAL, "internal error: unknown exception");
  }
}

// The status guarded() would return for an exception already caught.
moert_status* status_of(std::exception_ptr error) noexcept;

template <typename T>
void require(const T* p, const char* what) {
  if (!p) fail(Code::InvalidArgument, what, " is NULL");
}

}  // namespace moert::capi
