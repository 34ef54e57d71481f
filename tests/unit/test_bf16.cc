// bf16 on the CPU: the GEMM kernels compute exactly "bf16 operands, fp32 accumulation"; layers
// and sessions of precision bf16 stay within bf16 bounds of fp32; the precision option.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/model_loader.h"
#include "core/session.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/exit_gate.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/math.h"
#include "tests/unit/random_tensor.h"
#include "tests/unit/session_model.h"

namespace moert {
namespace {

using test::batch;
using test::Batch;
using test::moe_model;
using test::options;

using Vec = std::vector<float>;

Vec randv(int64_t n, std::mt19937& rng, float scale = 1.0f) {
  return test::random_tensor({n}, rng, scale).values;
}

double rel(const Vec& got, const std::vector<double>& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(den > 0.0 ? num / den : num);
}

double rel(const Vec& got, const Vec& want) {
  return rel(got, std::vector<double>(want.begin(), want.end()));
}

std::vector<uint16_t> bf16_of(const Vec& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = cpu::to_bf16(v[i]);
  return b;
}

// The vector conversion gives the scalar to_bf16's bits for every kind of value (ties both ways,
// values that round up to infinity, subnormals, infinities, NaNs of either sign and payload) and
// every layout: rows or transposed, codes or widened, with block tails on both sides. The special
// values fill the first 8 rows' first 16 columns, so that each passes through several lanes of
// the 8- and 16-wide bodies; the buffers are sized exactly and the output's padding must keep its
// sentinel.
TEST(Bf16Convert, VectorRoundingMatchesTheScalarRule) {
  std::mt19937 rng(3);
  const std::vector<uint32_t> special = {0x00000000u, 0x80000000u, 0x3F808000u, 0x3F818000u,
                                         0x3F807FFFu, 0x7F7FFFFFu, 0xFF7F8000u, 0x00000001u,
                                         0x80008000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
                                         0xFF800001u, 0x7F800001u, 0x7FBFFFFFu};
  for (int64_t rows : {1, 7, 8, 19, 40})       // 40: two 16-row blocks, an 8-row one
    for (int64_t cols : {1, 8, 13, 24, 37}) {  // 37: two AVX-512 blocks, a scalar tail
      const int64_t ldx = cols + 3;            // a row stride wider than the row
      std::vector<float> x(static_cast<size_t>((rows - 1) * ldx + cols));
      for (size_t i = 0; i < x.size(); ++i) {
        const int64_t r = static_cast<int64_t>(i) / ldx, c = static_cast<int64_t>(i) % ldx;
        const uint32_t u = rows >= 8 && r < 8 && c < 16 ? special[(r * 16 + c) % special.size()]
                                                        : static_cast<uint32_t>(rng());
        std::memcpy(&x[i], &u, 4);
      }
      for (bool transposed : {false, true})
        for (bool widened : {false, true}) {
          const std::string what = "rows " + std::to_string(rows) + " cols " +
                                   std::to_string(cols) + (transposed ? " transposed" : "") +
                                   (widened ? " widened" : "");
          // Output rows of `inner` elements, `outer` of them, a padding element between rows.
          const int64_t inner = transposed ? rows : cols, outer = transposed ? cols : rows;
          const int64_t ldo = inner + 1, n_out = (outer - 1) * ldo + inner;
          std::vector<uint32_t> wide(widened ? static_cast<size_t>(n_out) : 0, 0xDEADBEEFu);
          std::vector<uint16_t> codes(widened ? 0 : static_cast<size_t>(n_out), 0xBEEFu);
          cpu::round_to_bf16(x.data(), ldx, rows, cols,
                             widened ? static_cast<void*>(wide.data()) : codes.data(), ldo,
                             transposed, widened);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c) {
              const uint16_t want = cpu::to_bf16(x[static_cast<size_t>(r * ldx + c)]);
              const size_t at = static_cast<size_t>(transposed ? c * ldo + r : r * ldo + c);
              if (widened) {
                ASSERT_EQ(wide[at] & 0xFFFFu, 0u) << what;
                ASSERT_EQ(wide[at] >> 16, want) << what << " at " << r << "," << c;
              } else {
                ASSERT_EQ(codes[at], want) << what << " at " << r << "," << c;
              }
            }
          for (int64_t o = 0; o + 1 < outer; ++o) {
            const size_t pad = static_cast<size_t>(o * ldo + inner);
            if (widened)
              ASSERT_EQ(wide[pad], 0xDEADBEEFu) << what << ": padding after output row " << o;
            else
              ASSERT_EQ(codes[pad], 0xBEEFu) << what << ": padding after output row " << o;
          }
        }
    }
}

// Transposing prepared operands (the bf16 backward's Dgrad operands reused for the Wgrad) gives
// the bits of rounding the values transposed, codes and widened, with block tails on both sides
// and an output row stride past the rows; the padding keeps its sentinel.
TEST(Bf16Convert, TransposingPreparedOperandsMatchesTransposedRounding) {
  std::mt19937 rng(5);
  for (int64_t rows : {1, 15, 16, 40, 67})
    for (int64_t cols : {1, 16, 37, 64})
      for (bool widened : {false, true}) {
        const std::string what = "rows " + std::to_string(rows) + " cols " + std::to_string(cols) +
                                 (widened ? " widened" : "");
        const Vec x = randv(rows * cols, rng);
        const size_t es = widened ? 4 : 2;
        const int64_t ldo = rows + 3;
        std::vector<unsigned char> prepared(static_cast<size_t>(rows * cols) * es);
        cpu::round_to_bf16(x.data(), cols, rows, cols, prepared.data(), cols, false, widened);
        std::vector<unsigned char> want(static_cast<size_t>(cols * ldo) * es, 0xA5),
            got(want.size(), 0xA5);
        cpu::round_to_bf16(x.data(), cols, rows, cols, want.data(), ldo, true, widened);
        cpu::transpose_bf16(prepared.data(), cols, rows, cols, got.data(), ldo, widened);
        EXPECT_EQ(got, want) << what;
      }
}

struct Shape {
  int64_t m, n, k;
};

// Each kernel against a double-precision product of the bf16-rounded operands: what is left is
// fp32 accumulation error only. Where oneDNN runs (native bf16), its packed weights too. Shapes
// cover the few-row (decode) path, block remainders and k tails. Runs the kernels this CPU uses
// (and, under DNNL_MAX_CPU_ISA, the lower ones: CTest runs this suite again capped at SSE4.1).
TEST(Bf16Gemm, KernelsComputeBf16OperandsWithFp32Accumulation) {
  std::mt19937 rng(1);
  cpu::Bf16Gemm gemm(1, cpu::Bf16Gemm::default_kernels());
  const size_t es = gemm.act_bytes();
  for (Shape s : {Shape{1, 37, 300}, Shape{8, 64, 1100}, Shape{16, 33, 9}, Shape{17, 48, 64},
                  Shape{64, 100, 200}, Shape{5, 3, 1}, Shape{3, 19, 0}}) {
    for (bool accumulate : {false, true}) {
      const Vec a = randv(s.m * s.k, rng), w = randv(s.n * s.k, rng), c0 = randv(s.m * s.n, rng);
      const auto wb = bf16_of(w);
      std::vector<unsigned char> ap(static_cast<size_t>(s.m * s.k) * es + 1),
          wp(static_cast<size_t>(s.n * s.k) * es + 1), at(static_cast<size_t>(s.m * s.k) * es + 1);
      gemm.prepare(a.data(), s.k, s.m, s.k, ap.data(), s.k, false);
      gemm.prepare(w.data(), s.k, s.n, s.k, wp.data(), s.k, false);
      // a transposed ([k, m]) and back: prepare's transposed layout.
      gemm.prepare(a.data(), s.k, s.m, s.k, at.data(), s.m, true);
      auto ab = [&](int64_t i, int64_t p) { return double(cpu::round_bf16(a[i * s.k + p])); };
      auto wv = [&](int64_t j, int64_t p) { return double(cpu::from_bf16(wb[j * s.k + p])); };
      std::vector<double> nt(s.m * s.n), nn(s.m * s.n);
      for (int64_t i = 0; i < s.m; ++i)
        for (int64_t j = 0; j < s.n; ++j) {
          double x = accumulate ? c0[i * s.n + j] : 0.0, y = x;
          for (int64_t p = 0; p < s.k; ++p) {
            x += ab(i, p) * wv(j, p);
            // nn reads w as [k, n]: the same storage seen as k rows of n.
            y += ab(i, p) * double(cpu::from_bf16(wb[p * s.n + j]));
          }
          nt[i * s.n + j] = x;
          nn[i * s.n + j] = y;
        }
      const double tol = 1e-5;
      const std::string what = "m " + std::to_string(s.m) + " n " + std::to_string(s.n) + " k " +
                               std::to_string(s.k) + (accumulate ? " accumulate" : "");
      Vec c = c0;
      gemm.act_weight_nt(ap.data(), s.k, wb.data(), s.k, c.data(), s.n, s.m, s.n, s.k, accumulate,
                         0);
      EXPECT_LT(rel(c, nt), tol) << "nt " << what;
      c = c0;
      gemm.act_weight_nn(ap.data(), s.k, wb.data(), s.n, c.data(), s.n, s.m, s.n, s.k, accumulate,
                         0);
      EXPECT_LT(rel(c, nn), tol) << "nn " << what;
      c = c0;
      gemm.act_act_nt(ap.data(), s.k, wp.data(), s.k, c.data(), s.n, s.m, s.n, s.k, accumulate, 0);
      EXPECT_LT(rel(c, nt), tol) << "act_act " << what;
      // The right operand as rows ([k, n], w's storage seen as k rows of n, as nn reads it):
      // dense, and as the first n columns of rows 5 longer (a tile of a wider operand).
      for (int64_t ldb : {s.n, s.n + 5}) {
        const Vec wk = [&] {
          Vec v(static_cast<size_t>(s.k * ldb), 7.0f);
          for (int64_t p = 0; p < s.k; ++p)
            std::copy(w.begin() + p * s.n, w.begin() + (p + 1) * s.n, v.begin() + p * ldb);
          return v;
        }();
        std::vector<unsigned char> bp(static_cast<size_t>(s.k * ldb) * es + 1);
        gemm.prepare(wk.data(), ldb, s.k, ldb, bp.data(), ldb, false);
        c = c0;
        gemm.act_act_nn(ap.data(), s.k, bp.data(), ldb, c.data(), s.n, s.m, s.n, s.k, accumulate,
                        0);
        EXPECT_LT(rel(c, nn), tol) << "act_act_nn, ldb " << ldb << " " << what;
        if (gemm.kernels() == cpu::Bf16Kernels::Dnnl && s.k > 0) {
          EXPECT_NE(gemm.act_act_nn_implementation(s.m, s.n, s.k, s.k, ldb, s.n).rfind("ref", 0),
                    0u)
              << gemm.act_act_nn_implementation(s.m, s.n, s.k, s.k, ldb, s.n) << ", ldb " << ldb
              << " " << what;
        }
      }
      // oneDNN's packed weights (where bf16 is native): into a dense destination and into one
      // with a longer row stride (the forward's column blocks).
      if (gemm.kernels() == cpu::Bf16Kernels::Dnnl && s.k > 0) {
        std::vector<unsigned char> packed(gemm.packed_bytes(s.n, s.k));
        gemm.pack(wb.data(), s.k, s.n, s.k, packed.data(), 0);
        c = c0;
        gemm.act_packed_nt(ap.data(), s.k, packed.data(), c.data(), s.n, s.m, s.n, s.k, accumulate,
                           0);
        EXPECT_LT(rel(c, nt), tol) << "packed " << what;
        const int64_t ld = s.n + 7;
        Vec wide(s.m * ld, -3.0f);
        for (int64_t i = 0; i < s.m; ++i)
          std::copy(c0.begin() + i * s.n, c0.begin() + (i + 1) * s.n, wide.begin() + i * ld);
        gemm.act_packed_nt(ap.data(), s.k, packed.data(), wide.data(), ld, s.m, s.n, s.k,
                           accumulate, 0);
        for (int64_t i = 0; i < s.m; ++i) {
          std::copy(wide.begin() + i * ld, wide.begin() + i * ld + s.n, c.begin() + i * s.n);
          for (int64_t j = s.n; j < ld; ++j) ASSERT_EQ(wide[i * ld + j], -3.0f) << what;
        }
        EXPECT_LT(rel(c, nt), tol) << "packed, strided destination " << what;
        // Never oneDNN's reference kernel, about 1000x slower (it would still pass the checks
        // above): where the strided destination would take it, the product goes through a dense
        // one; one row is always asked as dense.
        for (int64_t ldc : {s.n, ld})
          EXPECT_NE(gemm.packed_implementation(s.m, s.n, s.k, s.k, ldc).rfind("ref", 0), 0u)
              << gemm.packed_implementation(s.m, s.n, s.k, s.k, ldc) << ", ldc " << ldc << " "
              << what;
      }
      // The transposed operand holds the same values.
      if (s.k > 0 && es == 4) {
        const auto* t = reinterpret_cast<const float*>(at.data());
        for (int64_t i = 0; i < s.m; ++i)
          for (int64_t p = 0; p < s.k; ++p) ASSERT_EQ(t[p * s.m + i], float(ab(i, p)));
      }
    }
  }
}

// Every session has its own Bf16Gemm, which creates its own oneDNN primitives; one that creates
// a shape the process created before sets up nothing new in oneDNN and registers no exit handler
// for it (kernels/cpu/exit_gate.h): registrations stay until exit, so that creating and freeing
// sessions or batchers in a loop grew the process without bound. A new shape still registers.
TEST(Bf16Gemm, RecreatedShapesRegisterNoExitHandler) {
  if (cpu::Bf16Gemm::default_kernels() != cpu::Bf16Kernels::Dnnl)
    GTEST_SKIP() << "oneDNN's bf16 primitives run only where bf16 is native";
  // Past the process's first 4096 oneDNN calls, after each of which the handler is registered.
  for (int i = 0; i < 4200; ++i) const cpu::DnnlCall call;
  // A shape of this test's own (no other creates it), above the few-row kernels' rows.
  const int64_t m = 29, n = 23, k = 19;
  std::mt19937 rng(7);
  const Vec a = randv(m * k, rng), w = randv(n * k, rng);
  const auto wb = bf16_of(w);
  Vec c(m * n);
  auto one_session = [&] {
    cpu::Bf16Gemm gemm(1, cpu::Bf16Kernels::Dnnl);
    std::vector<unsigned char> ap(static_cast<size_t>(m * k) * gemm.act_bytes());
    gemm.prepare(a.data(), k, m, k, ap.data(), k, false);
    gemm.act_weight_nt(ap.data(), k, wb.data(), k, c.data(), n, m, n, k, false, 0);
    std::vector<unsigned char> packed(gemm.packed_bytes(n, k));
    gemm.pack(wb.data(), k, n, k, packed.data(), 0);
    gemm.act_packed_nt(ap.data(), k, packed.data(), c.data(), n, m, n, k, false, 0);
  };
  const int64_t before = cpu::exit_handler_registrations();
  one_session();
  const int64_t first = cpu::exit_handler_registrations();
  EXPECT_GE(first - before, 1) << "a new shape's primitive must register the handler";
  for (int i = 0; i < 16; ++i) one_session();
  // At most one: the process's call count may pass a power of two meanwhile.
  EXPECT_LE(cpu::exit_handler_registrations() - first, 1);
}

// Each thread counts its own calls past its first 4096 (kernels/cpu/exit_gate.cc), so that the
// pool's threads do not share a counter's cache line on every GEMM: the handler's registrations
// must stay a few per thread, at the powers of two of its count, not one per call.
TEST(ExitGate, ThreadsPastTheirFirstCallsRegisterAtPowersOfTwo) {
  for (int i = 0; i < 4200; ++i) const cpu::DnnlCall call;  // the process past its first 4096
  const int64_t before = cpu::exit_handler_registrations();
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([] {
      for (int i = 0; i < 20000; ++i) {
        const cpu::DnnlCall outer;
        const cpu::DnnlCall nested;  // counts once
      }
    });
  for (auto& th : threads) th.join();
  // Each thread: its own counts 8192 and 16384, and the process's powers of two (8192, 16384,
  // 32768, 65536) that its first 4096 calls may meet.
  const int64_t added = cpu::exit_handler_registrations() - before;
  EXPECT_GE(added, 8);
  EXPECT_LE(added, 4 * 2 + 4);
}

// A fork waits for the oneDNN calls other threads are in (kernels/cpu/exit_gate.h), and for the
// teardowns of oneDNN objects (a Bf16Gemm freed): a child forked inside one inherited the locks
// oneDNN held there, and its first GEMM could wait on one for good. Here a thread holds a `Guard`
// for 300 ms; the fork must return only after it ends, and the child can call oneDNN.
template <class Guard>
void expect_fork_waits_for() {
  { const cpu::DnnlCall first; }  // the gate's fork handler is registered at the first call
  std::atomic<bool> inside{false};
  std::thread busy([&] {
    const Guard held;
    inside.store(true);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  });
  while (!inside.load()) std::this_thread::yield();
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int code = 0;
    try {
      const cpu::DnnlCall call;
    } catch (...) {
      code = 1;
    }
    _exit(code);
  }
  const auto waited = std::chrono::steady_clock::now() - t0;
  busy.join();
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_GE(waited, std::chrono::milliseconds(200)) << "fork() did not wait";
}

