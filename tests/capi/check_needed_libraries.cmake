# Fails when LIBRARY declares a shared library it may not need, or when one it declares cannot be
# loaded: libmoert.so must load on a machine with only what it declares (no CUDA, no MPI, no BLAS
# alternative). Allowed: the C and C++ runtimes, oneDNN (libdnnl.so.2, the CPU GEMMs) and the
# OpenMP runtime oneDNN is built on (libgomp.so.1), plus the sanitizer runtimes in a sanitizer
# build.
#   cmake -DOBJDUMP=objdump -DLDD=ldd -DLIBRARY=libmoert.so -P check_needed_libraries.cmake
cmake_minimum_required(VERSION 3.25)
foreach(var OBJDUMP LDD LIBRARY)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_needed_libraries: ${var} is not set")
  endif()
endforeach()

execute_process(COMMAND ${OBJDUMP} -p ${LIBRARY}
  OUTPUT_VARIABLE dump ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${OBJDUMP} -p ${LIBRARY} failed (${rc}): ${err}")
endif()
set(allowed "^(libdnnl\\.so\\.2|libgomp\\.so\\.1|libstdc\\+\\+\\.so\\.6|libm\\.so\\.6|libgcc_s\\.so\\.1|libc\\.so\\.6|ld-linux[-a-z0-9_.]*\\.so\\.[0-9]+|libdl\\.so\\.2|libpthread\\.so\\.0|librt\\.so\\.1|lib(a|ub)san\\.so\\.[0-9]+)$")
string(REPLACE "\n" ";" lines "${dump}")
set(needed "")
foreach(line IN LISTS lines)
  if(line MATCHES "^ *NEEDED +([^ ]+)$")
    list(APPEND needed "${CMAKE_MATCH_1}")
    if(NOT CMAKE_MATCH_1 MATCHES "${allowed}")
      message(FATAL_ERROR "${LIBRARY} declares ${CMAKE_MATCH_1}, which it may not need")
    endif()
  endif()
endforeach()
if(NOT "libdnnl.so.2" IN_LIST needed)
  message(FATAL_ERROR "${LIBRARY} does not declare libdnnl.so.2 (NEEDED: ${needed})")
endif()

# Every declared library resolves on this machine.
execute_process(COMMAND ${LDD} ${LIBRARY} OUTPUT_VARIABLE ldd_out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR ldd_out MATCHES "not found")
  message(FATAL_ERROR "${LIBRARY} does not load with what it declares:\n${ldd_out}")
endif()
message(STATUS "NEEDED: ${needed}")
