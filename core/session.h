// A session: a model bound to a backend, with the buffers and statistics of its forward passes
// and, in training mode, its own parameters, gradients, optimizer and balancing state.
#pragma once

#include <array>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/communicator.h"
#include "core/content_digest.h"
#include "core/error.h"
#include "core/layers.h"
#include "core/model.h"
#include "core/parallel.h"
#include "core/param_store.h"
#include "core/tensor_codec.h"

namespace moert {

struct LoadOptions;

// The shortest text that reads back as the same double, for messages: a bound such as
// 0.999999999 must not print as a rounded "1" (which the bound refuses), nor two different
// settings as the same "0.001".
std::string exact_text(double v);

enum class Device : int32_t { Cpu = 0, Cuda = 1 };

// A target that takes no part in the loss (moert.h MOERT_IGNORE_TARGET, PyTorch's ignore_index).
inline constexpr int32_t kIgnoreTarget = -100;
enum class Mode : int32_t { Inference = 0, Training = 1 };

// The session option's spelling of a precision ("fp32", "bf16", "fp8"), and back; parse_precision
// throws InvalidArgument naming the accepted values.
const char* precision_name(Precision p);
Precision parse_precision(const std::string& value);

struct TrainingConfig {
  std::string optimizer = "adamw";  // or "sgd"
  double lr = 1e-3;
  double weight_decay = 0.0;                      // decoupled (AdamW) or L2 (SGD); matrices only
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // AdamW
  double momentum = 0.9;                          // SGD
  double clip_norm = 0.0;                         // global gradient norm; 0 = off
  uint64_t warmup_steps = 0;                      // linear warmup from lr / warmup_steps
  uint64_t total_steps = 0;  // cosine decay to min_lr over total_steps; 0 = constant
  double min_lr = 0.0;
  int64_t sequence_length = 0;  // rows per sequence for SequenceAuxLoss; 0 = the whole batch

  // Learning rate of optimizer step `step` (counted from 1).
  double lr_at(uint64_t step) const;
  // Every field: ranks compare a digest of them before each step (Session::step), so a field
  // missing here would let ranks configured apart step apart (session.cc checks the count).
  auto fields() const {
    return std::tie(optimizer, lr, weight_decay, beta1, beta2, eps, momentum, clip_norm,
                    warmup_steps, total_steps, min_lr, sequence_length);
  }
};

struct SessionOptions {
  Device device = Device::Cpu;
  int32_t device_index = 0;
  std::string cuda_plugin;  // explicit path of libmoert_cuda.so; empty: beside libmoert.so
  uint32_t threads = 1;
  // Unset: the device's own (CPU fp32, CUDA bf16). CUDA refuses fp32 (Unsupported): it
  // multiplies in bf16.
  std::optional<Precision> precision;
  // The precision a session of these options computes in.
  Precision effective_precision() const {
    return precision.value_or(device == Device::Cuda ? Precision::Bf16 : Precision::Fp32);
  }
  Fp8Options fp8;  // how precision fp8 multiplies (option "fp8_scales")
  // Which copies laid out for the forward's GEMMs the CPU keeps of FFN weights (option
  // "layout_copies").
  LayoutCopies layouts = LayoutCopies::Auto;
  uint64_t seed = 0;
  Mode mode = Mode::Inference;
  bool check_finite = true;
  TrainingConfig training;
  // Expert and data parallelism: the ranks this session's work is shared with (null: none) and
  // the expert-parallel size EP (each rank holds E / EP routed experts; size / EP data-parallel
  // replicas). set_comm checks EP.
  std::shared_ptr<Communicator> comm;
  int32_t expert_parallel = 1;
  void set_comm(std::shared_ptr<Communicator> c, int32_t ep);
  // The auxiliary losses over the job's whole batch (f and P from every rank's rows) rather than
  // each rank's own ("aux_loss_scope" = "global" | "local").
  bool global_aux = false;
  // Chunks each MoE layer's exchanges are cut into for overlap ("ep_chunks", 1..64).
  int64_t ep_chunks = 2;
  // Whether the exchanges overlap computation at all ("ep_overlap"; false: for measuring it).
  bool ep_overlap = true;

  // The most bytes of working buffers (what passes size to their rows: activations, the experts'
  // dispatched rows, backward scratch) a session keeps between calls ("kept_work_bytes"): more
  // are given back once no backward is pending. Unlimited by default, so that a session's passes
  // after its largest allocate nothing.
  uint64_t kept_work_bytes = std::numeric_limits<uint64_t>::max();

  // How long a CPU session's threads poll for the next piece of work before they sleep
  // ("spin_wait_us", microseconds; 0: at once). Changes no result.
  int64_t spin_wait_us = 50;

