# `mpirun -np 2 moert train --expert-parallel 2 --comm-timeout 2` where rank 1 never starts moert
# (it sleeps instead): rank 0 must end with one error line within the timeout, which applies to
# the communicator's creation too (it waited the default 600 s there).
#   cmake -DMPIRUN=.. -DMOERT=.. -DCORPUS=.. -DDIR=.. -P cli_absent_rank_test.cmake
file(REMOVE_RECURSE ${DIR})
file(MAKE_DIRECTORY ${DIR})
set(train "exec '${MOERT}' train --corpus '${CORPUS}' --steps 2 --batch 16 --embed-dim 8 \
--blocks 1 --experts 4 --top-k 2 --expert-hidden 8 --threads 1 --expert-parallel 2 \
--comm-timeout 2")
string(TIMESTAMP t0 "%s")
execute_process(
  COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe -np 2 sh -c
          "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then exec sleep 60; fi; ${train}"
  OUTPUT_FILE ${DIR}/out.txt
  ERROR_FILE ${DIR}/err.txt
  TIMEOUT 90
  RESULT_VARIABLE rc)
string(TIMESTAMP t1 "%s")
math(EXPR seconds "${t1} - ${t0}")
message(STATUS "mpirun returned ${rc} after ${seconds} s")
if(rc MATCHES "timeout")
  message(FATAL_ERROR "the job did not end within 90 s: rank 0 waits at the creation")
endif()
file(READ ${DIR}/err.txt err)
string(REGEX MATCHALL "moert train: error: " prefixes "${err}")
list(LENGTH prefixes n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "expected one error line from rank 0, got ${n}:\n${err}")
endif()
string(REGEX MATCH "moert train: error: [^\n]*" line "${err}")
message(STATUS "${line}")
if(NOT line MATCHES "within 2 s")
  message(FATAL_ERROR "rank 0's error does not name the creation's timeout: ${line}")
endif()
if(seconds GREATER 30)
  message(FATAL_ERROR "the job took ${seconds} s to end with a 2 s timeout")
endif()
