#include "cli/hf_import.h"

#include <flatbuffers/flatbuffers.h>
#include <moert/moert.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <span>
#include <vector>

#include "cli/data_file.h"
#include "cli/error.h"
#include "cli/hf_moe.h"
#include "cli/model_codec.h"
#include "cli/safetensors.h"
#include "kernels/fp8_rules.h"
#include "moert_generated.h"
#include "schemas/saved_files.h"

namespace moert_cli {

namespace {

namespace fb = moert::fb;
using Builder = flatbuffers::FlatBufferBuilder;

uint16_t schema_major() {
  uint32_t major = 0, minor = 0;
  moert_schema_version(&major, &minor);
  return static_cast<uint16_t>(major);
}
uint16_t schema_minor() {
  uint32_t major = 0, minor = 0;
  moert_schema_version(&major, &minor);
  return static_cast<uint16_t>(minor);
}

uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

// Drops the whole pages of a read-only file mapping inside `bytes` from the process.
void release(std::span<const uint8_t> bytes) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size()) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

std::string shape_str(const std::vector<uint64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += cat(i ? ", " : "", s[i]);
  return out + "]";
}

// "tensor 'NAME' in FILE", for messages: the file is where a user goes to look.
std::string tensor_ref(const StTensor& t) {
  if (!t.origin) return cat("tensor '", t.name, "'");
  return cat("tensor '", t.name, "' in ", std::filesystem::path(*t.origin).filename().string());
}

// The values of a small F32, BF16 or F16 tensor as fp32: both 16-bit forms widen exactly.
// `what` names it for the refusal of another dtype ("block scales", "the bias").
std::vector<float> widened(const StTensor& t, const char* what) {
  std::vector<float> v(t.numel());
  const uint8_t* p = t.bytes.data();
  switch (t.dtype) {
    case StDType::F32:
      std::memcpy(v.data(), p, 4 * v.size());
      break;
    case StDType::BF16:
      for (size_t i = 0; i < v.size(); ++i) {
        const uint32_t bits = (uint32_t{p[2 * i + 1]} << 24) | (uint32_t{p[2 * i]} << 16);
        std::memcpy(&v[i], &bits, 4);
      }
      break;
    case StDType::F16:
      for (size_t i = 0; i < v.size(); ++i) {
        const uint32_t h = uint32_t{p[2 * i]} | (uint32_t{p[2 * i + 1]} << 8);
        const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
        float x = exponent == 0    ? std::ldexp(static_cast<float>(mantissa), -24)
                  : exponent == 31 ? (mantissa ? std::numeric_limits<float>::quiet_NaN()
                                               : std::numeric_limits<float>::infinity())
                                   : std::ldexp(static_cast<float>(mantissa | 0x400u),
                                                static_cast<int>(exponent) - 25);
        v[i] = h & 0x8000u ? -x : x;
      }
      break;
    default:
      fail(tensor_ref(t), " is ", st_dtype_name(t.dtype), "; ", what, " must be F32, BF16 or F16");
  }
  return v;
}

// Whether any of n 32-bit (or 16-bit) floats at p has an all-ones exponent: a NaN or infinity.
// In blocks, so that the scan of an 11 GB layer vectorizes; the caller then finds the element.
template <typename Bits>
bool any_nonfinite(const uint8_t* p, uint64_t n) {
  constexpr auto exponent = static_cast<Bits>(sizeof(Bits) == 4 ? 0x7F800000u : 0x7F80u);
  bool any = false;
  for (uint64_t i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, p + i * sizeof(Bits), sizeof(Bits));
    any |= (b & exponent) == exponent;
  }
  return any;
}

// What the library's loader refuses in a weight, refused before anything is written, rather
// than writing a model that no session can load: a NaN or infinity in an F32 or BF16 tensor.
void check_finite(const StTensor& t) {
  const uint64_t elem = t.dtype == StDType::F32 ? 4 : 2, n = t.numel();
  constexpr uint64_t kStep = 4096;
  for (uint64_t i = 0; i < n; i += kStep) {
    const uint64_t m = std::min(kStep, n - i);
    const uint8_t* p = t.bytes.data() + i * elem;
    if (!(elem == 4 ? any_nonfinite<uint32_t>(p, m) : any_nonfinite<uint16_t>(p, m))) continue;
    for (uint64_t j = 0; j < m; ++j)
      if (elem == 4 ? any_nonfinite<uint32_t>(p + j * 4, 1) : any_nonfinite<uint16_t>(p + j * 2, 1))
        fail(tensor_ref(t), " holds a NaN or infinity at element ", i + j);
  }
}

