#include "kernels/cpu/gemm.h"

#include <oneapi/dnnl/dnnl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/exit_gate.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/math.h"
#include "kernels/cpu/omp_guard.h"
#include "kernels/cpu/signal_guard.h"
#include "kernels/cpu/widen_gemm.h"

namespace moert::cpu {
namespace {

void check_dnnl(dnnl_status_t s, const char* what) {
  if (s != dnnl_success)
    fail(s == dnnl_out_of_memory ? Code::OutOfMemory : Code::Internal, "oneDNN: ", what,
         " failed (status ", static_cast<int>(s), ")");
}

// oneDNN (2.6) does not survive running out of memory while it sets up kernels: it then crashes
// the host process (SIGSEGV in the fp32 GEMMs' set-up, which needs about 18 MiB, measured under
// RLIMIT_AS and RLIMIT_DATA with 16 MiB left or less; in a bf16 matmul primitive's creation with a
// few MiB left) instead of failing. So before such a set-up moert asks for this much room under
// the process's limits on its address space (`ulimit -v`) and its data (`ulimit -d`), and fails
// with MOERT_ERR_OUT_OF_MEMORY when it is not there. No limit, no check. Best effort: another
// thread may take the room between the check and oneDNN's allocations.
constexpr uint64_t kJitRoom = uint64_t{32} << 20;

void require_jit_room(const char* what) {
  rlimit as{}, data{};
  const bool as_limited = ::getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY;
  const bool data_limited = ::getrlimit(RLIMIT_DATA, &data) == 0 && data.rlim_cur != RLIM_INFINITY;
  if (!as_limited && !data_limited) return;
  // statm: the address space's size and its data (with the stack), in pages.
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return;
  unsigned long long size = 0, resident = 0, shared = 0, text = 0, lib = 0, data_pages = 0;
  const bool read = std::fscanf(f, "%llu %llu %llu %llu %llu %llu", &size, &resident, &shared,
                                &text, &lib, &data_pages) == 6;
  std::fclose(f);
  if (!read) return;
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  auto left_under = [&](const rlimit& l, unsigned long long pages) {
    const uint64_t used = pages * page;
    return l.rlim_cur > used ? l.rlim_cur - used : 0;
  };
  auto check = [&](const rlimit& l, unsigned long long pages, const char* limit) {
    const uint64_t left = left_under(l, pages);
    if (left < kJitRoom)
      fail(Code::OutOfMemory, "cannot set up oneDNN's kernels for ", what, ": the process's ",
           limit, " leaves ", left >> 20, " MiB, and moert asks for ", kJitRoom >> 20,
           " MiB before setting them up (oneDNN crashes when it runs out midway)");
  };
  if (as_limited) check(as, size, "address-space limit (RLIMIT_AS, ulimit -v)");
  if (data_limited) check(data, data_pages, "data limit (RLIMIT_DATA, ulimit -d)");
}

}  // namespace

void warm_up_sgemm() {
  static std::once_flag once;
  std::call_once(once, [] {
    require_jit_room("fp32 GEMMs");
    // oneDNN sets up its GEMM kernels on first use and registers their teardown then; done here,
    // before any session computes, so that the exit gate's handler (registered after these
    // calls) runs before that teardown. Every layout, both betas, vector and matrix shapes.
    std::vector<float> a(64 * 64, 0.5f), b(64 * 64, 0.25f), c(64 * 64);
    for (const bool ta : {false, true})
      for (const bool tb : {false, true})
        for (const bool acc : {false, true})
          for (const auto& [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 64, 64},
                                        {64, 1, 64},
                                        {8, 64, 32},
                                        {64, 64, 64},
                                        {64, 64, 1}})
            sgemm(ta, tb, m, n, k, a.data(), ta ? m : k, b.data(), tb ? k : n, c.data(), n, acc);
  });
}

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  const AsyncSignalScope no_signals;  // free inside the thread pool's work, which holds one
  const DnnlCall call;
  check_dnnl(dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb,
                        accumulate ? 1.0f : 0.0f, c, ldc),
             "sgemm");
}

