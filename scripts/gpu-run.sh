#!/usr/bin/env bash
# GPU checks on a machine with an NVIDIA Hopper GPU that has its own CUDA 13 toolkit, PyTorch and
# compute-sanitizer but none of Debian's libraries (the lent device machine). Two halves:
#
#   scripts/gpu-run.sh stage [DIR]   here: build the CUDA preset's targets named below and stage
#                                    into DIR (default .device/) the libraries, the GPU tests, the
#                                    benchmarks, the test models, this machine's C and C++
#                                    runtime (DIR/sys) and this script.
#   scripts/gpu-run.sh stage-train [DIR]  the same for the experiment instead (default
#                                    .device-train/): the libraries, the moert command, the corpus
#                                    (/usr/share/games/fortunes) and the runtime. The two do not
#                                    fit one carry (64 MiB): stage and run them one after the other.
#   bash DIR/gpu-run.sh device       there: find that machine's cuBLASLt, check that every staged
#                                    program and library resolves, then run the phases below and
#                                    leave logs, JSON and a results table in $OUT (or DIR/out).
#
# With the device tool: run(command="bash .device/gpu-run.sh device", carry=[".device"]), or
# run(command="bash .device-train/gpu-run.sh device", carry=[".device-train"]).
# That machine gives one call ten minutes and brings back at most 8 files from $OUT, so the
# device half keeps to a time budget and writes exactly these, all at the top of $OUT:
#   device.txt        the GPU (first line, read by the table), the environment chosen, the
#                     library check, and the summary of every phase
#   tests.log         the GPU test programs' output
#   sanitize.log      compute-sanitizer's output, one section per tool
#   bench.log         both benchmarks' output
#   moert_bench.json  torch_bench.json  table.md
#   train-bf16.txt  train-fp8.txt   (train phase, instead of the above) `moert train --device
#                     cuda`'s output per precision
#   cpu-bench.txt     (cpu-bench phase) on that machine's CPU (its ISA may differ from this
#                     one's: AMX, say): the unit tests of the CPU backend's bf16 paths (layouts,
#                     packed copies, the reduction's bits), the CPU backend's `moert bench` and
#                     bench/torch_moe_bench.py
#
# Settings for the device half (environment):
#   MOERT_PHASES      which phases run, of: tests sanitize bench (both benchmarks), moert-bench,
#                     torch-bench, train, cpu-bench. Default "tests sanitize bench" (a stage-train
#                     folder: "train"): a later call can rerun only what is needed. cpu-bench
#                     (stage-train folders) takes up to 360 s.
#   MOERT_TRAIN_PRECISIONS  the train phase's precisions (default "bf16 fp8"), each one run of
#                     `moert train --device cuda` on the experiment's model, budget and seed;
#   MOERT_TRAIN_BALANCING   its --balancing (default "loss-free"; "none,aux,loss-free" takes
#                     about 45 s in bf16 and 90 s in fp8 on an H200). The phase's cap is 240 s:
#                     with cpu-bench (360 s) as well, raise MOERT_TIME_BUDGET to 630.
#   MOERT_SKIP_BENCH=1  drops the benchmarks from MOERT_PHASES (the older switch, still honoured).
#   MOERT_TIME_BUDGET   seconds for the whole device half (default 420). A session has 15
#                     minutes of device time in all, a cold start costs a minute or two, and no
#                     machine starts with under 4 minutes left: 420 s leaves room to rerun, at
#                     once while the machine is warm, the phase that failed (MOERT_PHASES=...,
#                     with a budget that fits what is left). The phases' caps (tests 60 s,
#                     sanitize 120, moert bench 150, torch bench 60) sum to 390, leaving 30 s
#                     of the budget to the set-up (nvidia-smi, the library searches, probes).
#                     On an H200 (2026-12-04) the tests took 17 s, the sanitizer's kernel tests
#                     about 35 s under racecheck, and PyTorch's benchmark 40 s.
#   MOERT_BENCH_REPS    timed repetitions per benchmark measurement (default 5).
#   MOERT_SANITIZE_TOOLS  compute-sanitizer tools (default "memcheck racecheck synccheck").
#   MOERT_SANITIZE_FILTER a --gtest_filter for the kernel tests under the sanitizer (default all).
#   MOERT_FORCE_CARRIED_LOADER=1  run moert programs through DIR/sys's loader even where the
#                     machine's own libraries would do (to test that path).
#
# The staged files carry no CUDA library: the plugin and the benchmark link the CUDA runtime
# statically, and cuBLASLt is the machine's own (PyTorch's wheel, else the toolkit). They do carry
# glibc and libstdc++ from the build machine (Debian 12, glibc 2.36) in DIR/sys: where the
# machine's own are older, every moert program runs through the carried loader instead.
# The exit status is 0 only when every requested phase ran and passed; a test program that finds
# no usable GPU (exit 77) is a failure here, since this half runs where a GPU is expected.
set -uo pipefail

