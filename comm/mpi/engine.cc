#include "comm/mpi/engine.h"

#include <sched.h>
#include <signal.h>

#include <algorithm>
#include <cstring>
#include <future>
#include <limits>
#include <thread>

#include "kernels/cpu/signal_guard.h"

namespace moert::mpi {

std::string error_string(int code) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return cat("MPI error ", code);
  return std::string(text, static_cast<size_t>(len));
}

void check_mpi(int rc, const char* what) {
  if (rc != MPI_SUCCESS) fail(Code::Comm, what, " failed: ", error_string(rc));
}

namespace {

// The free staging buffers: a few, of bounded total size, the largest kept first.
struct StagingPool {
  static constexpr size_t kBuffers = 8;
  static constexpr int64_t kKeptBytes = int64_t{1} << 30;
  std::mutex mu;
  std::vector<std::pair<int64_t, char*>> free;  // (capacity, memory)
  int64_t kept = 0;
};

StagingPool& staging_pool() {
  static StagingPool* pool = new StagingPool;  // never destroyed: buffers come back at any time
  return *pool;
}

}  // namespace

Staging Staging::take(int64_t bytes) {
  Staging s;
  if (bytes <= 0) return s;
  StagingPool& pool = staging_pool();
  {
    // The smallest free buffer that fits.
    std::lock_guard<std::mutex> lock(pool.mu);
    size_t best = pool.free.size();
    for (size_t i = 0; i < pool.free.size(); ++i)
      if (pool.free[i].first >= bytes &&
          (best == pool.free.size() || pool.free[i].first < pool.free[best].first))
        best = i;
    if (best < pool.free.size()) {
      s.capacity_ = pool.free[best].first;
      s.data_ = pool.free[best].second;
      pool.kept -= s.capacity_;
      pool.free.erase(pool.free.begin() + static_cast<std::ptrdiff_t>(best));
      return s;
    }
  }
  s.data_ = new char[static_cast<size_t>(bytes)];
  s.capacity_ = bytes;
  return s;
}

void Staging::reset() {
  if (!data_) return;
  StagingPool& pool = staging_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    if (pool.free.size() < StagingPool::kBuffers &&
        pool.kept + capacity_ <= StagingPool::kKeptBytes) {
      pool.free.push_back({capacity_, data_});
      pool.kept += capacity_;
      data_ = nullptr;
      capacity_ = 0;
      return;
    }
  }
  delete[] data_;
  data_ = nullptr;
  capacity_ = 0;
}

std::string Operation::name() const { return cat(comm::op_name(op_), " #", seq_); }

Probe::Probe(uint64_t seq_, int32_t size, double window_seconds)
    : seq(seq_),
      deadline(std::chrono::steady_clock::now() +
               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                   std::chrono::duration<double>(window_seconds))),
      replies(3 * static_cast<size_t>(size), 0),
      recvs(static_cast<size_t>(size), MPI_REQUEST_NULL),
      answered(static_cast<size_t>(size), 0) {}

CommState::CommState(MPI_Comm data_comm, MPI_Comm control_comm, int32_t rank_, int32_t size_,
                     double timeout, int64_t max_message_)
    : data(data_comm),
      control(control_comm),
      rank(rank_),
      size(size_),
      max_message(max_message_),
      health(comm::label("MPI", rank_, size_), timeout) {
  void* value = nullptr;
  int found = 0;
  MPI_Comm_get_attr(data, MPI_TAG_UB, &value, &found);
  const int tag_ub = found && value ? *static_cast<int*>(value) : 32767;  // the standard's minimum
  tag_modulus = tag_ub / 4;
}

int CommState::tag(uint64_t seq, int phase) const {
  return static_cast<int>(seq % static_cast<uint64_t>(tag_modulus)) * 4 + phase;
}

void CommState::post_send(const char* p, int64_t bytes, int32_t peer, int tag, Posted& out) const {
  for (int64_t done = 0; done < bytes; done += max_message) {
    const int n = static_cast<int>(std::min(max_message, bytes - done));
    MPI_Request r = MPI_REQUEST_NULL;
    check_mpi(MPI_Isend(p + done, n, MPI_BYTE, peer, tag, data, &r), "MPI_Isend");
    out.add(r, -1);
  }
}

void CommState::post_recv(char* p, int64_t bytes, int32_t peer, int tag, Posted& out) const {
  for (int64_t done = 0; done < bytes; done += max_message) {
    const int n = static_cast<int>(std::min(max_message, bytes - done));
    MPI_Request r = MPI_REQUEST_NULL;
    check_mpi(MPI_Irecv(p + done, n, MPI_BYTE, peer, tag, data, &r), "MPI_Irecv");
    out.add(r, n);
  }
}

