/*
 * moert: an embeddable Mixture-of-Experts runtime. This is the only public header.
 *
 * Conventions that hold for every function below unless its comment says otherwise:
 *  - Errors: every fallible function returns a moert_status*. NULL means success. A non-NULL
 *    status carries a code (MOERT_ERR_*) and a message naming what is at fault; the caller owns
 *    it and releases it with moert_status_free(). On error, output parameters are left unchanged
 *    and every handle keeps the state it had before the call.
 *  - Handles are opaque. Each *_create / *_load has a matching *_free; every *_free accepts NULL.
 *  - Inputs are copied: the library keeps no pointer to caller memory after a call returns.
 *    Outputs go to caller-allocated buffers whose length (in elements) the caller passes, so a
 *    buffer of the wrong size is an error, never an overrun.
 *  - Strings returned as `const char*` are owned by the library and stay valid for the lifetime of
 *    the handle they came from.
 *  - Thread-safety: a moert_model is immutable after loading and may be used from any number of
 *    threads at once. A moert_session may be called from any thread; calls on one session are
 *    serialised by the session itself. A moert_session_options object must not be modified
 *    concurrently. Status objects are independent values.
 *  - No function throws, aborts or exits on bad input.
 */
#ifndef MOERT_MOERT_H
#define MOERT_MOERT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define MOERT_API __declspec(dllimport)
#elif defined(MOERT_BUILDING_LIBRARY)
#define MOERT_API __attribute__((visibility("default")))
#else
#define MOERT_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Versions ---------------------------------------------------------------------------- */

/* ABI major: changes only when an existing function or constant changes meaning or signature. It
 * is the SONAME's number (libmoert.so.1). Bindings compare it to moert_abi_version() at load. */
#define MOERT_ABI_VERSION 1
#define MOERT_VERSION_MAJOR 0
#define MOERT_VERSION_MINOR 1
#define MOERT_VERSION_PATCH 0

/* The ABI major the loaded library implements. Thread-safe; never fails. */
MOERT_API uint32_t moert_abi_version(void);

/* The library version as "MAJOR.MINOR.PATCH". Static storage; thread-safe; never fails. */
MOERT_API const char* moert_version_string(void);

/* Major and minor of the model-description schema this library reads. A model file with another
 * major is refused; any minor is read. Thread-safe; never fails. */
MOERT_API void moert_schema_version(uint32_t* major, uint32_t* minor);

/* ---- Status ------------------------------------------------------------------------------ */

#define MOERT_OK 0
#define MOERT_ERR_INVALID_ARGUMENT 1 /* NULL handle, wrong buffer size, out-of-range value */
#define MOERT_ERR_INVALID_MODEL 2    /* the model description is malformed or inconsistent */
#define MOERT_ERR_IO 3               /* a file could not be opened, read or written */
#define MOERT_ERR_OUT_OF_MEMORY 4    /* an allocation failed; the state is unchanged */
#define MOERT_ERR_UNSUPPORTED 5      /* valid request this build or device cannot serve */
#define MOERT_ERR_INVALID_STATE 6    /* the call is not allowed in the handle's current state */
#define MOERT_ERR_NUMERIC 7          /* NaN or infinity in an input or a result */
#define MOERT_ERR_INTERNAL 8         /* a bug in moert: please report it with the message */
#define MOERT_ERR_LIMIT 9            /* a load limit (moert_load_options) refuses the input */

typedef struct moert_status moert_status;

/* The status code; MOERT_OK for NULL. Thread-safe. */
MOERT_API int32_t moert_status_code(const moert_status* status);

/* The message, "" for NULL. Owned by the status: valid until moert_status_free(status). */
MOERT_API const char* moert_status_message(const moert_status* status);

/* Releases a status. Accepts NULL. */
MOERT_API void moert_status_free(moert_status* status);

/* A constant name for a code ("MOERT_ERR_IO"), "MOERT_ERR_UNKNOWN" for other values. */
MOERT_API const char* moert_status_code_name(int32_t code);

/* ---- Model ------------------------------------------------------------------------------- */

typedef struct moert_model moert_model;

/* Layer kinds, as returned by moert_model_layer_kind(). */
#define MOERT_LAYER_EMBEDDING 1
#define MOERT_LAYER_RMSNORM 2
#define MOERT_LAYER_MOE 3
#define MOERT_LAYER_DENSE_FFN 4
#define MOERT_LAYER_OUTPUT_HEAD 5

