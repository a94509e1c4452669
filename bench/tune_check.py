"""How close ``psld_fast.tune``'s choice is to the best candidate, on exact Gaussian models.

    python bench/tune_check.py [--out bench/results/tune]

For each model (the isotropic 16-d preset ``gaussian`` and an anisotropic 8-d Gaussian with
variances 1e-3 .. 1), NFE budget and tuner metric, runs ``tune`` (default settings: n0 128, eta 2,
4 rounds, reference ei_2m at 400 NFE, 1024 samples) and compares the chosen candidate's exact W2
(closed-form output law, psld_fast.exact) with the best candidate's.  Writes tune_check.csv / .md.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import psld_fast as pf  # noqa: E402
from psld_fast.exact import sampler_error  # noqa: E402
from psld_fast.tune import candidates, label, tune  # noqa: E402

SAMPLERS = ("em", "sscs", "reduced_oba", "ci_ei", "ei_x0", "ei_2m", "ei_2m_sde")
LAMBDAS = (None, 0.5, 1.0)


def anisotropic():
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(8, generator=g, dtype=torch.float64) * 0.5
    std = torch.logspace(-1.5, 0, 8, dtype=torch.float64)
    return pf.GaussianMixture(mean[None], std[None], torch.ones(1, dtype=torch.float64), name="anisotropic")


def exact_w2(model, c, nfe):
    mu, var = (t.numpy().ravel() for t in model.data_moments())
    return sampler_error(pf.compile_sampler(c["sampler"], model.sde, nfe, lambda_s=c["lambda_s"]), model.sde, mu, var)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "tune")
    ap.add_argument("--nfes", default="10,15,20,30,50")
    ap.add_argument("--metrics", default="marginal,sliced")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, model in (("gaussian", pf.get_preset("gaussian")), ("anisotropic", anisotropic())):
        for nfe in (int(v) for v in args.nfes.split(",")):
            exact = {label(c): exact_w2(model, c, nfe) for c in candidates(nfe, SAMPLERS, LAMBDAS)}
            best = min(exact, key=exact.get)
            ranked = sorted(exact, key=exact.get)
            for metric in args.metrics.split(","):
                t0 = time.perf_counter()
                res = tune(model, nfe, samplers=SAMPLERS, lambdas=LAMBDAS, metric=metric, backend="cpu")
                got = label(res.best)
                row = dict(model=name, nfe=nfe, metric=metric, chosen=got, chosen_w2=exact[got], best=best,
                           best_w2=exact[best], ratio=exact[got] / exact[best], rank=ranked.index(got) + 1,
                           candidates=len(exact), floor=res.rounds[-1]["floor"], resolved=res.resolved,
                           seconds=time.perf_counter() - t0)
                rows.append(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    with open(args.out / "tune_check.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# psld_fast.tune against the exact best candidate (exact Gaussian models)", "",
             "Command: `python bench/tune_check.py`. Default tune settings (n0 128, eta 2, 4 rounds, reference "
             "ei_2m at 400 NFE, 1024 samples); candidates: " + ", ".join(SAMPLERS) + " with lambda_s in "
             "{default, 0.5, 1} for the stochastic ones. ratio = exact W2 of the chosen candidate / exact W2 of "
             "the best candidate; rank among all candidates; resolved: the winner also beats the runner-up "
             "against each half of the reference; floor: the metric between the reference's two halves. These "
             "ten cells chose the default metric (marginal: geometric-mean ratio over the cells, lower wins); "
             "tests/test_tune.py checks other cells.", "",
             "| model | NFE | metric | chosen | exact W2 | best | exact W2 | ratio | rank | resolved | floor | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['nfe']} | {r['metric']} | {r['chosen']} | {r['chosen_w2']:.4f} | {r['best']} | "
                     f"{r['best_w2']:.4f} | {r['ratio']:.2f} | {r['rank']}/{r['candidates']} | {r['resolved']} | "
                     f"{r['floor']:.3f} | {r['seconds']:.0f} |")
    (args.out / "tune_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
