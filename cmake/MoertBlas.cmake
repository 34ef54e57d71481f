# Chooses the CPU BLAS. moert parallelises over experts and row blocks on the session's own threads
# and calls single-threaded GEMMs from each, so it wants a serial BLAS: a threaded one would
# multiply the thread count and ignore the session's setting. Debian's OpenBLAS ships its serial
# build beside the pthread one; we link it and record its directory in the RUNPATH, because the
# libopenblas.so.0 alternative may point at the threaded build.
find_path(MOERT_CBLAS_INCLUDE_DIR cblas.h
  PATHS /usr/include/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-serial NO_DEFAULT_PATH)
find_library(MOERT_BLAS_LIBRARY openblas
  PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-serial NO_DEFAULT_PATH)

add_library(moert_blas INTERFACE)
if(MOERT_CBLAS_INCLUDE_DIR AND MOERT_BLAS_LIBRARY)
  get_filename_component(MOERT_BLAS_DIR ${MOERT_BLAS_LIBRARY} DIRECTORY)
  target_include_directories(moert_blas SYSTEM INTERFACE ${MOERT_CBLAS_INCLUDE_DIR})
  target_link_libraries(moert_blas INTERFACE ${MOERT_BLAS_LIBRARY})
  message(STATUS "moert: serial OpenBLAS ${MOERT_BLAS_LIBRARY}")
else()
  message(WARNING "moert: serial OpenBLAS not found (Debian: libopenblas-serial-dev); "
                  "falling back to the default BLAS, whose own threads add to the session's")
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS REQUIRED)
  find_path(MOERT_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas REQUIRED)
  target_include_directories(moert_blas SYSTEM INTERFACE ${MOERT_CBLAS_INCLUDE_DIR})
  target_link_libraries(moert_blas INTERFACE BLAS::BLAS)
  set(MOERT_BLAS_DIR "")
endif()
