"""The paper's sampler comparison on the small learned models shipped in psld_fast/data.

ring2d (MLP, exact data law known):
    for each sampler and NFE, lambda_s is tuned over a small grid on one seed set (seeds 0..n-1) and
    the best value is re-run on an independent seed set (seeds 1_000_000..), whose sliced W2 distance
    to 50000 exact draws of the ring2d law is reported with a 95% bootstrap CI (so the tuning does
    not bias the reported number).  Also: reduced_oba net_time start/end x split additive/ou at the
    tuned lambda_s, and two reference rows (exact data draws: the finite-sample floor of the metric;
    the analytic exact-score model with the same sampler).
digits (small U-Net):
    sliced W2 (256-d pixels) to the 1797 real digits with a 95% CI, and a Frechet distance "FD-dig"
    in the 64-d penultimate features of a small MLP digit classifier trained here on the real digits
    (fixed seed, deterministic; see ``digit_features``), plus a PNG grid per sampler.

Writes bench/results/learned_<model>_*.{md,csv,png}.  Examples (the commands of the shipped results):

    python bench/compare_learned.py --model ring2d
    python bench/compare_learned.py --model digits
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import psld_fast as pf
from psld_fast.learned import load_learned
from psld_fast.metrics import sliced_wasserstein_ci

SAMPLERS = ["em", "sscs", "naive_oba", "reduced_oba", "reduced_obab", "reduced_baoab"]
TEST_SEED0 = 1_000_000


# The recorded tables (bench/results/learned_*) were made with the spec's additive split and the
# paper's shifted time for reduced OBA/OBAB/BAOAB; the library's defaults were changed afterwards on
# these very measurements (split "ou", net_time "start"), so pin the recorded settings here.
_RECORDED_NET_TIME = {"reduced_oba": "end", "reduced_obab": "end", "reduced_baoab": "end"}


def _run(model, n, sampler, nfe, seed0=0, batch_size=None, **kw):
    kw.setdefault("split", "additive")
    kw.setdefault("net_time", _RECORDED_NET_TIME.get(sampler, "start"))
    if pf.samplers.SAMPLER_SPECS[sampler].reduced:  # recorded before the coupling knob: B then A
        kw.setdefault("coupling", "sequential")
    t0 = time.perf_counter()
    try:
        res = pf.sample(model, n, sampler=sampler, nfe=nfe, seeds=torch.arange(seed0, seed0 + n), progress=False,
                        batch_size=batch_size, **kw)
    except FloatingPointError:
        return None, None, time.perf_counter() - t0
    return res.x.double().cpu(), res.nfe, time.perf_counter() - t0


def _fmt(q):
    if q is None:
        return "diverged"
    nll = f" nll {q['nll']:.3f}" if "nll" in q else ""
    return f"{q['value']:.4f} [{q['lo']:.4f}, {q['hi']:.4f}]{nll}"


# ------------------------------------------------------------------------------------- plotting
def line_plot(series: dict, path: Path, title: str, ylabel: str, xs_all, logy=False, floor=None):
    """matplotlib line plot: series = {label: [(x, y, lo, hi), ...]}, the 95% bootstrap interval
    [lo, hi] as error bars where known; x (NFE) on a log axis; an optional data-floor line (the
    metric between two independent draws of the data law itself).  Skipped with a note when
    matplotlib is not installed (the CSV/Markdown results are complete without it)."""
    from psld_fast.plotting import PlotUnavailable, plain_log_labels, require_matplotlib, save_figure

    try:
        plt = require_matplotlib()
    except PlotUnavailable as exc:
        print(f"compare_learned: {path.name} not drawn: {exc}", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    n = len(series)
    for i, (label, pts) in enumerate(series.items()):
        pts = [p for p in pts if p[1] is not None and math.isfinite(p[1])]
        if not pts:
            continue
        dodge = 1.0 + 0.02 * (i - (n - 1) / 2)  # series side by side so the error bars stay apart
        x = [p[0] * dodge for p in pts]
        y = [p[1] for p in pts]
        if all(p[2] is not None and p[3] is not None for p in pts):
            err = [[max(p[1] - p[2], 0.0) for p in pts], [max(p[3] - p[1], 0.0) for p in pts]]
            ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i % 10}", capsize=3, markersize=4, linewidth=1.6,
                        label=label)
        else:
            ax.plot(x, y, "o-", color=f"C{i % 10}", markersize=4, linewidth=1.6, label=label)
    if floor is not None:
        ax.axhline(floor, color="0.5", ls="--", lw=1, label="data floor (law vs itself)")
    ax.set_xscale("log")
    ax.set_xticks(list(xs_all))
    ax.set_xticklabels([str(v) for v in xs_all])
    ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
        plain_log_labels(ax)
    ax.set_xlabel("NFE (network evaluations per sample, log scale)")
    ax.set_ylabel(f"{ylabel} (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)


# -------------------------------------------------------------------------------------- ring2d
def compare_ring2d(args, out: Path):
    model = load_learned("ring2d")
    exact = pf.get_preset("ring2d")
    ref = exact.sample_data(args.n_ref, generator=torch.Generator().manual_seed(12345))
    n = args.n
    lambdas = [float(v) for v in args.lambdas.split(",")]
    nfes = [int(v) for v in args.nfes.split(",")]
    samplers = args.samplers.split(",")
    rows, best = [], {}

    def q_of(x):
        if x is None:
            return None
        q = sliced_wasserstein_ci(x, ref, n_boot=args.n_boot, seed=0)
        q["nll"] = ring_nll(exact, x)
        return q

    floor = q_of(exact.sample_data(n, generator=torch.Generator().manual_seed(777)))
    print(f"floor (exact data draws, n={n}): {_fmt(floor)}", flush=True)
    for s in samplers:
        for nfe in nfes:
            grid = [1.0] if s == "sscs" else lambdas
            cand = []
            for lam in grid:
                x, spent, wall = _run(model, n, s, nfe, seed0=0, lambda_s=lam)
                q = q_of(x)
                rows.append(dict(model="ring2d", sampler=s, nfe=nfe, nfe_spent=spent, lambda_s=lam, net_time="default",
                                 split="additive", seeds="tune", n=n, sw=None if q is None else q["value"],
                                 lo=None if q is None else q["lo"], hi=None if q is None else q["hi"],
                                 nll=None if q is None else q["nll"], wall_s=wall))
                cand.append((math.inf if q is None else q["value"], lam))
                print(f"  tune {s:14s} nfe {nfe:4d} lambda {lam:4.2f}: {_fmt(q)}  ({wall:.1f}s)", flush=True)
            lam = min(cand)[1]
            x, spent, wall = _run(model, n, s, nfe, seed0=TEST_SEED0, lambda_s=lam)
            q = q_of(x)
            xe, _, _ = _run(exact, n, s, nfe, seed0=TEST_SEED0, lambda_s=lam)
            qe = q_of(xe)
            best[(s, nfe)] = (lam, q, qe, spent)
            rows.append(dict(model="ring2d", sampler=s, nfe=nfe, nfe_spent=spent, lambda_s=lam, net_time="default",
                             split="additive", seeds="test", n=n, sw=None if q is None else q["value"],
                             lo=None if q is None else q["lo"], hi=None if q is None else q["hi"],
                             nll=None if q is None else q["nll"], wall_s=wall,
                             exact_sw=None if qe is None else qe["value"], exact_nll=None if qe is None else qe["nll"]))
            print(f"BEST {s:14s} nfe {nfe:4d} lambda {lam:4.2f}: {_fmt(q)}   exact-score model {_fmt(qe)}", flush=True)
    # knobs: reduced_oba net_time x split at the tuned lambda
    knobs = []
    for nfe in [v for v in (20, 50) if v in nfes]:
        lam = best.get(("reduced_oba", nfe), (1.0,))[0]
        for nt in ("start", "end"):
            for sp in ("additive", "ou"):
                x, spent, wall = _run(model, n, "reduced_oba", nfe, seed0=TEST_SEED0, lambda_s=lam, net_time=nt, split=sp)
                q = q_of(x)
                knobs.append((nfe, lam, nt, sp, q))
                rows.append(dict(model="ring2d", sampler="reduced_oba", nfe=nfe, nfe_spent=spent, lambda_s=lam,
                                 net_time=nt, split=sp, seeds="test", n=n, sw=None if q is None else q["value"],
                                 lo=None if q is None else q["lo"], hi=None if q is None else q["hi"],
                                 nll=None if q is None else q["nll"], wall_s=wall))
                print(f"KNOB reduced_oba nfe {nfe} lambda {lam} net_time {nt:5s} split {sp:8s}: {_fmt(q)}", flush=True)
    _write_csv(rows, out / "learned_ring2d.csv")
    lines = ["# Sampler comparison on the learned ring2d model", "",
             f"Command: `{' '.join(['python'] + sys.argv)}`", "",
             f"Model: `load_learned('ring2d')` (MLP, EMA weights). Metric: sliced W2 (256 projections) of n = {n} "
             f"samples to {args.n_ref} exact draws of the ring2d law, 95% normal bootstrap CI ({args.n_boot} "
             "replicates, sampling variability of the samples only). lambda_s tuned per sampler and NFE over "
             f"{{{args.lambdas}}} on seeds 0..{n - 1} (sscs: lambda_s = 1 only), reported on independent seeds "
             f"{TEST_SEED0}..{TEST_SEED0 + n - 1}. Schedule quadratic, split additive, net_time = sampler default "
             "(end for reduced OBA/OBAB/BAOAB, start otherwise), float32, fused CPU backend.", "",
             f"Finite-sample floor (n exact data draws vs the reference): **{_fmt(floor)}**.", "",
             "Cells: sliced W2 [95% CI], then `nll` = mean negative log-density of the samples under the exact "
             "ring2d mixture (a secondary, lower-variance metric: exact draws give the law's entropy, the floor "
             f"row's value {floor['nll']:.2f}; blur and stray samples raise it, samples packed too tightly around the "
             "8 centres lower it: read it as closeness to the floor value, not lower-is-better).", "",
             "## Best lambda_s per NFE (learned model; in brackets the analytic exact-score model, same sampler/lambda_s/seeds)", "",
             "| sampler | " + " | ".join(f"NFE {v}" for v in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for s in samplers:
        cells = []
        for nfe in nfes:
            lam, q, qe, spent = best[(s, nfe)]
            ex = "div" if qe is None else f"{qe['value']:.4f}, nll {qe['nll']:.3f}"
            cells.append(f"{_fmt(q)} (λ={lam:g}, nfe {spent}; exact {ex})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "## Full lambda_s grid (tuning seeds): sliced W2 / nll", "",
              "| sampler | NFE | " + " | ".join(f"λ={v:g}" for v in lambdas) + " |",
              "|---|---|" + "---|" * len(lambdas)]
    for s in samplers:
        for nfe in nfes:
            cells = []
            for lam in lambdas:
                r = [r for r in rows if r["sampler"] == s and r["nfe"] == nfe and r["lambda_s"] == lam
                     and r["seeds"] == "tune"]
                cells.append("-" if not r else ("diverged" if r[0]["sw"] is None
                                                 else f"{r[0]['sw']:.4f} / {r[0]['nll']:.3f}"))
            lines.append(f"| {s} | {nfe} | " + " | ".join(cells) + " |")
    if knobs:
        lines += ["", "## Reduced OBA knobs (test seeds, tuned lambda_s)", "",
                  "| NFE | λ | net_time | split | sliced W2 [95% CI] |", "|---|---|---|---|---|"]
        for nfe, lam, nt, sp, q in knobs:
            lines.append(f"| {nfe} | {lam:g} | {nt} | {sp} | {_fmt(q)} |")
    (out / "learned_ring2d.md").write_text("\n".join(lines) + "\n")
    def point(s, nfe):
        q = best[(s, nfe)][1]
        return (nfe, None, None, None) if q is None else (nfe, q["value"], q["lo"], q["hi"])

    series = {s: [point(s, nfe) for nfe in nfes] for s in samplers}
    line_plot(series, out / "learned_ring2d.png", "learned ring2d: sliced W2 to the exact law (best lambda_s)",
              "sliced W2", nfes, logy=True, floor=floor["value"])
    return best


def ring_nll(gm, x: torch.Tensor) -> float:
    """Mean negative log-density of samples x (n, 2) under the exact ring2d mixture (for exact data
    draws this is the law's entropy; blur and outliers raise it, over-concentration lowers it)."""
    x = x.double().reshape(len(x), -1)
    mu, var = gm.means.double(), gm.vars.double()[:, 0]             # (K, 2), (K,)
    d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)                   # (n, K)
    logp = gm.log_weights.double()[None] - 0.5 * d2 / var[None] - 0.5 * x.shape[1] * torch.log(2 * math.pi * var[None])
    return float(-torch.logsumexp(logp, 1).mean())


