// `moert inspect`: what a model is and what a token costs in it.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/error.h"
#include "cli/json_text.h"
#include "cli/model_codec.h"
#include "cli/model_info.h"

namespace moert_cli {

const CommandSpec kInspectSpec = {
    "inspect",
    "MODEL [--json] [--verify]",
    "print a model's layers, routing, parameter counts, weights' precision and bytes, and forward "
    "FLOPs per token",
    std::string(
        "MODEL is a model or checkpoint file, binary (.moert) or JSON. A checkpoint's step is\n"
        "shown, and a loss-free bias's update rate or freeze as saved where its run changed it.\n"
        "Activated parameters are those one token uses: its context's embedding rows, the\n"
        "top-K routed experts of each MoE layer, and every other parameter.\n"
        "Each weight is listed with the precision its file stored it in and the one it is\n"
        "held in after loading (FP8 E4M3 in 128x128 blocks stays FP8: 1 byte per value plus\n"
        "one fp32 scale per block; everything else becomes fp32), and its bytes in memory.\n"
        "The description is read and checked first. The weights are then loaded and checked\n"
        "(every value finite, the data file whole, a checkpoint's digest) when the model would\n"
        "hold at most 1 GiB, the library's default load limit, or with --verify; a larger\n"
        "model is shown from its description alone, in a moment whatever its size, and the\n"
        "output says so.\n\n") +
        kFlopsFormula,
    1,
    1,
    {{"json", "", "print the same figures as one JSON object", ""},
     {"verify", "", "load and check the weights whatever the model's size", ""}},
};

namespace {

// The library's default max_memory: what a service would load from a file it did not write.
constexpr uint64_t kInspectLoadBytes = uint64_t{1} << 30;

std::string flops_text(double f) {
  char buf[32];
  if (f >= 1e9)
    std::snprintf(buf, sizeof buf, "%.3g GFLOP", f / 1e9);
  else if (f >= 1e6)
    std::snprintf(buf, sizeof buf, "%.3g MFLOP", f / 1e6);
  else if (f >= 1e3)
    std::snprintf(buf, sizeof buf, "%.3g kFLOP", f / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.0f FLOP", f);
  return buf;
}

std::string routing_text(const LayerInfo& l, bool checkpoint) {
  const MoEInfo& m = l.moe;
  std::string s =
      cat("  ", printable(l.name), ": ", m.num_experts, " routed experts (hidden ", m.expert_hidden,
          "), top-", m.top_k, ", ", score_name(m.score_function), " scores");
  if (m.num_groups > 1) s += cat(", ", m.num_groups, " groups keep ", m.topk_groups);
  s += m.normalize ? ", weights renormalised" : ", weights not renormalised";
  s += cat(", scaling ", m.scaling);
  if (m.num_shared > 0)
    s += cat("; ", m.num_shared, " shared expert", m.num_shared > 1 ? "s" : "", " (hidden ",
             m.shared_hidden, ")");
  s += m.residual ? "; residual" : "; no residual";
  s += cat("\n    balancing: ", balancing_name(m.policy));
  if (m.policy == MOERT_BALANCING_LOSS_FREE_BIAS)
    s += m.bias_frozen ? cat(" (frozen: not updated; gamma ", m.gamma, " unused)")
                       : cat(" (gamma ", m.gamma, m.bias_centering ? ", centred" : "", ")");
  // What a resumed run goes on with, where the run moved it from the description's.
  if (checkpoint && m.policy == MOERT_BALANCING_LOSS_FREE_BIAS) {
    std::string saved;
    if (m.saved_bias_frozen != m.bias_frozen) saved = m.saved_bias_frozen ? "frozen" : "not frozen";
    if (m.saved_gamma != m.gamma) saved += cat(saved.empty() ? "" : ", ", "gamma ", m.saved_gamma);
    if (!saved.empty()) s += "; saved in the checkpoint: " + saved;
  }
  if (m.policy == MOERT_BALANCING_AUX_LOSS || m.policy == MOERT_BALANCING_SEQUENCE_AUX_LOSS)
    s += cat(" (alpha ", m.aux_alpha, ")");
  if (m.policy == MOERT_BALANCING_EXPERT_CHOICE)
    s += cat(" (capacity factor ", m.capacity_factor, ")");
  return s + "\n";
}

void print_text(const std::string& path, const ModelInfo& info) {
  std::printf("model '%s' from %s\n", printable(info.name).c_str(), printable(path).c_str());
  if (info.checkpoint && info.weights_loaded)
    std::printf(
        "checkpoint: training state at step %llu, verified (a training session resumes "
        "it)\n",
        static_cast<unsigned long long>(info.checkpoint_step));
  else if (info.checkpoint)
    std::printf(
        "checkpoint: training state at step %llu, not verified (its digest covers the "
        "weights)\n",
        static_cast<unsigned long long>(info.checkpoint_step));
  if (!info.weights_loaded) {
    // A sum past 2^64 reads as the largest value (moert_model_resident_bytes).
    char held[64] = "2^64 bytes or more";
    if (info.resident_bytes != UINT64_MAX)
      std::snprintf(held, sizeof held, "%.2f GiB",
                    static_cast<double>(info.resident_bytes) / (1 << 30));
    std::printf(
        "weights: not loaded: the description alone was read and checked (the model would hold "
        "%s); --verify loads and checks them\n",
        held);
  }
  if (info.input_kind == MOERT_INPUT_TOKENS)
    std::printf("input: %u token ids per row; output: %u values per row\n\n", info.input_width,
                info.output_width);
  else
    std::printf("input: hidden states of width %u; output: %u values per row\n\n", info.input_width,
                info.output_width);
  // Columns as wide as the longest name, so that imported names (layers.3.mlp) keep the table
  // aligned.
  int layer_w = 12, tensor_w = 24;
  for (const LayerInfo& l : info.layers) {
    layer_w = std::max(layer_w, static_cast<int>(printable(l.name).size()));
    for (const TensorInfo& t : l.tensors)
      tensor_w = std::max(tensor_w, static_cast<int>(printable(cat(l.name, ".", t.field)).size()));
  }
  std::printf("%3s  %-*s %-10s %13s %12s %12s %14s  %s\n", "#", layer_w, "name", "kind",
              "in -> out", "parameters", "activated", "FLOPs/token", "shape");
  for (const LayerInfo& l : info.layers) {
    const std::string io = cat(l.in_width, " -> ", l.out_width);
    std::printf("%3u  %-*s %-10s %13s %12llu %12llu %14.0f  %s\n", l.index, layer_w,
                printable(l.name).c_str(), layer_kind_name(l.kind), io.c_str(),
                static_cast<unsigned long long>(l.parameters),
                static_cast<unsigned long long>(l.activated), l.flops, l.detail.c_str());
  }
  bool any_moe = false;
  for (const LayerInfo& l : info.layers) any_moe = any_moe || l.is_moe;
  if (any_moe) {
    std::printf("\nrouting:\n");
    for (const LayerInfo& l : info.layers)
      if (l.is_moe) std::fputs(routing_text(l, info.checkpoint).c_str(), stdout);
  }
  std::printf("\nweights (precision as stored in the file and as held in memory):\n");
  std::printf("  %-*s %-10s %-18s %14s %14s\n", tensor_w, "tensor", "stored", "held", "values",
              "bytes");
  for (const LayerInfo& l : info.layers)
    for (const TensorInfo& t : l.tensors) {
      const std::string name = printable(cat(l.name, ".", t.field));
      std::printf("  %-*s %-10s %-18s %14llu %14llu\n", tensor_w, name.c_str(),
                  t.stored_text().c_str(), t.held_text().c_str(),
                  static_cast<unsigned long long>(t.numel),
                  static_cast<unsigned long long>(t.bytes));
    }
  std::printf("resident weight bytes: %llu (%.2f MiB)%s\n",
              static_cast<unsigned long long>(info.resident_bytes),
              static_cast<double>(info.resident_bytes) / (1 << 20),
              info.weights_loaded ? "" : ", as a full load would hold them");
  const double share = info.total_parameters
                           ? 100.0 * static_cast<double>(info.activated_parameters) /
                                 static_cast<double>(info.total_parameters)
                           : 0.0;
  std::printf("\nparameters: %llu total, %llu activated per token (%.1f%%)\n",
              static_cast<unsigned long long>(info.total_parameters),
              static_cast<unsigned long long>(info.activated_parameters), share);
  std::printf("forward FLOPs per token: %.0f (%s) activated, %.0f (%s) dense-equivalent",
              info.flops, flops_text(info.flops).c_str(), info.dense_flops,
              flops_text(info.dense_flops).c_str());
  // A model without routed experts (or with every expert chosen) saves nothing to report.
  if (info.flops > 0.0 && info.dense_flops > info.flops)
    std::printf(": %.2fx less compute per token", info.dense_flops / info.flops);
  std::printf("\n");
}

void print_json(const std::string& path, const ModelInfo& info) {
  std::string s =
      "{\n  \"file\": " + json_string(path) + ",\n  \"name\": " + json_string(info.name) +
      ",\n  \"input\": " +
      json_string(info.input_kind == MOERT_INPUT_TOKENS ? "tokens" : "hidden") +
      cat(",\n  \"input_width\": ", info.input_width, ",\n  \"output_width\": ", info.output_width,
          ",\n  \"total_parameters\": ", info.total_parameters,
          ",\n  \"activated_parameters\": ", info.activated_parameters,
          ",\n  \"flops_per_token\": ", json_number(info.flops),
          ",\n  \"dense_equivalent_flops_per_token\": ", json_number(info.dense_flops),
          ",\n  \"resident_bytes\": ", info.resident_bytes,
          ",\n  \"weights_loaded\": ", info.weights_loaded ? "true" : "false",
          ",\n  \"checkpoint\": ",
          info.checkpoint ? cat("{\"step\": ", info.checkpoint_step,
                                ", \"verified\": ", info.weights_loaded ? "true" : "false", "}")
                          : std::string("null"),
          ",\n  \"layers\": [");
  for (size_t i = 0; i < info.layers.size(); ++i) {
    const LayerInfo& l = info.layers[i];
    s += cat(i ? "," : "", "\n    {\"index\": ", l.index, ", \"name\": ", json_string(l.name),
             ", \"kind\": ", json_string(layer_kind_name(l.kind)), ", \"in\": ", l.in_width,
             ", \"out\": ", l.out_width, ", \"parameters\": ", l.parameters,
             ", \"activated\": ", l.activated, ", \"flops_per_token\": ", json_number(l.flops),
             ", \"dense_equivalent_flops_per_token\": ", json_number(l.dense_flops),
             ", \"tensors\": [");
    for (size_t k = 0; k < l.tensors.size(); ++k) {
      const TensorInfo& t = l.tensors[k];
      s += cat(k ? ", " : "", "{\"name\": ", json_string(t.field),
               ", \"stored\": ", json_string(t.stored_text()),
               ", \"held\": ", json_string(t.held_text()), ", \"values\": ", t.numel,
               ", \"bytes\": ", t.bytes, "}");
    }
    s += "]";
    if (l.is_moe) {
      const MoEInfo& m = l.moe;
      s += cat(", \"moe\": {\"num_experts\": ", m.num_experts, ", \"top_k\": ", m.top_k,
               ", \"expert_hidden\": ", m.expert_hidden,
               ", \"score_function\": ", json_string(score_name(m.score_function)),
               ", \"num_groups\": ", m.num_groups, ", \"topk_groups\": ", m.topk_groups,
               ", \"normalize_weights\": ", m.normalize ? "true" : "false",
               ", \"routed_scaling_factor\": ", json_number(m.scaling),
               ", \"num_shared_experts\": ", m.num_shared, ", \"shared_hidden\": ", m.shared_hidden,
               ", \"residual\": ", m.residual ? "true" : "false",
               ", \"balancing\": ", json_string(balancing_name(m.policy)),
               ", \"bias_update_rate\": ", json_number(m.gamma),
               ", \"bias_centering\": ", m.bias_centering ? "true" : "false",
               ", \"bias_frozen\": ", m.bias_frozen ? "true" : "false",
               ", \"aux_alpha\": ", json_number(m.aux_alpha),
               ", \"capacity_factor\": ", json_number(m.capacity_factor));
      if (info.checkpoint)
        s += cat(", \"saved_bias_update_rate\": ", json_number(m.saved_gamma),
                 ", \"saved_bias_frozen\": ", m.saved_bias_frozen ? "true" : "false");
      s += "}";
    }
    s += "}";
  }
  s += "\n  ]\n}\n";
  std::fputs(s.c_str(), stdout);
}

}  // namespace

int run_inspect(const Args& args) {
  const std::string path = args.positional()[0];
  // The description first: a few hundred bytes can declare terabytes of weights (a layout being
  // planned, or a flipped bit), which only --verify should build.
  const std::vector<uint8_t> bytes = read_model_file(path);
  const std::string dir = directory_of(path);
  ModelPtr model = load_model_bytes(bytes, dir, path, nullptr, LoadWeights::DescriptionOnly);
  uint64_t held = 0;
  check(moert_model_resident_bytes(model.get(), &held), path);
  const bool load = args.has("verify") || held <= kInspectLoadBytes;
  if (load) model = load_model_bytes(bytes, dir, path);
  ModelInfo info = describe_model(model.get());
  info.weights_loaded = load;
  if (args.has("json"))
    print_json(path, info);
  else
    print_text(path, info);
  return 0;
}

}  // namespace moert_cli
