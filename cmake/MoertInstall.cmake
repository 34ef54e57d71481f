# Installation: the library, its one header, a CMake package (find_package(moert)), a pkg-config
# file (pkg-config moert), the example models and the examples, set up to build against the
# install they come with.
#
# Run paths: with MOERT_INSTALL_RPATH (an option of the top-level CMakeLists.txt, default ON) everything installed finds libmoert in
# PREFIX/lib without LD_LIBRARY_PATH or ldconfig: the moert command and libmoert_jni.so carry a
# run path relative to themselves ($ORIGIN), and moert.pc gives programs linked through it
# (C, Go's cgo, the Rust crate) a run path to PREFIX/lib. Distribution packagers, who install
# into a directory the loader searches and avoid run paths, turn it OFF.
include(CMakePackageConfigHelpers)

# The include directory comes from the target's INSTALL_INTERFACE (capi/CMakeLists.txt); an
# INCLUDES DESTINATION here would export it a second time.
install(TARGETS moert EXPORT moertTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES ${PROJECT_SOURCE_DIR}/capi/include/moert/moert.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/moert)
install(FILES ${PROJECT_SOURCE_DIR}/schemas/moert.fbs
  DESTINATION ${CMAKE_INSTALL_DATADIR}/moert)
install(EXPORT moertTargets NAMESPACE moert::
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moert)

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/moertConfig.cmake.in
  ${PROJECT_BINARY_DIR}/moertConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moert)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/moertConfigVersion.cmake
  COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/moertConfig.cmake ${PROJECT_BINARY_DIR}/moertConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moert)

include(${PROJECT_SOURCE_DIR}/cmake/MoertPkgConfigPath.cmake)
moert_pkgconfig_path(MOERT_PC_LIBDIR ${CMAKE_INSTALL_PREFIX} ${CMAKE_INSTALL_FULL_LIBDIR})
moert_pkgconfig_path(MOERT_PC_INCLUDEDIR ${CMAKE_INSTALL_PREFIX} ${CMAKE_INSTALL_FULL_INCLUDEDIR})
file(RELATIVE_PATH MOERT_PC_TO_PREFIX ${CMAKE_INSTALL_FULL_LIBDIR}/pkgconfig ${CMAKE_INSTALL_PREFIX})
string(REGEX REPLACE "/$" "" MOERT_PC_TO_PREFIX "${MOERT_PC_TO_PREFIX}")
set(MOERT_PC_RPATH "")
if(MOERT_INSTALL_RPATH)
  set(MOERT_PC_RPATH "-Wl,-rpath,\${libdir} ")
endif()
configure_file(${PROJECT_SOURCE_DIR}/cmake/moert.pc.in ${PROJECT_BINARY_DIR}/moert.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/moert.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

# Example models (the binaries and their JSON sources) and the examples, under
# PREFIX/share/moert: models/, examples/{c,java,rust,go}. The Rust crates' sources go to
# share/moert/rust (they are not on crates.io); the installed Rust example depends on them there.
set(MOERT_SHARE ${CMAKE_INSTALL_DATADIR}/moert)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/examples/models/ DESTINATION ${MOERT_SHARE}/models
  FILES_MATCHING PATTERN "*.moert" PATTERN "*.json")
install(FILES ${PROJECT_SOURCE_DIR}/examples/c/main.c ${PROJECT_SOURCE_DIR}/examples/c/CMakeLists.txt
  DESTINATION ${MOERT_SHARE}/examples/c)
install(FILES ${PROJECT_SOURCE_DIR}/examples/java/MoertExample.java
  DESTINATION ${MOERT_SHARE}/examples/java)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/bindings/rust/moert ${PROJECT_SOURCE_DIR}/bindings/rust/moert-sys
  DESTINATION ${MOERT_SHARE}/rust
  PATTERN "target" EXCLUDE PATTERN "tests" EXCLUDE)
# The example's path dependency, rewritten from the source tree's layout to the install's.
file(READ ${PROJECT_SOURCE_DIR}/examples/rust/Cargo.toml rust_example_manifest)
string(REPLACE "../../bindings/rust/moert" "../../rust/moert" rust_example_manifest
       "${rust_example_manifest}")
file(READ ${PROJECT_SOURCE_DIR}/examples/rust/Cargo.lock rust_example_lock)
file(GENERATE OUTPUT ${PROJECT_BINARY_DIR}/install/examples/rust/Cargo.toml
     CONTENT "${rust_example_manifest}")
file(GENERATE OUTPUT ${PROJECT_BINARY_DIR}/install/examples/rust/Cargo.lock
     CONTENT "${rust_example_lock}")
install(FILES ${PROJECT_BINARY_DIR}/install/examples/rust/Cargo.toml
              ${PROJECT_BINARY_DIR}/install/examples/rust/Cargo.lock
              ${PROJECT_SOURCE_DIR}/examples/rust/build.rs
  DESTINATION ${MOERT_SHARE}/examples/rust)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/examples/rust/src DESTINATION ${MOERT_SHARE}/examples/rust)
