// Run on an H200 (bench/RESULTS.md, 2026-12-04). See cuda_ffn_fp8.h for what this computes and why.
#include <algorithm>
#include <string>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_ffn_fp8.h"
#include "kernels/cuda/fp8_quantize.h"
#include "kernels/cuda/kernels.h"
#include "kernels/fp8_rules.h"

namespace moert::cuda {
namespace {

using moert::fp8::block_scale_ld;
using moert::fp8::blocks_of;
using moert::fp8::tile_scale_ld;

constexpr unsigned long long kNoneBad = ~0ull;

// A row stride of codes that cuBLASLt's FP8 kernels accept: a multiple of 16 bytes.
int64_t ld16(int64_t n) { return (n + 15) / 16 * 16; }
// The reduction length a block-scaled GEMM runs with, and the codes' row stride along it: whole
// 128-long blocks. Every public use of cuBLASLt's VEC128_32F / BLK128x128_32F modes (PyTorch's
// blockwise _scaled_mm tests, Transformer Engine, DeepGEMM) keeps k a multiple of 128, and none
// documents a partial last block; zero codes past the end add nothing, and the scales (one per
// block) are the same either way.
int64_t kpad(int64_t n) { return (n + 127) / 128 * 128; }
// The row count m a GEMM runs with (its a operand's rows, cuBLASLt's n). A multiple of 16: a
// 1x128-scaled operand's outer dimension must be a multiple of 8 for cuBLASLt (Transformer
// Engine refuses m % 8 != 0 for exactly that reason, and its tests hold m = 255 illegal), and a
// multiple of 4 makes the tiles' scale stride (tile_scale_ld) the row count itself, whichever of
// the two cuBLASLt reads (fp8_gemm.h).
int64_t gemm_rows(int64_t n) { return ld16(n); }
// Rows that a GEMM may read past the last segment's end: gemm_rows(m) - m at most.
constexpr int64_t kRowsPast = 15;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A gradient's accumulator; `rows` > 0 needs one.
float* acc_of(const GradOut* g, int64_t rows, const char* op) {
  if (g && g->roots)
    fail(Code::Unsupported, "the CUDA backend's ", op,
         " gives gradients in acc mode only; cross-process reduction on CUDA uses NCCL");
  if (rows > 0 && (!g || !g->acc)) fail(Code::Internal, op, ": a gradient without an accumulator");
  return g ? g->acc : nullptr;
}

// The element of a device array at `index`, for an error message.
float value_at(const float* x, int64_t index, cudaStream_t s) {
  float v = 0.0f;
  check(cudaMemcpyAsync(&v, x + index, sizeof v, cudaMemcpyDeviceToHost, s), "read a value");
  check(cudaStreamSynchronize(s), "read a value");
  return v;
}

}  // namespace

// ---- Operands in scratch

// An activation [rows, width] in 1x128 row tiles along width: codes with row stride ld
// (kpad(width), zeros past width), and each segment's scales in the VEC128_32F layout of the
// row count its GEMMs run with (scale stride gemm_rows(segment rows), zeros past its rows).
struct FfnFp8::RowTiles {
  const uint8_t* codes = nullptr;
  int64_t ld = 0;
  std::vector<const float*> scales;  // per segment
};

// An activation [rows, width] in 128-token tiles, per segment transposed: codes
// [ld16(width), ld[i]] (ld[i] = kpad(segment rows); zeros past its rows and past width), scales
// in runs of ld16(width): the rows a Wgrad GEMM runs with whether the operand is its a
// (gemm_rows) or its b (ld16).
struct FfnFp8::TokenTiles {
  std::vector<const uint8_t*> codes;
  std::vector<int64_t> ld;
  std::vector<const float*> scales;
};

// The NaN and infinity checks of one FFN call: one slot in device memory per (operand, segment),
// the smallest row-major index of a non-finite value that the operand's quantizers met in that
// segment (relative to its first row). verify() waits for the device once and reports the first
// operand, in the order given, and its first segment that met one.
struct FfnFp8::Check {
  struct Operand {
    const char* what;
    const float* x;  // the fp32 values, [rows, width]
    int64_t width;
  };
  std::vector<Operand> operands;
  const std::vector<Segment>& segs;
  unsigned long long* slots;

