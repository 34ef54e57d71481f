#include <cstring>
#include <string>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/gemm_buckets.h"

#if !defined(CUBLAS_VERSION) || CUBLAS_VERSION < 120900
#error "block-scaled FP8 GEMMs need the VEC128_32F / BLK128x128_32F scale modes of cuBLASLt 12.9"
#endif

namespace moert::cuda::fp8 {
namespace {

constexpr size_t kMinCublasLt = 120900;

const char* scaling_name(Scaling s) {
  return s == Scaling::Blocks ? "BLK128x128_32F blocks" : "VEC128_32F tiles";
}
const char* output_name(Output o) { return o == Output::F32 ? "fp32" : "bf16"; }

// The layout of a GEMM in words, for the errors that refuse it.
template <typename Key>
std::string describe(const Key& key) {
  return cat("d[", key.m, ", ", key.n, "] = a[", key.m, ", ", key.k, "] b[", key.n, ", ", key.k,
             "]^T with a in VEC128_32F tiles, b in ", scaling_name(key.scaling), ", ",
             output_name(key.out), " output, row strides ", key.lda, ", ", key.ldb, ", ", key.ldd,
             " and alignments ", key.align_a, ", ", key.align_b, ", ", key.align_d,
             " bytes (cuBLASLt's FP8 kernels want 16-byte aligned operands and strides)");
}

// cuBLASLt's three layouts for a key. cuBLASLt is column-major: the row-major d[m, n] is the
// column-major n x m matrix b a^T, so our b is cuBLASLt's A (stored k x n, K-major, transposed)
// and our a its B (stored k x m, not transposed): the "TN" form Hopper's FP8 kernels require.
struct Layouts {
  cublasLtMatrixLayoutOpaque_t first, second, d;

  Layouts(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldd, Output out) {
    auto init = [](cublasLtMatrixLayoutOpaque_t& l, cudaDataType_t type, int64_t rows, int64_t cols,
                   int64_t ld, const char* what) {
      check(cublasLtMatrixLayoutInit(&l, type, static_cast<uint64_t>(rows),
                                     static_cast<uint64_t>(cols), ld),
            what);
    };
    init(first, CUDA_R_8F_E4M3, k, n, ldb, "FP8 layout b");
    init(second, CUDA_R_8F_E4M3, k, m, lda, "FP8 layout a");
    init(d, out == Output::F32 ? CUDA_R_32F : CUDA_R_16BF, n, m, ldd, "FP8 layout d");
  }
};

}  // namespace

Fp8Gemm::Fp8Gemm(cudaStream_t stream) : stream_(stream) {
  const size_t version = cublasLtGetVersion();
  if (version < kMinCublasLt)
    fail(Code::Unsupported,
         "block-scaled FP8 GEMMs need cuBLASLt 12.9 or later; the one loaded is ", version);
  int device = 0, major = 0, minor = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
        "compute capability");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
        "compute capability");
  if (major != 9)
    fail(Code::Unsupported,
         "cuBLASLt's block-scaled FP8 (VEC128_32F, BLK128x128_32F) runs on "
         "sm_90 (Hopper) only; device ",
         device, " is sm_", major, minor);
  cublasLtHandle_t handle = nullptr;
  check(cublasLtCreate(&handle), "cublasLtCreate");
  handle_.reset(handle);
  void* workspace = nullptr;
  check(cudaMalloc(&workspace, kWorkspaceBytes), "cudaMalloc(FP8 GEMM workspace)");
  workspace_.reset(workspace);
  for (Scaling s : {Scaling::Tiles, Scaling::Blocks}) {
    cublasLtMatmulDesc_t d = nullptr;
    check(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F), "FP8 matmul desc");
    descs_[static_cast<int>(s)].reset(d);
    // The attributes are int32_t in cuBLASLt, whatever size the enums have.
    const int32_t op_first = CUBLAS_OP_T, op_second = CUBLAS_OP_N;
    const int32_t mode_first = s == Scaling::Blocks ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
                                                    : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    const int32_t mode_second = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    const std::pair<cublasLtMatmulDescAttributes_t, const int32_t*> attrs[] = {
        {CUBLASLT_MATMUL_DESC_TRANSA, &op_first},
        {CUBLASLT_MATMUL_DESC_TRANSB, &op_second},
        {CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode_first},
        {CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode_second}};
    for (const auto& [attr, value] : attrs)
      check(cublasLtMatmulDescSetAttribute(d, attr, value, sizeof(int32_t)),
            "FP8 matmul attribute");
  }
}

Fp8Gemm::~Fp8Gemm() = default;

// The heuristic's first choice for key's shape; CUBLAS_STATUS_NOT_SUPPORTED stands for "no
// algorithm", whether the query said so or returned nothing usable.
cublasStatus_t Fp8Gemm::heuristic(const Key& key, cublasLtMatmulAlgo_t& algo) {
  Layouts l(key.m, key.n, key.k, key.lda, key.ldb, key.ldd, key.out);
  cublasLtMatmulPreferenceOpaque_t pref{};
  check(cublasLtMatmulPreferenceInit(&pref), "FP8 preference");
  const uint64_t workspace_bytes = kWorkspaceBytes;
  check(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace_bytes, sizeof workspace_bytes),
        "FP8 workspace preference");
  // cuBLASLt's A is our b, its B our a.
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_d},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_d}};
  for (const auto& [attr, value] : aligns)
    check(cublasLtMatmulPreferenceSetAttribute(&pref, attr, &value, sizeof value), "FP8 alignment");
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      handle_.get(), desc(key.scaling), &l.first, &l.second, &l.d, &l.d, &pref, 1, &result, &found);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (found == 0 || result.state != CUBLAS_STATUS_SUCCESS) return CUBLAS_STATUS_NOT_SUPPORTED;
  algo = result.algo;
  return CUBLAS_STATUS_SUCCESS;
}

