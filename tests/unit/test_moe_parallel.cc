// The MoE layer under expert and data parallelism, ranks as threads over the in-process
// communicator: every world size and split gives bitwise the outputs, counts and auxiliary losses
// of one process over the union of the ranks' rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "core/comm_support.h"
#include "core/layers.h"
#include "core/parallel.h"
#include "tests/support/inprocess_communicator.h"
#include "tests/unit/random_tensor.h"

namespace moert {
namespace {

using test::random_tensor;

MoESpec random_moe(std::mt19937& rng, uint32_t E, uint32_t K, BalancingPolicy policy) {
  MoESpec s;
  s.dim = 16;
  s.expert_hidden = 24;
  s.num_shared = 1;
  s.shared_hidden = 20;
  s.router = {E, K, ScoreFunction::Sigmoid, 2, 1, true, 2.5f};
  s.balancing.policy = policy;
  s.balancing.aux_alpha = policy == BalancingPolicy::LossFreeBias ? 0.0f : 0.01f;
  s.gate = random_tensor({E, 16}, rng, 0.5f);
  s.gate_bias = random_tensor({E}, rng, 0.1f);
  s.w1 = random_tensor({E, 24, 16}, rng);
  s.w3 = random_tensor({E, 24, 16}, rng);
  s.w2 = random_tensor({E, 16, 24}, rng);
  s.shared_w1 = random_tensor({1, 20, 16}, rng);
  s.shared_w3 = random_tensor({1, 20, 16}, rng);
  s.shared_w2 = random_tensor({1, 16, 20}, rng);
  return s;
}

struct Rank {
  std::unique_ptr<Backend> be;
  Model model;
  std::unique_ptr<ParamStore> store;
  std::unique_ptr<MoELayer> layer;
  std::unique_ptr<ParallelContext> par;
};

struct Result {
  std::vector<float> y;
  std::vector<int64_t> counts;
  double aux = 0.0;
};

LayerSpec layer_spec(const MoESpec& s) {
  LayerSpec l;
  l.name = "moe0";
  l.kind = LayerKind::MoE;
  l.in_width = l.out_width = s.dim;
  l.spec = s;
  return l;
}

// One process over every row.
Result alone(const MoESpec& s, const std::vector<float>& x, int64_t rows, bool train) {
  Rank r;
  r.be = make_cpu_backend(2);
  r.model.layers = {layer_spec(s)};
  r.store = std::make_unique<ParamStore>(*r.be, r.model, nullptr);
  r.layer = std::make_unique<MoELayer>(std::get<MoESpec>(r.model.layers[0].spec), *r.store);
  Result out;
  out.y.resize(x.size());
  const Pass pass = train ? Pass::Train : Pass::Eval;
  r.layer->forward(*r.be, x.data(), out.y.data(), rows, pass);
  r.layer->commit_stats(pass);
  out.counts = r.layer->counts().last;
  out.aux = r.layer->aux_loss();
  return out;
}

// `rows[r]` rows on each rank r, in order, EP-way expert parallel, global-batch aux or not.
Result spread(const MoESpec& s, const std::vector<float>& x, const std::vector<int64_t>& rows,
              int ep, bool train, bool global_aux) {
  const int R = static_cast<int>(rows.size());
  auto comms = testing::make_inprocess_communicators(R, 60.0);
  std::vector<Rank> ranks(static_cast<size_t>(R));
  std::vector<Result> got(static_cast<size_t>(R));
  std::vector<std::thread> threads;
  int64_t first = 0;
  for (int r = 0; r < R; ++r) {
    threads.emplace_back([&, r, first] {
      Rank& k = ranks[r];
      k.be = make_cpu_backend(1);
      k.model.layers = {layer_spec(s)};
      k.store = std::make_unique<ParamStore>(*k.be, k.model, nullptr);
      k.layer = std::make_unique<MoELayer>(std::get<MoESpec>(k.model.layers[0].spec), *k.store);
      k.par =
          std::make_unique<ParallelContext>(std::shared_ptr<Communicator>(std::move(comms[r])), ep);
      k.layer->set_parallel(k.par.get());
      k.layer->set_global_aux(global_aux);
      k.par->exchange_rows(rows[r]);
      const Pass pass = train ? Pass::Train : Pass::Eval;
      got[r].y.resize(static_cast<size_t>(rows[r] * s.dim));
      k.layer->forward(*k.be, x.data() + first * s.dim, got[r].y.data(), rows[r], pass);
      k.layer->commit_stats(pass);
      got[r].counts = k.layer->counts().last;
      got[r].aux = k.layer->aux_loss();
    });
    first += rows[r];
  }
  for (auto& t : threads) t.join();
  Result out;
  for (int r = 0; r < R; ++r) {
    out.y.insert(out.y.end(), got[r].y.begin(), got[r].y.end());
    EXPECT_EQ(got[r].counts, got[0].counts) << "rank " << r << " sees other counts";
    EXPECT_EQ(std::memcmp(&got[r].aux, &got[0].aux, sizeof(double)), 0) << "rank " << r;
  }
  out.counts = got[0].counts;
  out.aux = got[0].aux;
  return out;
}

struct Split {
  std::vector<int64_t> rows;
  int ep;
};

TEST(MoEParallel, ForwardIsBitwiseOneProcessForEverySplit) {
  std::mt19937 rng(17);
  const MoESpec s = random_moe(rng, 8, 2, BalancingPolicy::LossFreeBias);
  for (const Split& split : std::vector<Split>{{{256}, 1},
                                               {{128, 128}, 2},
                                               {{128, 128}, 1},
                                               {{64, 64, 64, 64}, 4},
                                               {{64, 128, 0, 64}, 2},
                                               {{192, 64, 64, 128}, 1},
                                               {{64, 64, 64, 64}, 2}}) {
    int64_t total = 0;
    for (int64_t r : split.rows) total += r;
    const std::vector<float> x = random_tensor({total, 16}, rng, 1.0f).values;
    for (bool train : {false, true}) {
      const Result one = alone(s, x, total, train);
      const Result many = spread(s, x, split.rows, split.ep, train, false);
      EXPECT_EQ(many.y, one.y) << split.rows.size() << " ranks, EP " << split.ep;
      EXPECT_EQ(many.counts, one.counts);
    }
  }
}

// Rows that are not a multiple of the chunk on every rank: the experts' chunks still line up
// (they are cut from the global lists), but the router's and shared experts' GEMMs then run on
// other row blocks than one process's, and the CPU GEMMs are not row-independent (a row's bits
// depend on the block it is computed in): equal to rounding, not bitwise.
TEST(MoEParallel, UnevenRowCountsGiveTheSameOutputsToRounding) {
  std::mt19937 rng(23);
  const MoESpec s = random_moe(rng, 8, 3, BalancingPolicy::LossFreeBias);
  const std::vector<int64_t> rows{37, 100, 5, 91};
  const std::vector<float> x = random_tensor({233, 16}, rng, 1.0f).values;
  const Result one = alone(s, x, 233, false);
  for (int ep : {1, 2, 4}) {
    const Result many = spread(s, x, rows, ep, false, false);
    double num = 0, den = 0;
    for (size_t i = 0; i < one.y.size(); ++i) {
      num += (many.y[i] - one.y[i]) * (many.y[i] - one.y[i]);
      den += one.y[i] * one.y[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-6) << "EP " << ep;
    EXPECT_EQ(many.counts, one.counts);
  }
}

// The global-batch form of the Switch loss is one process's loss over the union of the rows;
// the sequence-wise loss over sequences within ranks is too.
TEST(MoEParallel, GlobalBatchAuxLossIsOneProcesssLoss) {
  std::mt19937 rng(29);
  const MoESpec s = random_moe(rng, 8, 2, BalancingPolicy::AuxLoss);
  const std::vector<float> x = random_tensor({256, 16}, rng, 1.0f).values;
  const Result one = alone(s, x, 256, true);
  for (const Split& split : std::vector<Split>{{{128, 128}, 2}, {{64, 64, 64, 64}, 2}}) {
    const Result many = spread(s, x, split.rows, split.ep, true, true);
    EXPECT_EQ(std::memcmp(&many.aux, &one.aux, sizeof(double)), 0) << many.aux << " vs " << one.aux;
    EXPECT_EQ(many.y, one.y);
    // The local form is each rank's own batch: a different loss, the same everywhere.
    const Result local = spread(s, x, split.rows, split.ep, true, false);
    EXPECT_NE(local.aux, one.aux);
  }
}

// A save or load among ranks stretches the communicator's timeout for its I/O and restores it
// after, but never over a timeout the caller set meanwhile (moert_comm_set_timeout may run on
// another thread): the caller's setting is for the collectives that start after it.
TEST(MoEParallel, AnIoAllowanceRestoresTheTimeoutUnlessTheCallerChangedIt) {
  auto comms = testing::make_inprocess_communicators(1, 3.0);
  auto world = std::shared_ptr<Communicator>(std::move(comms[0]));
  ParallelContext par(world, 1);
  {
    const ParallelContext::IoAllowance writing(par, 50e6);  // 5 s at 10 MB/s
    EXPECT_DOUBLE_EQ(world->timeout(), 8.0);
  }
  EXPECT_DOUBLE_EQ(world->timeout(), 3.0);
  {
    const ParallelContext::IoAllowance writing(par, 1e300);
    EXPECT_DOUBLE_EQ(world->timeout(), comm::kMaxCommTimeoutSeconds);
    world->set_timeout(7.0);
  }
  EXPECT_DOUBLE_EQ(world->timeout(), 7.0);

  // A device communicator's views (backend and host memory) forward the timeout to it: it is
  // stretched once, and restored, however many saves there were.
  auto device = testing::make_inprocess_communicators(1, 3.0, CommMemory::Device, 0);
  auto device_world = std::shared_ptr<Communicator>(std::move(device[0]));
  ParallelContext on_device(device_world, 1);
  auto be = make_cpu_backend(1);
  on_device.attach(*be);
  for (int save = 0; save < 3; ++save) {
    {
      const ParallelContext::IoAllowance writing(on_device, 50e6);
      EXPECT_DOUBLE_EQ(device_world->timeout(), 8.0);
      EXPECT_DOUBLE_EQ(on_device.host().timeout(), 8.0);
    }
    EXPECT_DOUBLE_EQ(device_world->timeout(), 3.0);
  }
}

}  // namespace
}  // namespace moert
