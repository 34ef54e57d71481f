# Converts JSON with flatc into WORKDIR and compares the result with the committed BINARY.
file(MAKE_DIRECTORY ${WORKDIR})
execute_process(COMMAND ${FLATC} -b -o ${WORKDIR} ${SCHEMA} ${JSON} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "flatc failed on ${JSON}")
endif()
get_filename_component(stem ${JSON} NAME_WE)
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${WORKDIR}/${stem}.moert ${BINARY}
  RESULT_VARIABLE same)
if(NOT same EQUAL 0)
  message(FATAL_ERROR "${BINARY} is stale: regenerate it with "
                      "flatc -b -o examples/models schemas/moert.fbs ${JSON}")
endif()
