// `moert bench`: the speed of one MoE layer, forward and forward+backward, set against the
// machine's limits measured in the same run: the fp32 FMA peak, the best GEMM rate of the
// installed libraries for the same FLOPs at the same thread count, and (for decode-sized batches)
// the memory read bandwidth.
//
// The layer runs through the C ABI like any user's. The GEMM libraries are loaded at run time
// (bench_gemm.h); oneDNN is the one libmoert itself links, so the ISA it reports is the one the
// layer ran on.
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "cli/bench_gemm.h"
#include "cli/bench_layer.h"
#include "cli/bench_machine.h"
#include "cli/bench_parallel.h"
#include "cli/commands.h"
#include "cli/error.h"
#include "cli/json_text.h"
#include "cli/model_codec.h"
#include "cli/precision_accuracy.h"

namespace moert_cli {

const CommandSpec kBenchSpec = {
    "bench",
    "[--device cpu] [--threads N] [--precision P] [layer options] [--decode] [--json] "
    "[--expert-parallel EP (under mpirun)]",
    "time a MoE layer forward and backward against the machine's limits measured in the same run",
    "The layer: hidden input of width DIM, sigmoid router over EXPERTS experts, top-K, SHARED\n"
    "shared experts, SwiGLU experts, residual. FLOPs count 2 per multiply-add of the GEMMs\n"
    "executed: forward = TOKENS * (2*DIM*EXPERTS + SHARED*6*DIM*SHARED-HIDDEN) + (assignments)\n"
    "* 6*DIM*EXPERT-HIDDEN, the assignments read from the layer's expert counts (TOKENS*TOP-K);\n"
    "forward+backward = 3 x forward (each GEMM has two backward GEMMs of its size).\n\n"
    "Limits, measured first: the fp32 FMA peak (12 independent FMA chains per thread); the GEMM\n"
    "libraries installed (oneDNN, which libmoert links, BLIS, OpenBLAS) on C = X W^T of the\n"
    "layer's forward FLOPs (X: TOKENS x DIM), at the same thread count, the best one being the\n"
    "baseline (/best GEMM; /GEMM beside: each timed fp32 pass against that GEMM run again right\n"
    "before it, the median of those ratios, as a shared host's rates move within minutes);\n"
    "the memory read bandwidth. With --precision bf16 or fp8 the layer runs in fp32\n"
    "and in that precision, and the results' distance to fp32 is printed per GEMM kind (Fprop:\n"
    "the output, Dgrad: the input gradient, Wgrad: the expert weight gradients).\n\n"
    "--decode adds decode-sized batches (1, 8 and 64 rows) of a large bf16 layer (DeepSeek-V3's\n"
    "width: d 7168, 32 routed experts of 2048 + 1 shared, top-8; about 6 GB of fp32 weights are\n"
    "built): the effective bandwidth, bytes of weights the pass touches (bf16 experts selected,\n"
    "the shared expert, the fp32 router) per second, against the read bandwidth measured right\n"
    "before each pass (a shared host's bandwidth moves within seconds); and the pass against\n"
    "its roofline, the longer of those bytes at that read bandwidth and its\n"
    "FLOPs at the bf16 GEMMs' compute peak (24 chains of vdpbf16ps per thread with AVX512-BF16,\n"
    "the ymm FMA peak for moert's AVX2 widening kernels, not known under AMX), naming the bound.\n"
    "Times are medians over REPEATS runs after one warm-up run.\n\n"
    "Under mpirun with --expert-parallel EP, the layer is sharded over the job's N ranks (EP-way\n"
    "expert parallelism x N/EP data parallelism); TOKENS is the global batch, each rank feeding\n"
    "TOKENS/N of it with THREADS threads. Rank 0 prints, per pass, where a step's time goes:\n"
    "waiting for dispatch, the rank's experts, waiting for combine, and (forward+backward) the\n"
    "gradients combined across ranks; the exposed communication; with the exchanges overlapped\n"
    "with computation (--ep-chunks chunks) and without; beside the single-process layer on the\n"
    "same global batch, timed on rank 0 before and after the job's steps (--single-threads,\n"
    "default THREADS x N: the cores of the whole job when its ranks share one machine).\n"
    "--precision bf16 runs both in bf16.",
    0,
    0,
    {
        {"device", "NAME", "cpu or cuda", "cpu"},
        {"threads", "N", "CPU threads (per rank with --expert-parallel)", "2"},
        {"precision", "NAME", "fp32, or bf16 or fp8 to run the layer in fp32 and in it and compare",
         "fp32"},
        {"layout-copies", "WHEN",
         "auto, on or off: the weight copies laid out for the forward (session option "
         "layout_copies; off: the GEMMs read the weights as stored)",
         "auto"},
        {"tokens", "N", "tokens per pass", "4096"},
        {"dim", "N", "model width", "512"},
        {"experts", "N", "routed experts", "16"},
        {"top-k", "N", "routed experts per token", "4"},
        {"expert-hidden", "N", "hidden width of a routed expert", "256"},
        {"shared", "N", "shared experts", "1"},
        {"shared-hidden", "N", "hidden width of a shared expert", "256"},
        {"repeats", "N", "timed runs per figure", "5"},
        {"seed", "N", "seed of the weights and inputs", "1"},
        {"no-libraries", "", "skip the GEMM libraries (the baseline is then missing)", ""},
        {"cpu-time", "",
         "time by the process's CPU time / threads (at most the CPUs) instead of wall time (a "
         "machine shared with other jobs)",
         ""},
        {"decode", "", "also time decode-sized batches of a large bf16 layer", ""},
        {"decode-dim", "N", "width of the decode layer", "7168"},
        {"decode-experts", "N", "routed experts of the decode layer", "32"},
        {"decode-hidden", "N", "expert hidden width of the decode layer", "2048"},
        {"decode-top-k", "N", "routed experts per token of the decode layer", "8"},
        {"quick", "", "a small layer and 3 repeats (seconds), for smoke tests", ""},
        {"expert-parallel", "EP",
         "under mpirun -np N: shard the layer's experts over EP ranks (N / EP data-parallel "
         "replicas) and time where its steps go",
         ""},
        {"ep-chunks", "C", "chunks each exchange is cut into for overlap (--expert-parallel)", "2"},
        {"comm-timeout", "S",
         "seconds the communicator's creation and each collective wait for the other ranks "
         "before the job fails (--expert-parallel)",
         "600"},
        {"single-threads", "N", "threads of the single-process layer (--expert-parallel)",
         "THREADS x N"},
        {"json", "", "print the figures as one JSON object", ""},
    },
};

namespace {

// What libmoert's oneDNN (the same library instance as this process's) runs on, and hence which
// kernels a bf16 session takes (kernels/cpu/isa.h states the rule).
struct Isa {
  std::string dnnl = "unknown";
  std::string bf16_kernels = "unknown";
  bool native_bf16 = false;
  bool widen_avx2 = false;  // moert's widening kernels run AVX2 (else scalar)
};

Isa cpu_isa() {
  Isa out;
  void* h = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_NOLOAD);
  if (!h) h = dlopen("libdnnl.so.2", RTLD_NOW);
  if (!h) return out;
  auto f = reinterpret_cast<int (*)()>(dlsym(h, "dnnl_get_effective_cpu_isa"));
  if (!f) return out;
  const unsigned isa = static_cast<unsigned>(f());
  const char* names[][2] = {{"1", "sse41"},
                            {"3", "avx"},
                            {"7", "avx2"},
                            {"39", "avx512_core"},
                            {"103", "avx512_core_vnni"},
                            {"231", "avx512_core_bf16"},
                            {"999", "avx512_core_amx"},
                            {"1031", "avx2_vnni"}};
  out.dnnl = "isa " + std::to_string(isa);
  for (auto& n : names)
    if (std::to_string(isa) == n[0]) out.dnnl = n[1];
  const bool native = (isa & 0xe7u) == 0xe7u;
  out.native_bf16 = native;
  const bool avx2 =
      (isa & 0x7u) == 0x7u && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  out.widen_avx2 = avx2;
  out.bf16_kernels = native
                         ? "oneDNN (native bf16: " + out.dnnl + ")"
                         : std::string("moert's widening kernels (") + (avx2 ? "AVX2" : "scalar") +
                               "; this CPU has no AVX512-BF16/AMX" + " within oneDNN's ISA)";
  return out;
}

struct DecodeRow {
  uint32_t rows = 0, touched = 0;
  double seconds = 0.0, bytes = 0.0, flops = 0.0;
  double read_gbps = 0.0;  // the read bandwidth measured beside this batch's passes
};

// The time a decode pass cannot beat: its weights read at the bandwidth measured beside it, or
// its FLOPs at the compute peak of the kernels that run them, whichever takes longer (the
// roofline).
struct Roofline {
  double gflops = 0.0;  // 0: the compute limit is not known
  std::string compute;  // which peak gflops is, or why none is known
  bool known(const DecodeRow& r) const { return gflops > 0.0 && r.read_gbps > 0.0; }
  bool compute_bound(const DecodeRow& r) const { return r.flops / gflops > r.bytes / r.read_gbps; }
  double seconds(const DecodeRow& r) const {
    return std::max(r.bytes / r.read_gbps, r.flops / gflops) / 1e9;
  }
};

// Each pass is timed right after the read bandwidth is measured (the better of two reads of
// `probe`), and a batch is set against the median of those measurements, not against the figure
// measured at the start: on a shared host the bandwidth this process gets moves within seconds.
std::vector<DecodeRow> decode_rows(const Dims& d, const SessionConfig& base, int repeats,
                                   uint64_t seed, const std::vector<uint32_t>& row_counts,
                                   ReadProbe& probe) {
  ModelPtr model =
      load_model_bytes(json_to_binary(moe_json(d, seed), "decode model"), "", "decode model");
  SessionConfig c = base;
  c.knobs.push_back({"precision", "bf16"});
  SessionPtr s = create_session(model.get(), c);
  std::vector<DecodeRow> out;
  for (uint32_t rows : row_counts) {
    const std::vector<float> x = random_values(static_cast<size_t>(rows) * d.dim, seed + rows);
    std::vector<float> y(x.size());
    DecodeRow r;
    r.rows = rows;
    std::vector<double> gbps;
    r.seconds = time_median(
        repeats,
        [&] {
          check(moert_session_forward_hidden(s.get(), x.data(), x.size(), rows, y.data(), y.size()),
                "forward");
        },
        [&] { gbps.push_back(std::max(probe.measure(), probe.measure())); });
    r.read_gbps = median(gbps);
    assignments_of(s.get(), model.get(), &r.touched);
    const double expert_bytes = 3.0 * d.dim * d.expert_hidden * 2.0;
    const double shared_bytes = 3.0 * d.dim * d.shared_hidden * 2.0 * d.shared;
    r.bytes = r.touched * expert_bytes + shared_bytes + 4.0 * d.dim * d.experts;
    // The router, the shared expert on every row, the top-K experts of each row.
    r.flops =
        static_cast<double>(rows) * d.dim *
        (2.0 * d.experts + 6.0 * d.shared_hidden * d.shared + 6.0 * d.expert_hidden * d.top_k);
    out.push_back(r);
  }
  return out;
}

std::string f2(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", v);
  return b;
}

}  // namespace