namespace {

// Why every communicator alive at a host's MPI_Finalize is broken.
constexpr const char* kHostFinalizedReason =
    "the host called MPI_Finalize while this communicator was alive (free every moert "
    "communicator, and every session and options holding one, before MPI_Finalize)";

// The first byte of a notice: why the peer broke.
constexpr char kTimeoutNotice = 'T', kErrorNotice = 'E';

// Tags on a communicator's control communicator: a peer's notice, a probe's question and its
// answer (Probe).
constexpr int kNoticeTag = 1, kQuestionTag = 2;
// A probe's answers come on a tag of its own, from kAnswerTags counted from kFirstAnswerTag by its
// operation's number (every MPI offers tags up to 32767): a late answer to one probe is then
// never taken by another's receive.
constexpr int kFirstAnswerTag = 16, kAnswerTags = 1024;

// "rank 2", "ranks 1 and 3", "ranks 1, 3, 5 and 4 more": at most kListed ranks are named.
std::string ranks_text(const std::vector<std::string>& ranks) {
  constexpr size_t kListed = 8;
  std::string out = ranks.size() == 1 ? "rank " : "ranks ";
  const size_t shown = std::min(ranks.size(), kListed);
  for (size_t i = 0; i < shown; ++i) {
    if (i > 0) out += i + 1 == shown && shown == ranks.size() ? " and " : ", ";
    out += ranks[i];
  }
  if (shown < ranks.size()) out += cat(" and ", ranks.size() - shown, " more");
  return out;
}

// Takes back a pending receive (MPI_Cancel is defined for receives).
void cancel_recv(MPI_Request& r) {
  if (r == MPI_REQUEST_NULL) return;
  MPI_Cancel(&r);
  MPI_Wait(&r, MPI_STATUS_IGNORE);
}

// Open MPI's MPI_Init installs handlers for SIGABRT, SIGBUS, SIGFPE and SIGSEGV (its stack
// traces); a library must not change its host's signal handling, so the host's are put back.
class SignalGuard {
 public:
  SignalGuard() {
    for (int s = 1; s < kSignals; ++s) saved_[s].ok = sigaction(s, nullptr, &saved_[s].action) == 0;
  }
  ~SignalGuard() {
    for (int s = 1; s < kSignals; ++s) {
      struct sigaction now {};
      if (!saved_[s].ok || sigaction(s, nullptr, &now) != 0) continue;
      if (now.sa_handler != saved_[s].action.sa_handler) sigaction(s, &saved_[s].action, nullptr);
    }
  }

 private:
  static constexpr int kSignals = 32;
  struct Saved {
    struct sigaction action {};
    bool ok = false;
  };
  Saved saved_[kSignals];
};

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE:
      return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED:
      return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED:
      return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE:
      return "MPI_THREAD_MULTIPLE";
    default:
      return "an unknown thread level";
  }
}

// The MPI library this plugin's calls reach must be the Open MPI it was compiled against: a host
// that loaded another MPI first would capture the plugin's MPI symbols.
void check_library() {
  char version[MPI_MAX_LIBRARY_VERSION_STRING] = {0};
  int len = 0;
  MPI_Get_library_version(version, &len);
  const std::string v(version, static_cast<size_t>(len > 0 ? len : 0));
  const std::string want = cat("Open MPI v", OMPI_MAJOR_VERSION, ".", OMPI_MINOR_VERSION, ".");
  if (v.rfind(want, 0) != 0)
    fail(Code::Unsupported, "the MPI library in this process is '", v.substr(0, v.find('\n')),
         "'; libmoert_mpi.so was built for Open MPI ", OMPI_MAJOR_VERSION, ".", OMPI_MINOR_VERSION,
         " and works only with it");
}

}  // namespace

Engine& Engine::start(double timeout) {
  static Engine* engine = new Engine;  // never destroyed: its thread may outlive static destructors
  Engine& e = *engine;
  std::unique_lock<std::mutex> lock(e.mu_);
  if (!e.started_) {
    e.started_ = true;
    const cpu::AsyncSignalScope no_signals;  // the thread starts with it (thread_pool.cc)
    std::thread([&e] { e.run(); }).detach();
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
  if (!e.done_cv_.wait_until(lock, deadline, [&] { return e.state_ != State::Starting; }))
    fail(Code::Comm, "MPI initialisation did not complete within ", timeout,
         " s (did every rank of the job create its communicator?)");
  if (e.state_ == State::Failed) fail(Code::Unsupported, e.failure_);
  if (e.host_finalised_)
    fail(Code::InvalidState,
         "the host called MPI_Finalize; MPI cannot be used again in this process");
  if (e.state_ == State::Finalised)
    fail(Code::InvalidState,
         "moert finalised MPI when its last MPI communicator was freed, and MPI cannot be "
         "initialised twice in one process: keep one communicator alive for as long as the "
         "process uses MPI");
  return e;
}

void Engine::initialise() {
  check_library();
  int finalized = 0, initialized = 0;
  MPI_Finalized(&finalized);
  if (finalized)
    fail(Code::InvalidState, "MPI has already been finalised in this process; it cannot be used");
  MPI_Initialized(&initialized);
  int provided = MPI_THREAD_SINGLE;
  if (initialized) {
    MPI_Query_thread(&provided);
    if (provided < MPI_THREAD_MULTIPLE)
      fail(Code::Unsupported, "the host initialised MPI with ", thread_level_name(provided),
           "; moert's progress thread calls MPI while the host's threads may, which needs "
           "MPI_THREAD_MULTIPLE (MPI_Init_thread)");
    watch_finalize();
    return;
  }
  {
    const SignalGuard guard;
    const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
    if (rc != MPI_SUCCESS) fail(Code::Unsupported, "MPI_Init_thread failed: ", error_string(rc));
  }
  owns_mpi_ = true;
  if (provided < MPI_THREAD_MULTIPLE)
    fail(Code::Unsupported, "this Open MPI provides only ", thread_level_name(provided),
         "; moert needs MPI_THREAD_MULTIPLE");
  // moert finalises MPI itself, but the host can still call MPI_Finalize (MPI is initialised).
  watch_finalize();
}

void Engine::watch_finalize() {
  int keyval = MPI_KEYVAL_INVALID;
  check_mpi(MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, &Engine::on_finalize, &keyval, this),
            "MPI_Comm_create_keyval");
  check_mpi(MPI_Comm_set_attr(MPI_COMM_SELF, keyval, nullptr), "MPI_Comm_set_attr");
}

