// Row-major GEMMs through cuBLASLt, with the heuristic's choice cached per shape.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

namespace moert::cuda {

class Gemm {
 public:
  Gemm(cudaStream_t stream);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // C[m, n] = op(A) op(B) + beta C, all row-major: op(A) is [m, k] (A stored [k, m] when ta),
  // op(B) is [k, n] (B stored [n, k] when tb). A and B are bf16 when bf16 is true, else fp32
  // (multiplied in full fp32, no TF32); C is fp32; accumulation is fp32.
  void run(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
           const void* b, int64_t ldb, float* c, int64_t ldc, float beta, bool bf16);

 private:
  // Owners for what cuBLASLt and CUDA hand out, so that a throw part-way through the constructor
  // or a plan releases everything made before it.
  struct HandleFree {
    void operator()(cublasLtHandle_t h) const { cublasLtDestroy(h); }
  };
  struct DeviceFree {
    void operator()(void* p) const { cudaFree(p); }
  };
  struct DescFree {
    void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
  };
  struct LayoutFree {
    void operator()(cublasLtMatrixLayout_t l) const { cublasLtMatrixLayoutDestroy(l); }
  };
  struct PreferenceFree {
    void operator()(cublasLtMatmulPreference_t p) const { cublasLtMatmulPreferenceDestroy(p); }
  };
  using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutFree>;

  struct Plan {
    std::unique_ptr<cublasLtMatmulDescOpaque_t, DescFree> desc;
    Layout a, b, c;
    cublasLtMatmulAlgo_t algo{};
  };
  // Shape, leading dimensions, types, and the alignments (bytes) of the three operands: an
  // algorithm chosen for better-aligned pointers may refuse or misread worse-aligned ones.
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool,
                         uint32_t, uint32_t, uint32_t>;
  Plan& plan(const Key& key);

  static constexpr uint64_t kWorkspaceBytes = uint64_t{32} << 20;

  cudaStream_t stream_;
  std::unique_ptr<cublasLtContext, HandleFree> handle_;
  std::unique_ptr<void, DeviceFree> workspace_;
  std::map<Key, Plan> plans_;
};

}  // namespace moert::cuda
