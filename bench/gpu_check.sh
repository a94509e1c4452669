#!/usr/bin/env bash
# The prepared check for a GPU machine (no network; torch, triton, nvcc and ninja installed there).
#
# One overall deadline (PSLD_GPU_CHECK_DEADLINE seconds, default 450: under the 8 minutes a lent
# machine gives one command) covers everything, the build included: each step gets its own limit,
# cut to what is left of the deadline, and a step that does not fit is reported, never dropped.
# Steps, in order (one function each; add a step by writing step_<name> and listing it in STEPS):
#   env          GPU, driver, torch/CUDA versions (fails when torch sees no GPU)
#   build        the extension in place, for the visible GPU's architecture only
#   kernels      which fused-step kernels import (fails without the CUDA kernel or Triton)
#   tests_gpu    the test files that exercise the GPU paths, without -x (every failure is listed)
#   emulated     the CUDA kernel against its CPU emulation (tools/emulated_vs_device.py): per
#                coefficient kind, cases bit-equal and the largest difference (printed in the log)
#   bench_step, bench_step_bf16, bench_step_small, bench_sampler   the benchmarks
#   bench_sweep  the small-half shape sweep on CUDA/Triton; bench_bandwidth  1/8/64 MB vs copy
#   cpu_isa      the host CPU kernel's AVX-512 path (bit-exact tests forced onto it, then its ns/element)
#   tests_compile  torch.compile of the network inside the CUDA-graph runner
#   bench_overhead  per-NFE loop overhead with a zero-cost network on the GPU
#   bench_lifted    lifted (DenoiserModel) vs native per-NFE cost on the GPU, and k-diffusion's
#                samplers beside them when the peers are installed (compare_kdiffusion.py --speed)
#   bench_multistep  per-NFE cost of the multistep samplers (composite term) vs one-step ones on the GPU
#   tests_rest   the rest of the suite (last: CI runs it on CPU anyway; it gets what time is left)
# Every step ends PASS, FAIL (exit status), TIMEOUT (its limit or the deadline), KILLED (the script
# was interrupted during it) or NOT RUN (deadline reached before it, or interrupted earlier). The
# summary table is printed from an EXIT trap, so it appears whatever happens (a failing step, a
# timeout, SIGTERM/SIGINT from outside), and is also written machine-readable to
# $OUT/gpu_check_summary.json and $OUT/gpu_check_summary.tsv when OUT is set (logs: $OUT/<step>.log;
# without OUT everything goes to ${TMPDIR:-/tmp}/psld_gpu_check).
#
# Env: PYTHON (default python), OUT, PSLD_GPU_CHECK_DEADLINE (s), PSLD_GPU_CHECK_STEPS (space
# separated subset/order of the steps), MAX_JOBS (default 8).  Exit status: 0 when every step
# passed, 1 otherwise, 130/143 when interrupted.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
OUT_DIR="${OUT:-${TMPDIR:-/tmp}/psld_gpu_check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
DEADLINE_S="${PSLD_GPU_CHECK_DEADLINE:-450}"
RESERVE_S=5  # kept back for the summary
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, whatever is installed
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-8}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi

read -r -a STEPS <<< "${PSLD_GPU_CHECK_STEPS:-env build kernels tests_gpu emulated bench_step bench_step_bf16 bench_step_small bench_sampler bench_overhead bench_lifted bench_multistep tests_compile cpu_isa bench_bandwidth bench_sweep tests_rest}"
GPU_TESTS=(tests/test_ops_cuda.py tests/test_triton_step.py tests/test_graphs.py tests/test_backends.py
           tests/test_rng.py tests/test_api.py)
START=$(date +%s)
DEADLINE=$((START + DEADLINE_S))
declare -A STATUS SECS NOTE
CURRENT=""
CHILD=""
DEVICE="unknown"

# ------------------------------------------------------------------------------------ the steps
# Each step_<name> runs with stdout/stderr going to $OUT_DIR/<name>.log; its exit status decides
# PASS/FAIL, and it may set NOTE[<name>] (one line for the summary).

step_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || true
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
ok = torch.cuda.is_available(); print('device', torch.cuda.get_device_name(0) if ok else 'none'); sys.exit(0 if ok else 1)"
}

step_build() {
  local arch
  arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")" || return 1
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$MAX_JOBS"
  TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
}

step_kernels() {
  "$PY" -c "import sys; from psld_fast import ops; \
print('cpu', ops.HAS_CPU_KERNEL, 'cuda', ops.HAS_CUDA_KERNEL, 'triton', ops.has_triton()); \
sys.exit(0 if ops.HAS_CUDA_KERNEL and ops.has_triton() else 1)"
}

