// A DeepSeek-V3-shaped MoE layer (hidden 7168, expert width 2048, top-8 of 8 groups keeping 4,
// one shared expert) on the CUDA backend, through the same MoELayer code a session runs:
// forward over all 256 routed experts, and forward plus backward over a 64-expert slice with the
// same tokens per expert (the full layer's training state does not fit in 80 GB). Beside each,
// one dense cuBLASLt bf16 GEMM of the same total FLOPs, timed in the same run.
//
//   moert_cuda_bench [--plugin PATH] [--reps N] [--json FILE]
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/layers.h"
#include "core/param_store.h"

namespace {

using namespace moert;

constexpr int64_t kDim = 7168, kHidden = 2048, kTopK = 8;

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

std::vector<float> randn(size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Random bf16 values for one expert's matrix, repeated for every expert (random, not zeros: the
// GEMMs must see real data; identical experts do not change their cost).
Buffer<uint16_t> experts_bf16(Backend& be, int64_t experts, int64_t per, float scale,
                              std::mt19937& rng) {
  std::vector<uint16_t> one(static_cast<size_t>(per));
  std::normal_distribution<float> d(0.0f, scale);
  for (auto& x : one) x = to_bf16(d(rng));
  Buffer<uint16_t> b(be, static_cast<size_t>(experts * per));
  for (int64_t e = 0; e < experts; ++e) be.upload(b.data() + e * per, one.data(), one.size() * 2);
  return b;
}

Buffer<float> upload(Backend& be, const std::vector<float>& v) {
  Buffer<float> b(be, v.size());
  be.upload(b.data(), v.data(), v.size() * sizeof(float));
  return b;
}

Buffer<float> zeros(Backend& be, size_t n) {
  Buffer<float> b(be, n);
  be.zero(b.data(), n * sizeof(float));
  return b;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Result {
  std::string what;
  int64_t tokens, experts;
  double ms, tflops, dense_ms, dense_tflops;
  double max_vio;
};

// One dense bf16 GEMM [m, k] x [k, n] with fp32 output, timed with events.
double dense_gemm_ms(int64_t m, int64_t n, int64_t k, int reps) {
  void *a, *b, *c, *ws;
  const size_t ws_size = 32u << 20;
  cudaMalloc(&a, m * k * 2);
  cudaMalloc(&b, k * n * 2);
  cudaMalloc(&c, m * n * 4);
  cudaMalloc(&ws, ws_size);
  {
    std::mt19937 rng(7);
    std::vector<uint16_t> h(static_cast<size_t>(std::max(m, n) * k));
    std::normal_distribution<float> d(0.0f, 0.02f);
    for (auto& x : h) x = to_bf16(d(rng));
    cudaMemcpy(a, h.data(), m * k * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(b, h.data(), k * n * 2, cudaMemcpyHostToDevice);
  }
  cublasLtHandle_t lt;
  cublasLtCreate(&lt);
  cublasLtMatmulDesc_t desc;
  cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  const cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t);
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof nn);
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, k, n, k);
  cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, m, k);
  cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, n, m, n);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_size,
                                       sizeof ws_size);
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &res, &found);
  const float alpha = 1.0f, beta = 0.0f;
  auto once = [&] {
    cublasLtMatmul(lt, desc, &alpha, b, la, a, lb, &beta, c, lc, c, lc, &res.algo, ws, ws_size,
                   nullptr);
  };
  for (int i = 0; i < 3; ++i) once();
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(e0);
    once();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    times.push_back(ms);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cudaFree(ws);
  return median(times);
}

