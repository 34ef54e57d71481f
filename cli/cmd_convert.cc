// `moert convert`: model descriptions between JSON (for people) and binary (for the library).
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/data_file.h"
#include "cli/error.h"
#include "cli/library.h"
#include "cli/model_codec.h"
#include "moert_generated.h"

namespace moert_cli {

namespace fs = std::filesystem;

const CommandSpec kConvertSpec = {
    "convert",
    "INPUT OUTPUT [--no-check] [--lossy] [--quantize fp8 [--power-of-two-scales]]",
    "convert a model file between JSON and binary, or quantize its experts to FP8",
    "A binary INPUT (it carries the 'MOE1' identifier) becomes JSON; anything else is read as\n"
    "JSON and becomes binary. The schema compiled into moert drives both directions, so the\n"
    "result is what flatc makes of the same input. Unless --no-check is given, the model is\n"
    "also loaded by the library, which validates every field, before OUTPUT is written.\n"
    "FlatBuffers' JSON writes floating-point fields with 6 decimals: a binary INPUT whose float\n"
    "values would change that way (a checkpoint's optimizer state, FP8 block scales) is refused\n"
    "unless --lossy is given (a checkpoint needs --no-check too: its rounded training state no\n"
    "longer matches its digest); tensor values are bytes and always exact. INPUT and OUTPUT must\n"
    "be different files.\n\n"
    "With --quantize fp8, INPUT (binary or JSON) is loaded and OUTPUT is written as a binary\n"
    "model whose MoE layers' routed and shared expert weights are FP8 E4M3 in 128x128 blocks\n"
    "with one fp32 scale per block (DeepSeek-V3's weight format; scale = amax / 448); every other\n"
    "weight is written as fp32, initialised ones with their values. Arrays of 64 KiB or more go\n"
    "to a data file beside OUTPUT. A session keeps such experts at 1 byte per value.",
    2,
    2,
    {{"no-check", "", "write OUTPUT even if the library refuses the model's content", ""},
     {"lossy", "",
      "binary to JSON: write it even where floats change at 6 decimals (the count is printed)", ""},
     {"quantize", "FORMAT", "write the experts' weights quantized: fp8 (E4M3, 128x128 blocks)", ""},
     {"power-of-two-scales", "",
      "with --quantize fp8: scales rounded up to powers of two (UE8M0, as DeepSeek-V3.1)", ""}},
};

namespace {

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

int run_quantize(const Args& args) {
  const std::string in = args.positional()[0], out = args.positional()[1];
  const std::string format = args.str("quantize", "");
  if (format != "fp8") usage_fail("--quantize takes fp8, got '", format, "'");
  if (args.has("no-check"))
    usage_fail("--no-check and --quantize do not go together: quantizing loads the model");
  std::vector<uint8_t> bytes = read_file(in);
  if (!is_binary_model(bytes)) bytes = json_to_binary(std::string(bytes.begin(), bytes.end()), in);
  ModelPtr model = load_model_bytes(bytes, directory_of(in), in);
  // Verified by the load above.
  const bool checkpoint = moert::fb::GetModel(bytes.data())->training() != nullptr;
  moert_model* raw = nullptr;
  uint32_t quantized = 0;
  check(moert_model_quantize_fp8(
            model.get(), args.has("power-of-two-scales") ? MOERT_FP8_POWER_OF_TWO_SCALES : 0, &raw,
            &quantized),
        in);
  ModelPtr q(raw);
  if (quantized == 0)
    std::printf("%s: %s; OUTPUT holds the same weights\n", in.c_str(),
                moe_layer_indices(model.get()).empty()
                    ? "no MoE layer, so no expert weights to quantize"
                    : "every expert weight is FP8 already");
  check(moert_model_save_file(q.get(), out.c_str()), out);
  uint64_t before = 0, after = 0;
  check(moert_model_resident_bytes(model.get(), &before), in);
  check(moert_model_resident_bytes(q.get(), &after), out);
  std::printf(
      "%s -> %s: %u expert weight tensors quantized to FP8 E4M3 (128x128 blocks%s); "
      "weights %s -> %s in memory\n",
      in.c_str(), out.c_str(), quantized,
      args.has("power-of-two-scales") ? ", power-of-two scales" : "", mib(before).c_str(),
      mib(after).c_str());
  if (checkpoint)
    std::printf(
        "%s is a checkpoint: %s is a model of its parameters; its training state (step, "
        "gradients, optimizer moments, balancing counts) is not carried over\n",
        in.c_str(), out.c_str());
  return 0;
}

}  // namespace

int run_convert(const Args& args) {
  const std::string in = args.positional()[0], out = args.positional()[1];
  std::error_code ec;
  if (fs::equivalent(in, out, ec))
    usage_fail("INPUT and OUTPUT are the same file ('", out, "'): write the result elsewhere");
  // Nor INPUT's data file.
  refuse_writing_onto_inputs(out, model_files(in));
  if (args.has("quantize")) {
    if (args.has("lossy")) usage_fail("--lossy is for binary INPUT to JSON, not --quantize");
    return run_quantize(args);
  }
  if (args.has("power-of-two-scales")) usage_fail("--power-of-two-scales needs --quantize fp8");
  const std::vector<uint8_t> bytes = read_file(in);
  const bool to_json = is_binary_model(bytes);
  if (!to_json && args.has("lossy")) usage_fail("--lossy is for binary INPUT (to JSON) only");
  std::vector<uint8_t> binary;
  std::string result;
  FloatChanges changes;
  if (to_json) {
    result = binary_to_json(bytes, in);
    // What a reader of OUTPUT gets, the JSON read back, is what the library checks below: with
    // --lossy a checkpoint's rounded training state fails its digest there (--no-check writes
    // it anyway).
    binary = json_to_binary(result, out);
    changes = float_changes(bytes, binary);
    const bool checkpoint = moert::fb::GetModel(bytes.data())->training() != nullptr;
    if (changes.changed > 0 && !args.has("lossy"))
      fail(in, ": JSON would not hold this ", checkpoint ? "checkpoint" : "model",
           " exactly: ", changes.changed, " of ", changes.values,
           " floating-point values change at the 6 decimals FlatBuffers writes (first: ",
           changes.first, checkpoint ? "; its training state would then fail its digest" : "",
           "). Keep the binary file, or pass --lossy to write the JSON anyway");
    if (changes.changed > 0 && checkpoint && !args.has("no-check"))
      fail(in, ": with --lossy the JSON's rounded training state (", changes.changed, " of ",
           changes.values,
           " values) would fail the checkpoint's digest, so nothing could load it; pass "
           "--no-check as well to write it anyway");
  } else {
    binary = json_to_binary(std::string(bytes.begin(), bytes.end()), in);
    result.assign(binary.begin(), binary.end());
  }
  if (!args.has("no-check"))
    load_model_bytes(binary, directory_of(in), to_json ? out + " (read back)" : in);
  // Atomically (as import, export and the library's saves write): a failed or interrupted
  // convert leaves OUTPUT as it was, and an OUTPUT that is a device or a FIFO is refused rather
  // than written into.
  write_file_atomically(out, {reinterpret_cast<const uint8_t*>(result.data()), result.size()});
  std::printf("%s (%s, %zu bytes) -> %s (%s, %zu bytes)\n", in.c_str(), to_json ? "binary" : "JSON",
              bytes.size(), out.c_str(), to_json ? "JSON" : "binary", result.size());
  if (changes.changed > 0)
    std::printf(
        "note: %llu of %llu floating-point values changed at 6 decimals (--lossy; first: %s)\n",
        static_cast<unsigned long long>(changes.changed),
        static_cast<unsigned long long>(changes.values), changes.first.c_str());
  // The data file is named relative to the description's own directory: one written elsewhere
  // needs a copy of it. The advice names where the file is, INPUT's folder, only if it is there
  // (with --no-check INPUT's may lack it too, and pointing at a folder without it misleads).
  const moert::fb::Model* m = moert::fb::GetModel(binary.data());
  if (m->external_data()) {
    const std::string data = m->external_data()->str();
    const std::string in_dir = directory_of(in), out_dir = directory_of(out);
    if (!fs::exists(fs::path(out_dir) / data, ec)) {
      if (fs::exists(fs::path(in_dir) / data, ec))
        std::printf(
            "note: %s refers to its data file '%s' beside it, which is not there: copy it "
            "from %s\n",
            out.c_str(), data.c_str(), in_dir.c_str());
      else if (fs::equivalent(in_dir, out_dir, ec))
        std::printf(
            "note: %s refers to its data file '%s' beside it, which is missing from %s (%s "
            "lacks it too): neither loads without it\n",
            out.c_str(), data.c_str(), out_dir.c_str(), in.c_str());
      else
        std::printf(
            "note: %s refers to its data file '%s' beside it, which is missing from both %s and "
            "%s (beside %s): neither loads without it\n",
            out.c_str(), data.c_str(), out_dir.c_str(), in_dir.c_str(), in.c_str());
    }
  }
  return 0;
}

}  // namespace moert_cli
