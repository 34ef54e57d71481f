// Finds, loads and checks the MPI plugin on the first MPI communicator. The plugin stays loaded
// for the life of the process: its progress thread and MPI itself live there.
#include <dlfcn.h>

#include <cstring>
#include <mutex>
#include <string>

#include "core/comm_support.h"
#include "core/communicator.h"
#include "core/error.h"
#include "core/mpi_plugin.h"
#include "core/plugin_path.h"

namespace moert {
namespace {

struct MpiPlugin {
  std::mutex mu;
  std::string loaded_path;
  moert_mpi_plugin_create_fn create = nullptr;
};

MpiPlugin& mpi_plugin() {
  static MpiPlugin* p = new MpiPlugin;  // never destroyed: the plugin is never unloaded
  return *p;
}

template <typename F>
F symbol(void* handle, const char* name, const std::string& path) {
  void* s = dlsym(handle, name);
  if (!s) fail(Code::Unsupported, "'", path, "' is not a moert MPI plugin (no ", name, ")");
  return reinterpret_cast<F>(s);
}

moert_mpi_plugin_create_fn load(const std::string& plugin_path) {
  MpiPlugin& p = mpi_plugin();
  std::lock_guard<std::mutex> lock(p.mu);
  bool found = true;
  const std::string path =
      plugin_path.empty() ? find_plugin("libmoert_mpi.so", &found) : plugin_path;
  if (!p.create) {
    if (!found)
      fail(Code::Unsupported, "MPI communicators unavailable: no MPI plugin beside libmoert (",
           plugin_search_text("libmoert_mpi.so"),
           "): moert was built without Open MPI, or the plugin was not installed with it");
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle)
      fail(Code::Unsupported, "MPI communicators unavailable: cannot load '", path,
           "': ", dlerror(), " (are Open MPI's libraries installed?)");
    const auto abi = symbol<moert_mpi_plugin_abi_fn>(handle, "moert_mpi_plugin_abi", path);
    const auto version =
        symbol<moert_mpi_plugin_version_fn>(handle, "moert_mpi_plugin_version", path);
    if (abi() != kMpiPluginAbi || std::strcmp(version(), kPluginLibraryVersion) != 0)
      fail(Code::Unsupported, "MPI plugin '", path, "' is version ", version(), " (plugin ABI ",
           abi(), "); this library is ", kPluginLibraryVersion, " (plugin ABI ", kMpiPluginAbi,
           ")");
    p.create = symbol<moert_mpi_plugin_create_fn>(handle, "moert_mpi_plugin_create", path);
    p.loaded_path = path;
  } else if (!plugin_path.empty() && !same_file(plugin_path, p.loaded_path)) {
    fail(Code::InvalidArgument, "the MPI plugin is already loaded from '", p.loaded_path,
         "'; a process uses one plugin");
  }
  return p.create;
}

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(const void* host_comm,
                                                    const MpiCommOptions& options) {
  comm::check_timeout(options.timeout);
  const auto create = load(options.plugin_path);
  char message[1024] = {0};
  int32_t code = static_cast<int32_t>(Code::Internal);
  Communicator* c =
      create(host_comm, options.timeout, options.max_message_bytes, &code, message, sizeof message);
  if (!c) fail(plugin_code(code), message);
  return std::unique_ptr<Communicator>(c);
}

}  // namespace moert
