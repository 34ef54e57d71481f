// Input files that `moert import` (safetensors shards) and `moert export` (a model's external data
// file) read through a read-only memory mapping: an import of a 10 GiB checkpoint then never
// holds more than the pages it is reading, and writes them out without a copy of its own.
//
// A mapped file that shrinks while it is read (a download still running, another program
// rewriting it) makes a read of the lost pages raise SIGBUS, which would kill the command and
// leave its temporary files behind; a write(2) straight from those pages fails with EFAULT
// instead ("Bad address"). So while any MappedFile exists the command handles SIGBUS: a fault
// inside a mapped input replaces the rest of that mapping with zero pages and marks the file as
// changed, and the read goes on. The zeros are never kept: the command checks its inputs
// (check_unchanged) before it writes anything in place and whenever it fails, and then refuses
// with one line naming the file. Only the CLI installs this handler (the library must not take a
// host's signals), for as long as it has files mapped; the previous disposition is restored after,
// and a SIGBUS from anywhere else is left to it.
#pragma once

#include <cstdint>
#include <ctime>
#include <span>
#include <string>

namespace moert_cli {

class MappedFile {
 public:
  // Opens `path` (a regular file; a FIFO is refused rather than waited on) and maps it whole.
  // `kind` names it in the errors ("external data file "), after "cannot open ".
  explicit MappedFile(const std::string& path, const std::string& kind = "");
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  // Its bytes as they were when opened (zeros where the file was cut short since).
  std::span<const uint8_t> bytes() const { return {static_cast<const uint8_t*>(map_), size_}; }
  // Throws Error naming the file when it changed since it was opened: a read of it went past
  // its new end, or its size or modification time differ.
  void check_unchanged() const;
  // Throws Error naming the file when its path now names another file (renamed over it: a
  // safetensors shard an export replaced). Not for a data file named by its content, which a
  // save of the same content renames over with the same bytes.
  void check_still_named() const;

 private:
  std::string path_;
  int fd_ = -1;
  void* map_ = nullptr;
  size_t size_ = 0;
  timespec mtime_{};
  void* region_ = nullptr;  // its entry in the SIGBUS handler's table
};

}  // namespace moert_cli
