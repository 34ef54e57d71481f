// Why moert has its own kernels here: oneDNN 2.6 multiplies bf16 only on AVX-512 CPUs (it has no
// bf16 matmul at all below that), and converting a bf16 weight to fp32 for sgemm would read and
// write every weight once more per call — for a decode step, whose whole cost is streaming the
// selected experts' weights, that triples the memory traffic. These kernels read each bf16 weight
// once and widen it in registers (a zero-extend and a 16-bit shift), nothing else.
//
// nt: c[i, j] = dot(a row i, w row j): both rows run along k, so the weight is read as stored.
//   Blocks of 3 rows of a by 4 rows of w keep 12 accumulators of 8 lanes. The weight is taken in
//   strips of rows that fit kStripBytes (L2) while every row of a passes over them. k is cut
//   into blocks of kKBlock only when eight whole weight rows (the smallest strip) would not fit:
//   otherwise each weight row streams from memory in one piece: at d = 7168, decode steps of 1, 8
//   and 64 rows ran 10-30 % faster than with 2 KiB pieces (moert bench --decode). Each block's 8
//   lanes are added in a fixed order at its end.
// nn: c[i, j] = sum_k a[i, k] w[k, j]: w's rows run along j, so each k broadcasts a[i, k] against
//   16 widened weights (two vectors); blocks of 6 rows of a by 16 columns, k cut into blocks of
//   kKBlock so that the 16-column strip of w stays in L1.
#include "kernels/cpu/widen_gemm.h"

#include <immintrin.h>

#include <algorithm>

#include "kernels/cpu/bf16.h"
#include "kernels/cpu/isa.h"

