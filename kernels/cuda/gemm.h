// Row-major GEMMs through cuBLASLt. The heuristic is asked once per bucket of shapes, not once per
// shape, and each exact shape's algorithm is fixed the first time it is seen.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>
#include <vector>

namespace moert::cuda {

class Gemm {
 public:
  Gemm(cudaStream_t stream);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // C[m, n] = op(A) op(B) + beta C, all row-major: op(A) is [m, k] (A stored [k, m] when ta),
  // op(B) is [k, n] (B stored [n, k] when tb). A and B are bf16 when bf16 is true, else fp32
  // (multiplied in full fp32, no TF32); C is fp32; accumulation is fp32. beta is 0 or 1.
  void run(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
           const void* b, int64_t ldb, float* c, int64_t ldc, float beta, bool bf16);

 private:
  // Owners for what cuBLASLt and CUDA hand out, so that a throw part-way through the constructor
  // releases everything made before it.
  struct HandleFree {
    void operator()(cublasLtHandle_t h) const { cublasLtDestroy(h); }
  };
  struct DeviceFree {
    void operator()(void* p) const { cudaFree(p); }
  };
  struct DescFree {
    void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
  };

  // Shape, leading dimensions, types, and the alignments (bytes) of the three operands: an
  // algorithm chosen for better-aligned pointers may refuse or misread worse-aligned ones.
  // 64 bytes; the order of the fields is only there to avoid padding.
  struct Key {
    int64_t m, n, k, lda, ldb, ldc;
    uint32_t align_a, align_b, align_c;
    bool ta, tb, bf16;
    auto tie() const {
      return std::tie(m, n, k, lda, ldb, ldc, align_a, align_b, align_c, ta, tb, bf16);
    }
    bool operator<(const Key& o) const { return tie() < o.tie(); }
  };
  static_assert(sizeof(Key) == 64, "chosen_'s per-entry cost below assumes a 64-byte key");
  static constexpr uint32_t kNoAlgo = UINT32_MAX;
  static constexpr uint64_t kWorkspaceBytes = uint64_t{32} << 20;

  cublasLtMatmulDesc_t desc(const Key& key) const {
    return descs_[(key.ta ? 2 : 0) + (key.tb ? 1 : 0)].get();
  }
  uint32_t choose(const Key& exact);
  cublasStatus_t heuristic(const Key& key, cublasLtMatmulAlgo_t& algo);
  bool fits(const Key& key, const cublasLtMatmulAlgo_t& algo);
  uint32_t intern(const cublasLtMatmulAlgo_t& algo);

  cudaStream_t stream_;
  std::unique_ptr<cublasLtContext, HandleFree> handle_;
  std::unique_ptr<void, DeviceFree> workspace_;
  // One operation descriptor per (ta, tb): nothing else in it depends on the shape.
  std::unique_ptr<cublasLtMatmulDescOpaque_t, DescFree> descs_[4];
  // Every algorithm in use, each once; the maps below hold indices into it (or kNoAlgo).
  std::vector<cublasLtMatmulAlgo_t> algos_;
  // A bucket's key (see choose() in gemm.cu) -> the heuristic's answer for that bucket's shape.
  // Four buckets per doubling of m and of k, so this grows with the logarithm of the sizes seen.
  std::map<Key, uint32_t> buckets_;
  // Exact key -> the algorithm every run() with that key uses.
  //
  // Invariant (bitwise determinism): within a process, a given exact Key always runs the same
  // algorithm. An entry is written once, the first time its key is seen, and is never replaced or
  // evicted; buckets_ and algos_ are never rewritten either. The choice also depends on the exact
  // key alone, not on the order in which shapes arrive, as far as cuBLASLt's heuristic is itself
  // deterministic: a bucket's algorithm comes from a query on the bucket's own shape, never on the
  // exact shape that happened to open it.
  //
  // Memory: not capped, since evicting an entry would give up the invariant. An entry is about
  // 100 bytes (the 64-byte key, a 4-byte index, the map node), one per distinct exact shape. In an
  // MoE layer only the per-expert row count varies, and it lies in [1, tokens per batch], so a
  // model and batch size bound the count: at most (distinct GEMM shapes with a row count in them,
  // six for a SwiGLU FFN's forward and backward) x (tokens per batch) x (the operand alignments
  // row offsets produce, one when the model dimensions are multiples of 128). For 8192 tokens
  // that is about 5 MB at worst; row counts cluster around their mean, so far less in practice.
  // algos_ grows only when an exact-shape query finds an algorithm not already in it.
  std::map<Key, uint32_t> chosen_;
};

}  // namespace moert::cuda