_pytest() {
  "$PY" -m pytest -q -rfE --no-header -p no:cacheprovider "$@"
}

step_tests_gpu() {
  _pytest "${GPU_TESTS[@]}"
}

step_tests_rest() {
  local ignore=()
  for f in "${GPU_TESTS[@]}"; do ignore+=(--ignore "$f"); done
  _pytest tests "${ignore[@]}"
}

step_emulated() {
  "$PY" tools/emulated_vs_device.py --build-dir "$OUT_DIR/cuda_emulation"
}

step_bench_step() {
  "$PY" bench/bench_step.py --csv "$OUT_DIR/bench_step.csv"
}

step_bench_step_bf16() {
  "$PY" bench/bench_step.py --dtype bf16 --sizes 256x6x64x64 --csv "$OUT_DIR/bench_step.csv"
}

step_bench_step_small() {  # small halves (issue 11): the flattened kernel layouts
  "$PY" bench/bench_step.py --sizes 40000x2x1 1000x2x1 4096x2x16 --csv "$OUT_DIR/bench_step.csv"
}

step_bench_sampler() {
  "$PY" bench/bench_sampler.py --quick --csv "$OUT_DIR/bench_sampler.csv"
}

step_bench_overhead() {
  "$PY" bench/bench_sampler.py --overhead --device cuda --csv "$OUT_DIR/bench_sampler_overhead.csv"
}

step_bench_lifted() {
  "$PY" bench/compare_kdiffusion.py --speed --quick --device cuda --out "$OUT_DIR/kdiffusion" || return 1
  echo "lifted/native per NFE: $(grep -E '^\| [0-9x]+ \|' "$OUT_DIR/kdiffusion/speed_cuda.md" | awk -F'|' '{printf "%s %s B%s %s; ", $2, $3, $4, $(NF-1)}')"
}
step_bench_multistep() {
  "$PY" bench/bench_multistep.py --device cuda --rounds 5 > "$OUT_DIR/bench_multistep.md" || return 1
  echo "ei_2m / ci_ei per NFE: $(grep -E '^\| [0-9x]+ \|' "$OUT_DIR/bench_multistep.md" | awk -F'|' '{printf "%s B%s %s %s; ", $2, $3, $4, $(NF-1)}')"
}

step_tests_compile() {
  _pytest tests/test_compile.py
}

step_cpu_isa() {
  "$PY" -c "from psld_fast import _C; print('host CPU kernel path', _C.cpu_isa())"
  PSLD_FAST_CPU_ISA=avx512 _pytest tests/test_ops_cpu.py -k "isa or small_halves" || return 1
  "$PY" bench/bench_step.py --bandwidth --device cpu --threads 1 --csv "$OUT_DIR/bench_step_bandwidth_hostcpu.csv"
}

step_bench_bandwidth() {
  "$PY" bench/bench_step.py --bandwidth --csv "$OUT_DIR/bench_step_bandwidth.csv"
}

step_bench_sweep() {
  "$PY" bench/bench_step.py --sweep --csv "$OUT_DIR/bench_step_sweep.csv"
}

# Per-step limits (seconds), each further cut to the time left before the deadline.
declare -A LIMIT=([env]=30 [build]=240 [kernels]=30 [tests_gpu]=150 [emulated]=60 [tests_rest]=120 [bench_step]=60
                  [bench_step_bf16]=30 [bench_step_small]=30 [bench_sampler]=90 [bench_overhead]=30 [bench_lifted]=45 [bench_multistep]=30
                  [tests_compile]=60 [cpu_isa]=45 [bench_bandwidth]=30 [bench_sweep]=60)

# ---------------------------------------------------------------------------------- machinery
_last_line() {  # a pytest result line if there is one, else the log's last non-empty line
  local line
  line="$(grep -E '[0-9]+ (passed|failed|error)' "$1" 2>/dev/null | tail -1)"
  [[ -z "$line" ]] && line="$(grep -v '^\s*$' "$1" 2>/dev/null | tail -1)"
  printf '%s' "${line:0:160}" | tr -d '\r' | tr '\t' ' '
}

