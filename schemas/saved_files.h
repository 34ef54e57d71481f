// What writers of model files beside their data files share: the directory lock they take, and
// which data files the descriptions in a directory name. Used by the library's checkpoint writer
// and the `moert` command's importer (which links only the public library, so this is
// header-only and depends on nothing but the schema): both remove the data files of earlier saves
// to a path, and a data file another description still names is not theirs to remove —
// `cp ckpt.moert best.moert` copies the description, and the copy keeps naming ckpt.moert's data
// file — nor is one that a concurrent writer to the same path has just put in place.
#pragma once

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "moert_generated.h"

namespace moert::format {

// Descriptors that hold an flock(2) in this process: a directory's lock, a save's temporary file
// while it is written. A child of fork() shares their open file descriptions, and so their locks,
// for as long as it keeps its copies: one that does not exec kept a directory locked after its
// parent died, and every later save there waited out its patience. The child's copies are closed
// at the fork instead (pthread_atfork), so that a lock lives exactly as long as its holder in the
// parent. Registering happens under a mutex that the fork handler takes first. The first open does
// not: an open can block for as long as its file system (a stuck NFS mount), and every fork() in
// the process would wait with it. The handler counts forks; a descriptor that a fork may have
// copied before it was registered is replaced by a second open, made under the mutex (forks wait
// for that one, which only a fork during the first makes). More than kSlots at once are not
// registered: their children keep copies, as before.
namespace fork_closed {
inline constexpr int kSlots = 64;
inline std::atomic<int> slots[kSlots];  // descriptor + 1; 0 is a free slot
inline pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
// Forks made by this process, counted after each while the mutex is still held: a descriptor
// opened after a fork was counted cannot have been copied by it.
inline std::atomic<uint64_t> forks{0};
// For tests: called between a ForkClosedFd's first open and its check for forks, the window where
// another thread's fork() or a change to the path can fall.
inline void (*after_first_open)() = nullptr;

inline void lock() { ::pthread_mutex_lock(&mutex); }
inline void unlock() { ::pthread_mutex_unlock(&mutex); }
inline void after_fork_in_parent() {
  forks.fetch_add(1);
  unlock();
}
inline void close_in_child() {
  for (auto& slot : slots)
    if (const int registered = slot.exchange(0); registered > 0) ::close(registered - 1);
  unlock();
}
// Installed once per copy of this header's variables (the library's, the moert command's): the
// function-local static goes with them. A failed registration leaves descriptors unregistered.
inline bool handlers_installed() {
  static const bool installed =
      ::pthread_atfork(&lock, &after_fork_in_parent, &close_in_child) == 0;
  return installed;
}
}  // namespace fork_closed

// A descriptor opened with O_CLOEXEC whose copy in a child of fork() is closed at the fork (above).
class ForkClosedFd {
 public:
  // fd() is -1 with errno set when the open failed. After a fork during the first open, a file
  // it created (O_CREAT | O_EXCL) is removed and created again, and any other file is opened
  // again and must be the same one (ESTALE if the path names another by then).
  ForkClosedFd(const char* path, int flags, mode_t mode = 0) {
    flags |= O_CLOEXEC;
    const bool handled = fork_closed::handlers_installed();
    const uint64_t forks = fork_closed::forks.load();
    fd_ = ::open(path, flags, mode);
    if (fd_ < 0 || !handled) return;
    if (fork_closed::after_first_open) fork_closed::after_first_open();
    fork_closed::lock();
    if (fork_closed::forks.load() != forks) reopen(path, flags, mode);
    const int saved_errno = errno;
    if (fd_ >= 0)
      for (auto& slot : fork_closed::slots)
        if (int free = 0; slot.compare_exchange_strong(free, fd_ + 1)) {
          registered_ = &slot;
          break;
        }
    fork_closed::unlock();
    errno = saved_errno;
  }
  // Releases its flock, if any, before a fork can copy the descriptor unregistered, then closes
  // it. In a child of fork() whose copy the handler closed, does nothing: the number may name
  // another file of the child's by now.
  ~ForkClosedFd() {
    if (fd_ < 0) return;
    if (registered_ && registered_->load() != fd_ + 1) return;
    ::flock(fd_, LOCK_UN);
    if (registered_) registered_->store(0);
    ::close(fd_);
  }
  // False in a child of fork() whose copy the handler closed.
  bool open_here() const { return fd_ >= 0 && (!registered_ || registered_->load() == fd_ + 1); }
  ForkClosedFd(const ForkClosedFd&) = delete;
  ForkClosedFd& operator=(const ForkClosedFd&) = delete;

