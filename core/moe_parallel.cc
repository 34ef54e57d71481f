// The MoE layer's passes under expert and data parallelism (core/expert_parallel.h): each rank
// routes its own rows, sends each token once to every rank that computes one of its experts
// (dispatch), computes the assignments its shard owns, sends each result back (combine) and sums
// them in expert order as one process does.
//
// Overlap: the exchanges are cut into chunks of the ranks' local experts. Every chunk's dispatch
// starts at once; the shared experts compute while they travel; chunk c's experts compute as soon
// as chunk c has arrived, while the later chunks are still arriving and the earlier chunks'
// results are on their way back. Chunking changes no value: every chunk of an expert's list runs
// the same GEMM as on one process, and the home rank adds the results in the same order.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/layers.h"
#include "kernels/fp8_rules.h"

namespace moert {
namespace {

using Clock = std::chrono::steady_clock;
using Assignment = DispatchRoute::Assignment;

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

template <typename T>
void upload_vector(Backend& be, Buffer<T>& dst, const std::vector<T>& src) {
  dst.resize(be, src.size());
  if (!src.empty()) be.upload(dst.data(), src.data(), src.size() * sizeof(T));
}

template <typename T>
void upload_range(Backend& be, Buffer<T>& dst, const T* src, size_t n) {
  dst.resize(be, n);
  if (n) be.upload(dst.data(), src, n * sizeof(T));
}

template <typename T>
std::vector<T> to_host(Backend& be, const Buffer<T>& b, size_t n) {
  std::vector<T> out(n);
  if (n) be.download(out.data(), b.data(), n * sizeof(T));
  return out;
}

// The byte counts and offsets of chunk c's all-to-all within a chunk-major buffer whose blocks
// hold counts[c' * world + p] items of `item` bytes each.
struct Blocks {
  std::vector<int64_t> bytes, offsets;
};
Blocks chunk_blocks(const std::vector<int64_t>& counts, int world, int64_t c, int64_t item) {
  Blocks b;
  b.bytes.resize(static_cast<size_t>(world));
  b.offsets.resize(static_cast<size_t>(world));
  int64_t off = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(counts.size()); ++i) {
    if (i / world == c) {
      b.bytes[i % world] = counts[i] * item;
      b.offsets[i % world] = off;
    }
    off += counts[i] * item;
  }
  return b;
}

// Offsets (in items) of the chunk-major blocks: offsets[c * world + p].
std::vector<int64_t> block_offsets(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) off[i + 1] = off[i] + counts[i];
  return off;
}

// Runs f unless `failed` already holds a failure, and keeps f's failure in it; a communication
// failure is thrown at once (the communicator is broken: no agreement can follow).
template <typename F>
void attempt(std::exception_ptr& failed, F&& f) {
  if (failed) return;
  try {
    f();
  } catch (const Error& e) {
    if (e.code() == Code::Comm) throw;
    failed = std::current_exception();
  } catch (...) {
    failed = std::current_exception();
  }
}

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

}  // namespace

void MoELayer::route_expert_choice_parallel(Backend& be, int64_t rows, std::exception_ptr& failed) {
  // Expert Choice picks each expert's tokens from the whole batch: every rank routes the logits
  // of every rank's rows, gathered in rank order (the union one process would route), alike, and
  // keeps its own rows' assignments and scores.
  Communicator& world = par_->world();
  const int R = world.size();
  const int64_t E = s_.router.num_experts, total = par_->total_rows(), first = par_->first_row();
  // Session::check_rows's bounds, over the job's rows (the same on every rank): token indices
  // and the assignments' count are int32.
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (total > kMax || capacity(total) > kMax / E)
    fail(Code::InvalidArgument, "the job's ", total,
         " rows are too many for an Expert Choice layer of ", E,
         " experts: they would index more than 2^31 - 1 tokens or token-expert pairs");
  std::vector<int64_t> bytes(static_cast<size_t>(R)), offsets(static_cast<size_t>(R), 0);
  for (int p = 0; p < R; ++p) bytes[p] = par_->rows()[p] * E * 4;
  for (int p = 1; p < R; ++p) offsets[p] = offsets[p - 1] + bytes[p - 1];
  attempt(failed, [&] {
    all_logits_.resize(be, static_cast<size_t>(total * E));
    all_scores_.resize(be, all_logits_.size());
  });
  // Every rank must be able to receive every rank's logits.
  par_->agree(failed, "forward");
  world.all_gather_v(logits_.data(), rows * E * 4, all_logits_.data(), bytes.data(),
                     offsets.data());
  attempt(failed, [&] {
    be.route_expert_choice(s_.router, all_logits_.data(), total, capacity(total),
                           all_scores_.data(), plan_, first, rows);
    if (rows > 0)
      be.copy(scores_.data(), all_scores_.data() + first * E,
              static_cast<size_t>(rows * E) * sizeof(float));
  });
}

