#include <cstring>
#include <utility>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_buckets.h"

namespace moert::cuda {
namespace {

// cuBLASLt's three layouts for a key, in space of our own: made per call, nothing to free.
// cuBLASLt is column-major. A row-major C[m, n] is the column-major C^T[n, m], and
// C^T = op(B)^T op(A)^T: the row-major B goes first, A second, with the same transposition flags.
struct Layouts {
  cublasLtMatrixLayoutOpaque_t first, second, c;

  Layouts(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
          bool bf16) {
    const cudaDataType_t ab = bf16 ? CUDA_R_16BF : CUDA_R_32F;
    auto init = [](cublasLtMatrixLayoutOpaque_t& l, cudaDataType_t type, int64_t rows, int64_t cols,
                   int64_t ld, const char* what) {
      check(cublasLtMatrixLayoutInit(&l, type, static_cast<uint64_t>(rows),
                                     static_cast<uint64_t>(cols), ld),
            what);
    };
    // Row-major B [k, n] is column-major n x k; stored [n, k] (tb) it is k x n, transposed.
    init(first, ab, tb ? k : n, tb ? n : k, ldb, "layout B");
    // Row-major A [m, k] is column-major k x m; stored [k, m] (ta) it is m x k, transposed.
    init(second, ab, ta ? m : k, ta ? k : m, lda, "layout A");
    init(c, CUDA_R_32F, n, m, ldc, "layout C");
  }
};

}  // namespace

Gemm::Gemm(cudaStream_t stream) : stream_(stream) {
  cublasLtHandle_t handle = nullptr;
  check(cublasLtCreate(&handle), "cublasLtCreate");
  handle_.reset(handle);
  void* workspace = nullptr;
  check(cudaMalloc(&workspace, kWorkspaceBytes), "cudaMalloc(GEMM workspace)");
  workspace_.reset(workspace);
  for (int i = 0; i < 4; ++i) {
    cublasLtMatmulDesc_t d = nullptr;
    check(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
    descs_[i].reset(d);
    // cuBLASLt's first operand is our B (transposed when tb), its second our A (when ta). The
    // attributes are int32_t in cuBLASLt, whatever size the enum has.
    const int32_t op_first = (i & 1) ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int32_t op_second = (i & 2) ? CUBLAS_OP_T : CUBLAS_OP_N;
    check(
        cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof op_first),
        "TRANSA");
    check(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &op_second,
                                         sizeof op_second),
          "TRANSB");
  }
}

Gemm::~Gemm() = default;

// The heuristic's first choice for key's shape into algo. CUBLAS_STATUS_NOT_SUPPORTED stands for
// "no algorithm", whether the query said so or returned nothing usable.
cublasStatus_t Gemm::heuristic(const Key& key, cublasLtMatmulAlgo_t& algo) {
  Layouts l(key.ta, key.tb, key.m, key.n, key.k, key.lda, key.ldb, key.ldc, key.bf16);
  cublasLtMatmulPreferenceOpaque_t pref{};
  check(cublasLtMatmulPreferenceInit(&pref), "preference");
  const uint64_t workspace_bytes = kWorkspaceBytes;
  check(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace_bytes, sizeof workspace_bytes),
        "workspace preference");
  // cuBLASLt's first operand is our B, its second our A.
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c}};
  for (const auto& [attr, value] : aligns)
    check(cublasLtMatmulPreferenceSetAttribute(&pref, attr, &value, sizeof value), "alignment");
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      handle_.get(), desc(key), &l.first, &l.second, &l.c, &l.c, &pref, 1, &result, &found);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (found == 0 || result.state != CUBLAS_STATUS_SUCCESS) return CUBLAS_STATUS_NOT_SUPPORTED;
  algo = result.algo;
  return CUBLAS_STATUS_SUCCESS;
}

// Whether algo runs key's exact shape within our workspace. cublasLtMatmulAlgoCheck sees the
// layouts but not the pointers; the pointers' alignment is covered because a bucket shares its
// members' alignments, and the bucket's algorithm was chosen under them.
bool Gemm::fits(const Key& key, const cublasLtMatmulAlgo_t& algo) {
  Layouts l(key.ta, key.tb, key.m, key.n, key.k, key.lda, key.ldb, key.ldc, key.bf16);
  cublasLtMatmulHeuristicResult_t result{};
  const cublasStatus_t st = cublasLtMatmulAlgoCheck(handle_.get(), desc(key), &l.first, &l.second,
                                                    &l.c, &l.c, &algo, &result);
  return st == CUBLAS_STATUS_SUCCESS && result.workspaceSize <= kWorkspaceBytes;
}

