// The MPI plugin's engine: one progress thread per process that makes every MPI call of moert's
// operations, so that transfers move while the caller computes. Open MPI 4.1 has no progress
// thread of its own ("OMPI progress: no" in ompi_info): a non-blocking operation advances only
// inside MPI calls, so without this thread nothing would move between start and wait.
//
// Threads: callers queue work (start_*, close) and wait on an operation's condition variable;
// the engine thread posts, tests and completes operations; the blocking MPI calls of set-up
// (MPI_Comm_dup, MPI_Comm_split) run on short-lived helper threads so that a peer that never
// arrives cannot stall the engine (the helper is then left blocked and the caller's wait times
// out). This needs MPI_THREAD_MULTIPLE. It also answers the peers' probes after their timeouts
// (Probe), so that a timeout can name the rank it waited for.
//
// MPI's lifetime: when nobody has initialised MPI, the engine thread initialises it
// (MPI_THREAD_MULTIPLE) and finalises it when the last communicator is freed -- unless an
// operation timed out somewhere, since MPI_Finalize would then wait for peers that may be dead.
// MPI cannot be initialised twice in a process: after moert finalised it, creating another MPI
// communicator fails with a message that says so.
//
// A host that finalises MPI itself while moert communicators live (moert.h forbids it, but a
// service's shutdown path may do it anyway) would otherwise have the engine thread call MPI after
// MPI_Finalize, which Open MPI answers by aborting the process. An attribute on MPI_COMM_SELF,
// whose delete callback MPI_Finalize runs first (MPI-3.1 section 8.7.1, "Allowing User Functions at
// Process Termination"), stops the engine before MPI goes: the communicators break with a message
// naming the cause, and every later operation is refused.
#pragma once

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/comm_support.h"
#include "core/error.h"

namespace moert::mpi {

struct CommState;

// Staging memory, kept for reuse: a large transfer would otherwise map fresh pages (and take a
// page fault for each) on every operation. Process-wide and thread-safe: a buffer goes back from
// whichever thread drops the last reference to its operation.
class Staging {
 public:
  Staging() = default;
  // At least `bytes` bytes (nothing for 0), contents unspecified.
  static Staging take(int64_t bytes);
  ~Staging() { reset(); }
  Staging(Staging&& o) noexcept { swap(o); }
  Staging& operator=(Staging&& o) noexcept {
    if (this != &o) {
      reset();
      swap(o);
    }
    return *this;
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  char* get() const { return data_; }
  void reset();

 private:
  void swap(Staging& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(capacity_, o.capacity_);
  }
  char* data_ = nullptr;
  int64_t capacity_ = 0;
};

// A failure every rank of the communicator learnt in an operation's agreement, before any data
// moved (a rank that could not allocate its staging buffers): the operation fails on every rank
// with this code and message, and the communicator stays usable -- every rank's next operation
// finds the others at the same point.
class AgreedFailure : public Error {
 public:
  using Error::Error;
};

// Text of an MPI error code.
std::string error_string(int code);
// Throws Error(Comm) with `what` and the error's text unless rc is MPI_SUCCESS.
void check_mpi(int rc, const char* what);

// The MPI requests of one phase, with the bytes each receive must deliver (-1: not a receive).
struct Posted {
  std::vector<MPI_Request> requests;
  std::vector<int64_t> expected;
  void add(MPI_Request r, int64_t bytes) {
    requests.push_back(r);
    expected.push_back(bytes);
  }
  void clear() {
    requests.clear();
    expected.clear();
  }
};

// One operation: a sequence of phases, each a set of MPI requests posted together. Everything
// but the status fields is touched by the engine thread only.
class Operation {
 public:
  enum class Status { Queued, Active, Done, Failed };

  Operation(comm::Op op, uint64_t seq) : op_(op), seq_(seq) {}
  virtual ~Operation() = default;

  comm::Op op() const { return op_; }
  uint64_t seq() const { return seq_; }
  // "all-to-all-v #12".
  std::string name() const;

  // ---- Engine side.
  // Posts the next phase's requests into `out`, or finishes: copies the result to the caller's
  // buffers and returns false. Called first with nothing posted and again each time all the
  // posted requests completed. Runs under the status lock, so that a caller that gave up is
  // never written to afterwards. Throws Error on failure.
  virtual bool advance(CommState& comm, Posted& out) = 0;

  Posted posted;

