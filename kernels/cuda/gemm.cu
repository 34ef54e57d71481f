#include <utility>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemm.h"

namespace moert::cuda {

Gemm::Gemm(cudaStream_t stream) : stream_(stream) {
  cublasLtHandle_t handle = nullptr;
  check(cublasLtCreate(&handle), "cublasLtCreate");
  handle_.reset(handle);
  void* workspace = nullptr;
  check(cudaMalloc(&workspace, kWorkspaceBytes), "cudaMalloc(GEMM workspace)");
  workspace_.reset(workspace);
}

Gemm::~Gemm() = default;

// cuBLASLt is column-major. A row-major C[m, n] is the column-major C^T[n, m], and
// C^T = op(B)^T op(A)^T: the row-major B goes first, A second, with the same transposition flags.
Gemm::Plan& Gemm::plan(const Key& key) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  const auto [ta, tb, m, n, k, lda, ldb, ldc, bf16, align_a, align_b, align_c] = key;
  Plan p;
  const cudaDataType_t ab = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  cublasLtMatmulDesc_t desc = nullptr;
  check(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
  p.desc.reset(desc);
  // The transposition attributes are int32_t in cuBLASLt, whatever size the enum has.
  const int32_t op_first = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t op_second = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  check(
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof op_first),
      "TRANSA");
  check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second,
                                       sizeof op_second),
        "TRANSB");
  auto layout = [](Layout& out, cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld,
                   const char* what) {
    cublasLtMatrixLayout_t l = nullptr;
    check(cublasLtMatrixLayoutCreate(&l, type, static_cast<uint64_t>(rows),
                                     static_cast<uint64_t>(cols), ld),
          what);
    out.reset(l);
  };
  // First operand (row-major B): n x k before op when not transposed.
  layout(p.a, ab, tb ? k : n, tb ? n : k, ldb, "layout B");
  layout(p.b, ab, ta ? m : k, ta ? k : m, lda, "layout A");
  layout(p.c, CUDA_R_32F, n, m, ldc, "layout C");
  cublasLtMatmulPreference_t raw_pref = nullptr;
  check(cublasLtMatmulPreferenceCreate(&raw_pref), "preference");
  const std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceFree> pref(raw_pref);
  const uint64_t workspace_bytes = kWorkspaceBytes;
  check(cublasLtMatmulPreferenceSetAttribute(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace_bytes, sizeof workspace_bytes),
        "workspace preference");
  // cuBLASLt's first operand is our B, its second our A.
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}};
  for (const auto& [attr, value] : aligns)
    check(cublasLtMatmulPreferenceSetAttribute(raw_pref, attr, &value, sizeof value), "alignment");
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(handle_.get(), desc, p.a.get(), p.b.get(), p.c.get(),
                                     p.c.get(), raw_pref, 1, &result, &found);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0 || result.state != CUBLAS_STATUS_SUCCESS)
    fail(Code::Unsupported, "cuBLASLt has no algorithm for a ", m, "x", n, "x", k,
         bf16 ? " bf16" : " fp32", " GEMM");
  p.algo = result.algo;
  return plans_.emplace(key, std::move(p)).first->second;
}

void Gemm::run(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
               const void* b, int64_t ldb, float* c, int64_t ldc, float beta, bool bf16) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // The product is empty, so C becomes beta C: zero for beta 0, untouched for beta 1. The m rows
    // of n floats, ldc apart, form one pitched region, so a single memset covers any m.
    if (beta == 0.0f)
      check(cudaMemset2DAsync(c, static_cast<size_t>(ldc) * sizeof(float), 0,
                              static_cast<size_t>(n) * sizeof(float), static_cast<size_t>(m),
                              stream_),
            "zero GEMM output");
    else if (beta != 1.0f)
      fail(Code::Internal, "a GEMM with k = 0 takes beta 0 or 1, not ", beta);
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
  check(
      cublasLtMatmul(handle_.get(), p.desc.get(), &alpha, b, p.a.get(), a, p.b.get(), &beta, c,
                     p.c.get(), c, p.c.get(), &p.algo, workspace_.get(), kWorkspaceBytes, stream_),
      "cublasLtMatmul");
}

}  // namespace moert::cuda
