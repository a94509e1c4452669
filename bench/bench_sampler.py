"""End-to-end sampler throughput: the PSLD-style eager loop vs fused steps vs fused steps + CUDA graph.

Variants, all measured in the same run on the same batch:

  (i)   eager   the loop as the PSLD code runs it: split u into halves, eps -> score with the 2x2
                -L^{-T} (HSM Cholesky computed from the tau tensor every call), the EM or Reduced
                OBA update in separate torch ops with torch.randn noise, no fusion;
  (ii)  fused   ``psld_fast.sample(..., cuda_graph=False)``: one fused op per NFE;
  (iii) graph   ``psld_fast.sample(..., cuda_graph=True)``: the whole program replayed from one
                CUDA graph (GPU only);
  (iv)  compiled ``psld_fast.sample(..., compile=True)`` (with ``--compile``): (ii), or (iii) on a
                GPU, with the network run through torch.compile; its one-off compile time is
                reported in its own column, not in the timings.

For each: end-to-end samples/s, time per NFE, and the sampler overhead per NFE = (total - network
alone) / NFE, where "network alone" is the same network called NFE times on the same batch in the
same run (eager; for (iii) also the network alone captured in a graph, the fair floor there).
Before timing, correctness is checked once: (ii) against the reference backend on the same seeds,
(i) fed the program's own Philox noise against the same, and (iii) against (ii).

    python bench/bench_sampler.py                   # CPU: CPU subset; GPU: full grid
    python bench/bench_sampler.py --quick           # NFE 50 only, fewer cells and repeats
    python bench/bench_sampler.py --csv runs.csv    # also append one CSV row per measurement

    python bench/bench_sampler.py --overhead        # per-NFE Python overhead with a zero-cost network

The variants are interleaved: every round runs each once, at least 5 rounds per cell; reported
are min and median and, against (i), the median over rounds of the per-round ratio.  CPU timings
use perf_counter, GPU timings CUDA events.  Threads are pinned (``--threads``, default 1 on CPU: a
parallel region whose threads are descheduled on a busy few-core machine costs a scheduler time
slice per step); the CPU model and the load average at the start and the end are printed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time

import torch

import psld_fast as pf
from _benchutil import cpu_model, git_revision, interleaved, load_average, pin_threads, summary, sync, timed
from psld_fast import graphs, runner
from psld_fast.models import hsm_cholesky_tensor
from psld_fast.ops import resolve_backend
from psld_fast.reference import ProgramNoise
from psld_fast.samplers import compile_sampler

SAMPLERS = ("em", "reduced_oba")
# (i) is written with the spec's additive O and B-then-A order (as a PSLD-style loop would be); (ii) and (iii) run the
# same math so the three variants are comparable sample for sample.
SPLIT = dict(split="additive", coupling="sequential")
VARIANTS = ("eager", "fused", "graph", "compiled")
LABEL = {"eager": "(i) eager", "fused": "(ii) fused", "graph": "(iii) fused+graph",
         "compiled": "(iv) +compiled net"}


# -------------------------------------------------------------------------------------- models
def build_model(name: str, device: torch.device) -> pf.EpsModel:
    """cifar_like: analytic mixture (3, 32, 32); ncsnpp_small: 305k-param NCSN++ (3, 16, 16);
    ncsnpp_cifar10: the 97.6M-param CIFAR-10 NCSN++ (3, 32, 32).  Random weights, eval mode."""
    if name == "cifar_like":
        return pf.get_preset("cifar_like").to(device)
    from psld_fast.nets.ncsnpp import PRESET_SDE, NCSNpp

    preset = {"ncsnpp_small": "small", "ncsnpp_cifar10": "cifar10"}[name]
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: 97M parameters are slow to move
        net = NCSNpp.from_preset(preset)
    net = net.eval().requires_grad_(False)
    sde = pf.PSLD(**PRESET_SDE[preset]) if PRESET_SDE.get(preset) else pf.PSLD()
    return pf.EpsModel(net, sde=sde, shape=net.data_shape, name=name)


# ----------------------------------------------------------------------------- (i) eager loop
def eager_psld(model, program, B: int, *, dtype, device, noise=None) -> torch.Tensor:
    """EM / Reduced OBA written the way the PSLD code runs them (unfused torch ops); returns u.

    ``noise() -> (xi_x, xi_m)``: defaults to torch.randn; the correctness check passes the
    program's Philox draws instead (then this loop must agree with the compiled program).
    """
    sde, info = model.sde, program.info
    shape = (B, *model.shape)
    if noise is None:
        def noise():
            return (torch.randn(shape, dtype=dtype, device=device),
                    torch.randn(shape, dtype=dtype, device=device))
    G, nu, M, Minv = sde.gamma, sde.nu, sde.M, sde.Minv
    lx = info["lambda_s"]
    cx = 1.0 + lx * lx if info["lambda_reading"] == "marginal" else 2.0
    bcast = (-1,) + (1,) * len(model.shape)
    C = model.shape[0]

    def score(x, m, tau_value):
        tau = torch.full((B,), tau_value, dtype=torch.float32, device=device)
        eps = model(torch.cat([x, m], 1), tau).to(dtype)
        l11, l21, l22 = (v.to(dtype).reshape(bcast) for v in hsm_cholesky_tensor(sde, tau))
        ex, em = eps[:, :C], eps[:, C:]
        return -ex / l11 + l21 / (l11 * l22) * em, -em / l22  # s = -L^{-T} eps

    xi_x, xi_m = noise()
    x, m = xi_x, math.sqrt(M) * xi_m  # prior
    grid = program.grid
    for n in range(len(grid) - 1):
        tau_n, tau_next = sde.T - grid[n], sde.T - grid[n + 1]
        if program.sampler == "em":
            h, beta = grid[n + 1] - grid[n], sde.beta(tau_n)
            s_x, s_m = score(x, m, tau_n)
            xi_x, xi_m = noise()
            dx = beta / 2 * (G * x - Minv * m) + cx / 2 * beta * G * s_x
            dm = beta / 2 * (x + nu * m) + beta * M * nu * s_m
            x, m = (x + h * dx + math.sqrt(h) * lx * math.sqrt(beta * G) * xi_x,
                    m + h * dm + math.sqrt(h * beta * M * nu) * xi_m)
        else:  # reduced_oba: O, one call after O, B then A with the same score
            d = sde.b(tau_n) - sde.b(tau_next)
            xi_x, xi_m = noise()
            x = x + lx * math.sqrt(G * d) * xi_x
            m = m + math.sqrt(M * nu * d) * xi_m
            s_x, s_m = score(x, m, tau_next if info["net_time"] == "end" else tau_n)
            m = m + d / 2 * (x + nu * m + 2 * M * nu * s_m)
            x = x + d / 2 * (G * x - Minv * m + cx * G * s_x)
    if info["denoise"]:  # one noise-free Euler step from eps_end to 0
        tau, beta = sde.eps_end, sde.beta(sde.eps_end)
        s_x, s_m = score(x, m, tau)
        x, m = (x + tau * (beta / 2 * (G * x - Minv * m) + beta * G * s_x),
                m + tau * (beta / 2 * (x + nu * m) + beta * M * nu * s_m))
    return torch.cat([x, m], 1)


# ------------------------------------------------------------------------------------- timing
def measure(fns: dict, device, *, warmup: dict, repeats: int, budget: float) -> dict:
    """min/median seconds of each ``fns[name]()`` after ``warmup[name]`` calls, and the median of
    the per-round ratio t_eager / t_variant: rounds interleave the variants (one call each), at
    least 5, more while the ``budget`` (seconds of timed rounds) allows, at most ``repeats``."""
    for name, fn in fns.items():
        for _ in range(warmup.get(name, 1)):
            fn()
    times = interleaved(fns, device, rounds=max(5, repeats), warmup=0, min_rounds=5, budget_s=budget)
    return summary(times, "eager")


def network_alone(model, B, program, device, dtype, graphed: bool):
    """fn running the network NFE times on one batch (the program's taus), eagerly or from a graph."""
    u = torch.randn((B, 2 * model.shape[0], *model.shape[1:]), dtype=dtype, device=device,
                    generator=torch.Generator(device).manual_seed(0))
    taus = [torch.full((B,), t, dtype=torch.float32, device=device) for t in program.taus]

    def loop():
        for tau in taus:
            model(u, tau)

    if not graphed:
        return loop
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        loop()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        loop()
    return graph.replay


# -------------------------------------------------------------------------------- correctness
def check_correctness(model, sampler, device, dtype, backend, has_graph) -> list[str]:
    """One small run per check; returns failure messages (empty when all agree)."""
    nfe, B = 21, 4
    seeds = torch.arange(1000, 1000 + B)
    kw = dict(sampler=sampler, nfe=nfe, seeds=seeds, device=device, dtype=dtype, progress=False, **SPLIT)
    ref = pf.sample(model, B, backend="reference", cuda_graph=False, **kw).x
    fused = pf.sample(model, B, backend=backend, cuda_graph=False, **kw).x
    program = compile_sampler(sampler, model.sde, nfe, **SPLIT)
    draws = ProgramNoise(program, seeds, model.shape, dtype=torch.float64)
    eager = eager_psld(model, program, B, dtype=dtype, device=device,
                       noise=lambda: tuple(t.to(device, dtype) for t in draws()))
    eager = eager[:, :model.shape[0]]
    failures = []

    def compare(what, a, b, tol):
        err = float((a.double() - b.double()).abs().max()) / (1.0 + float(b.double().abs().max()))
        if not err <= tol:
            failures.append(f"{model.name} {sampler}: {what}: scaled max error {err:.3g} > {tol:g}")

    compare("(ii) fused vs reference backend", fused, ref, 1e-4)
    compare("(i) eager with the program's noise vs reference backend", eager, ref, 2e-3)
    if has_graph:
        for _ in range(2):  # warm-up, then capture + replay
            graphed = pf.sample(model, B, backend=backend, cuda_graph=True, **kw).x
        compare("(iii) graph vs (ii) fused", graphed, fused, 0.0 if backend == "cuda" else 1e-5)
    return failures


# ------------------------------------------------------------------------------------- report
def environment(device) -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    rev = git_revision()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()} ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": version("triton"),
            "numpy": version("numpy"), "psld_fast": pf.__version__, "python": platform.python_version(),
            "git": rev}


