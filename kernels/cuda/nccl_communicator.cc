// The Communicator over NCCL, inside the CUDA plugin: buffers are device memory of the
// communicator's GPU, operations are queued on the communicator's own CUDA stream (so that they
// overlap the backend's kernels on its stream) and a request is a CUDA event recorded after them.
//
// Failure: the NCCL communicator is created non-blocking (config.blocking = 0), so that no NCCL
// call can hold the caller past its timeout; waits poll the event and ncclCommGetAsyncError, and
// a timeout or an asynchronous error aborts the NCCL communicator (ncclCommAbort), which stops
// its kernels: afterwards nothing touches the caller's buffers. NCCL has no side channel to tell
// the peers: they fail at their own timeout. NCCL does not check that the ranks' sizes agree
// (a mismatch is found by the timeout only); the checks of one rank's own arguments are those of
// every implementation (core/comm_support.h).
//
// Run with one rank on an H200 with NCCL 2.28.9 (2026-12-04, bench/RESULTS.md: every one-rank
// GPU test passed). Never run with more than one rank: one GPU holds one NCCL rank, and no lent
// machine has had two.
#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

#include "core/comm_support.h"
#include "core/communicator.h"
#include "core/cuda_plugin.h"
#include "core/error.h"
#include "kernels/cuda/nccl_sum.h"

namespace moert::cuda {
namespace {

using Clock = std::chrono::steady_clock;

// Selects `device` on this thread for the object's life, then gives the thread back its device.
class OnDevice {
 public:
  explicit OnDevice(int device) {
    if (cudaGetDevice(&outer_) != cudaSuccess) {
      cudaGetLastError();
      outer_ = -1;
    }
    const cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(Code::Unsupported, "CUDA device ", device,
           " cannot be selected: ", cudaGetErrorString(e));
    }
  }
  ~OnDevice() {
    if (outer_ >= 0) cudaSetDevice(outer_);
  }
  OnDevice(const OnDevice&) = delete;
  OnDevice& operator=(const OnDevice&) = delete;

 private:
  int outer_ = -1;
};

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail(e == cudaErrorMemoryAllocation ? Code::OutOfMemory : Code::Comm, "CUDA: ", what, ": ",
         cudaGetErrorString(e));
  }
}

std::string nccl_text(ncclResult_t r, ncclComm_t comm) {
  const char* last = ncclGetLastError(comm);
  return cat(ncclGetErrorString(r), last && *last ? cat(" (", last, ")") : std::string());
}

// Polls a non-blocking NCCL communicator until the calls issued on it are in place (NCCL asks
// for this before any further call). False when `deadline` passed first.
bool settle(ncclComm_t comm, Clock::time_point deadline, std::string& error) {
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) {
      error = nccl_text(r, comm);
      return true;
    }
    if (state == ncclSuccess) return true;
    if (state != ncclInProgress) {
      error = nccl_text(state, comm);
      return true;
    }
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

