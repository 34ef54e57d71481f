// Serialises a validated model (and, for a checkpoint, its training state) back into the binary
// description, every tensor inline as fp32.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/model.h"

namespace moert {

std::vector<uint8_t> serialize_model(const Model& model, const TrainingState* training);

// The digest a checkpoint of this model and state carries (computed with state.digest taken as 0).
uint64_t checkpoint_digest(const Model& model, const TrainingState& state);

// Writes bytes to path atomically: a temporary file in the same directory, fsync, rename over the
// destination, fsync of the directory. On any failure the destination is untouched.
void write_file_atomically(const std::string& path, const std::vector<uint8_t>& bytes);

}  // namespace moert
