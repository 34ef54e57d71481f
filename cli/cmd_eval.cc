// `moert eval`: a trained character-level model on text: loss, perplexity and routing balance.
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/corpus.h"
#include "cli/error.h"
#include "cli/json_text.h"
#include "cli/library.h"
#include "cli/lm_eval.h"
#include "cli/model_codec.h"
#include "cli/model_info.h"
#include "cli/progress.h"

namespace moert_cli {

const CommandSpec kEvalSpec = {
    "eval",
    "MODEL [--corpus PATH] [--split validation|train|all] [options]",
    "evaluate a character-level model: loss, perplexity, MaxVio_global, dead experts",
    "MODEL is a model or checkpoint file (binary or JSON) that reads a window of character ids\n"
    "and predicts the next one over the 98-character vocabulary of 'moert train'. The corpus is\n"
    "split exactly as 'moert train' splits it. Loss is the mean cross-entropy in nats per\n"
    "character, computed by this command from the model's logits; MaxVio_global and the\n"
    "per-expert loads come from the library's evaluation counts over the same passes.",
    1,
    1,
    {
        {"corpus", "PATH", "text file or directory of fortune files", "/usr/share/games/fortunes"},
        {"split", "NAME", "validation, train or all", "validation"},
        {"val-every", "N", "every N-th record is validation, as in train", "10"},
        {"rows", "N", "positions evaluated, evenly spaced; 0 = all", "0"},
        {"batch", "N", "rows per forward pass", "2048"},
        {"threads", "N", "CPU threads", "2"},
        {"json", "", "print the figures as one JSON object", ""},
    },
};

int run_eval(const Args& args) {
  const std::string path = args.positional()[0];
  const std::string which = args.str("split", "validation");
  if (which != "validation" && which != "train" && which != "all")
    usage_fail("--split takes validation, train or all, got '", which, "'");
  const auto every = static_cast<uint32_t>(args.integer("val-every", 10, 2, 1000000));
  const auto max_rows = static_cast<uint64_t>(args.integer("rows", 0, 0, INT64_MAX));
  const auto batch = static_cast<uint64_t>(args.integer("batch", 2048, 1, 1 << 20));
  SessionConfig config;
  config.threads = static_cast<uint32_t>(args.integer("threads", 2, 1, 1024));
  // Under mpirun, N copies would each evaluate the whole split and print it N times.
  if (const Launch l = mpirun_launch(); l.size > 1)
    usage_fail("started by mpirun with ", l.size,
               " processes: eval runs in one process (it has no --expert-parallel); run it alone "
               "(from a script that one rank of a job runs: unset OMPI_COMM_WORLD_SIZE for it)");

  ModelPtr model = load_model_file(path);
  int32_t kind = 0;
  uint32_t context = 0, vocab = 0;
  check(moert_model_io(model.get(), &kind, &context, &vocab), "model");
  if (kind != MOERT_INPUT_TOKENS) fail(path, ": the model takes hidden states, not characters");
  if (vocab != static_cast<uint32_t>(kVocabSize))
    fail(path, ": the model predicts ", vocab, " classes; the character vocabulary has ",
         kVocabSize);

  const std::string corpus_path = args.str("corpus", "/usr/share/games/fortunes");
  const Corpus corpus = read_corpus(corpus_path);
  std::vector<int32_t> stream;
  // Only --split validation needs a validation split: any text can be evaluated whole.
  Split parts = split_corpus(corpus, every, which == "validation");
  if (which == "all") {
    stream = std::move(parts.train);
    stream.insert(stream.end(), parts.validation.begin(), parts.validation.end());
  } else {
    stream = which == "train" ? std::move(parts.train) : std::move(parts.validation);
  }

  SessionPtr session = create_session(model.get(), config);
  const std::vector<uint64_t> positions = eval_positions(stream.size(), context, max_rows);
  Progress progress("eval", positions.size(), 0, "row");
  const EvalResult r = evaluate(session.get(), model.get(), stream, context, positions, batch,
                                false, config.threads, &progress);
  progress.finish(cat("loss ", r.loss));
  const std::vector<uint32_t> moe = moe_layer_indices(model.get());

  if (args.has("json")) {
    std::string s = cat(
        "{\n  \"model\": ", json_string(path), ",\n  \"corpus\": ", json_string(corpus_path),
        ",\n  \"split\": ", json_string(which), ",\n  \"characters\": ", r.tokens,
        ",\n  \"loss\": ", json_number(r.loss), ",\n  \"perplexity\": ", json_number(r.perplexity),
        ",\n  \"max_vio_global\": ", json_number(r.max_vio_global),
        ",\n  \"dead_experts\": ", r.dead_experts, ",\n  \"experts\": ", r.experts,
        ",\n  \"moe_layers\": [");
    for (size_t i = 0; i < moe.size(); ++i) {
      s += cat(i ? "," : "", "\n    {\"layer\": ", moe[i],
               ", \"max_vio\": ", json_number(r.layer_max_vio[i]), ", \"counts\": [");
      for (size_t e = 0; e < r.counts[i].size(); ++e) s += cat(e ? ", " : "", r.counts[i][e]);
      s += "]}";
    }
    s += "\n  ]\n}\n";
    std::fputs(s.c_str(), stdout);
    return 0;
  }
  const std::string part = which == "all" ? "whole" : which;
  std::printf("model %s on the %s text of %s (%llu characters)\n", printable(path).c_str(),
              part.c_str(), printable(corpus_path).c_str(),
              static_cast<unsigned long long>(r.tokens));
  std::printf("loss %.4f nats/char, perplexity %s\n", r.loss,
              perplexity_text(r.perplexity).c_str());
  if (moe.empty()) return 0;
  std::printf("MaxVio_global %.3f (mean over %zu MoE layers); dead experts %llu/%llu\n",
              r.max_vio_global, moe.size(), static_cast<unsigned long long>(r.dead_experts),
              static_cast<unsigned long long>(r.experts));
  for (size_t i = 0; i < moe.size(); ++i) {
    const char* name = nullptr;
    check(moert_model_layer_name(model.get(), moe[i], &name), "model");
    std::printf("  layer %u '%s': MaxVio %.3f, tokens per expert:", moe[i], printable(name).c_str(),
                r.layer_max_vio[i]);
    for (int64_t c : r.counts[i]) std::printf(" %lld", static_cast<long long>(c));
    std::printf("\n");
  }
  return 0;
}

}  // namespace moert_cli
