#include "cli/safetensors.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "cli/error.h"
#include "cli/mapped_file.h"
#include "cli/regular_file.h"
#include "schemas/saved_files.h"

namespace moert_cli {

namespace {

using nlohmann::json;

struct DTypeInfo {
  StDType type;
  const char* name;
  uint64_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {StDType::F64, "F64", 8},   {StDType::F32, "F32", 4},         {StDType::F16, "F16", 2},
    {StDType::BF16, "BF16", 2}, {StDType::F8_E4M3, "F8_E4M3", 1}, {StDType::F8_E5M2, "F8_E5M2", 1},
    {StDType::I64, "I64", 8},   {StDType::I32, "I32", 4},         {StDType::I16, "I16", 2},
    {StDType::I8, "I8", 1},     {StDType::U8, "U8", 1},           {StDType::BOOL, "BOOL", 1},
};

const DTypeInfo& info(StDType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d;
  fail("safetensors: unknown dtype ", static_cast<int>(t));
}

// The deepest nesting a valid header has: the root object, a tensor's object, its arrays.
constexpr int kMaxDepth = 3;

uint64_t json_u53(const json& v, const std::string& what) {
  if (!v.is_number_unsigned())
    fail(what, " must be a non-negative integer, got ", v.is_number() ? v.dump() : v.type_name());
  const uint64_t x = v.get<uint64_t>();
  if (x > kMaxSafetensorsInteger) fail(what, " is ", x, ", above 2^53");
  return x;
}

uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& what) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) fail(what, ": byte count overflows 64 bits");
  return r;
}

bool plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of(std::string("/\\\0", 3)) == std::string::npos;
}

std::string read_text(const std::string& path) {
  const std::vector<uint8_t> bytes = read_regular_file(path);
  return std::string(bytes.begin(), bytes.end());
}

}  // namespace

json parse_strict(std::string_view text, const std::string& origin, int max_depth) {
  std::vector<std::set<std::string>> keys;
  auto cb = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        if (depth >= max_depth) fail(origin, ": JSON nested deeper than ", max_depth, " levels");
        keys.emplace_back();
        break;
      case json::parse_event_t::array_start:
        if (depth >= max_depth) fail(origin, ": JSON nested deeper than ", max_depth, " levels");
        break;
      case json::parse_event_t::object_end:
        keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.back().insert(parsed.get<std::string>()).second)
          fail(origin, ": duplicate JSON key '", parsed.get<std::string>(), "'");
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), cb);
  } catch (const json::exception& e) {
    fail(origin, ": malformed JSON: ", e.what());
  }
}

const char* st_dtype_name(StDType t) { return info(t).name; }
uint64_t st_dtype_size(StDType t) { return info(t).size; }

StDType st_dtype_from_name(const std::string& name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return d.type;
  fail("unknown safetensors dtype '", name, "'");
}

uint64_t StTensor::numel() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;  // checked against the byte range at parse time
  return n;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->origin_ = path;
  f->file_ = std::make_unique<MappedFile>(path);
  const std::span<const uint8_t> bytes = f->file_->bytes();
  if (bytes.size() < 8)
    fail(path, ": ", bytes.size(),
         " bytes is too short for a safetensors file (8-byte header length)");
  // A header cut short while it is parsed reads as zeros: said as the change it is, not as the
  // defect the zeros make.
  try {
    f->parse_bytes(bytes);
  } catch (const Error&) {
    f->file_->check_unchanged();
    throw;
  }
  f->file_->check_unchanged();
  return f;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::parse(std::span<const uint8_t> bytes,
                                                        const std::string& origin) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->origin_ = origin;
  f->parse_bytes(bytes);
  return f;
}

SafetensorsFile::~SafetensorsFile() = default;

void SafetensorsFile::check_unchanged() const {
  if (file_) file_->check_unchanged();
  if (file_) file_->check_still_named();
}