Clock::time_point deadline_after(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

// What a communicator and its requests share.
struct State {
  State(ncclComm_t c, int dev, int32_t r, int32_t n, double timeout)
      : comm(c), device(dev), rank(r), size(n), health(comm::label("NCCL", r, n), timeout) {}

  ~State() {
    try {
      const OnDevice on(device);
      if (comm) {
        // A clean end when every peer is there; abort when they are not within the timeout.
        const ncclResult_t r = ncclCommFinalize(comm);
        std::string error;
        const bool ok = (r == ncclSuccess || r == ncclInProgress) &&
                        settle(comm, deadline_after(health.timeout()), error) && error.empty();
        if (ok)
          ncclCommDestroy(comm);
        else
          ncclCommAbort(comm);
      }
      if (ready) cudaEventDestroy(ready);
      if (stream) cudaStreamDestroy(stream);
      if (scratch) cudaFree(scratch);
      if (host_flag) cudaFreeHost(host_flag);
    } catch (...) {
      // The device is gone: nothing more can be released.
    }
  }

  // Breaks the communicator: records why and aborts NCCL, which ends its kernels. Under mu.
  void abort(const std::string& reason) {
    health.mark_broken(reason);
    if (comm) {
      const OnDevice on(device);
      ncclCommAbort(comm);
      comm = nullptr;
    }
  }

  ncclComm_t comm;
  const int device;
  const int32_t rank, size;
  comm::Health health;
  std::mutex mu;  // every NCCL and stream call of this communicator
  cudaStream_t stream = nullptr;
  cudaStream_t producer = nullptr;
  cudaEvent_t ready = nullptr;   // on the producer stream, at each start
  int32_t* scratch = nullptr;    // device: barrier and agree
  int32_t* host_flag = nullptr;  // pinned: agree's answer
  std::mutex agree_mu;
  uint64_t next_seq = 0;
};

class NcclRequest final : public CommRequest {
 public:
  NcclRequest(std::shared_ptr<State> s, cudaEvent_t done, std::string name)
      : s_(std::move(s)), done_(done), name_(std::move(name)) {}
  ~NcclRequest() override {
    try {
      wait();
    } catch (...) {
      // The communicator is broken and says why at its next operation.
    }
    cudaEventDestroy(done_);
  }

  void wait() override {
    const double timeout = s_->health.timeout();
    const auto deadline = deadline_after(timeout);
    auto nap = std::chrono::microseconds(5);
    while (!test()) {
      if (Clock::now() >= deadline) {
        std::lock_guard<std::mutex> lock(s_->mu);
        failed_ = true;
        error_ = cat(s_->health.label(), ": ", name_, " did not complete within ", timeout,
                     " s (timeout; a peer may be dead or stuck); the communicator is broken");
        s_->abort(cat(name_, " timed out after ", timeout, " s on rank ", s_->rank));
        throw Error(Code::Comm, error_);
      }
      std::this_thread::sleep_for(nap);
      if (nap < std::chrono::microseconds(500)) nap *= 2;
    }
  }

  bool test() override {
    std::lock_guard<std::mutex> lock(s_->mu);
    if (failed_) throw Error(Code::Comm, error_);
    if (done_flag_) return true;
    const std::string why = problem();
    if (why.empty()) return done_flag_;
    failed_ = true;
    error_ = cat(s_->health.label(), ": ", name_, " failed: ", why, "; the communicator is broken");
    s_->abort(cat(name_, " failed on rank ", s_->rank, ": ", why));
    throw Error(Code::Comm, error_);
  }

 private:
  // Sets done_flag_ when the operation completed; returns what went wrong, if anything. Under mu.
  std::string problem() {
    // After an abort, an event that completes says nothing about the data: NCCL's kernels were
    // stopped, not finished.
    if (!s_->comm) return cat("the communicator was aborted (", s_->health.reason(), ")");
    const OnDevice on(s_->device);
    const cudaError_t e = cudaEventQuery(done_);
    if (e == cudaSuccess) {
      done_flag_ = true;
      return "";
    }
    if (e != cudaErrorNotReady) {
      cudaGetLastError();
      return cat("CUDA: ", cudaGetErrorString(e));
    }
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(s_->comm, &state);
    if (state != ncclSuccess && state != ncclInProgress) return nccl_text(state, s_->comm);
    return "";
  }

  std::shared_ptr<State> s_;
  cudaEvent_t done_;
  const std::string name_;
  bool done_flag_ = false, failed_ = false;
  std::string error_;
};

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(std::shared_ptr<State> s) : s_(std::move(s)) {}

  const char* kind() const override { return "nccl"; }
  int32_t rank() const override { return s_->rank; }
  int32_t size() const override { return s_->size; }
  CommMemory memory() const override { return CommMemory::Device; }
  int32_t device() const override { return s_->device; }
  void set_timeout(double seconds) override { s_->health.set_timeout(seconds); }
  double timeout() const override { return s_->health.timeout(); }
  bool broken() const override { return s_->health.broken(); }
  std::string broken_reason() const override { return s_->health.reason(); }
  void set_stream(void* stream) override {
    std::lock_guard<std::mutex> lock(s_->mu);
    s_->producer = static_cast<cudaStream_t>(stream);
  }

  Request start_all_reduce_sum(void* data, int64_t count, ReduceType type) override {
    return start(
        comm::Op::AllReduceSum, [&] { comm::check_all_reduce(data, count, type); },
        [&](ncclComm_t c, cudaStream_t st) {
          // Reduce-scatter by point-to-point (rank r gets segment r of every rank), the
          // rank-ordered sum, then all-gather of the segments.
          const int64_t es = static_cast<int64_t>(reduce_type_size(type));
          char* d = static_cast<char*>(data);
          const comm::Segment mine = comm::reduce_segment(count, size(), rank());
          const size_t slot = static_cast<size_t>(mine.count * es);
          void* slots = nullptr;
          if (slot > 0) check_cuda(cudaMallocAsync(&slots, slot * size(), st), "cudaMallocAsync");
          char* sl = static_cast<char*>(slots);
          group(c, [&] {
            for (int32_t p = 0; p < size(); ++p)
              if (p != rank() && slot > 0) nccl(ncclRecv(sl + p * slot, slot, ncclUint8, p, c, st));
            for (int32_t p = 0; p < size(); ++p) {
              const comm::Segment s = comm::reduce_segment(count, size(), p);
              if (p != rank() && s.count > 0)
                nccl(ncclSend(d + s.begin * es, s.count * es, ncclUint8, p, c, st));
            }
          });
          if (slot > 0) {
            check_cuda(cudaMemcpyAsync(sl + rank() * slot, d + mine.begin * es, slot,
                                       cudaMemcpyDeviceToDevice, st),
                       "cudaMemcpyAsync");
            ordered_sum(slots, size(), mine.count, type, d + mine.begin * es, st);
            check_cuda(cudaFreeAsync(slots, st), "cudaFreeAsync");
          }
          group(c, [&] {
            for (int32_t p = 0; p < size(); ++p) {
              const comm::Segment s = comm::reduce_segment(count, size(), p);
              if (p != rank() && s.count > 0)
                nccl(ncclRecv(d + s.begin * es, s.count * es, ncclUint8, p, c, st));
            }
            for (int32_t p = 0; p < size(); ++p)
              if (p != rank() && slot > 0)
                nccl(ncclSend(d + mine.begin * es, slot, ncclUint8, p, c, st));
          });
        });
  }

  Request start_all_to_all_v(const void* send, const int64_t* send_bytes,
                             const int64_t* send_offsets, void* recv, const int64_t* recv_bytes,
                             const int64_t* recv_offsets) override {
    comm::Exchange x;
    return start(
        comm::Op::AllToAllV,
        [&] {
          x = comm::check_all_to_all_v(size(), send, send_bytes, send_offsets, recv, recv_bytes,
                                       recv_offsets);
          self_check(x);
        },
        [&](ncclComm_t c, cudaStream_t st) { exchange(c, st, send, recv, x); });
  }

  Request start_all_gather(const void* send, int64_t bytes, void* recv) override {
    return start(
        comm::Op::AllGather, [&] { comm::check_all_gather(size(), send, bytes, recv); },
        [&](ncclComm_t c, cudaStream_t st) {
          if (bytes > 0)
            nccl(ncclAllGather(send, recv, static_cast<size_t>(bytes), ncclUint8, c, st));
        });
  }

  Request start_all_gather_v(const void* send, int64_t send_bytes, void* recv,
                             const int64_t* recv_bytes, const int64_t* recv_offsets) override {
    comm::Exchange x;
    return start(
        comm::Op::AllGatherV,
        [&] {
          x = comm::check_all_gather_v(size(), rank(), send, send_bytes, recv, recv_bytes,
                                       recv_offsets);
        },
        [&](ncclComm_t c, cudaStream_t st) { exchange(c, st, send, recv, x); });
  }

  Request start_broadcast(void* data, int64_t bytes, int32_t root) override {
    return start(
        comm::Op::Broadcast, [&] { comm::check_broadcast(size(), data, bytes, root); },
        [&](ncclComm_t c, cudaStream_t st) {
          if (bytes > 0)
            nccl(ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, c, st));
        });
  }

  Request start_barrier() override {
    return start(
        comm::Op::Barrier, [] {},
        [&](ncclComm_t c, cudaStream_t st) {
          nccl(ncclAllReduce(s_->scratch, s_->scratch, 1, ncclInt32, ncclSum, c, st));
        });
  }

  bool agree(bool ok) override {
    std::lock_guard<std::mutex> one_at_a_time(s_->agree_mu);
    start(
        comm::Op::Agree, [] {},
        [&](ncclComm_t c, cudaStream_t st) {
          *s_->host_flag = ok ? 1 : 0;
          check_cuda(cudaMemcpyAsync(s_->scratch, s_->host_flag, sizeof(int32_t),
                                     cudaMemcpyHostToDevice, st),
                     "cudaMemcpyAsync");
          nccl(ncclAllReduce(s_->scratch, s_->scratch, 1, ncclInt32, ncclMin, c, st));
          check_cuda(cudaMemcpyAsync(s_->host_flag, s_->scratch, sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, st),
                     "cudaMemcpyAsync");
        })
        ->wait();
    return *s_->host_flag != 0;
  }

  std::unique_ptr<Communicator> split(int32_t color, int32_t key) override;

 private:
  static void nccl(ncclResult_t r) {
    if (r != ncclSuccess && r != ncclInProgress) fail(Code::Comm, "NCCL: ", ncclGetErrorString(r));
  }
  // A group of NCCL calls, in place before anything else is queued (NCCL's rule for
  // non-blocking communicators).
  void group(ncclComm_t c, const std::function<void()>& body) {
    nccl(ncclGroupStart());
    try {
      body();
    } catch (...) {
      ncclGroupEnd();
      throw;
    }
    nccl(ncclGroupEnd());
    std::string error;
    if (!settle(c, deadline_after(s_->health.timeout()), error))
      fail(Code::Comm, "NCCL: a group of calls could not be queued within ", s_->health.timeout(),
           " s (timeout)");
    if (!error.empty()) fail(Code::Comm, "NCCL: ", error);
  }

  // NCCL cannot see whether the ranks' sizes agree; the one pair a rank can check alone is
  // itself.
  void self_check(const comm::Exchange& x) const {
    if (x.send_bytes[rank()] != x.recv_bytes[rank()])
      fail(Code::InvalidArgument, "all-to-all-v: rank ", rank(), " sends itself ",
           x.send_bytes[rank()], " bytes but expects ", x.recv_bytes[rank()]);
  }

  // Grouped point-to-point: send_bytes[p] bytes to each p, recv_bytes[p] from each p; the own
  // block by a device copy.
  void exchange(ncclComm_t c, cudaStream_t st, const void* send, void* recv,
                const comm::Exchange& x) {
    const char* s = static_cast<const char*>(send);
    char* r = static_cast<char*>(recv);
    group(c, [&] {
      for (int32_t p = 0; p < size(); ++p) {
        if (p == rank()) continue;
        if (x.recv_bytes[p] > 0)
          nccl(ncclRecv(r + x.recv_offsets[p], x.recv_bytes[p], ncclUint8, p, c, st));
        if (x.send_bytes[p] > 0)
          nccl(ncclSend(s + x.send_offsets[p], x.send_bytes[p], ncclUint8, p, c, st));
      }
    });
    const int64_t own = x.recv_bytes[rank()];
    if (own > 0 && s + x.send_offsets[rank()] != r + x.recv_offsets[rank()])
      check_cuda(cudaMemcpyAsync(r + x.recv_offsets[rank()], s + x.send_offsets[rank()],
                                 static_cast<size_t>(own), cudaMemcpyDeviceToDevice, st),
                 "cudaMemcpyAsync");
  }

  // Checks the arguments, queues the operation on the communicator's stream after the producer
  // stream's work, and returns a request on an event recorded after it. An error breaks the
  // communicator (its NCCL state is unknown after a failed call).
  template <typename Check, typename Enqueue>
  Request start(comm::Op op, Check&& check, Enqueue&& enqueue) {
    s_->health.check(op);
    std::lock_guard<std::mutex> lock(s_->mu);
    if (!s_->comm) s_->health.check(op);
    const std::string name = cat(comm::op_name(op), " #", s_->next_seq);
    try {
      check();
    } catch (const Error& e) {
      s_->abort(
          cat("rank ", rank(), " passed bad arguments to ", comm::op_name(op), ": ", e.what()));
      throw;
    }
    ++s_->next_seq;
    cudaEvent_t done = nullptr;
    try {
      const OnDevice on(s_->device);
      if (s_->producer) {
        check_cuda(cudaEventRecord(s_->ready, s_->producer), "cudaEventRecord");
        check_cuda(cudaStreamWaitEvent(s_->stream, s_->ready, 0), "cudaStreamWaitEvent");
      }
      enqueue(s_->comm, s_->stream);
      std::string error;
      if (!settle(s_->comm, deadline_after(s_->health.timeout()), error))
        fail(Code::Comm, name, " could not be queued within ", s_->health.timeout(),
             " s (timeout)");
      if (!error.empty()) fail(Code::Comm, name, ": NCCL: ", error);
      check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
      check_cuda(cudaEventRecord(done, s_->stream), "cudaEventRecord");
    } catch (const Error& e) {
      if (done) cudaEventDestroy(done);
      s_->abort(cat(name, " failed on rank ", rank(), ": ", e.what()));
      throw Error(e.code() == Code::OutOfMemory ? Code::OutOfMemory : Code::Comm,
                  cat(s_->health.label(), ": ", e.what(), "; the communicator is broken"));
    }
    return std::make_unique<NcclRequest>(s_, done, name);
  }

  std::shared_ptr<State> s_;
};

