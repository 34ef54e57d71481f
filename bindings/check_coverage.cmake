# Fails unless each idiomatic binding reaches every function of the C ABI (the committed list
# capi/moert.symbols, itself checked against moert.h) and, where the low-level layer is not
# public, every constant moert.h #defines:
#   Go    bindings/go/*.go (non-test): capi.Moert_<name>( for functions, capi.MOERT_<NAME> for
#         constants (moert.dev/moert/internal/capi is internal, so constants are re-exported);
#   Java  bindings/java/src: Capi.moert_<name>( for functions (constants are public already in
#         the generated interface CapiConstants);
#   Rust  bindings/rust/moert/src: sys::moert_<name> called or passed as a function, and
#         sys::MOERT_<NAME> for constants (moert-sys is public too, but the safe crate should not
#         send users to it).
# moert_status_* and the version functions count like any other.
#   cmake -DHEADER=moert.h -DSYMBOLS=moert.symbols -DGO_DIR=.. -DJAVA_DIR=.. -DRUST_DIR=.. -P check_coverage.cmake
foreach(var HEADER SYMBOLS GO_DIR JAVA_DIR RUST_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_coverage: ${var} is not set")
  endif()
endforeach()

file(STRINGS ${SYMBOLS} functions REGEX "^moert_")
file(STRINGS ${HEADER} define_lines REGEX "^#define MOERT_[A-Z0-9_]+[ \t]")
set(constants "")
foreach(line IN LISTS define_lines)
  string(REGEX MATCH "^#define (MOERT_[A-Z0-9_]+)" _ "${line}")
  # Copied first: a failed if(MATCHES) clears CMAKE_MATCH_1.
  set(name ${CMAKE_MATCH_1})
  if(NOT name MATCHES "^MOERT_(API|MOERT_H)$")
    list(APPEND constants ${name})
  endif()
endforeach()

function(read_sources out dir glob exclude)
  file(GLOB_RECURSE files ${dir}/${glob})
  set(text "")
  foreach(f IN LISTS files)
    if(exclude AND f MATCHES "${exclude}")
      continue()
    endif()
    file(READ ${f} t)
    string(APPEND text "${t}")
  endforeach()
  set(${out} "${text}" PARENT_SCOPE)
endfunction()

read_sources(go_text ${GO_DIR} "*.go" "_test\\.go$")
read_sources(java_text ${JAVA_DIR} "*.java" "")
read_sources(rust_text ${RUST_DIR} "*.rs" "")

set(report "")
foreach(fn IN LISTS functions)
  string(SUBSTRING "${fn}" 1 -1 tail)
  if(NOT go_text MATCHES "capi\\.M${tail}\\(")
    string(APPEND report "\n  Go:   ${fn}")
  endif()
  if(NOT java_text MATCHES "Capi\\.${fn}\\(")
    string(APPEND report "\n  Java: ${fn}")
  endif()
  if(NOT rust_text MATCHES "sys::${fn}[^a-z0-9_]")
    string(APPEND report "\n  Rust: ${fn}")
  endif()
endforeach()
foreach(c IN LISTS constants)
  if(NOT go_text MATCHES "capi\\.${c}[^A-Z0-9_]")
    string(APPEND report "\n  Go:   ${c}")
  endif()
  if(NOT rust_text MATCHES "sys::${c}[^A-Z0-9_]")
    string(APPEND report "\n  Rust: ${c}")
  endif()
endforeach()
list(LENGTH functions n_functions)
list(LENGTH constants n_constants)
if(report)
  message(FATAL_ERROR "not reached by the idiomatic bindings:${report}")
endif()
message(STATUS "Go, Java and Rust reach all ${n_functions} functions; Go and Rust all ${n_constants} constants")