  // Applies a knob by name; throws InvalidArgument for an unknown key or a value it refuses.
  void set(const std::string& key, const std::string& value);
};

// Which token counts a metrics query reads.
enum class CountScope : int32_t { Last = 0, Step = 1, Eval = 2 };

struct StepInfo {
  double lr = 0.0;
  double grad_norm = 0.0;  // before clipping, of the micro-batch-averaged gradient
};

// Parts of the state a job's save compares across ranks (Session::replica_digests).
inline constexpr size_t kReplicaDigestParts = 11;

class Session {
 public:
  // Words of the ranks' record compared when a session is created among ranks.
  static constexpr size_t kStartWords = 25;
  // A caller that cannot create its session (the C ABI's NULL model or out) among ranks: takes
  // part in the creation's first collective as a refusal, so that the other ranks fail at once
  // (InvalidArgument naming this rank) instead of waiting for it until the timeout. Over a host
  // communicator of two ranks or more; a no-op otherwise.
  static void refuse_creation(const SessionOptions& options);

  Session(std::shared_ptr<const Model> model, const SessionOptions& options);

  const Model& model() const { return *model_; }
  bool training() const { return options_.mode == Mode::Training; }
  Precision precision() const { return precision_; }

  // Forward passes; sizes are element counts of the caller's buffers and are checked first. On
  // any error the session's statistics are those of the last successful pass. row_mask (may be
  // null; mask_len = rows): rows whose byte is 0 are padding — they are not routed, counted or
  // checked, their outputs are zero, and backward neither takes nor gives them a gradient.
  // `mask_required`: the caller promised a mask (the C ABI's masked calls), so a null one is
  // refused -- inside the pass's agreement among ranks, like every other bad argument.
  void forward_tokens(const int32_t* tokens, uint64_t num_tokens, const uint8_t* row_mask,
                      uint64_t mask_len, uint64_t rows, float* out, uint64_t out_len,
                      bool mask_required = false);
  void forward_hidden(const float* in, uint64_t in_len, const uint8_t* row_mask, uint64_t mask_len,
                      uint64_t rows, float* out, uint64_t out_len, bool mask_required = false);
  // Every row takes part.
  void forward_tokens(const int32_t* tokens, uint64_t num_tokens, uint64_t rows, float* out,
                      uint64_t out_len) {
    forward_tokens(tokens, num_tokens, nullptr, 0, rows, out, out_len);
  }
  void forward_hidden(const float* in, uint64_t in_len, uint64_t rows, float* out,
                      uint64_t out_len) {
    forward_hidden(in, in_len, nullptr, 0, rows, out, out_len);
  }

  // Training. backward_loss: softmax cross-entropy of the last forward's logits against one
  // target per row (mean over rows) plus the auxiliary losses; returns that loss. backward: from a
  // caller-given gradient of the outputs; writes the input gradient when asked; returns the
  // auxiliary losses. Both accumulate into the gradients.
  double backward_loss(const int32_t* targets, uint64_t num_targets);
  double backward(const float* grad_out, uint64_t grad_out_len, float* grad_in,
                  uint64_t grad_in_len);
  void zero_grad();
  // *made (when given) receives the step's figures once the step is made, so that a caller
  // learns them also when it is then refused (an update that overflowed the fp32 range).
  StepInfo step(std::optional<StepInfo>* made = nullptr);
  void set_eval(bool eval);
  bool eval() const { return eval_; }
  uint64_t step_count() const { return step_; }
  void set_config(const std::string& key, const std::string& value);

  // Parameters and gradients by index or name.
  size_t num_parameters() const { return slots_.size(); }
  const std::string& parameter_name(size_t index) const;
  int64_t parameter_size(size_t index) const;
  size_t parameter_index(const std::string& name) const;
  void read_parameter(size_t index, float* out, uint64_t len) const;
  void write_parameter(size_t index, const float* in, uint64_t len);
  void read_gradient(size_t index, float* out, uint64_t len) const;
  void write_gradient(size_t index, const float* in, uint64_t len);

  // Loss-free balancing state of MoE layer `layer`, or of every MoE layer for UINT32_MAX.
  void read_bias(uint32_t layer, float* out, uint64_t len) const;
  void write_bias(uint32_t layer, const float* in, uint64_t len);
  void set_bias_update_rate(uint32_t layer, double gamma);
  void set_bias_frozen(uint32_t layer, bool frozen);

