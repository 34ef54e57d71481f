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
 *    Outputs go to caller-allocated buffers whose length (in elements) the caller passes. Unless
 *    a function says otherwise (a profile and an NCCL id take a minimum, a batcher's figures any
 *    length), it must be exactly the length the function writes: a buffer of another size, a
 *    larger one too (which usually means a mistaken shape), is MOERT_ERR_INVALID_ARGUMENT, never
 *    an overrun.
 *  - Strings returned as `const char*` are owned by the library and stay valid for the lifetime of
 *    the handle they came from.
 *  - Thread-safety: a moert_model is immutable after loading and may be used from any number of
 *    threads at once. A moert_session may be called from any thread; calls on one session are
 *    serialised by the session itself, calls on different sessions run in parallel. A
 *    moert_session_options object must not be modified concurrently; any number of calls may
 *    read it at once. Status objects are independent values. Model loads, the *_create of
 *    options objects and the version and code-name queries may run on any threads at once. A
 *    *_free must not race with another call on its handle (but moert_session_free() waits for
 *    calls in progress: see there).
 *  - Signals: a call that computes on the CPU blocks the asynchronous signals (all but SIGSEGV,
 *    SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS) on the calling thread while it computes and restores
 *    the thread's mask before it returns; the library's own threads never take them. A signal
 *    sent meanwhile goes to another thread of the process, or waits on the calling thread until
 *    the call lets it in: between two pieces of its work once 10 ms have passed since the mask
 *    was last open (a piece is at most a few milliseconds of GEMMs for a typical layer), or at
 *    the call's end; its handler then runs on the calling thread's own stack. Reason: oneDNN's
 *    generated GEMM kernels move the stack pointer into the heap (oneDNN issue 4845).
 *  - No function throws, aborts or exits on bad input.
 *  - Exit: the process may exit while calls compute on other threads; at exit the library lets
 *    the calls in flight finish (up to 10 s) and later ones fail with MOERT_ERR_INVALID_STATE,
 *    before oneDNN tears its kernels down. No computation can be relied on from an atexit
 *    handler or a static destructor, whenever it was registered: the library's own exit hook is
 *    registered again as it runs, so it comes before any handler the host registered earlier.
 *  - fork(): sessions and batchers run threads, which a child of fork() does not inherit. In the
 *    child every call on a session or batcher made before the fork fails with
 *    MOERT_ERR_INVALID_STATE (even one whose lock a parent thread held at the fork), and its
 *    *_free releases the handle without waiting for the parent's threads (leaving the memory they
 *    used, a copy of the parent's, as it is; requests queued in a batcher are the parent's to
 *    answer). Models, options and statuses carry on working, and the child makes its own
 *    sessions over them, unless another parent thread was creating a session or batcher over the
 *    same model at the fork (the model's cache of weight copies stays locked in the child: a
 *    pre-fork server forks before it serves). Communicators are the parent's: MPI does not
 *    survive fork(). A batcher callback that forks must not return in the child (exec or _exit
 *    there): the thread it returns to is the parent's batcher's. A save holds a file lock
 *    (moert_session_save()) that a child does not share: its descriptors are closed in the child
 *    by a pthread_atfork handler, which fork() runs (vfork(), posix_spawn() and a raw clone() do
 *    not, and need not when they exec). A fork() does not wait for a save's open of such a file
 *    (an open on a stuck file system can block for good); a fork during one makes the save open
 *    the file a second time, and that open the fork waits for. A fork() also waits for the
 *    GEMMs that other threads are running to return (10 s at most), and GEMMs that begin
 *    meanwhile wait for it, so that the child does not inherit a lock oneDNN held in another
 *    thread (its first GEMM could wait on one for good).
 *  - Status messages are one line of valid UTF-8: text taken from a file (a model's or layer's
 *    name, say) is quoted with every byte that is not part of valid UTF-8, and every ASCII control
 *    character (newline, tab, NUL, DEL, ...), written as \xNN.
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
 * major is refused; any minor is read. Either pointer may be NULL. Thread-safe; never fails. */
MOERT_API void moert_schema_version(uint32_t* major, uint32_t* minor);

/* ---- Status ------------------------------------------------------------------------------ */

#define MOERT_OK 0
#define MOERT_ERR_INVALID_ARGUMENT 1 /* NULL handle, wrong buffer size, out-of-range value */
#define MOERT_ERR_INVALID_MODEL 2    /* the model description is malformed or inconsistent */
#define MOERT_ERR_IO 3               /* a file could not be opened, read or written */
#define MOERT_ERR_OUT_OF_MEMORY 4    /* an allocation failed; the state is unchanged */
#define MOERT_ERR_UNSUPPORTED 5      /* valid request this build or device cannot serve */
#define MOERT_ERR_INVALID_STATE 6    /* the call is not allowed in the handle's current state */
#define MOERT_ERR_NUMERIC 7  /* NaN or infinity in an input, or in a result from finite inputs */
#define MOERT_ERR_INTERNAL 8 /* a bug in moert: please report it with the message */
#define MOERT_ERR_COMM 9     /* a collective failed or timed out; the communicator is broken */
#define MOERT_ERR_LIMIT 10   /* a load limit (moert_load_options) refuses the input */

typedef struct moert_status moert_status;

/* The status code; MOERT_OK for NULL. Thread-safe. */
MOERT_API int32_t moert_status_code(const moert_status* status);

/* The message, "" for NULL. Owned by the status: valid until moert_status_free(status). */
MOERT_API const char* moert_status_message(const moert_status* status);

/* Releases a status, once, from any thread. Accepts NULL. */
MOERT_API void moert_status_free(moert_status* status);

/* A constant name for a code ("MOERT_ERR_IO"; "MOERT_OK" for 0), "MOERT_ERR_UNKNOWN" for other
 * values. Static storage; thread-safe; never fails. */
MOERT_API const char* moert_status_code_name(int32_t code);

/* ---- Model ------------------------------------------------------------------------------- */

typedef struct moert_model moert_model;

/* Layer kinds, as returned by moert_model_layer_kind(). */
#define MOERT_LAYER_EMBEDDING 1
#define MOERT_LAYER_RMSNORM 2
#define MOERT_LAYER_MOE 3
#define MOERT_LAYER_DENSE_FFN 4
#define MOERT_LAYER_OUTPUT_HEAD 5

/* Input kinds, as moert_model_io() reports them. */
#define MOERT_INPUT_TOKENS 1 /* rows of token ids (int32); the first layer is an embedding */
#define MOERT_INPUT_HIDDEN 2 /* rows of hidden states (float) */

/* Loads and validates a binary model file (schemas/moert.fbs). External weights are read from the
 * file named by the model, relative to the model file's directory. The FlatBuffers verifier runs
 * first, then every field is checked for meaning; a defect gives MOERT_ERR_INVALID_MODEL with the
 * layer and field at fault; a path that cannot be opened or read, or that names no regular file
 * (a directory, a FIFO), MOERT_ERR_IO. The default load limits apply (see
 * moert_load_options below: 1 GiB of tensors, 4 GiB read); a model that needs more is refused
 * with MOERT_ERR_LIMIT before anything is allocated. A checkpoint loads as a model: its training
 * state is verified against its digest, then dropped. On success *out receives a model the
 * caller frees with moert_model_free(). */
MOERT_API moert_status* moert_model_load_file(const char* path, moert_model** out);

