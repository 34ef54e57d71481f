#include "tests/support/inprocess_communicator.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>

#include "core/comm_support.h"
#include "core/error.h"

namespace moert::testing {
namespace {

using comm::Op;

struct Group;

// What one rank brought to one operation.
struct Part {
  Op op = Op::Barrier;
  void* data = nullptr;
  const void* send = nullptr;
  void* recv = nullptr;
  int64_t count = 0;  // all-reduce elements, or bytes (all-gather, broadcast)
  ReduceType type = ReduceType::F32;
  comm::Exchange x;
  int32_t root = 0;
  bool ok = true;
  int32_t color = 0, key = 0;
};

struct Slot {
  std::vector<std::optional<Part>> parts;
  int32_t arrived = 0, collected = 0;
  bool done = false, failed = false;
  std::string error;
  bool all_ok = false;
  std::vector<std::pair<std::shared_ptr<Group>, int32_t>> children;  // split: by rank
};

struct Group {
  explicit Group(int32_t n) : size(n) {}
  const int32_t size;
  std::mutex mu;
  std::condition_variable cv;
  bool broken = false;
  std::string reason;
  std::map<uint64_t, Slot> slots;

  void mark_broken(const std::string& why) {  // under mu
    if (!broken) {
      broken = true;
      reason = why;
    }
    cv.notify_all();
  }
};

std::string label(int32_t rank, int32_t size) { return comm::label("in-process", rank, size); }

// Runs a complete operation: every rank's part is there. Throws Error(Comm) when the parts do
// not fit together (every rank then fails it).
void execute(Group& g, Slot& s, const std::string& name) {
  const Part& first = *s.parts[0];
  for (int32_t r = 1; r < g.size; ++r)
    if (s.parts[r]->op != first.op)
      fail(Code::Comm, name,
           ": the ranks started different operations (rank 0: ", comm::op_name(first.op), ", rank ",
           r, ": ", comm::op_name(s.parts[r]->op), ")");
  auto all_equal = [&](auto get, const char* what) {
    auto lo = get(first), hi = get(first);
    for (int32_t r = 1; r < g.size; ++r) {
      lo = std::min(lo, get(*s.parts[r]));
      hi = std::max(hi, get(*s.parts[r]));
    }
    if (lo != hi)
      fail(Code::Comm, name, ": the ranks disagree on ", what, " (from ", lo, " to ", hi,
           "); every rank fails it");
  };
  switch (first.op) {
    case Op::AllReduceSum: {
      all_equal([](const Part& p) { return p.count; }, "the element count");
      all_equal([](const Part& p) { return static_cast<int32_t>(p.type); }, "the element type");
      const size_t bytes = static_cast<size_t>(first.count) * reduce_type_size(first.type);
      std::vector<char> acc(bytes);
      if (bytes) std::memcpy(acc.data(), first.data, bytes);
      for (int32_t r = 1; r < g.size; ++r)
        comm::add_in_place(acc.data(), s.parts[r]->data, first.count, first.type);
      for (int32_t r = 0; r < g.size; ++r)
        if (bytes) std::memcpy(s.parts[r]->data, acc.data(), bytes);
      return;
    }
    case Op::AllToAllV:
    case Op::AllGatherV:
    case Op::AllGather: {
      if (first.op == Op::AllGather)
        all_equal([](const Part& p) { return p.count; }, "the block size");
      if (first.op == Op::AllGatherV)
        for (int32_t r = 1; r < g.size; ++r)
          if (s.parts[r]->x.recv_bytes != first.x.recv_bytes)
            fail(Code::Comm, name, ": the ranks disagree on recv_bytes; every rank fails it");
      for (int32_t r = 0; r < g.size; ++r)
        for (int32_t p = 0; p < g.size; ++p)
          if (s.parts[r]->x.send_bytes[p] != s.parts[p]->x.recv_bytes[r])
            fail(Code::Comm, name,
                 ": the ranks' sizes do not match (what a rank sends to a peer differs from what "
                 "that peer expects); every rank fails it");
      // The own block last: in place, it is another rank's source until then.
      for (int32_t r = 0; r < g.size; ++r)
        for (int32_t p = 0; p < g.size; ++p) {
          const Part& from = *s.parts[r];
          const Part& to = *s.parts[p];
          const int64_t n = from.x.send_bytes[p];
          if (n == 0 || r == p) continue;
          std::memcpy(static_cast<char*>(to.recv) + to.x.recv_offsets[r],
                      static_cast<const char*>(from.send) + from.x.send_offsets[p],
                      static_cast<size_t>(n));
        }
      for (int32_t r = 0; r < g.size; ++r) {
        const Part& me = *s.parts[r];
        if (me.x.send_bytes[r] > 0)
          std::memmove(static_cast<char*>(me.recv) + me.x.recv_offsets[r],
                       static_cast<const char*>(me.send) + me.x.send_offsets[r],
                       static_cast<size_t>(me.x.send_bytes[r]));
      }
      return;
    }
    case Op::Broadcast: {
      all_equal([](const Part& p) { return p.count; }, "the byte count");
      all_equal([](const Part& p) { return p.root; }, "the root");
      for (int32_t r = 0; r < g.size; ++r)
        if (r != first.root && first.count > 0)
          std::memcpy(s.parts[r]->data, s.parts[first.root]->data,
                      static_cast<size_t>(first.count));
      return;
    }
    case Op::Barrier:
      return;
    case Op::Agree:
      s.all_ok = true;
      for (int32_t r = 0; r < g.size; ++r) s.all_ok = s.all_ok && s.parts[r]->ok;
      return;
    case Op::Split: {
      s.children.assign(g.size, {nullptr, -1});
      std::map<int32_t, std::vector<int32_t>> members;  // color -> ranks
      for (int32_t r = 0; r < g.size; ++r)
        if (s.parts[r]->color >= 0) members[s.parts[r]->color].push_back(r);
      for (auto& [color, ranks] : members) {
        std::stable_sort(ranks.begin(), ranks.end(),
                         [&](int32_t a, int32_t b) { return s.parts[a]->key < s.parts[b]->key; });
        auto child = std::make_shared<Group>(static_cast<int32_t>(ranks.size()));
        for (size_t i = 0; i < ranks.size(); ++i)
          s.children[ranks[i]] = {child, static_cast<int32_t>(i)};
      }
      return;
    }
    case Op::Create:
      return;
  }
}

class InProcessRequest final : public CommRequest {
 public:
  InProcessRequest(std::shared_ptr<Group> g, uint64_t seq, int32_t rank, double timeout, Op op)
      : g_(std::move(g)), seq_(seq), rank_(rank), timeout_(timeout), op_(op) {}
  ~InProcessRequest() override {
    try {
      wait();
    } catch (...) {
    }
  }

