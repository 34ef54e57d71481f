/* Loads a model through an installed libmoert and prints its name and the library's version. */
#include <moert/moert.h>
#include <stdio.h>

int main(int argc, char** argv) {
  if (argc < 2 || moert_abi_version() != MOERT_ABI_VERSION) return 2;
  moert_model* model = NULL;
  moert_status* st = moert_model_load_file(argv[1], &model);
  if (st) {
    fprintf(stderr, "%s\n", moert_status_message(st));
    moert_status_free(st);
    return 1;
  }
  const char* name = NULL;
  st = moert_model_name(model, &name);
  if (!st) printf("consumer: moert %s loaded '%s'\n", moert_version_string(), name);
  moert_status_free(st);
  moert_model_free(model);
  return st ? 1 : 0;
}