/* As moert_model_load_file(), from `size` bytes at `data` (copied; no alignment required).
 * `external_dir` is the directory that a model with external weights resolves its data file
 * against; it may be NULL when the model has none (for one that has, NULL is
 * MOERT_ERR_INVALID_ARGUMENT); "" is the same as NULL. `data` NULL is MOERT_ERR_INVALID_ARGUMENT,
 * also with `size` 0. */
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
 *                   as it is held (moert_model_tensor_info): FP8 tensors in 128x128 blocks as
 *                   their codes and scales, every other as the fp32 values it is decoded or
 *                   initialised to, whatever its source (inline, external data, or an
 *                   initialiser and a seed); plus a checkpoint's training state when a session
 *                   loads it (whose weights are decoded to fp32). Never more than the machine's
 *                   physical memory, whatever is set.
 *   max_file_bytes  4 GiB (2^32 bytes): the bytes a load may read: the description plus the
 *                   ranges of external data it uses (a checkpoint's data file included). The
 *                   description's size is checked before it is read.
 * And one rule about where a load may read, off by default:
 *   confine_external_data  the external data file (a checkpoint's included) must be reached
 *                   without leaving the model's directory: the directory it is looked up in (that
 *                   of the model file's path as given, opened once for the model file and its
 *                   data, or external_dir; in the process's root directory every file lies
 *                   inside). A link there named as the data file otherwise makes any file the
 *                   process can read the model's weights: a service loading folders it did not
 *                   write turns it on. Off by default because content stores link every file
 *                   from elsewhere (the Hugging Face hub cache's snapshots/ into blobs/,
 *                   git-annex, DVC): such a folder is refused when it is on. How it is checked:
 *                   - the kernel resolves the name beneath the directory (openat2 with
 *                     RESOLVE_BENEATH, Linux 5.6) and refuses any step out of it before anything
 *                     outside is opened; a link swapped in meanwhile changes nothing. An absolute
 *                     link, or ".." out and back in, is refused there even when it ends inside;
 *                     relative links that stay inside load. A lookup that keeps racing renames
 *                     elsewhere on the system (the kernel's EAGAIN, retried 64 times) fails with
 *                     MOERT_ERR_IO, and the load may be retried;
 *                   - where openat2 is not available (an older kernel, a sandbox that filters
 *                     it), the file is opened, then refused when /proc/self/fd does not show it
 *                     inside the directory, or cannot be read (without /proc every confined load
 *                     with external data fails). This way compares paths as /proc shows them: it
 *                     judges where the file lies, not the way to it (an absolute link that ends
 *                     inside loads; a dangling link is MOERT_ERR_IO where the first way says
 *                     MOERT_ERR_INVALID_MODEL), and a directory of another mount namespace
 *                     (under /proc/<pid>/root) is not confined by it.
 *                   A hard link is the file itself, and is not refused. Names with ".." or an
 *                   absolute path are refused whatever this says (MOERT_ERR_INVALID_MODEL).
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

/* Sets confine_external_data: non-zero on, 0 off (the default). A data file reached by a way out
 * of the directory fails the load with MOERT_ERR_INVALID_MODEL, as a ".." in its name does,
 * naming the directory, the option and, where its links resolve, the file they lead to. */
MOERT_API moert_status* moert_load_options_set_confine_external_data(moert_load_options* options,
                                                                     int32_t confine);

/* Sets description_only: non-zero on, 0 off (the default). On, a load reads and checks the
 * description alone: every check of the layers' and tensors' meaning runs as in a full load, but
 * no tensor is read, decoded or initialised and the external data file is neither opened nor
 * needed (its name is still checked, but not its presence, its length, nor where its links lead:
 * confine_external_data has nothing to judge). No value is checked for NaN or infinity.
 * max_memory does not apply (no tensor is held); max_file_bytes bounds the description's size.
 * Its cost is that of the description's layers -- the same time and memory as a full load spends
 * on them, about 20 us and 1.3 KB per layer on a 2-vCPU machine -- and nothing for the tensors,
 * whatever their size: a tool can show a DeepSeek-V3-sized layout, or a file whose description a
 * flipped bit has changed, without building its weights.
 * The model answers the calls that describe it as a full load of the same file would:
 * moert_model_num_parameters(), moert_model_tensor_info() (numel, stored and held types, and
 * `bytes`: what the tensor would hold loaded), moert_model_resident_bytes() (likewise; totals
 * past 2^64 are UINT64_MAX, where a full load is refused by its limits), the layer and MoE
 * queries, and for a checkpoint moert_model_checkpoint_step() and the MOERT_MOE_SAVED_* keys. A
 * checkpoint's optimizer state is neither read nor checked, and its digest, which covers the
 * weights, is not verified. Everything that needs the weights refuses the model with
 * MOERT_ERR_INVALID_ARGUMENT: moert_session_create(), moert_batcher_create(),
 * moert_model_save_file() and moert_model_quantize_fp8(). moert_session_load_with_options() with
 * such options is refused too (MOERT_ERR_INVALID_ARGUMENT in a training session; an inference
 * session refuses every checkpoint with MOERT_ERR_INVALID_STATE). */
MOERT_API moert_status* moert_load_options_set_description_only(moert_load_options* options,
                                                                int32_t description_only);

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

/* Releases a model. Accepts NULL. Must not race with another call on the model; the strings it
 * returned may not be used afterwards. Sessions and batchers created from it stay valid: they
 * hold what they need. */
MOERT_API void moert_model_free(moert_model* model);

/* The model's name ("" when it has none). */
MOERT_API moert_status* moert_model_name(const moert_model* model, const char** out);

/* Number of layers. The functions below that take a layer `index` accept 0 to this - 1 and
 * refuse any other with MOERT_ERR_INVALID_ARGUMENT. */
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

/* The number of token ids a MOERT_INPUT_TOKENS model accepts: valid ids are 0 to *out - 1. For
 * callers that check requests before they run them (a service reporting the row and column of a
 * bad id). MOERT_ERR_INVALID_ARGUMENT for a model that takes hidden states. */
MOERT_API moert_status* moert_model_vocab_size(const moert_model* model, uint32_t* out);

/* Parameter counts: *total counts every parameter, the routed experts included and the loss-free
 * bias excluded; *activated counts those one input row uses (top_k routed experts per MoE layer,
 * one embedding row per context token). Either pointer may be NULL. */
MOERT_API moert_status* moert_model_num_parameters(const moert_model* model, uint64_t* total,
                                                   uint64_t* activated);

/* What a MoE layer computes for a row x (DeepSeek-V3 technical report section 2.1.2, eq. 12-16;
 * the keys below configure it): scores s = sigmoid or softmax (MOERT_MOE_SCORE_FUNCTION) of the
 * router's logits; with num_groups > topk_groups only the experts of the topk_groups groups
 * (equal slices of the experts) whose two best s + bias sum highest can be chosen (as in
 * DeepSeek-V3's inference/model.py, class Gate, with a bias); the top_k experts of largest s + bias
 * are chosen, ties to the lower index; their gate weights are their unbiased s, divided by the
 * chosen experts' sum with normalize_weights, times routed_scaling_factor. The output is the
 * weighted sum of the chosen SwiGLU experts, w2 (silu(w1 x) * (w3 x)), plus each shared expert
 * (unweighted), plus x with residual. An ExpertChoice layer instead lets each expert take the
 * min(rows, ceil(capacity_factor * rows * top_k / num_experts)) rows of highest s, ties to the
 * lower row, weighted by s times routed_scaling_factor (Zhou et al., arXiv 2202.09368). */

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
#define MOERT_MOE_BIAS_CENTERING \
  13                             /* 0 or 1: the loss-free bias loses its mean after each update */
#define MOERT_MOE_BIAS_FROZEN 14 /* 0 or 1: the loss-free bias is not updated at all */
/* A checkpoint's training state as saved (see moert_model_checkpoint_step()): the freeze in force
 * when it was saved, which moert_session_set_bias_frozen() may have changed from the description's
 * MOERT_MOE_BIAS_FROZEN. */
#define MOERT_MOE_SAVED_BIAS_FROZEN 15 /* 0 or 1 */

/* Floating-point configuration keys of a MoE layer, for moert_model_moe_float(). */
#define MOERT_MOE_ROUTED_SCALING_FACTOR 101
#define MOERT_MOE_BIAS_UPDATE_RATE 102
#define MOERT_MOE_AUX_ALPHA 103
#define MOERT_MOE_CAPACITY_FACTOR 104
/* A checkpoint's loss-free bias update rate in force when it was saved (a schedule or
 * moert_session_set_bias_update_rate() may have moved it from MOERT_MOE_BIAS_UPDATE_RATE). For a
 * layer of another balancing policy both keys answer the rate its file stores, which nothing uses
 * (moert_session_set_bias_update_rate() refuses such a layer). */
#define MOERT_MOE_SAVED_BIAS_UPDATE_RATE 105

#define MOERT_SCORE_SIGMOID 0
#define MOERT_SCORE_SOFTMAX 1

#define MOERT_BALANCING_NONE 0
#define MOERT_BALANCING_LOSS_FREE_BIAS 1
#define MOERT_BALANCING_AUX_LOSS 2
#define MOERT_BALANCING_SEQUENCE_AUX_LOSS 3
#define MOERT_BALANCING_EXPERT_CHOICE 4

/* Reads an integer setting of MoE layer `index`. MOERT_ERR_INVALID_ARGUMENT when the layer is not
 * a MoE layer or the key is unknown, or for a MOERT_MOE_SAVED_* key when the model was not loaded
 * from a checkpoint. */
MOERT_API moert_status* moert_model_moe_int(const moert_model* model, uint32_t index, int32_t key,
                                            int64_t* out);

/* Reads a floating-point setting of MoE layer `index`; errors as moert_model_moe_int(). */
MOERT_API moert_status* moert_model_moe_float(const moert_model* model, uint32_t index, int32_t key,
                                              double* out);

/* Whether `model` was loaded from a checkpoint (a model file with training state, which loading
 * verifies against its digest -- except description-only -- and then drops; moert_session_load()
 * resumes it): then *is_checkpoint is 1 and *step the optimizer steps its run had taken, else both
 * are 0. The balancing state it held is read with the MOERT_MOE_SAVED_* keys. A model that
 * moert_model_quantize_fp8() made is not a checkpoint. MOERT_ERR_INVALID_ARGUMENT for a NULL
 * pointer. */
MOERT_API moert_status* moert_model_checkpoint_step(const moert_model* model,
                                                    int32_t* is_checkpoint, uint64_t* step);

/* ---- Weights as held, FP8 models -------------------------------------------------------- */

/* Element types of weights (the schema's DType). */
#define MOERT_DTYPE_F32 0
#define MOERT_DTYPE_BF16 1
#define MOERT_DTYPE_F8E4M3 2 /* OCP FP8 E4M3 codes with one fp32 scale per block */

/* Number of weight tensors of layer `index`, absent optional ones (an output head's bias, the
 * shared experts of a MoE layer without any) not counted. */
MOERT_API moert_status* moert_model_num_tensors(const moert_model* model, uint32_t index,
                                                uint32_t* out);

/* Weight tensor `tensor` (0 to moert_model_num_tensors() - 1, in the schema's field order, a MoE
 * layer's loss-free bias "gate_bias" last) of layer `index`:
 *   *name          the schema's field name ("w1", "shared_w2", "weight"): a static string, valid
 *                  for the life of the process;
 *   *stored_dtype  the element type the model file stored it in (MOERT_DTYPE_*; F32 for a tensor
 *                  made by an initialiser, F8E4M3 for one moert_model_quantize_fp8() made);
 *   *held_dtype    how the loaded model holds it in memory: MOERT_DTYPE_F8E4M3 for an FP8 tensor
 *                  in 128x128 blocks (DeepSeek-V3's layout; kept as its codes, 1 byte per value,
 *                  plus one fp32 scale per block), MOERT_DTYPE_F32 for every other (decoded at
 *                  load: BF16, and FP8 in other block shapes);
 *   *numel         its elements;
 *   *bytes         the bytes it takes in memory as held (an FP8 tensor's scales included, each
 *                  row of block scales padded to a multiple of 4 floats); for a model loaded
 *                  description-only, the bytes a full load of its file would hold.
 * Any output may be NULL. MOERT_ERR_INVALID_ARGUMENT for an index out of range. */
MOERT_API moert_status* moert_model_tensor_info(const moert_model* model, uint32_t index,
                                                uint32_t tensor, const char** name,
                                                int32_t* stored_dtype, int32_t* held_dtype,
                                                uint64_t* numel, uint64_t* bytes);

/* The bytes the model's weights take in memory as held: the sum of moert_model_tensor_info()'s
 * *bytes over every tensor of every layer (what max_memory bounds at load; for a model loaded
 * description-only, what a full load of its file would hold). */
MOERT_API moert_status* moert_model_resident_bytes(const moert_model* model, uint64_t* out);

/* Flags of moert_model_quantize_fp8(). */
#define MOERT_FP8_POWER_OF_TWO_SCALES 1 /* scales rounded up to powers of two (UE8M0) */

/* A new model: `model` with its MoE layers' routed and shared expert weights (w1, w3, w2,
 * shared_w1, shared_w3, shared_w2) quantized to FP8 E4M3 in 128x128 blocks, one fp32 scale per
 * block (scale = amax / 448, DeepSeek-V3 technical report section 3.3; rounded up to a power of
 * two with MOERT_FP8_POWER_OF_TWO_SCALES, as DeepSeek-V3.1 and DeepGEMM's UE8M0 scales are; at
 * least 2^-126, the smallest normal float, so values below 2^-136 -- half the smallest E4M3 step
 * at that scale -- become zeros), codes rounded to nearest even and saturating at 448, and at
 * the largest code whose value times the scale is a finite float (values from 248 * 2^120,
 * about 3.3e38, in a block with a power-of-two scale of 2^120 stop at 240 * 2^120 rather than
 * round up to 2^128, infinity). Every other tensor is unchanged; an expert weight that is FP8
 * already is kept as it is. The new model holds the experts at 1 byte per value: a session's fp32
 * forward multiplies their decoded values (code * scale), training starts from them. *quantized
 * (may be NULL) receives the number of tensors quantized: 0 for a model without MoE layers (the new
 * model is then a copy). On success *out receives a model the caller frees with moert_model_free();
 * `model` is unchanged. MOERT_ERR_INVALID_ARGUMENT for unknown flags, and for a model loaded
 * description-only (moert_load_options_set_description_only()). Thread-safe: `model` is only
 * read. */
MOERT_API moert_status* moert_model_quantize_fp8(const moert_model* model, uint32_t flags,
                                                 moert_model** out, uint32_t* quantized);

/* Writes `model` as a binary model file at `path`, atomically (a temporary file renamed over
 * `path`; a crash leaves the previous file or the new one, whole). Weights are written as the
 * model holds them: fp32 as F32 (initialised tensors with their values), FP8 tensors as F8E4M3
 * with their 128x128 block scales, byte for byte as loaded or quantized. Arrays of 64 KiB or more
 * go to an external data file beside it, "<file name>.<16 hex digits>.data", named by the
 * model's content digest; data files of earlier saves to `path` are removed unless a description in
 * the directory still names one (a copy of an earlier file). MOERT_ERR_IO when a
 * file cannot be written, MOERT_ERR_UNSUPPORTED when the description would exceed FlatBuffers'
 * 2 GiB, MOERT_ERR_INVALID_ARGUMENT when `path` names a directory, a device, a FIFO or a
 * symbolic link, or when its file name is too long for the files written beside it (the data
 * file's name is 22 bytes longer, the temporary file's 12), or when the model was loaded
 * description-only (moert_load_options_set_description_only()): nothing is replaced. Concurrent
 * saves into one directory take turns, as moert_session_save()'s do; `model` is only read. */
MOERT_API moert_status* moert_model_save_file(const moert_model* model, const char* path);

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
 * libmoert_cuda.so.1, which moert_session_create() loads on first use from the directory of
 * libmoert's real file, then of the name it was loaded by (README.md, "Plugins"; or from the
 * "cuda_plugin" option), checks against this library's version and never unloads. Where the
 * plugin, the CUDA libraries or a Hopper GPU are missing, moert_session_create() returns
 * MOERT_ERR_UNSUPPORTED saying which; CPU sessions are unaffected. Without the NVIDIA driver
 * (libcuda.so.1) the plugin is not even loaded. Where the driver is there but no usable GPU, the
 * first probe loads the plugin's CUDA libraries, which stay: about 150 MB of resident memory for
 * the life of the process (later probes add nothing), so a host that falls back to the CPU probes
 * once.
 * On CUDA with precision bf16 (its default) every GEMM but the router's (experts, dense FFNs,
 * output head) multiplies bf16 operands with fp32 accumulation, and everything else runs in fp32
 * (precision fp8: see "precision" below); Expert Choice layers are refused at their first forward
 * pass (MOERT_ERR_UNSUPPORTED). MOERT_ERR_INVALID_ARGUMENT for another device, a negative index,
 * or a CPU index other than 0. */
