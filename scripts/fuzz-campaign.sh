#!/usr/bin/env bash
# The long fuzzing campaign (README, "Fuzzing"): every fuzz target for RUNS executions (default
# 10^6) under ASan and UBSan, at most two targets at a time and at the priority of a niced build, each
# growing a corpus of its own from the committed seeds. Builds the "fuzz" preset first.
#   scripts/fuzz-campaign.sh [RUNS [TARGET...]]   (targets: model_load checkpoint_load
#                                                  json_convert tensor_decode safetensors;
#                                                  default all)
# Writes build/fuzz/campaign/<target>/{corpus,log,crash-*} and prints, per target, the executions,
# the coverage (edges and features as libFuzzer counts them), the corpus and the crashes. A
# target that crashes stops; its input is the crash-* file (see "Fuzzing" for what to do with it).
# Minimise a grown corpus into the committed seeds with:
#   build/fuzz/tests/fuzz/fuzz_<target> -merge=1 tests/fuzz/corpus/<target> \
#       build/fuzz/campaign/<target>/corpus
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1000000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(model_load checkpoint_load json_convert tensor_decode safetensors)
cmake --preset fuzz >/dev/null
nice cmake --build --preset fuzz
out=build/fuzz/campaign
mkdir -p "$out"

run() {
  local target=$1 dict=""
  local dir="$out/$target"
  rm -rf "$dir"
  mkdir -p "$dir/corpus"
  [ -f "tests/fuzz/$target.dict" ] && dict="-dict=tests/fuzz/$target.dict"
  local start=$SECONDS
  # shellcheck disable=SC2086
  nice -n 10 "build/fuzz/tests/fuzz/fuzz_$target" -runs="$runs" -rss_limit_mb=2560 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="$dir/" $dict "$dir/corpus" "tests/fuzz/corpus/$target" \
    >"$dir/log" 2>&1 || true
  echo "$((SECONDS - start))" >"$dir/seconds"
}

# Two lanes, the targets dealt to them in turn.
lane=("" "")
for i in "${!targets[@]}"; do lane[i % 2]+="${targets[i]} "; done
for l in 0 1; do
  { for target in ${lane[l]}; do run "$target"; done; } &
done
wait

printf '%-16s %12s %10s %10s %8s %10s %8s %s\n' target executions exec/s edges features corpus crashes seconds
for target in "${targets[@]}"; do
  dir="$out/$target"
  log="$dir/log"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+.*cov:' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  crashes=$(find "$dir" -maxdepth 1 -name 'crash-*' -o -maxdepth 1 -name 'leak-*' -o -maxdepth 1 \
    -name 'timeout-*' -o -maxdepth 1 -name 'oom-*' | wc -l)
  printf '%-16s %12s %10s %10s %8s %10s %8s %s\n' "$target" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
    "${ft:-?}" "${corp:-?}" "$crashes" "$(cat "$dir/seconds")"
done
