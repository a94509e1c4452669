"""Per-NFE cost of the multistep samplers against one-step ones, zero-cost network, interleaved rounds.

    python bench/bench_multistep.py [--device cpu|cuda] [--rounds 7]

ei_2m / ei_2m_sde (the fused multistep op: the step, the previous call's data estimate D_prev read
from a buffer and this call's D written back, one pass) against ci_ei (deterministic, same structure
without the multistep term), reduced_oba, and ei_2m with the multistep term as composite torch ops
after the plain fused step (``ei_2m composite``: what ran before the op was fused; also what a
caller's own step function gets), native and lifted models, NFE 50, ``psld_fast.sample`` end to end.
Prints min / median microseconds per NFE and medians over rounds of the per-round time ratios
ei_2m / ci_ei and composite / fused.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import psld_fast as pf  # noqa: E402
from _benchutil import header, interleaved, pin_threads, summary  # noqa: E402

NFE = 50
VARIANTS = ("ci_ei", "ei_2m", "ei_2m_sde", "reduced_oba", "ei_2m composite")


@contextlib.contextmanager
def composite_multistep():
    """Sampling inside runs the multistep term as composite torch ops (no fused variant is found)."""
    from psld_fast import ops

    saved = ops._fused_variant
    ops._fused_variant = lambda fn, lifted: None
    try:
        yield
    finally:
        ops._fused_variant = saved


def zero_models(shape, B, device):
    C = shape[0]
    eps0 = torch.zeros((B, 2 * C, *shape[1:]), device=device)
    d0 = torch.zeros((B, C, *shape[1:]), device=device)
    native = pf.EpsModel(lambda u, tau: eps0, sde=pf.PSLD(), shape=shape)
    lifted = pf.DenoiserModel(lambda x, s: d0, shape)
    return native, lifted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    threads = pin_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the zero network's samples are not data
    device = torch.device(args.device)
    print(header("bench_multistep", device, threads))
    print(f"| shape | B | model | {' | '.join(VARIANTS)} | ei_2m / ci_ei | composite / fused |")
    print("|---|---|---|" + "---|" * len(VARIANTS) + "---|---|")
    for shape, B in (((3, 32, 32), 1), ((3, 32, 32), 16), ((3, 32, 32), 64), ((2,), 64)):
        for kind, model in zip(("native", "lifted"), zero_models(shape, B, device)):
            def run(s, m=model):
                return pf.sample(m, B, sampler=s, nfe=NFE, device=device, progress=False, cuda_graph=False)

            def run_composite(m=model):
                with composite_multistep():
                    return run("ei_2m", m)

            fns = {s: (lambda s=s: run(s)) for s in VARIANTS[:4]}
            fns["ei_2m composite"] = run_composite
            times = interleaved(fns, device, rounds=args.rounds, warmup=1)
            st = summary(times, "ci_ei")
            sf = summary(times, "ei_2m")
            per = {k: (min(v) / NFE * 1e6, sorted(v)[len(v) // 2] / NFE * 1e6) for k, v in times.items()}
            cells = " | ".join(f"{per[k][0]:.0f} / {per[k][1]:.0f}" for k in fns)
            ratio = 1.0 / st["ei_2m"]["ratio"]  # median over rounds of ei_2m time / ci_ei time
            gain = 1.0 / sf["ei_2m composite"]["ratio"]  # composite time / fused time
            print(f"| {'x'.join(map(str, shape))} | {B} | {kind} | {cells} | {ratio:.2f} | {gain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