# The moert libraries and programs the device half needs; the plugin is loaded by path.
# $1: tests (the GPU tests and benchmarks) or train (the experiment); $2: the folder.
stage() {
  set -e
  local kind=$1 here dir build
  here=$(cd "$(dirname "$0")/.." && pwd)
  if [ "$kind" = train ]; then
    dir=${2:-$here/.device-train}
  else
    dir=${2:-$here/.device}
  fi
  cd "$here"
  cmake --preset cuda
  if [ "$kind" = train ]; then
    [ -d /usr/share/games/fortunes ] || {
      echo "stage-train: no corpus at /usr/share/games/fortunes (scripts/install-deps.sh installs it)" >&2
      exit 1
    }
    cmake --build --preset cuda --target moert moert_cuda moert_cli moert_unit_tests
  else
    cmake --build --preset cuda --target moert moert_cuda moert_gpu_kernel_tests \
      moert_gpu_session_tests moert_gpu_fp8_tests moert_gpu_fp8_session_tests moert_gpu_nccl_tests \
      moert_gpu_models moert_cuda_bench
  fi
  build=build/cuda
  rm -rf "$dir"
  mkdir -p "$dir/lib" "$dir/bin" "$dir/sys"
  # Real files under the names they are looked up by (libmoert by its SONAME, the plugin by the
  # name beside it), no symbolic links: the copy carried to the device need not keep links.
  local lib soname
  lib=$(readlink -f "$build/capi/libmoert.so")
  soname=$(objdump -p "$lib" | awk '$1 == "SONAME" { print $2 }')
  cp "$lib" "$dir/lib/$soname"
  cp "$(readlink -f "$build/capi/libmoert_cuda.so")" "$dir/lib/libmoert_cuda.so"
  if [ "$kind" = train ]; then
    # The command finds the plugin beside libmoert, as an installed one does.
    cp "$build/cli/moert" "$build/tests/unit/moert_unit_tests" "$dir/bin/"
    cp bench/torch_moe_bench.py "$dir/"
    mkdir -p "$dir/corpus"
    find /usr/share/games/fortunes -maxdepth 1 -type f -exec cp {} "$dir/corpus/" \;
  else
    mkdir -p "$dir/models"
    cp "$build/tests/gpu/moert_gpu_kernel_tests" "$build/tests/gpu/moert_gpu_session_tests" \
      "$build/tests/gpu/moert_gpu_fp8_tests" "$build/tests/gpu/moert_gpu_fp8_session_tests" \
      "$build/tests/gpu/moert_gpu_nccl_tests" \
      "$build/bench/moert_cuda_bench" "$dir/bin/"
    cp "$build"/tests/gpu/models/*.moert "$dir/models/"
    cp bench/torch_cuda_moe_bench.py "$dir/"
  fi
  cp scripts/gpu-run.sh "$dir/"
  strip --strip-debug "$dir"/bin/* "$dir"/lib/*

  # This machine's loader and C/C++ runtime, for a device whose glibc or libstdc++ is older than
  # the ones these were built against. The whole glibc family goes together (a loader of one
  # version with a libc or libpthread of another fails): the names always taken, and whatever
  # else ldd shows for the staged files that is not CUDA's or moert's own.
  local -A found=()
  local f name arrow path rest
  for f in "$dir"/bin/* "$dir"/lib/*; do
    while read -r name arrow path rest; do
      if [[ $name == /* && $name == *ld-linux* ]]; then
        found[ld-linux-x86-64.so.2]=$name
      elif [ "$arrow" = "=>" ] && [[ $path == /* ]]; then
        found[$name]=$path
      fi
    done < <(LD_LIBRARY_PATH="$dir/lib" ldd "$f")
  done
  local want=(ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1
    libstdc++.so.6 libgcc_s.so.1)
  for name in "${!found[@]}"; do
    case $name in
    # NCCL (about 210 MiB) is the device's own: find_nccl() looks for it there.
    libcuda.so* | libcudart* | libcublas* | libnv* | libnccl* | libmoert*) ;;
    *) [[ " ${want[*]} " == *" $name "* ]] || want+=("$name") ;;
    esac
  done
  for name in "${want[@]}"; do
    path=${found[$name]:-/lib/x86_64-linux-gnu/$name}
    [ -e "$path" ] || { echo "stage: cannot find $name to carry" >&2; exit 1; }
    cp -L "$path" "$dir/sys/$name"
  done
  chmod +x "$dir/sys/ld-linux-x86-64.so.2"
  {
    echo "staged ($kind) $(date -u +%Y-%m-%dT%H:%MZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built against glibc $(ldd --version | head -1 | awk '{print $NF}'), carrying in sys/ ${want[*]}"
  } >"$dir/STAGED"
  cat "$dir/STAGED"
  du -sh "$dir"
  local mib
  mib=$(du -sm "$dir" | cut -f1)
  if [ "$mib" -ge 60 ]; then
    echo "stage: $dir is $mib MiB; what the device carries must stay under 64 MiB" >&2
    exit 1
  fi
}

# ---------------------------------------------------------------------------------------------
# The device half.

dir="" out="" deadline=0 status=0
summary=()

log() { printf '%s\n' "$*" | tee -a "$out/device.txt"; }
result() {
  summary+=("$1")
  log "-> $1"
}
failed() {
  status=1
  result "FAIL $*"
}

# Sets secs to what a step may take (cap $1 s, before $2); with under $3 s left it reports the
# step $4 as not run and returns 1.
take_time() {
  secs=$(budget "$1" "$2")
  [ "$secs" -ge "$3" ] && return 0
  failed "$4: not run, out of time"
  return 1
}

# Seconds a step may take: its own cap, within its phase's end and the whole run's deadline.
budget() {
  local cap=$1 phase_end=$2 now=$SECONDS t
  t=$cap
  [ $((phase_end - now)) -lt "$t" ] && t=$((phase_end - now))
  [ $((deadline - now)) -lt "$t" ] && t=$((deadline - now))
  echo "$t"
}

# The directory of PyTorch's CUDA wheels that holds library $1, looking in the subdirectories
# given after it, located without importing torch (which would take seconds and initialise
# CUDA); prints nothing when no wheel has it.
find_in_wheels() {
  timeout 30 python3 - "$@" <<'EOF' 2>/dev/null
import importlib.util, os, site, sys
lib, subs = sys.argv[1], sys.argv[2:]
roots = []
spec = importlib.util.find_spec("torch")
if spec and spec.origin:
    roots.append(os.path.dirname(os.path.dirname(spec.origin)))
try:
    roots += site.getsitepackages() + [site.getusersitepackages()]
except Exception:
    pass
for root in roots:
    for sub in subs:
        d = os.path.join(root, sub)
        if os.path.exists(os.path.join(d, lib)):
            print(d)
            raise SystemExit
EOF
}

# The machine's cuBLASLt directory. PyTorch's own wheels first (CUDA 13 wheels put every CUDA
# library in nvidia/cu13/lib; older ones had nvidia/cublas/lib), then the toolkit, then a search.
find_cublaslt() {
  local d
  d=$(find_in_wheels libcublasLt.so.13 nvidia/cu13/lib nvidia/cublas/lib)
  if [ -n "$d" ]; then
    echo "$d (PyTorch's wheel)"
    return
  fi
  for d in ${CUDA_HOME:+"$CUDA_HOME/lib64"} /usr/local/cuda/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib; do
    if [ -e "$d/libcublasLt.so.13" ]; then
      echo "$d (CUDA toolkit)"
      return
    fi
  done
  d=$(timeout 45 find / -xdev -name libcublasLt.so.13 -print -quit 2>/dev/null)
  [ -n "$d" ] && echo "$(dirname "$d") (found by searching /)"
}

# The machine's NCCL (libnccl.so.2, which the plugin links): PyTorch's wheel (nvidia/nccl/lib,
# or nvidia/cu13/lib), then the toolkit. Too large to carry (hundreds of MiB).
find_nccl() {
  local d
  d=$(find_in_wheels libnccl.so.2 nvidia/nccl/lib nvidia/cu13/lib)
  [ -n "$d" ] && { echo "$d (PyTorch's wheel)"; return; }
  for d in ${CUDA_HOME:+"$CUDA_HOME/lib64"} /usr/local/cuda/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    [ -e "$d/libnccl.so.2" ] && { echo "$d"; return; }
  done
}

# Where the driver's libcuda.so.1 lives, so that the carried loader (whose built-in search
# directories are Debian's) finds it wherever that machine keeps it.
find_libcuda() {
  local d
  d=$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null) |
    awk '$1 == "libcuda.so.1" && /x86-64/ { print $NF; exit }')
  if [ -n "$d" ]; then
    dirname "$d"
    return
  fi
  for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/lib/wsl/lib; do
    [ -e "$d/libcuda.so.1" ] && { echo "$d"; return; }
  done
}

# ldd for one file, as the chosen loader would resolve it.
list_deps() {
  if [ "$loader" = carried ]; then
    "$dir/sys/ld-linux-x86-64.so.2" --library-path "$carried_path" --list "$1" 2>&1
  elif command -v ldd >/dev/null; then
    env LD_LIBRARY_PATH="$system_path" ldd "$1" 2>&1
  else
    env LD_LIBRARY_PATH="$system_path" /lib64/ld-linux-x86-64.so.2 --list "$1" 2>&1
  fi
}

# The prefix that runs a moert program: LD_LIBRARY_PATH for that program only (never exported, so
# that PyTorch loads its own cuBLASLt), or the carried loader.
set_runner() {
  if [ "$loader" = carried ]; then
    runner=("$dir/sys/ld-linux-x86-64.so.2" --library-path "$carried_path")
  else
    runner=(env LD_LIBRARY_PATH="$system_path")
  fi
}

# One staged program started with a harmless argument: the GPU tests' first, else the command.
probe() {
  set_runner
  if [ -e "$dir/bin/moert_gpu_kernel_tests" ]; then
    timeout 60 "${runner[@]}" "$dir/bin/moert_gpu_kernel_tests" --gtest_list_tests >/dev/null 2>"$tmp/probe"
  else
    timeout 60 "${runner[@]}" "$dir/bin/moert" --version >/dev/null 2>"$tmp/probe"
  fi
}

phase_tests() {
  # Five programs: 60 s in all, each at most 40 (17 s in all on an H200).
  local phase_end=$((SECONDS + 60)) t rc start
  echo "== tests" | tee -a "$out/device.txt"
  : >"$out/tests.log"
  for t in moert_gpu_kernel_tests moert_gpu_session_tests moert_gpu_fp8_tests \
    moert_gpu_fp8_session_tests moert_gpu_nccl_tests; do
    local secs
    take_time 40 $phase_end 5 "tests/$t" || continue
    echo "===== $t (up to $secs s)" >>"$out/tests.log"
    start=$SECONDS
    rc=0
    timeout -k 10 "$secs" "${runner[@]}" "$dir/bin/$t" >>"$out/tests.log" 2>&1 || rc=$?
    sed -n '/^===== '"$t"' /,$p' "$out/tests.log" |
      grep -E '^\[  (PASSED|FAILED) |SKIPPED|Failure$|rel |loss|gpu - cpu' | head -40
    case $rc in
    0) result "PASS tests/$t ($((SECONDS - start)) s)" ;;
    77) failed "tests/$t: exit 77, no usable GPU (see tests.log)" ;;
    124 | 137) failed "tests/$t: timed out after $secs s" ;;
    *) failed "tests/$t: exit $rc (see tests.log)" ;;
    esac
  done
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }
  done
}

phase_sanitize() {
  local phase_end=$((SECONDS + 120)) cs tool cap secs rc start line summary_line
  echo "== sanitize" | tee -a "$out/device.txt"
  : >"$out/sanitize.log"
  cs=$(find_sanitizer)
  if [ -z "$cs" ]; then
    echo "compute-sanitizer not found: nothing run" >>"$out/sanitize.log"
    failed "sanitize: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    return
  fi
  log "compute-sanitizer: $cs ($("$cs" --version 2>/dev/null | grep -i version | head -1))"
  [ "$loader" = carried ] &&
    log "note: the target runs through the carried loader; the sanitizer's injected library then runs on the carried glibc"
  for tool in ${MOERT_SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    case $tool in
    memcheck) cap=30 ;;
    racecheck) cap=50 ;;
    *) cap=20 ;;
    esac
    take_time $cap $phase_end 5 "sanitize/$tool" || continue
    start=$(wc -l <"$out/sanitize.log")
    echo "===== $tool (up to $secs s)" >>"$out/sanitize.log"
    rc=0
    # --error-exitcode tells a sanitizer finding from a failing test (1) or a missing GPU (77).
    timeout -k 10 "$secs" "$cs" --tool "$tool" --error-exitcode 86 --print-limit 100 \
      "${runner[@]}" "$dir/bin/moert_gpu_kernel_tests" --gtest_filter="${MOERT_SANITIZE_FILTER:-*}" \
      >>"$out/sanitize.log" 2>&1 || rc=$?
    # Some sandboxes (gVisor) give the GPU to programs but not to the sanitizer: it says so and
    # fails at the first allocation. That says nothing of moert; no other tool would fare better.
    if tail -n +"$((start + 1))" "$out/sanitize.log" | grep -qiE 'device not supported|not supported on this (device|platform)'; then
      result "SKIP sanitize/$tool and the tools after it: compute-sanitizer does not support this device here (see sanitize.log)"
      return
    fi
    summary_line=$(tail -n +"$((start + 1))" "$out/sanitize.log" |
      grep -E '(ERROR|RACECHECK) SUMMARY' | tail -1 | sed 's/^=* *//')
    line="sanitize/$tool: ${summary_line:-no summary line}"
    if [ "$rc" -eq 0 ] && [ -n "$summary_line" ] &&
      echo "$summary_line" | grep -qE 'SUMMARY: 0 (errors|hazards)|\(0 errors'; then
      result "PASS $line"
    else
      case $rc in
      0) failed "$line (exit 0, but no clean summary)" ;;
      86) failed "$line (sanitizer errors, see sanitize.log)" ;;
      77) failed "$line (exit 77: the tests found no usable GPU)" ;;
      124 | 137) failed "$line (timed out after $secs s)" ;;
      *) failed "$line (exit $rc, see sanitize.log)" ;;
      esac
    fi
  done
  # The FP8 FFN's quantize, padding and transpose kernels on partial tiles (small shapes), within
  # the same phase's time.
  take_time 20 $phase_end 5 "sanitize/memcheck fp8" || return
  start=$(wc -l <"$out/sanitize.log")
  echo "===== memcheck, moert_gpu_fp8_session_tests CudaFp8Backend.* (up to $secs s)" >>"$out/sanitize.log"
  rc=0
  timeout -k 10 "$secs" "$cs" --tool memcheck --error-exitcode 86 --print-limit 100 \
    "${runner[@]}" "$dir/bin/moert_gpu_fp8_session_tests" --gtest_filter='CudaFp8Backend.*' \
    >>"$out/sanitize.log" 2>&1 || rc=$?
  summary_line=$(tail -n +"$((start + 1))" "$out/sanitize.log" |
    grep -E 'ERROR SUMMARY' | tail -1 | sed 's/^=* *//')
  line="sanitize/memcheck fp8: ${summary_line:-no summary line}"
  if [ "$rc" -eq 0 ] && echo "$summary_line" | grep -qE 'SUMMARY: 0 errors'; then
    result "PASS $line"
  else
    case $rc in
    86) failed "$line (sanitizer errors, see sanitize.log)" ;;
    124 | 137) failed "$line (timed out after $secs s)" ;;
    *) failed "$line (exit $rc, see sanitize.log)" ;;
    esac
  fi
}

