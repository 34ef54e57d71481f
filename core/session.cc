#include "core/session.h"

#include <malloc.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <utility>

#include "core/error.h"
#include "core/model_loader.h"
#include "core/model_writer.h"

namespace moert {

std::string exact_text(double v) {
  char text[32];
  const auto [end, ec] = std::to_chars(text, text + sizeof text, v);
  return ec == std::errc() ? std::string(text, end) : std::string("?");
}

namespace {

constexpr uint32_t kAllLayers = std::numeric_limits<uint32_t>::max();
// The longest poll option spin_wait_us accepts: a tenth of a second.
constexpr uint64_t kMaxSpinWaitUs = 100000;

// The cosine decay runs from lr down to min_lr: a floor above the peak would raise it.
void check_schedule(const TrainingConfig& t, Code code) {
  if (t.total_steps > t.warmup_steps && t.min_lr > t.lr)
    fail(code, "min_lr (", t.min_lr, ") exceeds lr (", t.lr,
         "): the cosine decay over total_steps would raise the learning rate; set min_lr to at "
         "most lr");
}

double parse_number(const std::string& key, const std::string& value, double lo, double hi) {
  double v = 0.0;
  const char* end = value.data() + value.size();
  auto [ptr, ec] = std::from_chars(value.data(), end, v);
  if (ec != std::errc() || ptr != end || !std::isfinite(v) || v < lo || v > hi)
    fail(Code::InvalidArgument, "option '", key, "' takes a number in [", exact_text(lo), ", ",
         exact_text(hi), "], got '", value, "'");
  return v;
}

uint64_t parse_count(const std::string& key, const std::string& value) {
  uint64_t v = 0;
  const char* end = value.data() + value.size();
  auto [ptr, ec] = std::from_chars(value.data(), end, v);
  if (ec != std::errc() || ptr != end)
    fail(Code::InvalidArgument, "option '", key, "' takes a non-negative integer, got '", value,
         "'");
  return v;
}

bool parse_bool(const std::string& key, const std::string& value) {
  if (value == "true" || value == "1") return true;
  if (value == "false" || value == "0") return false;
  fail(Code::InvalidArgument, "option '", key, "' takes true or false, got '", value, "'");
}

// Sums per-chunk values over the tree of grad_reduction.h, so that a total does not depend on
// how processes split the rows.
double tree_sum(std::vector<double> chunk_values) {
  if (chunk_values.empty()) return 0.0;
  TreeFold<double*> fold;
  auto add = [](double* l, double* r) { *l = *l + *r; };
  for (double& v : chunk_values) fold.push(&v, add);
  return *fold.finish(add);
}

// Runs `f` when the scope ends, however it ends.
template <typename F>
class OnExit {
 public:
  explicit OnExit(F f) : f_(std::move(f)) {}
  ~OnExit() { f_(); }
  OnExit(const OnExit&) = delete;
  OnExit& operator=(const OnExit&) = delete;

 private:
  F f_;
};

void check_len(uint64_t len, int64_t want, const char* what) {
  if (len != static_cast<uint64_t>(want))
    fail(Code::InvalidArgument, what, " buffer holds ", len, " values but ", want, " are needed");
}

// A token-choice router with top_k = 1 and renormalised weights gives every token the weight
// routed_scaling_factor whatever its scores: the gate weights are constant, the router's gradient
// from the task is zero and it cannot learn. Training such a model would silently train everything
// but the router.
void refuse_untrainable_routers(const Model& model) {
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const auto* m = std::get_if<MoESpec>(&model.layers[i].spec);
    if (m && m->balancing.policy != BalancingPolicy::ExpertChoice && m->router.top_k == 1 &&
        m->router.normalize)
      fail(Code::InvalidArgument, "layer ", i, " ('", model.layers[i].name,
           "', MoE) cannot be trained: with top_k = 1 and normalize_weights, every gate weight is "
           "the constant routed_scaling_factor, so the router would get no gradient from the loss "
           "and never learn; train it with normalize_weights false or top_k > 1 (inference "
           "accepts this model)");
  }
}

}  // namespace

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::Fp32:
      return "fp32";
    case Precision::Bf16:
      return "bf16";
    case Precision::Fp8:
      return "fp8";
  }
  return "unknown";
}

Precision parse_precision(const std::string& value) {
  for (Precision p : {Precision::Fp32, Precision::Bf16, Precision::Fp8})
    if (value == precision_name(p)) return p;
  fail(Code::InvalidArgument, "option 'precision' takes fp32, bf16 or fp8, got '", value, "'");
}

double TrainingConfig::lr_at(uint64_t step) const {
  if (warmup_steps > 0 && step <= warmup_steps)
    return lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  if (total_steps == 0 || total_steps <= warmup_steps) return lr;
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) /
                                            static_cast<double>(total_steps - warmup_steps));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

void SessionOptions::set_comm(std::shared_ptr<Communicator> c, int32_t ep) {
  if (ep < 1) fail(Code::InvalidArgument, "the expert-parallel size must be >= 1, got ", ep);
  if (!c && ep != 1)
    fail(Code::InvalidArgument, "an expert-parallel size of ", ep, " needs a communicator");
  if (c && c->size() % ep != 0)
    fail(Code::InvalidArgument, "the expert-parallel size ", ep,
         " does not divide the communicator's ", c->size(), " ranks");
  comm = std::move(c);
  expert_parallel = ep;
}

