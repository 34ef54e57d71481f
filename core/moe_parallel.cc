// The MoE layer's passes under expert and data parallelism (core/expert_parallel.h): each rank
// routes its own rows, sends each token once to every rank that computes one of its experts
// (dispatch), computes the assignments its shard owns, sends each result back (combine) and sums
// them in expert order as one process does.
#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/error.h"
#include "core/layers.h"

namespace moert {
namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// A plan that gathers rows: dst[i] = src[rows[i]] through Backend::dispatch.
void gather_plan(Backend& be, DispatchPlan& p, const std::vector<int32_t>& rows) {
  p.rows = 0;
  p.host_offsets = {0, static_cast<int64_t>(rows.size())};
  p.token.resize(be, rows.size());
  if (!rows.empty()) be.upload(p.token.data(), rows.data(), rows.size() * sizeof(int32_t));
}

// Byte counts and offsets of an all-to-all of `per_peer[p]` items of `item_bytes` each.
void layout_bytes(const std::vector<int64_t>& per_peer, int64_t item_bytes,
                  std::vector<int64_t>& bytes, std::vector<int64_t>& offsets) {
  bytes.resize(per_peer.size());
  offsets.resize(per_peer.size());
  int64_t off = 0;
  for (size_t p = 0; p < per_peer.size(); ++p) {
    bytes[p] = per_peer[p] * item_bytes;
    offsets[p] = off;
    off += bytes[p];
  }
}

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

template <typename T>
std::vector<T> to_host(Backend& be, const Buffer<T>& b, size_t n) {
  std::vector<T> out(n);
  if (n) be.download(out.data(), b.data(), n * sizeof(T));
  return out;
}

}  // namespace

