// Copies derived from a loaded model's weights that the inference sessions over the model share.
// No inference session writes the model's tensors (only a training session's own copy of the
// model changes), so a copy made from them stays exact for as long as the model lives, and every
// session of the process that would lay a weight out the same way can read one copy instead of
// keeping its own: a pool of N serving sessions then costs one copy, not N. The sessions hold a
// copy by shared_ptr and the cache only by weak_ptr, so the copy goes with the last session that
// reads it, and a later session makes it again.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "kernels/cpu/large_alloc.h"

namespace moert {

struct Tensor;

class SharedCopies {
 public:
  // How a copy lays the weight out. Within a process every CPU session lays a weight out the
  // same way for a kind (FP8 codes times their block scales; a plain transpose; oneDNN's
  // packed layout for the process's ISA; bf16 rounded to nearest even; E4M3 codes followed by
  // their block scales, fp32 or rounded up to powers of two), and the size is part of the key
  // besides.
  enum class Kind { DecodedF32, Transposed, PackedBf16, Bf16, Fp8, Fp8Ue8m0 };

  // The copy of `t` of `kind` and `bytes` bytes (64-byte aligned): the one a live session holds,
  // else a new one that `fill` writes. `fill` runs under the cache's lock, so concurrent session
  // creations make one copy. Returns null when the memory cannot be had; throws what `fill`
  // throws, and then keeps nothing. Thread-safe.
  std::shared_ptr<const void> get(const Tensor& t, Kind kind, size_t bytes,
                                  const std::function<void(void*)>& fill) {
    const std::lock_guard<std::mutex> lock(mu_);
    std::weak_ptr<const void>& slot = copies_[{&t, kind, bytes}];
    if (std::shared_ptr<const void> live = slot.lock()) return live;
    // Mapped, not taken from malloc, when large (large_alloc.h): a copy freed with the last
    // session that reads it gives its pages back.
    void* raw = cpu::large_alloc(bytes);
    if (!raw) return nullptr;
    // (Should the control block not be had, shared_ptr calls the deleter.)
    std::shared_ptr<void> made(raw, [bytes](void* p) { cpu::large_free(p, bytes); });
    fill(made.get());
    slot = made;
    return made;
  }

 private:
  std::mutex mu_;
  std::map<std::tuple<const Tensor*, Kind, size_t>, std::weak_ptr<const void>> copies_;
};

// A model's cache. A copy of a model (a training session's own, a quantized model) holds other
// tensors that may change, so it starts with an empty cache of its own; a model assigned over
// holds new values in the same tensors, so it drops its cache (sessions keep what they hold).
class SharedCopiesSlot {
 public:
  SharedCopiesSlot() : cache_(std::make_unique<SharedCopies>()) {}
  SharedCopiesSlot(const SharedCopiesSlot&) : SharedCopiesSlot() {}
  SharedCopiesSlot& operator=(const SharedCopiesSlot&) {
    cache_ = std::make_unique<SharedCopies>();
    return *this;
  }
  SharedCopies& get() const { return *cache_; }

 private:
  std::unique_ptr<SharedCopies> cache_;
};

}  // namespace moert