MOERT_API moert_status* moert_session_options_set_device(moert_session_options* options,
                                                         int32_t device, int32_t index);

/* Threads that compute a CPU session's work, 1 to 1024 (MOERT_ERR_INVALID_ARGUMENT otherwise):
 * the calling thread and `threads` - 1 that moert_session_create() starts (MOERT_ERR_OUT_OF_MEMORY
 * when it cannot). CUDA sessions ignore it. */
MOERT_API moert_status* moert_session_options_set_threads(moert_session_options* options,
                                                          uint32_t threads);

/* Seed of the session's random generator, whose state its checkpoints save and
 * moert_session_load() restores. No computation of this version draws from it: weights a model
 * file initialises take the file's own seed, at load. The ranks of a job
 * (moert_session_options_set_comm()) must pass the same seed: creating the session refuses
 * ranks whose seeds differ, on every rank, with MOERT_ERR_INVALID_ARGUMENT. */
MOERT_API moert_status* moert_session_options_set_seed(moert_session_options* options,
                                                       uint64_t seed);

/* MOERT_MODE_INFERENCE or MOERT_MODE_TRAINING (MOERT_ERR_INVALID_ARGUMENT for another value). */
MOERT_API moert_status* moert_session_options_set_mode(moert_session_options* options,
                                                       int32_t mode);

/* Backend knob by name. Known keys:
 *   "check_finite"  "true" (default) | "false" ("1" | "0" too): refuse NaN or infinity in
 *                   hidden-state inputs and output gradients with MOERT_ERR_NUMERIC before any
 *                   work is done, and
 *                   check results: a layer whose output holds a NaN or infinity although its
 *                   inputs were finite (a value exceeded the fp32 range: a hidden value of 1e38
 *                   times a weight of 10) fails the pass with MOERT_ERR_NUMERIC naming the layer,
 *                   row and column, and nothing of the pass is kept; so does an input gradient
 *                   (grad_in) that overflows, and so does an optimizer step that takes a
 *                   parameter past the fp32 range (moert_session_step()). Where a limit exists
 *                   it is computed instead of NaN: softmax and sigmoid scores of infinite router
 *                   logits, silu(-inf) = 0,
 *                   RMSNorm of values up to the fp32 maximum. "false" skips the checks (results
 *                   may then hold NaN or infinity). In "fp8" precision, checked or not, a NaN or
 *                   infinity that an expert's operand would hold (E4M3 has no code for it) fails
 *                   the pass with MOERT_ERR_NUMERIC naming the layer, the operand, the caller's
 *                   row and the column, and whether the layer's input (or output gradient) was
 *                   finite: if so, a value the layer computed exceeded the fp32 range.
 *   "precision"     what the MoE experts' GEMMs (routed and shared: forward, input and weight
 *                   gradients) multiply in: "fp32" (the CPU's default), "bf16" (operands
 *                   rounded to bf16, sums in fp32; the CUDA default) or "fp8" (DeepSeek-V3's
 *                   block-scaled E4M3, technical report section 3.3: activations quantized in
 *                   1x128 tiles along each GEMM's reduction dimension -- Fprop x along the
 *                   model dimension, Dgrad dy along its width, Wgrad both operands along the
 *                   tokens -- weights in 128x128 blocks, one fp32 scale per tile or block,
 *                   amax / 448; products summed in fp32 per 128-long block, scaled, then added
 *                   in fp32; on the CPU an exact emulation of the GPU recipe, on CUDA cuBLASLt's
 *                   block-scaled FP8 GEMMs, which need a Hopper GPU (sm_90) and cuBLASLt 12.9
 *                   or later: elsewhere moert_session_create() fails with
 *                   MOERT_ERR_UNSUPPORTED). The router, its bias, norms, embedding, master
 *                   weights and optimizer state stay fp32 whatever the precision, and so do the
 *                   dense FFNs and the head except in a CUDA bf16 session; the bf16 or FP8
 *                   weight copies are refreshed after every optimizer step. An fp8 inference
 *                   session multiplies a model's FP8 expert weights as stored, codes and scales;
 *                   a training session quantizes its copies from its fp32 masters (decoded from
 *                   the file's codes) by fp8_scales' rule, so its codes and outputs can differ
 *                   from the inference session's, as where the file's scales follow another
 *                   rule than fp8_scales. On the CPU, bf16 runs on
 *                   oneDNN's bf16 kernels where the CPU has AVX512-BF16 or AMX, and on moert's
 *                   own kernels (bf16 widened to fp32 in registers) elsewhere. A CUDA session
 *                   asked for "fp32" is refused with MOERT_ERR_UNSUPPORTED. Fixed at
 *                   moert_session_create(): moert_session_set_config() refuses a change with
 *                   MOERT_ERR_INVALID_STATE.
 *   "fp8_scales"    "fp32" (default) | "ue8m0": with precision "fp8", scales as computed
 *                   (amax / 448, at least 2^-126), or rounded up to powers of two (DeepSeek-V3.1's
 *                   and DeepGEMM's UE8M0 scales). Fixed at moert_session_create().
 *   "layout_copies" "auto" (default) | "on" | "off": whether a CPU session keeps, beside the
 *                   values of each FFN weight (the MoE layers' routed and shared experts, dense
 *                   FFNs), a copy laid out as its forward GEMM reads it without repacking,
 *                   refreshed after every optimizer step or write like the bf16 and FP8 copies:
 *                   - weights multiplied in fp32, transposed matrix by matrix: the forward then
 *                     multiplies its rows by [in, out], which oneDNN's AVX-512 sgemm runs 15-40 %
 *                     faster than the [out, in] it otherwise repacks on every call; costs the
 *                     weights' fp32 size once more, once per model for all its inference
 *                     sessions (they share one copy, released with the last of them; so do
 *                     the packed copies below), once per training session;
 *                   - weights multiplied in bf16, in oneDNN's blocked layout, where the CPU
 *                     multiplies bf16 natively (AVX512-BF16, AMX): decode-sized batches then
 *                     stream the weights at the memory's speed. An inference session keeps this
 *                     copy instead of the plain bf16 one (no more memory); a training session
 *                     keeps both (the backward reads the plain one).
 *                   "auto": the transposed copies where oneDNN runs AVX-512 kernels (its AVX2
 *                   kernels are faster on the stored layout), the packed ones where bf16 is
 *                   native; "on": the transposed copies on any CPU too; "off": neither, to save
 *                   the memory. Results agree with "off" to fp32 rounding, not bitwise. CUDA
 *                   sessions ignore it. Fixed at moert_session_create().
 *   "aux_loss_scope" "local" (default) | "global": over several ranks, the auxiliary losses
 *                   take each rank's rows as theirs (sequences within a rank; the Switch loss of
 *                   each rank's batch), or the job's (f and P over every rank's rows; arXiv
 *                   2501.11873): then a job trains exactly as one process over the union.
 *   "ep_chunks"     1 .. 64 (default 2): over several ranks, each MoE exchange is cut into this
 *                   many chunks of the ranks' experts, computed while the next chunks travel.
 *                   Any value gives the same results.
 *   "ep_overlap"    "true" (default) | "false": whether exchanges overlap computation at all.
 *   "kept_work_bytes" "unlimited" (default) | a byte count: the most working memory (what
 *                   passes size to their rows: activations, the experts' dispatched rows,
 *                   backward scratch; never weights, gradients or optimizer state) a session
 *                   keeps between calls. By default it keeps what its largest pass needed, so
 *                   later passes allocate nothing; past the bound, every call gives it all back
 *                   once no backward is pending (a training pass keeps its buffers until its
 *                   backward), and the next pass allocates afresh. A release of 16 MiB or more
 *                   also hands the C heap's free memory back to the system (glibc's
 *                   malloc_trim), so the next pass takes its pages afresh (measured: 4096-row
 *                   passes of a small model, 147 ms each at "0", 23 ms kept). "0" keeps
 *                   nothing. A long-lived session that serves a few very large requests among
 *                   small ones sets it above what a typical pass needs. Results are the same
 *                   bits either way. Whatever the setting, a call that
 *                   fails with MOERT_ERR_OUT_OF_MEMORY gives back what it grew (unless a backward
 *                   is pending), so that a smaller retry can succeed. May be changed on a live
 *                   session (moert_session_set_config()).
 *   "spin_wait_us"  0 .. 100000 (default 50): how long, in microseconds, a CPU session's threads
 *                   keep polling for the next piece of work before they sleep, and the calling
 *                   thread for the others' last items. A pass is many short pieces (a small
 *                   model's training step makes about a hundred) and a sleep and wake through the
 *                   kernel costs tens of microseconds each: polling made the main job's
 *                   training 13-18 % faster on 2 threads (README.md, "Where the CPU backend
 *                   stands"). The price is CPU time burnt after each call, at most this long per
 *                   thread (OpenMP runtimes poll longer: KMP_BLOCKTIME, GOMP_SPINCOUNT). "0"
 *                   sleeps at once: for hosts that run more sessions' calls at a time than they
 *                   have cores. A session with more threads than the CPUs the process may run on
 *                   (its affinity mask) never polls. Changes no result; may be changed on a live
 *                   session (moert_session_set_config()). CUDA sessions ignore it.
 *   "cuda_plugin"   path of libmoert_cuda.so, when it is not beside libmoert.so (a process loads
 *                   one plugin: a second, different path is refused).
 *   and the training knobs listed under Training below.
 * An unknown key or a value it does not accept is MOERT_ERR_INVALID_ARGUMENT; the options are
 * then unchanged. Options take every key whatever their mode: an inference session ignores the
 * training knobs. Numbers are decimal text as C++'s std::from_chars reads it ("3e-4"; no '+',
 * no spaces). */
MOERT_API moert_status* moert_session_options_set_config(moert_session_options* options,
                                                         const char* key, const char* value);

/* ---- Communicators (expert and data parallelism across processes) ------------------------ */
/* A moert_comm connects the processes ("ranks") of one job. Attached to session options with an
 * expert-parallel size, it lets sessions shard the routed experts over ranks and average the
 * other gradients (README.md, "Expert and data parallelism"). Two kinds:
 *  - MPI, from the plugin libmoert_mpi.so.1 (built against Open MPI 4.1), loaded on first use
 *    from beside libmoert as the CUDA plugin is (moert_session_options_set_device()) and checked
 * against this library's version. Buffers are host memory. The plugin runs one progress thread per
 * process that makes all of moert's MPI calls, so communication overlaps the caller's computation;
 * it needs MPI_THREAD_MULTIPLE.
 *  - NCCL, inside the CUDA plugin libmoert_cuda.so (the toolkit's NCCL), on its own CUDA stream.
 *    Buffers are device memory. Not yet verified on a GPU.
 *
 * Every function below that says "collective" must be called by every rank of the communicator,
 * in the same order on each; a rank that does not come makes the others fail with
 * MOERT_ERR_COMM after the timeout (default 600 s, moert_comm_set_timeout()), never hang.
 * After any failed or timed-out collective the communicator is broken: every later collective
 * fails at once with MOERT_ERR_COMM, naming the rank, the operation and how long it waited. A
 * rank that breaks an MPI communicator tells its peers, so that they fail promptly too. Before an
 * MPI collective gives up, the rank asks its peers how far they got, for a quarter of the
 * timeout (at least 0.05 s, at most 1 s; the collective may still complete meanwhile), and the
 * message says which ranks did not answer (dead or stopped) and which are alive but never reached
 * the operation ("rank 2 (last started #0) has not reached #1"); a peer's moert answers whatever
 * its host is doing.
 * moert never aborts its host: MPI errors come back as codes (MPI_ERRORS_RETURN) on moert's own
 * duplicate of the communicator, and moert never calls MPI_Abort.
 *
 * Jobs are launched with mpirun (mpirun -np 4 ./host). Open MPI 4.1's mpirun kills the whole job
 * when one rank dies; start it with --enable-recovery for the survivors to see the failure and
 * return MOERT_ERR_COMM within the timeout instead (mpirun's exit status then no longer reports
 * the ranks' results). Running as root needs --allow-run-as-root, or OMPI_ALLOW_RUN_AS_ROOT=1
 * and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 in the environment (the only way for a program started
 * without mpirun, a "singleton" job of one rank).
 *
 * Thread-safety: a moert_comm may be used from any thread; its collectives must reach every
 * rank in the same order, so a host that calls them from several threads orders them itself. */

