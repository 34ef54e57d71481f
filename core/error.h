// Internal error type of the core. Thrown inside the library only; the C API layer catches every
// exception at the boundary and turns it into a moert_status.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moert {

// Values match the MOERT_ERR_* constants of moert.h.
enum class Code : int32_t {
  InvalidArgument = 1,
  InvalidModel = 2,
  Io = 3,
  OutOfMemory = 4,
  Unsupported = 5,
  InvalidState = 6,
  Numeric = 7,
  Internal = 8,
  Comm = 9,    // a collective failed or timed out; the communicator is broken
  Limit = 10,  // a load limit refuses the input
};

class Error : public std::runtime_error {
 public:
  Error(Code code, std::string message)
      : std::runtime_error(message), code_(code), message_(std::move(message)) {}
  Code code() const noexcept { return code_; }
  // The whole message: what() ends at a NUL that a name quoted from a file may hold.
  const std::string& message() const noexcept { return message_; }

 private:
  Code code_;
  std::string message_;
};

// Concatenates anything streamable; messages are built where they are thrown.
template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream s;
  (s << ... << std::forward<Args>(args));
  return s.str();
}

template <typename... Args>
[[noreturn]] void fail(Code code, Args&&... args) {
  throw Error(code, cat(std::forward<Args>(args)...));
}

}  // namespace moert