void SessionOptions::set(const std::string& key, const std::string& value) {
  TrainingConfig& t = training;
  if (key == "check_finite") {
    check_finite = parse_bool(key, value);
  } else if (key == "cuda_plugin") {
    cuda_plugin = value;
  } else if (key == "precision") {
    precision = parse_precision(value);
  } else if (key == "fp8_scales") {
    if (value != "fp32" && value != "ue8m0")
      fail(Code::InvalidArgument, "option 'fp8_scales' takes fp32 or ue8m0, got '", value, "'");
    fp8.power_of_two_scales = value == "ue8m0";
  } else if (key == "layout_copies") {
    if (value != "auto" && value != "on" && value != "off")
      fail(Code::InvalidArgument, "option 'layout_copies' takes auto, on or off, got '", value,
           "'");
    layouts = value == "on"    ? LayoutCopies::On
              : value == "off" ? LayoutCopies::Off
                               : LayoutCopies::Auto;
  } else if (key == "optimizer") {
    if (value != "adamw" && value != "sgd")
      fail(Code::InvalidArgument, "option 'optimizer' takes adamw or sgd, got '", value, "'");
    t.optimizer = value;
  } else if (key == "lr") {
    t.lr = parse_number(key, value, 0.0, 1e6);
  } else if (key == "min_lr") {
    t.min_lr = parse_number(key, value, 0.0, 1e6);
  } else if (key == "weight_decay") {
    t.weight_decay = parse_number(key, value, 0.0, 1e6);
  } else if (key == "beta1") {
    t.beta1 = parse_number(key, value, 0.0, 0.999999);
  } else if (key == "beta2") {
    t.beta2 = parse_number(key, value, 0.0, 0.999999999);
  } else if (key == "eps") {
    t.eps = parse_number(key, value, 1e-30, 1.0);
  } else if (key == "momentum") {
    t.momentum = parse_number(key, value, 0.0, 0.999999);
  } else if (key == "clip_norm") {
    t.clip_norm = parse_number(key, value, 0.0, 1e12);
  } else if (key == "warmup_steps") {
    t.warmup_steps = parse_count(key, value);
  } else if (key == "total_steps") {
    t.total_steps = parse_count(key, value);
  } else if (key == "ep_chunks") {
    const uint64_t c = parse_count(key, value);
    if (c < 1 || c > 64)
      fail(Code::InvalidArgument, "option 'ep_chunks' takes an integer in [1, 64], got '", value,
           "'");
    ep_chunks = static_cast<int64_t>(c);
  } else if (key == "kept_work_bytes") {
    kept_work_bytes =
        value == "unlimited" ? std::numeric_limits<uint64_t>::max() : parse_count(key, value);
  } else if (key == "ep_overlap") {
    ep_overlap = parse_bool(key, value);
  } else if (key == "spin_wait_us") {
    const uint64_t us = parse_count(key, value);
    if (us > kMaxSpinWaitUs)
      fail(Code::InvalidArgument, "option 'spin_wait_us' takes an integer in [0, ", kMaxSpinWaitUs,
           "] (microseconds), got '", value, "'");
    spin_wait_us = static_cast<int64_t>(us);
  } else if (key == "aux_loss_scope") {
    if (value != "local" && value != "global")
      fail(Code::InvalidArgument, "option 'aux_loss_scope' takes local or global, got '", value,
           "'");
    global_aux = value == "global";
  } else if (key == "sequence_length") {
    const uint64_t rows = parse_count(key, value);
    if (rows > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
      fail(Code::InvalidArgument,
           "option 'sequence_length' takes an integer in [0, 2147483647] (0: the whole batch), "
           "got '",
           value, "'");
    t.sequence_length = static_cast<int64_t>(rows);
  } else {
    fail(Code::InvalidArgument, "unknown session option '", key,
         "' (known: check_finite, cuda_plugin, precision, fp8_scales, layout_copies, "
         "optimizer, lr, min_lr, "
         "weight_decay, "
         "beta1, beta2, eps, momentum, clip_norm, warmup_steps, total_steps, sequence_length, "
         "aux_loss_scope, ep_chunks, ep_overlap, kept_work_bytes, spin_wait_us)");
  }
}

Session::Session(std::shared_ptr<const Model> model, const SessionOptions& options)
    : model_(std::move(model)), options_(options), rng_(options.seed) {
  // Creating a session over several ranks is collective: every rank builds its part, and if any
  // fails, every rank fails (no rank is left waiting in the first pass).
  // A device communicator of one rank runs the parallel path too (its exchanges are copies to
  // itself): the one shape of it that a machine with one GPU can run.
  if (options_.comm &&
      (options_.comm->size() > 1 || options_.comm->memory() == CommMemory::Device)) {
    // Before the replicas' split, which ranks of other expert-parallel sizes would make
    // differently (or not at all) and wait in until the timeout. A device communicator carries
    // host words only once its session has a backend: its ranks compare after the build.
    if (options_.comm->memory() == CommMemory::Host) check_ranks_agree_to_start(*options_.comm);
    par_ = std::make_unique<ParallelContext>(options_.comm, options_.expert_parallel);
  }
  std::exception_ptr failed;
  try {
    build();
  } catch (...) {
    failed = std::current_exception();
  }
  if (par_)
    par_->agree(failed, "session creation");
  else if (failed)
    std::rethrow_exception(failed);
  if (par_ && options_.comm->memory() == CommMemory::Device)
    check_ranks_agree_to_start(par_->host());
  // Last: only a session every rank has created counts.
  if (par_) par_->number_session();
}

void Session::build() {
  model_->require_weights(options_.mode == Mode::Training ? "be trained" : "run");
  if (par_) check_parallel();
  // Options are set one at a time, in any order: the pair is known whole only here.
  if (options_.mode == Mode::Training) check_schedule(options_.training, Code::InvalidArgument);
  const bool cuda = options_.device == Device::Cuda;
  precision_ = options_.effective_precision();
  if (cuda && precision_ == Precision::Fp32)
    fail(Code::Unsupported,
         "precision fp32 is not available on CUDA: the CUDA backend multiplies in bf16 (fp32 "
         "runs on the CPU)");
  backend_ = cuda ? make_cuda_backend(options_.device_index, options_.cuda_plugin, precision_,
                                      options_.fp8)
                  : make_cpu_backend(options_.threads, precision_, options_.fp8, options_.layouts);
  if (precision_ == Precision::Fp8 && !backend_->fp8_experts())
    fail(Code::Unsupported, "precision fp8 is not available on the ", backend_->name(),
         " backend in this version");
  const ActiveDevice device(*backend_);
  if (par_) par_->attach(*backend_);
  if (training()) refuse_untrainable_routers(*model_);
  if (training()) {
    // The session trains its own copy; gradients mirror its layout.
    params_ = std::make_unique<Model>(*model_);
    params_->training.reset();
    params_->make_fp32();  // FP8 weights of the file become the fp32 masters
    // Under expert parallelism a rank keeps, trains and checkpoints-in-part its shard only.
    if (par_) shard_experts(*params_);
    grads_ = std::make_unique<Model>(*params_);
    for (auto& l : grads_->layers) {
      visit_tensors(
          l, [](const char*, Tensor& t) { std::fill(t.values.begin(), t.values.end(), 0.0f); });
      if (auto* m = std::get_if<MoESpec>(&l.spec)) m->gate_bias.values.clear();
    }
    for (auto& pl : params_->layers)
      visit_tensors(pl, [&](const char* field, Tensor& t) {
        if (!t.values.empty())
          slots_.push_back({pl.name + "." + field, &t, t.shape.size() >= 2, {}, {}});
      });
    store_ = std::make_unique<ParamStore>(*backend_, *params_, grads_.get());
  } else {
    // Inference never writes parameters: the shared model's tensors are only read (or, on a
    // device backend, copied once). Expert parallelism reads the shard's part of them.
    store_ = std::make_unique<ParamStore>(*backend_, const_cast<Model&>(*model_), nullptr);
  }
  const Model& p = params();
  balance_.resize(p.layers.size());
  for (size_t i = 0; i < p.layers.size(); ++i) {
    if (const auto* m = std::get_if<MoESpec>(&p.layers[i].spec))
      balance_[i] = {m->balancing.bias_update_rate, m->balancing.bias_frozen};
    layers_.push_back(make_layer(p.layers[i], *store_));
    if (auto* moe = dynamic_cast<MoELayer*>(layers_.back().get())) moe->set_parallel(par_.get());
  }
  activations_.resize(layers_.size());
  pass_on_options();
}

// The options the parallel context and the MoE layers keep a copy of: at creation and after every
// set_config, so that a change reaches them and not only options_.
void Session::pass_on_options() {
  backend_->set_spin_wait(options_.spin_wait_us);
  if (par_) {
    par_->set_chunks(options_.ep_chunks);
    par_->set_overlap(options_.ep_overlap);
  }
  for (auto& l : layers_)
    if (auto* m = dynamic_cast<MoELayer*>(l.get())) m->set_global_aux(options_.global_aux);
}

void Session::check_parallel() const {
  const Communicator& c = *options_.comm;
  const CommMemory want = options_.device == Device::Cpu ? CommMemory::Host : CommMemory::Device;
  if (c.memory() != want)
    fail(Code::InvalidArgument, "a ", c.kind(), " communicator moves ",
         c.memory() == CommMemory::Host ? "host" : "device", " memory, which a ",
         options_.device == Device::Cpu ? "CPU" : "CUDA", " session does not compute in");
  // NCCL would be handed this session's buffers and stream while its kernels run on another GPU.
  if (want == CommMemory::Device && c.device() >= 0 && c.device() != options_.device_index)
    fail(Code::InvalidArgument, "the ", c.kind(), " communicator of rank ", c.rank(),
         " is on CUDA device ", c.device(), " but the session on device ", options_.device_index,
         ": create both on the same device");
  for (size_t i = 0; i < model_->layers.size(); ++i) {
    const auto* m = std::get_if<MoESpec>(&model_->layers[i].spec);
    if (!m) continue;
    if (m->router.num_experts % static_cast<uint32_t>(options_.expert_parallel) != 0)
      fail(Code::InvalidArgument, "layer ", i, " ('", model_->layers[i].name, "') has ",
           m->router.num_experts, " routed experts, which an expert-parallel size of ",
           options_.expert_parallel, " does not divide");
  }
}

void Session::shard_experts(Model& m) const {
  const int ep = options_.expert_parallel;
  const int shard = options_.comm->rank() % ep;
  for (auto& layer : m.layers) {
    auto* moe = std::get_if<MoESpec>(&layer.spec);
    if (!moe) continue;
    const int64_t per = moe->router.num_experts / static_cast<uint32_t>(ep);
    for (Tensor* t : {&moe->w1, &moe->w3, &moe->w2}) {
      const int64_t each = t->numel() / moe->router.num_experts;
      std::vector<float> part(t->values.begin() + shard * per * each,
                              t->values.begin() + (shard + 1) * per * each);
      t->values = std::move(part);
      t->shape[0] = per;
    }
  }
}

void Session::require_training(const char* what) const {
  if (!training())
    fail(Code::InvalidState, what,
         " needs a session created in training mode (MOERT_MODE_TRAINING)");
}

void Session::require_backward_ready() const {
  require_training("backward");
  if (!pending_backward_)
    fail(Code::InvalidState,
         "backward needs the last forward pass to be a training-mode pass with no backward yet: "
         "one backward per forward, and an eval-mode pass, a step, zero_grad, a checkpoint load "
         "or a forward that failed after accepting its arguments since then discards it");
  // The count a checkpoint holds stays below 2^32 - 1, which the loader refuses: one more would
  // wrap to 0, and the step would sum the micro-batches' gradients instead of averaging them.
  if (micro_batches_ >= std::numeric_limits<uint32_t>::max() - 1)
    fail(Code::InvalidState, "backward: ", micro_batches_,
         " micro-batches since zero_grad, the most a step averages: call zero_grad first");
}

Pass Session::next_pass() const { return training() && !eval_ ? Pass::Train : Pass::Eval; }

int64_t Session::check_rows(uint64_t rows) const {
  if (rows == 0) fail(Code::InvalidArgument, "rows must be at least 1");
  // Row counts reach BLAS as 32-bit integers.
  if (rows > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
    fail(Code::InvalidArgument, "rows = ", rows, " exceeds 2^31 - 1");
  for (size_t i = 0; i < layers_.size(); ++i) {
    const int64_t items = layers_[i]->indexed_items(static_cast<int64_t>(rows));
    if (items > std::numeric_limits<int32_t>::max())
      fail(Code::InvalidArgument, "rows = ", rows, " is too many for layer '",
           model_->layers[i].name, "': it would index ", items,
           " token positions or token-expert assignments, more than 2^31 - 1");
  }
  // Sequences matter to the sequence-wise auxiliary loss only, which an eval-mode pass does not
  // compute: a validation batch may end in a partial sequence.
  const int64_t seq = options_.training.sequence_length;
  if (training() && !eval_ && seq > 0 && rows % static_cast<uint64_t>(seq) != 0)
    fail(Code::InvalidArgument, "rows = ", rows, " is not a multiple of sequence_length = ", seq);
  return static_cast<int64_t>(rows);
}

void Session::check_out(uint64_t rows, const float* out, uint64_t out_len) const {
  if (!out) fail(Code::InvalidArgument, "out is NULL");
  // rows <= 2^31 - 1 (check_rows) and a width below 2^32: no overflow.
  const uint64_t need = rows * model_->output_width;
  if (out_len != need)
    fail(Code::InvalidArgument, "output buffer holds ", out_len, " floats but ", rows,
         " rows of width ", model_->output_width, " need ", need);
}

void Session::check_mask(uint64_t rows, const uint8_t* row_mask, uint64_t mask_len,
                         bool mask_required) const {
  if (mask_required && !row_mask) fail(Code::InvalidArgument, "row_mask is NULL");
  if (row_mask) check_len(mask_len, static_cast<int64_t>(rows), "row mask");
}

void Session::begin_pass(uint64_t rows, const uint8_t* row_mask) {
  batch_rows_ = static_cast<int64_t>(rows);
  masked_ = row_mask != nullptr;
  valid_.clear();
  if (masked_) {
    for (int64_t r = 0; r < batch_rows_; ++r)
      if (row_mask[r]) valid_.push_back(r);
    // A mask without padding is the unmasked pass.
    if (static_cast<int64_t>(valid_.size()) == batch_rows_) masked_ = false;
  }
  const int64_t n = masked_ ? static_cast<int64_t>(valid_.size()) : batch_rows_;
  // Sequences of the sequence-wise auxiliary loss, over the rows that take part: each keeps its
  // valid rows, in order, so a padded position leaves its sequence shorter.
  sequences_.clear();
  const int64_t L = options_.training.sequence_length;
  if (training() && !eval_ && L > 0) {
    sequences_.push_back(0);
    size_t v = 0;
    for (int64_t q = 0; q < batch_rows_ / L; ++q) {
      int64_t end = (q + 1) * L;
      if (masked_)
        while (v < valid_.size() && valid_[v] < end) ++v;
      sequences_.push_back(masked_ ? static_cast<int64_t>(v) : end);
    }
  }
  for (auto& l : layers_)
    if (auto* m = dynamic_cast<MoELayer*>(l.get())) m->set_sequences(L > 0 ? &sequences_ : nullptr);
  last_rows_ = n;
}

int64_t Session::caller_row(int64_t row) const {
  return masked_ ? valid_[static_cast<size_t>(row)] : row;
}

template <typename T>
const T* Session::gather_rows(const T* src, int64_t width, std::vector<T>& staging) const {
  if (!masked_) return src;
  staging.resize(valid_.size() * static_cast<size_t>(width));
  for (size_t i = 0; i < valid_.size(); ++i)
    std::copy(src + valid_[i] * width, src + (valid_[i] + 1) * width,
              staging.begin() + static_cast<int64_t>(i) * width);
  return staging.data();
}

void Session::deliver_rows(const float* src, int64_t width, float* out) {
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(width);
  if (!masked_) {
    backend_->download(out, src, row_bytes * static_cast<size_t>(last_rows_));
    return;
  }
  // Padding rows are zero; the others come back in the caller's order, from a device through a
  // host copy.
  std::vector<float> host;
  if (!backend_->host_memory()) {
    host.resize(valid_.size() * static_cast<size_t>(width));
    if (!host.empty()) backend_->download(host.data(), src, host.size() * sizeof(float));
    src = host.data();
  }
  std::fill(out, out + batch_rows_ * width, 0.0f);
  for (size_t i = 0; i < valid_.size(); ++i)
    std::copy(src + static_cast<int64_t>(i) * width, src + static_cast<int64_t>(i + 1) * width,
              out + valid_[i] * width);
}

void Session::forward_tokens(const int32_t* tokens, uint64_t num_tokens, const uint8_t* row_mask,
                             uint64_t mask_len, uint64_t rows, float* out, uint64_t out_len,
                             bool mask_required) {
  const Pass pass = next_pass();
  collective_step("forward", Failure::DiscardsPass, [&] {
    if (!model_->token_input)
      fail(Code::InvalidArgument,
           "this model takes hidden states (its first layer is not an "
           "Embedding): use forward_hidden");
    // The rows first (a caller's empty slices may come as NULL), the input before the output:
    // a binding that cannot size an output for a wrong input passes none, and this refusal,
    // made alike on every rank, names the input.
    check_rows(rows);
    if (!tokens) fail(Code::InvalidArgument, "tokens is NULL");
    const uint64_t width = model_->input_width;
    if (num_tokens != rows * width)
      fail(Code::InvalidArgument, "token buffer holds ", num_tokens, " ids but ", rows, " rows of ",
           width, " tokens need ", rows * width);
    check_out(rows, out, out_len);
    check_mask(rows, row_mask, mask_len, mask_required);
    // Padding rows may hold anything (a pad id outside the vocabulary, say): only the rows that
    // take part are checked and used.
    const auto& emb = std::get<EmbeddingSpec>(model_->layers[0].spec);
    for (uint64_t r = 0; r < rows; ++r) {
      if (row_mask && !row_mask[r]) continue;
      for (uint64_t c = 0; c < width; ++c) {
        const int32_t id = tokens[r * width + c];
        if (id < 0 || static_cast<uint32_t>(id) >= emb.vocab_size)
          fail(Code::InvalidArgument, "token id ", id, " at row ", r, ", column ", c,
               " is outside the vocabulary [0, ", emb.vocab_size, ")");
      }
    }
    refresh_stale_copies();
    // The arguments are good: from here on the pass replaces the one a backward would read.
    pending_backward_ = false;
    begin_pass(rows, row_mask);
    std::vector<int32_t> staging;
    const int32_t* ids = gather_rows(tokens, static_cast<int64_t>(width), staging);
    const size_t n_ids = static_cast<size_t>(last_rows_) * width;
    tokens_.resize(*backend_, n_ids);
    if (n_ids) backend_->upload(tokens_.data(), ids, n_ids * sizeof(int32_t));
    reserve_activations();
  });
  if (par_) par_->exchange_rows(last_rows_);
  if (last_rows_ == 0 && !par_) return finish_empty_pass(out, pass);
  auto& a0 = activations_[0];
  a0.resize(*backend_, static_cast<size_t>(last_rows_) * model_->layers[0].out_width);
  if (par_) par_->drop_held_failure();
  run_layer(0, a0.data(), a0.size(), [&] {
    static_cast<EmbeddingLayer&>(*layers_[0])
        .forward_tokens(*backend_, tokens_.data(), a0.data(), last_rows_, pass);
  });
  std::string bad = check_output(0, a0.data());
  run_from(1, a0.data(), out, pass, std::move(bad));
}

void Session::forward_hidden(const float* in, uint64_t in_len, const uint8_t* row_mask,
                             uint64_t mask_len, uint64_t rows, float* out, uint64_t out_len,
                             bool mask_required) {
  const Pass pass = next_pass();
  std::vector<float> staging;  // a masked pass's rows, where x may point until the pass ends
  const float* x = nullptr;
  collective_step("forward", Failure::DiscardsPass, [&] {
    if (model_->token_input)
      fail(Code::InvalidArgument,
           "this model takes token ids (its first layer is an Embedding): "
           "use forward_tokens");
    // The rows first (a caller's empty slices may come as NULL), the input before the output:
    // a binding that cannot size an output for a wrong input passes none, and this refusal,
    // made alike on every rank, names the input.
    check_rows(rows);
    if (!in) fail(Code::InvalidArgument, "in is NULL");
    const uint64_t width = model_->input_width;
    if (in_len != rows * width)
      fail(Code::InvalidArgument, "input buffer holds ", in_len, " floats but ", rows,
           " rows of width ", width, " need ", rows * width);
    check_out(rows, out, out_len);
    check_mask(rows, row_mask, mask_len, mask_required);
    refresh_stale_copies();
    // The arguments are good: from here on the pass replaces the one a backward would read.
    pending_backward_ = false;
    begin_pass(rows, row_mask);
    x = gather_rows(in, static_cast<int64_t>(width), staging);
    // The caller's buffer is not ours to keep: a training pass's backward reads the input again,
    // and a device reads its own memory. Another pass on the CPU reads it where it lies (the
    // rows only, during this call; `out` may be `in`: the last layer writes our buffer, and
    // deliver_rows copies it out at the end). Among ranks the copy stays: the exchanges' buffers
    // are the ranks' own.
    if (pass == Pass::Train || !backend_->host_memory() || par_) {
      const size_t n = static_cast<size_t>(last_rows_) * width;
      input_.resize(*backend_, n);
      if (n) backend_->upload(input_.data(), x, n * sizeof(float));
      x = input_.data();
    }
    // Checked where the layers read it, by the backend's parallel scan: a failure leaves nothing
    // behind that a later call reads (no backward is pending any more).
    if (options_.check_finite) refuse_nonfinite(x, static_cast<int64_t>(width), "input");
    reserve_activations();
  });
  if (par_) par_->exchange_rows(last_rows_);
  if (last_rows_ == 0 && !par_) return finish_empty_pass(out, pass);
  if (par_) par_->drop_held_failure();
  run_from(0, x, out, pass, "");
}

std::string Session::nonfinite_at(const float* rows, int64_t width) const {
  const int64_t bad = last_rows_ > 0 ? backend_->find_nonfinite(rows, last_rows_ * width) : -1;
  return bad < 0 ? "" : cat("row ", caller_row(bad / width), ", column ", bad % width);
}

void Session::refuse_nonfinite(const float* rows, int64_t width, const char* what) const {
  if (const std::string at = nonfinite_at(rows, width); !at.empty())
    fail(Code::Numeric, what, " holds a NaN or infinity at ", at);
}

template <typename F>
void Session::collective_step(const char* call, Failure failure, F&& body) {
  if (!par_) return body();
  std::exception_ptr failed;
  try {
    body();
  } catch (...) {
    failed = std::current_exception();
  }
  try {
    par_->agree(failed, call, pass_settings(),
                "its eval mode, check_finite, ep_chunks or ep_overlap (set_eval and set_config are "
                "local to a "
                "rank: make the same calls on every rank)");
  } catch (...) {
    if (failure == Failure::DiscardsPass) pending_backward_ = false;
    throw;
  }
}

std::string Session::check_output(size_t layer, const float* y) const {
  if (!options_.check_finite) return "";
  const int64_t width = model_->layers[layer].out_width;
  const std::string at = nonfinite_at(y, width);
  if (at.empty()) return "";
  const std::string why =
      cat("layer ", layer, " ('", model_->layers[layer].name, "', ",
          layer_kind_name(model_->layers[layer].kind), "): its output holds a NaN or infinity at ",
          at, " although its inputs are finite: a value exceeded the fp32 range");
  // Alone, stop here; among ranks, finish the pass (its collectives) and refuse it together.
  if (!par_) fail(Code::Numeric, why);
  return why;
}

void Session::reserve_activations() {
  for (size_t i = 0; i < layers_.size(); ++i)
    activations_[i].resize(*backend_,
                           static_cast<size_t>(last_rows_) * model_->layers[i].out_width);
}

void Session::reserve_backward(const float* grad_in) {
  // Kept between calls: a fresh buffer each call costs a page fault per 4 KiB on the CPU.
  if (grad_in) grad_in_.resize(*backend_, static_cast<size_t>(last_rows_) * model_->input_width);
  // run_backward writes layer i's input gradient (i > 0) into dx_ and then swaps the two, so
  // each holds every other layer's: dy_ the output gradient and layers n-2, n-4, ...; dx_ layers
  // n-1, n-3, ... (layer 0 writes grad_in).
  uint32_t dy_width = model_->output_width, dx_width = 0;
  bool into_dx = true;
  for (size_t i = model_->layers.size(); i-- > 1; into_dx = !into_dx) {
    uint32_t& w = into_dx ? dx_width : dy_width;
    w = std::max(w, model_->layers[i].in_width);
  }
  dy_.resize(*backend_, static_cast<size_t>(last_rows_) * dy_width);
  if (dx_width > 0) dx_.resize(*backend_, static_cast<size_t>(last_rows_) * dx_width);
  for (size_t i = 0; i < layers_.size(); ++i)
    layers_[i]->reserve_backward(*backend_, last_rows_, i > 0 || grad_in != nullptr);
  // Device backends among ranks: the backward's own gradient buffers (begin_local_gradients).
  if (par_ && !par_->root_reduction()) {
    std::vector<size_t> at;
    size_t total = 0;
    local_gradient_layout(at, total);
    local_grads_.resize(*backend_, total);
  }
}

template <typename F>
void Session::run_layer(size_t layer, float* out, size_t n, F&& f) {
  // Among ranks a MoE layer waits for its exchanges: a host's signal (SIGINT) must be able to
  // reach the thread meanwhile. Every other layer is computation alone.
  if (par_ && model_->layers[layer].kind == LayerKind::MoE) return f();
  const ComputeStretch stretch(*backend_);
  if (!par_) return f();
  if (!par_->compute(f) && out) backend_->zero(out, n * sizeof(float));
}

void Session::run_from(size_t first_layer, const float* x, float* out, Pass pass, std::string bad) {
  std::optional<ComputeStretch> alone;  // in one process a pass waits for nothing: run_layer
  if (!par_) alone.emplace(*backend_);
  // Among ranks, a layer's own computation that fails is held (ParallelContext::compute) while
  // the pass's exchanges go on, and refused with the pass at its end.
  std::exception_ptr held = par_ ? par_->held_failure() : nullptr;
  // Among ranks both may be found: the earlier is the cause (a layer reading an overflowed
  // output fails after the layer that overflowed). `bad` given is found before first_layer.
  int64_t held_at = held ? -1 : INT64_MAX, bad_at = bad.empty() ? INT64_MAX : -1;
  for (size_t i = first_layer; i < layers_.size(); ++i) {
    auto& act = activations_[i];
    act.resize(*backend_, static_cast<size_t>(last_rows_) * model_->layers[i].out_width);
    try {
      run_layer(i, act.data(), act.size(),
                [&] { layers_[i]->forward(*backend_, x, act.data(), last_rows_, pass); });
    } catch (const Error& e) {
      throw with_unchecked_source(e, i, x, model_->layers[i].in_width, "input");
    }
    if (par_ && !held && par_->held_failure()) {
      held = held_with_source(par_->held_failure(), i, x, model_->layers[i].in_width, "input");
      held_at = static_cast<int64_t>(i);
    }
    if (std::string why = check_output(i, act.data()); bad.empty() && !why.empty()) {
      bad = std::move(why);
      bad_at = static_cast<int64_t>(i);
    }
    x = act.data();
  }
  if (par_) {
    par_->drop_held_failure();
    collective_step("forward", Failure::DiscardsPass, [&] {
      if (held && held_at <= bad_at) std::rethrow_exception(held);
      if (!bad.empty()) fail(Code::Numeric, bad);
    });
  }
  deliver_rows(x, model_->output_width, out);
  // Statistics become visible only now that nothing can fail: a refused pass counts nothing.
  for (auto& l : layers_) l->commit_stats(pass);
  pending_backward_ = pass == Pass::Train;
}

std::exception_ptr Session::held_with_source(std::exception_ptr held, size_t layer,
                                             const float* rows, int64_t width,
                                             const char* what) const {
  try {
    std::rethrow_exception(held);
  } catch (const Error& e) {
    return std::make_exception_ptr(with_unchecked_source(e, layer, rows, width, what));
  } catch (...) {
    return std::current_exception();
  }
}

Error Session::with_unchecked_source(const Error& e, size_t layer, const float* rows, int64_t width,
                                     const char* what) const {
  if (e.code() != Code::Numeric) return e;
  const std::string named = cat("layer ", layer, " ('", model_->layers[layer].name, "', ",
                                layer_kind_name(model_->layers[layer].kind), "): ");
  // The kernel that met the value (an FP8 quantizer, say) names it in its own arrangement of the
  // rows (an expert's list); the caller needs it in theirs. Scanned on this failure only.
  if (const std::string at = nonfinite_at(rows, width); !at.empty()) {
    if (!options_.check_finite)
      return Error(Code::Numeric,
                   cat(named, "its ", what, " holds a NaN or infinity at ", at,
                       ", which check_finite (off) did not refuse before a kernel met it"));
    // Checked, what the pass began with was finite. Alone, a forward stops at the first layer
    // whose output is not; among ranks it goes on to the pass's end (check_output), so a later
    // layer may meet that output.
    const bool forward = std::string_view(what) == "input";
    return Error(Code::Numeric,
                 cat(named, "its ", what, " holds a NaN or infinity at ", at, " although ",
                     forward ? "the pass's input is finite: an earlier layer's output"
                             : "grad_out is finite: a value in the backward of a later layer",
                     " exceeded the fp32 range"));
  }
  // What the layer reads is finite: a value it computed overflowed, and the kernel that met it
  // (an FP8 quantizer: E4M3 has no infinity) named the layer's row, which the caller counts
  // otherwise.
  const auto* at_row = dynamic_cast<const RowError*>(&e);
  if (!at_row) return e;
  // Among ranks the routed experts' rows came from every rank, whose inputs this rank has not
  // seen: the kernel's count stays (it says what it counts), and no cause is claimed.
  if (!at_row->layer_row()) return Error(Code::Numeric, cat(named, e.message()));
  return Error(Code::Numeric,
               cat(named, at_row->message_at(caller_row(at_row->row())), "; the layer's ", what,
                   " is finite, so a value computed from it exceeded the fp32 range"));
}

void Session::finish_empty_pass(float* out, Pass pass) {
  std::fill(out, out + batch_rows_ * static_cast<int64_t>(model_->output_width), 0.0f);
  for (auto& l : layers_) {
    l->skip_pass();
    l->commit_stats(pass);
  }
  pending_backward_ = pass == Pass::Train;
}

// dy_ holds the gradient of the outputs; grad_in (backend memory) receives the input's, if asked.
// Once it has begun, a failure leaves part of this micro-batch's gradient accumulated: the step is
// then refused until zero_grad discards it. Ends with `call`'s closing agreement among ranks.
double Session::run_backward(float* grad_in, const char* call) {
  std::optional<ComputeStretch> alone;  // as in run_from
  if (!par_) alone.emplace(*backend_);
  const int64_t rows = last_rows_;
  double aux = 0.0;
  try {
    // Among ranks every rank runs every layer, rows or not: the layers' exchanges are collective.
    const bool roots = par_ && par_->root_reduction();
    store_->set_row_share(roots, roots ? par_->first_chunk() : 0);
    // Roots a failed backward handed out are not this one's.
    store_->take_roots();
    // As in run_from; the caller dropped what an earlier call held.
    std::exception_ptr held = par_ ? par_->held_failure() : nullptr;
    // Device backends: this backward's gradients go to zeroed buffers of their own, all-reduced
    // and added once it is done.
    const bool local = par_ && !roots;
    if (local) begin_local_gradients();
    const OnExit restore([&]() noexcept {
      if (local) end_local_gradients();
    });
    for (size_t i = layers_.size(); (rows > 0 || par_) && i-- > 0;) {
      aux += layers_[i]->aux_loss();
      float* target = grad_in;  // the first layer's dx: null when nobody needs it
      if (i > 0) {
        dx_.resize(*backend_, static_cast<size_t>(rows) * model_->layers[i].in_width);
        target = dx_.data();
      }
      try {
        run_layer(i, target, static_cast<size_t>(rows) * model_->layers[i].in_width,
                  [&] { layers_[i]->backward(*backend_, dy_.data(), target, rows); });
      } catch (const Error& e) {
        throw with_unchecked_source(e, i, dy_.data(), model_->layers[i].out_width,
                                    "output gradient");
      }
      if (par_ && !held && par_->held_failure())
        held = held_with_source(par_->held_failure(), i, dy_.data(), model_->layers[i].out_width,
                                "output gradient");
      if (i > 0) std::swap(dy_, dx_);
    }
    if (par_) par_->drop_held_failure();
    std::string why;
    if (grad_in && options_.check_finite) {
      if (const std::string at = nonfinite_at(grad_in, model_->input_width); !at.empty())
        why = cat("the input gradient holds a NaN or infinity at ", at,
                  " although grad_out is finite: a value exceeded the fp32 range");
    }
    // The layers have added this micro-batch to the gradients (a checkpoint saved after a
    // refusal below counts it with them).
    ++micro_batches_;
    // Every rank has made the layers' exchanges: all learn here whether any failed, before the
    // gradients are combined (a rank that failed holds part of its roots only).
    collective_step(call, Failure::KeepsPass, [&] {
      if (held) std::rethrow_exception(held);
      if (!why.empty()) fail(Code::Numeric, why);
    });
    if (par_ && roots) combine_gradients();
    if (local) reduce_local_gradients();
  } catch (const Error& e) {
    poison_step(e.code(), e.message());
    throw;
  } catch (const std::bad_alloc&) {
    poison_step(Code::OutOfMemory, "out of memory");
    throw;
  }
  pending_backward_ = false;
  return aux;
}

void Session::combine_gradients() {
  const auto start = std::chrono::steady_clock::now();
  // Replicated parameters: every rank held some of the job's rows.
  std::vector<ParamStore::PendingRoots> pending = store_->take_roots();
  std::vector<ParallelContext::Roots> all;
  for (auto& p : pending) all.push_back({p.roots.get(), p.acc, p.n, p.sparse});
  par_->combine(*backend_, par_->world(), all);
  // Routed experts: each shard's replicas held some of each expert's chunks.
  for (auto& l : layers_)
    if (auto* m = dynamic_cast<MoELayer*>(l.get())) m->combine_expert_gradients(*backend_);
  par_->times.gradients +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::vector<double> Session::profile() const {
  const CommTimes t = par_ ? par_->times : CommTimes{};
  return {t.dispatch, t.combine, t.experts, t.gradients};
}

void Session::poison_step(Code code, const std::string& why) {
  pending_backward_ = false;
  if (poisoned_.empty()) {
    poisoned_code_ = code;
    poisoned_ = why;
  }
}

double Session::backward_loss(const int32_t* targets, uint64_t num_targets) {
  const uint32_t vocab = model_->output_width;
  // The loss is the mean over the rows that take part and whose target is not ignored.
  std::vector<int32_t> compact;
  int64_t counted = 0;
  collective_step("backward_loss", Failure::KeepsPass, [&] {
    require_backward_ready();
    if (!targets) fail(Code::InvalidArgument, "targets is NULL");
    if (model_->layers.back().kind != LayerKind::OutputHead)
      fail(Code::InvalidState,
           "backward with targets needs an OutputHead as the last layer; use "
           "moert_session_backward with the output gradient instead");
    check_len(num_targets, batch_rows_, "targets");
    compact.resize(static_cast<size_t>(last_rows_));
    for (int64_t i = 0; i < last_rows_; ++i) {
      const int32_t t = targets[caller_row(i)];
      if (t == kIgnoreTarget) {
        compact[static_cast<size_t>(i)] = -1;
        continue;
      }
      if (t < 0 || static_cast<uint32_t>(t) >= vocab)
        fail(Code::InvalidArgument, "target ", t, " at row ", caller_row(i),
             " is outside the vocabulary [0, ", vocab, ") and is not the ignored target ",
             kIgnoreTarget);
      compact[static_cast<size_t>(i)] = t;
      ++counted;
    }
    targets_.resize(*backend_, compact.size());
    if (!compact.empty())
      backend_->upload(targets_.data(), compact.data(), compact.size() * sizeof(int32_t));
    reserve_backward(nullptr);
  });
  // Among ranks: the mean over the job's counted rows, the loss summed over its chunks in order.
  if (par_) par_->host().all_reduce_sum(&counted, 1, ReduceType::I64);
  const auto& logits = activations_.back();
  const double inv_rows = counted > 0 ? 1.0 / static_cast<double>(counted) : 0.0;
  std::vector<double> chunk_loss;
  if (par_) par_->drop_held_failure();
  if (last_rows_ > 0) {
    dy_.resize(*backend_, static_cast<size_t>(last_rows_) * vocab);
    // Among ranks a failure here is held and raised at the backward's closing agreement, after
    // the exchanges the other ranks make in it.
    const auto loss = [&] {
      backend_->cross_entropy(logits.data(), targets_.data(), last_rows_, vocab, dy_.data(),
                              static_cast<float>(inv_rows), chunk_loss);
    };
    if (!par_)
      loss();
    else if (!par_->compute(loss))
      chunk_loss.clear();
  }
  if (par_) chunk_loss = par_->gather(chunk_loss);
  const double ce = chunk_loss.empty() ? 0.0 : tree_sum(std::move(chunk_loss));
  return ce * inv_rows + run_backward(nullptr, "backward_loss");
}

double Session::backward(const float* grad_out, uint64_t grad_out_len, float* grad_in,
                         uint64_t grad_in_len) {
  const int64_t out_w = model_->output_width, in_w = model_->input_width;
  collective_step("backward", Failure::KeepsPass, [&] {
    require_backward_ready();
    if (!grad_out) fail(Code::InvalidArgument, "grad_out is NULL");
    check_len(grad_out_len, batch_rows_ * out_w, "grad_out");
    if (grad_in) {
      if (model_->token_input)
        fail(Code::InvalidArgument, "grad_in must be NULL for a model that takes token ids");
      check_len(grad_in_len, batch_rows_ * in_w, "grad_in");
    } else if (grad_in_len != 0) {
      // A length without its buffer is a caller's mistake, not a request for no input gradient.
      fail(Code::InvalidArgument, "grad_in is NULL but grad_in_len is ", grad_in_len,
           ": pass NULL with 0 when the input gradient is not wanted");
    }
    std::vector<float> staging;
    const float* g = gather_rows(grad_out, out_w, staging);
    const size_t n = static_cast<size_t>(last_rows_ * out_w);
    reserve_backward(grad_in);
    dy_.resize(*backend_, n);
    if (n) backend_->upload(dy_.data(), g, n * sizeof(float));
    // dy_ is written by every backward before it is read, so a refusal here loses nothing.
    if (options_.check_finite) refuse_nonfinite(dy_.data(), out_w, "grad_out");
  });
  if (par_) par_->drop_held_failure();
  const double aux = run_backward(grad_in ? grad_in_.data() : nullptr, "backward");
  if (grad_in) deliver_rows(grad_in_.data(), in_w, grad_in);
  return aux;
}

void Session::zero_grad() {
  require_training("zero_grad");
  store_->zero_grads();
  micro_batches_ = 0;
  // zero_grad discards the step: nothing of it — counts, a pass waiting for its backward, a
  // failure — reaches the next one.
  for (auto& l : layers_)
    if (auto* m = dynamic_cast<MoELayer*>(l.get()))
      std::fill(m->counts().step.begin(), m->counts().step.end(), 0);
  pending_backward_ = false;
  poisoned_.clear();
  gradient_from_checkpoint_ = false;
  std::erase_if(written_, [](const auto& w) { return w.first.first == Written::Gradient; });
}

StepInfo Session::step(std::optional<StepInfo>* made) {
  // Among ranks a refusal anywhere is every rank's: a rank that stepped alone would pair its
  // gradient norm's all-gather with the others' next collective and move its replicated
  // parameters away from theirs. A refused first step takes back the moments it allocated: a
  // rank refused before its allocation would otherwise hold other optimizer state (none) than
  // the others (zeros), and every save would refuse the job's replicas as different.
  for (Slot& s : slots_) s.fresh_moments = 0;
  // Every refusal before the update takes them back, so that a refused step leaves the
  // optimizer state as it found it: a checkpoint of it then holds no moments of an optimizer
  // that never stepped (set_config may still change the optimizer before the first step).
  auto take_back_moments = [&] {
    for (Slot& s : slots_) {
      if (s.fresh_moments & 1) s.m = Buffer<float>();
      if (s.fresh_moments & 2) s.v = Buffer<float>();
      s.fresh_moments = 0;
    }
  };
  try {
    collective_step("step", Failure::KeepsPass, [&] {
      require_training("step");
      if (eval_) fail(Code::InvalidState, "step in eval mode: switch back to training first");
      check_schedule(options_.training, Code::InvalidState);
      if (!poisoned_.empty())
        fail(poisoned_code_,
             "a backward pass of this step failed after it had begun accumulating "
             "gradients (",
             poisoned_, "); call zero_grad to discard the step, or load a checkpoint");
      // The moments first, inside the agreement, when this step may update: an allocation that
      // fails on one rank then refuses the step on every rank, before any change. A step that
      // turns out not to update (an all-zero gradient) takes them back below.
      if (micro_batches_ > 0 || gradient_written() || gradient_from_checkpoint_) allocate_moments();
    });
    if (par_) check_ranks_agree_to_step();
  } catch (...) {
    take_back_moments();
    throw;
  }
  // In one process the step waits for nothing (run_layer); among ranks, its update below.
  std::optional<ComputeStretch> alone;
  if (!par_) alone.emplace(*backend_);
  // Everything that can refuse the step comes before the first change.
  std::vector<std::vector<float>> biases;
  double sum_squares = 0.0;
  try {
    biases = next_biases();
    // With no backward since zero_grad the gradient is zero unless set_gradient wrote it: then
    // it is the step's gradient as written, where before it was ignored (the optimizer ran only
    // after a backward). The sum is the same on every rank, so all take the same branch.
    sum_squares = gradient_sum_squares();
  } catch (...) {
    take_back_moments();
    throw;
  }
  auto refuse = [&](const auto&... why) {
    take_back_moments();
    fail(Code::Numeric, why...);
  };
  const TrainingConfig& c = options_.training;
  StepInfo info;
  info.lr = c.lr_at(step_ + 1);
  bool updated = false;
  if (micro_batches_ > 0 || sum_squares != 0.0) {
    // The gradient of the mean loss over the micro-batches accumulated since zero_grad.
    const double scale = 1.0 / std::max<uint32_t>(micro_batches_, 1);
    info.grad_norm = std::sqrt(sum_squares) * scale;
    if (!std::isfinite(info.grad_norm))
      refuse("the gradient holds a NaN or infinity; parameters left unchanged");
    double gscale = scale;
    if (c.clip_norm > 0.0 && info.grad_norm > c.clip_norm) gscale *= c.clip_norm / info.grad_norm;
    const bool adamw = c.optimizer == "adamw";
    // No element of the scaled gradient exceeds its norm; squared in fp32 for AdamW's second
    // moment, one above 2^64 would make it infinite (and the update zero).
    if (const double largest = info.grad_norm * gscale / scale; adamw && largest >= 0x1p64)
      refuse("the gradient's norm (", largest,
             " after scaling) would overflow AdamW's second moment in fp32; parameters left "
             "unchanged (clip_norm bounds it)");
    const uint64_t t = step_ + 1;
    const double bc1 = 1.0 - std::pow(c.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(c.beta2, static_cast<double>(t));
    // Each parameter's update, gathered before the first change: AdamW's run as one call.
    std::vector<Backend::AdamWTensor> tensors;
    try {
      allocate_moments();  // made above already, unless a source of gradients escaped that test
      tensors.reserve(slots_.size());
      for (Slot& s : slots_)
        tensors.push_back({store_->f32_mutable(*s.param), store_->grad(*s.param), s.m.data(),
                           s.v.data(), s.param->numel(), s.matrix ? c.weight_decay : 0.0});
    } catch (...) {
      take_back_moments();
      throw;
    }
    updated = true;
    const ComputeStretch update(*backend_);
    stale_copies_.clear();  // every copy is made again below
    if (adamw)
      backend_->adamw_many(tensors.data(), tensors.size(), info.lr, c.beta1, c.beta2, c.eps, gscale,
                           bc1, bc2);
    else
      for (const Backend::AdamWTensor& x : tensors)
        backend_->sgd(x.p, x.g, x.m, x.n, info.lr, c.momentum, x.wd, gscale);
    // A copy that cannot be refreshed does not stop the update: every parameter and the biases
    // still take the step (among ranks, as on the others), and the failure is reported with it.
    for (size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      try {
        store_->refresh_copies(*s.param);
      } catch (const Error& e) {
        stale_copies_.push_back({i, e.code(), e.message()});
      } catch (const std::bad_alloc&) {
        stale_copies_.push_back({i, Code::OutOfMemory, "out of memory"});
      }
    }
  }
  if (!updated) take_back_moments();
  commit_biases(biases);
  // A forward waiting for its backward is over: its backward would multiply what the forward
  // kept by the updated weights and biases, a gradient of neither.
  pending_backward_ = false;
  ++step_;
  if (made) *made = info;
  if (updated) refuse_overflowed_update(info.lr);
  return info;
}

namespace {

// What brings a stale copy back. Stale copies come from a step, which ends any pass waiting for
// its backward, so set_parameter is never refused for one, and a backward never meets one (its
// forward made them all again or failed).
constexpr const char* kStaleCopyRemedy =
    "write the parameter back (moert_session_set_parameter) or load a checkpoint";

}  // namespace

void Session::refresh_stale_copies() {
  while (!stale_copies_.empty()) {
    const StaleCopy& stale = stale_copies_.front();
    std::string now;
    Code code = stale.code;
    try {
      store_->refresh_copies(*slots_[stale.slot].param);
    } catch (const Error& e) {
      code = e.code();
      now = e.message();
    } catch (const std::bad_alloc&) {
      code = Code::OutOfMemory;
      now = "out of memory";
    }
    if (!now.empty())
      fail(code, "parameter '", slots_[stale.slot].name,
           "' has no up-to-date copy for the passes to multiply by: a step could not make it (",
           stale.why, "), nor can this call (", now, "); ", kStaleCopyRemedy);
    stale_copies_.erase(stale_copies_.begin());
  }
}

void Session::allocate_moments() {
  const bool adamw = options_.training.optimizer == "adamw";
  for (auto& s : slots_) {
    const size_t n = s.param->values.size();
    if (s.m.size() != n) {
      s.m.resize(*backend_, n);
      s.fresh_moments |= 1;
      backend_->zero(s.m.data(), n * sizeof(float));
    }
    if (adamw && s.v.size() != n) {
      s.v.resize(*backend_, n);
      s.fresh_moments |= 2;
      backend_->zero(s.v.data(), n * sizeof(float));
    }
  }
}

bool Session::gradient_written() const {
  return std::any_of(written_.begin(), written_.end(),
                     [](const auto& w) { return w.first.first == Written::Gradient; });
}

void Session::refuse_overflowed_update(double lr) {
  // An update that overflowed (a learning rate or weight decay too large for the values) cannot
  // be undone without a second copy of the state, so it is found after the fact: the step is
  // made and counted, and the call says so before any pass or save meets the values. AdamW's
  // moments cannot overflow (step() bounds the gradient); SGD's momentum can. One batched scan
  // finds whether any value is not finite, then the tensors are searched only when one is. Among
  // ranks the agreement is made whatever check_finite says, which may differ between ranks.
  const TrainingConfig& c = options_.training;
  const bool sgd = c.optimizer != "adamw";
  auto refuse_overflow = [&] {
    std::vector<const float*> pieces;
    std::vector<int64_t> sizes;
    for (const auto& s : slots_) {
      pieces.push_back(store_->f32(*s.param));
      sizes.push_back(s.param->numel());
      if (sgd) {
        pieces.push_back(s.m.data());
        sizes.push_back(s.param->numel());
      }
    }
    if (!backend_->any_nonfinite_many(pieces.data(), sizes.data(), pieces.size())) return;
    for (size_t i = 0; i < pieces.size(); ++i) {
      const int64_t at = backend_->find_nonfinite(pieces[i], sizes[i]);
      if (at < 0) continue;
      const Slot& s = slots_[sgd ? i / 2 : i];
      fail(Code::Numeric, "step ", step_, " (learning rate ", lr, ", weight decay ",
           s.matrix ? c.weight_decay : 0.0, ") took ",
           sgd && i % 2 ? "the momentum of parameter '" : "parameter '", s.name,
           "' beyond the fp32 range at element ", at,
           ". The step was made and counted (moert_session_step_count); it cannot be undone: "
           "load a checkpoint, or write the parameters back (the optimizer's moments and the "
           "biases keep the step)");
    }
  };
  collective_step("step (after the update)", Failure::KeepsPass, [&] {
    if (options_.check_finite) refuse_overflow();
    // A copy the update could not make, reported after an overflow (its usual cause).
    if (!stale_copies_.empty()) {
      const StaleCopy& stale = stale_copies_.front();
      fail(stale.code, "step ", step_, " was made and counted, but the copy of parameter '",
           slots_[stale.slot].name, "' that the passes multiply by could not be made (", stale.why,
           "): passes are refused until then; ", kStaleCopyRemedy);
    }
  });
}

double Session::gradient_sum_squares() const {
  // Sums of squares per piece, added in a fixed order: every parameter whole, but the routed
  // experts' tensors one expert at a time, so that ranks holding different experts add the same
  // pieces in the same order as one process.
  std::vector<const float*> pieces;
  std::vector<int64_t> sizes;
  for (const auto& s : slots_) {
    const float* g = store_->grad(*s.param);
    const int64_t experts = std::max<int64_t>(1, expert_count(s));
    const int64_t each = s.param->numel() / experts;
    for (int64_t e = 0; e < experts; ++e) {
      pieces.push_back(g + e * each);
      sizes.push_back(each);
    }
  }
  if (!par_) return backend_->sum_squares_many(pieces.data(), sizes.data(), pieces.size());
  // Among ranks: the replicated parameters' pieces from rank 0 (every rank has the same), and
  // each slot's experts shard after shard, each from the shard's first replica (ranks 0 .. EP-1).
  std::vector<double> mine(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) mine[i] = backend_->sum_squares(pieces[i], sizes[i]);
  std::vector<double> all(mine.size() * static_cast<size_t>(par_->size()));
  par_->host().all_gather(mine.data(), static_cast<int64_t>(mine.size() * 8), all.data());
  double total = 0.0;
  size_t i = 0;
  for (const auto& s : slots_) {
    const int64_t experts = expert_count(s);
    if (experts == 0) {
      total += all[i++];
      continue;
    }
    for (int shard = 0; shard < par_->ep(); ++shard)
      for (int64_t e = 0; e < experts; ++e)
        total += all[static_cast<size_t>(shard) * mine.size() + i + static_cast<size_t>(e)];
    i += static_cast<size_t>(experts);
  }
  return total;
}

int64_t Session::expert_count(const Slot& s) const {
  // The routed experts a MoE layer's expert tensor holds here (its shard's, among ranks); 0 for
  // every other tensor.
  for (const auto& layer : params_->layers) {
    const auto* m = std::get_if<MoESpec>(&layer.spec);
    if (m && (s.param == &m->w1 || s.param == &m->w3 || s.param == &m->w2))
      return m->router.num_experts / static_cast<uint32_t>(par_ ? par_->ep() : 1);
  }
  return 0;
}

std::vector<std::vector<float>> Session::next_biases() const {
  std::vector<std::vector<float>> next(layers_.size());
  for (uint32_t i = 0; i < layers_.size(); ++i) {
    if (model_->layers[i].kind != LayerKind::MoE) continue;
    const auto& counts = static_cast<const MoELayer&>(*layers_[i]).counts().step;
    const auto& spec = std::get<MoESpec>(params_->layers[i].spec);
    const Balance& b = balance_[i];
    if (spec.balancing.policy != BalancingPolicy::LossFreeBias || b.frozen || b.gamma <= 0.0f)
      continue;
    // b_i += gamma * sign(mean - count_i), from integer counts over the whole step.
    const double mean = count_total(counts) / static_cast<double>(counts.size());
    std::vector<float>& bias = next[i] = spec.gate_bias.values;
    for (size_t e = 0; e < counts.size(); ++e) {
      const double diff = mean - static_cast<double>(counts[e]);
      if (diff > 0.0)
        bias[e] += b.gamma;
      else if (diff < 0.0)
        bias[e] -= b.gamma;
    }
    if (spec.balancing.bias_centering) {
      double sum = 0.0;
      for (float v : bias) sum += v;
      const float centre = static_cast<float>(sum / static_cast<double>(bias.size()));
      for (float& v : bias) v -= centre;
    }
    for (size_t e = 0; e < bias.size(); ++e)
      if (!std::isfinite(bias[e]))
        fail(Code::Numeric, "layer ", i, " ('", model_->layers[i].name,
             "'): the bias update (rate ", b.gamma, ") would take expert ", e, "'s bias from ",
             spec.gate_bias.values[e],
             " beyond the fp32 range; the step was refused and nothing changed");
  }
  return next;
}

void Session::commit_biases(const std::vector<std::vector<float>>& next) {
  for (uint32_t i = 0; i < layers_.size(); ++i) {
    if (model_->layers[i].kind != LayerKind::MoE) continue;
    auto& counts = static_cast<MoELayer&>(*layers_[i]).counts().step;
    if (!next[i].empty()) {
      auto& spec = std::get<MoESpec>(params_->layers[i].spec);
      // Copied in place: the store may hold the values' address.
      std::copy(next[i].begin(), next[i].end(), spec.gate_bias.values.begin());
      // The update is computed on the host, the same code for every backend, then mirrored.
      store_->upload(spec.gate_bias);
    }
    std::fill(counts.begin(), counts.end(), 0);
  }
}

void Session::set_eval(bool eval) {
  require_training("set_eval");
  // The pending pass stays: only a forward run in eval mode replaces what its backward reads.
  eval_ = eval;
}

void Session::set_config(const std::string& key, const std::string& value) {
  // Knobs of training alone: on an inference session they would be accepted and never used.
  // Refused whatever the value, before it is parsed.
  static const char* const kTrainingKeys[] = {
      "optimizer",     "lr",       "min_lr",    "weight_decay", "beta1",       "beta2",
      "eps",           "momentum", "clip_norm", "warmup_steps", "total_steps", "sequence_length",
      "aux_loss_scope"};
  if (!training() &&
      std::find(std::begin(kTrainingKeys), std::end(kTrainingKeys), key) != std::end(kTrainingKeys))
    fail(Code::InvalidState, "'", key,
         "' is a training knob: this session was created in inference mode");
  SessionOptions updated = options_;
  updated.set(key, value);
  if (key == "cuda_plugin" && updated.cuda_plugin != options_.cuda_plugin)
    fail(Code::InvalidState,
         "cuda_plugin is chosen when the session is created (the plugin is loaded then)");
  if (key == "precision" && updated.precision != precision_)
    fail(Code::InvalidState,
         "the precision is chosen when the session is created (its weight copies are made then)");
  if (key == "fp8_scales" && updated.fp8.power_of_two_scales != options_.fp8.power_of_two_scales)
    fail(Code::InvalidState,
         "fp8_scales is chosen when the session is created (its FP8 weight copies are made then)");
  if (key == "layout_copies" && updated.layouts != options_.layouts)
    fail(Code::InvalidState,
         "layout_copies is chosen when the session is created (its weight copies are made "
         "then)");
  if (key == "optimizer" && updated.training.optimizer != options_.training.optimizer && step_ > 0)
    fail(Code::InvalidState,
         "the optimizer cannot change after the first step (its state would "
         "not carry over)");
  if ((key == "sequence_length" || key == "aux_loss_scope") && pending_backward_)
    fail(Code::InvalidState, key, " cannot change between a forward and its backward");
  options_ = updated;
  pass_on_options();
}

namespace {
// A release of at least this much working memory is followed by malloc_trim (after_call).
constexpr size_t kTrimAfterBytes = size_t{16} << 20;
}  // namespace

size_t Session::work_bytes() const {
  size_t n = held_bytes(input_, dy_, dx_, grad_in_, tokens_, targets_) + backend_->work_bytes();
  for (const auto& a : activations_) n += a.capacity_bytes();
  for (const auto& l : layers_) n += l->work_bytes();
  return n + valid_.capacity() * sizeof(valid_[0]) + sequences_.capacity() * sizeof(int64_t);
}

void Session::after_call(bool out_of_memory) {
  if (pending_backward_) return;
  if (!out_of_memory && options_.kept_work_bytes == std::numeric_limits<uint64_t>::max()) return;
  const size_t held = work_bytes();
  if (!out_of_memory && held <= options_.kept_work_bytes) return;
  clear_buffers(input_, dy_, dx_, grad_in_, tokens_, targets_);
  for (auto& a : activations_) a.clear();
  valid_ = {};
  sequences_ = {};
  for (auto& l : layers_) l->release_work();
  backend_->release_work();
#ifdef __GLIBC__
  // glibc keeps freed blocks below its mmap threshold (which rises to 32 MiB as large blocks come
  // and go) in its heap, where one live block above them pins them all: measured, a 160 MiB
  // release gave back 30 MiB of resident memory. What the bound is for is the process's
  // footprint, so a large release hands the heap's free memory back too (the whole heap's).
  if (held >= kTrimAfterBytes) malloc_trim(0);
#endif
}

const std::string& Session::parameter_name(size_t index) const {
  require_training("parameter access");
  if (index >= slots_.size())
    fail(Code::InvalidArgument, "parameter index ", index, " is out of range (", slots_.size(),
         " parameters)");
  return slots_[index].name;
}

int64_t Session::parameter_size(size_t index) const {
  parameter_name(index);
  return slots_[index].param->numel();
}

size_t Session::parameter_index(const std::string& name) const {
  require_training("parameter access");
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].name == name) return i;
  fail(Code::InvalidArgument, "no parameter named '", name, "'");
}

void Session::read_parameter(size_t index, float* out, uint64_t len) const {
  check_len(len, parameter_size(index), "parameter");
  store_->download(*slots_[index].param);
  std::copy(slots_[index].param->values.begin(), slots_[index].param->values.end(), out);
}

void Session::write_parameter(size_t index, const float* in, uint64_t len) {
  check_len(len, parameter_size(index), "parameter");
  for (uint64_t i = 0; i < len; ++i)
    if (!std::isfinite(in[i]))
      fail(Code::Numeric, "parameter '", slots_[index].name, "': element ", i, " is not finite");
  if (pending_backward_)
    fail(Code::InvalidState, "parameters cannot change between a forward and its backward");
  std::copy(in, in + len, slots_[index].param->values.begin());
  store_->upload(*slots_[index].param);
  std::erase_if(stale_copies_, [&](const StaleCopy& stale) { return stale.slot == index; });
  note_written(Written::Parameter, index, in, len);
}

void Session::read_gradient(size_t index, float* out, uint64_t len) const {
  check_len(len, parameter_size(index), "gradient");
  std::vector<float> g;
  store_->download_grad(*slots_[index].param, g);
  std::copy(g.begin(), g.end(), out);
}

void Session::write_gradient(size_t index, const float* in, uint64_t len) {
  check_len(len, parameter_size(index), "gradient");
  for (uint64_t i = 0; i < len; ++i)
    if (!std::isfinite(in[i]))
      fail(Code::Numeric, "gradient of '", slots_[index].name, "': element ", i, " is not finite");
  store_->upload_grad(*slots_[index].param, std::vector<float>(in, in + len));
  note_written(Written::Gradient, index, in, len);
}

MoELayer& Session::moe_layer(uint32_t layer) const {
  if (layer >= layers_.size())
    fail(Code::InvalidArgument, "layer ", layer, " does not exist (the model has ", layers_.size(),
         layers_.size() == 1 ? " layer)" : " layers)");
  if (model_->layers[layer].kind != LayerKind::MoE)
    fail(Code::InvalidArgument, "layer ", layer, " ('", model_->layers[layer].name, "', kind ",
         layer_kind_name(model_->layers[layer].kind), ") is not a MoE layer");
  return static_cast<MoELayer&>(*layers_[layer]);
}

std::vector<uint32_t> Session::moe_layers(uint32_t layer) const {
  if (layer != kAllLayers) {
    moe_layer(layer);
    return {layer};
  }
  std::vector<uint32_t> out;
  for (uint32_t i = 0; i < layers_.size(); ++i)
    if (model_->layers[i].kind == LayerKind::MoE) out.push_back(i);
  if (out.empty()) fail(Code::InvalidArgument, "the model has no MoE layer");
  return out;
}

namespace {

const char* policy_name(BalancingPolicy p) {
  switch (p) {
    case BalancingPolicy::None:
      return "None";
    case BalancingPolicy::LossFreeBias:
      return "LossFreeBias";
    case BalancingPolicy::AuxLoss:
      return "AuxLoss";
    case BalancingPolicy::SequenceAuxLoss:
      return "SequenceAuxLoss";
    case BalancingPolicy::ExpertChoice:
      return "ExpertChoice";
  }
  return "an unknown policy";
}

}  // namespace

std::vector<uint32_t> Session::loss_free_layers(uint32_t layer, const char* what) const {
  std::vector<uint32_t> out;
  for (uint32_t i : moe_layers(layer))
    if (std::get<MoESpec>(model_->layers[i].spec).balancing.policy == BalancingPolicy::LossFreeBias)
      out.push_back(i);
  if (!out.empty()) return out;
  if (layer == kAllLayers)
    fail(Code::InvalidArgument, "no MoE layer of the model balances by the loss-free bias ",
         "(balancing.policy LossFreeBias): there is no ", what);
  fail(Code::InvalidArgument, "MoE layer ", layer, " ('", model_->layers[layer].name,
       "') balances by ",
       policy_name(std::get<MoESpec>(model_->layers[layer].spec).balancing.policy),
       ", not by the loss-free bias: it has no ", what);
}

void Session::read_bias(uint32_t layer, float* out, uint64_t len) const {
  moe_layer(layer);
  const auto& bias = std::get<MoESpec>(params().layers[layer].spec).gate_bias.values;
  check_len(len, static_cast<int64_t>(bias.size()), "bias");
  std::copy(bias.begin(), bias.end(), out);
}

void Session::write_bias(uint32_t layer, const float* in, uint64_t len) {
  require_training("writing the expert bias");
  moe_layer(layer);
  // Its experts choose their tokens: no bias enters that choice, so a written one would be
  // accepted and ignored.
  if (std::get<MoESpec>(model_->layers[layer].spec).balancing.policy ==
      BalancingPolicy::ExpertChoice)
    fail(Code::InvalidArgument, "MoE layer ", layer, " ('", model_->layers[layer].name,
         "') balances by ExpertChoice: its experts choose their tokens and no bias steers that "
         "choice");
  auto& bias = std::get<MoESpec>(params_->layers[layer].spec).gate_bias.values;
  check_len(len, static_cast<int64_t>(bias.size()), "bias");
  for (uint64_t i = 0; i < len; ++i)
    if (!std::isfinite(in[i])) fail(Code::Numeric, "bias: element ", i, " is not finite");
  if (pending_backward_)
    fail(Code::InvalidState, "the bias cannot change between a forward and its backward");
  std::copy(in, in + len, bias.begin());
  store_->upload(std::get<MoESpec>(params_->layers[layer].spec).gate_bias);
  note_written(Written::Bias, layer, in, len);
}

void Session::set_bias_update_rate(uint32_t layer, double gamma) {
  require_training("the bias update rate");
  // Held as fp32, like the bias it moves: a rate that rounds to infinity there, or to zero
  // (which would stop the updates), is refused as it is given.
  const auto rate = static_cast<float>(gamma);
  if (!std::isfinite(gamma) || gamma < 0.0 || !std::isfinite(rate) || (gamma > 0.0 && rate == 0.0f))
    fail(Code::InvalidArgument,
         "the bias update rate must be 0 or a positive value that fp32 holds (from about 7e-46, "
         "which rounds up to its smallest, to 3.4e38), got ",
         gamma);
  for (uint32_t i : loss_free_layers(layer, "bias update rate")) balance_[i].gamma = rate;
}

void Session::set_bias_frozen(uint32_t layer, bool frozen) {
  require_training("freezing the bias");
  for (uint32_t i : loss_free_layers(layer, "bias update to freeze or thaw"))
    balance_[i].frozen = frozen;
}

const std::vector<int64_t>& Session::expert_counts(uint32_t layer, CountScope scope) const {
  const auto& c = moe_layer(layer).counts();
  switch (scope) {
    case CountScope::Last:
      return c.last;
    case CountScope::Step:
      return c.step;
    case CountScope::Eval:
      return c.eval;
  }
  fail(Code::InvalidArgument, "unknown count scope ", static_cast<int>(scope));
}

double Session::max_vio(uint32_t layer, CountScope scope) const {
  const auto ids = moe_layers(layer);
  double sum = 0.0;
  for (uint32_t i : ids) sum += max_violation(expert_counts(i, scope));
  return sum / static_cast<double>(ids.size());
}

void Session::reset_eval_metrics() {
  // Among ranks the counts are the job's: a rank that reset alone would read others'.
  collective_step("reset_metrics", Failure::KeepsPass, [] {});
  if (par_) par_->times = CommTimes{};
  for (auto& l : layers_)
    if (auto* m = dynamic_cast<MoELayer*>(l.get()))
      std::fill(m->counts().eval.begin(), m->counts().eval.end(), 0);
}

void Session::sync_to_host() const {
  for (const auto& s : slots_) store_->download(*s.param);
}

void Session::training_state(SavedState& out) const {
  const bool host = backend_->host_memory();
  out.rng = rng_.state();
  out.host.reserve(slots_.size() * 3);
  auto view = [&](const float* data, size_t n) -> std::span<const float> {
    if (!data || n == 0) return {};
    if (host) return {data, n};
    auto& copy = out.host.emplace_back(n);
    backend_->download(copy.data(), data, n * sizeof(float));
    return copy;
  };
  TrainingStateView& v = out.view;
  v.step = step_;
  v.micro_batches = micro_batches_;
  v.rng = out.rng;
  v.optimizer = options_.training.optimizer;
  for (const auto& s : slots_) {
    ParamStateView ps;
    ps.name = s.name;
    ps.grad = view(store_->grad(*s.param), s.param->values.size());
    // A gradient that is all zero between steps is no state: it is left out.
    if (micro_batches_ == 0 &&
        std::all_of(ps.grad.begin(), ps.grad.end(), [](float g) { return g == 0.0f; }))
      ps.grad = {};
    ps.m = view(s.m.data(), s.m.size());
    ps.v = view(s.v.data(), s.v.size());
    v.params.push_back(ps);
  }
  for (uint32_t i = 0; i < layers_.size(); ++i)
    if (model_->layers[i].kind == LayerKind::MoE)
      out.layers.push_back({i, static_cast<const MoELayer&>(*layers_[i]).counts().step,
                            balance_[i].gamma, balance_[i].frozen});
  v.layers = out.layers;
}

void Session::refuse_partial_step() const {
  if (!poisoned_.empty())
    fail(Code::InvalidState,
         "checkpoint not written: a backward pass of this step failed after it had begun "
         "accumulating gradients (",
         poisoned_,
         "), and a checkpoint of that partial gradient would step on it once loaded; "
         "call zero_grad to discard the step first (or load a checkpoint)");
}

void Session::save(const std::string& path, bool path_given) const {
  require_training("saving a checkpoint");
  if (par_) return save_parallel(path, path_given);
  if (!path_given) fail(Code::InvalidArgument, "path is NULL");
  refuse_partial_step();
  sync_to_host();
  SavedState st;
  training_state(st);
  write_checkpoint(path, *params_, st.view);
}

namespace {

// Whether two layers describe the same computation, tensors aside.
std::string layer_mismatch(const LayerSpec& a, const LayerSpec& b) {
  if (a.kind != b.kind) return "kind";
  if (a.name != b.name) return "name";
  if (a.in_width != b.in_width || a.out_width != b.out_width) return "width";
  std::vector<std::vector<int64_t>> sa, sb;
  visit_tensors(a, [&](const char*, const Tensor& t) {
    sa.push_back(t.present() ? t.shape : std::vector<int64_t>{});
  });
  visit_tensors(b, [&](const char*, const Tensor& t) {
    sb.push_back(t.present() ? t.shape : std::vector<int64_t>{});
  });
  if (sa != sb) return "tensor shapes";
  if (const auto* ma = std::get_if<MoESpec>(&a.spec)) {
    const auto& mb = std::get<MoESpec>(b.spec);
    const RouterConfig &ra = ma->router, &rb = mb.router;
    if (ra.num_experts != rb.num_experts || ra.top_k != rb.top_k || ra.score != rb.score ||
        ra.num_groups != rb.num_groups || ra.topk_groups != rb.topk_groups ||
        ra.normalize != rb.normalize || ra.scaling != rb.scaling)
      return "routing configuration";
    if (ma->balancing.policy != mb.balancing.policy) return "balancing policy";
    if (ma->residual != mb.residual || ma->num_shared != mb.num_shared) return "structure";
  }
  if (const auto* da = std::get_if<DenseFFNSpec>(&a.spec))
    if (da->residual != std::get<DenseFFNSpec>(b.spec).residual) return "residual";
  return "";
}

}  // namespace

// The most a checkpoint of this session's architecture can need: parameters, gradients and two
// moment vectors of each (with the biases), the balancing counts, and room for the description's
// tables; `limits`, when given, lower it further. Of the whole model (every expert): a rank of an
// expert-parallel job reads a whole job's checkpoint.
LoadOptions Session::checkpoint_limits(const LoadOptions* limits) const {
  uint64_t values = 0, tensors = 0;
  for (const auto& l : model_->layers) {
    visit_tensors(l, [&](const char*, const Tensor& t) {
      values += static_cast<uint64_t>(t.numel());
      ++tensors;
    });
    if (const auto* m = std::get_if<MoESpec>(&l.spec))
      values += m->gate_bias.values.size() + 2 * m->router.num_experts;
  }
  if (limits && limits->description_only)
    fail(Code::InvalidArgument,
         "the load option description_only does not apply to a checkpoint a session resumes from: "
         "it is read with its values");
  LoadOptions need;
  need.max_memory = 4 * values * sizeof(float) + (uint64_t{1} << 20);
  need.max_file_bytes = 4 * values * sizeof(float) + (uint64_t{1} << 20) + 4096 * tensors;
  if (limits) {
    need.max_memory = std::min(need.max_memory, limits->max_memory);
    need.max_file_bytes = std::min(need.max_file_bytes, limits->max_file_bytes);
    need.confine_external_data = limits->confine_external_data;
  }
  return need;
}

void Session::load(const std::string& path, const LoadOptions* limits, bool path_given) {
  require_training("loading a checkpoint");
  // Everything is staged before anything changes, so a refusal leaves the session intact. Among
  // ranks every rank reads the whole file and keeps its shard, and a refusal on any rank is every
  // rank's, before any commits.
  std::unique_ptr<Model> ck;
  Rng rng(0);
  std::vector<Buffer<float>> m(slots_.size()), v(slots_.size());
  std::vector<std::vector<float>> grads(slots_.size());
  std::vector<Balance> balance = balance_;
  std::vector<std::vector<int64_t>> step_counts(layers_.size());
  std::exception_ptr failed;
  try {
    if (!path_given) fail(Code::InvalidArgument, "path is NULL");
    const LoadOptions own = checkpoint_limits(nullptr);
    try {
      ck = load_checkpoint_file(path, checkpoint_limits(limits));
    } catch (const Error& e) {
      // A limit this session's own model sets (the caller's can only lower it): the file is
      // bigger than any checkpoint of that model, so the loader's advice to raise a load option
      // cannot help; the error says what can.
      // Not where physical memory is the lower bound: the loader's message says so then.
      if (e.code() == Code::Limit && own.max_memory <= physical_memory_bytes() &&
          (!limits ||
           (limits->max_memory >= own.max_memory && limits->max_file_bytes >= own.max_file_bytes)))
        fail(Code::Limit, "checkpoint '", path,
             "' is larger than any checkpoint of this session's model can be (at most ",
             own.max_memory, " bytes in memory and ", own.max_file_bytes,
             " to read; load options only lower that): it was likely saved from another, "
             "larger model");
      throw;
    }
    // Against the whole model: a checkpoint holds every expert whatever the world size.
    if (ck->layers.size() != model_->layers.size())
      fail(Code::InvalidArgument, "checkpoint '", path, "' has ", ck->layers.size(),
           " layers, this session's model ", model_->layers.size());
    for (size_t i = 0; i < ck->layers.size(); ++i) {
      const std::string what = layer_mismatch(ck->layers[i], model_->layers[i]);
      if (!what.empty())
        fail(Code::InvalidArgument, "checkpoint '", path, "' layer ", i, " ('", ck->layers[i].name,
             "') differs from this session's model in its ", what);
    }
    TrainingState& st = *ck->training;
    if (st.optimizer != options_.training.optimizer)
      fail(Code::InvalidArgument, "checkpoint '", path, "' was trained with ", st.optimizer,
           " but this session uses ", options_.training.optimizer);
    try {
      rng.set_state(st.rng);
    } catch (const std::invalid_argument&) {
      fail(Code::InvalidModel, "checkpoint '", path, "': field 'rng' is not a generator state");
    }
    if (par_) shard_experts(*ck);

    // Each state vector is released once staged, so that the peak stays near one copy of the
    // state. A routed expert tensor's state holds every expert: a rank keeps its shard's range.
    auto shard_of = [&](size_t i, std::vector<float>& values) {
      const size_t n = slots_[i].param->values.size();
      if (!par_ || values.empty() || values.size() == n) return;
      const size_t at = static_cast<size_t>(par_->rank() % par_->ep()) * n;
      std::vector<float> part(values.begin() + static_cast<int64_t>(at),
                              values.begin() + static_cast<int64_t>(at + n));
      values.swap(part);
    };
    auto stage = [&](std::vector<float>& values, Buffer<float>& into) {
      if (values.empty()) return;
      into.resize(*backend_, values.size());
      backend_->upload(into.data(), values.data(), values.size() * sizeof(float));
      std::vector<float>().swap(values);
    };
    for (auto& ps : st.params) {
      const size_t i = parameter_index(ps.name);
      for (auto* values : {&ps.grad, &ps.m, &ps.v}) shard_of(i, *values);
      grads[i] = std::move(ps.grad);
      stage(ps.m, m[i]);
      stage(ps.v, v[i]);
    }
    for (auto& l : st.layers) {
      balance[l.layer] = {l.gamma, l.frozen};
      step_counts[l.layer] = std::move(l.step_counts);
    }
  } catch (...) {
    if (!par_) throw;
    failed = std::current_exception();
  }
  // Every rank reads the whole file: the faster ones wait for the slower ones.
  if (par_) {
    ParallelContext::IoAllowance reading(*par_, job_state_bytes(true));
    par_->agree(failed, "load", ck ? ck->training->digest : 0,
                "the checkpoint it read (another file, or another version of it)");
  }
  TrainingState& st = *ck->training;

  // Commit: copies into storage the session already owns (the parameter store points into the
  // host tensors on host backends, so their storage must stay where it is).
  auto assign = [](Tensor& dst, const Tensor& src) {
    std::copy(src.values.begin(), src.values.end(), dst.values.begin());
  };
  for (size_t li = 0; li < ck->layers.size(); ++li) {
    std::vector<Tensor*> src, dst;
    visit_tensors(ck->layers[li], [&](const char*, Tensor& t) { src.push_back(&t); });
    visit_tensors(params_->layers[li], [&](const char*, Tensor& t) { dst.push_back(&t); });
    for (size_t k = 0; k < src.size(); ++k) assign(*dst[k], *src[k]);
    if (auto* moe = std::get_if<MoESpec>(&params_->layers[li].spec)) {
      assign(moe->gate_bias, std::get<MoESpec>(ck->layers[li].spec).gate_bias);
      store_->upload(moe->gate_bias);
    }
  }
  stale_copies_.clear();
  // A checkpoint of a step's gradient with no micro-batch counted (set_gradient before the save)
  // makes the next step update: it needs its moments inside that step's agreement.
  gradient_from_checkpoint_ =
      std::any_of(grads.begin(), grads.end(), [](const auto& g) { return !g.empty(); });
  for (size_t i = 0; i < slots_.size(); ++i) {
    store_->upload(*slots_[i].param);
    slots_[i].m = std::move(m[i]);
    slots_[i].v = std::move(v[i]);
    if (grads[i].empty()) grads[i].assign(slots_[i].param->values.size(), 0.0f);
    store_->upload_grad(*slots_[i].param, grads[i]);
  }
  balance_.swap(balance);
  for (size_t i = 0; i < layers_.size(); ++i)
    if (auto* moe = dynamic_cast<MoELayer*>(layers_[i].get())) {
      auto& step = moe->counts().step;
      if (step_counts[i].empty())
        std::fill(step.begin(), step.end(), 0);
      else
        step.swap(step_counts[i]);
    }
  rng_ = rng;
  step_ = st.step;
  micro_batches_ = st.micro_batches;
  pending_backward_ = false;
  poisoned_.clear();  // the gradients a failed backward left half-written are the file's now
  written_.clear();   // every rank now holds the file's state
}

}  // namespace moert
