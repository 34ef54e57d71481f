# Fails when the dynamic symbols that LIBRARY defines differ from the committed list SYMBOLS (one
# name per line, sorted), printing the difference. Symbol versions (name@@MOERT_1) are stripped and
# the version node itself (MOERT_1) is skipped.
# With READELF set, it also fails when the library relocates against one of its own exported
# functions: such a call goes through the PLT, and a second copy of libmoert in the process
# (a plugin's RTLD_LOCAL one) then runs the first copy's code (-Bsymbolic-functions binds them).
#   cmake -DNM=nm [-DREADELF=readelf] -DLIBRARY=libmoert.so -DSYMBOLS=capi/moert.symbols \
#     -P check_exported_symbols.cmake
foreach(var NM LIBRARY SYMBOLS)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_exported_symbols: ${var} is not set")
  endif()
endforeach()

execute_process(COMMAND ${NM} -D --defined-only ${LIBRARY}
  OUTPUT_VARIABLE nm_out ERROR_VARIABLE nm_err RESULT_VARIABLE nm_rc)
if(NOT nm_rc EQUAL 0)
  message(FATAL_ERROR "${NM} -D --defined-only ${LIBRARY} failed (${nm_rc}): ${nm_err}")
endif()

set(exported "")
string(REPLACE "\n" ";" nm_lines "${nm_out}")
foreach(line IN LISTS nm_lines)
  # "<address> <type> <name>[@@VERSION]"
  if(NOT line MATCHES "^[0-9a-fA-F]* *[A-Za-z] +([^ ]+)$")
    continue()
  endif()
  set(name "${CMAKE_MATCH_1}")
  string(REGEX REPLACE "@@?[A-Za-z0-9_.]+$" "" name "${name}")
  if(name STREQUAL "MOERT_1")
    continue()
  endif()
  list(APPEND exported "${name}")
endforeach()
list(REMOVE_DUPLICATES exported)
list(SORT exported)

file(STRINGS ${SYMBOLS} committed)
list(FILTER committed EXCLUDE REGEX "^[ \t]*$")
set(sorted_committed ${committed})
list(SORT sorted_committed)
list(REMOVE_DUPLICATES sorted_committed)
if(NOT committed STREQUAL sorted_committed)
  message(FATAL_ERROR "${SYMBOLS} must be sorted and free of duplicates")
endif()

set(added ${exported})
list(REMOVE_ITEM added ${committed})
set(removed ${committed})
if(exported)
  list(REMOVE_ITEM removed ${exported})
endif()

list(LENGTH exported n_exported)
if(added OR removed)
  set(report "")
  foreach(name IN LISTS added)
    string(APPEND report "\n  + ${name}   (exported, not in the list)")
  endforeach()
  foreach(name IN LISTS removed)
    string(APPEND report "\n  - ${name}   (in the list, not exported)")
  endforeach()
  message(FATAL_ERROR "the exports of ${LIBRARY} differ from ${SYMBOLS}:${report}\n"
                      "Update the list only for a deliberate ABI change.")
endif()
message(STATUS "${n_exported} exported symbols match ${SYMBOLS}")

if(DEFINED READELF AND NOT READELF STREQUAL "")
  execute_process(COMMAND ${READELF} -rW ${LIBRARY}
    OUTPUT_VARIABLE relocs ERROR_VARIABLE readelf_err RESULT_VARIABLE readelf_rc)
  if(NOT readelf_rc EQUAL 0)
    message(FATAL_ERROR "${READELF} -rW ${LIBRARY} failed (${readelf_rc}): ${readelf_err}")
  endif()
  # Matching each name against the whole output took 20 s on a sanitizer build's relocations:
  # where every export's name holds "moert" (the list's rule), only lines that hold it are kept.
  set(unnamed ${exported})
  list(FILTER unnamed EXCLUDE REGEX "moert")
  if(NOT unnamed)
    string(REGEX MATCHALL "[^\n]*moert[^\n]*\n" relocs "${relocs}")
    string(JOIN "" relocs ${relocs})
  endif()
  set(self_bound "")
  foreach(name IN LISTS exported)
    if(relocs MATCHES " ${name}(@|\n| )")
      list(APPEND self_bound "${name}")
    endif()
  endforeach()
  if(self_bound)
    message(FATAL_ERROR "${LIBRARY} relocates against its own exports (calls that another copy "
                        "of the library could take): ${self_bound}")
  endif()
  message(STATUS "no relocation against the library's own exports")
endif()