typedef struct moert_comm moert_comm;

/* Bytes of an NCCL unique id. */
#define MOERT_NCCL_UNIQUE_ID_BYTES 128

/* Creates an MPI communicator over a duplicate of the host's communicator: `mpi_comm` points at
 * the host's MPI_Comm handle (for example &MPI_COMM_WORLD or &my_comm), or is NULL for
 * MPI_COMM_WORLD. Collective over that MPI communicator. The host's communicator need not stay
 * alive afterwards: moert works on its own duplicate.
 *
 * MPI's lifetime: when nobody has initialised MPI, moert initialises it (MPI_Init_thread with
 * MPI_THREAD_MULTIPLE, on its progress thread; Open MPI's own signal handlers are removed again
 * so the host's stay) and finalises it when the last moert communicator is freed -- the last
 * moert_comm_free() or the free of the last session or options holding one -- which waits for
 * MPI_Finalize, that is for every rank to free its last one, however long its own work takes it,
 * up to the longer of the communicator's timeout and the default 600 s (a rank that died does not
 * hold it up: Open MPI ends the job, or under --enable-recovery lets finalisation pass it; one
 * that timed out after this rank's last collective never comes, hence the bound). MPI cannot be
 * initialised twice in a process: a communicator created after that fails with
 * MOERT_ERR_INVALID_STATE, so a host that creates communicators one after another keeps one alive
 * in between. A process started without mpirun (a singleton) gets from Open MPI a helper child
 * process, `orted`, that lives as long as the process, MPI finalised or not (a host's SIGCHLD
 * handling sees it). After a timeout moert does not finalise MPI (MPI_Finalize would wait for a
 * peer that may be dead); the process then exits without it. When the host has initialised MPI
 * itself, it must have asked for MPI_THREAD_MULTIPLE (MOERT_ERR_UNSUPPORTED otherwise, naming the
 * level it got), must use the Open MPI the plugin was built against (another MPI library in the
 * process is refused with MOERT_ERR_UNSUPPORTED), must free every moert communicator before it
 * calls MPI_Finalize, and keeps MPI finalisation to itself. A host that calls MPI_Finalize while
 * moert communicators live (whoever initialised MPI) keeps its process: moert's progress thread
 * stops before MPI goes (an MPI_COMM_SELF attribute, MPI-3.1 section 8.7.1), those communicators
 * break -- every later operation on them, or on a session using them, fails with MOERT_ERR_COMM
 * naming MPI_Finalize, and moert_comm_free() returns at once -- and a later creation fails with
 * MOERT_ERR_INVALID_STATE.
 *
 * MOERT_ERR_INVALID_ARGUMENT when `mpi_comm` points at MPI_COMM_NULL, an intercommunicator, or a
 * handle whose bits are all zero (never assigned, as a static MPI_Comm starts); any other handle
 * must be a communicator: MPI itself judges it, and its error handler on MPI_COMM_WORLD (fatal
 * unless the host set another) decides what an invalid one does.
 * MOERT_ERR_UNSUPPORTED when the plugin is missing (moert built without Open MPI) or MPI cannot
 * be used as above; MOERT_ERR_COMM when the duplication does not complete within the default
 * timeout. On success *out receives a communicator the caller frees with moert_comm_free(). */
MOERT_API moert_status* moert_comm_create_mpi(const void* mpi_comm, moert_comm** out);

/* As moert_comm_create_mpi(), with the communicator's timeout in seconds (> 0 and at most a year,
 * as moert_comm_set_timeout() takes; MOERT_ERR_INVALID_ARGUMENT otherwise): the creation waits
 * at most that long for the other ranks, and the communicator's collectives start with it. A
 * job run with a short timeout then fails within it when a rank never comes to the creation,
 * rather than after the default 600 s. */
MOERT_API moert_status* moert_comm_create_mpi_with_timeout(const void* mpi_comm,
                                                           double timeout_seconds,
                                                           moert_comm** out);

/* Writes a fresh NCCL unique id (MOERT_NCCL_UNIQUE_ID_BYTES bytes) into `out` (`out_len` bytes,
 * at least MOERT_NCCL_UNIQUE_ID_BYTES). Rank 0 calls it and ships the bytes to the other ranks
 * by any means (MPI, a file, a socket), as NCCL itself asks. Loads the CUDA plugin;
 * MOERT_ERR_UNSUPPORTED when it or its NCCL is missing. Each id costs this process a thread and
 * a listening socket (NCCL's bootstrap root, started by ncclGetUniqueId), which end once every
 * rank has created its communicator with the id; an id that no communicator reaches NCCL with
 * (never used, or whose creation failed before, say for want of a GPU) keeps them for the life
 * of the process, since NCCL offers no way to cancel one: a service that retries a job's set-up
 * checks what it can (a usable GPU) before it makes a fresh id, rather than one per attempt. */
MOERT_API moert_status* moert_comm_nccl_unique_id(uint8_t* out, uint64_t out_len);

/* Creates rank `rank` of an NCCL communicator of `size` ranks on CUDA device `device`, from the
 * unique id in `in` (`in_len` = MOERT_NCCL_UNIQUE_ID_BYTES) that every rank passes. Collective
 * over the `size` ranks (each a process, or a thread with its own device); bounded by the default
 * timeout. NCCL refuses two ranks on one GPU. MOERT_ERR_UNSUPPORTED where the CUDA plugin, NCCL
 * or a usable GPU is missing; MOERT_ERR_INVALID_ARGUMENT, before anything waits on the others,
 * for `in_len` other than MOERT_NCCL_UNIQUE_ID_BYTES, `size` below 1, `rank` outside [0, size) or
 * a negative `device`. Free with moert_comm_free(). */
MOERT_API moert_status* moert_comm_create_nccl(const uint8_t* in, uint64_t in_len, int32_t rank,
                                               int32_t size, int32_t device, moert_comm** out);

/* As moert_comm_create_nccl(), with the communicator's timeout in seconds, for the creation and
 * the collectives after it (see moert_comm_create_mpi_with_timeout(); > 0 and at most a year,
 * MOERT_ERR_INVALID_ARGUMENT otherwise). */
MOERT_API moert_status* moert_comm_create_nccl_with_timeout(const uint8_t* in, uint64_t in_len,
                                                            int32_t rank, int32_t size,
                                                            int32_t device, double timeout_seconds,
                                                            moert_comm** out);

/* Releases the caller's reference. Accepts NULL. Not collective. Session options and sessions
 * that hold the communicator keep it alive; the last reference ends it (and may finalise MPI,
 * see moert_comm_create_mpi()). Must not race with another call on the same handle. */
MOERT_API void moert_comm_free(moert_comm* comm);

/* This process's rank in [0, size) and the number of ranks. Not collective. */
MOERT_API moert_status* moert_comm_rank(const moert_comm* comm, int32_t* out);
MOERT_API moert_status* moert_comm_size(const moert_comm* comm, int32_t* out);

/* Seconds every collective of this communicator waits before it fails with MOERT_ERR_COMM and
 * breaks the communicator: > 0 and at most a year; the default is 600. Local (each rank sets its
 * own); applies to the collectives that start afterwards, those of sessions holding the
 * communicator included. A session's checkpoint save and load wait longer where ranks wait for
 * another's file I/O: the timeout plus the checkpoint's size at 10 MB/s. */
MOERT_API moert_status* moert_comm_set_timeout(moert_comm* comm, double seconds);

/* Blocks until every rank has called it. Collective. MOERT_ERR_COMM on timeout or when the
 * communicator is broken. */
MOERT_API moert_status* moert_comm_barrier(moert_comm* comm);

/* data[i] = the sum over ranks r of rank r's data[i], for i < len, in place: doubles in host
 * memory, added in rank order (((x_0 + x_1) + x_2) + ...), so every rank gets the same bits on
 * every run. For a host's own figures (a loss summed over the rows each rank evaluated, say).
 * Collective: every rank passes the same len. MOERT_ERR_UNSUPPORTED for an NCCL communicator
 * (its collectives move device memory); MOERT_ERR_COMM on timeout or a broken communicator. A
 * rank that passes a NULL `data` (len > 0) or a len too large fails with
 * MOERT_ERR_INVALID_ARGUMENT and breaks the communicator, and its peers fail with MOERT_ERR_COMM
 * naming it (never with another call's data). */
MOERT_API moert_status* moert_comm_all_reduce_sum(moert_comm* comm, double* data, uint64_t len);

/* Attaches `comm` to the options with an expert-parallel size `expert_parallel` (EP >= 1 that
 * divides the communicator's size; the data-parallel size is size / EP): sessions created from
 * these options will shard every MoE layer's routed experts over EP ranks and replicate the rest
 * over size / EP. The options keep a reference to the communicator (the caller may free its
 * handle). `comm` NULL with expert_parallel 1 detaches it. Creating a session is collective over
 * the communicator, and every rank creates it from the same model (content) and options, threads
 * aside; otherwise every rank fails with MOERT_ERR_INVALID_ARGUMENT naming the first rank and
 * option that differ (on an MPI communicator, before anything waits on the others; training
 * settings only for training sessions, fp8_scales only for precision fp8). A rank whose
 * moert_session_create() is refused for its own arguments (a NULL model or out) still meets the
 * others there on an MPI communicator, and they fail at once. MOERT_ERR_INVALID_ARGUMENT, the
 * options unchanged, for EP < 1, an EP that does not divide the size, or `comm` NULL with EP other
 * than 1; an EP that does not divide a MoE layer's num_experts fails moert_session_create() (the
 * same code, on every rank).
 *
 * What such sessions do (README.md, "Expert and data parallelism"): each rank feeds its own rows; a
 * MoE layer sends each token once to every rank that computes one of its experts and sums the
 * results in expert order; gradients, losses, token counts, MaxVio and the loss-free bias update
 * are the job's, over the union of the ranks' rows in rank order. When every rank but the last
 * feeds a multiple of 64 rows (that take part; 128 with precision fp8, whose Wgrad quantizes
 * 128-token tiles), every output, loss, gradient, count and parameter has bitwise the value one
 * session over the union would have, whatever EP and the number of ranks; otherwise they agree to
 * rounding: fp32 rounding in fp32 and bf16 (about 2e-7 relative, measured), but in fp8 the
 * quantization's (the Wgrad tiles then straddle ranks and get other scales: gradients measured 2.5
 * % apart after one step, and parameters 3.5 % after three). Expert tensors (parameter access,
 * gradients) are the rank's shard: experts [s E / EP, (s + 1) E / EP) for shard s = rank % EP.
 * Calls on such a session that compute are collective (forward, backward, step, save, load, ...):
 * all ranks make the same calls in the same order; ranks found in different calls (one in a
 * forward, another in a load) all fail with MOERT_ERR_INVALID_STATE naming the calls. Bad input on
 * one rank (a wrong size, a NULL buffer, mask or path, a NaN) fails the call on every rank, with
 * that rank's code; as in one process, a refused backward may be retried, while a forward refused
 * on any rank discards the pass waiting for its backward on every rank. A kernel failing on one
 * rank in the middle of a pass (an FP8 quantizer meeting a NaN with check_finite off) fails the
 * call on every rank at its end, without leaving the others waiting: a failed forward is discarded,
 * a failed backward refuses the step until moert_session_zero_grad() or a load. set_eval and
 * set_config are local: a rank whose eval mode, check_finite, ep_chunks or ep_overlap differ from
 * rank 0's makes its next forward, backward or step fail on every rank with
 * MOERT_ERR_INVALID_STATE, as does a load in which the ranks read different checkpoints (nothing
 * is loaded). zero_grad and the writes
 * (set_parameter, set_gradient, set_expert_bias, the bias rate and freeze) are local too: a rank
 * that made them alone makes the next step or save fail on every rank with
 * MOERT_ERR_INVALID_STATE naming what differs (the micro-batches counted since zero_grad, a
 * replicated parameter's values or gradient, ...), before anything changes. A rank that dies makes
 * the others fail with MOERT_ERR_COMM within the timeout. Checkpoints are the job's: rank 0 writes
 * the file one session over the union would write (every expert, the same bytes), and any world
 * size, one process included, resumes it (moert_session_save(), moert_session_load()). A CPU
 * session needs an MPI communicator, a CUDA session an NCCL one on its own device
 * (MOERT_ERR_INVALID_ARGUMENT otherwise); an NCCL communicator of one rank runs the same path. CUDA
 * sessions reduce gradients by an all-reduce of each rank's own (rank order), so their gradients
 * agree with one process to fp32 rounding, not bitwise, and their outputs to the GEMMs' rounding
 * (cuBLASLt may choose other algorithms for other row counts); the counts of the routing they
 * compute are the job's exactly, and every rank's bias the same. Not yet verified on a GPU. An
 * Expert Choice layer's experts choose from the job's rows (every rank's router logits are
 * gathered), so its outputs and counts are one session's over the union too; CUDA sessions refuse
 * Expert Choice as they do alone. Reads (expert counts, MaxVio, profile, step count, parameter
 * info, parameters, gradients, biases) are local; moert_session_reset_metrics() is collective. */