def _write_csv(rows, path: Path):
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# -------------------------------------------------------------------------------------- digits
class DigitFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 10)


def digit_features(seed: int = 0, epochs: int = 400):
    """A fixed feature extractor for 16x16 digits: an MLP 256-128-64-10 (ReLU) trained as a
    classifier on all 1797 shipped digits (full batch, Adam lr 3e-3, ``epochs`` steps, light
    Gaussian pixel noise 0.1 as augmentation, torch seed ``seed``).  Features: the 64-d
    penultimate layer.  Deterministic on CPU for a given torch build."""
    from psld_fast.datasets import load_digits

    x, y = load_digits(16)
    x = x.float()
    torch.manual_seed(seed)
    net = DigitFeatures()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        xb = x + 0.1 * torch.randn(x.shape, generator=g)
        loss = torch.nn.functional.cross_entropy(net.head(net.body(xb)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net.head(net.body(x)).argmax(1) == y).float().mean().item()
    return net, acc


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets: the squared Bures-Wasserstein
    distance (symmetric eigendecompositions: robust to singular covariances, e.g. dead ReLU features)."""
    from psld_fast.metrics import bures_w2

    return bures_w2(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)) ** 2


def _digits_quality(args):
    """``quality(x) -> (sliced W2 with CI to the real digits, FD-dig, mean classifier confidence)``
    (all None for diverged samples), the real digits, and the feature classifier's accuracy."""
    from psld_fast.datasets import load_digits

    real, _ = load_digits(16)
    real_flat = real.reshape(len(real), -1)
    feat, acc = digit_features()
    with torch.no_grad():
        f_real = feat.body(real.float()).numpy().astype(np.float64)

    def quality(x):
        if x is None:
            return None, None, None
        xc = x.clamp(-1, 1)
        q = sliced_wasserstein_ci(xc.reshape(len(xc), -1), real_flat, n_boot=args.n_boot, seed=0)
        with torch.no_grad():
            f = feat.body(xc.float())
            conf = torch.softmax(feat.head(f), 1).max(1).values.mean().item()
        return q, frechet(f.numpy().astype(np.float64), f_real), conf

    return quality, real, acc


def compare_digits(args, out: Path):
    from psld_fast.images import save_grid

    model = load_learned("digits")
    quality, real, acc = _digits_quality(args)

    n = args.n
    nfes = [int(v) for v in args.nfes.split(",")]
    samplers = args.samplers.split(",")
    lambdas = [float(v) for v in args.lambdas.split(",")]
    idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(5))[:n]
    qf, fdf, cf = quality(real[idx])
    print(f"floor: {n} real digits: SW {_fmt(qf)} FD {fdf:.3f} conf {cf:.3f}; classifier train acc {acc:.4f}",
          flush=True)
    rows = []
    table = {}
    for s in samplers:
        for nfe in nfes:
            for lam in ([1.0] if s == "sscs" else lambdas):
                x, spent, wall = _run(model, n, s, nfe, seed0=0, lambda_s=lam, batch_size=args.batch_size)
                q, fd, conf = quality(x)
                table[(s, nfe, lam)] = (q, fd, conf, spent)
                rows.append(dict(model="digits", sampler=s, nfe=nfe, nfe_spent=spent, lambda_s=lam, n=n,
                                 sw=None if q is None else q["value"], lo=None if q is None else q["lo"],
                                 hi=None if q is None else q["hi"], fd_dig=fd, confidence=conf, wall_s=wall))
                print(f"  {s:14s} nfe {nfe:4d} lambda {lam:4.2f}: SW {_fmt(q)}  FD {fd if fd is None else round(fd, 3)}"
                      f"  conf {conf if conf is None else round(conf, 3)}  ({wall:.1f}s)", flush=True)
                if x is not None and nfe == args.grid_nfe and lam == (1.0 if s == "sscs" else lambdas[0]):
                    save_grid(x[:64].float(), out / f"learned_digits_{s}_nfe{nfe}.png")
    _write_csv(rows, out / "learned_digits.csv")
    lines = ["# Sampler comparison on the learned digits model", "",
             f"Command: `{' '.join(['python'] + sys.argv)}`", "",
             f"Model: `load_learned('digits')` (small U-Net, EMA weights). n = {n} samples per cell (seeds "
             f"0..{n - 1}, the same for every cell), schedule quadratic, split additive, net_time default, float32. "
             "Metrics on samples clipped to [-1, 1]: **SW** = sliced W2 (256 projections, 256-d pixels) to the "
             "1797 real digits with a 95% bootstrap CI; **FD-dig** = Frechet distance between 64-d features of a "
             f"small MLP digit classifier trained on the real digits (bench/compare_learned.py `digit_features`, "
             f"seed 0, train accuracy {acc:.4f}); **conf** = mean max-softmax of that classifier (higher = more "
             "clearly one digit).", "",
             f"Floor ({n} real digits vs all 1797): SW {_fmt(qf)}, FD-dig {fdf:.3f}, conf {cf:.3f}.", ""]
    for lam in lambdas:
        lines += [f"## lambda_s = {lam:g}" + (" (sscs always 1)" if lam != 1.0 else ""), "",
                  "| sampler | " + " | ".join(f"NFE {v}: SW [CI] / FD-dig / conf" for v in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for s in samplers:
            key_lam = 1.0 if s == "sscs" else lam
            cells = []
            for nfe in nfes:
                q, fd, conf, spent = table[(s, nfe, key_lam)]
                cells.append("diverged" if q is None else f"{_fmt(q)} / {fd:.3f} / {conf:.3f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Grids (64 samples, NFE {args.grid_nfe}, lambda_s {lambdas[0]:g}): "
              + ", ".join(f"`learned_digits_{s}_nfe{args.grid_nfe}.png`" for s in samplers)]
    (out / "learned_digits.md").write_text("\n".join(lines) + "\n")
    for metric, col, logy in (("SW", 0, True), ("FD-dig", 1, True)):
        series = {}
        for s in samplers:
            lam = 1.0 if s == "sscs" else lambdas[0]
            pts = []
            for nfe in nfes:
                q, fd, conf, _ = table[(s, nfe, lam)]
                if q is None:
                    pts.append((nfe, None, None, None))
                elif col == 0:
                    pts.append((nfe, q["value"], q["lo"], q["hi"]))
                else:
                    pts.append((nfe, fd, None, None))
            series[s] = pts
        line_plot(series, out / f"learned_digits_{metric.lower().replace('-', '_')}.png",
                  f"learned digits: {metric} vs NFE (lambda_s {lambdas[0]:g})", metric, nfes, logy=logy,
                  floor=qf["value"] if col == 0 else fdf)


def digits_knobs(args, out: Path):
    """Reduced OBA net_time x split (and EM / SSCS for reference) on the digits model at low NFE."""
    from psld_fast.images import save_grid

    model = load_learned("digits")
    quality, _, _ = _digits_quality(args)
    n = args.n
    nfes = [int(v) for v in args.nfes.split(",")]
    lam = float(args.lambdas.split(",")[0])
    rows, lines = [], ["# Reduced OBA knobs on the learned digits model", "",
                       f"Command: `{' '.join(['python'] + sys.argv)}`", "",
                       f"n = {n} samples (seeds 0..{n - 1}), lambda_s = {lam:g}, schedule quadratic; metrics as in "
                       "learned_digits.md (SW to the real digits [95% CI] / FD-dig / conf).", "",
                       "| NFE | net_time | split | SW [95% CI] / FD-dig / conf |", "|---|---|---|---|"]
    for nfe in nfes:
        for nt in ("start", "end"):
            for sp in ("additive", "ou"):
                x, spent, wall = _run(model, n, "reduced_oba", nfe, seed0=0, lambda_s=lam, net_time=nt, split=sp,
                                      batch_size=args.batch_size)
                q, fd, conf = quality(x)
                if x is not None and nfe == min(nfes):
                    save_grid(x[:64].float(), out / f"learned_digits_reduced_oba_nfe{nfe}_{nt}_{sp}.png")
                rows.append(dict(model="digits", sampler="reduced_oba", nfe=nfe, nfe_spent=spent, lambda_s=lam,
                                 net_time=nt, split=sp, n=n, sw=None if q is None else q["value"],
                                 lo=None if q is None else q["lo"], hi=None if q is None else q["hi"], fd_dig=fd,
                                 confidence=conf, wall_s=wall))
                cell = "diverged" if q is None else f"{_fmt(q)} / {fd:.3f} / {conf:.3f}"
                lines.append(f"| {nfe} | {nt} | {sp} | {cell} |")
                print(f"KNOB digits reduced_oba nfe {nfe} net_time {nt:5s} split {sp:8s}: {cell}", flush=True)
    _write_csv(rows, out / "learned_digits_knobs.csv")
    lines += ["", f"Grids at NFE {min(nfes)}: `learned_digits_reduced_oba_nfe{min(nfes)}_<net_time>_<split>.png`."]
    (out / "learned_digits_knobs.md").write_text("\n".join(lines) + "\n")


def replot(args, out: Path):
    """Redraw the PNG plots from the CSV written by a comparison run (no sampling)."""
    rows = list(csv.DictReader(open(out / f"learned_{args.model}.csv")))

    def num(v):
        return None if v in (None, "", "None") else float(v)

    if args.model == "ring2d":
        series: dict = {}
        nfes = sorted({int(r["nfe"]) for r in rows})
        for r in rows:
            if r["seeds"] == "test" and r["net_time"] == "default":
                series.setdefault(r["sampler"], []).append((int(r["nfe"]), num(r["sw"]), num(r["lo"]), num(r["hi"])))
        line_plot(series, out / "learned_ring2d.png", "learned ring2d: sliced W2 to the exact law (best lambda_s)",
                  "sliced W2", nfes, logy=True, floor=args.floor)
        return
    lam = float(args.lambdas.split(",")[0])
    nfes = sorted({int(r["nfe"]) for r in rows})
    for metric, key, logy in (("SW", "sw", True), ("FD-dig", "fd_dig", True)):
        series = {}
        for r in rows:
            if float(r["lambda_s"]) == (1.0 if r["sampler"] == "sscs" else lam):
                lo, hi = (num(r["lo"]), num(r["hi"])) if key == "sw" else (None, None)
                series.setdefault(r["sampler"], []).append((int(r["nfe"]), num(r[key]), lo, hi))
        line_plot(series, out / f"learned_digits_{metric.lower().replace('-', '_')}.png",
                  f"learned digits: {metric} vs NFE (lambda_s {lam:g})", metric, nfes, logy=logy,
                  floor=args.floor if key == "sw" else args.floor_fd)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["ring2d", "digits"], required=True)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--nfes", default="20,50,100")
    p.add_argument("--lambdas", default=None, help="lambda_s grid (default ring2d 0,0.25,0.5,1; digits 1)")
    p.add_argument("-n", type=int, default=None, help="samples per cell (default ring2d 10000, digits 512)")
    p.add_argument("--n-ref", type=int, default=50000, help="exact reference draws (ring2d)")
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grid-nfe", type=int, default=50, help="NFE of the per-sampler PNG grids (digits)")
    p.add_argument("--knobs", action="store_true",
                   help="digits: only the reduced_oba net_time x split study (learned_digits_knobs.*)")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG plots from the CSV of a previous run")
    p.add_argument("--floor", type=float, default=None, help="--replot: SW floor line to draw")
    p.add_argument("--floor-fd", type=float, default=None, help="--replot: FD-dig floor line to draw (digits)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machine)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.lambdas is None:
        args.lambdas = "0,0.25,0.5,1" if args.model == "ring2d" else "1"
    if args.n is None:
        args.n = 10000 if args.model == "ring2d" else 512
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.replot:
        replot(args, args.out)
        return
    if args.model == "ring2d":
        compare_ring2d(args, args.out)
    elif args.knobs:
        digits_knobs(args, args.out)
    else:
        compare_digits(args, args.out)
    what = "learned_digits_knobs" if args.model == "digits" and args.knobs else f"learned_{args.model}"
    print(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.out}/{what}.*")


if __name__ == "__main__":
    main()
