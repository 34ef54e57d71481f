// libmoert_mpi.so: the Communicator over Open MPI, and the plugin's entry points.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <new>

#include "comm/mpi/engine.h"
#include "comm/mpi/operations.h"
#include "core/communicator.h"
#include "core/mpi_plugin.h"

namespace moert::mpi {
namespace {

constexpr int64_t kDefaultMaxMessage = int64_t{1} << 30;
// After a timeout, the longest this rank asks its peers how far they got (a quarter of the
// timeout when shorter), before the operation fails.
constexpr double kProbeWindow = 1.0;

class MpiRequest final : public CommRequest {
 public:
  MpiRequest(Engine& engine, std::shared_ptr<CommState> comm, std::shared_ptr<Operation> op)
      : engine_(engine), comm_(std::move(comm)), op_(std::move(op)) {}

  ~MpiRequest() override {
    try {
      wait();
    } catch (...) {
      // The communicator is broken and says why at its next operation.
    }
  }

  void wait() override {
    std::unique_lock<std::mutex> lock(op_->mu);
    if (finished()) return rethrow();
    const double timeout = comm_->health.timeout();
    ++engine_.waiters;
    const bool done =
        op_->cv.wait_for(lock, std::chrono::duration<double>(timeout), [&] { return finished(); });
    --engine_.waiters;
    if (done) return rethrow();
    // Which peers are missing, for the message: asked while the operation may still complete.
    lock.unlock();
    const std::string peers =
        engine_.probe_peers(comm_, op_->seq(), std::clamp(timeout / 4, 0.05, kProbeWindow));
    lock.lock();
    if (finished()) return rethrow();
    // Given up: the engine will not touch the caller's buffers for this operation any more.
    op_->status = Operation::Status::Failed;
    op_->code = Code::Comm;
    op_->error = cat(comm_->health.label(), ": ", op_->name(), " did not complete within ", timeout,
                     " s (timeout; ", peers.empty() ? "a peer may be dead or stuck" : peers,
                     "); the communicator is broken");
    const std::string reason = cat(op_->name(), " timed out after ", timeout, " s on rank ",
                                   comm_->rank, peers.empty() ? "" : cat(" (", peers, ")"));
    lock.unlock();
    engine_.break_comm(comm_, reason, true);
    throw Error(Code::Comm, op_->error);
  }

  bool test() override {
    std::lock_guard<std::mutex> lock(op_->mu);
    if (!finished()) return false;
    rethrow();
    return true;
  }

 private:
  bool finished() const {
    return op_->status == Operation::Status::Done || op_->status == Operation::Status::Failed;
  }
  void rethrow() const {
    if (op_->status == Operation::Status::Failed) throw Error(op_->code, op_->error);
  }

  Engine& engine_;
  std::shared_ptr<CommState> comm_;
  std::shared_ptr<Operation> op_;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(Engine& engine, std::shared_ptr<CommState> state)
      : engine_(engine), state_(std::move(state)) {}
  ~MpiCommunicator() override { engine_.close(state_, state_->health.timeout()); }

  const char* kind() const override { return "mpi"; }
  int32_t rank() const override { return state_->rank; }
  int32_t size() const override { return state_->size; }
  CommMemory memory() const override { return CommMemory::Host; }
  void set_timeout(double seconds) override { state_->health.set_timeout(seconds); }
  double timeout() const override { return state_->health.timeout(); }
  bool broken() const override { return state_->health.broken(); }
  std::string broken_reason() const override { return state_->health.reason(); }

  Request start_all_reduce_sum(void* data, int64_t count, ReduceType type) override {
    return start(comm::Op::AllReduceSum, [&](uint64_t seq) {
      comm::check_all_reduce(data, count, type);
      return make_all_reduce(seq, data, count, type);
    });
  }

  Request start_all_to_all_v(const void* send, const int64_t* send_bytes,
                             const int64_t* send_offsets, void* recv, const int64_t* recv_bytes,
                             const int64_t* recv_offsets) override {
    return start(comm::Op::AllToAllV, [&](uint64_t seq) {
      auto x = comm::check_all_to_all_v(size(), send, send_bytes, send_offsets, recv, recv_bytes,
                                        recv_offsets);
      return make_all_to_all_v(seq, send, recv, std::move(x), rank(), size());
    });
  }

  Request start_all_gather(const void* send, int64_t bytes, void* recv) override {
    return start(comm::Op::AllGather, [&](uint64_t seq) {
      comm::check_all_gather(size(), send, bytes, recv);
      return make_all_gather(seq, send, bytes, recv, size());
    });
  }

  Request start_all_gather_v(const void* send, int64_t send_bytes, void* recv,
                             const int64_t* recv_bytes, const int64_t* recv_offsets) override {
    return start(comm::Op::AllGatherV, [&](uint64_t seq) {
      auto x = comm::check_all_gather_v(size(), rank(), send, send_bytes, recv, recv_bytes,
                                        recv_offsets);
      return make_all_gather_v(seq, send, recv, std::move(x));
    });
  }

