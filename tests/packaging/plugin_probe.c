/* Creates an MPI communicator (a job of one: no mpirun) through the plugin libmoert finds on its
 * own, optionally after changing directory first, and prints what happened. */
#include <moert/moert.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char** argv) {
  if (argc > 2 && strcmp(argv[1], "--chdir") == 0 && chdir(argv[2]) != 0) {
    perror("chdir");
    return 2;
  }
  moert_comm* comm = NULL;
  moert_status* st = moert_comm_create_mpi(NULL, &comm);
  if (st) {
    printf("probe: error %d: %s\n", (int)moert_status_code(st), moert_status_message(st));
    moert_status_free(st);
    return 1;
  }
  int32_t size = 0;
  st = moert_comm_size(comm, &size);
  printf("probe: MPI communicator of %d rank(s)\n", st ? -1 : (int)size);
  moert_status_free(st);
  moert_comm_free(comm);
  return 0;
}