// oneDNN matmul primitives, one per shape, created on first use and kept: a bf16 GEMM's
// primitive holds JIT code for its exact shape. Each worker executes on its own stream with its
// own scratchpad, so one primitive serves every thread at once.
struct Bf16Gemm::Dnnl {
  struct Key {
    int64_t m, n, k, lda, ldb, ldc;
    bool b_trans, accumulate;
    bool packed = false;  // b in packed_md(k, n) (ldb, b_trans unused)
    auto tie() const { return std::tie(m, n, k, lda, ldb, ldc, b_trans, accumulate, packed); }
    bool operator<(const Key& o) const { return tie() < o.tie(); }
  };
  struct Prim {
    dnnl_primitive_t prim = nullptr;
    dnnl_memory_desc_t a, b, c;
    size_t scratch_bytes = 0;
    std::string impl;  // the implementation oneDNN chose ("brg:avx512_core_bf16", "ref:any", ...)
    bool reference() const { return impl.rfind("ref", 0) == 0; }
  };

  // A product as one worker runs it: the primitive of its routed key and memory objects made
  // for that primitive's operands once, whose data handles each call sets. Making four memory
  // objects per call cost more than a small item's arithmetic.
  struct Bound {
    const Prim* prim = nullptr;
    bool dense_copy = false;  // computed into the worker's dense destination, then copied
    dnnl_memory_t a = nullptr, b = nullptr, c = nullptr, scratch = nullptr;
    void release() {
      for (dnnl_memory_t m : {a, b, c, scratch})
        if (m) dnnl_memory_destroy(m);
      a = b = c = scratch = nullptr;
    }
  };
  // What only one worker touches, so that a call takes no lock once its shape has run there.
  struct Worker {
    dnnl_stream_t stream = nullptr;
    std::vector<unsigned char> scratch;
    std::vector<float> dense;  // run's dense destination
    std::map<Key, Bound> bound;
  };

  // The primitives and reorders that any Bf16Gemm of the process has created. oneDNN sets up
  // what a kind of primitive needs process-wide (function-local statics, whose teardown it
  // registers with atexit) when it first creates one; creating the same key again, as another
  // session does (each Bf16Gemm has its own primitives), sets up nothing new. So only a first
  // creation calls created_dnnl_state(): calling it for every one registered the exit gate's
  // handler again for each session and shape, and a registration is never released, so a host
  // that creates and frees sessions or batchers in a loop grew without bound (12 registrations,
  // about 0.4 KB, per bf16 session of examples/models/tiny_moe.moert). Never destroyed: a static
  // destructor could run at exit while another thread still creates a primitive.
  struct Created {
    std::mutex mu;
    std::set<Key> prims;
    std::set<std::tuple<int64_t, int64_t, int64_t>> reorders;  // (k, n, ldw)
  };
  static Created& created() {
    static Created* const c = new Created;
    return *c;
  }
  // Whether this is the process's first creation of `item` (then the handler is due), recorded.
  // Without the memory to record it, it counts as a first: registering again is harmless.
  template <class Item>
  static bool first_creation(std::set<Item> Created::*set, const Item& item) noexcept {
    Created& c = created();
    const std::lock_guard<std::mutex> lock(c.mu);
    try {
      return (c.*set).insert(item).second;
    } catch (const std::bad_alloc&) {
      return true;
    }
  }

  explicit Dnnl(unsigned workers) : per_worker(workers) {
    check_dnnl(dnnl_engine_create(&engine, dnnl_cpu, 0), "engine creation");
  }
  ~Dnnl() {
    // A fork waits for this as for a call: a child must not inherit a lock oneDNN holds while it
    // frees.
    const DnnlTeardown teardown;
    for (Worker& w : per_worker) {
      for (auto& [key, b] : w.bound) b.release();
      if (w.stream) dnnl_stream_destroy(w.stream);
    }
    for (auto& [key, p] : prims) dnnl_primitive_destroy(p.prim);
    for (auto& [key, r] : reorders) dnnl_primitive_destroy(r);
    if (engine) dnnl_engine_destroy(engine);
  }

