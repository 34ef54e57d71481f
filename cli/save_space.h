// Whether `moert train --save DIR` has room for the checkpoints its runs will write, asked before
// any training: a run refused at its end on a full disk has lost all its training.
#pragma once

#include <moert/moert.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moert_cli {

// The most bytes a checkpoint of a training session over `model` takes on disk (moert_session_save
// under AdamW, description and data file together): the bound moert.h sets on what a checkpoint's
// load may read, four fp32 arrays per parameter and bias (values, gradients, two moments, whatever
// precision the model stores) plus the balancing counts, 1 MiB and 4 KiB per tensor for the
// description. Every MoE layer is counted with a loss-free bias, which only some policies have, so
// that one bound serves every run of `train`.
uint64_t checkpoint_bytes_bound(const moert_model* model);

// One checkpoint a run will save.
struct PlannedSave {
  std::string path;
  uint64_t bytes = 0;     // at most (checkpoint_bytes_bound)
  uint64_t replaces = 0;  // what the checkpoint there now takes: freed once the new one is written
};

// The most bytes `saves`, made one after the other, hold at once beyond what DIR holds now: each
// writes its checkpoint whole before it removes the one it replaces.
uint64_t bytes_needed(const std::vector<PlannedSave>& saves);

// Throws Error naming `dir` and both figures when `free` bytes cannot hold what `saves` need.
void refuse_saves_past(const std::string& dir, uint64_t free,
                       const std::vector<PlannedSave>& saves);

// The bytes this process may still write into the file system of `dir` (statvfs: the blocks
// available to an unprivileged user), or nothing when it does not say.
std::optional<uint64_t> free_bytes(const std::string& dir);

}  // namespace moert_cli