void MoELayer::forward_parallel(Backend& be, const float* x, float* y, int64_t rows, bool train) {
  if (s_.balancing.policy == BalancingPolicy::ExpertChoice)
    fail(Code::Unsupported, "Expert Choice routing is not supported with expert parallelism");
  Communicator& world = par_->world();
  const int R = world.size(), me = world.rank();
  const int64_t E = s_.router.num_experts, D = s_.dim;
  route(be, x, rows);
  const int64_t A = plan_.num_assignments();

  // Every rank's counts per expert: the layout of the job's assignments.
  std::vector<int64_t> local(static_cast<size_t>(E)), all(static_cast<size_t>(R * E));
  for (int64_t e = 0; e < E; ++e) local[e] = plan_.count(e);
  world.all_gather(local.data(), E * 8, all.data());
  const ExpertLayout layout(par_->sharding(E), std::move(all), kReduceRows);
  const std::vector<int32_t> token = to_host(be, plan_.token, static_cast<size_t>(A));
  const std::vector<int32_t> expert = to_host(be, plan_.expert, static_cast<size_t>(A));
  const std::vector<float> weight = to_host(be, plan_.weight, static_cast<size_t>(A));
  Exchange& ex = ex_;
  ex.route = route_dispatch(layout, token.data(), expert.data(), weight.data(), A, rows);

  // How much each rank sends each other rank: rows and assignments.
  std::vector<int64_t> mine(static_cast<size_t>(2 * R)), every(static_cast<size_t>(2 * R * R));
  for (int q = 0; q < R; ++q) {
    mine[2 * q] = static_cast<int64_t>(ex.route.tokens[q].size());
    mine[2 * q + 1] = static_cast<int64_t>(ex.route.assignments[q].size());
  }
  world.all_gather(mine.data(), 2 * R * 8, every.data());
  ex.send_rows.resize(R);
  ex.send_asg.resize(R);
  ex.recv_rows.resize(R);
  ex.recv_asg.resize(R);
  for (int p = 0; p < R; ++p) {
    ex.send_rows[p] = mine[2 * p];
    ex.send_asg[p] = mine[2 * p + 1];
    ex.recv_rows[p] = every[p * 2 * R + 2 * me];
    ex.recv_asg[p] = every[p * 2 * R + 2 * me + 1];
  }

  // Dispatch: the rows, each once per destination, and the assignments' slots and weights.
  std::vector<int32_t> send_tokens;
  std::vector<DispatchRoute::Assignment> send_meta;
  for (int q = 0; q < R; ++q) {
    send_tokens.insert(send_tokens.end(), ex.route.tokens[q].begin(), ex.route.tokens[q].end());
    send_meta.insert(send_meta.end(), ex.route.assignments[q].begin(),
                     ex.route.assignments[q].end());
  }
  gather_plan(be, ex.send, send_tokens);
  ex.x_send.resize(be, send_tokens.size() * static_cast<size_t>(D));
  be.dispatch(ex.send, x, ex.x_send.data(), D);
  const size_t meta_bytes = sizeof(DispatchRoute::Assignment);
  ex.meta_send.resize(be, send_meta.size() * meta_bytes);
  if (!send_meta.empty()) be.upload(ex.meta_send.data(), send_meta.data(), ex.meta_send.bytes());
  const int64_t n_recv = sum(ex.recv_rows), a_recv = sum(ex.recv_asg);
  ex.x_recv.resize(be, static_cast<size_t>(n_recv * D));
  ex.meta_recv.resize(be, static_cast<size_t>(a_recv) * meta_bytes);
  std::vector<int64_t> sb, so, rb, ro, msb, mso, mrb, mro;
  layout_bytes(ex.send_rows, D * 4, sb, so);
  layout_bytes(ex.recv_rows, D * 4, rb, ro);
  layout_bytes(ex.send_asg, meta_bytes, msb, mso);
  layout_bytes(ex.recv_asg, meta_bytes, mrb, mro);
  Request rows_moving = world.start_all_to_all_v(ex.x_send.data(), sb.data(), so.data(),
                                                 ex.x_recv.data(), rb.data(), ro.data());
  Request meta_moving = world.start_all_to_all_v(ex.meta_send.data(), msb.data(), mso.data(),
                                                 ex.meta_recv.data(), mrb.data(), mro.data());

  // The residual and the shared experts need nothing from the other ranks: they run while the
  // tokens travel.
  residual_and_shared(be, x, y, rows, train);
  auto t0 = Clock::now();
  rows_moving->wait();
  meta_moving->wait();
  par_->times.dispatch += seconds(t0);

  // The assignments this rank computes, in its slots: expert-major, each expert's range of its
  // global list in order — the chunks one process would compute for it.
  std::vector<DispatchRoute::Assignment> meta(static_cast<size_t>(a_recv));
  if (a_recv) be.download(meta.data(), ex.meta_recv.data(), ex.meta_recv.bytes());
  const std::vector<int64_t> slot_off = layout.slot_offsets(me);
  const int64_t a_local = slot_off.back();
  if (a_local != a_recv)
    fail(Code::Internal, "expert parallelism: rank ", me, " received ", a_recv,
         " assignments for its ", a_local, " slots");
  std::vector<int32_t> r_token(static_cast<size_t>(a_local)), r_expert(r_token.size()),
      ret_slots(r_token.size());
  std::vector<float> r_weight(r_token.size());
  {
    size_t j = 0;
    int64_t row_base = 0;
    for (int p = 0; p < R; ++p) {
      for (int64_t i = 0; i < ex.recv_asg[p]; ++i, ++j) {
        const DispatchRoute::Assignment& m = meta[j];
        r_token[m.slot] = static_cast<int32_t>(row_base + m.row);
        r_weight[m.slot] = m.weight;
        ret_slots[j] = m.slot;
      }
      row_base += ex.recv_rows[p];
    }
    for (size_t l = 0; l + 1 < slot_off.size(); ++l)
      for (int64_t a = slot_off[l]; a < slot_off[l + 1]; ++a) r_expert[a] = static_cast<int32_t>(l);
  }
  DispatchPlan& rp = ex.remote;
  rp.rows = n_recv;
  rp.host_offsets = slot_off;
  rp.token.resize(be, r_token.size());
  rp.expert.resize(be, r_expert.size());
  rp.weight.resize(be, r_weight.size());
  if (a_local) {
    be.upload(rp.token.data(), r_token.data(), r_token.size() * 4);
    be.upload(rp.expert.data(), r_expert.data(), r_expert.size() * 4);
    be.upload(rp.weight.data(), r_weight.data(), r_weight.size() * 4);
  }
  ex.first_chunk.resize(static_cast<size_t>(layout.sharding().per_shard()));
  for (size_t l = 0; l < ex.first_chunk.size(); ++l)
    ex.first_chunk[l] = layout.first_chunk(me, static_cast<int64_t>(l));

  x_perm_.resize(be, static_cast<size_t>(a_local * D));
  y_perm_.resize(be, x_perm_.size());
  be.dispatch(rp, ex.x_recv.data(), x_perm_.data(), D);
  experts_forward(be, rp, par_->sharding(E).first_expert(), x_perm_.data(), y_perm_.data(), train);

  // Combine: each result goes back to its token's rank, in the order that rank listed them.
  gather_plan(be, ex.ret, ret_slots);
  ex.y_ret.resize(be, static_cast<size_t>(a_local * D));
  be.dispatch(ex.ret, y_perm_.data(), ex.y_ret.data(), D);
  ex.y_back.resize(be, static_cast<size_t>(A * D));
  layout_bytes(ex.recv_asg, D * 4, rb, ro);
  layout_bytes(ex.send_asg, D * 4, sb, so);
  Request back = world.start_all_to_all_v(ex.y_ret.data(), rb.data(), ro.data(), ex.y_back.data(),
                                          sb.data(), so.data());
  t0 = Clock::now();
  back->wait();
  par_->times.combine += seconds(t0);
  std::vector<int32_t> home(static_cast<size_t>(A));
  {
    std::vector<int64_t> base(static_cast<size_t>(R), 0);
    for (int q = 1; q < R; ++q) base[q] = base[q - 1] + ex.send_asg[q - 1];
    for (int64_t a = 0; a < A; ++a)
      home[a] = static_cast<int32_t>(base[ex.route.dest[a]] + ex.route.index[a]);
  }
  gather_plan(be, ex.home, home);
  ex.y_home.resize(be, static_cast<size_t>(A * D));
  be.dispatch(ex.home, ex.y_back.data(), ex.y_home.data(), D);
  be.combine(plan_, ex.y_home.data(), y, D);

  // The job's counts: every rank's metrics and bias updates see the global batch.
  pending_ = layout.totals();
  aux_loss_ = 0.0;
  if (train && uses_aux_loss()) aux_forward(be, rows);
}

