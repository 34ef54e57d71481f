#!/usr/bin/env bash
# Where libmoert finds its plugins in layouts a packager or a service makes of an install:
#   plugin_lookup.sh PREFIX WORKDIR CC
# - a runtime package: the files under their SONAMEs only, no unversioned development links;
# - a relative LD_LIBRARY_PATH entry, with the host changing directory before its first call;
# - libmoert reached through a symbolic link in another directory (the plugin beside the real
#   file);
# - no plugin at all: the error says which files were looked for.
# Each case runs the probe (plugin_probe.c), which creates an MPI communicator of one rank.
set -euo pipefail
prefix=$1 work=$2 cc=$3
here=$(cd "$(dirname "$0")" && pwd)
libdir=$(dirname "$(find "$prefix" -name 'libmoert.so' -print -quit)")
rm -rf "$work" && mkdir -p "$work"
"$cc" -std=c11 -Wall -Wextra -Werror -I"$prefix/include" -o "$work/probe" "$here/plugin_probe.c" \
  -L"$libdir" -lmoert
unset LD_LIBRARY_PATH
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

runtime=$work/runtime
mkdir -p "$runtime"
real=$(readlink -f "$libdir/libmoert.so.1")
cp "$real" "$runtime/"
ln -s "$(basename "$real")" "$runtime/libmoert.so.1"
cp "$libdir/libmoert_mpi.so.1" "$runtime/"
failures=0
expect() {  # expect LABEL PATTERN command...
  local label=$1 pattern=$2 out
  shift 2
  out=$("$@" 2>&1) || true
  echo "$label: $out"
  if ! grep -Eq "$pattern" <<<"$out"; then
    echo "FAILED: $label: expected /$pattern/" >&2
    failures=$((failures + 1))
  fi
}
ok='probe: MPI communicator of 1 rank'

expect "sonames only" "$ok" env LD_LIBRARY_PATH="$runtime" "$work/probe"
expect "relative path, then chdir /" "$ok" \
  env -C "$work" LD_LIBRARY_PATH=runtime ./probe --chdir /
mkdir -p "$work/links"
ln -s "$runtime/libmoert.so.1" "$work/links/libmoert.so.1"
expect "through a link elsewhere" "$ok" env LD_LIBRARY_PATH="$work/links" "$work/probe"
# The CUDA plugin found on its own (under its SONAME), then named by its development link: one
# file, so not refused as a second plugin (without a GPU both sessions fail for want of one).
if [[ -e "$libdir/libmoert_cuda.so.1" ]]; then
  cp "$libdir/libmoert_cuda.so.1" "$runtime/"
  ln -s libmoert_cuda.so.1 "$runtime/libmoert_cuda.so"
  model=$(find "$prefix" -name tiny_moe.moert -print -quit)
  expect "CUDA plugin found, then named" \
    "plugin named: (ok\$|error 5: )" \
    env LD_LIBRARY_PATH="$runtime" "$work/probe" --cuda-twice "$runtime/libmoert_cuda.so" "$model"
fi
rm "$runtime/libmoert_mpi.so.1"
expect "no plugin" "error 5: .*no MPI plugin beside libmoert \(looked for '$runtime/libmoert_mpi.so.1', '$runtime/libmoert_mpi.so'\)" \
  env LD_LIBRARY_PATH="$runtime" "$work/probe"
if ((failures > 0)); then
  echo "plugin_lookup: $failures case(s) failed" >&2
  exit 1
fi
echo "plugin_lookup: every case passed"