  Check(Buffer<unsigned long long>& buf, Allocator& mem, std::vector<Operand> ops,
        const std::vector<Segment>& segments, cudaStream_t s)
      : operands(std::move(ops)), segs(segments) {
    const size_t n = std::max<size_t>(1, operands.size() * segs.size());
    buf.resize(mem, n);
    slots = buf.data();
    check(cudaMemsetAsync(slots, 0xFF, n * sizeof(unsigned long long), s), "reset FP8 checks");
  }
  unsigned long long* slot(int operand, size_t segment) const {
    return slots + static_cast<size_t>(operand) * segs.size() + segment;
  }
  void verify(cudaStream_t s) const {
    std::vector<unsigned long long> got(operands.size() * segs.size(), kNoneBad);
    if (got.empty()) return;
    check(cudaMemcpyAsync(got.data(), slots, got.size() * sizeof(unsigned long long),
                          cudaMemcpyDeviceToHost, s),
          "read FP8 checks");
    check(cudaStreamSynchronize(s), "read FP8 checks");
    for (size_t k = 0; k < operands.size(); ++k)
      for (size_t i = 0; i < segs.size(); ++i) {
        const unsigned long long index = got[k * segs.size() + i];
        if (index == kNoneBad) continue;
        const Operand& o = operands[k];
        const int64_t row = segs[i].begin + static_cast<int64_t>(index) / o.width;
        const int64_t col = static_cast<int64_t>(index) % o.width;
        // The layer that ran the FFN says which of its rows that is (RowError).
        throw RowError(Code::Numeric,
                       cat("FP8 quantization of ", o.what, ": non-finite value ",
                           value_at(o.x, row * o.width + col, s), " at "),
                       row, " of the FFN's rows",
                       cat(", column ", col, " (NaN and infinity have no E4M3 code)"));
      }
  }
};

FfnFp8::FfnFp8(Allocator& mem, Gemm& f32_gemm, cudaStream_t stream, Fp8Options options)
    : mem_(mem),
      f32_gemm_(f32_gemm),
      stream_(stream),
      options_(options),
      gemm_(std::make_unique<fp8::Fp8Gemm>(stream)) {}

FfnFp8::~FfnFp8() = default;

size_t FfnFp8::work_bytes() const {
  size_t n = held_bytes(weight_t_, weight_t_scales_, act_, h1_, h3_, dh1_, dh3_, out_, bad_);
  for (int i = 0; i < kOperands; ++i) n += held_bytes(codes_[i], scales_[i]);
  for (const auto& p : weight_pad_) n += p.capacity_bytes();
  return n;
}

void FfnFp8::release_work() {
  clear_buffers(weight_t_, weight_t_scales_, act_, h1_, h3_, dh1_, dh3_, out_, bad_);
  for (int i = 0; i < kOperands; ++i) clear_buffers(codes_[i], scales_[i]);
  for (auto& p : weight_pad_) p.clear();
}

std::vector<FfnFp8::Segment> FfnFp8::expert_segments(const DispatchPlan& plan, Weight w1, Weight w3,
                                                     Weight w2, int64_t per, const GradOut* dw1,
                                                     const GradOut* dw3, const GradOut* dw2) {
  const int64_t E = static_cast<int64_t>(plan.host_offsets.size()) - 1;
  std::vector<Segment> segs;
  for (int64_t e = 0; e < E; ++e)
    segs.push_back({w1.offset(e * per), w3.offset(e * per), w2.offset(e * per),
                    plan.host_offsets[e], plan.count(e), dw1 ? dw1 + e : nullptr,
                    dw3 ? dw3 + e : nullptr, dw2 ? dw2 + e : nullptr});
  return segs;
}

float* FfnFp8::f32_scratch(Buffer<float>& b, int64_t n) {
  b.resize(mem_, static_cast<size_t>(std::max<int64_t>(n, 1)));
  return b.data();
}

void FfnFp8::quantize_rows(const std::vector<Segment>& segs, const float* x, int64_t width,
                           RowTiles& out, Check& chk, int operand) {
  int64_t end = 0, scale_floats = 0;
  for (const Segment& s : segs) {
    end = std::max(end, s.begin + s.rows);
    scale_floats += blocks_of(width) * gemm_rows(s.rows);
  }
  const int64_t ld = kpad(width);
  if (operand_buffer_ >= kOperands) fail(Code::Internal, "FP8 FFN: more operands than scratch");
  Buffer<uint8_t>& codes = codes_[operand_buffer_];
  Buffer<float>& scales = scales_[operand_buffer_];
  ++operand_buffer_;
  // Rows past the end: the last segment's GEMM runs with gemm_rows() rows.
  codes.resize(mem_, static_cast<size_t>((end + kRowsPast) * ld));
  scales.resize(mem_, static_cast<size_t>(std::max<int64_t>(1, scale_floats)));
  // Zero codes past a row's end add nothing; the scales of the layout's padding rows are zero,
  // so that the rows a GEMM runs past a segment's end (the next segment's codes, or these zeros)
  // add only zeros to rows that are thrown away.
  if (ld != width)
    check(cudaMemsetAsync(codes.data(), 0, codes.bytes(), stream_), "FP8 padding");
  else
    check(cudaMemsetAsync(codes.data() + end * ld, 0, static_cast<size_t>(kRowsPast * ld), stream_),
          "FP8 padding");
  check(cudaMemsetAsync(scales.data(), 0, scales.bytes(), stream_), "FP8 padding");
  out.codes = codes.data();
  out.ld = ld;
  out.scales.clear();
  int64_t at = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    float* sc = scales.data() + at;
    out.scales.push_back(sc);
    at += blocks_of(width) * gemm_rows(s.rows);
    fp8::quantize_row_tiles(x + s.begin * width, width, s.rows, width, codes.data() + s.begin * ld,
                            ld, sc, gemm_rows(s.rows), options_.power_of_two_scales,
                            chk.slot(operand, i), stream_);
  }
}

