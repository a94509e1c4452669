"""psld_fast side by side with k-diffusion (issue 18, item 5) and the start-knob protocol (item 2).

Regenerates bench/results/kdiffusion/ (CSV, Markdown, PNG).  Parts (run all with no flag):

  --protocol  docs/any_model_protocol.md: start "T" vs "sigma_max" for lifted models, both sampler
              families, testbeds a1/a2, NFE 10/20/50/100, exact W2; applies the decision rule
              (start_protocol.csv / .md).  psld_fast.lift.DEFAULT_START is set from it by hand.
  --exact     exact-law W2 on (a1) and (a2) for k-diffusion's samplers and psld_fast's (exact.csv/.md)
  --mixture   an 8-d Gaussian mixture, sliced W2 with 95% CIs (mixture.csv/.md)
  --errors    controlled denoiser errors growing toward small sigma on (a1), exact laws (errors.csv/.md)
  --learned   the shipped learned PSLD digits network: psld_fast natively, k-diffusion through
              psld_fast.as_denoiser; digit-feature FD of bench/compare_learned.py (learned.csv/.md)
  --speed     per-NFE overhead (zero-cost denoiser) and end to end (small network), interleaved rounds
  --quick     fewer cells (a smoke run; results are written to the same files)

Exact laws for k-diffusion's samplers: with an affine denoiser (the exact Gaussian denoiser, or it
with affine errors) every k-diffusion sampler is affine in its initial noise x_T and its injected
noises, per coordinate.  It is run unchanged on a batch of probe rows: row 0 with x_T = 0 and zero
noise (the offset c), row 1 with x_T = 1 (A + c), and one row per independent unit noise with a unit
impulse only there (a custom ``noise_sampler``; the calls are counted by a dry run).  Then mean = c
and var = A^2 sigma_0^2 + sum_j b_j^2.  For the Brownian-tree samplers (dpmpp_sde, dpmpp_2m_sde,
dpmpp_3m_sde, whose default noise is k-diffusion's BrownianTreeNoiseSampler) the independent units
are the Brownian increments over the elementary intervals between all requested sigmas, and each
call returns (W(sigma_next) - W(sigma)) / sqrt|sigma - sigma_next|: that is the exact law of the
Brownian-tree noise (for dpmpp_2m_sde / dpmpp_3m_sde the requested intervals do not overlap and it
equals the law with independent default noise; dpmpp_sde's two calls per step overlap, so there it
differs and both are reported).  One Monte Carlo check with the real BrownianTreeNoiseSampler is
printed (dpmpp_2m_sde).  NFE is counted with a call counter on the denoiser for every sampler of
both libraries; a k-diffusion sampler gets the most Karras steps (0.002 .. 80, rho 7) whose counted
NFE fits the budget (heun / dpm_2 / dpmpp_sde / dpmpp_2s_ancestral: 9/19/49/99).

    python bench/compare_kdiffusion.py --protocol
    python bench/compare_kdiffusion.py --exact --mixture --errors
    python bench/compare_kdiffusion.py --speed
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psld_fast as pf  # noqa: E402
from _benchutil import device_name, git_revision, interleaved, load_average, pin_threads  # noqa: E402
from psld_fast.exact import gaussian_w2_1d, lifted_stage_maps, lifted_program_x_law  # noqa: E402
from psld_fast.lift import lift_terms  # noqa: E402
from psld_fast.peers import load_kdiffusion  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "kdiffusion"
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NFES = (10, 20, 50, 100)
DIVERGED = 10.0  # the protocol's divergence threshold on W2

STOCHASTIC_FAMILY = ("em", "sscs", "reduced_oba", "reduced_bao", "reduced_obab", "reduced_baoab")
DETERMINISTIC_FAMILY = ("ode_euler", "rse", "rvv", "ci_ei", "ci_ddim", "ci_ddim2", "csps_d")

KD_SAMPLERS = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m", "euler_ancestral", "dpmpp_2s_ancestral",
               "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
#: k-diffusion samplers with a noise_sampler argument; those whose default is the Brownian tree.
KD_NOISY = ("euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
KD_BROWNIAN = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")

_KD = None


def kd():
    global _KD
    if _KD is None:
        _KD = load_kdiffusion()
    return _KD


def now() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())


# ------------------------------------------------------------------------------------ testbeds
def testbeds() -> dict:
    """(a1) the 16-d Gaussian, variances log-spaced 1e-3 .. 1, means 0.5 N(0, 1) (torch seed 0, as
    the "gaussian" preset draws its means); (a2) the stiff 16-d Gaussian, variances 1e-5 .. 1, mean 0."""
    g = torch.Generator().manual_seed(0)
    mu1 = (0.5 * torch.randn(1, 16, generator=g, dtype=torch.float64)).numpy().ravel()
    return {"a1": (mu1, np.logspace(-3, 0, 16)), "a2": (np.zeros(16), np.logspace(-5, 0, 16))}


def gaussian_model(mu, var) -> pf.GaussianMixture:
    return pf.GaussianMixture(torch.as_tensor(mu)[None], torch.as_tensor(np.sqrt(var))[None])


class Counted(torch.nn.Module):
    """A denoiser with a call counter (one call = one NFE) and optional affine errors."""

    def __init__(self, inner, error=None):
        super().__init__()
        self.inner, self.error, self.calls = inner, error, 0

    def forward(self, x, sigma, **kw):
        self.calls += 1
        out = self.inner(x, sigma, **kw)
        if self.error is not None:
            out = self.error.torch(x, out, sigma)
        return out


# ------------------------------------------------------------------------- controlled errors
class DenoiserError:
    """Affine denoiser errors growing toward small sigma: r(s) = r_data exp(-s / s_scale) + r_noise.

    kind "additive": ``D + r(s) U`` (U a fixed N(0, 1) direction per coordinate, seed 0);
    kind "relative_ve_eps": the VE eps ``(x - D) / s`` scaled by ``1 + r(s)``, i.e.
    ``D' = (1 + r) D - r x``.  Both keep D affine in x, so exact laws stay computable.
    """

    def __init__(self, kind: str, dim: int, r_data=0.05, s_scale=0.5, r_noise=0.005, seed=0):
        self.kind = kind
        self.U = np.random.default_rng(seed).normal(size=dim)
        self.r_data, self.s_scale, self.r_noise = r_data, s_scale, r_noise

    def r(self, s):
        return self.r_data * np.exp(-np.asarray(s, dtype=np.float64) / self.s_scale) + self.r_noise

    def affine(self, a, c, s):  # for psld_fast.exact.lifted_stage_maps: D = a y + c
        r = float(self.r(s))
        if self.kind == "additive":
            return a, c + r * self.U
        return (1 + r) * a - r, (1 + r) * c

    def torch(self, x, out, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        r = torch.as_tensor(self.r(s.cpu().numpy()), dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        if self.kind == "additive":
            return out + r * torch.as_tensor(self.U, dtype=x.dtype).reshape(1, *x.shape[1:])
        return (1 + r) * out - r * x


# ------------------------------------------------------------------- psld_fast exact laws
def psld_program(sampler, nfe, start=None, **knobs):
    """(DenoiserModel-resolved process, program) for the lifted exact denoiser with ``start``
    (None: the library default, per family) — the program ``pf.sample`` would run."""
    dm = pf.DenoiserModel(lambda x, s: x, (16,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, start=start)
    proc = dm.process_for(sampler)
    return dm, proc, pf.compile_sampler(sampler, proc, nfe, **knobs)


def psld_law(sampler, nfe, mu, var, start=None, error=None, **knobs):
    dm, proc, prog = psld_program(sampler, nfe, start, **knobs)
    m, v = lifted_program_x_law(prog, proc, mu, var, dm.sigma_min, dm.sigma_max,
                                None if error is None else error.affine)
    return m, v, prog.nfe


def psld_karras_law(sampler, nfe, mu, var, error=None, **knobs):
    """Exact law of ``psld_fast.k_sampling.sample_<sampler>`` on Karras sigmas (x = N(0, sigma_0^2)
    lifted exactly to z at sigma_0; then the program's stages), with the steps whose NFE fits."""
    from psld_fast.k_sampling import psld_grid
    from psld_fast.samplers import SAMPLER_SPECS

    spec = SAMPLER_SPECS[sampler]
    n = (nfe - 1) // spec.evals_per_step + 1          # steps + 1 sigmas > 0, and a final 0
    sig = kd().sampling.get_sigmas_karras(n + 1, SIGMA_MIN, SIGMA_MAX, rho=7.0).double()
    process, grid, denoise = psld_grid(sig)
    prog_nfe = (len(grid) - 1) * spec.evals_per_step + (1 if denoise else 0)
    prog = pf.compile_sampler(sampler, process, prog_nfe, schedule=grid, denoise=denoise, **knobs)
    pos = sig[sig > 0].numpy()
    smin, smax = float(pos.min()) * (1 - 1e-9), float(pos[0]) * (1 + 1e-9)
    D = len(mu)
    maps = lifted_stage_maps(prog, process, mu, var, smin, smax, None if error is None else error.affine)
    next(maps)  # stage 0 (the prior draw) is replaced by the exact lift of x ~ N(0, sigma_0^2)
    t = {k: float(v) for k, v in lift_terms(process, torch.tensor([process.T], dtype=torch.float64)).items()}
    s0 = float(sig[0])
    muv = np.array([t["mu0"], t["mu1"]])
    S = np.array([[t["S00"], t["S01"]], [t["S01"], t["S11"]]])
    cov0 = S - t["sigma"] ** 2 * np.outer(muv, muv) + s0 ** 2 * np.outer(muv, muv)
    mean = np.zeros((D, 2))
    cov = np.broadcast_to(cov0, (D, 2, 2)).copy()
    for A, b, noise in maps:
        mean = np.einsum("dij,dj->di", A, mean) + b
        cov = A @ cov @ np.transpose(A, (0, 2, 1)) + noise
    return mean[:, 0], cov[:, 0, 0], prog.nfe


# ------------------------------------------------------------------ k-diffusion exact laws
def kd_fn(name):
    return getattr(kd().sampling, f"sample_{name}")


def karras(n):
    return kd().sampling.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0).double()


