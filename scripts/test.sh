#!/usr/bin/env bash
# Every test: install what is missing, build and run the whole suite, then build again with
# AddressSanitizer and UndefinedBehaviorSanitizer and run the C++ and C ABI tests under them.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cmake --workflow --preset release
cmake --workflow --preset asan
echo "test.sh: all suites passed"
