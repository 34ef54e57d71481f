# Chooses the CPU BLAS: BLIS, serial build, linked statically.
#
# moert splits work into fixed items over the session's own threads and calls a single-threaded
# GEMM from each, concurrently. That needs a BLAS that is thread-safe without being threaded:
# BLIS is (its memory broker locks), whereas Debian's serial OpenBLAS is not (concurrent sgemm
# calls were seen to corrupt each other's results) and its threaded builds size their pools
# process-wide, ignoring the session's thread count. Linking the static archive, hidden behind
# the version script, keeps libmoert free of the libblas alternatives and of symbol clashes with
# whatever BLAS the host process loads.
find_path(MOERT_CBLAS_INCLUDE_DIR cblas.h
  PATHS /usr/include/${CMAKE_LIBRARY_ARCHITECTURE}/blis-serial NO_DEFAULT_PATH)
find_library(MOERT_BLAS_LIBRARY NAMES libblis.a
  PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/blis-serial NO_DEFAULT_PATH)
if(NOT MOERT_CBLAS_INCLUDE_DIR OR NOT MOERT_BLAS_LIBRARY)
  message(FATAL_ERROR "moert needs the serial BLIS library (Debian: libblis-serial-dev); "
                      "scripts/install-deps.sh installs it")
endif()
message(STATUS "moert: BLAS = serial BLIS ${MOERT_BLAS_LIBRARY}")

add_library(moert_blas INTERFACE)
target_include_directories(moert_blas SYSTEM INTERFACE ${MOERT_CBLAS_INCLUDE_DIR})
target_link_libraries(moert_blas INTERFACE ${MOERT_BLAS_LIBRARY} Threads::Threads m)
