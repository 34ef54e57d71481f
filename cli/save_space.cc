#include "cli/save_space.h"

#include <sys/statvfs.h>

#include <algorithm>
#include <cstdio>

#include "cli/error.h"
#include "cli/library.h"

namespace moert_cli {

namespace {

std::string human_bytes(uint64_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  if (b >= 1024.0 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1024.0 * 1024 * 1024));
  else
    std::snprintf(buf, sizeof buf, "%.2f MiB", b / (1024.0 * 1024));
  return buf;
}

}  // namespace

uint64_t checkpoint_bytes_bound(const moert_model* model) {
  uint32_t layers = 0;
  check(moert_model_num_layers(model, &layers), "model");
  uint64_t values = 0, tensors = 0;
  for (uint32_t i = 0; i < layers; ++i) {
    uint32_t n = 0;
    check(moert_model_num_tensors(model, i, &n), "model");
    for (uint32_t k = 0; k < n; ++k) {
      const char* field = nullptr;
      uint64_t numel = 0;
      check(moert_model_tensor_info(model, i, k, &field, nullptr, nullptr, &numel, nullptr),
            "model");
      // The bias is counted below for every MoE layer, present or not.
      if (std::string(field) == "gate_bias") continue;
      values += numel;
      ++tensors;
    }
    int32_t kind = 0;
    check(moert_model_layer_kind(model, i, &kind), "model");
    if (kind == MOERT_LAYER_MOE) {
      // The bias, and the two balancing counts a checkpoint keeps per expert.
      values += 3 * static_cast<uint64_t>(moe_int(model, i, MOERT_MOE_NUM_EXPERTS));
      ++tensors;
    }
  }
  return 4 * values * sizeof(float) + (uint64_t{1} << 20) + 4096 * tensors;
}

uint64_t bytes_needed(const std::vector<PlannedSave>& saves) {
  // Held at once during save k: every checkpoint written so far, less those that the earlier
  // saves replaced and removed; the one save k replaces goes only after it.
  uint64_t held = 0, freed = 0, peak = 0;
  for (const PlannedSave& s : saves) {
    held += s.bytes;
    peak = std::max(peak, held > freed ? held - freed : 0);
    freed += s.replaces;
  }
  return peak;
}

void refuse_saves_past(const std::string& dir, uint64_t free,
                       const std::vector<PlannedSave>& saves) {
  const uint64_t need = bytes_needed(saves);
  if (free >= need) return;
  const bool one = saves.size() == 1;
  fail("--save: '", dir, "' has ", free, " bytes free (", human_bytes(free), ") but ",
       one ? "the checkpoint" : cat("the ", saves.size(), " checkpoints"), " of this run need",
       one ? "s" : "", " up to ", need, " (", human_bytes(need),
       ": parameters, gradients and two optimizer moments in fp32): free space or save elsewhere");
}

std::optional<uint64_t> free_bytes(const std::string& dir) {
  struct statvfs st {};
  if (statvfs(dir.c_str(), &st) != 0 || st.f_frsize == 0) return std::nullopt;
  return static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
}

}  // namespace moert_cli
