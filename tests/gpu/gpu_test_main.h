// A GoogleTest main for GPU tests: where no usable GPU (or no CUDA plugin) is found the program
// says why and exits 77, which CTest reports as skipped; it never passes without running.
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
      std::printf("SKIPPED: no usable GPU: %s\n", why.c_str());
      return 77;
    }
  }
  return RUN_ALL_TESTS();
}

}  // namespace moert_gpu_test
