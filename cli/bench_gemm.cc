#include "cli/bench_gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <thread>

#include "cli/bench_machine.h"

namespace moert_cli {
namespace {

#if defined(__x86_64__)
constexpr const char* kLibDir = "/usr/lib/x86_64-linux-gnu";
#elif defined(__aarch64__)
constexpr const char* kLibDir = "/usr/lib/aarch64-linux-gnu";
#else
constexpr const char* kLibDir = "/usr/lib";
#endif

// Row-major C[m, n] = op(A) op(B) (+ C when accumulate).
using Sgemm = std::function<void(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a,
                                 int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc)>;

struct Loaded {
  GemmLibrary info;
  Sgemm gemm;
  bool concurrent = false;               // single-threaded calls may run at once
  std::function<void()> serial_here;     // before a single-threaded call on a new thread
  std::function<int(int)> threads_here;  // the library's threads for calls from this thread
};

template <typename T>
T sym(void* h, const char* name) {
  return reinterpret_cast<T>(dlsym(h, name));
}

using CblasSgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                            int, float, float*, int);

Sgemm cblas(CblasSgemm f) {
  return [f](bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
             const float* b, int64_t ldb, float* c, int64_t ldc) {
    f(101, ta ? 112 : 111, tb ? 112 : 111, static_cast<int>(m), static_cast<int>(n),
      static_cast<int>(k), 1.0f, a, static_cast<int>(lda), b, static_cast<int>(ldb), 0.0f, c,
      static_cast<int>(ldc));
  };
}

std::string dnnl_isa(int isa) {
  switch (isa) {
    case 0x1:
      return "sse41";
    case 0x3:
      return "avx";
    case 0x7:
      return "avx2";
    case 0x27:
      return "avx512_core";
    case 0x67:
      return "avx512_core_vnni";
    case 0xe7:
      return "avx512_core_bf16";
    case 0x3e7:
      return "avx512_core_amx";
    case 0x407:
      return "avx2_vnni";
    default:
      return "isa " + std::to_string(isa);
  }
}

// libmoert's own oneDNN, already loaded (the same SONAME): its sgemm kernels were set up by the
// CPU sessions timed before the comparison, after the library's check of the memory room that
// oneDNN's set-up needs (it crashes when it runs out midway), so calls here set up nothing.
void load_dnnl(std::vector<Loaded>& out) {
  Loaded l;
  void* h = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    l.info.name = "oneDNN";
    l.info.missing = "libdnnl.so.2 not found";
    out.push_back(l);
    return;
  }
  struct Version {
    int major, minor, patch;
    const char* hash;
  };
  auto version = sym<const Version* (*)()>(h, "dnnl_version");
  auto isa = sym<int (*)()>(h, "dnnl_get_effective_cpu_isa");
  auto f = sym<int (*)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t,
                       const float*, int64_t, float, float*, int64_t)>(h, "dnnl_sgemm");
  auto set = sym<void (*)(int)>(h, "omp_set_num_threads");
  auto get = sym<int (*)()>(h, "omp_get_max_threads");
  l.info.name = "oneDNN";
  if (version) {
    const Version* v = version();
    // Appended piece by piece: GCC 12 at -O3 (the cuda preset) takes the chained operator+ of
    // temporaries for an overlapping memcpy (a false -Wrestrict).
    for (const std::string& part :
         {std::string(" "), std::to_string(v->major), std::string("."), std::to_string(v->minor),
          std::string("."), std::to_string(v->patch)})
      l.info.name += part;
  }
  l.info.name += " sgemm";
  if (!f) {
    l.info.missing = "no dnnl_sgemm";
    out.push_back(l);
    return;
  }
  l.info.available = true;
  l.info.kernels = isa ? dnnl_isa(isa()) : "";
  l.gemm = [f](bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
               const float* b, int64_t ldb, float* c, int64_t ldc) {
    f(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
  };
  l.concurrent = true;
  if (set && get) {
    l.serial_here = [set] { set(1); };
    l.threads_here = [set, get](int t) {
      const int before = get();
      set(t);
      return before;
    };
  }
  out.push_back(l);
}

