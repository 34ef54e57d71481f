# Copies the committed sources of the Go module (go.mod, *.go) from SOURCE_DIR into the module
# assembled in DEST_DIR, and removes copies whose source is gone. The generated package under
# DEST_DIR/internal/capi is left alone.
#   cmake -DSOURCE_DIR=bindings/go -DDEST_DIR=build/.../module -P sync_module.cmake
cmake_minimum_required(VERSION 3.25)
file(MAKE_DIRECTORY ${DEST_DIR})
file(GLOB old RELATIVE ${DEST_DIR} ${DEST_DIR}/*.go)
file(GLOB new RELATIVE ${SOURCE_DIR} ${SOURCE_DIR}/*.go)
foreach(f IN LISTS old)
  if(NOT f IN_LIST new)
    file(REMOVE ${DEST_DIR}/${f})
  endif()
endforeach()
foreach(f IN LISTS new ITEMS go.mod)
  file(COPY_FILE ${SOURCE_DIR}/${f} ${DEST_DIR}/${f} ONLY_IF_DIFFERENT)
endforeach()