uint32_t Gemm::intern(const cublasLtMatmulAlgo_t& algo) {
  for (size_t i = 0; i < algos_.size(); ++i)
    if (std::memcmp(&algos_[i], &algo, sizeof algo) == 0) return static_cast<uint32_t>(i);
  algos_.push_back(algo);
  return static_cast<uint32_t>(algos_.size() - 1);
}

// First sight of an exact shape. In grouped GEMMs the per-expert row count changes every step:
// it is m in the forward and input-gradient GEMMs and k in the weight-gradient ones, so both are
// bucketed; n is always a model dimension. The bucket's algorithm is tried on the exact shape,
// and only when it does not fit is the heuristic asked about the exact shape itself.
uint32_t Gemm::choose(const Key& exact) {
  const int64_t elem = exact.bf16 ? 2 : 4;
  Key b = exact;
  b.m = bucket(exact.m);
  b.k = bucket(exact.k);
  b.lda = widen(exact.lda, exact.ta ? b.m : b.k, elem);
  b.ldb = widen(exact.ldb, exact.tb ? b.k : b.n, elem);
  auto it = buckets_.find(b);
  if (it == buckets_.end()) {
    cublasLtMatmulAlgo_t algo{};
    const cublasStatus_t st = heuristic(b, algo);
    // Running out of memory is no answer about the bucket; anything else the query refuses
    // leaves its members to the exact-shape query below.
    if (st == CUBLAS_STATUS_ALLOC_FAILED) check(st, "matmul heuristic");
    it = buckets_.emplace(b, st == CUBLAS_STATUS_SUCCESS ? intern(algo) : kNoAlgo).first;
  }
  uint32_t index = it->second;
  // A shape that is its own bucket has had its exact query already, unless that failed: asking
  // again then reports the failure as it is.
  const bool own_bucket = !(b < exact) && !(exact < b);
  if (index == kNoAlgo || (!own_bucket && !fits(exact, algos_[index]))) {
    cublasLtMatmulAlgo_t algo{};
    const cublasStatus_t st = heuristic(exact, algo);
    index = st == CUBLAS_STATUS_SUCCESS ? intern(algo) : kNoAlgo;
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) check(st, "matmul heuristic");
  }
  if (index == kNoAlgo)
    fail(Code::Unsupported, "cuBLASLt has no algorithm for a ", exact.m, "x", exact.n, "x", exact.k,
         exact.bf16 ? " bf16" : " fp32", " GEMM");
  chosen_.emplace(exact, index);
  return index;
}

void Gemm::run(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
               const void* b, int64_t ldb, float* c, int64_t ldc, float beta, bool bf16) {
  // Checked here because a leading dimension shorter than a row would otherwise surface as "no
  // algorithm" or a failed memset, far from the caller's mistake.
  if (m < 0 || n < 0 || k < 0 || lda < (ta ? m : k) || ldb < (tb ? k : n) || ldc < n)
    fail(Code::Internal, "GEMM ", m, "x", n, "x", k, " has leading dimensions ", lda, ", ", ldb,
         ", ", ldc, " shorter than its rows");
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
  const Key key{
      m,  n,  k,   lda, ldb, ldc, align(a, lda, elem), align(b, ldb, elem), align(c, ldc, 4),
      ta, tb, bf16};
  const auto it = chosen_.find(key);
  const uint32_t index = it != chosen_.end() ? it->second : choose(key);
  Layouts l(ta, tb, m, n, k, lda, ldb, ldc, bf16);
  const float alpha = 1.0f;
  const cublasStatus_t st =
      cublasLtMatmul(handle_.get(), desc(key), &alpha, b, &l.first, a, &l.second, &beta, c, &l.c, c,
                     &l.c, &algos_[index], workspace_.get(), kWorkspaceBytes, stream_);
  // The heuristic's algorithm can still be refused at run time (as FP8's may, fp8_gemm.cu): that
  // is the installed cuBLASLt's limit, not an internal fault.
  if (st == CUBLAS_STATUS_NOT_SUPPORTED)
    fail(Code::Unsupported, "cuBLASLt ", cublasLtGetVersion(), " refused to run a ", m, "x", n, "x",
         k, bf16 ? " bf16" : " fp32", " GEMM (transposes ", ta, tb, ")");
  check(st, "cublasLtMatmul");
}

}  // namespace moert::cuda