phase_moert_bench() {
  local secs rc
  echo "== moert bench (${MOERT_BENCH_REPS:-5} repetitions each)" | tee -a "$out/device.txt"
  # bf16 rows and the fp8 rows beside them (moert_cuda_bench's --precision both).
  take_time 150 $deadline 10 "bench/moert" || return
  echo "===== moert_cuda_bench (up to $secs s)" >>"$out/bench.log"
  rc=0
  timeout -k 10 "$secs" "${runner[@]}" "$dir/bin/moert_cuda_bench" --plugin "$dir/lib/libmoert_cuda.so" \
    --reps "${MOERT_BENCH_REPS:-5}" --json "$out/moert_bench.json" >>"$out/bench.log" 2>&1 || rc=$?
  sed -n '/^===== moert_cuda_bench /,$p' "$out/bench.log" | tail -n +2 | tail -10
  case $rc in
  0) result "PASS bench/moert" ;;
  124 | 137) failed "bench/moert: timed out after $secs s (moert_bench.json has what finished)" ;;
  *) failed "bench/moert: exit $rc (see bench.log)" ;;
  esac
}

phase_torch_bench() {
  local secs rc
  echo "== torch bench (${MOERT_BENCH_REPS:-5} repetitions each)" | tee -a "$out/device.txt"
  if ! command -v python3 >/dev/null; then
    failed "bench/torch: no python3"
    return
  fi
  take_time 60 $deadline 10 "bench/torch" || return
  echo "===== torch_cuda_moe_bench.py (up to $secs s)" >>"$out/bench.log"
  rc=0
  # The machine's own environment: LD_LIBRARY_PATH was never changed for this.
  timeout -k 10 "$secs" python3 "$dir/torch_cuda_moe_bench.py" --reps "${MOERT_BENCH_REPS:-5}" \
    --json "$out/torch_bench.json" >>"$out/bench.log" 2>&1 || rc=$?
  sed -n '/^===== torch_cuda_moe_bench.py /,$p' "$out/bench.log" | grep -E '^torch |^\{|Error' | head -12
  case $rc in
  0) result "PASS bench/torch" ;;
  124 | 137) failed "bench/torch: timed out after $secs s (torch_bench.json has what finished)" ;;
  *) failed "bench/torch: exit $rc (see bench.log)" ;;
  esac
}

