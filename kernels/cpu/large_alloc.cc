#include "kernels/cpu/large_alloc.h"

#include <sys/mman.h>

#include <new>

namespace moert::cpu {
namespace {

constexpr std::align_val_t kAlign{64};

bool mapped(size_t bytes) { return kLargeAllocMaps && bytes >= kLargeAllocBytes; }

}  // namespace

void* large_alloc(size_t bytes) noexcept {
  if (!mapped(bytes)) return ::operator new(bytes, kAlign, std::nothrow);
  // Anonymous private pages: zero-filled, page-aligned, reserved lazily as they are touched.
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

void large_free(void* p, size_t bytes) noexcept {
  if (!p) return;
  if (!mapped(bytes))
    ::operator delete(p, kAlign);
  else
    ::munmap(p, bytes);
}

}  // namespace moert::cpu
