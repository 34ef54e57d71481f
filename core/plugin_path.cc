#include "core/plugin_path.h"

#include <dlfcn.h>

#include <filesystem>

namespace moert {

std::string beside_library(const char* file) {
  Dl_info info{};
  std::filesystem::path dir = ".";
  if (dladdr(reinterpret_cast<void*>(&beside_library), &info) != 0 && info.dli_fname) {
    const auto parent = std::filesystem::path(info.dli_fname).parent_path();
    if (!parent.empty()) dir = parent;
  }
  return (dir / file).string();
}

Code plugin_code(int32_t code) {
  const bool known = code >= static_cast<int32_t>(Code::InvalidArgument) &&
                     code <= static_cast<int32_t>(Code::Comm);
  return known ? static_cast<Code>(code) : Code::Internal;
}

}  // namespace moert
