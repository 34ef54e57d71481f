// A DeepSeek-V3-shaped MoE layer (hidden 7168, expert width 2048, top-8 of 8 groups keeping 4,
// one shared expert) on the CUDA backend, through the same MoELayer code a session runs:
// forward over all 256 routed experts, and forward plus backward over a 64-expert slice with the
// same tokens per expert (the full layer's training state does not fit in 80 GB). Beside each,
// one dense cuBLASLt GEMM of the same total FLOPs in the same precision, timed in the same run.
//
// Precisions: bf16 (the experts' bf16 copies), and fp8 (DeepSeek-V3's block-scaled E4M3 experts,
// kernels/cuda/cuda_ffn_fp8.h; its baseline a dense block-scaled FP8 GEMM, 1x128 tiles times
// 128x128 blocks). The fp8 rows are the 4096-token configurations only, to keep the lent device's
// time budget (scripts/gpu-run.sh). Figures from an H200 are in bench/RESULTS.md.
//
//   moert_cuda_bench [--plugin PATH] [--reps N] [--json FILE] [--precision bf16|fp8|both]
//
// The plugin is --plugin PATH, else $MOERT_CUDA_PLUGIN. Exits 1 when any configuration or its
// dense baseline failed, after printing (and writing) the rest.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/layers.h"
#include "core/param_store.h"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/fp8_rules.h"

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

// FP8 copies of `experts` matrices [rows, cols]: one random matrix quantized by the backend (its
// own kernel, as the ParamStore would), its codes and scales copied to every expert.
std::pair<Buffer<uint8_t>, Buffer<float>> experts_fp8(Backend& be, int64_t experts, int64_t rows,
                                                      int64_t cols, float scale,
                                                      std::mt19937& rng) {
  const int64_t per = rows * cols, per_scales = fp8_blocks_scale_floats(1, rows, cols);
  std::vector<float> one = randn(static_cast<size_t>(per), scale, rng);
  Buffer<float> f32(be, one.size());
  be.upload(f32.data(), one.data(), one.size() * sizeof(float));
  Buffer<uint8_t> codes(be, static_cast<size_t>(experts * per));
  Buffer<float> scales(be, static_cast<size_t>(experts * per_scales));
  be.quantize_weight_blocks(f32.data(), 1, rows, cols, codes.data(), scales.data(), "bench weight");
  for (int64_t e = 1; e < experts; ++e) {
    be.copy(codes.data() + e * per, codes.data(), static_cast<size_t>(per));
    be.copy(scales.data() + e * per_scales, scales.data(),
            static_cast<size_t>(per_scales) * sizeof(float));
  }
  return {std::move(codes), std::move(scales)};
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
  std::string precision, what;
  int64_t tokens, experts;
  double ms, tflops, dense_ms, dense_tflops;  // dense_* are NaN where the baseline failed
  double max_vio;
};

// The dense baseline's CUDA and cuBLASLt calls: a failure names the call and its status, so that
// one run on a lent machine says what went wrong.
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
}

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + cublasLtGetStatusName(s) + " (" +
                             cublasLtGetStatusString(s) + ")");
}

// Runs a cleanup at the end of a scope, so that a failed check leaks nothing into the next run.
template <typename F>
struct Defer {
  F f;
  ~Defer() { f(); }
};
template <typename F>
Defer(F) -> Defer<F>;

void* device_alloc(size_t bytes, const char* what) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    size_t free_bytes = 0, total = 0;
    cudaMemGetInfo(&free_bytes, &total);
    throw std::runtime_error(std::string("cudaMalloc of ") + std::to_string(bytes >> 20) +
                             " MiB for " + what + ": " + cudaGetErrorName(e) + " (" +
                             std::to_string(free_bytes >> 20) + " MiB free of " +
                             std::to_string(total >> 20) + ")");
  }
  return p;
}

