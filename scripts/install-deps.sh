#!/usr/bin/env bash
# Installs the Debian packages moert builds and tests with, skipping those already present.
# Needs root (or sudo) and apt-get. Safe to run again.
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config
  libgtest-dev                                  # C++ and C ABI tests
  flatbuffers-compiler libflatbuffers-dev       # the model schema
  libdnnl-dev                                   # oneDNN: the CPU GEMMs, fp32 and bf16 (cmake/MoertBlas.cmake)
  libxxhash-dev                                 # XXH3, the checkpoint content digest (header-only use)
  nlohmann-json3-dev                            # safetensors headers and config.json (moert import/export)
  python3 python3-numpy python3-torch           # the PyTorch oracles and benchmarks
  fortunes                                      # English text for the balancing experiment
  python3-matplotlib                            # the experiment's MaxVio plot (PNG)
  swig                                          # generates the Go and Java layers (bindings/swig)
  golang-go                                     # the Go binding and the Go service example
  curl                                          # the README's service steps, run as tests
  openjdk-17-jdk-headless junit5                # the Java binding (javac, jar, JNI headers), JUnit 5
  bindgen libclang1-14 libclang-common-14-dev   # checks the committed Rust bindings; bindgen
                                                # loads libclang at run time without depending on it
  clang-14 libclang-rt-14-dev                   # libFuzzer targets under ASan/UBSan (the fuzz preset)
  libopenmpi-dev openmpi-bin                    # the MPI plugin libmoert_mpi.so and its mpirun tests
)
# Rust: cargo and rustc come from the toolchain in ~/.cargo/bin, not from Debian; the crates
# have no dependencies and build offline. Without cargo the Rust tests report themselves skipped.

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
