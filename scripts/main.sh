#!/usr/bin/env bash
# The main job: install what is missing, build moert, and run the load-balancing experiment.
# `moert train` trains a character-level MoE language model on the text of Debian's fortunes
# under no balancing, the auxiliary loss and loss-free bias balancing (same seed, data order and
# budget), prints the comparison table, and writes the per-step metrics to
# out/experiment-steps.csv and their plot to out/experiment-maxvio.png.
# Arguments are passed to `moert train`, e.g. `scripts/main.sh --steps 10000 --batch 1024`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cmake --preset release
cmake --build --preset release
mkdir -p out
# The per-step metrics go to out/experiment-steps.csv unless the arguments name another file
# (moert refuses an option given twice).
csv=out/experiment-steps.csv
csv_arg=(--csv "$csv")
for ((i = 1; i <= $#; i++)); do
  case ${!i} in
  --csv)
    j=$((i + 1))
    csv=${!j:-}
    csv_arg=()
    ;;
  --csv=*)
    csv=${!i#--csv=}
    csv_arg=()
    ;;
  esac
done
build/release/cli/moert train "${csv_arg[@]}" "$@" | tee out/experiment.txt
# The plot marks the MaxVio_batch a balanced random router shows on batches of this size.
floor=$(sed -n 's/.*random router on [0-9]*-row batches: \([0-9.]*\),.*/\1/p' out/experiment.txt)
/usr/bin/python3 scripts/plot_maxvio.py "$csv" out/experiment-maxvio.png ${floor:+--floor "$floor"}