MOERT_API moert_status* moert_session_options_set_comm(moert_session_options* options,
                                                       moert_comm* comm, int32_t expert_parallel);

/* ---- Session ----------------------------------------------------------------------------- */

typedef struct moert_session moert_session;

/* Creates a session over `model` with `options` (NULL: defaults). The session keeps what it needs
 * of the model: the model may be freed afterwards. Free with moert_session_free().
 * MOERT_ERR_UNSUPPORTED when the options ask for a device or precision this build or machine
 * cannot serve; MOERT_ERR_INVALID_ARGUMENT for a training session over a model with a MoE router
 * that cannot learn (top_k = 1 with normalize_weights: every gate weight is then a constant), for
 * min_lr above lr with a decay to run (training), and among ranks for an expert-parallel size
 * that does not divide a MoE layer's num_experts or a communicator of the wrong kind (see
 * moert_session_options_set_comm()), and for a model loaded description-only
 * (moert_load_options_set_description_only(): it holds no weights); MOERT_ERR_OUT_OF_MEMORY when
 * the threads cannot start. */
MOERT_API moert_status* moert_session_create(const moert_model* model,
                                             const moert_session_options* options,
                                             moert_session** out);

/* Releases a session. Accepts NULL. A call already inside the session on another thread (running,
 * or waiting for the session behind another call) is waited for: the running one completes, a
 * waiting one fails with MOERT_ERR_INVALID_STATE. No call may start once this has been called --
 * one that does may be refused with MOERT_ERR_INVALID_STATE, or use freed memory -- which the
 * caller must rule out (a service stops its request threads from calling first, then frees). In a
 * child of fork(), releases an inherited session without waiting for its threads (see fork() at
 * the top). */
MOERT_API void moert_session_free(moert_session* session);

/* Forward pass over `rows` rows of token ids (a model whose input is MOERT_INPUT_TOKENS).
 * `tokens` holds rows * input_width ids, row-major, each in [0, vocab_size); `num_tokens` is its
 * length. `out` receives rows * output_width floats; `out_len` is its length. `rows` is at least
 * 1 (MOERT_ERR_INVALID_ARGUMENT otherwise): among ranks, a rank with nothing to feed in a pass
 * passes padding rows with a mask of zeros through the matching _masked forward
 * (moert_session_forward_tokens_masked() or moert_session_forward_hidden_masked()): one row, or
 * in training with the option "sequence_length" set, that many (training rows come in whole
 * sequences).
 * MOERT_ERR_INVALID_ARGUMENT for a model that takes hidden states, `rows` above 2^31 - 1 (or so
 * many that a layer would index more than 2^31 - 1 token positions or token-expert assignments),
 * a length other than the one named, a NULL buffer, an id outside [0, vocab_size) (the message
 * names its row and column), or, in a training session with "sequence_length" set (not in eval
 * mode), `rows` that is not a multiple of it; MOERT_ERR_NUMERIC as "check_finite" says. The
 * expert counts (MOERT_COUNTS_*) change only when the pass succeeds. */
MOERT_API moert_status* moert_session_forward_tokens(moert_session* session, const int32_t* tokens,
                                                     uint64_t num_tokens, uint64_t rows, float* out,
                                                     uint64_t out_len);

/* Forward pass over `rows` rows of hidden states (a model whose input is MOERT_INPUT_HIDDEN).
 * `in` holds rows * input_width floats (`in_len`), `out` receives rows * output_width (`out_len`).
 * `rows` and the errors are as for moert_session_forward_tokens(), the model being one that takes
 * hidden states; with "check_finite" on, a NaN or infinity in `in` is MOERT_ERR_NUMERIC naming its
 * row and column. `in` is read during the call only (a training pass copies it for its backward;
 * an inference or eval pass on the CPU reads it where it lies), and `out` may be `in` when the
 * widths agree: the output is written after the last layer has run. */
MOERT_API moert_status* moert_session_forward_hidden(moert_session* session, const float* in,
                                                     uint64_t in_len, uint64_t rows, float* out,
                                                     uint64_t out_len);

/* Forward passes over padded batches: as moert_session_forward_tokens() and
 * moert_session_forward_hidden(), with `row_mask` holding one byte per row (`mask_len` = rows):
 * nonzero for a row that takes part, 0 for padding. A padding row's input is ignored (it is not
 * checked: a pad id outside the vocabulary or an uninitialised row is fine); it is not routed and
 * not counted in any expert count, MaxVio or loss-free bias update; its output row is all zeros;
 * backward gives it a zero input gradient and takes nothing from its output gradient or target;
 * it enters neither the auxiliary losses (a sequence of the sequence-wise loss keeps only its
 * rows that take part) nor the mean of moert_session_backward_loss(). Results for the other rows
 * (outputs, gradients, counts) are those of a pass over them alone, except the sequence-wise
 * auxiliary loss: its sequences keep their places in the batch, each with its rows that take
 * part, where a pass over the kept rows alone would cut new sequences. A mask of all zeros is
 * allowed: outputs are zero and the pass counts nothing. `row_mask` is read during the call only.
 */
MOERT_API moert_status* moert_session_forward_tokens_masked(
    moert_session* session, const int32_t* tokens, uint64_t num_tokens, const uint8_t* row_mask,
    uint64_t mask_len, uint64_t rows, float* out, uint64_t out_len);
MOERT_API moert_status* moert_session_forward_hidden_masked(moert_session* session, const float* in,
                                                            uint64_t in_len,
                                                            const uint8_t* row_mask,
                                                            uint64_t mask_len, uint64_t rows,
                                                            float* out, uint64_t out_len);

/* ---- Routing metrics ---------------------------------------------------------------------- */

/* Which token counts a metrics call reads:
 *   MOERT_COUNTS_LAST  the last successful forward pass, in any mode: MaxVio_batch;
 *   MOERT_COUNTS_STEP  training-mode passes since the last optimizer step or
 *                      moert_session_zero_grad() (moert_session_load() restores a checkpoint's);
 *   MOERT_COUNTS_EVAL  eval-mode and inference passes since the session's creation or the last
 *                      moert_session_reset_metrics(): MaxVio_global over an evaluation set. */
#define MOERT_COUNTS_LAST 0
#define MOERT_COUNTS_STEP 1
#define MOERT_COUNTS_EVAL 2

/* Selects every MoE layer where a function takes a layer index and says so. */
#define MOERT_ALL_LAYERS 0xFFFFFFFFu

/* Tokens routed to each expert of MoE layer `layer` in `scope` (MOERT_COUNTS_*): `counts`
 * receives num_experts integers (`len`). All zero before any counted pass. Works in every mode.
 * MOERT_ERR_INVALID_ARGUMENT when `layer` is not a MoE layer (MOERT_ALL_LAYERS included), for
 * another scope, or for `len` other than num_experts. Among ranks the counts are the job's, and
 * this call, like every metrics read, is local (not collective). */
MOERT_API moert_status* moert_session_expert_counts(const moert_session* session, uint32_t layer,
                                                    int32_t scope, int64_t* counts, uint64_t len);

/* MaxVio = (max_i count_i - mean count) / mean count over `scope`, for MoE layer `layer`, or the
 * mean over all MoE layers with MOERT_ALL_LAYERS. 0 when nothing was counted. The metric of Wang
 * et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (arXiv
 * 2408.15664): MaxVio_batch over MOERT_COUNTS_LAST, MaxVio_global over MOERT_COUNTS_EVAL.
 * MOERT_ERR_INVALID_ARGUMENT when `layer` is neither a MoE layer nor MOERT_ALL_LAYERS, for
 * MOERT_ALL_LAYERS in a model without MoE layers, or for another scope. */
MOERT_API moert_status* moert_session_max_vio(const moert_session* session, uint32_t layer,
                                              int32_t scope, double* out);

/* Where the time of a session over several ranks goes (moert_session_options_set_comm), in
 * seconds since its creation or the last moert_session_reset_metrics(), summed over its MoE
 * layers' passes. The waits are the communication that computation did not hide: compare them
 * with a session created with "ep_overlap" "false" to see what overlap hides. All zero for a
 * session alone. */
#define MOERT_PROFILE_DISPATCH 0  /* waiting for tokens (and output gradients) to arrive */
#define MOERT_PROFILE_COMBINE 1   /* waiting for the experts' results to come back */
#define MOERT_PROFILE_EXPERTS 2   /* computing this rank's routed experts */
#define MOERT_PROFILE_GRADIENTS 3 /* combining gradients across ranks after each backward */
#define MOERT_PROFILE_COUNT 4

/* Copies the MOERT_PROFILE_COUNT figures above into `seconds` (`len` >= MOERT_PROFILE_COUNT;
 * the extra values are left alone, so that a caller written against a later header works). */
MOERT_API moert_status* moert_session_profile(const moert_session* session, double* seconds,
                                              uint64_t len);

/* Zeroes the MOERT_COUNTS_EVAL counts of every MoE layer (start of an evaluation pass), and the
 * profile figures. Works in every mode; among ranks, collective. */
MOERT_API moert_status* moert_session_reset_metrics(moert_session* session);

/* ---- Batcher: many concurrent callers, one forward pass ------------------------------------ */
/* A moert_batcher serves inference to many threads at once. Each caller passes its own rows and
 * blocks; the batcher gathers the requests that arrive within a bounded wait, up to a row cap,
 * into one forward pass on one of a pool of inference sessions, and hands every caller its own
 * output rows and its own status. A forward pass over many rows costs far less per row than one
 * over a single row (every expert's GEMM gets more rows), so throughput grows with load where a
 * shared moert_session, which runs one call at a time, stays flat.
 *
 * Results: each caller receives what moert_session_forward_*() on a session with the same
 * options would return for its rows alone, to the rounding of the backend's GEMMs. Routing, norms
 * and the combine are per row, but a GEMM may sum a row's products in an order that depends on the
 * row count of the call: on the CPU, oneDNN does (a row alone takes its GEMV kernel, rows of a
 * larger call its blocked kernels), so a batched row agrees with the solo call's within 1e-5
 * relative (L2 per row; the worst of tests/capi/batcher_test.cc is 5.4e-7), and a request that had
 * its pass to itself is bit for bit the solo call. In bf16 and fp8 sessions the experts' operands
 * are rounded to 8 or 4 significant bits before their GEMMs, and such a last-bit difference can
 * move one of those roundings by a whole step: there a batched row agrees within 1e-3 relative
 * (worst measured 5.4e-5 in bf16 and 2.1e-4 in fp8). A token whose top-K router scores tie to
 * within that rounding may pick another expert in a pass than alone; nothing bounds that case. On
 * CUDA, cuBLASLt may choose another GEMM algorithm for another row count: batched and solo results
 * agree to bf16 rounding only. Models with an Expert Choice layer (experts pick tokens across the
 * batch) are never batched across requests: each pass carries one request.
 *
 * Errors: each request is validated in the calling thread before it joins a batch (sizes, the
 * row cap, token ids, finite inputs when "check_finite" is on), so one caller's bad input fails
 * that caller alone. When a pass fails on something no single request shows (a result that
 * overflows, memory for the whole batch), each of its requests is rerun alone and gets its own
 * status.
 *
 * Sessions and threads on a machine of N cores: every pool session has its own backend threads
 * (moert_session_options_set_threads) and runs one pass at a time, so sessions x threads should
 * be about N. One session with N threads gives the largest batches; two sessions with N/2 threads
 * each overlap one batch's gathering and the callers' own work with the other's pass. See the
 * README's serving section for measurements. On the CPU, the sessions read the model's fp32
 * weights in place, and every copy they derive from them (the layout copies of session option
 * "layout_copies", bf16 copies, FP8 copies of the experts (one per "fp8_scales" rule), the
 * fp32 values decoded from a model held in FP8) is made once and shared by every inference
 * session over the model: a pool costs its activations and threads, not copies of the weights.
 * On CUDA each session holds its own device copy of the weights: use one session per GPU (two
 * at most).
 *
 * Thread-safety: moert_batcher_forward_*(), moert_batcher_submit_*() and moert_batcher_counters()
 * may be called from any number of threads at once; moert_batcher_free() must not race with
 * them (it may be called while submitted requests are in flight: see moert_batcher_submit_*).
 * Options objects must not be modified concurrently. */

