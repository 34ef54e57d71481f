// The CLI's JSON <-> binary converter (cli/model_codec.cc) called in-process, as the JSON fuzz
// target calls it: many documents through one converter.
#include <gtest/gtest.h>
#include <malloc.h>

#include <cstddef>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "cli/error.h"
#include "cli/model_codec.h"

#if defined(__SANITIZE_ADDRESS__)
// The sanitizer runtime's allocator statistics (sanitizer/allocator_interface.h, which GCC does
// not install).
extern "C" size_t __sanitizer_get_current_allocated_bytes();
#endif

namespace {

// Bytes the program's heap holds live: what a leak grows. Not the resident size, which
// AddressSanitizer's quarantine of freed blocks grows by hundreds of megabytes on its own.
long live_heap_kib() {
#if defined(__SANITIZE_ADDRESS__)
  const size_t bytes = __sanitizer_get_current_allocated_bytes();
#else
  const struct mallinfo2 m = mallinfo2();
  const size_t bytes = m.uordblks + m.hblkhd;
#endif
  return static_cast<long>(bytes / 1024);
}

std::string tiny_json() {
  std::ifstream in(MOERT_TINY_JSON);
  return {std::istreambuf_iterator<char>(in), {}};
}

// Found by the fuzzing campaign (the JSON target's memory grew by ~6 KB per execution): a parse
// that failed part-way left state in the reused FlatBuffers parser. Many failures must neither
// grow memory nor change what later documents convert to.
TEST(Codec, FailedDocumentsLeaveNothingBehind) {
  const std::string json = tiny_json();
  const std::vector<uint8_t> expected = moert_cli::json_to_binary(json, "tiny");
  // Cut inside the first layer's table: the parser is several tables deep when it fails.
  const std::string broken = json.substr(0, json.find("\"kind\"") + 40);
  for (int i = 0; i < 200; ++i)
    EXPECT_THROW(moert_cli::json_to_binary(broken, "broken"), moert_cli::Error);
  const long before = live_heap_kib();
  for (int i = 0; i < 5000; ++i) {
    EXPECT_THROW(moert_cli::json_to_binary(broken, "broken"), moert_cli::Error);
    if (i % 1000 == 0) {
      EXPECT_EQ(moert_cli::json_to_binary(json, "tiny"), expected);
    }
  }
  EXPECT_LT(live_heap_kib() - before, 1024) << "KiB of heap grown over 5000 failed documents";
}

// A document is JSON only: schema declarations in it (a new root type here) are refused, where
// FlatBuffers' Parse would have read them into the schema first.
TEST(Codec, DocumentsCannotDeclareSchema) {
  try {
    moert_cli::json_to_binary("root_type moert.fb.Layer;\n{ \"name\": \"x\" }", "declaring");
    FAIL() << "a document with a schema declaration converted";
  } catch (const moert_cli::Error& e) {
    EXPECT_NE(std::string(e.what()).find("line 1"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(moert_cli::json_to_binary(tiny_json(), "tiny").empty());
}

// Found by the fuzzing campaign: FlatBuffers' JSON parser accepts a union's type without its
// value (a layer with "kind_type" and no "kind"); the converter wrote that file, and then refused
// to render it. It now refuses the document, naming the cause.
TEST(Codec, AUnionTypeWithoutItsValueIsRefused) {
  const std::string doc =
      "{ \"schema_major\": 1, \"name\": \"m\", \"layers\": [ { \"name\": \"moe0\", "
      "\"kind_type\": \"MoE\" } ] }";
  try {
    moert_cli::json_to_binary(doc, "doc");
    FAIL() << "a layer with a kind_type and no kind converted";
  } catch (const moert_cli::Error& e) {
    EXPECT_NE(std::string(e.what()).find("kind_type"), std::string::npos) << e.what();
  }
  // The same layer with its kind table verifies as far as the format goes.
  const std::string whole =
      "{ \"schema_major\": 1, \"name\": \"m\", \"layers\": [ { \"name\": \"n\", "
      "\"kind_type\": \"RMSNorm\", \"kind\": { \"dim\": 4 } } ] }";
  const std::vector<uint8_t> binary = moert_cli::json_to_binary(whole, "whole");
  EXPECT_NE(moert_cli::binary_to_json(binary, "whole").find("RMSNorm"), std::string::npos);
}

}  // namespace

// What JSON loses: floats read back from FlatBuffers' 6-decimal text, found through tables,
// unions (set or not) and vectors (float_changes), and nothing where every float is exact there.
TEST(Codec, FloatChangesFindWhatSixDecimalsLose) {
  const std::vector<uint8_t> exact = moert_cli::json_to_binary(tiny_json(), "tiny");
  const auto same = moert_cli::float_changes(
      exact, moert_cli::json_to_binary(moert_cli::binary_to_json(exact, "tiny"), "tiny"));
  EXPECT_GT(same.values, 10u);
  EXPECT_EQ(same.changed, 0u) << same.first;

  const std::string doc =
      "{ \"schema_major\": 1, \"name\": \"m\", \"layers\": [ { \"name\": \"n\", "
      "\"kind_type\": \"RMSNorm\", \"kind\": { \"dim\": 4, \"eps\": 1.25e-7 } } ], "
      "\"training\": { \"params\": [ { \"name\": \"n.weight\", \"m\": [0.5, 3e-8, 0.25] } ] } }";
  const std::vector<uint8_t> binary = moert_cli::json_to_binary(doc, "doc");
  const std::vector<uint8_t> back =
      moert_cli::json_to_binary(moert_cli::binary_to_json(binary, "doc"), "back");
  const auto lost = moert_cli::float_changes(binary, back);
  EXPECT_EQ(lost.changed, 2u);
  EXPECT_EQ(lost.first.rfind("layers[0].kind.eps: 1.2", 0), 0u) << lost.first;
  EXPECT_NE(lost.first.find(" -> 0"), std::string::npos) << lost.first;
  EXPECT_EQ(moert_cli::float_changes(binary, binary).changed, 0u);

  // A layer of kind NONE (the union unset) is walked past, not indexed (it once crashed).
  const std::vector<uint8_t> none = moert_cli::json_to_binary(
      "{ \"schema_major\": 1, \"name\": \"m\", \"layers\": [ { \"name\": \"empty\" }, "
      "{ \"name\": \"n\", \"kind_type\": \"RMSNorm\", \"kind\": { \"dim\": 4, \"eps\": 0.5 } } ] }",
      "none");
  const auto walked = moert_cli::float_changes(
      none, moert_cli::json_to_binary(moert_cli::binary_to_json(none, "none"), "none"));
  EXPECT_EQ(walked.values, 1u);
  EXPECT_EQ(walked.changed, 0u);
}

// Error lines are valid UTF-8 on one line: control characters and the bytes of malformed UTF-8
// (a corrupt safetensors header's "last read" echoed raw) are written as \xNN; well-formed
// characters of any length stay.
TEST(Printable, EscapesControlsAndMalformedUtf8Only) {
  using moert_cli::printable;
  EXPECT_EQ(printable("tab\there\n"), "tab\\x09here\\x0A");
  EXPECT_EQ(printable("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"),
            "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80");
  EXPECT_EQ(printable("last read: '{\xdd'"), "last read: '{\\xDD'");
  EXPECT_EQ(printable("\xC0\xAF"), "\\xC0\\xAF");                    // overlong '/'
  EXPECT_EQ(printable("\xED\xA0\x80"), "\\xED\\xA0\\x80");           // a surrogate
  EXPECT_EQ(printable("\xF4\x90\x80\x80"), "\\xF4\\x90\\x80\\x80");  // past U+10FFFF
  EXPECT_EQ(printable("\xE2\x82"), "\\xE2\\x82");                    // cut short
  EXPECT_EQ(printable("\x7F"), "\\x7F");
}
