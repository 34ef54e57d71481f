// Collective communication among the ranks of a job: the interface that expert and data
// parallelism stand on (docs/design.md section 2). Implementations: MPI (plugin libmoert_mpi.so,
// host memory), NCCL (inside the CUDA plugin, device memory) and, for unit tests only, threads of
// one process (tests/support). The core never includes MPI or NCCL headers.
//
// Semantics shared by every implementation:
//  - Every operation is collective: all ranks start the same operations in the same order (the
//    order of the start_* calls, per communicator), with arguments that agree where the operation
//    says so. Operations are non-blocking: start_* queues the operation and returns a Request;
//    the data moves while the caller computes (MPI: the plugin's progress thread; NCCL: the
//    communicator's own CUDA stream); the buffers must stay valid and untouched until the
//    request completes. Each blocking form is start + wait.
//  - Failure: a failed or timed-out operation breaks the communicator on this rank, and every
//    later operation fails at once with Error(Code::Comm) naming the rank, the operation and how
//    long it waited. A rank that breaks tells its peers where the implementation can (MPI does;
//    NCCL cannot), so that they fail promptly rather than at their timeout. A rank whose
//    arguments are wrong (a negative size, a bad root) gets Error(Code::InvalidArgument) and
//    breaks the communicator the same way: a collective cannot go on without one of its ranks.
//    Once wait() or test() has reported completion or failure, or the request is destroyed, the
//    implementation never touches the caller's buffers again.
//  - Timeouts: wait() fails when the operation has not completed within timeout() seconds of the
//    call to wait(); test() only polls. Collective set-up (split, creation) honours it too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace moert {

// Element types of all-reduce sums.
enum class ReduceType : int32_t { F32 = 0, F64 = 1, I64 = 2 };
size_t reduce_type_size(ReduceType type);
const char* reduce_type_name(ReduceType type);

// Where an operation's buffers must live: host memory (MPI, in-process) or the communicator's
// CUDA device (NCCL).
enum class CommMemory : int32_t { Host = 0, Device = 1 };

// Ten minutes: long enough for a rank that loads a large checkpoint while its peers already wait
// in a collective, short enough that a dead peer does not hold a job for hours. (PyTorch's NCCL
// process groups default to the same.)
inline constexpr double kDefaultCommTimeoutSeconds = 600.0;

// One started operation.
class CommRequest {
 public:
  // A request destroyed before it completed is waited for first (errors are not thrown; they
  // break the communicator), so that no operation outlives its caller's buffers.
  virtual ~CommRequest() = default;
  // Blocks until the operation completed on this rank. Throws Error(Code::Comm) when it failed
  // or did not complete within the communicator's timeout; the communicator is then broken.
  // Calling it again after success returns at once; after a failure it throws the same error.
  virtual void wait() = 0;
  // Whether the operation completed; never blocks. Throws as wait() when it failed.
  virtual bool test() = 0;
};
using Request = std::unique_ptr<CommRequest>;

class Communicator {
 public:
  virtual ~Communicator() = default;

  // "mpi", "nccl" or "in-process".
  virtual const char* kind() const = 0;
  virtual int32_t rank() const = 0;
  virtual int32_t size() const = 0;
  virtual CommMemory memory() const = 0;
  // Device communicators: the CUDA device whose memory the operations move (NCCL: the device it
  // was created on), which a session using it must compute on. -1 for host communicators, or
  // where the implementation does not know.
  virtual int32_t device() const { return -1; }

  // Seconds every wait (and split) waits before it gives up; > 0 and finite. Local: each rank
  // sets its own. New communicators start with kDefaultCommTimeoutSeconds unless created with
  // another; split() passes the parent's on.
  virtual void set_timeout(double seconds) = 0;
  virtual double timeout() const = 0;

  // Whether an operation failed here (or a peer reported that one failed there), and why.
  virtual bool broken() const = 0;
  virtual std::string broken_reason() const = 0;

  // Device communicators only: each later operation starts after the work queued on this CUDA
  // stream (a cudaStream_t) up to its start_* call, so that the caller need not synchronise the
  // stream that produced the data. Null (the default): the data is ready when start_* is called.
  // Host communicators ignore it.
  virtual void set_stream(void* stream) { (void)stream; }

  // ---- Operations (collective). Sizes are in elements where a type is given, else in bytes.

  // data[i] = sum over ranks r of data_r[i], in place. The sum is taken in rank order,
  // ((x_0 + x_1) + x_2) + ..., for every element, so that every rank gets bitwise the same
  // result and the same inputs give the same result on every run. `count` must agree.
  virtual Request start_all_reduce_sum(void* data, int64_t count, ReduceType type) = 0;

