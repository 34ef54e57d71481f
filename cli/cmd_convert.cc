// `moert convert`: model descriptions between JSON (for people) and binary (for the library).
#include <cstdio>
#include <filesystem>
#include <string>

#include "cli/commands.h"
#include "cli/error.h"
#include "cli/model_codec.h"

namespace moert_cli {

const CommandSpec kConvertSpec = {
    "convert",
    "INPUT OUTPUT [--no-check]",
    "convert a model file between JSON and binary (the direction follows INPUT's content)",
    "A binary INPUT (it carries the 'MOE1' identifier) becomes JSON; anything else is read as\n"
    "JSON and becomes binary. The schema compiled into moert drives both directions, so the\n"
    "result is what flatc makes of the same input. Unless --no-check is given, the model is\n"
    "also loaded by the library, which validates every field, before OUTPUT is written.",
    2,
    2,
    {{"no-check", "", "write OUTPUT even if the library refuses the model's content", ""}},
};

int run_convert(const Args& args) {
  const std::string in = args.positional()[0], out = args.positional()[1];
  const std::vector<uint8_t> bytes = read_file(in);
  const bool to_json = is_binary_model(bytes);
  std::vector<uint8_t> binary;
  std::string result;
  if (to_json) {
    result = binary_to_json(bytes, in);
    binary = bytes;
  } else {
    binary = json_to_binary(std::string(bytes.begin(), bytes.end()), in);
    result.assign(binary.begin(), binary.end());
  }
  if (!args.has("no-check")) {
    const std::string dir = std::filesystem::path(in).parent_path().string();
    load_model_bytes(binary, dir.empty() ? "." : dir, in);
  }
  write_file(out, result);
  std::printf("%s (%s, %zu bytes) -> %s (%s, %zu bytes)\n", in.c_str(), to_json ? "binary" : "JSON",
              bytes.size(), out.c_str(), to_json ? "JSON" : "binary", result.size());
  return 0;
}

}  // namespace moert_cli
