// What every Communicator implementation shares: the checks of each operation's arguments, the
// broken state with its messages, and the timeout. Linked into libmoert, the plugins and the
// in-process test communicator (static library moert_comm_support), so that every
// implementation refuses the same arguments with the same words.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "core/communicator.h"
#include "core/error.h"

namespace moert::comm {

// The operations, for messages.
enum class Op : int32_t {
  AllReduceSum,
  AllToAllV,
  AllGather,
  AllGatherV,
  Broadcast,
  Barrier,
  Agree,
  Split,
  Create,
};
const char* op_name(Op op);

// "MPI communicator (rank 1 of 4)".
std::string label(const char* kind, int32_t rank, int32_t size);

// Seconds since `since`, for messages.
double seconds_since(std::chrono::steady_clock::time_point since);

// The longest timeout a communicator takes: a year.
inline constexpr double kMaxCommTimeoutSeconds = 365.0 * 86400.0;
// Throws InvalidArgument unless 0 < seconds <= kMaxCommTimeoutSeconds.
void check_timeout(double seconds);

// Argument checks, run by start_* before anything is queued. Each throws InvalidArgument naming
// the operation and the argument at fault. The vectors they return are the caller's arrays,
// copied.
void check_all_reduce(const void* data, int64_t count, ReduceType type);
struct Exchange {
  std::vector<int64_t> send_bytes, send_offsets, recv_bytes, recv_offsets;
  int64_t send_total = 0, recv_total = 0;  // the extent of each buffer that the exchange touches
};
Exchange check_all_to_all_v(int32_t size, const void* send, const int64_t* send_bytes,
                            const int64_t* send_offsets, const void* recv,
                            const int64_t* recv_bytes, const int64_t* recv_offsets);
void check_all_gather(int32_t size, const void* send, int64_t bytes, const void* recv);
Exchange check_all_gather_v(int32_t size, int32_t rank, const void* send, int64_t send_bytes,
                            const void* recv, const int64_t* recv_bytes,
                            const int64_t* recv_offsets);
void check_broadcast(int32_t size, const void* data, int64_t bytes, int32_t root);

// Contiguous segment of `count` elements that rank r reduces in the rank-ordered all-reduce:
// the first count % size ranks take one element more.
struct Segment {
  int64_t begin = 0, count = 0;
};
Segment reduce_segment(int64_t count, int32_t size, int32_t r);

// acc[i] += x[i] for n elements of `type`: the step of the rank-ordered sum.
void add_in_place(void* acc, const void* x, int64_t n, ReduceType type);

// A communicator's health: once broken, it stays broken, with the first reason. Thread-safe.
class Health {
 public:
  Health(std::string label, double timeout) : label_(std::move(label)), timeout_(timeout) {}

  const std::string& label() const { return label_; }
  double timeout() const;
  void set_timeout(double seconds);

  bool broken() const;
  std::string reason() const;
  // Records the first reason; returns whether this call broke it.
  bool mark_broken(const std::string& reason);
  // Throws Error(Comm) when broken: "<label> is broken (<reason>); <op> refused".
  void check(Op op) const;

 private:
  const std::string label_;
  mutable std::mutex mu_;
  double timeout_;
  std::string reason_;
  bool broken_ = false;
};

}  // namespace moert::comm
