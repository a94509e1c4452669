"""The CUDA kernel on the device against its CPU emulation (tests/test_cuda_emulated.py's harness).

Run by bench/gpu_check.sh when a GPU is lent: builds the harness (g++, a few tens of seconds), runs
every case of tests/_step_cases.SHARED_CASES plus a slice of the emulation matrix on both, and
prints per coefficient kind how many cases agree bit for bit and the largest difference as a fraction
of the step tolerance of the state dtype.  Without noise the two must agree bit for bit (same float32
operations, explicitly rounded); with noise they differ by libdevice's logf/sincosf against glibc's
(a few float32 ulps before the final rounding).  Exit 1 when a noise-free case differs or a noisy
one exceeds the step tolerance of tests/_tolerances.py.

    python tools/emulated_vs_device.py [--build-dir DIR] [--stride N] [--device cpu]

(``--device cpu`` compares the emulation with the C++ CPU kernel instead: a dry run of this script.)
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _step_cases import DTYPES, SHARED_CASES, emulation_matrix, make_inputs  # noqa: E402
from _tolerances import STEP_TOL  # noqa: E402
from test_cuda_emulated import build_harness  # noqa: E402


def _tol_fraction(a: torch.Tensor, b: torch.Tensor, tol: dict) -> float:
    """Largest |a - b| / (atol + rtol |b|) with the step tolerance of b's dtype (1: at the tolerance)."""
    a, b = a.double(), b.double()
    diff = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(a), (a - b).abs())
    return float((diff / (tol["atol"] + tol["rtol"] * b.abs())).max()) if a.numel() else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("--stride", type=int, default=7, help="every n-th case of the emulation matrix")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("emulated_vs_device: no GPU visible")
        return 1
    import psld_fast  # noqa: F401  (registers psld_fast::affine_step_)
    from psld_fast import ops

    if not ops.HAS_CPU_KERNEL or (args.device == "cuda" and not ops.HAS_CUDA_KERNEL):
        print("emulated_vs_device: psld_fast._C was built without CUDA")
        return 1
    t0 = time.perf_counter()
    build_dir = Path(args.build_dir or tempfile.mkdtemp(prefix="psld_cuda_emu_"))
    build_dir.mkdir(parents=True, exist_ok=True)
    build_harness(build_dir)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (C++ kernel)"
    print(f"harness built in {time.perf_counter() - t0:.1f} s; device {name}")
    cases = list(SHARED_CASES)
    for s in DTYPES:
        for e in (*DTYPES, None):
            cases += emulation_matrix(s, e)[::args.stride]
    rows = collections.defaultdict(lambda: [0, 0, 0.0, 0])  # cases, bit-equal, max ulps, failures
    failures = []
    for case in cases:
        u, eps, seeds, _, _ = make_inputs(case)
        emu = u.clone()
        torch.ops.psld_cuda_emu.affine_step_(emu, eps, seeds, case.coef, 3, 1)
        du, deps, _, _, _ = make_inputs(case, args.device)  # same values and offsets, on the device
        torch.ops.psld_fast.affine_step_(du, deps, seeds.to(args.device), case.coef, 3, 1)
        dev = du.cpu()
        row = rows[case.coef_kind]
        row[0] += 1
        same = torch.equal(dev.nan_to_num(7.0), emu.nan_to_num(7.0))
        row[1] += same
        frac = _tol_fraction(dev, emu, STEP_TOL[case.state_dtype])
        row[2] = max(row[2], frac)
        ok = same if case.exact else frac <= 2.0  # each kernel within one tolerance of the reference
        if not ok:
            row[3] += 1
            failures.append(case.id)
    print(f"{'coef kind':<10} {'cases':>6} {'bit-equal':>10} {'max err/tol':>12} {'failed':>7}")
    for kind, (n, same, frac, bad) in sorted(rows.items()):
        print(f"{kind:<10} {n:>6} {same:>10} {frac:>12.3f} {bad:>7}")
    total = sum(r[0] for r in rows.values())
    print(f"emulated vs device: {total} cases, {sum(r[1] for r in rows.values())} bit-equal, "
          f"{len(failures)} failed in {time.perf_counter() - t0:.1f} s")
    for f in failures[:10]:
        print("  failed:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