const StTensor* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsFile::parse_bytes(std::span<const uint8_t> bytes) {
  const std::string& o = origin_;
  if (bytes.size() < 8) fail(o, ": ", bytes.size(), " bytes is too short for a safetensors file");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > kMaxSafetensorsHeader)
    fail(o, ": header length ", n, " exceeds the limit of ", kMaxSafetensorsHeader, " bytes");
  if (n > bytes.size() - 8)
    fail(o, ": header length ", n, " runs past the end of the file (", bytes.size(), " bytes)");
  if (n < 2 || bytes[8] != '{') fail(o, ": the header does not start with a JSON object");
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8), n);
  // The format pads a header with spaces; JSON holds no raw NUL anywhere. nlohmann's parser
  // would stop at one and take what precedes it.
  if (text.find('\0') != std::string_view::npos)
    fail(o, ": the header holds a NUL byte (a header is padded with spaces, 0x20)");
  const json header = parse_strict(text, o, kMaxDepth);
  if (!header.is_object()) fail(o, ": the header is not a JSON object");
  const std::span<const uint8_t> data = bytes.subspan(8 + n);

  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) fail(o, ": __metadata__ must be an object of strings");
      for (const auto& [k, s] : v.items()) {
        if (!s.is_string()) fail(o, ": __metadata__ value of '", k, "' is not a string");
        metadata_[k] = s.get<std::string>();
      }
      continue;
    }
    const std::string what = cat(o, ": tensor '", name, "'");
    if (name.empty()) fail(o, ": a tensor has an empty name");
    if (!v.is_object()) fail(what, " is not a JSON object");
    for (const auto& [k, unused] : v.items())
      if (k != "dtype" && k != "shape" && k != "data_offsets")
        fail(what, " has an unknown key '", k, "'");
    if (!v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      fail(what, " needs dtype, shape and data_offsets");
    StTensor t;
    t.name = name;
    if (!v["dtype"].is_string()) fail(what, ": dtype is not a string");
    try {
      t.dtype = st_dtype_from_name(v["dtype"].get<std::string>());
    } catch (const Error& e) {
      fail(what, ": ", e.what());
    }
    if (!v["shape"].is_array()) fail(what, ": shape is not an array");
    uint64_t bytes_needed = st_dtype_size(t.dtype);
    for (const auto& d : v["shape"]) {
      t.shape.push_back(json_u53(d, what + " shape"));
      bytes_needed = checked_mul(bytes_needed, t.shape.back(), what);
    }
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2) fail(what, ": data_offsets must be [begin, end]");
    t.begin = json_u53(off[0], what + " data_offsets[0]");
    t.end = json_u53(off[1], what + " data_offsets[1]");
    if (t.begin > t.end) fail(what, ": data_offsets [", t.begin, ", ", t.end, "] are reversed");
    if (t.end > data.size())
      fail(what, ": data_offsets [", t.begin, ", ", t.end, "] run past the data section (",
           data.size(), " bytes)");
    if (t.end - t.begin != bytes_needed)
      fail(what, ": shape of ", st_dtype_name(t.dtype), " needs ", bytes_needed,
           " bytes but data_offsets span ", t.end - t.begin);
    t.bytes = data.subspan(t.begin, t.end - t.begin);
    t.origin = &origin_;
    t.file = this;
    tensors_.push_back(std::move(t));
  }
  std::stable_sort(tensors_.begin(), tensors_.end(), [](const StTensor& a, const StTensor& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t at = 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const StTensor& t = tensors_[i];
    if (t.begin < at)
      fail(o, ": tensor '", t.name, "' [", t.begin, ", ", t.end, ") overlaps tensor '",
           tensors_[i - 1].name, "'");
    if (t.begin > at) fail(o, ": bytes [", at, ", ", t.begin, ") of the data belong to no tensor");
    at = t.end;
    index_[t.name] = i;
  }
  if (at != data.size())
    fail(o, ": bytes [", at, ", ", data.size(), ") of the data belong to no tensor");
}

std::vector<uint8_t> safetensors_header(const std::vector<const StOutTensor*>& sorted,
                                        const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t at = 0;
  for (const StOutTensor* t : sorted) {
    json e = json::object();
    e["dtype"] = st_dtype_name(t->dtype);
    e["shape"] = t->shape;
    e["data_offsets"] = {at, at + t->bytes.size()};
    at += t->bytes.size();
    h[t->name] = std::move(e);
  }
  std::string text = h.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<uint8_t> out(8 + text.size());
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  std::memcpy(out.data() + 8, text.data(), text.size());
  return out;
}

