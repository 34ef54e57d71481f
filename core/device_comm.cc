#include "core/device_comm.h"

#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "core/comm_support.h"
#include "core/error.h"

namespace moert {
namespace {

// Forwards every call to another communicator; the views below override what they change.
class Forwarding : public Communicator {
 public:
  explicit Forwarding(std::shared_ptr<Communicator> inner) : inner_(std::move(inner)) {}

  const char* kind() const override { return inner_->kind(); }
  int32_t rank() const override { return inner_->rank(); }
  int32_t size() const override { return inner_->size(); }
  CommMemory memory() const override { return inner_->memory(); }
  int32_t device() const override { return inner_->device(); }
  void set_timeout(double seconds) override { inner_->set_timeout(seconds); }
  double timeout() const override { return inner_->timeout(); }
  bool broken() const override { return inner_->broken(); }
  std::string broken_reason() const override { return inner_->broken_reason(); }
  Request start_barrier() override { return inner_->start_barrier(); }
  bool agree(bool ok) override { return inner_->agree(ok); }

 protected:
  std::shared_ptr<Communicator> inner_;
};

class BackendView final : public Forwarding {
 public:
  BackendView(std::shared_ptr<Communicator> inner, Backend& be)
      : Forwarding(std::move(inner)), be_(be) {}

  Request start_all_reduce_sum(void* data, int64_t count, ReduceType type) override {
    return after_backend([&] { return inner_->start_all_reduce_sum(data, count, type); });
  }
  Request start_all_to_all_v(const void* send, const int64_t* send_bytes,
                             const int64_t* send_offsets, void* recv, const int64_t* recv_bytes,
                             const int64_t* recv_offsets) override {
    return after_backend([&] {
      return inner_->start_all_to_all_v(send, send_bytes, send_offsets, recv, recv_bytes,
                                        recv_offsets);
    });
  }
  Request start_all_gather(const void* send, int64_t bytes, void* recv) override {
    return after_backend([&] { return inner_->start_all_gather(send, bytes, recv); });
  }
  Request start_all_gather_v(const void* send, int64_t send_bytes, void* recv,
                             const int64_t* recv_bytes, const int64_t* recv_offsets) override {
    return after_backend([&] {
      return inner_->start_all_gather_v(send, send_bytes, recv, recv_bytes, recv_offsets);
    });
  }
  Request start_broadcast(void* data, int64_t bytes, int32_t root) override {
    return after_backend([&] { return inner_->start_broadcast(data, bytes, root); });
  }
  std::unique_ptr<Communicator> split(int32_t color, int32_t key) override {
    std::shared_ptr<Communicator> child = inner_->split(color, key);
    if (!child) return nullptr;
    return std::make_unique<BackendView>(std::move(child), be_);
  }

 private:
  // The stream is the backend's for this one start only: the communicator may be shared with
  // the host and with other sessions, whose streams are not this one.
  template <typename Start>
  Request after_backend(Start&& start) {
    void* stream = be_.native_stream();
    if (!stream) return start();
    inner_->set_stream(stream);
    Request r;
    try {
      r = start();
    } catch (...) {
      inner_->set_stream(nullptr);
      throw;
    }
    inner_->set_stream(nullptr);
    return r;
  }

  Backend& be_;
};

// An operation on backend copies of host buffers; `out` goes back to `host` on completion.
class StagedRequest final : public CommRequest {
 public:
  StagedRequest(std::vector<Buffer<uint8_t>> keep, Request inner, Backend& be, void* host,
                const uint8_t* out, size_t bytes)
      : keep_(std::move(keep)),
        inner_(std::move(inner)),
        be_(be),
        host_(host),
        out_(out),
        bytes_(bytes) {}

  void wait() override {
    inner_->wait();
    finish();
  }
  bool test() override {
    if (!inner_->test()) return false;
    finish();
    return true;
  }

 private:
  void finish() {
    if (done_) return;
    done_ = true;
    if (bytes_) be_.download(host_, out_, bytes_);
  }

  // Declared first, destroyed last: the inner request waits for the operation when destroyed
  // early, and only then may the buffers it uses go.
  std::vector<Buffer<uint8_t>> keep_;
  Request inner_;
  Backend& be_;
  void* host_;
  const uint8_t* out_;
  size_t bytes_;
  bool done_ = false;
};

class HostView final : public Forwarding {
 public:
  HostView(std::shared_ptr<Communicator> inner, Backend& be)
      : Forwarding(std::move(inner)), be_(be) {}

  CommMemory memory() const override { return CommMemory::Host; }
  int32_t device() const override { return -1; }

