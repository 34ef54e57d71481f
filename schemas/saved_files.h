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

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
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

// Whether `name` is one of the data files that saves to `file` write: "<file>.<16 lowercase hex
// digits>.data".
inline bool is_data_file_of(std::string_view name, std::string_view file) {
  if (name.size() != file.size() + 22 || !name.starts_with(file) || name[file.size()] != '.' ||
      !name.ends_with(".data"))
    return false;
  const std::string_view hex = name.substr(file.size() + 1, 16);
  return hex.find_first_not_of("0123456789abcdef") == std::string_view::npos;
}

// Whether `name` is a temporary file of a library save to `file`: ".<file>.tmp-XXXXXX" (the
// description) or ".<file>.data-XXXXXX" (the data file), which the next save removes.
inline bool is_save_temporary_of(std::string_view name, std::string_view file) {
  if (name.size() < 1 + file.size() || name[0] != '.' || name.substr(1, file.size()) != file)
    return false;
  const std::string_view tail = name.substr(1 + file.size());
  return (tail.size() == 11 && tail.starts_with(".tmp-")) ||
         (tail.size() == 12 && tail.starts_with(".data-"));
}

// The most bytes of one file the scan below reads: larger descriptions leave every data file in
// place rather than make a save allocate them.
inline constexpr int64_t kMaxScannedDescription = int64_t{256} << 20;

// Removes the data files of earlier saves to `file` in `dir` (is_data_file_of), all but `keep`,
// that no file in `dir` names. A binary model description names its 'external_data'; a regular
// file that begins with '{' (a JSON description, as `moert convert` writes them) names every data
// file whose name it holds. Named data files are matched by identity (device and inode), so a
// description that reaches one through a link keeps it too. Only regular files are opened (never
// a FIFO or a device), links followed. Whatever the scan cannot read for certain keeps every data
// file: a listing, open, stat or read that fails (other than a file gone meanwhile), a file
// larger than kMaxScannedDescription, memory. Removing is a courtesy to the disk; a data file lost
// is a checkpoint lost. A description that does not verify (truncated, or still being copied)
// names nothing. Never throws.
inline void remove_unnamed_data_files(const std::filesystem::path& dir, const std::string& file,
                                      const std::string& keep) noexcept {
  namespace fs = std::filesystem;
  try {
    std::vector<std::string> candidates, entries;
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; it != end; it.increment(ec)) {
      if (ec) return;
      entries.push_back(it->path().filename().string());
      if (is_data_file_of(entries.back(), file) && entries.back() != keep)
        candidates.push_back(entries.back());
    }
    if (ec || candidates.empty()) return;
    using Identity = std::pair<dev_t, ino_t>;
    std::set<Identity> named;
    std::set<std::string> held_in_text;
    // Reads all of `fd` (regular, `size` bytes) into `bytes`; false on a failure.
    auto read_all = [](int fd, int64_t size, std::vector<uint8_t>& bytes) {
      bytes.resize(static_cast<size_t>(size));
      for (size_t at = 0; at < bytes.size();) {
        const ssize_t n = ::pread(fd, bytes.data() + at, bytes.size() - at, static_cast<off_t>(at));
        if (n > 0)
          at += static_cast<size_t>(n);
        else if (n == 0)
          bytes.resize(at);  // cut short meanwhile: what is there
        else if (errno != EINTR)
          return false;
      }
      return true;
    };
    for (const std::string& name : entries) {
      if (std::find(candidates.begin(), candidates.end(), name) != candidates.end()) continue;
      const fs::path path = dir / name;
      struct stat st {};
      if (::stat(path.c_str(), &st) != 0) {
        if (errno == ENOENT) continue;  // removed meanwhile, or a dangling link
        return;
      }
      if (!S_ISREG(st.st_mode) || st.st_size < 2) continue;
      if (st.st_size > kMaxScannedDescription) {
        // Only a file that could be a description holds the removal up.
        const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) return;
        uint8_t head[8] = {};
        const bool description = ::pread(fd, head, 8, 0) == 8 && fb::ModelBufferHasIdentifier(head);
        ::close(fd);
        if (description || head[0] == '{') return;
        continue;
      }
      const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
      if (fd < 0) {
        if (errno == ENOENT) continue;
        return;
      }
      std::vector<uint8_t> bytes;
      const bool read = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
                        st.st_size <= kMaxScannedDescription && read_all(fd, st.st_size, bytes);
      ::close(fd);
      if (!read) return;
      if (bytes.size() >= 8 && fb::ModelBufferHasIdentifier(bytes.data())) {
        const std::string data = external_data_of(bytes);
        struct stat target {};
        if (!data.empty() && ::stat((dir / data).c_str(), &target) == 0)
          named.insert({target.st_dev, target.st_ino});
      } else if (!bytes.empty() && bytes[0] == '{') {
        const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
        for (const std::string& c : candidates)
          if (text.find(c) != std::string_view::npos) held_in_text.insert(c);
      }
    }
    for (const std::string& c : candidates) {
      struct stat st {};
      if (held_in_text.contains(c) || ::stat((dir / c).c_str(), &st) != 0 ||
          named.contains({st.st_dev, st.st_ino}))
        continue;
      ::unlink((dir / c).c_str());
    }
  } catch (...) {
    // Memory, most likely: every data file stays.
  }
}

}  // namespace moert::format
