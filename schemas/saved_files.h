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
#include <ctime>
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

// A description-like file modified this recently that does not verify may be a copy still being
// written (`cp` writes in pieces): it keeps every data file. An older one is damaged, names
// nothing, and does not hold the clean-up up for good.
inline constexpr int64_t kCopyInProgressSeconds = 120;

// Whether `name` is a data file of any save ("<anything>.<16 lowercase hex digits>.data"): never a
// description, so never read.
inline bool is_any_data_file(std::string_view name) {
  if (name.size() < 22 || !name.ends_with(".data") || name[name.size() - 22] != '.') return false;
  return name.substr(name.size() - 21, 16).find_first_not_of("0123456789abcdef") ==
         std::string_view::npos;
}

// The string literals of a JSON text, unescaped (\uXXXX with surrogate pairs as UTF-8). Not a
// validator: what the text names is all the scan needs; a malformed escape ends the literal.
inline std::vector<std::string> json_string_literals(std::string_view text) {
  std::vector<std::string> out;
  auto hex4 = [&](size_t at, uint32_t& v) {
    if (at + 4 > text.size()) return false;
    v = 0;
    for (size_t k = at; k < at + 4; ++k) {
      const char c = text[k];
      const int d = c >= '0' && c <= '9'   ? c - '0'
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                           : -1;
      if (d < 0) return false;
      v = v * 16 + static_cast<uint32_t>(d);
    }
    return true;
  };
  auto utf8 = [](uint32_t cp, std::string& s) {
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xE0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      s += static_cast<char>(0xF0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
  };
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '"') continue;
    std::string s;
    for (++i; i < text.size() && text[i] != '"'; ++i) {
      if (text[i] != '\\') {
        s += text[i];
        continue;
      }
      if (++i >= text.size()) break;
      const char e = text[i];
      if (e == 'u') {
        uint32_t v = 0;
        if (!hex4(i + 1, v)) break;
        i += 4;
        uint32_t low = 0;
        if (v >= 0xD800 && v < 0xDC00 && i + 6 < text.size() && text[i + 1] == '\\' &&
            text[i + 2] == 'u' && hex4(i + 3, low) && low >= 0xDC00 && low < 0xE000) {
          v = 0x10000 + ((v - 0xD800) << 10) + (low - 0xDC00);
          i += 6;
        }
        utf8(v, s);
      } else {
        s += e == 'n'   ? '\n'
             : e == 't' ? '\t'
             : e == 'r' ? '\r'
             : e == 'b' ? '\b'
             : e == 'f' ? '\f'
                        : e;
      }
    }
    out.push_back(std::move(s));
  }
  return out;
}

// Whether a file beginning with `head` may be a JSON description: after a UTF-8 byte order mark,
// blanks and comments (which `moert convert` accepts), a '{'. Unsure (a comment longer than the
// head) counts as yes.
inline bool may_be_json(std::string_view head) {
  if (head.starts_with("\xEF\xBB\xBF")) head.remove_prefix(3);
  for (size_t i = 0; i < head.size();) {
    const char c = head[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      ++i;
    } else if (head.substr(i, 2) == "//") {
      const size_t end = head.find('\n', i);
      if (end == std::string_view::npos) return true;
      i = end + 1;
    } else if (head.substr(i, 2) == "/*") {
      const size_t end = head.find("*/", i + 2);
      if (end == std::string_view::npos) return true;
      i = end + 2;
    } else {
      return c == '{';
    }
  }
  return false;
}