// Random-looking bf16 values in `count` elements of device memory. One block is drawn on the host
// and copied over and over on the device: drawing every value (up to ~1e9 of them) on the host
// would take tens of seconds of the run, and the GEMM's cost does not depend on the values.
void fill_bf16(void* dst, size_t count, std::mt19937& rng) {
  const size_t block = std::min(count, size_t{1} << 20);
  std::vector<uint16_t> h(block);
  std::normal_distribution<float> d(0.0f, 0.02f);
  for (auto& x : h) x = to_bf16(d(rng));
  auto* p = static_cast<uint16_t*>(dst);
  check(cudaMemcpy(p, h.data(), block * 2, cudaMemcpyHostToDevice), "cudaMemcpy to the device");
  for (size_t done = block; done < count;) {
    const size_t n = std::min(done, count - done);
    check(cudaMemcpy(p + done, p, n * 2, cudaMemcpyDeviceToDevice), "cudaMemcpy on the device");
    done += n;
  }
}

// One dense bf16 GEMM [m, k] x [k, n] with fp32 output, timed with events.
double dense_gemm_ms(int64_t m, int64_t n, int64_t k, int reps) {
  const size_t ws_size = 32u << 20;
  void* a = device_alloc(static_cast<size_t>(m * k) * 2, "the dense baseline's A");
  Defer free_a{[&] { cudaFree(a); }};
  void* b = device_alloc(static_cast<size_t>(k * n) * 2, "the dense baseline's B");
  Defer free_b{[&] { cudaFree(b); }};
  void* c = device_alloc(static_cast<size_t>(m * n) * 4, "the dense baseline's C");
  Defer free_c{[&] { cudaFree(c); }};
  void* ws = device_alloc(ws_size, "the cuBLASLt workspace");
  Defer free_ws{[&] { cudaFree(ws); }};
  std::mt19937 rng(7);
  fill_bf16(a, static_cast<size_t>(m * k), rng);
  fill_bf16(b, static_cast<size_t>(k * n), rng);

  cublasLtHandle_t lt = nullptr;
  check(cublasLtCreate(&lt), "cublasLtCreate");
  Defer destroy_lt{[&] { cublasLtDestroy(lt); }};
  cublasLtMatmulDesc_t desc = nullptr;
  check(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
        "cublasLtMatmulDescCreate");
  Defer destroy_desc{[&] { cublasLtMatmulDescDestroy(desc); }};
  const cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t),
        "cublasLtMatmulDescSetAttribute(TRANSA)");
  check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof nn),
        "cublasLtMatmulDescSetAttribute(TRANSB)");
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  Defer destroy_layouts{[&] {
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
  }};
  check(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, k, n, k), "cublasLtMatrixLayoutCreate(A)");
  check(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, m, k), "cublasLtMatrixLayoutCreate(B)");
  check(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, n, m, n), "cublasLtMatrixLayoutCreate(C)");
  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  Defer destroy_pref{[&] { cublasLtMatmulPreferenceDestroy(pref); }};
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &ws_size, sizeof ws_size),
        "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  check(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &res, &found),
        "cublasLtMatmulAlgoGetHeuristic");
  // With no result, res.algo is whatever the struct held: never hand that to cublasLtMatmul.
  if (found < 1 || res.state != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error("cublasLtMatmulAlgoGetHeuristic found no algorithm for bf16 [" +
                             std::to_string(m) + ", " + std::to_string(k) + "] x [" +
                             std::to_string(k) + ", " + std::to_string(n) + "] -> fp32");
  const float alpha = 1.0f, beta = 0.0f;
  auto once = [&] {
    check(cublasLtMatmul(lt, desc, &alpha, b, la, a, lb, &beta, c, lc, c, lc, &res.algo, ws,
                         ws_size, nullptr),
          "cublasLtMatmul");
  };
  for (int i = 0; i < 3; ++i) once();
  check(cudaDeviceSynchronize(), "the dense baseline's warm-up");
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  check(cudaEventCreate(&e0), "cudaEventCreate");
  Defer destroy_e0{[&] { cudaEventDestroy(e0); }};
  check(cudaEventCreate(&e1), "cudaEventCreate");
  Defer destroy_e1{[&] { cudaEventDestroy(e1); }};
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    check(cudaEventRecord(e0), "cudaEventRecord");
    once();
    check(cudaEventRecord(e1), "cudaEventRecord");
    check(cudaEventSynchronize(e1), "the dense baseline's GEMM");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
    times.push_back(ms);
  }
  return median(times);
}

