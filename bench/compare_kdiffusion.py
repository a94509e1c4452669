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
  --learned-split  the train-split models (digits_split: PSLD net; digits_edm: EDM denoiser) scored
              against the held-out digits, mean +- sd over --split-seeds sample seeds, with real-vs-real
              floors (learned_split.csv/.md)
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
from psld_fast.exact import gaussian_w2_1d  # noqa: E402
from psld_fast.lift import lifted_program_x_law, lifted_stage_maps  # noqa: E402
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

    def affine(self, a, c, s):  # for psld_fast.lift.lifted_stage_maps: D = a y + c
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
def psld_program(sampler, nfe, start=None, sde=None, end=None, **knobs):
    """(DenoiserModel-resolved process, program) for the lifted exact denoiser with ``start`` and
    ``end`` (None: the library defaults, per sampler family / group) and process ``sde`` (None: the
    default PSLD) — the program ``pf.sample`` would run."""
    dm = pf.DenoiserModel(lambda x, s: x, (16,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, start=start, sde=sde,
                          end=end)
    proc = dm.process_for(sampler)
    return dm, proc, pf.compile_sampler(sampler, proc, nfe, **knobs)


def psld_law(sampler, nfe, mu, var, start=None, error=None, sde=None, end=None, **knobs):
    dm, proc, prog = psld_program(sampler, nfe, start, sde, end, **knobs)
    m, v = lifted_program_x_law(prog, proc, mu, var, dm.sigma_min, dm.sigma_max,
                                None if error is None else error.affine)
    return m, v, prog.nfe


def psld_karras_law(sampler, nfe, mu, var, error=None, **knobs):
    """Exact law of ``psld_fast.k_sampling.sample_<sampler>`` on Karras sigmas (x = N(0, sigma_0^2)
    lifted exactly to z at sigma_0; then the program's stages), with the steps whose NFE fits."""
    from psld_fast.k_sampling import psld_grid
    from psld_fast.samplers import SAMPLER_SPECS

    spec = SAMPLER_SPECS[sampler]
    n = (nfe - 1) // spec.evals_per_step + 1          # n sigmas > 0 (n - 1 steps) and a final 0 (denoising)
    sig = karras(n)
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
             "`psld_fast.lift.lifted_program_x_law`) to the data law. Denoiser range 0.002 .. 80; quadratic grid; "
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



# ----------------------------------------------------------------------------------- exact
def exact_rows(mu, var, nfes, error=None, testbed="a1", quick=False):
    """Rows (library, sampler, label, nfe, nfe_spent, w2) of every cell on N(mu, diag var)."""
    rows = []
    den = GaussDen(mu, var)

    def add(lib, sampler, label, nfe, law):
        m, v, spent = law
        w = gaussian_w2_1d(m, v, mu, var) if np.all(np.isfinite(v)) and np.all(v >= 0) else float("inf")
        rows.append(dict(testbed=testbed, library=lib, sampler=sampler, label=label, nfe=nfe, nfe_spent=spent, w2=w))

    kds = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "heun") if quick else KD_SAMPLERS
    for name in kds:
        for nfe in nfes:
            add("k-diffusion", name, f"k-diffusion {name}", nfe, kd_law(name, nfe, mu, var, error=error, den=den))
            if name == "dpmpp_sde":  # its two calls per step overlap in the Brownian tree: iid noise differs
                add("k-diffusion", name, "k-diffusion dpmpp_sde (iid noise)", nfe,
                    kd_law(name, nfe, mu, var, brownian=False, error=error, den=den))
    pss = ("em", "sscs", "reduced_oba", "rvv", "ei_2m", "ei_2m_sde") if quick else pf.SAMPLERS + pf.DETERMINISTIC_SAMPLERS
    for name in pss:
        for nfe in nfes:
            add("psld_fast", name, f"psld_fast {name}", nfe, psld_law(name, nfe, mu, var, error=error))
    for lam in (0.5, 2.0):
        for nfe in nfes:
            add("psld_fast", "reduced_oba", f"psld_fast reduced_oba lambda_s {lam:g}", nfe,
                psld_law("reduced_oba", nfe, mu, var, error=error, lambda_s=lam))
    for nfe in nfes:
        add("psld_fast", "reduced_oba", "psld_fast reduced_oba start=T", nfe,
            psld_law("reduced_oba", nfe, mu, var, start="T", error=error))
        for name in ("ei_2m", "ei_2m_sde"):  # the multistep samplers away from the start protocol's default
            add("psld_fast", name, f"psld_fast {name} start=T", nfe, psld_law(name, nfe, mu, var, start="T", error=error))
        if error is None:  # the end protocol's other choice: the process's own eps_end (sigma_y 0.009)
            add("psld_fast", "ei_2m", "psld_fast ei_2m end=process", nfe, psld_law("ei_2m", nfe, mu, var, end="process"))
        add("psld_fast", "reduced_oba", "psld_fast reduced_oba (k_sampling, Karras sigmas)", nfe,
            psld_karras_law("reduced_oba", nfe, mu, var, error=error))
    return rows


def table_lines(rows, nfes, value="w2", label_note=None):
    by = {}
    for r in rows:
        lab = r["label"]
        spent = int(r["nfe_spent"])
        note = f" ({spent})" if spent != int(r["nfe"]) else ""
        v = float(r[value])
        by.setdefault(lab, {})[int(r["nfe"])] = (v if math.isfinite(v) and v <= 1e6 else float("inf"),
                                                 (fmt(v) if math.isfinite(v) and v <= 1e6 else "diverged") + note)
    return md_table(by, list(nfes))


