#!/usr/bin/env bash
# Builds and runs a small consumer of an installed moert, the way the README tells each kind of
# user to: packaging tests run it against `cmake --install --prefix PREFIX` of the build.
#
#   consume.sh KIND PREFIX WORKDIR MODEL
#   KIND: c-cmake | c-pkgconfig | go | java | rust
# Tools come from the environment: CMAKE, CC, GO, JAVAC, JAVA, CARGO (and PKG_CONFIG).
set -euo pipefail
kind=$1 prefix=$2 work=$3 model=$4
here=$(cd "$(dirname "$0")" && pwd)
libdir=$(dirname "$(find "$prefix" -name 'libmoert.so' -print -quit)")
pcdir=$libdir/pkgconfig
rm -rf "$work" && mkdir -p "$work"
# Only the installed copy may be found: no build-tree pkg-config files, no build rpath, and no
# LD_LIBRARY_PATH: the install's run paths must do (MOERT_INSTALL_RPATH).
unset LD_LIBRARY_PATH
export PKG_CONFIG_PATH=$pcdir

case $kind in
c-cmake)
  # The exported target names its include directory once.
  includes=$(grep -h 'INTERFACE_INCLUDE_DIRECTORIES' "$prefix"/lib*/cmake/moert/moertTargets.cmake)
  case $includes in
  *';'*) echo "moertTargets.cmake lists more than one include directory: $includes" >&2; exit 1 ;;
  esac
  "$CMAKE" -S "$here/c" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_C_FLAGS="-Wall -Wextra -Werror"
  "$CMAKE" --build "$work/build"
  "$work/build/consumer" "$model"
  ;;
c-pkgconfig)
  # shellcheck disable=SC2046
  "$CC" -std=c11 -Wall -Wextra -Werror -o "$work/consumer" "$here/c/main.c" \
    $(pkg-config --cflags --libs moert)
  "$work/consumer" "$model"
  ;;
go)
  mkdir -p "$work/src"
  cp "$here/go/main.go" "$work/src/"
  cat >"$work/src/go.mod" <<MOD
module example.com/consumer

go 1.19

require moert.dev/moert v0.1.0

replace moert.dev/moert => $prefix/share/moert/go
MOD
  cd "$work/src"
  GOWORK=off GOFLAGS=-mod=mod GOPROXY=off GOENV=off GOPATH=$work/gopath \
    GOCACHE=${GOCACHE:-$work/gocache} "$GO" run . "$model"
  ;;
java)
  jar=$prefix/share/java/moert.jar
  "$JAVAC" --release 17 -Xlint:all -Werror -cp "$jar" -d "$work/classes" "$here/java/Consumer.java"
  "$JAVA" -Djava.library.path="$libdir" -cp "$jar:$work/classes" Consumer "$model"
  ;;
rust)
  # The crates from the source tree (a path dependency), libmoert from the installed moert.pc.
  CARGO_TARGET_DIR=$work/target "$CARGO" run --offline --locked --quiet \
    --manifest-path "$here/rust/Cargo.toml" -- "$model"
  ;;
*)
  echo "consume.sh: unknown kind '$kind'" >&2
  exit 2
  ;;
esac
