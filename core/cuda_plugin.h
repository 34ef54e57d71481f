// The contract between libmoert and its CUDA plugin, libmoert_cuda.so. The plugin is built from
// the same sources and compiler as the core and hands back a Backend object; the ABI number below
// changes whenever Backend or this contract does, and the core refuses a plugin of another number
// or another library version.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moert/moert.h"

#define MOERT_PLUGIN_STR2(x) #x
#define MOERT_PLUGIN_STR(x) MOERT_PLUGIN_STR2(x)

namespace moert {
class Backend;
class Communicator;
// 3: NCCL communicators (moert_cuda_plugin_nccl_*).
// 4: FP8 in Backend (Weight::fp8, fp8_experts, quantize_weight_blocks); create takes the precision.
// 5: Backend::native_stream (device communicators start after the backend's queued work).
// 6: Communicator::device (a session checks that its NCCL communicator is on its own GPU).
// 7: layout copies: Weight::f32t and bf16_packed, Backend::transposed_copies, transpose_matrices,
//    packed_bf16_bytes, pack_bf16.
// 9: Backend::route_expert_choice takes the row window its plan keeps.
// 10: Backend::work_bytes and release_work.
// 11: Backend::kept_rows_stride; the routed experts' kept rows carry their row stride.
// 12: combine_backward's outputs may be null (each skipped); Backend::zero_many and
//     any_nonfinite_many.
// 13: Backend::routed_and_shared_ffn and SharedExpert.
inline constexpr uint32_t kCudaPluginAbi = 13;
// The library version a plugin must have been built with, "major.minor.patch".
inline constexpr const char* kPluginLibraryVersion =
    MOERT_PLUGIN_STR(MOERT_VERSION_MAJOR) "." MOERT_PLUGIN_STR(
        MOERT_VERSION_MINOR) "." MOERT_PLUGIN_STR(MOERT_VERSION_PATCH);
}  // namespace moert

// Defines a plugin's two identity functions (ABI number and library version) in the file that
// defines its moert_cuda_plugin_create.
#define MOERT_DEFINE_CUDA_PLUGIN_IDENTITY()                                                       \
  extern "C" __attribute__((visibility("default"))) uint32_t moert_cuda_plugin_abi(void) {        \
    return moert::kCudaPluginAbi;                                                                 \
  }                                                                                               \
  extern "C" __attribute__((visibility("default"))) const char* moert_cuda_plugin_version(void) { \
    return moert::kPluginLibraryVersion;                                                          \
  }

extern "C" {
// The plugin ABI number and the library version the plugin was built with.
typedef uint32_t (*moert_cuda_plugin_abi_fn)(void);
typedef const char* (*moert_cuda_plugin_version_fn)(void);
// Creates a backend on CUDA device `device` whose experts multiply in `precision` (a
// moert::Precision value; fp8_power_of_two_scales: Fp8Options); on failure returns null, sets
// *code to a moert::Code value (a bad device index is InvalidArgument, no usable GPU or a
// precision the plugin does not run Unsupported, no memory OutOfMemory) and writes a message (at
// most `message_len` bytes, NUL-terminated) into `message`.
typedef moert::Backend* (*moert_cuda_plugin_create_fn)(int32_t device, int32_t precision,
                                                       int32_t fp8_power_of_two_scales,
                                                       int32_t* code, char* message,
                                                       size_t message_len);
// NCCL (optional: a plugin without these two has no NCCL). Writes a fresh NCCL unique id of
// `len` bytes (kNcclUniqueIdBytes) into `out`; returns 0, or a moert::Code value and a message.
typedef int32_t (*moert_cuda_plugin_nccl_unique_id_fn)(uint8_t* out, size_t len, char* message,
                                                       size_t message_len);
// Creates the NCCL communicator of rank `rank` of `size` on CUDA device `device` from the id
// every rank passes; collective; `timeout` bounds the creation and is the communicator's
// timeout. On failure returns null, with *code and a message as above.
typedef moert::Communicator* (*moert_cuda_plugin_nccl_create_fn)(const uint8_t* id, size_t id_len,
                                                                 int32_t rank, int32_t size,
                                                                 int32_t device, double timeout,
                                                                 int32_t* code, char* message,
                                                                 size_t message_len);
}
