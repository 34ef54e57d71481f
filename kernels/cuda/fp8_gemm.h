// Block-scaled FP8 GEMMs through cuBLASLt (CUDA >= 12.9, sm_90): DeepSeek-V3's recipe with the
// VEC128_32F (1x128 tiles) and BLK128x128_32F (128x128 blocks) scale modes, E4M3 operands, fp32
// accumulation with cuBLASLt's own promotion of partial sums, fp32 or bf16 output. Plans follow
// gemm.h: the heuristic is asked once per bucket of shapes, and each exact shape keeps the
// algorithm it first ran with. Where cuBLASLt has no algorithm for a shape or layout, run() throws
// Error(Code::Unsupported) naming it; nothing falls back to another precision.
//
// The three GEMMs of training map onto run() as (with the quantizers of fp8_quantize.h):
//   Fprop  y[T, out]   = x[T, in] W[out, in]^T:  a = x in row tiles along in,
//                                                b = W in blocks (Scaling::Blocks).
//   Dgrad  dx[T, in]   = dy[T, out] W:           a = dy in row tiles along out,
//                                                b = W^T [in, out] from transpose_blocks().
//   Wgrad  dW[out, in] = dy^T x:                 a = dy^T [out, T] and b = x^T [in, T], both
//                                                from quantize_column_tiles_transposed()
//                                                (Scaling::Tiles).
//
// The tiles' scale stride is fixed by cuBLASLt, not passed: this code assumes the layout
// Transformer Engine gives cuBLASLt (tile_scale_ld: rows rounded up to a multiple of 4); for row
// counts that are multiples of 4 it is also PyTorch's. Transformer Engine also holds m (the rows
// of the 1x128-scaled a, cuBLASLt's n) to multiples of 8, having seen cuBLASLt fail otherwise;
// cuda_ffn_fp8.cu runs every m rounded up to 16, which makes both questions moot there.
// tests/gpu/test_cuda_fp8.cc compares every case with the CPU emulation and asks what cuBLASLt
// does with m off multiples of 8. On an H200 with cuBLASLt 13.1 (2026-12-04, bench/RESULTS.md)
// every case matched the emulation, m = 1, 37 and 37034 were refused (Unsupported), and m = 4
// and 12 ran with the documented stride.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>
#include <vector>

namespace moert::cuda::fp8 {

enum class Scaling : int32_t { Tiles, Blocks };
enum class Output : int32_t { F32, BF16 };

class Fp8Gemm {
 public:
  // Throws Error(Code::Unsupported) where the linked cuBLASLt is older than 12.9 or the current
  // device is not sm_90 (block-scaled FP8 in cuBLASLt is a Hopper feature).
  explicit Fp8Gemm(cudaStream_t stream);
  ~Fp8Gemm();
  Fp8Gemm(const Fp8Gemm&) = delete;
  Fp8Gemm& operator=(const Fp8Gemm&) = delete;

  // d[m, n] (row-major, row stride ldd, fp32 or bf16) = sum_k a[m, k] b[n, k] (+ d when
  // accumulate), on the constructor's stream, not thread-safe.
  //   a: E4M3 codes [m, >= k], row stride lda; 1x128 tiles along k, the scale of row r, tile t at
  //      a_scales[t * tile_scale_ld(m) + r].
  //   b: E4M3 codes [n, >= k], row stride ldb; Scaling::Tiles: the scale of row r, tile t at
  //      b_scales[t * tile_scale_ld(n) + r]; Scaling::Blocks: block (nb, kb) at
  //      b_scales[nb * block_scale_ld(k) + kb].
  // cuBLASLt's FP8 kernels want 16-byte aligned operands and row strides (multiples of 16 codes);
  // a layout it refuses is an Unsupported error.
  void run(int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda, const float* a_scales,
           const uint8_t* b, int64_t ldb, const float* b_scales, Scaling b_scaling, void* d,
           int64_t ldd, Output out, bool accumulate);

 private:
  struct HandleFree {
    void operator()(cublasLtHandle_t h) const { cublasLtDestroy(h); }
  };
  struct DeviceFree {
    void operator()(void* p) const { cudaFree(p); }
  };
  struct DescFree {
    void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
  };

  // Shape, strides, the alignments (bytes) of the three operands, the b scaling and the output
  // type: everything an algorithm's choice depends on.
  struct Key {
    int64_t m, n, k, lda, ldb, ldd;
    uint32_t align_a, align_b, align_d;
    Scaling scaling;
    Output out;
    auto tie() const {
      return std::tie(m, n, k, lda, ldb, ldd, align_a, align_b, align_d, scaling, out);
    }
    bool operator<(const Key& o) const { return tie() < o.tie(); }
  };
  static constexpr uint32_t kNoAlgo = UINT32_MAX;
  static constexpr uint64_t kWorkspaceBytes = uint64_t{32} << 20;

  cublasLtMatmulDesc_t desc(Scaling s) const { return descs_[static_cast<int>(s)].get(); }
  uint32_t choose(const Key& exact);
  cublasStatus_t heuristic(const Key& key, cublasLtMatmulAlgo_t& algo);
  bool fits(const Key& key, const cublasLtMatmulAlgo_t& algo);
  uint32_t intern(const cublasLtMatmulAlgo_t& algo);

  cudaStream_t stream_;
  std::unique_ptr<cublasLtContext, HandleFree> handle_;
  std::unique_ptr<void, DeviceFree> workspace_;
  // One operation descriptor per b scaling (the scale modes live in it); the scale pointers are
  // set on it before each matmul, which reads them when it is enqueued.
  std::unique_ptr<cublasLtMatmulDescOpaque_t, DescFree> descs_[2];
  // As in gemm.h: every algorithm once; bucket key -> the heuristic's answer for the bucket;
  // exact key -> the algorithm every run() with that key uses, written once and never replaced
  // (bitwise determinism within a process, whatever order shapes arrive in).
  std::vector<cublasLtMatmulAlgo_t> algos_;
  std::map<Key, uint32_t> buckets_;
  std::map<Key, uint32_t> chosen_;
};

}  // namespace moert::cuda::fp8
