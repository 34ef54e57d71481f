// `moert`: the command-line front end of the moert library. It reaches the library only through
// the public C ABI (moert.h), like any other program that links libmoert.
#include <moert/moert.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "cli/error.h"

namespace {

using moert_cli::Command;
using moert_cli::print_error;

const Command kCommands[] = {
    {moert_cli::kTrainSpec, moert_cli::run_train},
    {moert_cli::kEvalSpec, moert_cli::run_eval},
    {moert_cli::kInspectSpec, moert_cli::run_inspect},
    {moert_cli::kConvertSpec, moert_cli::run_convert},
    {moert_cli::kBenchSpec, moert_cli::run_bench},
    {moert_cli::kImportSpec, moert_cli::run_import},
    {moert_cli::kExportSpec, moert_cli::run_export},
};

void print_overview(std::FILE* to) {
  std::fprintf(
      to,
      "usage: moert COMMAND [ARGS] [--help]\n\n"
      "The command-line front end of moert %s, an embeddable Mixture-of-Experts runtime.\n\n"
      "commands:\n",
      moert_version_string());
  for (const Command& c : kCommands)
    std::fprintf(to, "  %-9s %s\n", c.spec.name.c_str(), c.spec.summary.c_str());
  std::fprintf(
      to, "\n'moert COMMAND --help' describes a command. 'moert --version' prints versions.\n");
}

int run(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "moert: error: no command given (see 'moert --help')\n");
    return 2;
  }
  const std::string name = argv[1];
  // 'moert help COMMAND' is 'moert COMMAND --help'.
  if (name == "help" && argc == 3) {
    const std::string what = argv[2];
    if (what == "help" || what == "-h" || what == "--help") {
      print_overview(stdout);
      return 0;
    }
    for (const Command& c : kCommands)
      if (c.spec.name == argv[2]) {
        std::fputs(moert_cli::help_text(c.spec).c_str(), stdout);
        return 0;
      }
    print_error("moert", std::string("unknown command '") + argv[2] + "' (see 'moert --help')");
    return 2;
  }
  if ((name == "--help" || name == "-h" || name == "help" || name == "--version") && argc > 2) {
    // 'help COMMAND EXTRA' names the extra word, not the command.
    const char* extra = name == "help" && argc > 3 ? argv[3] : argv[2];
    print_error("moert", "'" + name + "' takes no arguments" +
                             (name == "help" ? " but a command's name" : "") + " (got '" + extra +
                             "')");
    return 2;
  }
  if (name == "--help" || name == "-h" || name == "help") {
    print_overview(stdout);
    return 0;
  }
  if (name == "--version") {
    uint32_t major = 0, minor = 0;
    moert_schema_version(&major, &minor);
    std::printf("moert %s (library ABI %u, model schema %u.%u)\n", moert_version_string(),
                moert_abi_version(), major, minor);
    return 0;
  }
  if (moert_abi_version() != MOERT_ABI_VERSION) {
    std::fprintf(stderr, "moert: error: libmoert implements ABI %u, this program needs %u\n",
                 moert_abi_version(), MOERT_ABI_VERSION);
    return 1;
  }
  for (const Command& c : kCommands) {
    if (c.spec.name != name) continue;
    moert_cli::set_command_name("moert " + name);
    try {
      moert_cli::Args args(c.spec, argc, argv, 2);
      if (args.help()) {
        std::fputs(moert_cli::help_text(c.spec).c_str(), stdout);
        return 0;
      }
      return c.run(args);
    } catch (const moert_cli::ReportedError& e) {
      return e.code();
    } catch (const moert_cli::UsageError& e) {
      print_error("moert " + name, e.message());
      return 2;
    } catch (const std::bad_alloc&) {
      std::fprintf(stderr, "moert %s: error: out of memory\n", name.c_str());
      return 1;
    } catch (const moert_cli::Error& e) {
      print_error("moert " + name, e.message());
      return 1;
    } catch (const std::exception& e) {
      print_error("moert " + name, e.what());
      return 1;
    }
  }
  print_error("moert", "unknown command '" + name + "' (see 'moert --help')");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  // A write past the file size limit (`ulimit -f`) then fails with EFBIG, which the command
  // reports naming the file, instead of SIGXFSZ ending it with a temporary file left behind.
  std::signal(SIGXFSZ, SIG_IGN);
  const int code = run(argc, argv);
  // What a command printed may still sit in stdout's buffer: a full disk (ENOSPC) or a bad
  // descriptor shows only now, and a command that wrote nothing of its report has not succeeded.
  // (A closed pipe ends the process with SIGPIPE before this.)
  errno = 0;
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    const int err = errno;
    if (code != 0) return code;
    print_error(moert_cli::command_name(),
                std::string("cannot write its output to standard output: ") +
                    (err ? std::strerror(err) : "write error"));
    return 1;
  }
  return code;
}
