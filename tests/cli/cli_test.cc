// Runs the `moert` command as a user would and checks what it prints, writes and returns. Expected
// numbers come from the C ABI or from formulas written out here, never from the CLI itself.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <moert/moert.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;

struct Result {
  int code = -1;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

fs::path workdir(const std::string& test) {
  fs::path d = fs::path(MOERT_CLI_WORKDIR) / test;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Runs `moert ARGS` with stdout and stderr captured in files of `dir`.
Result run(const std::string& args, const fs::path& dir) {
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string cmd = std::string("'") + MOERT_CLI + "' " + args + " >'" + out.string() +
                          "' 2>'" + err.string() + "' </dev/null";
  const int status = std::system(cmd.c_str());
  Result r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// The number after `"key": ` in a JSON text (the CLI writes one value per key at most once per
// object we look at).
double json_value(const std::string& text, const std::string& key, size_t from = 0) {
  const std::string needle = "\"" + key + "\": ";
  const size_t p = text.find(needle, from);
  if (p == std::string::npos) ADD_FAILURE() << "no key " << key << " in " << text;
  return p == std::string::npos ? NAN : std::stod(text.substr(p + needle.size()));
}

// Every error is exactly one line on stderr, names the command, and nothing goes to stdout.
void expect_one_line_error(const Result& r, int code, const std::string& command,
                           const std::string& mention) {
  EXPECT_EQ(r.code, code) << r.err;
  EXPECT_EQ(count_lines(r.err), 1) << r.err;
  EXPECT_EQ(r.err.rfind("moert " + command + ": error: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(mention), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

// An error of the program itself, before any command: "moert: error: ...", exit code 2.
void expect_one_line_error_top(const Result& r, const std::string& mention) {
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_EQ(count_lines(r.err), 1) << r.err;
  EXPECT_EQ(r.err.rfind("moert: error: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(mention), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

TEST(Cli, HelpEverywhere) {
  const fs::path dir = workdir("help");
  Result top = run("--help", dir);
  EXPECT_EQ(top.code, 0);
  for (const char* cmd : {"train", "eval", "inspect", "convert", "bench", "import", "export"}) {
    EXPECT_NE(top.out.find(std::string("  ") + cmd + " "), std::string::npos) << cmd;
    const Result r = run(std::string(cmd) + " --help", dir);
    EXPECT_EQ(r.code, 0) << cmd << ": " << r.err;
    EXPECT_EQ(r.out.rfind(std::string("usage: moert ") + cmd, 0), 0u) << r.out;
    EXPECT_NE(r.out.find("--help"), std::string::npos) << r.out;
    EXPECT_TRUE(r.err.empty()) << r.err;
    // 'moert help COMMAND' says the same.
    EXPECT_EQ(run(std::string("help ") + cmd, dir).out, r.out) << cmd;
    // And so does -h, as at the top level.
    EXPECT_EQ(run(std::string(cmd) + " -h", dir).out, r.out) << cmd;
  }
  expect_one_line_error_top(run("help nope", dir), "unknown command 'nope'");
  for (const char* about_help : {"help help", "help -h", "help --help"})
    EXPECT_EQ(run(about_help, dir).out, top.out) << about_help;
  expect_one_line_error_top(run("help train extra", dir), "(got 'extra')");
  expect_one_line_error_top(run("--version now", dir), "'--version' takes no arguments");
  // --help wins over missing or extra arguments.
  EXPECT_EQ(run("convert --help", dir).code, 0);
  EXPECT_EQ(run("inspect a b c --help", dir).code, 0);
  const Result v = run("--version", dir);
  EXPECT_EQ(v.code, 0);
  EXPECT_NE(v.out.find(moert_version_string()), std::string::npos) << v.out;
  // The FLOP formula is stated where the figures are printed.
  EXPECT_NE(run("inspect --help", dir).out.find("2*d*E (router) + K*6*d*h"), std::string::npos);
}

TEST(Cli, InspectMatchesLibraryAndFormula) {
  const fs::path dir = workdir("inspect");
  moert_model* m = nullptr;
  ASSERT_EQ(moert_model_load_file(MOERT_TINY_MODEL, &m), nullptr);
  uint64_t total = 0, activated = 0;
  ASSERT_EQ(moert_model_num_parameters(m, &total, &activated), nullptr);
  uint32_t layers = 0;
  ASSERT_EQ(moert_model_num_layers(m, &layers), nullptr);

  // Forward FLOPs per token by the formula, from the model's settings as the C ABI reports them.
  double flops = 0.0, dense = 0.0;
  for (uint32_t i = 0; i < layers; ++i) {
    int32_t kind = 0;
    uint32_t in = 0, out = 0;
    ASSERT_EQ(moert_model_layer_kind(m, i, &kind), nullptr);
    ASSERT_EQ(moert_model_layer_dims(m, i, &in, &out), nullptr);
    if (kind == MOERT_LAYER_OUTPUT_HEAD) {
      flops += 2.0 * in * out;
      dense += 2.0 * in * out;
    }
    if (kind != MOERT_LAYER_MOE) continue;
    int64_t E = 0, K = 0, h = 0, S = 0, hs = 0;
    ASSERT_EQ(moert_model_moe_int(m, i, MOERT_MOE_NUM_EXPERTS, &E), nullptr);
    ASSERT_EQ(moert_model_moe_int(m, i, MOERT_MOE_TOP_K, &K), nullptr);
    ASSERT_EQ(moert_model_moe_int(m, i, MOERT_MOE_EXPERT_HIDDEN, &h), nullptr);
    ASSERT_EQ(moert_model_moe_int(m, i, MOERT_MOE_NUM_SHARED_EXPERTS, &S), nullptr);
    ASSERT_EQ(moert_model_moe_int(m, i, MOERT_MOE_SHARED_HIDDEN, &hs), nullptr);
    const double d = in, fixed = 2.0 * d * E + S * 6.0 * d * hs;
    flops += fixed + K * 6.0 * d * h;
    dense += fixed + E * 6.0 * d * h;
  }
  moert_model_free(m);
  // tiny_moe by hand: moe0 (d 64, E 8, K 2, h 32, 1 shared of 32) 1024 + 2*12288 + 12288; moe1
  // (no shared) 1024 + 2*12288; head 2*64*64.
  EXPECT_EQ(flops, 37888.0 + 25600.0 + 8192.0);

  const Result j = run(std::string("inspect --json ") + MOERT_TINY_MODEL, dir);
  ASSERT_EQ(j.code, 0) << j.err;
  EXPECT_EQ(json_value(j.out, "total_parameters"), static_cast<double>(total));
  EXPECT_EQ(json_value(j.out, "activated_parameters"), static_cast<double>(activated));
  EXPECT_EQ(json_value(j.out, "flops_per_token"), flops);
  EXPECT_EQ(json_value(j.out, "dense_equivalent_flops_per_token"), dense);
  // Per-layer counts add up to the library's totals.
  double sum_params = 0.0, sum_activated = 0.0;
  size_t at = j.out.find("\"layers\"");
  for (uint32_t i = 0; i < layers; ++i) {
    at = j.out.find("{\"index\": ", at + 1);
    ASSERT_NE(at, std::string::npos);
    sum_params += json_value(j.out, "parameters", at);
    sum_activated += json_value(j.out, "activated", at);
  }
  EXPECT_EQ(sum_params, static_cast<double>(total));
  EXPECT_EQ(sum_activated, static_cast<double>(activated));
  EXPECT_NE(j.out.find("\"balancing\": \"loss-free bias\""), std::string::npos);
  EXPECT_NE(j.out.find("\"balancing\": \"auxiliary loss\""), std::string::npos);

  const Result t = run(std::string("inspect ") + MOERT_TINY_MODEL, dir);
  ASSERT_EQ(t.code, 0) << t.err;
  std::ostringstream want;
  want << "parameters: " << total << " total, " << activated << " activated per token";
  EXPECT_NE(t.out.find(want.str()), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("forward FLOPs per token: 71680"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("219136"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("4 groups keep 2"), std::string::npos) << t.out;
  // JSON models are read too, with the same result.
  const Result tj = run(std::string("inspect ") + MOERT_TINY_JSON, dir);
  ASSERT_EQ(tj.code, 0) << tj.err;
  EXPECT_EQ(tj.out.substr(tj.out.find('\n')), t.out.substr(t.out.find('\n')));
}

// A few hundred bytes can declare a model far larger than memory (a layout being planned, or a
// flipped bit: num_experts 8 -> 524288 makes tiny_moe 24 GiB): inspect shows it from its
// description at once and says so; --verify loads it, and a small model is loaded and checked
// as before.
TEST(Cli, InspectShowsAModelTooLargeToLoadFromItsDescription) {
  const fs::path dir = workdir("inspect-described");
  std::string json = slurp(MOERT_TINY_JSON);
  for (size_t at; (at = json.find("\"num_experts\": 8,")) != std::string::npos;)
    json.replace(at, 17, "\"num_experts\": 524288,");
  std::ofstream(dir / "big.json") << json;
  // What the library reports for the same description, loaded description-only.
  const std::string binary = (dir / "big.moert").string();
  ASSERT_EQ(run("convert " + (dir / "big.json").string() + " " + binary + " --no-check", dir).code,
            0);
  moert_load_options* options = nullptr;
  ASSERT_EQ(moert_load_options_create(&options), nullptr);
  ASSERT_EQ(moert_load_options_set_description_only(options, 1), nullptr);
  moert_model* m = nullptr;
  ASSERT_EQ(moert_model_load_file_with_options(binary.c_str(), options, &m), nullptr);
  moert_load_options_free(options);
  uint64_t total = 0, resident = 0;
  ASSERT_EQ(moert_model_num_parameters(m, &total, nullptr), nullptr);
  ASSERT_EQ(moert_model_resident_bytes(m, &resident), nullptr);
  moert_model_free(m);
  EXPECT_GT(resident, uint64_t{24} << 30);

  const auto start = std::chrono::steady_clock::now();
  const Result t = run("inspect " + (dir / "big.json").string(), dir);
  const Result j = run("inspect --json " + binary, dir);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 30.0);
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("weights: not loaded: the description alone was read and checked (the "
                       "model would hold 24.25 GiB); --verify loads and checks them"),
            std::string::npos)
      << t.out;
  EXPECT_NE(t.out.find("524288 routed experts"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find(", as a full load would hold them"), std::string::npos) << t.out;
  ASSERT_EQ(j.code, 0) << j.err;
  EXPECT_NE(j.out.find("\"weights_loaded\": false"), std::string::npos) << j.out;
  EXPECT_EQ(json_value(j.out, "total_parameters"), static_cast<double>(total));
  EXPECT_EQ(json_value(j.out, "resident_bytes"), static_cast<double>(resident));

  // --verify loads the weights: here it stops at once, at the data file the description names
  // and the directory lacks, before anything is allocated.
  const std::string gone = "\"w2\": { \"init\": { \"kind\": \"Normal\", \"std\": 0.18 } }\n      }";
  ASSERT_NE(json.rfind(gone), std::string::npos);
  json.replace(json.rfind(gone), gone.size(),
               "\"w2\": { \"external\": { \"offset\": 0, \"size\": 4294967296 } }\n      }");
  json.replace(json.find("\"seed\": 42,"), 11, "\"seed\": 42, \"external_data\": \"gone.bin\",");
  std::ofstream(dir / "gone.json") << json;
  const Result described = run("inspect " + (dir / "gone.json").string(), dir);
  EXPECT_EQ(described.code, 0) << described.err;
  expect_one_line_error(run("inspect --verify " + (dir / "gone.json").string(), dir), 1, "inspect",
                        "gone.bin");

  // Within the default load limit the weights are loaded and checked, as --verify does.
  const Result tiny = run(std::string("inspect --json ") + MOERT_TINY_MODEL, dir);
  ASSERT_EQ(tiny.code, 0) << tiny.err;
  EXPECT_NE(tiny.out.find("\"weights_loaded\": true"), std::string::npos) << tiny.out;
  const Result verified = run(std::string("inspect --verify ") + MOERT_TINY_MODEL, dir);
  ASSERT_EQ(verified.code, 0) << verified.err;
  EXPECT_EQ(verified.out, run(std::string("inspect ") + MOERT_TINY_MODEL, dir).out);
  EXPECT_EQ(verified.out.find("weights: not loaded"), std::string::npos) << verified.out;
}

// Names come from files: a layer named with an escape sequence and a newline is printed with
// them as \xNN, so that it neither breaks the table's lines nor drives the terminal.
TEST(Cli, InspectPrintsControlCharactersOfNamesEscaped) {
  const fs::path dir = workdir("inspect-escaped");
  std::string json = slurp(MOERT_TINY_JSON);
  const std::string plain = "\"name\": \"moe0\"";
  ASSERT_NE(json.find(plain), std::string::npos);
  json.replace(json.find(plain), plain.size(), "\"name\": \"moe\\u001b[31m\\n0\"");
  std::ofstream(dir / "escaped.json") << json;
  const Result r = run("inspect " + (dir / "escaped.json").string(), dir);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.find('\x1b'), std::string::npos);
  EXPECT_NE(r.out.find("  2  moe\\x1B[31m\\x0A0 MoE"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  moe\\x1B[31m\\x0A0.w1 "), std::string::npos) << r.out;
}

TEST(Cli, ConvertRoundTripIsByteIdentical) {
  const fs::path dir = workdir("convert");
  const fs::path b1 = dir / "a.moert", j1 = dir / "a.json", b2 = dir / "b.moert";
  const fs::path j2 = dir / "b.json";
  ASSERT_EQ(run(std::string("convert ") + MOERT_TINY_JSON + " " + b1.string(), dir).code, 0);
  ASSERT_EQ(run("convert " + b1.string() + " " + j1.string(), dir).code, 0);
  ASSERT_EQ(run("convert " + j1.string() + " " + b2.string(), dir).code, 0);
  ASSERT_EQ(run("convert " + b2.string() + " " + j2.string(), dir).code, 0);
  EXPECT_EQ(slurp(b1), slurp(b2));
  EXPECT_EQ(slurp(j1), slurp(j2));
  // The committed example binary was made by flatc from the same JSON.
  EXPECT_EQ(slurp(b1), slurp(MOERT_TINY_MODEL));
  EXPECT_NE(slurp(j1).find("\"kind_type\": \"MoE\""), std::string::npos);
  // The source is never the destination, however it is named.
  const std::string before = slurp(j1);
  expect_one_line_error(run("convert " + j1.string() + " " + (dir / "." / "a.json").string(), dir),
                        2, "convert", "INPUT and OUTPUT are the same file");
  EXPECT_EQ(slurp(j1), before);
  expect_one_line_error(run("convert --lossy " + j1.string() + " c.moert", dir), 2, "convert",
                        "--lossy is for binary INPUT");
}

// `convert --quantize fp8`, then `inspect` of the result: the figures against the C ABI's.
TEST(Cli, ConvertQuantizeFp8AndInspectPrecisionAndBytes) {
  const fs::path dir = workdir("quantize");
  const fs::path q = dir / "q.moert", qj = dir / "q.json", q2 = dir / "q2.moert";
  const Result c =
      run(std::string("convert --quantize fp8 ") + MOERT_TINY_JSON + " " + q.string(), dir);
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_NE(c.out.find("9 expert weight tensors quantized to FP8 E4M3"), std::string::npos)
      << c.out;

  moert_model *m = nullptr, *orig = nullptr;
  ASSERT_EQ(moert_model_load_file(q.string().c_str(), &m), nullptr);
  ASSERT_EQ(moert_model_load_file(MOERT_TINY_MODEL, &orig), nullptr);
  uint64_t resident = 0, resident_orig = 0;
  ASSERT_EQ(moert_model_resident_bytes(m, &resident), nullptr);
  ASSERT_EQ(moert_model_resident_bytes(orig, &resident_orig), nullptr);
  uint32_t layers = 0;
  ASSERT_EQ(moert_model_num_layers(m, &layers), nullptr);
  uint64_t sum = 0;
  int fp8_tensors = 0;
  std::string w1_line;
  for (uint32_t i = 0; i < layers; ++i) {
    uint32_t n = 0;
    ASSERT_EQ(moert_model_num_tensors(m, i, &n), nullptr);
    const char* lname = nullptr;
    ASSERT_EQ(moert_model_layer_name(m, i, &lname), nullptr);
    for (uint32_t k = 0; k < n; ++k) {
      const char* field = nullptr;
      int32_t stored = -1, held = -1;
      uint64_t numel = 0, bytes = 0;
      ASSERT_EQ(moert_model_tensor_info(m, i, k, &field, &stored, &held, &numel, &bytes), nullptr);
      sum += bytes;
      const std::string f = field;
      const bool expert = f == "w1" || f == "w3" || f == "w2" || f.rfind("shared_", 0) == 0;
      EXPECT_EQ(held, expert ? MOERT_DTYPE_F8E4M3 : MOERT_DTYPE_F32) << lname << "." << f;
      EXPECT_EQ(stored, held);
      if (!expert) {
        EXPECT_EQ(bytes, 4 * numel);
      }
      fp8_tensors += expert;
      if (std::string(lname) == "moe0" && f == "w1") {
        // [8, 32, 64]: a code per value, and per expert one row of one block scale padded to 4.
        EXPECT_EQ(numel, 8u * 32 * 64);
        EXPECT_EQ(bytes, 8u * 32 * 64 + 8 * 4 * 4);
        w1_line = std::to_string(numel) + " " + std::to_string(bytes);
      }
    }
  }
  EXPECT_EQ(fp8_tensors, 9);
  EXPECT_EQ(sum, resident);
  EXPECT_LT(resident, resident_orig / 3);
  moert_model_free(m);
  moert_model_free(orig);

  const Result t = run("inspect " + q.string(), dir);
  ASSERT_EQ(t.code, 0) << t.err;
  EXPECT_NE(t.out.find("resident weight bytes: " + std::to_string(resident)), std::string::npos)
      << t.out;
  const std::regex w1(R"(moe0\.w1 +fp8 e4m3 +fp8 e4m3 128x128 +(\d+) +(\d+))");
  std::smatch match;
  ASSERT_TRUE(std::regex_search(t.out, match, w1)) << t.out;
  EXPECT_EQ(match[1].str() + " " + match[2].str(), w1_line);
  EXPECT_NE(t.out.find("head.weight"), std::string::npos);
  const Result tj = run("inspect --json " + q.string(), dir);
  ASSERT_EQ(tj.code, 0) << tj.err;
  EXPECT_EQ(json_value(tj.out, "resident_bytes"), static_cast<double>(resident));
  EXPECT_NE(tj.out.find("\"held\": \"fp8 e4m3 128x128\""), std::string::npos) << tj.out;
  // The original, all fp32, reports the same way.
  const Result to = run(std::string("inspect ") + MOERT_TINY_MODEL, dir);
  EXPECT_NE(to.out.find("resident weight bytes: " + std::to_string(resident_orig)),
            std::string::npos)
      << to.out;

  // The FP8 model converts to JSON and back: codes, dtype and block shape survive, and the JSON
  // is a fixed point. FlatBuffers' text format prints floats with 6 decimals, so the block
  // scales are rounded there: the binary form is the one that keeps an FP8 model exact, and the
  // JSON is written only when asked for with --lossy.
  const Result refused = run("convert " + q.string() + " " + qj.string(), dir);
  expect_one_line_error(refused, 1, "convert", "JSON would not hold this model exactly");
  EXPECT_NE(refused.err.find(".scales.scales[0]: "), std::string::npos) << refused.err;
  EXPECT_FALSE(fs::exists(qj));
  const Result to_json = run("convert --lossy " + q.string() + " " + qj.string(), dir);
  ASSERT_EQ(to_json.code, 0) << to_json.err;
  EXPECT_NE(to_json.out.find("floating-point values changed at 6 decimals (--lossy"),
            std::string::npos)
      << to_json.out;
  EXPECT_NE(slurp(qj).find("\"dtype\": \"F8E4M3\""), std::string::npos);
  ASSERT_EQ(run("convert " + qj.string() + " " + q2.string(), dir).code, 0);
  const fs::path q3 = dir / "q3.moert", q3j = dir / "q3.json";
  const Result again = run("convert --quantize fp8 " + q2.string() + " " + q3.string(), dir);
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_NE(again.out.find("every expert weight is FP8 already"), std::string::npos) << again.out;
  ASSERT_EQ(run("convert --lossy " + q3.string() + " " + q3j.string(), dir).code, 0);
  EXPECT_EQ(slurp(qj), slurp(q3j));
  moert_model* m3 = nullptr;
  ASSERT_EQ(moert_model_load_file(q3.string().c_str(), &m3), nullptr);
  uint64_t resident3 = 0;
  ASSERT_EQ(moert_model_resident_bytes(m3, &resident3), nullptr);
  EXPECT_EQ(resident3, resident);
  moert_model_free(m3);
  const Result p2 = run(std::string("convert --quantize fp8 --power-of-two-scales ") +
                            MOERT_TINY_JSON + " " + (dir / "p2.moert").string(),
                        dir);
  EXPECT_EQ(p2.code, 0) << p2.err;
  EXPECT_NE(p2.out.find("power-of-two scales"), std::string::npos) << p2.out;

  // A model without MoE layers has nothing to quantize, and says so.
  std::ofstream(dir / "dense.json") << R"({ "schema_major": 1, "name": "dense", "layers": [
    { "name": "embed", "kind_type": "Embedding", "kind": { "vocab_size": 8, "dim": 4,
      "weight": { "init": { "kind": "Normal" } } } },
    { "name": "head", "kind_type": "OutputHead", "kind": { "dim": 4, "vocab_size": 8,
      "weight": { "init": { "kind": "Normal" } } } } ] })";
  const Result d =
      run("convert --quantize fp8 " + (dir / "dense.json").string() + " " + q2.string(), dir);
  ASSERT_EQ(d.code, 0) << d.err;
  EXPECT_NE(d.out.find("no MoE layer, so no expert weights to quantize"), std::string::npos)
      << d.out;

  // NaN has no E4M3 code: such a model is refused, naming the tensor and the element.
  std::ofstream(dir / "nan.json") << R"({ "schema_major": 1, "name": "nan", "input_dim": 1,
    "layers": [ { "name": "moe", "kind_type": "MoE", "kind": { "dim": 1, "num_experts": 1,
      "top_k": 1, "expert_hidden": 1, "score_function": "Softmax", "num_groups": 1,
      "topk_groups": 1, "normalize_weights": false, "routed_scaling_factor": 1.0,
      "balancing": { "policy": "None" }, "gate": { "init": { "kind": "Ones" } },
      "w1": { "data": [0, 0, 192, 127] }, "w3": { "init": { "kind": "Ones" } },
      "w2": { "init": { "kind": "Ones" } } } } ] })";
  expect_one_line_error(
      run("convert --quantize fp8 " + (dir / "nan.json").string() + " " + q2.string(), dir), 1,
      "convert", "field 'w1' holds a NaN or infinity at element 0");

  expect_one_line_error(run("convert --quantize int4 " + q.string() + " x.moert", dir), 2,
                        "convert", "--quantize");
  expect_one_line_error(run("convert --power-of-two-scales " + q.string() + " x.moert", dir), 2,
                        "convert", "--quantize fp8");
  expect_one_line_error(
      run("convert --quantize fp8 /no/such/model.moert " + (dir / "x.moert").string(), dir), 1,
      "convert", "/no/such/model");
}

// A report that cannot be written (a full disk, here /dev/full) fails the command: exit 1 and one
// line on stderr, not a 0 with nothing written.
TEST(Cli, AnUnwritableStandardOutputFailsTheCommand) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full on this machine";
  const fs::path dir = workdir("stdout_full");
  const std::string model = MOERT_TINY_MODEL;
  for (const std::string& args : {"inspect " + model, "inspect --json " + model,
                                  std::string("--version"), std::string("help train")}) {
    const fs::path err = dir / "stderr.txt";
    const std::string cmd =
        std::string("'") + MOERT_CLI + "' " + args + " >/dev/full 2>'" + err.string() + "'";
    const int status = std::system(cmd.c_str());
    const std::string text = slurp(err);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << args << ": " << text;
    EXPECT_EQ(count_lines(text), 1) << args << ": " << text;
    EXPECT_NE(text.find("error: cannot write its output to standard output: "), std::string::npos)
        << args << ": " << text;
  }
}

TEST(Cli, ErrorsAreOneLineWithNonZeroExit) {
  const fs::path dir = workdir("errors");
  expect_one_line_error(run("inspect /no/such/model.moert", dir), 1, "inspect", "/no/such/model");
  expect_one_line_error(run(std::string("inspect --frobnicate ") + MOERT_TINY_MODEL, dir), 2,
                        "inspect", "--frobnicate");
  expect_one_line_error(run("inspect", dir), 2, "inspect", "MODEL");
  expect_one_line_error(run("convert /no/such.json out.moert", dir), 1, "convert", "/no/such");
  expect_one_line_error(run("train --steps many", dir), 2, "train", "--steps");
  // A value forgotten before the next option: named as such, not taken as the value.
  expect_one_line_error(run("train --steps --lr 1", dir), 2, "train",
                        "option '--steps' needs a value (N), got the option '--lr'");
  expect_one_line_error(run("train --balancing none,bogus", dir), 2, "train", "bogus");
  expect_one_line_error(run("train --corpus /no/such/dir --steps 1", dir), 1, "train",
                        "/no/such/dir");
  // A model without MoE layers has no balancing to compare: refused before any training.
  std::ofstream(dir / "dense.json")
      << R"({"schema_major": 1, "schema_minor": 0, "name": "dense", "seed": 1, "layers": [
  {"name": "embed", "kind_type": "Embedding", "kind": {"vocab_size": 98, "dim": 8, "context": 4,
   "weight": {"init": {"kind": "Normal", "std": 1.0}}}},
  {"name": "head", "kind_type": "OutputHead", "kind": {"dim": 32, "vocab_size": 98,
   "weight": {"init": {"kind": "Normal", "std": 0.1}}}}]})";
  expect_one_line_error(run("train --steps 1 --corpus " + std::string(MOERT_TINY_CORPUS) +
                                " --model " + (dir / "dense.json").string(),
                            dir),
                        1, "train", "no MoE layer; train compares load balancing");
  // inspect reads it, and claims no saving for a model that routes nothing.
  const Result dense = run("inspect " + (dir / "dense.json").string(), dir);
  EXPECT_EQ(dense.code, 0) << dense.err;
  EXPECT_NE(dense.out.find("dense-equivalent"), std::string::npos) << dense.out;
  EXPECT_EQ(dense.out.find("less compute"), std::string::npos) << dense.out;
  expect_one_line_error(
      run("train --steps 1 --probe-rows 64 --model " + (dir / "dense.json").string(), dir), 2,
      "train", "--probe-rows applies to the generated model in one process");
  // An empty path names nothing ('export MODEL ""' wrote into the working directory, 'train
  // --save ""' saved nothing and said nothing): refused before any work, nothing written.
  expect_one_line_error(run(std::string("export ") + MOERT_TINY_MODEL + " ''", dir), 2, "export",
                        "argument 2 is empty");
  expect_one_line_error(run("train --steps 1 --save ''", dir), 2, "train",
                        "'--save' needs a DIR, got an empty value");
  expect_one_line_error(run("train --steps 1 --csv=", dir), 2, "train",
                        "'--csv' needs a FILE, got an empty value");
  EXPECT_EQ(run("train --save '' --help", dir).code, 0);  // --help wins, as everywhere
  EXPECT_EQ(run("train --steps --help", dir).code, 0);    // even where a value was due
  expect_one_line_error(run("convert --quantize -- a.moert b.moert", dir), 2, "convert",
                        "option '--quantize' needs a value");
  expect_one_line_error(run("train ''", dir), 2, "train", "expected [--corpus PATH]");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), {}), 3);  // dense.json and std{out,err}.txt
  // An output that is a symbolic link would be replaced by a file, the link lost: refused.
  fs::copy_file(MOERT_TINY_MODEL, dir / "target.moert");
  fs::create_symlink("target.moert", dir / "link.moert");
  expect_one_line_error(
      run(std::string("convert ") + MOERT_TINY_JSON + " " + (dir / "link.moert").string(), dir), 1,
      "convert", "link.moert': it is a symbolic link");
  EXPECT_TRUE(fs::is_symlink(dir / "link.moert"));
  fs::remove(dir / "link.moert");
  fs::remove(dir / "target.moert");
  expect_one_line_error(run("bench --threads 0", dir), 2, "bench", "--threads");
  expect_one_line_error(run("bench --precision fp16", dir), 2, "bench", "--precision");
  expect_one_line_error(run("bench --decode-dim 128", dir), 2, "bench", "only with --decode");
  expect_one_line_error(run("train --comm-timeout 3", dir), 2, "train",
                        "--comm-timeout applies only with --expert-parallel");
  expect_one_line_error(run("bench --comm-timeout 3", dir), 2, "bench", "--comm-timeout");
  expect_one_line_error(run("import /no/such/dir out.moert --layer 0", dir), 1, "import",
                        "/no/such/dir: no such directory");
  expect_one_line_error(run("train --precision half", dir), 2, "train", "--precision");
  expect_one_line_error(run("train --min-lr 1 --steps 1", dir), 2, "train",
                        "--min-lr 1 is above --lr 0.003");
  expect_one_line_error(
      run(std::string("train --model ") + MOERT_TINY_MODEL + " --experts 8 --steps 1", dir), 2,
      "train", "--experts shapes the generated model");
  expect_one_line_error(
      run(std::string("eval ") + MOERT_TINY_MODEL + " --corpus " + MOERT_TINY_CORPUS, dir), 1,
      "eval", "vocabulary");

