# Fails when SWIG maps a parameter of moert.h through its opaque-pointer fallback, that is when
# the header has grown a parameter convention that bindings/swig/moert.i does not map yet (a new
# pointer+length name pair, a new scalar type behind a pointer). Runs SWIG for Go and Java into
# WORKDIR and inspects what it generated:
#   Java: every SWIGTYPE_p_* class must be a handle (SWIGTYPE_p_moert_*);
#   Go:   no pointer argument may be followed by a uint64 length (a pair SWIG did not join into
#         a slice), and no pointer may have a Go element type other than those moert.i maps.
#   cmake -DSWIG=swig -DINTERFACE=moert.i -DINCLUDE=capi/include -DWORKDIR=dir -P check_generated.cmake
foreach(var SWIG INTERFACE INCLUDE WORKDIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_generated: ${var} is not set")
  endif()
endforeach()
file(REMOVE_RECURSE ${WORKDIR})
file(MAKE_DIRECTORY ${WORKDIR}/go ${WORKDIR}/java)

foreach(lang go java)
  if(lang STREQUAL "go")
    set(args -go -cgo -intgosize 64 -package capi)
  else()
    set(args -java -package dev.moert)
  endif()
  execute_process(COMMAND ${SWIG} ${args} -Wall -I${INCLUDE} -o ${WORKDIR}/${lang}/wrap.c
                          -outdir ${WORKDIR}/${lang} ${INTERFACE}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0 OR NOT "${err}" STREQUAL "")
    message(FATAL_ERROR "swig (${lang}) failed or warned (${rc}):\n${out}${err}")
  endif()
endforeach()

set(problems "")
file(GLOB java_types RELATIVE ${WORKDIR}/java ${WORKDIR}/java/SWIGTYPE_p_*.java)
foreach(f IN LISTS java_types)
  if(NOT f MATCHES "^SWIGTYPE_p_moert_[a-z_]+\\.java$")
    string(APPEND problems "\n  Java: ${f} (an unmapped pointer type)")
  endif()
endforeach()

file(STRINGS ${WORKDIR}/go/capi.go go_funcs REGEX "^func Moert_")
list(LENGTH go_funcs n_funcs)
foreach(line IN LISTS go_funcs)
  string(REGEX MATCH "^func (Moert_[a-z0-9_]+)" _ "${line}")
  set(name ${CMAKE_MATCH_1})
  if(line MATCHES "arg[0-9]+ \\*[a-z0-9]+, arg[0-9]+ uint64")
    string(APPEND problems "\n  Go: ${name}: a pointer followed by a length, not joined into a slice")
  endif()
  string(REGEX MATCHALL "arg[0-9]+ \\*[A-Za-z0-9_]+" pointers "${line}")
  foreach(p IN LISTS pointers)
    if(NOT p MATCHES "\\*(int32|uint32|int64|uint64|float64|uintptr|string)$")
      string(APPEND problems "\n  Go: ${name}: '${p}' has no mapping in moert.i")
    endif()
  endforeach()
  if(line MATCHES "SWIGTYPE_p_")
    string(APPEND problems "\n  Go: ${name}: an unmapped pointer type")
  endif()
endforeach()
if(n_funcs EQUAL 0)
  message(FATAL_ERROR "no functions found in the generated Go layer")
endif()
if(problems)
  message(FATAL_ERROR "moert.i does not map every parameter of moert.h:${problems}")
endif()
list(LENGTH java_types n_types)
message(STATUS "${n_funcs} Go functions and ${n_types} Java handle types: every parameter mapped")
