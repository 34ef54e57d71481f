// libFuzzer harness: JSON to binary with the CLI's converter (cli/model_codec.cc, FlatBuffers'
// parser driven by the embedded schema), as `moert convert` runs it on a file it was given. What
// converts is loaded through the C ABI within load limits and rendered back to JSON; the converter
// must read its own rendering, and the rendering of that must be the same text.
#include <moert/moert.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cli/error.h"
#include "cli/model_codec.h"
#include "fuzz_common.h"

namespace {

moert_load_options* limits() {
  static moert_load_options* o = [] {
    moert_load_options* p = nullptr;
    if (moert_load_options_create(&p) || moert_load_options_set_max_memory(p, uint64_t{256} << 10))
      moert_fuzz::finding("load options", "cannot create");
    return p;
  }();
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string json(reinterpret_cast<const char*>(data), size);
  std::vector<uint8_t> binary;
  try {
    binary = moert_cli::json_to_binary(json, "input");
  } catch (const moert_cli::Error&) {
    return 0;
  }
  moert_model* model = nullptr;
  if (moert_status* st = moert_model_load_buffer_with_options(binary.data(), binary.size(), nullptr,
                                                              limits(), &model)) {
    if (moert_status_code(st) == MOERT_ERR_INTERNAL)
      moert_fuzz::finding("load", moert_status_message(st));
    moert_status_free(st);
  }
  moert_model_free(model);

  std::string text, again;
  try {
    text = moert_cli::binary_to_json(binary, "converted");
  } catch (const moert_cli::Error& e) {
    moert_fuzz::finding("render what the parser made", e.what());
  }
  try {
    again = moert_cli::binary_to_json(moert_cli::json_to_binary(text, "rendered"), "reconverted");
  } catch (const moert_cli::Error& e) {
    moert_fuzz::finding("read back its own rendering", e.what());
  }
  if (again != text) moert_fuzz::finding("round trip", "rendering is not a fixed point");
  return 0;
}
