#include "comm/mpi/operations.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <new>

namespace moert::mpi {
namespace {

Staging staging(int64_t bytes) { return Staging::take(bytes); }

uint64_t mix(uint64_t x) {  // splitmix64's finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The first phase of every operation: one MPI_Iallreduce of the same kWords 64-bit words with
// the same reduction on every rank, whatever the operation. Ranks that called different
// operations, or passed arguments that do not fit together, meet in that one collective and all
// fail the operation. Collectives of different shapes would instead meet inside Open MPI's
// libnbc, which reports the truncation to MPI_COMM_WORLD's error handler -- by default one that
// aborts the process, whatever moert's own communicator says.
//
// The words: kPairs pairs (v, -v), whose maxima over ranks are equal exactly when every rank put
// the same v there: the operation's kind, its sequence number on the communicator and up to two
// arguments; then the maximum of a flag (agree: 1 where a rank was not ok); last, a wrapping sum
// (all-to-all-v's size signature).
constexpr int kPairs = 4;
constexpr int kFlagWord = 2 * kPairs, kSumWord = kFlagWord + 1, kWords = kSumWord + 1;

// Reduces `*len` whole agreement blocks: the operation is posted on one element of the block
// datatype below, so MPI never hands over part of a block (a buffer of plain int64s it may split
// anywhere -- ring and Rabenseifner all-reduces do -- which would shift the words' roles).
void combine_agreement(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const int64_t*>(in);
  auto* b = static_cast<int64_t*>(inout);
  for (int block = 0; block < *len; ++block, a += kWords, b += kWords)
    for (int i = 0; i < kWords; ++i)
      b[i] = i == kSumWord
                 ? static_cast<int64_t>(static_cast<uint64_t>(a[i]) + static_cast<uint64_t>(b[i]))
                 : std::max(a[i], b[i]);
}

// The block's datatype and its reduction, created once, on the engine thread (the only one that
// makes moert's MPI calls); MPI_Finalize frees them.
struct AgreementType {
  MPI_Datatype block = MPI_DATATYPE_NULL;
  MPI_Op op = MPI_OP_NULL;
};
const AgreementType& agreement_type() {
  static const AgreementType t = [] {
    AgreementType made;
    check_mpi(MPI_Type_contiguous(kWords, MPI_INT64_T, &made.block), "MPI_Type_contiguous");
    check_mpi(MPI_Type_commit(&made.block), "MPI_Type_commit");
    check_mpi(MPI_Op_create(&combine_agreement, 1, &made.op), "MPI_Op_create");
    return made;
  }();
  return t;
}

class Agreement {
 public:
  // A value every rank must pass equal (>= 0), with its name for the message; `show` says
  // whether its range is worth printing (not for hashes).
  struct Value {
    int64_t v;
    const char* name;
    bool show;
  };
  explicit Agreement(std::vector<Value> values = {}, uint64_t zero_sum = 0, bool flag = false)
      : values_(std::move(values)) {
    if (values_.size() > kPairs - 2) fail(Code::Internal, "an agreement of too many values");
    for (size_t i = 0; i < values_.size(); ++i) set_pair(2 + static_cast<int>(i), values_[i].v);
    in_[kFlagWord] = flag ? 1 : 0;
    in_[kSumWord] = static_cast<int64_t>(zero_sum);
  }

  void post(const Operation& op, const CommState& c, Posted& out) {
    set_pair(0, static_cast<int64_t>(op.op()));
    set_pair(1, static_cast<int64_t>(op.seq()));
    MPI_Request r = MPI_REQUEST_NULL;
    const AgreementType& t = agreement_type();
    check_mpi(MPI_Iallreduce(in_.data(), out_.data(), 1, t.block, t.op, c.data, &r),
              "MPI_Iallreduce");
    out.add(r, -1);
  }

  // Throws Error(Comm) on every rank when the ranks' operations or arguments do not fit.
  void check(const Operation& op) const {
    if (!equal(0))
      fail(Code::Comm, op.name(), ": the ranks called different operations here (",
           comm::op_name(static_cast<comm::Op>(-out_[1])), " to ",
           comm::op_name(static_cast<comm::Op>(out_[0])),
           "); every rank fails it and the communicator is broken");
    if (!equal(1))
      fail(Code::Comm, op.name(), ": the ranks are at different operations of the communicator (#",
           -out_[3], " to #", out_[2], "): a rank skipped a collective or made an extra one");
    for (size_t i = 0; i < values_.size(); ++i) {
      const int w = 2 + static_cast<int>(i);
      if (equal(w)) continue;
      if (values_[i].show)
        fail(Code::Comm, op.name(), ": the ranks disagree on ", values_[i].name, " (from ",
             -out_[2 * w + 1], " to ", out_[2 * w], "; this rank passed ", values_[i].v,
             "); every rank fails it");
      fail(Code::Comm, op.name(), ": the ranks disagree on ", values_[i].name,
           "; every rank fails it");
    }
    if (out_[kSumWord] != 0)
      fail(Code::Comm, op.name(),
           ": the ranks' sizes do not match (what a rank sends to a peer differs from what "
           "that peer expects); every rank fails it");
  }

  // Whether any rank set the flag.
  bool any_flag() const { return out_[kFlagWord] != 0; }

  // Before post(): this rank could not prepare the operation (its staging buffers). The flag
  // carries rank + 1, so that the others learn the highest such rank.
  void mark_failed(int32_t rank) { in_[kFlagWord] = static_cast<int64_t>(rank) + 1; }
  // After check(): throws AgreedFailure on every rank when any rank marked itself failed.
  void check_prepared(const Operation& op, int32_t rank, int64_t bytes) const {
    if (out_[kFlagWord] == 0) return;
    const int64_t failed = out_[kFlagWord] - 1;
    // A rank that failed itself says so, even where a higher rank failed too.
    if (in_[kFlagWord] == static_cast<int64_t>(rank) + 1)
      throw AgreedFailure(Code::OutOfMemory,
                          cat(op.name(), " on rank ", rank, ": out of memory for its ", bytes,
                              " bytes of staging buffers; every rank fails it, and the "
                              "communicator stays usable"));
    throw AgreedFailure(Code::OutOfMemory,
                        cat(op.name(), ": rank ", failed,
                            " ran out of memory for its staging buffers; every rank fails it, "
                            "and the communicator stays usable"));
  }

 private:
  void set_pair(int i, int64_t v) {
    in_[2 * i] = v;
    in_[2 * i + 1] = -v;
  }
  bool equal(int i) const { return out_[2 * i] == -out_[2 * i + 1]; }

  std::vector<Value> values_;
  std::array<int64_t, kWords> in_{}, out_{};
};

// Rank-ordered all-reduce: reduce-scatter by point-to-point messages (rank r sums segment r of
// every rank's data, in rank order), then all-gather of the segments.
class AllReduce final : public Operation {
 public:
  AllReduce(uint64_t seq, void* data, int64_t count, ReduceType type)
      : Operation(comm::Op::AllReduceSum, seq),
        data_(static_cast<char*>(data)),
        count_(count),
        type_(type),
        esize_(static_cast<int64_t>(reduce_type_size(type))),
        agreement_({{count, "the element count", true},
                    {static_cast<int64_t>(type), "the element type", true}}) {}

  bool advance(CommState& c, Posted& out) override {
    switch (step_++) {
      case 0: {
        // Staged before the agreement: a rank that cannot says so there, and every rank fails
        // the operation before any data moves.
        const comm::Segment mine = comm::reduce_segment(count_, c.size, c.rank);
        staged_ = count_ * esize_ + mine.count * esize_ * c.size;
        try {
          stage_ = staging(count_ * esize_);
          slots_ = staging(mine.count * esize_ * c.size);
        } catch (const std::bad_alloc&) {
          agreement_.mark_failed(c.rank);
        }
        agreement_.post(*this, c, out);
        return true;
      }
      case 1: {
        agreement_.check(*this);
        agreement_.check_prepared(*this, c.rank, staged_);
        const comm::Segment mine = comm::reduce_segment(count_, c.size, c.rank);
        if (count_ > 0) std::memcpy(stage_.get(), data_, static_cast<size_t>(count_ * esize_));
        const int tag = c.tag(seq(), 1);
        for (int32_t p = 0; p < c.size; ++p) {
          if (p == c.rank) continue;
          c.post_recv(slot(p, mine), mine.count * esize_, p, tag, out);
        }
        for (int32_t p = 0; p < c.size; ++p) {
          if (p == c.rank) continue;
          const comm::Segment s = comm::reduce_segment(count_, c.size, p);
          c.post_send(stage_.get() + s.begin * esize_, s.count * esize_, p, tag, out);
        }
        return true;
      }
      case 2: {
        const comm::Segment mine = comm::reduce_segment(count_, c.size, c.rank);
        char* own = stage_.get() + mine.begin * esize_;
        if (mine.count > 0) {
          // Slot `rank` is this rank's own segment, still in the staging copy of the input.
          std::memcpy(slot(c.rank, mine), own, static_cast<size_t>(mine.count * esize_));
          for (int32_t p = 1; p < c.size; ++p)
            comm::add_in_place(slot(0, mine), slot(p, mine), mine.count, type_);
          std::memcpy(own, slot(0, mine), static_cast<size_t>(mine.count * esize_));
        }
        slots_.reset();
        const int tag = c.tag(seq(), 2);
        for (int32_t p = 0; p < c.size; ++p) {
          if (p == c.rank) continue;
          const comm::Segment s = comm::reduce_segment(count_, c.size, p);
          c.post_recv(stage_.get() + s.begin * esize_, s.count * esize_, p, tag, out);
        }
        for (int32_t p = 0; p < c.size; ++p) {
          if (p == c.rank) continue;
          c.post_send(own, mine.count * esize_, p, tag, out);
        }
        return true;
      }
      default:
        if (count_ > 0) std::memcpy(data_, stage_.get(), static_cast<size_t>(count_ * esize_));
        stage_.reset();
        return false;
    }
  }

 private:
  char* slot(int32_t p, const comm::Segment& mine) {
    return slots_.get() + static_cast<int64_t>(p) * mine.count * esize_;
  }

  char* const data_;
  const int64_t count_;
  const ReduceType type_;
  const int64_t esize_;
  Agreement agreement_;
  Staging stage_, slots_;
  int64_t staged_ = 0;
  int step_ = 0;
};

// All-to-all-v, all-gather and all-gather-v: every rank sends a block to every peer.
class Exchange final : public Operation {
 public:
  // `same_block`: every peer gets the same send block (the gathers): staged once.
  Exchange(comm::Op op, uint64_t seq, const void* send, void* recv, comm::Exchange x,
           bool same_block, Agreement agreement)
      : Operation(op, seq),
        send_(static_cast<const char*>(send)),
        recv_(static_cast<char*>(recv)),
        x_(std::move(x)),
        same_block_(same_block),
        agreement_(std::move(agreement)) {}

  bool advance(CommState& c, Posted& out) override {
    switch (step_++) {
      case 0: {
        // Staged before the agreement (see AllReduce).
        int64_t recv = 0, send = 0;
        for (int32_t p = 0; p < c.size; ++p)
          if (p != c.rank) {
            recv += x_.recv_bytes[p];
            send += x_.send_bytes[p];
          }
        if (same_block_) send = c.size > 1 ? x_.send_bytes[c.rank] : 0;
        staged_ = recv + send;
        try {
          recv_stage_ = staging(recv);
          send_stage_ = staging(send);
        } catch (const std::bad_alloc&) {
          agreement_.mark_failed(c.rank);
        }
        agreement_.post(*this, c, out);
        return true;
      }
      case 1: {
        agreement_.check(*this);
        agreement_.check_prepared(*this, c.rank, staged_);
        const int tag = c.tag(seq(), 1);
        // Receives first, packed in peer order.
        int64_t at = 0;
        for (int32_t p = 0; p < c.size; ++p) {
          if (p == c.rank) continue;
          c.post_recv(recv_stage_.get() + at, x_.recv_bytes[p], p, tag, out);
          at += x_.recv_bytes[p];
        }
        if (same_block_) {
          const int64_t n = x_.send_bytes[c.rank];
          if (c.size > 1 && n > 0) std::memcpy(send_stage_.get(), send_, static_cast<size_t>(n));
          for (int32_t p = 0; p < c.size; ++p)
            if (p != c.rank) c.post_send(send_stage_.get(), n, p, tag, out);
          return true;
        }
        at = 0;
        for (int32_t p = 0; p < c.size; ++p) {
          if (p == c.rank || x_.send_bytes[p] == 0) continue;
          std::memcpy(send_stage_.get() + at, send_ + x_.send_offsets[p],
                      static_cast<size_t>(x_.send_bytes[p]));
          c.post_send(send_stage_.get() + at, x_.send_bytes[p], p, tag, out);
          at += x_.send_bytes[p];
        }
        return true;
      }
      default: {
        int64_t at = 0;
        for (int32_t p = 0; p < c.size; ++p) {
          const int64_t n = x_.recv_bytes[p];
          if (n == 0) continue;
          if (p == c.rank) {
            // The own block: straight from the caller's send buffer (memmove: in place is allowed).
            const char* src = send_ + (same_block_ ? 0 : x_.send_offsets[p]);
            std::memmove(recv_ + x_.recv_offsets[p], src, static_cast<size_t>(n));
            continue;
          }
          std::memcpy(recv_ + x_.recv_offsets[p], recv_stage_.get() + at, static_cast<size_t>(n));
          at += n;
        }
        send_stage_.reset();
        recv_stage_.reset();
        return false;
      }
    }
  }

 private:
  const char* const send_;
  char* const recv_;
  const comm::Exchange x_;
  const bool same_block_;
  Agreement agreement_;
  Staging send_stage_, recv_stage_;
  int64_t staged_ = 0;
  int step_ = 0;
};

// Broadcast down a binomial tree rooted at `root`, by point-to-point messages.
class Broadcast final : public Operation {
 public:
  Broadcast(uint64_t seq, void* data, int64_t bytes, int32_t root)
      : Operation(comm::Op::Broadcast, seq),
        data_(static_cast<char*>(data)),
        bytes_(bytes),
        root_(root),
        agreement_({{bytes, "the byte count", true}, {root, "the root", true}}) {}

  bool advance(CommState& c, Posted& out) override {
    const int32_t rel = (c.rank - root_ + c.size) % c.size;
    switch (step_++) {
      case 0:
        // Staged before the agreement (see AllReduce).
        try {
          stage_ = staging(c.size > 1 ? bytes_ : 0);
        } catch (const std::bad_alloc&) {
          agreement_.mark_failed(c.rank);
        }
        agreement_.post(*this, c, out);
        return true;
      case 1:
        agreement_.check(*this);
        agreement_.check_prepared(*this, c.rank, c.size > 1 ? bytes_ : 0);
        if (c.size == 1) return true;
        if (rel == 0) {
          if (bytes_ > 0) std::memcpy(stage_.get(), data_, static_cast<size_t>(bytes_));
        } else {
          const int32_t parent = ((rel & (rel - 1)) + root_) % c.size;
          c.post_recv(stage_.get(), bytes_, parent, c.tag(seq(), 1), out);
        }
        return true;
      case 2: {
        // Children: rel + m for each power of two m below rel's lowest set bit (below the
        // size's next power of two for the root).
        int32_t limit = 1;
        if (rel == 0) {
          while (limit < c.size) limit *= 2;
        } else {
          limit = rel & -rel;
        }
        for (int32_t m = limit / 2; m >= 1; m /= 2)
          if (rel + m < c.size)
            c.post_send(stage_.get(), bytes_, (rel + m + root_) % c.size, c.tag(seq(), 1), out);
        return true;
      }
      default:
        if (rel != 0 && bytes_ > 0) std::memcpy(data_, stage_.get(), static_cast<size_t>(bytes_));
        stage_.reset();
        return false;
    }
  }

 private:
  char* const data_;
  const int64_t bytes_;
  const int32_t root_;
  Agreement agreement_;
  Staging stage_;
  int step_ = 0;
};

// The agreement alone (barrier, agree): it completes on a rank only once every rank has posted
// it. `all_ok` (agree) receives whether no rank passed ok = false.
class AgreementOnly final : public Operation {
 public:
  AgreementOnly(comm::Op op, uint64_t seq, bool ok, std::shared_ptr<bool> all_ok)
      : Operation(op, seq), agreement_({}, 0, !ok), all_ok_(std::move(all_ok)) {}
  bool advance(CommState& c, Posted& out) override {
    if (step_++ == 0) {
      agreement_.post(*this, c, out);
      return true;
    }
    agreement_.check(*this);
    if (all_ok_) *all_ok_ = !agreement_.any_flag();
    return false;
  }

 private:
  Agreement agreement_;
  std::shared_ptr<bool> all_ok_;
  int step_ = 0;
};

// Of all-to-all-v: the sum over ranks of what each sends minus what each expects, each pair
// weighted by an odd 64-bit hash, wraps to zero exactly when every pair matches (a single
// mismatch d gives d * odd != 0 mod 2^64; several cancel with probability about 2^-64).
uint64_t exchange_signature(const comm::Exchange& x, int32_t rank, int32_t size) {
  uint64_t sig = 0;
  for (int32_t p = 0; p < size; ++p) {
    const uint64_t to = mix((static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(p)) | 1;
    const uint64_t from = mix((static_cast<uint64_t>(p) << 32) | static_cast<uint32_t>(rank)) | 1;
    sig += to * static_cast<uint64_t>(x.send_bytes[p]);
    sig -= from * static_cast<uint64_t>(x.recv_bytes[p]);
  }
  return sig;
}

int64_t hash_sizes(const std::vector<int64_t>& v) {
  uint64_t h = 0x5851F42D4C957F2Dull;
  for (const int64_t x : v) h = mix(h ^ static_cast<uint64_t>(x));
  return static_cast<int64_t>(h >> 2);  // >= 0: negated in the agreement
}

}  // namespace

std::shared_ptr<Operation> make_all_reduce(uint64_t seq, void* data, int64_t count,
                                           ReduceType type) {
  return std::make_shared<AllReduce>(seq, data, count, type);
}

std::shared_ptr<Operation> make_all_to_all_v(uint64_t seq, const void* send, void* recv,
                                             comm::Exchange exchange, int32_t rank, int32_t size) {
  const uint64_t sig = exchange_signature(exchange, rank, size);
  return std::make_shared<Exchange>(comm::Op::AllToAllV, seq, send, recv, std::move(exchange),
                                    false, Agreement({}, sig));
}

std::shared_ptr<Operation> make_all_gather(uint64_t seq, const void* send, int64_t bytes,
                                           void* recv, int32_t size) {
  comm::Exchange x;
  x.send_bytes.assign(size, bytes);
  x.send_offsets.assign(size, 0);
  x.recv_bytes.assign(size, bytes);
  for (int32_t p = 0; p < size; ++p) x.recv_offsets.push_back(p * bytes);
  return std::make_shared<Exchange>(comm::Op::AllGather, seq, send, recv, std::move(x), true,
                                    Agreement({{bytes, "the block size", true}}));
}

std::shared_ptr<Operation> make_all_gather_v(uint64_t seq, const void* send, void* recv,
                                             comm::Exchange exchange) {
  const int64_t h = hash_sizes(exchange.recv_bytes);
  return std::make_shared<Exchange>(comm::Op::AllGatherV, seq, send, recv, std::move(exchange),
                                    true, Agreement({{h, "recv_bytes", false}}));
}

std::shared_ptr<Operation> make_broadcast(uint64_t seq, void* data, int64_t bytes, int32_t root) {
  return std::make_shared<Broadcast>(seq, data, bytes, root);
}

std::shared_ptr<Operation> make_barrier(uint64_t seq) {
  return std::make_shared<AgreementOnly>(comm::Op::Barrier, seq, true, nullptr);
}

std::shared_ptr<Operation> make_agree(uint64_t seq, bool ok, std::shared_ptr<bool> all_ok) {
  return std::make_shared<AgreementOnly>(comm::Op::Agree, seq, ok, std::move(all_ok));
}

}  // namespace moert::mpi