class _Recorder:
    def __init__(self, x):
        self.x, self.calls = x, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.zeros_like(self.x)


def kd_nfe(name, n, den) -> tuple[int, list]:
    """Counted NFE of ``name`` on n Karras steps, and its noise calls (sigma, sigma_next)."""
    x = torch.zeros(1, den.dim, dtype=torch.float64)
    c = Counted(den.fn)
    kw = {}
    rec = _Recorder(x)
    if name in KD_NOISY:
        kw["noise_sampler"] = rec
    kd_fn(name)(c, x, karras(n), disable=True, **kw)
    return c.calls, rec.calls


def kd_steps_for(name, nfe, den) -> tuple[int, int, list]:
    n = nfe
    while n >= 1:
        spent, calls = kd_nfe(name, n, den)
        if spent <= nfe:
            return n, spent, calls
        n = min(n - 1, (n * nfe) // spent + 1) if spent > nfe + 1 else n - 1
    raise RuntimeError(f"{name}: no step count fits NFE {nfe}")


class _ProbeNoise:
    """Returns, for noise call k, the (B, D) rows ``coef[k, r - 2]`` (rows 0/1 get zero noise)."""

    def __init__(self, coef, D):
        self.coef, self.D, self.k = coef, D, 0  # coef (calls, units)

    def __call__(self, sigma, sigma_next):
        row = torch.zeros(2 + self.coef.shape[1], dtype=torch.float64)
        row[2:] = torch.as_tensor(self.coef[self.k])
        self.k += 1
        return row[:, None].expand(-1, self.D).clone()


def noise_coefficients(calls, brownian: bool) -> np.ndarray:
    """(calls, units): each noise call as a combination of independent unit normals."""
    if not brownian:
        return np.eye(len(calls))
    pts = sorted({p for c in calls for p in c})
    lens = np.diff(pts)
    coef = np.zeros((len(calls), len(lens)))
    for i, (s, sn) in enumerate(calls):
        lo, hi = min(s, sn), max(s, sn)
        inside = (np.array(pts[:-1]) >= lo) & (np.array(pts[1:]) <= hi)
        sign = 1.0 if sn > s else -1.0          # W(sigma_next) - W(sigma)
        coef[i, inside] = sign * np.sqrt(lens[inside]) / math.sqrt(hi - lo)
    return coef


class GaussDen:
    def __init__(self, mu, var):
        self.dim = len(mu)
        self.fn = gaussian_model(mu, var).as_edm_denoiser()


def kd_law(name, nfe, mu, var, brownian=None, error=None, den=None):
    """Exact per-coordinate (mean, var, nfe spent) of k-diffusion's ``name`` on N(mu, diag var)."""
    den = den or GaussDen(mu, var)
    n, spent, calls = kd_steps_for(name, nfe, den)
    if brownian is None:
        brownian = name in KD_BROWNIAN
    coef = noise_coefficients(calls, brownian) if calls else np.zeros((0, 0))
    D = len(mu)
    B = 2 + coef.shape[1]
    x = torch.zeros(B, D, dtype=torch.float64)
    x[1] = 1.0
    c = Counted(den.fn, error)
    kw = {"noise_sampler": _ProbeNoise(coef, D)} if name in KD_NOISY else {}
    sig = karras(n)
    out = kd_fn(name)(c, x, sig, disable=True, **kw).numpy()
    assert c.calls == spent
    off = out[0]
    A = out[1] - off
    b = out[2:] - off
    v = A ** 2 * float(sig[0]) ** 2 + (b ** 2).sum(0)
    return off, v, spent


def kd_mc_check(mu, var, nfe=20, n=4000, seed=0):
    """dpmpp_2m_sde with its real BrownianTreeNoiseSampler (default) vs the exact law: Gaussian-fit
    W2 of n draws, and the same statistic for n draws from the exact law itself (the MC floor)."""
    den = GaussDen(mu, var)
    steps, spent, _ = kd_steps_for("dpmpp_2m_sde", nfe, den)
    torch.manual_seed(seed)
    sig = karras(steps)
    x = torch.randn(n, len(mu), dtype=torch.float64) * sig[0]
    out = kd_fn("dpmpp_2m_sde")(Counted(den.fn), x, sig, disable=True).numpy()
    m_ex, v_ex, _ = kd_law("dpmpp_2m_sde", nfe, mu, var, den=den)
    m_iid, v_iid, _ = kd_law("dpmpp_2m_sde", nfe, mu, var, brownian=False, den=den)
    fit = gaussian_w2_1d(out.mean(0), out.var(0, ddof=1), m_ex, v_ex)
    rng = np.random.default_rng(seed)
    ref = m_ex + np.sqrt(v_ex) * rng.standard_normal((n, len(mu)))
    floor = gaussian_w2_1d(ref.mean(0), ref.var(0, ddof=1), m_ex, v_ex)
    return dict(nfe=spent, n=n, w2_mc_to_exact=fit, floor=floor,
                w2_exact=gaussian_w2_1d(m_ex, v_ex, mu, var),
                w2_mc_to_data=gaussian_w2_1d(out.mean(0), out.var(0, ddof=1), mu, var),
                brownian_vs_iid=float(np.max(np.abs(v_ex - v_iid)) + np.max(np.abs(m_ex - m_iid))))


# ----------------------------------------------------------------------------------- output
def write_csv(rows, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: Path):
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def fmt(v, nd=4):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "diverged"
    if v >= 100:
        return f"{v:.3g}"
    return f"{v:.{nd}f}" if v < 1 else f"{v:.3f}"


def md_table(rows_by_label: dict, cols, label="sampler", best=True, fmtc=fmt):
    """rows_by_label: label -> {col: value or (value, text)}; bold the smallest per column."""
    lines = [f"| {label} | " + " | ".join(str(c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
    mins = {}
    for c in cols:
        vals = [r[c][0] if isinstance(r.get(c), tuple) else r.get(c) for r in rows_by_label.values()]
        vals = [v for v in vals if isinstance(v, float) and math.isfinite(v)]
        mins[c] = min(vals) if vals else None
    for lab, r in rows_by_label.items():
        cells = []
        for c in cols:
            v = r.get(c)
            txt = None
            if isinstance(v, tuple):
                v, txt = v
            s = txt if txt is not None else (fmtc(v) if v is not None else "")
            if best and v is not None and mins[c] is not None and v == mins[c]:
                s = f"**{s}**"
            cells.append(s)
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


# -------------------------------------------------------------------------------- protocol
def part_protocol(args):
    print(f"[{now()}] protocol", flush=True)
    tb = testbeds()
    nfes = (10, 20) if args.quick else NFES
    rows = []
    for fam, samplers in (("stochastic", STOCHASTIC_FAMILY), ("deterministic", DETERMINISTIC_FAMILY)):
        for s in samplers:
            for name, (mu, var) in tb.items():
                for nfe in nfes:
                    r = dict(family=fam, sampler=s, testbed=name, nfe=nfe)
                    for start in ("T", "sigma_max"):
                        m, v, spent = psld_law(s, nfe, mu, var, start=start)
                        w = gaussian_w2_1d(m, v, mu, var) if np.all(np.isfinite(v)) and np.all(v >= 0) else math.inf
                        r[f"w2_{start}"] = w if math.isfinite(w) else float("inf")
                        r["nfe_spent"] = spent
                    rows.append(r)
                    print(f"  {fam:13s} {s:14s} {name} nfe {nfe:3d}: T {r['w2_T']:.4g}  sigma_max "
                          f"{r['w2_sigma_max']:.4g}", flush=True)
    decision, lines_dec = {}, []
    ok = lambda w: math.isfinite(w) and w <= DIVERGED  # noqa: E731
    for fam in ("stochastic", "deterministic"):
        fr = [r for r in rows if r["family"] == fam]
        both = [r for r in fr if ok(r["w2_T"]) and ok(r["w2_sigma_max"])]
        one = [r for r in fr if ok(r["w2_T"]) != ok(r["w2_sigma_max"])]
        none = [r for r in fr if not ok(r["w2_T"]) and not ok(r["w2_sigma_max"])]
        for r in fr:
            if r in both:
                r["log_ratio"], r["counted"] = math.log(r["w2_sigma_max"] / r["w2_T"]), "both finite"
            elif r in one:
                # counts for the other start: the diverged start's W2 is taken at the threshold (10), a
                # conservative bound (its real W2 is larger), so one blow-up cannot dominate the mean
                sm, t = min(r["w2_sigma_max"], DIVERGED), min(r["w2_T"], DIVERGED)
                r["log_ratio"] = math.log(sm / t)
                r["counted"] = ("for sigma_max (T diverged; T taken as 10)" if ok(r["w2_sigma_max"])
                                else "for T (sigma_max diverged; sigma_max taken as 10)")
            else:
                r["log_ratio"], r["counted"] = None, "both diverged: excluded"
        used = [r for r in fr if r["log_ratio"] is not None]
        mean = statistics.fmean(r["log_ratio"] for r in used) if used else 0.0
        mean_both = statistics.fmean(r["log_ratio"] for r in both) if both else 0.0
        fin = [r for r in fr if math.isfinite(r["w2_T"]) and math.isfinite(r["w2_sigma_max"])]
        mean_fin = statistics.fmean(math.log(r["w2_sigma_max"] / r["w2_T"]) for r in fin) if fin else 0.0
        wins_sm = sum(1 for r in used if r["log_ratio"] < 0)
        choice = "sigma_max" if mean < -0.02 else "T"
        decision[fam] = choice
        lines_dec += [f"- **{fam}**: mean log(W2[sigma_max] / W2[T]) = **{mean:+.4f}** over {len(used)} cells "
                      f"({len(both)} with both starts finite, {len(one)} where one start diverged and counts for "
                      f"the other; sigma_max better in {wins_sm}, T better in {len(used) - wins_sm}): "
                      f"{'below -0.02' if mean < -0.02 else 'above +0.02' if mean > 0.02 else 'within +-0.02'} "
                      f"-> default **{choice}**."]
        if one:
            lines_dec.append("  One start diverged (W2 > 10 or non-finite): " + "; ".join(
                f"{r['sampler']} {r['testbed']} NFE {r['nfe']} (T {fmt(r['w2_T'])}, sigma_max {fmt(r['w2_sigma_max'])})"
                for r in one) + ".")
        if none:
            lines_dec.append("  Both starts diverged (excluded): " + "; ".join(
                f"{r['sampler']} {r['testbed']} NFE {r['nfe']} (T {fmt(r['w2_T'])}, sigma_max {fmt(r['w2_sigma_max'])})"
                for r in none) + ".")
        per_nfe = []
        for nfe in nfes:
            x = [r["log_ratio"] for r in both if r["nfe"] == nfe]
            if x:
                per_nfe.append(f"NFE {nfe}: {statistics.fmean(x):+.3f} ({len(x)})")
        lines_dec.append(f"  Readings of the rule's text, for the record: only the cells with both starts <= 10 "
                         f"(diverged cells not counted at all): {mean_both:+.4f}; every cell with both W2 finite "
                         f"(the literal 'finite', blow-ups included at their size): {mean_fin:+.4f}. "
                         f"Per NFE over the both-finite cells: " + ", ".join(per_nfe) + ".")
    write_csv(rows, OUT / "start_protocol.csv")
    lines = ["# Start knob of lifted models: the protocol of docs/any_model_protocol.md", "",
             f"Command: `python bench/compare_kdiffusion.py --protocol{' --quick' if args.quick else ''}` "
             f"(git {git_revision()}).", "",
             "Exact W2 of the output x-law (moments through the program; the clamped Gaussian denoiser is affine, "
             "`psld_fast.exact.lifted_program_x_law`) to the data law. Denoiser range 0.002 .. 80; quadratic grid; "
             "every sampler at its defaults; the largest budget <= NFE the sampler fits. "
             "(a1) 16-d Gaussian, variances log-spaced 1e-3 .. 1, means 0.5 N(0,1) (torch seed 0); "
             "(a2) 16-d, variances 1e-5 .. 1, mean 0.", "",
             "## Decision (rule: mean log ratio < -0.02 -> sigma_max; > +0.02 -> T; else T)", "",
             "How the rule's text is read here: the mean is over the cells where at least one start stays "
             "finite and <= 10; a cell where exactly one start diverged (non-finite or W2 > 10) 'counts for the "
             "other start' by entering the mean with the diverged start's W2 taken at the threshold 10 (a "
             "conservative bound: its real W2 is larger); cells where both diverge are excluded. The two other "
             "readings are given beside each decision; the deterministic family's verdict depends on the "
             "reading (ignoring the diverged cells altogether gives -0.002, i.e. T), the stochastic one does not.",
             ""] + lines_dec + [
             "", f"`psld_fast.lift.DEFAULT_START = {decision!r}`", "", "## Rows", "",
             "| family | sampler | testbed | NFE | W2 start=T | W2 start=sigma_max | log ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = "" if r["log_ratio"] is None else f"{r['log_ratio']:+.3f}"
        wt, ws = r["w2_T"], r["w2_sigma_max"]
        lines.append(f"| {r['family']} | {r['sampler']} | {r['testbed']} | {r['nfe']} | "
                     f"{'**' + fmt(wt) + '**' if wt < ws else fmt(wt)} | {'**' + fmt(ws) + '**' if ws < wt else fmt(ws)}"
                     f" | {lr} |")
    (OUT / "start_protocol.md").write_text("\n".join(lines) + "\n")
    print("DECISION", decision, flush=True)
    print("\n".join(lines_dec))
    return decision


# ------------------------------------------------------------------------------------- main
PARTS = ("protocol", "exact", "mixture", "errors", "learned", "speed")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for p in PARTS:
        ap.add_argument(f"--{p}", action="store_true", help=f"run the {p} part")
    ap.add_argument("--quick", action="store_true", help="fewer cells (smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot-only", action="store_true", help="only redraw kdiffusion.png / kdiffusion.md from the CSVs")
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="psld_fast")
    OUT.mkdir(parents=True, exist_ok=True)
    todo = [p for p in PARTS if getattr(args, p)] or ([] if args.plot_only else list(PARTS))
    for p in todo:
        t0 = time.perf_counter()
        globals()[f"part_{p}"](args)
        print(f"[{now()}] {p}: {time.perf_counter() - t0:.1f} s", flush=True)
    if "summary_md" in globals():
        summary_md(args)


if __name__ == "__main__":
    main()
