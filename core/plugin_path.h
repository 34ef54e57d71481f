// What the plugin loaders share: where plugins live and how their error codes come back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"

namespace moert {

// The files a plugin named `stem` ("libmoert_mpi.so") may be, in the order to try: its SONAME
// (stem.N, N the ABI major: what a runtime package ships) before the unversioned development
// link, each in the directory of libmoert's real file (symbolic links resolved) and then in the
// directory of the name it was loaded by, when that differs. Both directories are taken when the
// library is loaded, so that a relative name (a relative LD_LIBRARY_PATH entry) keeps its meaning
// after the host changes its working directory.
std::vector<std::string> plugin_candidates(const char* stem);

// The first of plugin_candidates(stem) that exists; the first candidate when none does (the
// error then names the file moert looked for first). `*found` says which case it was.
std::string find_plugin(const char* stem, bool* found);

// Whether two paths name one file (the SONAME and the development link to it, say); a path
// that cannot be resolved is compared as written.
bool same_file(const std::string& a, const std::string& b);

// "looked for 'A', 'B'": plugin_candidates(stem), for a message.
std::string plugin_search_text(const char* stem);

// A plugin's error code as a Code; Internal for values this library does not know.
Code plugin_code(int32_t code);

}  // namespace moert
