"""Benchmark of the fused affine step against the eager PyTorch update it replaces.

For each size and every available backend (reference, cpu, cuda, triton) it checks the result
against psld_fast.program.affine_step_reference once, then times the step (warm-up, then median and
10-90% spread of --reps runs: time.perf_counter on CPU, CUDA events on GPU) and prints ms, GB/s
(bytes of u and eps read + u written) and the speed-up over the eager update measured in the same
run.  On a GPU it also measures the device-to-device copy bandwidth and reports the fraction of it
the step reaches, and rotates through copies of the inputs larger than the L2 cache.

    python bench/bench_step.py                      # default sizes, fp32
    python bench/bench_step.py --sizes 128x6x32x32 --dtype bf16 --csv bench/results.csv
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from psld_fast import ops
from psld_fast.program import affine_step_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A reduced-OBA-like stage: mixes x and m, uses eps, both noise draws.
COEF = [0.99, 0.01, -0.02, 0.97, -0.004, 0.001, 0.002, -0.03, 0.05, 0.0, 0.01, 0.2, 0.02, 0.0, 0.0, 0.1]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def eager_psld_step(u, eps, seeds, coef, step, stream, h=0.01, gamma=2.0, l00=1.3, l10=-0.4, l11=0.8):
    """The PSLD-style eager update the fused op replaces: split the halves, eps -> score with the
    2x2 -L^{-T}, B (momentum kick), A (position drift), O (Ornstein-Uhlenbeck with torch.randn),
    pack the state again."""
    C = u.shape[1] // 2
    x, m = u[:, :C], u[:, C:]
    ex, em = eps[:, :C].to(u.dtype), eps[:, C:].to(u.dtype)
    # L lower triangular: -L^{-T} = -[[1/l00, -l10/(l00 l11)], [0, 1/l11]]
    score_x = -(ex / l00 - em * (l10 / (l00 * l11)))
    score_m = -(em / l11)
    m = m + h * (score_m - 0.5 * score_x)                               # B
    x = x + h * m                                                       # A
    decay = math.exp(-gamma * h)
    m = decay * m + math.sqrt(1 - decay**2) * torch.randn_like(m)       # O
    x = x + 0.01 * torch.randn_like(x)
    u.copy_(torch.cat([x, m], dim=1))


def git_revision() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        model = "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def time_fn(fn, device, reps: int, warmup: int) -> list[float]:
    """Per-call times in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, reps=20, warmup=3)
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def make_inputs(shape, dtype, device, rotate_mb: float):
    """Enough (u, eps, seeds) copies that their total exceeds rotate_mb (at least one)."""
    per_set = 2 * math.prod(shape) * torch.finfo(dtype).bits // 8
    count = max(1, math.ceil(rotate_mb * 2**20 / per_set))
    g = torch.Generator().manual_seed(0)
    base_u = torch.randn(shape, generator=g)
    base_eps = torch.randn(shape, generator=g)
    sets = [(base_u.to(device, dtype), base_eps.to(device, dtype),
             torch.arange(shape[0], dtype=torch.int64, device=device) + 1000 * i) for i in range(count)]
    return sets


def check_backend(name, fn, shape, dtype, device) -> None:
    u, eps, seeds = make_inputs(shape, dtype, device, 0)[0]
    expected = affine_step_reference(u, eps, seeds, COEF, 1, 0)
    fn(u, eps, seeds, COEF, 1, 0)
    err = (u.float() - expected.float()).abs().max().item()
    if not err <= TOL[dtype]:
        raise SystemExit(f"bench_step: backend {name} is wrong for {shape} {dtype}: max err {err:.3g}")


def backends_for(device: torch.device) -> list[str]:
    names = ["reference"]
    for name in (("cuda", "triton") if device.type == "cuda" else ("cpu",)):
        try:
            ops.resolve_backend(name, device)
            names.append(name)
        except RuntimeError as exc:
            print(f"# skipping {name}: {exc}")
    return names


def bench_size(shape, dtype, device, args, copy_gbps):
    rows = []
    sets = make_inputs(shape, dtype, device, args.rotate_mb)
    nbytes = 3 * sets[0][0].nbytes  # u read, eps read, u written
    counter = [0]

    def runner(step_fn):
        def call():
            u, eps, seeds = sets[counter[0] % len(sets)]
            counter[0] += 1
            step_fn(u, eps, seeds, COEF, 1, 0)
        return call

    results = {"eager": time_fn(runner(eager_psld_step), device, args.reps, args.warmup)}
    for name in backends_for(device):
        fn = ops.get_step_fn(name)
        check_backend(name, fn, shape, dtype, device)
        reps = max(3, args.reps // 10) if name == "reference" else args.reps
        results[name] = time_fn(runner(fn), device, reps, args.warmup)
    eager_ms = statistics.median(results["eager"])
    for name, times in results.items():
        qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
        med = statistics.median(times)
        gbps = nbytes / (med * 1e-3) / 1e9
        rows.append(dict(shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
                         backend=name, median_ms=med, p10_ms=qs[0], p90_ms=qs[-1], gbps=gbps,
                         speedup_vs_eager=eager_ms / med,
                         copy_fraction=(gbps / copy_gbps) if copy_gbps else None))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=None,
                        help="BxCxHxW shapes (default: 128x6x32x32 and 32x6x64x64; on GPU also 256x6x64x64)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default 30 CPU, 200 GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rotate-mb", type=float, default=None,
                        help="rotate input copies totalling this many MiB (default 0 on CPU, 256 on GPU)")
    parser.add_argument("--csv", default=None, help="append result rows to this CSV file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    is_gpu = device.type == "cuda"
    args.reps = args.reps or (200 if is_gpu else 30)
    args.rotate_mb = args.rotate_mb if args.rotate_mb is not None else (256.0 if is_gpu else 0.0)
    sizes = args.sizes or (["128x6x32x32", "32x6x64x64"] + (["256x6x64x64"] if is_gpu else []))
    dtype = DTYPES[args.dtype]
    meta = dict(device=device_name(device), torch=torch.__version__, git=git_revision())
    print(f"# device: {meta['device']} | torch {meta['torch']} | git {meta['git']}")
    copy_gbps = copy_bandwidth(device) if is_gpu else None
    if copy_gbps:
        print(f"# device-to-device copy bandwidth: {copy_gbps:.0f} GB/s")
    header = f"{'shape':>14} {'dtype':>8} {'backend':>10} {'median ms':>10} {'p10-p90 ms':>16} {'GB/s':>8} {'x eager':>8}"
    print(header + ("  copy frac" if copy_gbps else ""))
    rows = []
    for size in sizes:
        shape = tuple(int(s) for s in size.lower().split("x"))
        for row in bench_size(shape, dtype, device, args, copy_gbps):
            rows.append({**meta, **row})
            line = (f"{row['shape']:>14} {row['dtype']:>8} {row['backend']:>10} {row['median_ms']:>10.3f} "
                    f"{row['p10_ms']:>7.3f}-{row['p90_ms']:<8.3f} {row['gbps']:>8.1f} {row['speedup_vs_eager']:>8.2f}")
            print(line + (f"  {row['copy_fraction']:>9.2f}" if copy_gbps else ""))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