CSV_FIELDS = ("timestamp", "device", "torch", "triton", "git", "model", "sampler", "nfe", "batch",
              "variant", "backend", "median_ms", "min_ms", "max_ms", "repeats", "samples_per_s",
              "us_per_nfe", "net_us_per_nfe", "overhead_us_per_nfe", "speedup_vs_eager", "compile_ms",
              "net_compile_s", "threads", "load_start", "load_end")


def append_csv(path, rows):
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def print_table(rows):
    head = (f"{'model':<15}{'sampler':<12}{'nfe':>4}{'B':>5}  {'variant':<18}{'total ms':>10}"
            f"{'(min)':>10}{'samples/s':>11}{'us/NFE':>10}{'net us':>10}{'ovh us/NFE':>11}{'vs (i)':>8}{'compile s':>10}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        cell = (r["model"], r["sampler"], r["nfe"], r["batch"])
        if last is not None and cell != last:
            print()
        last = cell
        comp = f"{r['net_compile_s']:.1f}" if r.get("net_compile_s") else ""
        print(f"{r['model']:<15}{r['sampler']:<12}{r['nfe']:>4}{r['batch']:>5}  {LABEL[r['variant']]:<18}"
              f"{r['median_ms']:>10.4g}{r['min_ms']:>10.4g}{r['samples_per_s']:>11.4g}{r['us_per_nfe']:>10.4g}"
              f"{r['net_us_per_nfe']:>10.4g}{r['overhead_us_per_nfe']:>11.4g}{r['speedup_vs_eager']:>7.2f}x{comp:>10}")


# ------------------------------------------------------------------------------ loop overhead
def overhead(args, device, backend, env) -> int:
    """Per-NFE overhead of the eager loop (psld_fast.runner.run_program) beyond the fused op and
    the network, with a network that costs nothing (returns a preallocated tensor): three
    interleaved variants, (a) run_program, (b) the same op calls alone, (c) the network calls alone;
    overhead = (a - b - c) / NFE.  Also sample() as a whole: its fixed per-call cost."""
    from psld_fast.ops import get_step_fn

    base = pf.get_preset("cifar_like")
    step_fn = get_step_fn(backend)
    rows = []
    print(f"# per-NFE overhead, zero-cost network, cifar_like (3, 32, 32) state, backend {backend}")
    print(f"{'sampler':<12}{'nfe':>4}{'B':>5}{'loop us/NFE':>13}{'op us/NFE':>11}{'net us/NFE':>11}"
          f"{'overhead us/NFE':>17}{'(min-based)':>12}{'sample() extra us':>19}")
    for sampler in args.samplers:
        program = compile_sampler(sampler, base.sde, 50)
        for B in (args.batch_sizes or [1, 16]):
            shape = (B, 2 * base.shape[0], *base.shape[1:])
            eps0 = torch.zeros(shape, device=device)
            zero = pf.EpsModel(lambda u, tau: eps0, sde=base.sde, shape=base.shape)
            seeds = torch.arange(B, device=device)
            u = torch.zeros(shape, device=device)
            taus = runner.stage_taus(program, B, torch.float32, device)
            plan = [(k, s.coef, taus[k] is not None) for k, s in enumerate(program.stages)]
            net = zero.net

            def loop():
                runner.run_program(zero, program, seeds, step_fn, dtype=torch.float32, device=device)

            def ops_only():
                for k, coef, uses in plan:
                    step_fn(u, eps0 if uses else None, seeds, coef, k, 0)

            def net_only():
                for tau in taus:
                    if tau is not None:
                        net(u, tau)

            def whole():
                pf.sample(zero, B, sampler=sampler, nfe=50, backend=backend, device=device, progress=False,
                          seeds=seeds.cpu())

            fns = {"loop": loop, "ops": ops_only, "net": net_only, "sample": whole}
            warm = {k: args.warmup for k in fns}
            for name, fn in fns.items():
                for _ in range(warm[name]):
                    fn()
            t = summary(interleaved(fns, device, rounds=max(args.overhead_rounds, 5), warmup=0), None)
            n = program.nfe
            med = {k: v["median"] for k, v in t.items()}
            mins = {k: v["min"] for k, v in t.items()}
            ovh = (med["loop"] - med["ops"] - med["net"]) / n * 1e6
            ovh_min = (mins["loop"] - mins["ops"] - mins["net"]) / n * 1e6
            extra = (med["sample"] - med["loop"]) * 1e6
            print(f"{sampler:<12}{n:>4}{B:>5}{med['loop'] / n * 1e6:>13.1f}{med['ops'] / n * 1e6:>11.1f}"
                  f"{med['net'] / n * 1e6:>11.2f}{ovh:>17.1f}{ovh_min:>12.1f}{extra:>19.0f}")
            rows.append(dict(env, timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                             model="zero_net_cifar_like", sampler=sampler, nfe=n, batch=B, variant="overhead",
                             backend=backend, median_ms=med["loop"] * 1e3, min_ms=mins["loop"] * 1e3,
                             repeats=t["loop"]["rounds"], us_per_nfe=med["loop"] / n * 1e6,
                             net_us_per_nfe=med["net"] / n * 1e6, overhead_us_per_nfe=ovh,
                             threads=torch.get_num_threads(), load_start=args.load_start, load_end=load_average()))
    print("# overhead = (loop - op calls alone - network calls alone) / NFE from the medians of interleaved rounds, "
          "and from the minima (the less load-sensitive estimate on a shared machine); 'sample() extra' = "
          "sample() minus the loop, once per call (program compile, seeds, result)")
    print(f"# load average at end {load_average()}")
    if args.csv:
        append_csv(args.csv, rows)
    return 0


# --------------------------------------------------------------------------------------- main
def plan(args, device):
    """(model, batch sizes) cells; the CPU subset drops the 97M network and large batches."""
    if device.type == "cuda":
        models = args.models or ["cifar_like", "ncsnpp_small", "ncsnpp_cifar10"]
        batches = args.batch_sizes or ([1, 128] if args.quick else [1, 16, 128])
        return [(m, batches) for m in models]
    models = args.models or ["cifar_like", "ncsnpp_small"]
    out = []
    for m in models:
        if m == "ncsnpp_cifar10" and not args.models:
            continue
        default = [1, 16] if m == "cifar_like" else [1]
        out.append((m, args.batch_sizes or default))
    return out


def run_cell(model, sampler, nfe, B, device, dtype, backend, args, has_graph, env):
    program = compile_sampler(sampler, model.sde, nfe, **SPLIT)
    seeds = torch.arange(B)
    common = dict(sampler=sampler, nfe=nfe, seeds=seeds, device=device, dtype=dtype, backend=backend,
                  progress=False, **SPLIT)
    compile_ms, net_compile = {}, {}

    def fused(graph, compile=False):
        def fn():
            r = pf.sample(model, B, cuda_graph=graph, compile=compile, **common)
            compile_ms[(graph, compile)] = r.timings["compile"] * 1e3
            net_compile.setdefault((graph, compile), 0.0)
            net_compile[(graph, compile)] += r.timings.get("net_compile", 0.0)
        return fn

    fns = {"eager": lambda: eager_psld(model, program, B, dtype=dtype, device=device),
           "fused": fused(False),
           "net": network_alone(model, B, program, device, dtype, graphed=False)}
    warmup = {name: args.warmup for name in ("eager", "fused", "net", "net_graph")}
    if has_graph:
        fns["graph"] = fused(True)
        warmup["graph"] = args.warmup + 1  # the first call is the eager warm-up, the second captures
        try:
            fns["net_graph"] = network_alone(model, B, program, device, dtype, graphed=True)
        except RuntimeError as exc:  # the network cannot be captured: keep the eager floor
            print(f"  note: network alone could not be captured ({exc}); using the eager network time")
    if args.compile:
        fns["compiled"] = fused(has_graph, compile=True)  # first call compiles (warm-up)
        warmup["compiled"] = args.warmup + (1 if has_graph else 0)
    results = measure(fns, device, warmup=warmup, repeats=args.repeats, budget=args.cell_budget)
    net_eager, net_graph = results.pop("net"), results.pop("net_graph", None)
    rows, nfe_spent = [], program.nfe
    for v, res in results.items():
        net = net_graph if (v == "graph" and net_graph is not None) else net_eager
        t = res["median"]
        key = (v in ("graph",) or (v == "compiled" and has_graph), v == "compiled")
        rows.append(dict(
            env, timestamp=datetime.datetime.now().isoformat(timespec="seconds"), model=model.name,
            sampler=sampler, nfe=nfe_spent, batch=B, variant=v, backend="torch" if v == "eager" else backend,
            median_ms=t * 1e3, min_ms=res["min"] * 1e3, max_ms=float("nan"), repeats=res["rounds"],
            samples_per_s=B / t, us_per_nfe=t / nfe_spent * 1e6, net_us_per_nfe=net["median"] / nfe_spent * 1e6,
            overhead_us_per_nfe=(t - net["median"]) / nfe_spent * 1e6, speedup_vs_eager=res["ratio"],
            compile_ms=compile_ms.get(key, float("nan")) if v != "eager" else 0.0,
            net_compile_s=net_compile.get(key, 0.0) if v == "compiled" else "", threads=torch.get_num_threads(),
            load_start=args.load_start, load_end=load_average()))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available)")
    p.add_argument("--models", nargs="+", choices=["cifar_like", "ncsnpp_small", "ncsnpp_cifar10"])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--nfe", nargs="+", type=int, default=None, help="default 50 100 (--quick: 50)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="default GPU 1 16 128; CPU 1 16 (analytic) and 1 (network)")
    p.add_argument("--backend", default="auto", help="backend of (ii) and (iii) (default auto)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 5, --quick 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cell-budget", type=float, default=None,
                   help="seconds of timed rounds per cell before repeats are cut (default 4, --quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU, torch's on GPU)")
    p.add_argument("--compile", action="store_true",
                   help="add (iv): fused (+graph on GPU) with the network under torch.compile (compiles once per cell)")
    p.add_argument("--overhead", action="store_true",
                   help="only the per-NFE Python overhead of the loop with a zero-cost network (B = 1 and 16)")
    p.add_argument("--overhead-rounds", type=int, default=200, help="interleaved rounds of --overhead")
    p.add_argument("--quick", action="store_true", help="NFE 50 only, fewer cells and repeats")
    p.add_argument("--csv", metavar="PATH", help="append one row per measurement to this CSV file")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pin_threads(args.threads or (1 if device.type == "cpu" else None))
    args.load_start = load_average()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.nfe = args.nfe or ([50] if args.quick else [50, 100])
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.cell_budget = args.cell_budget or (2.0 if args.quick else 4.0)
    dtype = torch.float32
    backend = resolve_backend(args.backend, device, dtype=dtype)
    has_graph = device.type == "cuda"
    env = environment(device)
    print(f"# bench_sampler  device: {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"numpy {env['numpy']}  python {env['python']}  psld_fast {env['psld_fast']}  git {env['git']}")
    print(f"# load average at start {args.load_start}")
    if args.overhead:
        return overhead(args, device, backend, env)
    print(f"# backend (ii)/(iii): {backend}   state dtype: float32   threads: {torch.get_num_threads()}"
          + ("" if has_graph else "   (iii) CUDA graph: n/a on CPU"))
    if device.type == "cuda":
        print(f"# cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}  "
              f"matmul precision={torch.get_float32_matmul_precision()}")
    all_rows, failures = [], []
    t_start = time.perf_counter()
    with torch.no_grad():
        for model_name, batches in plan(args, device):
            model = build_model(model_name, device)
            if not args.no_check:
                for sampler in args.samplers:
                    failures += check_correctness(model, sampler, device, dtype, backend, has_graph)
                if failures:
                    break
                print(f"# correctness ok: {model_name} ({', '.join(args.samplers)})")
            for sampler in args.samplers:
                for nfe in args.nfe:
                    for B in batches:
                        all_rows += run_cell(model, sampler, nfe, B, device, dtype, backend, args, has_graph, env)
            del model
            graphs.clear_cache()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if failures:
        print("CORRECTNESS CHECK FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"# load average at end {load_average()}")
    print()
    print_table(all_rows)
    print(f"\n# ovh us/NFE = (total - network alone on the same batch) / NFE; network alone is eager "
          f"for (i)/(ii){' and a graph of the network for (iii)' if has_graph else ''}.  "
          f"{time.perf_counter() - t_start:.0f} s in all.")
    comp = [r["compile_ms"] for r in all_rows if r["variant"] != "eager"]
    if comp:
        print(f"# of which sample()'s host-side compile_sampler: median {statistics.median(comp):.3g} ms per call")
    floor = [r for r in all_rows if r["model"] == "cifar_like" and r["variant"] == "fused"]
    if floor:
        slow = [r for r in floor if r["speedup_vs_eager"] <= 1.0]
        print(f"# floor (ii) faster than (i) end to end on the analytic model: "
              f"{'OK' if not slow else 'NOT MET'} ({len(floor) - len(slow)}/{len(floor)} cells)")
    if args.csv:
        append_csv(args.csv, all_rows)
        print(f"# appended {len(all_rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