/* Input kinds, as returned by moert_model_input(). */
#define MOERT_INPUT_TOKENS 1 /* rows of token ids (int32); the first layer is an embedding */
#define MOERT_INPUT_HIDDEN 2 /* rows of hidden states (float) */

/* Loads and validates a binary model file (schemas/moert.fbs). External weights are read from the
 * file named by the model, relative to the model file's directory. The FlatBuffers verifier runs
 * first, then every field is checked for meaning; a defect gives MOERT_ERR_INVALID_MODEL with the
 * layer and field at fault, an unreadable file MOERT_ERR_IO. The default load limits apply (see
 * moert_load_options below: 1 GiB of tensors, 4 GiB read); a model that needs more is refused
 * with MOERT_ERR_LIMIT before anything is allocated. A checkpoint loads as a model: its training
 * state is verified against its digest, then dropped. On success *out receives a model the
 * caller frees with moert_model_free(). */
MOERT_API moert_status* moert_model_load_file(const char* path, moert_model** out);

/* As moert_model_load_file(), from `size` bytes at `data` (copied; no alignment required).
 * `external_dir` is the directory that a model with external weights resolves its data file
 * against; it may be NULL when the model has none. */
MOERT_API moert_status* moert_model_load_buffer(const void* data, size_t size,
                                                const char* external_dir, moert_model** out);

/* ---- Load limits ------------------------------------------------------------------------- */
/* A service that loads files it did not write bounds what a load may cost. A few hundred bytes of
 * description can declare gigabytes of initialised weights; the limits are checked on the totals
 * the description declares, after the FlatBuffers verifier and the checks of meaning and before
 * anything is allocated or read for the model, so a refused load costs a scan of the description.
 * A load over a limit fails with MOERT_ERR_LIMIT, whose message names the limit, the amount asked
 * for and the largest tensor. The limits, and their defaults (what the loads without options use):
 *   max_memory      1 GiB (2^30 bytes): the bytes the loaded model may hold: every tensor counted
 *                   as the fp32 values it is decoded or initialised to, whatever its source
 *                   (inline, external data, or an initialiser and a seed), plus a checkpoint's
 *                   training state when a session loads it. Never more than the machine's
 *                   physical memory, whatever is set.
 *   max_file_bytes  4 GiB (2^32 bytes): the bytes a load may read: the description plus the
 *                   ranges of external data it uses (a checkpoint's data file included). The
 *                   description's size is checked before it is read.
 * A moert_load_options object must not be modified concurrently; loads only read it, and it may
 * be freed once they return. */

typedef struct moert_load_options moert_load_options;

/* Creates load options with the defaults above. Free with moert_load_options_free(). */
MOERT_API moert_status* moert_load_options_create(moert_load_options** out);

/* Releases load options. Accepts NULL. */
MOERT_API void moert_load_options_free(moert_load_options* options);

/* Sets max_memory, in bytes (any value: 0 refuses every model, UINT64_MAX leaves physical memory
 * as the only bound). */
MOERT_API moert_status* moert_load_options_set_max_memory(moert_load_options* options,
                                                          uint64_t bytes);

/* Sets max_file_bytes, in bytes (any value). */
MOERT_API moert_status* moert_load_options_set_max_file_bytes(moert_load_options* options,
                                                              uint64_t bytes);

/* As moert_model_load_file(), within the limits of `options` (NULL: the defaults). */
MOERT_API moert_status* moert_model_load_file_with_options(const char* path,
                                                           const moert_load_options* options,
                                                           moert_model** out);

/* As moert_model_load_buffer(), within the limits of `options` (NULL: the defaults); `size` counts
 * towards max_file_bytes. */
MOERT_API moert_status* moert_model_load_buffer_with_options(const void* data, size_t size,
                                                             const char* external_dir,
                                                             const moert_load_options* options,
                                                             moert_model** out);

/* Releases a model. Accepts NULL. Sessions created from it stay valid: they hold what they need. */
MOERT_API void moert_model_free(moert_model* model);

/* The model's name ("" when it has none). */
MOERT_API moert_status* moert_model_name(const moert_model* model, const char** out);

/* Number of layers. */
MOERT_API moert_status* moert_model_num_layers(const moert_model* model, uint32_t* out);

