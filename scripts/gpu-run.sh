#!/usr/bin/env bash
# GPU checks on a machine with an NVIDIA Hopper GPU that has its own CUDA 13 libraries but none of
# Debian's (the lent device machine). Two halves:
#
#   scripts/gpu-run.sh stage [DIR]   here: build the CUDA preset, stage the libraries, the GPU
#                                    tests, the benchmarks and the test models into DIR
#                                    (default .device/), with this script.
#   bash DIR/gpu-run.sh device       there, from the repository root: find that machine's
#                                    cuBLASLt, run every GPU test and both benchmarks, and leave
#                                    logs and a results table in $OUT (or DIR/out).
#
# The staged files carry no CUDA library: libmoert_cuda.so links the CUDA runtime statically and
# cuBLASLt is taken from the machine it runs on.
set -euo pipefail

mode=${1:-}
case "$mode" in
stage)
  here=$(cd "$(dirname "$0")/.." && pwd)
  dir=${2:-$here/.device}
  cd "$here"
  cmake --preset cuda
  cmake --build --preset cuda --target moert moert_cuda moert_gpu_kernel_tests \
    moert_gpu_session_tests moert_gpu_models moert_cuda_bench
  build=build/cuda
  rm -rf "$dir"
  mkdir -p "$dir/lib" "$dir/bin" "$dir/models"
  cp -a $build/capi/libmoert.so* $build/capi/libmoert_cuda.so* "$dir/lib/"
  cp $build/tests/gpu/moert_gpu_kernel_tests $build/tests/gpu/moert_gpu_session_tests \
    $build/bench/moert_cuda_bench "$dir/bin/"
  cp $build/tests/gpu/models/*.moert "$dir/models/"
  cp bench/torch_cuda_moe_bench.py scripts/gpu-run.sh "$dir/"
  strip --strip-debug "$dir"/bin/* "$dir"/lib/*.so.*.* 2>/dev/null || true
  du -sh "$dir"
  ;;
device)
  dir=$(cd "$(dirname "$0")" && pwd)
  out=${OUT:-$dir/out}
  mkdir -p "$out"
  # That machine's cuBLASLt: PyTorch's wheel or the toolkit.
  lt=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null || true)
  [ -e "$lt/libcublasLt.so.13" ] || lt=$(dirname "$(find / -name 'libcublasLt.so.13' -print -quit 2>/dev/null)")
  export LD_LIBRARY_PATH="$dir/lib:$lt:${LD_LIBRARY_PATH:-}"
  export MOERT_CUDA_PLUGIN="$dir/lib/libmoert_cuda.so" MOERT_TEST_MODELS="$dir/models"
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader ||
    echo "no nvidia-smi: not a GPU machine"; } | tee "$out/device.txt"
  ldd "$dir/lib/libmoert_cuda.so" | grep -E "not found|cublasLt" | tee -a "$out/device.txt" || true
  status=0
  for t in moert_gpu_kernel_tests moert_gpu_session_tests; do
    echo "== $t"
    rc=0
    "$dir/bin/$t" >"$out/$t.log" 2>&1 || rc=$?
    grep -E "^\[  (PASSED|FAILED) |rel |loss|SKIPPED|Failure" "$out/$t.log" || true
    # On the GPU machine a skip (77) is a failure too: the GPU was expected.
    [ "$rc" -eq 0 ] || { echo "$t exited $rc"; status=1; }
  done
  if [ "${MOERT_SKIP_BENCH:-0}" != 1 ]; then
    echo "== moert_cuda_bench"
    "$dir/bin/moert_cuda_bench" --reps "${MOERT_BENCH_REPS:-5}" --json "$out/moert_bench.json" 2>&1 |
      tee "$out/moert_bench.log" || status=1
    echo "== torch_moe_bench"
    python3 "$dir/torch_cuda_moe_bench.py" --reps "${MOERT_BENCH_REPS:-5}" --json "$out/torch_bench.json" \
      >"$out/torch_bench.log" 2>&1 || status=1
    tail -3 "$out/torch_bench.log"
    python3 - "$out" <<'EOF' | tee "$out/table.md"
import json, sys
out = sys.argv[1]
m = json.load(open(f"{out}/moert_bench.json"))
t = json.load(open(f"{out}/torch_bench.json"))
dev = open(f"{out}/device.txt").readline().strip()
print(f"Device: {dev}\n")
print("| pass | tokens | experts | moert ms | TFLOP/s | dense GEMM TFLOP/s | moert / dense | torch eager ms | moert speed-up | torch grouped_mm ms | moert speed-up |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in m:
    def ms(impl):
        for x in t:
            if x["impl"] == impl and x["tokens"] == r["tokens"] and x["pass"] == r["pass"]:
                return x["ms"]
    e, g = ms("eager"), ms("grouped_mm")
    fmt = lambda v: f"{v:.2f}" if v else "n/a"
    sp = lambda v: f"{v / r['ms']:.2f}x" if v else "n/a"
    print(f"| {r['pass']} | {r['tokens']} | {r['experts']} | {r['ms']:.2f} | {r['tflops']:.0f} | "
          f"{r['dense_tflops']:.0f} | {r['tflops'] / r['dense_tflops']:.2f} | {fmt(e)} | {sp(e)} | "
          f"{fmt(g)} | {sp(g)} |")
EOF
  fi
  exit $status
  ;;
*)
  echo "usage: scripts/gpu-run.sh stage [DIR] | bash DIR/gpu-run.sh device" >&2
  exit 2
  ;;
esac