  // A FIFO nobody writes to is refused at once as a model, not waited on.
  const fs::path fifo = dir / "model.fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  expect_one_line_error(run("inspect " + fifo.string(), dir), 1, "inspect", "not a regular file");
  expect_one_line_error(run("convert " + fifo.string() + " x.json", dir), 1, "convert",
                        "not a regular file");
  // Nor written into as an output: convert writes through a temporary file and a rename, which
  // would replace the FIFO or a device.
  const std::string tiny_json =
      (fs::path(MOERT_TINY_MODEL).parent_path() / "tiny_moe.json").string();
  expect_one_line_error(run("convert " + tiny_json + " " + fifo.string(), dir), 1, "convert",
                        "not a regular file");
  expect_one_line_error(run("convert " + tiny_json + " /dev/null", dir), 1, "convert",
                        "not a regular file");
  // An export refused midway (the example's weights are initialisers, not values) removes the
  // folders it created, missing parents included, and nothing else.
  fs::create_directories(dir / "exports");
  const std::string tiny_hidden =
      (fs::path(MOERT_TINY_MODEL).parent_path() / "tiny_hidden.moert").string();
  expect_one_line_error(
      run("export " + tiny_hidden + " " + (dir / "exports" / "new" / "a" / "b").string(), dir), 1,
      "export", "no stored values");
  EXPECT_FALSE(fs::exists(dir / "exports" / "new"));
  EXPECT_TRUE(fs::is_directory(dir / "exports"));
  // Only folders it created itself: not a dangling link in the way (the refusal names it), not
  // a folder a ".." leads to that held the user's files.
  fs::create_symlink(dir / "exports" / "nowhere", dir / "exports" / "dangling");
  expect_one_line_error(
      run("export " + tiny_hidden + " " + (dir / "exports" / "dangling" / "out").string(), dir), 1,
      "export", "cannot create");
  EXPECT_TRUE(fs::is_symlink(dir / "exports" / "dangling"));
  fs::create_directories(dir / "exports" / "theirs");
  std::ofstream(dir / "exports" / "theirs" / "file") << "kept";
  expect_one_line_error(
      run("export " + tiny_hidden + " " + (dir / "exports" / "fresh" / ".." / "theirs").string(),
          dir),
      1, "export", "no stored values");
  EXPECT_EQ(slurp(dir / "exports" / "theirs" / "file"), "kept");
  EXPECT_FALSE(fs::exists(dir / "exports" / "fresh"));
  // What the library refuses is not exported: a top-K above the expert count, written past the
  // check with convert --no-check, is refused by name and nothing is written.
  std::string edited = slurp(tiny_json);
  for (size_t at; (at = edited.find("\"top_k\": 2")) != std::string::npos;)
    edited.replace(at, 10, "\"top_k\": 13");
  std::ofstream(dir / "bad_top_k.json") << edited;
  ASSERT_EQ(run("convert " + (dir / "bad_top_k.json").string() + " " +
                    (dir / "bad_top_k.moert").string() + " --no-check",
                dir)
                .code,
            0);
  const Result refused_export =
      run("export " + (dir / "bad_top_k.moert").string() + " " + (dir / "exports" / "bad").string(),
          dir);
  expect_one_line_error(refused_export, 1, "export", "field 'top_k' 13 exceeds num_experts 8");
  // A defect the export would carry over is not offered the way past the check.
  EXPECT_EQ(refused_export.err.find("--no-check"), std::string::npos) << refused_export.err;
  EXPECT_FALSE(fs::exists(dir / "exports" / "bad"));
  // --no-check skips the load: the export goes on to its own checks (here: the example's second
  // router is one the deepseek_v3 layout cannot spell).
  expect_one_line_error(run("export " + (dir / "bad_top_k.moert").string() + " " +
                                (dir / "exports" / "bad").string() + " --no-check",
                            dir),
                        1, "export", "score_function is Softmax");
  // A corpus that never ends is refused when it passes the most a corpus may hold.
  expect_one_line_error(run("train --corpus /dev/zero --steps 1", dir), 1, "train",
                        "/dev/zero: holds more than 256 MiB of text");
  // A --save that cannot be created leaves --csv as it was (it is opened last).
  std::ofstream(dir / "steps.csv") << "kept\n";
  std::ofstream(dir / "notadir") << "a file";
  expect_one_line_error(
      run("train --corpus " + std::string(MOERT_TINY_CORPUS) + " --steps 1 --csv " +
              (dir / "steps.csv").string() + " --save " + (dir / "notadir" / "ck").string(),
          dir),
      1, "train", "notadir");
  EXPECT_EQ(slurp(dir / "steps.csv"), "kept\n");
  // A checkpoint's name taken by a directory is refused before any training, naming --save, and
  // leaves --csv as it was (it failed only after the first strategy's training).
  fs::create_directories(dir / "taken" / "none.moert");
  const Result taken = run("train --corpus " + std::string(MOERT_TINY_CORPUS) +
                               " --steps 2 --balancing none --probe-rows 0 --eval-rows 64 --csv " +
                               (dir / "steps.csv").string() + " --save " + (dir / "taken").string(),
                           dir);
  expect_one_line_error(
      taken, 1, "train",
      "--save: '" + (dir / "taken" / "none.moert").string() + "' exists and is a directory");
  EXPECT_EQ(slurp(dir / "steps.csv"), "kept\n");
  // A checkpoint name too long for the file system (from a 270-byte label) is refused before
  // any training, naming --save, and leaves --csv as it was and no --save folder behind (it
  // failed only after that strategy's training).
  const std::string gamma = "0.001" + std::string(240, '0') + "1";
  const Result long_name =
      run("train --corpus " + std::string(MOERT_TINY_CORPUS) +
              " --steps 2 --balancing none,loss-free:gamma=" + gamma +
              " --probe-rows 0 --eval-rows 64 --csv " + (dir / "steps.csv").string() + " --save " +
              (dir / "long" / "deeper").string(),
          dir);
  expect_one_line_error(long_name, 1, "train", "has a name too long for this file system");
  EXPECT_NE(long_name.err.find("--save: checkpoint"), std::string::npos) << long_name.err;
  EXPECT_EQ(slurp(dir / "steps.csv"), "kept\n");
  EXPECT_FALSE(fs::exists(dir / "long"));
  // A name that fits alone (240 bytes) but not with the data file's 22: refused too, which
  // only a probe as long as the data file's name sees.
  const Result near =
      run("train --corpus " + std::string(MOERT_TINY_CORPUS) +
              " --steps 2 --balancing loss-free:gamma=0.001" + std::string(211, '0') +
              "1 --probe-rows 0 --eval-rows 64 --save " + (dir / "near").string(),
          dir);
  expect_one_line_error(near, 1, "train", "(240 bytes, and the data file");
  EXPECT_FALSE(fs::exists(dir / "near"));
  // A --save path too long for the system as a whole is named as such, not as a long name.
  fs::path deep = dir / "deep";
  while (deep.string().size() < 4080 - 201) deep /= std::string(200, 'd');
  const Result path_too_long =
      run("train --corpus " + std::string(MOERT_TINY_CORPUS) +
              " --steps 2 --balancing none --probe-rows 0 --eval-rows 64 --save " +
              (deep / std::string(4080 - deep.string().size(), 'e')).string(),
          dir);
  expect_one_line_error(path_too_long, 1, "train", "is too long for this system");
  EXPECT_FALSE(fs::exists(dir / "deep"));
  // A job that fails after training began (a learning rate and weight decay that take the
  // weights past the fp32 range by step 7) says so once; it keeps the per-step rows written so
  // far (--csv is written as the runs go: tail -f, /dev/stdout) and removes the --save folders
  // it created (late/deeper), which hold nothing.
  const Result late =
      run("train --corpus " + std::string(MOERT_TINY_CORPUS) +
              " --steps 40 --balancing none --lr 10 --min-lr 10 --weight-decay 10 --warmup 0"
              " --probe-rows 0 --eval-rows 64 --csv " +
              (dir / "steps.csv").string() + " --save " + (dir / "late" / "deeper").string(),
          dir);
  EXPECT_EQ(late.code, 1) << late.err;
  EXPECT_NE(late.err.find("moert train: error: step "), std::string::npos) << late.err;
  EXPECT_NE(late.err.find("fp32 range"), std::string::npos) << late.err;
  EXPECT_EQ(slurp(dir / "steps.csv").rfind("strategy,step,", 0), 0u);
  EXPECT_GT(count_lines(slurp(dir / "steps.csv")), 2);
  EXPECT_FALSE(fs::exists(dir / "late"));
  // No output may be an input: --csv onto the corpus, --csv onto a checkpoint --save writes.
  fs::copy_file(MOERT_TINY_CORPUS, dir / "corpus.txt", fs::copy_options::overwrite_existing);
  const std::string corpus_text = slurp(dir / "corpus.txt");
  expect_one_line_error(run("train --corpus " + (dir / "corpus.txt").string() +
                                " --steps 1 --csv " + (dir / "corpus.txt").string(),
                            dir),
                        2, "train", "would replace what this command reads");
  EXPECT_EQ(slurp(dir / "corpus.txt"), corpus_text);
  expect_one_line_error(
      run("train --corpus " + (dir / "corpus.txt").string() + " --steps 1 --balancing none --csv " +
              (dir / "ck" / "none.moert").string() + " --save " + (dir / "ck").string(),
          dir),
      2, "train", "is where --save writes checkpoint");
  // The same with --model, whose one run saves DIR/model.moert: onto the model itself, and
  // under --csv's name.
  ASSERT_EQ(run("train --corpus " + (dir / "corpus.txt").string() +
                    " --steps 1 --balancing none --probe-rows 0 --eval-rows 64 --save " +
                    (dir / "given").string(),
                dir)
                .code,
            0);
  // --csv onto the data file of the checkpoint --save replaces, or under a name the save's data
  // files take: the save's clean-up would remove it (and, before the save, the old checkpoint
  // would have lost its data).
  std::string data_file;
  for (const auto& e : fs::directory_iterator(dir / "given"))
    if (e.path().extension() == ".data") data_file = e.path().string();
  ASSERT_FALSE(data_file.empty());
  const std::string data_bytes = slurp(data_file);
  for (const std::string& csv :
       {data_file, (dir / "given" / "none.moert.0123456789abcdef.data").string()}) {
    expect_one_line_error(
        run("train --corpus " + (dir / "corpus.txt").string() +
                " --steps 1 --balancing none --csv " + csv + " --save " + (dir / "given").string(),
            dir),
        2, "train", "which --save replaces and then removes");
  }
  // The same by bare names from inside DIR (`--save . --csv NAME`), and a library save's
  // temporary file name, which the save's clean-up removes too.
  {
    const fs::path cwd = fs::current_path();
    fs::current_path(dir / "given");
    fs::create_symlink("none.moert.0123456789abcdef.data", "metrics.csv");
    for (const std::string csv :
         {"none.moert.0123456789abcdef.data", ".none.moert.tmp-abc123", "metrics.csv"})
      expect_one_line_error(run("train --corpus " + (dir / "corpus.txt").string() +
                                    " --steps 1 --balancing none --csv " + csv + " --save .",
                                dir),
                            2, "train", "which --save replaces and then removes");
    fs::remove("metrics.csv");
    fs::current_path(cwd);
  }
  EXPECT_EQ(slurp(data_file), data_bytes);
  EXPECT_FALSE(fs::exists(dir / "given" / "none.moert.0123456789abcdef.data"));
  EXPECT_FALSE(fs::exists(dir / "given" / ".none.moert.tmp-abc123"));
  fs::rename(dir / "given" / "none.moert", dir / "given" / "model.moert");
  const std::string given_model = (dir / "given" / "model.moert").string();
  const std::string given_bytes = slurp(given_model);
  expect_one_line_error(
      run("train --corpus " + (dir / "corpus.txt").string() + " --steps 1 --model " + given_model +
              " --save " + (dir / "given").string(),
          dir),
      2, "train", "would replace what this command reads");
  EXPECT_EQ(slurp(given_model), given_bytes);
  expect_one_line_error(
      run("train --corpus " + (dir / "corpus.txt").string() + " --steps 1 --model " + given_model +
              " --save " + (dir / "out").string() + " --csv " +
              (dir / "out" / "model.moert").string(),
          dir),
      2, "train", "is where --save writes checkpoint");