  // ---- Shared with the caller, under mu.
  std::mutex mu;
  std::condition_variable cv;
  Status status = Status::Queued;
  Code code = Code::Comm;
  std::string error;

 private:
  const comm::Op op_;
  const uint64_t seq_;
};

// After a timeout, what this rank asks each peer of the communicator: how far it got. Each
// peer's engine thread answers, whatever its host is doing, so the answers tell a dead or stopped
// rank (no answer) from a live one that never called the operation, which a timeout alone cannot.
struct Probe {
  Probe(uint64_t seq, int32_t size, double window_seconds);

  const uint64_t seq;  // the operation this rank gave up on
  const std::chrono::steady_clock::time_point deadline;

  // ---- Engine thread only. Never freed while MPI may write into it: the communicator that holds
  // it is broken afterwards, and a broken one keeps its memory.
  // What is sent: the operation, and the tag the answers are to come on (this probe's own, so
  // that probes under way at once never take each other's answers).
  int64_t question[2] = {0, 0};
  // Per peer: operations it started, whether it is broken, and the question answered (a late
  // answer to an earlier probe may arrive first).
  std::vector<int64_t> replies;
  std::vector<MPI_Request> recvs;
  std::vector<char> answered;
  bool posted = false;

  // ---- Shared, under mu.
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::string summary;  // "" when nothing could be learnt
};

// What the engine knows of one communicator: its two MPI communicators (operations; notices,
// probes and splits), its queue and its health.
struct CommState {
  CommState(MPI_Comm data_comm, MPI_Comm control_comm, int32_t rank_, int32_t size_, double timeout,
            int64_t max_message);

  const MPI_Comm data, control;
  const int32_t rank, size;
  const int64_t max_message;  // bytes per MPI message
  comm::Health health;

  // Tag of phase `phase` (0..3) of operation `seq`: distinct for every operation in flight, so
  // that phases posted at different moments on different ranks still match.
  int tag(uint64_t seq, int phase) const;

  // Posts point-to-point transfers of `bytes` bytes, cut into messages of at most max_message.
  void post_send(const char* p, int64_t bytes, int32_t peer, int tag, Posted& out) const;
  void post_recv(char* p, int64_t bytes, int32_t peer, int tag, Posted& out) const;

  // ---- Engine thread only.
  std::deque<std::shared_ptr<Operation>> queued;
  std::vector<std::shared_ptr<Operation>> active;
  // Requests of failed operations, with the staging memory they use: never freed while MPI may
  // still write into it.
  std::vector<std::shared_ptr<Operation>> orphans;
  char notice[512] = {0};      // what a peer reports (the posted receive writes here)
  char notice_out[512] = {0};  // what this rank reports
  MPI_Request notice_recv = MPI_REQUEST_NULL;
  std::vector<MPI_Request> notice_sends;
  bool noticed_peers = false;
  std::atomic<bool> timed_out{false};  // this rank broke it by a timeout
  bool closing = false;
  bool released = false;      // under the engine's lock
  bool keeps_memory = false;  // released with sends still pending: never destroyed
  int tag_modulus = 1;
  // Peers' probes (Probe above): the question being received, and per peer the last answer sent.
  int64_t question_in[2] = {0, 0};
  MPI_Request question_recv = MPI_REQUEST_NULL;
  struct Answer {
    MPI_Request request = MPI_REQUEST_NULL;
    int64_t words[3] = {0, 0, 0};
  };
  // Answers still being sent (each its own memory, which the send reads until it completes).
  std::vector<std::unique_ptr<Answer>> answers;

  // ---- Both sides, under probe_mu: this rank's own probes, one per operation that timed out
  // (threads may wait on several at once). Kept with the communicator: MPI may still read their
  // questions.
  std::mutex probe_mu;
  std::vector<std::shared_ptr<Probe>> probes;
  std::vector<std::shared_ptr<Probe>> probe_list() {
    std::lock_guard<std::mutex> lock(probe_mu);
    return probes;
  }

  // ---- Caller side.
  std::mutex seq_mu;
  uint64_t next_seq = 0;
  std::mutex split_mu;  // one split at a time: splits are collectives on `control`
};

class Engine {
 public:
  // The process's engine; started (and MPI initialised when needed) on first use. Throws when
  // MPI cannot be used, saying why.
  static Engine& start(double timeout);