void FfnFp8::quantize_tokens(const std::vector<Segment>& segs, const float* x, int64_t width,
                             TokenTiles& out, Check& chk, int operand) {
  // ld16(width) rows (zero codes past width), its scales the layout of that many: as Wgrad's b
  // (n rounded up to 16) and as its a (gemm_rows) alike.
  const int64_t rows_t = ld16(width), scale_ld = tile_scale_ld(rows_t);
  int64_t code_bytes = 0, scale_floats = 0;
  for (const Segment& s : segs) {
    code_bytes += rows_t * kpad(s.rows);
    scale_floats += blocks_of(s.rows) * scale_ld;
  }
  if (operand_buffer_ >= kOperands) fail(Code::Internal, "FP8 FFN: more operands than scratch");
  Buffer<uint8_t>& codes = codes_[operand_buffer_];
  Buffer<float>& scales = scales_[operand_buffer_];
  ++operand_buffer_;
  codes.resize(mem_, static_cast<size_t>(std::max<int64_t>(1, code_bytes)));
  scales.resize(mem_, static_cast<size_t>(std::max<int64_t>(1, scale_floats)));
  check(cudaMemsetAsync(codes.data(), 0, codes.bytes(), stream_), "FP8 padding");
  check(cudaMemsetAsync(scales.data(), 0, scales.bytes(), stream_), "FP8 padding");
  out = {};
  int64_t code_at = 0, scale_at = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    const int64_t ld = kpad(s.rows);
    uint8_t* c = codes.data() + code_at;
    float* sc = scales.data() + scale_at;
    out.codes.push_back(c);
    out.ld.push_back(ld);
    out.scales.push_back(sc);
    code_at += rows_t * ld;
    scale_at += blocks_of(s.rows) * scale_ld;
    fp8::quantize_column_tiles_transposed(x + s.begin * width, width, s.rows, width, c, ld, sc,
                                          scale_ld, options_.power_of_two_scales,
                                          chk.slot(operand, i), stream_);
  }
}