  dnnl_stream_t stream(unsigned worker) {
    dnnl_stream_t& s = per_worker[worker].stream;
    if (!s)
      check_dnnl(dnnl_stream_create(&s, engine, dnnl_stream_default_flags), "stream creation");
    return s;
  }

  // The layout oneDNN's matmul chooses for a bf16 weight operand [k, n] (asked with m = 64; the
  // primitives of every m are then made with it: the same for every m on AVX512-BF16, and where
  // a primitive finds no fast kernel for it, Prim::reference says so). Under mu.
  const dnnl_memory_desc_t& packed_md(int64_t k, int64_t n) {
    auto it = packed_mds.find({k, n});
    if (it != packed_mds.end()) return it->second;
    // Asked as the work items run, with one OpenMP thread, whatever the calling thread's
    // setting: every session of the process must get the same layout, since the inference
    // sessions over a model share their packed copies (core/shared_copies.h).
    const SerialOmpScope serial;
    require_jit_room("the bf16 weight layout query");
    dnnl_memory_desc_t a, b, c;
    const dnnl_dims_t ad{64, k}, bd{k, n}, cd{64, n};
    check_dnnl(dnnl_memory_desc_init_by_tag(&a, 2, ad, dnnl_bf16, dnnl_ab), "src desc");
    check_dnnl(dnnl_memory_desc_init_by_tag(&b, 2, bd, dnnl_bf16, dnnl_format_tag_any),
               "weights desc");
    check_dnnl(dnnl_memory_desc_init_by_tag(&c, 2, cd, dnnl_f32, dnnl_ab), "dst desc");
    dnnl_matmul_desc_t desc;
    check_dnnl(dnnl_matmul_desc_init(&desc, &a, &b, nullptr, &c), "matmul desc");
    dnnl_primitive_desc_t pd = nullptr;
    check_dnnl(dnnl_primitive_desc_create(&pd, &desc, nullptr, engine, nullptr),
               "bf16 matmul layout query");
    const dnnl_memory_desc_t md = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    dnnl_primitive_desc_destroy(pd);
    return packed_mds.emplace(std::make_pair(k, n), md).first->second;
  }

  size_t packed_bytes(int64_t n, int64_t k) {
    std::lock_guard<std::mutex> lock(mu);
    return dnnl_memory_desc_get_size(&packed_md(k, n));
  }

  // out = w[n, k] (row stride ldw) in packed_md(k, n), on the worker's stream.
  void pack(const uint16_t* w, int64_t ldw, int64_t n, int64_t k, void* out, unsigned worker) {
    const AsyncSignalScope no_signals;
    dnnl_primitive_t reorder = nullptr;
    dnnl_memory_desc_t src, dst;
    {
      std::lock_guard<std::mutex> lock(mu);
      dst = packed_md(k, n);
      const dnnl_dims_t d{k, n}, s{1, ldw};
      check_dnnl(dnnl_memory_desc_init_by_strides(&src, 2, d, dnnl_bf16, s), "weights desc");
      auto it = reorders.find({k, n, ldw});
      if (it == reorders.end()) {
        require_jit_room("bf16 weight packing");
        dnnl_primitive_desc_t pd = nullptr;
        dnnl_status_t st =
            dnnl_reorder_primitive_desc_create(&pd, &src, engine, &dst, engine, nullptr);
        if (st == dnnl_success) st = dnnl_primitive_create(&reorder, pd);
        if (pd) dnnl_primitive_desc_destroy(pd);
        check_dnnl(st, "bf16 weight packing (reorder) creation");
        if (first_creation(&Created::reorders, std::make_tuple(k, n, ldw))) created_dnnl_state();
        it = reorders.emplace(std::make_tuple(k, n, ldw), reorder).first;
      }
      reorder = it->second;
    }
    run_prim(reorder, {{DNNL_ARG_FROM, &src, const_cast<uint16_t*>(w)}, {DNNL_ARG_TO, &dst, out}},
             worker, "bf16 weight packing");
  }