// One dense block-scaled FP8 GEMM [m, k] x [n, k]^T with fp32 output (x in 1x128 tiles, W in
// 128x128 blocks: the experts' Fprop), through the plugin's own cuBLASLt wrapper, timed with
// events. Codes 0x38 (1.0) and unit scales: the cost does not depend on the values.
double dense_fp8_gemm_ms(int64_t m, int64_t n, int64_t k, int reps) {
  namespace f8 = moert::fp8;
  cudaStream_t stream = nullptr;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  Defer destroy_stream{[&] { cudaStreamDestroy(stream); }};
  auto* a = static_cast<uint8_t*>(device_alloc(static_cast<size_t>(m * k), "the FP8 baseline's A"));
  Defer free_a{[&] { cudaFree(a); }};
  auto* b = static_cast<uint8_t*>(device_alloc(static_cast<size_t>(n * k), "the FP8 baseline's B"));
  Defer free_b{[&] { cudaFree(b); }};
  auto* d =
      static_cast<float*>(device_alloc(static_cast<size_t>(m * n) * 4, "the FP8 baseline's D"));
  Defer free_d{[&] { cudaFree(d); }};
  const std::vector<float> as(static_cast<size_t>(f8::blocks_of(k) * f8::tile_scale_ld(m)), 1.0f),
      bs(static_cast<size_t>(f8::blocks_of(n) * f8::block_scale_ld(k)), 1.0f);
  auto* das = static_cast<float*>(device_alloc(as.size() * 4, "the FP8 baseline's scales"));
  Defer free_as{[&] { cudaFree(das); }};
  auto* dbs = static_cast<float*>(device_alloc(bs.size() * 4, "the FP8 baseline's scales"));
  Defer free_bs{[&] { cudaFree(dbs); }};
  check(cudaMemset(a, 0x38, static_cast<size_t>(m * k)), "cudaMemset");
  check(cudaMemset(b, 0x38, static_cast<size_t>(n * k)), "cudaMemset");
  check(cudaMemcpy(das, as.data(), as.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(dbs, bs.data(), bs.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  moert::cuda::fp8::Fp8Gemm gemm(stream);
  auto once = [&] {
    gemm.run(m, n, k, a, k, das, b, k, dbs, moert::cuda::fp8::Scaling::Blocks, d, n,
             moert::cuda::fp8::Output::F32, false);
  };
  for (int i = 0; i < 3; ++i) once();
  check(cudaStreamSynchronize(stream), "the FP8 baseline's warm-up");
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  check(cudaEventCreate(&e0), "cudaEventCreate");
  Defer destroy_e0{[&] { cudaEventDestroy(e0); }};
  check(cudaEventCreate(&e1), "cudaEventCreate");
  Defer destroy_e1{[&] { cudaEventDestroy(e1); }};
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    check(cudaEventRecord(e0, stream), "cudaEventRecord");
    once();
    check(cudaEventRecord(e1, stream), "cudaEventRecord");
    check(cudaEventSynchronize(e1), "the FP8 baseline's GEMM");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
    times.push_back(ms);
  }
  return median(times);
}

// The MoE layer's median time per pass, and the MaxVio of its last routing.
struct Measured {
  double ms, max_vio;
};

Measured measure_moe(Backend& be, int64_t tokens, int64_t experts, bool backward, int reps,
                     bool fp8) {
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
  // An expert weight [n, rows, cols]: its bf16 copy, or its FP8 copy alone.
  auto expert = [&](const Tensor& t, int64_t n, int64_t rows, int64_t cols, float scale) {
    if (!fp8) {
      store.adopt(t, {}, experts_bf16(be, n, rows * cols, scale, rng), grad(n * per));
      return;
    }
    auto [codes, scales] = experts_fp8(be, n, rows, cols, scale, rng);
    store.adopt(t, {}, {}, grad(n * per), std::move(codes), std::move(scales));
  };
  expert(s.w1, experts, kHidden, kDim, in_scale);
  expert(s.w3, experts, kHidden, kDim, in_scale);
  expert(s.w2, experts, kDim, kHidden, hid_scale);
  expert(s.shared_w1, 1, kHidden, kDim, in_scale);
  expert(s.shared_w3, 1, kHidden, kDim, in_scale);
  expert(s.shared_w2, 1, kDim, kHidden, hid_scale);
  MoELayer layer(s, store);

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
  return {median(times), max_violation(layer.counts().last)};
}

Result run(Backend& be, int64_t tokens, int64_t experts, bool backward, int reps, bool fp8) {
  // The layer's memory is given back before the dense baseline takes its own.
  const Measured moe = measure_moe(be, tokens, experts, backward, reps, fp8);
  // Multiply-adds: router, K routed experts and one shared expert per token (3 GEMMs each).
  const double fwd =
      2.0 * tokens * kDim * experts + 2.0 * tokens * (kTopK + 1) * 3.0 * kDim * kHidden;
  const double flops = backward ? 3.0 * fwd : fwd;  // backward: input and weight gradients
  // The dense GEMM of about the same FLOPs: [m, 7168] x [7168, 6144], m rounded up to a whole
  // 128-row tile (cuBLASLt 13.1 on an H200 has no block-scaled FP8 algorithm for m = 37034, an
  // odd multiple of 2); its TFLOP/s are counted from that m.
  const int64_t n = 6144, k = kDim;
  const int64_t m = (static_cast<int64_t>(flops / (2.0 * n * k)) + 127) / 128 * 128;
  double dms = std::nan("");
  try {
    dms = fp8 ? dense_fp8_gemm_ms(m, n, k, 10) : dense_gemm_ms(m, n, k, 10);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moert_cuda_bench: dense baseline [%lld x %lld x %lld] failed: %s\n",
                 static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
                 e.what());
  }
  return {fp8 ? "fp8" : "bf16",
          backward ? "forward+backward" : "forward",
          tokens,
          experts,
          moe.ms,
          flops / moe.ms / 1e9,
          dms,
          2.0 * m * n * k / dms / 1e9,
          moe.max_vio};
}

// JSON has no NaN: a failed baseline is null.
std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream s;
  s << v;
  return s.str();
}

