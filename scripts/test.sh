#!/usr/bin/env bash
# Every test: install what is missing, build and run the whole suite, then build again with
# AddressSanitizer and UndefinedBehaviorSanitizer and run the C++ and C ABI tests under them, then
# the C ABI's handle and concurrency tests under ThreadSanitizer, then every fuzz target for a
# bounded time under ASan and UBSan (clang-14, libFuzzer).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage's wall time is printed as it ends, to keep the whole under its budget (30 minutes
# on 2 cores) in view.
stage() {
  local start=$SECONDS
  "$@"
  echo "test.sh: '$*' took $((SECONDS - start)) s (total $SECONDS s)"
}
stage scripts/install-deps.sh
stage cmake --workflow --preset release
stage cmake --workflow --preset asan
stage cmake --workflow --preset tsan
stage cmake --workflow --preset fuzz
echo "test.sh: all suites passed in $SECONDS s"
