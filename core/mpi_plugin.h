// The contract between libmoert and its MPI plugin, libmoert_mpi.so: the only code of moert that
// includes mpi.h and links Open MPI. The plugin is built from the same sources and compiler as
// the core and hands back Communicator objects; the ABI number below changes whenever
// Communicator or this contract does, and the core refuses a plugin of another number or
// another library version.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/cuda_plugin.h"  // kPluginLibraryVersion

namespace moert {
class Communicator;
// 2: Communicator::device.
inline constexpr uint32_t kMpiPluginAbi = 2;
}  // namespace moert

#define MOERT_DEFINE_MPI_PLUGIN_IDENTITY()                                                       \
  extern "C" __attribute__((visibility("default"))) uint32_t moert_mpi_plugin_abi(void) {        \
    return moert::kMpiPluginAbi;                                                                 \
  }                                                                                              \
  extern "C" __attribute__((visibility("default"))) const char* moert_mpi_plugin_version(void) { \
    return moert::kPluginLibraryVersion;                                                         \
  }

extern "C" {
typedef uint32_t (*moert_mpi_plugin_abi_fn)(void);
typedef const char* (*moert_mpi_plugin_version_fn)(void);
// Creates a communicator over a duplicate of the host's MPI_Comm at `host_comm`, or of
// MPI_COMM_WORLD when it is null (initialising MPI first when nobody has). `timeout` bounds the
// creation and is the communicator's timeout; `max_message_bytes` (0: the plugin's default) caps
// one MPI message. On failure returns null, sets *code to a moert::Code value and writes a
// message (at most `message_len` bytes, NUL-terminated).
typedef moert::Communicator* (*moert_mpi_plugin_create_fn)(const void* host_comm, double timeout,
                                                           int64_t max_message_bytes, int32_t* code,
                                                           char* message, size_t message_len);
}
