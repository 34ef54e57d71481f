// Turns an untrusted model description into a validated Model, or throws Error(InvalidModel / Io)
// naming the layer and field at fault.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/model.h"

namespace moert {

// Loads a binary model file; external weights resolve against the file's directory.
std::shared_ptr<const Model> load_model_file(const std::string& path);

// Loads from memory; external weights resolve against external_dir (empty: none allowed).
std::shared_ptr<const Model> load_model_buffer(const void* data, size_t size,
                                               const std::string& external_dir);

}  // namespace moert