// The same for an FP8 weight [rows, cols] with its block scales (row-major over blocks of
// br x bc): no NaN code (0x7F, 0xFF), and no code times its block's scale past the largest float.
// E4M3 magnitudes order like their codes, so each block's largest |code| decides.
void check_fp8_values(const StTensor& w, const std::string& scales_name, const float* scales,
                      uint64_t br, uint64_t bc) {
  const uint64_t rows = w.shape[0], cols = w.shape[1], col_blocks = ceil_div(cols, bc);
  std::vector<uint8_t> peak(col_blocks);
  for (uint64_t r0 = 0; r0 < rows; r0 += br) {
    std::fill(peak.begin(), peak.end(), uint8_t{0});
    for (uint64_t r = r0; r < std::min(rows, r0 + br); ++r) {
      const uint8_t* row = w.bytes.data() + r * cols;
      for (uint64_t b = 0; b < col_blocks; ++b) {
        uint8_t m = peak[b];
        for (uint64_t c = b * bc; c < std::min(cols, (b + 1) * bc); ++c)
          m = std::max<uint8_t>(m, row[c] & 0x7F);
        peak[b] = m;
      }
    }
    for (uint64_t b = 0; b < col_blocks; ++b) {
      const uint64_t block = r0 / br * col_blocks + b;
      if (peak[b] == 0x7F)
        fail(tensor_ref(w), " holds an FP8 NaN code in block ", block, " (from row ", r0,
             ", column ", b * bc, ")");
      const float largest = moert::fp8::e4m3_decode(peak[b]) * scales[block];
      if (!std::isfinite(largest))
        fail(tensor_ref(w), " decodes past the largest float in block ", block, ": a code of ",
             moert::fp8::e4m3_decode(peak[b]), " times its scale ", scales[block], " in '",
             scales_name, "'");
    }
  }
}

// One moert tensor gathered from checkpoint tensors (the experts of one projection, stacked).
struct Gathered {
  fb::DType dtype = fb::DType::F32;
  std::vector<uint64_t> shape;
  std::vector<std::span<const uint8_t>> pieces;
  uint64_t bytes = 0;
  // FP8 only.
  uint32_t block_rows = 0, block_cols = 0;
  std::vector<float> scales;
};

// The import reads config.json, the index and the shards of the checkpoint's directory: OUTPUT
// must not name one of them (or a link to one).
std::vector<std::string> checkpoint_files(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> files;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.ends_with(".json") || name.ends_with(".safetensors"))
      files.push_back(it->path().string());
  }
  return files;
}

class Importer {
 public:
  Importer(const ImportRequest& r) : req_(r), ck_(r.checkpoint_dir), data_(r.out_path) {
    const std::string config_path =
        (std::filesystem::path(r.checkpoint_dir) / "config.json").string();
    cfg_ = parse_hf_moe_config(ck_.config_text(), config_path);
    result_.family = cfg_.model_type;
  }