void MoELayer::aux_parallel(Backend& be, int64_t rows, const AuxChunks& chunks,
                            const std::vector<int64_t>& counts, const std::vector<double>& psum) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts;
  Communicator& world = par_->world();
  const int R = world.size(), me = world.rank();
  // Every rank's chunks and sequences, gathered: the global statistics that each rank folds alike.
  // Per rank: [num_seq, chunks, seq lengths..., chunk lengths..., chunk_seq...] as int64, then
  // counts (int64) and psum (double), chunks * E each.
  std::vector<int64_t> head{chunks.num_seq(), chunks.chunks()};
  for (int64_t q = 0; q < chunks.num_seq(); ++q)
    head.push_back(chunks.seq_offsets[q + 1] - chunks.seq_offsets[q]);
  for (int64_t c = 0; c < chunks.chunks(); ++c)
    head.push_back(chunks.chunk_offsets[c + 1] - chunks.chunk_offsets[c]);
  head.insert(head.end(), chunks.chunk_seq.begin(), chunks.chunk_seq.end());
  head.insert(head.end(), counts.begin(), counts.end());
  std::vector<char> mine(head.size() * 8 + psum.size() * 8);
  std::memcpy(mine.data(), head.data(), head.size() * 8);
  std::memcpy(mine.data() + head.size() * 8, psum.data(), psum.size() * 8);
  std::vector<int64_t> bytes(static_cast<size_t>(R)), offsets(static_cast<size_t>(R), 0);
  const int64_t my_bytes = static_cast<int64_t>(mine.size());
  world.all_gather(&my_bytes, 8, bytes.data());
  for (int p = 1; p < R; ++p) offsets[p] = offsets[p - 1] + bytes[p - 1];
  std::vector<char> every(static_cast<size_t>(offsets[R - 1] + bytes[R - 1]));
  world.all_gather_v(mine.data(), my_bytes, every.data(), bytes.data(), offsets.data());

  // The global batch's sequences: each rank's own, in rank order, or — the global form of the
  // Switch loss — one sequence of every rank's rows.
  const bool one = global_aux_ && s_.balancing.policy == BalancingPolicy::AuxLoss;
  AuxChunks g;
  g.seq_offsets = {0};
  g.chunk_offsets = {0};
  std::vector<int64_t> g_counts;
  std::vector<double> g_psum;
  int64_t my_first_seq = 0;
  for (int p = 0; p < R; ++p) {
    const char* b = every.data() + offsets[p];
    auto word = [&](int64_t i) {
      int64_t v;
      std::memcpy(&v, b + i * 8, 8);
      return v;
    };
    const int64_t nq = word(0), nc = word(1);
    if (p == me) my_first_seq = static_cast<int64_t>(g.seq_offsets.size()) - 1;
    const int64_t seq_base = static_cast<int64_t>(g.seq_offsets.size()) - 1;
    for (int64_t q = 0; q < nq; ++q) g.seq_offsets.push_back(g.seq_offsets.back() + word(2 + q));
    for (int64_t c = 0; c < nc; ++c) {
      g.chunk_offsets.push_back(g.chunk_offsets.back() + word(2 + nq + c));
      g.chunk_seq.push_back(one ? 0 : seq_base + word(2 + nq + nc + c));
    }
    const int64_t at = 2 + nq + 2 * nc;
    for (int64_t i = 0; i < nc * E; ++i) g_counts.push_back(word(at + i));
    const char* d = b + (at + nc * E) * 8;
    for (int64_t i = 0; i < nc * E; ++i) {
      double v;
      std::memcpy(&v, d + i * 8, 8);
      g_psum.push_back(v);
    }
  }
  if (one) g.seq_offsets = {0, g.seq_offsets.back()};
  const AuxTerms t =
      aux_terms(g, g_counts.data(), g_psum.data(), E, r.top_k, s_.balancing.aux_alpha);
  // This rank's rows take the coefficients of their sequences.
  const std::vector<double> coef =
      one ? t.coef
          : std::vector<double>(t.coef.begin() + my_first_seq * E,
                                t.coef.begin() + (my_first_seq + chunks.num_seq()) * E);
  const std::vector<int64_t> local_seq = one ? std::vector<int64_t>{0, rows} : chunks.seq_offsets;
  aux_ds_.resize(be, static_cast<size_t>(rows * E));
  be.aux_grad(r, scores_.data(), rows, local_seq.data(), static_cast<int64_t>(local_seq.size()) - 1,
              coef.data(), aux_ds_.data());
  aux_loss_ = t.loss;
}

}  // namespace moert