int Engine::on_finalize(MPI_Comm, int, void*, void* engine) {
  Engine& e = *static_cast<Engine*>(engine);
  std::unique_lock<std::mutex> lock(e.mu_);
  // moert's own MPI_Finalize, on the engine thread, which has nothing left to stop.
  if (e.finalising_ || e.state_ != State::Running) return MPI_SUCCESS;
  // From here on submit() and creations refuse at once: an operation queued behind the stop
  // would never be run, and its caller would wait out its timeout.
  e.host_finalised_ = true;
  e.commands_.push_back([&e] { e.stop_for_host_finalize(); });
  e.cv_.notify_one();
  // A creation under way finishes its MPI calls on its caller's thread (rank, size, attributes)
  // while MPI still works, or gives up within 50 ms (run_blocking); the engine thread is never
  // blocked for long (its MPI calls do not block). The bound keeps a host's shutdown from
  // hanging on a defect here. A creation's helper blocked in MPI_Comm_dup for peers that never
  // come stays there: nothing can take it back out of MPI.
  e.done_cv_.wait_for(lock, std::chrono::seconds(30),
                      [&] { return e.state_ == State::Finalised && e.creating_ == 0; });
  return MPI_SUCCESS;
}

void Engine::stop_for_host_finalize() {
  for (const auto& c : comms_) {
    c->health.mark_broken(kHostFinalizedReason);
    fail_all(*c, c->health.reason());
    // Peers are told nothing: they are finalising too, or find out at their own timeout. The
    // receives are this rank's alone to take back.
    cancel_recv(c->notice_recv);
    cancel_recv(c->question_recv);
    finish_probes(*c);
  }
  stopping_ = true;
}

void Engine::run() {
  // The library's own threads take no asynchronous signal (moert.h, Signals): the host's go to
  // the host's threads. Blocked before MPI_Init, so the threads Open MPI starts from here inherit
  // the mask.
  cpu::block_async_signals();
  {
    std::string why;
    try {
      initialise();
    } catch (const std::exception& e) {
      why = e.what();
    }
    std::lock_guard<std::mutex> lock(mu_);
    state_ = why.empty() ? State::Running : State::Failed;
    failure_ = why;
    done_cv_.notify_all();
    if (!why.empty()) return;
  }
  // Polling: after anything moved, spin (yielding) for a while, then sleep in short steps while
  // operations are in flight, so that a caller computing on the same cores keeps most of them;
  // while a caller is blocked in wait(), its core is idle and the engine polls without sleeping.
  constexpr int kSpins = 200;
  constexpr auto kIdlePoll = std::chrono::milliseconds(20);
  const auto nap = std::chrono::microseconds(50);
  int idle_rounds = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    while (!commands_.empty()) {
      auto fn = std::move(commands_.front());
      commands_.pop_front();
      lock.unlock();
      fn();
      lock.lock();
    }
    if (stopping_) {
      // MPI is going: no MPI call from here on. Commands queued later are never run; submit()
      // and close() look at the state instead.
      state_ = State::Finalised;
      done_cv_.notify_all();
      return;
    }
    lock.unlock();
    bool moved = false, busy = false;
    for (size_t i = 0; i < comms_.size();) {
      CommState& c = *comms_[i];
      moved |= progress_comm(c);
      if (c.closing && c.queued.empty() && c.active.empty()) {
        release(c);
        if (c.health.broken() || c.keeps_memory) graveyard_.push_back(comms_[i]);
        comms_.erase(comms_.begin() + static_cast<std::ptrdiff_t>(i));
        moved = true;
        continue;
      }
      busy |= !c.active.empty() || !c.queued.empty();
      ++i;
    }
    lock.lock();
    if (may_finalise()) {
      finalising_ = true;
      lock.unlock();
      MPI_Finalize();
      lock.lock();
      state_ = State::Finalised;
      done_cv_.notify_all();
      return;
    }
    if (!commands_.empty()) continue;
    if (moved) {
      idle_rounds = 0;
      continue;
    }
    if (!busy) {
      // Idle: still look for the peers' notices now and then, so that broken() tells the truth
      // between operations; with no communicator there is nothing to look at.
      if (comms_.empty())
        cv_.wait(lock, [&] { return !commands_.empty(); });
      else
        cv_.wait_for(lock, kIdlePoll, [&] { return !commands_.empty(); });
      continue;
    }
    if (waiters.load() > 0 || ++idle_rounds < kSpins) {
      lock.unlock();
      sched_yield();
      lock.lock();
    } else {
      cv_.wait_for(lock, nap);
    }
  }
}

