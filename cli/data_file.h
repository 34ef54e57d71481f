// Writing a model description with an external data file from the CLI (`moert import`), and files
// in general, atomically: a temporary file in the destination's directory, fsync, rename, fsync of
// the directory. The data file is named after its content ("<model file>.<XXH3-64 as 16 hex
// digits>.data", as checkpoints name theirs), so that writing a new model never replaces the data
// an existing description refers to, and the same content always gives the same bytes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

namespace moert_cli {

// Tensors in the data file start at multiples of this (the loader's kExternalAlignment).
inline constexpr uint64_t kDataAlignment = 64;
// Tensors of at least this many bytes go to the data file; smaller ones stay inline.
inline constexpr uint64_t kDataMinBytes = uint64_t{64} << 10;

// Refuses (a usage error naming both) an output that is one of `inputs`, through any name or
// link: writing it would replace what the command reads. Each input is also kept from the
// clean-up below, whatever its name.
void refuse_writing_onto_inputs(const std::string& out, const std::vector<std::string>& inputs);

// The files a model description at `path` reads: itself and its external data file, if any.
std::vector<std::string> model_files(const std::string& path);

// Removes the temporary files that writes of `path` by processes of this host that have since
// died (a signal, a crash) left beside it: "<file>.tmp.<host>.<pid>" and
// "<file>.data.tmp.<host>.<pid>" whose process no longer exists. A live writer's, another host's
// (a shared file system) and any other file are kept. Never throws: failures are ignored.
void remove_interrupted_writes(const std::string& path) noexcept;

class DataFileWriter {
 public:
  // The data file will sit beside model_path; a model_path that is a directory is refused.
  explicit DataFileWriter(std::string model_path);
  ~DataFileWriter();
  DataFileWriter(const DataFileWriter&) = delete;
  DataFileWriter& operator=(const DataFileWriter&) = delete;

  // Appends the concatenation of `pieces` as one tensor at the next aligned offset; returns it.
  // `written`, when given, is called with each piece once it has been written.
  uint64_t append(const std::vector<std::span<const uint8_t>>& pieces,
                  void (*written)(std::span<const uint8_t>) = nullptr);
  uint64_t size() const { return size_; }
  // Flushes and syncs the temporary file: the slow part of a commit, done before the directory
  // lock that commit() runs under (whose waiters give up after DirectoryLock::kPatience).
  void sync();
  // Syncs (unless done) and renames the data file into place; returns its name relative to the
  // model file's directory, or "" (and no file) when nothing was appended.
  std::string commit();
  // After commit(): removes the data file again if commit() created it, for when the description
  // that was to refer to it could not be written. One that already existed stays: it is named by
  // its content, so another description may refer to it.
  void discard() noexcept;

 private:
  void write(const void* p, size_t n);

  std::string model_path_, temp_path_;
  std::string created_;  // the data file commit() created, until discard()
  std::FILE* f_ = nullptr;
  bool temp_left_ = true;  // the temporary file exists under its temporary name
  uint64_t size_ = 0;
  void* hash_ = nullptr;
};

// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the directory).
// A `path` that is a directory, a device or a FIFO is refused before anything is written.
void write_file_atomically(const std::string& path, std::span<const uint8_t> bytes);
// The same for the concatenation of `parts`, written one after the other (no copy of the whole).
void write_parts_atomically(const std::string& path,
                            const std::vector<std::span<const uint8_t>>& parts);

// Files written together (an export's shards, config and index): each is written whole to its
// temporary file first; only once all are does commit() rename them into place, in the order
// staged. A failure before that (a full disk) leaves every destination as it was and removes the
// temporary files; so does destroying it uncommitted. A rename that fails midway leaves those
// before it in place (the caller's marker says so: an export's).
class StagedFiles {
 public:
  StagedFiles() = default;
  ~StagedFiles();
  StagedFiles(const StagedFiles&) = delete;
  StagedFiles& operator=(const StagedFiles&) = delete;

  // Writes the concatenation of `parts` to the temporary file of `path` and fsyncs it.
  void stage(const std::string& path, const std::vector<std::span<const uint8_t>>& parts);
  // Renames every staged file into place, each followed by an fsync of its directory.
  void commit();
  // The destinations commit() has renamed into place so far (all of them once it returned).
  const std::vector<std::string>& renamed() const { return renamed_; }

 private:
  std::vector<std::pair<std::string, std::string>> staged_;  // (temporary, destination)
  std::vector<std::string> renamed_;
};

}  // namespace moert_cli