/* Kind (MOERT_LAYER_*) of layer `index`. */
MOERT_API moert_status* moert_model_layer_kind(const moert_model* model, uint32_t index,
                                               int32_t* out);

/* Name of layer `index`; layers without a name in the file are named "layer<index>". */
MOERT_API moert_status* moert_model_layer_name(const moert_model* model, uint32_t index,
                                               const char** out);

/* Width of one input row and one output row of layer `index` (for an embedding, the input width
 * is its context window in tokens). Either pointer may be NULL. */
MOERT_API moert_status* moert_model_layer_dims(const moert_model* model, uint32_t index,
                                               uint32_t* in_width, uint32_t* out_width);

/* What a forward pass takes and returns: *input_kind is MOERT_INPUT_TOKENS or MOERT_INPUT_HIDDEN,
 * *input_width the values per input row (tokens per row, or hidden width), *output_width the values
 * per output row. Any pointer may be NULL. */
MOERT_API moert_status* moert_model_io(const moert_model* model, int32_t* input_kind,
                                       uint32_t* input_width, uint32_t* output_width);

/* Parameter counts: *total counts every parameter (routed experts, the loss-free bias excluded);
 * *activated counts those one input row uses (top_k routed experts per MoE layer, one embedding
 * row per context token). Either pointer may be NULL. */
MOERT_API moert_status* moert_model_num_parameters(const moert_model* model, uint64_t* total,
                                                   uint64_t* activated);

/* Integer configuration keys of a MoE layer, for moert_model_moe_int(). */
#define MOERT_MOE_DIM 1
#define MOERT_MOE_NUM_EXPERTS 2
#define MOERT_MOE_TOP_K 3
#define MOERT_MOE_EXPERT_HIDDEN 4
#define MOERT_MOE_SCORE_FUNCTION 5 /* MOERT_SCORE_* */
#define MOERT_MOE_NUM_GROUPS 6
#define MOERT_MOE_TOPK_GROUPS 7
#define MOERT_MOE_NORMALIZE_WEIGHTS 8 /* 0 or 1 */
#define MOERT_MOE_NUM_SHARED_EXPERTS 9
#define MOERT_MOE_SHARED_HIDDEN 10
#define MOERT_MOE_RESIDUAL 11         /* 0 or 1 */
#define MOERT_MOE_BALANCING_POLICY 12 /* MOERT_BALANCING_* */

/* Floating-point configuration keys of a MoE layer, for moert_model_moe_float(). */
#define MOERT_MOE_ROUTED_SCALING_FACTOR 101
#define MOERT_MOE_BIAS_UPDATE_RATE 102
#define MOERT_MOE_AUX_ALPHA 103
#define MOERT_MOE_CAPACITY_FACTOR 104

#define MOERT_SCORE_SIGMOID 0
#define MOERT_SCORE_SOFTMAX 1

#define MOERT_BALANCING_NONE 0
#define MOERT_BALANCING_LOSS_FREE_BIAS 1
#define MOERT_BALANCING_AUX_LOSS 2
#define MOERT_BALANCING_SEQUENCE_AUX_LOSS 3
#define MOERT_BALANCING_EXPERT_CHOICE 4

/* Reads an integer setting of MoE layer `index`. MOERT_ERR_INVALID_ARGUMENT when the layer is not
 * a MoE layer or the key is unknown. */
MOERT_API moert_status* moert_model_moe_int(const moert_model* model, uint32_t index, int32_t key,
                                            int64_t* out);

/* Reads a floating-point setting of MoE layer `index`; errors as moert_model_moe_int(). */
MOERT_API moert_status* moert_model_moe_float(const moert_model* model, uint32_t index, int32_t key,
                                              double* out);

/* ---- Session options --------------------------------------------------------------------- */

typedef struct moert_session_options moert_session_options;

#define MOERT_DEVICE_CPU 0
#define MOERT_DEVICE_CUDA 1

#define MOERT_MODE_INFERENCE 0
#define MOERT_MODE_TRAINING 1

/* Creates options with the defaults: CPU, 1 thread, seed 0, inference mode. Free with
 * moert_session_options_free(). */
MOERT_API moert_status* moert_session_options_create(moert_session_options** out);

/* Releases options. Accepts NULL. */
MOERT_API void moert_session_options_free(moert_session_options* options);

