# `mpirun -np N moert train --expert-parallel EP` prints the table one process prints, and
# `--save` writes the checkpoints one process writes: every run feeds the same global batches,
# and the job's figures and state are the union's.
#   cmake -DMPIRUN=.. -DMOERT=.. -DCORPUS=.. -DDIR=.. -P cli_train_test.cmake
set(args train --corpus ${CORPUS} --steps 40 --batch 256 --context 4 --embed-dim 8 --blocks 2
         --experts 8 --top-k 2 --expert-hidden 8 --shared 1 --shared-hidden 8 --warmup 5
         --val-every 5 --threads 1 --probe-rows 0 --balancing none,aux,loss-free)
file(MAKE_DIRECTORY ${DIR})

# The table's rows: the strategy and every figure but the train time.
function(table_of text out)
  string(REGEX MATCHALL "\n(none|aux|loss-free) +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9]+/[0-9]+"
         rows "${text}")
  if(NOT rows)
    message(FATAL_ERROR "no table in:\n${text}")
  endif()
  set(${out} "${rows}" PARENT_SCOPE)
endfunction()

# Every checkpoint file `--save` wrote into `dir`, as the names in it.
function(saved_files dir out)
  file(GLOB names RELATIVE ${dir} ${dir}/*)
  list(SORT names)
  if(NOT names)
    message(FATAL_ERROR "--save wrote nothing into ${dir}")
  endif()
  set(${out} "${names}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${DIR}/saved)
execute_process(COMMAND ${MOERT} ${args} --save ${DIR}/saved/one OUTPUT_VARIABLE one
                ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 300)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "one process: ${rc}\n${err}")
endif()
table_of("${one}" want)
message(STATUS "one process:${want}")
saved_files(${DIR}/saved/one want_files)

foreach(layout "2;2" "4;4" "4;2" "2;1")
  list(GET layout 0 np)
  list(GET layout 1 ep)
  execute_process(
    COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe -np ${np} ${MOERT} ${args}
            --expert-parallel ${ep} --save ${DIR}/saved/np${np}_ep${ep}
    OUTPUT_VARIABLE many ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 300)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${np} processes, EP ${ep}: ${rc}\n${err}")
  endif()
  math(EXPR per_rank "256 / ${np}")
  if(NOT many MATCHES "job: ${np} processes, expert parallelism ${ep}, ${per_rank} rows per rank: bitwise")
    message(FATAL_ERROR "${np} processes, EP ${ep}: no job line saying the figures are bitwise one process's:\n${many}")
  endif()
  table_of("${many}" got)
  if(NOT got STREQUAL want)
    message(FATAL_ERROR "${np} processes, EP ${ep} printed\n${got}\ninstead of\n${want}")
  endif()
  # The job's checkpoints (rank 0 writes them) are one process's, byte for byte.
  saved_files(${DIR}/saved/np${np}_ep${ep} got_files)
  if(NOT got_files STREQUAL want_files)
    message(FATAL_ERROR "${np} processes, EP ${ep} saved ${got_files} instead of ${want_files}")
  endif()
  foreach(f ${want_files})
    execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${DIR}/saved/one/${f}
                            ${DIR}/saved/np${np}_ep${ep}/${f} RESULT_VARIABLE differ)
    if(NOT differ EQUAL 0)
      message(FATAL_ERROR "${np} processes, EP ${ep}: checkpoint ${f} differs from one process's")
    endif()
  endforeach()
  message(STATUS "${np} processes, EP ${ep}: the same table and checkpoints")
endforeach()

# A rank's share of the batch off a multiple of 64 rows (the gradients' reduction chunk): the
# figures agree with one process's to rounding only, and the job line says so.
execute_process(COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe -np 2 ${MOERT} train
                        --corpus ${CORPUS} --steps 1 --batch 32 --probe-rows 0 --balancing none
                        --expert-parallel 2
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
if(NOT rc EQUAL 0 OR NOT out MATCHES "16 rows per rank: not a multiple of 64, so the figures agree with one process's to rounding, not bitwise")
  message(FATAL_ERROR "16 rows per rank: ${rc}\n${out}\n${err}")
endif()

# Under mpirun, forgetting --expert-parallel would run N independent copies: refused.
execute_process(COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe -np 2 ${MOERT} ${args}
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
if(rc EQUAL 0 OR NOT err MATCHES "--expert-parallel")
  message(FATAL_ERROR "mpirun without --expert-parallel: ${rc}\n${err}")
endif()
# --expert-parallel in one process (MPI initialised as a singleton): says how to start a job.
execute_process(COMMAND ${MOERT} ${args} --expert-parallel 2
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
if(NOT rc EQUAL 2 OR NOT err MATCHES "run a job of N processes \\(mpirun -np N")
  message(FATAL_ERROR "--expert-parallel 2 in one process: ${rc}\n${err}")
endif()
# Ranks started with different command lines (MPMD: another --batch on rank 1) would train
# another job than rank 0 reports: refused on every rank.
string(REPLACE "--batch;256" "--batch;128" args_batch_128 "${args}")
execute_process(COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe -np 1 ${MOERT} ${args}
                        --expert-parallel 2 : -np 1 ${MOERT} ${args_batch_128}
                        --expert-parallel 2
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
string(REGEX MATCHALL "started with different arguments" said "${err}")
list(LENGTH said n)
if(rc EQUAL 0 OR NOT n EQUAL 2)
  message(FATAL_ERROR "ranks with different arguments: ${rc}\n${err}")
endif()

# Each rank reads its own files (its working directory here: -wdir). A rank that cannot read the
# corpus fails every rank at once, long before the communicator's 600 s timeout, and names itself;
# ranks whose corpora differ are refused. Either way rank 0's outputs are left as they were: its
# --csv keeps its lines and --save's directory is not created.
file(REMOVE_RECURSE ${DIR}/ranks)
file(MAKE_DIRECTORY ${DIR}/ranks/a ${DIR}/ranks/b ${DIR}/ranks/c)
file(READ ${CORPUS} text)
file(WRITE ${DIR}/ranks/a/c.txt "${text}")
string(REPLACE "e" "a" other "${text}")
file(WRITE ${DIR}/ranks/c/c.txt "${other}")
set(local_args ${args})
list(REMOVE_AT local_args 1 2)  # --corpus PATH
foreach(case "b;rank 1 of the job's 2: c.txt: no such file;rank 1 of the job's 2 could not read"
             "c;the ranks read different texts;the ranks read different texts")
  list(GET case 0 second)
  list(GET case 1 expect)
  list(GET case 2 expect_too)
  file(WRITE ${DIR}/ranks/a/steps.csv "kept\n")
  string(TIMESTAMP start "%s")
  execute_process(COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe
                          -np 1 -wdir ${DIR}/ranks/a ${MOERT} ${local_args} --corpus c.txt
                          --expert-parallel 2 --csv steps.csv --save ck :
                          -np 1 -wdir ${DIR}/ranks/${second} ${MOERT} ${local_args} --corpus c.txt
                          --expert-parallel 2 --csv steps.csv --save ck
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
  string(TIMESTAMP end "%s")
  math(EXPR seconds "${end} - ${start}")
  if(rc EQUAL 0 OR NOT err MATCHES "${expect}" OR NOT err MATCHES "${expect_too}"
     OR seconds GREATER 60)
    message(FATAL_ERROR "rank 1 in ${second}: ${rc} after ${seconds} s\n${err}")
  endif()
  file(READ ${DIR}/ranks/a/steps.csv csv)
  if(NOT csv STREQUAL "kept\n" OR EXISTS ${DIR}/ranks/a/ck)
    message(FATAL_ERROR "rank 1 in ${second}: the refused job changed rank 0's outputs:\n${csv}")
  endif()
  message(STATUS "rank 1 in ${second}: refused after ${seconds} s")
endforeach()

# A usage error on rank 0 (its --csv names its corpus; rank 0 alone opens the outputs): every
# rank exits 2, the first failing rank's code, so mpirun's exit status does not depend on which
# rank exits first (rank 1 exited 1).
file(REMOVE_RECURSE ${DIR}/ranks/d)
file(MAKE_DIRECTORY ${DIR}/ranks/d)
file(WRITE ${DIR}/ranks/d/c.txt "${text}")
file(CREATE_LINK c.txt ${DIR}/ranks/d/steps.csv SYMBOLIC)
execute_process(COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe
                        -np 1 -wdir ${DIR}/ranks/d ${MOERT} ${local_args} --corpus c.txt
                        --expert-parallel 2 --csv steps.csv :
                        -np 1 -wdir ${DIR}/ranks/a ${MOERT} ${local_args} --corpus c.txt
                        --expert-parallel 2 --csv steps.csv
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
if(NOT rc EQUAL 2 OR NOT err MATCHES "rank 0 of the job's 2: [^\n]*would replace what this command reads"
   OR NOT err MATCHES "rank 0 of the job's 2 could not open its output paths")
  message(FATAL_ERROR "a usage error on rank 0: exit ${rc}\n${err}")
endif()

# eval has no --expert-parallel: under mpirun it refuses rather than evaluate N times.
execute_process(COMMAND ${MPIRUN} --allow-run-as-root --oversubscribe -np 2 ${MOERT} eval
                        ${DIR}/saved/one/loss-free.moert --corpus ${CORPUS}
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 120)
if(rc EQUAL 0 OR NOT err MATCHES "eval runs in one process")
  message(FATAL_ERROR "eval under mpirun: ${rc}\n${err}")
endif()
