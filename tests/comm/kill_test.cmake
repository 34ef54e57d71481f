# Runs mpi_killed_rank_test under `mpirun --enable-recovery -np NP` and checks every survivor's
# verdict file (mpirun's own exit status says nothing under --enable-recovery).
#   cmake -DMPIRUN=.. -DPROGRAM=.. -DNP=.. -DVICTIM=.. -DDIR=.. [-DMODE=..] -P kill_test.cmake
# MODE, when given, is passed to the program after the victim's rank.
file(REMOVE_RECURSE ${DIR})
file(MAKE_DIRECTORY ${DIR})
execute_process(
  COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe --enable-recovery -np ${NP}
          ${PROGRAM} ${DIR} ${VICTIM} ${MODE}
  TIMEOUT 90
  RESULT_VARIABLE rc)
message(STATUS "mpirun returned ${rc}")
if(rc MATCHES "timeout")
  message(FATAL_ERROR "the job did not end within 90 s: a survivor hangs")
endif()
math(EXPR last "${NP} - 1")
foreach(r RANGE ${last})
  set(f ${DIR}/rank${r}.txt)
  if(r EQUAL VICTIM)
    if(EXISTS ${f})
      message(FATAL_ERROR "the killed rank ${r} wrote a verdict")
    endif()
    continue()
  endif()
  if(NOT EXISTS ${f})
    message(FATAL_ERROR "survivor rank ${r} wrote no verdict (it crashed or hung)")
  endif()
  file(READ ${f} verdict)
  string(STRIP "${verdict}" verdict)
  message(STATUS "rank ${r}: ${verdict}")
  if(NOT verdict MATCHES "^ok")
    message(FATAL_ERROR "rank ${r}: ${verdict}")
  endif()
endforeach()
