/* Preloaded into one `moert export` by cli_tests (LD_PRELOAD): the first time the process opens a
 * file for writing inside $MOERT_TEST_VANISH_DIR, that folder is removed first, as another export
 * that had created it and was refused removes it: with rmdir, so only while it is empty. This
 * puts the removal exactly between the export finding the folder and writing its first file. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int removed;

static FILE* open_after_removal(const char* path, const char* mode, const char* real_name) {
  const char* dir = getenv("MOERT_TEST_VANISH_DIR");
  const size_t n = dir ? strlen(dir) : 0;
  if (!removed && n > 0 && mode[0] == 'w' && strncmp(path, dir, n) == 0 && path[n] == '/') {
    removed = 1;
    rmdir(dir);
  }
  /* dlsym gives an object pointer; ISO C has no cast from it to a function pointer. */
  void* sym = dlsym(RTLD_NEXT, real_name);
  FILE* (*real)(const char*, const char*) = NULL;
  memcpy(&real, &sym, sizeof real);
  return real ? real(path, mode) : NULL;
}

__attribute__((visibility("default"))) FILE* fopen(const char* path, const char* mode) {
  return open_after_removal(path, mode, "fopen");
}

__attribute__((visibility("default"))) FILE* fopen64(const char* path, const char* mode) {
  return open_after_removal(path, mode, "fopen64");
}
