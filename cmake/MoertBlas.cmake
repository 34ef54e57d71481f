# Chooses the CPU GEMM library: oneDNN (Debian: libdnnl-dev), linked as the shared libdnnl.so.2.
#
# moert splits work into fixed items over the session's own threads and runs one single-threaded
# GEMM per item, so results do not depend on the thread count. oneDNN's sgemm is thread-safe when
# called from many threads at once, its JIT kernels are chosen at run time for the CPU (AVX2,
# AVX-512, AVX512-BF16, AMX; DNNL_MAX_CPU_ISA caps the choice), and its matmul primitive runs bf16
# operands with fp32 accumulation on AVX512-BF16 and AMX. `moert bench` measures it beside the
# other installed candidates (BLIS, OpenBLAS) on the machine it runs on.
#
# Debian builds oneDNN on the OpenMP runtime (libgomp): a GEMM started from a thread uses that
# thread's OpenMP thread count, so the CPU backend calls omp_set_num_threads(1) on the worker
# threads it owns and saves and restores the setting around work on the caller's thread
# (kernels/cpu/omp_guard.h). For that it links libgomp itself, the runtime oneDNN already loads.
find_path(MOERT_DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.h)
find_library(MOERT_DNNL_LIBRARY NAMES dnnl)
if(NOT MOERT_DNNL_INCLUDE_DIR OR NOT MOERT_DNNL_LIBRARY)
  message(FATAL_ERROR "moert needs oneDNN (Debian: libdnnl-dev); scripts/install-deps.sh installs it")
endif()
file(STRINGS ${MOERT_DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_config.h MOERT_DNNL_RUNTIME_LINE
  REGEX "^#define DNNL_CPU_THREADING_RUNTIME ")
file(STRINGS ${MOERT_DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_version.h MOERT_DNNL_VERSION_LINES
  REGEX "^#define DNNL_VERSION_(MAJOR|MINOR|PATCH) ")
string(REGEX REPLACE "[^0-9;]" "" MOERT_DNNL_VERSION "${MOERT_DNNL_VERSION_LINES}")
string(REPLACE ";" "." MOERT_DNNL_VERSION "${MOERT_DNNL_VERSION}")

add_library(moert_blas INTERFACE)
target_include_directories(moert_blas SYSTEM INTERFACE ${MOERT_DNNL_INCLUDE_DIR})
target_link_libraries(moert_blas INTERFACE ${MOERT_DNNL_LIBRARY} Threads::Threads m)
if(MOERT_DNNL_RUNTIME_LINE MATCHES "DNNL_RUNTIME_OMP")
  find_library(MOERT_GOMP_LIBRARY NAMES gomp libgomp.so.1
    HINTS ${CMAKE_CXX_IMPLICIT_LINK_DIRECTORIES})
  if(NOT MOERT_GOMP_LIBRARY)
    message(FATAL_ERROR "oneDNN uses OpenMP, but libgomp was not found")
  endif()
  target_compile_definitions(moert_blas INTERFACE MOERT_DNNL_OPENMP=1)
  target_link_libraries(moert_blas INTERFACE ${MOERT_GOMP_LIBRARY})
elseif(NOT MOERT_DNNL_RUNTIME_LINE MATCHES "DNNL_RUNTIME_SEQ")
  # A TBB or threadpool build sizes its own pools; moert cannot keep each GEMM on one thread.
  message(FATAL_ERROR "moert needs oneDNN built with the OpenMP or sequential CPU runtime "
                      "(found: ${MOERT_DNNL_RUNTIME_LINE})")
endif()
message(STATUS "moert: GEMM library = oneDNN ${MOERT_DNNL_VERSION} ${MOERT_DNNL_LIBRARY} "
               "(${MOERT_DNNL_RUNTIME_LINE})")