  // Executes `prim` on the worker's stream with the given (argument, desc, data) triples.
  struct Arg {
    int arg;
    const dnnl_memory_desc_t* md;
    void* data;
  };
  void run_prim(dnnl_primitive_t prim, std::initializer_list<Arg> args, unsigned worker,
                const char* what) {
    dnnl_stream_t st = stream(worker);
    std::vector<dnnl_memory_t> mem;
    std::vector<dnnl_exec_arg_t> exec;
    dnnl_status_t s = dnnl_success;
    for (const Arg& a : args) {
      dnnl_memory_t m = nullptr;
      s = dnnl_memory_create(&m, a.md, engine, a.data);
      if (s != dnnl_success) break;
      mem.push_back(m);
      exec.push_back({a.arg, m});
    }
    if (s == dnnl_success) {
      s = dnnl_primitive_execute(prim, st, static_cast<int>(exec.size()), exec.data());
      if (s == dnnl_success) s = dnnl_stream_wait(st);
    }
    for (dnnl_memory_t m : mem) dnnl_memory_destroy(m);
    check_dnnl(s, what);
  }

  const Prim& get(const Key& key) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = prims.find(key);
    if (it != prims.end()) return it->second;
    Prim p;
    // a [m, k] and c [m, n] row-major; the weights as the [k, n] operand of oneDNN: w[n, k]
    // row-major is that matrix with strides (1, ldb), w[k, n] with strides (ldb, 1).
    const dnnl_dims_t ad{key.m, key.k}, as{key.lda, 1};
    const dnnl_dims_t bd{key.k, key.n};
    const dnnl_dims_t bs_t{1, key.ldb}, bs_n{key.ldb, 1};
    const dnnl_dims_t cd{key.m, key.n}, cs{key.ldc, 1};
    check_dnnl(dnnl_memory_desc_init_by_strides(&p.a, 2, ad, dnnl_bf16, as), "src desc");
    if (key.packed)
      p.b = packed_md(key.k, key.n);
    else
      check_dnnl(
          dnnl_memory_desc_init_by_strides(&p.b, 2, bd, dnnl_bf16, key.b_trans ? bs_t : bs_n),
          "weights desc");
    check_dnnl(dnnl_memory_desc_init_by_strides(&p.c, 2, cd, dnnl_f32, cs), "dst desc");
    require_jit_room("a bf16 GEMM shape");
    dnnl_matmul_desc_t desc;
    check_dnnl(dnnl_matmul_desc_init(&desc, &p.a, &p.b, nullptr, &p.c), "matmul desc");
    dnnl_primitive_attr_t attr = nullptr;
    dnnl_post_ops_t ops = nullptr;
    dnnl_primitive_desc_t pd = nullptr;
    dnnl_status_t s = dnnl_primitive_attr_create(&attr);
    if (s == dnnl_success)
      s = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    if (s == dnnl_success && key.accumulate) {
      s = dnnl_post_ops_create(&ops);
      if (s == dnnl_success) s = dnnl_post_ops_append_sum(ops, 1.0f);
      if (s == dnnl_success) s = dnnl_primitive_attr_set_post_ops(attr, ops);
    }
    if (s == dnnl_success) s = dnnl_primitive_desc_create(&pd, &desc, attr, engine, nullptr);
    if (s == dnnl_success) {
      p.scratch_bytes =
          dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0));
      const char* impl = nullptr;
      if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl)
        p.impl = impl;
      s = dnnl_primitive_create(&p.prim, pd);
    }
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (ops) dnnl_post_ops_destroy(ops);
    if (attr) dnnl_primitive_attr_destroy(attr);
    check_dnnl(s, "bf16 matmul primitive creation");
    if (first_creation(&Created::prims, key)) created_dnnl_state();
    return prims.emplace(key, p).first->second;
  }

  // The matmul that computes `key`'s product. One row has no row stride: it is asked as dense,
  // since oneDNN's primitive cache takes a strided [1, n] destination for the dense one (a size-1
  // dimension's stride does not count there) while its brgemm refuses the strided form, so
  // whichever came first would set the other's kernel. A destination with a longer row stride
  // can leave oneDNN with only its reference kernel, about 1000x slower (2.6's brgemm with packed
  // weights on AVX512-BF16: the forward's column blocks); such a product is computed into a dense
  // destination (the key returned, ldc = n, not accumulating) and copied.
  Key routed(Key key) {
    if (key.m == 1) {
      key.lda = key.k;
      key.ldc = key.n;
    }
    if (key.ldc == key.n || !get(key).reference()) return key;
    key.ldc = key.n;
    key.accumulate = false;
    return key;
  }

  // `key`'s Bound on `worker`, made on its first call there.
  Bound& bound(const Key& key, unsigned worker) {
    auto& map = per_worker[worker].bound;
    auto it = map.find(key);
    if (it != map.end()) return it->second;
    const Key r = routed(key);
    Bound b;
    b.prim = &get(r);
    b.dense_copy = r.ldc != key.ldc && key.m != 1;
    const dnnl_dims_t sd{static_cast<dnnl_dim_t>(std::max<size_t>(b.prim->scratch_bytes, 1))};
    dnnl_memory_desc_t sp;
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&sp, 1, sd, dnnl_u8, dnnl_a);
    // No buffers yet (DNNL_MEMORY_NONE): each call sets its own.
    if (s == dnnl_success) s = dnnl_memory_create(&b.a, &b.prim->a, engine, DNNL_MEMORY_NONE);
    if (s == dnnl_success) s = dnnl_memory_create(&b.b, &b.prim->b, engine, DNNL_MEMORY_NONE);
    if (s == dnnl_success) s = dnnl_memory_create(&b.c, &b.prim->c, engine, DNNL_MEMORY_NONE);
    if (s == dnnl_success) s = dnnl_memory_create(&b.scratch, &sp, engine, DNNL_MEMORY_NONE);
    if (s != dnnl_success) {
      b.release();
      check_dnnl(s, "bf16 matmul memory creation");
    }
    try {
      return map.emplace(key, b).first->second;
    } catch (...) {
      b.release();  // the map could not take it: nothing else owns these objects
      throw;
    }
  }

  void run(const Key& key, const void* a, const void* b, float* c, unsigned worker) {
    const AsyncSignalScope no_signals;
    Bound& bd = bound(key, worker);
    Worker& w = per_worker[worker];
    const Prim& p = *bd.prim;
    if (w.scratch.size() < p.scratch_bytes) w.scratch.resize(p.scratch_bytes);
    float* dst = c;
    if (bd.dense_copy) {
      w.dense.resize(static_cast<size_t>(key.m * key.n));
      dst = w.dense.data();
    }
    dnnl_status_t s = dnnl_memory_set_data_handle(bd.a, const_cast<void*>(a));
    if (s == dnnl_success) s = dnnl_memory_set_data_handle(bd.b, const_cast<void*>(b));
    if (s == dnnl_success) s = dnnl_memory_set_data_handle(bd.c, dst);
    if (s == dnnl_success)
      s = dnnl_memory_set_data_handle(bd.scratch, w.scratch.empty() ? nullptr : w.scratch.data());
    const dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, bd.a},
                                    {DNNL_ARG_WEIGHTS, bd.b},
                                    {DNNL_ARG_DST, bd.c},
                                    {DNNL_ARG_SCRATCHPAD, bd.scratch}};
    dnnl_stream_t st = stream(worker);
    if (s == dnnl_success) s = dnnl_primitive_execute(p.prim, st, 4, args);
    if (s == dnnl_success) s = dnnl_stream_wait(st);
    check_dnnl(s, "bf16 matmul");
    if (!bd.dense_copy) return;
    for (int64_t i = 0; i < key.m; ++i) {
      float* ci = c + i * key.ldc;
      const float* di = dst + i * key.n;
      if (key.accumulate)
        add_into(ci, di, key.n);
      else
        std::memcpy(ci, di, sizeof(float) * static_cast<size_t>(key.n));
    }
  }

  dnnl_engine_t engine = nullptr;
  std::mutex mu;
  std::map<Key, Prim> prims;
  std::map<std::pair<int64_t, int64_t>, dnnl_memory_desc_t> packed_mds;        // (k, n)
  std::map<std::tuple<int64_t, int64_t, int64_t>, dnnl_primitive_t> reorders;  // (k, n, ldw)
  std::vector<Worker> per_worker;
};