  Request start_broadcast(void* data, int64_t bytes, int32_t root) override {
    return start(comm::Op::Broadcast, [&](uint64_t seq) {
      comm::check_broadcast(size(), data, bytes, root);
      return make_broadcast(seq, data, bytes, root);
    });
  }

  Request start_barrier() override {
    return start(comm::Op::Barrier, [](uint64_t seq) { return make_barrier(seq); });
  }

  bool agree(bool ok) override {
    auto all_ok = std::make_shared<bool>(false);
    start(comm::Op::Agree, [&](uint64_t seq) { return make_agree(seq, ok, all_ok); })->wait();
    return *all_ok;
  }

  std::unique_ptr<Communicator> split(int32_t color, int32_t key) override {
    state_->health.check(comm::Op::Split);
    std::lock_guard<std::mutex> lock(state_->split_mu);
    std::shared_ptr<CommState> child;
    try {
      child = engine_.split(*state_, color, key);
    } catch (const Error& e) {
      engine_.break_comm(state_, cat("split failed on rank ", rank(), ": ", e.what()),
                         e.code() == Code::Comm);
      throw;
    }
    if (!child) return nullptr;
    return std::make_unique<MpiCommunicator>(engine_, std::move(child));
  }

 private:
  // Checks the arguments and the communicator, numbers the operation and queues it. An argument
  // error breaks the communicator: the peers would otherwise wait for this rank until their
  // timeout. Arguments first: a rank that passed bad ones hears of its own error, not of a peer
  // whose same bad arguments broke the communicator a moment before.
  template <typename Make>
  Request start(comm::Op op, Make&& make) {
    std::shared_ptr<Operation> operation;
    {
      std::lock_guard<std::mutex> lock(state_->seq_mu);
      try {
        operation = make(state_->next_seq);
      } catch (const Error& e) {
        engine_.break_comm(
            state_,
            cat("rank ", rank(), " passed bad arguments to ", comm::op_name(op), ": ", e.what()),
            false);
        throw;
      }
      state_->health.check(op);
      ++state_->next_seq;
      engine_.submit(state_, operation);
    }
    return std::make_unique<MpiRequest>(engine_, state_, std::move(operation));
  }

  Engine& engine_;
  std::shared_ptr<CommState> state_;
};

Communicator* create(const void* host_comm, double timeout, int64_t max_message) {
  comm::check_timeout(timeout);
  if (max_message == 0) max_message = kDefaultMaxMessage;
  if (max_message < 1 || max_message > INT_MAX)
    fail(Code::InvalidArgument, "max_message_bytes must be between 1 and ", INT_MAX, ", got ",
         max_message);
  Engine& engine = Engine::start(timeout);
  MPI_Comm base = MPI_COMM_WORLD;
  if (host_comm) {
    base = *static_cast<const MPI_Comm*>(host_comm);
    if (base == MPI_COMM_NULL)
      fail(Code::InvalidArgument, "the host's MPI communicator is MPI_COMM_NULL");
    // All zero bits is no communicator in Open MPI (a pointer) nor in MPICH (an int whose kind
    // bits are zero): a handle never assigned, as a static MPI_Comm starts. MPI would run the
    // fatal error handler on it and abort the job; a garbage handle cannot be told apart.
    const auto* bits = static_cast<const unsigned char*>(host_comm);
    if (std::all_of(bits, bits + sizeof(MPI_Comm), [](unsigned char b) { return b == 0; }))
      fail(Code::InvalidArgument,
           "the host's MPI communicator handle is all zero bits: a handle never assigned (pass "
           "&MPI_COMM_WORLD, or a handle MPI_Comm_dup or MPI_Comm_split filled)");
    int inter = 0;
    check_mpi(MPI_Comm_test_inter(base, &inter), "MPI_Comm_test_inter");
    if (inter) fail(Code::InvalidArgument, "the host's MPI communicator is an intercommunicator");
  }
  return new MpiCommunicator(engine, engine.create(base, timeout, max_message));
}

}  // namespace
}  // namespace moert::mpi

MOERT_DEFINE_MPI_PLUGIN_IDENTITY()

extern "C" __attribute__((visibility("default"))) moert::Communicator* moert_mpi_plugin_create(
    const void* host_comm, double timeout, int64_t max_message_bytes, int32_t* code, char* message,
    size_t message_len) {
  auto say = [&](moert::Code c, const char* what) {
    if (code) *code = static_cast<int32_t>(c);
    if (message && message_len) std::snprintf(message, message_len, "%s", what);
  };
  try {
    return moert::mpi::create(host_comm, timeout, max_message_bytes);
  } catch (const moert::Error& e) {
    say(e.code(), e.what());
  } catch (const std::bad_alloc&) {
    say(moert::Code::OutOfMemory, "out of memory");
  } catch (const std::exception& e) {
    say(moert::Code::Internal, e.what());
  } catch (...) {
    say(moert::Code::Internal, "unknown error");
  }
  return nullptr;
}
