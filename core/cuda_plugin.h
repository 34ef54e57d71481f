// The contract between libmoert and its CUDA plugin, libmoert_cuda.so. The plugin is built from
// the same sources and compiler as the core and hands back a Backend object; the ABI number below
// changes whenever Backend or this contract does, and the core refuses a plugin of another number
// or another library version.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moert {
class Backend;
inline constexpr uint32_t kCudaPluginAbi = 2;
}  // namespace moert

extern "C" {
// The plugin ABI number and the library version the plugin was built with.
typedef uint32_t (*moert_cuda_plugin_abi_fn)(void);
typedef const char* (*moert_cuda_plugin_version_fn)(void);
// Creates a backend on CUDA device `device`; on failure returns null, sets *code to a moert::Code
// value (a bad device index is InvalidArgument, no usable GPU Unsupported, no memory OutOfMemory)
// and writes a message (at most `message_len` bytes, NUL-terminated) into `message`.
typedef moert::Backend* (*moert_cuda_plugin_create_fn)(int32_t device, int32_t* code, char* message,
                                                       size_t message_len);
}
