# moert_pkgconfig_path(OUT PREFIX FULL_DIR): how moert.pc names FULL_DIR (an installed directory,
# absolute): "${prefix}/REL" when it lies under PREFIX, so that the file stays relocatable, and
# FULL_DIR itself when it does not (a packager's absolute CMAKE_INSTALL_LIBDIR outside the
# prefix). Prefixing an absolute directory with ${prefix} made "${prefix}//opt/moert/lib64".
function(moert_pkgconfig_path out prefix full_dir)
  cmake_path(NORMAL_PATH prefix)
  cmake_path(NORMAL_PATH full_dir)
  cmake_path(IS_PREFIX prefix "${full_dir}" NORMALIZE under)
  if(under)
    file(RELATIVE_PATH rel "${prefix}" "${full_dir}")
    string(REGEX REPLACE "/$" "" rel "${rel}")
    if(rel STREQUAL "")
      set(${out} "\${prefix}" PARENT_SCOPE)
    else()
      set(${out} "\${prefix}/${rel}" PARENT_SCOPE)
    endif()
  else()
    string(REGEX REPLACE "(.)/$" "\\1" full_dir "${full_dir}")
    set(${out} "${full_dir}" PARENT_SCOPE)
  endif()
endfunction()