  // Rank r sends send_bytes[p] bytes from send + send_offsets[p] to each rank p and receives
  // recv_bytes[p] bytes from each p into recv + recv_offsets[p] (any element type: the caller
  // counts bytes). send_bytes[p] on rank r must equal recv_bytes[r] on rank p; zeros are
  // allowed. The four arrays hold size() values each and are copied by the call. Send and
  // receive regions must not overlap.
  virtual Request start_all_to_all_v(const void* send, const int64_t* send_bytes,
                                     const int64_t* send_offsets, void* recv,
                                     const int64_t* recv_bytes, const int64_t* recv_offsets) = 0;

  // recv[p * bytes .. (p + 1) * bytes) = rank p's `send`. `bytes` must agree. `send` may be the
  // rank's own block of `recv` (in place).
  virtual Request start_all_gather(const void* send, int64_t bytes, void* recv) = 0;

  // recv + recv_offsets[p] receives rank p's send_bytes bytes; recv_bytes[p] on every rank must
  // equal rank p's send_bytes. The arrays hold size() values and are copied.
  virtual Request start_all_gather_v(const void* send, int64_t send_bytes, void* recv,
                                     const int64_t* recv_bytes, const int64_t* recv_offsets) = 0;

  // Every rank's data receives root's `bytes` bytes. `bytes` and `root` must agree.
  virtual Request start_broadcast(void* data, int64_t bytes, int32_t root) = 0;

  virtual Request start_barrier() = 0;

  // Whether every rank passed ok = true; every rank gets the same answer. Blocking. The session
  // uses it so that bad input on one rank fails the call on every rank.
  virtual bool agree(bool ok) = 0;

  // A new communicator over the ranks that pass the same color >= 0, ranked by (key, rank);
  // null on ranks that pass a negative color. Blocking and collective over this communicator;
  // the new one inherits the timeout. Both stay independent: freeing or breaking one leaves the
  // other as it is.
  virtual std::unique_ptr<Communicator> split(int32_t color, int32_t key) = 0;

  // ---- Blocking forms: start + wait.
  void all_reduce_sum(void* data, int64_t count, ReduceType type) {
    start_all_reduce_sum(data, count, type)->wait();
  }
  void all_to_all_v(const void* send, const int64_t* send_bytes, const int64_t* send_offsets,
                    void* recv, const int64_t* recv_bytes, const int64_t* recv_offsets) {
    start_all_to_all_v(send, send_bytes, send_offsets, recv, recv_bytes, recv_offsets)->wait();
  }
  void all_gather(const void* send, int64_t bytes, void* recv) {
    start_all_gather(send, bytes, recv)->wait();
  }
  void all_gather_v(const void* send, int64_t send_bytes, void* recv, const int64_t* recv_bytes,
                    const int64_t* recv_offsets) {
    start_all_gather_v(send, send_bytes, recv, recv_bytes, recv_offsets)->wait();
  }
  void broadcast(void* data, int64_t bytes, int32_t root) {
    start_broadcast(data, bytes, root)->wait();
  }
  void barrier() { start_barrier()->wait(); }
};

// Creates a communicator over MPI from the plugin libmoert_mpi.so, loaded on first use from
// beside libmoert.so (or from `plugin_path`) and checked against this library's version.
// `host_comm` points at the host's MPI_Comm (an Open MPI handle), or is null for
// MPI_COMM_WORLD; the communicator works on a duplicate of it. Collective over that MPI
// communicator. `max_message_bytes` > 0 caps the bytes of one MPI message (larger transfers are
// cut into pieces; tests use it to exercise the cutting), 0 keeps the plugin's 1 GiB.
struct MpiCommOptions {
  double timeout = kDefaultCommTimeoutSeconds;
  int64_t max_message_bytes = 0;
  std::string plugin_path;
};
std::unique_ptr<Communicator> make_mpi_communicator(const void* host_comm,
                                                    const MpiCommOptions& options = {});

// NCCL, from the CUDA plugin (beside libmoert.so, or `plugin_path`).
inline constexpr size_t kNcclUniqueIdBytes = 128;
// Writes a fresh NCCL unique id (kNcclUniqueIdBytes bytes) to `out`. Rank 0 calls it and ships
// the bytes to the other ranks.
void nccl_unique_id(uint8_t* out, const std::string& plugin_path = "");
// Collective over the `size` ranks that pass the same id; each passes its own rank and CUDA
// device.
std::unique_ptr<Communicator> make_nccl_communicator(const uint8_t* id, int32_t rank, int32_t size,
                                                     int32_t device,
                                                     double timeout = kDefaultCommTimeoutSeconds,
                                                     const std::string& plugin_path = "");

}  // namespace moert