std::vector<const uint8_t*> FfnFp8::padded_weights(const std::vector<Segment>& segs, int which,
                                                   int64_t rows, int64_t cols,
                                                   Buffer<uint8_t>& pad) {
  auto weight = [&](const Segment& s) -> const Weight& {
    return which == 0 ? s.w1 : which == 1 ? s.w3 : s.w2;
  };
  // As a GEMM's b, the weight has ld16(rows) rows too (zero codes past rows), and its rows are
  // kpad(cols) long (zero codes past cols).
  bool direct = cols == kpad(cols) && rows % 16 == 0;
  for (const Segment& s : segs) direct = direct && aligned16(weight(s).fp8.codes);
  std::vector<const uint8_t*> out;
  if (direct) {
    for (const Segment& s : segs) out.push_back(weight(s).fp8.codes);
    return out;
  }
  const int64_t ld = kpad(cols), per = ld16(rows) * ld;
  pad.resize(mem_,
             static_cast<size_t>(std::max<int64_t>(1, per * static_cast<int64_t>(segs.size()))));
  check(cudaMemsetAsync(pad.data(), 0, pad.bytes(), stream_), "FP8 weight padding");
  for (size_t i = 0; i < segs.size(); ++i) {
    uint8_t* dst = pad.data() + static_cast<int64_t>(i) * per;
    out.push_back(dst);
    if (segs[i].rows == 0 || rows == 0 || cols == 0) continue;
    check(cudaMemcpy2DAsync(dst, static_cast<size_t>(ld), weight(segs[i]).fp8.codes,
                            static_cast<size_t>(cols), static_cast<size_t>(cols),
                            static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream_),
          "FP8 weight padding");
  }
  return out;
}

void FfnFp8::transposed_weight(const Weight& w, int64_t rows, int64_t cols) {
  // W [rows, cols] -> W^T [ld16(cols), kpad(rows)] (zero codes past cols and rows: W^T's rows are
  // a Dgrad GEMM's reduction), block scales [blocks_of(cols), block_scale_ld(rows)].
  const int64_t ld_t = kpad(rows), scale_ld_t = block_scale_ld(rows);
  weight_t_.resize(mem_, static_cast<size_t>(std::max<int64_t>(1, ld16(cols) * ld_t)));
  weight_t_scales_.resize(mem_,
                          static_cast<size_t>(std::max<int64_t>(1, blocks_of(cols) * scale_ld_t)));
  if (ld_t != rows || ld16(cols) != cols)
    check(cudaMemsetAsync(weight_t_.data(), 0, weight_t_.bytes(), stream_), "FP8 weight padding");
  check(cudaMemsetAsync(weight_t_scales_.data(), 0, weight_t_scales_.bytes(), stream_),
        "FP8 weight padding");
  fp8::transpose_blocks(w.fp8.codes, cols, w.fp8.scales, block_scale_ld(cols), rows, cols,
                        weight_t_.data(), ld_t, weight_t_scales_.data(), scale_ld_t, stream_);
}

void FfnFp8::gemm(const char* name, int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda,
                  const float* a_scales, const uint8_t* b, int64_t ldb, const float* b_scales,
                  fp8::Scaling scaling, float* d, int64_t ldd, bool accumulate) {
  if (m == 0 || n == 0) return;
  // a has gemm_rows(m) rows and b ld16(n): the product's rows past m and columns past n are
  // computed into scratch, never into d.
  const int64_t mr = gemm_rows(m), n16 = ld16(n);
  const bool direct = mr == m && n16 == n && aligned16(d) && (ldd * 4) % 16 == 0;
  float* out = d;
  int64_t ld = ldd;
  const size_t row_bytes = static_cast<size_t>(n) * sizeof(float);
  if (!direct) {
    ld = n16;
    out = f32_scratch(out_, mr * ld);
    if (accumulate) {
      if (mr != m || n16 != n)
        check(cudaMemsetAsync(out, 0, static_cast<size_t>(mr * ld) * sizeof(float), stream_),
              "FP8 GEMM output");
      check(cudaMemcpy2DAsync(out, static_cast<size_t>(ld) * 4, d, static_cast<size_t>(ldd) * 4,
                              row_bytes, static_cast<size_t>(m), cudaMemcpyDeviceToDevice, stream_),
            "FP8 GEMM output");
    }
  }
  try {
    gemm_->run(mr, n16, k, a, lda, a_scales, b, ldb, b_scales, scaling, out, ld, fp8::Output::F32,
               accumulate);
  } catch (const Error& e) {
    if (e.code() != Code::Unsupported) throw;
    fail(Code::Unsupported, "FP8 ", name, " GEMM (", mr, " x ", n16, " x ", k,
         " after padding) cannot run: ", e.what());
  }
  if (!direct)
    check(cudaMemcpy2DAsync(d, static_cast<size_t>(ldd) * 4, out, static_cast<size_t>(ld) * 4,
                            row_bytes, static_cast<size_t>(m), cudaMemcpyDeviceToDevice, stream_),
          "FP8 GEMM output");
}

// ---- Weights

