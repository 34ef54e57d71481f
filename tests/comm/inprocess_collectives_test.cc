// The collective cases (collective_cases.h) on the in-process communicator at 1, 2 and 4 ranks,
// one thread per rank, directly and through the host view of a device communicator; and the
// argument checks every implementation shares.
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "core/backend.h"
#include "core/comm_support.h"
#include "core/device_comm.h"
#include "core/error.h"
#include "tests/comm/collective_cases.h"
#include "tests/support/inprocess_communicator.h"

namespace moert::testing {
namespace {

struct Param {
  size_t index;
  int32_t size;
};

class InProcessCollectives : public ::testing::TestWithParam<Param> {};

TEST_P(InProcessCollectives, Case) {
  const CollectiveCase& c = collective_cases()[GetParam().index];
  const int32_t size = GetParam().size;
  if (size < c.min_size) GTEST_SKIP() << c.name << " needs " << c.min_size << " ranks";
  // A short timeout: a rank that fails early must not hold the others for long.
  auto ranks = make_inprocess_communicators(size, 60.0);
  std::vector<std::thread> threads;
  for (auto& r : ranks) threads.emplace_back([&, comm = r.get()] { run_on_rank(*comm, c.run); });
  for (auto& t : threads) t.join();
}

std::vector<Param> params() {
  std::vector<Param> out;
  for (size_t i = 0; i < collective_cases().size(); ++i)
    for (int32_t size : {1, 2, 4}) out.push_back({i, size});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Ranks, InProcessCollectives, ::testing::ValuesIn(params()),
                         [](const ::testing::TestParamInfo<Param>& p) {
                           return collective_cases()[p.param.index].name + "_" +
                                  std::to_string(p.param.size);
                         });

// The same cases through the host view of a device communicator (core/device_comm.h: what a
// CUDA session's bookkeeping goes through), staged here through CPU backend buffers over ranks
// that say they move device memory.
class HostViewCollectives : public ::testing::TestWithParam<Param> {};

TEST_P(HostViewCollectives, Case) {
  const CollectiveCase& c = collective_cases()[GetParam().index];
  const int32_t size = GetParam().size;
  if (size < c.min_size) GTEST_SKIP() << c.name << " needs " << c.min_size << " ranks";
  auto ranks = make_inprocess_communicators(size, 60.0, CommMemory::Device);
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Communicator>> views;
  for (auto& r : ranks) {
    backends.push_back(make_cpu_backend(1));
    std::shared_ptr<Communicator> device = backend_view(std::move(r), *backends.back());
    views.push_back(host_view(device, *backends.back()));
    EXPECT_EQ(views.back()->memory(), CommMemory::Host);
  }
  std::vector<std::thread> threads;
  for (auto& v : views) threads.emplace_back([&, comm = v.get()] { run_on_rank(*comm, c.run); });
  for (auto& t : threads) t.join();
}

INSTANTIATE_TEST_SUITE_P(Ranks, HostViewCollectives, ::testing::ValuesIn(params()),
                         [](const ::testing::TestParamInfo<Param>& p) {
                           return collective_cases()[p.param.index].name + "_" +
                                  std::to_string(p.param.size);
                         });

// ---- The argument checks of comm_support, which every implementation runs first.

void expect_invalid(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::InvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(CommArguments, AllReduce) {
  float x = 0;
  expect_invalid([&] { comm::check_all_reduce(&x, -1, ReduceType::F32); }, "count -1 is negative");
  expect_invalid([&] { comm::check_all_reduce(nullptr, 3, ReduceType::F32); }, "data is null");
  expect_invalid([&] { comm::check_all_reduce(&x, 1, static_cast<ReduceType>(7)); },
                 "element type 7");
  comm::check_all_reduce(nullptr, 0, ReduceType::I64);  // nothing to reduce: no buffer needed
}

TEST(CommArguments, AllToAllV) {
  std::vector<uint8_t> send(64), recv(64);
  const int64_t ok[2] = {8, 8}, offs[2] = {0, 8}, neg[2] = {8, -1}, big[2] = {INT64_MAX, 8};
  expect_invalid(
      [&] { comm::check_all_to_all_v(2, send.data(), neg, offs, recv.data(), ok, offs); },
      "send_bytes[1] = -1 is negative");
  expect_invalid([&] { comm::check_all_to_all_v(2, send.data(), ok, neg, recv.data(), ok, offs); },
                 "send_offsets[1] = -1 is negative");
  expect_invalid([&] { comm::check_all_to_all_v(2, send.data(), ok, offs, recv.data(), ok, big); },
                 "overflows");
  expect_invalid([&] { comm::check_all_to_all_v(2, nullptr, ok, offs, recv.data(), ok, offs); },
                 "send is null");
  expect_invalid(
      [&] { comm::check_all_to_all_v(2, send.data(), nullptr, offs, recv.data(), ok, offs); },
      "send_bytes is null");
  const int64_t same[2] = {0, 4};
  expect_invalid([&] { comm::check_all_to_all_v(2, send.data(), ok, offs, recv.data(), ok, same); },
                 "receive blocks overlap");
  expect_invalid(
      [&] { comm::check_all_to_all_v(2, send.data(), ok, offs, send.data() + 4, ok, offs); },
      "send and receive buffers overlap");
  const auto x = comm::check_all_to_all_v(2, send.data(), ok, offs, recv.data(), ok, offs);
  EXPECT_EQ(x.send_total, 16);
  EXPECT_EQ(x.recv_total, 16);
}

TEST(CommArguments, GathersAndBroadcast) {
  std::vector<uint8_t> buf(64);
  expect_invalid([&] { comm::check_all_gather(2, buf.data(), -2, buf.data()); }, "bytes -2");
  expect_invalid([&] { comm::check_all_gather(2, nullptr, 4, buf.data()); }, "send is null");
  const int64_t bytes[2] = {4, 4}, offs[2] = {0, 4};
  expect_invalid(
      [&] { comm::check_all_gather_v(2, 0, buf.data(), 5, buf.data() + 16, bytes, offs); },
      "recv_bytes[0] = 4 differs from this rank's send_bytes 5");
  // In place: the own block of recv is allowed as send, any other overlap is not.
  comm::check_all_gather_v(2, 1, buf.data() + 4, 4, buf.data(), bytes, offs);
  expect_invalid(
      [&] { comm::check_all_gather_v(2, 1, buf.data() + 2, 4, buf.data(), bytes, offs); },
      "overlap");
  expect_invalid([&] { comm::check_broadcast(2, buf.data(), 4, 2); }, "root 2 is not a rank of 2");
  expect_invalid([&] { comm::check_broadcast(2, buf.data(), -4, 0); }, "bytes -4 is negative");
  expect_invalid([] { comm::check_timeout(0.0); }, "timeout");
  expect_invalid([] { comm::check_timeout(std::nan("")); }, "timeout");
}

TEST(CommArguments, ReduceSegmentsCoverTheCount) {
  for (int64_t count : {0, 1, 5, 8, 1001})
    for (int32_t size : {1, 2, 3, 4, 7}) {
      int64_t at = 0;
      for (int32_t r = 0; r < size; ++r) {
        const auto s = comm::reduce_segment(count, size, r);
        EXPECT_EQ(s.begin, at);
        at += s.count;
      }
      EXPECT_EQ(at, count);
    }
}

TEST(InProcessCommunicator, RequestDestroyedUnwaitedStillCompletes) {
  auto ranks = make_inprocess_communicators(2, 30.0);
  std::vector<int64_t> a = {1, 2}, b = {10, 20};
  std::thread t([&] { ranks[1]->start_all_reduce_sum(b.data(), 2, ReduceType::I64); });
  { auto r = ranks[0]->start_all_reduce_sum(a.data(), 2, ReduceType::I64); }
  t.join();
  EXPECT_EQ(a, (std::vector<int64_t>{11, 22}));
  EXPECT_EQ(b, (std::vector<int64_t>{11, 22}));
}

}  // namespace
}  // namespace moert::testing
