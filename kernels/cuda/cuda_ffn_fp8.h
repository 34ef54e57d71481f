// The CUDA backend's FFNs in a session of precision fp8 (docs/design.md section 5): the routed and
// shared experts' SwiGLU FFNs on block-scaled E4M3 operands through cuBLASLt (fp8_gemm.h,
// fp8_quantize.h), the device copies of the weights' 128x128 blocks, and the fp32 FFN that the
// session's other FFNs (dense layers, whose weights carry no low-precision copy) run in, as on the
// CPU.
//
// Numerics: exactly the CPU backend's emulation (kernels/cpu/cpu_ffn_fp8.cc) operand for
// operand. Every GEMM quantizes its activation along its own reduction dimension: Fprop x (along
// dim) and a = silu(h1) h3 (along hidden, computed in fp32) in 1x128 row tiles times the weights'
// blocks; Dgrad dy (along dim), dh1 and dh3 (along hidden) in row tiles times the weights'
// transposed blocks; Wgrad dy, x, a, dh1, dh3 in 128-token tiles counted from the first row of
// each expert's list (core/grad_reduction.h kFp8ShareRows), codes written transposed. Products
// accumulate in fp32 (cuBLASLt promotes each 128-block's partial sum); outputs are fp32. The
// quantizers share kernels/fp8_rules.h with the CPU's, so that the same fp32 inputs give the same
// codes and scales bit for bit; results then differ from the CPU's only by the order of fp32
// additions, and through it by a code that rounds the other way downstream.
//
// cuBLASLt's FP8 kernels want 16-byte aligned operands, row strides and outputs (PyTorch's
// scaled_mm asks K and N to be multiples of 16), and every public use of its block-scaled modes
// keeps K a multiple of 128. Every GEMM runs padded to that: the reduction length k is rounded
// up to whole 128-long blocks (activation codes get row strides of kpad(k), the token dimension
// of Wgrad likewise), and the output width n to 16 (b gets zero rows up to ld16(n)); zero codes
// add 0, as every scale is finite, and the padding's scales are 0. A weight whose reduction
// length is not a multiple of 128, or its output width not one of 16, is copied into a
// zero-padded buffer for Fprop (per call: only small models have them); Dgrad's transposed weights
// are padded as they are made; an output whose width, address or row stride is not what cuBLASLt
// gets goes through an aligned scratch output, and only its n real columns are copied out. A shape
// cuBLASLt still refuses is an Error(Unsupported) naming the GEMM and its padded dims, never
// another precision. The row count m (tokens per expert in Fprop and Dgrad, the output rows of
// Wgrad) is rounded up to 16 as the GEMM runs (the rows past m read zero scales and land in the
// scratch output): Transformer Engine holds the outer dimension of a 1x128-scaled operand to
// multiples of 8, having seen cuBLASLt refuse others; on an H200 with cuBLASLt 13.1 m = 1, 37 and
// 37034 were refused and m = 4 and 12 ran (bench/RESULTS.md), so multiples of 4 suffice there.
// With m a multiple of 16 the tiles' scale stride is the row count whether cuBLASLt reads it
// rounded up to 4 (fp8_gemm.h's assumption, Transformer Engine's layout) or exact (PyTorch's
// description of it).
//
// Dgrad's transposed weights are made per backward call, not cached: a Weight carries pointers
// only, and the ParamStore rewrites the same buffers in place after every optimizer step, so a
// cache keyed by address would go stale without notice. The transpose reads and writes one byte
// per weight element per call: twice the weight traffic the Dgrad GEMM has anyway, and no
// memory kept beside the weights.
//
// NaN and infinity: an activation that holds one is an Error(Numeric) naming the tensor, the
// row (of the FFN's rows, the experts' lists in order) and the column, as on the CPU. Each FFN call
// waits for the device once to learn it: the forward at its end, the backward after Dgrad and
// before Wgrad, so that a failed backward leaves the accumulated gradients untouched.
//
// Gradients are given in acc mode only (GradOut::acc), as everywhere on the CUDA backend.
//
// tests/gpu/test_cuda_fp8_session.cc holds it to the CPU backend where a GPU is found; it passed
// on an H200 on 2026-12-04 (bench/RESULTS.md), compute-sanitizer's memcheck clean.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/gemm.h"

namespace moert::cuda {

class FfnFp8 {
 public:
  // One contiguous run of rows [begin, begin + rows) multiplied by one expert's weights (or a
  // dense FFN's), with its gradients for backward.
  struct Segment {
    Weight w1, w3, w2;
    int64_t begin = 0, rows = 0;
    const GradOut* dw1 = nullptr;
    const GradOut* dw3 = nullptr;
    const GradOut* dw2 = nullptr;
  };

  // Throws what Fp8Gemm's constructor throws (Unsupported off sm_90 or before cuBLASLt 12.9).
  FfnFp8(Allocator& mem, Gemm& f32_gemm, cudaStream_t stream, Fp8Options options);
  ~FfnFp8();
  FfnFp8(const FfnFp8&) = delete;
  FfnFp8& operator=(const FfnFp8&) = delete;

