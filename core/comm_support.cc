#include "core/comm_support.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <limits>

namespace moert {

size_t reduce_type_size(ReduceType type) {
  switch (type) {
    case ReduceType::F32:
      return 4;
    case ReduceType::F64:
    case ReduceType::I64:
      return 8;
  }
  return 0;
}

const char* reduce_type_name(ReduceType type) {
  switch (type) {
    case ReduceType::F32:
      return "float32";
    case ReduceType::F64:
      return "float64";
    case ReduceType::I64:
      return "int64";
  }
  return "unknown";
}

namespace comm {

const char* op_name(Op op) {
  switch (op) {
    case Op::AllReduceSum:
      return "all-reduce";
    case Op::AllToAllV:
      return "all-to-all-v";
    case Op::AllGather:
      return "all-gather";
    case Op::AllGatherV:
      return "all-gather-v";
    case Op::Broadcast:
      return "broadcast";
    case Op::Barrier:
      return "barrier";
    case Op::Agree:
      return "agree";
    case Op::Split:
      return "split";
    case Op::Create:
      return "creation";
  }
  return "operation";
}

std::string label(const char* kind, int32_t rank, int32_t size) {
  return cat(kind, " communicator (rank ", rank, " of ", size, ")");
}

double seconds_since(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

void check_timeout(double seconds) {
  if (!(seconds > 0.0) || !(seconds <= kMaxCommTimeoutSeconds))
    // 17 digits: a value just past the limit must not print as the limit itself.
    fail(Code::InvalidArgument,
         "a communicator timeout must be > 0 and at most a year (31536000 seconds), got ",
         std::setprecision(17), seconds);
}

namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

void check_type(ReduceType type) {
  if (type != ReduceType::F32 && type != ReduceType::F64 && type != ReduceType::I64)
    fail(Code::InvalidArgument, "all-reduce: element type ", static_cast<int32_t>(type),
         " is not float32, float64 or int64");
}

// Checks one array of per-rank sizes and offsets; returns the extent it spans.
int64_t check_blocks(Op op, const char* bytes_name, const char* offsets_name, int32_t size,
                     const int64_t* bytes, const int64_t* offsets, std::vector<int64_t>& b,
                     std::vector<int64_t>& o) {
  if (!bytes) fail(Code::InvalidArgument, op_name(op), ": ", bytes_name, " is null");
  if (!offsets) fail(Code::InvalidArgument, op_name(op), ": ", offsets_name, " is null");
  b.assign(bytes, bytes + size);
  o.assign(offsets, offsets + size);
  int64_t extent = 0;
  for (int32_t p = 0; p < size; ++p) {
    if (b[p] < 0)
      fail(Code::InvalidArgument, op_name(op), ": ", bytes_name, "[", p, "] = ", b[p],
           " is negative");
    if (o[p] < 0)
      fail(Code::InvalidArgument, op_name(op), ": ", offsets_name, "[", p, "] = ", o[p],
           " is negative");
    if (o[p] > kMax - b[p])
      fail(Code::InvalidArgument, op_name(op), ": ", offsets_name, "[", p, "] + ", bytes_name, "[",
           p, "] overflows");
    if (b[p] > 0 && o[p] + b[p] > extent) extent = o[p] + b[p];
  }
  return extent;
}

// Whether two of the blocks overlap: they would receive into the same bytes.
void check_disjoint(Op op, const char* what, const std::vector<int64_t>& b,
                    const std::vector<int64_t>& o) {
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (size_t p = 0; p < b.size(); ++p)
    if (b[p] > 0) spans.push_back({o[p], o[p] + b[p]});
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second)
      fail(Code::InvalidArgument, op_name(op), ": the ", what, " blocks overlap (bytes ",
           spans[i].first, " to ", spans[i - 1].second, ")");
}

void check_no_overlap(Op op, const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return;
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  if (x < y + static_cast<uintptr_t>(b_bytes) && y < x + static_cast<uintptr_t>(a_bytes))
    fail(Code::InvalidArgument, op_name(op), ": the send and receive buffers overlap");
}

}  // namespace

void check_all_reduce(const void* data, int64_t count, ReduceType type) {
  check_type(type);
  if (count < 0) fail(Code::InvalidArgument, "all-reduce: count ", count, " is negative");
  if (count > kMax / 8) fail(Code::InvalidArgument, "all-reduce: count ", count, " is too large");
  if (count > 0 && !data) fail(Code::InvalidArgument, "all-reduce: data is null");
}

Exchange check_all_to_all_v(int32_t size, const void* send, const int64_t* send_bytes,
                            const int64_t* send_offsets, const void* recv,
                            const int64_t* recv_bytes, const int64_t* recv_offsets) {
  Exchange x;
  x.send_total = check_blocks(Op::AllToAllV, "send_bytes", "send_offsets", size, send_bytes,
                              send_offsets, x.send_bytes, x.send_offsets);
  x.recv_total = check_blocks(Op::AllToAllV, "recv_bytes", "recv_offsets", size, recv_bytes,
                              recv_offsets, x.recv_bytes, x.recv_offsets);
  if (x.send_total > 0 && !send) fail(Code::InvalidArgument, "all-to-all-v: send is null");
  if (x.recv_total > 0 && !recv) fail(Code::InvalidArgument, "all-to-all-v: recv is null");
  check_disjoint(Op::AllToAllV, "receive", x.recv_bytes, x.recv_offsets);
  check_no_overlap(Op::AllToAllV, send, x.send_total, recv, x.recv_total);
  return x;
}

void check_all_gather(int32_t size, const void* send, int64_t bytes, const void* recv) {
  if (bytes < 0) fail(Code::InvalidArgument, "all-gather: bytes ", bytes, " is negative");
  if (bytes > kMax / size)
    fail(Code::InvalidArgument, "all-gather: bytes ", bytes, " x ", size, " ranks overflows");
  if (bytes > 0 && (!send || !recv))
    fail(Code::InvalidArgument, "all-gather: ", !send ? "send" : "recv", " is null");
}

Exchange check_all_gather_v(int32_t size, int32_t rank, const void* send, int64_t send_bytes,
                            const void* recv, const int64_t* recv_bytes,
                            const int64_t* recv_offsets) {
  Exchange x;
  if (send_bytes < 0)
    fail(Code::InvalidArgument, "all-gather-v: send_bytes ", send_bytes, " is negative");
  x.recv_total = check_blocks(Op::AllGatherV, "recv_bytes", "recv_offsets", size, recv_bytes,
                              recv_offsets, x.recv_bytes, x.recv_offsets);
  if (x.recv_bytes[rank] != send_bytes)
    fail(Code::InvalidArgument, "all-gather-v: recv_bytes[", rank, "] = ", x.recv_bytes[rank],
         " differs from this rank's send_bytes ", send_bytes);
  if (send_bytes > 0 && !send) fail(Code::InvalidArgument, "all-gather-v: send is null");
  if (x.recv_total > 0 && !recv) fail(Code::InvalidArgument, "all-gather-v: recv is null");
  check_disjoint(Op::AllGatherV, "receive", x.recv_bytes, x.recv_offsets);
  // The one overlap allowed is the rank's own block in place.
  const char* own = static_cast<const char*>(recv) + x.recv_offsets[rank];
  if (send != own) check_no_overlap(Op::AllGatherV, send, send_bytes, recv, x.recv_total);
  x.send_bytes.assign(size, send_bytes);
  x.send_offsets.assign(size, 0);
  x.send_total = send_bytes;
  return x;
}

void check_broadcast(int32_t size, const void* data, int64_t bytes, int32_t root) {
  if (root < 0 || root >= size)
    fail(Code::InvalidArgument, "broadcast: root ", root, " is not a rank of ", size);
  if (bytes < 0) fail(Code::InvalidArgument, "broadcast: bytes ", bytes, " is negative");
  if (bytes > 0 && !data) fail(Code::InvalidArgument, "broadcast: data is null");
}

Segment reduce_segment(int64_t count, int32_t size, int32_t r) {
  const int64_t base = count / size, extra = count % size;
  return {r * base + std::min<int64_t>(r, extra), base + (r < extra ? 1 : 0)};
}

void add_in_place(void* acc, const void* x, int64_t n, ReduceType type) {
  switch (type) {
    case ReduceType::F32: {
      auto* a = static_cast<float*>(acc);
      const auto* b = static_cast<const float*>(x);
      for (int64_t i = 0; i < n; ++i) a[i] += b[i];
      return;
    }
    case ReduceType::F64: {
      auto* a = static_cast<double*>(acc);
      const auto* b = static_cast<const double*>(x);
      for (int64_t i = 0; i < n; ++i) a[i] += b[i];
      return;
    }
    case ReduceType::I64: {
      // Wrapping, as two's complement hardware adds: a signed overflow is no crash.
      auto* a = static_cast<uint64_t*>(acc);
      const auto* b = static_cast<const uint64_t*>(x);
      for (int64_t i = 0; i < n; ++i) a[i] += b[i];
      return;
    }
  }
}

double Health::timeout() const {
  std::lock_guard<std::mutex> lock(mu_);
  return timeout_;
}

void Health::set_timeout(double seconds) {
  check_timeout(seconds);
  std::lock_guard<std::mutex> lock(mu_);
  timeout_ = seconds;
}

bool Health::broken() const {
  std::lock_guard<std::mutex> lock(mu_);
  return broken_;
}

std::string Health::reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reason_;
}

bool Health::mark_broken(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_) return false;
  broken_ = true;
  reason_ = reason;
  return true;
}

void Health::check(Op op) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_) fail(Code::Comm, label_, " is broken (", reason_, "); ", op_name(op), " refused");
}

}  // namespace comm
}  // namespace moert