  ImportResult run() {
    if (req_.layers.empty()) usage_fail("name at least one --layer");
    std::set<uint32_t> seen;
    for (uint32_t l : req_.layers) {
      if (!seen.insert(l).second) usage_fail("--layer ", l, " is given twice");
      cfg_.check_moe_layer(l);
    }
    std::vector<flatbuffers::Offset<fb::Layer>> layers;
    try {
      for (uint32_t l : req_.layers) {
        if (req_.with_norm) layers.push_back(norm_layer(l));
        layers.push_back(moe_layer(l));
      }
      // What was read of a shard cut short since is zeros: nothing of it may be written.
      ck_.check_unchanged();
    } catch (const Error&) {
      // A refusal that came of such zeros (a block scale of 0), or a write from a mapping that
      // lost its pages (EFAULT), is said as the change of the file.
      ck_.check_unchanged();
      throw;
    }
    // Imports and saves to one directory take turns from here: another import to OUT must not
    // remove this one's data file in its clean-up (nor this one the other's). The data file's
    // fsync, which may take long, comes first.
    data_.sync();
    const moert::format::DirectoryLock lock(directory_of(req_.out_path));
    if (lock.timed_out())
      fail("cannot write '", req_.out_path,
           "': another save has held the lock of its directory for ",
           moert::format::DirectoryLock::kPatience.count() / 1000,
           " s (a process stopped or stuck inside a save there?)");
    const std::string data_name = data_.commit();
    result_.data_bytes = data_.size();
    result_.data_file = data_name;
    std::string name = cat(cfg_.model_type, " MoE layer", req_.layers.size() > 1 ? "s" : "");
    for (size_t i = 0; i < req_.layers.size(); ++i) name += cat(i ? "," : " ", req_.layers[i]);
    const auto model = fb::CreateModel(b_, schema_major(), schema_minor(), b_.CreateString(name),
                                       cfg_.hidden, b_.CreateVector(layers), 0,
                                       data_name.empty() ? 0 : b_.CreateString(data_name));
    fb::FinishModelBuffer(b_, model);
    try {
      write_file_atomically(req_.out_path, {b_.GetBufferPointer(), b_.GetSize()});
    } catch (...) {
      data_.discard();
      throw;
    }
    result_.description_bytes = b_.GetSize();
    remove_stale_data(data_name);
    return result_;
  }

 private:
  // Data files of earlier imports to the same path ("<file>.<16 hex digits>.data"), unless a
  // description in the directory still names one (a copy of an earlier import's description).
  void remove_stale_data(const std::string& keep) const {
    moert::format::remove_unnamed_data_files(
        directory_of(req_.out_path), std::filesystem::path(req_.out_path).filename().string(),
        keep);
  }

  const StTensor& take(const std::string& name) {
    const StTensor& t = ck_.get(name);
    used_.insert(name);
    ++result_.tensors;
    result_.read_bytes += t.bytes.size();
    return t;
  }

  // Refuses a checkpoint tensor of the wrong shape, naming it.
  static void expect_shape(const StTensor& t, const std::vector<uint64_t>& want) {
    if (t.shape != want)
      fail(tensor_ref(t), " has shape ", shape_str(t.shape), " but the config makes it ",
           shape_str(want));
  }

  // Stacks `names` (each of shape `each`) into one tensor of shape [names.size(), each...], or
  // keeps the one tensor's shape when stack is false. Every piece must share the dtype.
  Gathered gather(const std::vector<std::string>& names, const std::vector<uint64_t>& each,
                  bool stack, bool fp8_allowed) {
    Gathered g;
    // Element by element: GCC 12 reports a false -Wstringop-overflow for a range insert into
    // the vector here under -fsanitize=thread.
    g.shape.reserve(each.size() + 1);
    if (stack) g.shape.push_back(names.size());
    for (uint64_t d : each) g.shape.push_back(d);
    for (size_t i = 0; i < names.size(); ++i) {
      const StTensor& t = take(names[i]);
      expect_shape(t, each);
      fb::DType dt;
      switch (t.dtype) {
        case StDType::F32:
          dt = fb::DType::F32;
          break;
        case StDType::BF16:
          dt = fb::DType::BF16;
          break;
        case StDType::F8_E4M3:
          if (!fp8_allowed) fail(tensor_ref(t), " is F8_E4M3; moert keeps it in fp32/bf16");
          dt = fb::DType::F8E4M3;
          break;
        default:
          fail(tensor_ref(t), " has dtype ", st_dtype_name(t.dtype),
               "; moert stores F32, BF16 and F8_E4M3");
      }
      if (i == 0) {
        g.dtype = dt;
      } else if (dt != g.dtype) {
        fail(tensor_ref(t), " is ", st_dtype_name(t.dtype), " but '", names[0], "' is ",
             fb::EnumNameDType(g.dtype), ": moert stacks experts of one dtype");
      }
      g.pieces.push_back(t.bytes);
      g.bytes += t.bytes.size();
      if (dt == fb::DType::F8E4M3)
        add_scales(t, g);
      else
        check_finite(t);
      // Before the next piece: a shard cut short ends the import at once, not after it has
      // scanned and written every later tensor.
      t.file->check_unchanged();
      // Written later from the mapping again: the scan keeps none of an 11 GB layer resident.
      release(t.bytes);
    }
    return g;
  }

