// Gradients across ranks on a device backend (ParallelContext::root_reduction false).
//
// Why not local roots (core/grad_reduction.h) as on the CPU: the CUDA backend's Wgrad is one
// cuBLASLt GEMM per weight whose reduction over rows follows the algorithm cuBLASLt picks for the
// shape, so even one process has no fixed tree to reproduce across world sizes; roots would take
// a GEMM per 64-row chunk and a device fold of the partials (and sparse roots for the embedding)
// for a bitwise promise the GEMMs themselves do not keep. Instead each rank accumulates the
// gradients of its own rows in acc mode, as alone, into zeroed buffers of their own; the session
// then all-reduces them in rank order (every rank gets the same bits) -- the replicated
// parameters over the world, the routed experts over the DP replicas of their shard -- and adds
// the sum to the gradients. The loss is already scaled by the job's row count
// (Session::backward_loss), so the sum is the gradient of one process over the union of the rows.
//
// Bound against one process: both sum the same per-row terms t_i of each gradient element and
// differ only in association. Any fp32 summation of m terms in an order of depth d is within
// d u sum_i |t_i| of the exact sum (u = 2^-24), so |g_R - g_1| <= (d_1 + d_R) u sum_i |t_i|:
// d_1 is the one process's depth (on the CPU: 64 rows per chunk plus log2 of the chunks; on CUDA
// whatever cuBLASLt's algorithm does, at most the row count), d_R the same over a rank's rows plus
// R - 1 for the rank-ordered sum. Not bitwise; typically a few ulps of sum_i |t_i| (measured on
// the simulated device: 0 at 1 and 2 ranks, whose rank sums are nodes of the chunk tree, 9.4e-8
// of a tensor's largest element at 4; tests/gpu/test_device_parallel.cc). Forward outputs,
// routing counts and the loss-free bias do not depend on it within a step: they are one
// process's wherever the backend computes each row alone, the counts and the bias coming from
// integers all-gathered per pass; over steps, parameters carry the gradients' rounding.
//
// Memory: one more copy of the gradients on the device, for the length of a backward.
#include <chrono>

#include "core/session.h"

namespace moert {

// Where each slot's gradient sits in local_grads_ (at[i] for slots_[i]): the replicated parameters
// first, then the routed experts, so that each group is one all-reduce. Returns the replicated
// group's floats; the experts' follow up to `total`.
size_t Session::local_gradient_layout(std::vector<size_t>& at, size_t& total) const {
  at.assign(slots_.size(), 0);
  total = 0;
  size_t replicated = 0;
  for (bool experts : {false, true}) {
    for (size_t i = 0; i < slots_.size(); ++i) {
      if ((expert_count(slots_[i]) > 0) != experts) continue;
      at[i] = total;
      total += static_cast<size_t>(slots_[i].param->numel());
    }
    if (!experts) replicated = total;
  }
  return replicated;
}

void Session::begin_local_gradients() {
  std::vector<size_t> at;
  size_t total = 0;
  local_gradient_layout(at, total);
  local_grads_.resize(*backend_, total);
  if (total) backend_->zero(local_grads_.data(), total * sizeof(float));
  for (size_t i = 0; i < slots_.size(); ++i)
    store_->redirect_grad(*slots_[i].param, local_grads_.data() + at[i]);
}

void Session::end_local_gradients() noexcept {
  for (const auto& s : slots_) {
    try {
      store_->redirect_grad(*s.param, nullptr);
    } catch (...) {
      // Every slot is in the store: nothing to point back.
    }
  }
}

void Session::reduce_local_gradients() {
  const auto start = std::chrono::steady_clock::now();
  end_local_gradients();
  std::vector<size_t> at;
  size_t total = 0;
  const size_t replicated = local_gradient_layout(at, total);
  const size_t experts = total - replicated;
  float* local = local_grads_.data();
  if (replicated)
    par_->world().all_reduce_sum(local, static_cast<int64_t>(replicated), ReduceType::F32);
  if (experts && par_->replicas())
    par_->replicas()->all_reduce_sum(local + replicated, static_cast<int64_t>(experts),
                                     ReduceType::F32);
  for (size_t i = 0; i < slots_.size(); ++i)
    backend_->add(store_->grad(*slots_[i].param), local + at[i], slots_[i].param->numel());
  par_->times.gradients +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace moert