void load_blis(std::vector<Loaded>& out) {
  bool any = false;
  for (const char* variant : {"blis-serial", "blis-openmp", "blis-pthread"}) {
    const std::string path = std::string(kLibDir) + "/" + variant + "/libblis.so.4";
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) continue;
    auto f = sym<CblasSgemm>(h, "cblas_sgemm");
    if (!f) continue;
    any = true;
    Loaded l;
    l.info.name = std::string("BLIS (") + variant + ")";
    l.info.available = true;
    auto arch = sym<int (*)()>(h, "bli_arch_query_id");
    auto arch_name = sym<const char* (*)(int)>(h, "bli_arch_string");
    if (arch && arch_name) l.info.kernels = arch_name(arch());
    l.gemm = cblas(f);
    // BLIS's memory broker locks: concurrent single-threaded calls are safe in every variant.
    l.concurrent = true;
    auto set = sym<void (*)(long)>(h, "bli_thread_set_num_threads");
    if (set && std::string(variant) != "blis-serial") {
      l.serial_here = [set] { set(1); };
      l.threads_here = [set](int t) {
        set(t);
        return 1;
      };
    }
    out.push_back(l);
  }
  if (!any) {
    Loaded l;
    l.info.name = "BLIS";
    l.info.missing = "not installed (Debian: libblis4-serial)";
    out.push_back(l);
  }
}

void load_openblas(std::vector<Loaded>& out) {
  bool any = false;
  for (const char* variant : {"openblas-serial", "openblas-pthread", "openblas-openmp"}) {
    const std::string path = std::string(kLibDir) + "/" + variant + "/libopenblas.so.0";
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) continue;
    auto f = sym<CblasSgemm>(h, "cblas_sgemm");
    if (!f) continue;
    any = true;
    Loaded l;
    l.info.name = std::string("OpenBLAS (") + variant + ")";
    l.info.available = true;
    auto core = sym<const char* (*)()>(h, "openblas_get_corename");
    if (core) l.info.kernels = core();
    l.gemm = cblas(f);
    // Debian's serial OpenBLAS corrupts concurrent calls (seen in moert's tests): one call at a
    // time, with the library's own threads where the variant has them.
    l.concurrent = false;
    auto set = sym<void (*)(int)>(h, "openblas_set_num_threads");
    if (set && std::string(variant) != "openblas-serial")
      l.threads_here = [set](int t) {
        set(t);
        return 1;
      };
    out.push_back(l);
  }
  if (!any) {
    Loaded l;
    l.info.name = "OpenBLAS";
    l.info.missing = "not installed (Debian: libopenblas0-pthread)";
    out.push_back(l);
  }
}

template <typename F>
double median_seconds(int repeats, F&& f) {
  f();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    const double a = bench_clock();
    f();
    t.push_back(bench_clock() - a);
  }
  std::sort(t.begin(), t.end());
  return t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
}

// The operands, shared by the comparison and the GemmPass it returns.
struct Operands {
  int64_t m, n, k;
  std::vector<float> x, w, c, dx, dw;
  Operands(int64_t m_, int64_t n_, int64_t k_)
      : m(m_),
        n(n_),
        k(k_),
        x(static_cast<size_t>(m * k)),
        w(static_cast<size_t>(n * k)),
        c(static_cast<size_t>(m * n)),
        dx(x.size()),
        dw(w.size()) {
    for (size_t i = 0; i < x.size(); ++i)
      x[i] = static_cast<float>((i * 7919) % 1000) * 1e-3f - 0.5f;
    for (size_t i = 0; i < w.size(); ++i)
      w[i] = static_cast<float>((i * 104729) % 1000) * 1e-3f - 0.5f;
  }
  double flops() const { return 2.0 * static_cast<double>(m) * n * k; }
};

// The GEMMs of one library on `o`: nt: C = X W^T; nn: dX = C W; tn: dW = C^T X, on rows [r0, r1)
// or output rows [o0, o1); run as `threads` single-threaded calls at once (split) or as one call
// on the library's threads (threaded).
struct Runner {
  Loaded l;
  std::shared_ptr<Operands> o;
  unsigned threads;