  void wait() override { collect(true); }
  bool test() override { return collect(false); }

  // The slot's results, after a successful wait (split, agree).
  const Slot& slot() const { return result_; }

 private:
  std::string name() const { return cat(comm::op_name(op_), " #", seq_); }

  bool collect(bool block) {
    if (collected_) {
      if (!error_.empty()) throw Error(Code::Comm, error_);
      return true;
    }
    std::unique_lock<std::mutex> lock(g_->mu);
    Slot& s = g_->slots[seq_];
    auto ready = [&] { return s.done || g_->broken; };
    if (!ready()) {
      if (!block) return false;
      const bool in_time = g_->cv.wait_for(lock, std::chrono::duration<double>(timeout_), ready);
      if (!in_time) {
        g_->mark_broken(cat(name(), " timed out after ", timeout_, " s on rank ", rank_));
        finish(s, cat(label(rank_, g_->size), ": ", name(), " did not complete within ", timeout_,
                      " s (timeout; a peer may be dead or stuck); the communicator is "
                      "broken"));
        throw Error(Code::Comm, error_);
      }
    }
    if (s.done && !s.failed) {
      result_ = s;
      finish(s, "");
      return true;
    }
    finish(s, s.done ? s.error
                     : cat(label(rank_, g_->size), " is broken (", g_->reason, "); ", name(),
                           " did not complete"));
    throw Error(Code::Comm, error_);
  }

  void finish(Slot& s, std::string error) {  // under the lock
    collected_ = true;
    error_ = std::move(error);
    if (++s.collected == g_->size) g_->slots.erase(seq_);
  }

  std::shared_ptr<Group> g_;
  const uint64_t seq_;
  const int32_t rank_;
  const double timeout_;
  const Op op_;
  bool collected_ = false;
  std::string error_;
  Slot result_;
};

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> g, int32_t rank, double timeout, CommMemory memory,
                        int32_t device)
      : g_(std::move(g)), rank_(rank), timeout_(timeout), memory_(memory), device_(device) {}

  const char* kind() const override { return "in-process"; }
  int32_t rank() const override { return rank_; }
  int32_t size() const override { return g_->size; }
  CommMemory memory() const override { return memory_; }
  int32_t device() const override { return device_; }
  void set_timeout(double seconds) override {
    comm::check_timeout(seconds);
    timeout_ = seconds;
  }
  double timeout() const override { return timeout_; }
  bool broken() const override {
    std::lock_guard<std::mutex> lock(g_->mu);
    return g_->broken;
  }
  std::string broken_reason() const override {
    std::lock_guard<std::mutex> lock(g_->mu);
    return g_->reason;
  }