  int fd() const { return fd_; }

 private:
  // Under the mutex: replaces fd_, which a child forked since its open may hold a copy of (a lock
  // taken on it would live on in that child), by a new open file description of the same file.
  void reopen(const char* path, int flags, mode_t mode) {
    struct stat first {};
    const bool known = ::fstat(fd_, &first) == 0;
    auto same = [&](const struct stat& st) {
      return known && st.st_dev == first.st_dev && st.st_ino == first.st_ino;
    };
    if ((flags & (O_CREAT | O_EXCL)) == (O_CREAT | O_EXCL)) {
      // Created by the first open: opened again, it could refuse the access its own creation
      // granted (a mode without write permission), so it is made again.
      struct stat at_path {};
      if (::lstat(path, &at_path) == 0 && same(at_path)) ::unlink(path);
      ::close(fd_);
      fd_ = ::open(path, flags, mode);
      return;
    }
    const int second = ::open(path, flags & ~O_TRUNC, mode);
    const int saved_errno = errno;
    ::close(fd_);
    fd_ = second;
    errno = saved_errno;
    struct stat st {};
    if (fd_ >= 0 && !(::fstat(fd_, &st) == 0 && same(st))) {
      ::close(fd_);
      fd_ = -1;
      errno = ESTALE;
    }
  }

  int fd_ = -1;
  std::atomic<int>* registered_ = nullptr;
};

// An exclusive lock on a directory for the scope (flock(2)): saves into one directory take turns,
// so that one save's clean-up never removes the data file or the temporary file of another save to
// the same path, in this process or another. A file system that cannot lock a directory opened for
// reading (NFS, whose client emulates flock with byte-range locks) leaves saves unlocked, as they
// were before, and so does a directory this process may write but not read (mode 0333). The
// kernel releases the lock of a killed process, but not that of a stopped or stuck one: the wait
// is bounded by `patience`, after which timed_out() is true and the caller must not go on (the
// lock is not held). A child forked meanwhile does not share the lock (ForkClosedFd).
class DirectoryLock {
 public:
  // Long enough for any save's commit (the library holds the lock only to rename its files into
  // place and clean up), short enough that a process stopped inside one does not hang its peers.
  static constexpr std::chrono::milliseconds kPatience{30000};

  explicit DirectoryLock(const std::filesystem::path& dir,
                         std::chrono::milliseconds patience = kPatience)
      : dir_(dir.c_str(), O_RDONLY | O_DIRECTORY) {
    if (dir_.fd() < 0) return;
    const auto deadline = std::chrono::steady_clock::now() + patience;
    auto pause = std::chrono::microseconds(200);
    while (::flock(dir_.fd(), LOCK_EX | LOCK_NB) != 0) {
      if (errno == EINTR) continue;
      if (errno != EWOULDBLOCK) return;  // cannot lock here: unlocked, as before
      if (std::chrono::steady_clock::now() >= deadline) {
        timed_out_ = true;
        return;
      }
      std::this_thread::sleep_for(pause);
      pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(20));
    }
    locked_ = true;
  }
  bool timed_out() const { return timed_out_; }
  // Unlocked explicitly, in case a child forked meanwhile holds a copy after all (a full table).
  ~DirectoryLock() {
    if (locked_ && dir_.open_here()) ::flock(dir_.fd(), LOCK_UN);
  }
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  ForkClosedFd dir_;
  bool timed_out_ = false;
  bool locked_ = false;
};

