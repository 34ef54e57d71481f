// The CLI's JSON <-> binary converter (cli/model_codec.cc) called in-process, as the JSON fuzz
// target calls it: many documents through one converter.
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "cli/error.h"
#include "cli/model_codec.h"

namespace {

long resident_kib() {
  std::ifstream f("/proc/self/statm");
  long size = 0, resident = 0;
  f >> size >> resident;
  return resident * 4;
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
  const long before = resident_kib();
  for (int i = 0; i < 5000; ++i) {
    EXPECT_THROW(moert_cli::json_to_binary(broken, "broken"), moert_cli::Error);
    if (i % 1000 == 0) {
      EXPECT_EQ(moert_cli::json_to_binary(json, "tiny"), expected);
    }
  }
  EXPECT_LT(resident_kib() - before, 1024) << "KiB grown over 5000 failed documents";
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

}  // namespace
