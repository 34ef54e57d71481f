/* Loads a moert model, runs one forward pass over a batch of token windows (or, for a model with
 * hidden-state input such as one `moert import` writes, of deterministic hidden states) and
 * prints how the routers spread the tokens over the experts of each MoE layer.
 *
 *   moert_example_c [MODEL_FILE] [ROWS]
 */
#include <moert/moert.h>
#include <stdio.h>
#include <stdlib.h>

/* Prints the status, frees it and reports whether it was an error. */
static int failed(moert_status* st, const char* what) {
  if (!st) return 0;
  fprintf(stderr, "%s: %s: %s\n", what, moert_status_code_name(moert_status_code(st)),
          moert_status_message(st));
  moert_status_free(st);
  return 1;
}

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "examples/models/tiny_moe.moert";
  const uint64_t rows = argc > 2 ? strtoull(argv[2], NULL, 10) : 256;
  int rc = 1;
  moert_model* model = NULL;
  moert_session_options* opts = NULL;
  moert_session* session = NULL;
  int32_t* tokens = NULL;
  float* hidden = NULL;
  float* out = NULL;
  int64_t* counts = NULL;

  if (moert_abi_version() != MOERT_ABI_VERSION) {
    fprintf(stderr, "libmoert ABI %u, this program was built for %u\n", moert_abi_version(),
            MOERT_ABI_VERSION);
    return 1;
  }
  printf("moert %s\n", moert_version_string());
  if (failed(moert_model_load_file(path, &model), "load")) goto done;

  const char* name = NULL;
  uint32_t num_layers = 0, in_width = 0, out_width = 0;
  int32_t input_kind = 0;
  uint64_t total = 0, activated = 0;
  if (failed(moert_model_name(model, &name), "name") ||
      failed(moert_model_num_layers(model, &num_layers), "layers") ||
      failed(moert_model_io(model, &input_kind, &in_width, &out_width), "io") ||
      failed(moert_model_num_parameters(model, &total, &activated), "parameters"))
    goto done;
  printf("model '%s' from %s: %u layers, %llu parameters, %llu activated per row\n", name, path,
         num_layers, (unsigned long long)total, (unsigned long long)activated);

  if (failed(moert_session_options_create(&opts), "options") ||
      failed(moert_session_options_set_threads(opts, 2), "threads") ||
      failed(moert_session_create(model, opts, &session), "session"))
    goto done;

  out = malloc(sizeof *out * rows * out_width);
  if (!out) goto done;
  if (input_kind == MOERT_INPUT_TOKENS) {
    /* A deterministic stream of token ids: row r holds ids (7r + c) mod 64 .. for c in the
     * window. */
    tokens = malloc(sizeof *tokens * rows * in_width);
    if (!tokens) goto done;
    for (uint64_t i = 0; i < rows * in_width; ++i) tokens[i] = (int32_t)((i * 7 + i / 3) % 64);
    if (failed(moert_session_forward_tokens(session, tokens, rows * in_width, rows, out,
                                            rows * out_width),
               "forward"))
      goto done;
  } else {
    /* Hidden states in [-1, 1) from a fixed integer hash of the position. */
    hidden = malloc(sizeof *hidden * rows * in_width);
    if (!hidden) goto done;
    for (uint64_t i = 0; i < rows * in_width; ++i)
      hidden[i] = (float)((i * 2654435761u) % 2048u) / 1024.0f - 1.0f;
    if (failed(moert_session_forward_hidden(session, hidden, rows * in_width, rows, out,
                                            rows * out_width),
               "forward"))
      goto done;
  }
  printf("forward: %llu rows -> %llu x %u outputs, out[0][0..3] = %.5f %.5f %.5f %.5f\n",
         (unsigned long long)rows, (unsigned long long)rows, out_width, out[0], out[1], out[2],
         out[3]);

  for (uint32_t l = 0; l < num_layers; ++l) {
    int32_t kind = 0;
    const char* lname = NULL;
    int64_t experts = 0, top_k = 0;
    double vio = 0.0;
    if (failed(moert_model_layer_kind(model, l, &kind), "kind")) goto done;
    if (kind != MOERT_LAYER_MOE) continue;
    if (failed(moert_model_layer_name(model, l, &lname), "name") ||
        failed(moert_model_moe_int(model, l, MOERT_MOE_NUM_EXPERTS, &experts), "experts") ||
        failed(moert_model_moe_int(model, l, MOERT_MOE_TOP_K, &top_k), "top_k"))
      goto done;
    free(counts);
    counts = malloc(sizeof *counts * (size_t)experts);
    if (!counts) goto done;
    if (failed(
            moert_session_expert_counts(session, l, MOERT_COUNTS_LAST, counts, (uint64_t)experts),
            "counts") ||
        failed(moert_session_max_vio(session, l, MOERT_COUNTS_LAST, &vio), "maxvio"))
      goto done;
    printf("layer %u '%s' (%lld experts, top-%lld): tokens per expert:", l, lname,
           (long long)experts, (long long)top_k);
    for (int64_t e = 0; e < experts; ++e) printf(" %lld", (long long)counts[e]);
    printf("  MaxVio %.3f\n", vio);
  }
  double mean_vio = 0.0;
  if (failed(moert_session_max_vio(session, MOERT_ALL_LAYERS, MOERT_COUNTS_LAST, &mean_vio),
             "maxvio"))
    goto done;
  printf("mean MaxVio over MoE layers: %.3f\n", mean_vio);
  rc = 0;

done:
  free(counts);
  free(out);
  free(hidden);
  free(tokens);
  moert_session_free(session);
  moert_session_options_free(opts);
  moert_model_free(model);
  return rc;
}
