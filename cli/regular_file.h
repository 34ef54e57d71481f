// Reading the files the CLI takes as input (models, JSON descriptions, a checkpoint directory's
// config and index): regular files only, as the library's loader takes them. Header-only: every
// program built from the CLI's sources (the CLI, its tests, the fuzzers) reads this way.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cli/error.h"

namespace moert_cli {

// The whole of `path`. Fails (cli/error.h) naming it when it cannot be opened or read, or is not
// a regular file: the open does not block, so a FIFO nobody writes to is refused at once instead
// of hanging the command.
inline std::vector<uint8_t> read_regular_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, S_ISDIR(st.st_mode) ? ": is a directory, not a file" : ": is not a regular file");
  }
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : 0;
      ::close(fd);
      fail(path, ": read error: ", err ? std::strerror(err) : "the file shrank while it was read");
    }
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  return bytes;
}

}  // namespace moert_cli