// Rewritten after every configuration, so that a run cut short by a time limit keeps what it
// measured.
bool write_json(const std::string& path, const std::vector<Result>& results) {
  std::ofstream out(path);
  out << "[\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    out << "  {\"precision\": \"" << r.precision << "\", \"pass\": \"" << r.what
        << "\", \"tokens\": " << r.tokens << ", \"experts\": " << r.experts
        << ", \"ms\": " << json_number(r.ms) << ", \"tflops\": " << json_number(r.tflops)
        << ", \"dense_ms\": " << json_number(r.dense_ms)
        << ", \"dense_tflops\": " << json_number(r.dense_tflops)
        << ", \"max_vio\": " << json_number(r.max_vio) << "}" << (i + 1 < results.size() ? "," : "")
        << "\n";
  }
  out << "]\n";
  return static_cast<bool>(out.flush());
}

}  // namespace

int main(int argc, char** argv) {
  std::string plugin, json, precision = "both";
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--plugin" && i + 1 < argc)
      plugin = argv[++i];
    else if (a == "--json" && i + 1 < argc)
      json = argv[++i];
    else if (a == "--reps" && i + 1 < argc)
      reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--precision" && i + 1 < argc &&
             (std::string(argv[i + 1]) == "bf16" || std::string(argv[i + 1]) == "fp8" ||
              std::string(argv[i + 1]) == "both"))
      precision = argv[++i];
    else {
      std::fprintf(stderr,
                   "usage: moert_cuda_bench [--plugin PATH] [--reps N] [--json FILE] "
                   "[--precision bf16|fp8|both]\n");
      return 2;
    }
  }
  // moert_core is linked in statically, so "beside the library" would mean beside this program,
  // where no plugin is staged: the plugin is named, by option or by the environment.
  if (plugin.empty()) {
    const char* env = std::getenv("MOERT_CUDA_PLUGIN");
    if (env && *env) plugin = env;
  }
  if (plugin.empty()) {
    std::fprintf(stderr,
                 "moert_cuda_bench: no CUDA plugin named: pass --plugin PATH or set "
                 "MOERT_CUDA_PLUGIN to libmoert_cuda.so\n");
    return 2;
  }
  cudaDeviceProp prop{};
  if (const cudaError_t e = cudaGetDeviceProperties(&prop, 0); e != cudaSuccess) {
    std::fprintf(stderr, "moert_cuda_bench: cudaGetDeviceProperties: %s\n", cudaGetErrorName(e));
    return 1;
  }
  std::printf("device: %s, %d SMs; plugin %s\n", prop.name, prop.multiProcessorCount,
              plugin.c_str());
  std::fflush(stdout);
  // Each configuration on its own: one that fails (out of memory, say) still leaves the others'
  // numbers, and the exit status says that something failed.
  struct Config {
    int64_t tokens, experts;
    bool backward;
  };
  const Config configs[] = {
      {4096, 256, false}, {16384, 256, false}, {1024, 64, true}, {4096, 64, true}};
  std::vector<Result> results;
  bool failed = false;
  for (const bool fp8 : {false, true}) {
    if (precision != "both" && (precision == "fp8") != fp8) continue;
    const char* name = fp8 ? "fp8" : "bf16";
    // One backend per precision, the previous one gone first (its scratch is gigabytes).
    std::unique_ptr<Backend> be;
    try {
      be = make_cuda_backend(0, plugin, fp8 ? Precision::Fp8 : Precision::Bf16);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "moert_cuda_bench: %s backend: %s\n", name, e.what());
      failed = true;
      continue;
    }
    for (const Config& c : configs) {
      if (fp8 && c.tokens != 4096) continue;  // the time budget: see the top of this file
      try {
        results.push_back(run(*be, c.tokens, c.experts, c.backward, reps, fp8));
        failed = failed || !std::isfinite(results.back().dense_ms);
        const Result& r = results.back();
        std::printf("%s %s, %lld tokens, %lld experts: %.3f ms\n", name, r.what.c_str(),
                    static_cast<long long>(r.tokens), static_cast<long long>(r.experts), r.ms);
        std::fflush(stdout);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "moert_cuda_bench: %s %s, %lld tokens, %lld experts failed: %s\n",
                     name, c.backward ? "forward+backward" : "forward",
                     static_cast<long long>(c.tokens), static_cast<long long>(c.experts), e.what());
        failed = true;
      }
      if (!json.empty() && !write_json(json, results)) {
        std::fprintf(stderr, "moert_cuda_bench: cannot write %s\n", json.c_str());
        failed = true;
      }
    }
  }
  std::printf("\n%-5s %-17s %7s %7s %10s %9s %12s %9s %9s %8s\n", "prec", "pass", "tokens",
              "experts", "moert ms", "TFLOP/s", "dense GEMM", "TFLOP/s", "vs dense", "MaxVio");
  for (const auto& r : results)
    std::printf("%-5s %-17s %7lld %7lld %10.3f %9.1f %9.3f ms %9.1f %8.2fx %8.3f\n",
                r.precision.c_str(), r.what.c_str(), static_cast<long long>(r.tokens),
                static_cast<long long>(r.experts), r.ms, r.tflops, r.dense_ms, r.dense_tflops,
                r.tflops / r.dense_tflops, r.max_vio);
  return failed ? 1 : 0;
}