typedef struct moert_batcher_options moert_batcher_options;
typedef struct moert_batcher moert_batcher;

/* Per-request figures: indices into the `stats` array of moert_batcher_forward_*(). */
#define MOERT_REQUEST_QUEUE_NS 0       /* ns from entering the batcher to the start of its pass */
#define MOERT_REQUEST_RUN_NS 1         /* ns of the forward pass that carried the request */
#define MOERT_REQUEST_BATCH_ROWS 2     /* rows of that pass */
#define MOERT_REQUEST_BATCH_REQUESTS 3 /* requests of that pass */
#define MOERT_REQUEST_SESSION 4        /* pool index of the session that ran it */
#define MOERT_REQUEST_STATS 5          /* number of per-request figures this header knows */

/* Cumulative figures of a batcher: indices into the array of moert_batcher_counters(). A request
 * refused when submitted (a wrong length, rows past the cap, a full queue) counts as answered and
 * failed; a failed batch rerun request by request counts as its one batch. */
#define MOERT_BATCHER_REQUESTS 0 /* requests answered, failed ones included */
#define MOERT_BATCHER_FAILED 1   /* requests answered with an error */
#define MOERT_BATCHER_BATCHES 2  /* forward passes run for batches */
#define MOERT_BATCHER_ROWS 3     /* rows of those passes: ROWS / BATCHES is the mean batch size */
#define MOERT_BATCHER_QUEUE_NS 4 /* sum of the answered requests' queue times, ns */
#define MOERT_BATCHER_RUN_NS 5   /* sum of the passes' run times, ns */
#define MOERT_BATCHER_ISOLATED 6 /* batches that failed and were rerun request by request */
#define MOERT_BATCHER_COUNTERS 7 /* number of counters this header knows */

/* Creates batcher options with the defaults: 1 session, at most 256 rows per pass, no wait
 * (a free session takes what is queued at once; under load, requests queue while the sessions
 * are busy, which batches them anyway), default session options. Free with
 * moert_batcher_options_free(). */
MOERT_API moert_status* moert_batcher_options_create(moert_batcher_options** out);

/* Releases batcher options. Accepts NULL. */
MOERT_API void moert_batcher_options_free(moert_batcher_options* options);

/* Sessions in the pool, 1 to 256: how many passes run at once. */
MOERT_API moert_status* moert_batcher_options_set_sessions(moert_batcher_options* options,
                                                           uint32_t sessions);

/* The row cap, 1 to 2^20: the most rows one pass gathers, and the most rows one request may
 * have (a larger request is MOERT_ERR_INVALID_ARGUMENT). Whole requests join a pass, never parts
 * of one. It bounds a pass's memory (about rows x the widest layer's width x 4 bytes per
 * activation) and its latency. */
MOERT_API moert_status* moert_batcher_options_set_max_batch_rows(moert_batcher_options* options,
                                                                 uint64_t rows);

/* The most rows that may wait for a pass, 0 (the default: no bound) to 2^40, and at least the
 * row cap when not 0 (checked by moert_batcher_create()). A request, blocking or submitted, that
 * would queue more is refused at once with MOERT_ERR_LIMIT (`done` is never called) and counted
 * in MOERT_BATCHER_REQUESTS and MOERT_BATCHER_FAILED: a service under overload sheds load instead
 * of queueing without end (submitted requests hold a copy of their input while they wait). */
MOERT_API moert_status* moert_batcher_options_set_max_queued_rows(moert_batcher_options* options,
                                                                  uint64_t rows);

/* The bounded wait, 0 to 1000000 microseconds: a free session holding fewer rows than the cap
 * waits at most this long after the oldest queued request arrived before it starts the pass.
 * Each request's latency grows by at most this much; 0 runs at once. */
MOERT_API moert_status* moert_batcher_options_set_max_wait_us(moert_batcher_options* options,
                                                              uint64_t microseconds);

/* The options every pool session is created with (copied: `session_options` may be freed or
 * changed afterwards). Training mode is refused (MOERT_ERR_INVALID_ARGUMENT) when the batcher is
 * created. */
MOERT_API moert_status* moert_batcher_options_set_session_options(
    moert_batcher_options* options, const moert_session_options* session_options);

/* Creates a batcher over `model` with `options` (NULL: defaults) and starts one thread per pool
 * session. The batcher keeps what it needs of the model: the model may be freed afterwards.
 * Errors are those of moert_session_create(), and MOERT_ERR_INVALID_ARGUMENT for session options
 * in training mode or holding a communicator (a batcher's sessions run alone), or a
 * max_queued_rows below the row cap; MOERT_ERR_OUT_OF_MEMORY when the pool's threads cannot be
 * started. A session's error names which of the pool's sessions failed. Free with
 * moert_batcher_free(). */
MOERT_API moert_status* moert_batcher_create(const moert_model* model,
                                             const moert_batcher_options* options,
                                             moert_batcher** out);

/* Stops the pool's threads and releases the batcher. Accepts NULL. Must not race with another
 * call on the same batcher (no moert_batcher_forward_*() may be in flight). Submitted requests
 * in a pass finish and get their callbacks first; those still queued get theirs with
 * MOERT_ERR_INVALID_STATE, on this thread, before it returns. On one of the batcher's own
 * threads (from a callback, a service dropping its last reference there) it returns at once and
 * the release runs as above on a thread of its own, once the callback returns; the handle is gone
 * for the caller either way (nothing tells when that release ends: a host that must know, before
 * it exits or unloads the library, frees the batcher from a thread of its own). A second free of
 * a batcher being released (from a callback the release runs) is ignored. Where no thread can be
 * started for the release, the batcher is left running rather than the host aborted. In a child
 * of fork(), an inherited batcher is released without waiting and without answering the parent's
 * requests (see fork() at the top). */
MOERT_API void moert_batcher_free(moert_batcher* batcher);

/* One request of `rows` rows of token ids (a MOERT_INPUT_TOKENS model), as
 * moert_session_forward_tokens(): `tokens` holds rows * input_width ids (`num_tokens`), `out`
 * receives rows * output_width floats (`out_len`). Blocks until the request's pass is done; the
 * batcher reads `tokens` and writes `out` until then, and keeps no pointer afterwards. `stats`
 * (may be NULL, with stats_len 0) receives stats_len figures indexed by MOERT_REQUEST_*
 * (MOERT_REQUEST_STATS of them are known to this header); every entry past those this library
 * knows is set to -1, so that a caller built against a later header reads -1 for them. On error
 * neither `out` nor `stats` is written. Thread-safe.
 * Refused in the calling thread, before the request is queued: MOERT_ERR_INVALID_ARGUMENT for a
 * model that takes hidden states, `rows` of 0 or above the row cap, a length other than the one
 * named, a NULL buffer (`stats` NULL with stats_len > 0 too) or an id outside [0, vocab_size);
 * MOERT_ERR_INVALID_STATE from one of this batcher's callbacks, or once moert_batcher_free() has
 * begun; MOERT_ERR_LIMIT when the queue is full (moert_batcher_options_set_max_queued_rows()).
 * Then the pass's own errors, those of moert_session_forward_tokens(). */
MOERT_API moert_status* moert_batcher_forward_tokens(moert_batcher* batcher, const int32_t* tokens,
                                                     uint64_t num_tokens, uint64_t rows, float* out,
                                                     uint64_t out_len, int64_t* stats,
                                                     uint64_t stats_len);

/* As moert_batcher_forward_tokens(), over `rows` rows of hidden states (a MOERT_INPUT_HIDDEN
 * model): `in` holds rows * input_width floats (`in_len`). Errors as there, the model being one
 * that takes hidden states; with "check_finite" on (the session options'), a NaN or infinity in
 * `in` is MOERT_ERR_NUMERIC naming its row and column, before the request is queued.
 * Thread-safe. */
MOERT_API moert_status* moert_batcher_forward_hidden(moert_batcher* batcher, const float* in,
                                                     uint64_t in_len, uint64_t rows, float* out,
                                                     uint64_t out_len, int64_t* stats,
                                                     uint64_t stats_len);

/* The answer to a request submitted with moert_batcher_submit_*(). `status` is NULL on success;
 * otherwise the request's error, owned by the callback (release it with moert_status_free()), and
 * `out` is NULL with `out_len` 0. On success `out` holds the request's rows * output_width floats
 * (`out_len`), as moert_batcher_forward_*() would write them. `stats` holds `stats_len`
 * (MOERT_REQUEST_STATS of this library) figures indexed by MOERT_REQUEST_*; all -1 for a
 * request that moert_batcher_free() answered (no pass ran it). `out` and `stats` belong to the
 * batcher and are valid only until the callback returns: copy what you keep.
 *
 * Runs on one of the batcher's threads, or, for a request still queued when the batcher is
 * freed, on the thread that calls moert_batcher_free() (the release's own thread when a callback
 * freed it); callbacks of different requests may run at once on different threads. It should
 * return quickly (hand the answer to another thread or an event loop): while it runs, its session
 * takes no new pass. It may free its batcher (see moert_batcher_free()) but must not use the
 * handle afterwards, and must not unwind (throw, longjmp) through the library.
 * It may submit further requests; a blocking moert_batcher_forward_*() on its own batcher is
 * refused with MOERT_ERR_INVALID_STATE (it would wait for a pass its own thread must run). It
 * starts with the asynchronous signals blocked (see Signals at the top), on the library's threads
 * and on the one freeing the batcher alike; whatever mask it or its runtime leaves on the thread
 * (a JVM attaching the thread opens its own signals), the library restores the thread's mask
 * when it returns. */
typedef void (*moert_batcher_callback)(void* user_data, moert_status* status, const float* out,
                                       uint64_t out_len, const int64_t* stats, uint64_t stats_len);

/* Submits one request of `rows` rows of token ids without waiting for it: validated in the
 * calling thread exactly as moert_batcher_forward_tokens() (a bad request returns its error and
 * `done` is never called), `tokens` copied (it may be freed or reused as soon as this returns),
 * then queued. On success, `done(user_data, ...)` is called exactly once, when the request's pass
 * is over, with its outputs or its error. Requests still queued when moert_batcher_free() is
 * called are answered with MOERT_ERR_INVALID_STATE; those in a pass finish first. A caller
 * waiting for many requests holds no thread for each: an event loop, goroutines parked on
 * channels, futures. Requests submitted and those of moert_batcher_forward_*() share the same
 * queue and batches. Thread-safe. `done` NULL is MOERT_ERR_INVALID_ARGUMENT; `user_data` is
 * passed to `done` as given and never read. Other errors as moert_batcher_forward_tokens(), from
 * a callback too (where submitting is allowed until moert_batcher_free() has begun). */