Bf16Gemm::Bf16Gemm(unsigned workers, Bf16Kernels kernels)
    : kernels_(kernels), scratch_(std::max(1u, workers)) {
  const DnnlCall call;
  if (kernels_ == Bf16Kernels::Dnnl) dnnl_ = std::make_unique<Dnnl>(std::max(1u, workers));
}

Bf16Gemm::~Bf16Gemm() = default;

Bf16Kernels Bf16Gemm::default_kernels() {
  return native_bf16() ? Bf16Kernels::Dnnl : Bf16Kernels::Widen;
}

void Bf16Gemm::prepare(const float* x, int64_t ldx, int64_t rows, int64_t cols, void* out,
                       int64_t ldo, bool transpose) const {
  round_to_bf16(x, ldx, rows, cols, out, ldo, transpose, kernels_ == Bf16Kernels::Widen);
}

void Bf16Gemm::transpose_prepared(const void* x, int64_t ldx, int64_t rows, int64_t cols, void* out,
                                  int64_t ldo) const {
  transpose_bf16(x, ldx, rows, cols, out, ldo, kernels_ == Bf16Kernels::Widen);
}

const float* Bf16Gemm::widened(const void* a, int64_t lda, int64_t m, int64_t k, unsigned worker) {
  auto& s = scratch_[worker];
  s.resize(static_cast<size_t>(m * k));
  const auto* src = static_cast<const uint16_t*>(a);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p) s[i * k + p] = from_bf16(src[i * lda + p]);
  return s.data();
}