/* Device kind (MOERT_DEVICE_*) and index. MOERT_DEVICE_CUDA sessions run on the CUDA plugin,
 * libmoert_cuda.so, which moert_session_create() loads on first use from the directory of
 * libmoert.so (or from the "cuda_plugin" option), checks against this library's version and
 * never unloads. Where the plugin, the CUDA libraries or a Hopper GPU are missing,
 * moert_session_create() returns MOERT_ERR_UNSUPPORTED saying which; CPU sessions are unaffected.
 * On CUDA, GEMMs run in bf16 with fp32 accumulation and everything else in fp32; Expert Choice
 * layers are refused at their first forward pass (MOERT_ERR_UNSUPPORTED). */
MOERT_API moert_status* moert_session_options_set_device(moert_session_options* options,
                                                         int32_t device, int32_t index);

/* Worker threads for the session's CPU work, 1 to 1024. */
MOERT_API moert_status* moert_session_options_set_threads(moert_session_options* options,
                                                          uint32_t threads);

/* Seed for everything random the session does. */
MOERT_API moert_status* moert_session_options_set_seed(moert_session_options* options,
                                                       uint64_t seed);

/* MOERT_MODE_INFERENCE or MOERT_MODE_TRAINING. */
MOERT_API moert_status* moert_session_options_set_mode(moert_session_options* options,
                                                       int32_t mode);

/* Backend knob by name. Known keys:
 *   "check_finite"  "true" (default) | "false": refuse NaN or infinity in hidden-state inputs
 *                   with MOERT_ERR_NUMERIC before any work is done.
 *   "cuda_plugin"   path of libmoert_cuda.so, when it is not beside libmoert.so (a process loads
 *                   one plugin: a second, different path is refused).
 *   and the training knobs listed under Training below.
 * An unknown key or a value it does not accept is MOERT_ERR_INVALID_ARGUMENT. */
MOERT_API moert_status* moert_session_options_set_config(moert_session_options* options,
                                                         const char* key, const char* value);

/* ---- Session ----------------------------------------------------------------------------- */

typedef struct moert_session moert_session;

/* Creates a session over `model` with `options` (NULL: defaults). The session keeps what it needs
 * of the model: the model may be freed afterwards. Free with moert_session_free().
 * MOERT_ERR_UNSUPPORTED when the options ask for a device or mode this build cannot serve. */
MOERT_API moert_status* moert_session_create(const moert_model* model,
                                             const moert_session_options* options,
                                             moert_session** out);

/* Releases a session. Accepts NULL. Must not race with another call on the same session. */
MOERT_API void moert_session_free(moert_session* session);

/* Forward pass over `rows` rows of token ids (a model whose input is MOERT_INPUT_TOKENS).
 * `tokens` holds rows * input_width ids, row-major, each in [0, vocab_size); `num_tokens` is its
 * length. `out` receives rows * output_width floats; `out_len` is its length. */
MOERT_API moert_status* moert_session_forward_tokens(moert_session* session, const int32_t* tokens,
                                                     uint64_t num_tokens, uint64_t rows, float* out,
                                                     uint64_t out_len);

/* Forward pass over `rows` rows of hidden states (a model whose input is MOERT_INPUT_HIDDEN).
 * `in` holds rows * input_width floats (`in_len`), `out` receives rows * output_width (`out_len`).
 */
MOERT_API moert_status* moert_session_forward_hidden(moert_session* session, const float* in,
                                                     uint64_t in_len, uint64_t rows, float* out,
                                                     uint64_t out_len);

/* ---- Routing metrics ---------------------------------------------------------------------- */

/* Which token counts a metrics call reads. */
#define MOERT_COUNTS_LAST 0 /* the last forward pass: MaxVio_batch */
#define MOERT_COUNTS_STEP 1 /* training-mode passes since the last optimizer step */
#define MOERT_COUNTS_EVAL                                           \
  2 /* eval-mode and inference passes since the last metrics reset: \
       MaxVio_global over an evaluation set */

/* Selects every MoE layer where a function takes a layer index and says so. */
#define MOERT_ALL_LAYERS 0xFFFFFFFFu

/* Tokens routed to each expert of MoE layer `layer` in `scope` (MOERT_COUNTS_*): `counts`
 * receives num_experts integers (`len`). All zero before any counted pass. */
MOERT_API moert_status* moert_session_expert_counts(const moert_session* session, uint32_t layer,
                                                    int32_t scope, int64_t* counts, uint64_t len);

