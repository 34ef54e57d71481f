// A strict reader of safetensors files (https://huggingface.co/docs/safetensors), the format of
// Hugging Face checkpoints, for `moert import` and `moert export`. It lives in the CLI, not in
// libmoert: the library never reads foreign formats, and this keeps its JSON dependency out of it.
//
// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object: tensor name ->
// {"dtype", "shape", "data_offsets": [begin, end]}, plus an optional "__metadata__" object of
// strings), then the data section, which the tensors' byte ranges (relative to its start) tile
// exactly: sorted by offset, each begins where the previous one ends, the first at 0, the last at
// the end of the file. Everything that is not so is refused with a message naming the file and the
// tensor: a header length past the file or over 100 MB, JSON that is not an object of such
// objects, a duplicate key, an unknown dtype or key, a number that is not an integer in [0, 2^53],
// a shape whose byte count (with overflow checked) differs from its range, a range past the data,
// overlapping ranges or a gap between them.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moert_cli {

class MappedFile;
class SafetensorsFile;

enum class StDType { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U8, BOOL };

const char* st_dtype_name(StDType t);
uint64_t st_dtype_size(StDType t);
// Throws Error for a name that is not one of the dtypes above.
StDType st_dtype_from_name(const std::string& name);

struct StTensor {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<uint64_t> shape;
  uint64_t begin = 0, end = 0;  // within the data section
  std::span<const uint8_t> bytes;
  // The path of the file that holds it (its SafetensorsFile's origin), for messages: a DeepSeek-V3
  // checkpoint spreads a layer over several of its 163 shards.
  const std::string* origin = nullptr;
  // The file that holds it, to check after reading its bytes (SafetensorsFile::check_unchanged).
  const SafetensorsFile* file = nullptr;

  uint64_t numel() const;
};

// The largest header the reader accepts (the reference implementation's limit).
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;
// JSON integers above this are not exact in the doubles other readers parse them into.
inline constexpr uint64_t kMaxSafetensorsInteger = uint64_t{1} << 53;

class SafetensorsFile {
 public:
  // Maps `path` read-only (cli/mapped_file.h) and parses it. Throws Error naming the path on any
  // defect.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  // Parses bytes the caller keeps alive for the lifetime of the result (fuzzing, tests).
  static std::unique_ptr<SafetensorsFile> parse(std::span<const uint8_t> bytes,
                                                const std::string& origin);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& origin() const { return origin_; }
  // In the order of their data offsets.
  const std::vector<StTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr when absent.
  const StTensor* find(const std::string& name) const;
  // Throws Error naming the file when it changed since open() mapped it (what was read of its
  // tensors may be zeros then: cli/mapped_file.h) or its path now names another file. Nothing
  // for parse()'s bytes.
  void check_unchanged() const;

 private:
  SafetensorsFile() = default;
  void parse_bytes(std::span<const uint8_t> bytes);

  std::string origin_;
  std::unique_ptr<MappedFile> file_;
  std::vector<StTensor> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// The header of a safetensors file holding `sorted` (name, dtype, shape, bytes) in that order,
// padded with spaces to a multiple of 8 bytes so that every tensor's data is 8-byte aligned in the
// file; the data follows it, tensor after tensor. `metadata` goes to "__metadata__" when not empty.
// The bytes are the caller's (a view of a mapped file, or storage the caller keeps).
struct StOutTensor {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<uint64_t> shape;
  std::span<const uint8_t> bytes;
};
std::vector<uint8_t> safetensors_header(const std::vector<const StOutTensor*>& sorted,
                                        const std::map<std::string, std::string>& metadata);

// What `moert export` writes into its folder first and removes once the index is written: a
// folder holding it is an export that did not finish, whose files may mix with an earlier one's.
// It lists that export's files as the manifest below does (an older moert left it empty), so
// that the next export removes the shards it does not write again.
inline constexpr const char* kExportIncompleteMarker = ".moert-export-incomplete";
// What a finished `moert export` leaves beside its files: their names (JSON, {"files": [...]}).
// A folder with a config.json but without it holds another checkpoint, which an export refuses
// to overwrite; a later export into the folder removes the shards this one wrote and it did not.
inline constexpr const char* kExportManifest = ".moert-export";

// A Hugging Face checkpoint directory: config.json plus either model.safetensors or the shards
// that model.safetensors.index.json's "weight_map" names (plain file names in the directory; every
// tensor of the map must be in its shard). Shards are opened on first use.
class Checkpoint {
 public:
  explicit Checkpoint(std::string dir);
  const std::string& dir() const { return dir_; }
  // The text of config.json.
  std::string config_text() const;
  // nullptr when the checkpoint has no such tensor.
  const StTensor* find(const std::string& name);
  // Throws Error naming the tensor and the checkpoint when absent.
  const StTensor& get(const std::string& name);
  // Every tensor name the checkpoint holds.
  std::vector<std::string> names();
  // SafetensorsFile::check_unchanged() of every shard opened so far, and that config.json and
  // the index, when read, are still the files read (an export committing into the folder
  // meanwhile replaces them): throws Error otherwise.
  void check_unchanged() const;

 private:
  SafetensorsFile& shard(const std::string& file);
  // The text of `path`, whose identity is kept for check_unchanged().
  std::string read_kept(const std::string& path) const;

  std::string dir_;
  bool sharded_ = false;
  std::map<std::string, std::string> weight_map_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
  // Path -> stat of each JSON file read, taken before it was read (format::same_file).
  mutable std::map<std::string, struct stat> read_;
};

// Parses JSON text refusing duplicate keys (nlohmann keeps the last one silently) and nesting
// deeper than `max_depth`, so that a hostile file cannot build a deep tree; throws Error naming
// `origin`.
nlohmann::json parse_strict(std::string_view text, const std::string& origin, int max_depth);

// Parses the text of model.safetensors.index.json into its weight map; throws Error for anything
// but {"weight_map": {name: "file", ...}, "metadata": {...}?} with plain file names.
std::map<std::string, std::string> parse_safetensors_index(const std::string& text,
                                                           const std::string& origin);

}  // namespace moert_cli