void Bf16Gemm::act_weight_nt(const void* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                             int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate,
                             unsigned worker) {
  const DnnlCall call;
  if (m <= 0 || n <= 0) return;
  if (kernels_ == Bf16Kernels::Widen) {
    widen_gemm_nt(static_cast<const float*>(a), lda, w, ldw, c, ldc, m, n, k, accumulate);
  } else if (m <= kFewRows || k == 0) {
    widen_gemm_nt(widened(a, lda, m, k, worker), k, w, ldw, c, ldc, m, n, k, accumulate);
  } else {
    dnnl_->run({m, n, k, lda, ldw, ldc, true, accumulate}, a, w, c, worker);
  }
}

void Bf16Gemm::act_weight_nn(const void* a, int64_t lda, const uint16_t* w, int64_t ldw, float* c,
                             int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate,
                             unsigned worker) {
  const DnnlCall call;
  if (m <= 0 || n <= 0) return;
  if (kernels_ == Bf16Kernels::Widen) {
    widen_gemm_nn(static_cast<const float*>(a), lda, w, ldw, c, ldc, m, n, k, accumulate);
  } else if (m <= kFewRows || k == 0) {
    widen_gemm_nn(widened(a, lda, m, k, worker), k, w, ldw, c, ldc, m, n, k, accumulate);
  } else {
    dnnl_->run({m, n, k, lda, ldw, ldc, false, accumulate}, a, w, c, worker);
  }
}