namespace moert::cpu {
namespace {

constexpr int64_t kKBlock = 1024;
constexpr int64_t kStripBytes = 128 << 10;

#define MOERT_AVX2 __attribute__((target("avx2,fma")))

MOERT_AVX2 inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

MOERT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// One MR x NR block of nt over k in [k0, k1); `load` adds into c, else c is overwritten.
template <int MR, int NR>
MOERT_AVX2 void nt_block(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                         int64_t ldc, int64_t k0, int64_t k1, bool load) {
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = k0 + (k1 - k0) / 8 * 8;
  for (int64_t k = k0; k < k8; k += 8) {
    __m256 av[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) av[i] = _mm256_loadu_ps(a + i * lda + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = widen8(w + j * ldw + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(av[i], wv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = k8; k < k1; ++k) s += a[i * lda + k] * from_bf16(w[j * ldw + k]);
      float& out = c[i * ldc + j];
      out = load ? out + s : s;
    }
}

template <int MR>
MOERT_AVX2 void nt_rows(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                        int64_t ldc, int64_t n, int64_t k0, int64_t k1, bool load) {
  int64_t j = 0;
  // A single row has 8 weight rows at a time: 8 independent accumulator chains keep the FMA
  // units busy where 4 would wait on their latency.
  if constexpr (MR == 1)
    for (; j + 8 <= n; j += 8) nt_block<1, 8>(a, lda, w + j * ldw, ldw, c + j, ldc, k0, k1, load);
  for (; j + 4 <= n; j += 4) nt_block<MR, 4>(a, lda, w + j * ldw, ldw, c + j, ldc, k0, k1, load);
  const int64_t left = n - j;
  if (left == 3) nt_block<MR, 3>(a, lda, w + j * ldw, ldw, c + j, ldc, k0, k1, load);
  if (left == 2) nt_block<MR, 2>(a, lda, w + j * ldw, ldw, c + j, ldc, k0, k1, load);
  if (left == 1) nt_block<MR, 1>(a, lda, w + j * ldw, ldw, c + j, ldc, k0, k1, load);
}

MOERT_AVX2 void nt_avx2(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                        int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate) {
  // Depends on k only: the bits never depend on the caller's row or thread split.
  const int64_t kb = 8 * k * 2 <= kStripBytes ? std::max<int64_t>(k, 1) : kKBlock;
  const int64_t strip = std::clamp<int64_t>(kStripBytes / (kb * 2) / 8 * 8, 8, 64);
  for (int64_t k0 = 0; k0 < k || k0 == 0; k0 += kb) {
    const int64_t k1 = std::min(k, k0 + kb);
    const bool load = accumulate || k0 > 0;
    // w rows outermost: a strip of weight rows is read once per k block and reused by every row
    // of a.
    for (int64_t j0 = 0; j0 < n; j0 += strip) {
      const int64_t nj = std::min<int64_t>(strip, n - j0);
      // Rows in blocks of 3, the last ones as 2 + 2 rather than 3 + 1 (a lone row is the
      // slowest block per row).
      int64_t i = 0;
      for (; m - i >= 3 && m - i != 4; i += 3)
        nt_rows<3>(a + i * lda, lda, w + j0 * ldw, ldw, c + i * ldc + j0, ldc, nj, k0, k1, load);
      for (; m - i >= 2; i += 2)
        nt_rows<2>(a + i * lda, lda, w + j0 * ldw, ldw, c + i * ldc + j0, ldc, nj, k0, k1, load);
      if (m - i == 1)
        nt_rows<1>(a + i * lda, lda, w + j0 * ldw, ldw, c + i * ldc + j0, ldc, nj, k0, k1, load);
    }
    if (k == 0) break;
  }
}

// One MR x 16 block of nn over k in [k0, k1).
template <int MR>
MOERT_AVX2 void nn_block(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                         int64_t ldc, int64_t k0, int64_t k1, bool load) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = load ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    acc[i][1] = load ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 w0 = widen8(w + k * ldw), w1 = widen8(w + k * ldw + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
      acc[i][0] = _mm256_fmadd_ps(av, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc[i][0]);
    _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
  }
}

// Columns past the last full block of 16, one at a time.
void nn_tail(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c, int64_t ldc,
             int64_t m, int64_t j0, int64_t j1, int64_t k0, int64_t k1, bool load) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = j0; j < j1; ++j) {
      float s = load ? c[i * ldc + j] : 0.0f;
      for (int64_t k = k0; k < k1; ++k) s += a[i * lda + k] * from_bf16(w[k * ldw + j]);
      c[i * ldc + j] = s;
    }
}

MOERT_AVX2 void nn_avx2(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                        int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate) {
  const int64_t n16 = n / 16 * 16;
  for (int64_t k0 = 0; k0 < k || k0 == 0; k0 += kKBlock) {
    const int64_t k1 = std::min(k, k0 + kKBlock);
    const bool load = accumulate || k0 > 0;
    for (int64_t j = 0; j < n16; j += 16) {
      int64_t i = 0;
      for (; i + 6 <= m; i += 6)
        nn_block<6>(a + i * lda, lda, w + j, ldw, c + i * ldc + j, ldc, k0, k1, load);
      const float* ai = a + i * lda;
      float* ci = c + i * ldc + j;
      switch (m - i) {
        case 5:
          nn_block<5>(ai, lda, w + j, ldw, ci, ldc, k0, k1, load);
          break;
        case 4:
          nn_block<4>(ai, lda, w + j, ldw, ci, ldc, k0, k1, load);
          break;
        case 3:
          nn_block<3>(ai, lda, w + j, ldw, ci, ldc, k0, k1, load);
          break;
        case 2:
          nn_block<2>(ai, lda, w + j, ldw, ci, ldc, k0, k1, load);
          break;
        case 1:
          nn_block<1>(ai, lda, w + j, ldw, ci, ldc, k0, k1, load);
          break;
        default:
          break;
      }
    }
    if (n16 < n) nn_tail(a, lda, w, ldw, c, ldc, m, n16, n, k0, k1, load);
    if (k == 0) break;
  }
}

void nt_scalar(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c, int64_t ldc,
               int64_t m, int64_t n, int64_t k, bool accumulate) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float s = 0.0f;
      for (int64_t p = 0; p < k; ++p) s += a[i * lda + p] * from_bf16(w[j * ldw + p]);
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + s : s;
    }
}

}  // namespace

bool widen_gemm_uses_avx2() { return use_avx2(); }

void widen_gemm_nt(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                   int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (use_avx2())
    nt_avx2(a, lda, w, ldw, c, ldc, m, n, k, accumulate);
  else
    nt_scalar(a, lda, w, ldw, c, ldc, m, n, k, accumulate);
}

void widen_gemm_nn(const float* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                   int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (use_avx2())
    nn_avx2(a, lda, w, ldw, c, ldc, m, n, k, accumulate);
  else
    nn_tail(a, lda, w, ldw, c, ldc, m, 0, n, 0, k, accumulate);
}

}  // namespace moert::cpu