bool Fp8Gemm::fits(const Key& key, const cublasLtMatmulAlgo_t& algo) {
  Layouts l(key.m, key.n, key.k, key.lda, key.ldb, key.ldd, key.out);
  cublasLtMatmulHeuristicResult_t result{};
  const cublasStatus_t st = cublasLtMatmulAlgoCheck(handle_.get(), desc(key.scaling), &l.first,
                                                    &l.second, &l.d, &l.d, &algo, &result);
  return st == CUBLAS_STATUS_SUCCESS && result.workspaceSize <= kWorkspaceBytes;
}

uint32_t Fp8Gemm::intern(const cublasLtMatmulAlgo_t& algo) {
  for (size_t i = 0; i < algos_.size(); ++i)
    if (std::memcmp(&algos_[i], &algo, sizeof algo) == 0) return static_cast<uint32_t>(i);
  algos_.push_back(algo);
  return static_cast<uint32_t>(algos_.size() - 1);
}

// As Gemm::choose (gemm.cu): m (rows per expert in Fprop and Dgrad) and k (tokens in Wgrad) vary
// from step to step and are bucketed; the bucket's algorithm is tried on the exact shape, and the
// heuristic is asked about the exact shape only when it does not fit.
uint32_t Fp8Gemm::choose(const Key& exact) {
  Key b = exact;
  b.m = bucket(exact.m);
  b.k = bucket(exact.k);
  b.lda = widen(exact.lda, b.k, 1);
  b.ldb = widen(exact.ldb, b.k, 1);
  auto it = buckets_.find(b);
  if (it == buckets_.end()) {
    cublasLtMatmulAlgo_t algo{};
    const cublasStatus_t st = heuristic(b, algo);
    if (st == CUBLAS_STATUS_ALLOC_FAILED) check(st, "FP8 matmul heuristic");
    it = buckets_.emplace(b, st == CUBLAS_STATUS_SUCCESS ? intern(algo) : kNoAlgo).first;
  }
  uint32_t index = it->second;
  const bool own_bucket = !(b < exact) && !(exact < b);
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  if (index == kNoAlgo || (!own_bucket && !fits(exact, algos_[index]))) {
    cublasLtMatmulAlgo_t algo{};
    st = heuristic(exact, algo);
    index = st == CUBLAS_STATUS_SUCCESS ? intern(algo) : kNoAlgo;
    // Any refusal of the exact shape is reported below as what it is: this layout unsupported.
    if (st == CUBLAS_STATUS_ALLOC_FAILED) check(st, "FP8 matmul heuristic");
  }
  if (index == kNoAlgo)
    fail(Code::Unsupported, "cuBLASLt ", cublasLtGetVersion(),
         " has no block-scaled FP8 algorithm for ", describe(exact), " (heuristic status ",
         static_cast<int>(st), ")");
  chosen_.emplace(exact, index);
  return index;
}

void Fp8Gemm::run(int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda,
                  const float* a_scales, const uint8_t* b, int64_t ldb, const float* b_scales,
                  Scaling b_scaling, void* d, int64_t ldd, Output out, bool accumulate) {
  if (m < 0 || n < 0 || k < 0 || lda < k || ldb < k || ldd < n)
    fail(Code::Internal, "FP8 GEMM ", m, "x", n, "x", k, " has row strides ", lda, ", ", ldb, ", ",
         ldd, " shorter than its rows");
  if (m == 0 || n == 0) return;
  const int64_t out_bytes = out == Output::F32 ? 4 : 2;
  if (k == 0) {
    if (!accumulate)
      check(cudaMemset2DAsync(d, static_cast<size_t>(ldd * out_bytes), 0,
                              static_cast<size_t>(n * out_bytes), static_cast<size_t>(m), stream_),
            "zero FP8 GEMM output");
    return;
  }
  auto align = [](const void* ptr, int64_t ld, int64_t elem) {
    const uint64_t bits =
        reinterpret_cast<uintptr_t>(ptr) | static_cast<uint64_t>(ld * elem) | 256u;
    return static_cast<uint32_t>(bits & (~bits + 1));
  };
  const Key key{
      m,         n,  k, lda, ldb, ldd, align(a, lda, 1), align(b, ldb, 1), align(d, ldd, out_bytes),
      b_scaling, out};
  cublasLtMatmulDesc_t op = desc(b_scaling);
  // cuBLASLt's A is our b, its B our a.
  check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &b_scales,
                                       sizeof b_scales),
        "FP8 b scales");
  check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &a_scales,
                                       sizeof a_scales),
        "FP8 a scales");
  const auto it = chosen_.find(key);
  const uint32_t index = it != chosen_.end() ? it->second : choose(key);
  Layouts l(m, n, k, lda, ldb, ldd, out);
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const cublasStatus_t st =
      cublasLtMatmul(handle_.get(), op, &alpha, b, &l.first, a, &l.second, &beta, d, &l.d, d, &l.d,
                     &algos_[index], workspace_.get(), kWorkspaceBytes, stream_);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED)
    fail(Code::Unsupported, "cuBLASLt ", cublasLtGetVersion(), " refused to run ", describe(key));
  check(st, "FP8 cublasLtMatmul");
}

}  // namespace moert::cuda::fp8
