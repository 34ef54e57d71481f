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

// An error at one row of the operand a kernel was given. A kernel counts rows in its own
// arrangement (an MoE layer's experts see their tokens in routing order); its callers know what
// the row is and say it in theirs: the layer as its own row, the session as the caller's.
class RowError : public Error {
 public:
  // The message reads `head` "row " `row` `rows_of` `tail`.
  RowError(Code code, std::string head, int64_t row, std::string rows_of, std::string tail)
      : Error(code, head + "row " + std::to_string(row) + rows_of + tail),
        head_(std::move(head)),
        tail_(std::move(tail)),
        row_(row) {}
  int64_t row() const noexcept { return row_; }
  // True once `row` counts the rows of the layer the kernel ran in.
  bool layer_row() const noexcept { return layer_row_; }
  // The same error at the layer's row `row`.
  RowError at_layer_row(int64_t row) const {
    RowError e(code(), head_, row, "", tail_);
    e.layer_row_ = true;
    return e;
  }
  // The message with `row` (the caller's count) in place of the layer's.
  std::string message_at(int64_t row) const { return head_ + "row " + std::to_string(row) + tail_; }

 private:
  std::string head_, tail_;
  int64_t row_;
  bool layer_row_ = false;
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
