// The subcommands of `moert`. Each takes the whole argv and the index of its first own argument,
// prints its result to stdout, and throws Error or UsageError on failure.
#pragma once

#include "cli/args.h"

namespace moert_cli {

struct Command {
  const CommandSpec& spec;
  int (*run)(const Args& args);
};

extern const CommandSpec kInspectSpec, kConvertSpec, kTrainSpec, kEvalSpec, kBenchSpec, kImportSpec,
    kExportSpec;
int run_inspect(const Args& args);
int run_convert(const Args& args);
int run_train(const Args& args);
int run_eval(const Args& args);
int run_bench(const Args& args);
int run_import(const Args& args);
int run_export(const Args& args);

}  // namespace moert_cli
