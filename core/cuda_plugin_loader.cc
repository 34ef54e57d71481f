// Finds, loads and checks the CUDA plugin on the first CUDA session or NCCL communicator. The
// plugin stays loaded for the life of the process: backends and their kernels must never be
// unloaded under a session.
#include <dlfcn.h>

#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "core/comm_support.h"
#include "core/communicator.h"
#include "core/cuda_plugin.h"
#include "core/error.h"
#include "core/plugin_path.h"
#include "moert/moert.h"

namespace moert {
namespace {

struct Plugin {
  std::mutex mu;
  std::string loaded_path;
  moert_cuda_plugin_create_fn create = nullptr;
  moert_cuda_plugin_nccl_unique_id_fn nccl_unique_id = nullptr;  // null: built without NCCL
  moert_cuda_plugin_nccl_create_fn nccl_create = nullptr;
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

// The CUDA runtime reaches a GPU only through the NVIDIA driver's libcuda.so.1, which it loads
// itself. Without it no device is usable, and loading the CUDA plugin (a file named
// libmoert_cuda.so*, which links cuBLASLt) would cost the process about 150 MB of resident memory
// for good, only for the runtime to say "CUDA driver version is insufficient". So the driver is
// looked for first, as the runtime would; another plugin (a test's simulated device) is loaded
// as it is. The driver, once loaded, stays: the runtime would load it anyway.
void require_driver(const std::string& plugin) {
  std::error_code ec;
  const std::filesystem::path real = std::filesystem::canonical(plugin, ec);  // through links
  if (!(ec ? std::filesystem::path(plugin) : real)
           .filename()
           .string()
           .starts_with("libmoert_cuda.so"))
    return;
  if (dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL)) return;
  const char* why = dlerror();
  fail(Code::Unsupported, "CUDA backend unavailable: no NVIDIA driver on this machine (",
       why ? why : "libcuda.so.1 not found",
       "), so no GPU can be used; the CUDA plugin was not loaded (CPU sessions are unaffected)");
}

// The loaded plugin, loading it from `plugin_path` (empty: beside libmoert.so) the first time.
Plugin& load(const std::string& plugin_path) {
  Plugin& p = plugin();
  std::lock_guard<std::mutex> lock(p.mu);
  bool found = true;
  const std::string path =
      plugin_path.empty() ? find_plugin("libmoert_cuda.so", &found) : plugin_path;
  if (!p.create) {
    if (!found)
      fail(Code::Unsupported, "CUDA backend unavailable: no CUDA plugin beside libmoert (",
           plugin_search_text("libmoert_cuda.so"),
           "): moert was built without CUDA, or the plugin was not installed with it (CPU "
           "sessions are unaffected)");
    require_driver(path);
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
    p.nccl_unique_id = reinterpret_cast<moert_cuda_plugin_nccl_unique_id_fn>(
        dlsym(handle, "moert_cuda_plugin_nccl_unique_id"));
    p.nccl_create = reinterpret_cast<moert_cuda_plugin_nccl_create_fn>(
        dlsym(handle, "moert_cuda_plugin_nccl_create"));
    p.loaded_path = path;
  } else if (!plugin_path.empty() && !same_file(plugin_path, p.loaded_path)) {
    fail(Code::InvalidArgument, "the CUDA plugin is already loaded from '", p.loaded_path,
         "'; a process uses one plugin");
  }
  return p;
}

Plugin& load_nccl(const std::string& plugin_path) {
  Plugin& p = load(plugin_path);
  if (!p.nccl_unique_id || !p.nccl_create)
    fail(Code::Unsupported, "the CUDA plugin '", p.loaded_path,
         "' has no NCCL (it was built without it)");
  return p;
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int32_t device, const std::string& plugin_path,
                                           Precision experts, Fp8Options fp8) {
  Plugin& p = load(plugin_path);
  char message[512] = {0};
  int32_t code = static_cast<int32_t>(Code::Unsupported);
  Backend* be = p.create(device, static_cast<int32_t>(experts), fp8.power_of_two_scales ? 1 : 0,
                         &code, message, sizeof message);
  if (!be) fail(plugin_code(code), "CUDA backend unavailable: ", message);
  return std::unique_ptr<Backend>(be);
}

void nccl_unique_id(uint8_t* out, const std::string& plugin_path) {
  if (!out) fail(Code::InvalidArgument, "the NCCL unique id buffer is null");
  Plugin& p = load_nccl(plugin_path);
  char message[512] = {0};
  const int32_t code = p.nccl_unique_id(out, kNcclUniqueIdBytes, message, sizeof message);
  if (code != 0) fail(plugin_code(code), "NCCL unique id: ", message);
}

std::unique_ptr<Communicator> make_nccl_communicator(const uint8_t* id, int32_t rank, int32_t size,
                                                     int32_t device, double timeout,
                                                     const std::string& plugin_path) {
  if (!id) fail(Code::InvalidArgument, "the NCCL unique id is null");
  if (size < 1) fail(Code::InvalidArgument, "an NCCL communicator needs size >= 1, got ", size);
  if (rank < 0 || rank >= size)
    fail(Code::InvalidArgument, "rank ", rank, " is not in [0, ", size, ")");
  if (device < 0) fail(Code::InvalidArgument, "CUDA device ", device, " is negative");
  comm::check_timeout(timeout);
  Plugin& p = load_nccl(plugin_path);
  char message[1024] = {0};
  int32_t code = static_cast<int32_t>(Code::Internal);
  Communicator* c = p.nccl_create(id, kNcclUniqueIdBytes, rank, size, device, timeout, &code,
                                  message, sizeof message);
  if (!c) fail(plugin_code(code), "NCCL communicator: ", message);
  return std::unique_ptr<Communicator>(c);
}

}  // namespace moert