  // Damaged inputs: a JSON with an unknown field, a truncated binary.
  std::ofstream(dir / "bad.json") << "{ \"schema_major\": 1, \"layerz\": [] }";
  expect_one_line_error(run("convert " + (dir / "bad.json").string() + " x.moert", dir), 1,
                        "convert", "unknown field: layerz");
  const std::string bin = slurp(MOERT_TINY_MODEL);
  std::ofstream(dir / "cut.moert", std::ios::binary) << bin.substr(0, bin.size() / 2);
  expect_one_line_error(run("inspect " + (dir / "cut.moert").string(), dir), 1, "inspect",
                        "cut.moert");
  expect_one_line_error(run("convert " + (dir / "cut.moert").string() + " x.json", dir), 1,
                        "convert", "cut.moert");

  // A control character in a name the error quotes is written as \xNN: still one line.
  expect_one_line_error(run("inspect '/no/such\nmodel.moert'", dir), 1, "inspect",
                        "/no/such\\x0Amodel.moert");

  for (const char* args : {"frobnicate", "", "'frob\nnicate'"}) {
    const Result r = run(args, dir);
    EXPECT_EQ(r.code, 2) << args;
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
    EXPECT_EQ(r.err.rfind("moert: error: ", 0), 0u) << r.err;
  }
}

