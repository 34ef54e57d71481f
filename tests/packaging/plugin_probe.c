/* Loads a plugin the way a user's program would, through libmoert alone, and prints what
 * happened:
 *   plugin_probe [--chdir DIR]        an MPI communicator (a job of one: no mpirun), after
 *                                     changing directory first when asked;
 *   plugin_probe --cuda-twice PLUGIN MODEL
 *                                     a CUDA session with the plugin found beside libmoert, then
 *                                     one naming PLUGIN (the same file by another name): the
 *                                     second must not be refused as another plugin. */
#include <moert/moert.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int report(const char* what, moert_status* st) {
  if (!st) {
    printf("probe: %s: ok\n", what);
    return 0;
  }
  printf("probe: %s: error %d: %s\n", what, (int)moert_status_code(st), moert_status_message(st));
  moert_status_free(st);
  return 1;
}

static void cuda_session(const moert_model* model, const char* plugin, const char* what) {
  moert_session_options* o = NULL;
  moert_session* s = NULL;
  moert_session_options_create(&o);
  moert_session_options_set_device(o, MOERT_DEVICE_CUDA, 0);
  if (plugin) report("set cuda_plugin", moert_session_options_set_config(o, "cuda_plugin", plugin));
  report(what, moert_session_create(model, o, &s));
  moert_session_free(s);
  moert_session_options_free(o);
}

int main(int argc, char** argv) {
  if (argc > 3 && strcmp(argv[1], "--cuda-twice") == 0) {
    moert_model* model = NULL;
    if (report("model", moert_model_load_file(argv[3], &model))) return 1;
    cuda_session(model, NULL, "CUDA session, plugin found");
    cuda_session(model, argv[2], "CUDA session, plugin named");
    moert_model_free(model);
    return 0;
  }
  if (argc > 2 && strcmp(argv[1], "--chdir") == 0 && chdir(argv[2]) != 0) {
    perror("chdir");
    return 2;
  }
  moert_comm* comm = NULL;
  moert_status* st = moert_comm_create_mpi(NULL, &comm);
  if (st) return report("MPI communicator", st);
  int32_t size = 0;
  st = moert_comm_size(comm, &size);
  printf("probe: MPI communicator of %d rank(s)\n", st ? -1 : (int)size);
  moert_status_free(st);
  moert_comm_free(comm);
  return 0;
}