TEST(ExitGate, AForkWaitsForTheCallsAndTeardownsOfOtherThreads) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizer runtime's allocator does not survive fork() with threads";
#endif
  expect_fork_waits_for<cpu::DnnlCall>();
  expect_fork_waits_for<cpu::DnnlTeardown>();
}

// Once the process has begun to exit, a call is refused, but a teardown still runs: what a
// static's destructor frees is freed (left to the process's end, LeakSanitizer counted it). A
// child registers a check first and then the gate's handler, which exit runs in reverse order.
TEST(ExitGate, AfterExitHasBegunCallsAreRefusedAndTeardownsRun) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizer runtime's allocator does not survive fork() with threads";
#endif
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::atexit([] {
      bool refused = false;
      try {
        const cpu::DnnlCall call;
      } catch (const moert::Error&) {
        refused = true;
      }
      { const cpu::DnnlTeardown teardown; }  // neither throws nor waits
      _exit(refused ? 3 : 2);
    });
    {
      const cpu::DnnlCall call;
      cpu::created_dnnl_state();  // the handler is registered when the call ends
    }
    std::exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 3) << status;
}

// The widening kernels everywhere (oneDNN's only where bf16 is native), same checks on the
// shapes of a layer.
TEST(Bf16Gemm, WideningKernelsAtLayerShapes) {
  std::mt19937 rng(2);
  cpu::Bf16Gemm gemm(1, cpu::Bf16Kernels::Widen);
  ASSERT_EQ(gemm.act_bytes(), 4u);
  const int64_t m = 64, n = 256, k = 512;
  const Vec a = randv(m * k, rng), w = randv(n * k, rng);
  const auto wb = bf16_of(w);
  Vec ap(m * k), c(m * n);
  gemm.prepare(a.data(), k, m, k, ap.data(), k, false);
  gemm.act_weight_nt(ap.data(), k, wb.data(), k, c.data(), n, m, n, k, false, 0);
  std::vector<double> want(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double x = 0.0;
      for (int64_t p = 0; p < k; ++p) x += double(ap[i * k + p]) * cpu::from_bf16(wb[j * k + p]);
      want[i * n + j] = x;
    }
  EXPECT_LT(rel(c, want), 1e-6);
}

