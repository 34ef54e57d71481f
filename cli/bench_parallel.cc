// `moert bench --expert-parallel EP` under mpirun. Every rank feeds its share of one global batch
// to a session sharded over the job (the library's expert parallelism, through the C ABI like any
// host); the sessions' profiles say where each step's time went. Two sessions take turns step by
// step: one with the exchanges overlapped with computation (the library's default), one with every
// exchange waited for before anything else runs, so that the difference is what overlap hides.
//
// The single-process layer is timed on rank 0 before the job joins MPI and again after the other
// ranks have let it go: a rank waiting in a moert collective polls on its progress thread (a
// core's worth on a shared machine), while one still starting MPI, or finalising it, waits in
// Open MPI's lazy loop (about a tenth of a core, measured), so the reference runs with the
// machine nearly to itself. Before and after bracket the job's steps on a machine whose load
// drifts; the ratios use their mean.
#include "cli/bench_parallel.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "cli/error.h"
#include "cli/json_text.h"
#include "cli/model_codec.h"

namespace moert_cli {
namespace {

// Where one step's time went, in seconds. The waits (dispatch, combine) and the gradients'
// combination across ranks are the communication computation did not hide: `exposed`; `rest` is
// what the step spent outside the profiled phases (routing, shared experts, permutations, the
// all-gather of the expert counts).
struct Phases {
  double step = 0.0, dispatch = 0.0, combine = 0.0, experts = 0.0, gradients = 0.0;
  double exposed = 0.0, rest = 0.0;
};

// Per rank and step: the step's time, then the MOERT_PROFILE_* figures.
constexpr size_t kFigures = 1 + MOERT_PROFILE_COUNT;

std::vector<double> profile(const moert_session* s) {
  std::vector<double> p(MOERT_PROFILE_COUNT);
  check(moert_session_profile(s, p.data(), p.size()), "profile");
  return p;
}

struct Pass {
  Phases overlap, serial;
  double single_before = 0.0, single_after = 0.0;  // the single process's step, seconds
  double single() const { return 0.5 * (single_before + single_after); }
};

// Figures of `repeats` steps of every rank (per_rank each, in rank order) -> the job's: the step
// is the slowest rank's (the job's step ends with it), the phases the ranks' mean; each is the
// median over the steps.
Phases summarise(const std::vector<double>& all, int ranks, int repeats) {
  const size_t per_rank = static_cast<size_t>(repeats) * kFigures;
  std::vector<double> step, dispatch, combine, experts, gradients, exposed, rest;
  for (int i = 0; i < repeats; ++i) {
    double slowest = 0.0, mean[MOERT_PROFILE_COUNT] = {};
    for (int r = 0; r < ranks; ++r) {
      const double* f =
          all.data() + static_cast<size_t>(r) * per_rank + static_cast<size_t>(i) * kFigures;
      slowest = std::max(slowest, f[0]);
      for (size_t k = 0; k < MOERT_PROFILE_COUNT; ++k) mean[k] += f[1 + k] / ranks;
    }
    step.push_back(slowest);
    dispatch.push_back(mean[MOERT_PROFILE_DISPATCH]);
    combine.push_back(mean[MOERT_PROFILE_COMBINE]);
    experts.push_back(mean[MOERT_PROFILE_EXPERTS]);
    gradients.push_back(mean[MOERT_PROFILE_GRADIENTS]);
    const double comm =
        mean[MOERT_PROFILE_DISPATCH] + mean[MOERT_PROFILE_COMBINE] + mean[MOERT_PROFILE_GRADIENTS];
    exposed.push_back(comm);
    rest.push_back(slowest - comm - mean[MOERT_PROFILE_EXPERTS]);
  }
  Phases p;
  p.step = median(step);
  p.dispatch = median(dispatch);
  p.combine = median(combine);
  p.experts = median(experts);
  p.gradients = median(gradients);
  p.exposed = median(exposed);
  p.rest = median(rest);
  return p;
}

// Two sessions of `config`, with the exchanges overlapped and not: one warm-up step each, then
// `repeats` steps of each in turn, so that a machine whose load drifts weighs on both alike.
// Every rank starts each step together. Collective.
void time_sharded(const Job& job, const moert_model* model, const SessionConfig& config,
                  const std::vector<float>& x, const std::vector<float>& dy, uint32_t rows,
                  int repeats, Pass& out) {
  SessionPtr sessions[2];
  for (int overlap = 0; overlap < 2; ++overlap) {
    SessionConfig c = config;
    c.knobs.push_back({"ep_overlap", overlap ? "true" : "false"});
    sessions[overlap] = create_session(model, c);
  }
  std::vector<float> y(x.size()), dx(x.size());
  auto pass = [&](moert_session* s) {
    check(moert_session_forward_hidden(s, x.data(), x.size(), rows, y.data(), y.size()), "forward");
    if (config.training)
      check(moert_session_backward(s, dy.data(), dy.size(), dx.data(), dx.size(), nullptr),
            "backward");
  };
  for (SessionPtr& s : sessions) pass(s.get());
  const size_t per_rank = static_cast<size_t>(repeats) * kFigures;
  std::vector<double> all[2];
  for (int overlap = 0; overlap < 2; ++overlap)
    all[overlap].assign(static_cast<size_t>(job.size) * per_rank, 0.0);
  for (int i = 0; i < repeats; ++i)
    for (int overlap = 0; overlap < 2; ++overlap) {
      moert_session* s = sessions[overlap].get();
      check(moert_comm_barrier(job.comm), "barrier");
      const std::vector<double> before = profile(s);
      const double start = bench_clock();
      pass(s);
      double* f = all[overlap].data() + static_cast<size_t>(job.rank) * per_rank +
                  static_cast<size_t>(i) * kFigures;
      f[0] = bench_clock() - start;
      const std::vector<double> after = profile(s);
      for (size_t k = 0; k < MOERT_PROFILE_COUNT; ++k) f[1 + k] = after[k] - before[k];
    }
  // Every rank's figures in its own slots: the sum is a gather.
  for (int overlap = 0; overlap < 2; ++overlap) {
    job.sum(all[overlap].data(), all[overlap].size());
    (overlap ? out.overlap : out.serial) = summarise(all[overlap], job.size, repeats);
  }
}

std::string phases_json(const Phases& p) {
  return cat("{\"step\": ", json_number(p.step), ", \"dispatch\": ", json_number(p.dispatch),
             ", \"experts\": ", json_number(p.experts), ", \"combine\": ", json_number(p.combine),
             ", \"gradients\": ", json_number(p.gradients),
             ", \"exposed\": ", json_number(p.exposed), ", \"rest\": ", json_number(p.rest), "}");
}

std::string pass_json(const Pass& p) {
  return cat("{\"overlap\": ", phases_json(p.overlap), ", \"no_overlap\": ", phases_json(p.serial),
             ", \"single\": ", json_number(p.single()),
             ", \"single_before\": ", json_number(p.single_before),
             ", \"single_after\": ", json_number(p.single_after), "}");
}

std::string ms(double seconds) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", seconds * 1e3);
  return b;
}

std::string ratio(double a, double b) {
  char t[32];
  std::snprintf(t, sizeof t, "%.2f", a / b);
  return t;
}

}  // namespace

