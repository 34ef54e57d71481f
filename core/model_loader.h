// Turns an untrusted model description into a validated Model, or throws Error(InvalidModel / Io /
// Limit) naming the layer and field at fault.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/model.h"

namespace moert {

// What a load may cost, checked before anything is allocated or read (moert_load_options).
struct LoadOptions {
  // A few hundred bytes of description can ask for gigabytes of initialised weights: by default a
  // model may hold 1 GiB of tensors and a load may read 4 GiB.
  static constexpr uint64_t kDefaultMaxMemory = uint64_t{1} << 30;
  static constexpr uint64_t kDefaultMaxFileBytes = uint64_t{4} << 30;

  // Bytes the loaded model may hold: every tensor as it is held (Model::resident_bytes: FP8 in
  // 128x128 blocks as its codes and scales, everything else as the fp32 it is decoded or
  // initialised to), whatever its source, plus a checkpoint's training state when a session loads
  // it (whose weights are decoded to fp32). Never more than the machine's physical memory.
  uint64_t max_memory = kDefaultMaxMemory;
  // Bytes a load may read: the description plus the ranges of external data it uses.
  uint64_t max_file_bytes = kDefaultMaxFileBytes;
  // When set, the external data file must be reached without leaving the model's directory
  // (open_confined below; moert.h says how): a link there could otherwise make any readable file
  // the weights. Off by default: content stores (the Hugging Face cache, git-annex, DVC) link
  // every file from elsewhere. A file reached by a way out is Code::InvalidModel, as a ".." in
  // its name is.
  bool confine_external_data = false;
  // When set, the description alone is loaded and checked: no tensor is read, decoded or
  // initialised and the external data file is not opened, so the limits do not apply beyond the
  // description's own size. The model (Model::description_only) answers every question about its
  // layers, shapes, parameter counts and the bytes its tensors would hold, and refuses to run,
  // train, save or quantize. A checkpoint shows its step and balancing state; its digest, which
  // covers the weights, is not verified.
  bool description_only = false;
};

// The machine's physical memory in bytes (max_memory's ceiling); UINT64_MAX when unknown.
uint64_t physical_memory_bytes();

// Loads a binary model file; external weights resolve against the file's directory. A checkpoint
// loads as a model: its training state is verified against its digest, then dropped. F8E4M3
// tensors in 128x128 blocks stay FP8 (Tensor::fp8); every other stored type is decoded to fp32.
std::shared_ptr<const Model> load_model_file(const std::string& path,
                                             const LoadOptions& options = {});

// Loads from memory; external weights resolve against external_dir (empty: none allowed).
std::shared_ptr<const Model> load_model_buffer(const void* data, size_t size,
                                               const std::string& external_dir,
                                               const LoadOptions& options = {});

// Loads a checkpoint with its training state, verified; throws Error(InvalidArgument) for a model
// file without one. Every tensor is decoded to fp32 (a session's master weights).
std::unique_ptr<Model> load_checkpoint_file(const std::string& path, const LoadOptions& options);

// Opens the directory `root` for open_confined (O_PATH), or fails (Io). The caller closes it.
int open_directory(const std::string& root);

// Opens the external data file `rel` of the directory `dir` (from open_directory; `root` its name,
// for messages) for a load under LoadOptions::confine_external_data: with openat2's
// RESOLVE_BENEATH (Linux 5.6), which refuses any step of the resolution out of the directory
// before anything outside is opened (retried while renames elsewhere race it, then Error(Io));
// where the kernel or a sandbox refuses openat2, or `use_openat2` is false (tests), it opens the
// file relative to `dir` and refuses it unless /proc/self/fd shows it inside. The process's root
// directory confines nothing. A file reached by a way out is Error(InvalidModel). Returns the
// descriptor of the regular file, its size in *size.
int open_confined(int dir, const std::string& root, const std::string& rel, uint64_t* size,
                  bool use_openat2);
// As above, opening `root` for the call.
int open_confined(const std::string& root, const std::string& rel, uint64_t* size,
                  bool use_openat2);

// For fuzzing and tests only: the content digest of the checkpoint description in `data`
// (external data resolved against external_dir), computed as the loader does but not compared
// with the one the file holds. Throws what loading would throw for any other defect.
uint64_t recompute_checkpoint_digest(const void* data, size_t size, const std::string& external_dir,
                                     const LoadOptions& options);

}  // namespace moert