// An option given twice is refused before any work, rather than the last value kept in silence
// (`train --steps 3 --steps 5` ran 5 steps): only an option documented as repeatable (import's
// --layer) takes several values.
TEST(Cli, AnOptionGivenTwiceIsRefused) {
  const fs::path dir = workdir("twice");
  const std::string corpus = std::string(" --corpus ") + MOERT_TINY_CORPUS;
  expect_one_line_error(run("train --steps 3 --steps 5" + corpus, dir), 2, "train",
                        "--steps given twice ('3' and '5'): give it once");
  expect_one_line_error(run("train --steps=3 --probe-rows 0 --steps 3" + corpus, dir), 2, "train",
                        "--steps given twice");
  expect_one_line_error(run("train --balancing none --balancing aux --steps 1" + corpus, dir), 2,
                        "train", "--balancing given twice ('none' and 'aux')");
  expect_one_line_error(run("train --save " + (dir / "a").string() + " --save " +
                                (dir / "b").string() + " --steps 1" + corpus,
                            dir),
                        2, "train", "--save given twice");
  expect_one_line_error(run(std::string("eval --json --json ") + MOERT_TINY_MODEL, dir), 2, "eval",
                        "--json given twice: give it once");
  expect_one_line_error(run(std::string("inspect --json ") + MOERT_TINY_MODEL + " --json", dir), 2,
                        "inspect", "--json given twice");
  expect_one_line_error(run(std::string("export ") + MOERT_TINY_MODEL + " " +
                                (dir / "out").string() + " --dtype fp32 --dtype bf16",
                            dir),
                        2, "export", "--dtype given twice");
  expect_one_line_error(run("bench --quick --threads 1 --threads 2", dir), 2, "bench",
                        "--threads given twice");
  // --help still wins, wherever it stands.
  EXPECT_EQ(run("train --steps 3 --steps 5 --help", dir).code, 0);
  // --layer repeats: the import goes on to its own checks (here the missing checkpoint).
  expect_one_line_error(run("import /no/such/dir out.moert --layer 0 --layer 1", dir), 1, "import",
                        "/no/such/dir: no such directory");
  // Nothing was written: only the captured stdout and stderr are there.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), {}), 2);
}