bool Engine::progress_comm(CommState& c) {
  bool moved = serve_probes(c);
  if (c.notice_recv != MPI_REQUEST_NULL && !c.health.broken()) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Test(&c.notice_recv, &flag, &st) == MPI_SUCCESS && flag) {
      c.notice[sizeof c.notice - 1] = '\0';
      const std::string text(c.notice + 1);
      // A peer's timeout may mean a dead rank: finalising would wait for it.
      if (c.notice[0] == kTimeoutNotice) {
        std::lock_guard<std::mutex> lock(mu_);
        timed_out_ = true;
      }
      c.health.mark_broken(cat("rank ", st.MPI_SOURCE, " reported: ", text));
      c.noticed_peers = true;  // the reporter told everyone already
      moved = true;
    }
  }
  if (c.health.broken()) {
    if (!c.queued.empty() || !c.active.empty()) {
      fail_all(c, c.health.reason());
      moved = true;
    }
    if (!c.noticed_peers) send_notices(c, c.health.reason());
    return moved;
  }
  while (!c.queued.empty()) {
    auto op = std::move(c.queued.front());
    c.queued.pop_front();
    c.active.push_back(op);
    if (!advance(c, op)) return true;  // the communicator broke
    moved = true;
  }
  for (size_t i = 0; i < c.active.size();) {
    const auto op = c.active[i];
    int flag = 1;
    if (!op->posted.requests.empty()) {
      std::vector<MPI_Status> statuses(op->posted.requests.size());
      const int rc = MPI_Testall(static_cast<int>(op->posted.requests.size()),
                                 op->posted.requests.data(), &flag, statuses.data());
      if (flag || rc != MPI_SUCCESS) {
        std::string bad;
        if (rc == MPI_ERR_IN_STATUS) {
          for (const auto& st : statuses)
            if (st.MPI_ERROR != MPI_SUCCESS && st.MPI_ERROR != MPI_ERR_PENDING) {
              bad = error_string(st.MPI_ERROR);
              break;
            }
        } else if (rc != MPI_SUCCESS) {
          bad = error_string(rc);
        }
        for (size_t k = 0; bad.empty() && k < statuses.size(); ++k) {
          if (op->posted.expected[k] < 0) continue;
          int got = -1;
          MPI_Get_count(&statuses[k], MPI_BYTE, &got);
          if (got != op->posted.expected[k])
            bad = cat("received ", got, " bytes from rank ", statuses[k].MPI_SOURCE, " where ",
                      op->posted.expected[k], " were due");
        }
        if (!bad.empty()) {
          const std::string reason = cat(op->name(), " failed on rank ", c.rank, ": ", bad);
          c.health.mark_broken(reason);
          fail_all(c, reason);
          send_notices(c, reason);
          return true;
        }
      }
    }
    if (!flag) {
      ++i;
      continue;
    }
    moved = true;
    op->posted.clear();
    if (!advance(c, op)) return true;
    if (op->status == Operation::Status::Done || op->status == Operation::Status::Failed) {
      c.active.erase(c.active.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
  return moved;
}

bool Engine::serve_probes(CommState& c) {
  bool moved = false;
  // Answers sent: their memory goes once MPI is done with it.
  std::erase_if(c.answers, [](const std::unique_ptr<CommState::Answer>& a) {
    int sent = 0;
    // An error completes the request too.
    return MPI_Test(&a->request, &sent, MPI_STATUS_IGNORE) != MPI_SUCCESS || sent;
  });
  // A peer's question: answered with how far this rank got.
  int flag = 0;
  MPI_Status st;
  if (c.question_recv != MPI_REQUEST_NULL) {
    if (MPI_Test(&c.question_recv, &flag, &st) != MPI_SUCCESS) {
      c.question_recv = MPI_REQUEST_NULL;  // stops answering; the askers say so
    } else if (flag) {
      moved = true;
      const int peer = st.MPI_SOURCE;
      if (peer >= 0 && peer < c.size) {
        auto a = std::make_unique<CommState::Answer>();
        {
          std::lock_guard<std::mutex> lock(c.seq_mu);
          a->words[0] = static_cast<int64_t>(c.next_seq);
        }
        a->words[1] = c.health.broken() ? 1 : 0;
        a->words[2] = c.question_in[0];
        const int64_t tag = c.question_in[1];
        if (tag >= kFirstAnswerTag && tag < kFirstAnswerTag + kAnswerTags &&
            MPI_Isend(a->words, 3, MPI_INT64_T, peer, static_cast<int>(tag), c.control,
                      &a->request) == MPI_SUCCESS)
          c.answers.push_back(std::move(a));
      }
      if (MPI_Irecv(c.question_in, 2, MPI_INT64_T, MPI_ANY_SOURCE, kQuestionTag, c.control,
                    &c.question_recv) != MPI_SUCCESS)
        c.question_recv = MPI_REQUEST_NULL;
    }
  }
  // This rank's own probes.
  for (const auto& probe : c.probe_list()) moved |= advance_probe(c, *probe);
  return moved;
}

bool Engine::advance_probe(CommState& c, Probe& p) {
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.done) return false;
  }
  bool moved = false;
  if (!p.posted) {
    p.posted = true;
    moved = true;
    p.question[0] = static_cast<int64_t>(p.seq);
    p.question[1] = kFirstAnswerTag + static_cast<int64_t>(p.seq % kAnswerTags);
    const int tag = static_cast<int>(p.question[1]);
    for (int32_t peer = 0; peer < c.size; ++peer) {
      if (peer == c.rank) continue;
      const size_t i = static_cast<size_t>(peer);
      if (MPI_Irecv(&p.replies[3 * i], 3, MPI_INT64_T, peer, tag, c.control, &p.recvs[i]) !=
          MPI_SUCCESS) {
        p.recvs[i] = MPI_REQUEST_NULL;
        continue;
      }
      // Never waited for: a dead peer never takes it. The question lives in the probe, which
      // the communicator keeps for good.
      MPI_Request r = MPI_REQUEST_NULL;
      if (MPI_Isend(p.question, 2, MPI_INT64_T, peer, kQuestionTag, c.control, &r) == MPI_SUCCESS)
        MPI_Request_free(&r);
    }
  }
  bool all = true;
  for (int32_t peer = 0; peer < c.size; ++peer) {
    const size_t i = static_cast<size_t>(peer);
    if (peer == c.rank || p.answered[i] || p.recvs[i] == MPI_REQUEST_NULL) continue;
    int flag = 0;
    if (MPI_Test(&p.recvs[i], &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && flag) {
      moved = true;
      if (p.replies[3 * i + 2] == p.question[0]) {
        p.answered[i] = 1;
        continue;
      }
      // A late answer to an earlier probe on the same tag (kAnswerTags operations before):
      // wait for this one's.
      all = false;
      if (MPI_Irecv(&p.replies[3 * i], 3, MPI_INT64_T, peer, static_cast<int>(p.question[1]),
                    c.control, &p.recvs[i]) != MPI_SUCCESS)
        p.recvs[i] = MPI_REQUEST_NULL;
    } else {
      all = false;
    }
  }
  if (all || std::chrono::steady_clock::now() >= p.deadline) {
    finish_probe(c, p);
    moved = true;
  }
  return moved;
}

void Engine::finish_probes(CommState& c) {
  for (const auto& probe : c.probe_list()) {
    bool done = false;
    {
      std::lock_guard<std::mutex> lock(probe->mu);
      done = probe->done;
    }
    if (!done) finish_probe(c, *probe);
  }
}

void Engine::finish_probe(CommState& c, Probe& p) {
  std::vector<std::string> silent, behind, with_it, gave_up;
  for (int32_t peer = 0; peer < c.size; ++peer) {
    if (peer == c.rank) continue;
    const size_t i = static_cast<size_t>(peer);
    if (!p.answered[i] && p.recvs[i] != MPI_REQUEST_NULL) {
      // An answer may have come in meanwhile: the cancel then fails and the receive completes.
      MPI_Cancel(&p.recvs[i]);
      MPI_Status st;
      int cancelled = 1;
      if (MPI_Wait(&p.recvs[i], &st) == MPI_SUCCESS) MPI_Test_cancelled(&st, &cancelled);
      p.answered[i] = !cancelled && p.replies[3 * i + 2] == p.question[0] ? 1 : 0;
    }
    if (!p.answered[i]) {
      silent.push_back(std::to_string(peer));
      continue;
    }
    const int64_t started = p.replies[3 * i];
    const bool peer_broken = p.replies[3 * i + 1] != 0;
    if (started <= static_cast<int64_t>(p.seq))
      behind.push_back(started == 0 ? cat(peer, " (no operation started)")
                                    : cat(peer, " (last started #", started - 1, ")"));
    else
      (peer_broken ? gave_up : with_it).push_back(std::to_string(peer));
  }
  std::vector<std::string> parts;
  if (!silent.empty())
    parts.push_back(cat(ranks_text(silent), silent.size() == 1 ? " does" : " do",
                        " not answer, so dead, stopped or without this communicator"));
  if (!behind.empty())
    parts.push_back(
        cat(ranks_text(behind), behind.size() == 1 ? " has" : " have", " not reached #", p.seq));
  // A peer that gave up (timed out there itself, or heard of a failure) waited there too.
  if (!with_it.empty()) parts.push_back(cat(ranks_text(with_it), " reached #", p.seq, " too"));
  if (!gave_up.empty())
    parts.push_back(cat(ranks_text(gave_up), " reached #", p.seq, " too and gave up"));
  std::string summary;
  for (const auto& part : parts) summary += (summary.empty() ? "" : "; ") + part;
  std::lock_guard<std::mutex> lock(p.mu);
  p.done = true;
  p.summary = summary;
  p.cv.notify_all();
}

std::string Engine::probe_peers(const std::shared_ptr<CommState>& comm, uint64_t seq,
                                double window) {
  if (comm->size < 2) return "";
  std::shared_ptr<Probe> probe;
  {
    std::lock_guard<std::mutex> lock(comm->probe_mu);
    const auto same = std::find_if(comm->probes.begin(), comm->probes.end(),
                                   [&](const std::shared_ptr<Probe>& p) { return p->seq == seq; });
    if (same != comm->probes.end()) {
      probe = *same;
    } else {
      {
        std::lock_guard<std::mutex> engine_lock(mu_);
        if (state_ != State::Running || host_finalised_ || comm->health.broken()) return "";
        // Picked up by the engine's next look at the communicator.
        commands_.push_back([] {});
        cv_.notify_one();
      }
      probe = std::make_shared<Probe>(seq, comm->size, window);
      comm->probes.push_back(probe);
    }
  }
  ++waiters;
  std::unique_lock<std::mutex> lock(probe->mu);
  // The engine never blocks in MPI and finishes the probe at its deadline; the margin covers
  // its scheduling on a loaded machine.
  probe->cv.wait_until(lock, probe->deadline + std::chrono::milliseconds(250),
                       [&] { return probe->done; });
  --waiters;
  return probe->done ? probe->summary : "";
}

// Runs the next step of `op`. False when the communicator broke.
bool Engine::advance(CommState& c, const std::shared_ptr<Operation>& op) {
  std::string reason;
  Code code = Code::Comm;
  {
    std::lock_guard<std::mutex> lock(op->mu);
    if (op->status == Operation::Status::Failed) {
      // The caller gave up on it (timeout) and broke the communicator.
      return true;
    }
    op->status = Operation::Status::Active;
    try {
      if (op->advance(c, op->posted)) return true;
      op->status = Operation::Status::Done;
      op->cv.notify_all();
      return true;
    } catch (const AgreedFailure& e) {
      // Every rank fails this operation alike and none posted its data: the communicator is
      // whole.
      op->status = Operation::Status::Failed;
      op->code = e.code();
      op->error = e.message();
      op->cv.notify_all();
      return true;
    } catch (const Error& e) {
      code = e.code();
      reason = e.what();
    } catch (const std::bad_alloc&) {
      reason = cat(op->name(), " on rank ", c.rank, ": out of memory for its staging buffers");
    } catch (const std::exception& e) {
      reason = cat(op->name(), " on rank ", c.rank, ": ", e.what());
    }
    // Broken before the caller hears of it: it may ask right after.
    c.health.mark_broken(reason);
    op->status = Operation::Status::Failed;
    op->code = code;
    // The caller's message names its rank (the first failure is the one an operator reads);
    // the peers' notice names the sender already.
    op->error = cat(c.health.label(), ": ", reason);
    op->cv.notify_all();
  }
  fail_all(c, reason);
  send_notices(c, reason);
  return false;
}

void Engine::fail_all(CommState& c, const std::string& reason) {
  const std::string message = cat(c.health.label(), " is broken (", reason, ")");
  auto fail_op = [&](const std::shared_ptr<Operation>& op) {
    {
      std::lock_guard<std::mutex> lock(op->mu);
      if (op->status != Operation::Status::Done && op->status != Operation::Status::Failed) {
        op->status = Operation::Status::Failed;
        op->code = Code::Comm;
        op->error = cat(message, "; ", op->name(), " did not complete");
        op->cv.notify_all();
      }
    }
    if (!op->posted.requests.empty()) c.orphans.push_back(op);
  };
  for (const auto& op : c.queued) fail_op(op);
  for (const auto& op : c.active) fail_op(op);
  c.queued.clear();
  c.active.clear();
}

void Engine::send_notices(CommState& c, const std::string& reason) {
  if (c.noticed_peers) return;
  c.noticed_peers = true;
  std::snprintf(c.notice_out, sizeof c.notice_out, "%c%s",
                c.timed_out.load() ? kTimeoutNotice : kErrorNotice, reason.c_str());
  for (int32_t p = 0; p < c.size; ++p) {
    if (p == c.rank) continue;
    MPI_Request r = MPI_REQUEST_NULL;
    // Never waited for: a dead peer never takes it. The text lives as long as the state, which a
    // broken communicator never gives back.
    if (MPI_Isend(c.notice_out, static_cast<int>(std::strlen(c.notice_out)) + 1, MPI_CHAR, p,
                  kNoticeTag, c.control, &r) == MPI_SUCCESS)
      c.notice_sends.push_back(r);
  }
}

void Engine::submit(const std::shared_ptr<CommState>& comm, const std::shared_ptr<Operation>& op) {
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ == State::Finalised || host_finalised_) {
    // Only after a host's MPI_Finalize can a communicator outlive the engine; it is broken, but
    // an operation started while it broke may have passed the health check.
    comm->health.mark_broken(kHostFinalizedReason);
    std::lock_guard<std::mutex> op_lock(op->mu);
    op->status = Operation::Status::Failed;
    op->code = Code::Comm;
    op->error = cat(comm->health.label(), " is broken (", comm->health.reason(), "); ", op->name(),
                    " refused");
    return;
  }
  commands_.push_back([comm, op] { comm->queued.push_back(op); });
  cv_.notify_one();
}