  Request start_all_reduce_sum(void* data, int64_t count, ReduceType type) override {
    try {
      comm::check_all_reduce(data, count, type);
    } catch (const Error&) {
      return inner_->start_all_reduce_sum(data, count, type);
    }
    const int64_t n = count * static_cast<int64_t>(reduce_type_size(type));
    auto d = up(data, n);
    uint8_t* p = d.data();
    return staged(inner_->start_all_reduce_sum(p, count, type), {}, std::move(d), data, n);
  }

  Request start_all_to_all_v(const void* send, const int64_t* sb, const int64_t* so, void* recv,
                             const int64_t* rb, const int64_t* ro) override {
    comm::Exchange x;
    try {
      x = comm::check_all_to_all_v(size(), send, sb, so, recv, rb, ro);
    } catch (const Error&) {
      return inner_->start_all_to_all_v(send, sb, so, recv, rb, ro);
    }
    auto s = up(send, x.send_total);
    auto r = up(recv, x.recv_total);  // the gaps between blocks come back unchanged
    uint8_t *ps = s.data(), *pr = r.data();
    return staged(inner_->start_all_to_all_v(ps, sb, so, pr, rb, ro), std::move(s), std::move(r),
                  recv, x.recv_total);
  }

  Request start_all_gather(const void* send, int64_t bytes, void* recv) override {
    try {
      comm::check_all_gather(size(), send, bytes, recv);
    } catch (const Error&) {
      return inner_->start_all_gather(send, bytes, recv);
    }
    const int64_t total = bytes * size();
    auto r = up(recv, total);
    const auto* h = static_cast<const uint8_t*>(send);
    const auto* base = static_cast<const uint8_t*>(recv);
    uint8_t* pr = r.data();
    if (h >= base && h < base + total)  // in place
      return staged(inner_->start_all_gather(pr + (h - base), bytes, pr), {}, std::move(r), recv,
                    total);
    auto s = up(send, bytes);
    uint8_t* ps = s.data();
    return staged(inner_->start_all_gather(ps, bytes, pr), std::move(s), std::move(r), recv, total);
  }

  Request start_all_gather_v(const void* send, int64_t send_bytes, void* recv, const int64_t* rb,
                             const int64_t* ro) override {
    comm::Exchange x;
    try {
      x = comm::check_all_gather_v(size(), rank(), send, send_bytes, recv, rb, ro);
    } catch (const Error&) {
      return inner_->start_all_gather_v(send, send_bytes, recv, rb, ro);
    }
    auto s = up(send, send_bytes);
    auto r = up(recv, x.recv_total);
    uint8_t *ps = s.data(), *pr = r.data();
    return staged(inner_->start_all_gather_v(ps, send_bytes, pr, rb, ro), std::move(s),
                  std::move(r), recv, x.recv_total);
  }

  Request start_broadcast(void* data, int64_t bytes, int32_t root) override {
    try {
      comm::check_broadcast(size(), data, bytes, root);
    } catch (const Error&) {
      return inner_->start_broadcast(data, bytes, root);
    }
    auto d = up(data, bytes);
    uint8_t* p = d.data();
    return staged(inner_->start_broadcast(p, bytes, root), {}, std::move(d), data, bytes);
  }

  std::unique_ptr<Communicator> split(int32_t color, int32_t key) override {
    std::shared_ptr<Communicator> child = inner_->split(color, key);
    if (!child) return nullptr;
    return std::make_unique<HostView>(std::move(child), be_);
  }

 private:
  Buffer<uint8_t> up(const void* host, int64_t bytes) {
    Buffer<uint8_t> b(be_, static_cast<size_t>(bytes));
    if (bytes > 0) be_.upload(b.data(), host, static_cast<size_t>(bytes));
    return b;
  }
  Request staged(Request inner, Buffer<uint8_t> in, Buffer<uint8_t> out, void* host,
                 int64_t bytes) {
    const uint8_t* p = out.data();
    std::vector<Buffer<uint8_t>> keep;
    keep.push_back(std::move(in));
    keep.push_back(std::move(out));
    return std::make_unique<StagedRequest>(std::move(keep), std::move(inner), be_, host, p,
                                           static_cast<size_t>(bytes));
  }

  Backend& be_;
};

}  // namespace

std::unique_ptr<Communicator> backend_view(std::shared_ptr<Communicator> inner, Backend& be) {
  return std::make_unique<BackendView>(std::move(inner), be);
}

std::unique_ptr<Communicator> host_view(std::shared_ptr<Communicator> inner, Backend& be) {
  return std::make_unique<HostView>(std::move(inner), be);
}

}  // namespace moert