  // Creates the state of a communicator over a duplicate of `base`, which is collective over
  // `base` (run on a helper thread, bounded by `timeout`).
  std::shared_ptr<CommState> create(MPI_Comm base, double timeout, int64_t max_message);
  // The communicators of a split of `parent` (null on ranks outside every group).
  std::shared_ptr<CommState> split(CommState& parent, int32_t color, int32_t key);

  // Queues an operation; its first phase is posted by the engine thread in queue order.
  void submit(const std::shared_ptr<CommState>& comm, const std::shared_ptr<Operation>& op);
  // Breaks `comm` on this rank (the first reason stays): fails its operations, tells the peers.
  // `timed_out`: a peer may be dead, so MPI is not finalised later.
  void break_comm(const std::shared_ptr<CommState>& comm, const std::string& reason,
                  bool timed_out);
  // After `comm`'s operation `seq` timed out on this rank: asks every peer how far it got, for at
  // most `window` seconds, and returns what they said for the error message ("rank 2 does not
  // answer, ...; rank 3 (last started #11) has not reached #12; rank 1 reached #12 too"), or ""
  // when nothing could be asked. A probe under way (or done) for the same operation serves every
  // later caller.
  std::string probe_peers(const std::shared_ptr<CommState>& comm, uint64_t seq, double window);
  // The communicator object is gone: its MPI communicators are freed once its operations
  // finished (never when broken), and MPI is finalised after the last one when moert owns it.
  // Waits (at most `timeout`) until moert makes no more MPI calls for it, then for that
  // finalisation while the other ranks come to it, at most the longer of `timeout` and the
  // default collective timeout: a host may call MPI_Finalize, or exit, right after.
  void close(const std::shared_ptr<CommState>& comm, double timeout);

  // Waiters blocked in wait(): the engine polls without sleeping while there are any.
  std::atomic<int> waiters{0};

 private:
  Engine() = default;
  void run();
  void initialise();
  // Registers the MPI_COMM_SELF attribute whose deletion stops the engine (above).
  void watch_finalize();
  static int on_finalize(MPI_Comm comm, int keyval, void* value, void* engine);
  // The engine thread's part of a host's MPI_Finalize: breaks and fails everything.
  void stop_for_host_finalize();
  bool progress_comm(CommState& c);
  // Answers the peers' probes and advances this rank's own; true when anything moved.
  bool serve_probes(CommState& c);
  bool advance_probe(CommState& c, Probe& p);
  void finish_probe(CommState& c, Probe& p);
  // Finishes every probe under way (their receives taken back): before MPI goes or the
  // communicator is released.
  void finish_probes(CommState& c);
  bool advance(CommState& c, const std::shared_ptr<Operation>& op);
  void fail_all(CommState& c, const std::string& reason);
  void send_notices(CommState& c, const std::string& reason);
  void release(CommState& c);
  bool may_finalise() const;  // under mu_
  std::shared_ptr<CommState> add(MPI_Comm data, MPI_Comm control, double timeout,
                                 int64_t max_message);
  // Keeps MPI from being finalised while a communicator is being made.
  class Creation {
   public:
    explicit Creation(Engine& e);
    ~Creation();
    Creation(const Creation&) = delete;
    Creation& operator=(const Creation&) = delete;

   private:
    Engine& e_;
  };
  // Runs `body` on a helper thread; false when it did not return within `timeout` seconds (the
  // thread is then left to itself).
  bool run_blocking(const std::function<void()>& body, double timeout);

  std::mutex mu_;
  std::condition_variable cv_;       // wakes the engine thread
  std::condition_variable done_cv_;  // initialisation, releases, finalisation
  std::deque<std::function<void()>> commands_;
  std::vector<std::shared_ptr<CommState>> comms_;      // engine thread only
  std::vector<std::shared_ptr<CommState>> graveyard_;  // broken and freed: MPI may still use them
  enum class State { Starting, Running, Failed, Finalised } state_ = State::Starting;
  std::string failure_;  // why MPI cannot be used
  bool owns_mpi_ = false;
  bool timed_out_ = false;       // an operation timed out somewhere: peers may be dead
  int stuck_helpers_ = 0;        // helper threads that never returned
  int live_ = 0;                 // communicators not yet released
  int creating_ = 0;             // communicators being made
  bool finalising_ = false;      // the engine thread is in MPI_Finalize
  bool host_finalised_ = false;  // the host called MPI_Finalize while the engine ran
  bool stopping_ = false;        // engine thread only: leave the loop after the commands
  bool released_any_ = false;
  bool started_ = false;
};

}  // namespace moert::mpi
