#!/usr/bin/env bash
# Installs the peer libraries psld_fast is compared with, pinned, into the given Python's
# environment (default .venv/bin/python): diffusers and k-diffusion's sampling dependencies from
# requirements-peers.txt, then k-diffusion 0.1.1.post1 itself without its training-only deps
# (psld_fast.peers loads k_diffusion.sampling / external without running its package __init__).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${1:-.venv/bin/python}
"$PY" -m pip install -q --no-compile -r requirements-peers.txt
"$PY" -m pip install -q --no-compile --no-deps k-diffusion==0.1.1.post1
