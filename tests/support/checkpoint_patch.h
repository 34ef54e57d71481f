// Rewrites the content digest of a checkpoint description in place. Tests and the fuzzer change
// checkpoints on purpose, as a crafted file would, and need them to pass the integrity check so
// that what follows it is exercised.
#pragma once

#include <cstdint>
#include <cstring>

#include "moert_generated.h"

namespace moert_test {

// The verified description at `bytes` (8-byte aligned, writable) gets `digest` as its
// content_digest. False when it has no training state or no content_digest field to rewrite.
inline bool set_content_digest(uint8_t* bytes, uint64_t digest) {
  const moert::fb::TrainingState* t = moert::fb::GetModel(bytes)->training();
  if (!t) return false;
  // The generated table derives privately from flatbuffers::Table, at the same address.
  const auto* table = reinterpret_cast<const flatbuffers::Table*>(t);
  const uint8_t* field = table->GetAddressOf(moert::fb::TrainingState::VT_CONTENT_DIGEST);
  if (!field) return false;
  std::memcpy(const_cast<uint8_t*>(field), &digest, sizeof digest);
  return true;
}

}  // namespace moert_test
