// `moert bench`: the speed of one MoE layer, forward and forward+backward, set against the speed
// of a plain GEMM of the same FLOPs run through the same library.
//
// The BLAS is linked statically inside libmoert and its symbols are hidden, so the CLI cannot call
// it directly. The GEMM baseline is therefore a model holding a single OutputHead (y = x W^T, no
// bias): its forward is one GEMM and its backward two, through the library's own GEMM path and
// threading. Its width is chosen so that its FLOPs per token equal the MoE layer's.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/error.h"
#include "cli/json_text.h"
#include "cli/model_codec.h"

namespace moert_cli {

const CommandSpec kBenchSpec = {
    "bench",
    "[--device cpu] [--threads N] [layer options] [--json]",
    "time a MoE layer forward and backward; GFLOP/s and the ratio to a GEMM of the same FLOPs",
    "The layer: hidden input of width DIM, sigmoid router over EXPERTS experts, top-K, SHARED\n"
    "shared experts, SwiGLU experts, residual. FLOPs count 2 per multiply-add of the GEMMs\n"
    "executed: forward = TOKENS * (2*DIM*EXPERTS + SHARED*6*DIM*SHARED-HIDDEN) + (assignments)\n"
    "* 6*DIM*EXPERT-HIDDEN, the assignments read from the layer's expert counts (TOKENS*TOP-K);\n"
    "forward+backward = 3 x forward (each GEMM has two backward GEMMs of its size). The GEMM\n"
    "baseline is a linear layer DIM -> N through the same library, N chosen for equal FLOPs.\n"
    "Times are medians over REPEATS runs after one warm-up run.",
    0,
    0,
    {
        {"device", "NAME", "cpu or cuda", "cpu"},
        {"threads", "N", "CPU threads", "2"},
        {"tokens", "N", "tokens per pass", "4096"},
        {"dim", "N", "model width", "512"},
        {"experts", "N", "routed experts", "16"},
        {"top-k", "N", "routed experts per token", "4"},
        {"expert-hidden", "N", "hidden width of a routed expert", "256"},
        {"shared", "N", "shared experts", "1"},
        {"shared-hidden", "N", "hidden width of a shared expert", "256"},
        {"repeats", "N", "timed runs per figure", "5"},
        {"seed", "N", "seed of the weights and inputs", "1"},
        {"quick", "", "a small layer and 3 repeats (seconds), for smoke tests", ""},
        {"json", "", "print the figures as one JSON object", ""},
    },
};

namespace {

struct Dims {
  uint32_t tokens, dim, experts, top_k, expert_hidden, shared, shared_hidden;
};

std::string uniform(uint32_t fan_in) {
  return cat("{ \"init\": { \"kind\": \"Uniform\", \"std\": ", 1.0 / std::sqrt(3.0 * fan_in),
             " } }");
}

std::string moe_json(const Dims& d, uint64_t seed) {
  std::string moe =
      cat("\"dim\": ", d.dim, ", \"num_experts\": ", d.experts, ", \"top_k\": ", d.top_k,
          ", \"expert_hidden\": ", d.expert_hidden,
          ", \"score_function\": \"Sigmoid\", \"num_groups\": 1, \"topk_groups\": 1",
          ", \"normalize_weights\": true, \"routed_scaling_factor\": 1.0",
          ", \"num_shared_experts\": ", d.shared,
          ", \"shared_hidden\": ", d.shared ? d.shared_hidden : 0, ", \"residual\": true",
          ", \"balancing\": { \"policy\": \"None\" }, \"gate\": ", uniform(d.dim),
          ", \"w1\": ", uniform(d.dim), ", \"w3\": ", uniform(d.dim),
          ", \"w2\": ", uniform(d.expert_hidden));
  if (d.shared)
    moe += cat(", \"shared_w1\": ", uniform(d.dim), ", \"shared_w3\": ", uniform(d.dim),
               ", \"shared_w2\": ", uniform(d.shared_hidden));
  return cat(
      "{ \"schema_major\": 1, \"schema_minor\": 0, \"name\": \"bench-moe\", \"seed\": ", seed,
      ", \"input_dim\": ", d.dim,
      ", \"layers\": [ { \"name\": \"moe\", \"kind_type\": \"MoE\", \"kind\": { ", moe, " } } ] }");
}

std::string gemm_json(uint32_t dim, uint32_t width, uint64_t seed) {
  return cat("{ \"schema_major\": 1, \"schema_minor\": 0, \"name\": \"bench-gemm\", \"seed\": ",
             seed, ", \"input_dim\": ", dim,
             ", \"layers\": [ { \"name\": \"gemm\", \"kind_type\": \"OutputHead\", \"kind\": { "
             "\"dim\": ",
             dim, ", \"vocab_size\": ", width, ", \"weight\": ", uniform(dim), " } } ] }");
}

std::vector<float> random_values(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (float& f : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    f = static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
  }
  return v;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs `pass` once to warm up, then `repeats` times; the median wall time in seconds.
template <typename F>
double time_median(int repeats, F&& pass) {
  pass();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    const auto a = std::chrono::steady_clock::now();
    pass();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  return median(t);
}

struct Timing {
  double forward = 0.0, forward_backward = 0.0;  // seconds
};

// Times one hidden-input model: an inference session for the forward, a training session for
// forward + backward (with the input gradient, as a layer inside a network needs it).
Timing time_model(const moert_model* model, const SessionConfig& base, uint32_t tokens, uint32_t in,
                  uint32_t out, int repeats, uint64_t seed, uint64_t* assignments_per_pass,
                  const std::vector<uint32_t>& moe) {
  const std::vector<float> x = random_values(static_cast<size_t>(tokens) * in, seed);
  const std::vector<float> dy = random_values(static_cast<size_t>(tokens) * out, seed + 1);
  std::vector<float> y(static_cast<size_t>(tokens) * out), dx(x.size());
  Timing t;
  SessionPtr inf = create_session(model, base);
  t.forward = time_median(repeats, [&] {
    check(moert_session_forward_hidden(inf.get(), x.data(), x.size(), tokens, y.data(), y.size()),
          "forward");
  });
  if (assignments_per_pass) {
    *assignments_per_pass = 0;
    for (uint32_t l : moe) {
      std::vector<int64_t> c(static_cast<size_t>(moe_int(model, l, MOERT_MOE_NUM_EXPERTS)));
      check(moert_session_expert_counts(inf.get(), l, MOERT_COUNTS_LAST, c.data(), c.size()),
            "counts");
      for (int64_t v : c) *assignments_per_pass += static_cast<uint64_t>(v);
    }
  }
  SessionConfig train = base;
  train.training = true;
  SessionPtr tr = create_session(model, train);
  t.forward_backward = time_median(repeats, [&] {
    check(moert_session_forward_hidden(tr.get(), x.data(), x.size(), tokens, y.data(), y.size()),
          "forward");
    check(moert_session_backward(tr.get(), dy.data(), dy.size(), dx.data(), dx.size(), nullptr),
          "backward");
  });
  return t;
}

}  // namespace

int run_bench(const Args& args) {
  const bool quick = args.has("quick");
  Dims d;
  auto u = [&](const char* flag, int64_t normal, int64_t small, int64_t lo) {
    return static_cast<uint32_t>(args.integer(flag, quick ? small : normal, lo, 1 << 20));
  };
  d.tokens = u("tokens", 4096, 256, 1);
  d.dim = u("dim", 512, 64, 1);
  d.experts = u("experts", 16, 8, 2);
  d.top_k = u("top-k", 4, 2, 1);
  d.expert_hidden = u("expert-hidden", 256, 64, 1);
  d.shared = u("shared", 1, 1, 0);
  d.shared_hidden = u("shared-hidden", 256, 64, 1);
  const int repeats = static_cast<int>(args.integer("repeats", quick ? 3 : 5, 1, 100000));
  const auto seed = static_cast<uint64_t>(args.integer("seed", 1, 0, INT64_MAX));
  const std::string device = args.str("device", "cpu");
  if (device != "cpu" && device != "cuda")
    usage_fail("--device takes cpu or cuda, got '", device, "'");
  if (d.top_k > d.experts)
    usage_fail("--top-k (", d.top_k, ") exceeds --experts (", d.experts, ")");
  SessionConfig config;
  config.device = device == "cuda" ? MOERT_DEVICE_CUDA : MOERT_DEVICE_CPU;
  config.threads = static_cast<uint32_t>(args.integer("threads", 2, 1, 1024));
  config.seed = seed;

  ModelPtr moe =
      load_model_bytes(json_to_binary(moe_json(d, seed), "bench model"), "", "bench model");
  uint64_t assignments = 0;
  const Timing tm = time_model(moe.get(), config, d.tokens, d.dim, d.dim, repeats, seed,
                               &assignments, moe_layer_indices(moe.get()));
  const double T = d.tokens, D = d.dim;
  const double moe_fwd = T * (2.0 * D * d.experts + d.shared * 6.0 * D * d.shared_hidden) +
                         static_cast<double>(assignments) * 6.0 * D * d.expert_hidden;

  // The GEMM of equal FLOPs: 2 * T * D * N = moe_fwd.
  const auto width = static_cast<uint32_t>(std::max(1.0, std::round(moe_fwd / (2.0 * T * D))));
  ModelPtr gemm = load_model_bytes(json_to_binary(gemm_json(d.dim, width, seed), "bench model"), "",
                                   "bench model");
  const Timing tg =
      time_model(gemm.get(), config, d.tokens, d.dim, width, repeats, seed, nullptr, {});
  const double gemm_fwd = 2.0 * T * D * width;

  const double g[4] = {moe_fwd / tm.forward / 1e9, 3 * moe_fwd / tm.forward_backward / 1e9,
                       gemm_fwd / tg.forward / 1e9, 3 * gemm_fwd / tg.forward_backward / 1e9};
  if (args.has("json")) {
    std::printf(
        "{\"device\": %s, \"threads\": %u, \"tokens\": %u, \"dim\": %u, \"experts\": %u, "
        "\"top_k\": %u, \"expert_hidden\": %u, \"shared\": %u, \"shared_hidden\": %u, "
        "\"repeats\": %d, \"assignments\": %llu, \"gemm_width\": %u,\n"
        " \"moe\": {\"forward\": {\"flops\": %s, \"seconds\": %s, \"gflops\": %s}, "
        "\"forward_backward\": {\"flops\": %s, \"seconds\": %s, \"gflops\": %s}},\n"
        " \"gemm\": {\"forward\": {\"flops\": %s, \"seconds\": %s, \"gflops\": %s}, "
        "\"forward_backward\": {\"flops\": %s, \"seconds\": %s, \"gflops\": %s}}}\n",
        json_string(device).c_str(), config.threads, d.tokens, d.dim, d.experts, d.top_k,
        d.expert_hidden, d.shared, d.shared_hidden, repeats,
        static_cast<unsigned long long>(assignments), width, json_number(moe_fwd).c_str(),
        json_number(tm.forward).c_str(), json_number(g[0]).c_str(),
        json_number(3 * moe_fwd).c_str(), json_number(tm.forward_backward).c_str(),
        json_number(g[1]).c_str(), json_number(gemm_fwd).c_str(), json_number(tg.forward).c_str(),
        json_number(g[2]).c_str(), json_number(3 * gemm_fwd).c_str(),
        json_number(tg.forward_backward).c_str(), json_number(g[3]).c_str());
    return 0;
  }
  std::printf(
      "moert bench on %s, %u thread%s: MoE layer d=%u, %u experts x hidden %u, top-%u, "
      "%u shared x hidden %u; %u tokens; median of %d\n",
      device.c_str(), config.threads, config.threads == 1 ? "" : "s", d.dim, d.experts,
      d.expert_hidden, d.top_k, d.shared, d.shared_hidden, d.tokens, repeats);
  std::printf("GEMM baseline: linear %u -> %u through libmoert (same forward FLOPs)\n\n", d.dim,
              width);
  std::printf("%-18s %12s %12s %10s %12s %12s %10s %9s\n", "pass", "MoE GFLOP", "MoE ms",
              "MoE GF/s", "GEMM GFLOP", "GEMM ms", "GEMM GF/s", "MoE/GEMM");
  const char* names[2] = {"forward", "forward+backward"};
  const double moe_f[2] = {moe_fwd, 3 * moe_fwd}, moe_t[2] = {tm.forward, tm.forward_backward};
  const double gemm_f[2] = {gemm_fwd, 3 * gemm_fwd}, gemm_t[2] = {tg.forward, tg.forward_backward};
  for (int i = 0; i < 2; ++i)
    std::printf("%-18s %12.3f %12.2f %10.2f %12.3f %12.2f %10.2f %9.2f\n", names[i], moe_f[i] / 1e9,
                moe_t[i] * 1e3, g[i], gemm_f[i] / 1e9, gemm_t[i] * 1e3, g[i + 2], g[i] / g[i + 2]);
  return 0;
}

}  // namespace moert_cli