int run_bench(const Args& args) {
  const bool quick = args.has("quick");
  Dims d;
  auto u = [&](const char* flag, int64_t normal, int64_t small, int64_t lo) {
    return static_cast<uint32_t>(args.integer(flag, quick ? small : normal, lo, 1 << 20));
  };
  d.tokens = u("tokens", 4096, 256, 1);
  d.dim = u("dim", 512, 64, 1);
  d.experts = u("experts", 16, 8, 2);
  d.top_k = u("top-k", 4, 2, 1);
  d.expert_hidden = u("expert-hidden", 256, 64, 1);
  d.shared = u("shared", 1, 1, 0);
  d.shared_hidden = u("shared-hidden", 256, 64, 1);
  const int repeats = static_cast<int>(args.integer("repeats", quick ? 3 : 5, 1, 100000));
  const auto seed = static_cast<uint64_t>(args.integer("seed", 1, 0, INT64_MAX));
  const std::string device = args.str("device", "cpu");
  if (device != "cpu" && device != "cuda")
    usage_fail("--device takes cpu or cuda, got '", device, "'");
  const std::string precision = args.str("precision", "fp32");
  if (precision != "fp32" && precision != "bf16" && precision != "fp8")
    usage_fail("--precision takes fp32, bf16 or fp8, got '", precision, "'");
  if (d.top_k > d.experts)
    usage_fail("--top-k (", d.top_k, ") exceeds --experts (", d.experts, ")");
  SessionConfig config;
  config.device = device == "cuda" ? MOERT_DEVICE_CUDA : MOERT_DEVICE_CPU;
  config.threads = static_cast<uint32_t>(args.integer("threads", 2, 1, 1024));
  config.seed = seed;
  const unsigned threads = config.threads;
  // Said at once: such a run takes far longer, and its figures time threads taking turns.
  if (config.device == MOERT_DEVICE_CPU && !args.has("expert-parallel") && threads > cpu_count())
    std::fprintf(stderr,
                 "moert bench: note: --threads %u exceeds the %u CPU%s this process may run on: "
                 "the threads take turns, so the run takes longer and its figures measure that\n",
                 threads, cpu_count(), cpu_count() == 1 ? "" : "s");
  const std::string layouts = args.str("layout-copies", "auto");
  if (layouts != "auto" && layouts != "on" && layouts != "off")
    usage_fail("--layout-copies takes auto, on or off, got '", layouts, "'");
  if (layouts != "auto") config.knobs.push_back({"layout_copies", layouts});
  if (args.has("expert-parallel")) {
    if (config.device != MOERT_DEVICE_CPU)
      usage_fail("--expert-parallel runs the CPU layer over MPI; --device ", device,
                 " is not supported with it");
    for (const char* flag : {"decode", "decode-dim", "decode-experts", "decode-hidden",
                             "decode-top-k", "cpu-time", "no-libraries"})
      if (args.has(flag))
        usage_fail("--", flag, " applies to the single-process benchmark, not --expert-parallel");
    return run_bench_parallel(args, d, repeats, seed, config, precision);
  }
  for (const char* flag : {"ep-chunks", "single-threads", "comm-timeout"})
    if (args.has(flag)) usage_fail("--", flag, " applies only with --expert-parallel");
  if (!args.has("decode"))
    for (const char* flag : {"decode-dim", "decode-experts", "decode-hidden", "decode-top-k"})
      if (args.has(flag)) usage_fail("--", flag, " applies only with --decode");
  // Under mpirun without --expert-parallel, N copies would time the same layer on shared cores.
  (void)join_job(0);
  use_cpu_time(args.has("cpu-time"), threads);
  Dims dd = d;
  dd.dim = u("decode-dim", 7168, 7168, 1);
  dd.experts = u("decode-experts", 32, 32, 2);
  dd.expert_hidden = u("decode-hidden", 2048, 2048, 1);
  dd.top_k = u("decode-top-k", 8, 8, 1);
  dd.shared = 1;
  dd.shared_hidden = dd.expert_hidden;
  if (dd.top_k > dd.experts)
    usage_fail("--decode-top-k (", dd.top_k, ") exceeds --decode-experts (", dd.experts, ")");
  const bool decode = args.has("decode");

  // The machine's limits first, before the layer warms anything up.
  const FmaPeak peak = fma_peak(threads);
  const double bandwidth = read_bandwidth(threads, quick ? size_t{64} << 20 : size_t{1} << 30);
  const Isa isa = cpu_isa();
  // The CPU's bf16 GEMMs' compute limit: the vdpbf16ps peak where oneDNN multiplies bf16 with
  // AVX512-BF16; the ymm FMA peak where moert's widening kernels run them as AVX2 FMAs (also on
  // an AVX-512 CPU; scalar without AVX2: not known); not known where oneDNN runs AMX, whose tile
  // peak this bench does not measure, nor on a GPU.
  const bool cpu = config.device == MOERT_DEVICE_CPU;
  FmaPeak dot;
  Roofline roof;
  if (!cpu) {
    roof.compute = "a peak not measured for this device";
  } else if (isa.dnnl.find("amx") != std::string::npos) {
    roof.compute = "AMX's peak, not measured";
  } else if (isa.native_bf16) {
    if (decode || precision == "bf16") dot = bf16_dot_peak(threads);
    roof.gflops = dot.gflops;
    roof.compute = "the bf16 dot-product peak";
  } else if (isa.widen_avx2) {
    roof.gflops = peak.ymm_gflops;
    roof.compute = "the ymm FMA peak (widening kernels)";
  } else {
    roof.compute = "the scalar kernels' peak, not measured";
  }
  // The library's rule for "auto" (the session option layout_copies): fp32 weights transposed
  // where oneDNN runs AVX-512 kernels, bf16 ones packed where it multiplies bf16 natively.
  const bool transposed_copies =
      cpu && (layouts == "on" || (layouts == "auto" && isa.dnnl.rfind("avx512", 0) == 0));
  const bool packed_copies = cpu && layouts != "off" && isa.native_bf16;

  ModelPtr moe =
      load_model_bytes(json_to_binary(moe_json(d, seed), "bench model"), "", "bench model");
  const SessionConfig fp32 = config;  // the device's own precision: fp32 on the CPU
  // Its sessions first: oneDNN sets its GEMMs up in them (see load_dnnl in bench_gemm.cc).
  LayerTimer layer32(moe.get(), fp32, d.tokens, d.dim, seed);
  const double T = d.tokens, D = d.dim;
  const double moe_fwd = T * (2.0 * D * d.experts + d.shared * 6.0 * D * d.shared_hidden) +
                         static_cast<double>(layer32.assignments()) * 6.0 * D * d.expert_hidden;

  // The GEMM of equal FLOPs: 2 * T * D * N = moe_fwd.
  const auto width = static_cast<uint32_t>(std::max(1.0, std::round(moe_fwd / (2.0 * T * D))));
  GemmComparison gemms;
  if (!args.has("no-libraries"))
    gemms = measure_gemm_libraries(d.tokens, width, d.dim, threads, repeats);
  const std::vector<GemmLibrary>& libs = gemms.libraries;
  const GemmLibrary* best = nullptr;
  for (const GemmLibrary& l : libs)
    if (l.available && (!best || l.nt > best->nt)) best = &l;
  const double best_nt = best ? best->nt : 0.0;
  // Each fp32 pass after a run of that GEMM: the ratios below are of passes timed together.
  // The best GEMM's first runs after the other libraries were measured ran 12 % slower than the
  // same runs a few seconds later (1 thread, Zen 5: five runs at 176-179 GFLOP/s, then 200-205,
  // while the layer's passes between them held still; with glibc's malloc thresholds set high
  // the slow runs were two, which points at oneDNN's per-call buffers). It runs until that has
  // passed before the GEMMs beside the passes count.
  if (gemms.best_pass) run_for(2.0, 2, 12, [&] { gemms.best_pass(); });
  const Timing t32 = layer32.time(repeats, gemms.best_pass);
  const double beside_f = median_ratio(moe_fwd, t32.forward_runs, t32.gemm_before_forward);
  const double beside_fb =
      median_ratio(3 * moe_fwd, t32.forward_backward_runs, t32.gemm_before_forward_backward);
  std::vector<double> beside_rates = t32.gemm_before_forward;
  beside_rates.insert(beside_rates.end(), t32.gemm_before_forward_backward.begin(),
                      t32.gemm_before_forward_backward.end());
  const double beside_gemm = beside_rates.empty() ? 0.0 : median(beside_rates);
  Timing t16;
  GemmAccuracy acc;
  const bool low = precision != "fp32" && config.device == MOERT_DEVICE_CPU;
  const char* lp = precision.c_str();
  if (low) {
    SessionConfig c = config;
    c.knobs.push_back({"precision", precision});
    t16 = time_layer(moe.get(), c, d.tokens, d.dim, repeats, seed);
    LayerOperands ops;
    ops.rows = d.tokens;
    ops.x = random_values(static_cast<size_t>(d.tokens) * d.dim, seed);
    ops.dy = random_values(ops.x.size(), seed + 1);
    acc = gemm_accuracy(moe.get(), fp32, c, ops);
  }

  std::vector<DecodeRow> dec;
  if (decode) {
    // A quarter of the start's buffer (the same in a quick run): read twice before each pass,
    // it costs a few ms per pass.
    ReadProbe probe(threads, quick ? size_t{64} << 20 : size_t{256} << 20);
    dec = decode_rows(dd, config, repeats, seed, {1, 8, 64}, probe);
  }

  const double g32f = moe_fwd / t32.forward / 1e9, g32b = 3 * moe_fwd / t32.forward_backward / 1e9;
  const double g16f = low ? moe_fwd / t16.forward / 1e9 : 0.0;
  const double g16b = low ? 3 * moe_fwd / t16.forward_backward / 1e9 : 0.0;

  if (args.has("json")) {
    std::ostringstream o;
    auto pass = [&](double flops, double s) {
      return cat("{\"flops\": ", json_number(flops), ", \"seconds\": ", json_number(s),
                 ", \"gflops\": ", json_number(flops / s / 1e9), "}");
    };
    o << "{\"moe\": {\"forward\": " << pass(moe_fwd, t32.forward)
      << ", \"forward_backward\": " << pass(3 * moe_fwd, t32.forward_backward) << "},\n";
    if (low) {
      o << " \"moe_" << precision << "\": {\"forward\": " << pass(moe_fwd, t16.forward)
        << ", \"forward_backward\": " << pass(3 * moe_fwd, t16.forward_backward)
        << ", \"error_fprop\": " << json_number(acc.fprop)
        << ", \"error_dgrad\": " << json_number(acc.dgrad) << ", \"error_wgrad\": {";
      for (size_t i = 0; i < acc.wgrad.size(); ++i)
        o << (i ? ", " : "") << json_string(acc.wgrad[i].first) << ": "
          << json_number(acc.wgrad[i].second);
      o << "}},\n";
    }
    o << " \"device\": " << json_string(device) << ", \"threads\": " << threads
      << ", \"clock\": " << json_string(using_cpu_time() ? "cpu" : "wall")
      << ", \"cpu\": " << json_string(cpu_name()) << ", \"isa\": " << json_string(isa.dnnl)
      << ", \"bf16_kernels\": " << json_string(isa.bf16_kernels)
      << ", \"transposed_copies\": " << (transposed_copies ? "true" : "false")
      << ", \"packed_copies\": " << (packed_copies ? "true" : "false")
      << ", \"tokens\": " << d.tokens << ", \"dim\": " << d.dim << ", \"experts\": " << d.experts
      << ", \"top_k\": " << d.top_k << ", \"expert_hidden\": " << d.expert_hidden
      << ", \"shared\": " << d.shared << ", \"shared_hidden\": " << d.shared_hidden
      << ", \"repeats\": " << repeats << ", \"assignments\": " << t32.assignments
      << ", \"gemm_width\": " << width << ",\n \"peak_gflops\": " << json_number(peak.gflops)
      << ", \"read_gbps\": " << json_number(bandwidth)
      << ", \"bf16_dot_peak_gflops\": " << json_number(dot.gflops > 0 ? dot.gflops : NAN);
    // Without a library (--no-libraries, or none installed) there is no baseline: null figures.
    auto baseline = [&](double v) { return best ? json_number(v) : std::string("null"); };
    o << ",\n \"gemm\": {\"library\": " << (best ? json_string(best->name) : "null")
      << ", \"forward\": {\"gflops\": " << baseline(best_nt)
      << "}, \"forward_backward\": {\"gflops\": " << baseline(best ? best->trio : 0.0)
      << "}, \"beside\": {\"gflops\": " << baseline(beside_gemm)
      << ", \"forward\": " << baseline(beside_f)
      << ", \"forward_backward\": " << baseline(beside_fb) << ", \"busy_waits\": " << t32.busy_waits
      << "}}";
    o << ",\n \"libraries\": [";
    for (size_t i = 0; i < libs.size(); ++i)
      o << (i ? ", " : "") << "{\"name\": " << json_string(libs[i].name)
        << ", \"available\": " << (libs[i].available ? "true" : "false")
        << ", \"kernels\": " << json_string(libs[i].kernels)
        << ", \"how\": " << json_string(libs[i].available ? libs[i].how : libs[i].missing)
        << ", \"nt_gflops\": " << json_number(libs[i].available ? libs[i].nt : NAN)
        << ", \"trio_gflops\": " << json_number(libs[i].available ? libs[i].trio : NAN) << "}";
    o << "]";
    if (decode) {
      o << ",\n \"decode\": [";
      for (size_t i = 0; i < dec.size(); ++i)
        o << (i ? ", " : "") << "{\"rows\": " << dec[i].rows << ", \"experts\": " << dec[i].touched
          << ", \"bytes\": " << json_number(dec[i].bytes)
          << ", \"seconds\": " << json_number(dec[i].seconds)
          << ", \"gbps\": " << json_number(dec[i].bytes / dec[i].seconds / 1e9)
          << ", \"read_gbps\": " << json_number(dec[i].read_gbps)
          << ", \"flops\": " << json_number(dec[i].flops)
          << ", \"gflops\": " << json_number(dec[i].flops / dec[i].seconds / 1e9) << ", \"bound\": "
          << (roof.known(dec[i]) ? json_string(roof.compute_bound(dec[i]) ? "compute" : "memory")
                                 : "null")
          << ", \"roofline\": "
          << (roof.known(dec[i]) ? json_number(roof.seconds(dec[i]) / dec[i].seconds) : "null")
          << "}";
      o << "]";
    }
    o << "}\n";
    std::fputs(o.str().c_str(), stdout);
    return 0;
  }

  std::printf("moert bench on %s: %s, %u CPUs; %u thread%s\n", device.c_str(), cpu_name().c_str(),
              cpu_count(), threads, threads == 1 ? "" : "s");
  std::printf(
      "oneDNN ISA: %s; bf16 GEMMs: %s\nFFN weights as the forward reads them: fp32 %s, bf16 %s\n",
      isa.dnnl.c_str(), isa.bf16_kernels.c_str(),
      transposed_copies ? "transposed copies (nn)" : "as stored (nt)",
      packed_copies ? "packed copies (oneDNN's blocked layout)" : "as stored");
  if (using_cpu_time())
    std::printf("times: process CPU time / %u thread%s (--cpu-time), not wall time\n",
                cpu_time_divisor(), cpu_time_divisor() == 1 ? "" : "s");
  std::printf(
      "machine limits, measured now: fp32 FMA peak %.1f GFLOP/s (%s); memory read %.1f GB/s\n",
      peak.gflops, peak.how.c_str(), bandwidth);
  if (dot.gflops > 0)
    std::printf("bf16 dot-product peak %.1f GFLOP/s (%s)\n", dot.gflops, dot.how.c_str());
  std::printf("\n");
  if (!libs.empty()) {
    std::printf(
        "GEMM libraries: C[%u, %u] = X[%u, %u] W^T (the layer's forward FLOPs), %u thread%s\n",
        d.tokens, width, d.tokens, d.dim, threads, threads == 1 ? "" : "s");
    std::printf("%-26s %-18s %10s %14s  %s\n", "library", "kernels", "nt GF/s", "nt+nn+tn GF/s",
                "run as");
    for (const GemmLibrary& l : libs) {
      if (!l.available) {
        std::printf("%-26s %s\n", l.name.c_str(), l.missing.c_str());
        continue;
      }
      std::printf("%-26s %-18s %10.1f %14.1f  %s\n", l.name.c_str(), l.kernels.c_str(), l.nt,
                  l.trio, l.how.c_str());
    }
    if (best)
      std::printf(
          "best single-GEMM rate: %.1f GFLOP/s (%s); run again right before each timed fp32 "
          "pass: median %.1f GFLOP/s\n",
          best_nt, best->name.c_str(), beside_gemm);
    std::printf("\n");
  }
  std::printf(
      "MoE layer d=%u, %u experts x hidden %u, top-%u, %u shared x hidden %u; %u tokens; "
      "median of %d\n",
      d.dim, d.experts, d.expert_hidden, d.top_k, d.shared, d.shared_hidden, d.tokens, repeats);
  std::printf("%-18s %-9s %10s %10s %10s %12s %13s %9s\n", "pass", "precision", "GFLOP", "ms",
              "GF/s", "/best GEMM", "/GEMM beside", "/peak");
  auto row = [&](const char* name, const char* prec, double flops, double s, double beside) {
    const double g = flops / s / 1e9;
    std::printf("%-18s %-9s %10.3f %10.2f %10.2f %12s %13s %9.2f\n", name, prec, flops / 1e9,
                s * 1e3, g, best_nt > 0 ? f2(g / best_nt).c_str() : "n/a",
                beside > 0 ? f2(beside).c_str() : "n/a", g / peak.gflops);
  };
  const char* p32 = config.device == MOERT_DEVICE_CUDA ? "bf16" : "fp32";
  row("forward", p32, moe_fwd, t32.forward, beside_f);
  row("forward+backward", p32, 3 * moe_fwd, t32.forward_backward, beside_fb);
  // The layer's GEMMs are smaller than the one it is set against, and at a small batch they can
  // be a little faster; a pass well ahead of the GEMM means that other jobs took the CPUs while the
  // GEMM ran (1.81 in one run that also measured the FMA peak at half its usual figure).
  constexpr double kImplausible = 1.15;
  const double fastest = std::max(moe_fwd / t32.forward, 3 * moe_fwd / t32.forward_backward) / 1e9;
  // Under --cpu-time the GEMM is charged its threads' spinning too, which its wall time hides.
  if (!using_cpu_time() && t32.busy_waits == 0 &&
      ((best_nt > 0 && fastest > kImplausible * best_nt) || beside_f > kImplausible ||
       beside_fb > kImplausible))
    std::printf(
        "note: a pass ran at more than %.2fx the GEMM it is set against: other jobs most likely "
        "took CPUs from that GEMM, and the ratios do not hold; run again on a quieter host\n",
        kImplausible);
  if (t32.busy_waits > 0)
    std::printf(
        "note: in %d of %d waits the process's other threads (the GEMM library's) were still using "
        "CPU after 200 ms (OMP_WAIT_POLICY=active makes OpenMP's spin for good): the passes and "
        "the GEMM beside them shared the CPUs with those threads\n",
        t32.busy_waits, t32.waits);
  if (low) {
    row("forward", lp, moe_fwd, t16.forward, 0.0);
    row("forward+backward", lp, 3 * moe_fwd, t16.forward_backward, 0.0);
    std::printf("%s / fp32 speed: forward %.2fx, forward+backward %.2fx\n", lp, g16f / g32f,
                g16b / g32b);
    std::printf(
        "%s against fp32, ||%s - fp32|| / ||fp32|| (residual parts taken out): Fprop "
        "(output) %.2e, Dgrad (input gradient) %.2e, Wgrad",
        lp, lp, acc.fprop, acc.dgrad);
    for (const auto& [name, v] : acc.wgrad) std::printf(" %s %.2e", name.c_str(), v);
    std::printf("\n");
  }
  if (decode) {
    std::printf(
        "\ndecode-sized batches: d=%u, %u routed experts x %u + %u shared, top-%u, bf16 "
        "weights; forward, median of %d\n",
        dd.dim, dd.experts, dd.expert_hidden, dd.shared, dd.top_k, repeats);
    std::printf("%6s %9s %12s %10s %10s %14s %11s %14s %10s %8s %10s\n", "rows", "experts",
                "weight MB", "GFLOP", "ms", "effective GB/s", "read GB/s", "/memory read", "GF/s",
                "bound", "/roofline");
    for (const DecodeRow& r : dec) {
      const bool known = roof.known(r);
      std::printf("%6u %6u+%u %12.1f %10.3f %10.2f %14.2f %11.1f %14.2f %10.1f %8s %10s\n", r.rows,
                  r.touched, dd.shared, r.bytes / 1e6, r.flops / 1e9, r.seconds * 1e3,
                  r.bytes / r.seconds / 1e9, r.read_gbps,
                  r.read_gbps > 0 ? r.bytes / r.seconds / 1e9 / r.read_gbps : 0.0,
                  r.flops / r.seconds / 1e9,
                  known ? (roof.compute_bound(r) ? "compute" : "memory") : "n/a",
                  known ? f2(roof.seconds(r) / r.seconds).c_str() : "n/a");
    }
    std::printf(
        "read GB/s: the memory read bandwidth measured right before each pass (median); "
        "/memory read = effective / read\n"
        "roofline: the longer of the weights at that read rate and the GFLOP at %s (%s); "
        "/roofline = that time / the pass's\n",
        roof.compute.c_str(), roof.gflops > 0 ? cat(f2(roof.gflops), " GFLOP/s").c_str() : "n/a");
  }
  return 0;
}

}  // namespace moert_cli
