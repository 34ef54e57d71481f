# Generates bindings/rust/moert-sys/src/bindings.rs from moert.h with bindgen (MODE=write), or
# regenerates it into WORKDIR and fails with a diff when the committed file differs (MODE=check).
# The flags live here only, so both modes agree. bindgen formats its output with RUSTFMT.
#   cmake -DMODE=write -DBINDGEN=bindgen -DRUSTFMT=rustfmt -DHEADER=capi/include/moert/moert.h
#         -DOUTPUT=bindings/rust/moert-sys/src/bindings.rs [-DWORKDIR=dir] -P bindgen.cmake
foreach(var MODE BINDGEN RUSTFMT HEADER OUTPUT)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "bindgen.cmake: ${var} is not set")
  endif()
endforeach()

if(MODE STREQUAL "write")
  set(target ${OUTPUT})
elseif(MODE STREQUAL "check")
  if(NOT WORKDIR)
    message(FATAL_ERROR "bindgen.cmake: MODE=check needs WORKDIR")
  endif()
  file(MAKE_DIRECTORY ${WORKDIR})
  set(target ${WORKDIR}/bindings.rs)
else()
  message(FATAL_ERROR "bindgen.cmake: MODE must be write or check, not '${MODE}'")
endif()

# Functions, #defines and handle types of moert.h only; size_t as usize; the header's comments
# (plain /* */ ones included) as doc comments.
execute_process(
  COMMAND ${CMAKE_COMMAND} -E env RUSTFMT=${RUSTFMT}
          ${BINDGEN} ${HEADER}
          --allowlist-function "moert_.*" --allowlist-var "MOERT_.*" --allowlist-type "moert_.*"
          --size_t-is-usize --no-layout-tests --output ${target}
          -- -fparse-all-comments
  RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "bindgen failed (${rc}):\n${err}")
endif()

if(MODE STREQUAL "check")
  file(READ ${OUTPUT} committed)
  file(READ ${target} fresh)
  if(NOT committed STREQUAL fresh)
    execute_process(COMMAND diff -u ${OUTPUT} ${target} OUTPUT_VARIABLE delta)
    message(FATAL_ERROR "${OUTPUT} is stale: moert.h changed since it was generated.\n"
      "Regenerate it with: cmake --build <build dir> --target moert_sys_bindings\n${delta}")
  endif()
  message(STATUS "${OUTPUT} is what bindgen makes of ${HEADER}")
endif()