Result run(Backend& be, int64_t tokens, int64_t experts, bool backward, int reps) {
  std::mt19937 rng(42);
  Model model;
  MoESpec spec;
  spec.dim = kDim;
  spec.expert_hidden = kHidden;
  spec.num_shared = 1;
  spec.shared_hidden = kHidden;
  spec.residual = true;
  spec.router = {static_cast<uint32_t>(experts), kTopK, ScoreFunction::Sigmoid, 8, 4, true, 2.5f};
  spec.balancing.policy = BalancingPolicy::LossFreeBias;
  auto shape = [](Tensor& t, std::vector<int64_t> s) { t.shape = std::move(s); };
  shape(spec.gate, {experts, kDim});
  shape(spec.gate_bias, {experts});
  shape(spec.w1, {experts, kHidden, kDim});
  shape(spec.w3, {experts, kHidden, kDim});
  shape(spec.w2, {experts, kDim, kHidden});
  shape(spec.shared_w1, {1, kHidden, kDim});
  shape(spec.shared_w3, {1, kHidden, kDim});
  shape(spec.shared_w2, {1, kDim, kHidden});
  model.layers.push_back({"moe", LayerKind::MoE, kDim, kDim, spec});
  const MoESpec& s = std::get<MoESpec>(model.layers[0].spec);
  ParamStore store(be, model, nullptr);  // every tensor is empty on the host: adopted below
  const float in_scale = 1.0f / std::sqrt(float{kDim}),
              hid_scale = 1.0f / std::sqrt(float{kHidden});
  const int64_t per = kHidden * kDim;
  auto grad = [&](int64_t n) {
    return backward ? zeros(be, static_cast<size_t>(n)) : Buffer<float>{};
  };
  store.adopt(s.gate, upload(be, randn(experts * kDim, in_scale, rng)), {}, grad(experts * kDim));
  store.adopt(s.gate_bias, upload(be, randn(experts, 0.01f, rng)), {}, {});
  store.adopt(s.w1, {}, experts_bf16(be, experts, per, in_scale, rng), grad(experts * per));
  store.adopt(s.w3, {}, experts_bf16(be, experts, per, in_scale, rng), grad(experts * per));
  store.adopt(s.w2, {}, experts_bf16(be, experts, per, hid_scale, rng), grad(experts * per));
  store.adopt(s.shared_w1, {}, experts_bf16(be, 1, per, in_scale, rng), grad(per));
  store.adopt(s.shared_w3, {}, experts_bf16(be, 1, per, in_scale, rng), grad(per));
  store.adopt(s.shared_w2, {}, experts_bf16(be, 1, per, hid_scale, rng), grad(per));
  MoELayer layer(s, store, 0);

  Buffer<float> x = upload(be, randn(tokens * kDim, 1.0f, rng));
  Buffer<float> y(be, static_cast<size_t>(tokens * kDim)),
      dx(be, static_cast<size_t>(tokens * kDim));
  Buffer<float> dy = upload(be, randn(tokens * kDim, 1e-3f, rng));
  float probe;
  auto once = [&] {
    layer.forward(be, x.data(), y.data(), tokens, backward ? Pass::Train : Pass::Eval);
    if (backward) layer.backward(be, dy.data(), dx.data(), tokens);
    be.download(&probe, (backward ? dx : y).data(), sizeof probe);  // waits for the stream
  };
  for (int i = 0; i < 2; ++i) once();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    once();
    times.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  layer.commit_stats(Pass::Eval);
  const double ms = median(times);
  // Multiply-adds: router, K routed experts and one shared expert per token (3 GEMMs each).
  const double fwd =
      2.0 * tokens * kDim * experts + 2.0 * tokens * (kTopK + 1) * 3.0 * kDim * kHidden;
  const double flops = backward ? 3.0 * fwd : fwd;  // backward: input and weight gradients
  // The dense GEMM of the same FLOPs: [m, 7168] x [7168, 6144].
  const int64_t n = 6144, k = kDim;
  const int64_t m = static_cast<int64_t>(flops / (2.0 * n * k));
  const double dms = dense_gemm_ms(m, n, k, 10);
  return {backward ? "forward+backward" : "forward",
          tokens,
          experts,
          ms,
          flops / ms / 1e9,
          dms,
          2.0 * m * n * k / dms / 1e9,
          max_violation(layer.counts().last)};
}

}  // namespace

int main(int argc, char** argv) {
  std::string plugin, json;
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--plugin" && i + 1 < argc)
      plugin = argv[++i];
    else if (a == "--json" && i + 1 < argc)
      json = argv[++i];
    else if (a == "--reps" && i + 1 < argc)
      reps = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: moert_cuda_bench [--plugin PATH] [--reps N] [--json FILE]\n");
      return 2;
    }
  }
  try {
    auto be = make_cuda_backend(0, plugin);
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    std::vector<Result> results;
    for (int64_t t : {4096, 16384}) results.push_back(run(*be, t, 256, false, reps));
    for (int64_t t : {1024, 4096}) results.push_back(run(*be, t, 64, true, reps));
    std::printf("\n%-17s %7s %7s %10s %9s %12s %9s %9s %8s\n", "pass", "tokens", "experts",
                "moert ms", "TFLOP/s", "dense GEMM", "TFLOP/s", "vs dense", "MaxVio");
    for (const auto& r : results)
      std::printf("%-17s %7lld %7lld %10.3f %9.1f %9.3f ms %9.1f %8.2fx %8.3f\n", r.what.c_str(),
                  static_cast<long long>(r.tokens), static_cast<long long>(r.experts), r.ms,
                  r.tflops, r.dense_ms, r.dense_tflops, r.tflops / r.dense_tflops, r.max_vio);
    if (!json.empty()) {
      std::ofstream out(json);
      out << "[\n";
      for (size_t i = 0; i < results.size(); ++i) {
        const auto& r = results[i];
        out << "  {\"pass\": \"" << r.what << "\", \"tokens\": " << r.tokens
            << ", \"experts\": " << r.experts << ", \"ms\": " << r.ms
            << ", \"tflops\": " << r.tflops << ", \"dense_ms\": " << r.dense_ms
            << ", \"dense_tflops\": " << r.dense_tflops << "}"
            << (i + 1 < results.size() ? "," : "") << "\n";
      }
      out << "]\n";
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moert_cuda_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
