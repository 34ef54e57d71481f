#include "core/parallel.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include "core/backend.h"
#include "core/comm_support.h"
#include "core/device_comm.h"
#include "core/error.h"

namespace moert {

ParallelContext::ParallelContext(std::shared_ptr<Communicator> world, int ep)
    : world_(std::move(world)), ep_(ep) {
  if (dp() > 1) replicas_ = world_->split(rank() % ep_, rank() / ep_);
}

void ParallelContext::number_session() {
  // Keyed by the communicator's control block: held weakly, it is never reused while listed.
  static std::mutex mu;
  static std::map<std::weak_ptr<Communicator>, uint64_t, std::owner_less<>> created;
  std::lock_guard<std::mutex> lock(mu);
  std::erase_if(created, [](const auto& entry) { return entry.first.expired(); });
  session_ = ++created[world_];
}

void ParallelContext::attach(Backend& be) {
  root_reduction_ = be.host_memory();
  if (world_->memory() != CommMemory::Device) return;
  device_world_ = backend_view(world_, be);
  host_world_ = host_view(world_, be);
  if (replicas_) device_replicas_ = backend_view(replicas_, be);
}

void ParallelContext::exchange_rows(int64_t rows) {
  rows_.assign(static_cast<size_t>(size()), 0);
  host().all_gather(&rows, sizeof(int64_t), rows_.data());
  first_row_ = total_rows_ = first_chunk_ = 0;
  aligned_ = true;
  for (int r = 0; r < size(); ++r) {
    if (r == rank()) {
      first_row_ = total_rows_;
      first_chunk_ = aligned_ ? total_rows_ / kReduceRows : first_chunk_;
    }
    total_rows_ += rows_[r];
    if (r + 1 < size() && rows_[r] % kReduceRows != 0) aligned_ = false;
  }
  if (!aligned_) {
    // Chunks laid end to end: each rank cuts its own rows from its first.
    first_chunk_ = 0;
    for (int r = 0; r < rank(); ++r) first_chunk_ += reduce_chunks(rows_[r]);
  }
}

std::vector<CallRecord> gather_call_records(Communicator& host, const CallRecord& mine) {
  const int size = host.size();
  std::vector<CallRecord> all(static_cast<size_t>(size));
  host.all_gather(&mine, sizeof(CallRecord), all.data());
  auto call = [](const CallRecord& r) {
    return std::string(r.call, strnlen(r.call, sizeof(r.call)));
  };
  for (int r = 1; r < size; ++r)
    if (call(all[r]) != call(all[0]))
      fail(Code::InvalidState, "rank ", r, " of ", size, " called ", call(all[r]),
           " where rank 0 called ", call(all[0]),
           ": every rank of a session makes the same calls in the same order; the call failed on "
           "every rank (a forward's pending pass is discarded, a session being created is not, "
           "nothing else changed)");
  return all;
}

std::vector<double> ParallelContext::gather(const std::vector<double>& mine) {
  const int R = size();
  std::vector<int64_t> bytes(static_cast<size_t>(R)), offsets(static_cast<size_t>(R), 0);
  const int64_t my_bytes = static_cast<int64_t>(mine.size() * sizeof(double));
  host().all_gather(&my_bytes, sizeof(int64_t), bytes.data());
  for (int r = 1; r < R; ++r) offsets[r] = offsets[r - 1] + bytes[r - 1];
  std::vector<double> all(static_cast<size_t>((offsets[R - 1] + bytes[R - 1]) / 8));
  host().all_gather_v(mine.data(), my_bytes, all.data(), bytes.data(), offsets.data());
  return all;
}

void ParallelContext::gather_shards(const float* mine, int64_t n, float* full) {
  const size_t R = static_cast<size_t>(size());
  const int64_t bytes = n * static_cast<int64_t>(sizeof(float));
  std::vector<int64_t> send_bytes(R, 0), send_offsets(R, 0), recv_bytes(R, 0), recv_offsets(R, 0);
  if (rank() < ep_) send_bytes[0] = bytes;
  if (rank() == 0)
    for (int s = 0; s < ep_; ++s) {
      recv_bytes[static_cast<size_t>(s)] = bytes;
      recv_offsets[static_cast<size_t>(s)] = s * bytes;
    }
  host().all_to_all_v(mine, send_bytes.data(), send_offsets.data(), full, recv_bytes.data(),
                      recv_offsets.data());
}

ParallelContext::IoAllowance::IoAllowance(ParallelContext& par, double io_bytes) {
  constexpr double kSlowFileSystemBytesPerSecond = 10e6;
  const double extra = std::max(0.0, io_bytes) / kSlowFileSystemBytesPerSecond;
  // Every timeout is read before any is set: a device communicator's views forward their
  // timeout to the communicator itself, so setting one changes what the others read.
  for (Communicator* c : {&par.world(), &par.host(), par.world_.get()})
    if (std::none_of(extended_.begin(), extended_.end(),
                     [&](const Extended& e) { return e.comm == c; })) {
      const double before = c->timeout();
      extended_.push_back({c, before, std::min(comm::kMaxCommTimeoutSeconds, before + extra)});
    }
  for (const Extended& e : extended_) e.comm->set_timeout(e.during);
}

ParallelContext::IoAllowance::~IoAllowance() {
  for (const Extended& e : extended_)
    if (e.comm->timeout() == e.during) e.comm->set_timeout(e.before);
}

void ParallelContext::agree(std::exception_ptr local, const char* call, uint64_t same,
                            const char* same_what) {
  CallRecord mine;
  mine.session = session_;
  mine.same = same;
  std::strncpy(mine.call, call, sizeof(mine.call) - 1);
  if (local) {
    mine.failed = 1;
    mine.code = static_cast<int32_t>(Code::Internal);
    std::string what = "unknown error";
    try {
      std::rethrow_exception(local);
    } catch (const Error& e) {
      mine.code = static_cast<int32_t>(e.code());
      what = e.message();
    } catch (const std::bad_alloc&) {
      mine.code = static_cast<int32_t>(Code::OutOfMemory);
      what = "out of memory";
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    constexpr size_t kRoom = sizeof(mine.message) - 1;
    size_t n = what.size();
    if (n > kRoom) {
      // A longer message is cut before a whole UTF-8 character and marked.
      n = kRoom - 3;
      while (n > 0 && (static_cast<unsigned char>(what[n]) & 0xC0) == 0x80) --n;
    }
    std::memcpy(mine.message, what.data(), n);
    if (n < what.size()) {
      std::memcpy(mine.message + n, "...", 3);
      n += 3;
    }
    mine.message[n] = '\0';
  }
  if (world_->memory() == CommMemory::Device) {
    // The verdicts travel through host_view(), which needs the backend: first a native vote,
    // which every rank can cast (also one whose backend failed to come up), then the messages
    // where every rank has a backend to stage them.
    // When every rank succeeded, every rank has its backend (the session's build attached it),
    // and the verdicts still travel: they carry the call and what it needs alike.
    if (!world_->agree(!local) && !world_->agree(host_world_ != nullptr)) {
      if (local) std::rethrow_exception(local);
      fail(Code::Comm, "another rank of ", size(),
           " failed before its session had a device (its message cannot travel without one)");
    }
  }
  // Ranks in different calls (one in a forward, another in a load) matched this all-gather only
  // because it has one shape everywhere: none may go on.
  const std::vector<CallRecord> all = gather_call_records(host(), mine);
  for (int r = 1; r < size(); ++r)
    if (all[r].session != all[0].session)
      fail(Code::InvalidState, "rank ", r, " of ", size(), " is in a call on session #",
           all[r].session, " of the communicator where rank 0 is in one on session #",
           all[0].session,
           ": every rank calls the sessions it shares with the others in the same order; the "
           "call failed on every rank (a forward's pending pass is discarded, nothing else "
           "changed)");
  if (local) std::rethrow_exception(local);
  for (int r = 0; r < size(); ++r)
    if (all[r].failed)
      fail(static_cast<Code>(all[r].code), "rank ", r, " of ", size(), " failed: ",
           std::string(all[r].message, strnlen(all[r].message, sizeof(all[r].message))));
  for (int r = 1; r < size(); ++r)
    if (all[r].same != all[0].same)
      fail(Code::InvalidState, "rank ", r, " of ", size(), " differs from rank 0 in ",
           same_what ? same_what : "its state", ": the ", call, " failed on every rank");
}

namespace {

// A root's values, dense (rows empty) or sparse (rows ascending, values [rows, n]).
using Value = SparseRows;

// l = l (+) r: elementwise for dense values, merge_sparse_rows() for sparse ones.
void merge(Value& l, const Value& r, int64_t n, bool sparse) {
  if (!sparse) {
    for (size_t i = 0; i < l.values.size(); ++i) l.values[i] = l.values[i] + r.values[i];
    return;
  }
  merge_sparse_rows(l, r, n);
}

void put(std::vector<char>& out, const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  out.insert(out.end(), c, c + bytes);
}

// Reads one rank's bytes of a combine, refusing anything past their end: the ranks must hand in
// the same gradients, and a rank that does not must fail the combine, not read out of bounds.
class RootsReader {
 public:
  RootsReader(const char* p, int64_t bytes, int rank) : p_(p), end_(p + bytes), rank_(rank) {}
  template <typename T>
  T take() {
    T v;
    std::memcpy(&v, bytes(sizeof(T)), sizeof(T));
    return v;
  }
  const char* bytes(size_t n) {
    if (static_cast<size_t>(end_ - p_) < n)
      fail(Code::Internal, "combining gradients: rank ", rank_, "'s roots end early");
    const char* at = p_;
    p_ += n;
    return at;
  }
  // A count read from the bytes, before anything is sized from it.
  size_t count(int64_t n, size_t unit) {
    if (n < 0 || (unit > 0 && static_cast<uint64_t>(n) > static_cast<uint64_t>(end_ - p_) / unit))
      fail(Code::Internal, "combining gradients: rank ", rank_, "'s roots end early");
    return static_cast<size_t>(n);
  }

 private:
  const char* p_;
  const char* end_;
  int rank_;
};

}  // namespace

void ParallelContext::combine(Backend& be, Communicator& comm, const std::vector<Roots>& grads) {
  const size_t G = grads.size();
  // This rank's roots as bytes: the gradients' count and each one's n and sparse flag (the ranks
  // must agree on them); then per gradient its block count, then per block (begin, size, rows or
  // -1 for dense), the row ids and the values.
  std::vector<char> mine;
  std::vector<float> host;
  put(mine, std::array<int64_t, 1>{static_cast<int64_t>(G)}.data(), 8);
  for (const Roots& g : grads) {
    const int64_t shape[2] = {g.n, g.sparse ? 1 : 0};
    put(mine, shape, sizeof(shape));
  }
  for (const Roots& g : grads) {
    const GradRoots& r = *g.roots;
    put(mine, std::array<int64_t, 1>{static_cast<int64_t>(r.blocks.size())}.data(), 8);
    for (size_t k = 0; k < r.blocks.size(); ++k) {
      const int64_t nrows = g.sparse ? static_cast<int64_t>(r.rows[k].size()) : -1;
      const int64_t head[3] = {r.blocks[k].begin, r.blocks[k].size, nrows};
      put(mine, head, sizeof(head));
      if (g.sparse) put(mine, r.rows[k].data(), r.rows[k].size() * 4);
      const size_t floats = static_cast<size_t>(g.sparse ? nrows * g.n : g.n);
      host.resize(floats);
      if (floats) be.download(host.data(), r.values[k].data(), floats * 4);
      put(mine, host.data(), floats * 4);
    }
  }
  const int R = comm.size();
  std::vector<int64_t> sizes(static_cast<size_t>(R)), offsets(static_cast<size_t>(R), 0);
  const int64_t my_bytes = static_cast<int64_t>(mine.size());
  comm.all_gather(&my_bytes, sizeof(int64_t), sizes.data());
  for (int r = 1; r < R; ++r) offsets[r] = offsets[r - 1] + sizes[r - 1];
  std::vector<char> all(static_cast<size_t>(offsets[R - 1] + sizes[R - 1]));
  comm.all_gather_v(mine.data(), my_bytes, all.data(), sizes.data(), offsets.data());

  // Every rank's roots of each gradient, in rank order: their chunk ranges come in that order.
  std::vector<std::vector<std::pair<TreeBlock, Value>>> per(G);
  // Every rank parses every rank's bytes alike, so a disagreement fails every rank alike.
  for (int r = 0; r < R; ++r) {
    RootsReader in(all.data() + offsets[r], sizes[r], r);
    if (in.take<int64_t>() != static_cast<int64_t>(G))
      fail(Code::Internal, "combining gradients: rank ", r, " of ", R,
           " hands in another number of gradients than ", G);
    for (size_t g = 0; g < G; ++g)
      if (in.take<int64_t>() != grads[g].n || in.take<int64_t>() != (grads[g].sparse ? 1 : 0))
        fail(Code::Internal, "combining gradients: rank ", r, " of ", R, " hands in gradient ", g,
             " of another size");
    for (size_t g = 0; g < G; ++g) {
      const int64_t count = in.take<int64_t>();
      for (int64_t k = 0; k < count; ++k) {
        const int64_t begin = in.take<int64_t>(), size = in.take<int64_t>(),
                      nrows = in.take<int64_t>();
        if ((nrows >= 0) != grads[g].sparse)
          fail(Code::Internal, "combining gradients: rank ", r, " of ", R, " hands in gradient ", g,
               " of another kind");
        Value v;
        if (nrows >= 0) {
          v.rows.resize(in.count(nrows, 4));
          std::memcpy(v.rows.data(), in.bytes(v.rows.size() * 4), v.rows.size() * 4);
        }
        const size_t floats = nrows >= 0 ? in.count(nrows, 4 * static_cast<size_t>(grads[g].n)) *
                                               static_cast<size_t>(grads[g].n)
                                         : static_cast<size_t>(grads[g].n);
        v.values.resize(floats);
        if (floats) std::memcpy(v.values.data(), in.bytes(floats * 4), floats * 4);
        per[g].push_back({{begin, size}, std::move(v)});
      }
    }
  }
  for (size_t g = 0; g < G; ++g) {
    auto& roots = per[g];
    if (roots.empty()) continue;
    const Roots& d = grads[g];
    auto add = [&](Value* l, Value* r) { merge(*l, *r, d.n, d.sparse); };
    TreeFold<Value*> fold(roots.front().first.begin);
    for (auto& [block, value] : roots) fold.push_block(block, &value, add);
    const Value& total = *fold.finish(add);
    // acc = acc + T, as the backend adds a total of its own (on the rows of T, when sparse).
    if (!d.sparse) {
      host.resize(static_cast<size_t>(d.n));
      be.download(host.data(), d.acc, host.size() * 4);
      for (size_t i = 0; i < host.size(); ++i) host[i] = host[i] + total.values[i];
      be.upload(d.acc, host.data(), host.size() * 4);
      continue;
    }
    host.resize(static_cast<size_t>(d.n));
    for (size_t k = 0; k < total.rows.size(); ++k) {
      float* row = d.acc + static_cast<int64_t>(total.rows[k]) * d.n;
      be.download(host.data(), row, host.size() * 4);
      for (int64_t i = 0; i < d.n; ++i) host[i] = host[i] + total.values[k * d.n + i];
      be.upload(row, host.data(), host.size() * 4);
    }
  }
}

}  // namespace moert
