#include "cli/hf_export.h"

#include <flatbuffers/flatbuffers.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <span>

#include "cli/data_file.h"
#include "cli/error.h"
#include "cli/hf_moe.h"
#include "cli/mapped_file.h"
#include "cli/model_codec.h"
#include "cli/regular_file.h"
#include "cli/safetensors.h"
#include "kernels/fp8_rules.h"
#include "moert_generated.h"
#include "schemas/saved_files.h"

namespace moert_cli {

namespace {

namespace fb = moert::fb;
namespace fs = std::filesystem;
using nlohmann::json;

uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

// The external data file of a model, mapped read-only (cli/mapped_file.h).
class Mapped {
 public:
  explicit Mapped(const std::string& path) : file_(path, "external data file ") {}
  std::span<const uint8_t> range(uint64_t offset, uint64_t size, const std::string& what) const {
    const std::span<const uint8_t> all = file_.bytes();
    uint64_t end;
    if (__builtin_add_overflow(offset, size, &end) || end > all.size())
      fail(what, ": external range [", offset, ", +", size, ") runs past the end of '",
           file_.path(), "' (", all.size(), " bytes)");
    return all.subspan(offset, size);
  }
  void check_unchanged() const { file_.check_unchanged(); }

 private:
  MappedFile file_;
};

// A stored moert tensor as its bytes: `count` matrices of rows x cols (count 1 for a vector).
struct Stored {
  std::string what;
  fb::DType dtype = fb::DType::F32;
  uint64_t count = 1, rows = 1, cols = 1;
  std::span<const uint8_t> bytes;
  uint32_t block_rows = 0, block_cols = 0;
  std::span<const float> scales;

