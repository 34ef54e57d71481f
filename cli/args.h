// Command-line parsing for the subcommands: each declares its flags and positional arguments once,
// and both the parser and the --help text come from that declaration.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moert_cli {

struct Flag {
  std::string name;        // without the leading "--"
  std::string value_name;  // empty: a switch that takes no value
  std::string help;
  std::string default_text;  // shown in --help; empty: none
  // Whether it may be given more than once (import's --layer): any other option given twice is a
  // usage error, since keeping the last value would drop the first without a word.
  bool repeatable = false;
};

struct CommandSpec {
  std::string name;         // "inspect"
  std::string synopsis;     // "MODEL [--json]"
  std::string summary;      // one line, for `moert --help`
  std::string description;  // paragraphs printed under the usage line
  size_t min_positional = 0;
  size_t max_positional = 0;
  std::vector<Flag> flags;
};

std::string help_text(const CommandSpec& spec);

class Args {
 public:
  // Parses argv[first..argc); throws UsageError on an unknown flag, a missing value or a wrong
  // number of positional arguments (unless --help was given).
  Args(const CommandSpec& spec, int argc, char** argv, int first);

  bool help() const { return help_; }
  const std::vector<std::string>& positional() const { return positional_; }
  bool has(const std::string& flag) const;
  std::string str(const std::string& flag, const std::string& fallback) const;
  // Every value of a repeatable flag ("--layer 3 --layer 5"), in order.
  std::vector<std::string> every(const std::string& flag) const;
  // Numbers are checked against [lo, hi]; a malformed or out-of-range value is a UsageError.
  int64_t integer(const std::string& flag, int64_t fallback, int64_t lo, int64_t hi) const;
  double real(const std::string& flag, double fallback, double lo, double hi) const;
  // The positional arguments and every flag's values, in a canonical order, but for the flags
  // named in `except`: what the ranks of a job compare to learn they were started alike.
  std::string canonical(const std::vector<std::string>& except) const;

 private:
  const Flag& declared(const std::string& flag) const;

  const CommandSpec& spec_;
  bool help_ = false;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> every_;
  std::vector<std::string> positional_;
};

// Strict number parsing shared with other option syntaxes (e.g. "loss-free:gamma=0.01").
int64_t parse_integer(const std::string& what, const std::string& text, int64_t lo, int64_t hi);
double parse_real(const std::string& what, const std::string& text, double lo, double hi);

}  // namespace moert_cli
