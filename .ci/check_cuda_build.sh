#!/usr/bin/env bash
# CI check that the CUDA kernel compiles and links, on a machine without a GPU.
#
# Builds the whole extension (csrc/*.cpp + csrc/*.cu) for sm_80 and sm_90 against a CUDA build of
# torch (torch==2.14.1, CUDA 13.0, matching nvcc 13.0) kept in its own venv (default
# .ci/.venv-cuda, git-ignored, ~5.7 GB, created on first run in ~1 min from the local wheels), then
# checks that the library holds code for both architectures and loads into that torch.
# ptxas runs with -v: tools/ptxas_report.py lists every affine_step_kernel instantiation per arch with
# its registers per thread and spill bytes, and reads the SASS to check that the vector kernels load
# and store the state with 128-bit accesses; a spill or a missing 128-bit access fails the check.
# The output goes to a temporary folder: the working tree's own build is untouched.
# Env: PSLD_FAST_CUDA_VENV (venv path), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default 2),
# PSLD_FAST_PTXAS_REPORT (also write the register/spill table to this file).
# Exits non-zero on any compile or link error, spill or non-vectorised vector kernel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PSLD_FAST_CUDA_VENV:-$ROOT/.ci/.venv-cuda}"
TORCH_CUDA_PIN="torch==2.14.1"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"  # explicit: torch's guess from the nvcc wrapper is wrong
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="8.0;9.0"
export FORCE_CUDA=1
export PSLD_FAST_NVCC_FLAGS="-Xptxas -v"
start=$(date +%s)

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "check_cuda_build: no nvcc under CUDA_HOME=$CUDA_HOME" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_CUDA_PIN#torch==}' or torch.version.cuda is None)" 2>/dev/null; then
  echo "check_cuda_build: creating $VENV with $TORCH_CUDA_PIN (CUDA build)"
  PY="$(command -v python3.11 || command -v python3)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_CUDA_PIN" ninja numpy setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'"
fi

OUT="$(mktemp -d "${TMPDIR:-/tmp}/psld_cuda_build.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT
echo "check_cuda_build: nvcc $("$CUDA_HOME/bin/nvcc" --version | tail -1), torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
cd "$ROOT"
"$VENV/bin/python" setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" > "$OUT/build.log" 2>&1 || true
grep -v -E "^WARNING: Location|Deprecat|^\s*!!|^\s*\*{8}|setup.py install|^\s*$|ptxas info|bytes stack frame" "$OUT/build.log" || true
SO="$(ls "$OUT"/lib/psld_fast/_C*.so 2>/dev/null | head -1)"
if [[ -z "$SO" ]]; then
  echo "check_cuda_build: FAILED, no psld_fast/_C*.so was built" >&2
  exit 1
fi
# cuobjdump: from the toolkit, else the copy shipped in the CUDA venv's triton wheel.
CUOBJDUMP="$(ls "$CUDA_HOME/bin/cuobjdump" "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1 || true)"
if [[ -z "$CUOBJDUMP" ]]; then
  echo "check_cuda_build: FAILED, no cuobjdump to list the architectures" >&2
  exit 1
fi
ARCHS="$("$CUOBJDUMP" --list-elf "$SO" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')"
for sm in sm_80 sm_90; do
  if [[ "$ARCHS" != *"$sm"* ]]; then
    echo "check_cuda_build: FAILED, $SO has no $sm code (has: $ARCHS)" >&2
    exit 1
  fi
done
echo "check_cuda_build: registers and spills per kernel (ptxas -v), 128-bit global ld/st (SASS)"
"$VENV/bin/python" tools/ptxas_report.py "$OUT/build.log" --so "$SO" --cuobjdump "$CUOBJDUMP" \
  ${PSLD_FAST_PTXAS_REPORT:+--out "$PSLD_FAST_PTXAS_REPORT"}
"$VENV/bin/python" - "$SO" <<'PY'
import sys
import torch
torch.ops.load_library(sys.argv[1])  # resolves every symbol against the CUDA torch
print("check_cuda_build: loaded", sys.argv[1].rsplit("/", 1)[-1], "into torch", torch.__version__)
PY
echo "check_cuda_build: OK (code for: $ARCHS) in $(( $(date +%s) - start )) s"