void Engine::break_comm(const std::shared_ptr<CommState>& comm, const std::string& reason,
                        bool timed_out) {
  // Before the mark: the engine may tell the peers as soon as it sees the communicator broken.
  if (timed_out) comm->timed_out.store(true);
  comm->health.mark_broken(reason);
  std::lock_guard<std::mutex> lock(mu_);
  if (timed_out) timed_out_ = true;
  commands_.push_back([this, comm] {
    fail_all(*comm, comm->health.reason());
    send_notices(*comm, comm->health.reason());
  });
  cv_.notify_one();
}

bool Engine::run_blocking(const std::function<void()>& body, double timeout) {
  auto done = std::make_shared<std::promise<void>>();
  auto future = done->get_future();
  {
    const cpu::AsyncSignalScope no_signals;  // the thread starts with it; the wait below does not
    std::thread([body, done] {
      cpu::block_async_signals();
      try {
        body();
        done->set_value();
      } catch (...) {
        done->set_exception(std::current_exception());
      }
    }).detach();
  }
  // In slices, so that a host's MPI_Finalize meanwhile (which leaves the helper blocked in MPI
  // for good) ends the wait at once rather than after the timeout.
  using Clock = std::chrono::steady_clock;
  const Clock::time_point deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                        std::chrono::duration<double>(timeout));
  for (;;) {
    const Clock::time_point slice =
        std::min(deadline, Clock::now() + Clock::duration(std::chrono::milliseconds(50)));
    if (future.wait_until(slice) == std::future_status::ready) break;
    std::lock_guard<std::mutex> lock(mu_);
    if (host_finalised_) {
      ++stuck_helpers_;
      fail(Code::InvalidState,
           "the host called MPI_Finalize while this MPI communicator was being made");
    }
    if (Clock::now() >= deadline) {
      ++stuck_helpers_;
      timed_out_ = true;
      return false;
    }
  }
  future.get();  // rethrows the helper's error
  return true;
}