void FfnFp8::quantize_weight_blocks(const float* src, int64_t matrices, int64_t rows, int64_t cols,
                                    uint8_t* codes, float* scales, const char* what) {
  if (matrices < 0 || rows < 0 || cols < 0)
    fail(Code::Internal, "FP8 copy of ", what, ": ", matrices, " matrices of ", rows, "x", cols);
  const int64_t per = rows * cols, per_scales = blocks_of(rows) * block_scale_ld(cols);
  if (matrices == 0 || per == 0) return;
  // The layout's padding gets zeros, as on the CPU, so that copies compare byte for byte.
  check(cudaMemsetAsync(scales, 0, static_cast<size_t>(matrices * per_scales) * sizeof(float),
                        stream_),
        "FP8 weight scales");
  // Where the matrices' rows are whole 128-row blocks the stack is one matrix to the kernel (its
  // blocks and scale rows are the matrices' in order): one launch instead of one per matrix.
  const bool stacked = rows % moert::fp8::kBlock == 0;
  const int64_t launches = stacked ? 1 : matrices;
  bad_.resize(mem_, static_cast<size_t>(launches));
  check(cudaMemsetAsync(bad_.data(), 0xFF, bad_.bytes(), stream_), "reset FP8 checks");
  if (stacked)
    fp8::quantize_blocks(src, cols, matrices * rows, cols, codes, cols, scales,
                         block_scale_ld(cols), options_.power_of_two_scales, bad_.data(), stream_);
  else
    for (int64_t i = 0; i < matrices; ++i)
      fp8::quantize_blocks(src + i * per, cols, rows, cols, codes + i * per, cols,
                           scales + i * per_scales, block_scale_ld(cols),
                           options_.power_of_two_scales, bad_.data() + i, stream_);
  std::vector<unsigned long long> got(static_cast<size_t>(launches));
  check(cudaMemcpyAsync(got.data(), bad_.data(), got.size() * sizeof(unsigned long long),
                        cudaMemcpyDeviceToHost, stream_),
        "read FP8 checks");
  check(cudaStreamSynchronize(stream_), "read FP8 checks");
  for (int64_t l = 0; l < launches; ++l) {
    const unsigned long long index = got[static_cast<size_t>(l)];
    if (index == kNoneBad) continue;
    // The offending element's place in the whole stack, then in its matrix.
    const int64_t at = (stacked ? 0 : l * per) + static_cast<int64_t>(index);
    const int64_t i = at / per, in = at % per;
    const std::string name = matrices > 1 ? cat(what, " (matrix ", i, ")") : std::string(what);
    fail(Code::Numeric, "FP8 quantization of ", name, ": non-finite value ",
         value_at(src, at, stream_), " at row ", in / cols, ", column ", in % cols,
         " (NaN and infinity have no E4M3 code)");
  }
}

// ---- FP8 FFN

void FfnFp8::forward(const std::vector<Segment>& segs, const float* x, float* y, float* h1,
                     float* h3, int64_t dim, int64_t hidden, bool accumulate) {
  int64_t end = 0;
  for (const Segment& s : segs) end = std::max(end, s.begin + s.rows);
  if (end == 0) return;
  if (!h1) {
    h1 = f32_scratch(h1_, end * hidden);
    h3 = f32_scratch(h3_, end * hidden);
  }
  float* a = f32_scratch(act_, end * hidden);
  operand_buffer_ = 0;
  Check chk(bad_, mem_, {{"the FFN input", x, dim}, {"the FFN activation", a, hidden}}, segs,
            stream_);
  const int64_t kd = kpad(dim), kh = kpad(hidden);

  // Fprop: h1, h3 = x W1^T, x W3^T (x in row tiles along dim), then a = silu(h1) h3.
  RowTiles xq;
  quantize_rows(segs, x, dim, xq, chk, 0);
  const auto w1 = padded_weights(segs, 0, hidden, dim, weight_pad_[0]);
  const auto w3 = padded_weights(segs, 1, hidden, dim, weight_pad_[1]);
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.rows == 0) continue;
    gemm("Fprop w1", s.rows, hidden, kd, xq.codes + s.begin * kd, kd, xq.scales[i], w1[i], kd,
         s.w1.fp8.scales, fp8::Scaling::Blocks, h1 + s.begin * hidden, hidden, false);
    gemm("Fprop w3", s.rows, hidden, kd, xq.codes + s.begin * kd, kd, xq.scales[i], w3[i], kd,
         s.w3.fp8.scales, fp8::Scaling::Blocks, h3 + s.begin * hidden, hidden, false);
  }
  swiglu_f32(h1, h3, a, end * hidden, stream_);

  // Fprop: y (+)= a W2^T (a in row tiles along hidden).
  RowTiles aq;
  quantize_rows(segs, a, hidden, aq, chk, 1);
  const auto w2 = padded_weights(segs, 2, dim, hidden, weight_pad_[2]);
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.rows == 0) continue;
    gemm("Fprop w2", s.rows, dim, kh, aq.codes + s.begin * kh, kh, aq.scales[i], w2[i], kh,
         s.w2.fp8.scales, fp8::Scaling::Blocks, y + s.begin * dim, dim, accumulate);
  }
  chk.verify(stream_);
}

