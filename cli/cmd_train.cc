// `moert train`: character-level MoE language models on a text corpus, one run per balancing
// strategy from the same seed, data order and budget, compared in one table.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "cli/charlm.h"
#include "cli/commands.h"
#include "cli/corpus.h"
#include "cli/data_file.h"
#include "cli/error.h"
#include "cli/lm_eval.h"
#include "cli/model_codec.h"
#include "cli/progress.h"
#include "cli/router_probe.h"
#include "cli/save_space.h"
#include "cli/trainer.h"
#include "schemas/saved_files.h"

namespace moert_cli {

const CommandSpec kTrainSpec = {
    "train",
    "[--corpus PATH] [--balancing LIST] [options]",
    "train character-level MoE language models and compare load-balancing strategies",
    "Reads a text corpus (fortune files or plain text), splits it by record into training and\n"
    "validation text, and trains one model per balancing strategy in LIST: the same model, seed,\n"
    "batches, optimizer and learning-rate schedule, the balancing policy being the only\n"
    "difference. Strategies: none, aux (Switch/GShard auxiliary loss, alpha), loss-free (bias\n"
    "update b_i += gamma * sign(mean - count_i) per step); 'aux:alpha=X' or 'loss-free:gamma=X'\n"
    "overrides the setting for that run only and labels it so.\n\n"
    "Model: Embedding of CONTEXT characters (EMBED-DIM each) -> BLOCKS x [RMSNorm -> MoE with\n"
    "SHARED shared and EXPERTS routed SwiGLU experts, sigmoid routing, top-K, renormalised\n"
    "weights] -> RMSNorm -> linear head over a fixed 98-character vocabulary (tab, newline,\n"
    "printable ASCII, one id for everything else). Optimizer: AdamW, linear warm-up, cosine decay\n"
    "to MIN-LR, global gradient-norm clipping.\n\n"
    "Printed per strategy: validation loss (nats/char) and perplexity, computed by moert from the\n"
    "logits; MaxVio_global over the validation set (mean over MoE blocks); mean MaxVio_batch over\n"
    "the last TAIL of the steps; dead experts (no validation token); then, for the generated\n"
    "model in one process (not with --model, not under mpirun), router diagnostics: the spread\n"
    "of the experts' mean scores against the learned bias range, and with --precision bf16 or\n"
    "fp8 the distance to fp32 of each GEMM kind (Fprop, Dgrad, Wgrad) on each trained MoE\n"
    "block's weights, input activations and loss gradient, over the same rows.",
    0,
    0,
    {
        {"corpus", "PATH", "text file or directory of fortune files", "/usr/share/games/fortunes"},
        {"balancing", "LIST", "comma-separated strategies", "none,aux,loss-free"},
        {"model", "FILE",
         "train this model file (JSON or binary) instead of the generated one; it keeps its own "
         "balancing",
         ""},
        {"steps", "N", "optimizer steps per run", "2500"},
        {"batch", "N", "rows (predicted characters) per step", "512"},
        {"lr", "X", "peak learning rate", "3e-3"},
        {"min-lr", "X", "learning rate at the end of the cosine decay (at most --lr)", "--lr / 10"},
        {"warmup", "N", "linear warm-up steps", "100"},
        {"clip", "X", "global gradient-norm clip, 0 = off", "1"},
        {"weight-decay", "X", "AdamW decoupled weight decay on matrices", "0"},
        {"seed", "N", "seed of the initial weights and the batch order", "1"},
        {"threads", "N", "CPU threads", "2"},
        {"device", "NAME",
         "cpu or cuda (with --precision bf16 or fp8; under mpirun one GPU per rank, its local "
         "rank, joined by NCCL)",
         "cpu"},
        {"expert-parallel", "EP",
         "under mpirun -np N: shard the routed experts over EP ranks (N / EP data-parallel "
         "replicas); each rank feeds B / N rows of every batch, rank 0 prints",
         ""},
        {"comm-timeout", "S",
         "with --expert-parallel: seconds the communicator's creation and each collective wait "
         "for the other ranks before the job fails (a rank that died, hangs or never started)",
         "600"},
        {"precision", "NAME",
         "what the experts' GEMMs multiply in: fp32, bf16 or fp8 (block-scaled E4M3 as "
         "DeepSeek-V3; fp32 sums, fp32 master weights)",
         "fp32"},
        {"fp8-scales", "KIND",
         "with --precision fp8: fp32 scales (amax / 448) or ue8m0 (rounded up to powers of two)",
         "fp32"},
        {"context", "N", "characters in the window", "8"},
        {"embed-dim", "N", "embedding width per character", "16"},
        {"blocks", "N", "MoE blocks", "2"},
        {"experts", "N", "routed experts per block", "16"},
        {"top-k", "N", "routed experts per token", "4"},
        {"expert-hidden", "N", "hidden width of a routed expert", "32"},
        {"shared", "N", "shared experts per block", "1"},
        {"shared-hidden", "N", "hidden width of a shared expert", "64"},
        {"aux-alpha", "X", "alpha of the auxiliary loss", "0.01"},
        {"gamma", "X", "bias update rate of loss-free balancing", "0.001"},
        {"val-every", "N", "every N-th record goes to validation", "10"},
        {"eval-rows", "N", "validation positions evaluated, evenly spaced; 0 = all", "0"},
        {"probe-rows", "N",
         "validation rows for the router diagnostics and the GEMM accuracy; 0 = skip them", "8192"},
        {"tail", "F", "fraction of the steps at the end over which MaxVio_batch is averaged",
         "0.2"},
        {"csv", "FILE", "write per-step metrics of every run here", ""},
        {"save", "DIR",
         "write each trained model as DIR/<strategy>.moert (a checkpoint; DIR/model.moert for "
         "--model's run)",
         ""},
        {"log-every", "N", "steps between progress lines when stderr is not a terminal",
         "steps/10"},
    },
};

namespace {

// Whether two output paths name the same file, existing or not. A path that cannot be resolved
// (a parent without permission, a link loop) is compared as written, made absolute.
bool same_destination(const std::string& a, const std::string& b) {
  namespace fs = std::filesystem;
  const auto resolved = [](const std::string& p) {
    std::error_code ec;
    fs::path r = fs::weakly_canonical(p, ec);
    if (ec) r = fs::absolute(p, ec).lexically_normal();
    return r;
  };
  return resolved(a) == resolved(b);
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = text.find(',', start);
    const std::string item =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (item.empty()) usage_fail("--balancing: empty entry in '", text, "'");
    out.push_back(item);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

std::string human(double v) {
  char buf[32];
  if (v >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (v >= 1e3)
    std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

// Mean MaxVio of a batch routed uniformly at random (each row picks top_k distinct experts with
// equal chance): the level MaxVio_batch cannot go below on average however well the router is
// balanced, because a finite batch fluctuates. A Monte Carlo estimate with a fixed seed.
double random_routing_floor(uint32_t experts, uint32_t top_k, uint64_t rows, uint64_t seed) {
  constexpr int kBatches = 1000;
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  auto next = [&x] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  std::vector<int64_t> counts(experts);
  std::vector<uint32_t> pool(experts);
  double sum = 0.0;
  for (int b = 0; b < kBatches; ++b) {
    std::fill(counts.begin(), counts.end(), 0);
    for (uint64_t r = 0; r < rows; ++r) {
      std::iota(pool.begin(), pool.end(), 0u);
      for (uint32_t k = 0; k < top_k; ++k) {  // a partial Fisher-Yates shuffle
        const uint32_t j = k + static_cast<uint32_t>(next() % (experts - k));
        std::swap(pool[k], pool[j]);
        ++counts[pool[k]];
      }
    }
    const double mean = static_cast<double>(rows * top_k) / experts;
    sum += (static_cast<double>(*std::max_element(counts.begin(), counts.end())) - mean) / mean;
  }
  return sum / kBatches;
}

uint32_t u32(const Args& a, const std::string& flag, int64_t fallback, int64_t lo, int64_t hi) {
  return static_cast<uint32_t>(a.integer(flag, fallback, lo, hi));
}

}  // namespace

int run_train(const Args& args) {
  TrainSettings st;
  st.steps = static_cast<uint64_t>(args.integer("steps", 2500, 1, 100000000));
  st.batch = static_cast<uint64_t>(args.integer("batch", 512, 1, 1 << 20));
  st.lr = args.real("lr", 3e-3, 0.0, 10.0);
  // A decay ends below where it starts: the default follows --lr (3e-4 for the default 3e-3).
  st.min_lr = args.real("min-lr", st.lr / 10, 0.0, 10.0);
  if (st.min_lr > st.lr)
    usage_fail("--min-lr ", st.min_lr, " is above --lr ", st.lr,
               ": the cosine schedule decays from --lr to --min-lr");
  st.warmup = static_cast<uint64_t>(args.integer("warmup", 100, 0, 100000000));
  st.clip_norm = args.real("clip", 1.0, 0.0, 1e9);
  st.weight_decay = args.real("weight-decay", 0.0, 0.0, 10.0);
  st.seed = static_cast<uint64_t>(args.integer("seed", 1, 0, INT64_MAX));
  st.threads = u32(args, "threads", 2, 1, 1024);
  st.precision = args.str("precision", "fp32");
  if (st.precision != "fp32" && st.precision != "bf16" && st.precision != "fp8")
    usage_fail("--precision takes fp32, bf16 or fp8, got '", st.precision, "'");
  st.fp8_scales = args.str("fp8-scales", "fp32");
  if (st.fp8_scales != "fp32" && st.fp8_scales != "ue8m0")
    usage_fail("--fp8-scales takes fp32 or ue8m0, got '", st.fp8_scales, "'");
  if (st.fp8_scales != "fp32" && st.precision != "fp8")
    usage_fail("--fp8-scales applies only with --precision fp8");
  const std::string device = args.str("device", "cpu");
  if (device != "cpu" && device != "cuda")
    usage_fail("--device takes cpu or cuda, got '", device, "'");
  st.device = device == "cuda" ? MOERT_DEVICE_CUDA : MOERT_DEVICE_CPU;
  if (st.device == MOERT_DEVICE_CUDA && st.precision == "fp32")
    usage_fail("--device cuda multiplies in bf16 or fp8: pass --precision bf16 (or fp8)");
  st.tail_fraction = args.real("tail", 0.2, 1e-9, 1.0);
  st.eval_rows = static_cast<uint64_t>(args.integer("eval-rows", 0, 0, INT64_MAX));
  st.log_every = static_cast<uint64_t>(args.integer("log-every", 0, 1, INT64_MAX));
  const uint64_t probe_rows = static_cast<uint64_t>(args.integer("probe-rows", 8192, 0, 1 << 24));
  const auto val_every = u32(args, "val-every", 10, 2, 1000000);
  if (args.has("comm-timeout") && !args.has("expert-parallel"))
    usage_fail("--comm-timeout applies only with --expert-parallel");
  const Job job = join_job(args.integer("expert-parallel", 0, 1, 1 << 20), st.device,
                           args.real("comm-timeout", 600.0, 1e-3, 31536000.0),
                           args.canonical({"threads", "comm-timeout"}));
  st.job = &job;
  if (st.batch % static_cast<uint64_t>(job.size) != 0)
    usage_fail("--batch ", st.batch, " does not split evenly over the job's ", job.size,
               " processes");
  // One report: the other ranks compute their share silently.
  if (job.rank != 0) {
    if (!std::freopen("/dev/null", "w", stdout)) fail("cannot silence rank ", job.rank);
    Progress::mute();
  }

  CharLMShape shape;
  const bool given_model = args.has("model");
  // The diagnostics probe the generated model in one process: said, rather than skipped in
  // silence, when asked for elsewhere.
  if (args.has("probe-rows") && probe_rows > 0 && (given_model || !job.alone()))
    usage_fail("--probe-rows applies to the generated model in one process (",
               given_model ? "not with --model" : "not under mpirun", "): give 0 or leave it out");
  if (given_model && args.has("balancing"))
    usage_fail("--balancing applies to the generated model; a --model file keeps its own policy");
  // Shape options are ignored with --model: said (before their values are checked), rather than
  // dropped in silence.
  if (given_model)
    for (const char* option : {"context", "embed-dim", "blocks", "experts", "top-k",
                               "expert-hidden", "shared", "shared-hidden", "aux-alpha", "gamma"})
      if (args.has(option))
        usage_fail("--", option,
                   " shapes the generated model; a --model file keeps its own shape and policy");
  shape.context = u32(args, "context", 8, 1, 4096);
  shape.embed_dim = u32(args, "embed-dim", 16, 1, 65536);
  shape.blocks = u32(args, "blocks", 2, 1, 1024);
  shape.experts = u32(args, "experts", 16, 2, 65536);
  shape.top_k = u32(args, "top-k", 4, 1, 65536);
  shape.expert_hidden = u32(args, "expert-hidden", 32, 1, 1 << 20);
  shape.shared = u32(args, "shared", 1, 0, 1024);
  shape.shared_hidden = u32(args, "shared-hidden", 64, 1, 1 << 20);
  if (shape.top_k >= shape.experts)
    usage_fail("--top-k (", shape.top_k, ") must be smaller than --experts (", shape.experts, ")");
  const double alpha = args.real("aux-alpha", 0.01, 0.0, 1e3);
  const double gamma = args.real("gamma", 1e-3, 0.0, 1e3);

  std::vector<Balancing> strategies;
  if (!given_model)
    for (const std::string& s : split_list(args.str("balancing", "none,aux,loss-free")))
      strategies.push_back(parse_balancing(s, alpha, gamma));
  for (size_t i = 0; i < strategies.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (strategies[i].label == strategies[j].label)
        usage_fail("--balancing lists '", strategies[i].label, "' twice");
  // One run per strategy, or the --model file's one run; each names its checkpoint.
  std::vector<std::string> run_labels;
  if (given_model) run_labels.push_back("model");
  for (const Balancing& b : strategies) run_labels.push_back(b.label);

  // What each rank reads and opens of its own, before any work: a rank that cannot (a file
  // missing on its machine, a bad model file) fails every rank at once instead of leaving them
  // to wait for it until the communicator's timeout.
  ModelPtr file_model;
  const std::string corpus_path = args.str("corpus", "/usr/share/games/fortunes");
  Corpus corpus;
  Split split;
  std::unique_ptr<StepCsv> csv;
  const std::string save_dir = args.str("save", "");
  // The outermost folder of --save's path this run created ("" if none): what a failed run
  // removes again, each folder from --save up to it, as long as it holds nothing.
  std::filesystem::path save_created;
  auto remove_created_save = [&] {
    std::error_code ec;
    if (save_created.empty()) return;
    for (std::filesystem::path p = save_dir;; p = p.parent_path()) {
      if (!std::filesystem::is_empty(p, ec) || ec || !std::filesystem::remove(p, ec)) return;
      if (p == save_created || p.parent_path() == p || p.parent_path().empty()) return;
    }
  };
  job.prepare_together("read its model or corpus", [&] {
    if (given_model) {
      file_model = load_model_file(args.str("model", ""));
      int32_t kind = 0;
      uint32_t width = 0, out = 0;
      check(moert_model_io(file_model.get(), &kind, &width, &out), "model");
      if (kind != MOERT_INPUT_TOKENS)
        fail(args.str("model", ""), ": the model takes hidden states; train needs token input");
      if (out != static_cast<uint32_t>(kVocabSize))
        fail(args.str("model", ""), ": the model predicts ", out,
             " classes; the character vocabulary has ", kVocabSize);
      // The experiment measures balancing: a model without experts has nothing to report.
      if (moe_layer_indices(file_model.get()).empty())
        fail(args.str("model", ""),
             ": the model has no MoE layer; train compares load balancing across experts");
      shape.context = width;
    }
    corpus = read_corpus(corpus_path);
    split = split_corpus(corpus, val_every);
    if (split.train.size() <= shape.context || split.validation.size() <= shape.context)
      fail(corpus_path, ": the ", split.train.size() <= shape.context ? "training" : "validation",
           " text is not longer than the context (", shape.context, " characters)");
  });
  // Each rank reads its own copy of the corpus: a job whose machines hold different files (the
  // fortunes of two Debian releases, say) would train on a mixture that rank 0 does not report.
  {
    TextHash text;
    for (const std::vector<int32_t>* ids : {&split.train, &split.validation})
      text.add({reinterpret_cast<const uint8_t*>(ids->data()), ids->size() * sizeof(int32_t)});
    if (!job.same(text.value()))
      job.fail_together(cat(corpus_path,
                            ": the ranks read different texts (each rank reads the corpus on its "
                            "own machine): give every rank the same corpus"),
                        1);
  }
  // Outputs are opened before any work, so that a bad path fails at once; only once every rank
  // has its inputs, so that a job refused for one rank's inputs leaves rank 0's files as they
  // were. Rank 0 writes them.
  job.prepare_together("open its output paths", [&] {
    if (job.rank != 0) return;
    // No output may be an input: the corpus, the model (and its data file), or another output.
    std::vector<std::string> inputs = corpus.files;
    if (given_model)
      for (const std::string& f : model_files(args.str("model", ""))) inputs.push_back(f);
    std::vector<std::string> checkpoints;
    if (!save_dir.empty())
      for (const std::string& label : run_labels)
        checkpoints.push_back((std::filesystem::path(save_dir) / (label + ".moert")).string());
    for (const std::string& c : checkpoints) refuse_writing_onto_inputs(c, inputs);
    if (args.has("csv")) {
      const std::string csv_path = args.str("csv", "");
      refuse_writing_onto_inputs(csv_path, inputs);
      for (const std::string& c : checkpoints) {
        if (same_destination(csv_path, c))
          usage_fail("--csv '", csv_path, "' is where --save writes checkpoint '", c,
                     "': name another file");
        // The save replaces the checkpoint there and removes its data file; a file named as
        // that save's data files or temporary files are goes with them.
        const std::vector<std::string> old = model_files(c);
        const bool named = old.size() > 1 && same_destination(csv_path, old[1]);
        const std::string file = std::filesystem::path(c).filename().string();
        // Where the CSV lands: through a link to its target, and a bare name in the working
        // directory.
        std::error_code ec;
        std::filesystem::path lands = std::filesystem::absolute(csv_path, ec);
        // A link to a file not yet there (weakly_canonical stops at it): follow it by hand.
        for (int hops = 0; hops < 40 && std::filesystem::is_symlink(lands, ec); ++hops) {
          const std::filesystem::path to = std::filesystem::read_symlink(lands, ec);
          if (ec) break;
          lands = to.is_absolute() ? to : lands.parent_path() / to;
        }
        if (const auto resolved = std::filesystem::weakly_canonical(lands, ec); !ec)
          lands = resolved;
        const std::string name = lands.filename().string();
        const bool like_data = same_destination(lands.parent_path().string(), save_dir) &&
                               (moert::format::is_data_file_of(name, file) ||
                                moert::format::is_save_temporary_of(name, file));
        if (named || like_data)
          usage_fail("--csv '", csv_path, "' is ",
                     named ? "the data file of checkpoint '"
                           : "named as a data or temporary file of checkpoint '",
                     c, "', which --save replaces and then removes: name another file");
      }
    }
    // A checkpoint path the library's save refuses (a directory, a symbolic link or a FIFO at
    // DIR/<strategy>.moert) fails here too, not after that strategy's training.
    for (const std::string& c : checkpoints) {
      std::error_code ec;
      const std::filesystem::file_status found = std::filesystem::symlink_status(c, ec);
      if (std::filesystem::exists(found) && !std::filesystem::is_regular_file(found))
        fail("--save: '", c, "' exists and is ",
             std::filesystem::is_directory(found) ? "a directory"
             : std::filesystem::is_symlink(found) ? "a symbolic link"
                                                  : "not a regular file",
             ", which a checkpoint does not replace: remove it or save elsewhere");
    }
    // --save first, --csv (which truncates the file) last: a refused directory leaves the CSV
    // as it was, and a refused CSV removes the directory this run created.
    if (!save_dir.empty()) {
      std::error_code ec;
      for (std::filesystem::path p = save_dir; !p.empty() && !std::filesystem::exists(p, ec);
           p = p.parent_path()) {
        save_created = p;
        if (p.parent_path() == p) break;
      }
      std::filesystem::create_directories(save_dir, ec);
      if (ec) fail(save_dir, ": cannot create: ", ec.message());
      // A directory that takes no files, or a name too long for its file system, fails here,
      // not after the trainings: each probe is named as long as the longest file the save of
      // that checkpoint creates, its data file "<strategy>.moert.<16 hex digits>.data".
      for (const std::string& c : checkpoints) {
        std::string probe = c + ".moert00000XXXXXX.data";
        const int fd = ::mkstemps(probe.data(), 5);
        if (fd < 0) {
          const int err = errno;
          // The name or the whole path: say which (asked before the folder is removed).
          const size_t name = std::filesystem::path(c).filename().string().size();
          const long name_max = ::pathconf(save_dir.c_str(), _PC_NAME_MAX);
          remove_created_save();
          if (err == ENAMETOOLONG && name_max > 0 && name + 22 > static_cast<size_t>(name_max))
            fail("--save: checkpoint '", c, "' has a name too long for this file system (", name,
                 " bytes, and the data file a checkpoint of this model writes beside it ",
                 "22 more, past ", name_max, "): choose a shorter --balancing label");
          if (err == ENAMETOOLONG)
            fail("--save: the path of checkpoint '", c, "' (", c.size(),
                 " bytes, and 22 more for its data file) is too long for this system: choose a "
                 "shorter --save path");
          fail(save_dir, ": cannot write checkpoints there: ", std::strerror(err));
        }
        ::close(fd);
        ::unlink(probe.c_str());
      }
      // Room for every checkpoint the runs will write, asked here rather than learnt from a full
      // disk after the trainings. Where the file system does not say, the saves find out.
      if (const std::optional<uint64_t> free = free_bytes(save_dir)) {
        try {
          const ModelPtr generated =
              given_model ? nullptr : charlm_model(shape, strategies.front(), st.seed);
          const uint64_t each =
              checkpoint_bytes_bound(given_model ? file_model.get() : generated.get());
          std::vector<PlannedSave> saves;
          for (const std::string& c : checkpoints) {
            PlannedSave save{c, each, 0};
            if (std::filesystem::is_regular_file(std::filesystem::symlink_status(c, ec)))
              for (const std::string& f : model_files(c))
                if (const uintmax_t n = std::filesystem::file_size(f, ec); !ec) save.replaces += n;
            saves.push_back(save);
          }
          refuse_saves_past(save_dir, *free, saves);
        } catch (...) {
          remove_created_save();
          throw;
        }
      }
    }
    try {
      if (args.has("csv")) csv = std::make_unique<StepCsv>(args.str("csv", ""));
    } catch (...) {
      std::error_code ec;
      remove_created_save();
      throw;
    }
  });
  // From here on a run that fails leaves no empty folder of --save's behind (once a checkpoint
  // is written, the folders hold it and stay).
  struct RemoveEmptySave {
    std::function<void()> remove;
    ~RemoveEmptySave() { remove(); }
  } remove_empty_save{remove_created_save};
  std::printf(
      "corpus: %s: %zu file%s, %zu records, %s bytes; training %llu records (%s chars), "
      "validation %llu records (%s chars); %llu chars outside the vocabulary\n",
      printable(corpus_path).c_str(), corpus.files.size(), corpus.files.size() == 1 ? "" : "s",
      corpus.records.size(), human(static_cast<double>(corpus.bytes)).c_str(),
      static_cast<unsigned long long>(split.train_records),
      human(static_cast<double>(split.train.size())).c_str(),
      static_cast<unsigned long long>(split.validation_records),
      human(static_cast<double>(split.validation.size())).c_str(),
      static_cast<unsigned long long>(split.other_chars));

  {
    ModelPtr m = given_model ? nullptr : charlm_model(shape, strategies.front(), st.seed);
    const moert_model* shown = given_model ? file_model.get() : m.get();
    uint64_t total = 0, activated = 0;
    check(moert_model_num_parameters(shown, &total, &activated), "model");
    if (given_model)
      std::printf("model: %s, context %u; %s parameters, %s activated per token\n",
                  printable(args.str("model", "")).c_str(), shape.context,
                  human(static_cast<double>(total)).c_str(),
                  human(static_cast<double>(activated)).c_str());
    else
      std::printf(
          "model: %u chars x %u dims -> width %u; %u MoE block%s of %u routed experts "
          "(hidden %u, top-%u, sigmoid)%s; %s parameters, %s activated per token\n",
          shape.context, shape.embed_dim, shape.width(), shape.blocks, shape.blocks == 1 ? "" : "s",
          shape.experts, shape.expert_hidden, shape.top_k,
          shape.shared == 0
              ? ""
              : cat(" + ", shape.shared, " shared (hidden ", shape.shared_hidden, ")").c_str(),
          human(static_cast<double>(total)).c_str(), human(static_cast<double>(activated)).c_str());
  }
  if (!job.alone()) {
    // moert_session_options_set_comm(): the job is bitwise one process when each rank's rows are
    // a multiple of the gradient reduction's chunk; otherwise it agrees to rounding. Said rather
    // than refused: small batches are how a job is tried out.
    const uint64_t per_rank = st.batch / static_cast<uint64_t>(job.size);
    const uint64_t chunk = st.precision == "fp8" ? 128 : 64;
    std::printf("job: %d processes, expert parallelism %d, %llu rows per rank: %s\n", job.size,
                job.expert_parallel, static_cast<unsigned long long>(per_rank),
                st.device == MOERT_DEVICE_CUDA
                    ? "CUDA sessions all-reduce their gradients, so the figures agree with one "
                      "process's to fp32 rounding, not bitwise"
                : per_rank % chunk == 0
                    ? "bitwise the figures of one process"
                    : cat("not a multiple of ", chunk,
                          ", so the figures agree with one process's to rounding, not bitwise")
                          .c_str());
  }
  std::printf(
      "budget per run: %llu steps x %llu rows, AdamW lr %g (warm-up %llu, cosine to %g), "
      "clip %g, weight decay %g, seed %llu, %u thread%s, experts in %s\n\n",
      static_cast<unsigned long long>(st.steps), static_cast<unsigned long long>(st.batch), st.lr,
      static_cast<unsigned long long>(st.warmup), st.min_lr, st.clip_norm, st.weight_decay,
      static_cast<unsigned long long>(st.seed), st.threads, st.threads == 1 ? "" : "s",
      st.precision == "fp8" && st.fp8_scales == "ue8m0" ? "fp8 (ue8m0 scales)"
                                                        : st.precision.c_str());
  // Settings that run but are rarely meant: said in the report, which keeps stderr for errors.
  if (st.lr == 0)
    std::printf(
        "note: --lr 0 leaves every weight unchanged (a loss-free bias still moves with the "
        "counts)\n\n");
  else if (st.warmup >= st.steps)
    std::printf(
        "note: --warmup %llu is not shorter than --steps %llu: the learning rate rises "
        "for the whole run (to --lr %g at most at its last step) and never decays\n\n",
        static_cast<unsigned long long>(st.warmup), static_cast<unsigned long long>(st.steps),
        st.lr);
  std::fflush(stdout);

  std::vector<RunResult> runs;
  std::vector<std::vector<RouterStats>> probes;
  std::vector<std::vector<GemmAccuracy>> accuracies;
  const bool measure_accuracy = st.precision != "fp32";
  SessionConfig low;
  low.threads = st.threads;
  low.seed = st.seed;
  low.knobs = {{"precision", st.precision}, {"fp8_scales", st.fp8_scales}};
  for (size_t i = 0; i < run_labels.size(); ++i) {
    ModelPtr m = given_model ? nullptr : charlm_model(shape, strategies[i], st.seed);
    const moert_model* model = given_model ? file_model.get() : m.get();
    const std::string& label = run_labels[i];
    runs.push_back(
        train_run(model, label, split.train, split.validation, shape.context, st, csv.get()));
    // The diagnostics rebuild the model cut before each block in a session of their own, which
    // needs every expert's weights: one process's.
    if (!given_model && probe_rows > 0 && job.alone()) {
      const auto pos = eval_positions(split.validation.size(), shape.context, probe_rows);
      probes.push_back(probe_routers(runs.back().session.get(), shape, strategies[i], st.seed,
                                     split.validation, pos, st.threads));
      if (measure_accuracy)
        accuracies.push_back(probe_gemm_accuracy(runs.back().session.get(), shape, strategies[i],
                                                 st.seed, split.validation, pos, st.threads, low));
    }
    if (!save_dir.empty()) {
      const std::string path = (std::filesystem::path(save_dir) / (label + ".moert")).string();
      // Named whatever failed: the library's out-of-memory message names nothing.
      moert_status* saved = moert_session_save(runs.back().session.get(), path.c_str());
      if (saved && std::string(moert_status_message(saved)).find(path) == std::string::npos)
        check(saved, cat("--save: '", path, "'"));
      check(saved, "--save");
    }
  }
  if (csv) csv->close();

  const std::string tail_header = cat("MaxVio_batch(last ", st.tail_fraction * 100, "%)");
  std::printf("\n%-24s %9s %8s %14s %22s %13s %11s\n", "strategy", "val loss", "val ppl",
              "MaxVio_global", tail_header.c_str(), "dead experts", "train time");
  for (const RunResult& r : runs) {
    const std::string dead = cat(r.validation.dead_experts, "/", r.validation.experts);
    std::printf("%-24s %9.4f %8s %14.3f %22.3f %13s %9.1f s\n", r.label.c_str(), r.validation.loss,
                perplexity_text(r.validation.perplexity).c_str(), r.validation.max_vio_global,
                r.tail_max_vio, dead.c_str(), r.train_seconds);
  }
  std::printf(
      "(validation: %llu characters; MaxVio = (max load - mean load) / mean load, mean "
      "over MoE blocks)\n",
      static_cast<unsigned long long>(runs.front().validation.tokens));
  if (!given_model)
    std::printf(
        "(MaxVio_batch of a perfectly balanced but random router on %llu-row batches: "
        "%.3f, the floor a finite batch imposes)\n",
        static_cast<unsigned long long>(st.batch),
        random_routing_floor(shape.experts, shape.top_k, st.batch, st.seed));

  if (!probes.empty()) {
    std::printf("\nrouter diagnostics over %llu validation rows, per MoE block:\n",
                static_cast<unsigned long long>(
                    std::min<uint64_t>(probe_rows, split.validation.size() - shape.context)));
    std::printf("%-24s %5s %13s %15s %11s %14s %14s\n", "strategy", "block", "score spread",
                "median K-gap", "bias range", "MaxVio (bias)", "MaxVio (no bias)");
    for (size_t i = 0; i < probes.size(); ++i)
      for (size_t b = 0; b < probes[i].size(); ++b) {
        const RouterStats& p = probes[i][b];
        std::printf("%-24s %5zu %13.4f %15.5f %11.4f %14.3f %14.3f\n", runs[i].label.c_str(), b,
                    p.score_spread, p.median_boundary_gap, p.bias_range, p.max_vio_biased,
                    p.max_vio_unbiased);
      }
    std::printf(
        "(score spread: max - min over experts of the mean sigmoid score; median K-gap: the\n"
        " typical distance between a token's K-th and (K+1)-th biased score; bias range: max - "
        "min\n"
        " of the learned bias; MaxVio of the block's selection with the bias as learned and with\n"
        " it zeroed, on the same inputs)\n");
  }
  if (!accuracies.empty()) {
    const char* p = st.precision.c_str();
    std::printf(
        "\nGEMM accuracy on the trained models: ||%s - fp32|| / ||fp32|| per MoE block, the\n"
        "block's trained weights and bias on the router diagnostics' validation rows%s:\n",
        p, st.fp8_scales == "ue8m0" ? " (ue8m0 scales)" : "");
    std::printf("%-24s %5s %9s %9s", "strategy", "block", "Fprop", "Dgrad");
    std::vector<int> width;
    for (const auto& [name, v] : accuracies.front().front().wgrad) {
      const std::string h = "Wgrad " + name;
      width.push_back(std::max<int>(9, static_cast<int>(h.size())));
      std::printf(" %*s", width.back(), h.c_str());
    }
    std::printf("\n");
    for (size_t i = 0; i < accuracies.size(); ++i)
      for (size_t b = 0; b < accuracies[i].size(); ++b) {
        const GemmAccuracy& a = accuracies[i][b];
        std::printf("%-24s %5zu %9.2e %9.2e", runs[i].label.c_str(), b, a.fprop, a.dgrad);
        for (size_t k = 0; k < a.wgrad.size() && k < width.size(); ++k)
          std::printf(" %*.2e", width[k], a.wgrad[k].second);
        std::printf("\n");
      }
    std::printf(
        "(one-layer model holding the block's weights, run in fp32 and in %s on the same inputs:\n"
        " the block's fp32 input activations and, as output gradient, the real one: the gradient\n"
        " of the mean validation cross-entropy with respect to the block's output, through the\n"
        " trained later blocks and head in fp32. Fprop: the block's output, Dgrad: its input\n"
        " gradient, both without the residual; Wgrad: each expert weight gradient)\n",
        p);
  }
  if (csv) std::printf("\nper-step metrics: %s\n", printable(args.str("csv", "")).c_str());
  if (!save_dir.empty()) {
    std::printf("checkpoints:");
    for (size_t i = 0; i < run_labels.size(); ++i)
      std::printf("%s %s", i ? "," : "",
                  printable((std::filesystem::path(save_dir) / (run_labels[i] + ".moert")).string())
                      .c_str());
    std::printf("\n");
  }
  return 0;
}

}  // namespace moert_cli