// Removes the data files of earlier saves to `file` in `dir` (is_data_file_of), all but `keep`,
// that no file in `dir` names. A binary model description names its 'external_data', and so does
// a JSON one (as `moert convert` writes them; blanks, comments and escapes included). A data file
// is kept when a name reaches it, by identity (device and inode), so a link to it counts too. Only
// regular files are opened (never a FIFO or a device), and a file is read whole only when its first
// 4 KiB show a description. Whatever the scan cannot read for certain keeps every data file: a
// listing, stat, open or read that fails (other than a file gone meanwhile), a description larger
// than kMaxScannedDescription, memory, and a description-like file modified in the last
// kCopyInProgressSeconds that does not verify (a copy being written). Removing is a courtesy to the
// disk; a data file lost is a checkpoint lost. Never throws.
inline void remove_unnamed_data_files(const std::filesystem::path& dir, const std::string& file,
                                      const std::string& keep) noexcept {
  namespace fs = std::filesystem;
  int dfd = -1;
  try {
    std::vector<std::string> candidates, entries;
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; it != end; it.increment(ec)) {
      if (ec) return;
      std::string name = it->path().filename().string();
      // A temporary file of a save to `file` is a killed save's (saves take turns), which the
      // caller removes next: what it names is not kept.
      if (is_data_file_of(name, file) && name != keep)
        candidates.push_back(std::move(name));
      else if (!is_any_data_file(name) && !is_save_temporary_of(name, file))
        entries.push_back(std::move(name));
    }
    if (ec || candidates.empty()) return;
    // Everything below is relative to the directory, opened once.
    dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return;
    const auto close_dir = [&] { ::close(dfd); };
    using Identity = std::pair<dev_t, ino_t>;
    std::set<Identity> named;
    // A name a description holds: the file it reaches, if any.
    const auto reach = [&](const std::string& name) {
      struct stat target {};
      if (!name.empty() && ::fstatat(dfd, name.c_str(), &target, 0) == 0)
        named.insert({target.st_dev, target.st_ino});
    };
    const auto pread_all = [](int fd, uint8_t* p, size_t n, off_t at) -> ssize_t {
      size_t got = 0;
      while (got < n) {
        const ssize_t r = ::pread(fd, p + got, n - got, at + static_cast<off_t>(got));
        if (r == 0) break;
        if (r < 0) {
          if (errno == EINTR) continue;
          return -1;
        }
        got += static_cast<size_t>(r);
      }
      return static_cast<ssize_t>(got);
    };
    const int64_t now = static_cast<int64_t>(::time(nullptr));
    for (const std::string& name : entries) {
      struct stat st {};
      if (::fstatat(dfd, name.c_str(), &st, 0) != 0) {
        if (errno == ENOENT) continue;  // removed meanwhile, or a dangling link
        return close_dir();
      }
      if (!S_ISREG(st.st_mode)) continue;
      const bool recent = now - static_cast<int64_t>(st.st_mtime) < kCopyInProgressSeconds;
      if (st.st_size < 8) {
        if (recent) return close_dir();  // a copy that has just begun
        continue;
      }
      const int fd = ::openat(dfd, name.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
      if (fd < 0) {
        if (errno == ENOENT) continue;
        return close_dir();
      }
      std::vector<uint8_t> bytes(4096);
      const ssize_t head = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)
                               ? pread_all(fd, bytes.data(), bytes.size(), 0)
                               : -1;
      if (head < 0) {
        ::close(fd);
        return close_dir();
      }
      bytes.resize(static_cast<size_t>(head));
      const bool binary = bytes.size() >= 8 && fb::ModelBufferHasIdentifier(bytes.data());
      const bool json =
          !binary && may_be_json({reinterpret_cast<const char*>(bytes.data()), bytes.size()});
      if (!binary && !json) {
        ::close(fd);
        continue;
      }
      if (st.st_size > kMaxScannedDescription) {
        ::close(fd);
        return close_dir();
      }
      bytes.resize(static_cast<size_t>(st.st_size));
      const ssize_t got = pread_all(fd, bytes.data(), bytes.size(), 0);
      ::close(fd);
      if (got < 0) return close_dir();
      bytes.resize(static_cast<size_t>(got));
      if (binary) {
        const std::string data = external_data_of(bytes);
        if (data.empty()) {
          flatbuffers::Verifier verifier(bytes.data(), bytes.size(), 64, 1000000);
          if (!fb::VerifyModelBuffer(verifier) && recent) return close_dir();
        }
        reach(data);
      } else {
        // The value after each "external_data" key (a string value follows its key).
        const std::vector<std::string> literals =
            json_string_literals({reinterpret_cast<const char*>(bytes.data()), bytes.size()});
        for (size_t k = 0; k + 1 < literals.size(); ++k)
          if (literals[k] == "external_data" && !literals[k + 1].empty() &&
              literals[k + 1].find('\0') == std::string::npos)
            reach(fs::path(literals[k + 1]).lexically_normal().string());
      }
    }
    for (const std::string& c : candidates) {
      struct stat st {};
      if (::fstatat(dfd, c.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
      struct stat target {};
      if (::fstatat(dfd, c.c_str(), &target, 0) == 0 &&
          named.contains({target.st_dev, target.st_ino}))
        continue;
      ::unlinkat(dfd, c.c_str(), 0);
    }
    close_dir();
  } catch (...) {
    // Memory, most likely: every data file stays.
    if (dfd >= 0) ::close(dfd);
  }
}

}  // namespace moert::format