void MoELayer::forward_parallel(Backend& be, const float* x, float* y, int64_t rows, bool train) {
  // Rows travel in backend memory (world); the counts that lay them out in host memory (host).
  Communicator& world = par_->world();
  Communicator& host = par_->host();
  const int R = world.size(), me = world.rank();
  const int64_t E = s_.router.num_experts, D = s_.dim, H = s_.expert_hidden;
  const ExpertSharding sharding = par_->sharding(E);
  const int64_t P = sharding.per_shard();
  // A rank that fails before the rows travel (its routing, or memory for what the routing sizes)
  // must not leave the others waiting for it in the exchanges: it keeps its failure here, makes
  // the count exchanges with zero counts, and every rank learns of it in one agreement before the
  // first rows move, where every rank fails the call. From then on the layer's computations are
  // held by ParallelContext::compute, and the host memory it fills is sized before the agreement
  // too (the transport's own staging buffers are agreed on by the transport).
  std::exception_ptr failed;
  attempt(failed, [&] { route(be, x, rows); });
  if (s_.balancing.policy == BalancingPolicy::ExpertChoice)
    route_expert_choice_parallel(be, rows, failed);
  const int64_t A = failed ? 0 : plan_.num_assignments();

  // Every rank's counts per expert: the layout of the job's assignments.
  std::vector<int64_t> local(static_cast<size_t>(E), 0), all(static_cast<size_t>(R * E));
  if (!failed)
    for (int64_t e = 0; e < E; ++e) local[e] = plan_.count(e);
  host.all_gather(local.data(), E * 8, all.data());
  // Replicas split an expert's rows at multiples of 128 as well as of the reduction's chunks: FP8
  // Wgrad quantizes them in 128-token tiles from the start of the list (kernels/cpu/fp8.h), and a
  // tile cut between two processes would have other scales than in one process.
  const ExpertLayout layout(sharding, std::move(all), kReduceRows,
                            std::max<int64_t>(kReduceRows, fp8::kBlock));
  Exchange& ex = ex_;
  const int64_t C = pipeline_chunks(par_->chunks(), P);
  ex.chunks = C;

  // How much each rank sends each other rank in each chunk: rows and assignments.
  const size_t cells = static_cast<size_t>(C * R);
  std::vector<int64_t> mine(2 * cells, 0), every(2 * cells * static_cast<size_t>(R));
  attempt(failed, [&] {
    ex.route = route_dispatch(layout, to_host(be, plan_.token, static_cast<size_t>(A)).data(),
                              to_host(be, plan_.expert, static_cast<size_t>(A)).data(),
                              to_host(be, plan_.weight, static_cast<size_t>(A)).data(), A, rows, C);
    for (int64_t c = 0; c < C; ++c)
      for (int q = 0; q < R; ++q) {
        mine[2 * (c * R + q)] = static_cast<int64_t>(ex.route.tokens[c][q].size());
        mine[2 * (c * R + q) + 1] = static_cast<int64_t>(ex.route.assignments[c][q].size());
      }
  });
  host.all_gather(mine.data(), static_cast<int64_t>(mine.size() * 8), every.data());
  ex.send_rows.assign(cells, 0);
  ex.send_asg.assign(cells, 0);
  ex.recv_rows.assign(cells, 0);
  ex.recv_asg.assign(cells, 0);
  for (int64_t c = 0; c < C; ++c)
    for (int p = 0; p < R; ++p) {
      const size_t i = static_cast<size_t>(c * R + p);
      ex.send_rows[i] = mine[2 * i];
      ex.send_asg[i] = mine[2 * i + 1];
      const size_t from = static_cast<size_t>(p) * 2 * cells + 2 * static_cast<size_t>(c * R + me);
      ex.recv_rows[i] = every[from];
      ex.recv_asg[i] = every[from + 1];
    }
  const int64_t n_recv = sum(ex.recv_rows), a_recv = sum(ex.recv_asg);
  const std::vector<int64_t> asg_at = block_offsets(ex.recv_asg);

  // This rank's slots: expert-major, each local expert's range of its global list in order — the
  // chunks one process would compute for it.
  ex.slot_off = layout.slot_offsets(me);
  const int64_t a_local = ex.slot_off.back();
  // The pass's backend buffers and plans, sized now; then the agreement.
  attempt(failed, [&] {
    if (a_local != a_recv)
      fail(Code::Internal, "expert parallelism: rank ", me, " expects ", a_recv,
           " assignments for its ", a_local, " slots");
    // Dispatch: every chunk's rows (each once per destination) and assignments.
    std::vector<int32_t> send_tokens;
    std::vector<Assignment> send_meta;
    for (int64_t c = 0; c < C; ++c)
      for (int q = 0; q < R; ++q) {
        send_tokens.insert(send_tokens.end(), ex.route.tokens[c][q].begin(),
                           ex.route.tokens[c][q].end());
        send_meta.insert(send_meta.end(), ex.route.assignments[c][q].begin(),
                         ex.route.assignments[c][q].end());
      }
    gather_plan(be, ex.send, send_tokens);
    ex.x_send.resize(be, send_tokens.size() * static_cast<size_t>(D));
    be.dispatch(ex.send, x, ex.x_send.data(), D);
    upload_vector(
        be, ex.meta_send,
        std::vector<char>(reinterpret_cast<const char*>(send_meta.data()),
                          reinterpret_cast<const char*>(send_meta.data() + send_meta.size())));
    ex.x_recv.resize(be, static_cast<size_t>(n_recv * D));
    ex.meta_recv.resize(be, static_cast<size_t>(a_recv) * sizeof(Assignment));
    x_perm_.resize(be, static_cast<size_t>(a_local * kept_ld_));
    y_perm_.resize(be, static_cast<size_t>(a_local * D));
    keep_hidden(be, a_local, train);
    ex.y_ret.resize(be, static_cast<size_t>(a_local * D));
    ex.y_back.resize(be, static_cast<size_t>(A * D));
    ex.y_home.resize(be, static_cast<size_t>(A * D));
    // The plans the chunks upload, at their sizes.
    ex.groups.clear();
    ex.groups.resize(static_cast<size_t>(C));
    ex.ret.clear();
    ex.ret.resize(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
      const auto n = static_cast<size_t>(ex.slot_off[chunk_first_local(c + 1, C, P)] -
                                         ex.slot_off[chunk_first_local(c, C, P)]);
      ex.groups[c].token.resize(be, n);
      ex.groups[c].weight.resize(be, n);
      ex.groups[c].expert.resize(be, n);
      ex.ret[c].token.resize(be, static_cast<size_t>(asg_at[static_cast<size_t>((c + 1) * R)] -
                                                     asg_at[static_cast<size_t>(c * R)]));
    }
    ex.remote.token.resize(be, static_cast<size_t>(a_local));
    ex.remote.weight.resize(be, static_cast<size_t>(a_local));
    ex.remote.expert.resize(be, static_cast<size_t>(a_local));
    ex.home.token.resize(be, static_cast<size_t>(A));
    if (train && uses_aux_loss()) aux_ds_.resize(be, static_cast<size_t>(rows * E));
    ex.slot_token.assign(static_cast<size_t>(a_local), 0);
    ex.slot_expert.assign(ex.slot_token.size(), 0);
    ex.slot_weight.assign(ex.slot_token.size(), 0.0f);
    int64_t most = 0;  // the most assignments a chunk brings
    for (int64_t c = 0; c < C; ++c)
      most = std::max(
          most, asg_at[static_cast<size_t>((c + 1) * R)] - asg_at[static_cast<size_t>(c * R)]);
    ex.chunk_meta.resize(static_cast<size_t>(most) * sizeof(Assignment));
    ex.chunk_slots.clear();
    ex.chunk_slots.reserve(static_cast<size_t>(most));
    ex.home_rows.assign(static_cast<size_t>(A), 0);
  });
  par_->agree(failed, "forward");

  // Every chunk's dispatch, started at once.
  std::vector<Request> rows_moving, meta_moving;
  for (int64_t c = 0; c < C; ++c) {
    const Blocks s = chunk_blocks(ex.send_rows, R, c, D * 4),
                 r = chunk_blocks(ex.recv_rows, R, c, D * 4);
    rows_moving.push_back(world.start_all_to_all_v(ex.x_send.data(), s.bytes.data(),
                                                   s.offsets.data(), ex.x_recv.data(),
                                                   r.bytes.data(), r.offsets.data()));
    const Blocks ms = chunk_blocks(ex.send_asg, R, c, sizeof(Assignment)),
                 mr = chunk_blocks(ex.recv_asg, R, c, sizeof(Assignment));
    meta_moving.push_back(world.start_all_to_all_v(ex.meta_send.data(), ms.bytes.data(),
                                                   ms.offsets.data(), ex.meta_recv.data(),
                                                   mr.bytes.data(), mr.offsets.data()));
  }

  // The residual and the shared experts need nothing from the other ranks: they run while the
  // tokens travel (without overlap, after they have arrived).
  if (!par_->overlap())
    for (int64_t c = 0; c < C; ++c) {
      const auto t = Clock::now();
      rows_moving[c]->wait();
      meta_moving[c]->wait();
      par_->times.dispatch += seconds(t);
    }
  par_->compute([&] { residual_and_shared(be, x, y, rows, train); });

  ex.first_chunk.resize(static_cast<size_t>(P));
  for (int64_t l = 0; l < P; ++l) ex.first_chunk[l] = layout.first_chunk(me, l);
  std::vector<int32_t>& r_token = ex.slot_token;
  std::vector<int32_t>& r_expert = ex.slot_expert;
  std::vector<float>& r_weight = ex.slot_weight;
  for (int64_t l = 0; l < P; ++l)
    for (int64_t a = ex.slot_off[l]; a < ex.slot_off[l + 1]; ++a)
      r_expert[a] = static_cast<int32_t>(l);
  // A source's rows are numbered in the order they come (chunk 0's, chunk 1's, ...); where each
  // lands in the chunk-major receive buffer:
  const std::vector<int64_t> row_at = block_offsets(ex.recv_rows);
  std::vector<std::vector<int64_t>> numbered(static_cast<size_t>(R),
                                             std::vector<int64_t>(static_cast<size_t>(C + 1), 0));
  for (int p = 0; p < R; ++p)
    for (int64_t c = 0; c < C; ++c)
      numbered[p][c + 1] = numbered[p][c] + ex.recv_rows[static_cast<size_t>(c * R + p)];
  auto landing = [&](int p, int64_t row) {
    int64_t c = 0;
    while (numbered[p][c + 1] <= row) ++c;
    return row_at[static_cast<size_t>(c * R + p)] + row - numbered[p][c];
  };

  std::vector<Request> back;
  back.reserve(static_cast<size_t>(C));
  const auto* meta = reinterpret_cast<const Assignment*>(ex.chunk_meta.data());
  for (int64_t c = 0; c < C; ++c) {
    auto t0 = Clock::now();
    rows_moving[c]->wait();
    meta_moving[c]->wait();
    par_->times.dispatch += seconds(t0);
    // Chunk c's assignments, from every source in order.
    const int64_t a0 = asg_at[static_cast<size_t>(c * R)],
                  a1 = asg_at[static_cast<size_t>((c + 1) * R)];
    if (a1 > a0)
      be.download(ex.chunk_meta.data(), ex.meta_recv.data() + a0 * sizeof(Assignment),
                  static_cast<size_t>(a1 - a0) * sizeof(Assignment));
    std::vector<int32_t>& ret_slots = ex.chunk_slots;  // within its reserved capacity
    ret_slots.clear();
    size_t j = 0;
    for (int p = 0; p < R; ++p)
      for (int64_t i = 0; i < ex.recv_asg[static_cast<size_t>(c * R + p)]; ++i, ++j) {
        const Assignment& m = meta[j];
        r_token[m.slot] = static_cast<int32_t>(landing(p, m.row));
        r_weight[m.slot] = m.weight;
        ret_slots.push_back(m.slot);
      }
    // The chunk's experts: local experts [l0, l1), slots [s0, s1).
    const int64_t l0 = chunk_first_local(c, C, P), l1 = chunk_first_local(c + 1, C, P);
    const int64_t s0 = ex.slot_off[l0], s1 = ex.slot_off[l1];
    DispatchPlan& g = ex.groups[c];
    g.rows = n_recv;
    g.host_offsets.assign(ex.slot_off.begin() + l0, ex.slot_off.begin() + l1 + 1);
    for (int64_t& o : g.host_offsets) o -= s0;
    const auto n = static_cast<size_t>(s1 - s0);
    upload_range(be, g.token, r_token.data() + s0, n);
    upload_range(be, g.weight, r_weight.data() + s0, n);
    upload_range(be, g.expert, r_expert.data() + s0, n);
    const auto te = Clock::now();
    if (!par_->compute([&] {
          experts_forward(be, g, sharding.first_expert() + l0, ex.x_recv.data(),
                          x_perm_.data() + s0 * kept_ld_, train, y_perm_.data() + s0 * D,
                          train ? h1_.data() + s0 * H : nullptr,
                          train ? h3_.data() + s0 * H : nullptr);
        }))
      be.zero(y_perm_.data() + s0 * D, static_cast<size_t>((s1 - s0) * D) * sizeof(float));
    par_->times.experts += seconds(te);
    // Its results go back at once, each to its token's rank, in the order that rank listed them.
    gather_plan(be, ex.ret[c], ret_slots);
    be.dispatch(ex.ret[c], y_perm_.data(), ex.y_ret.data() + a0 * D, D);
    const Blocks s = chunk_blocks(ex.recv_asg, R, c, D * 4),
                 r = chunk_blocks(ex.send_asg, R, c, D * 4);
    back.push_back(world.start_all_to_all_v(ex.y_ret.data(), s.bytes.data(), s.offsets.data(),
                                            ex.y_back.data(), r.bytes.data(), r.offsets.data()));
  }
  // The whole remote plan (every chunk), for backward.
  DispatchPlan& rp = ex.remote;
  rp.rows = n_recv;
  rp.host_offsets = ex.slot_off;
  upload_vector(be, rp.token, r_token);
  upload_vector(be, rp.weight, r_weight);
  upload_vector(be, rp.expert, r_expert);

  auto t0 = Clock::now();
  for (auto& b : back) b->wait();
  par_->times.combine += seconds(t0);
  std::vector<int32_t>& home = ex.home_rows;
  const std::vector<int64_t> back_at = block_offsets(ex.send_asg);
  for (int64_t a = 0; a < A; ++a)
    home[a] = static_cast<int32_t>(
        back_at[static_cast<size_t>(ex.route.chunk[a] * R + ex.route.dest[a])] + ex.route.index[a]);
  gather_plan(be, ex.home, home);
  par_->compute([&] {
    be.dispatch(ex.home, ex.y_back.data(), ex.y_home.data(), D);
    be.combine(plan_, ex.y_home.data(), y, D);
  });

  // The job's counts: every rank's metrics and bias updates see the global batch.
  pending_ = layout.totals();
  aux_loss_ = 0.0;
  if (train && uses_aux_loss()) aux_forward(be, rows);
}