phase_train() {
  local phase_end=$((SECONDS + 240)) p secs rc start
  echo "== train" | tee -a "$out/device.txt"
  if [ ! -e "$dir/bin/moert" ] || [ ! -d "$dir/corpus" ]; then
    failed "train: no moert command or corpus staged (scripts/gpu-run.sh stage-train)"
    return
  fi
  # bf16 and fp8 only (a CUDA session multiplies in one of them), each once: $OUT brings back at
  # most 8 files.
  local -A seen=()
  for p in ${MOERT_TRAIN_PRECISIONS:-bf16 fp8}; do
    if [[ $p != bf16 && $p != fp8 ]] || [ -n "${seen[$p]:-}" ]; then
      failed "train/$p: not a precision to train on the GPU (bf16, fp8; each once)"
      continue
    fi
    seen[$p]=1
    take_time 160 $phase_end 10 "train/$p" || continue
    start=$SECONDS
    rc=0
    timeout -k 10 "$secs" "${runner[@]}" "$dir/bin/moert" train --corpus "$dir/corpus" \
      --device cuda --precision "$p" --balancing "${MOERT_TRAIN_BALANCING:-loss-free}" \
      >"$out/train-$p.txt" 2>&1 || rc=$?
    # The results table and the GEMM accuracy, without the progress lines.
    grep -E '^(strategy|loss-free|none|aux|model:|budget|moert train)' "$out/train-$p.txt" |
      grep -v 'step/s\|validation: [0-9]*/' | sed "s/^/  [$p] /" | tee -a "$out/device.txt"
    case $rc in
    0) result "PASS train/$p ($((SECONDS - start)) s)" ;;
    124 | 137) failed "train/$p: timed out after $secs s (see train-$p.txt)" ;;
    *) failed "train/$p: exit $rc (see train-$p.txt)" ;;
    esac
  done
}