// Trains the tiny model for a step with `balancing` and saves it to DIR/ck: a checkpoint with a
// data file, for the export, import and convert cases below.
void train_checkpoint(const fs::path& dir, const std::string& balancing = "loss-free") {
  ASSERT_EQ(run("train --corpus " + std::string(MOERT_TINY_CORPUS) + " --steps 1 --balancing " +
                    balancing + " --probe-rows 0 --eval-rows 64 --save " + (dir / "ck").string(),
                dir)
                .code,
            0);
}

// Waits (10 s at most) until an export into `out` has staged all its files: the manifest is the
// last one it stages.
bool wait_until_staged(const fs::path& out) {
  for (int i = 0; i < 200; ++i) {
    for (const auto& e : fs::directory_iterator(out))
      if (e.path().filename().string().starts_with(".moert-export.tmp.")) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

// An input shorter than it says (a shard whose header promises more data than the file holds,
// a model whose data file was cut short): the deterministic form of a read past the end of a
// file cut while `import` or `export` maps it (which raised SIGBUS; the mapping's own test is
// Safetensors.AFileCutShortWhileMappedIsRefusedNotACrash). One line naming the file, exit 1, and
// nothing left behind: no temporary file, no folder the export created.
TEST(Cli, ImportAndExportRefuseAnInputCutShort) {
  const fs::path dir = workdir("cut_short");
  ASSERT_NO_FATAL_FAILURE(train_checkpoint(dir));
  const std::string ck = (dir / "ck" / "loss-free.moert").string();
  ASSERT_EQ(run("export " + ck + " " + (dir / "hf").string(), dir).code, 0);
  const fs::path shard = dir / "hf" / "model-00001-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) / 2);
  fs::create_directories(dir / "imported");
  expect_one_line_error(run("import " + (dir / "hf").string() + " " +
                                (dir / "imported" / "m.moert").string() + " --layer 0",
                            dir),
                        1, "import", shard.string() + ": tensor '");
  EXPECT_TRUE(fs::is_empty(dir / "imported"));

  std::string data;
  for (const auto& e : fs::directory_iterator(dir / "ck"))
    if (e.path().extension() == ".data") data = e.path().string();
  ASSERT_FALSE(data.empty());
  // Into the parameters, which the export reads (the training state after them it does not).
  fs::resize_file(data, 4096);
  // The library's check of the model reads it first; past it, the export's own reading.
  expect_one_line_error(run("export " + ck + " " + (dir / "out").string(), dir), 1, "export",
                        fs::path(data).filename().string());
  const Result unchecked = run("export " + ck + " " + (dir / "out").string() + " --no-check", dir);
  expect_one_line_error(unchecked, 1, "export", "runs past the end of '" + data + "'");
  EXPECT_FALSE(fs::exists(dir / "out"));
  for (const auto& e : fs::recursive_directory_iterator(dir))
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << e.path();
}

// An export holds its folder's lock only to commit: while another process holds it, the export
// writes every file under its temporary name, then waits, and once the lock is free renames them
// into place. (It held the lock from the start, so a library save into that folder, which waits
// at most 30 s for it, failed while a large export was written.)
TEST(Cli, AnExportTakesItsFoldersLockOnlyToCommit) {
  const fs::path dir = workdir("export_lock");
  ASSERT_NO_FATAL_FAILURE(train_checkpoint(dir));
  const fs::path out = dir / "hf";
  fs::create_directories(out);
  const int fd = ::open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);  // as a save committing there
  auto exported = std::async(std::launch::async, [&] {
    return run("export " + (dir / "ck" / "loss-free.moert").string() + " " + out.string(), dir);
  });
  const bool staged = wait_until_staged(out);
  const bool committed_early = fs::exists(out / "config.json");
  ::flock(fd, LOCK_UN);
  ::close(fd);
  const Result r = exported.get();
  EXPECT_TRUE(staged) << "the export did not write its files while the folder was locked";
  EXPECT_FALSE(committed_early) << "the export committed without the folder's lock";
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  for (const auto& e : fs::directory_iterator(out))
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << e.path();
}

// An export whose commit fails midway (here a folder sits where its second file goes) takes back
// what it had put in place in the folder it created, and leaves whatever else was written there
// while it staged unlocked (a save's checkpoint): the folder stays with those files. (A failed
// export removed the whole folder, the checkpoint saved into it meanwhile included.) The export
// is caught right after it creates the folder: stopped, the folder locked, then let go on.
TEST(Cli, AFailedExportTakesBackOnlyItsOwnFiles) {
  const fs::path dir = workdir("export_failed_commit");
  ASSERT_NO_FATAL_FAILURE(train_checkpoint(dir));
  const fs::path out = dir / "hf";
  const std::string model = (dir / "ck" / "loss-free.moert").string();
  bool caught = false;
  for (int attempt = 0; attempt < 3 && !caught; ++attempt) {
    fs::remove_all(out);
    const std::string err_path = (dir / "export.err").string();
    std::ofstream(err_path).close();  // before the watch: only the export's folder is created
    const int watch = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    ASSERT_GE(watch, 0);
    ASSERT_GE(inotify_add_watch(watch, dir.c_str(), IN_CREATE), 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    const std::string out_text = out.string();
    const char* argv[] = {MOERT_CLI, "export", model.c_str(), out_text.c_str(), nullptr};
    pid_t pid = -1;
    ASSERT_EQ(posix_spawn(&pid, MOERT_CLI, &actions, nullptr, const_cast<char**>(argv), environ),
              0);
    posix_spawn_file_actions_destroy(&actions);
    // The event naming "hf", waited for 30 s at most (an export failing before it creates its
    // folder must fail the test, not hang it).
    bool created = false;
    pollfd readable{watch, POLLIN, 0};
    while (!created && ::poll(&readable, 1, 30000) > 0) {
      alignas(inotify_event) char events[4096];
      const ssize_t n = ::read(watch, events, sizeof events);
      for (ssize_t at = 0; at < n;) {
        const auto* e = reinterpret_cast<const inotify_event*>(events + at);
        created = created || (e->len > 0 && std::string(e->name) == "hf");
        at += static_cast<ssize_t>(sizeof(inotify_event) + e->len);
      }
    }
    ::kill(pid, SIGSTOP);
    ASSERT_TRUE(created) << "the export never created its folder: " << slurp(err_path);
    ::close(watch);
    const int fd = created ? ::open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    // Too late when the export had committed already: try again.
    caught = fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) == 0 && !fs::exists(out / "config.json");
    ::kill(pid, SIGCONT);
    if (caught) {
      EXPECT_TRUE(wait_until_staged(out));  // then waiting for the lock
      std::string second;
      for (const auto& e : fs::directory_iterator(out))
        if (const std::string n = e.path().filename().string(); n.starts_with("model-00001-of-"))
          second = "model-00002-of-" + n.substr(15, 5) + ".safetensors";
      ASSERT_FALSE(second.empty());
      fs::create_directories(out / second / "in-the-way");
      std::ofstream(out / "trainer.moert") << "a checkpoint saved meanwhile";
      ::flock(fd, LOCK_UN);
    }
    if (fd >= 0) ::close(fd);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    if (!caught) continue;
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
    EXPECT_NE(slurp(err_path).find("Is a directory"), std::string::npos) << slurp(err_path);
    std::vector<std::string> left;
    for (const auto& e : fs::directory_iterator(out)) left.push_back(e.path().filename().string());
    std::sort(left.begin(), left.end());
    ASSERT_EQ(left.size(), 2u) << ::testing::PrintToString(left);
    EXPECT_TRUE(left[0].starts_with("model-00002-of-")) << left[0];
    EXPECT_EQ(left[1], "trainer.moert");
  }
  if (!caught) GTEST_SKIP() << "the export committed before it could be stopped, three times";
}

// --csv is written a row at a time as the runs go (tail -f), by one run at a time: a second run
// given the same file is refused while the first writes it (two runs interleaved their rows,
// both exiting 0), and a run killed midway leaves whole rows (it left a row cut at a 4 KiB
// block).
TEST(Cli, ACsvIsWrittenByOneRunAtATimeInWholeRows) {
  const fs::path dir = workdir("csv_one_writer");
  const std::string csv = (dir / "steps.csv").string();
  const std::string corpus = MOERT_TINY_CORPUS;
  const char* argv[] = {MOERT_CLI,      "train", "--corpus",  corpus.c_str(), "--steps",
                        "100000",       "--csv", csv.c_str(), "--balancing",  "none",
                        "--probe-rows", "0",     nullptr};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid = -1;
  ASSERT_EQ(posix_spawn(&pid, MOERT_CLI, &actions, nullptr, const_cast<char**>(argv), environ), 0);
  posix_spawn_file_actions_destroy(&actions);
  // Until the first run has written a few rows (30 s at most).
  for (int i = 0; i < 3000 && count_lines(slurp(csv)) < 4; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const bool writing = count_lines(slurp(csv)) >= 4;
  const Result second =
      run("train --corpus " + corpus + " --steps 1 --balancing none --csv " + csv, dir);
  ::kill(pid, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(writing) << "the first run wrote no rows";
  expect_one_line_error(second, 1, "train", "another process is writing its per-step rows");
  const std::string rows = slurp(csv);
  EXPECT_EQ(rows.rfind("strategy,step,", 0), 0u);
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(rows.back(), '\n') << "a row was cut";
  std::istringstream lines(rows);
  for (std::string line; std::getline(lines, line);)
    EXPECT_EQ(std::count(line.begin(), line.end(), ','), 6) << line;
  // Once the writer is gone, the file is free again.
  EXPECT_EQ(run("train --corpus " + corpus +
                    " --steps 2 --balancing none --probe-rows 0 "
                    "--eval-rows 64 --csv " +
                    csv,
                dir)
                .code,
            0);
  EXPECT_EQ(count_lines(slurp(csv)), 3);
}

// Another export that created OUT_DIR and was refused removes it while it is empty, which can be
// right after this export found it and before its first file is in it. (This export then failed:
// "cannot create its temporary file".) Here a preloaded library removes the folder at exactly that
// moment; the export makes it again and succeeds.
TEST(Cli, AnExportWhoseFoundFolderIsRemovedMakesItAgain) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizer runtime must come first in the process's libraries";
#endif
  const fs::path dir = workdir("export_vanishing_folder");
  ASSERT_NO_FATAL_FAILURE(train_checkpoint(dir));
  const fs::path out = dir / "hf";
  fs::create_directories(out);
  ::setenv("MOERT_TEST_VANISH_DIR", out.c_str(), 1);
  ::setenv("LD_PRELOAD", MOERT_VANISHING_FOLDER, 1);
  const Result r =
      run("export " + (dir / "ck" / "loss-free.moert").string() + " " + out.string(), dir);
  ::unsetenv("LD_PRELOAD");
  ::unsetenv("MOERT_TEST_VANISH_DIR");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(out / "config.json"));
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
}

// An export whose commit fails midway in a folder holding an earlier export leaves its marker
// (imports refuse the folder), and the marker lists its files: the next export removes the
// shards it does not write again, which no manifest named before.
TEST(Cli, TheExportAfterAFailedOneRemovesItsStrayShards) {
  const fs::path dir = workdir("export_stray_shards");
  ASSERT_NO_FATAL_FAILURE(train_checkpoint(dir));
  const std::string two = (dir / "ck" / "loss-free.moert").string();
  ASSERT_EQ(run("export " + two + " " + (dir / "hf2").string(), dir).code, 0);
  const std::string one = (dir / "one.moert").string();
  ASSERT_EQ(run("import " + (dir / "hf2").string() + " " + one + " --layer 0", dir).code, 0);
  const fs::path out = dir / "out";
  ASSERT_EQ(run("export " + one + " " + out.string(), dir).code, 0);

  // The two-layer export fails at its second shard, the lock held meanwhile as a save would.
  const int fd = ::open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  auto failed = std::async(std::launch::async,
                           [&] { return run("export " + two + " " + out.string(), dir); });
  const bool staged = wait_until_staged(out);
  fs::create_directories(out / "model-00002-of-00002.safetensors" / "in-the-way");
  ::flock(fd, LOCK_UN);
  ::close(fd);
  ASSERT_TRUE(staged);
  ASSERT_EQ(failed.get().code, 1);
  EXPECT_TRUE(fs::exists(out / ".moert-export-incomplete"));
  EXPECT_TRUE(fs::exists(out / "model-00001-of-00002.safetensors"));
  EXPECT_NE(run("import " + out.string() + " " + (dir / "x.moert").string() + " --layer 0", dir)
                .err.find("did not finish"),
            std::string::npos);

  fs::remove_all(out / "model-00002-of-00002.safetensors");
  ASSERT_EQ(run("export " + one + " " + out.string(), dir).code, 0);
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(out)) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{".moert-export", "config.json",
                                            "model-00001-of-00001.safetensors",
                                            "model.safetensors.index.json"}));
}