  // Metrics.
  const std::vector<int64_t>& expert_counts(uint32_t layer, CountScope scope) const;
  // MaxVio of one MoE layer, or the mean over all MoE layers for UINT32_MAX.
  double max_vio(uint32_t layer, CountScope scope) const;
  void reset_eval_metrics();
  // Seconds since creation or reset_eval_metrics: waiting for dispatches, waiting for combines,
  // computing this rank's routed experts, combining gradients (zero when alone).
  std::vector<double> profile() const;

  // Checkpoints: the model with this session's parameters and training state, written atomically;
  // load refuses a checkpoint of another architecture and leaves the session as it was. Load reads
  // at most what this session's architecture can hold, and within `limits` when given. Among
  // ranks both are collective and the file is the job's: save writes, from rank 0, the bytes one
  // process over the union would write; load reads the whole file on every rank, each keeping its
  // shard, and a refusal anywhere is every rank's. `path_given` false: the caller passed no path
  // (the C ABI's NULL), refused like any other bad argument, among ranks inside the agreement.
  void save(const std::string& path, bool path_given = true) const;
  void load(const std::string& path, const LoadOptions* limits = nullptr, bool path_given = true);

  // The bytes of working buffers the session, its layers and its backend hold now.
  size_t work_bytes() const;
  // Called by every entry point after its body, under the lock, `out_of_memory` when it failed
  // with OutOfMemory: gives the working buffers back when no backward is pending and either they
  // exceed "kept_work_bytes" or the call ran out of memory (a failed pass must not pin what it
  // grew, or every smaller retry fails too).
  void after_call(bool out_of_memory);
  // Runs body() as an entry point's call, then after_call() with how it ended; rethrows.
  template <typename F>
  void call(F&& body) {
    try {
      body();
    } catch (const Error& e) {
      after_call(e.code() == Code::OutOfMemory);
      throw;
    } catch (const std::bad_alloc&) {
      after_call(true);
      throw;
    }
    after_call(false);
  }

  // Serialises the public entry points: a session may be shared between threads.
  std::mutex& mutex() const { return mu_; }
  // Taken by every entry point after the lock: the backend's device on this thread for the call.
  ActiveDevice use_device() const { return ActiveDevice(*backend_); }

 private:
  struct Slot {
    std::string name;
    Tensor* param = nullptr;  // the host tensor of params_
    bool matrix = false;      // weight decay applies
    Buffer<float> m, v;       // optimizer moments in backend memory, allocated at the first step
    // Which of m (bit 0) and v (bit 1) allocate_moments() allocated since the step began: a
    // refused step takes back those, never moments a checkpoint brought.
    uint8_t fresh_moments = 0;
  };
  struct Balance {
    float gamma = 0.0f;
    bool frozen = false;
  };