  Request start_all_reduce_sum(void* data, int64_t count, ReduceType type) override {
    return arrive(Op::AllReduceSum, [&](Part& p) {
      comm::check_all_reduce(data, count, type);
      p.data = data;
      p.count = count;
      p.type = type;
    });
  }
  Request start_all_to_all_v(const void* send, const int64_t* send_bytes,
                             const int64_t* send_offsets, void* recv, const int64_t* recv_bytes,
                             const int64_t* recv_offsets) override {
    return arrive(Op::AllToAllV, [&](Part& p) {
      p.x = comm::check_all_to_all_v(size(), send, send_bytes, send_offsets, recv, recv_bytes,
                                     recv_offsets);
      p.send = send;
      p.recv = recv;
    });
  }
  Request start_all_gather(const void* send, int64_t bytes, void* recv) override {
    return arrive(Op::AllGather, [&](Part& p) {
      comm::check_all_gather(size(), send, bytes, recv);
      p.x.send_bytes.assign(size(), bytes);
      p.x.send_offsets.assign(size(), 0);
      p.x.recv_bytes.assign(size(), bytes);
      for (int32_t r = 0; r < size(); ++r) p.x.recv_offsets.push_back(r * bytes);
      p.send = send;
      p.recv = recv;
      p.count = bytes;
    });
  }
  Request start_all_gather_v(const void* send, int64_t send_bytes, void* recv,
                             const int64_t* recv_bytes, const int64_t* recv_offsets) override {
    return arrive(Op::AllGatherV, [&](Part& p) {
      p.x = comm::check_all_gather_v(size(), rank(), send, send_bytes, recv, recv_bytes,
                                     recv_offsets);
      p.send = send;
      p.recv = recv;
    });
  }
  Request start_broadcast(void* data, int64_t bytes, int32_t root) override {
    return arrive(Op::Broadcast, [&](Part& p) {
      comm::check_broadcast(size(), data, bytes, root);
      p.data = data;
      p.count = bytes;
      p.root = root;
    });
  }
  Request start_barrier() override {
    return arrive(Op::Barrier, [](Part&) {});
  }
  bool agree(bool ok) override {
    auto r = arrive(Op::Agree, [&](Part& p) { p.ok = ok; });
    r->wait();
    return static_cast<InProcessRequest&>(*r).slot().all_ok;
  }
  std::unique_ptr<Communicator> split(int32_t color, int32_t key) override {
    auto r = arrive(Op::Split, [&](Part& p) {
      p.color = color;
      p.key = key;
    });
    r->wait();
    const auto& child = static_cast<InProcessRequest&>(*r).slot().children[rank_];
    if (!child.first) return nullptr;
    return std::make_unique<InProcessCommunicator>(child.first, child.second, timeout_, memory_,
                                                   device_);
  }

 private:
  template <typename Fill>
  Request arrive(Op op, Fill&& fill) {
    Part part;
    part.op = op;
    std::unique_lock<std::mutex> lock(g_->mu);
    if (g_->broken)
      fail(Code::Comm, label(rank_, g_->size), " is broken (", g_->reason, "); ", comm::op_name(op),
           " refused");
    try {
      fill(part);
    } catch (const Error& e) {
      g_->mark_broken(
          cat("rank ", rank_, " passed bad arguments to ", comm::op_name(op), ": ", e.what()));
      throw;
    }
    const uint64_t seq = next_seq_++;
    Slot& s = g_->slots[seq];
    s.parts.resize(g_->size);
    s.parts[rank_] = std::move(part);
    if (++s.arrived == g_->size) {
      const std::string name = cat(comm::op_name(s.parts[0]->op), " #", seq);
      try {
        execute(*g_, s, name);
      } catch (const Error& e) {
        s.failed = true;
        s.error = e.what();
        g_->mark_broken(s.error);
      }
      s.done = true;
      g_->cv.notify_all();
    }
    return std::make_unique<InProcessRequest>(g_, seq, rank_, timeout_, op);
  }

  std::shared_ptr<Group> g_;
  const int32_t rank_;
  double timeout_;
  const CommMemory memory_;
  const int32_t device_;
  uint64_t next_seq_ = 0;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_inprocess_communicators(int32_t size,
                                                                        double timeout,
                                                                        CommMemory memory,
                                                                        int32_t device) {
  if (size < 1) fail(Code::InvalidArgument, "an in-process group needs size >= 1, got ", size);
  comm::check_timeout(timeout);
  auto g = std::make_shared<Group>(size);
  std::vector<std::unique_ptr<Communicator>> ranks;
  for (int32_t r = 0; r < size; ++r)
    ranks.push_back(std::make_unique<InProcessCommunicator>(g, r, timeout, memory, device));
  return ranks;
}

}  // namespace moert::testing
