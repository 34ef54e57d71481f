/* The process exits while the library computes: a thread loops over forward passes of a session
 * ("session") or a batcher holds queued requests ("batcher", as a Rust service whose static
 * Batcher is never dropped), and main returns meanwhile, so exit() runs every library's exit
 * handlers with a GEMM in flight. The process must end with main's status, not a signal.
 * "fork": while the thread computes, a child of fork() exits at once; it must end with status 0
 * within 5 s (it has none of the parent's threads, whose calls the exit must not wait for).
 *   exit_while_computing MODEL session|batcher|fork MILLISECONDS */
#include <moert/moert.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Globals, so that the handles left alive at exit on purpose stay reachable: the sanitizer runs'
 * leak check reports only what nothing points to. */
static moert_model* model;
static moert_session* session;
static moert_batcher* batcher;

static void* forward_loop(void* arg) {
  (void)arg;
  int32_t ids[64 * 4];
  static float out[64 * 64];
  for (int i = 0; i < 64 * 4; i++) ids[i] = (i * 7) % 64;
  for (;;) {
    /* Refused once the process exits: that is the point. */
    moert_status_free(moert_session_forward_tokens(session, ids, 64 * 4, 64, out, 64 * 64));
  }
  return NULL;
}

static void ignore(void* user_data, moert_status* status, const float* out, uint64_t out_len,
                   const int64_t* stats, uint64_t stats_len) {
  (void)user_data, (void)out, (void)out_len, (void)stats, (void)stats_len;
  moert_status_free(status);
}

static int check(moert_status* st) {
  if (!st) return 0;
  fprintf(stderr, "%s\n", moert_status_message(st));
  moert_status_free(st);
  return 1;
}

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  if (check(moert_model_load_file(argv[1], &model))) return 1;
  if (strcmp(argv[2], "session") == 0 || strcmp(argv[2], "fork") == 0) {
    if (check(moert_session_create(model, NULL, &session))) return 1;
    pthread_t t;
    if (pthread_create(&t, NULL, forward_loop, NULL) != 0) return 1;
  } else {
    if (check(moert_batcher_create(model, NULL, &batcher))) return 1;
    int32_t ids[8 * 4];
    for (int i = 0; i < 8 * 4; i++) ids[i] = (i * 5) % 64;
    for (int r = 0; r < 2000; r++)
      if (check(moert_batcher_submit_tokens(batcher, ids, 8 * 4, 8, ignore, NULL))) return 1;
  }
  const long ms = atol(argv[3]);
  const struct timespec wait = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&wait, NULL);
  if (strcmp(argv[2], "fork") == 0) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    const pid_t child = fork();
    if (child < 0) return 1;
    if (child == 0) exit(0);
    int status = 0;
    if (waitpid(child, &status, 0) != child) return 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    const double seconds = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
    printf("the child exited with status %d after %.3f s\n", status, seconds);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || seconds > 5.0) return 1;
  }
  printf("main returns\n");
  return 0;
}