  void nt(int64_t r0, int64_t r1) const {
    l.gemm(false, true, r1 - r0, o->n, o->k, o->x.data() + r0 * o->k, o->k, o->w.data(), o->k,
           o->c.data() + r0 * o->n, o->n);
  }
  void nn(int64_t r0, int64_t r1) const {
    l.gemm(false, false, r1 - r0, o->k, o->n, o->c.data() + r0 * o->n, o->n, o->w.data(), o->k,
           o->dx.data() + r0 * o->k, o->k);
  }
  void tn(int64_t o0, int64_t o1) const {
    l.gemm(true, false, o1 - o0, o->k, o->m, o->c.data() + o0, o->n, o->x.data(), o->k,
           o->dw.data() + o0 * o->k, o->k);
  }
  void split(bool trio) const {
    const int64_t m = o->m, n = o->n;
    std::vector<std::thread> pool;
    auto part = [&](unsigned t) {
      if (t > 0 && l.serial_here) l.serial_here();
      nt(m * t / threads, m * (t + 1) / threads);
      if (trio) {
        nn(m * t / threads, m * (t + 1) / threads);
        tn(n * t / threads, n * (t + 1) / threads);
      }
    };
    for (unsigned t = 1; t < threads; ++t) pool.emplace_back(part, t);
    part(0);
    for (auto& th : pool) th.join();
  }
  void threaded(bool trio) const {
    nt(0, o->m);
    if (trio) {
      nn(0, o->m);
      tn(0, o->n);
    }
  }
  // The median seconds of `repeats` runs of `run` after a warm-up (none and one run when
  // `repeats` is 0), with the library's threads set to `lib_threads` around them.
  template <typename F>
  double timed(int lib_threads, int repeats, F&& run) const {
    int before = 0;
    if (l.threads_here) before = l.threads_here(lib_threads);
    double s = 0.0;
    if (repeats > 0) {
      s = median_seconds(repeats, run);
    } else {
      const double a = bench_clock();
      run();
      s = bench_clock() - a;
    }
    if (l.threads_here) l.threads_here(before);
    return s;
  }
};

}  // namespace

GemmComparison measure_gemm_libraries(int64_t m, int64_t n, int64_t k, unsigned threads,
                                      int repeats) {
  auto operands = std::make_shared<Operands>(m, n, k);
  const double flops = operands->flops();
  GemmComparison out;
  double best = 0.0;
  // Each library is loaded right before it is measured, oneDNN (the one libmoert links) first:
  // with BLIS (blis-serial) merely loaded, oneDNN's single-threaded GEMM measured 155-177
  // GFLOP/s on Zen 5 against 192-201 without it, and the same GEMM later in the run, beside the
  // layer's passes, 190-200 (why, not found). Each starts once the threads of those before it
  // have stopped spinning.
  for (auto load : {&load_dnnl, &load_blis, &load_openblas})
    for (Loaded& l : [&] {
           std::vector<Loaded> loaded;
           load(loaded);
           return loaded;
         }()) {
      if (!l.info.available) {
        out.libraries.push_back(l.info);
        continue;
      }
      wait_for_idle_threads();
      const Runner r{l, operands, threads};
      // Its first runs after other heavy work (the bf16 dot-product peak, another library) ran
      // up to 15 % slow for a second or two; a single warm-up run did not cover them. Runs of its
      // forward GEMM for a second go first.
      run_for(1.0, 1, 12, [&] {
        if (l.concurrent || threads == 1)
          r.timed(1, 0, [&] { r.split(false); });
        else
          r.timed(static_cast<int>(threads), 0, [&] { r.threaded(false); });
      });
      double best_nt = 0.0, best_trio = 0.0;
      std::string how;
      bool split_best = false;
      if (l.concurrent || threads == 1) {
        best_nt = flops / r.timed(1, repeats, [&] { r.split(false); }) / 1e9;
        best_trio = 3 * flops / r.timed(1, repeats, [&] { r.split(true); }) / 1e9;
        split_best = true;
        how = threads == 1 ? "one single-threaded call"
                           : std::to_string(threads) + " single-threaded calls at once";
      }
      if (threads > 1 && l.threads_here) {
        const int lt = static_cast<int>(threads);
        const double a = flops / r.timed(lt, repeats, [&] { r.threaded(false); }) / 1e9;
        const double b = 3 * flops / r.timed(lt, repeats, [&] { r.threaded(true); }) / 1e9;
        if (a > best_nt) {
          best_nt = a;
          split_best = false;
          how = "one call on " + std::to_string(threads) + " library threads";
        }
        best_trio = std::max(best_trio, b);
      }
      if (how.empty()) {
        l.info.available = false;
        l.info.missing = "single-threaded only and not safe for concurrent calls";
      } else if (best_nt > best) {
        best = best_nt;
        const int lt = split_best ? 1 : static_cast<int>(threads);
        out.best_pass = [r, lt, split_best, flops] {
          return flops / r.timed(lt, 1, [&] { split_best ? r.split(false) : r.threaded(false); }) /
                 1e9;
        };
      }
      l.info.nt = best_nt;
      l.info.trio = best_trio;
      l.info.how = how;
      out.libraries.push_back(l.info);
    }
  return out;
}

}  // namespace moert_cli