/* MaxVio = (max_i count_i - mean count) / mean count over `scope`, for MoE layer `layer`, or the
 * mean over all MoE layers with MOERT_ALL_LAYERS. 0 when nothing was counted. */
MOERT_API moert_status* moert_session_max_vio(const moert_session* session, uint32_t layer,
                                              int32_t scope, double* out);

/* Zeroes the MOERT_COUNTS_EVAL counts of every MoE layer (start of an evaluation pass). */
MOERT_API moert_status* moert_session_reset_metrics(moert_session* session);

/* ---- Training ---------------------------------------------------------------------------- */
/* All functions below need a session created with MOERT_MODE_TRAINING and return
 * MOERT_ERR_INVALID_STATE otherwise. Such a session trains its own copy of the parameters.
 *
 * A training step: moert_session_zero_grad(); for each micro-batch, a forward pass then
 * moert_session_backward_loss() (or moert_session_backward()); then moert_session_step(). Every
 * training-mode forward pass counts its tokens per expert (integers) for the loss-free bias update
 * that moert_session_step() applies; eval-mode passes count nothing towards it.
 *
 * Training knobs go through moert_session_options_set_config() or moert_session_set_config():
 *   "optimizer" adamw (default) | sgd        "lr" (1e-3)            "min_lr" (0)
 *   "weight_decay" (0; decoupled for AdamW, L2 for SGD; matrices only)
 *   "beta1" (0.9) "beta2" (0.999) "eps" (1e-8)  AdamW      "momentum" (0.9)  SGD
 *   "clip_norm" (0 = off): clip the global gradient norm
 *   "warmup_steps" (0): linear warm-up; "total_steps" (0 = constant): cosine decay to min_lr
 *   "sequence_length" (0 = the whole batch): rows per sequence for the sequence-wise aux loss */

/* Softmax cross-entropy of the last training-mode forward pass's logits against `targets` (one id
 * per row, `num_targets` = rows), averaged over rows, plus the auxiliary balancing losses of the
 * MoE layers; gradients of all parameters are accumulated. *loss (may be NULL) receives the loss.
 * Needs an OutputHead as the last layer, and one backward per forward (MOERT_ERR_INVALID_STATE). */
MOERT_API moert_status* moert_session_backward_loss(moert_session* session, const int32_t* targets,
                                                    uint64_t num_targets, double* loss);

/* Backward from a caller-given gradient of the last training-mode forward pass's outputs
 * (`grad_out`, rows * output_width floats). When `grad_in` is not NULL (hidden-state models only)
 * it receives the gradient of the inputs (`grad_in_len` = rows * input_width). *aux_loss (may be
 * NULL) receives the auxiliary balancing losses, whose gradients are included. */
MOERT_API moert_status* moert_session_backward(moert_session* session, const float* grad_out,
                                               uint64_t grad_out_len, float* grad_in,
                                               uint64_t grad_in_len, double* aux_loss);

/* Zeroes the accumulated gradients and the micro-batch count. */
MOERT_API moert_status* moert_session_zero_grad(moert_session* session);

/* One optimizer step over the gradients accumulated since moert_session_zero_grad(), averaged over
 * the micro-batches (backward calls) since then, clipped if configured; then the loss-free bias
 * update of every MoE layer from the integer token counts of the step,
 * b_i += gamma * sign(mean - count_i), and a new count. Gradients are not zeroed. *lr and
 * *grad_norm (either may be NULL) receive the learning rate used and the gradient norm before
 * clipping. MOERT_ERR_NUMERIC (parameters unchanged) when the gradient is not finite. */
MOERT_API moert_status* moert_session_step(moert_session* session, double* lr, double* grad_norm);

/* Optimizer steps taken (restored from checkpoints). */
MOERT_API moert_status* moert_session_step_count(const moert_session* session, uint64_t* out);

/* eval != 0: forward passes neither keep state for backward nor count towards the bias update;
 * they add to the MOERT_COUNTS_EVAL metrics. eval == 0: back to training. */
MOERT_API moert_status* moert_session_set_eval(moert_session* session, int32_t eval);

/* A training knob by name (list above), for this session from now on. */
MOERT_API moert_status* moert_session_set_config(moert_session* session, const char* key,
                                                 const char* value);

/* Number of trainable parameter tensors. */
MOERT_API moert_status* moert_session_num_parameters(const moert_session* session, uint32_t* out);