run_step() {
  local name=$1 limit=${LIMIT[$1]:-60} left t0 rc log="$OUT_DIR/$1.log"
  left=$(( DEADLINE - $(date +%s) - RESERVE_S ))
  if (( left < 3 )); then
    STATUS[$name]="NOT RUN"; NOTE[$name]="overall deadline of ${DEADLINE_S} s reached"; return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit} s, log $log)"
  CURRENT=$name
  t0=$(date +%s)
  # In the background and waited for, so that a signal to this script is handled at once.
  timeout --kill-after=5 "$limit" bash -c "$(declare -f); $(declare -p GPU_TESTS OUT_DIR PY ROOT); step_$name" \
    > "$log" 2>&1 < /dev/null &
  CHILD=$!
  wait "$CHILD"; rc=$?
  CHILD=""
  CURRENT=""
  SECS[$name]=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS[$name]="PASS" ;;
    124|137) STATUS[$name]="TIMEOUT"; NOTE[$name]="limit ${limit} s" ;;
    *) STATUS[$name]="FAIL"; NOTE[$name]="exit $rc" ;;
  esac
  local last; last="$(_last_line "$log")"
  [[ -n "$last" ]] && NOTE[$name]="${NOTE[$name]:+${NOTE[$name]}; }$last"
  tail -n 15 "$log"
}

_json_str() {  # a JSON string literal
  local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"
}

summary() {
  local rc=$? elapsed=$(( $(date +%s) - START )) name all_pass=1 first=1
  if [[ -n "$CURRENT" ]]; then
    STATUS[$CURRENT]="KILLED"; NOTE[$CURRENT]="interrupted after $(( $(date +%s) - ${STEP_T0:-START} )) s"
  fi
  for name in "${STEPS[@]}"; do
    [[ -z "${STATUS[$name]:-}" ]] && STATUS[$name]="NOT RUN"
    [[ "${STATUS[$name]}" != PASS ]] && all_pass=0
  done
  echo
  echo "================ gpu_check summary (${elapsed} s of ${DEADLINE_S} s) ================"
  echo "device: $DEVICE"
  printf '%-18s %-8s %6s  %s\n' step status secs note
  for name in "${STEPS[@]}"; do
    printf '%-18s %-8s %6s  %s\n' "$name" "${STATUS[$name]}" "${SECS[$name]:--}" "${NOTE[$name]:-}"
  done
  if [[ -f "$OUT_DIR/emulated.log" ]]; then
    grep -E "^(coef kind|[a-z0-9_]+ +[0-9]+ +[0-9]+ |emulated vs device)" "$OUT_DIR/emulated.log" | head -12
  fi
  if [[ -f "$OUT_DIR/bench_step.log" ]]; then
    grep -E "^ +[0-9]+x" "$OUT_DIR/bench_step.log" | head -20
  fi
  {
    printf 'step\tstatus\tseconds\tnote\n'
    for name in "${STEPS[@]}"; do
      printf '%s\t%s\t%s\t%s\n' "$name" "${STATUS[$name]}" "${SECS[$name]:-}" "${NOTE[$name]:-}"
    done
  } > "$OUT_DIR/gpu_check_summary.tsv"
  {
    printf '{"device": %s, "elapsed_s": %d, "deadline_s": %d, "all_passed": %s, "steps": [' \
      "$(_json_str "$DEVICE")" "$elapsed" "$DEADLINE_S" "$([[ $all_pass == 1 ]] && echo true || echo false)"
    for name in "${STEPS[@]}"; do
      (( first )) || printf ', '
      first=0
      printf '{"name": %s, "status": %s, "seconds": %s, "note": %s}' "$(_json_str "$name")" \
        "$(_json_str "${STATUS[$name]}")" "${SECS[$name]:-null}" "$(_json_str "${NOTE[$name]:-}")"
    done
    printf ']}\n'
  } > "$OUT_DIR/gpu_check_summary.json"
  echo "summary: $OUT_DIR/gpu_check_summary.json, $OUT_DIR/gpu_check_summary.tsv"
  if (( rc == 0 )); then rc=$(( all_pass ? 0 : 1 )); fi
  exit "$rc"
}

on_signal() {
  trap - INT TERM
  if [[ -n "$CHILD" ]]; then kill -TERM "$CHILD" 2>/dev/null; fi
  exit "$1"
}

trap summary EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
[[ -z "$DEVICE" ]] && DEVICE="none visible (nvidia-smi)"
echo "== psld_fast gpu_check: device $DEVICE, deadline ${DEADLINE_S} s, steps: ${STEPS[*]}"
for step in "${STEPS[@]}"; do
  if ! declare -F "step_$step" > /dev/null; then
    STATUS[$step]="FAIL"; NOTE[$step]="no such step"; continue
  fi
  STEP_T0=$(date +%s)
  run_step "$step"
done