# The CPU backend on the device machine's CPU, which may have what this one lacks (AMX).
phase_cpu_bench() {
  local phase_end=$((SECONDS + 360)) f=$out/cpu-bench.txt secs rc name
  echo "== cpu bench" | tee -a "$out/device.txt"
  if [ ! -e "$dir/bin/moert" ]; then
    failed "cpu-bench: no moert command staged (scripts/gpu-run.sh stage-train)"
    return
  fi
  log "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs; $(grep -o -w -E 'avx512f|avx512_bf16|amx_tile|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  # bench/torch_moe_bench.py runs the command by path: a wrapper that starts it as set_runner does.
  printf '#!/bin/bash\nexec %s%q "$@"\n' "$(printf '%q ' "${runner[@]}")" "$dir/bin/moert" >"$tmp/moert"
  chmod +x "$tmp/moert"
  : >"$f"
  # bf16-tests: what only runs natively there (AMX's kernels and packed layouts) giving the bits
  # the reduction rule needs, before the timings.
  local -a steps=(
    "bf16-tests:"
    "moert-bf16-2:bench --threads 2 --precision bf16 --repeats 7"
    "moert-bf16-1:bench --threads 1 --precision bf16 --repeats 7"
    "torch-2:"
    "decode-2:bench --threads 2 --no-libraries --decode"
  )
  local step args
  for step in "${steps[@]}"; do
    name=${step%%:*}
    args=${step#*:}
    take_time 100 $phase_end 10 "cpu-bench/$name" || continue
    echo "===== $name (up to $secs s)" >>"$f"
    rc=0
    if [ "$name" = bf16-tests ]; then
      timeout -k 5 "$secs" "${runner[@]}" "$dir/bin/moert_unit_tests" \
        --gtest_filter='Bf16*:*Bf16ExpertSplit*:CpuReduction.*:*FfnReduction*:LayoutCopies.*' \
        >>"$f" 2>&1 || rc=$?
    elif [ -n "$args" ]; then
      # shellcheck disable=SC2086 # the step's arguments are words
      timeout -k 5 "$secs" "$tmp/moert" $args >>"$f" 2>&1 || rc=$?
    else
      timeout -k 5 "$secs" python3 "$dir/torch_moe_bench.py" --moert "$tmp/moert" --threads 2 \
        >>"$f" 2>&1 || rc=$?
    fi
    sed -n '/^===== '"$name"' /,$p' "$f" |
      grep -E 'ISA|machine limits|peak|best single|^forward|^pass|speed|^ *[0-9]+ +[0-9]|moert|torch|Error|error|PASSED|FAILED|tests from .* ran' |
      head -24
    case $rc in
    0) result "PASS cpu-bench/$name" ;;
    124 | 137) failed "cpu-bench/$name: timed out after $secs s" ;;
    *) failed "cpu-bench/$name: exit $rc (see cpu-bench.txt)" ;;
    esac
  done
}

