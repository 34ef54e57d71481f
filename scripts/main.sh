#!/usr/bin/env bash
# The main job: install what is missing, build moert, and run the C example, which loads
# examples/models/tiny_moe.moert, runs a forward pass and prints the per-expert loads.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cmake --preset release
cmake --build --preset release
build/release/examples/c/moert_example_c examples/models/tiny_moe.moert "$@"
