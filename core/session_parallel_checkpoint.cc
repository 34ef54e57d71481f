// Checkpoints of a session whose work is shared among ranks (DESIGN.md section 2): one file for
// the whole job, with the bytes that one process training on the union of the ranks' rows would
// write, so that training resumes at any world size. Loading is Session::load (core/session.cc):
// every rank reads the whole file and keeps its shard.
#include <algorithm>
#include <exception>
#include <filesystem>
#include <memory>
#include <utility>
#include <vector>

#include "core/content_digest.h"
#include "core/error.h"
#include "core/model_writer.h"
#include "core/session.h"

namespace moert {

std::array<uint64_t, 2> Session::replica_digests(const SavedState& st) const {
  // Everything but the routed experts is replicated on every rank; the experts' state on every
  // replica of a shard. What the writer does not hold itself it takes on trust from these.
  ContentHasher replicated, experts;
  const TrainingStateView& v = st.view;
  hash_state_header(replicated, v.step, v.micro_batches, v.rng, v.optimizer, v.params.size());
  hash_layer_states(replicated, v.layers);
  for (const auto& l : params_->layers)
    if (const auto* m = std::get_if<MoESpec>(&l.spec)) replicated.floats(m->gate_bias.values);
  for (size_t i = 0; i < slots_.size(); ++i) {
    ContentHasher& h = expert_count(slots_[i]) > 0 ? experts : replicated;
    const ParamStateView& p = v.params[i];
    h.str(p.name);
    h.floats(slots_[i].param->values);
    h.floats(p.grad);
    h.floats(p.m);
    h.floats(p.v);
  }
  return {replicated.digest(), experts.digest()};
}

double Session::job_state_bytes(bool every_state) const {
  double bytes = 0.0;
  for (const Slot& s : slots_) {
    const double n = static_cast<double>(s.param->values.size()) *
                     (par_ && expert_count(s) > 0 ? static_cast<double>(par_->ep()) : 1.0);
    const int states = every_state ? 4
                                   : 1 + (store_->grad(*s.param) ? 1 : 0) + (s.m.size() ? 1 : 0) +
                                         (s.v.size() ? 1 : 0);
    bytes += n * states * sizeof(float);
  }
  return bytes;
}

void Session::save_parallel(const std::string& path, bool path_given) const {
  ParallelContext& par = *par_;
  const bool writer = par.rank() == 0;
  // One routed-expert tensor: its slot, and on the writer the whole tensor (in `full`) and its
  // whole gradient and moments.
  struct Experts {
    size_t slot;
    Tensor* tensor = nullptr;
    std::vector<float> grad, m, v;
    // This rank's shard of the gradient and moments in host memory, or null where it has none.
    const float* own_grad = nullptr;
    const float* own_m = nullptr;
    const float* own_v = nullptr;
  };
  std::vector<Experts> experts;
  std::unique_ptr<Model> full;
  SavedState st;
  std::array<uint64_t, 2> mine{};
  std::vector<std::vector<float>> zeros;  // all-zero gradients of a device backend
  // Rank 0 copies, gathers, then writes about the job's whole state while the others wait for
  // it: every wait of the save, its gathers' too, allows for that.
  const ParallelContext::IoAllowance writing(par, job_state_bytes(false));
  // Each rank prepares alone, then all learn whether any failed: nothing collective runs before.
  std::exception_ptr failed;
  // Rank 0 alone writes: a path that differs on another rank is that rank's mistake, said on
  // every rank rather than ignored.
  uint64_t path_digest = 0;
  try {
    if (!path_given) fail(Code::InvalidArgument, "path is NULL");
    ContentHasher named;
    named.str(std::filesystem::path(path).lexically_normal().string());
    path_digest = named.digest();
    refuse_partial_step();
    sync_to_host();
    training_state(st);
    mine = replica_digests(st);
    for (size_t i = 0; i < slots_.size(); ++i) {
      const Slot& s = slots_[i];
      if (expert_count(s) == 0) continue;
      // In host memory before anything collective (a rank that could not copy them must not
      // leave the others waiting in the gathers): the training state's views, which are the
      // session's memory on the CPU and its downloads on a device.
      Experts& e = experts.emplace_back(Experts{i});
      const ParamStateView& p = st.view.params[i];
      e.own_m = p.m.empty() ? nullptr : p.m.data();
      e.own_v = p.v.empty() ? nullptr : p.v.data();
      // The view leaves out a gradient that is all zero between steps, where another rank's
      // shard may have one: every rank that holds a gradient sends it.
      const float* grad = store_->grad(*s.param);
      if (grad && !p.grad.empty())
        e.own_grad = p.grad.data();
      else if (grad)
        e.own_grad = backend_->host_memory()
                         ? grad
                         : zeros.emplace_back(s.param->values.size(), 0.0f).data();
    }
    if (writer) {
      // The session's parameters with every expert: what one process's session holds.
      full = std::make_unique<Model>(*params_);
      std::vector<std::pair<const Tensor*, Tensor*>> to_full;
      for (size_t l = 0; l < full->layers.size(); ++l) {
        std::vector<const Tensor*> own;
        visit_tensors(params_->layers[l], [&](const char*, const Tensor& t) { own.push_back(&t); });
        size_t k = 0;
        visit_tensors(full->layers[l],
                      [&](const char*, Tensor& t) { to_full.emplace_back(own[k++], &t); });
      }
      for (Experts& e : experts) {
        const Slot& s = slots_[e.slot];
        for (const auto& [own, whole] : to_full)
          if (own == s.param) e.tensor = whole;
        const size_t n = s.param->values.size() * static_cast<size_t>(par.ep());
        e.tensor->values.resize(n);
        e.tensor->shape[0] *= par.ep();
        if (store_->grad(*s.param)) e.grad.resize(n);
        e.m.resize(s.m.size() == 0 ? 0 : n);
        e.v.resize(s.v.size() == 0 ? 0 : n);
      }
    }
  } catch (...) {
    failed = std::current_exception();
  }
  par.agree(failed, "save", path_digest, "the checkpoint path");

  // The writer writes its own copy of the replicated state and replica 0's of each shard: refuse
  // rather than write one rank's view of a job whose ranks disagree.
  std::vector<std::array<uint64_t, 2>> all(static_cast<size_t>(par.size()));
  par.host().all_gather(mine.data(), sizeof(mine), all.data());
  for (int r = 1; r < par.size(); ++r) {
    if (all[r][0] != all[0][0])
      fail(Code::InvalidState, "checkpoint '", path, "' not written: rank ", r, " of ", par.size(),
           " holds another replicated state than rank 0 (step, generator, balancing state, or a "
           "replicated parameter, its gradient or its optimizer moments): the ranks of a job "
           "must make the same calls in the same order");
    if (all[r][1] != all[r % par.ep()][1])
      fail(Code::InvalidState, "checkpoint '", path, "' not written: rank ", r, " of ", par.size(),
           " holds another copy of expert shard ", r % par.ep(), " than rank ", r % par.ep(),
           " (its experts' parameters, gradients or optimizer moments)");
  }

  // Whether each state exists is the same on every rank (the digests above include it).
  for (Experts& e : experts) {
    const Slot& s = slots_[e.slot];
    const size_t n = s.param->values.size();
    const auto len = static_cast<int64_t>(n);
    par.gather_shards(s.param->values.data(), len, writer ? e.tensor->values.data() : nullptr);
    if (e.own_grad) par.gather_shards(e.own_grad, len, e.grad.data());
    if (e.own_m) par.gather_shards(e.own_m, len, e.m.data());
    if (e.own_v) par.gather_shards(e.own_v, len, e.v.data());
  }
  zeros.clear();

  failed = nullptr;
  if (writer) {
    try {
      TrainingStateView view = st.view;
      for (const Experts& e : experts) {
        ParamStateView& p = view.params[e.slot];
        p.grad = e.grad;
        // As one process: a gradient that is all zero between steps is no state.
        if (micro_batches_ == 0 &&
            std::all_of(e.grad.begin(), e.grad.end(), [](float g) { return g == 0.0f; }))
          p.grad = {};
        p.m = e.m;
        p.v = e.v;
      }
      write_checkpoint(path, *full, view);
    } catch (...) {
      failed = std::current_exception();
    }
  }
  par.agree(failed, "save");
}

}  // namespace moert
