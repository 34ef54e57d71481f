// Room left for oneDNN's kernel set-up under the process's memory limits. oneDNN (2.6) does not
// survive running out of memory while it sets up kernels: it then crashes the host process
// (SIGSEGV in the fp32 GEMMs' set-up, which needs about 18 MiB, measured under RLIMIT_AS and
// RLIMIT_DATA with 16 MiB left or less; in a bf16 matmul primitive's creation with a few MiB left)
// instead of failing. So before such a set-up its callers (the CPU backend, `moert bench`'s GEMM
// comparison) ask for kJitRoom under the limits on the address space (`ulimit -v`) and on data
// (`ulimit -d`). Best effort: another thread may take the room between the check and oneDNN's
// allocations. Header-only: the moert command links only the public library.
#pragma once

#include <sys/resource.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <optional>

namespace moert::cpu {

inline constexpr uint64_t kJitRoom = uint64_t{32} << 20;

struct MemoryRoom {
  uint64_t left = 0;            // bytes
  const char* limit = nullptr;  // which limit leaves it, as a user would name it
};

// The least room any set limit leaves, or nullopt when no limit is set or the process's usage
// cannot be read (/proc/self/statm): no check then.
inline std::optional<MemoryRoom> memory_room() {
  rlimit as{}, data{};
  const bool as_limited = ::getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY;
  const bool data_limited = ::getrlimit(RLIMIT_DATA, &data) == 0 && data.rlim_cur != RLIM_INFINITY;
  if (!as_limited && !data_limited) return std::nullopt;
  // statm: the address space's size and its data (with the stack), in pages.
  std::FILE* f = std::fopen("/proc/self/statm", "re");
  if (!f) return std::nullopt;
  unsigned long long size = 0, resident = 0, shared = 0, text = 0, lib = 0, data_pages = 0;
  const bool read = std::fscanf(f, "%llu %llu %llu %llu %llu %llu", &size, &resident, &shared,
                                &text, &lib, &data_pages) == 6;
  std::fclose(f);
  if (!read) return std::nullopt;
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  std::optional<MemoryRoom> least;
  auto consider = [&](const rlimit& l, unsigned long long pages, const char* limit) {
    const uint64_t used = pages * page;
    const uint64_t left = l.rlim_cur > used ? l.rlim_cur - used : 0;
    if (!least || left < least->left) least = MemoryRoom{left, limit};
  };
  if (as_limited) consider(as, size, "address-space limit (RLIMIT_AS, ulimit -v)");
  if (data_limited) consider(data, data_pages, "data limit (RLIMIT_DATA, ulimit -d)");
  return least;
}

}  // namespace moert::cpu
