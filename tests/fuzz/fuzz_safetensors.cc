// libFuzzer harness: the CLI's safetensors reader (cli/safetensors.h) and its index parser, fed
// arbitrary bytes. A clean refusal is a moert_cli::Error; anything else (another exception, a
// sanitizer report) is a finding. A file that parses must keep its promises: every tensor's bytes
// lie inside the input, its shape's byte count equals its range, and the ranges tile the data.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>

#include "cli/error.h"
#include "cli/safetensors.h"

namespace {

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "moert fuzz finding: safetensors: %s\n", what);
  std::abort();
}

void check_file(std::span<const uint8_t> in) {
  std::unique_ptr<moert_cli::SafetensorsFile> f;
  try {
    f = moert_cli::SafetensorsFile::parse(in, "fuzz input");
  } catch (const moert_cli::Error&) {
    return;
  }
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | in[i];
  const uint8_t* data = in.data() + 8 + header;
  uint64_t at = 0;
  for (const auto& t : f->tensors()) {
    if (t.bytes.data() != data + t.begin || t.begin != at) finding("ranges do not tile the data");
    if (t.bytes.data() + t.bytes.size() > in.data() + in.size()) finding("range past the input");
    if (t.numel() * moert_cli::st_dtype_size(t.dtype) != t.bytes.size())
      finding("shape disagrees with the range");
    if (f->find(t.name) != &t) finding("lookup by name");
    at = t.end;
  }
  if (data + at != in.data() + in.size()) finding("data not wholly covered");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check_file({data, size});
  try {
    moert_cli::parse_safetensors_index(std::string(reinterpret_cast<const char*>(data), size),
                                       "fuzz input");
  } catch (const moert_cli::Error&) {
  }
  return 0;
}
