#include "tests/comm/collective_cases.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace moert::testing {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Inputs whose sums round differently in different orders: mixed signs and magnitudes.
template <typename T>
T value(int32_t rank, int64_t i) {
  const uint64_t h = mix((static_cast<uint64_t>(rank) << 40) ^ static_cast<uint64_t>(i));
  if constexpr (std::is_same_v<T, int64_t>) {
    return static_cast<int64_t>(h >> 3) * ((h & 1) ? -1 : 1);
  } else {
    const T m = static_cast<T>(1.0 + static_cast<double>(h % 100003) / 100003.0);
    return std::ldexp(m, static_cast<int>((h >> 20) % 40) - 20) * ((h & 1) ? T(-1) : T(1));
  }
}

// The rank-ordered sum the contract promises, computed locally from every rank's inputs.
template <typename T>
T ordered_sum(int32_t size, int64_t i) {
  T acc = value<T>(0, i);
  for (int32_t r = 1; r < size; ++r) {
    if constexpr (std::is_same_v<T, int64_t>) {
      acc =
          static_cast<int64_t>(static_cast<uint64_t>(acc) + static_cast<uint64_t>(value<T>(r, i)));
    } else {
      acc += value<T>(r, i);
    }
  }
  return acc;
}

template <typename T>
void check_all_reduce(Communicator& c, int64_t count, ReduceType type) {
  std::vector<T> data(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) data[i] = value<T>(c.rank(), i);
  c.all_reduce_sum(data.data(), count, type);
  int64_t wrong = 0;
  for (int64_t i = 0; i < count; ++i) {
    const T want = ordered_sum<T>(c.size(), i);
    if (std::memcmp(&data[i], &want, sizeof(T)) != 0 && wrong++ < 3)
      ADD_FAILURE() << reduce_type_name(type) << " all-reduce of " << count << " on rank "
                    << c.rank() << ": element " << i << " is " << data[i] << ", want " << want;
  }
  EXPECT_EQ(wrong, 0) << "bitwise mismatches, count " << count;
}

// The byte a rank `src` sends to `dst` at position `i` of its block: cheap (the large cases touch
// many megabytes, under the sanitizers too) and different for every pair and every 256-byte run.
uint8_t pattern(int32_t src, int32_t dst, int64_t i) {
  return static_cast<uint8_t>(src * 131 + dst * 37 + i * 7 + (i >> 8) * 13 + 1);
}

constexpr uint8_t kSentinel = 0xA5;

// An all-to-all-v of bytes(src, dst) bytes from every src to every dst, with send blocks in
// reverse peer order and gaps between receive blocks that must stay untouched.
struct AllToAll {
  std::vector<int64_t> send_bytes, send_offsets, recv_bytes, recv_offsets;
  std::vector<uint8_t> send, recv;

  AllToAll(const Communicator& c, const std::function<int64_t(int32_t, int32_t)>& bytes) {
    const int32_t n = c.size(), me = c.rank();
    send_bytes.resize(n);
    send_offsets.resize(n);
    recv_bytes.resize(n);
    recv_offsets.resize(n);
    int64_t at = 0;
    for (int32_t p = n - 1; p >= 0; --p) {
      send_bytes[p] = bytes(me, p);
      send_offsets[p] = at;
      at += send_bytes[p] + 3;
    }
    send.assign(static_cast<size_t>(at), 0);
    for (int32_t p = 0; p < n; ++p)
      for (int64_t i = 0; i < send_bytes[p]; ++i) send[send_offsets[p] + i] = pattern(me, p, i);
    at = 5;
    for (int32_t p = 0; p < n; ++p) {
      recv_bytes[p] = bytes(p, me);
      recv_offsets[p] = at;
      at += recv_bytes[p] + 7;
    }
    recv.assign(static_cast<size_t>(at), kSentinel);
  }

  Request start(Communicator& c) {
    return c.start_all_to_all_v(send.data(), send_bytes.data(), send_offsets.data(), recv.data(),
                                recv_bytes.data(), recv_offsets.data());
  }