/* Name ("<layer name>.<tensor>", e.g. "moe0.w1") and element count of parameter `index`. The name
 * is owned by the session. Either output may be NULL. */
MOERT_API moert_status* moert_session_parameter_info(const moert_session* session, uint32_t index,
                                                     const char** name, uint64_t* numel);

/* Copies parameter `name` (numel floats, row-major) out or in. Writing refuses NaN or infinity. */
MOERT_API moert_status* moert_session_get_parameter(const moert_session* session, const char* name,
                                                    float* out, uint64_t len);
MOERT_API moert_status* moert_session_set_parameter(moert_session* session, const char* name,
                                                    const float* in, uint64_t len);

/* Copies the accumulated gradient of parameter `name` out or in (for users with their own
 * optimizer: read gradients, write parameters). */
MOERT_API moert_status* moert_session_get_gradient(const moert_session* session, const char* name,
                                                   float* out, uint64_t len);
MOERT_API moert_status* moert_session_set_gradient(moert_session* session, const char* name,
                                                   const float* in, uint64_t len);

/* The loss-free balancing bias (num_experts fp32 values) of MoE layer `layer`. It steers expert
 * selection only and receives no gradient. Reading works in every mode. */
MOERT_API moert_status* moert_session_get_expert_bias(const moert_session* session, uint32_t layer,
                                                      float* out, uint64_t len);
MOERT_API moert_status* moert_session_set_expert_bias(moert_session* session, uint32_t layer,
                                                      const float* in, uint64_t len);

/* The bias update rate gamma (>= 0; 0 stops updates) of MoE layer `layer` or MOERT_ALL_LAYERS,
 * from the next step on: schedule it by calling this between steps. */
MOERT_API moert_status* moert_session_set_bias_update_rate(moert_session* session, uint32_t layer,
                                                           double gamma);

/* Freezes (frozen != 0) or thaws the bias of MoE layer `layer` or MOERT_ALL_LAYERS. */
MOERT_API moert_status* moert_session_set_bias_frozen(moert_session* session, uint32_t layer,
                                                      int32_t frozen);

/* ---- Checkpoints ------------------------------------------------------------------------- */

/* Writes a checkpoint: a model file (loadable with moert_model_load_file) holding this session's
 * parameters and biases, plus its training state (step, gradients, optimizer moments, balancing
 * counts and rates, RNG) and an XXH3-64 digest of that content. Every array of 64 KiB or more
 * goes to a data file beside it, "<file name of path>.<16 hex digits of the digest>.data", with
 * each array at a 64-byte-aligned offset; smaller ones stay in the description (so checkpoints of
 * any size, past the 2 GiB of a FlatBuffers file). Both files' bytes depend on the content alone.
 * Written atomically: the data file, then the description, each to a temporary file in the same
 * directory, fsync'ed and renamed into place; a process killed at any point leaves at `path` the
 * previous checkpoint or the new one, whole. Data files of earlier checkpoints at `path` (and
 * temporary files of interrupted saves) are removed afterwards: one writer per path at a time,
 * and a reader of the previous checkpoint at the same moment may then fail with MOERT_ERR_IO.
 * MOERT_ERR_IO when it cannot be written; the previous checkpoint at `path` is then intact. */
MOERT_API moert_status* moert_session_save(const moert_session* session, const char* path);

/* Restores a checkpoint written by moert_session_save() for the same architecture. The file is
 * verified like any model and its content checked against its digest; a corrupt or truncated
 * file, another architecture or another optimizer is refused and the session keeps its state.
 * The load limits are those of this session's architecture: a checkpoint may hold and read at most
 * four times the bytes of its parameters and biases (values, gradients, two optimizer moments)
 * plus 1 MiB and 4 KiB per tensor for the description; more is MOERT_ERR_LIMIT. Checkpoints of
 * schema 1.0 (moert 0.1.0), whose digest depended on the writer's compiler, are refused as
 * unverifiable (MOERT_ERR_INVALID_MODEL). Training then continues bit-identically to the run that
 * wrote the checkpoint. */
MOERT_API moert_status* moert_session_load(moert_session* session, const char* path);

/* As moert_session_load(), within the limits of `options` too (NULL: the session's alone). */
MOERT_API moert_status* moert_session_load_with_options(moert_session* session, const char* path,
                                                        const moert_load_options* options);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOERT_MOERT_H */