void FfnFp8::backward(const std::vector<Segment>& segs, const float* x, const float* h1,
                      const float* h3, const float* dy, float* dx, bool dx_accumulate, int64_t dim,
                      int64_t hidden) {
  std::vector<float*> dw1, dw3, dw2;
  int64_t end = 0;
  for (const Segment& s : segs) {
    dw1.push_back(acc_of(s.dw1, s.rows, "FP8 FFN backward"));
    dw3.push_back(acc_of(s.dw3, s.rows, "FP8 FFN backward"));
    dw2.push_back(acc_of(s.dw2, s.rows, "FP8 FFN backward"));
    end = std::max(end, s.begin + s.rows);
  }
  if (end == 0) return;
  const int64_t n = end * hidden, kd = kpad(dim), kh = kpad(hidden);
  float* a = f32_scratch(act_, n);
  float* dh1 = f32_scratch(dh1_, n);
  float* dh3 = f32_scratch(dh3_, n);
  operand_buffer_ = 0;
  Check chk(bad_, mem_,
            {{"the FFN output gradient", dy, dim},
             {"the FFN gradient dh1", dh1, hidden},
             {"the FFN gradient dh3", dh3, hidden},
             {"the FFN input", x, dim},
             {"the FFN activation", a, hidden}},
            segs, stream_);
  swiglu_f32(h1, h3, a, n, stream_);

  // Dgrad: dA = dy W2 (dy in row tiles along dim; W2^T's blocks), into dh1's storage.
  RowTiles dyq;
  quantize_rows(segs, dy, dim, dyq, chk, 0);
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.rows == 0) continue;
    transposed_weight(s.w2, dim, hidden);
    gemm("Dgrad w2", s.rows, hidden, kd, dyq.codes + s.begin * kd, kd, dyq.scales[i],
         weight_t_.data(), kd, weight_t_scales_.data(), fp8::Scaling::Blocks,
         dh1 + s.begin * hidden, hidden, false);
  }
  cuda::swiglu_backward(h1, h3, dh1, dh1, dh3, n, stream_);

  // Dgrad: dx (+)= dh1 W1, then dx += dh3 W3 (dh1, dh3 in row tiles along hidden).
  RowTiles dh1q, dh3q;
  quantize_rows(segs, dh1, hidden, dh1q, chk, 1);
  quantize_rows(segs, dh3, hidden, dh3q, chk, 2);
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.rows == 0) continue;
    transposed_weight(s.w1, hidden, dim);
    gemm("Dgrad w1", s.rows, dim, kh, dh1q.codes + s.begin * kh, kh, dh1q.scales[i],
         weight_t_.data(), kh, weight_t_scales_.data(), fp8::Scaling::Blocks, dx + s.begin * dim,
         dim, dx_accumulate);
    transposed_weight(s.w3, hidden, dim);
    gemm("Dgrad w3", s.rows, dim, kh, dh3q.codes + s.begin * kh, kh, dh3q.scales[i],
         weight_t_.data(), kh, weight_t_scales_.data(), fp8::Scaling::Blocks, dx + s.begin * dim,
         dim, true);
  }

  // Wgrad operands: 128-token tiles from each segment's first row, transposed. Their check (and
  // Dgrad's) is read before any gradient is touched.
  TokenTiles tdy, tx, ta, tdh1, tdh3;
  quantize_tokens(segs, dy, dim, tdy, chk, 0);
  quantize_tokens(segs, x, dim, tx, chk, 3);
  quantize_tokens(segs, a, hidden, ta, chk, 4);
  quantize_tokens(segs, dh1, hidden, tdh1, chk, 1);
  quantize_tokens(segs, dh3, hidden, tdh3, chk, 2);
  chk.verify(stream_);

  // Wgrad: dW2 += dy^T a, dW1 += dh1^T x, dW3 += dh3^T x, the tokens the reduction.
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.rows == 0) continue;
    const int64_t t = tdy.ld[i];
    gemm("Wgrad w2", dim, hidden, t, tdy.codes[i], t, tdy.scales[i], ta.codes[i], t, ta.scales[i],
         fp8::Scaling::Tiles, dw2[i], hidden, true);
    gemm("Wgrad w1", hidden, dim, t, tdh1.codes[i], t, tdh1.scales[i], tx.codes[i], t, tx.scales[i],
         fp8::Scaling::Tiles, dw1[i], dim, true);
    gemm("Wgrad w3", hidden, dim, t, tdh3.codes[i], t, tdh3.scales[i], tx.codes[i], t, tx.scales[i],
         fp8::Scaling::Tiles, dw3[i], dim, true);
  }
}

