// The CPU backend's memory (large_alloc.h): arrays from 1 MiB on are mapped from the kernel and
// unmapped when released, so that freeing them never raises glibc's mmap threshold and their
// pages leave the process at once; smaller ones come from the heap, 64-byte aligned as before.
// Running out still raises OutOfMemory where a Buffer is sized.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/buffer.h"
#include "core/error.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/large_alloc.h"
#include "tests/unit/sanitized.h"

namespace moert::cpu {
namespace {

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

// Whether every page of [p, p + bytes) is mapped (mincore fails with ENOMEM on unmapped ones),
// and how many of them are resident.
bool mapped(const void* p, size_t bytes, size_t* resident = nullptr) {
  const auto at = reinterpret_cast<uintptr_t>(p) / kPage * kPage;
  const size_t pages = (reinterpret_cast<uintptr_t>(p) + bytes - at + kPage - 1) / kPage;
  std::vector<unsigned char> in(pages);
  if (mincore(reinterpret_cast<void*>(at), pages * kPage, in.data()) != 0) {
    EXPECT_EQ(errno, ENOMEM);
    return false;
  }
  if (resident) {
    *resident = 0;
    for (unsigned char c : in) *resident += c & 1;
  }
  return true;
}

TEST(LargeAlloc, LargeIsMappedPageAlignedAndUnmappedOnRelease) {
  if (!kLargeAllocMaps) GTEST_SKIP() << "AddressSanitizer's allocator serves every size";
  for (size_t bytes : {kLargeAllocBytes, kLargeAllocBytes + 1, size_t{24} << 20}) {
    auto* p = static_cast<unsigned char*>(large_alloc(bytes));
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % kPage, 0u) << bytes;
    std::memset(p, 0x5a, bytes);
    EXPECT_EQ(p[bytes - 1], 0x5a);
    size_t resident = 0;
    ASSERT_TRUE(mapped(p, bytes, &resident));
    EXPECT_EQ(resident, (bytes + kPage - 1) / kPage) << "written pages are resident";
    large_free(p, bytes);
    EXPECT_FALSE(mapped(p, bytes)) << bytes << " bytes stayed mapped after release";
  }
}

TEST(LargeAlloc, SmallComeFromTheHeap64ByteAligned) {
  std::vector<std::pair<void*, size_t>> blocks;
  for (size_t bytes :
       {size_t{0}, size_t{1}, size_t{63}, size_t{4096}, size_t{200000}, kLargeAllocBytes - 1}) {
    void* p = large_alloc(bytes);
    ASSERT_NE(p, nullptr) << bytes;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << bytes;
    std::memset(p, 0x33, bytes);
    blocks.emplace_back(p, bytes);
  }
  for (auto [p, bytes] : blocks) large_free(p, bytes);
  large_free(nullptr, 0);
  large_free(nullptr, kLargeAllocBytes);
}

// A Buffer on the CPU backend: a smaller resize keeps the block, a larger one replaces it, and
// each release names the size the block was allocated with (the mapping goes, whole).
TEST(LargeAlloc, CpuBufferReleasesTheBlockItAllocated) {
  CpuBackend be(1, Precision::Fp32, Fp8Options{}, LayoutCopies::Auto);
  const size_t n = (size_t{8} << 20) / sizeof(float);
  Buffer<float> b(be, n);
  float* first = b.data();
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 64, 0u);
  std::memset(first, 0, n * sizeof(float));
  b.resize(be, n / 4);  // kept: same block, same capacity
  EXPECT_EQ(b.data(), first);
  EXPECT_EQ(b.capacity_bytes(), n * sizeof(float));
  b.resize(be, n + 1);  // replaced
  float* second = b.data();
  std::memset(second, 0, (n + 1) * sizeof(float));
  if (kLargeAllocMaps) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(second) % kPage, 0u);
    if (second != first) {
      EXPECT_FALSE(mapped(first, n * sizeof(float)));
    }
  }
  Buffer<float> small(be, 100);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(small.data()) % 64, 0u);
  small = std::move(b);  // the small block goes, the large one moves
  EXPECT_EQ(small.data(), second);
  small.clear();
  if (kLargeAllocMaps) {
    EXPECT_FALSE(mapped(second, (n + 1) * sizeof(float)));
  }
}

TEST(LargeAlloc, AnAbsurdSizeIsOutOfMemory) {
#ifdef MOERT_TEST_SANITIZED
  GTEST_SKIP() << "the sanitizers' allocators abort on an absurd size";
#else
  const size_t absurd = size_t{1} << 60;
  EXPECT_EQ(large_alloc(absurd), nullptr);
  CpuBackend be(1, Precision::Fp32, Fp8Options{}, LayoutCopies::Auto);
  try {
    Buffer<float> b(be, absurd / sizeof(float));
    ADD_FAILURE() << "an exabyte was allocated";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::OutOfMemory);
  }
  Buffer<float> after(be, (size_t{2} << 20) / sizeof(float));  // and the backend goes on
  EXPECT_NE(after.data(), nullptr);
#endif
}

}  // namespace
}  // namespace moert::cpu