// Creates the stream, event and scratch of a communicator whose NCCL side is ready.
std::shared_ptr<State> make_state(ncclComm_t comm, int device, int32_t rank, int32_t size,
                                  double timeout) {
  auto s = std::make_shared<State>(comm, device, rank, size, timeout);
  const OnDevice on(device);
  check_cuda(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check_cuda(cudaEventCreateWithFlags(&s->ready, cudaEventDisableTiming), "cudaEventCreate");
  check_cuda(cudaMalloc(&s->scratch, sizeof(int32_t)), "cudaMalloc");
  check_cuda(cudaMallocHost(&s->host_flag, sizeof(int32_t)), "cudaMallocHost");
  return s;
}

// Waits for a non-blocking NCCL communicator being made; aborts it on error or timeout.
void await_creation(ncclComm_t& comm, double timeout, const char* what) {
  std::string error;
  if (!settle(comm, deadline_after(timeout), error)) {
    ncclCommAbort(comm);
    comm = nullptr;
    fail(Code::Comm, what, " did not complete within ", timeout, " s (did every rank call it?)");
  }
  if (!error.empty()) {
    ncclCommAbort(comm);
    comm = nullptr;
    fail(Code::Comm, what, " failed: ", error);
  }
}

std::unique_ptr<Communicator> NcclCommunicator::split(int32_t color, int32_t key) {
  s_->health.check(comm::Op::Split);
  std::lock_guard<std::mutex> lock(s_->mu);
  if (!s_->comm) s_->health.check(comm::Op::Split);
  const double timeout = s_->health.timeout();
  try {
    const OnDevice on(s_->device);
    ncclConfig_t config = nonblocking_config();
    ncclComm_t child = nullptr;
    const ncclResult_t r =
        ncclCommSplit(s_->comm, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, &config);
    if (r != ncclSuccess && r != ncclInProgress)
      fail(Code::Comm, "ncclCommSplit: ", nccl_text(r, s_->comm));
    std::string error;
    if (!settle(s_->comm, deadline_after(timeout), error))
      fail(Code::Comm, "ncclCommSplit did not complete within ", timeout, " s");
    if (!error.empty()) fail(Code::Comm, "ncclCommSplit: ", error);
    if (!child) return nullptr;
    await_creation(child, timeout, "ncclCommSplit");
    int n = 0, me = 0;
    ncclCommCount(child, &n);
    ncclCommUserRank(child, &me);
    return std::make_unique<NcclCommunicator>(make_state(child, s_->device, me, n, timeout));
  } catch (const Error& e) {
    s_->abort(cat("split failed on rank ", s_->rank, ": ", e.what()));
    throw Error(Code::Comm,
                cat(s_->health.label(), ": ", e.what(), "; the communicator is broken"));
  }
}

void say(int32_t* code, char* message, size_t message_len, Code c, const char* what) {
  if (code) *code = static_cast<int32_t>(c);
  if (message && message_len) std::snprintf(message, message_len, "%s", what);
}

Communicator* create(const uint8_t* id, size_t id_len, int32_t rank, int32_t size, int32_t device,
                     double timeout) {
  static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "NCCL's unique id size changed");
  if (id_len != sizeof(ncclUniqueId))
    fail(Code::InvalidArgument, "an NCCL unique id is ", sizeof(ncclUniqueId), " bytes, got ",
         id_len);
  comm::check_timeout(timeout);
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    cudaGetLastError();
    fail(Code::Unsupported,
         "no CUDA device is usable: ", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
  }
  if (device < 0 || device >= count)
    fail(Code::InvalidArgument, "CUDA device ", device, " does not exist (", count, " device(s))");
  ncclUniqueId uid;
  std::memcpy(&uid, id, sizeof uid);
  const OnDevice on(device);
  ncclConfig_t config = nonblocking_config();
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, size, uid, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    if (comm) ncclCommAbort(comm);
    fail(Code::Comm, "ncclCommInitRankConfig: ", ncclGetErrorString(r));
  }
  await_creation(comm, timeout, "ncclCommInitRankConfig");
  // From here the State owns comm and releases it, also when making the rest fails.
  return new NcclCommunicator(make_state(comm, device, rank, size, timeout));
}

}  // namespace
}  // namespace moert::cuda