def sanity_checks(mu, var):
    """Monte Carlo cross-checks of the exact laws (printed and written to exact.md)."""
    out = []
    mc = kd_mc_check(mu, var)
    out.append(f"- k-diffusion dpmpp_2m_sde NFE {mc['nfe']} with its real BrownianTreeNoiseSampler, n = {mc['n']}: "
               f"Gaussian-fit W2 of the draws to the exact law {mc['w2_mc_to_exact']:.4f}, MC floor (n draws of the exact "
               f"law itself) {mc['floor']:.4f}; exact W2 to the data {mc['w2_exact']:.4f}, MC {mc['w2_mc_to_data']:.4f}. "
               f"Brownian-increment law vs independent-noise law: max difference {mc['brownian_vs_iid']:.1e} (identical).")
    n = 4000
    gm = gaussian_model(mu, var)
    dm = pf.DenoiserModel(gm.as_edm_denoiser(), (16,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    res = pf.sample(dm, n, sampler="reduced_oba", nfe=20, seeds=torch.arange(n), progress=False, dtype=torch.float64,
                    backend="reference")
    x = res.x.numpy()
    m, v, _ = psld_law("reduced_oba", 20, mu, var)
    rng = np.random.default_rng(1)
    ref = m + np.sqrt(v) * rng.standard_normal((n, len(mu)))
    out.append(f"- psld_fast.sample(DenoiserModel, reduced_oba, NFE {res.nfe}, default start), n = {n}: Gaussian-fit W2 "
               f"to the exact law {gaussian_w2_1d(x.mean(0), x.var(0, ddof=1), m, v):.4f} (floor "
               f"{gaussian_w2_1d(ref.mean(0), ref.var(0, ddof=1), m, v):.4f}).")
    from psld_fast.k_sampling import sample_reduced_oba

    torch.manual_seed(0)
    sig = karras(20)
    c = Counted(gm.as_edm_denoiser())
    xk = sample_reduced_oba(c, torch.randn(n, 16, dtype=torch.float64) * sig[0], sig, seeds=torch.arange(n),
                            backend="reference").numpy()
    m2, v2, spent = psld_karras_law("reduced_oba", 20, mu, var)
    out.append(f"- psld_fast.k_sampling.sample_reduced_oba on 20 Karras steps (NFE counted {c.calls}, law's {spent}), "
               f"n = {n}: Gaussian-fit W2 to the exact law {gaussian_w2_1d(xk.mean(0), xk.var(0, ddof=1), m2, v2):.4f} "
               f"(same floor).")
    for line in out:
        print(line, flush=True)
    return out


def part_exact(args):
    print(f"[{now()}] exact", flush=True)
    nfes = (10, 20) if args.quick else NFES
    rows = []
    for name, (mu, var) in testbeds().items():
        rows += exact_rows(mu, var, nfes, testbed=name, quick=args.quick)
        print(f"  {name}: {len(rows)} rows", flush=True)
    write_csv(rows, OUT / "exact.csv")
    checks = sanity_checks(*testbeds()["a1"])
    lines = ["# Exact Gaussian testbeds: k-diffusion vs psld_fast (exact W2)", "",
             f"Command: `python bench/compare_kdiffusion.py --exact` (git {git_revision()}, k-diffusion "
             f"{kd().version}).", "",
             "One exact denoiser for both libraries (`GaussianMixture.as_edm_denoiser()`, float64). Exact W2 of the "
             "output law to the data law N(mu, diag var). k-diffusion: Karras sigmas 0.002 .. 80, rho 7, the most steps "
             "whose counted NFE fits the budget (NFE spent in parentheses where it is less), its samplers unchanged "
             "(laws by the probe rows of the module doc; dpmpp_sde / dpmpp_2m_sde / dpmpp_3m_sde with their default "
             "Brownian-tree noise, exact Brownian-increment law). psld_fast: `DenoiserModel` (range 0.002 .. 80, the "
             f"default start {pf.lift.DEFAULT_START}) and the program `sample` runs (quadratic grid, defaults), exact law "
             "by `psld_fast.lift.lifted_program_x_law`; `start=T` is the issue's reading; `k_sampling` is the "
             "k-diffusion-signature entry point on the same Karras sigmas as k-diffusion. Best per column in bold.", ""]
    for name in testbeds():
        lines += [f"## ({name}) " + ("16-d Gaussian, variances 1e-3 .. 1, means 0.5 N(0,1)" if name == "a1"
                                     else "stiff 16-d Gaussian, variances 1e-5 .. 1, mean 0"), "",
                  "| | " + " | ".join(f"NFE {n}" for n in nfes) + " |"][:2]
        lines += table_lines([r for r in rows if r["testbed"] == name], nfes) + [""]
    lines += ["## Cross-checks (Monte Carlo against the exact laws)", ""] + checks + [""]
    (OUT / "exact.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------- errors
ERROR_KINDS = ("additive", "additive_small", "relative_ve_eps")

def part_errors(args):
    print(f"[{now()}] errors", flush=True)
    nfes = (10, 20) if args.quick else NFES
    mu, var = testbeds()["a1"]
    rows = []
    for kind in ERROR_KINDS:
        err = DenoiserError(kind.replace("_small", ""), len(mu), **(dict(r_data=0.005, r_noise=0.0005)
                                                                 if kind.endswith("_small") else {}))
        rs = exact_rows(mu, var, nfes, error=err, testbed=f"a1-{kind}", quick=True)
        rows += rs
        print(f"  {kind}: {len(rs)} rows", flush=True)
    write_csv(rows, OUT / "errors.csv")
    lines = ["# Controlled denoiser errors on (a1): k-diffusion vs psld_fast (exact W2)", "",
             f"Command: `python bench/compare_kdiffusion.py --errors` (git {git_revision()}).", "",
             "The exact Gaussian denoiser of (a1) with an error that grows toward small sigma, "
             "r(sigma) = 0.05 exp(-sigma / 0.5) + 0.005 (sigma as the denoiser is called: psld_fast clamps it to "
             "0.002 .. 80): (i) **additive** on the output, D + r(sigma) U with U a fixed N(0, 1) vector (numpy seed 0); "
             "(ii) **relative on the VE eps**, (x - D) / sigma scaled by 1 + r(sigma), i.e. D' = (1 + r) D - r x. Both keep "
             "D affine, so the laws stay exact for both libraries. (iii) **additive_small**: (i) with r ten times smaller "
             "(0.005 exp(-sigma / 0.5) + 0.0005): at the first size the bias integrated over log sigma dominates every "
             "sampler's W2 (about 1, growing with NFE toward the biased process's own law), so (iii) is where "
             "discretisation and error compete. Same cells and settings as exact.md (a subset of samplers). Best per "
             "column in bold.", ""]
    for kind in ERROR_KINDS:
        lines += [f"## ({kind})", ""] + table_lines([r for r in rows if r["testbed"] == f"a1-{kind}"], nfes) + [""]
    (OUT / "errors.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------- mixture
def mixture8():
    """8-d Gaussian mixture: 8 components, means N(0, 1), stds uniform in 0.1 .. 0.3 (torch seed 0)."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(8, 8, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.2 * torch.rand(8, generator=g, dtype=torch.float64)
    return pf.GaussianMixture(means, stds, name="mixture8")


class _Den:
    def __init__(self, fn, dim):
        self.fn, self.dim = fn, dim


def kd_run(name, nfe, den_fn, shape, n, seed=0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, dtype=torch.float64):
    """k-diffusion's ``name`` (default noise, Brownian tree where that is its default) on n draws;
    returns (x, counted NFE)."""
    D = int(np.prod(shape))
    probe = _Den(lambda x, s: den_fn(x.reshape(-1, *shape), s).reshape(x.shape[0], -1), D)

    def sig_fn(k):
        return kd().sampling.get_sigmas_karras(k, sigma_min, sigma_max, rho=7.0).to(dtype)

    # steps whose counted NFE fits (count with a cheap stand-in of the same call pattern)
    k = nfe
    while True:
        c = Counted(lambda x, s: torch.zeros_like(x))
        kw = {"noise_sampler": _Recorder(torch.zeros(1, D, dtype=dtype))} if name in KD_NOISY else {}
        kd_fn(name)(c, torch.zeros(1, D, dtype=dtype), sig_fn(k), disable=True, **kw)
        if c.calls <= nfe:
            break
        k -= 1
    torch.manual_seed(seed)
    sig = sig_fn(k)
    x = torch.randn(n, *shape, dtype=dtype) * sig[0]
    c = Counted(den_fn)
    with torch.no_grad():
        out = kd_fn(name)(c, x, sig, disable=True)
    return out, c.calls


def psld_run(model, sampler, nfe, n, seed0=0, dtype=torch.float64, backend="reference"):
    res = pf.sample(model, n, sampler=sampler, nfe=nfe, seeds=torch.arange(seed0, seed0 + n), progress=False,
                    dtype=dtype, backend=backend, batch_size=n)
    return res.x, res.nfe


def part_mixture(args):
    from psld_fast.metrics import sliced_wasserstein_ci

    print(f"[{now()}] mixture", flush=True)
    nfes = (10, 20) if args.quick else (10, 20, 50)
    n = 500 if args.quick else 2000
    gm = mixture8()
    ref = gm.sample_data(20000, generator=torch.Generator().manual_seed(1))
    floor = sliced_wasserstein_ci(gm.sample_data(n, generator=torch.Generator().manual_seed(2)), ref, seed=0)
    print(f"  floor (n = {n} exact draws vs 20000): {floor['value']:.4f} [{floor['lo']:.4f}, {floor['hi']:.4f}]")
    den = gm.as_edm_denoiser()
    kds = ("dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "heun", "dpmpp_3m_sde", "euler")
    pss = ("reduced_oba", "sscs", "em", "rvv", "ei_2m", "ei_2m_sde")
    rows = []
    for lib, names in (("k-diffusion", kds), ("psld_fast", pss)):
        for name in names:
            for nfe in nfes:
                t0 = time.perf_counter()
                if lib == "k-diffusion":
                    x, spent = kd_run(name, nfe, den, (8,), n)
                else:
                    c = Counted(den)
                    dm = pf.DenoiserModel(c, (8,), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
                    x, spent = psld_run(dm, name, nfe, n)
                    assert c.calls == spent, (c.calls, spent)
                ok = bool(torch.isfinite(x).all())
                q = sliced_wasserstein_ci(x.reshape(n, -1), ref, seed=0) if ok else None
                rows.append(dict(testbed="mixture8", library=lib, sampler=name, label=f"{lib} {name}", nfe=nfe,
                                 nfe_spent=spent, sw=q["value"] if q else float("inf"), lo=q["lo"] if q else None,
                                 hi=q["hi"] if q else None, n=n, seconds=time.perf_counter() - t0))
                print(f"  {lib:11s} {name:16s} nfe {nfe:3d} ({spent}): SW {rows[-1]['sw']:.4f}", flush=True)
    write_csv(rows, OUT / "mixture.csv")
    by = {}
    for r in rows:
        note = f" ({r['nfe_spent']})" if r["nfe_spent"] != r["nfe"] else ""
        txt = "diverged" if r["lo"] is None else f"{r['sw']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]{note}"
        by.setdefault(r["label"], {})[r["nfe"]] = (r["sw"], txt)
    lines = ["# 8-d Gaussian mixture: k-diffusion vs psld_fast (sliced W2, 95% CI)", "",
             f"Command: `python bench/compare_kdiffusion.py --mixture` (git {git_revision()}).", "",
             "8 components in 8-d, means N(0, 1), stds uniform 0.1 .. 0.3 (torch seed 0), equal weights; one exact "
             "denoiser for both libraries (`as_edm_denoiser`, float64). n = "
             f"{n} samples per cell; sliced W2 (256 projections) to 20000 exact draws with a 95% bootstrap CI "
             "(`psld_fast.metrics.sliced_wasserstein_ci`). k-diffusion: Karras 0.002 .. 80, rho 7, default noise (torch "
             "seed 0; Brownian tree for dpmpp_2m_sde / dpmpp_3m_sde); psld_fast: `DenoiserModel` + `sample` (defaults, "
             f"quadratic grid, default start, seeds 0..n-1). **Floor** ({n} exact draws vs the reference): "
             f"{floor['value']:.4f} [{floor['lo']:.4f}, {floor['hi']:.4f}]. Best per column in bold.", ""]
    lines += md_table(by, list(nfes)) + [""]
    (OUT / "mixture.md").write_text("\n".join(lines) + "\n")
    (OUT / "mixture_floor.txt").write_text(f"{floor['value']:.6g} {floor['lo']:.6g} {floor['hi']:.6g}\n")


# --------------------------------------------------------------------------------- learned
def part_learned(args):
    import compare_learned as cl
    from psld_fast.learned import load_learned

    print(f"[{now()}] learned", flush=True)
    nfes = (10, 20) if args.quick else (10, 20, 50)
    n = args.learned_n or (100 if args.quick else 500)
    model = load_learned("digits")
    model.eval()
    den = pf.as_denoiser(model)
    quality, real, acc = cl._digits_quality(argparse.Namespace(n_boot=100))
    idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(5))[:n]
    qf, fdf, cf = quality(real[idx])
    print(f"  floor: {n} real digits: FD-dig {fdf:.3f}, SW {qf['value']:.4f}; classifier acc {acc:.4f}", flush=True)
    smin, smax = den.sigma_min, SIGMA_MAX
    rows = []
    cells = [("k-diffusion", s) for s in ("dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral")] + \
            [("psld_fast", s) for s in ("em", "sscs", "reduced_oba", "ei_2m", "ei_2m_sde")]
    for lib, name in cells:
        for nfe in nfes:
            t0 = time.perf_counter()
            if lib == "k-diffusion":
                x, spent = kd_run(name, nfe, den, model.shape, n, sigma_min=smin, sigma_max=smax, dtype=torch.float32)
            else:
                x, spent = psld_run(model, name, nfe, n, dtype=torch.float32, backend="auto")
            wall = time.perf_counter() - t0
            x = x.double().cpu()
            ok = bool(torch.isfinite(x).all())
            q, fd, conf = quality(x) if ok else (None, None, None)
            rows.append(dict(testbed="digits", library=lib, sampler=name, label=f"{lib} {name}", nfe=nfe,
                             nfe_spent=spent, fd_dig=fd if fd is not None else float("inf"),
                             sw=q["value"] if q else None, sw_lo=q["lo"] if q else None, sw_hi=q["hi"] if q else None,
                             confidence=conf, n=n, seconds=wall))
            print(f"  {lib:11s} {name:16s} nfe {nfe:3d} ({spent}): FD-dig {rows[-1]['fd_dig']:.3f} "
                  f"SW {rows[-1]['sw']} ({wall:.1f}s)", flush=True)
    write_csv(rows, OUT / "learned.csv")
    by_fd, by_sw = {}, {}
    for r in rows:
        note = f" ({r['nfe_spent']})" if r["nfe_spent"] != r["nfe"] else ""
        by_fd.setdefault(r["label"], {})[r["nfe"]] = (r["fd_dig"], f"{r['fd_dig']:.3f}{note}")
        if r["sw"] is not None:
            by_sw.setdefault(r["label"], {})[r["nfe"]] = (r["sw"], f"{r['sw']:.4f} [{r['sw_lo']:.4f}, {r['sw_hi']:.4f}]")
    lines = ["# Learned PSLD digits network: psld_fast natively vs k-diffusion through as_denoiser", "",
             f"Command: `python bench/compare_kdiffusion.py --learned` (git {git_revision()}).", "",
             "`load_learned('digits')` (small U-Net, EMA weights, 16x16). psld_fast samples it natively (its PSLD "
             "process, T = 1, eps_end 1e-3, library defaults, quadratic grid, float32, seeds 0..n-1); k-diffusion runs "
             f"its samplers unchanged on `psld_fast.as_denoiser(model)` (exact reverse lift) with Karras sigmas "
             f"{smin:.4f} (sigma_y(eps_end)) .. 80, rho 7, float32, torch seed 0. n = {n} samples per cell. Metric: "
             "FD-dig of bench/compare_learned.py (Frechet distance in the 64-d features of its digit classifier, "
             f"train accuracy {acc:.4f}; functions imported from there), samples clipped to [-1, 1]. **Floor** "
             f"({n} real digits vs all 1797): FD-dig {fdf:.3f}, SW {qf['value']:.4f}. Best per column in bold.", "",
             "## FD-dig", ""] + md_table(by_fd, list(nfes)) + ["", "## Sliced W2 to the real digits [95% CI]", ""] + \
        md_table(by_sw, list(nfes)) + [""]
    (OUT / "learned.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- learned, held-out
SPLIT_PSLD = ("em", "sscs", "reduced_oba", "ci_ei", "ei_x0", "ei_2m", "ei_2m_sde")
SPLIT_KD = ("euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "lms")
SPREAD_NS = (150, 300, 500)  # n of the floor-spread table (how n was chosen)
SPLIT_MODELS = {"psld": ("digits_split", "PSLD eps-network (HSM), train split"),
                "edm": ("digits_edm", "EDM denoiser (position only), train split")}


def _heldout_fd():
    """``fd(x) -> FD-dig of x (clipped to [-1, 1]) to the 539 held-out digits``, plus the train-split
    and held-out digits.  Features: bench/compare_learned.py's fixed digit classifier (trained on all
    1797 digits, as in learned.md, so the two tables share one feature space)."""
    import compare_learned as cl
    from psld_fast.datasets import load_digits

    feat, acc = cl.digit_features()
    train, _ = load_digits(16, split="train")
    held, _ = load_digits(16, split="heldout")

    def feats(x):
        with torch.no_grad():
            return feat.body(x.clamp(-1, 1).float()).numpy().astype(np.float64)

    f_held = feats(held)

    def fd(x, ref=f_held):
        return cl.frechet(feats(x), ref)

    return fd, feats, train, held, acc


def split_floors(fd, feats, train, held, n, seeds):
    """Real-vs-real FD-dig floors per seed s (torch generator 1000 + s):
    train split vs held-out (n train digits without replacement: what fresh draws of the data law, or
    a sampler that copies training digits, score), held-out resampled (n held-out digits with
    replacement: the reference scored against itself, optimistic), halves (a random half of the
    held-out digits vs the other half, 269 vs 270: two disjoint real sets of that size)."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(1000 + s)
        it = torch.randperm(len(train), generator=g)[:n]
        ih = torch.randint(0, len(held), (n,), generator=g)
        perm = torch.randperm(len(held), generator=g)
        a, b = held[perm[:len(held) // 2]], held[perm[len(held) // 2:]]
        for name, val, m in (("train split vs held-out", fd(train[it]), n),
                             ("held-out resampled", fd(held[ih]), n),
                             ("held-out halves", fd(a, feats(b)), len(a))):
            rows.append(dict(model="real", library="floor", sampler=name, label=f"floor: {name}", nfe=0, nfe_spent=0,
                             seed=s, n=m, fd_dig=val, seconds=0.0))
    return rows


def _mean_sd(vals):
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return float("inf"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def part_learned_split(args):
    """FD-dig against the held-out digits, mean +- sd over sample seeds, with real-vs-real floors."""
    from psld_fast.learned import learned_path, load_learned

    print(f"[{now()}] learned_split", flush=True)
    nfes = (10, 20) if args.quick else (10, 20, 50)
    n = args.learned_n or (100 if args.quick else 300)
    seeds = list(range(args.split_seeds))
    models = [m.strip() for m in (args.split_models or "psld,edm").split(",") if m.strip()]
    bad = [m for m in models if m not in SPLIT_MODELS]
    if bad:
        raise SystemExit(f"--split-models: unknown {bad}; choose from {', '.join(SPLIT_MODELS)}")
    only = None if not args.split_samplers else {v.strip() for v in args.split_samplers.split(",") if v.strip()}
    csv_path = OUT / "learned_split.csv"
    old = read_csv(csv_path) if csv_path.exists() and not args.quick else []
    # rows kept from the CSV: other models', and with --split-samplers the other samplers' (floors are redone)
    keep = [r for r in old if r["library"] != "floor" and int(r["n"]) == n
            and (r["model"] not in set(models) or (only is not None and r["sampler"] not in only))]
    fd, feats, train, held, acc = _heldout_fd()
    spread = []
    for m in SPREAD_NS:   # the floor's seed-to-seed spread against n (5 seeds): how n was chosen
        fr = [r for r in split_floors(fd, feats, train, held, m, range(5)) if r["sampler"] == "train split vs held-out"]
        spread.append((m,) + _mean_sd([r["fd_dig"] for r in fr]))
        print(f"  floor spread: n {m}: train split vs held-out {spread[-1][1]:.2f} +- {spread[-1][2]:.2f}", flush=True)
    (OUT / "learned_split_spread.txt").write_text("".join(f"{m} {a:.6g} {b:.6g}\n" for m, a, b in spread))
    rows = split_floors(fd, feats, train, held, n, seeds)
    for r in rows:
        print(f"  {r['label']:34s} seed {r['seed']}: FD-dig {r['fd_dig']:.3f} (n {r['n']})", flush=True)
    for key in models:
        name, _ = SPLIT_MODELS[key]
        if not learned_path(name).is_file():
            print(f"  {name}: not shipped, skipped", flush=True)
            continue
        model = load_learned(name)
        model.eval()
        if isinstance(model, pf.DenoiserModel):      # EDM: k-diffusion natively
            den, smin = model.denoiser, model.sigma_min
        else:                                        # PSLD: k-diffusion through the exact reverse lift
            den = pf.as_denoiser(model)
            smin = den.sigma_min
        cells = [("k-diffusion", s) for s in SPLIT_KD] + [("psld_fast", s) for s in SPLIT_PSLD]
        if only is not None:
            cells = [c for c in cells if c[1] in only]
        for lib, sampler in cells:
            for nfe in nfes:
                for s in seeds:
                    t0 = time.perf_counter()
                    if lib == "k-diffusion":
                        x, spent = kd_run(sampler, nfe, den, model.shape, n, seed=s, sigma_min=smin,
                                          sigma_max=SIGMA_MAX, dtype=torch.float32)
                    else:
                        x, spent = psld_run(model, sampler, nfe, n, seed0=s * n, dtype=torch.float32, backend="auto")
                    wall = time.perf_counter() - t0
                    x = x.double().cpu()
                    val = fd(x) if bool(torch.isfinite(x).all()) else float("inf")
                    rows.append(dict(model=key, library=lib, sampler=sampler, label=f"{lib} {sampler}", nfe=nfe,
                                     nfe_spent=spent, seed=s, n=n, fd_dig=val, seconds=wall))
                    print(f"  {key:4s} {lib:11s} {sampler:16s} nfe {nfe:3d} ({spent}) seed {s}: FD-dig {val:.3f} "
                          f"({wall:.1f}s)", flush=True)
                write_csv(keep + rows, csv_path)
    write_csv(keep + rows, csv_path)
    split_md(read_csv(csv_path), nfes, acc)


def split_md(rows, nfes, acc=None):
    for r in rows:
        r["fd_dig"] = float(r["fd_dig"])
        r["nfe"], r["seed"], r["n"], r["nfe_spent"] = int(r["nfe"]), int(r["seed"]), int(r["n"]), int(r["nfe_spent"])
    seeds = sorted({r["seed"] for r in rows})
    n = max(r["n"] for r in rows)
    floors = {}
    for r in rows:
        if r["library"] == "floor":
            floors.setdefault(r["sampler"], []).append(r["fd_dig"])
    fl = {k: _mean_sd(v) for k, v in floors.items()}
    lines = ["# Learned digits models scored against held-out digits (FD-dig, mean +- sd over seeds)", "",
             f"Command: `python bench/compare_kdiffusion.py --learned-split` (git {git_revision()}).", "",
             "Both models were trained on the 1258-image train split only (`load_digits(16, split='train')`, the "
             "fixed stratified 70/30 split of `psld_fast.datasets.digits_split_indices`); every cell is scored "
             "against the 539 **held-out** digits, which neither model saw. FD-dig: Frechet distance in the 64-d "
             "features of bench/compare_learned.py's digit classifier" +
             (f" (train accuracy {acc:.4f})" if acc is not None else "") +
             ", samples clipped to [-1, 1]. "
             f"Each cell: mean +- sd over {len(seeds)} sample seeds of n = {n} samples each (psld_fast: seeds "
             "s n .. s n + n - 1; k-diffusion: torch seed s). `digits_split` (the PSLD eps-network, same config as "
             "`digits`): psld_fast natively, k-diffusion through `psld_fast.as_denoiser` (Karras sigmas "
             "sigma_y(eps_end) .. 80, rho 7). `digits_edm` (position-only EDM denoiser): psld_fast lifted "
             "(`DenoiserModel`, default start), k-diffusion natively on `model.denoiser` (Karras 0.002 .. 80, rho 7). "
             "float32, library defaults; k-diffusion's four samplers here spend one NFE per step (Karras steps = NFE).", "",
             "## Real-vs-real floors (same n, same seeds)", "",
             "| floor | FD-dig mean +- sd | n |", "|---|---|---|"]
    for k, (m, sd) in fl.items():
        nk = next(r["n"] for r in rows if r["library"] == "floor" and r["sampler"] == k)
        lines.append(f"| {k} | {m:.2f} +- {sd:.2f} | {nk} |")
    sp = OUT / "learned_split_spread.txt"
    if sp.exists():
        lines += ["", "How n was chosen: the seed-to-seed spread of the *train split vs held-out* floor against n "
                  "(5 seeds): " + "; ".join(f"n {int(float(a))}: {float(b):.2f} +- {float(c):.2f}" for a, b, c in
                                           (l.split() for l in sp.read_text().splitlines())) +
                  ". FD in 64-d features is biased upward and noisy at small n; n = 500 is the smallest n whose sd is "
                  "well below the sampler differences seen in learned.md, and 3 seeds x 500 fit the CPU budget."]
    lines += ["", "*train split vs held-out* is what fresh draws of the data law (or a sampler that returns "
              "training digits) score: the floor a perfect sampler of a perfect model reaches at this n. "
              "*held-out resampled* scores the reference against itself (optimistic, below any model).", ""]
    verdict = []
    for key, (name, title) in SPLIT_MODELS.items():
        mr = [r for r in rows if r["model"] == key]
        if not mr:
            continue
        by = {}
        for r in mr:
            by.setdefault(r["label"], {}).setdefault(r["nfe"], []).append(r)
        stats = {lab: {nfe: _mean_sd([r["fd_dig"] for r in rs]) + (rs[0]["nfe_spent"],) for nfe, rs in d.items()}
                 for lab, d in by.items()}
        cols = sorted({r["nfe"] for r in mr})
        best = {c: min(stats[l][c][0] for l in stats if c in stats[l]) for c in cols}
        lines += [f"## `{name}`: {title}", "", "| sampler | " + " | ".join(f"NFE {c}" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for lab in sorted(stats, key=lambda l: (not l.startswith("psld_fast"), l)):
            cells = []
            for c in cols:
                if c not in stats[lab]:
                    cells.append("")
                    continue
                m, sd, spent = stats[lab][c]
                txt = "diverged" if not math.isfinite(m) else f"{m:.2f} +- {sd:.2f}" + (f" ({spent})" if spent != c else "")
                cells.append(f"**{txt}**" if m == best[c] else txt)
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        m0, sd0 = fl.get("train split vs held-out", (float("nan"), float("nan")))
        lines.append(f"| *floor: train split vs held-out* | " + " | ".join(f"*{m0:.2f} +- {sd0:.2f}*" for _ in cols) + " |")
        lines.append("")
        for c in cols:
            ps = [(stats[l][c][0], stats[l][c][1], l) for l in stats if l.startswith("psld_fast") and c in stats[l]]
            ks = [(stats[l][c][0], stats[l][c][1], l) for l in stats if l.startswith("k-diffusion") and c in stats[l]]
            if not ps or not ks:
                continue
            bp, bk = min(ps), min(ks)
            diff = bp[0] - bk[0]
            sdd = math.sqrt((bp[1] ** 2 + bk[1] ** 2) / len(seeds)) if math.isfinite(bp[1]) and math.isfinite(bk[1]) else float("nan")
            word = "loses to" if diff > 0 else "beats"
            sig = "beyond" if abs(diff) > 2 * sdd else "within"
            verdict.append(f"- `{name}`, NFE {c}: psld_fast's best ({bp[2][10:]}, {bp[0]:.2f} +- {bp[1]:.2f}) {word} "
                           f"k-diffusion's best ({bk[2][12:]}, {bk[0]:.2f} +- {bk[1]:.2f}) by {abs(diff):.2f}, "
                           f"{sig} 2 standard errors of the difference ({2 * sdd:.2f}); floor {m0:.2f}.")
    lines += ["## Best of each library per cell", "", "(standard error of a difference of means over the seeds: "
              "sqrt((sd_a^2 + sd_b^2) / seeds))", ""] + verdict + [""]
    (OUT / "learned_split.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------- speed
class _ZeroEps(torch.nn.Module):
    """Zero-cost eps net / denoiser: returns a preallocated zero tensor of its input's shape."""

    def __init__(self):
        super().__init__()
        self._z = None

    def forward(self, u, *args, **kw):
        if self._z is None or self._z.shape != u.shape or self._z.dtype != u.dtype:
            self._z = torch.zeros_like(u)
        return self._z


class _SmallNet(torch.nn.Module):
    """A small network: conv 3x3 C->32, SiLU, conv 3x3 32->C on images; MLP C-64-64-C on vectors."""

    def __init__(self, C, image):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        if image:
            self.f = torch.nn.Sequential(torch.nn.Conv2d(C, 32, 3, padding=1), torch.nn.SiLU(),
                                         torch.nn.Conv2d(32, C, 3, padding=1))
        else:
            self.f = torch.nn.Sequential(torch.nn.Linear(C, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                         torch.nn.SiLU(), torch.nn.Linear(64, C))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))

    def forward(self, u, *args, **kw):
        return self.f(u)


def part_speed(args):
    from _benchutil import header

    import warnings

    print(f"[{now()}] speed", flush=True)
    warnings.simplefilter("ignore")  # zero-cost nets leave the data range (sample warns); timing only
    dev = torch.device(args.device)
    out = Path(args.out) if args.out else OUT
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if dev.type == "cpu" else f"_{dev.type}"
    try:
        kd()
        have_kd = True
    except Exception as exc:  # noqa: BLE001  (a GPU machine without the peers: psld_fast rows only)
        print(f"  k-diffusion unavailable ({type(exc).__name__}: {exc}); psld_fast rows only", flush=True)
        have_kd = False
    threads = torch.get_num_threads()
    head = header("compare_kdiffusion --speed", dev, threads)
    print(head, flush=True)
    nfe = 20 if args.quick else 50
    rounds = 3 if args.quick else 5
    Bs = (1, 16) if args.quick else (1, 16, 64)
    sde = pf.PSLD()
    rows = []
    for shape in ((3, 32, 32), (2,)):
        C = shape[0]
        for kind in ("zero", "net"):
            for B in Bs:
                if kind == "zero":
                    eps_net, den_net = _ZeroEps(), _ZeroEps()
                else:
                    eps_net, den_net = _SmallNet(2 * C, len(shape) == 3), _SmallNet(C, len(shape) == 3)
                eps_net, den_net = eps_net.to(dev).eval(), den_net.to(dev).eval()
                native = pf.EpsModel(eps_net, sde=sde, shape=shape)
                lifted = pf.DenoiserModel(den_net, shape, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
                den = (lambda net: (lambda x, sigma, **kw: net(x)))(den_net)
                seeds = torch.arange(B)
                sig = karras(nfe).float().to(dev)
                x0 = torch.randn(B, *shape, device=dev) * 80.0

                def psld_call(model):
                    return lambda: pf.sample(model, B, sampler="reduced_oba", nfe=nfe, seeds=seeds, progress=False,
                                             backend="auto", device=dev)

                def kd_call(name):
                    return lambda: kd_fn(name)(den, x0.clone(), sig, disable=True)

                fns = {"psld_fast native reduced_oba": psld_call(native),
                       "psld_fast lifted reduced_oba": psld_call(lifted)}
                if have_kd:
                    fns.update({"k-diffusion euler_ancestral": kd_call("euler_ancestral"),
                                "k-diffusion dpmpp_2m": kd_call("dpmpp_2m"),
                                "k-diffusion dpmpp_2m_sde (Brownian tree)": kd_call("dpmpp_2m_sde")})
                with torch.no_grad():
                    times = interleaved(fns, dev, rounds=rounds, warmup=1, min_rounds=rounds)
                ratio = statistics.median(l / n_ for l, n_ in zip(times["psld_fast lifted reduced_oba"],
                                                                  times["psld_fast native reduced_oba"]))
                for name, t in times.items():
                    rows.append(dict(shape="x".join(map(str, shape)), kind=kind, B=B, variant=name, nfe=nfe,
                                     us_per_nfe_min=min(t) / nfe * 1e6, us_per_nfe_median=statistics.median(t) / nfe * 1e6,
                                     rounds=len(t), lifted_over_native=ratio if "lifted" in name else None))
                print(f"  {shape} {kind:4s} B {B:3d}: " + ", ".join(
                    f"{k.split(' ', 1)[1][:22]} {min(v) / nfe * 1e6:.0f}" for k, v in times.items()) +
                    f" us/NFE (min); lifted/native {ratio:.2f}", flush=True)
    load_end = load_average()
    write_csv(rows, out / f"speed{suffix}.csv")
    cmd = "python bench/compare_kdiffusion.py --speed" + (f" --device {args.device}" if suffix else "")
    lines = [f"# Speed: per-NFE cost, psld_fast vs k-diffusion ({dev.type.upper() if suffix else 'CPU'}, "
             "interleaved rounds)", "",
             f"Command: `{cmd}` (git {git_revision()}).", "",
             f"`{head.lstrip('# ')}`; load average at the end {load_end}.", "",
             f"Each cell: one full sampling run of NFE {nfe} per variant per round, the variants interleaved round by "
             f"round in one process (bench/_benchutil.interleaved), {rounds} rounds after 1 warm-up; microseconds per "
             "NFE as min / median over rounds. psld_fast rows are `psld_fast.sample(..., backend='auto')` (fused "
             "kernels; CUDA graphs on a GPU; the native PSLD model moves x and m, twice the data), k-diffusion rows its samplers unchanged "
             "on Karras sigmas. **zero**: a zero-cost network (returns a preallocated zero tensor; for the lifted "
             "model the denoiser, for the native model the eps net); **net**: a small network (images: conv 3x3 "
             "C->32, SiLU, conv 32->C; 2-D: MLP C-64-64-C; the native PSLD net has 2C channels in and out, the "
             "denoiser C). lifted/native = median over rounds of the per-round ratio (issue floor: <= 1.25 with the "
             "zero-cost network).", "",
             "| shape | network | B | " + " | ".join(fns) + " | lifted / native |",
             "|---|---|---|" + "---|" * len(fns) + "---|"]
    for shape in sorted({r["shape"] for r in rows}, reverse=True):
        for kind in ("zero", "net"):
            for B in Bs:
                rs = [r for r in rows if r["shape"] == shape and r["kind"] == kind and r["B"] == B]
                if not rs:
                    continue
                cells = [f"{r['us_per_nfe_min']:.0f} / {r['us_per_nfe_median']:.0f}" for r in rs]
                rat = next(r["lifted_over_native"] for r in rs if r["lifted_over_native"] is not None)
                lines.append(f"| {shape} | {kind} | {B} | " + " | ".join(cells) + f" | {rat:.2f} |")
    (out / f"speed{suffix}.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------- summary
PLOT_LABELS = ("k-diffusion dpmpp_2m", "k-diffusion dpmpp_2m_sde", "k-diffusion euler_ancestral", "k-diffusion heun",
               "k-diffusion dpmpp_3m_sde", "k-diffusion lms", "psld_fast reduced_oba", "psld_fast sscs", "psld_fast em", "psld_fast rvv",
               "psld_fast reduced_oba (k_sampling, Karras sigmas)", "psld_fast ei_2m", "psld_fast ei_2m_sde")


def _panels():
    """[(title, metric name, rows with 'label', 'nfe', 'value', floor or None)]"""
    panels = []
    ex = read_csv(OUT / "exact.csv")
    for tb, title in (("a1", "(a1) 16-d Gaussian, var 1e-3..1"), ("a2", "(a2) stiff Gaussian, var 1e-5..1")):
        rs = [dict(label=r["label"], nfe=int(r["nfe"]), value=float(r["w2"])) for r in ex if r["testbed"] == tb]
        if rs:
            panels.append((title, "exact W2", rs, None))
    er = read_csv(OUT / "errors.csv")
    for kind in ERROR_KINDS:
        rs = [dict(label=r["label"], nfe=int(r["nfe"]), value=float(r["w2"])) for r in er if r["testbed"] == f"a1-{kind}"]
        if rs:
            panels.append((f"(a1) with {kind} denoiser error", "exact W2", rs, None))
    mx = read_csv(OUT / "mixture.csv")
    if mx:
        fl = (OUT / "mixture_floor.txt")
        floor = float(fl.read_text().split()[0]) if fl.exists() else None
        panels.append(("8-d mixture", "sliced W2", [dict(label=r["label"], nfe=int(r["nfe"]), value=float(r["sw"]))
                                                    for r in mx], floor))
    le = read_csv(OUT / "learned.csv")
    if le:
        import re

        md = (OUT / "learned.md").read_text() if (OUT / "learned.md").exists() else ""
        hit = re.search(r"\*\*Floor\*\* \(\d+ real digits vs all 1797\): FD-dig ([0-9.]+)", md)
        panels.append((f"learned PSLD digits net (n = {le[0]['n']})", "FD-dig",
                       [dict(label=r["label"], nfe=int(r["nfe"]), value=float(r["fd_dig"])) for r in le],
                       float(hit.group(1)) if hit else None))
    return panels


def plot(path: Path):
    from psld_fast.plotting import PlotUnavailable, require_matplotlib, save_figure

    try:
        plt = require_matplotlib()
    except PlotUnavailable as exc:
        print(f"compare_kdiffusion: {path.name} not drawn: {exc}", file=sys.stderr)
        return
    panels = _panels()
    if not panels:
        return
    cols = 3
    rows_ = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 4.0 * rows_), squeeze=False)
    handles = {}
    for ax, (title, metric, rs, floor) in zip(axes.ravel(), panels):
        labels = [l for l in dict.fromkeys(r["label"] for r in rs)
                  if l in PLOT_LABELS or not any(l2 in PLOT_LABELS for l2 in {r["label"] for r in rs})]
        for lab in labels:
            cut = 50 if metric != "FD-dig" else math.inf  # W2 beyond 50: diverged, off the plot
            pts = sorted((r["nfe"], r["value"]) for r in rs if r["label"] == lab and math.isfinite(r["value"]))
            pts = [p for p in pts if p[1] < cut]
            if not pts:
                continue
            i = PLOT_LABELS.index(lab) if lab in PLOT_LABELS else len(PLOT_LABELS)
            kdl = lab.startswith("k-diffusion")
            style = "-" if kdl else "--"
            color = plt.cm.tab20((2 * i if i < 10 else 2 * (i - 10) + 1) % 20)
            h, = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o" if kdl else "s", ms=3.5,
                         lw=1.5, color=color, label=lab)
            handles.setdefault(lab, h)
        if floor is not None:
            ax.axhline(floor, color="0.5", ls=":", lw=1)
            handles.setdefault("data floor (law vs itself)", ax.lines[-1])
        ax.set_xscale("log")
        ax.set_yscale("log")
        nf = sorted({r["nfe"] for r in rs})
        ax.set_xticks(nf)
        ax.set_xticklabels([str(v) for v in nf])
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("NFE")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.grid(True, alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    fig.suptitle("psld_fast (dashed, squares) vs k-diffusion (solid, circles): same denoisers, NFE counted", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    save_figure(fig, path)


def _best(rs, lib, nfe, key="value"):
    c = [r for r in rs if r["label"].startswith(lib) and r["nfe"] == nfe and math.isfinite(r[key])]
    return min(c, key=lambda r: r[key]) if c else None


def _verdict_lines():
    """What we win and what we lose, computed from the CSVs (so a rerun keeps the text true)."""
    out = ["## What we win and what we lose", ""]
    ex = read_csv(OUT / "exact.csv")
    if ex:
        for tb in ("a1", "a2"):
            rs = [r for r in ex if r["testbed"] == tb]
            ro = {int(r["nfe"]): float(r["w2"]) for r in rs if r["label"] == "psld_fast reduced_oba"}
            for nfe in (20,):
                kd20 = sorted((float(r["w2"]), r["sampler"]) for r in rs if r["library"] == "k-diffusion"
                              and int(r["nfe"]) == nfe)
                better = [f"{n} {w:.4f}" for w, n in kd20 if w < ro[nfe]]
                out.append(f"- ({tb}) NFE {nfe}: lifted Reduced OBA (defaults, default start) {ro[nfe]:.4f}; best "
                           f"k-diffusion {kd20[0][1]} {kd20[0][0]:.4f}. " + (
                               "It is below every k-diffusion sampler." if not better else
                               "k-diffusion samplers below it: " + ", ".join(better) + "."))
            for nfe in (10, 50, 100):
                kdb = min((float(r["w2"]), r["sampler"]) for r in rs if r["library"] == "k-diffusion" and int(r["nfe"]) == nfe)
                psb = min((float(r["w2"]), r["label"][10:]) for r in rs if r["library"] == "psld_fast" and int(r["nfe"]) == nfe)
                out.append(f"- ({tb}) NFE {nfe}: best psld_fast {psb[1]} {psb[0]:.4f} vs best k-diffusion {kdb[1]} "
                           f"{kdb[0]:.4f} ({'we win' if psb[0] < kdb[0] else 'we lose'}, x{psb[0] / kdb[0]:.2f}).")
        out.append("- On the exact Gaussians the multistep ei_2m is psld_fast's best row at most budgets (second order, "
                   "like k-diffusion's lms / dpmpp_2m). The multistep samplers of a lifted model end at the "
                   "denoiser's sigma_min (part 2 of docs/any_model_protocol.md; the row 'ei_2m end=process' is the "
                   "process's own eps_end, sigma_y 0.009, above the stiffest coordinates' std 0.003 of (a2)). ei_2m's "
                   "start=T rows beat its default sigma_max start from NFE 50 on (a1): the start protocol's per-family "
                   "default was decided before the multistep samplers existed. Per NFE, with counted calls.")
    mx = read_csv(OUT / "mixture.csv")
    if mx:
        fl = (OUT / "mixture_floor.txt").read_text().split() if (OUT / "mixture_floor.txt").exists() else None
        for nfe in sorted({int(r["nfe"]) for r in mx}):
            kdb = min(((float(r["sw"]), r["sampler"], r["lo"], r["hi"]) for r in mx
                       if r["library"] == "k-diffusion" and int(r["nfe"]) == nfe))
            psb = min(((float(r["sw"]), r["sampler"], r["lo"], r["hi"]) for r in mx
                       if r["library"] == "psld_fast" and int(r["nfe"]) == nfe))
            overlap = float(psb[3]) >= float(kdb[2]) and float(kdb[3]) >= float(psb[2])
            out.append(f"- 8-d mixture NFE {nfe}: best psld_fast {psb[1]} {psb[0]:.4f} [{float(psb[2]):.4f}, "
                       f"{float(psb[3]):.4f}] vs best k-diffusion {kdb[1]} {kdb[0]:.4f} [{float(kdb[2]):.4f}, "
                       f"{float(kdb[3]):.4f}]" + (" (CIs overlap: not resolved)" if overlap else "") + ".")
        if fl:
            out.append(f"  The sliced-W2 floor at this n is {float(fl[0]):.4f}: at NFE 50 every sampler is near it.")
    le = read_csv(OUT / "learned.csv")
    if le:
        for nfe in sorted({int(r["nfe"]) for r in le}):
            kdb = min((float(r["fd_dig"]), r["sampler"]) for r in le if r["library"] == "k-diffusion" and int(r["nfe"]) == nfe)
            psb = min((float(r["fd_dig"]), r["sampler"]) for r in le if r["library"] == "psld_fast" and int(r["nfe"]) == nfe)
            out.append(f"- learned digits net NFE {nfe}: best psld_fast (native) {psb[1]} FD-dig {psb[0]:.2f} vs best "
                       f"k-diffusion (through as_denoiser) {kdb[1]} {kdb[0]:.2f} ({'we win' if psb[0] < kdb[0] else 'we lose'}).")
    sp = read_csv(OUT / "speed.csv")
    if sp:
        rat = [float(r["lifted_over_native"]) for r in sp if r["lifted_over_native"] not in ("", None)]
        zero = [r for r in sp if r["kind"] == "zero"]
        big = max(zero, key=lambda r: (int(np.prod([int(v) for v in r["shape"].split("x")])) * int(r["B"])))
        cell = {r["variant"]: float(r["us_per_nfe_min"]) for r in zero if r["shape"] == big["shape"] and r["B"] == big["B"]}
        out.append(f"- Speed: lifted / native per NFE {min(rat):.2f} .. {max(rat):.2f} over every shape and batch "
                   f"(floor <= 1.25: {'met' if max(rat) <= 1.25 else 'NOT met'}). Zero-cost network, ({big['shape']}) "
                   f"B = {big['B']}: psld_fast reduced_oba {cell['psld_fast lifted reduced_oba']:.0f} us/NFE (lifted), "
                   f"k-diffusion euler_ancestral {cell['k-diffusion euler_ancestral']:.0f}, dpmpp_2m "
                   f"{cell['k-diffusion dpmpp_2m']:.0f} (no noise to draw), dpmpp_2m_sde with its Brownian tree "
                   f"{cell['k-diffusion dpmpp_2m_sde (Brownian tree)']:.0f}. At small states psld_fast's per-NFE cost is "
                   "the lowest; at large states a stochastic psld_fast step costs about what euler_ancestral does "
                   "(the noise draw dominates) and more than deterministic dpmpp_2m.")
    return out + [""]


def summary_md(args):
    panels = _panels()
    plot(OUT / "kdiffusion.png")
    lines = ["# psld_fast side by side with k-diffusion", "",
             f"Regenerate: `python bench/compare_kdiffusion.py` (all parts; `--protocol --exact --mixture --errors "
             f"--learned --speed` run one each). k-diffusion {kd().version}, run unchanged through "
             "`psld_fast.peers.load_kdiffusion()`; one denoiser for both libraries in every cell; NFE counted by a call "
             "counter on the denoiser. Details and every row: start_protocol.md, exact.md, mixture.md, errors.md, "
             "learned.md, speed.md (and the CSVs) in this folder. Plot: `kdiffusion.png`.", "",
             "![metric vs NFE](kdiffusion.png)", ""]
    if (OUT / "start_protocol.md").exists():
        txt = (OUT / "start_protocol.md").read_text().splitlines()
        dec = [l for l in txt if l.startswith("- **") or l.startswith("`psld_fast.lift.DEFAULT_START")]
        lines += ["## Start knob of lifted models (docs/any_model_protocol.md)", ""] + dec + [""]
    lines += _verdict_lines()
    lines += ["## Best of each library per cell", "",
              "Per testbed and NFE: the best psld_fast row against the best k-diffusion row (all rows of the tables, "
              "lambda_s variants and start=T included), and their ratio (< 1: psld_fast better).", "",
              "| testbed | metric | NFE | best psld_fast | best k-diffusion | ratio |", "|---|---|---|---|---|---|"]
    wins = losses = 0
    for title, metric, rs, floor in panels:
        for nfe in sorted({r["nfe"] for r in rs}):
            a, b = _best(rs, "psld_fast", nfe), _best(rs, "k-diffusion", nfe)
            if a is None or b is None:
                continue
            ratio = a["value"] / b["value"]
            wins += ratio < 1
            losses += ratio >= 1
            lines.append(f"| {title} | {metric} | {nfe} | {a['label'][10:]} {fmt(a['value'])} | {b['label'][12:]} "
                         f"{fmt(b['value'])} | {'**' if ratio < 1 else ''}{ratio:.2f}{'**' if ratio < 1 else ''} |")
    lines += ["", f"psld_fast's best row is better in {wins} of {wins + losses} (testbed, NFE) cells and worse in "
              f"{losses}.", ""]
    for fn, head in (("exact.md", "## Exact Gaussian testbeds (exact W2)"), ("mixture.md", "## 8-d mixture"),
                     ("errors.md", "## Controlled denoiser errors"), ("learned.md", "## Learned digits network"),
                     ("learned_split.md", "## Learned digits models on held-out digits"),
                     ("speed.md", "## Speed")):
        if (OUT / fn).exists():
            body = (OUT / fn).read_text().splitlines()[1:]
            body = [l.replace("## ", "### ", 1) if l.startswith("## ") else l for l in body]
            lines += [head] + body + [""]
    (OUT / "kdiffusion.md").write_text("\n".join(lines) + "\n")

# ------------------------------------------------------------------------------------- main
PARTS = ("protocol", "exact", "mixture", "errors", "learned", "learned_split", "speed")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for p in PARTS:
        ap.add_argument(f"--{p.replace('_', '-')}", dest=p, action="store_true", help=f"run the {p} part")
    ap.add_argument("--quick", action="store_true", help="fewer cells (smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--learned-n", type=int, default=None,
                    help="samples per cell of --learned (default 500) and per seed of --learned-split (default 300)")
    ap.add_argument("--split-seeds", type=int, default=3, help="sample seeds per cell of --learned-split")
    ap.add_argument("--split-samplers", default=None,
                    help="--learned-split: only these samplers (comma-separated); the CSV's other rows are kept")
    ap.add_argument("--split-models", default=None,
                    help="--learned-split: psld, edm or psld,edm (default both); rows of the others are kept")
    ap.add_argument("--device", default="cpu", help="device of --speed (cuda: the GPU rows, speed_cuda.md)")
    ap.add_argument("--out", default=None, help="output folder of --speed (default bench/results/kdiffusion)")
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
    if "summary_md" in globals() and args.device == "cpu" and not args.out:
        summary_md(args)


if __name__ == "__main__":
    main()
