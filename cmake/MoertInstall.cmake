# Installation: the library, its one header, a CMake package (find_package(moert)) and a
# pkg-config file (pkg-config moert).
include(CMakePackageConfigHelpers)

install(TARGETS moert EXPORT moertTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
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

file(RELATIVE_PATH MOERT_PC_TO_PREFIX ${CMAKE_INSTALL_FULL_LIBDIR}/pkgconfig ${CMAKE_INSTALL_PREFIX})
string(REGEX REPLACE "/$" "" MOERT_PC_TO_PREFIX "${MOERT_PC_TO_PREFIX}")
configure_file(${PROJECT_SOURCE_DIR}/cmake/moert.pc.in ${PROJECT_BINARY_DIR}/moert.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/moert.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
