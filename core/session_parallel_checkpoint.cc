// Checkpoints of a session whose work is shared among ranks (docs/design.md section 2): one file
// for the whole job, with the bytes that one process training on the union of the ranks' rows
// would write, so that training resumes at any world size. Loading is Session::load
// (core/session.cc): every rank reads the whole file and keeps its shard.
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

namespace {

// What replica_digests() hashes apart, so that a save refused for a difference says which: the
// replicated state's parts, then the expert shard's.
constexpr std::array<const char*, kReplicaDigestParts> kReplicaPartNames{{
    "another step count",
    "another count of micro-batches since zero_grad",
    "another random generator state",
    "another optimizer",
    "another balancing state (step counts, bias update rates, freezes or biases)",
    "other values of a replicated parameter",
    "another gradient of a replicated parameter",
    "other optimizer moments of a replicated parameter",
    "other expert parameters",
    "other expert gradients",
    "other expert optimizer moments",
}};
constexpr size_t kFirstExpertPart = 8;

}  // namespace

Session::ReplicaDigests Session::replica_digests(const SavedState& st) const {
  // Everything but the routed experts is replicated on every rank; the experts' state on every
  // replica of a shard. What the writer does not hold itself it takes on trust from these.
  std::array<ContentHasher, kReplicaDigestParts> h;
  const TrainingStateView& v = st.view;
  h[0].u64(v.step);
  h[1].u32(v.micro_batches);
  for (uint64_t w : v.rng) h[2].u64(w);
  h[3].str(v.optimizer);
  h[3].u64(v.params.size());
  hash_layer_states(h[4], v.layers);
  for (const auto& l : params_->layers)
    if (const auto* m = std::get_if<MoESpec>(&l.spec)) h[4].floats(m->gate_bias.values);
  for (size_t i = 0; i < slots_.size(); ++i) {
    const size_t first = expert_count(slots_[i]) > 0 ? kFirstExpertPart : 5;
    const ParamStateView& p = v.params[i];
    for (size_t k = 0; k < 3; ++k) h[first + k].str(p.name);
    h[first].floats(slots_[i].param->values);
    h[first + 1].floats(p.grad);
    h[first + 2].floats(p.m);
    h[first + 2].floats(p.v);
  }
  ReplicaDigests out{};
  for (size_t k = 0; k < kReplicaDigestParts; ++k) out[k] = h[k].digest();
  return out;
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
  ReplicaDigests mine{};
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
  std::vector<ReplicaDigests> all(static_cast<size_t>(par.size()));
  par.host().all_gather(mine.data(), sizeof(mine), all.data());
  for (int r = 1; r < par.size(); ++r) {
    for (size_t k = 0; k < kFirstExpertPart; ++k)
      if (all[r][k] != all[0][k])
        fail(Code::InvalidState, "checkpoint '", path, "' not written: rank ", r, " of ",
             par.size(), " holds ", kReplicaPartNames[k],
             " than rank 0: the ranks of a job must make the same calls in the same order "
             "(zero_grad, set_parameter, set_gradient and the bias calls included)");
    for (size_t k = kFirstExpertPart; k < kReplicaDigestParts; ++k)
      if (all[r][k] != all[r % par.ep()][k])
        fail(Code::InvalidState, "checkpoint '", path, "' not written: rank ", r, " of ",
             par.size(), " holds ", kReplicaPartNames[k], " than rank ", r % par.ep(),
             ", which holds the same expert shard");
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
  try {
    par.agree(failed, "save");
  } catch (const Error& e) {
    // Only the communication can fail once the writer has written: its rank says what the file
    // now holds, which a driver deciding where to resume from needs.
    if (!writer || failed) throw;
    throw Error(e.code(), cat(e.message(), "; checkpoint '", path, "' was written (step ", step_,
                              ") before the ranks could confirm it"));
  }
}

}  // namespace moert