std::map<std::string, std::string> parse_safetensors_index(const std::string& text,
                                                           const std::string& origin) {
  const json j = parse_strict(text, origin, 3);
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    fail(origin, ": needs a \"weight_map\" object");
  std::map<std::string, std::string> map;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string()) fail(origin, ": weight_map entry '", name, "' is not a file name");
    const std::string f = file.get<std::string>();
    if (!plain_file_name(f))
      fail(origin, ": weight_map entry '", name, "' names '", f,
           "', not a plain file name in the checkpoint's directory");
    map[name] = f;
  }
  return map;
}

Checkpoint::Checkpoint(std::string dir) : dir_(std::move(dir)) {
  namespace fs = std::filesystem;
  const fs::path index = fs::path(dir_) / "model.safetensors.index.json";
  std::error_code ec;
  if (!fs::is_directory(dir_, ec))
    fail(dir_, fs::exists(dir_, ec) ? ": not a directory (name the checkpoint's folder)"
                                    : ": no such directory");
  if (fs::exists(fs::path(dir_) / kExportIncompleteMarker, ec))
    fail(dir_, ": an export into it did not finish (", kExportIncompleteMarker,
         " is there): its files may be another model's; export again");
  if (fs::exists(index)) {
    sharded_ = true;
    weight_map_ = parse_safetensors_index(read_kept(index.string()), index.string());
    // Readers differ on which of the two is the checkpoint (transformers takes the single file,
    // other tools the index): beside an index that does not name it, a model.safetensors is
    // either stale or the real one, and importing the other would be wrong without a word.
    bool names_single = false;
    for (const auto& [name, file] : weight_map_) names_single |= file == "model.safetensors";
    if (!names_single && fs::exists(fs::path(dir_) / "model.safetensors", ec))
      fail(dir_,
           ": holds both model.safetensors and model.safetensors.index.json (which does not name "
           "it); readers differ on which is the checkpoint: remove the one that is stale");
  } else if (!fs::exists(fs::path(dir_) / "model.safetensors")) {
    // A link whose target is gone (a cache's blob removed) is there, but leads nowhere.
    for (const fs::path& link : {index, fs::path(dir_) / "model.safetensors"})
      if (fs::is_symlink(fs::symlink_status(link, ec)))
        fail(link.string(), ": a symbolic link to '", fs::read_symlink(link, ec).string(),
             "', which does not exist");
    fail(dir_, ": neither model.safetensors nor model.safetensors.index.json is there");
  }
}

std::string Checkpoint::config_text() const {
  return read_kept((std::filesystem::path(dir_) / "config.json").string());
}

std::string Checkpoint::read_kept(const std::string& path) const {
  // Taken before the read: a file replaced between the two is then seen as replaced, never the
  // other way round.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) read_[path] = st;
  return read_text(path);
}

SafetensorsFile& Checkpoint::shard(const std::string& file) {
  auto& slot = shards_[file];
  if (!slot) slot = SafetensorsFile::open((std::filesystem::path(dir_) / file).string());
  return *slot;
}

const StTensor* Checkpoint::find(const std::string& name) {
  if (!sharded_) return shard("model.safetensors").find(name);
  auto it = weight_map_.find(name);
  if (it == weight_map_.end()) return nullptr;
  const StTensor* t = shard(it->second).find(name);
  if (!t) fail(dir_, ": the index puts tensor '", name, "' in '", it->second, "', which lacks it");
  return t;
}

const StTensor& Checkpoint::get(const std::string& name) {
  const StTensor* t = find(name);
  if (!t) fail(dir_, ": the checkpoint has no tensor '", name, "'");
  return *t;
}

void Checkpoint::check_unchanged() const {
  for (const auto& [file, shard] : shards_)
    if (shard) shard->check_unchanged();
  for (const auto& [path, was] : read_) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0 || !moert::format::same_file(was, st))
      fail("'", path,
           "' was replaced while the checkpoint was read (an export into its folder?): "
           "run again once nothing writes there");
  }
}

std::vector<std::string> Checkpoint::names() {
  std::vector<std::string> out;
  if (sharded_) {
    for (const auto& [name, unused] : weight_map_) out.push_back(name);
  } else {
    for (const auto& t : shard("model.safetensors").tensors()) out.push_back(t.name);
  }
  return out;
}

}  // namespace moert_cli