MOERT_API moert_status* moert_batcher_submit_tokens(moert_batcher* batcher, const int32_t* tokens,
                                                    uint64_t num_tokens, uint64_t rows,
                                                    moert_batcher_callback done, void* user_data);

/* As moert_batcher_submit_tokens(), over `rows` rows of hidden states (a MOERT_INPUT_HIDDEN
 * model): `in` holds rows * input_width floats (`in_len`) and is copied. Thread-safe. */
MOERT_API moert_status* moert_batcher_submit_hidden(moert_batcher* batcher, const float* in,
                                                    uint64_t in_len, uint64_t rows,
                                                    moert_batcher_callback done, void* user_data);

/* The batcher's cumulative figures since creation: `counters` receives `len` values indexed by
 * MOERT_BATCHER_* (MOERT_BATCHER_COUNTERS of them are known to this header); every entry past
 * those this library knows is set to -1 (any `len`; `counters` may be NULL only with `len` 0, as
 * the `stats` of moert_batcher_forward_*()). A consistent snapshot. Thread-safe. */
MOERT_API moert_status* moert_batcher_counters(const moert_batcher* batcher, int64_t* counters,
                                               uint64_t len);

/* ---- Training ---------------------------------------------------------------------------- */
/* All functions below need a session created with MOERT_MODE_TRAINING and return
 * MOERT_ERR_INVALID_STATE otherwise, but three: moert_session_set_config() (see there),
 * moert_session_step_count() (0 in an inference session) and moert_session_get_expert_bias(),
 * which read in every mode. A training session trains its own copy of the parameters.
 *
 * A training step: moert_session_zero_grad(); for each micro-batch, a forward pass then
 * moert_session_backward_loss() (or moert_session_backward()); then moert_session_step(). Every
 * training-mode forward pass counts its tokens per expert (integers) for the loss-free bias update
 * that moert_session_step() applies; eval-mode passes count nothing towards it.
 *
 * Training knobs go through moert_session_options_set_config() or moert_session_set_config()
 * (default, then accepted range, bounds included; a value outside is MOERT_ERR_INVALID_ARGUMENT):
 *   "optimizer" adamw (default) | sgd
 *   "lr" (1e-3), "min_lr" (0), "weight_decay" (0): each 0 to 1e6; weight decay is decoupled for
 *     AdamW, L2 for SGD, and applies to matrices only (tensors of two or more dimensions)
 *   "beta1" (0.9) 0 to 0.999999, "beta2" (0.999) 0 to 0.999999999, "eps" (1e-8) 1e-30 to 1:
 *     AdamW; "momentum" (0.9) 0 to 0.999999: SGD
 *   "clip_norm" (0 = off) 0 to 1e12: clip the global gradient norm
 *   "warmup_steps" (0): linear warm-up; "total_steps" (0 = constant): cosine decay to min_lr;
 *     both integers 0 to 2^64 - 1
 *     (min_lr above lr with a decay to run: MOERT_ERR_INVALID_ARGUMENT at a training session's
 *     creation, MOERT_ERR_INVALID_STATE at a step after set_config made it so). Steps count
 *     from 1: step t <= W of a warm-up of W steps runs at lr * t / W, the decay runs from lr
 *     after step W to min_lr at step total_steps and stays there, at step t
 *     min_lr + (lr - min_lr) (1 + cos(pi min(1, (t - W) / (total_steps - W)))) / 2 (the cosine
 *     annealing of SGDR, arXiv 1608.03983, without restarts); with total_steps <= W the rate
 *     stays at lr after the warm-up (no decay)
 *   "sequence_length" (0 = the whole batch) 0 to 2^31 - 1: rows per sequence for the
 *     sequence-wise aux loss */

/* A target that takes no part in the loss (PyTorch's ignore_index). */
#define MOERT_IGNORE_TARGET (-100)

/* Softmax cross-entropy of the last forward pass's logits against `targets` (one id per row,
 * `num_targets` = the forward's rows, padding included), averaged over the rows that take part
 * (not padding) and whose target is not MOERT_IGNORE_TARGET (the cross-entropy is 0, with no
 * gradient, when there are none), plus the auxiliary balancing losses of the MoE layers; gradients
 * of all parameters are accumulated. *loss (may be NULL) receives the loss. Needs an OutputHead as
 * the last layer (MOERT_ERR_INVALID_STATE otherwise). MOERT_ERR_INVALID_ARGUMENT for another
 * `num_targets` or a target outside [0, output_width) other than MOERT_IGNORE_TARGET (padding
 * rows' targets are not read); MOERT_ERR_INVALID_STATE after 2^32 - 2 backward passes since
 * moert_session_zero_grad().
 * The auxiliary loss of an AuxLoss or SequenceAuxLoss layer with aux_alpha > 0 is
 * aux_alpha / N * sum_q sum_e f_qe P_qe over the N sequences q that hold rows, with
 * f_qe = E / (top_k L_q) * (tokens of q routed to e) and P_qe the mean over q's L_q rows of e's
 * score divided by the row's sum of scores (DeepSeek-V3 technical report section 2.1.2,
 * eq. 17-20); AuxLoss takes the batch as one sequence, the Switch Transformer loss (arXiv
 * 2101.03961, section 2.2). A SequenceAuxLoss layer's sequences are "sequence_length" rows (0:
 * the batch); among ranks, see "aux_loss_scope".
 *
 * Both backward functions use the last forward pass, which must have been a training-mode pass
 * with no backward yet: an eval-mode forward, a step made (moert_session_step(): the backward
 * would multiply what its forward kept by the updated weights), moert_session_zero_grad(),
 * moert_session_load() or a forward that failed after accepting its arguments (a NaN or infinity in
 * its input or output; among ranks, any refused forward) since then discards it
 * (MOERT_ERR_INVALID_STATE); a forward refused for its arguments (sizes, token ids, the row mask)
 * and moert_session_set_eval() leave it. A backward refused before it starts (wrong sizes, a bad
 * target, a NaN in grad_out) leaves everything as it was and may be retried; one that fails after
 * it has begun (out of memory, an input gradient that overflows) has accumulated part of its
 * gradient, so moert_session_step() refuses the step, with that failure's code, until
 * moert_session_zero_grad() discards it or moert_session_load() replaces the gradients with a
 * checkpoint's. */
MOERT_API moert_status* moert_session_backward_loss(moert_session* session, const int32_t* targets,
                                                    uint64_t num_targets, double* loss);

/* Backward from a caller-given gradient of the last forward pass's outputs (`grad_out`,
 * rows * output_width floats; padding rows' values are ignored). When `grad_in` is not NULL
 * (hidden-state models only) it receives the gradient of the inputs (`grad_in_len` =
 * rows * input_width; zero on padding rows); NULL with a nonzero `grad_in_len` is
 * MOERT_ERR_INVALID_ARGUMENT, and so are another length and a `grad_in` for a model that takes
 * tokens; with "check_finite" on, a NaN or infinity in `grad_out` is MOERT_ERR_NUMERIC. *aux_loss
 * (may be NULL) receives the auxiliary balancing losses (as moert_session_backward_loss() defines
 * them), whose gradients are included. See moert_session_backward_loss() for which pass it uses,
 * what a failure leaves, and the limit on backward passes. */
MOERT_API moert_status* moert_session_backward(moert_session* session, const float* grad_out,
                                               uint64_t grad_out_len, float* grad_in,
                                               uint64_t grad_in_len, double* aux_loss);

/* Starts a step afresh: zeroes the accumulated gradients and the micro-batch count, and discards
 * everything else of the step so far — the token counts of its forward passes (the loss-free
 * bias update uses only passes after this call), a forward pass waiting for its backward, and a
 * failed backward's refusal of the step. */
MOERT_API moert_status* moert_session_zero_grad(moert_session* session);

/* One optimizer step over the gradients accumulated since moert_session_zero_grad(), averaged over
 * the micro-batches (backward calls) since then, clipped if configured; with no backward since
 * then, over the gradient as moert_session_set_gradient() wrote it, and none at all (parameters
 * and optimizer state untouched) when that is zero everywhere; such a step still counts
 * (moert_session_step_count(), and with it the learning-rate schedule and AdamW's bias
 * correction, advance). The update of each element of a parameter p, with g its averaged gradient
 * (times clip_norm / norm when the norm exceeds clip_norm) and t the step counted from 1:
 *   AdamW, as PyTorch's torch.optim.AdamW: m = beta1 m + (1 - beta1) g,
 *     v = beta2 v + (1 - beta2) g^2, p -= lr (m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps)
 *     + weight_decay p);
 *   SGD, as torch.optim.SGD with dampening 0 and no Nesterov: b = momentum b + g + weight_decay p,
 *     p -= lr b;
 * (weight_decay 0 for tensors of fewer than two dimensions; moments and momentum held in fp32).
 * Then the loss-free bias update of every MoE layer balanced by LossFreeBias, not frozen and with
 * a rate gamma > 0, from the integer token counts of the step: b_i += gamma * sign(mean -
 * count_i) (Wang et al., arXiv 2408.15664; DeepSeek-V3 technical report section 2.1.2), then,
 * with bias_centering, b_i -= mean_j b_j; and every MoE layer's step counts start afresh.
 * Gradients are not zeroed. *lr and *grad_norm (either may be NULL) receive the learning rate
 * used and the L2 norm over every parameter of the averaged gradient, before clipping.
 * MOERT_ERR_NUMERIC when the gradient is not finite, when AdamW would square a scaled
 * gradient element past the fp32 range (a norm of 2^64 or more after clipping), or when a bias
 * update would leave the fp32 range: parameters, biases and counts are unchanged, and the step's
 * counts wait for a retry — moert_session_zero_grad() discards them. An update that takes a
 * parameter (or SGD's momentum) past the fp32 range (a learning rate and weight decay too large
 * for it) is found only once made, when "check_finite" is on: the step is then taken and counted
 * -- moert_session_step_count() tells the two cases apart -- and MOERT_ERR_NUMERIC names the
 * tensor and element; moert_session_save() refuses such values until they are written back.
 * *lr and *grad_norm receive a step's figures whenever the step was made, also when the call
 * then fails (that overflow, a weight copy the update could not make, another rank's failure
 * after the update); a step refused before any change writes neither.
 * A step made ends a training forward still waiting for its backward (that backward would
 * multiply what its forward kept by the updated weights; it is refused): its tokens have counted
 * towards this step's bias update, so a forward of the same rows for the next step counts them
 * again. Run the backward before the step.
 * Refused too (with the failure's code) after a backward of this step failed midway, until
 * moert_session_zero_grad() or moert_session_load(). Among ranks
 * a refusal on one rank is every rank's, and MOERT_ERR_INVALID_STATE refuses a step whose ranks
 * counted different micro-batches since zero_grad, hold different training settings
 * (set_config, bias rate or freeze applied on some ranks only), or wrote different tensors or
 * values since the last step (set_parameter, set_gradient or set_expert_bias; see
 * moert_session_set_parameter()), before anything changes. MOERT_ERR_INVALID_STATE in eval mode
 * (moert_session_set_eval()). */
MOERT_API moert_status* moert_session_step(moert_session* session, double* lr, double* grad_norm);

/* Optimizer steps taken (restored from checkpoints); 0 in an inference session. */
MOERT_API moert_status* moert_session_step_count(const moert_session* session, uint64_t* out);

/* eval != 0: forward passes neither keep state for backward nor count towards the bias update;
 * they add to the MOERT_COUNTS_EVAL metrics, and moert_session_step() is refused. eval == 0: back
 * to training. Switching leaves a training forward that waits for its backward as it is: that
 * backward may still be run, in either mode, until an eval-mode forward discards it. */
MOERT_API moert_status* moert_session_set_eval(moert_session* session, int32_t eval);

/* A knob by name (the lists above), for this session from now on. An inference session takes it
 * too (as step_count and get_expert_bias): there the training knobs are
 * MOERT_ERR_INVALID_STATE, and check_finite, ep_chunks, ep_overlap, kept_work_bytes and
 * spin_wait_us apply. A knob fixed at moert_session_create() (precision, fp8_scales,
 * layout_copies, cuda_plugin) refuses a change with MOERT_ERR_INVALID_STATE; setting its current
 * value is accepted. So do "optimizer" after the first step (its state would not carry over), and
 * "sequence_length" and "aux_loss_scope" between a forward and its backward. */