// Whether `now` (a stat of a path) is still the file `then` was taken of, for a reader that does
// not keep it open and must notice a save or export that renamed another file over it: device,
// inode and the inode's change time, since the number of a file removed meanwhile may be given
// to the file that replaced it (tmpfs and ext4 reuse them), whose creation set a later time.
inline bool same_file(const struct stat& then, const struct stat& now) {
  return now.st_dev == then.st_dev && now.st_ino == then.st_ino &&
         now.st_ctim.tv_sec == then.st_ctim.tv_sec && now.st_ctim.tv_nsec == then.st_ctim.tv_nsec;
}

// Whether a writer holds `path` open under flock (a library save's temporary file while it is
// written): a clean-up leaves such a file alone. Probed with a shared lock, which conflicts with
// the writer's exclusive one and which a read-only descriptor may take (NFS's emulation refuses
// it an exclusive one). A file that cannot be opened or locked here (another user's 0600 file, a
// file system without locks) counts as held while it was modified within kCopyInProgressSeconds:
// a live writer keeps changing it. What is not a regular file is never a writer's (a FIFO is not
// opened for long: O_NONBLOCK).
inline bool held_by_a_writer(const std::filesystem::path& path);

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

// A description-like file modified this recently (against the file just saved, whose time is
// the file system's clock) that cannot be read whole may be a copy still being written (`cp`
// writes in pieces): it keeps every data file. An older one is damaged and names nothing, so it
// does not hold the clean-up up for good.
inline constexpr int64_t kCopyInProgressSeconds = 120;

