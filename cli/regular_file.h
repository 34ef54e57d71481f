// Reading the files the CLI takes as input: models, JSON descriptions and a checkpoint
// directory's config and index from regular files only, as the library's loader takes them; a
// training corpus from any readable stream. Header-only: every
// program built from the CLI's sources (the CLI, its tests, the fuzzers) reads this way.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cli/error.h"

namespace moert_cli {

namespace detail {
// Reads fd to its end into a buffer first sized for `expected` bytes; closes fd. Stops once more
// than `limit` bytes arrived (a stream such as /dev/zero never ends): the caller sees more than
// `limit` bytes and says what the limit is.
inline std::vector<uint8_t> read_to_end(int fd, const std::string& path, size_t expected,
                                        size_t limit = SIZE_MAX) {
  // One byte past the expected size: the end of a regular file is then found without growing.
  const size_t first = std::min(limit, expected);
  std::vector<uint8_t> bytes(first > 0 ? first + 1 : 4096);
  size_t got = 0;
  for (;;) {
    if (got > limit) break;
    if (got == bytes.size()) bytes.resize(bytes.size() * 2);
    const ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      fail(path, ": read error: ", std::strerror(err));
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  bytes.resize(got);
  return bytes;
}
}  // namespace detail

// The whole of `path` (to its end, whatever size it reported). Fails (cli/error.h) naming it when
// it cannot be opened or read, or is not a regular file: the open does not block, so a FIFO
// nobody writes to is refused at once instead of hanging the command. For models and
// descriptions, which the library too reads only from regular files.
inline std::vector<uint8_t> read_regular_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, S_ISDIR(st.st_mode) ? ": is a directory, not a file" : ": is not a regular file");
  }
  return detail::read_to_end(fd, path, static_cast<size_t>(st.st_size));
}

// The whole of `path`, which may also be a pipe or a terminal (a corpus from /dev/stdin or a
// process substitution): the open waits for a writer, as any reader of a FIFO does. Reads at
// most `limit` + 1 bytes: more than `limit` means the stream went past it.
inline std::vector<uint8_t> read_stream(const std::string& path, size_t limit = SIZE_MAX) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail(path, ": is a directory, not a file");
  }
  return detail::read_to_end(fd, path, S_ISREG(st.st_mode) ? static_cast<size_t>(st.st_size) : 0,
                             limit);
}

}  // namespace moert_cli
