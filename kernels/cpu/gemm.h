// The CPU backend's GEMMs. fp32 goes to oneDNN's sgemm. bf16 (operands rounded to bf16, fp32
// accumulation) goes to oneDNN's matmul on CPUs that multiply bf16 natively (AVX512-BF16, AMX),
// and to moert's widening kernels elsewhere (widen_gemm.h). Every call is single-threaded (the
// caller's thread is kept serial by omp_guard.h) and deterministic for given shapes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moert::cpu {

// Sets up oneDNN's f32 GEMM kernels once per process (kernels/cpu/exit_gate.h: their teardown at
// exit must be registered before the gate's handler); a CPU backend calls it when created.
void warm_up_sgemm();

// c[m, n] (+)= op(a) op(b), fp32, row-major; op transposes when asked (a is then [k, m], b [n, k]).
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

// Which kernels a bf16 GEMM runs on.
enum class Bf16Kernels { Dnnl, Widen };

// bf16 GEMMs with fp32 accumulation for one backend. Activation operands are prepared once per
// call with prepare() (or written so by their producer: math.h's swiglu_to_bf16) into the form
// the kernels read — bf16 values (2 bytes) for oneDNN, fp32 values rounded to bf16 (4 bytes) for
// the widening kernels — so each kernel call converts nothing; weights are read from their bf16
// copies as stored (which oneDNN repacks per call) or, with oneDNN, packed once in its own layout
// (pack, act_packed_nt). Thread-safe: each worker passes its own index.
class Bf16Gemm {
 public:
  // `workers`: the backend's thread count; `kernels`: normally what the CPU supports
  // (default_kernels()).
  Bf16Gemm(unsigned workers, Bf16Kernels kernels);
  ~Bf16Gemm();
  Bf16Gemm(const Bf16Gemm&) = delete;
  Bf16Gemm& operator=(const Bf16Gemm&) = delete;

  // oneDNN where it multiplies bf16 natively, else the widening kernels.
  static Bf16Kernels default_kernels();

  Bf16Kernels kernels() const { return kernels_; }
  // Bytes per element of a prepared activation operand.
  size_t act_bytes() const { return kernels_ == Bf16Kernels::Dnnl ? 2 : 4; }

  // out = x [rows, cols] (row stride ldx) in operand form, row stride ldo; or, with `transpose`,
  // out[c * ldo + r] = x[r, c] (the [cols, rows] operand of a Wgrad).
  void prepare(const float* x, int64_t ldx, int64_t rows, int64_t cols, void* out, int64_t ldo,
               bool transpose) const;
  // out [cols, rows] (row stride ldo) = x [rows, cols] (row stride ldx) transposed, both
  // prepared: the bits prepare() with `transpose` gives from the values x was prepared from.
  void transpose_prepared(const void* x, int64_t ldx, int64_t rows, int64_t cols, void* out,
                          int64_t ldo) const;

  // c[m, n] (+)= a[m, k] w[n, k]^T: a prepared, w bf16 (a linear layer's weight: Fprop).
  void act_weight_nt(const void* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                     int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate,
                     unsigned worker);
  // c[m, n] (+)= a[m, k] w[k, n]: the weight from its output side (Dgrad).
  void act_weight_nn(const void* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                     int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate,
                     unsigned worker);
  // c[m, n] (+)= a[m, k] b[n, k]^T, both prepared (Wgrad, from transposed operands).
  void act_act_nt(const void* a, int64_t lda, const void* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t m, int64_t n, int64_t k, bool accumulate, unsigned worker);
  // c[m, n] (+)= a[m, k] b[k, n], both prepared (Wgrad, a transposed, b as its rows come).
  void act_act_nn(const void* a, int64_t lda, const void* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t m, int64_t n, int64_t k, bool accumulate, unsigned worker);
  // The oneDNN implementation act_act_nn runs for a shape (kernels Dnnl; tests: never its
  // reference kernel).
  std::string act_act_nn_implementation(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                                        int64_t ldc);

  // Packed weights (kernels Dnnl only): a weight w[n, k] as the [k, n] operand of oneDNN's
  // matmul in the blocked layout its kernels read directly, so that a call repacks nothing. The
  // layout is oneDNN's choice for (k, n), asked once and used for every m. Bytes of the packed
  // form of w[n, k]:
  size_t packed_bytes(int64_t n, int64_t k);
  // out (packed_bytes(n, k) bytes) = w[n, k] (row stride ldw), packed.
  void pack(const uint16_t* w, int64_t ldw, int64_t n, int64_t k, void* out, unsigned worker);
  // The oneDNN implementation act_packed_nt runs for a shape (tests: never its reference kernel).
  std::string packed_implementation(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc);
  // c[m, n] (+)= a[m, k] w^T, a prepared, w packed from w[n, k] (Fprop).
  void act_packed_nt(const void* a, int64_t lda, const void* w, float* c, int64_t ldc, int64_t m,
                     int64_t n, int64_t k, bool accumulate, unsigned worker);

 private:
  struct Dnnl;
  // Rows up to which oneDNN's kernels are not used: a decode step's few rows would pay for the
  // per-call repacking of the whole weight; the widening kernels stream it once instead. Beyond
  // 8 rows oneDNN is faster (AVX512-BF16, Zen 5, `moert bench --decode`: the 64-row batch, about
  // 18 rows per expert, 178 ms against 226 with the cut at 16; the cut at 1 slows the 8-row batch
  // from 72 to 108 ms).
  static constexpr int64_t kFewRows = 8;
  // act_act_nt (b_trans) or act_act_nn.
  void act_act(bool b_trans, const void* a, int64_t lda, const void* b, int64_t ldb, float* c,
               int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate, unsigned worker);
  // a (bf16, prepared for oneDNN) widened into the worker's scratch, for the widening kernels.
  const float* widened(const void* a, int64_t lda, int64_t m, int64_t k, unsigned worker);

  Bf16Kernels kernels_;
  std::unique_ptr<Dnnl> dnnl_;
  std::vector<std::vector<float>> scratch_;  // per worker
};

}  // namespace moert::cpu
