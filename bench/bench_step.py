"""Benchmark of the fused affine step against the eager PyTorch update it replaces.

Every variant is checked against psld_fast.program.affine_step_reference once, then the variants
are timed interleaved: each round calls every variant once (perf_counter on CPU, CUDA events on a
GPU), so a change of machine load hits all alike.  Reported: min and median over the rounds (at
least 5) and the median over rounds of the per-round ratio eager / variant.  Threads are pinned
(--threads), and the load average is printed at the start and the end.

Three modes:

    python bench/bench_step.py                      # image states: eager, reference, kernels
    python bench/bench_step.py --sweep              # small to large halves x batch 1..65536
    python bench/bench_step.py --bandwidth          # 1/8/64 MB states vs copy, per CPU ISA path
    python bench/bench_step.py --sizes 128x6x32x32 --dtype bf16 --csv bench/results.csv

GB/s counts u and eps read + u written.  On a GPU the inputs rotate through copies larger than the
L2 cache and the fraction of the measured device-to-device copy bandwidth is printed.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch

from _benchutil import header, interleaved, load_average, pin_threads, summary, sync, timed
from psld_fast import ops
from psld_fast.program import affine_step_reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A stage that mixes x and m, uses eps and both noise draws (SSCS-like) ...
COEF = [0.99, 0.01, -0.02, 0.97, -0.004, 0.001, 0.002, -0.03, 0.05, 0.0, 0.01, 0.2, 0.02, 0.0, 0.0, 0.1]
# ... and the one-draw stage of every other sampler (R2 = 0: one Box-Muller pair per element).
COEF_ONE_DRAW = COEF[:12] + [0.0] * 4
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



def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, device, rounds=20, warmup=3)["copy"]
    return 2 * nbytes / min(t) / 1e9


def _rotating(sets, step_fn, coef):
    counter = [0]

    def call():
        u, eps, seeds = sets[counter[0] % len(sets)]
        counter[0] += 1
        step_fn(u, eps, seeds, coef, 1, 0)
    return call


def _variants(device, with_reference):
    names = backends_for(device)
    return [n for n in names if with_reference or n != "reference"]


def bench_sizes(args, device, dtype, copy_gbps, meta):
    """Image-like states: eager, (reference), every kernel backend."""
    rows = []
    for size in args.sizes:
        shape = tuple(int(s) for s in size.lower().split("x"))
        sets = make_inputs(shape, dtype, device, args.rotate_mb)
        nbytes = 3 * sets[0][0].nbytes  # u read, eps read, u written
        fns = {"eager": _rotating(sets, eager_psld_step, COEF)}
        for name in _variants(device, not args.no_reference):
            fn = ops.get_step_fn(name)
            check_backend(name, fn, shape, dtype, device)
            fns[name] = _rotating(sets, fn, COEF)
        res = summary(interleaved(fns, device, rounds=args.rounds, warmup=args.warmup, budget_s=args.budget), "eager")
        for name, r in res.items():
            gbps = nbytes / r["median"] / 1e9
            rows.append(dict(meta, mode="sizes", shape=size, dtype=str(dtype).replace("torch.", ""), backend=name,
                             threads=args.threads, min_ms=r["min"] * 1e3, median_ms=r["median"] * 1e3,
                             rounds=r["rounds"], gbps=gbps, speedup_vs_eager=r["ratio"],
                             copy_fraction=gbps / copy_gbps if copy_gbps else ""))
            print(f"{size:>14} {rows[-1]['dtype']:>8} {name:>10} {r['min'] * 1e3:>9.3f} {r['median'] * 1e3:>10.3f} "
                  f"{gbps:>8.1f} {r['ratio']:>8.2f}" + (f"  {gbps / copy_gbps:>9.2f}" if copy_gbps else ""))
    return rows


SWEEP_HALVES = (1, 2, 16, 256, 3072, 12288)
SWEEP_BATCHES = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


def bench_sweep(args, device, dtype, meta):
    """(B, 2, D) states: every half size D x batch B whose state fits --max-mb; eager vs kernels."""
    rows = []
    kernels = _variants(device, False)
    kernels = [k for k in kernels if k != "reference"]
    elem = torch.finfo(dtype).bits // 8
    print(f"# shape sweep (B, 2, D), {str(dtype).replace('torch.', '')}, one-draw stage; cell: kernel time "
          f"(min) and median per-round speed-up over eager; states up to {args.max_mb:g} MB")
    for name in kernels:
        fn = ops.get_step_fn(name)
        print(f"{'D / B':>7} " + " ".join(f"{b:>15}" for b in SWEEP_BATCHES) + f"   [{name}]")
        for D in SWEEP_HALVES:
            cells = []
            for B in SWEEP_BATCHES:
                if B * 2 * D * elem > args.max_mb * 2**20:
                    cells.append(f"{'-':>15}")
                    continue
                shape = (B, 2, D)
                check_backend(name, fn, shape, dtype, device) if B <= 64 else None
                sets = make_inputs(shape, dtype, device, args.rotate_mb)
                fns = {"eager": _rotating(sets, eager_psld_step, COEF_ONE_DRAW),
                       name: _rotating(sets, fn, COEF_ONE_DRAW)}
                res = summary(interleaved(fns, device, rounds=args.rounds, warmup=args.warmup,
                                          budget_s=args.budget), "eager")
                r = res[name]
                rows.append(dict(meta, mode="sweep", shape=f"{B}x2x{D}", dtype=str(dtype).replace("torch.", ""),
                                 backend=name, threads=args.threads, min_ms=r["min"] * 1e3,
                                 median_ms=r["median"] * 1e3, rounds=r["rounds"],
                                 eager_min_ms=res["eager"]["min"] * 1e3, speedup_vs_eager=r["ratio"],
                                 speedup_min=r["ratio_min"]))
                us = r["min"] * 1e6
                cells.append(f"{us:>8.3g}us {r['ratio']:>4.3g}x" if us < 1e5 else f"{us / 1e3:>8.3g}ms {r['ratio']:>4.3g}x")
            print(f"{D:>7} " + " ".join(cells), flush=True)
        worst = min((r for r in rows if r["backend"] == name), key=lambda r: r["speedup_vs_eager"])
        print(f"# {name}: worst cell {worst['shape']}: {worst['speedup_vs_eager']:.2f}x eager (median of "
              f"per-round ratios; lowest single round {worst['speedup_min']:.2f}x)"
              f" -> floor 'never slower than eager' {'MET' if worst['speedup_vs_eager'] > 1 else 'NOT MET'}")
    return rows


def bench_bandwidth(args, device, dtype, meta):
    """States of 1, 8 and 64 MB (u alone): kernel vs a copy of u, ns per element, fraction of copy
    bandwidth; on CPU every instruction-set path of the kernel, one- and two-draw stages."""
    rows = []
    variants = {}
    if device.type == "cpu" and ops.HAS_CPU_KERNEL:
        from psld_fast import _C

        current = _C.cpu_isa()
        for isa in ("avx512", "avx2", "baseline"):
            try:
                _C.set_cpu_isa(isa)
            except ValueError:
                continue
            variants[isa] = isa
        _C.set_cpu_isa(current)
    else:
        variants = {name: None for name in _variants(device, False) if name != "reference"}
    print(f"# bandwidth: state u of 1/8/64 MB as (B, 2, 4096) {str(dtype).replace('torch.', '')}; an element is one "
          f"(x_j, m_j) pair (one Philox call); traffic = u read + eps read + u written = 3x the state; copy = "
          f"u.copy_ into another buffer (2x the state)")
    print(f"{'state':>6} {'variant':>16} {'draws':>5} {'min ms':>9} {'ns/pair':>8} {'ns/scalar':>9} {'GB/s':>7} "
          f"{'copy GB/s':>9} {'of copy':>7}")
    for mb in (1, 8, 64):
        D = 4096
        B = max(1, mb * 2**20 // (2 * D * (torch.finfo(dtype).bits // 8)))
        shape = (B, 2, D)
        sets = make_inputs(shape, dtype, device, args.rotate_mb)
        u0 = sets[0][0]
        dst = torch.empty_like(u0)
        fns = {"copy": lambda: dst.copy_(u0)}
        for label, isa in variants.items():
            for draws, coef in ((1, COEF_ONE_DRAW), (2, COEF)):
                if device.type == "cpu":
                    from psld_fast import _C

                    def call(isa=isa, coef=coef, inner=_rotating(sets, ops.get_step_fn("cpu"), coef)):
                        previous = _C.set_cpu_isa(isa)
                        try:
                            inner()
                        finally:
                            _C.set_cpu_isa(previous)
                    fns[f"{label}/{draws}"] = call
                else:
                    fns[f"{label}/{draws}"] = _rotating(sets, ops.get_step_fn(label), coef)
        res = summary(interleaved(fns, device, rounds=args.rounds, warmup=args.warmup, budget_s=args.budget), None)
        copy_gbps = 2 * u0.nbytes / res["copy"]["min"] / 1e9
        pairs = B * D
        for name, r in res.items():
            if name == "copy":
                continue
            label, draws = name.split("/")
            gbps = 3 * u0.nbytes / r["min"] / 1e9
            rows.append(dict(meta, mode="bandwidth", shape=f"{B}x2x{D}", dtype=str(dtype).replace("torch.", ""),
                             backend=label, draws=int(draws), threads=args.threads, min_ms=r["min"] * 1e3,
                             median_ms=r["median"] * 1e3, rounds=r["rounds"], ns_per_pair=r["min"] / pairs * 1e9,
                             gbps=gbps, copy_gbps=copy_gbps, copy_fraction=gbps / copy_gbps, state_mb=mb))
            print(f"{mb:>4}MB {label:>16} {draws:>5} {r['min'] * 1e3:>9.3f} {r['min'] / pairs * 1e9:>8.2f} "
                  f"{r['min'] / pairs * 1e9 / 2:>9.2f} {gbps:>7.2f} {copy_gbps:>9.1f} {gbps / copy_gbps:>7.3f}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=None,
                        help="BxCxHxW shapes (default: 128x6x32x32 and 32x6x64x64; on GPU also 256x6x64x64)")
    parser.add_argument("--sweep", action="store_true", help="half sizes 1..12288 x batch 1..65536")
    parser.add_argument("--bandwidth", action="store_true", help="1/8/64 MB states vs copy, per CPU ISA path")
    parser.add_argument("--max-mb", type=float, default=None,
                        help="largest state in the sweep, MB (default 64 on CPU, 1024 on GPU)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10 CPU, 50 GPU; >= 5)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per cell after which rounds are cut (never below 5; default 3 CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-PyTorch reference")
    parser.add_argument("--rotate-mb", type=float, default=None,
                        help="rotate input copies totalling this many MiB (default 0 on CPU, 256 on GPU)")
    parser.add_argument("--csv", default=None, help="append result rows to this CSV file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    is_gpu = device.type == "cuda"
    args.threads = pin_threads(args.threads)
    args.rounds = max(5, args.rounds or (50 if is_gpu else 10))
    args.budget = args.budget if args.budget is not None else (None if is_gpu else 3.0)
    args.rotate_mb = args.rotate_mb if args.rotate_mb is not None else (256.0 if is_gpu else 0.0)
    args.max_mb = args.max_mb or (1024.0 if is_gpu else 64.0)
    args.sizes = args.sizes or (["128x6x32x32", "32x6x64x64"] + (["256x6x64x64"] if is_gpu else []))
    dtype = DTYPES[args.dtype]
    print(header("bench_step", device, args.threads))
    if device.type == "cpu" and ops.HAS_CPU_KERNEL:
        from psld_fast import _C

        print(f"# CPU kernel path: {_C.cpu_isa()}")
    meta = dict(device=header("", device, args.threads).split("device: ")[1].split(" | ")[0],
                torch=torch.__version__)
    if args.sweep:
        rows = bench_sweep(args, device, dtype, meta)
    elif args.bandwidth:
        rows = bench_bandwidth(args, device, dtype, meta)
    else:
        copy_gbps = copy_bandwidth(device) if is_gpu else None
        if copy_gbps:
            print(f"# device-to-device copy bandwidth: {copy_gbps:.0f} GB/s")
        print(f"{'shape':>14} {'dtype':>8} {'backend':>10} {'min ms':>9} {'median ms':>10} {'GB/s':>8} {'x eager':>8}"
              + ("  copy frac" if copy_gbps else ""))
        rows = bench_sizes(args, device, dtype, copy_gbps, meta)
        print(f"# x eager: median over {args.rounds}-round interleaving of eager/variant per round")
    print(f"# load average at end {load_average()}")
    if args.csv and rows:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
