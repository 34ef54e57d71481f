// Writes checkpoints: a binary model description with a training-state table and, beside it when
// the content holds large arrays, an aligned external data file. The bytes of both depend on the
// content alone (never on the compiler, the thread count or the previous file).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/content_digest.h"
#include "core/model.h"

namespace moert {

// Arrays (tensors and optimizer-state vectors) of at least this many bytes go to the external data
// file, at offsets aligned to kExternalAlignment; smaller ones stay inline in the description.
inline constexpr uint64_t kExternalMinBytes = uint64_t{64} << 10;
inline constexpr uint64_t kExternalAlignment = 64;

// Writes the checkpoint of `model` with `state` at `path`, atomically across both files:
//  1. the data file (when needed) goes to a temporary file, is fsync'ed and renamed to
//     "<file name>.<digest as 16 hex digits>.data" beside `path` (a name that only this content
//     has, so the rename never replaces the data of another checkpoint);
//  2. the description goes to a temporary file, is fsync'ed and renamed over `path`; the
//     directory is fsync'ed after each rename;
//  3. data files "<file name>.<16 hex digits>.data" of earlier saves to `path` that no other
//     description in the directory names (a copy of an earlier one does), and temporary files of
//     earlier saves to `path`, are removed.
// A process killed at any point leaves at `path` either the previous checkpoint, whole, or the new
// one. Saves into one directory take turns (an flock on it), so concurrent writers to one path
// each succeed and leave one whole checkpoint. Throws Error(Io) when a file cannot be written (the
// previous checkpoint is then intact), Error(Unsupported) when the description itself would exceed
// the 2 GiB of a FlatBuffers buffer, Error(Numeric) before writing anything when a value it would
// hold is a NaN or an infinity (which the loader refuses), Error(InvalidArgument) when `path` names
// something other than a regular file.
void write_checkpoint(const std::string& path, const Model& model, const TrainingStateView& state);

// Writes `model` as a model file (a checkpoint without training state) at `path`, as
// write_checkpoint writes one: the same atomic steps, the data file named by the model's content
// digest. Tensors are written as the model holds them: fp32 values as F32, resident FP8 ones as
// F8E4M3 with their 128x128 block scales, byte for byte as they were read.
void write_model(const std::string& path, const Model& model);

// Writes bytes to path atomically: a temporary file in the same directory, fsync, rename over the
// destination, fsync of the directory. On any failure the destination is untouched; the error
// names the file as a `kind` ("checkpoint", "model").
void write_file_atomically(const std::string& path, const std::vector<uint8_t>& bytes,
                           const char* kind);

}  // namespace moert