// Forward and every gradient of a bf16 session within bf16 bounds of the fp32 session's, and
// not equal to them (the experts really multiplied in bf16).
TEST(Bf16Session, ForwardAndGradientsWithinBf16BoundsOfFp32) {
  std::mt19937 rng(3);
  auto model = moe_model(rng);
  const int64_t rows = 150;
  const Batch b = batch(rng, rows);
  Session s32(model, options(Precision::Fp32, Mode::Training));
  Session s16(model, options(Precision::Bf16, Mode::Training));
  EXPECT_EQ(s16.precision(), Precision::Bf16);
  Vec y32(rows * 29), y16(rows * 29);
  s32.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y32.data(), y32.size());
  s16.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y16.data(), y16.size());
  EXPECT_LT(rel(y16, y32), 1e-2);
  EXPECT_NE(y16, y32);
  // Same routing: the router stays fp32 and its input does not depend on the experts.
  EXPECT_EQ(s16.expert_counts(2, CountScope::Last), s32.expert_counts(2, CountScope::Last));
  const double l32 = s32.backward_loss(b.targets.data(), b.targets.size());
  const double l16 = s16.backward_loss(b.targets.data(), b.targets.size());
  EXPECT_NEAR(l16, l32, 1e-2 * l32);
  for (size_t p = 0; p < s32.num_parameters(); ++p) {
    const int64_t n = s32.parameter_size(p);
    Vec g32(n), g16(n);
    s32.read_gradient(p, g32.data(), n);
    s16.read_gradient(p, g16.data(), n);
    EXPECT_LT(rel(g16, g32), 3e-2) << s32.parameter_name(p);
  }
}

