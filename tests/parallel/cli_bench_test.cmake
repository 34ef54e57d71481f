# `mpirun -np 2 moert bench --expert-parallel EP` prints the sharded layer's table beside the
# single-process layer's, and refuses the combinations it cannot run.
#   cmake -DMPIRUN=.. -DMOERT=.. -P cli_bench_test.cmake
set(mpirun ${MPIRUN} --allow-run-as-root --oversubscribe)
set(layer bench --tokens 64 --dim 16 --experts 4 --top-k 2 --expert-hidden 8 --shared 1
          --shared-hidden 8 --repeats 2 --threads 1)
set(number "-?[0-9]+\\.[0-9]+")

# The table: every phase row with four finite figures (forward and forward+backward, overlap on
# and off); the steps and the single process take time.
execute_process(COMMAND ${mpirun} -np 2 ${MOERT} ${layer} --expert-parallel 2
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 300)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "np 2, EP 2: ${rc}\n${out}\n${err}")
endif()
foreach(want "2 ranks \\(EP 2 x DP 1\\), 1 thread each" "global batch 64 tokens: 32 per rank"
             "load average [0-9.]+ [0-9.]+ [0-9.]+" "communication overlap hides: forward ")
  if(NOT out MATCHES "${want}")
    message(FATAL_ERROR "no '${want}' in:\n${out}")
  endif()
endforeach()
foreach(name "dispatch \\(wait\\)" "experts \\(compute\\)" "combine \\(wait\\)"
             "exposed communication" "rest \\(router, shared, permute\\)" "step"
             "single process, before" "single process, after"
             "step / single process \\(mean\\)")
  if(NOT out MATCHES "\n${name} +(${number}) +(${number}) +(${number}) +(${number})\n")
    message(FATAL_ERROR "no row '${name}' with four figures in:\n${out}")
  endif()
  set(figures ${CMAKE_MATCH_1} ${CMAKE_MATCH_2} ${CMAKE_MATCH_3} ${CMAKE_MATCH_4})
  # Microseconds are printed: only whole steps are sure to show a positive time at this size.
  if(name MATCHES "^(step|single)")
    foreach(v IN LISTS figures)
      if(NOT v GREATER 0)
        message(FATAL_ERROR "row '${name}': ${v} is not positive in:\n${out}")
      endif()
    endforeach()
  endif()
endforeach()
if(NOT out MATCHES "\ngradients \\(across ranks\\) +- +- +${number} +${number}\n")
  message(FATAL_ERROR "no gradients row (forward+backward only) in:\n${out}")
endif()

# Data parallelism only (EP 1 x DP 2), as JSON: every figure finite, none negative but the rest.
# Rank 1 runs 2 threads: each rank's count is reported.
string(REPLACE "--threads;1" "--threads;2" layer_two_threads "${layer}")
execute_process(COMMAND ${mpirun} -np 1 ${MOERT} ${layer} --expert-parallel 1 --json
                        : -np 1 ${MOERT} ${layer_two_threads} --expert-parallel 1 --json
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 300)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "np 2, EP 1: ${rc}\n${out}\n${err}")
endif()
string(JSON rank_threads GET "${out}" rank_threads)
string(REGEX REPLACE "[ \n]" "" rank_threads "${rank_threads}")
if(NOT rank_threads STREQUAL "[1,2]")
  message(FATAL_ERROR "each rank's threads: ${rank_threads} in:\n${out}")
endif()
string(JSON dp GET "${out}" data_parallel)
string(JSON per_rank GET "${out}" tokens_per_rank)
if(NOT dp EQUAL 2 OR NOT per_rank EQUAL 32)
  message(FATAL_ERROR "EP 1 at np 2: DP ${dp}, ${per_rank} tokens per rank in:\n${out}")
endif()
foreach(pass forward forward_backward)
  foreach(when single single_before single_after)
    string(JSON single GET "${out}" ${pass} ${when})
    if(NOT single MATCHES "^[0-9.]+(e[+-]?[0-9]+)?$" OR NOT single GREATER 0)
      message(FATAL_ERROR "${pass}: ${when} ${single}")
    endif()
  endforeach()
  foreach(mode overlap no_overlap)
    foreach(figure step dispatch experts combine gradients exposed rest)
      string(JSON v GET "${out}" ${pass} ${mode} ${figure})
      if(NOT v MATCHES "^-?[0-9.]+(e[+-]?[0-9]+)?$")
        message(FATAL_ERROR "${pass} ${mode} ${figure}: '${v}' is not a finite number")
      endif()
      if(figure MATCHES "^(step|experts)$" AND NOT v GREATER 0)
        message(FATAL_ERROR "${pass} ${mode} ${figure}: ${v} is not positive")
      endif()
      if(NOT figure STREQUAL "rest" AND v LESS 0)
        message(FATAL_ERROR "${pass} ${mode} ${figure}: ${v} is negative")
      endif()
    endforeach()
  endforeach()
endforeach()
# Every replicated parameter's gradient crosses ranks after backward.
string(JSON g GET "${out}" forward_backward overlap gradients)
if(NOT g GREATER 0)
  message(FATAL_ERROR "forward+backward at DP 2: gradients ${g}")
endif()

# Refusals: a clear error, a failed exit and no table.
function(refused what pattern)
  execute_process(COMMAND ${ARGN} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc
                  TIMEOUT 120)
  if(rc EQUAL 0 OR NOT err MATCHES "${pattern}")
    message(FATAL_ERROR "${what}: exit ${rc}, expected an error matching '${pattern}':\n${err}")
  endif()
  if(out MATCHES "ms per step")
    message(FATAL_ERROR "${what}: a table was printed:\n${out}")
  endif()
  message(STATUS "${what}: refused")
endfunction()
refused("the flag without mpirun" "mpirun -np N moert bench --expert-parallel"
        ${MOERT} ${layer} --expert-parallel 2)
refused("mpirun without the flag" "pass --expert-parallel EP"
        ${mpirun} -np 2 ${MOERT} ${layer})
refused("EP not dividing the ranks" "--expert-parallel 3 does not divide the job's 2 processes"
        ${mpirun} -np 2 ${MOERT} ${layer} --expert-parallel 3)
# The layer with one option changed (an option given twice is refused as such).
string(REPLACE "--experts;4" "--experts;5" layer_five_experts "${layer}")
string(REPLACE "--tokens;64" "--tokens;63" layer_63_tokens "${layer}")
refused("EP not dividing the experts" "--experts 5 do not split evenly over --expert-parallel 2"
        ${mpirun} -np 2 ${MOERT} ${layer_five_experts} --expert-parallel 2)
refused("a global batch the ranks cannot share" "--tokens 63 \\(the global batch\\)"
        ${mpirun} -np 2 ${MOERT} ${layer_63_tokens} --expert-parallel 2)
refused("the GPU" "--device cuda is not supported" ${MOERT} ${layer} --expert-parallel 2
        --device cuda)
refused("a single-process option" "--decode applies to the single-process benchmark"
        ${MOERT} ${layer} --expert-parallel 2 --decode)
refused("an option of the sharded benchmark alone" "--ep-chunks applies only with"
        ${MOERT} ${layer} --ep-chunks 2)
