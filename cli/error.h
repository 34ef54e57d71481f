// The two ways a command fails: a usage error (bad flag or argument; exit 2, the user should read
// --help) and an operational error (missing file, library refusal; exit 1). Either one is printed
// as one line by main().
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moert_cli {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message), message_(message) {}
  // The whole message: what() ends at a NUL that a name quoted from a file may hold.
  const std::string& message() const noexcept { return message_; }

 private:
  std::string message_;
};

class UsageError : public Error {
 public:
  using Error::Error;
};

// An error whose line this process has already printed (Job::agree_prepared prints before the
// job's ranks exit): main() prints nothing more and exits with code().
class ReportedError : public Error {
 public:
  ReportedError(const std::string& message, int code) : Error(message), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

// The name a command's errors start with ("moert train"): main() sets it before running one.
void set_command_name(const std::string& name);
const std::string& command_name();

// `text` with its control characters (and DEL) and the bytes of malformed UTF-8 written as \xNN,
// as the library writes them: a name from a file (a layer, a tensor of a safetensors header, a
// JSON parser's "last read" of a corrupt header) or an argument, made safe to print as one line
// of valid UTF-8.
std::string printable(const std::string& text);

// Prints "`who`: error: printable(`text`)" as one line on stderr.
void print_error(const std::string& who, const std::string& text);

// Concatenates its arguments with operator<<.
template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw Error(cat(parts...));
}

template <typename... Parts>
[[noreturn]] void usage_fail(const Parts&... parts) {
  throw UsageError(cat(parts...));
}

}  // namespace moert_cli
