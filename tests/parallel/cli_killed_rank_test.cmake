# `mpirun --enable-recovery -np 2 moert train --expert-parallel 2 --comm-timeout 3`, rank 1 killed
# (SIGKILL) once training runs -- rank 0's CSV has its first buffer out, so both ranks are past
# creating the communicator and the sessions -- and a second more: rank 0 must end with one error
# line within its timeout, not hang.
#   cmake -DMPIRUN=.. -DMOERT=.. -DCORPUS=.. -DDIR=.. -P cli_killed_rank_test.cmake
file(REMOVE_RECURSE ${DIR})
file(MAKE_DIRECTORY ${DIR})
# `exec` keeps the shell's pid for moert, which the background job then kills.
set(train "exec '${MOERT}' train --corpus '${CORPUS}' --steps 100000000 --batch 64 --embed-dim 8 \
--blocks 1 --experts 4 --top-k 2 --expert-hidden 8 --threads 1 --expert-parallel 2 \
--comm-timeout 3 --csv '${DIR}/steps.csv'")
string(TIMESTAMP t0 "%s")
execute_process(
  COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe --enable-recovery -np 2 sh -c
          "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then (i=0; while [ ! -s '${DIR}/steps.csv' ] && \
[ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; sleep 1; kill -9 $$) & fi; ${train}"
  OUTPUT_FILE ${DIR}/out.txt
  ERROR_FILE ${DIR}/err.txt
  TIMEOUT 90
  RESULT_VARIABLE rc)
string(TIMESTAMP t1 "%s")
math(EXPR seconds "${t1} - ${t0}")
message(STATUS "mpirun returned ${rc} after ${seconds} s")
if(rc MATCHES "timeout")
  message(FATAL_ERROR "the job did not end within 90 s: the surviving rank hangs")
endif()
file(READ ${DIR}/err.txt err)
# Counted by their prefix: the messages hold semicolons, which would split a CMake list.
string(REGEX MATCHALL "moert train: error: " prefixes "${err}")
list(LENGTH prefixes n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "expected one error line from rank 0, got ${n}:\n${err}")
endif()
string(REGEX MATCH "moert train: error: [^\n]*" line "${err}")
message(STATUS "${line}")
if(NOT line MATCHES "did not complete within 3 s|reported")
  message(FATAL_ERROR "rank 0's error does not name the communication failure: ${line}")
endif()
if(seconds GREATER 45)
  message(FATAL_ERROR "the job took ${seconds} s to end with a 3 s timeout")
endif()
