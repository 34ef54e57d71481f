// What writers of model files beside their data files share: the directory lock they take, and
// which data files the descriptions in a directory name. Used by the library's checkpoint writer
// and the `moert` command's importer (which links only the public library, so this is
// header-only and depends on nothing but the schema): both remove the data files of earlier saves
// to a path, and a data file another description still names is not theirs to remove —
// `cp ckpt.moert best.moert` copies the description, and the copy keeps naming ckpt.moert's data
// file — nor is one that a concurrent writer to the same path has just put in place.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moert_generated.h"

namespace moert::format {

// An exclusive lock on a directory for the scope (flock(2), blocking): saves into one directory
// take turns, so that one save's clean-up never removes the data file or the temporary file of
// another save to the same path, in this process or another. A file system that cannot lock a
// directory opened for reading (NFS, whose client emulates flock with byte-range locks) leaves
// saves unlocked, as they were before. The kernel releases the lock of a killed process.
class DirectoryLock {
 public:
  explicit DirectoryLock(const std::filesystem::path& dir)
      : fd_(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) {
    if (fd_ >= 0)
      while (::flock(fd_, LOCK_EX) != 0 && errno == EINTR) {
      }
  }
  // Unlocked explicitly: a child forked meanwhile shares the open file description, whose lock
  // would otherwise outlive this scope until the child exits.
  ~DirectoryLock() {
    if (fd_ < 0) return;
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_;
};

// The data file a model description names (its 'external_data' field, lexically normalised, as a
// path relative to the description's directory); empty when `bytes` is not a verifiable model
// description or names none.
inline std::string external_data_of(std::span<const uint8_t> bytes) {
  if (bytes.size() < 8 || !fb::ModelBufferHasIdentifier(bytes.data())) return {};
  // The loader's limits: a description it would load is verified here too.
  flatbuffers::Verifier verifier(bytes.data(), bytes.size(), 64, 1000000);
  if (!fb::VerifyModelBuffer(verifier)) return {};
  const auto* name = fb::GetModel(bytes.data())->external_data();
  if (!name || name->size() == 0) return {};
  return std::filesystem::path(name->str()).lexically_normal().string();
}

// The data files that the model descriptions directly in `dir` name, for each description file
// that `skip` (given the file's name) does not exclude. A file is read only when it is a regular
// file of at most 2 GiB (the most a FlatBuffers buffer holds) whose first bytes carry the model
// file identifier; anything else — unreadable, a FIFO, truncated, not a description — names
// nothing. Links are followed: a link to a description names what the description names.
template <class Skip>
std::set<std::string> external_data_named_in(const std::filesystem::path& dir, Skip&& skip) {
  std::set<std::string> named;
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (skip(std::string_view(name))) continue;
    // Non-blocking: opening a FIFO for reading must not wait for a writer.
    const int fd = ::open(it->path().c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) continue;
    struct stat st {};
    std::vector<uint8_t> bytes;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= 8 &&
        st.st_size <= (int64_t{1} << 31)) {
      bytes.resize(8);
      bool ok = ::pread(fd, bytes.data(), 8, 0) == 8 && fb::ModelBufferHasIdentifier(bytes.data());
      if (ok) {
        bytes.resize(static_cast<size_t>(st.st_size));
        for (size_t at = 8; ok && at < bytes.size();) {
          const ssize_t n =
              ::pread(fd, bytes.data() + at, bytes.size() - at, static_cast<off_t>(at));
          if (n > 0) {
            at += static_cast<size_t>(n);
          } else {
            ok = n < 0 && errno == EINTR;  // a file cut short meanwhile names nothing
          }
        }
      }
      if (ok) {
        std::string data = external_data_of(bytes);
        if (!data.empty()) named.insert(std::move(data));
      }
    }
    ::close(fd);
  }
  return named;
}

}  // namespace moert::format
