# One bounded run of a fuzz target for CTest: replays every input of REGRESSIONS (each must run
# clean), then fuzzes for SECONDS starting from CORPUS, writing new inputs only to a scratch
# directory (the committed corpus is read-only to it). A crash fails the test; libFuzzer writes the
# input to WORK/crash-* and prints how to reproduce it.
#   cmake -DTARGET=.. -DSECONDS=.. -DCORPUS=.. -DREGRESSIONS=.. -DDICT=.. -DWORK=.. -P run_fuzz.cmake
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK}/corpus)
set(options -rss_limit_mb=2560 -timeout=30 -print_final_stats=1 -artifact_prefix=${WORK}/)
if(DICT)
  list(APPEND options -dict=${DICT})
endif()

file(GLOB regressions ${REGRESSIONS}/*)
list(LENGTH regressions n)
if(n GREATER 0)
  execute_process(COMMAND ${TARGET} ${options} ${regressions} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${TARGET}: a regression input fails again (exit ${rc})")
  endif()
  message(STATUS "${TARGET}: ${n} regression inputs run clean")
endif()

execute_process(
  COMMAND ${TARGET} ${options} -max_total_time=${SECONDS} ${WORK}/corpus ${CORPUS}
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${TARGET}: fuzzing found a crash (exit ${rc}); the input is in ${WORK}")
endif()