extern "C" {

__attribute__((visibility("default"))) int32_t moert_cuda_plugin_nccl_unique_id(
    uint8_t* out, size_t len, char* message, size_t message_len) {
  int32_t code = 0;
  if (!out || len < sizeof(ncclUniqueId)) {
    moert::cuda::say(&code, message, message_len, moert::Code::InvalidArgument,
                     "the buffer for the NCCL unique id is too small");
    return code;
  }
  ncclUniqueId uid;
  const ncclResult_t r = ncclGetUniqueId(&uid);
  if (r != ncclSuccess) {
    moert::cuda::say(&code, message, message_len, moert::Code::Unsupported,
                     moert::cat("ncclGetUniqueId: ", ncclGetErrorString(r)).c_str());
    return code;
  }
  std::memcpy(out, &uid, sizeof uid);
  return 0;
}

__attribute__((visibility("default"))) moert::Communicator* moert_cuda_plugin_nccl_create(
    const uint8_t* id, size_t id_len, int32_t rank, int32_t size, int32_t device, double timeout,
    int32_t* code, char* message, size_t message_len) {
  using moert::cuda::say;
  try {
    return moert::cuda::create(id, id_len, rank, size, device, timeout);
  } catch (const moert::Error& e) {
    say(code, message, message_len, e.code(), e.what());
  } catch (const std::bad_alloc&) {
    say(code, message, message_len, moert::Code::OutOfMemory, "out of host memory");
  } catch (const std::exception& e) {
    say(code, message, message_len, moert::Code::Internal, e.what());
  } catch (...) {
    say(code, message, message_len, moert::Code::Internal, "unknown error");
  }
  return nullptr;
}

}  // extern "C"