  const Model& params() const { return params_ ? *params_ : *model_; }
  int64_t expert_count(const Slot& s) const;
  void build();
  void check_parallel() const;
  // Cuts every MoE layer's routed experts down to this rank's shard.
  void shard_experts(Model& m) const;
  void sync_to_host() const;
  MoELayer& moe_layer(uint32_t layer) const;
  std::vector<uint32_t> moe_layers(uint32_t layer) const;
  // The MoE layers of moe_layers(layer) that balance by the loss-free bias; refuses a layer, or
  // a model, without one rather than accept a rate or a freeze and ignore it.
  std::vector<uint32_t> loss_free_layers(uint32_t layer, const char* what) const;
  int64_t check_rows(uint64_t rows) const;
  void check_out(uint64_t rows, const float* out, uint64_t out_len) const;
  void require_training(const char* what) const;
  void require_backward_ready() const;
  Pass next_pass() const;
  // Refuses a row mask of the wrong length, before a pass changes anything.
  void check_mask(uint64_t rows, const uint8_t* row_mask, uint64_t mask_len,
                  bool mask_required) const;
  // Records the caller's rows of a pass and which take part (padding compacted away); the mask
  // has passed check_mask.
  void begin_pass(uint64_t rows, const uint8_t* row_mask);
  // The caller's index of compacted row `row`.
  int64_t caller_row(int64_t row) const;
  // The rows that take part, from caller memory of `width` values per row (src itself unmasked).
  template <typename T>
  const T* gather_rows(const T* src, int64_t width, std::vector<T>& staging) const;
  // Compacted rows in backend memory -> the caller's rows, padding zeroed.
  void deliver_rows(const float* src, int64_t width, float* out);
  // "row R, column C" of the first NaN or infinity in `rows` (backend memory, last_rows_ rows of
  // `width`), R being the caller's row; "" when every value is finite.
  std::string nonfinite_at(const float* rows, int64_t width) const;
  // Fails (Numeric) naming where `rows` holds its first NaN or infinity (nonfinite_at).
  void refuse_nonfinite(const float* rows, int64_t width, const char* what) const;
  // Why layer `layer`'s output is not finite, or "" (checks values when check_finite is on;
  // alone it throws, among ranks it reports so that the pass ends together).
  std::string check_output(size_t layer, const float* y) const;
  // Sizes every buffer a pass of last_rows_ rows writes, in its opening agreement: among ranks an
  // allocation that fails on one rank then fails the call on every rank before any exchange.
  void reserve_activations();
  // The same for a backward (and grad_in_ when grad_in is given).
  void reserve_backward(const float* grad_in);
  // `bad`: a failure found before the first layer, refused at the end of the pass. Among ranks,
  // a failure held before the first layer (ParallelContext::compute) is raised with the pass.
  void run_from(size_t first_layer, const float* x, float* out, Pass pass, std::string bad);
  // Runs layer `layer`'s f, which writes `out` (n floats of backend memory, may be null). Alone,
  // or for a MoE layer (which holds its own computations' failures between its exchanges), f
  // runs as it is. Among ranks any other layer's failure is held, and once one is held the layer
  // is skipped: `out` is zeroed, so that later layers' exchanges carry no garbage to the others.
  template <typename F>
  void run_layer(size_t layer, float* out, size_t n, F&& f);
  // Runs body(); among ranks, every rank then learns whether any failed, or was in another call
  // than `call` (a public function's name), and all throw if so. `Failure::DiscardsPass`: a
  // failure anywhere ends the pending pass on every rank (a forward's, whose ranks that accepted
  // their arguments have begun the next pass); `KeepsPass`: the body changes nothing, so the
  // pending pass stays (a refused backward may be retried).
  enum class Failure { DiscardsPass, KeepsPass };
  template <typename F>
  void collective_step(const char* call, Failure failure, F&& body);
  // e, or, for a NaN or infinity a kernel met (Numeric), an error that names layer `layer` and
  // says where the value came from: when `rows` (the layer's `what`: "input" in a forward,
  // "output gradient" in a backward; `width` wide) hold one, where it first is in the caller's
  // rows; else, for a kernel's RowError, that row in the caller's count and that a value the
  // layer computed overflowed.
  Error with_unchecked_source(const Error& e, size_t layer, const float* rows, int64_t width,
                              const char* what) const;
  // The same for a failure held among ranks (ParallelContext::compute).
  std::exception_ptr held_with_source(std::exception_ptr held, size_t layer, const float* rows,
                                      int64_t width, const char* what) const;
  void finish_empty_pass(float* out, Pass pass);
  double run_backward(float* grad_in, const char* call);
  void poison_step(Code code, const std::string& why);
  // Among ranks, after a backward: every gradient's roots combined into the job's total.
  void combine_gradients();
  // Among ranks on a device backend (ParallelContext::root_reduction false;
  // core/session_local_gradients.cc): begin points every gradient at a zeroed buffer of its own
  // for one backward, end points them back, reduce ends and adds the job's sum of those buffers
  // to the gradients.
  void pass_on_options();
  size_t local_gradient_layout(std::vector<size_t>& at, size_t& total) const;
  void begin_local_gradients();
  void end_local_gradients() noexcept;
  void reduce_local_gradients();
  double gradient_sum_squares() const;
  // Zeroed optimizer moments for every parameter that has none yet (a failed allocation leaves
  // the others as they were).
  void allocate_moments();
  // Whether set_gradient wrote a gradient since the last step or zero_grad.
  bool gradient_written() const;
  // After an optimizer update: fails (Numeric) when it took a parameter, or SGD's momentum,
  // beyond the fp32 range (with check_finite on), else when it could not refresh a copy
  // (stale_copies_); among ranks an agreement either way.
  void refuse_overflowed_update(double lr);
  // Makes the copies (bf16, FP8, layout) of the parameters whose copies a step could not refresh
  // (stale_copies_), or fails naming the first: a pass never reads a stale copy.
  void refresh_stale_copies();
  // The loss-free biases the step makes of this step's counts (empty for a layer it leaves);
  // fails (Numeric) before anything changes when one would leave the fp32 range.
  std::vector<std::vector<float>> next_biases() const;
  // Installs them and starts the next step's counts.
  void commit_biases(const std::vector<std::vector<float>>& next);
  // Fails (InvalidState) when a backward of this step failed midway: its partial gradient is not
  // saved.
  void refuse_partial_step() const;
  // What save writes: views of the session's own memory where the backend's memory is the
  // host's, so a checkpoint of any size is written without a copy of the state; host copies
  // otherwise.
  struct SavedState {
    TrainingStateView view;
    std::vector<uint64_t> rng;
    std::vector<LayerBalanceState> layers;
    std::vector<std::vector<float>> host;  // downloads from a device backend
  };
  void training_state(SavedState& out) const;
  LoadOptions checkpoint_limits(const LoadOptions* limits) const;
  // Bytes of the job's parameters (every expert) and, as the session holds them or with
  // `every_state`, their gradients and optimizer moments: about a checkpoint's size, the same on
  // every rank (what its waits allow for, ParallelContext::IoAllowance).
  double job_state_bytes(bool every_state) const;
  // Among ranks (core/session_parallel_checkpoint.cc): save gathers the experts to rank 0, which
  // writes one process's file; each rank's digests of its replicated state and of its expert
  // shard, which must agree across the job.
  void save_parallel(const std::string& path, bool path_given) const;
  // Digests of the state a save takes on trust from the other ranks, in parts (step, micro-batches,
  // generator, optimizer, balancing, replicated values, gradients, moments; the expert shard's
  // values, gradients, moments), so that a difference is named.
  using ReplicaDigests = std::array<uint64_t, kReplicaDigestParts>;
  ReplicaDigests replica_digests(const SavedState& st) const;
  // Among ranks (core/session_rank_agreement.cc), before a step changes anything: every rank
  // must have counted the same micro-batches, hold the same training settings, and have made the
  // same direct writes since its last step, or the replicas would part for good.
  // MOERT_ERR_INVALID_STATE on every rank otherwise, naming the first rank that differs.
  void check_ranks_agree_to_step();
  // Among ranks, over `world` (host words): every rank creates its session with the same model
  // and options (threads aside), or every rank fails with InvalidArgument.
  void check_ranks_agree_to_start(Communicator& world) const;
  using StartWords = std::array<uint64_t, kStartWords>;
  static void agree_to_start(Communicator& world, const StartWords& mine);
  uint64_t training_settings_digest() const;
  // What a pass among ranks needs every rank to share: eval mode, ep_overlap, ep_chunks (set_eval
  // and set_config are local calls).
  uint64_t pass_settings() const;
  // What a rank wrote directly since its last step: for each tensor written, the digest of its
  // last write. Replicated tensors (every parameter but the routed experts, their gradients, the
  // loss-free biases) must be written alike on every rank, an expert shard's alike on each of
  // its replicas. Only kept among ranks.
  enum class Written : uint8_t { Parameter, Gradient, Bias };
  void note_written(Written what, size_t index, const float* in, uint64_t len);