std::shared_ptr<CommState> Engine::create(MPI_Comm base, double timeout, int64_t max_message) {
  auto made = std::make_shared<std::pair<MPI_Comm, MPI_Comm>>(MPI_COMM_NULL, MPI_COMM_NULL);
  const auto body = [base, made] {
    check_mpi(MPI_Comm_dup(base, &made->first), "MPI_Comm_dup");
    check_mpi(MPI_Comm_dup(made->first, &made->second), "MPI_Comm_dup");
    // Errors come back as codes on both: moert never lets MPI abort its host.
    check_mpi(MPI_Comm_set_errhandler(made->first, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check_mpi(MPI_Comm_set_errhandler(made->second, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  };
  const Creation creation(*this);
  if (!run_blocking(body, timeout))
    fail(Code::Comm, "creating an MPI communicator: MPI_Comm_dup did not complete within ", timeout,
         " s (did every rank of the communicator create it?) [timeout]");
  return add(made->first, made->second, timeout, max_message);
}

std::shared_ptr<CommState> Engine::split(CommState& parent, int32_t color, int32_t key) {
  const double timeout = parent.health.timeout();
  // The helper writes into this pair: when the helper is left behind, it must outlive the call.
  auto made = std::make_shared<std::pair<MPI_Comm, MPI_Comm>>(MPI_COMM_NULL, MPI_COMM_NULL);
  const MPI_Comm parent_control = parent.control;
  const auto body = [parent_control, made, color, key] {
    check_mpi(MPI_Comm_split(parent_control, color < 0 ? MPI_UNDEFINED : color, key, &made->first),
              "MPI_Comm_split");
    if (made->first == MPI_COMM_NULL) return;
    check_mpi(MPI_Comm_dup(made->first, &made->second), "MPI_Comm_dup");
    check_mpi(MPI_Comm_set_errhandler(made->first, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check_mpi(MPI_Comm_set_errhandler(made->second, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  };
  const Creation creation(*this);
  if (!run_blocking(body, timeout))
    fail(Code::Comm, parent.health.label(), ": split did not complete within ", timeout,
         " s [timeout]");
  if (made->first == MPI_COMM_NULL) return nullptr;
  return add(made->first, made->second, timeout, parent.max_message);
}

std::shared_ptr<CommState> Engine::add(MPI_Comm data, MPI_Comm control, double timeout,
                                       int64_t max_message) {
  int rank = 0, size = 0;
  MPI_Comm_rank(data, &rank);
  MPI_Comm_size(data, &size);
  auto state = std::make_shared<CommState>(data, control, rank, size, timeout, max_message);
  std::lock_guard<std::mutex> lock(mu_);
  // The engine has stopped, or will before it runs the command below.
  if (host_finalised_)
    fail(Code::InvalidState,
         "the host called MPI_Finalize while this MPI communicator was being made");
  ++live_;
  commands_.push_back([this, state] {
    if (MPI_Irecv(state->notice, sizeof state->notice - 1, MPI_CHAR, MPI_ANY_SOURCE, kNoticeTag,
                  state->control, &state->notice_recv) != MPI_SUCCESS)
      state->notice_recv = MPI_REQUEST_NULL;
    if (MPI_Irecv(state->question_in, 2, MPI_INT64_T, MPI_ANY_SOURCE, kQuestionTag, state->control,
                  &state->question_recv) != MPI_SUCCESS)
      state->question_recv = MPI_REQUEST_NULL;
    comms_.push_back(state);
  });
  cv_.notify_one();
  return state;
}

Engine::Creation::Creation(Engine& e) : e_(e) {
  std::lock_guard<std::mutex> lock(e_.mu_);
  if (e_.state_ != State::Running || e_.finalising_ || e_.host_finalised_)
    fail(Code::InvalidState, "MPI is no longer usable in this process (",
         e_.host_finalised_ ? "the host called MPI_Finalize" : "moert finalised it", ")");
  ++e_.creating_;
}

Engine::Creation::~Creation() {
  std::unique_lock<std::mutex> lock(e_.mu_);
  if (e_.host_finalised_) {
    --e_.creating_;
    e_.done_cv_.notify_all();  // the host's MPI_Finalize waits for the creations under way
    return;
  }
  // A creation that failed may leave MPI due for finalisation (the last communicator went while
  // it ran, and its close did not wait): the engine thread, asleep with no communicator, takes
  // another look, and this thread waits for it as that close would have, so that the host does
  // not exit while MPI_Finalize runs.
  if (--e_.creating_ == 0 && e_.may_finalise()) {
    e_.commands_.push_back([] {});
    e_.cv_.notify_one();
    e_.done_cv_.wait_for(lock, std::chrono::duration<double>(kDefaultCommTimeoutSeconds), [&] {
      return e_.state_ == State::Finalised || !(e_.finalising_ || e_.may_finalise());
    });
  }
}

void Engine::release(CommState& c) {
  // A probe's questions may still be on their way to peers that never take them, and answers to
  // the peers' probes still being sent: their memory stays.
  finish_probes(c);
  {
    std::lock_guard<std::mutex> lock(c.probe_mu);
    if (!c.probes.empty()) c.keeps_memory = true;
  }
  if (!c.health.broken()) {
    // A healthy communicator has no operation in flight: its MPI state can go. Sends still under
    // way complete first (MPI frees the communicator after them).
    cancel_recv(c.notice_recv);
    cancel_recv(c.question_recv);
    for (auto& a : c.answers) {
      MPI_Request_free(&a->request);
      c.keeps_memory = true;
    }
    MPI_Comm data = c.data, control = c.control;
    MPI_Comm_free(&data);
    MPI_Comm_free(&control);
  }
  // A broken one keeps its MPI communicators: operations may still be pending on them, and
  // freeing those is erroneous. Its memory stays with the engine.
  std::lock_guard<std::mutex> lock(mu_);
  c.released = true;
  released_any_ = true;
  --live_;
  done_cv_.notify_all();
}

bool Engine::may_finalise() const {
  return owns_mpi_ && released_any_ && live_ == 0 && creating_ == 0 && !timed_out_ &&
         stuck_helpers_ == 0;
}

void Engine::close(const std::shared_ptr<CommState>& comm, double timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  commands_.push_back([comm] { comm->closing = true; });
  cv_.notify_one();
  const auto start = std::chrono::steady_clock::now();
  done_cv_.wait_until(lock, start + std::chrono::duration<double>(timeout),
                      [&] { return state_ == State::Finalised || comm->released; });
  // MPI_Finalize returns once every rank has come to it, and ranks end their own work at their
  // own pace: a process that exited before would make mpirun end the job, killing the ranks
  // still at work, so a short collective timeout does not cut this wait short. A dead peer does
  // not hold it up (Open MPI ends the job, or with --enable-recovery lets finalisation pass
  // it); a live one that timed out after this rank's last collective never comes, hence a bound.
  const auto finalise_deadline =
      start + std::chrono::duration<double>(std::max(timeout, kDefaultCommTimeoutSeconds));
  if (comm->released && (finalising_ || may_finalise()))
    done_cv_.wait_until(lock, finalise_deadline, [&] {
      return state_ == State::Finalised || !(finalising_ || may_finalise());
    });
}

}  // namespace moert::mpi
