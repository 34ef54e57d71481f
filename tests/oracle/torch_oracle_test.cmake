# moert_add_torch_oracle(<test name> <script>): registers a PyTorch oracle test (label oracle),
# the Python <script> of the calling directory run on libmoert.so through ctypes, writing its
# models under the directory's build folder (work/). The scripts share tests/oracle/oracle_common.py.
# They need Debian's /usr/bin/python3 with python3-torch (installed by the project's install
# script); without torch they skip with exit code 77. Not registered under the sanitizers: ctypes
# cannot load an ASan-instrumented library into an uninstrumented interpreter without LD_PRELOAD.
include_guard(GLOBAL)

function(moert_add_torch_oracle name script)
  if(MOERT_SANITIZE)
    return()
  endif()
  add_test(NAME ${name}
    COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/${script}
            --lib $<TARGET_FILE:moert>
            --flatc $<TARGET_FILE:flatbuffers::flatc>
            --schema ${PROJECT_SOURCE_DIR}/schemas/moert.fbs
            --workdir ${CMAKE_CURRENT_BINARY_DIR}/work)
  set_tests_properties(${name} PROPERTIES
    LABELS "oracle"
    TIMEOUT 300
    SKIP_RETURN_CODE 77)
endfunction()
