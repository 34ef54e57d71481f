// Finds, loads and checks the CUDA plugin on the first CUDA session. The plugin stays loaded for
// the life of the process: backends and their kernels must never be unloaded under a session.
#include <dlfcn.h>

#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "core/cuda_plugin.h"
#include "core/error.h"
#include "moert/moert.h"

namespace moert {
namespace {

// The directory libmoert itself was loaded from.
std::string own_directory() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&own_directory), &info) == 0 || !info.dli_fname) return "";
  return std::filesystem::path(info.dli_fname).parent_path().string();
}

struct Plugin {
  std::mutex mu;
  std::string loaded_path;
  moert_cuda_plugin_create_fn create = nullptr;
};

Plugin& plugin() {
  static Plugin* p = new Plugin;  // never destroyed: the plugin is never unloaded
  return *p;
}

template <typename F>
F symbol(void* handle, const char* name, const std::string& path) {
  void* s = dlsym(handle, name);
  if (!s) fail(Code::Unsupported, "'", path, "' is not a moert CUDA plugin (no ", name, ")");
  return reinterpret_cast<F>(s);
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int32_t device, const std::string& plugin_path) {
  Plugin& p = plugin();
  std::lock_guard<std::mutex> lock(p.mu);
  std::string path = plugin_path;
  if (path.empty()) {
    const std::string dir = own_directory();
    path = (std::filesystem::path(dir.empty() ? "." : dir) / "libmoert_cuda.so").string();
  }
  if (!p.create) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle)
      fail(Code::Unsupported, "CUDA backend unavailable: cannot load '", path, "': ", dlerror(),
           " (CPU sessions are unaffected)");
    const auto abi = symbol<moert_cuda_plugin_abi_fn>(handle, "moert_cuda_plugin_abi", path);
    const auto version =
        symbol<moert_cuda_plugin_version_fn>(handle, "moert_cuda_plugin_version", path);
    if (abi() != kCudaPluginAbi || std::strcmp(version(), kPluginLibraryVersion) != 0)
      fail(Code::Unsupported, "CUDA plugin '", path, "' is version ", version(), " (plugin ABI ",
           abi(), "); this library is ", kPluginLibraryVersion, " (plugin ABI ", kCudaPluginAbi,
           ")");
    p.create = symbol<moert_cuda_plugin_create_fn>(handle, "moert_cuda_plugin_create", path);
    p.loaded_path = path;
  } else if (!plugin_path.empty() && plugin_path != p.loaded_path) {
    fail(Code::InvalidArgument, "the CUDA plugin is already loaded from '", p.loaded_path,
         "'; a process uses one plugin");
  }
  char message[512] = {0};
  int32_t code = static_cast<int32_t>(Code::Unsupported);
  Backend* be = p.create(device, &code, message, sizeof message);
  if (!be) {
    const bool known = code >= static_cast<int32_t>(Code::InvalidArgument) &&
                       code <= static_cast<int32_t>(Code::Internal);
    fail(known ? static_cast<Code>(code) : Code::Internal, "CUDA backend unavailable: ", message);
  }
  return std::unique_ptr<Backend>(be);
}

}  // namespace moert