make_table() {
  command -v python3 >/dev/null || return
  python3 - "$out" >"$out/table.md" <<'EOF'
import json, os, sys

out = sys.argv[1]


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


m, t = load("moert_bench.json"), load("torch_bench.json")
with open(os.path.join(out, "device.txt")) as f:
    dev = f.readline().strip()
print(f"Device: {dev}\n")
if m is None:
    print("moert_bench.json: missing or unreadable, moert columns n/a\n")
if t is None:
    print("torch_bench.json: missing or unreadable, PyTorch columns n/a\n")
m, t = m or [], t or []


# moert's rows are bf16 or fp8; PyTorch's benchmark runs bf16, its columns beside both.
def key(r):
    return (r.get("precision", "bf16"), r["pass"], r["tokens"], r["experts"])


keys = []
for r in m + t:
    k = key(r)
    if k not in keys:
        keys.append(k)


def moert(k):
    return next((r for r in m if key(r) == k), {})


def torch_ms(impl, k):
    return next((r.get("ms") for r in t
                 if r["impl"] == impl and (r["pass"], r["tokens"], r["experts"]) == k[1:]), None)


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


print("| precision | pass | tokens | experts | moert ms | TFLOP/s | dense GEMM TFLOP/s "
      "| moert / dense | torch bf16 eager ms | moert speed-up | torch bf16 grouped_mm ms "
      "| moert speed-up |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for k in keys:
    r = moert(k)
    ms, tf, dtf = r.get("ms"), r.get("tflops"), r.get("dense_tflops")
    e, g = torch_ms("eager", k), torch_ms("grouped_mm", k)
    print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {fmt(ms, '.2f')} | {fmt(tf, '.0f')} "
          f"| {fmt(dtf, '.0f')} "
          f"| {fmt(tf / dtf if tf and dtf else None, '.2f')} | {fmt(e, '.2f')} | {ratio(e, ms)} "
          f"| {fmt(g, '.2f')} | {ratio(g, ms)} |")
notes = [f"- torch {r['impl']} {r['pass']} {r['tokens']} tokens: {r['error']}"
         for r in t if r.get("error")]
notes += [f"- torch grouped_mm {r['pass']} {r['tokens']} tokens: relative difference from eager "
          f"{r['rel_vs_eager']:.2e}" for r in t if "rel_vs_eager" in r]
if notes:
    print("\n" + "\n".join(notes))
EOF
  cat "$out/table.md"
}