  void check(const Communicator& c) const {
    int64_t wrong = 0, gaps = 0;
    for (int32_t p = 0; p < c.size(); ++p) {
      const uint8_t* got = recv.data() + recv_offsets[p];
      for (int64_t i = 0; i < recv_bytes[p]; ++i)
        if (got[i] != pattern(p, c.rank(), i) && wrong++ < 3)
          ADD_FAILURE() << "rank " << c.rank() << ": byte " << i << " from rank " << p
                        << " is wrong";
    }
    // The blocks lie in peer order with gaps of 7 bytes (and 5 before the first).
    int64_t at = 0;
    for (int32_t p = 0; p <= c.size(); ++p) {
      const int64_t end = p < c.size() ? recv_offsets[p] : static_cast<int64_t>(recv.size());
      for (int64_t i = at; i < end; ++i) gaps += recv[i] != kSentinel;
      if (p < c.size()) at = recv_offsets[p] + recv_bytes[p];
    }
    EXPECT_EQ(wrong, 0);
    EXPECT_EQ(gaps, 0) << "bytes outside the receive blocks were written";
  }
};

// Every operation kind on `c`, each expected to throw Error(`code`) at once.
void expect_every_operation_refused(Communicator& c, Code code, const std::string& needle) {
  float f = 1.0f;
  int64_t zero = 0, off = 0;
  std::vector<int64_t> zeros(c.size(), 0);
  std::vector<uint8_t> buf(16 * c.size());
  const std::vector<std::function<void()>> ops = {
      [&] { c.start_all_reduce_sum(&f, 1, ReduceType::F32); },
      [&] {
        c.start_all_to_all_v(buf.data(), zeros.data(), zeros.data(), buf.data(), zeros.data(),
                             zeros.data());
      },
      [&] { c.start_all_gather(buf.data(), 0, buf.data()); },
      [&] { c.start_all_gather_v(buf.data(), 0, buf.data(), zeros.data(), zeros.data()); },
      [&] { c.start_broadcast(buf.data(), 1, 0); },
      [&] { c.start_barrier(); },
      [&] { c.agree(true); },
      [&] { c.split(0, 0); },
  };
  (void)zero;
  (void)off;
  for (size_t i = 0; i < ops.size(); ++i) {
    const auto t = Clock::now();
    try {
      ops[i]();
      ADD_FAILURE() << "operation " << i << " on a broken communicator did not throw";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(c.rank())), std::string::npos)
          << e.what();
    }
    EXPECT_LT(since(t), 0.5) << "operation " << i << " did not fail at once";
  }
  EXPECT_TRUE(c.broken());
}

// Runs `body` on a split of `c` that it may break, then meets the other ranks again on `c`.
void on_child(Communicator& c, double timeout, const std::function<void(Communicator&)>& body) {
  auto child = c.split(0, c.rank());
  ASSERT_TRUE(child);
  child->set_timeout(timeout);
  body(*child);
  child.reset();
  c.barrier();
}

// `also`: a second text the message must hold.
void expect_comm_error(const std::function<void()>& fn, const std::string& needle, double within,
                       Code code = Code::Comm, const std::string& also = "") {
  const auto t = Clock::now();
  try {
    fn();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(also), std::string::npos) << e.what();
  }
  EXPECT_LT(since(t), within);
}