  // DeepSeek-V3's FP8 weight W [out, in] comes with W_scale_inv [ceil(out/br), ceil(in/bc)]:
  // dequantised W[i][j] = code * scale_inv[i / br][j / bc], row-major over blocks, which is
  // moert's BlockScales over the same matrix.
  void add_scales(const StTensor& w, Gathered& g) {
    if (!cfg_.fp8_block_rows)
      fail(tensor_ref(w),
           " is F8_E4M3 but config.json has no quantization_config.weight_block_size");
    const uint32_t br = *cfg_.fp8_block_rows, bc = *cfg_.fp8_block_cols;
    const std::string sname = w.name + "_scale_inv";
    const StTensor* s = ck_.find(sname);
    if (!s) fail("FP8 ", tensor_ref(w), " has no '", sname, "'");
    take(sname);
    // DeepSeek's scales are F32; Qwen3's FP8 releases store them as BF16, some as F16.
    if (s->dtype != StDType::F32 && s->dtype != StDType::BF16 && s->dtype != StDType::F16)
      fail(tensor_ref(*s), " is ", st_dtype_name(s->dtype),
           "; block scales must be F32, BF16 or F16");
    const std::vector<uint64_t> want = {ceil_div(w.shape[0], br), ceil_div(w.shape[1], bc)};
    if (s->shape != want) {
      const std::vector<uint64_t> transposed = {want[1], want[0]};
      fail(tensor_ref(*s), " has shape ", shape_str(s->shape), "; weight ", shape_str(w.shape),
           " in ", br, "x", bc, " blocks needs ", shape_str(want),
           s->shape == transposed ? " (the scales are transposed)" : "");
    }
    g.block_rows = br;
    g.block_cols = bc;
    const size_t at = g.scales.size();
    const std::vector<float> scales = widened(*s, "block scales");
    g.scales.insert(g.scales.end(), scales.begin(), scales.end());
    for (size_t i = at; i < g.scales.size(); ++i)
      if (!moert::fp8::is_valid_scale(g.scales[i]))
        fail(tensor_ref(*s), " holds the scale ", g.scales[i], " at element ", i - at,
             ": a scale must be finite and at least 2^-126 (a negative or zero scale would flip "
             "or erase its block)");
    check_fp8_values(w, sname, g.scales.data() + at, br, bc);
  }

  flatbuffers::Offset<fb::Tensor> put(const Gathered& g) {
    flatbuffers::Offset<fb::BlockScales> scales = 0;
    if (g.dtype == fb::DType::F8E4M3)
      scales = fb::CreateBlockScales(b_, g.block_rows, g.block_cols, b_.CreateVector(g.scales));
    const auto shape = b_.CreateVector(g.shape);
    if (g.bytes >= kDataMinBytes) {
      // The checkpoint's pages are copied once: each piece's pages are let go once written, so
      // that importing an 11 GB layer does not keep it resident (a later read maps them again).
      const fb::ExternalRef ext(data_.append(g.pieces, release), g.bytes);
      return fb::CreateTensor(b_, shape, g.dtype, 0, &ext, 0, scales);
    }
    std::vector<uint8_t> bytes;
    bytes.reserve(g.bytes);
    for (const auto& p : g.pieces) bytes.insert(bytes.end(), p.begin(), p.end());
    b_.ForceVectorAlignment(bytes.size(), 1, 32);
    const auto data = b_.CreateVector(bytes);
    return fb::CreateTensor(b_, shape, g.dtype, data, nullptr, 0, scales);
  }

  flatbuffers::Offset<fb::Layer> norm_layer(uint32_t l) {
    if (!cfg_.has_rms_norm_eps) fail("--with-norm needs config.json's 'rms_norm_eps'");
    const auto w = put(gather({cfg_.norm_weight(l)}, {cfg_.hidden}, false, false));
    const auto norm = fb::CreateRMSNorm(b_, cfg_.hidden, cfg_.rms_norm_eps, w);
    return fb::CreateLayer(b_, b_.CreateString(cat("layers.", l, ".post_attention_layernorm")),
                           fb::LayerKind::RMSNorm, norm.Union());
  }

