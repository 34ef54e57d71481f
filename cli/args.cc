#include "cli/args.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <stdexcept>

#include "cli/error.h"

namespace moert_cli {

std::string help_text(const CommandSpec& spec) {
  std::string out =
      "usage: moert " + spec.name + " " + spec.synopsis + "\n\n" + spec.summary + "\n";
  if (!spec.description.empty()) out += "\n" + spec.description + "\n";
  out += "\noptions:\n";
  std::vector<std::pair<std::string, std::string>> rows;
  for (const Flag& f : spec.flags) {
    std::string left = "  --" + f.name + (f.value_name.empty() ? "" : " " + f.value_name);
    std::string right = f.help;
    if (!f.default_text.empty()) right += " (default " + f.default_text + ")";
    rows.emplace_back(left, right);
  }
  rows.emplace_back("  -h, --help", "print this help and exit");
  size_t width = 0;
  for (const auto& [l, r] : rows) width = std::max(width, l.size());
  for (const auto& [l, r] : rows) out += l + std::string(width + 2 - l.size(), ' ') + r + "\n";
  return out;
}

Args::Args(const CommandSpec& spec, int argc, char** argv, int first) : spec_(spec) {
  bool flags_done = false;
  // The first option given twice: refused after the loop, so that a --help after it still wins.
  std::string twice;
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    // -h, as at the top level: the only short option.
    if (!flags_done && a == "-h") {
      help_ = true;
      continue;
    }
    if (flags_done || a.size() < 2 || a.compare(0, 2, "--") != 0 || a == "-") {
      if (!flags_done && a.size() > 1 && a[0] == '-' && a != "-")
        usage_fail("unknown option '", a, "' (see 'moert ", spec.name, " --help')");
      positional_.push_back(a);
      continue;
    }
    if (a == "--") {
      flags_done = true;
      continue;
    }
    if (a == "--help") {
      help_ = true;
      continue;
    }
    const size_t eq = a.find('=');
    const std::string name = a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    const Flag* flag = nullptr;
    for (const Flag& f : spec.flags)
      if (f.name == name) flag = &f;
    if (!flag) usage_fail("unknown option '--", name, "' (see 'moert ", spec.name, " --help')");
    if (!flag->repeatable && values_.count(name) && twice.empty()) twice = name;
    if (flag->value_name.empty()) {
      if (eq != std::string::npos) usage_fail("option '--", name, "' takes no value");
      values_[name] = "true";
    } else if (eq != std::string::npos) {
      values_[name] = a.substr(eq + 1);
    } else {
      if (i + 1 >= argc) usage_fail("option '--", name, "' needs a value (", flag->value_name, ")");
      const std::string next = argv[i + 1];
      if (next == "--help") {  // help wins, wherever it stands
        help_ = true;
        ++i;
        continue;
      }
      if (next.compare(0, 2, "--") == 0)
        usage_fail("option '--", name, "' needs a value (", flag->value_name, "), got the option '",
                   next, "' (a value that starts with -- is written --", name, "=VALUE)");
      values_[name] = argv[++i];
    }
    every_[name].push_back(values_[name]);
  }
  if (help_) return;
  if (!twice.empty()) {
    const std::vector<std::string>& values = every_[twice];
    const Flag& f = declared(twice);
    usage_fail("--", twice, " given twice",
               f.value_name.empty() ? "" : cat(" ('", values[0], "' and '", values[1], "')"),
               ": give it once");
  }
  if (positional_.size() < spec.min_positional || positional_.size() > spec.max_positional)
    usage_fail("expected ", spec.synopsis.empty() ? "no arguments" : spec.synopsis, " (see 'moert ",
               spec.name, " --help')");
  // An empty path names nothing: the working directory to some calls, an error to others.
  for (size_t i = 0; i < positional_.size(); ++i)
    if (positional_[i].empty())
      usage_fail("argument ", i + 1, " is empty: every argument of 'moert ", spec.name,
                 "' names a file or a directory (see 'moert ", spec.name, " --help')");
  for (const Flag& f : spec.flags)
    if (f.value_name == "DIR" || f.value_name == "FILE" || f.value_name == "PATH")
      if (auto it = every_.find(f.name); it != every_.end())
        for (const std::string& value : it->second)
          if (value.empty())
            usage_fail("option '--", f.name, "' needs a ", f.value_name, ", got an empty value");
}

const Flag& Args::declared(const std::string& flag) const {
  for (const Flag& f : spec_.flags)
    if (f.name == flag) return f;
  throw std::logic_error("moert " + spec_.name + " reads undeclared option --" + flag);
}

bool Args::has(const std::string& flag) const {
  declared(flag);
  return values_.count(flag) != 0;
}

std::vector<std::string> Args::every(const std::string& flag) const {
  if (!declared(flag).repeatable)
    throw std::logic_error("moert " + spec_.name + " reads every value of --" + flag +
                           ", which is not declared repeatable");
  auto it = every_.find(flag);
  return it == every_.end() ? std::vector<std::string>{} : it->second;
}

std::string Args::str(const std::string& flag, const std::string& fallback) const {
  declared(flag);
  auto it = values_.find(flag);
  return it == values_.end() ? fallback : it->second;
}

std::string Args::canonical(const std::vector<std::string>& except) const {
  std::string out;
  // Lengths first: no text can be mistaken for a separator.
  auto put = [&out](const std::string& s) { out += std::to_string(s.size()) + ":" + s; };
  for (const auto& p : positional_) put(p);
  for (const auto& [name, values] : every_) {
    if (std::find(except.begin(), except.end(), name) != except.end()) continue;
    put("--" + name);
    for (const auto& v : values) put(v);
  }
  return out;
}

int64_t parse_integer(const std::string& what, const std::string& text, int64_t lo, int64_t hi) {
  int64_t v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (ec != std::errc() || ptr != end || v < lo || v > hi)
    usage_fail(what, " takes an integer in [", lo, ", ", hi, "], got '", text, "'");
  return v;
}

double parse_real(const std::string& what, const std::string& text, double lo, double hi) {
  double v = 0.0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (ec != std::errc() || ptr != end || !std::isfinite(v) || v < lo || v > hi)
    usage_fail(what, " takes a number in [", lo, ", ", hi, "], got '", text, "'");
  return v;
}

int64_t Args::integer(const std::string& flag, int64_t fallback, int64_t lo, int64_t hi) const {
  if (!has(flag)) return fallback;
  return parse_integer("--" + flag, values_.at(flag), lo, hi);
}

double Args::real(const std::string& flag, double fallback, double lo, double hi) const {
  if (!has(flag)) return fallback;
  return parse_real("--" + flag, values_.at(flag), lo, hi);
}

}  // namespace moert_cli
