#!/usr/bin/env bash
# The prepared check for a GPU machine (no network; torch, triton, nvcc and ninja installed there).
# Builds the extension with CUDA, runs the whole test suite (GPU tests included), then the step
# benchmark (and bench/bench_sampler.py if present), and prints a short summary table last.
# Budget: well under 8 minutes (build ~2-3 min with MAX_JOBS=8, tests ~1 min, benches ~1 min).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-/tmp/psld_gpu_check}"
mkdir -p "$OUT_DIR"
export MAX_JOBS="${MAX_JOBS:-8}"
export FORCE_CUDA=1
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
PY="${PYTHON:-python}"
start=$(date +%s)
declare -A STATUS

echo "== GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
"$PY" -c "import torch; print('== torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

echo "== build"
if "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1; then
  STATUS[build]="ok"
else
  STATUS[build]="FAILED (see build.log)"; tail -40 "$OUT_DIR/build.log"
fi
"$PY" -c "from psld_fast import ops; print('== kernels: cpu', ops.HAS_CPU_KERNEL, 'cuda', ops.HAS_CUDA_KERNEL, 'triton', ops.has_triton())"

echo "== tests"
timeout 200 "$PY" -m pytest -q -x --no-header -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/pytest.log" | tail -25
STATUS[tests]="$(grep -E '(passed|failed|error)' "$OUT_DIR/pytest.log" | tail -1)"

echo "== bench_step"
timeout 90 "$PY" bench/bench_step.py --csv "$OUT_DIR/bench_step.csv" 2>&1 | tee "$OUT_DIR/bench_step.log"
STATUS[bench_step]="$([[ ${PIPESTATUS[0]} == 0 ]] && echo ok || echo FAILED)"
timeout 60 "$PY" bench/bench_step.py --dtype bf16 --sizes 256x6x64x64 2>&1 | tee -a "$OUT_DIR/bench_step.log" | tail -4

if [[ -f bench/bench_sampler.py ]]; then
  echo "== bench_sampler"
  timeout 150 "$PY" bench/bench_sampler.py --quick --csv "$OUT_DIR/bench_sampler.csv" 2>&1 | tee "$OUT_DIR/bench_sampler.log" | tail -30
  STATUS[bench_sampler]="$([[ ${PIPESTATUS[0]} == 0 ]] && echo ok || echo FAILED)"
fi

echo
echo "================ summary ($(( $(date +%s) - start )) s) ================"
echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
for key in build tests bench_step bench_sampler; do
  [[ -n "${STATUS[$key]:-}" ]] && printf '%-14s %s\n' "$key" "${STATUS[$key]}"
done
grep -E "^ +[0-9]+x" "$OUT_DIR/bench_step.log" | awk '{printf "  %-13s %-9s %-10s %8s ms  %7s GB/s  x%s eager  %s\n", $1, $2, $3, $4, $6, $7, $8}'
grep -E "copy bandwidth" "$OUT_DIR/bench_step.log" | head -1