  flatbuffers::Offset<fb::Layer> moe_layer(uint32_t l) {
    const uint64_t E = cfg_.experts, H = cfg_.expert_hidden, D = cfg_.hidden;
    const std::string prefix = cfg_.moe_prefix(l);
    const auto gate = put(gather({cfg_.router_weight(l)}, {E, D}, false, false));
    flatbuffers::Offset<fb::Tensor> bias = 0;
    if (cfg_.sigmoid) {
      const StTensor& t = take(prefix + "gate.e_score_correction_bias");
      expect_shape(t, {E});
      // The bias stays fp32 in moert; a 16-bit one widens exactly.
      const std::vector<float> v = widened(t, "the bias");
      for (float x : v)
        if (!std::isfinite(x)) fail(tensor_ref(t), " holds a NaN or infinity");
      const std::vector<uint64_t> shape = {E};
      bias = fb::CreateTensor(b_, b_.CreateVector(shape), fb::DType::F32,
                              b_.CreateVector(reinterpret_cast<const uint8_t*>(v.data()), 4 * E));
    }
    auto experts = [&](int which) {
      std::vector<std::string> names;
      for (uint32_t e = 0; e < E; ++e) names.push_back(cfg_.expert_weight(l, e, which));
      return put(gather(names,
                        which == 2 ? std::vector<uint64_t>{D, H} : std::vector<uint64_t>{H, D},
                        true, true));
    };
    const auto w1 = experts(1), w3 = experts(3), w2 = experts(2);
    flatbuffers::Offset<fb::Tensor> s1 = 0, s3 = 0, s2 = 0;
    const uint64_t SH = cfg_.shared_hidden;
    if (SH > 0) {
      s1 = put(gather({cfg_.shared_weight(l, 1)}, {SH, D}, true, true));
      s3 = put(gather({cfg_.shared_weight(l, 3)}, {SH, D}, true, true));
      s2 = put(gather({cfg_.shared_weight(l, 2)}, {D, SH}, true, true));
    }
    // Every tensor of the MLP module must have been understood: anything else (a bias, a
    // shared-expert gate, another expert) would be silently dropped.
    for (const std::string& n : ck_.names())
      if (n.rfind(prefix, 0) == 0 && !used_.count(n))
        fail(tensor_ref(ck_.get(n)), " of layer ", l,
             "'s MLP module has no place in a moert MoE layer");

    // DeepSeek-V3's bias steers selection (loss-free balancing); imported frozen, so training
    // changes it only when the user unfreezes it. The softmax families have no bias.
    const auto balancing = cfg_.sigmoid ? fb::CreateBalancing(b_, fb::BalancingPolicy::LossFreeBias,
                                                              0.001f, false, true)
                                        : fb::CreateBalancing(b_, fb::BalancingPolicy::None);
    const auto moe = fb::CreateMoE(
        b_, cfg_.hidden, cfg_.experts, cfg_.top_k, cfg_.expert_hidden,
        cfg_.sigmoid ? fb::ScoreFunction::Sigmoid : fb::ScoreFunction::Softmax, cfg_.groups,
        cfg_.topk_groups, cfg_.normalize, cfg_.scaling, SH > 0 ? 1 : 0, cfg_.shared_hidden,
        /*residual=*/false, balancing, gate, bias, w1, w3, w2, s1, s3, s2);
    const std::string layer_name = prefix.substr(std::string("model.").size());
    return fb::CreateLayer(b_, b_.CreateString(layer_name.substr(0, layer_name.size() - 1)),
                           fb::LayerKind::MoE, moe.Union());
  }

  const ImportRequest& req_;
  Checkpoint ck_;
  HfMoeConfig cfg_;
  DataFileWriter data_;
  Builder b_{1 << 20};
  std::set<std::string> used_;
  ImportResult result_;
};

}  // namespace

ImportResult import_checkpoint(const ImportRequest& request) {
  refuse_writing_onto_inputs(request.out_path, checkpoint_files(request.checkpoint_dir));
  Importer importer(request);
  return importer.run();
}

}  // namespace moert_cli
