# moert_pkgconfig_path (cmake/MoertPkgConfigPath.cmake): directories under the prefix stay
# relative to it, others are kept absolute. Run with cmake -DMODULE=... -P.
include(${MODULE})
set(failures 0)
foreach(case
    "/usr|/usr/lib/x86_64-linux-gnu|\${prefix}/lib/x86_64-linux-gnu"
    "/opt/moert|/opt/moert/lib64|\${prefix}/lib64"
    "/opt/moert/|/opt/moert/include|\${prefix}/include"
    "/opt/moert|/usr/lib64|/usr/lib64"
    "/opt/moert|/opt/moertx/lib|/opt/moertx/lib"
    "/opt/moert|/opt/moert/../lib|/opt/lib"
    "/opt/moert|/opt/moert|\${prefix}")
  string(REPLACE "|" ";" case "${case}")
  list(GET case 0 prefix)
  list(GET case 1 dir)
  list(GET case 2 want)
  moert_pkgconfig_path(got "${prefix}" "${dir}")
  if(NOT got STREQUAL want)
    message(SEND_ERROR "prefix ${prefix}, directory ${dir}: got '${got}', want '${want}'")
    math(EXPR failures "${failures} + 1")
  endif()
endforeach()
if(failures EQUAL 0)
  message(STATUS "moert_pkgconfig_path: every case holds")
endif()