void Bf16Gemm::act_act(bool b_trans, const void* a, int64_t lda, const void* b, int64_t ldb,
                       float* c, int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate,
                       unsigned worker) {
  const DnnlCall call;
  if (m <= 0 || n <= 0) return;
  if (kernels_ == Bf16Kernels::Widen || k == 0) {
    // Both operands hold bf16 values, so every product is exact and sgemm sums them in fp32.
    if (kernels_ == Bf16Kernels::Widen)
      sgemm(false, b_trans, m, n, k, static_cast<const float*>(a), lda,
            static_cast<const float*>(b), ldb, c, ldc, accumulate);
    else
      sgemm(false, b_trans, m, n, 0, nullptr, 1, nullptr, 1, c, ldc, accumulate);
    return;
  }
  dnnl_->run({m, n, k, lda, ldb, ldc, b_trans, accumulate}, a, b, c, worker);
}

void Bf16Gemm::act_act_nt(const void* a, int64_t lda, const void* b, int64_t ldb, float* c,
                          int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate,
                          unsigned worker) {
  act_act(true, a, lda, b, ldb, c, ldc, m, n, k, accumulate, worker);
}

void Bf16Gemm::act_act_nn(const void* a, int64_t lda, const void* b, int64_t ldb, float* c,
                          int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate,
                          unsigned worker) {
  act_act(false, a, lda, b, ldb, c, ldc, m, n, k, accumulate, worker);
}

size_t Bf16Gemm::packed_bytes(int64_t n, int64_t k) {
  const DnnlCall call;
  if (!dnnl_) fail(Code::Internal, "packed bf16 weights need oneDNN's bf16 kernels");
  return dnnl_->packed_bytes(n, k);
}

void Bf16Gemm::pack(const uint16_t* w, int64_t ldw, int64_t n, int64_t k, void* out,
                    unsigned worker) {
  const DnnlCall call;
  if (!dnnl_) fail(Code::Internal, "packed bf16 weights need oneDNN's bf16 kernels");
  dnnl_->pack(w, ldw, n, k, out, worker);
}

std::string Bf16Gemm::act_act_nn_implementation(int64_t m, int64_t n, int64_t k, int64_t lda,
                                                int64_t ldb, int64_t ldc) {
  const DnnlCall call;
  if (!dnnl_) fail(Code::Internal, "oneDNN's implementations need its bf16 kernels");
  return dnnl_->get(dnnl_->routed({m, n, k, lda, ldb, ldc, false, false})).impl;
}

std::string Bf16Gemm::packed_implementation(int64_t m, int64_t n, int64_t k, int64_t lda,
                                            int64_t ldc) {
  const DnnlCall call;
  if (!dnnl_) fail(Code::Internal, "packed bf16 weights need oneDNN's bf16 kernels");
  Dnnl::Key key{m, n, k, lda, 0, ldc, false, false};
  key.packed = true;
  return dnnl_->get(dnnl_->routed(key)).impl;
}

void Bf16Gemm::act_packed_nt(const void* a, int64_t lda, const void* w, float* c, int64_t ldc,
                             int64_t m, int64_t n, int64_t k, bool accumulate, unsigned worker) {
  const DnnlCall call;
  if (m <= 0 || n <= 0) return;
  if (!dnnl_) fail(Code::Internal, "packed bf16 weights need oneDNN's bf16 kernels");
  if (k == 0) {
    sgemm(false, true, m, n, 0, nullptr, 1, nullptr, 1, c, ldc, accumulate);
    return;
  }
  Dnnl::Key key{m, n, k, lda, 0, ldc, false, accumulate};
  key.packed = true;
  dnnl_->run(key, a, w, c, worker);
}

}  // namespace moert::cpu
