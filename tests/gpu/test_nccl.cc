// The NCCL communicator (inside libmoert_cuda.so) against the collective cases every
// communicator meets (tests/comm/collective_cases.cc), on one GPU with one rank and, where two
// GPUs are lent, on two ranks (one thread each). The cases speak host memory; a staging wrapper
// copies their buffers to the GPU through the CUDA backend before each operation and back after.
// Then a CUDA session over a one-rank NCCL communicator against a plain CUDA session.
// Exits 77 (skipped) without a GPU; the two-GPU test skips itself with one.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "core/backend.h"
#include "core/communicator.h"
#include "core/device_comm.h"
#include "core/error.h"
#include "core/session.h"
#include "gpu_test_main.h"
#include "tests/comm/collective_cases.h"
#include "tests/unit/session_model.h"

namespace moert {
namespace {

std::string plugin_path() {
  const char* env = std::getenv("MOERT_CUDA_PLUGIN");
  return env ? env : MOERT_CUDA_PLUGIN_PATH;
}

// A rank's host-memory view of an NCCL communicator, for the shared cases: the session's own
// staging (core/device_comm.h), so that these cases test what sessions use. The backend that
// stages outlives the view.
struct StagedRank {
  std::unique_ptr<Backend> be;
  std::unique_ptr<Communicator> view;
  Communicator& operator*() { return *view; }
  Communicator* operator->() { return view.get(); }
};

StagedRank staged_rank(const std::vector<uint8_t>& id, int32_t rank, int32_t size, int32_t device) {
  StagedRank s;
  s.be = make_cuda_backend(device, plugin_path());
  std::shared_ptr<Communicator> inner =
      make_nccl_communicator(id.data(), rank, size, device, 60.0, plugin_path());
  s.view = host_view(std::move(inner), *s.be);
  return s;
}

std::vector<uint8_t> fresh_id() {
  std::vector<uint8_t> id(kNcclUniqueIdBytes);
  nccl_unique_id(id.data(), plugin_path());
  return id;
}

class NcclOneRank : public ::testing::TestWithParam<size_t> {};

TEST_P(NcclOneRank, Case) {
  const auto& c = testing::collective_cases()[GetParam()];
  if (c.min_size > 1) GTEST_SKIP() << "needs " << c.min_size << " ranks";
  if (c.checks_agreement) GTEST_SKIP() << "NCCL does not check that the ranks' sizes agree";
  auto comm = staged_rank(fresh_id(), 0, 1, 0);
  EXPECT_STREQ(comm->kind(), "nccl");
  testing::run_on_rank(*comm, c.run);
}

INSTANTIATE_TEST_SUITE_P(Cases, NcclOneRank,
                         ::testing::Range<size_t>(0, testing::collective_cases().size()),
                         [](const ::testing::TestParamInfo<size_t>& p) {
                           return testing::collective_cases()[p.param].name;
                         });

TEST(Nccl, DeviceMemoryAndRefusals) {
  auto comm = make_nccl_communicator(fresh_id().data(), 0, 1, 0, 60.0, plugin_path());
  EXPECT_EQ(comm->memory(), CommMemory::Device);
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);
  const auto id = fresh_id();
  EXPECT_THROW(make_nccl_communicator(id.data(), 0, 1, 99, 60.0, plugin_path()), Error);
}

// A CUDA session over a one-rank NCCL communicator takes the whole expert-parallel path (row
// exchanges on NCCL's stream after the backend's, bookkeeping staged through host views,
// gradients all-reduced: core/session_local_gradients.cc) -- the one multi-rank shape one GPU
// allows. It must train as a plain CUDA session does: the same routing, outputs and gradients
// to cuBLASLt's rounding (the expert GEMMs run per chunk of local experts, whose algorithms
// cuBLASLt may pick otherwise).
TEST(NcclSession, OneRankTrainsAsAPlainCudaSession) {
  std::mt19937 rng(97);
  const auto model = test::moe_model(rng);
  const int64_t rows = 256;
  const test::Batch b = test::batch(rng, rows);
  auto options = [] {
    SessionOptions o = test::options(Precision::Bf16, Mode::Training);
    o.device = Device::Cuda;
    o.cuda_plugin = plugin_path();
    o.set("optimizer", "sgd");
    o.set("lr", "0.05");
    return o;
  };
  Session plain(model, options());
  SessionOptions o = options();
  std::shared_ptr<Communicator> comm =
      make_nccl_communicator(fresh_id().data(), 0, 1, 0, 60.0, plugin_path());
  o.set_comm(comm, 1);
  Session nccl(model, o);
  auto gap = [](const std::vector<float>& a, const std::vector<float>& w) {
    double diff = 0.0, scale = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - w[i]));
      scale = std::max(scale, std::fabs(static_cast<double>(w[i])));
    }
    return scale > 0.0 ? diff / scale : diff;
  };
  const uint32_t V = test::kSessionVocab;
  std::vector<float> want(static_cast<size_t>(rows * V)), got(want.size());
  for (int step = 0; step < 5; ++step) {
    SCOPED_TRACE(step);
    plain.zero_grad();
    nccl.zero_grad();
    plain.forward_tokens(b.tokens.data(), b.tokens.size(), nullptr, 0, rows, want.data(),
                         want.size());
    nccl.forward_tokens(b.tokens.data(), b.tokens.size(), nullptr, 0, rows, got.data(), got.size());
    if (step == 0) {
      EXPECT_EQ(nccl.expert_counts(2, CountScope::Last), plain.expert_counts(2, CountScope::Last));
    }
    const double out_gap = gap(got, want);
    EXPECT_LE(out_gap, 1e-2);
    const double lw = plain.backward_loss(b.targets.data(), rows);
    const double lg = nccl.backward_loss(b.targets.data(), rows);
    EXPECT_NEAR(lg, lw, 1e-3 * std::fabs(lw));
    double grad_gap = 0.0;
    for (size_t i = 0; i < plain.num_parameters(); ++i) {
      std::vector<float> gw(static_cast<size_t>(plain.parameter_size(i))), gg(gw.size());
      plain.read_gradient(i, gw.data(), gw.size());
      nccl.read_gradient(i, gg.data(), gg.size());
      grad_gap = std::max(grad_gap, gap(gg, gw));
    }
    EXPECT_LE(grad_gap, 1e-2);
    std::printf("step %d: output gap %.3g, largest gradient gap %.3g (relative)\n", step, out_gap,
                grad_gap);
    plain.step();
    nccl.step();
  }
  EXPECT_FALSE(comm->broken()) << comm->broken_reason();
}

TEST(Nccl, TwoRanksOnTwoGpus) {
  try {
    make_cuda_backend(1, plugin_path());
  } catch (const Error& e) {
    GTEST_SKIP() << "needs two GPUs: " << e.what();
  }
  for (const auto& c : testing::collective_cases()) {
    if (c.checks_agreement || c.tells_peers) continue;
    SCOPED_TRACE(c.name);
    const auto case_id = fresh_id();
    std::vector<std::thread> threads;
    for (int32_t r = 0; r < 2; ++r)
      threads.emplace_back([&, r] {
        try {
          auto comm = staged_rank(case_id, r, 2, r);
          testing::run_on_rank(*comm, c.run);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "rank " << r << ": " << e.what();
        }
      });
    for (auto& t : threads) t.join();
  }
}

}  // namespace
}  // namespace moert

namespace moert_gpu_test {
std::string gpu_unavailable_reason() {
  try {
    moert::make_cuda_backend(0, moert::plugin_path());
    std::vector<uint8_t> id(moert::kNcclUniqueIdBytes);
    moert::nccl_unique_id(id.data(), moert::plugin_path());
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}
}  // namespace moert_gpu_test

int main(int argc, char** argv) { return moert_gpu_test::run(argc, argv); }
