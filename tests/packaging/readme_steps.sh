#!/usr/bin/env bash
# Runs one step of the README exactly as written: the shell block that follows the line
# `<!-- readme-step: NAME -->` (run in a fresh, empty directory) or
# `<!-- readme-step: NAME (in the repository) -->` (run at the repository's root).
#
#   readme_steps.sh README NAME PREFIX WORKDIR [tool:NAME | file:PATH-UNDER-PREFIX ...]
#
# A missing tool or installed file (a language whose binding this build left out) makes the step
# report itself skipped (exit 77).
#
# The block gets a clean environment: PATH, HOME and PREFIX (the install the README's first step
# makes), nothing else a user would have to set — no LD_LIBRARY_PATH, PKG_CONFIG_PATH, GOWORK or
# GOFLAGS. Only knobs that change where caches go or forbid the network are added (GOCACHE,
# GOPATH, GOPROXY=off, CARGO_HOME from the caller's toolchain): they make the run hermetic and
# cannot make a step pass that would fail for a user.
set -euo pipefail
readme=$1 name=$2 prefix=$3 work=$4
shift 4
for need in "$@"; do
  case $need in
  tool:*) command -v "${need#tool:}" >/dev/null || { echo "skipped: ${need#tool:} not found"; exit 77; } ;;
  file:*) [ -e "$prefix/${need#file:}" ] || { echo "skipped: $prefix/${need#file:} not installed"; exit 77; } ;;
  esac
done
root=$(cd "$(dirname "$readme")" && pwd)

block=$(awk -v name="$name" '
  $0 ~ "^<!-- readme-step: " name "( \\(in the repository\\))? -->$" { armed = 1; next }
  armed && /^```sh$/ { inside = 1; armed = 0; next }
  inside && /^```$/ { exit }
  inside { print }
  armed { armed = 0 }' "$readme")
if [ -z "$block" ]; then
  echo "readme_steps: no block for step '$name' in $readme" >&2
  exit 2
fi
where=$work
if grep -q "^<!-- readme-step: $name (in the repository) -->$" "$readme"; then
  where=$root
else
  rm -rf "$work" && mkdir -p "$work"
fi
mkdir -p "$work.cache"
echo "readme step '$name', in $where:"
sed 's/^/  | /' <<<"$block"
cd "$where"
exec env -i PATH="$PATH" HOME="$HOME" PREFIX="$prefix" TMPDIR="${TMPDIR:-/tmp}" \
  ${CARGO_HOME:+CARGO_HOME="$CARGO_HOME"} ${RUSTUP_HOME:+RUSTUP_HOME="$RUSTUP_HOME"} \
  GOCACHE="$work.cache/go-build" GOPATH="$work.cache/gopath" GOPROXY=off \
  bash -euo pipefail -c "$block"