// Training in bf16: fp32 master weights; the bf16 copies follow every step, so that an inference
// session built from the checkpoint (copies made from the saved fp32 values) gives the very same
// outputs as the training session in eval mode; and the loss follows the fp32 run's.
TEST(Bf16Session, TrainingKeepsFp32MastersAndFreshCopies) {
  std::mt19937 rng(4);
  auto model = moe_model(rng);
  const int64_t rows = 96;
  Session s32(model, options(Precision::Fp32, Mode::Training));
  Session s16(model, options(Precision::Bf16, Mode::Training));
  double l32 = 0.0, l16 = 0.0;
  Vec y(rows * 29);
  for (int step = 0; step < 8; ++step) {
    const Batch b = batch(rng, rows);
    for (Session* s : {&s32, &s16}) {
      s->zero_grad();
      s->forward_tokens(b.tokens.data(), b.tokens.size(), rows, y.data(), y.size());
      (s == &s32 ? l32 : l16) = s->backward_loss(b.targets.data(), b.targets.size());
      s->step();
    }
  }
  EXPECT_NEAR(l16, l32, 2e-2 * l32);
  // A master weight is not a bf16 value after training (it was not rounded in place).
  const size_t w1 = s16.parameter_index("moe.w1");
  Vec p(s16.parameter_size(w1));
  s16.read_parameter(w1, p.data(), p.size());
  size_t not_bf16 = 0;
  for (float v : p) not_bf16 += cpu::round_bf16(v) != v;
  EXPECT_GT(not_bf16, p.size() / 2);

  test::expect_checkpoint_serves_the_same(s16, options(Precision::Bf16, Mode::Inference),
                                          batch(rng, rows), rows, "bf16_session.moert");
}

