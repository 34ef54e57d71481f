#include "core/plugin_path.h"

#include <dlfcn.h>
#include <moert/moert.h>

#include <filesystem>

namespace moert {
namespace {

namespace fs = std::filesystem;

struct LibraryDirs {
  fs::path real = ".", named = ".";
};

LibraryDirs find_library_dirs() {
  LibraryDirs d;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&find_library_dirs), &info) == 0 || !info.dli_fname) return d;
  std::error_code ec;
  if (const fs::path named = fs::absolute(info.dli_fname, ec); !ec && named.has_parent_path())
    d.named = named.parent_path();
  if (const fs::path real = fs::canonical(info.dli_fname, ec); !ec && real.has_parent_path())
    d.real = real.parent_path();
  else
    d.real = d.named;
  return d;
}

// Taken while the library loads: the name dladdr reports is the one the dynamic loader opened,
// relative to the working directory of that moment when a search path entry was relative.
const LibraryDirs g_library_dirs = find_library_dirs();

}  // namespace

std::vector<std::string> plugin_candidates(const char* stem) {
  const std::string versioned = std::string(stem) + "." + std::to_string(MOERT_ABI_VERSION);
  std::vector<std::string> out;
  for (const fs::path* dir : {&g_library_dirs.real, &g_library_dirs.named}) {
    if (dir == &g_library_dirs.named && *dir == g_library_dirs.real) break;
    out.push_back((*dir / versioned).string());
    out.push_back((*dir / stem).string());
  }
  return out;
}

std::string find_plugin(const char* stem, bool* found) {
  const std::vector<std::string> candidates = plugin_candidates(stem);
  for (const std::string& c : candidates) {
    std::error_code ec;
    if (fs::exists(c, ec)) {
      *found = true;
      return c;
    }
  }
  *found = false;
  return candidates.front();
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec;
  const bool same = fs::equivalent(a, b, ec);
  return ec ? a == b : same;
}

std::string plugin_search_text(const char* stem) {
  std::string text = "looked for ";
  const std::vector<std::string> candidates = plugin_candidates(stem);
  for (size_t i = 0; i < candidates.size(); ++i) text += (i ? ", '" : "'") + candidates[i] + "'";
  return text;
}

Code plugin_code(int32_t code) {
  const bool known = code >= static_cast<int32_t>(Code::InvalidArgument) &&
                     code <= static_cast<int32_t>(Code::Comm);
  return known ? static_cast<Code>(code) : Code::Internal;
}

}  // namespace moert
