// Model descriptions as text and as bytes. JSON and binary are converted with FlatBuffers' own
// parser, driven by the schema text compiled into the program (schemas/moert.fbs is the only
// source), so the CLI reads and writes exactly what flatc would.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cli/library.h"

namespace moert_cli {

// Whether `bytes` carry the schema's file identifier, i.e. are a binary model description.
bool is_binary_model(const std::vector<uint8_t>& bytes);

// JSON text -> binary (with the file identifier). Throws Error naming `origin` and the parser's
// message on malformed JSON or a field the schema does not have.
std::vector<uint8_t> json_to_binary(const std::string& json, const std::string& origin);

// Binary -> JSON text. The buffer is checked with the FlatBuffers verifier against the schema
// first, so a damaged file is refused rather than read out of bounds.
std::string binary_to_json(const std::vector<uint8_t>& bytes, const std::string& origin);

// The floating-point values of a binary model `a` (fields and vector elements of type float or
// double, every table reached included) that differ in `b`, which holds the same tables: how
// many there are in all, how many differ (bitwise; NaN equals NaN), and where the first one is
// ("training.params[3].v[17]: 1.2e-08 -> 0"). FlatBuffers' text format writes floats with 6
// decimals, so a model read back from its JSON can differ from the model it was made from. Both
// buffers must have verified (binary_to_json and json_to_binary do that).
struct FloatChanges {
  uint64_t values = 0, changed = 0;
  std::string first;
};
FloatChanges float_changes(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b);

std::vector<uint8_t> read_file(const std::string& path);
// The directory of a file's path, "." for a bare name: where its data file and temporaries go.
std::string directory_of(const std::string& path);

// A model file in either form (binary or JSON, told apart by content) as a binary description.
std::vector<uint8_t> read_model_file(const std::string& path);

// Loads a model file in either form (binary or JSON, told apart by content) through the library;
// external weights resolve against the file's directory. A library refusal's status code goes
// to `*refusal` when given (see load_model_bytes).
ModelPtr load_model_file(const std::string& path, int32_t* refusal = nullptr,
                         LoadWeights weights = LoadWeights::Yes);

}  // namespace moert_cli