// ---- fp32 FFN

namespace {
const float* f32_of(const Weight& w) {
  if (!w.f32)
    fail(Code::Internal, "an FFN weight of an fp8 session has neither an FP8 copy nor fp32 values");
  return w.f32;
}
}  // namespace

void FfnFp8::forward_f32(const float* x, Weight w1, Weight w3, Weight w2, float* y, float* h1,
                         float* h3, int64_t rows, int64_t dim, int64_t hidden, bool accumulate) {
  const int64_t n = rows * hidden;
  if (!h1) {
    h1 = f32_scratch(h1_, n);
    h3 = f32_scratch(h3_, n);
  }
  f32_gemm_.run(false, true, rows, hidden, dim, x, dim, f32_of(w1), dim, h1, hidden, 0.0f, false);
  f32_gemm_.run(false, true, rows, hidden, dim, x, dim, f32_of(w3), dim, h3, hidden, 0.0f, false);
  float* a = f32_scratch(act_, n);
  swiglu_f32(h1, h3, a, n, stream_);
  f32_gemm_.run(false, true, rows, dim, hidden, a, hidden, f32_of(w2), hidden, y, dim,
                accumulate ? 1.0f : 0.0f, false);
}

void FfnFp8::backward_f32(const float* x, Weight w1, Weight w3, Weight w2, const float* h1,
                          const float* h3, const float* dy, float* dx, bool dx_accumulate,
                          const GradOut& dw1_out, const GradOut& dw3_out, const GradOut& dw2_out,
                          int64_t rows, int64_t dim, int64_t hidden) {
  float* dw1 = acc_of(&dw1_out, rows, "swiglu_ffn_backward");
  float* dw3 = acc_of(&dw3_out, rows, "swiglu_ffn_backward");
  float* dw2 = acc_of(&dw2_out, rows, "swiglu_ffn_backward");
  const int64_t n = rows * hidden;
  float* a = f32_scratch(act_, n);
  float* dh1 = f32_scratch(dh1_, n);
  float* dh3 = f32_scratch(dh3_, n);
  // dA = dy W2, dW2 += dy^T a; dh1, dh3; dW1 += dh1^T x, dW3 += dh3^T x; dx (+)= dh1 W1 + dh3 W3.
  f32_gemm_.run(false, false, rows, hidden, dim, dy, dim, f32_of(w2), hidden, dh1, hidden, 0.0f,
                false);
  swiglu_f32(h1, h3, a, n, stream_);
  f32_gemm_.run(true, false, dim, hidden, rows, dy, dim, a, hidden, dw2, hidden, 1.0f, false);
  cuda::swiglu_backward(h1, h3, dh1, dh1, dh3, n, stream_);
  f32_gemm_.run(true, false, hidden, dim, rows, dh1, hidden, x, dim, dw1, dim, 1.0f, false);
  f32_gemm_.run(true, false, hidden, dim, rows, dh3, hidden, x, dim, dw3, dim, 1.0f, false);
  f32_gemm_.run(false, false, rows, dim, hidden, dh1, hidden, f32_of(w1), dim, dx, dim,
                dx_accumulate ? 1.0f : 0.0f, false);
  f32_gemm_.run(false, false, rows, dim, hidden, dh3, hidden, f32_of(w3), dim, dx, dim, 1.0f,
                false);
}

}  // namespace moert::cuda