// A data file is named by its content, and a save of unchanged state renames a new copy of it
// over the old one (a new file, the same bytes): an export reading the checkpoint meanwhile goes
// on. (A check meant for replaced safetensors shards refused 31 of 40 such exports.)
TEST(Cli, AnExportWhileTheSameStateIsSavedAgainSucceeds) {
  const fs::path dir = workdir("export_during_resave");
  ASSERT_NO_FATAL_FAILURE(train_checkpoint(dir));
  const std::string ck = (dir / "ck" / "loss-free.moert").string();
  moert_model* m = nullptr;
  ASSERT_EQ(moert_model_load_file(ck.c_str(), &m), nullptr);
  moert_session_options* o = nullptr;
  ASSERT_EQ(moert_session_options_create(&o), nullptr);
  ASSERT_EQ(moert_session_options_set_mode(o, MOERT_MODE_TRAINING), nullptr);
  moert_session* s = nullptr;
  ASSERT_EQ(moert_session_create(m, o, &s), nullptr);
  ASSERT_EQ(moert_session_load(s, ck.c_str()), nullptr);
  std::atomic<bool> done{false};
  std::atomic<int> saves{0}, failed_saves{0};
  std::thread saver([&] {
    while (!done) {
      moert_status* st = moert_session_save(s, ck.c_str());
      ++(st ? failed_saves : saves);
      moert_status_free(st);
    }
  });
  int failed = 0;
  std::string first;
  for (int i = 0; i < 10; ++i) {
    const Result r = run("export " + ck + " " + (dir / ("hf" + std::to_string(i))).string(), dir);
    if (r.code != 0 && failed++ == 0) first = r.err;
  }
  done = true;
  saver.join();
  moert_session_free(s);
  moert_session_options_free(o);
  moert_model_free(m);
  EXPECT_EQ(failed, 0) << first;
  EXPECT_GT(saves.load(), 10);
  EXPECT_EQ(failed_saves.load(), 0);
}

// A description converted into another folder refers to a data file beside it that is not
// there: the note says where the file is (INPUT's folder), and when INPUT's folder lacks it too
// (a conversion with --no-check of a copy made without it), that both lack it, rather than
// sending the user to a folder without it.
TEST(Cli, ConvertSaysWhereAMissingDataFileIs) {
  const fs::path dir = workdir("convert_data_file");
  ASSERT_NO_FATAL_FAILURE(train_checkpoint(dir, "none"));
  std::string data;
  for (const auto& e : fs::directory_iterator(dir / "ck"))
    if (e.path().extension() == ".data") data = e.path().filename().string();
  ASSERT_FALSE(data.empty());
  for (const char* d : {"cj", "other"}) fs::create_directories(dir / d);
  const std::string ck = (dir / "ck").string(), cj = (dir / "cj").string(),
                    other = (dir / "other").string();
  const std::string note = "refers to its data file '" + data + "' beside it, which ";

  const Result to_json =
      run("convert --lossy --no-check " + ck + "/none.moert " + cj + "/none.json", dir);
  ASSERT_EQ(to_json.code, 0) << to_json.err;
  EXPECT_NE(to_json.out.find(note + "is not there: copy it from " + ck + "\n"), std::string::npos)
      << to_json.out;
  // Back to binary beside the JSON: its folder lacks the file as well.
  const Result beside = run("convert --no-check " + cj + "/none.json " + cj + "/none2.moert", dir);
  ASSERT_EQ(beside.code, 0) << beside.err;
  EXPECT_NE(beside.out.find(note + "is missing from " + cj + " (" + cj +
                            "/none.json lacks it too): neither loads without it"),
            std::string::npos)
      << beside.out;
  EXPECT_EQ(beside.out.find("copy it from"), std::string::npos) << beside.out;
  // Into a third folder: neither holds it.
  const Result elsewhere =
      run("convert --no-check " + cj + "/none.json " + other + "/none3.moert", dir);
  ASSERT_EQ(elsewhere.code, 0) << elsewhere.err;
  EXPECT_NE(elsewhere.out.find(note + "is missing from both " + other + " and " + cj + " (beside " +
                               cj + "/none.json): neither loads without it"),
            std::string::npos)
      << elsewhere.out;
  // Once the input's folder holds it, the note sends the user there; beside OUTPUT, no note.
  fs::copy_file(dir / "ck" / data, dir / "cj" / data);
  const Result found =
      run("convert --no-check " + cj + "/none.json " + other + "/none4.moert", dir);
  EXPECT_NE(found.out.find(note + "is not there: copy it from " + cj + "\n"), std::string::npos)
      << found.out;
  const Result there = run("convert --no-check " + cj + "/none.json " + cj + "/none5.moert", dir);
  ASSERT_EQ(there.code, 0) << there.err;
  EXPECT_EQ(there.out.find("note:"), std::string::npos) << there.out;
}

std::vector<std::map<std::string, std::string>> read_csv(const fs::path& p,
                                                         std::vector<std::string>& header) {
  std::ifstream in(p);
  std::string line;
  std::vector<std::map<std::string, std::string>> rows;
  auto split = [](const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string cell;
    while (std::getline(ss, cell, ',')) out.push_back(cell);
    return out;
  };
  if (!std::getline(in, line)) return rows;
  header = split(line);
  while (std::getline(in, line)) {
    const auto cells = split(line);
    std::map<std::string, std::string> row;
    for (size_t i = 0; i < cells.size() && i < header.size(); ++i) row[header[i]] = cells[i];
    rows.push_back(row);
  }
  return rows;
}

// --precision bf16 / fp8: the experts multiply in that precision and the model still learns.
class CliLowPrecision : public ::testing::TestWithParam<const char*> {};

TEST_P(CliLowPrecision, TinyTrainingLearns) {
  const std::string p = GetParam();
  const fs::path dir = workdir("train_" + p);
  const fs::path csv = dir / "steps.csv";
  const Result r =
      run(std::string("train --corpus ") + MOERT_TINY_CORPUS +
              " --steps 60 --batch 64 --context 4 --embed-dim 8 --blocks 1 --experts 4"
              " --top-k 2 --expert-hidden 8 --shared 1 --shared-hidden 8 --warmup 5 --lr 0.01"
              " --val-every 5 --threads 2 --probe-rows 0 --balancing loss-free --precision " +
              p + " --csv " + csv.string(),
          dir);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("experts in " + p), std::string::npos) << r.out;
  std::vector<std::string> header;
  const auto rows = read_csv(csv, header);
  ASSERT_EQ(rows.size(), 60u);
  const double first = std::stod(rows.front().at("train_loss"));
  const double last = std::stod(rows.back().at("train_loss"));
  EXPECT_LT(last, first - 0.5) << r.out;
}

// The bench runs the layer in fp32 and in the precision asked for, and prints both rates and the
// distance of the low-precision results to fp32 per GEMM kind.
TEST_P(CliLowPrecision, BenchPrintsBothPrecisions) {
  const std::string p = GetParam();
  const fs::path dir = workdir("bench_" + p);
  const Result r = run("bench --quick --threads 1 --no-libraries --precision " + p, dir);
  ASSERT_EQ(r.code, 0) << r.err;
  for (const std::string& q : {std::string("fp32"), p}) {
    EXPECT_TRUE(std::regex_search(r.out, std::regex("\nforward +" + q + "( +[0-9.]+){3}")))
        << r.out;
    EXPECT_TRUE(
        std::regex_search(r.out, std::regex("\nforward\\+backward +" + q + "( +[0-9.]+){3}")))
        << r.out;
  }
  EXPECT_NE(r.out.find(p + " / fp32 speed"), std::string::npos) << r.out;
  // E4M3 is about 16x coarser than bf16: its distance to fp32 is of the order of 1e-2.
  EXPECT_TRUE(
      std::regex_search(r.out, std::regex(p + " against fp32.*Fprop \\(output\\) [0-9.]+e-0" +
                                          (p == "fp8" ? "[12]" : "[2-5]"))))
      << r.out;
}