device() {
  dir=$(cd "$(dirname "$0")" && pwd)
  out=${OUT:-$dir/out}
  mkdir -p "$out"
  deadline=$((SECONDS + ${MOERT_TIME_BUDGET:-420}))
  # Only this script's files, and nothing else, go into $OUT (8 files at most come back).
  rm -f "$out"/{device.txt,tests.log,sanitize.log,bench.log,table.md,moert_bench.json,torch_bench.json} \
    "$out"/train-*.txt "$out/cpu-bench.txt"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT

  # A stage-train folder (the command and the corpus, no GPU tests) trains; any other folder runs
  # the tests, so that one missing a test program says so rather than ask for a corpus.
  local default_phases="tests sanitize bench"
  [ ! -e "$dir/bin/moert_gpu_kernel_tests" ] && [ -e "$dir/bin/moert" ] && [ -d "$dir/corpus" ] &&
    default_phases=train
  local phases=" ${MOERT_PHASES:-$default_phases} " p
  for p in $phases; do
    case $p in
    tests | sanitize | bench | moert-bench | torch-bench | train | cpu-bench) ;;
    *)
      echo "gpu-run.sh: unknown phase '$p' in MOERT_PHASES (tests sanitize bench moert-bench torch-bench train cpu-bench)" >&2
      exit 2
      ;;
    esac
  done
  if [ "${MOERT_SKIP_BENCH:-0}" = 1 ]; then
    phases=${phases// bench / }
    phases=${phases// moert-bench / }
    phases=${phases// torch-bench / }
  fi
  want() { [[ $phases == *" $1 "* ]]; }

  # First line: the GPU, as the table shows it.
  { timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
    --format=csv,noheader 2>/dev/null | head -1 | grep . ||
    echo "no GPU reported by nvidia-smi: not a GPU machine"; } | tee "$out/device.txt"
  log "phases:${phases% }; time budget ${MOERT_TIME_BUDGET:-420} s"
  log "$(paste -sd ';' 2>/dev/null <"$dir/STAGED" | sed 's/;/; /g')"
  log "system: $(uname -srm); glibc $(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}'); $(python3 --version 2>&1)"
  chmod u+x "$dir"/bin/* "$dir/sys/ld-linux-x86-64.so.2" 2>/dev/null
  # A carried copy may have lost its execute bits and be read-only: run from a copy that has them.
  local first
  first=$(find "$dir/bin" -maxdepth 1 -type f | head -1)
  if [ ! -x "$first" ] || [ ! -x "$dir/sys/ld-linux-x86-64.so.2" ]; then
    cp -r "$dir" "$tmp/staged" && chmod u+x "$tmp/staged"/bin/* "$tmp/staged/sys/ld-linux-x86-64.so.2"
    dir=$tmp/staged
    log "staged programs were not executable: running from a copy in $dir"
  fi

  export MOERT_CUDA_PLUGIN="$dir/lib/libmoert_cuda.so" MOERT_TEST_MODELS="$dir/models"
  # The NCCL tests run one process on one machine: bootstrap over the loopback interface, which
  # every machine has (a sandbox may expose no other), and NCCL's own warnings into the logs.
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  local lt_found lt
  lt_found=$(find_cublaslt)
  lt=${lt_found%% (*}
  if [ -n "$lt" ]; then
    log "cuBLASLt: $lt_found"
  else
    log "cuBLASLt: libcublasLt.so.13 not found (PyTorch's wheel, the toolkit, a search of /)"
  fi
  local nccl_found nccl
  nccl_found=$(find_nccl)
  nccl=${nccl_found%% (*}
  log "NCCL: ${nccl_found:-libnccl.so.2 not found in the PyTorch wheel or the toolkit}"
  [ -n "$nccl" ] && lt="${lt:+$lt:}$nccl"
  local cuda_dir
  cuda_dir=$(find_libcuda)
  log "libcuda.so.1: ${cuda_dir:-not found by ldconfig or in the usual directories}"
  system_path="$dir/lib${lt:+:$lt}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  carried_path="$dir/sys:$dir/lib${lt:+:$lt}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}${cuda_dir:+:$cuda_dir}"

  # The machine's own loader and libraries where they are new enough, else the carried ones.
  loader=system
  local moert_ok=1 f
  if [ "${MOERT_FORCE_CARRIED_LOADER:-0}" = 1 ]; then
    loader=carried
    log "loader: carried (forced by MOERT_FORCE_CARRIED_LOADER=1)"
  else
    local rc=0 versions=""
    probe || rc=$?
    for f in "$dir"/bin/* "$dir"/lib/*; do
      versions+=$(list_deps "$f" | grep -E "version .* not found")$'\n'
    done
    versions=$(echo "$versions" | grep .)
    if [ "$rc" -ne 0 ] || [ -n "$versions" ]; then
      log "loader: the machine's own libraries do not run the staged programs (probe exit $rc):"
      { head -5 "$tmp/probe"; [ -z "$versions" ] || echo "$versions" | head -10; } |
        sed 's/^/    /' | tee -a "$out/device.txt"
      loader=carried
      log "loader: every moert program runs as $dir/sys/ld-linux-x86-64.so.2 --library-path $carried_path PROGRAM"
    else
      log "loader: the machine's own (moert programs get LD_LIBRARY_PATH=$system_path)"
    fi
  fi
  if [ "$loader" = carried ]; then
    local rc=0
    probe || rc=$?
    if [ "$rc" -ne 0 ]; then
      log "loader: the carried loader cannot start the staged programs either (exit $rc):"
      head -5 "$tmp/probe" | sed 's/^/    /' | tee -a "$out/device.txt"
      moert_ok=0
    fi
  fi
  set_runner
  # Every staged program and library must resolve before anything runs.
  local missing=""
  for f in "$dir"/bin/* "$dir"/lib/*; do
    missing+=$(list_deps "$f" | grep "not found" | sed "s|^[[:space:]]*|    ${f#"$dir"/}: |")
    missing+=$'\n'
  done
  missing=$(echo "$missing" | grep .)
  if [ -n "$missing" ]; then
    log "libraries: NOT FOUND for the staged files:"
    echo "$missing" | tee -a "$out/device.txt"
    moert_ok=0
  else
    local shown=$dir/bin/moert_cuda_bench
    [ -e "$shown" ] || shown=$dir/lib/libmoert_cuda.so
    log "libraries: every staged program and library resolves ($loader loader); ${shown#"$dir"/}'s:"
    list_deps "$shown" | grep -E 'libc\.so|libstdc|cublasLt|ld-linux' |
      sed 's/ (0x[0-9a-f]*)//; s/^[[:space:]]*/    /' | tee -a "$out/device.txt"
  fi

  if [ "$moert_ok" = 1 ]; then
    want tests && phase_tests
    want sanitize && phase_sanitize
    { want bench || want moert-bench; } && phase_moert_bench
    want train && phase_train
    want cpu-bench && phase_cpu_bench
  else
    for p in tests sanitize moert-bench train cpu-bench; do
      if want "$p" || { [ "$p" = moert-bench ] && want bench; }; then
        failed "$p: not run, the staged programs cannot start (see device.txt)"
      fi
    done
  fi
  # PyTorch's benchmark needs nothing staged but its script: it runs even when moert cannot.
  { want bench || want torch-bench; } && phase_torch_bench
  if want bench || want moert-bench || want torch-bench; then
    echo "== table" && make_table
  fi

  log "== summary ($((SECONDS)) s)"
  printf '%s\n' ${summary[@]+"${summary[@]}"} | tee -a "$out/device.txt"
  log "exit status $status"
  exit $status
}

case ${1:-} in
stage)
  shift
  stage tests "$@"
  ;;
stage-train)
  shift
  stage train "$@"
  ;;
device)
  device
  ;;
*)
  echo "usage: scripts/gpu-run.sh stage [DIR] | scripts/gpu-run.sh stage-train [DIR] | bash DIR/gpu-run.sh device" >&2
  exit 2
  ;;
esac