void MoELayer::reserve_backward(Backend& be, int64_t rows, bool dx_given) {
  // Alone no rank waits for this one: backward allocates as it goes.
  if (!par_) return;
  const int64_t E = s_.router.num_experts, D = s_.dim, A = plan_.num_assignments();
  const int64_t a_local = ex_.remote.num_assignments();
  if (!dx_given) scratch_.resize(be, static_cast<size_t>(rows * D));
  ex_.dy_send.resize(be, ex_.x_send.size());
  ex_.dy_recv.resize(be, ex_.x_recv.size());
  dweight_.resize(be, static_cast<size_t>(A));
  dy_perm_.resize(be, static_cast<size_t>(a_local * kept_ld_));
  dx_perm_.resize(be, static_cast<size_t>(a_local * D));
  ex_.dx_ret.resize(be, dx_perm_.size());
  ex_.dx_back.resize(be, static_cast<size_t>(A * D));
  ex_.dx_home.resize(be, ex_.dx_back.size());
  dlogits_.resize(be, static_cast<size_t>(rows * E));
}

void MoELayer::backward_parallel(Backend& be, const float* dy, float* dx, int64_t rows) {
  Communicator& world = par_->world();
  const int R = world.size();
  const int64_t E = s_.router.num_experts, D = s_.dim, H = s_.expert_hidden;
  Exchange& ex = ex_;
  const int64_t C = ex.chunks, P = par_->sharding(E).per_shard();

  // The output gradient goes where the tokens went, each row once per destination, chunk by
  // chunk, all started at once.
  be.dispatch(ex.send, dy, ex.dy_send.data(), D);
  std::vector<Request> moving;
  for (int64_t c = 0; c < C; ++c) {
    const Blocks s = chunk_blocks(ex.send_rows, R, c, D * 4),
                 r = chunk_blocks(ex.recv_rows, R, c, D * 4);
    moving.push_back(world.start_all_to_all_v(ex.dy_send.data(), s.bytes.data(), s.offsets.data(),
                                              ex.dy_recv.data(), r.bytes.data(), r.offsets.data()));
  }
  // Meanwhile: the shared experts, and each assignment's gate-weight gradient, from the output
  // this rank got back in the forward pass.
  if (!par_->overlap())
    for (int64_t c = 0; c < C; ++c) {
      const auto t = Clock::now();
      moving[c]->wait();
      par_->times.dispatch += seconds(t);
    }
  // Every buffer was sized in the call's opening agreement (reserve_backward).
  par_->compute([&] {
    shared_backward(be, dy, dx, rows);
    be.combine_backward(plan_, ex.y_home.data(), dy, nullptr, dweight_.data(), D, D);
  });
  // Expert gradients by roots where the backend gives them (Session::reduce_local_gradients
  // all-reduces them otherwise).
  const bool replicated = par_->dp() > 1 && par_->root_reduction();
  ex.expert_roots.clear();
  if (replicated) ex.expert_roots.resize(static_cast<size_t>(3 * P));
  const std::vector<int64_t> asg_at = block_offsets(ex.recv_asg);
  std::vector<Request> back;
  for (int64_t c = 0; c < C; ++c) {
    auto t0 = Clock::now();
    moving[c]->wait();
    par_->times.dispatch += seconds(t0);
    const int64_t l0 = chunk_first_local(c, C, P);
    const int64_t s0 = ex.slot_off[l0], s1 = ex.slot_off[chunk_first_local(c + 1, C, P)];
    const DispatchPlan& g = ex.groups[c];
    // dy_perm = weight * dy of each assignment's token (the gate-weight gradients are the
    // token's own rank's, not asked for here).
    const auto te = Clock::now();
    if (!par_->compute([&] {
          be.combine_backward(g, y_perm_.data() + s0 * D, ex.dy_recv.data(),
                              dy_perm_.data() + s0 * kept_ld_, nullptr, D, kept_ld_);
          experts_backward(be, g, par_->sharding(E).first_expert() + l0,
                           x_perm_.data() + s0 * kept_ld_, h1_.data() + s0 * H, h3_.data() + s0 * H,
                           dy_perm_.data() + s0 * kept_ld_, dx_perm_.data() + s0 * D,
                           replicated ? ex.expert_roots.data() + 3 * l0 : nullptr,
                           ex.first_chunk.data() + l0);
        }))
      be.zero(dx_perm_.data() + s0 * D, static_cast<size_t>((s1 - s0) * D) * sizeof(float));
    par_->times.experts += seconds(te);
    // Each assignment's input gradient back to its token's rank.
    const int64_t a0 = asg_at[static_cast<size_t>(c * R)];
    be.dispatch(ex.ret[c], dx_perm_.data(), ex.dx_ret.data() + a0 * D, D);
    const Blocks s = chunk_blocks(ex.recv_asg, R, c, D * 4),
                 r = chunk_blocks(ex.send_asg, R, c, D * 4);
    back.push_back(world.start_all_to_all_v(ex.dx_ret.data(), s.bytes.data(), s.offsets.data(),
                                            ex.dx_back.data(), r.bytes.data(), r.offsets.data()));
  }
  auto t0 = Clock::now();
  for (auto& b : back) b->wait();
  par_->times.combine += seconds(t0);
  // Summed at home in expert order.
  par_->compute([&] {
    be.dispatch(ex.home, ex.dx_back.data(), ex.dx_home.data(), D);
    be.dispatch_backward(plan_, ex.dx_home.data(), dx, D);
    router_backward(be, dx, rows);
  });
}