// After training in a low precision, each trained MoE block's GEMMs are run on its own weights and
// real operands in fp32 and in that precision, and their distance is printed per block and kind.
TEST_P(CliLowPrecision, TrainPrintsGemmAccuracyOnTrainedOperands) {
  const std::string p = GetParam();
  const fs::path dir = workdir("train_accuracy_" + p);
  const Result r =
      run(std::string("train --corpus ") + MOERT_TINY_CORPUS +
              " --steps 30 --batch 64 --context 4 --embed-dim 8 --blocks 2 --experts 4"
              " --top-k 2 --expert-hidden 8 --shared 1 --shared-hidden 8 --warmup 5 --lr 0.01"
              " --val-every 5 --threads 2 --probe-rows 256 --balancing none,loss-free"
              " --precision " +
              p,
          dir);
  ASSERT_EQ(r.code, 0) << r.err;
  ASSERT_NE(r.out.find("GEMM accuracy on the trained models: ||" + p + " - fp32||"),
            std::string::npos)
      << r.out;
  EXPECT_TRUE(std::regex_search(r.out, std::regex("Fprop +Dgrad +Wgrad w1 +Wgrad w3 +Wgrad w2 +"
                                                  "Wgrad shared_w1 +Wgrad shared_w3 +"
                                                  "Wgrad shared_w2\n")))
      << r.out;
  // bf16 keeps 8 significant bits, E4M3 4: relative errors of a few 1e-3 and a few 1e-2, never 0
  // (the operands are rounded) and never of order 1 (the result would be noise).
  const double lo = p == "fp8" ? 2e-3 : 2e-4, hi = p == "fp8" ? 0.15 : 0.02;
  int rows = 0;
  for (const char* s : {"none", "loss-free"})
    for (int b = 0; b < 2; ++b) {
      std::smatch m;
      const std::string num = "([0-9.]+e[-+][0-9]+)";
      std::string pattern = std::string("\n") + s + " +" + std::to_string(b);
      for (int c = 0; c < 8; ++c) pattern += " +" + num;
      ASSERT_TRUE(std::regex_search(r.out, m, std::regex(pattern + "\n")))
          << s << " block " << b << "\n"
          << r.out;
      for (size_t c = 1; c < m.size(); ++c) {
        const double v = std::stod(m[c].str());
        EXPECT_GT(v, lo) << s << " block " << b << " column " << c << "\n" << r.out;
        EXPECT_LT(v, hi) << s << " block " << b << " column " << c << "\n" << r.out;
      }
      ++rows;
    }
  EXPECT_EQ(rows, 4);
}

INSTANTIATE_TEST_SUITE_P(Precisions, CliLowPrecision, ::testing::Values("bf16", "fp8"));

// Settings that run but are rarely meant are said in the report (stderr stays for errors), and
// the run goes on; the usual ones say nothing.
TEST(Cli, TrainNotesAZeroLearningRateAndAWarmUpAsLongAsTheRun) {
  const fs::path dir = workdir("train_notes");
  const std::string tiny = std::string("train --corpus ") + MOERT_TINY_CORPUS +
                           " --steps 4 --batch 16 --context 4 --embed-dim 8 --blocks 1"
                           " --experts 4 --top-k 2 --expert-hidden 8 --shared 0 --threads 1"
                           " --probe-rows 0 --balancing loss-free";
  const Result zero = run(tiny + " --lr 0 --warmup 1", dir);
  ASSERT_EQ(zero.code, 0) << zero.err;
  EXPECT_NE(zero.out.find("note: --lr 0 leaves every weight unchanged"), std::string::npos)
      << zero.out;
  const Result long_warmup = run(tiny + " --warmup 4", dir);
  ASSERT_EQ(long_warmup.code, 0) << long_warmup.err;
  EXPECT_NE(long_warmup.out.find("note: --warmup 4 is not shorter than --steps 4"),
            std::string::npos)
      << long_warmup.out;
  const Result usual = run(tiny + " --warmup 3", dir);
  ASSERT_EQ(usual.code, 0) << usual.err;
  EXPECT_EQ(usual.out.find("note:"), std::string::npos) << usual.out;
}

TEST(Cli, TinyTrainingLearnsAndWritesMetrics) {
  const fs::path dir = workdir("train");
  const fs::path csv = dir / "steps.csv", save = dir / "models";
  const int steps = 80;
  const Result r =
      run(std::string("train --corpus ") + MOERT_TINY_CORPUS + " --steps " + std::to_string(steps) +
              " --batch 64 --context 4 --embed-dim 8 --blocks 1 --experts 4"
              " --top-k 2 --expert-hidden 8 --shared 1 --shared-hidden 8"
              " --warmup 5 --lr 0.01 --min-lr 0.001 --val-every 5 --threads 1"
              " --probe-rows 256 --balancing none,aux,loss-free:gamma=0.01 --csv " +
              csv.string() + " --save " + save.string(),
          dir);
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* s : {"none", "aux", "loss-free(gamma=0.01)"})
    EXPECT_TRUE(std::regex_search(
        r.out, std::regex(std::string("\n") + std::regex_replace(s, std::regex("[()]"), "\\$&") +
                          " +[0-9.]+ +[0-9.]+ +[0-9.]+")))
        << s << "\n"
        << r.out;
  EXPECT_NE(r.out.find("router diagnostics"), std::string::npos);
  EXPECT_EQ(r.out.find("GEMM accuracy"), std::string::npos) << "fp32 has nothing to compare";
  EXPECT_NE(r.out.find("validation 8 records"), std::string::npos) << r.out;
  // Progress goes to stderr as plain lines when it is not a terminal.
  EXPECT_NE(r.err.find("none: step 8/80"), std::string::npos) << r.err;

  std::vector<std::string> header;
  const auto rows = read_csv(csv, header);
  EXPECT_EQ(header, (std::vector<std::string>{"strategy", "step", "train_loss", "aux_loss",
                                              "max_vio_batch", "lr", "grad_norm"}));
  ASSERT_EQ(rows.size(), 3u * steps);
  std::map<std::string, std::vector<double>> loss;
  for (const auto& row : rows) {
    loss[row.at("strategy")].push_back(std::stod(row.at("train_loss")));
    const double vio = std::stod(row.at("max_vio_batch"));
    EXPECT_GE(vio, 0.0);
    EXPECT_LE(vio, 1.0);  // 4 experts: MaxVio is at most E - 1 = 3; top-2 of 4 caps it at 1
    if (row.at("strategy") != "aux") {
      EXPECT_EQ(std::stod(row.at("aux_loss")), 0.0);
    }
  }
  ASSERT_EQ(loss.size(), 3u);
  for (const auto& [name, l] : loss) {
    double first = 0.0, last = 0.0;
    for (int i = 0; i < 10; ++i) {
      first += l[i] / 10;
      last += l[l.size() - 1 - i] / 10;
    }
    // From about ln(98) = 4.6 nats at the start; a character model of this text gets well under.
    EXPECT_GT(first, 4.0) << name;
    EXPECT_LT(last, first - 1.0) << name;
  }

  // A saved run is a checkpoint that `moert eval` reads, with the split `train` used.
  const fs::path ckpt = save / "loss-free(gamma=0.01).moert";
  ASSERT_TRUE(fs::exists(ckpt));
  const Result e = run(
      "eval '" + ckpt.string() + "' --json --threads 1 --val-every 5 --corpus " + MOERT_TINY_CORPUS,
      dir);
  ASSERT_EQ(e.code, 0) << e.err;
  const double val_loss = json_value(e.out, "loss");
  EXPECT_GT(val_loss, 0.5);
  EXPECT_LT(val_loss, 4.0);
  EXPECT_EQ(json_value(e.out, "experts"), 4.0);
  // Inspected, it says it is a checkpoint and at which step; a plain model says it is none.
  const Result ins = run("inspect '" + ckpt.string() + "'", dir);
  ASSERT_EQ(ins.code, 0) << ins.err;
  EXPECT_NE(ins.out.find("checkpoint: training state at step 80, verified"), std::string::npos)
      << ins.out;
  const Result insj = run("inspect --json '" + ckpt.string() + "'", dir);
  ASSERT_EQ(insj.code, 0) << insj.err;
  EXPECT_NE(insj.out.find("\"checkpoint\": {\"step\": 80, \"verified\": true}"), std::string::npos)
      << insj.out;
  EXPECT_EQ(json_value(insj.out, "saved_bias_update_rate"), static_cast<double>(0.01f));
  EXPECT_NE(
      run(std::string("inspect --json ") + MOERT_TINY_MODEL, dir).out.find("\"checkpoint\": null"),
      std::string::npos);
  // A corpus may come through a pipe (a FIFO a writer feeds, as /dev/stdin or <(...) would).
  const fs::path fifo = dir / "corpus.fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  ASSERT_EQ(
      std::system(
          ("cat '" + std::string(MOERT_TINY_CORPUS) + "' > '" + fifo.string() + "' &").c_str()),
      0);
  const Result piped =
      run("eval '" + ckpt.string() + "' --json --threads 1 --val-every 5 --corpus " + fifo.string(),
          dir);
  ASSERT_EQ(piped.code, 0) << piped.err;
  EXPECT_EQ(json_value(piped.out, "loss"), val_loss);
  // The same figure as the training table's row for that run.
  std::ostringstream four;
  four.precision(4);
  four << std::fixed << val_loss;
  EXPECT_NE(r.out.find("loss-free(gamma=0.01)"), std::string::npos);
  EXPECT_NE(r.out.find(four.str()), std::string::npos) << four.str() << "\n" << r.out;

  // Quantizing a checkpoint writes a model of its parameters, and says the state stays behind.
  const Result q =
      run("convert --quantize fp8 '" + ckpt.string() + "' " + (dir / "q.moert").string(), dir);
  ASSERT_EQ(q.code, 0) << q.err;
  EXPECT_NE(q.out.find("is a checkpoint"), std::string::npos) << q.out;
  EXPECT_NE(q.out.find("training state (step, gradients, optimizer moments, balancing counts) is "
                       "not carried over"),
            std::string::npos)
      << q.out;

  // The plot script turns the CSV into a PNG (skipped where matplotlib is missing).
  if (std::system("/usr/bin/python3 -c 'import matplotlib' 2>/dev/null") != 0)
    GTEST_SKIP() << "no matplotlib for /usr/bin/python3: the plot is not checked";
  const fs::path png = dir / "plot.png";
  const std::string plot = std::string("/usr/bin/python3 '") + MOERT_PLOT_SCRIPT + "' '" +
                           csv.string() + "' '" + png.string() + "' --floor 0.1 >/dev/null";
  ASSERT_EQ(std::system(plot.c_str()), 0);
  EXPECT_EQ(slurp(png).substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
}