MOERT_API moert_status* moert_session_set_config(moert_session* session, const char* key,
                                                 const char* value);

/* Number of trainable parameter tensors: every weight tensor of the model, in layer order and
 * within a layer in moert_model_tensor_info()'s order; the loss-free bias is no parameter (see
 * moert_session_get_expert_bias()). */
MOERT_API moert_status* moert_session_num_parameters(const moert_session* session, uint32_t* out);

/* Name ("<layer name>.<tensor>", e.g. "moe0.w1") and element count of parameter `index`. The name
 * is owned by the session. Either output may be NULL. MOERT_ERR_INVALID_ARGUMENT for `index` >=
 * moert_session_num_parameters(). Among ranks a routed expert tensor counts the rank's shard. */
MOERT_API moert_status* moert_session_parameter_info(const moert_session* session, uint32_t index,
                                                     const char** name, uint64_t* numel);

/* Copies parameter `name` (numel floats, row-major; `len` = numel) out or in.
 * MOERT_ERR_INVALID_ARGUMENT for an unknown name or another `len`; writing a NaN or infinity is
 * MOERT_ERR_NUMERIC naming the element, and writes nothing.
 *
 * Among ranks (moert_session_options_set_comm()) writes are local, and the ranks must agree on
 * them: since the last step, every rank writes the same tensors (parameters, gradients, expert
 * biases), with the same values, except that a routed expert tensor holds each rank's shard and
 * must only be the same on the replicas of a shard. moert_session_step() compares digests of the
 * last value written to each tensor and refuses with MOERT_ERR_INVALID_STATE on every rank when
 * they differ, before changing anything; writing the same values on every rank then lets it go
 * on (moert_session_zero_grad() discards gradient writes). Passes run between the differing write
 * and its repair computed their gradients from the differing values: those gradients were still
 * combined across ranks, so the replicas stay alike, but to train on the repaired values call
 * moert_session_zero_grad() and run those micro-batches again before the step.
 *
 * Writing a parameter (and moert_session_set_expert_bias()) between a forward and its backward is
 * MOERT_ERR_INVALID_STATE: the backward needs the values its forward used. */
MOERT_API moert_status* moert_session_get_parameter(const moert_session* session, const char* name,
                                                    float* out, uint64_t len);
MOERT_API moert_status* moert_session_set_parameter(moert_session* session, const char* name,
                                                    const float* in, uint64_t len);

/* Copies the accumulated gradient of parameter `name` out or in (for users with their own
 * optimizer: read gradients, write parameters). The accumulated gradient is the sum over the
 * micro-batches since moert_session_zero_grad(); moert_session_step() divides it by their count.
 * A gradient written after backward passes is therefore divided too: written after two of them,
 * the step applies half of it (write the sum you want averaged, or call zero_grad first, when no
 * micro-batch counts and the value applies as written). Errors as for parameters, a NaN or
 * infinity written included. */
MOERT_API moert_status* moert_session_get_gradient(const moert_session* session, const char* name,
                                                   float* out, uint64_t len);
MOERT_API moert_status* moert_session_set_gradient(moert_session* session, const char* name,
                                                   const float* in, uint64_t len);

/* The loss-free balancing bias (num_experts fp32 values) of MoE layer `layer`. It steers expert
 * selection only and receives no gradient. Every MoE layer has one, whatever its balancing policy
 * (zeros unless its model file holds one, as an imported DeepSeek-V3 layer's
 * e_score_correction_bias): only a LossFreeBias layer's steps update it, but setting it steers
 * the top-K selection of any layer, and checkpoints keep it. An ExpertChoice layer's experts
 * choose their tokens without it: setting its bias is MOERT_ERR_INVALID_ARGUMENT. Reading works
 * in every mode. `len` = num_experts. MOERT_ERR_INVALID_ARGUMENT when `layer` is not a MoE layer
 * (MOERT_ALL_LAYERS included) or for another `len`; writing a NaN or infinity is
 * MOERT_ERR_NUMERIC. */
MOERT_API moert_status* moert_session_get_expert_bias(const moert_session* session, uint32_t layer,
                                                      float* out, uint64_t len);
MOERT_API moert_status* moert_session_set_expert_bias(moert_session* session, uint32_t layer,
                                                      const float* in, uint64_t len);

/* The bias update rate gamma (>= 0; 0 stops updates) of MoE layer `layer` or MOERT_ALL_LAYERS,
 * from the next step on: schedule it by calling this between steps. Held in fp32, like the bias:
 * MOERT_ERR_INVALID_ARGUMENT for a value that is not finite there or that rounds to 0 (below
 * about 7e-46, half of fp32's smallest value 1.4e-45, to which the values above round). Only a
 * layer balanced by the loss-free bias (balancing.policy LossFreeBias) has a rate: MOERT_ALL_LAYERS
 * sets those, and naming another layer, or MOERT_ALL_LAYERS in a model without any, is
 * MOERT_ERR_INVALID_ARGUMENT (likewise moert_session_set_bias_frozen()). */
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
 * temporary files of interrupted saves) are removed afterwards, except one that a description in
 * the directory still names (a copy made with `cp ck.moert best.moert` keeps loading, also while
 * it is being made: the removal reads the binary and JSON descriptions there, and what it
 * cannot read for certain keeps every data file; README "Checkpoints"); saves into one
 * directory, from any thread or process on the machine, take turns (an flock(2) on the directory),
 * so concurrent saves to one path each succeed and leave one of them whole. A child forked during a
 * save does not share its locks. NFS cannot lock a directory that way, nor can a process lock one
 * it may write but not read (mode 0333): there saves are not serialized, one writer per path at a
 * time is the caller's to keep, and in a directory it cannot list a save removes no earlier data
 * file (it cannot tell whether another description names it). A load of `path` from a file
 * (moert_model_load_file(), moert_session_load() and their _with_options forms) that meets a
 * save to it -- the description it read replaced and its data file removed before it opened
 * that -- loads the new one instead, up to four attempts in all (when each meets another save, the
 * last one's MOERT_ERR_IO is returned); a load from a buffer (moert_model_load_buffer() with its
 * external_dir) is not retried and may fail with MOERT_ERR_IO. MOERT_ERR_IO when it cannot be
 * written; the previous checkpoint at `path` is then intact. Refused before anything is written, so
 * that every checkpoint written loads back: MOERT_ERR_NUMERIC when a parameter, bias, gradient or
 * optimizer moment holds a NaN or infinity (naming it); MOERT_ERR_INVALID_STATE after a backward of
 * this step failed midway (its partial gradient would be stepped on after a load:
 * moert_session_zero_grad(), or a load, first); MOERT_ERR_INVALID_ARGUMENT when `path` names a
 * directory or anything else that is not a regular file (a device, a FIFO, a symbolic link, even to
 * a regular file), which the rename would replace, or when its file name is too long for the files
 * written beside it (the data file's name is 22 bytes longer, the temporary file's 12; most file
 * systems allow 255 bytes).
 *
 * A session over several ranks (moert_session_options_set_comm()): collective, every rank calls
 * it, with the same path (compared as text once normalised -- "a/./b" is "a/b" -- since rank 0
 * alone writes: MOERT_ERR_INVALID_STATE on every rank otherwise, nothing written). The file is
 * on rank 0's file system, at `path` as rank 0 resolves it (its working directory): a load by
 * every rank needs it where every rank reads the same path (a shared file system, the same
 * working directory), which no rank can check. The job writes one file, the one a session alone
 * trained on the union of the ranks' rows would write -- the same bytes, the same digest -- so that
 * any world size resumes it. Rank 0 gathers the routed experts' parameters, gradients and optimizer
 * moments from the first replica of each shard (ranks 0 .. EP - 1; the other replicas hold copies)
 * and writes the file at its `path`: it needs memory for the whole model's training state during
 * the call, the other ranks none beyond their own. The rest is replicated and written from rank 0's
 * copy, which is why the ranks' replicated state (step, generator, balancing state, every
 * parameter but the routed experts, with its gradient and moments) and the replicas of each
 * shard must be the same -- as they are when every rank made the same calls -- and are checked:
 * MOERT_ERR_INVALID_STATE on every rank otherwise, naming the first rank that differs, and
 * nothing is written. When rank 0 cannot write, every rank fails with its code (the others'
 * messages name rank 0), and the previous checkpoint is intact. The ranks confirm the write to each
 * other after rank 0 has made it: when a rank dies or stalls in between, the others fail with
 * MOERT_ERR_COMM although the file at `path` is already the new checkpoint, whole. Rank 0's
 * message then says so ("checkpoint ... was written"); on any rank, after such a failure,
 * moert_model_checkpoint_step() of the file tells which checkpoint it holds. */
MOERT_API moert_status* moert_session_save(const moert_session* session, const char* path);

/* Restores a checkpoint written by moert_session_save() for the same architecture. The file is
 * verified like any model and its content checked against its digest; a corrupt or truncated
 * file (MOERT_ERR_INVALID_MODEL), an unreadable one (MOERT_ERR_IO), a model file without training
 * state, another architecture or another optimizer (MOERT_ERR_INVALID_ARGUMENT) is refused and
 * the session keeps its state.
 * So is training state that no run reaches, whatever its digest (MOERT_ERR_INVALID_MODEL, also
 * from moert_model_load_file()): a parameter or MoE layer whose state is left out or repeated, a
 * negative AdamW second moment, a moment only a step makes non-zero without its pair (or a second
 * moment under SGD), a generator state that is none, and a step or micro-batch count at the end
 * of its type.
 * The load limits are those of this session's architecture: a checkpoint may hold and read at most
 * four times the bytes of its parameters and biases (values, gradients, two optimizer moments)
 * plus 1 MiB and 4 KiB per tensor for the description; more is MOERT_ERR_LIMIT (such a file was
 * likely saved from another, larger model: load options only lower these limits). Checkpoints of
 * model schema 1.0 (written by builds before schema 1.1; their digest depended on the writer's
 * compiler) are refused as unverifiable (MOERT_ERR_INVALID_MODEL). Training then continues
 * bit-identically to the run that wrote the checkpoint, given the same knobs: a checkpoint holds
 * state, not settings. The knobs of moert_session_set_config() (lr, min_lr, warmup_steps,
 * total_steps, weight_decay, clip_norm, the betas, eps, momentum, sequence_length, ...) are this
 * session's own and stay as set, so a resumed run may change them, and must set them again to
 * continue the same run; only the optimizer is checked (another one is refused). So are the model's
 * settings outside its architecture -- an RMSNorm's eps, a MoE layer's aux_alpha, bias_centering
 * and capacity_factor: the session keeps its own model's, whatever the checkpoint's description
 * holds. The architecture compared is each layer's kind, name, widths, tensor shapes, routing
 * knobs, balancing policy, residual connection and shared experts. The bias update rates and frozen
 * flags are balancing state and are restored from the file, replacing any set before the load:
 * set them after it to change them.
 *
 * A session over several ranks: collective, every rank calls it. Each rank reads the whole file
 * at its `path` -- on a file system the ranks share, or a copy of the same file on each machine
 * -- verifies it as a checkpoint of the whole model (the limits above are the whole model's,
 * every routed expert included, not the rank's shard) and keeps its shard of the routed
 * experts. A checkpoint written at any world size, or by a session alone, resumes at any other,
 * and training continues as the uninterrupted run would (bit-identically under the conditions
 * of moert_session_options_set_comm()). When any rank refuses the file (missing, corrupt,
 * another architecture or optimizer, past a limit), every rank fails -- the refusing ranks with
 * their own reason, the others with the same code naming the first -- and every rank's session
 * keeps its state. */
MOERT_API moert_status* moert_session_load(moert_session* session, const char* path);

/* As moert_session_load(), within the limits of `options` too (NULL: the session's alone). Among
 * ranks, collective like moert_session_load(); each rank reads within its own `options`. */
MOERT_API moert_status* moert_session_load_with_options(moert_session* session, const char* path,
                                                        const moert_load_options* options);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOERT_MOERT_H */
