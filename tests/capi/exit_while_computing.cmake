# Runs exit_while_computing.c five times, returning from main after 20 to 60 ms of computing:
# every run must exit with status 0 (a fault in exit handlers shows as a signal).
#   cmake -DPROGRAM=.. -DMODEL=.. -DMODE=session|batcher -P exit_while_computing.cmake
foreach(ms 20 30 40 50 60)
  execute_process(COMMAND ${PROGRAM} ${MODEL} ${MODE} ${ms} RESULT_VARIABLE rc
                  OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
  if(NOT rc STREQUAL "0")
    message(FATAL_ERROR "${MODE}, main returning after ${ms} ms: ${rc}\n${out}${err}")
  endif()
endforeach()
message(STATUS "${MODE}: 5 exits while computing, all with status 0")
