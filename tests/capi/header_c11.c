/* moert.h from strict C11 (-std=c11 -Wall -Wextra -Wpedantic -Werror -Wstrict-prototypes): the
 * header compiles as C, its functions link, and a short load / forward / inspect cycle runs.
 *
 *   capi_header_c11 MODEL_FILE
 */
#include <moert/moert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                              \
    }                                                                          \
  } while (0)

/* Expects success; reports and frees a status otherwise. */
static int ok(moert_status* st, const char* what) {
  if (!st) return 1;
  fprintf(stderr, "%s: %s: %s\n", what, moert_status_code_name(moert_status_code(st)),
          moert_status_message(st));
  moert_status_free(st);
  ++failures;
  return 0;
}

/* Expects `code` and a message mentioning `needle`; frees the status. */
static void expect_error(moert_status* st, int32_t code, const char* needle, const char* what) {
  if (!st) {
    fprintf(stderr, "%s: expected %s, got success\n", what, moert_status_code_name(code));
    ++failures;
    return;
  }
  if (moert_status_code(st) != code || strstr(moert_status_message(st), needle) == NULL) {
    fprintf(stderr, "%s: expected %s mentioning '%s', got %s: %s\n", what,
            moert_status_code_name(code), needle, moert_status_code_name(moert_status_code(st)),
            moert_status_message(st));
    ++failures;
  }
  moert_status_free(st);
}

int main(int argc, char** argv) {
  moert_model* model = NULL;
  moert_session_options* options = NULL;
  moert_session* session = NULL;
  uint32_t major = 0, minor = 99, in_width = 0, out_width = 0, layers = 0;
  int32_t input_kind = 0;
  int32_t* tokens = NULL;
  float* out = NULL;

  if (argc < 2) {
    fprintf(stderr, "usage: capi_header_c11 MODEL_FILE\n");
    return 2;
  }
  CHECK(moert_abi_version() == MOERT_ABI_VERSION);
  CHECK(strcmp(moert_version_string(), "") != 0);
  moert_schema_version(&major, &minor);
  CHECK(major == 1);
  CHECK(strcmp(moert_status_code_name(MOERT_ERR_IO), "MOERT_ERR_IO") == 0);
  CHECK(moert_status_code(NULL) == MOERT_OK);
  moert_status_free(NULL);
  moert_model_free(NULL);
  moert_session_free(NULL);
  moert_session_options_free(NULL);

  expect_error(moert_model_load_file(NULL, &model), MOERT_ERR_INVALID_ARGUMENT, "path",
               "load NULL path");
  CHECK(model == NULL);

  if (ok(moert_model_load_file(argv[1], &model), "load") &&
      ok(moert_model_num_layers(model, &layers), "layers") &&
      ok(moert_model_io(model, &input_kind, &in_width, &out_width), "io") &&
      ok(moert_session_options_create(&options), "options") &&
      ok(moert_session_options_set_threads(options, 2), "threads") &&
      ok(moert_session_options_set_config(options, "check_finite", "true"), "config") &&
      ok(moert_session_create(model, options, &session), "session")) {
    const uint64_t rows = 3;
    uint64_t i;
    CHECK(layers > 0);
    CHECK(input_kind == MOERT_INPUT_TOKENS);
    tokens = (int32_t*)malloc(sizeof *tokens * rows * in_width);
    out = (float*)malloc(sizeof *out * rows * out_width);
    CHECK(tokens != NULL && out != NULL);
    if (tokens && out) {
      for (i = 0; i < rows * in_width; ++i) tokens[i] = (int32_t)(i % 7);
      ok(moert_session_forward_tokens(session, tokens, rows * in_width, rows, out,
                                      rows * out_width),
         "forward");
      expect_error(moert_session_forward_tokens(session, tokens, rows * in_width, rows, out,
                                                rows * out_width - 1),
                   MOERT_ERR_INVALID_ARGUMENT, "output", "forward with a short output buffer");
    }
  }

  free(tokens);
  free(out);
  moert_session_free(session);
  moert_session_options_free(options);
  moert_model_free(model);
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("C11 header check passed\n");
  return 0;
}