inline bool held_by_a_writer(const std::filesystem::path& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  const bool recent = std::time(nullptr) - st.st_mtime < kCopyInProgressSeconds;
  const ForkClosedFd file(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  if (file.fd() < 0) return recent;
  int r;
  while ((r = ::flock(file.fd(), LOCK_SH | LOCK_NB)) != 0 && errno == EINTR) {
  }
  return r != 0 && (errno == EWOULDBLOCK || recent);  // the lock taken, if any, goes with `file`
}

// Whether `name` is a data file of any save ("<anything>.<16 lowercase hex digits>.data") or a
// data file being written (a library save's ".<file>.data-XXXXXX", the moert command's
// "<file>.data.tmp.<host>.<pid>"): never a description, so never read.
inline bool is_any_data_file(std::string_view name) {
  if (name.size() >= 22 && name.ends_with(".data") && name[name.size() - 22] == '.' &&
      name.substr(name.size() - 21, 16).find_first_not_of("0123456789abcdef") ==
          std::string_view::npos)
    return true;
  if (name.starts_with('.') && name.size() >= 12 && name.substr(name.size() - 12, 6) == ".data-")
    return true;
  return name.find(".data.tmp.") != std::string_view::npos;
}

// Whether a file beginning with `head` may be a JSON description: after a UTF-8 byte order mark,
// blanks and comments (which `moert convert` accepts), a '{'. A head that ends before saying
// (`cut`: the file goes on) counts as yes.
inline bool may_be_json(std::string_view head, bool cut) {
  if (head.starts_with("\xEF\xBB\xBF")) head.remove_prefix(3);
  for (size_t i = 0; i < head.size();) {
    const char c = head[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      ++i;
    } else if (c == '/' && i + 1 == head.size()) {
      return cut;
    } else if (head.substr(i, 2) == "//") {
      const size_t end = head.find('\n', i);
      if (end == std::string_view::npos) return cut;
      i = end + 1;
    } else if (head.substr(i, 2) == "/*") {
      const size_t end = head.find("*/", i + 2);
      if (end == std::string_view::npos) return cut;
      i = end + 2;
    } else {
      return c == '{';
    }
  }
  return cut;
}

// Appends `raw` to `text` with the escapes of ASCII characters decoded that the reader of JSON
// descriptions (FlatBuffers' parser) accepts in a string: JSON's \uXXXX and its own \xHH. An
// escaped backslash stays two characters, so "\\u0030" is not read as a digit. Returns how many
// bytes of `raw` it consumed: all when `last`, else all but an escape that may continue in the
// next read.
inline size_t decode_json_ascii_escapes(std::string_view raw, bool last, std::string& text) {
  const auto hex = [](char c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
  };
  size_t i = 0;
  for (; i < raw.size(); ++i) {
    if (raw[i] != '\\') {
      text += raw[i];
      continue;
    }
    if (i + 6 > raw.size() && !last) break;
    const size_t digits = i + 1 >= raw.size() ? 0
                          : raw[i + 1] == 'u' ? 4
                          : raw[i + 1] == 'x' ? 2
                                              : 0;
    if (digits > 0 && i + 2 + digits <= raw.size()) {
      int code = 0;
      for (size_t k = 2; k < 2 + digits && code >= 0; ++k)
        code = hex(raw[i + k]) < 0 ? -1 : code * 16 + hex(raw[i + k]);
      if (code >= 0 && code < 0x80) {
        text += static_cast<char>(code);
        i += 1 + digits;
        continue;
      }
    }
    text += raw[i];
    if (i + 1 < raw.size()) text += raw[++i];
  }
  return i;
}

// The 'external_data' string of the binary model description in `fd` (`size` bytes), read field
// by field with bounds checks (the FlatBuffers layout: root offset, table, vtable, string), so that
// a description of any size costs a few small reads. nullopt when the bytes do not hold it
// whole: a description cut short (a copy in progress) or damaged. "" when it names none.
inline std::optional<std::string> external_data_in(int fd, int64_t size) {
  auto read = [&](int64_t at, void* p, int64_t n) {
    if (at < 0 || n < 0 || at + n > size) return false;
    for (int64_t got = 0; got < n;) {
      const ssize_t r = ::pread(fd, static_cast<char*>(p) + got, static_cast<size_t>(n - got),
                                static_cast<off_t>(at + got));
      if (r > 0)
        got += r;
      else if (r == 0 || errno != EINTR)
        return false;
    }
    return true;
  };
  uint32_t root = 0, string_rel = 0, length = 0;
  int32_t vtable_back = 0;
  uint16_t vtable_size = 0, field = 0;
  if (!read(0, &root, 4) || !read(root, &vtable_back, 4)) return std::nullopt;
  const int64_t vtable = static_cast<int64_t>(root) - vtable_back;
  if (!read(vtable, &vtable_size, 2)) return std::nullopt;
  // Zeros where a vtable or a name should be are bytes not written yet (a copy that fills a
  // preallocated file out of order), not "no name": the writers leave an absent name out.
  if (vtable_size < 4 || vtable_size % 2 != 0) return std::nullopt;
  constexpr int64_t kSlot = fb::Model::VT_EXTERNAL_DATA;
  if (vtable_size < kSlot + 2) return std::string();  // written before the field existed
  if (!read(vtable + kSlot, &field, 2)) return std::nullopt;
  if (field == 0) return std::string();
  const int64_t at = static_cast<int64_t>(root) + field;
  if (!read(at, &string_rel, 4) || !read(at + string_rel, &length, 4) || length == 0 ||
      length > 65536)
    return std::nullopt;
  std::string name(length, '\0');
  if (!read(at + string_rel + 4, name.data(), length)) return std::nullopt;
  return name;
}

// Removes the data files of earlier saves to `file` in `dir` (is_data_file_of), all but `keep`,
// that no file in `dir` names. A binary model description names its 'external_data', matched to
// the data file by identity (device and inode, so a link to it counts); a JSON one (as `moert
// convert` writes them) names a data file whose 16-digit digest its text holds. Only regular
// files are opened (never a FIFO or a device), never a data file; each is read from a 64 KiB
// buffer, whatever its size. Whatever the scan cannot read for certain keeps every data file: a
// listing, stat, open or read that fails (other than a name that leads nowhere), memory, and a
// binary description modified in the last kCopyInProgressSeconds whose name cannot be read (a
// copy being written). Removing is a courtesy to the disk; a data file lost is a checkpoint lost.
// Never throws.
inline void remove_unnamed_data_files(const std::filesystem::path& dir, const std::string& file,
                                      const std::string& keep) noexcept {
  namespace fs = std::filesystem;
  struct Fd {
    int fd = -1;
    ~Fd() {
      if (fd >= 0) ::close(fd);
    }
  };
  // A name that leads nowhere: gone meanwhile, a dangling or looping link.
  const auto nowhere = [] { return errno == ENOENT || errno == ELOOP || errno == ENOTDIR; };
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
    Fd d{::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
    if (d.fd < 0) return;
    std::vector<char> buffer(64 << 10);
    struct stat saved {};
    // "Now" on the file system's clock (NFS servers keep their own): the file just saved.
    const int64_t now = ::fstatat(d.fd, file.c_str(), &saved, 0) == 0
                            ? static_cast<int64_t>(saved.st_mtime)
                            : static_cast<int64_t>(::time(nullptr));
    std::set<std::pair<dev_t, ino_t>> named;
    std::set<std::string> digests_held;
    for (const std::string& name : entries) {
      struct stat st {};
      if (::fstatat(d.fd, name.c_str(), &st, 0) != 0) {
        if (nowhere()) continue;
        return;
      }
      if (!S_ISREG(st.st_mode)) continue;
      Fd f{::openat(d.fd, name.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY)};
      if (f.fd < 0) {
        if (nowhere()) continue;
        return;
      }
      if (::fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
      // Modification time: `cp -p` sets the source's only once the bytes are all written.
      const bool recent = now - static_cast<int64_t>(st.st_mtime) < kCopyInProgressSeconds;
      ssize_t head = 0;
      while ((head = ::pread(f.fd, buffer.data(), 4096, 0)) < 0 && errno == EINTR) {
      }
      if (head < 0) return;
      if (head >= 8 && fb::ModelBufferHasIdentifier(buffer.data())) {
        const std::optional<std::string> data = external_data_in(f.fd, st.st_size);
        if (!data) {
          if (recent) return;  // a copy being written
          continue;            // damaged: loads nothing, names nothing
        }
        struct stat target {};
        if (data->empty() || data->find('\0') != std::string::npos) continue;
        if (::fstatat(d.fd, fs::path(*data).lexically_normal().c_str(), &target, 0) == 0)
          named.insert({target.st_dev, target.st_ino});
        else if (!nowhere() && errno != ENAMETOOLONG)
          return;  // what it names could not be looked at
        continue;
      }
      if (head < 8 && recent) return;  // a copy that has just begun
      const bool cut = head < st.st_size;
      if (!may_be_json({buffer.data(), static_cast<size_t>(head)}, cut)) continue;
      // JSON: every candidate whose digest the text holds, read 64 KiB at a time (with an
      // overlap of a digest's length, so that none is split between two reads). The text is
      // matched as JSON reads it: any character may be spelled \uXXXX, a digit of the digest too.
      constexpr size_t kDigest = 16;
      std::string raw, text;
      for (off_t at = 0;;) {
        const ssize_t r = ::pread(f.fd, buffer.data(), buffer.size(), at);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return;
        at += r;
        raw.append(buffer.data(), static_cast<size_t>(r));
        raw.erase(0, decode_json_ascii_escapes(raw, r == 0, text));
        for (const std::string& c : candidates)
          if (text.find(std::string_view(c).substr(file.size() + 1, kDigest)) != std::string::npos)
            digests_held.insert(c);
        text.erase(0, text.size() > kDigest ? text.size() - kDigest : 0);
        if (r == 0) break;
      }
    }
    // Removed only once looked at and named by nothing.
    for (const std::string& c : candidates) {
      struct stat target {};
      if (digests_held.contains(c) || ::fstatat(d.fd, c.c_str(), &target, 0) != 0 ||
          named.contains({target.st_dev, target.st_ino}))
        continue;
      ::unlinkat(d.fd, c.c_str(), 0);
    }
  } catch (...) {
    // Memory, most likely: every data file stays.
  }
}

}  // namespace moert::format