void MoELayer::combine_expert_gradients(Backend& be) {
  if (!par_ || par_->dp() == 1 || ex_.expert_roots.empty()) return;
  const int64_t per_expert = static_cast<int64_t>(s_.expert_hidden) * s_.dim;
  const int64_t first = par_->sharding(s_.router.num_experts).first_expert();
  std::vector<ParallelContext::Roots> all;
  for (size_t e = 0; e < ex_.first_chunk.size(); ++e) {
    const int64_t off = expert_weight_offset(first + static_cast<int64_t>(e));
    all.push_back({&ex_.expert_roots[3 * e], p_.grad(s_.w1) + off, per_expert, false});
    all.push_back({&ex_.expert_roots[3 * e + 1], p_.grad(s_.w3) + off, per_expert, false});
    all.push_back({&ex_.expert_roots[3 * e + 2], p_.grad(s_.w2) + off, per_expert, false});
  }
  par_->combine(be, *par_->replicas(), all);
  ex_.expert_roots.clear();
}

void MoELayer::aux_parallel(Backend& be, int64_t rows, const AuxChunks& chunks,
                            const std::vector<int64_t>& counts, const std::vector<double>& psum) {
  const RouterConfig& r = s_.router;
  const int64_t E = r.num_experts;
  Communicator& host = par_->host();
  const int R = host.size(), me = host.rank();
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
  if (!psum.empty()) std::memcpy(mine.data() + head.size() * 8, psum.data(), psum.size() * 8);
  std::vector<int64_t> bytes(static_cast<size_t>(R)), offsets(static_cast<size_t>(R), 0);
  const int64_t my_bytes = static_cast<int64_t>(mine.size());
  host.all_gather(&my_bytes, 8, bytes.data());
  for (int p = 1; p < R; ++p) offsets[p] = offsets[p - 1] + bytes[p - 1];
  std::vector<char> every(static_cast<size_t>(offsets[R - 1] + bytes[R - 1]));
  host.all_gather_v(mine.data(), my_bytes, every.data(), bytes.data(), offsets.data());

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
  // The gradient is this rank's own computation (a device backend's scratch memory may fail).
  par_->compute([&] {
    aux_ds_.resize(be, static_cast<size_t>(rows * E));
    be.aux_grad(r, scores_.data(), rows, local_seq.data(),
                static_cast<int64_t>(local_seq.size()) - 1, coef.data(), aux_ds_.data());
  });
  aux_loss_ = t.loss;
}

}  // namespace moert