std::vector<CollectiveCase> make_cases() {
  std::vector<CollectiveCase> cases;
  auto add = [&](std::string name, int32_t min_size, bool moves_data,
                 std::function<void(Communicator&)> run) {
    cases.push_back({std::move(name), min_size, moves_data, false, false, std::move(run)});
  };

  add("AllReduceSumFloat32", 1, true, [](Communicator& c) {
    for (int64_t n : {0, 1, 3, 7, 1000, 1001}) check_all_reduce<float>(c, n, ReduceType::F32);
  });
  add("AllReduceSumFloat64", 1, true, [](Communicator& c) {
    for (int64_t n : {0, 1, 5, 999}) check_all_reduce<double>(c, n, ReduceType::F64);
  });
  add("AllReduceSumInt64", 1, true, [](Communicator& c) {
    for (int64_t n : {0, 2, 513}) check_all_reduce<int64_t>(c, n, ReduceType::I64);
  });
  add("AllReduceLarge", 1, false, [](Communicator& c) {
    check_all_reduce<float>(c, (int64_t{1} << 21) + 3, ReduceType::F32);  // 8 MiB
  });

  add("AllToAllVariableCountsWithZeros", 1, true, [](Communicator& c) {
    // Zeros where (3 src + 5 dst + 1) % 4 == 0, including some rank's block to itself.
    AllToAll a(c, [](int32_t s, int32_t d) { return int64_t{13} * ((3 * s + 5 * d + 1) % 4); });
    a.start(c)->wait();
    a.check(c);
    AllToAll none(c, [](int32_t, int32_t) { return int64_t{0}; });
    none.start(c)->wait();
    none.check(c);
  });
  add("AllToAllLarge", 1, false, [](Communicator& c) {
    AllToAll a(c, [](int32_t s, int32_t d) { return (int64_t{2} << 20) + 17 * s + d; });
    a.start(c)->wait();
    a.check(c);
  });

  add("AllGather", 1, true, [](Communicator& c) {
    for (int64_t n : {0, 1, 37, 1 << 20}) {
      std::vector<uint8_t> send(n), recv(n * c.size(), kSentinel);
      for (int64_t i = 0; i < n; ++i) send[i] = pattern(c.rank(), 0, i);
      c.all_gather(send.data(), n, recv.data());
      int64_t wrong = 0;
      for (int32_t p = 0; p < c.size(); ++p)
        for (int64_t i = 0; i < n; ++i) wrong += recv[p * n + i] != pattern(p, 0, i);
      EXPECT_EQ(wrong, 0) << "block size " << n;
    }
    // In place: the rank's own block of recv is its send block.
    const int64_t n = 29;
    std::vector<uint8_t> recv(n * c.size(), kSentinel);
    for (int64_t i = 0; i < n; ++i) recv[c.rank() * n + i] = pattern(c.rank(), 1, i);
    c.all_gather(recv.data() + c.rank() * n, n, recv.data());
    int64_t wrong = 0;
    for (int32_t p = 0; p < c.size(); ++p)
      for (int64_t i = 0; i < n; ++i) wrong += recv[p * n + i] != pattern(p, 1, i);
    EXPECT_EQ(wrong, 0) << "in place";
  });
  add("AllGatherVariableSizesWithZeros", 1, true, [](Communicator& c) {
    auto size_of = [](int32_t r) { return int64_t{11} * (r % 3); };  // rank 0 sends nothing
    std::vector<int64_t> bytes(c.size()), offsets(c.size());
    int64_t at = 2;
    for (int32_t p = c.size() - 1; p >= 0; --p) {  // blocks in reverse rank order, with gaps
      bytes[p] = size_of(p);
      offsets[p] = at;
      at += bytes[p] + 1;
    }
    std::vector<uint8_t> send(size_of(c.rank())), recv(at, kSentinel);
    for (size_t i = 0; i < send.size(); ++i) send[i] = pattern(c.rank(), 2, i);
    c.all_gather_v(send.data(), size_of(c.rank()), recv.data(), bytes.data(), offsets.data());
    int64_t wrong = 0, written = 0;
    for (int32_t p = 0; p < c.size(); ++p)
      for (int64_t i = 0; i < bytes[p]; ++i) wrong += recv[offsets[p] + i] != pattern(p, 2, i);
    for (uint8_t b : recv) written += b != kSentinel;
    int64_t total = 0;
    for (int64_t b : bytes) total += b;
    EXPECT_EQ(wrong, 0);
    EXPECT_LE(written, total) << "bytes outside the blocks were written";
  });

  add("BroadcastFromEveryRoot", 1, true, [](Communicator& c) {
    for (int32_t root = 0; root < c.size(); ++root)
      for (int64_t n : {0, 13, 300001}) {
        std::vector<uint8_t> data(n, kSentinel);
        if (c.rank() == root)
          for (int64_t i = 0; i < n; ++i) data[i] = pattern(root, 3, i);
        c.broadcast(data.data(), n, root);
        int64_t wrong = 0;
        for (int64_t i = 0; i < n; ++i) wrong += data[i] != pattern(root, 3, i);
        EXPECT_EQ(wrong, 0) << "root " << root << ", " << n << " bytes";
      }
  });

  add("BarrierRepeated", 1, false, [](Communicator& c) {
    for (int i = 0; i < 20; ++i) c.barrier();
  });

  add("AgreeTellsEveryRank", 1, false, [](Communicator& c) {
    EXPECT_TRUE(c.agree(true));
    EXPECT_FALSE(c.agree(c.rank() != c.size() - 1));
    EXPECT_FALSE(c.agree(false));
    EXPECT_TRUE(c.agree(true));
  });

  add("SplitMakesIndependentGroups", 1, false, [](Communicator& c) {
    // Two colours by parity, ranked in reverse (key = -rank).
    auto child = c.split(c.rank() % 2, -c.rank());
    ASSERT_TRUE(child);
    int32_t same = 0, above = 0;
    for (int32_t p = 0; p < c.size(); ++p)
      if (p % 2 == c.rank() % 2) {
        ++same;
        above += p > c.rank();
      }
    EXPECT_EQ(child->size(), same);
    EXPECT_EQ(child->rank(), above);
    EXPECT_EQ(child->timeout(), c.timeout());
    int64_t rank_sum = c.rank();
    child->all_reduce_sum(&rank_sum, 1, ReduceType::I64);
    int64_t want = 0;
    for (int32_t p = c.rank() % 2; p < c.size(); p += 2) want += p;
    EXPECT_EQ(rank_sum, want);
    // A split of the split, and ranks that opt out.
    auto grandchild = child->split(child->rank() == 0 ? -1 : 0, 0);
    EXPECT_EQ(grandchild == nullptr, child->rank() == 0);
    if (grandchild) {
      EXPECT_EQ(grandchild->size(), child->size() - 1);
      grandchild->barrier();
    }
    auto none = c.split(-1, 0);
    EXPECT_EQ(none, nullptr);
    c.barrier();
  });

  add("ManyOperationsInFlight", 1, true, [](Communicator& c) {
    // Started back to back, waited for in reverse: each keeps its own messages.
    AllToAll a(c, [](int32_t s, int32_t d) { return int64_t{100} + s + 2 * d; });
    AllToAll b(c, [](int32_t s, int32_t d) { return int64_t{7} * ((s + d) % 3); });
    std::vector<double> sums(77);
    for (size_t i = 0; i < sums.size(); ++i) sums[i] = value<double>(c.rank(), i);
    std::vector<uint8_t> bc(4099, kSentinel);
    if (c.rank() == c.size() - 1)
      for (size_t i = 0; i < bc.size(); ++i) bc[i] = pattern(c.size() - 1, 4, i);
    std::vector<Request> reqs;
    reqs.push_back(a.start(c));
    reqs.push_back(c.start_all_reduce_sum(sums.data(), 77, ReduceType::F64));
    reqs.push_back(c.start_barrier());
    reqs.push_back(c.start_broadcast(bc.data(), 4099, c.size() - 1));
    reqs.push_back(b.start(c));
    for (auto it = reqs.rbegin(); it != reqs.rend(); ++it) (*it)->wait();
    a.check(c);
    b.check(c);
    for (size_t i = 0; i < sums.size(); ++i) {
      const double want = ordered_sum<double>(c.size(), i);
      EXPECT_EQ(std::memcmp(&sums[i], &want, 8), 0) << i;
    }
    int64_t wrong = 0;
    for (size_t i = 0; i < bc.size(); ++i) wrong += bc[i] != pattern(c.size() - 1, 4, i);
    EXPECT_EQ(wrong, 0);
  });

  add("TransferCompletesWhileCallerComputes", 1, false, [](Communicator& c) {
    // The caller computes and never calls into MPI: test() only reads the request's state. The
    // transfer must still complete, moved by the implementation on its own.
    AllToAll a(c, [](int32_t, int32_t) { return int64_t{1} << 20; });
    c.barrier();
    auto req = a.start(c);
    const auto t = Clock::now();
    volatile double sink = 0;
    bool done = false;
    while (!(done = req->test()) && since(t) < 30.0)
      for (int i = 0; i < 100000; ++i) sink = sink + std::sqrt(static_cast<double>(i));
    EXPECT_TRUE(done) << "the transfer did not complete within 30 s of computing";
    req->wait();
    a.check(c);
  });

  add("TimeoutBreaksTheCommunicator", 2, false, [](Communicator& c) {
    on_child(c, 1.0, [](Communicator& child) {
      if (child.rank() == 0) {
        // Nobody else joins this barrier: it must fail after about the timeout.
        const auto t = Clock::now();
        auto req = child.start_barrier();
        try {
          req->wait();
          ADD_FAILURE() << "a barrier nobody else joined completed";
        } catch (const Error& e) {
          const std::string m = e.what();
          EXPECT_EQ(e.code(), Code::Comm) << m;
          EXPECT_NE(m.find("rank 0"), std::string::npos) << m;
          EXPECT_NE(m.find("barrier"), std::string::npos) << m;
          EXPECT_NE(m.find("within 1 s"), std::string::npos) << m;
        }
        EXPECT_GE(since(t), 0.9);
        EXPECT_LT(since(t), 5.0);
        // test() and wait() repeat the failure.
        EXPECT_THROW(req->test(), Error);
        EXPECT_THROW(req->wait(), Error);
      } else {
        // The others learn of it from rank 0, well before their own timeout would matter.
        const auto t = Clock::now();
        while (!child.broken() && since(t) < 10.0)
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        EXPECT_TRUE(child.broken()) << "rank " << child.rank() << " was not told";
        EXPECT_NE(child.broken_reason().find("timed out"), std::string::npos)
            << child.broken_reason();
      }
      expect_every_operation_refused(child, Code::Comm, "is broken");
    });
  });

  cases.back().tells_peers = true;

  add("MismatchedSizesFailOnEveryRank", 1, false, [](Communicator& c) {
    const int32_t last = c.size() - 1;
    // A rank sends 8 bytes more to rank 0 than rank 0 expects (size 1: to itself).
    on_child(c, 30.0, [&](Communicator& child) {
      AllToAll a(child, [&](int32_t s, int32_t d) {
        return int64_t{16} + ((s == last && d == 0) ? 8 : 0);
      });
      a.recv_bytes.assign(child.size(), 16);  // what every rank expects
      if (child.rank() == 0) a.recv.resize(a.recv.size() + 64, kSentinel);
      // Offsets stay within the buffer: recomputed for the expected sizes.
      int64_t at = 0;
      for (int32_t p = 0; p < child.size(); ++p) {
        a.recv_offsets[p] = at;
        at += 16;
      }
      expect_comm_error([&] { a.start(child)->wait(); }, "every rank fails it", 10.0);
      EXPECT_TRUE(child.broken());
    });
    if (c.size() < 2) return;
    // The last rank reduces one element more.
    on_child(c, 30.0, [&](Communicator& child) {
      std::vector<float> data(11, 1.0f);
      const int64_t n = child.rank() == last ? 11 : 10;
      expect_comm_error([&] { child.all_reduce_sum(data.data(), n, ReduceType::F32); },
                        "disagree on the element count", 10.0);
    });
    // Rank 0 gathers a larger block.
    on_child(c, 30.0, [&](Communicator& child) {
      const int64_t n = child.rank() == 0 ? 9 : 8;
      std::vector<uint8_t> send(9), recv(9 * child.size());
      expect_comm_error([&] { child.all_gather(send.data(), n, recv.data()); },
                        "disagree on the block size", 10.0);
    });
    // Rank 0 broadcasts from another root.
    on_child(c, 30.0, [&](Communicator& child) {
      std::vector<uint8_t> data(5);
      const int32_t root = child.rank() == 0 ? 1 : 0;
      expect_comm_error([&] { child.broadcast(data.data(), 5, root); }, "disagree on the root",
                        10.0);
    });
    // All-gather-v with disagreeing receive sizes.
    on_child(c, 30.0, [&](Communicator& child) {
      std::vector<int64_t> bytes(child.size(), 4), offsets(child.size());
      for (int32_t p = 0; p < child.size(); ++p) offsets[p] = 8 * p;
      if (child.rank() == last) bytes[0] = 5;  // claims rank 0 sends 5
      std::vector<uint8_t> send(4), recv(8 * child.size());
      const int64_t mine = bytes[child.rank()];
      expect_comm_error(
          [&] { child.all_gather_v(send.data(), mine, recv.data(), bytes.data(), offsets.data()); },
          "disagree on recv_bytes", 10.0);
    });
  });

  cases.back().checks_agreement = true;

  // Ranks that call different operations: every rank fails, none hangs. (Over MPI the ranks' first
  // phases then meet in one collective of one shape: Open MPI's libnbc would otherwise report the
  // mismatch to MPI_COMM_WORLD's error handler, which aborts the process.)
  add("DifferentOperationsFailOnEveryRank", 2, false, [](Communicator& c) {
    on_child(c, 30.0, [&](Communicator& child) {
      std::vector<float> data(4, 1.0f);
      // Over MPI the first error, the one an operator reads, names the rank that got it.
      const std::string rank =
          std::string(child.kind()) == "mpi" ? cat("(rank ", child.rank(), " of ") : "";
      if (child.rank() == 0)
        expect_comm_error([&] { child.barrier(); }, "different operations", 10.0, Code::Comm, rank);
      else
        expect_comm_error([&] { child.all_reduce_sum(data.data(), 4, ReduceType::F32); },
                          "different operations", 10.0, Code::Comm, rank);
      EXPECT_TRUE(child.broken());
    });
    on_child(c, 30.0, [&](Communicator& child) {
      std::vector<uint8_t> buf(8 * child.size());
      if (child.rank() == child.size() - 1)
        expect_comm_error([&] { child.broadcast(buf.data(), 8, 0); }, "different operations", 10.0);
      else
        expect_comm_error([&] { child.all_gather(buf.data(), 8, buf.data()); },
                          "different operations", 10.0);
    });
  });

  cases.back().checks_agreement = true;

  add("BadArgumentsFailThePeersPromptly", 1, false, [](Communicator& c) {
    on_child(c, 30.0, [&](Communicator& child) {
      std::vector<float> data(4, 1.0f);
      if (child.rank() == child.size() - 1) {
        // Its own failure breaks its communicator first, which NCCL does with ncclCommAbort:
        // that alone took 1.0005 s with NCCL 2.28.9 (H200, 2026-12-04). Still far inside the
        // 30 s timeout.
        const double within = std::string(child.kind()) == "nccl" ? 5.0 : 1.0;
        expect_comm_error([&] { child.start_all_reduce_sum(data.data(), -4, ReduceType::F32); },
                          "is negative", within, Code::InvalidArgument);
      } else {
        // Told by the bad rank, not by their 30 s timeout.
        expect_comm_error([&] { child.all_reduce_sum(data.data(), 4, ReduceType::F32); },
                          "bad arguments", 10.0);
      }
      expect_every_operation_refused(child, Code::Comm, "is broken");
    });
  });

  cases.back().tells_peers = true;
  return cases;
}

}  // namespace

const std::vector<CollectiveCase>& collective_cases() {
  static const std::vector<CollectiveCase> cases = make_cases();
  return cases;
}

void run_on_rank(Communicator& comm, const std::function<void(Communicator&)>& body) {
  try {
    body(comm);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "rank " << comm.rank() << " of " << comm.size() << ": " << e.what();
  }
}

}  // namespace moert::testing