namespace moert {

void MoELayer::backward_parallel(Backend& be, const float* dy, float* dx, int64_t rows) {
  Communicator& world = par_->world();
  const int64_t E = s_.router.num_experts, D = s_.dim, A = plan_.num_assignments();
  Exchange& ex = ex_;
  const int64_t a_local = ex.remote.num_assignments();

  // The output gradient goes where the tokens went, each row once per destination.
  ex.dy_send.resize(be, ex.x_send.size());
  be.dispatch(ex.send, dy, ex.dy_send.data(), D);
  ex.dy_recv.resize(be, ex.x_recv.size());
  std::vector<int64_t> sb, so, rb, ro;
  layout_bytes(ex.send_rows, D * 4, sb, so);
  layout_bytes(ex.recv_rows, D * 4, rb, ro);
  Request moving = world.start_all_to_all_v(ex.dy_send.data(), sb.data(), so.data(),
                                            ex.dy_recv.data(), rb.data(), ro.data());
  // Meanwhile: the shared experts, and each assignment's gate-weight gradient, from the output
  // this rank got back in the forward pass.
  shared_backward(be, dy, dx, rows);
  dweight_.resize(be, static_cast<size_t>(A));
  ex.scratch.resize(be, static_cast<size_t>(std::max(A, a_local) * D));
  be.combine_backward(plan_, ex.y_home.data(), dy, ex.scratch.data(), dweight_.data(), D);
  auto t0 = Clock::now();
  moving->wait();
  par_->times.dispatch += seconds(t0);

  // The experts of this shard: dy_perm = weight * dy of each assignment's token.
  dy_perm_.resize(be, static_cast<size_t>(a_local * D));
  dx_perm_.resize(be, dy_perm_.size());
  // (combine_backward also gives the gate-weight gradients, which the token's own rank computed.)
  be.combine_backward(ex.remote, y_perm_.data(), ex.dy_recv.data(), dy_perm_.data(),
                      ex.scratch.data(), D);
  const bool replicated = par_->dp() > 1;
  ex.expert_roots.clear();
  if (replicated) ex.expert_roots.resize(3 * ex.first_chunk.size());
  experts_backward(be, ex.remote, par_->sharding(E).first_expert(), dy_perm_.data(),
                   dx_perm_.data(), replicated ? ex.expert_roots.data() : nullptr);

  // Each assignment's input gradient back to its token's rank, summed there in expert order.
  ex.dx_ret.resize(be, static_cast<size_t>(a_local * D));
  be.dispatch(ex.ret, dx_perm_.data(), ex.dx_ret.data(), D);
  ex.dx_back.resize(be, static_cast<size_t>(A * D));
  layout_bytes(ex.recv_asg, D * 4, rb, ro);
  layout_bytes(ex.send_asg, D * 4, sb, so);
  Request back = world.start_all_to_all_v(ex.dx_ret.data(), rb.data(), ro.data(), ex.dx_back.data(),
                                          sb.data(), so.data());
  t0 = Clock::now();
  back->wait();
  par_->times.combine += seconds(t0);
  ex.dx_home.resize(be, static_cast<size_t>(A * D));
  be.dispatch(ex.home, ex.dx_back.data(), ex.dx_home.data(), D);
  be.dispatch_backward(plan_, ex.dx_home.data(), dx, D);
  router_backward(be, dx, rows);
}

void MoELayer::combine_expert_gradients(Backend& be) {
  if (!par_ || par_->dp() == 1 || ex_.expert_roots.empty()) return;
  const int64_t per_expert = static_cast<int64_t>(s_.expert_hidden) * s_.dim;
  const int64_t base = expert_weight_offset(par_->sharding(s_.router.num_experts).first_expert());
  std::vector<ParallelContext::Roots> all;
  for (size_t e = 0; e < ex_.first_chunk.size(); ++e) {
    const int64_t off = base + static_cast<int64_t>(e) * per_expert;
    all.push_back({&ex_.expert_roots[3 * e], p_.grad(s_.w1) + off, per_expert, false});
    all.push_back({&ex_.expert_roots[3 * e + 1], p_.grad(s_.w3) + off, per_expert, false});
    all.push_back({&ex_.expert_roots[3 * e + 2], p_.grad(s_.w2) + off, per_expert, false});
  }
  par_->combine(be, *par_->replicas(), all);
  ex_.expert_roots.clear();
}

}  // namespace moert
