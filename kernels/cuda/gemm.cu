#include <utility>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemm.h"

namespace moert::cuda {

Gemm::Gemm(cudaStream_t stream) : stream_(stream) {
  check(cublasLtCreate(&handle_), "cublasLtCreate");
  check(cudaMalloc(&workspace_, workspace_size_), "cudaMalloc(GEMM workspace)");
}

Gemm::~Gemm() {
  for (auto& [key, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.desc);
  }
  cudaFree(workspace_);
  cublasLtDestroy(handle_);
}

// cuBLASLt is column-major. A row-major C[m, n] is the column-major C^T[n, m], and
// C^T = op(B)^T op(A)^T: the row-major B goes first, A second, with the same transposition flags.
Gemm::Plan& Gemm::plan(const Key& key) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  const auto [ta, tb, m, n, k, lda, ldb, ldc, bf16, align_a, align_b, align_c] = key;
  Plan p;
  const cudaDataType_t ab = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  check(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
  const cublasOperation_t op_first = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first,
                                       sizeof op_first),
        "TRANSA");
  check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second,
                                       sizeof op_second),
        "TRANSB");
  // First operand (row-major B): n x k before op when not transposed.
  check(cublasLtMatrixLayoutCreate(&p.a, ab, tb ? k : n, tb ? n : k, ldb), "layout B");
  check(cublasLtMatrixLayoutCreate(&p.b, ab, ta ? m : k, ta ? k : m, lda), "layout A");
  check(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_32F, n, m, ldc), "layout C");
  cublasLtMatmulPreference_t pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&pref), "preference");
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace_size_, sizeof workspace_size_),
        "workspace preference");
  // cuBLASLt's first operand is our B, its second our A.
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}};
  for (const auto& [attr, value] : aligns)
    check(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof value), "alignment");
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    fail(Code::Unsupported, "cuBLASLt has no algorithm for a ", m, "x", n, "x", k,
         bf16 ? " bf16" : " fp32", " GEMM");
  p.algo = result.algo;
  return plans_.emplace(key, p).first->second;
}

void Gemm::run(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
               const void* b, int64_t ldb, float* c, int64_t ldc, float beta, bool bf16) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < m; ++i)
        check(cudaMemsetAsync(c + i * ldc, 0, sizeof(float) * n, stream_), "zero GEMM output");
    return;
  }
  // The alignment every row start of an operand shares: its address and its row stride.
  auto align = [](const void* ptr, int64_t ld, int64_t elem) {
    const uint64_t bits =
        reinterpret_cast<uintptr_t>(ptr) | static_cast<uint64_t>(ld * elem) | 256u;
    return static_cast<uint32_t>(bits & (~bits + 1));
  };
  const int64_t elem = bf16 ? 2 : 4;
  Plan& p = plan({ta, tb, m, n, k, lda, ldb, ldc, bf16, align(a, lda, elem), align(b, ldb, elem),
                  align(c, ldc, 4)});
  const float alpha = 1.0f;
  check(cublasLtMatmul(handle_, p.desc, &alpha, b, p.a, a, p.b, &beta, c, p.c, c, p.c, &p.algo,
                       workspace_, workspace_size_, stream_),
        "cublasLtMatmul");
}

}  // namespace moert::cuda