int run_bench_parallel(const Args& args, const Dims& d, int repeats, uint64_t seed,
                       const SessionConfig& base, const std::string& precision) {
  const Launch launch = mpirun_launch();
  const int64_t ep = args.integer("expert-parallel", 1, 1, 1 << 20);
  // Everything is checked before any work, on every rank alike, so that a bad combination is one
  // clear refusal rather than a rank failing inside a collective.
  if (launch.size == 0)
    usage_fail(
        "--expert-parallel shares the layer among the processes of an MPI job: run "
        "mpirun -np N moert bench --expert-parallel EP ... (N a multiple of EP)");
  if (launch.size % ep != 0)
    usage_fail("--expert-parallel ", ep, " does not divide the job's ", launch.size, " processes");
  if (d.experts % ep != 0)
    usage_fail("--experts ", d.experts, " do not split evenly over --expert-parallel ", ep,
               " ranks");
  if (d.tokens % static_cast<uint32_t>(launch.size) != 0)
    usage_fail("--tokens ", d.tokens, " (the global batch) does not split evenly over the job's ",
               launch.size, " processes");
  const int64_t chunks = args.integer("ep-chunks", 2, 1, 64);
  const auto single_threads = static_cast<uint32_t>(
      args.integer("single-threads", static_cast<int64_t>(base.threads) * launch.size, 1, 4096));
  const uint32_t rows = d.tokens / static_cast<uint32_t>(launch.size);
  double load[3] = {-1.0, -1.0, -1.0};
  if (getloadavg(load, 3) != 3) load[0] = load[1] = load[2] = -1.0;

  ModelPtr moe =
      load_model_bytes(json_to_binary(moe_json(d, seed), "bench model"), "", "bench model");
  SessionConfig config = base;
  if (precision != "fp32") config.knobs.push_back({"precision", precision});

  Pass fwd, fwd_bwd;
  const unsigned rank0_cpus = cpu_count();
  SessionConfig one = config;
  one.threads = single_threads;
  if (launch.rank == 0) {
    const Timing t = time_layer(moe.get(), one, d.tokens, d.dim, repeats, seed);
    fwd.single_before = t.forward;
    fwd_bwd.single_before = t.forward_backward;
  }

  const Job job = join_job(ep, MOERT_DEVICE_CPU, args.real("comm-timeout", 600.0, 1e-3, 31536000.0),
                           args.canonical({"threads", "comm-timeout"}));
  if (job.size != launch.size)
    fail("MPI reports ", job.size, " processes where mpirun announced ", launch.size);
  // The rank's rows of the global batch time_layer() fed the single process.
  const size_t width = d.dim;
  const std::vector<float> x_all = random_values(static_cast<size_t>(d.tokens) * width, seed);
  const std::vector<float> dy_all = random_values(x_all.size(), seed + 1);
  const size_t first = static_cast<size_t>(job.rank) * rows * width, n = rows * width;
  const std::vector<float> x(x_all.begin() + first, x_all.begin() + first + n);
  const std::vector<float> dy(dy_all.begin() + first, dy_all.begin() + first + n);
  // Each rank's --threads: the ranks' command lines are compared without it.
  std::vector<double> rank_threads(static_cast<size_t>(job.size), 0.0);
  rank_threads[static_cast<size_t>(job.rank)] = base.threads;
  job.sum(rank_threads.data(), rank_threads.size());
  config.job = &job;
  config.knobs.push_back({"ep_chunks", std::to_string(chunks)});
  for (bool training : {false, true}) {
    SessionConfig c = config;
    c.training = training;
    time_sharded(job, moe.get(), c, x, dy, rows, repeats, training ? fwd_bwd : fwd);
  }
  // The other ranks free their communicator on the way out and wait in MPI_Finalize for rank 0.
  if (job.rank != 0) return 0;
  {
    const Timing t = time_layer(moe.get(), one, d.tokens, d.dim, repeats, seed);
    fwd.single_after = t.forward;
    fwd_bwd.single_after = t.forward_backward;
  }

  const int dp = job.size / job.expert_parallel;
  const unsigned threads = base.threads;
  const bool same_threads = std::all_of(rank_threads.begin(), rank_threads.end(),
                                        [&](double t) { return t == rank_threads[0]; });
  std::string threads_json = "[", threads_text;
  for (size_t r = 0; r < rank_threads.size(); ++r) {
    threads_json += cat(r ? ", " : "", static_cast<unsigned>(rank_threads[r]));
    threads_text += cat(r ? ", " : "", static_cast<unsigned>(rank_threads[r]));
  }
  threads_json += "]";
  threads_text = same_threads ? cat(threads, " thread", threads == 1 ? "" : "s", " each")
                              : cat("threads per rank ", threads_text);
  if (args.has("json")) {
    std::ostringstream o;
    o << "{\"expert_parallel\": " << job.expert_parallel << ", \"ranks\": " << job.size
      << ", \"data_parallel\": " << dp << ", \"threads\": " << threads
      << ", \"rank_threads\": " << threads_json << ", \"single_threads\": " << single_threads
      << ", \"cpu\": " << json_string(cpu_name()) << ", \"cpus\": " << sysconf(_SC_NPROCESSORS_ONLN)
      << ", \"rank0_cpus\": " << rank0_cpus << ", \"load_average\": [" << json_number(load[0])
      << ", " << json_number(load[1]) << ", " << json_number(load[2]) << "]"
      << ", \"precision\": " << json_string(precision) << ", \"tokens\": " << d.tokens
      << ", \"tokens_per_rank\": " << rows << ", \"dim\": " << d.dim
      << ", \"experts\": " << d.experts << ", \"top_k\": " << d.top_k
      << ", \"expert_hidden\": " << d.expert_hidden << ", \"shared\": " << d.shared
      << ", \"shared_hidden\": " << d.shared_hidden << ", \"ep_chunks\": " << chunks
      << ", \"repeats\": " << repeats << ",\n \"forward\": " << pass_json(fwd)
      << ",\n \"forward_backward\": " << pass_json(fwd_bwd) << "}\n";
    std::fputs(o.str().c_str(), stdout);
    return 0;
  }

  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  std::printf(
      "moert bench --expert-parallel %d: %d ranks (EP %d x DP %d), %s; %s, %ld "
      "CPUs online, %u of them rank 0's to run on; load average %.2f %.2f %.2f at the start\n",
      job.expert_parallel, job.size, job.expert_parallel, dp, threads_text.c_str(),
      cpu_name().c_str(), online, rank0_cpus, load[0], load[1], load[2]);
  if (single_threads > rank0_cpus)
    std::printf(
        "note: the single process's %u threads shared rank 0's %u CPU%s: mpirun binds each rank "
        "to a core by default; mpirun --bind-to none lets it use the machine\n",
        single_threads, rank0_cpus, rank0_cpus == 1 ? "" : "s");
  std::printf(
      "MoE layer d=%u, %u experts x hidden %u (%u per rank), top-%u, %u shared x hidden %u, %s\n",
      d.dim, d.experts, d.expert_hidden, d.experts / static_cast<uint32_t>(job.expert_parallel),
      d.top_k, d.shared, d.shared_hidden, precision.c_str());
  std::printf(
      "global batch %u tokens: %u per rank; the single process (rank 0, %u thread%s, before and "
      "after the job's steps) takes all %u\n",
      d.tokens, rows, single_threads, single_threads == 1 ? "" : "s", d.tokens);
  std::printf(
      "overlap: ep_chunks %lld, exchanges in flight while the shared experts and earlier chunks "
      "compute; no overlap: one chunk, each exchange waited for before anything else runs\n",
      static_cast<long long>(chunks));
  std::printf(
      "ms per step, median of %d steps; phases: the mean over ranks; step: the slowest rank\n\n",
      repeats);
  std::printf("%-31s %21s %23s\n", "", "forward", "forward+backward");
  std::printf("%-31s %10s %10s %11s %11s\n", "phase", "overlap", "no overlap", "overlap",
              "no overlap");
  auto row = [](const char* name, const std::string& a, const std::string& b, const std::string& c,
                const std::string& e) {
    std::printf("%-31s %10s %10s %11s %11s\n", name, a.c_str(), b.c_str(), c.c_str(), e.c_str());
  };
  auto phase = [&](const char* name, double Phases::*f) {
    row(name, ms(fwd.overlap.*f), ms(fwd.serial.*f), ms(fwd_bwd.overlap.*f), ms(fwd_bwd.serial.*f));
  };
  phase("dispatch (wait)", &Phases::dispatch);
  phase("experts (compute)", &Phases::experts);
  phase("combine (wait)", &Phases::combine);
  row("gradients (across ranks)", "-", "-", ms(fwd_bwd.overlap.gradients),
      ms(fwd_bwd.serial.gradients));
  phase("exposed communication", &Phases::exposed);
  phase("rest (router, shared, permute)", &Phases::rest);
  phase("step", &Phases::step);
  row("single process, before", ms(fwd.single_before), ms(fwd.single_before),
      ms(fwd_bwd.single_before), ms(fwd_bwd.single_before));
  row("single process, after", ms(fwd.single_after), ms(fwd.single_after), ms(fwd_bwd.single_after),
      ms(fwd_bwd.single_after));
  row("step / single process (mean)", ratio(fwd.overlap.step, fwd.single()),
      ratio(fwd.serial.step, fwd.single()), ratio(fwd_bwd.overlap.step, fwd_bwd.single()),
      ratio(fwd_bwd.serial.step, fwd_bwd.single()));
  auto hidden = [](const Pass& p) {
    const double h = p.serial.exposed - p.overlap.exposed;
    char pct[32];
    std::snprintf(pct, sizeof pct, "%.0f", 100.0 * h / p.serial.exposed);
    return cat(ms(h), " ms (", pct, "% of the exposed communication without overlap)");
  };
  std::printf("\ncommunication overlap hides: forward %s; forward+backward %s\n",
              hidden(fwd).c_str(), hidden(fwd_bwd).c_str());
  std::printf(
      "(waits: time blocked on an all-to-all to arrive; gradients: the replicated parameters' "
      "gradients combined across ranks after backward; exposed = dispatch + combine + "
      "gradients)\n");
  return 0;
}

}  // namespace moert_cli
