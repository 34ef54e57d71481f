// What the plugin loaders share: where plugins live and how their error codes come back.
#pragma once

#include <cstdint>
#include <string>

#include "core/error.h"

namespace moert {

// `file` in the directory libmoert itself was loaded from (the current directory when that
// cannot be told).
std::string beside_library(const char* file);

// A plugin's error code as a Code; Internal for values this library does not know.
Code plugin_code(int32_t code);

}  // namespace moert
