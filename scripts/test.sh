#!/usr/bin/env bash
# Every test: install what is missing, build and run the whole suite, then build again with
# AddressSanitizer and UndefinedBehaviorSanitizer and run the C++ and C ABI tests under them, then
# the C ABI's handle and concurrency tests under ThreadSanitizer, then every fuzz target for a
# bounded time under ASan and UBSan (clang-14, libFuzzer).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cmake --workflow --preset release
cmake --workflow --preset asan
cmake --workflow --preset tsan
cmake --workflow --preset fuzz
echo "test.sh: all suites passed"