  // The segments of a grouped FFN: one per expert of the plan (empty ones included), weights
  // [E, ...] of `per` elements a matrix, gradients (arrays of E) when not null.
  static std::vector<Segment> expert_segments(const DispatchPlan& plan, Weight w1, Weight w3,
                                              Weight w2, int64_t per, const GradOut* dw1 = nullptr,
                                              const GradOut* dw3 = nullptr,
                                              const GradOut* dw2 = nullptr);

  // Backend::quantize_weight_blocks on the device.
  void quantize_weight_blocks(const float* src, int64_t matrices, int64_t rows, int64_t cols,
                              uint8_t* codes, float* scales, const char* what);

  // Whether an FFN's three weights carry FP8 copies (then it multiplies in FP8).
  static bool all_fp8(const Weight& a, const Weight& b, const Weight& c) {
    return a.fp8 && b.fp8 && c.fp8;
  }

  // y[rows, dim] (+)= W2 (silu(W1 x) h3) over the segments' rows in FP8; h1, h3 [rows, hidden]
  // kept when not null. Every segment's weights carry FP8 copies.
  void forward(const std::vector<Segment>& segs, const float* x, float* y, float* h1, float* h3,
               int64_t dim, int64_t hidden, bool accumulate);
  // Its backward: dx (+)= d/dx over the segments' rows; each segment's dw* (acc mode) += d/dw.
  void backward(const std::vector<Segment>& segs, const float* x, const float* h1, const float* h3,
                const float* dy, float* dx, bool dx_accumulate, int64_t dim, int64_t hidden);

  // The same FFN, forward and backward, in fp32 (cuBLASLt's fp32 GEMM, no TF32): weights that
  // carry neither a bf16 nor an FP8 copy (a dense layer of an fp8 session).
  void forward_f32(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1, float* h3,
                   int64_t rows, int64_t dim, int64_t hidden, bool accumulate);
  void backward_f32(const float* x, Weight w1, Weight w3, Weight w2, const float* h1,
                    const float* h3, const float* dy, float* dx, bool dx_accumulate,
                    const GradOut& dw1, const GradOut& dw3, const GradOut& dw2, int64_t rows,
                    int64_t dim, int64_t hidden);

  // The scratch the calls above sized (Backend::work_bytes, release_work): between calls only.
  size_t work_bytes() const;
  void release_work();

 private:
  struct RowTiles;
  struct TokenTiles;
  struct Check;

  // d [m, n] (row stride ldd, fp32) (+)= a [m, k] b [n, k]^T (fp8_gemm.h's run()), a holding m
  // rounded up to 16 rows and b ld16(n) rows (zero scales past m, zero codes past n) in their
  // scale layouts' terms: run as m and n rounded up to 16, through an aligned scratch output
  // where that or d's alignment differs from d; `name` names the GEMM in a refusal.
  void gemm(const char* name, int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda,
            const float* a_scales, const uint8_t* b, int64_t ldb, const float* b_scales,
            fp8::Scaling scaling, float* d, int64_t ldd, bool accumulate);
  // The row tiles of x [rows, width] (the segments' rows), segment by segment, into the next
  // scratch operand; non-finite values recorded in check's slots of `operand`.
  void quantize_rows(const std::vector<Segment>& segs, const float* x, int64_t width, RowTiles& out,
                     Check& check, int operand);
  // The 128-token tiles of x [rows, width], each segment's transposed ([ld16(width), kpad(its
  // rows)]), into the next operand.
  void quantize_tokens(const std::vector<Segment>& segs, const float* x, int64_t width,
                       TokenTiles& out, Check& check, int operand);
  // Per segment, the codes of its weight `which` (0: w1, 1: w3, 2: w2), [rows, cols], with rows
  // kpad(cols) apart (ld16(rows) of them): the weight's own codes where that is their layout,
  // else a padded copy.
  std::vector<const uint8_t*> padded_weights(const std::vector<Segment>& segs, int which,
                                             int64_t rows, int64_t cols, Buffer<uint8_t>& pad);
  // weight_t_, weight_t_scales_ = w [rows, cols]^T as Dgrad's b operand: [ld16(cols), kpad(rows)].
  void transposed_weight(const Weight& w, int64_t rows, int64_t cols);
  float* f32_scratch(Buffer<float>& b, int64_t n);

  static constexpr int kOperands = 8;  // the backward's: 3 in row tiles, 5 in token tiles

  Allocator& mem_;
  Gemm& f32_gemm_;
  cudaStream_t stream_;
  Fp8Options options_;
  std::unique_ptr<fp8::Fp8Gemm> gemm_;
  int operand_buffer_ = 0;  // the next of codes_ / scales_ in this call
  Buffer<uint8_t> codes_[kOperands], weight_pad_[3], weight_t_;
  Buffer<float> scales_[kOperands], weight_t_scales_, act_, h1_, h3_, dh1_, dh3_, out_;
  Buffer<unsigned long long> bad_;
};

}  // namespace moert::cuda
