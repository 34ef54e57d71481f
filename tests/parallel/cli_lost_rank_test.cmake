# A rank lost to `mpirun -np 2 moert train --expert-parallel 2 --comm-timeout T`: rank 0 must end
# with one error line within its timeout, not hang.
#  CASE=killed: rank 1 is killed (SIGKILL, under --enable-recovery) once training runs -- rank 0's
#    CSV has its first buffer out, so both ranks are past creating the communicator and the
#    sessions -- and a second more; T = 3.
#  CASE=absent: rank 1 never starts moert (it sleeps): the timeout bounds the communicator's
#    creation too (it waited the default 600 s there); T = 2.
#   cmake -DCASE=killed|absent -DMPIRUN=.. -DMOERT=.. -DCORPUS=.. -DDIR=.. -P cli_lost_rank_test.cmake
file(REMOVE_RECURSE ${DIR})
file(MAKE_DIRECTORY ${DIR})
set(common "--corpus '${CORPUS}' --embed-dim 8 --blocks 1 --experts 4 --top-k 2 \
--expert-hidden 8 --threads 1 --expert-parallel 2")
if(CASE STREQUAL "killed")
  set(timeout 3)
  set(recovery --enable-recovery)
  # `exec` keeps the shell's pid for moert, which the background job then kills.
  set(train "exec '${MOERT}' train ${common} --steps 100000000 --batch 64 --comm-timeout 3 \
--csv '${DIR}/steps.csv'")
  set(rank1 "(i=0; while [ ! -s '${DIR}/steps.csv' ] && [ $i -lt 300 ]; do sleep 0.2; \
i=$((i+1)); done; sleep 1; kill -9 $$) &")
  set(expected "did not complete within 3 s|reported")
elseif(CASE STREQUAL "absent")
  set(timeout 2)
  set(recovery "")
  set(train "exec '${MOERT}' train ${common} --steps 2 --batch 16 --comm-timeout 2")
  set(rank1 "exec sleep 60;")
  set(expected "within 2 s")
else()
  message(FATAL_ERROR "CASE must be killed or absent, got '${CASE}'")
endif()
string(TIMESTAMP t0 "%s")
execute_process(
  COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe ${recovery} -np 2 sh -c
          "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then ${rank1} fi; ${train}"
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
if(NOT line MATCHES "${expected}")
  message(FATAL_ERROR "rank 0's error does not name the communication failure: ${line}")
endif()
math(EXPR limit "${timeout} * 15")
if(seconds GREATER limit)
  message(FATAL_ERROR "the job took ${seconds} s to end with a ${timeout} s timeout")
endif()