// A finite fp32 weight beyond bf16's largest value (3.3895e38) has a finite bf16 copy: the
// conversion saturates, as every other weight it changes by at most a rounding. Rounded to
// infinity, it made the bf16 session's output infinite (a NaN with check_finite off) where the
// fp32 session's was finite.
TEST(Bf16Session, AWeightBeyondBf16sRangeHasAFiniteCopy) {
  auto be = make_cpu_backend(1);
  const float big = 3.4e38f, largest = cpu::from_bf16(0x7F7F);
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> src = {big, -big, largest,       std::numeric_limits<float>::max(),
                                  inf, -inf, std::nanf(""), 1.0f};
  std::vector<uint16_t> got(src.size());
  be->to_bf16(src.data(), got.data(), static_cast<int64_t>(src.size()));
  const std::vector<uint16_t> want = {0x7F7F, 0xFF7F, 0x7F7F, 0x7F7F, 0x7F80, 0xFF80, 0, 0x3F80};
  for (size_t i = 0; i < src.size(); ++i)
    if (std::isnan(src[i]))
      EXPECT_TRUE(std::isnan(cpu::from_bf16(got[i])));
    else
      EXPECT_EQ(got[i], want[i]) << src[i];

  std::mt19937 rng(6);
  auto model = moe_model(rng);
  // Output 0 of hidden unit 0 of every expert, whose unit is made small enough that the fp32
  // result stays finite: W1 and W3 rows of 1e-3 give a unit of about 1e-6.
  MoESpec& moe = std::get<MoESpec>(model->layers[2].spec);
  const int64_t D = moe.dim, H = moe.expert_hidden;
  for (int64_t e = 0; e < 8; ++e) {
    for (int64_t d = 0; d < D; ++d)
      moe.w1.values[e * H * D + d] = moe.w3.values[e * H * D + d] = 1e-3f;
    moe.w2.values[e * D * H] = big;  // W2 [E, D, H]: output 0, unit 0
  }
  const int64_t rows = 32;
  const Batch b = batch(rng, rows);
  Vec y32(rows * 29), y16(rows * 29);
  Session s32(model, options(Precision::Fp32, Mode::Inference));
  Session s16(model, options(Precision::Bf16, Mode::Inference));
  s32.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y32.data(), y32.size());
  s16.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y16.data(), y16.size());
  EXPECT_TRUE(std::all_of(y16.begin(), y16.end(), [](float v) { return std::isfinite(v); }));
  EXPECT_LT(rel(y16, y32), 1e-2);
}

