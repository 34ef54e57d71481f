#include "cli/data_file.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "cli/error.h"
#include "cli/model_codec.h"
#include "cli/regular_file.h"
#include "moert_generated.h"
#include "schemas/saved_files.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace moert_cli {

namespace {

namespace fs = std::filesystem;
namespace fb = moert::fb;

// This host's name, as temporary files carry it ("localhost" when it has none).
std::string host_name() {
  char name[256] = {};
  if (gethostname(name, sizeof name - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

// Named after the writing process and its host: the next write of `path` on the same host can
// tell an interrupted writer's file (its process is gone) from a live one's.
std::string temp_name(const std::string& path) {
  return cat(path, ".tmp.", host_name(), ".", static_cast<long>(getpid()));
}

void sync_file(std::FILE* f, const std::string& path) {
  if (std::fflush(f) != 0 || fsync(fileno(f)) != 0)
    fail("cannot write '", path, "': ", std::strerror(errno));
}

void sync_dir(const std::string& path) {
  const int fd = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // the rename is done; a directory that cannot be opened cannot be synced
  fsync(fd);
  ::close(fd);
}

void rename_into_place(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0) {
    const int err = errno;
    std::remove(from.c_str());
    fail("cannot write '", to, "': renaming its temporary file '", from,
         "' into place: ", std::strerror(err));
  }
  sync_dir(to);
}

// Checked before anything is written beside `path`: renaming onto a directory fails only at the
// end, after the data file is in place, and renaming onto a device, a FIFO or a symbolic link
// would replace it (the library's saves refuse the same).
void refuse_non_regular(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (fs::is_directory(st)) fail("cannot write '", path, "': it is a directory");
  if (fs::exists(st) && !fs::is_regular_file(st))
    fail("cannot write '", path, "': it exists and is not a regular file");
  if (fs::is_symlink(fs::symlink_status(path, ec)))
    fail("cannot write '", path,
         "': it is a symbolic link, which the write would replace by a file (name the link's "
         "target, or remove the link first)");
}

// The inputs of this process's command (refuse_writing_onto_inputs), never removed.
std::vector<std::string>& declared_inputs() {
  static std::vector<std::string> inputs;
  return inputs;
}

bool is_input(const fs::path& p) {
  std::error_code ec;
  return std::any_of(declared_inputs().begin(), declared_inputs().end(),
                     [&](const std::string& in) { return fs::equivalent(p, in, ec); });
}

}  // namespace

void refuse_writing_onto_inputs(const std::string& out, const std::vector<std::string>& inputs) {
  for (const std::string& in : inputs) {
    declared_inputs().push_back(in);
    std::error_code ec;
    if (fs::equivalent(out, in, ec))
      usage_fail("'", out, "' is ",
                 out == in ? "an input of this command" : cat("the input '", in, "'"),
                 ": writing it would replace what this command reads; write elsewhere");
  }
}

std::vector<std::string> model_files(const std::string& path) {
  std::vector<std::string> files = {path};
  try {
    const std::vector<uint8_t> bytes = read_regular_file(path);
    if (const std::string data = moert::format::external_data_of(bytes); !data.empty())
      files.push_back((fs::path(directory_of(path)) / data).string());
  } catch (const Error&) {
    // An input that cannot be read is the command's to refuse, with its own message.
  }
  return files;
}

void remove_interrupted_writes(const std::string& path) noexcept {
  try {
    const std::string file = fs::path(path).filename().string();
    const std::string host = host_name();
    std::error_code ec;
    std::vector<fs::path> doomed;
    fs::directory_iterator it(directory_of(path), ec), end;
    for (; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      for (const std::string& prefix :
           {cat(file, ".tmp.", host, "."), cat(file, ".data.tmp.", host, ".")}) {
        if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
        const std::string pid = name.substr(prefix.size());
        if (pid.size() > 9 || pid.find_first_not_of("0123456789") != std::string::npos) continue;
        // Only a process that no longer exists: kill(pid, 0) fails with ESRCH.
        const long id = std::stol(pid);
        if (id > 0 && ::kill(static_cast<pid_t>(id), 0) != 0 && errno == ESRCH &&
            !is_input(it->path()))
          doomed.push_back(it->path());
      }
    }
    for (const auto& p : doomed) fs::remove(p, ec);
  } catch (...) {
    // Cleaning up is a courtesy: the write it follows succeeded.
  }
}

DataFileWriter::DataFileWriter(std::string model_path) : model_path_(std::move(model_path)) {
  refuse_non_regular(model_path_);
  temp_path_ = temp_name(model_path_ + ".data");
  // Said before anything is written, as the library's saves say it, rather than as "File name
  // too long" from the temporary file: the data file adds 22 bytes to the name
  // ("<16 hex digits>.data"), its temporary file more.
  const std::string file = fs::path(model_path_).filename().string();
  const uint64_t added =
      std::max<uint64_t>(22, fs::path(temp_path_).filename().string().size() - file.size());
  if (const long limit = ::pathconf(directory_of(model_path_).c_str(), _PC_NAME_MAX);
      limit > 0 && file.size() + added > static_cast<uint64_t>(limit))
    fail("cannot write '", model_path_, "': its file name is ", file.size(),
         " bytes and the files written beside it need ", added, " more, past this file system's ",
         limit, " (a name of at most ", static_cast<uint64_t>(limit) - added, " bytes fits)");
  f_ = std::fopen(temp_path_.c_str(), "wb");
  if (!f_)
    fail("cannot write the data file of '", model_path_, "': cannot create its temporary file '",
         temp_path_, "': ", std::strerror(errno));
  auto* state = XXH3_createState();
  if (!state) throw std::bad_alloc();
  XXH3_64bits_reset(state);
  hash_ = state;
}

DataFileWriter::~DataFileWriter() {
  if (f_) std::fclose(f_);
  if (temp_left_) std::remove(temp_path_.c_str());
  if (hash_) XXH3_freeState(static_cast<XXH3_state_t*>(hash_));
}

void DataFileWriter::write(const void* p, size_t n) {
  if (n == 0) return;
  if (std::fwrite(p, 1, n, f_) != n)
    fail("cannot write the data file of '", model_path_, "' (its temporary file '", temp_path_,
         "'): ", std::strerror(errno));
  XXH3_64bits_update(static_cast<XXH3_state_t*>(hash_), p, n);
  size_ += n;
}

uint64_t DataFileWriter::append(const std::vector<std::span<const uint8_t>>& pieces,
                                void (*written)(std::span<const uint8_t>)) {
  static const uint8_t kZeros[kDataAlignment] = {};
  write(kZeros, (kDataAlignment - size_ % kDataAlignment) % kDataAlignment);
  const uint64_t offset = size_;
  for (const auto& p : pieces) {
    write(p.data(), p.size());
    if (written) written(p);
  }
  return offset;
}

void DataFileWriter::sync() {
  if (!f_ || size_ == 0) return;
  sync_file(f_, temp_path_);
  std::fclose(f_);
  f_ = nullptr;
}

std::string DataFileWriter::commit() {
  if (size_ == 0) {
    if (f_) std::fclose(f_);
    f_ = nullptr;
    std::remove(temp_path_.c_str());
    temp_left_ = false;
    return "";
  }
  sync();
  char hex[17];
  std::snprintf(
      hex, sizeof hex, "%016llx",
      static_cast<unsigned long long>(XXH3_64bits_digest(static_cast<XXH3_state_t*>(hash_))));
  const std::string name = cat(fs::path(model_path_).filename().string(), ".", hex, ".data");
  const std::string path = (fs::path(model_path_).parent_path() / name).string();
  std::error_code ec;
  const bool existed = fs::exists(path, ec);
  rename_into_place(temp_path_, path);
  temp_left_ = false;
  if (!existed) created_ = path;
  return name;
}

void DataFileWriter::discard() noexcept {
  if (!created_.empty()) std::remove(created_.c_str());
  created_.clear();
}

void write_file_atomically(const std::string& path, std::span<const uint8_t> bytes) {
  write_parts_atomically(path, {bytes});
}

namespace {

// Writes and fsyncs the temporary file of `path`; returns its name.
std::string write_temporary(const std::string& path,
                            const std::vector<std::span<const uint8_t>>& parts) {
  refuse_non_regular(path);
  const std::string temp = temp_name(path);
  std::FILE* f = std::fopen(temp.c_str(), "wb");
  if (!f)
    fail("cannot write '", path, "': cannot create its temporary file '", temp,
         "': ", std::strerror(errno));
  bool ok = true;
  for (const auto& p : parts)
    if (!p.empty() && std::fwrite(p.data(), 1, p.size(), f) != p.size()) ok = false;
  if (!ok || std::fflush(f) != 0 || fsync(fileno(f)) != 0) {
    const int err = errno;
    std::fclose(f);
    std::remove(temp.c_str());
    fail("cannot write '", path, "' (its temporary file '", temp, "'): ", std::strerror(err));
  }
  std::fclose(f);
  return temp;
}

}  // namespace

void write_parts_atomically(const std::string& path,
                            const std::vector<std::span<const uint8_t>>& parts) {
  rename_into_place(write_temporary(path, parts), path);
  remove_interrupted_writes(path);
}

StagedFiles::~StagedFiles() {
  for (const auto& [temp, path] : staged_) std::remove(temp.c_str());
}

void StagedFiles::stage(const std::string& path,
                        const std::vector<std::span<const uint8_t>>& parts) {
  staged_.reserve(staged_.size() + 1);
  staged_.emplace_back(write_temporary(path, parts), path);
}

void StagedFiles::commit() {
  renamed_.reserve(renamed_.size() + staged_.size());
  for (auto it = staged_.begin(); it != staged_.end(); it = staged_.erase(it)) {
    rename_into_place(it->first, it->second);
    renamed_.push_back(it->second);
    remove_interrupted_writes(it->second);
  }
}

}  // namespace moert_cli