  uint64_t elem() const { return dtype == fb::DType::F32 ? 4 : dtype == fb::DType::BF16 ? 2 : 1; }
  uint64_t matrix_scales() const { return ceil_div(rows, block_rows) * ceil_div(cols, block_cols); }
};

uint16_t bf16_round(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// The fp32 values of matrix m of a stored tensor.
std::vector<float> decode(const Stored& s, uint64_t m) {
  const uint64_t n = s.rows * s.cols;
  const uint8_t* p = s.bytes.data() + m * n * s.elem();
  std::vector<float> out(n);
  switch (s.dtype) {
    case fb::DType::F32:
      std::memcpy(out.data(), p, n * 4);
      break;
    case fb::DType::BF16:
      for (uint64_t i = 0; i < n; ++i) {
        const uint32_t bits = (uint32_t{p[2 * i + 1]} << 24) | (uint32_t{p[2 * i]} << 16);
        std::memcpy(&out[i], &bits, 4);
      }
      break;
    case fb::DType::F8E4M3: {
      const float* sc = s.scales.data() + m * s.matrix_scales();
      const uint64_t bc = ceil_div(s.cols, s.block_cols);
      for (uint64_t r = 0; r < s.rows; ++r)
        for (uint64_t c = 0; c < s.cols; ++c)
          out[r * s.cols + c] = moert::fp8::e4m3_decode(p[r * s.cols + c]) *
                                sc[(r / s.block_rows) * bc + c / s.block_cols];
      break;
    }
  }
  return out;
}

std::string shortest(float v) {
  char buf[32];
  for (int p = 1; p <= 9; ++p) {
    std::snprintf(buf, sizeof buf, "%.*g", p, static_cast<double>(v));
    if (std::strtof(buf, nullptr) == v) break;
  }
  return buf;
}

// A float32 knob as the shortest decimal that reads back as the same float32.
double knob(float v) { return std::strtod(shortest(v).c_str(), nullptr); }

struct Out {
  StOutTensor t;
  std::vector<uint8_t> owned;
};

class Exporter {
 public:
  explicit Exporter(const ExportRequest& r) : req_(r) {
    const std::vector<uint8_t> raw = read_file(r.model_path);
    const std::vector<uint8_t> binary =
        is_binary_model(raw) ? raw
                             : json_to_binary(std::string(raw.begin(), raw.end()), r.model_path);
    buf_.resize((binary.size() + 7) / 8);
    std::memcpy(buf_.data(), binary.data(), binary.size());
    const auto* bytes = reinterpret_cast<const uint8_t*>(buf_.data());
    flatbuffers::Verifier v(bytes, binary.size());
    if (!fb::VerifyModelBuffer(v)) fail(r.model_path, ": not a valid moert model description");
    model_ = fb::GetModel(bytes);
    if (!model_->layers()) fail(r.model_path, ": the model has no layers");
    if (model_->external_data()) {
      const fs::path rel(model_->external_data()->str());
      if (rel.is_absolute() || rel.empty() || rel.lexically_normal().string().rfind("..", 0) == 0)
        fail(r.model_path, ": external_data '", rel.string(), "' is not a path inside its folder");
      fs::path dir = fs::path(r.model_path).parent_path();
      data_ = std::make_unique<Mapped>((dir / rel).string());
    }
  }

  ExportResult run() {
    const fs::path dir(req_.out_dir);
    collect_layers();
    // No file it writes may be the model it reads (an OUT_DIR holding it as config.json).
    const std::vector<std::string> inputs = model_files(req_.model_path);
    for (const char* name : {"config.json", "model.safetensors.index.json"})
      refuse_writing_onto_inputs((fs::path(req_.out_dir) / name).string(), inputs);
    for (size_t i = 0; i < moe_.size(); ++i)
      refuse_writing_onto_inputs((fs::path(req_.out_dir) / shard_name(i)).string(), inputs);
    refuse_foreign_files(dir);
    created_ = create_folders(req_.out_dir);
    std::error_code ec;
    try {
      try {
        write_all();
      } catch (const Error&) {
        // A refusal that came of a data file cut short (a write from its lost pages fails with
        // EFAULT, "Bad address") is said as the change of that file.
        if (data_) data_->check_unchanged();
        throw;
      }
    } catch (...) {
      // A refused export leaves no folder of its own behind: the folders it created, innermost
      // first, each only while empty. Its temporary files are gone by now, and so is what its
      // commit had put in place (write_all); what others wrote there meanwhile (a save, another
      // export's files) keeps the folder.
      for (auto it = created_.rbegin(); it != created_.rend(); ++it) fs::remove(*it, ec);
      throw;
    }
    return result_;
  }

 private:
  // Creates OUT_DIR and its missing parents one by one, as the path is written, and returns
  // those this call created, outermost first: only what it created itself is ever removed (not
  // a folder that existed, nor what a link or ".." leads to).
  static std::vector<fs::path> create_folders(const std::string& dir) {
    std::vector<fs::path> created;
    fs::path at;
    for (const fs::path& part : fs::path(dir)) {
      at /= part;
      if (part.empty() || part == "." || part == ".." || part == at.root_path()) continue;
      std::error_code ec;
      if (fs::create_directory(at, ec)) {
        created.push_back(at);
      } else if (!fs::is_directory(at) || ec) {
        const std::error_code exists_ec = ec;
        const bool exists = fs::exists(fs::symlink_status(at, ec));
        const std::string why = exists && !fs::is_directory(at, ec)
                                    ? "it exists and is not a folder"
                                    : exists_ec.message();
        for (auto it = created.rbegin(); it != created.rend(); ++it) fs::remove(*it, ec);
        fail(dir, ": cannot create '", at.string(), "': ", why);
      }
    }
    return created;
  }

  std::string shard_name(size_t i) const {
    return cat("model-", pad5(i + 1), "-of-", pad5(moe_.size()), ".safetensors");
  }

  // What OUT_DIR may not hold for an export to go there: refused before anything is written,
  // and again under the lock before the commit (another writer may have been quicker).
  void refuse_foreign_files(const fs::path& dir) const {
    // Readers differ on which of model.safetensors and model.safetensors.index.json they take,
    // so a single-file checkpoint already there would make the folder ambiguous.
    std::error_code ec;
    if (fs::exists(fs::symlink_status(dir / "model.safetensors", ec)))
      fail(req_.out_dir,
           " holds a model.safetensors: beside the exported index, readers would differ on which "
           "is the checkpoint; export to another folder");
    // Only an earlier export's files are replaced (its manifest says so, or its marker: one that
    // did not finish), never another checkpoint's.
    if (!earlier_manifest(dir) && !fs::exists(dir / kExportIncompleteMarker, ec))
      for (const char* name : {"config.json", "model.safetensors.index.json"})
        if (fs::exists(fs::symlink_status(dir / name, ec)))
          fail(req_.out_dir, " holds a ", name,
               " that no moert export wrote (another checkpoint's, or an export by a moert "
               "older than the export manifest): export to another folder");
    // Nor shards no export of moert's lists (a download in progress, another tool's checkpoint):
    // this export would replace those of its own names and leave the others beside its index.
    static const std::regex shard(R"(^model-\d{5}-of-\d{5}\.safetensors$)");
    const std::vector<std::string> ours = earlier_files(dir);
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string name = e.path().filename().string();
      // A folder under a shard's name is no shard: the commit fails on it, taking back its own.
      if (std::regex_match(name, shard) && !fs::is_directory(e.symlink_status(ec)) &&
          std::find(ours.begin(), ours.end(), name) == ours.end())
        fail(req_.out_dir, " holds ", name,
             ", a shard that no moert export of this folder wrote (another checkpoint's, or a "
             "download's): export to another folder");
    }
  }

  // Every file is written to its temporary file first, so that a failure (a full disk) leaves
  // OUT_DIR as it was; this is the long part, and it takes no lock (the temporary files' names
  // hold the process's). Then, under the folder's lock, a marker and the files renamed into
  // place: until the marker is gone again, an import of the folder refuses it rather than mix
  // this export's files with an earlier one's (an export killed midway). Exports into one folder
  // commit in turns, and a save of the library there waits only for a commit.
  void write_all() {
    const fs::path dir(req_.out_dir);
    StagedFiles files;
    std::vector<std::string> names = {"config.json"};
    const std::string config = config_text();
    // Another export that created OUT_DIR and was refused removes it, but only while it is
    // empty: between create_folders() finding it and this first file, it can be gone. Nothing of
    // this export was in it then, so the folders are made again (this export's own now) and the
    // file staged again, a few times at most.
    for (int attempt = 1;; ++attempt) {
      try {
        files.stage((dir / names.back()).string(), {as_bytes(config)});
        break;
      } catch (const Error&) {
        std::error_code ec;
        if (attempt == 3 || fs::exists(fs::symlink_status(dir, ec))) throw;
        for (const fs::path& p : create_folders(req_.out_dir))
          if (std::find(created_.begin(), created_.end(), p) == created_.end())
            created_.push_back(p);
        // Outermost first, as create_folders() gives them.
        std::stable_sort(
            created_.begin(), created_.end(), [](const fs::path& a, const fs::path& b) {
              return std::distance(a.begin(), a.end()) < std::distance(b.begin(), b.end());
            });
      }
    }
    json weight_map = json::object();
    uint64_t total = 0;
    for (size_t i = 0; i < moe_.size(); ++i) {
      std::vector<std::unique_ptr<Out>> outs = layer_tensors(i);
      names.push_back(shard_name(i));
      std::sort(outs.begin(), outs.end(),
                [](const auto& a, const auto& b) { return a->t.name < b->t.name; });
      std::vector<const StOutTensor*> sorted;
      for (const auto& o : outs) {
        sorted.push_back(&o->t);
        weight_map[o->t.name] = names.back();
        total += o->t.bytes.size();
        ++result_.tensors;
      }
      const std::vector<uint8_t> header = safetensors_header(sorted, {{"format", "pt"}});
      std::vector<std::span<const uint8_t>> parts = {header};
      for (const auto* t : sorted) parts.push_back(t->bytes);
      files.stage((dir / names.back()).string(), parts);
      // Before the next layer: a data file cut short ends the export at once.
      if (data_) data_->check_unchanged();
    }
    result_.bytes = total;
    names.push_back("model.safetensors.index.json");
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    const std::string index_text = index.dump(2) + "\n";
    files.stage((dir / names.back()).string(), {as_bytes(index_text)});
    const std::string manifest = json{{"format", kManifestFormat}, {"files", names}}.dump(2) + "\n";
    files.stage((dir / kExportManifest).string(), {as_bytes(manifest)});

    // What was read of a data file cut short since is zeros: nothing of it may be renamed into
    // place (the staged files go with the refusal).
    if (data_) data_->check_unchanged();
    const moert::format::DirectoryLock lock(req_.out_dir);
    if (lock.timed_out())
      fail("cannot export into '", req_.out_dir, "': another export, import or save has held its ",
           "lock for ", moert::format::DirectoryLock::kPatience.count() / 1000,
           " s (a process stopped there?): try again once it is done");
    refuse_foreign_files(dir);
    // Read under the lock: an export that committed meanwhile may have written more shards.
    const std::vector<std::string> earlier = earlier_files(dir);
    const std::string marker = (dir / kExportIncompleteMarker).string();
    std::error_code ec;
    // A commit that fails midway where no other export had committed (no manifest, no marker:
    // it replaced nothing of another's) takes back what it put in place, under the lock still,
    // and the folder is as it was. Elsewhere the marker stays, telling imports the folder is
    // incomplete; it lists this export's files as a manifest does, so that the next export
    // removes those it does not write again.
    const bool alone = !earlier_manifest(dir) && !fs::exists(marker, ec);
    write_file_atomically(marker, as_bytes(manifest));
    try {
      files.commit();
    } catch (...) {
      if (alone) {
        for (const std::string& path : files.renamed()) fs::remove(path, ec);
        fs::remove(marker, ec);
      }
      throw;
    }
    // The earlier exports' shards that this one did not write (they had more layers).
    for (const std::string& name : earlier)
      if (std::find(names.begin(), names.end(), name) == names.end()) fs::remove(dir / name, ec);
    fs::remove(marker, ec);
  }

  static std::span<const uint8_t> as_bytes(const std::string& text) {
    return {reinterpret_cast<const uint8_t*>(text.data()), text.size()};
  }

  static constexpr const char* kManifestFormat = "moert-export 1";

  // The manifest an earlier export left in `dir` (or, with `name`, its marker): a JSON object of
  // this format with a list of files; anything else (absent, unreadable, another content, the
  // empty marker of a moert before it listed them) is none.
  static std::optional<json> earlier_manifest(const fs::path& dir,
                                              const char* name = kExportManifest) {
    try {
      const std::vector<uint8_t> bytes = read_regular_file((dir / name).string());
      json m = json::parse(bytes.begin(), bytes.end());
      if (m.is_object() && m.value("format", "") == kManifestFormat && m.contains("files") &&
          m["files"].is_array())
        return m;
    } catch (...) {
      // Not one moert wrote.
    }
    return std::nullopt;
  }

  // The shards an earlier export's manifest in `dir` names. Only names an export gives its
  // shards count: a manifest is a file in the folder like any other, and whoever wrote it must
  // not be able to have other files removed.
  static std::vector<std::string> earlier_files(const fs::path& dir) {
    static const std::regex shard(R"(^model-\d{5}-of-\d{5}\.safetensors$)");
    std::vector<std::string> names;
    // The finished export's, and a failed one's since (its marker lists what it put in place).
    for (const char* list : {kExportManifest, kExportIncompleteMarker}) {
      try {
        const std::optional<json> m = earlier_manifest(dir, list);
        if (!m) continue;
        for (const auto& f : m->at("files"))
          if (const std::string n = f.get<std::string>(); std::regex_match(n, shard))
            names.push_back(n);
      } catch (...) {
        // Not one moert wrote: nothing of it is removed.
      }
    }
    return names;
  }

  struct MoeLayer {
    uint32_t index = 0;  // decoder layer
    const fb::Layer* layer = nullptr;
    const fb::MoE* moe = nullptr;
    const fb::RMSNorm* norm = nullptr;
  };

  static std::string pad5(size_t v) {
    char b[24];
    std::snprintf(b, sizeof b, "%05zu", v);
    return b;
  }

  std::string name_of(const fb::Layer* l, size_t i) const {
    return l->name() ? l->name()->str() : cat("layer ", i);
  }

  void collect_layers() {
    const auto& layers = *model_->layers();
    for (size_t i = 0; i < layers.size(); ++i) {
      const fb::Layer* l = layers.Get(i);
      if (const auto* m = l->kind_as_MoE()) {
        MoeLayer ml{0, l, m, nullptr};
        if (i > 0 && layers.Get(i - 1)->kind_as_RMSNorm()) {
          ml.norm = layers.Get(i - 1)->kind_as_RMSNorm();
          ++result_.norms;
        }
        moe_.push_back(ml);
      }
    }
    if (moe_.empty()) fail(req_.model_path, ": the model has no MoE layer to export");
    result_.moe_layers = static_cast<uint32_t>(moe_.size());
    result_.skipped_layers = static_cast<uint32_t>(layers.size() - moe_.size() - result_.norms);
    // Decoder layer indices from names such as "layers.7.mlp" (what import writes), when every
    // MoE layer has one and they are distinct and increasing; else 0, 1, 2, ...
    const std::regex re(R"(^layers\.(\d{1,9})\.)");
    bool named = true;
    for (size_t i = 0; i < moe_.size() && named; ++i) {
      std::smatch m;
      const std::string n = moe_[i].layer->name() ? moe_[i].layer->name()->str() : "";
      if (!std::regex_search(n, m, re)) {
        named = false;
        break;
      }
      moe_[i].index = static_cast<uint32_t>(std::stoul(m[1]));
      if (i > 0 && moe_[i].index <= moe_[i - 1].index) named = false;
    }
    for (size_t i = 0; i < moe_.size() && !named; ++i) moe_[i].index = static_cast<uint32_t>(i);

    const fb::MoE* a = moe_[0].moe;
    for (const MoeLayer& ml : moe_) {
      const fb::MoE* m = ml.moe;
      const std::string who = cat(req_.model_path, ": layer '", name_of(ml.layer, 0), "'");
      if (!m->num_experts() || !m->top_k() || !m->expert_hidden() || !m->score_function() ||
          !m->num_groups() || !m->topk_groups() || !m->normalize_weights() ||
          !m->routed_scaling_factor())
        fail(who, " leaves a routing knob unset");
    }
    choose_layout();
    const bool sigmoid = hf_.sigmoid;
    for (const MoeLayer& ml : moe_) {
      const fb::MoE* m = ml.moe;
      const std::string who = cat(req_.model_path, ": layer '", name_of(ml.layer, 0), "'");
      const bool is_sigmoid = *m->score_function() == fb::ScoreFunction::Sigmoid;
      if (is_sigmoid != sigmoid)
        fail(who, ": score_function is ", is_sigmoid ? "Sigmoid" : "Softmax", "; the ",
             hf_.model_type, " layout has ", sigmoid ? "sigmoid" : "softmax", " routers only");
      if (hf_.family == HfFamily::DeepSeekV3 && *m->top_k() == 1 && *m->normalize_weights())
        fail(who,
             ": normalize_weights with top_k 1 cannot be written: DeepseekV3MoE "
             "normalises only when it chooses more than one expert");
      if (hf_.family == HfFamily::Glm4Moe && *m->num_groups() != 1)
        fail(who, ": num_groups is ", *m->num_groups(),
             "; moert imports glm4_moe with n_group 1 only (GLM-4.5 masks dropped groups to 0)");
      if (!sigmoid) softmax_expressible(ml, who);
      auto same = [&](bool eq, const char* field) {
        if (!eq)
          fail(who, ": field '", field,
               "' differs from the first MoE layer's; config.json holds one value");
      };
      same(m->dim() == a->dim(), "dim");
      same(*m->num_experts() == *a->num_experts(), "num_experts");
      same(*m->top_k() == *a->top_k(), "top_k");
      same(*m->expert_hidden() == *a->expert_hidden(), "expert_hidden");
      same(*m->num_groups() == *a->num_groups(), "num_groups");
      same(*m->topk_groups() == *a->topk_groups(), "topk_groups");
      same(*m->normalize_weights() == *a->normalize_weights(), "normalize_weights");
      same(*m->routed_scaling_factor() == *a->routed_scaling_factor(), "routed_scaling_factor");
      same(m->num_shared_experts() * m->shared_hidden() ==
               a->num_shared_experts() * a->shared_hidden(),
           "num_shared_experts x shared_hidden");
      if (m->residual()) result_.residual = true;
      if (ml.norm && moe_[0].norm && ml.norm->eps() != moe_[0].norm->eps())
        same(false, "eps of the RMSNorm before it");
      if (static_cast<bool>(ml.norm) != static_cast<bool>(moe_[0].norm))
        fail(who, ": some MoE layers have an RMSNorm before them and some do not");
    }
    // quantization_config.weight_block_size: the blocks of the FP8 expert weights written.
    for (const MoeLayer& ml : moe_) {
      const fb::MoE* m = ml.moe;
      for (const fb::Tensor* t :
           {m->w1(), m->w3(), m->w2(), m->shared_w1(), m->shared_w3(), m->shared_w2()}) {
        if (!t || target(t->dtype(), true) != fb::DType::F8E4M3) continue;
        if (t->dtype() == fb::DType::F8E4M3 && t->scales())
          note_block(t->scales()->block_rows(), t->scales()->block_cols(), name_of(ml.layer, 0));
        else
          note_block(128, 128, name_of(ml.layer, 0));
      }
    }
    const uint64_t shared = uint64_t{a->num_shared_experts()} * a->shared_hidden();
    if (sigmoid && shared % *a->expert_hidden() != 0)
      fail(req_.model_path, ": shared experts of total width ", shared,
           " are not a whole number of experts of width ", *a->expert_hidden(),
           " (DeepSeek-V3 writes n_shared_experts * moe_intermediate_size)");
  }

  // The family written: --layout, else the model_type `moert import` put first in the model's
  // name (so import -> export -> import gives the same file), else from the routing.
  void choose_layout() {
    std::string layout = req_.layout;
    if (layout.empty() && model_->name()) {
      const std::string n = model_->name()->str();
      const std::string first = n.substr(0, n.find(' '));
      for (const char* known : {"deepseek_v3", "kimi_k2", "glm4_moe", "qwen3_moe", "mixtral"})
        if (first == known && n.size() > first.size()) layout = first;
    }
    if (layout.empty())
      layout = *moe_[0].moe->score_function() == fb::ScoreFunction::Sigmoid ? "deepseek_v3"
                                                                            : "qwen3_moe";
    hf_.model_type = layout;
    if (layout == "deepseek_v3" || layout == "kimi_k2")
      hf_.family = HfFamily::DeepSeekV3;
    else if (layout == "glm4_moe")
      hf_.family = HfFamily::Glm4Moe;
    else if (layout == "qwen3_moe")
      hf_.family = HfFamily::Qwen3Moe;
    else if (layout == "mixtral")
      hf_.family = HfFamily::Mixtral;
    else
      usage_fail("--layout takes deepseek_v3, kimi_k2, glm4_moe, qwen3_moe or mixtral, got '",
                 layout, "'");
    hf_.sigmoid = hf_.family == HfFamily::DeepSeekV3 || hf_.family == HfFamily::Glm4Moe;
    result_.layout = layout;
  }

  // Qwen3MoeSparseMoeBlock and MixtralSparseMoeBlock are softmax, top-K and an optional (Mixtral:
  // mandatory) renormalisation, nothing more.
  void softmax_expressible(const MoeLayer& ml, const std::string& who) const {
    const fb::MoE* m = ml.moe;
    const char* fam = hf_.family == HfFamily::Mixtral ? "Mixtral" : "Qwen3-MoE";
    if (*m->num_groups() != 1 || *m->topk_groups() != 1)
      fail(who, ": ", *m->num_groups(), " expert groups; ", fam, " routes without groups");
    if (*m->routed_scaling_factor() != 1.0f)
      fail(who, ": routed_scaling_factor ", *m->routed_scaling_factor(), "; ", fam,
           " has no scaling factor");
    if (m->num_shared_experts() > 0)
      fail(who, ": ", m->num_shared_experts(), " shared experts; ", fam, " has none");
    if (hf_.family == HfFamily::Mixtral && !*m->normalize_weights())
      fail(who,
           ": normalize_weights is false; MixtralSparseMoeBlock always renormalises "
           "(export as --layout qwen3_moe, whose norm_topk_prob says it)");
    if (m->gate_bias()) {
      const Stored b = stored(m->gate_bias(), who + " gate_bias", 1, 1, *m->num_experts());
      for (float v : decode(b, 0))
        if (v != 0.0f) fail(who, ": a non-zero router bias; ", fam, "'s router has none");
    }
  }

  std::string config_text() {
    const fb::MoE* a = moe_[0].moe;
    json c = json::object();
    c["model_type"] = hf_.model_type;
    c["hidden_size"] = a->dim();
    c["num_hidden_layers"] = moe_.back().index + 1;
    c["num_experts_per_tok"] = *a->top_k();
    switch (hf_.family) {
      case HfFamily::DeepSeekV3:
      case HfFamily::Glm4Moe:
        if (hf_.family == HfFamily::Glm4Moe) {
          // Glm4MoeConfig has no scoring_func, topk_method or moe_layer_freq.
          c["architectures"] = {"Glm4MoeForCausalLM"};
        } else {
          c["architectures"] = {"DeepseekV3ForCausalLM"};
          c["moe_layer_freq"] = 1;
          c["scoring_func"] = "sigmoid";
          c["topk_method"] = "noaux_tc";
        }
        c["first_k_dense_replace"] = moe_.front().index;
        c["n_routed_experts"] = *a->num_experts();
        c["moe_intermediate_size"] = *a->expert_hidden();
        c["n_group"] = *a->num_groups();
        c["topk_group"] = *a->topk_groups();
        c["norm_topk_prob"] = *a->normalize_weights();
        c["routed_scaling_factor"] = knob(*a->routed_scaling_factor());
        c["n_shared_experts"] =
            uint64_t{a->num_shared_experts()} * a->shared_hidden() / *a->expert_hidden();
        break;
      case HfFamily::Qwen3Moe: {
        c["architectures"] = {"Qwen3MoeForCausalLM"};
        c["num_experts"] = *a->num_experts();
        c["moe_intermediate_size"] = *a->expert_hidden();
        c["norm_topk_prob"] = *a->normalize_weights();
        c["decoder_sparse_step"] = 1;
        // Decoder layers not exported are declared dense, so none is taken for a missing MoE.
        json dense = json::array();
        for (uint32_t l = 0, i = 0; l < moe_.back().index; ++l) {
          if (i < moe_.size() && moe_[i].index == l)
            ++i;
          else
            dense.push_back(l);
        }
        c["mlp_only_layers"] = dense;
        break;
      }
      case HfFamily::Mixtral:
        c["architectures"] = {"MixtralForCausalLM"};
        c["num_local_experts"] = *a->num_experts();
        c["intermediate_size"] = *a->expert_hidden();
        c["router_jitter_noise"] = 0.0;
        break;
    }
    c["hidden_act"] = "silu";
    if (moe_[0].norm) c["rms_norm_eps"] = knob(moe_[0].norm->eps());
    // The dtype of the expert weights decides the checkpoint's.
    const Stored w1 = stored(a->w1(), "w1", *a->num_experts(), *a->expert_hidden(), a->dim());
    const fb::DType expert_dtype = target(w1.dtype, true);
    c["torch_dtype"] = expert_dtype == fb::DType::F32 ? "float32" : "bfloat16";
    if (fp8_block_)
      c["quantization_config"] = {{"activation_scheme", "dynamic"},
                                  {"fmt", "e4m3"},
                                  {"quant_method", "fp8"},
                                  {"weight_block_size", {fp8_block_->first, fp8_block_->second}}};
    config_ = c;
    return config_.dump(2) + "\n";
  }

  fb::DType target(fb::DType stored, bool expert) const {
    switch (req_.dtype) {
      case ExportDType::AsStored:
        return stored;
      case ExportDType::F32:
        return fb::DType::F32;
      case ExportDType::BF16:
        return fb::DType::BF16;
      case ExportDType::FP8:
        return expert ? fb::DType::F8E4M3 : fb::DType::BF16;
    }
    return stored;
  }

  Stored stored(const fb::Tensor* t, const std::string& what, uint64_t count, uint64_t rows,
                uint64_t cols) const {
    if (!t) fail(req_.model_path, ": ", what, " is missing");
    if (!t->data() && !t->external())
      fail(req_.model_path, ": ", what,
           " has no stored values (an initialiser): train the model or save a checkpoint first");
    Stored s;
    s.what = what;
    s.dtype = t->dtype();
    if (s.dtype != fb::DType::F32 && s.dtype != fb::DType::BF16 && s.dtype != fb::DType::F8E4M3)
      fail(what, ": unknown dtype ", static_cast<int>(s.dtype));
    s.count = count;
    s.rows = rows;
    s.cols = cols;
    const uint64_t bytes = count * rows * cols * s.elem();
    if (t->data()) {
      if (t->data()->size() != bytes)
        fail(what, ": ", t->data()->size(), " bytes of data where its shape needs ", bytes);
      s.bytes = {t->data()->data(), bytes};
    } else {
      if (!data_) fail(what, ": external data but the model names no external_data file");
      if (t->external()->size() != bytes)
        fail(what, ": external.size ", t->external()->size(), " where its shape needs ", bytes);
      s.bytes = data_->range(t->external()->offset(), bytes, what);
    }
    if (s.dtype == fb::DType::F8E4M3) {
      const auto* sc = t->scales();
      if (!sc || !sc->scales() || sc->block_rows() == 0 || sc->block_cols() == 0)
        fail(what, ": FP8 without valid block scales");
      s.block_rows = sc->block_rows();
      s.block_cols = sc->block_cols();
      if (sc->scales()->size() != count * s.matrix_scales())
        fail(what, ": ", sc->scales()->size(), " block scales where ", count * s.matrix_scales(),
             " are needed");
      s.scales = {sc->scales()->data(), sc->scales()->size()};
    }
    return s;
  }

  // Matrix m of `s` written as `name` in dtype `to` (plus name + "_scale_inv" for FP8).
  void emit(std::vector<std::unique_ptr<Out>>& outs, const Stored& s, uint64_t m,
            const std::string& name, std::vector<uint64_t> shape, fb::DType to) {
    auto out = std::make_unique<Out>();
    out->t.name = name;
    out->t.shape = std::move(shape);
    const uint64_t n = s.rows * s.cols;
    if (to == s.dtype) {
      out->t.dtype = to == fb::DType::F32    ? StDType::F32
                     : to == fb::DType::BF16 ? StDType::BF16
                                             : StDType::F8_E4M3;
      out->t.bytes = s.bytes.subspan(m * n * s.elem(), n * s.elem());
      if (to == fb::DType::F8E4M3) {
        note_block(s.block_rows, s.block_cols, name);
        auto sc = std::make_unique<Out>();
        sc->t.name = name + "_scale_inv";
        sc->t.dtype = StDType::F32;
        sc->t.shape = {ceil_div(s.rows, s.block_rows), ceil_div(s.cols, s.block_cols)};
        const float* p = s.scales.data() + m * s.matrix_scales();
        sc->t.bytes = {reinterpret_cast<const uint8_t*>(p), s.matrix_scales() * 4};
        outs.push_back(std::move(sc));
      }
      outs.push_back(std::move(out));
      return;
    }
    const std::vector<float> v = decode(s, m);
    if (to == fb::DType::F32) {
      out->t.dtype = StDType::F32;
      out->owned.resize(n * 4);
      std::memcpy(out->owned.data(), v.data(), n * 4);
    } else if (to == fb::DType::BF16) {
      out->t.dtype = StDType::BF16;
      out->owned.resize(n * 2);
      for (uint64_t i = 0; i < n; ++i) {
        const uint16_t b = bf16_round(v[i]);
        out->owned[2 * i] = static_cast<uint8_t>(b);
        out->owned[2 * i + 1] = static_cast<uint8_t>(b >> 8);
      }
    } else {
      // DeepSeek-V3's 128x128 blocks with the rules the FP8 kernels use (kernels/fp8_rules.h):
      // scale = amax / 448, code = E4M3(x / scale), weight_scale_inv [ceil(r/128), ceil(c/128)].
      namespace r8 = moert::fp8;
      const uint64_t B = static_cast<uint64_t>(r8::kBlock);
      const uint64_t br = ceil_div(s.rows, B), bc = ceil_div(s.cols, B);
      note_block(static_cast<uint32_t>(B), static_cast<uint32_t>(B), name);
      out->t.dtype = StDType::F8_E4M3;
      out->owned.resize(n);
      auto sc = std::make_unique<Out>();
      sc->t.name = name + "_scale_inv";
      sc->t.dtype = StDType::F32;
      sc->t.shape = {br, bc};
      sc->owned.resize(br * bc * 4);
      for (uint64_t i = 0; i < br; ++i)
        for (uint64_t j = 0; j < bc; ++j) {
          const uint64_t r1 = std::min(s.rows, (i + 1) * B), c1 = std::min(s.cols, (j + 1) * B);
          uint32_t amax = 0;
          for (uint64_t r = i * B; r < r1; ++r)
            for (uint64_t c = j * B; c < c1; ++c)
              amax = r8::max_u32(amax, r8::magnitude_bits(v[r * s.cols + c]));
          if (amax >= r8::kNonFiniteBits)
            fail(name, ": a NaN or infinity in block (", i, ", ", j, ") cannot be quantised");
          const float scale = r8::tile_scale(r8::bits_float(amax), false);
          std::memcpy(sc->owned.data() + 4 * (i * bc + j), &scale, 4);
          for (uint64_t r = i * B; r < r1; ++r)
            for (uint64_t c = j * B; c < c1; ++c)
              out->owned[r * s.cols + c] = r8::quantize_value(v[r * s.cols + c], scale);
        }
      sc->t.bytes = sc->owned;
      outs.push_back(std::move(sc));
    }
    out->t.bytes = out->owned;
    outs.push_back(std::move(out));
  }

  void note_block(uint32_t r, uint32_t c, const std::string& name) {
    if (!fp8_block_) fp8_block_ = {r, c};
    if (fp8_block_->first != r || fp8_block_->second != c)
      fail(name, ": FP8 blocks of ", r, "x", c, " where other tensors have ", fp8_block_->first,
           "x", fp8_block_->second, "; quantization_config holds one weight_block_size");
  }

  std::vector<std::unique_ptr<Out>> layer_tensors(size_t i) {
    const MoeLayer& ml = moe_[i];
    const fb::MoE* m = ml.moe;
    const uint64_t E = *m->num_experts(), H = *m->expert_hidden(), D = m->dim();
    const std::string pre = hf_.moe_prefix(ml.index);
    const std::string who = cat(req_.model_path, " layer '", name_of(ml.layer, i), "' ");
    std::vector<std::unique_ptr<Out>> outs;
    if (ml.norm) {
      if (ml.norm->dim() != D) fail(who, "RMSNorm before it has dim ", ml.norm->dim());
      const Stored s = stored(ml.norm->weight(), who + "norm weight", 1, 1, D);
      emit(outs, s, 0, hf_.norm_weight(ml.index), {D}, target(s.dtype, false));
    }
    const Stored g = stored(m->gate(), who + "gate", 1, E, D);
    emit(outs, g, 0, hf_.router_weight(ml.index), {E, D}, target(g.dtype, false));
    if (hf_.sigmoid) {
      auto b = std::make_unique<Out>();
      b->t.name = pre + "gate.e_score_correction_bias";
      b->t.dtype = StDType::F32;
      b->t.shape = {E};
      if (m->gate_bias()) {
        const Stored s = stored(m->gate_bias(), who + "gate_bias", 1, 1, E);
        if (s.dtype == fb::DType::F32) {
          b->t.bytes = s.bytes;
        } else {
          const std::vector<float> v = decode(s, 0);
          b->owned.resize(E * 4);
          std::memcpy(b->owned.data(), v.data(), E * 4);
          b->t.bytes = b->owned;
        }
      } else {
        b->owned.assign(E * 4, 0);  // absent: zeros, as the loader reads it
        b->t.bytes = b->owned;
      }
      outs.push_back(std::move(b));
    }
    const Stored w1 = stored(m->w1(), who + "w1", E, H, D);
    const Stored w3 = stored(m->w3(), who + "w3", E, H, D);
    const Stored w2 = stored(m->w2(), who + "w2", E, D, H);
    for (uint64_t e = 0; e < E; ++e) {
      const uint32_t ex = static_cast<uint32_t>(e);
      emit(outs, w1, e, hf_.expert_weight(ml.index, ex, 1), {H, D}, target(w1.dtype, true));
      emit(outs, w3, e, hf_.expert_weight(ml.index, ex, 3), {H, D}, target(w3.dtype, true));
      emit(outs, w2, e, hf_.expert_weight(ml.index, ex, 2), {D, H}, target(w2.dtype, true));
    }
    const uint64_t S = m->num_shared_experts(), HS = m->shared_hidden();
    if (S > 0) {
      const Stored s1 = stored(m->shared_w1(), who + "shared_w1", S, HS, D);
      const Stored s3 = stored(m->shared_w3(), who + "shared_w3", S, HS, D);
      const Stored s2 = stored(m->shared_w2(), who + "shared_w2", S, D, HS);
      if (S == 1) {
        emit(outs, s1, 0, pre + "shared_experts.gate_proj.weight", {HS, D}, target(s1.dtype, true));
        emit(outs, s3, 0, pre + "shared_experts.up_proj.weight", {HS, D}, target(s3.dtype, true));
        emit(outs, s2, 0, pre + "shared_experts.down_proj.weight", {D, HS}, target(s2.dtype, true));
      } else {
        // S shared experts are one MLP of width S * HS: gate and up rows stacked, down columns
        // side by side. Done on fp32 values, so every stored dtype works.
        auto widen = [&](const Stored& s, bool columns) {
          Stored f;
          f.what = s.what;
          f.dtype = fb::DType::F32;
          f.count = 1;
          f.rows = columns ? D : S * HS;
          f.cols = columns ? S * HS : D;
          auto& keep = widened_.emplace_back(f.rows * f.cols * 4);
          float* out = reinterpret_cast<float*>(keep.data());
          for (uint64_t k = 0; k < S; ++k) {
            const std::vector<float> v = decode(s, k);
            for (uint64_t r = 0; r < s.rows; ++r)
              for (uint64_t c = 0; c < s.cols; ++c) {
                if (columns)
                  out[r * S * HS + k * HS + c] = v[r * s.cols + c];
                else
                  out[(k * HS + r) * D + c] = v[r * s.cols + c];
              }
          }
          f.bytes = keep;
          return f;
        };
        const fb::DType to1 = target(s1.dtype, true), to3 = target(s3.dtype, true),
                        to2 = target(s2.dtype, true);
        // Stored FP8 blocks of S matrices are not the blocks of the merged one: re-quantising
        // them would not give back what is stored.
        for (const Stored* st : {&s1, &s3, &s2})
          if (st->dtype == fb::DType::F8E4M3 && target(st->dtype, true) == fb::DType::F8E4M3)
            fail(who, "has ", S,
                 " FP8 shared experts, which the DeepSeek-V3 layout merges into "
                 "one MLP with blocks of its own: export them with --dtype fp32 or bf16");
        emit(outs, widen(s1, false), 0, pre + "shared_experts.gate_proj.weight", {S * HS, D}, to1);
        emit(outs, widen(s3, false), 0, pre + "shared_experts.up_proj.weight", {S * HS, D}, to3);
        emit(outs, widen(s2, true), 0, pre + "shared_experts.down_proj.weight", {D, S * HS}, to2);
      }
    }
    return outs;
  }

  const ExportRequest& req_;
  std::vector<uint64_t> buf_;
  const fb::Model* model_ = nullptr;
  std::unique_ptr<Mapped> data_;
  std::vector<MoeLayer> moe_;
  std::optional<std::pair<uint32_t, uint32_t>> fp8_block_;
  std::vector<std::vector<uint8_t>> widened_;
  json config_;
  HfMoeConfig hf_;  // the family written: its tensor names and whether it has a sigmoid router
  ExportResult result_;
  // The folders this export created, outermost first: a refused export removes them (only while
  // empty).
  std::vector<fs::path> created_;
};

}  // namespace

ExportResult export_checkpoint(const ExportRequest& request) {
  Exporter e(request);
  return e.run();
}

}  // namespace moert_cli