TEST(Bf16Session, ResultsDoNotDependOnTheThreadCount) {
  std::mt19937 rng(5);
  auto model = moe_model(rng);
  const int64_t rows = 200;
  const Batch b = batch(rng, rows);
  std::vector<Vec> grads;
  for (uint32_t threads : {1u, 3u}) {
    Session s(model, options(Precision::Bf16, Mode::Training, threads));
    Vec y(rows * 29);
    s.forward_tokens(b.tokens.data(), b.tokens.size(), rows, y.data(), y.size());
    s.backward_loss(b.targets.data(), b.targets.size());
    Vec all = y;
    for (size_t p = 0; p < s.num_parameters(); ++p) {
      Vec g(s.parameter_size(p));
      s.read_gradient(p, g.data(), g.size());
      all.insert(all.end(), g.begin(), g.end());
    }
    grads.push_back(all);
  }
  EXPECT_EQ(0, std::memcmp(grads[0].data(), grads[1].data(), grads[0].size() * sizeof(float)));
}

using test::code;
using test::code_of;

TEST(Precision, OptionParsesAndRefusesClearly) {
  SessionOptions o;
  o.set("precision", "bf16");
  EXPECT_EQ(o.precision, Precision::Bf16);
  o.set("precision", "fp32");
  EXPECT_EQ(o.precision, Precision::Fp32);
  for (const char* bad : {"FP32", "fp16", "", "bf16 "})
    EXPECT_EQ(code_of([&] { o.set("precision", bad); }), code(Code::InvalidArgument)) << bad;
  EXPECT_EQ(o.precision, Precision::Fp32);
  EXPECT_STREQ(precision_name(Precision::Bf16), "bf16");

  std::mt19937 rng(6);
  auto model = moe_model(rng);
  Session cpu(model, SessionOptions{});
  EXPECT_EQ(cpu.precision(), Precision::Fp32);  // the CPU's default
  EXPECT_EQ(code_of([&] { cpu.set_config("precision", "bf16"); }), code(Code::InvalidState));
  cpu.set_config("precision", "fp32");  // what it already is
  // CUDA multiplies in bf16: fp32 is refused before any plugin is looked for.
  SessionOptions cuda;
  cuda.device = Device::Cuda;
  cuda.precision = Precision::Fp32;
  EXPECT_EQ(code_of([&] { Session s(model, cuda); }), code(Code::Unsupported));
}

// The ISA the kernels report follows oneDNN's cap (DNNL_MAX_CPU_ISA, set by a CTest variant).
TEST(Isa, FollowsOneDnnsCap) {
  const char* cap = std::getenv("DNNL_MAX_CPU_ISA");
  const std::string isa = cpu::dnnl_isa_name();
  if (!cap) {
    EXPECT_FALSE(isa.empty());
    GTEST_SKIP() << "no DNNL_MAX_CPU_ISA set; oneDNN runs " << isa;
  }
  std::string want(cap);
  for (char& c : want) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  EXPECT_EQ(isa, want);
  if (want == "sse41") {
    EXPECT_FALSE(cpu::use_avx2());
    EXPECT_FALSE(cpu::native_bf16());
  }
}

}  // namespace
}  // namespace moert
