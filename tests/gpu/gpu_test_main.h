// A GoogleTest main for GPU tests: where no usable GPU (or no CUDA plugin) is found the program
// says why and exits 77, which CTest reports as skipped; it never passes without running. Built
// against the simulated device (MOERT_DEVSIM), a missing backend is a failure: it is always there.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace moert_gpu_test {

// Returns an empty string when a CUDA session can be made, else the reason.
std::string gpu_unavailable_reason();

inline int run(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // Listing (CTest's test discovery at build time) needs no GPU.
  if (!::testing::GTEST_FLAG(list_tests)) {
    const std::string why = gpu_unavailable_reason();
    if (!why.empty()) {
#ifdef MOERT_DEVSIM
      std::printf("FAILED: the simulated device is unusable: %s\n", why.c_str());
      return 1;
#else
      std::printf("SKIPPED: no usable GPU: %s\n", why.c_str());
      return 77;
#endif
    }
  }
  return RUN_ALL_TESTS();
}

}  // namespace moert_gpu_test