  std::shared_ptr<const Model> model_;
  std::unique_ptr<Model> params_;  // training: the session's own parameters
  std::unique_ptr<Model> grads_;   // training: gradients, laid out as params_
  SessionOptions options_;
  std::unique_ptr<ParallelContext> par_;  // expert/data parallelism over several ranks
  Precision precision_ = Precision::Fp32;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<ParamStore> store_;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<Buffer<float>> activations_;   // output of each layer, backend memory
  Buffer<float> input_, dy_, dx_, grad_in_;  // hidden-state input; backward scratch
  Buffer<int32_t> tokens_, targets_;
  std::vector<Slot> slots_;
  Buffer<float> local_grads_;     // a backward's own gradients, device backends among ranks
  std::vector<Balance> balance_;  // by layer index
  Rng rng_;
  uint64_t step_ = 0;
  uint32_t micro_batches_ = 0;
  bool eval_ = false;
  bool pending_backward_ = false;
  int64_t batch_rows_ = 0;          // the caller's rows in the last pass
  bool masked_ = false;             // whether some of them were padding
  std::vector<int64_t> valid_;      // when masked: the caller's indices of the rows that take part
  int64_t last_rows_ = 0;           // rows that took part: what the layers saw
  std::vector<int64_t> sequences_;  // sequence offsets over those rows (sequence-wise aux loss)
  std::string poisoned_;            // why a backward of this step failed midway, if one did
  bool gradient_from_checkpoint_ = false;  // the last load brought a gradient (until zero_grad)
  Code poisoned_code_ = Code::Internal;
  // Slots whose copies the last update could not refresh (the FP8 quantizer meeting a weight the
  // update took beyond the fp32 range), in slot order, with why. An update starts the list
  // afresh (it refreshes every copy); a write or a load of the parameter, or a successful
  // refresh_stale_copies, takes a slot off it.
  struct StaleCopy {
    size_t slot;
    Code code;
    std::string why;
  };
  std::vector<StaleCopy> stale_copies_;
  std::map<std::pair<Written, size_t>, uint64_t> written_;  // among ranks: note_written
  mutable std::mutex mu_;
};

}  // namespace moert
