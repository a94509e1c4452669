"""Score-variation diagnostic: how much the network output changes between consecutive evaluations.

    python bench/score_variation.py        # writes bench/results/score_variation/{variation.csv,variation.md,variation.png}

Along sampling trajectories (n samples, seeds 0..n-1, library defaults, quadratic grid) the relative
change between consecutive network calls k-1 -> k of (i) the network output eps and (ii) the x0
estimate D (Tweedie in the augmented space; what the multistep samplers extrapolate):

    r_eps(k) = ||eps_k - eps_{k-1}|| / ||eps_k||,   r_D(k) = ||D_k - D_{k-1}|| / ||D_k||

(norms over each sample, then the median over samples), against the call's forward time tau_k.
Score reuse (the reduced samplers' one call per step) and extrapolation (ei_2m) assume the output
changes little over a step: where r is small they cost little, where it is large they are the
error.  Models: the shipped learned PSLD digits network, the exact 16-d Gaussian and the ring2d
mixture (exact scores).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import psld_fast as pf  # noqa: E402
from psld_fast.multistep import denoiser_coef  # noqa: E402
from psld_fast.runner import ms_estimate  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "score_variation"


class Recorder:
    """Wraps an EpsModel; records (tau, eps, D) of every call (float64 copies on the host)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, u, tau):
        eps = self.model(u, tau)
        t = float(tau.reshape(-1)[0])
        d = ms_estimate(u.double(), eps.double(), denoiser_coef(self.model.sde, t))
        self.calls.append((t, eps.detach().double().cpu(), d.detach().cpu()))
        return eps


def variation(model, sampler, nfe, n):
    rec = Recorder(model)
    wrapped = pf.EpsModel(rec, sde=model.sde, shape=model.shape)
    pf.sample(wrapped, n, sampler=sampler, nfe=nfe, progress=False, backend="cpu", cuda_graph=False)
    rows = []
    for (t0, e0, d0), (t1, e1, d1) in zip(rec.calls, rec.calls[1:]):
        def rel(a, b):
            num = (b - a).reshape(n, -1).norm(dim=1)
            return float((num / b.reshape(n, -1).norm(dim=1).clamp_min(1e-30)).median())
        rows.append(dict(tau=t1, tau_prev=t0, r_eps=rel(e0, e1), r_d=rel(d0, d1)))
    return rows


def models():
    from psld_fast.learned import load_learned

    learned = load_learned("digits")
    learned.eval()
    return {"learned digits (PSLD net)": learned, "exact 16-d Gaussian": pf.get_preset("gaussian"),
            "exact ring2d mixture": pf.get_preset("ring2d")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--nfe", type=int, default=50)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for name, model in models().items():
        for sampler in ("reduced_oba", "ei_2m"):
            for r in variation(model, sampler, args.nfe, args.n):
                rows.append(dict(model=name, sampler=sampler, **r))
    with open(args.out / "variation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    bands = [(0.5, 1.01), (0.1, 0.5), (0.02, 0.1), (0.0, 0.02)]
    lines = ["# Score-variation diagnostic", "",
             f"Command: `python bench/score_variation.py` (n = {args.n}, NFE {args.nfe}, {time.time() - t0:.0f} s). "
             "Median over samples of the relative change between consecutive calls, of the network output eps "
             "and of the x0 estimate D, averaged over the calls whose tau falls in each band, along the "
             "trajectories of the stochastic reduced_oba and the deterministic ei_2m.", "",
             "| model | sampler | quantity | " + " | ".join(f"tau {a:g} .. {min(b, 1):g}" for a, b in bands) + " |",
             "|---|---|---|" + "---|" * len(bands)]
    for name in sorted({r["model"] for r in rows}):
        for sampler in ("reduced_oba", "ei_2m"):
            for q, label in (("r_eps", "eps"), ("r_d", "D")):
                cells = []
                for a, b in bands:
                    v = [r[q] for r in rows if r["model"] == name and r["sampler"] == sampler and a <= r["tau"] < b]
                    cells.append(f"{np.mean(v):.3g}" if v else "-")
                lines.append(f"| {name} | {sampler} | {label} | " + " | ".join(cells) + " |")
    (args.out / "variation.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, (q, label) in zip(axes, (("r_eps", "eps (network output)"), ("r_d", "D (x0 estimate)"))):
            for name in sorted({r["model"] for r in rows}):
                for sampler, ls in (("reduced_oba", "-"), ("ei_2m", "--")):
                    rs = [r for r in rows if r["model"] == name and r["sampler"] == sampler]
                    ax.plot([r["tau"] for r in rs], [r[q] for r in rs], ls, label=f"{name}, {sampler}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tau of the call")
            ax.set_title(f"relative change between consecutive calls: {label}")
        axes[0].set_ylabel("median over samples")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "variation.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
