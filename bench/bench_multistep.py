"""Per-NFE cost of the multistep samplers against one-step ones, zero-cost network, interleaved rounds.

    python bench/bench_multistep.py [--device cpu|cuda] [--rounds 7]

ei_2m / ei_2m_sde (the fused step plus the composite multistep ops: the x0 estimate of a native
call, ``G2 D_prev`` after the step) against ci_ei (deterministic, same structure without the
multistep term) and reduced_oba, native and lifted models, NFE 50, ``psld_fast.sample`` end to end
(compile cached).  Prints min / median microseconds per NFE and the median over rounds of the
per-round time ratio ei_2m / ci_ei.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import psld_fast as pf  # noqa: E402
from _benchutil import header, interleaved, pin_threads, summary  # noqa: E402

NFE = 50


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
    print(f"| shape | B | model | {' | '.join(('ci_ei', 'ei_2m', 'ei_2m_sde', 'reduced_oba'))} | ei_2m / ci_ei |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, B in (((3, 32, 32), 1), ((3, 32, 32), 16), ((3, 32, 32), 64), ((2,), 64)):
        for kind, model in zip(("native", "lifted"), zero_models(shape, B, device)):
            fns = {s: (lambda s=s, m=model: pf.sample(m, B, sampler=s, nfe=NFE, device=device, progress=False,
                                                      cuda_graph=False))
                   for s in ("ci_ei", "ei_2m", "ei_2m_sde", "reduced_oba")}
            times = interleaved(fns, device, rounds=args.rounds, warmup=1)
            st = summary(times, "ci_ei")
            per = {k: (min(v) / NFE * 1e6, sorted(v)[len(v) // 2] / NFE * 1e6) for k, v in times.items()}
            cells = " | ".join(f"{per[k][0]:.0f} / {per[k][1]:.0f}" for k in fns)
            ratio = 1.0 / st["ei_2m"]["ratio"]  # median over rounds of ei_2m time / ci_ei time
            print(f"| {'x'.join(map(str, shape))} | {B} | {kind} | {cells} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
