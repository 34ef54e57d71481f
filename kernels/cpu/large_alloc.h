// Host memory for moert's large, long-lived arrays (weight copies, working buffers): 64-byte
// aligned, and from at least kLargeAllocBytes on mapped from the kernel directly (mmap) and
// unmapped on release instead of going through malloc.
//
// Why: glibc serves a block of at least its mmap threshold (128 KiB at start) by mmap, and when
// it frees such a block it raises the threshold to that block's size (up to 32 MiB) and the trim
// threshold to twice that. A process that makes and frees sessions over a model, each taking
// copies of megabytes, so moves every later copy of that size into the heap, where freed ones
// stay as free memory the heap does not give back: a batcher create/free loop over
// serve_bench.moert wandered between 180 and 220 MB of RSS for 1 MB of live heap. A library must
// not set mallopt for its host, so moert keeps its own large blocks out of malloc: mapped here,
// they never move glibc's thresholds, and their pages go back to the kernel when freed.
//
// The line is 1 MiB: above it sit the weight copies (a tensor of all a layer's experts) and
// batch-sized working arrays, made once per session or batch size, for which a system call and
// the page-faults of fresh pages cost little next to filling them, and a mapping's rounding to
// pages wastes under 0.4%. Below it are frequent small arrays that the heap serves well; what
// they can still do to glibc's threshold is raise it below 1 MiB, which bounds what the heap can
// keep to blocks of that size.
#pragma once

#include <cstddef>

namespace moert::cpu {

inline constexpr size_t kLargeAllocBytes = size_t{1} << 20;

// Under AddressSanitizer every size comes from operator new: the sanitizer's allocator is not
// glibc's, and its redzones check the bounds of the large arrays too.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kLargeAllocMaps = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kLargeAllocMaps = false;
#else
inline constexpr bool kLargeAllocMaps = true;
#endif
#else
inline constexpr bool kLargeAllocMaps = true;
#endif

// `bytes` of memory aligned to 64 bytes (to a page from kLargeAllocBytes on), or null when it
// cannot be had. The contents are unspecified.
void* large_alloc(size_t bytes) noexcept;

// Releases what large_alloc(bytes) returned, with the same `bytes`. Null does nothing.
void large_free(void* p, size_t bytes) noexcept;

}  // namespace moert::cpu