// A last, partial batch is padded with masked rows: the figures are those of any batch size.
TEST(Cli, EvalPadsItsLastBatchWithoutChangingAnything) {
  const fs::path dir = workdir("eval-pad");
  ASSERT_EQ(run(std::string("train --corpus ") + MOERT_TINY_CORPUS +
                    " --steps 3 --batch 32 --context 4 --embed-dim 8 --blocks 1 --experts 4"
                    " --top-k 2 --expert-hidden 8 --threads 1 --val-every 5 --probe-rows 64"
                    " --balancing loss-free --save " +
                    (dir / "models").string(),
                dir)
                .code,
            0);
  const fs::path ckpt = dir / "models" / "loss-free.moert";
  ASSERT_TRUE(fs::exists(ckpt));
  const std::string base = "eval '" + ckpt.string() +
                           "' --json --threads 1 --val-every 5 --rows 301 --corpus " +
                           MOERT_TINY_CORPUS;
  const Result whole = run(base + " --batch 301", dir);
  const Result padded = run(base + " --batch 64", dir);
  ASSERT_EQ(whole.code, 0) << whole.err;
  ASSERT_EQ(padded.code, 0) << padded.err;
  // The loss follows the batching in its last bits (a mean of per-batch means, and GEMMs whose
  // row blocks differ); MaxVio and the counts are integers' and exact.
  EXPECT_NEAR(json_value(whole.out, "loss"), json_value(padded.out, "loss"), 1e-8);
  EXPECT_EQ(json_value(whole.out, "max_vio_global"), json_value(padded.out, "max_vio_global"));
  EXPECT_EQ(json_value(whole.out, "characters"), 301.0);
  EXPECT_EQ(json_value(padded.out, "characters"), 301.0);
  EXPECT_EQ(whole.out.substr(whole.out.find("\"moe_layers\"")),
            padded.out.substr(padded.out.find("\"moe_layers\"")));
  // The cross-entropy between the passes runs on the session's threads, summed in fixed blocks:
  // the same bits for any thread count, as the passes give.
  const Result threaded = run("eval '" + ckpt.string() +
                                  "' --json --threads 3 --val-every 5 --rows 301 --batch 301 "
                                  "--corpus " +
                                  MOERT_TINY_CORPUS,
                              dir);
  ASSERT_EQ(threaded.code, 0) << threaded.err;
  EXPECT_EQ(json_value(threaded.out, "loss"), json_value(whole.out, "loss"));
  // A plain text file (no '%' lines: one record) has no validation split, but --split all and
  // --split train evaluate it whole; --split validation says why it cannot.
  std::ofstream(dir / "plain.txt") << "A plain text of one record, which is all of it.\n";
  const std::string plain = "eval '" + ckpt.string() + "' --json --threads 1 --corpus " +
                            (dir / "plain.txt").string() + " --split ";
  for (const char* split : {"all", "train"}) {
    const Result r = run(plain + split, dir);
    EXPECT_EQ(r.code, 0) << split << ": " << r.err;
    // Its 48 characters and the "%\n" after the record, less the first context of 4.
    EXPECT_EQ(json_value(r.out, "characters"), 48.0 + 2.0 - 4.0) << split;
  }
  expect_one_line_error(run(plain + "validation", dir), 1, "eval",
                        "lines holding only '%': a plain text file without them is one record");
  // A corpus path is printed with its control characters as \xNN, like every name from outside.
  fs::copy_file(dir / "plain.txt", dir / "c\x1b[31mx.txt");
  const Result escaped = run("eval '" + ckpt.string() + "' --threads 1 --split all --corpus '" +
                                 (dir / "c\x1b[31mx.txt").string() + "'",
                             dir);
  EXPECT_EQ(escaped.code, 0) << escaped.err;
  EXPECT_EQ(escaped.out.find('\x1b'), std::string::npos) << escaped.out;
  EXPECT_NE(escaped.out.find("c\\x1B[31mx.txt"), std::string::npos) << escaped.out;
}

// A diverged run's perplexity (exp of a loss past 100) is printed in exponent form: its 60 or 150
// digits broke the table's columns.
TEST(Cli, ADivergedRunsPerplexityKeepsTheTableAligned) {
  const fs::path dir = workdir("diverged");
  const Result r = run(std::string("train --corpus ") + MOERT_TINY_CORPUS +
                           " --steps 30 --lr 3 --clip 0 --warmup 0 --balancing none "
                           "--probe-rows 0 --batch 64 --threads 1",
                       dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const size_t header = r.out.find("val ppl");
  ASSERT_NE(header, std::string::npos) << r.out;
  const size_t row = r.out.find("\nnone ", header);
  ASSERT_NE(row, std::string::npos) << r.out;
  const std::string line = r.out.substr(row + 1, r.out.find('\n', row + 1) - row - 1);
  const std::string head_line = r.out.substr(
      r.out.rfind('\n', header) + 1, r.out.find('\n', header) - r.out.rfind('\n', header) - 1);
  EXPECT_NE(line.find("e+"), std::string::npos) << line;
  // The row is as long as the header: every column kept its width.
  EXPECT_LE(line.size(), head_line.size() + 2) << head_line << "\n" << line;
}

TEST(Cli, BenchQuickPrintsItsTable) {
  const fs::path dir = workdir("bench");
  const Result r = run("bench --quick --threads 1 --precision bf16", dir);
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* p : {"fp32", "bf16"}) {
    EXPECT_TRUE(std::regex_search(
        r.out, std::regex(std::string("\nforward +") + p + "( +[0-9.]+){3} +([0-9.]+|n/a)")))
        << r.out;
    EXPECT_TRUE(std::regex_search(
        r.out, std::regex(std::string("\nforward\\+backward +") + p + "( +[0-9.]+){3}")))
        << r.out;
  }
  // The limits and the ISA that ran are printed beside the figures.
  EXPECT_NE(r.out.find("fp32 FMA peak"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("memory read"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("oneDNN ISA: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("best single-GEMM rate"), std::string::npos) << r.out;
  // Each fp32 pass is also set against that GEMM run right before it (/GEMM beside); the bf16
  // passes are not.
  for (const char* pass : {"forward", "forward\\+backward"}) {
    EXPECT_TRUE(std::regex_search(
        r.out,
        std::regex(std::string("\n") + pass + " +fp32( +[0-9.]+){3} +[0-9.]+ +[0-9.]+ +[0-9.]+\n")))
        << r.out;
    EXPECT_TRUE(std::regex_search(
        r.out,
        std::regex(std::string("\n") + pass + " +bf16( +[0-9.]+){3} +[0-9.]+ +n/a +[0-9.]+\n")))
        << r.out;
  }
  EXPECT_TRUE(std::regex_search(r.out, std::regex("Fprop \\(output\\) [0-9.]+e-0[2-5]"))) << r.out;
  // The JSON carries every GEMM kind's distance the table prints, each weight's Wgrad too.
  const Result b = run("bench --quick --threads 1 --precision bf16 --json", dir);
  ASSERT_EQ(b.code, 0) << b.err;
  const size_t wgrad = b.out.find("\"error_wgrad\": {");
  ASSERT_NE(wgrad, std::string::npos) << b.out;
  for (const char* w : {"w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2"}) {
    const double e = json_value(b.out, w, wgrad);
    EXPECT_TRUE(e > 1e-5 && e < 1e-2) << w << " " << e << "\n" << b.out;
  }
  const Result j = run("bench --quick --threads 1 --json", dir);
  ASSERT_EQ(j.code, 0) << j.err;
  // The quick layer: 256 tokens of width 64, 8 experts x 64, top-2, 1 shared x 64.
  EXPECT_EQ(json_value(j.out, "assignments"), 512.0);
  const double fwd = 256.0 * (2 * 64 * 8 + 6.0 * 64 * 64) + 512.0 * 6 * 64 * 64;
  EXPECT_EQ(json_value(j.out, "flops"), fwd);
  EXPECT_GT(json_value(j.out, "gflops"), 0.0);
  const size_t beside = j.out.find("\"beside\"");
  ASSERT_NE(beside, std::string::npos) << j.out;
  for (const char* key : {"gflops", "forward", "forward_backward"})
    EXPECT_GT(json_value(j.out, key, beside), 0.0) << key << "\n" << j.out;
  EXPECT_EQ(j.err.find("exceeds"), std::string::npos) << j.err;
  // More threads than CPUs: said at once, on stderr, and the run still measures.
  cpu_set_t cpus;
  ASSERT_EQ(sched_getaffinity(0, sizeof cpus, &cpus), 0);
  const int over = CPU_COUNT(&cpus) + 1;
  const Result o = run("bench --quick --threads " + std::to_string(over) + " --json", dir);
  ASSERT_EQ(o.code, 0) << o.err;
  EXPECT_NE(o.err.find("note: --threads " + std::to_string(over) + " exceeds the"),
            std::string::npos)
      << o.err;
  EXPECT_GT(json_value(o.out, "gflops"), 0.0);
  // Far more threads than CPUs: the peak probe runs each thread's share of a CPU's work, so a
  // quick run stays quick (64 threads on 2 CPUs took 2 minutes with each thread's full share),
  // and the peak is still the CPUs' own.
  const Result many = run("bench --quick --no-libraries --repeats 1 --threads 64 --json", dir);
  ASSERT_EQ(many.code, 0) << many.err;
  EXPECT_GT(json_value(many.out, "peak_gflops"), 0.0);
  EXPECT_LT(json_value(many.out, "peak_gflops"), 4 * json_value(j.out, "peak_gflops") * over);
  // And by CPU time, which threads taking turns do not add to: divided by the CPUs, not the
  // threads (which put the peak at threads / CPUs times the CPUs' own).
  const Result cpu_time =
      run("bench --quick --no-libraries --repeats 1 --threads 64 --cpu-time --json", dir);
  ASSERT_EQ(cpu_time.code, 0) << cpu_time.err;
  EXPECT_LT(json_value(cpu_time.out, "peak_gflops"), 4 * json_value(j.out, "peak_gflops") * over);
}

// A top-1 layer is timed too: its gate weights are left unnormalised (renormalised, each would be
// 1 and the training pass would be refused for giving the router no gradient, as it was).
TEST(Cli, BenchTimesATopOneLayer) {
  const Result r =
      run("bench --quick --threads 1 --no-libraries --top-k 1 --json", workdir("bench_top1"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json_value(r.out, "assignments"), 256.0);  // the quick layer's 256 tokens, one each
  // No library ran: the baseline's figures are null, not zeros that read as measured.
  EXPECT_NE(r.out.find("\"gemm\": {\"library\": null, \"forward\": {\"gflops\": null}"),
            std::string::npos)
      << r.out;
  const size_t at = r.out.find("\"forward_backward\"");
  ASSERT_NE(at, std::string::npos) << r.out;
  EXPECT_GT(json_value(r.out, "gflops", at), 0.0) << r.out;
}

TEST(Cli, BenchDecodeSetsEachBatchAgainstItsRoofline) {
  // A small decode layer (the real one builds 6 GB): d 256, 8 experts x 128 + 1 shared, top-2.
  const fs::path dir = workdir("bench_decode");
  const std::string layer =
      "bench --quick --threads 1 --no-libraries --decode --decode-dim 256 --decode-hidden 128 "
      "--decode-experts 8 --decode-top-k 2";
  const Result r = run(layer, dir);
  ASSERT_EQ(r.code, 0) << r.err;
  // rows, experts; MB, GFLOP, ms, GB/s, read GB/s, /read, GF/s; the bound, /roofline.
  for (const char* rows : {"1", "8", "64"})
    EXPECT_TRUE(std::regex_search(
        r.out,
        std::regex(std::string(R"(\n +)") + rows +
                   R"( +[0-9]+\+1( +[0-9.]+){7} +(memory +[0-9.]+|compute +[0-9.]+|n/a +n/a))")))
        << r.out;
  EXPECT_NE(r.out.find("roofline: the longer of"), std::string::npos) << r.out;
  const Result j = run(layer + " --json", dir);
  ASSERT_EQ(j.code, 0) << j.err;
  const size_t at = j.out.find("\"decode\"");
  ASSERT_NE(at, std::string::npos) << j.out;
  // One row: the router (2 d E), the shared expert (6 d h) and its top-2 experts (2 x 6 d h).
  EXPECT_EQ(json_value(j.out, "flops", at), 256.0 * (2 * 8 + 6 * 128 + 2 * 6 * 128));
  EXPECT_GT(json_value(j.out, "gflops", at), 0.0);
  // Each batch carries the read bandwidth measured beside its passes.
  EXPECT_GT(json_value(j.out, "read_gbps", at), 0.0);
  // Where the compute limit is known the time is at least the roofline's, up to timing noise.
  const size_t roof = j.out.find("\"roofline\": ", at);
  ASSERT_NE(roof, std::string::npos) << j.out;
  if (j.out.compare(roof + 12, 4, "null") != 0) {
    EXPECT_LT(json_value(j.out, "roofline", at), 1.5);
  }
}

}  // namespace
