"""A cheap per-model tuner: which sampler (and lambda_s) to use at a given NFE budget.

``tune(model, nfe)`` (CLI: ``psld-fast tune --nfe N``) answers the question the defaults answer only
on average: for *this* model at *this* budget, which of a list of candidate (sampler, lambda_s) cells
gives samples closest to the model's own law?  The yardstick is the model itself: a reference set
drawn with a high-NFE sampler (default ``ei_2m`` at 400 NFE), on seeds disjoint from the candidates'
(a shared seed would couple a candidate's samples to the reference path by path and reward the
candidate for resembling its reference sampler, not the law).  Candidates are scored by the sliced
Wasserstein-2 distance of their samples to the reference (fixed projections), in rounds of
successive halving: every surviving candidate draws ``n0 * eta^r`` samples in round r (the earlier
rounds' samples are kept and extended, common seeds across candidates), the best ``1/eta`` go on,
until one is left or ``max_rounds`` are done.  Every round's figures, the winner and the cost (network
evaluations x samples and seconds, the reference's apart) are returned and printed, with a resolution
check: whether the winner also beats the runner-up against each half of the reference alone.

What the yardstick can and cannot see: the sliced W2 of flattened samples is a distance between
laws, so it ranks samplers by how close their output law is to the model's; for images it weighs
low-frequency structure most and is blind to some perceptual differences that FID sees.  The
finite-sample floor (the distance between two independent sets from the same law) is the same for
all candidates of a round, so the ranking is fair, but differences below the round's spread are not
resolved: the table prints each round's floor estimate (the reference against its own second half).
Measured on exact Gaussian models, whose exact output laws rank the candidates (psld_fast.exact;
``bench/tune_check.py``, results in bench/results/tune/): with the default settings the choice is
the exact best or within 1.4x of it in most cells, but where the candidates' exact W2 differ by less
than the resolution of 1024 samples (an anisotropic 8-d Gaussian at NFE 30-50: 0.005 vs 0.017 against
a finite-sample floor of 0.17) it can pick a candidate 2.6-3.4x worse than the best.  The default
metric "marginal" was chosen over "sliced" on those ten cells (geometric-mean ratio 1.32 vs 1.36;
sliced W2 missed the anisotropic NFE-15 cell by 4.6x: a random direction mixes the errors of
small-variance coordinates away) and then checked on six cells not used for the choice
(tests/test_tune.py: ratios 1.75, 1.00, 1.00 on the preset at NFE 12, 25, 40; 1.00, 1.47, 1.74 on a
32-d anisotropic Gaussian).  The resolution check compares the winner with the runner-up only: it
cannot see a better candidate dropped in an earlier round (the anisotropic NFE-30 cell passes it with
a 2.6x worse choice).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .api import sample
from .metrics import marginal_wasserstein, sliced_wasserstein
from .samplers import SAMPLER_SPECS, steps_for_nfe

__all__ = ["tune", "TuneResult", "candidates", "DEFAULT_SAMPLERS", "DEFAULT_LAMBDAS", "METRICS"]

#: Scores of a candidate's samples against the reference (lower is better).
METRICS = ("marginal", "sliced")

#: The candidate samplers of ``tune`` by default: the baselines, the paper's best reduced sampler,
#: and the multistep exponential integrators.
DEFAULT_SAMPLERS = ("em", "sscs", "reduced_oba", "reduced_baoab", "ci_ei", "ei_x0", "ei_2m", "ei_2m_sde")
#: lambda_s values tried for the stochastic samplers that take it (None: the sampler's default).
DEFAULT_LAMBDAS = (None, 0.25, 0.5, 1.0)
#: Seeds of the reference set start here: disjoint from the candidates' 0, 1, 2, ...
REFERENCE_SEED0 = 1 << 40


def candidates(nfe: int, samplers=DEFAULT_SAMPLERS, lambdas=DEFAULT_LAMBDAS, denoise: bool = True) -> list[dict]:
    """The (sampler, lambda_s) cells ``tune`` tries: lambda_s only for stochastic samplers that take it
    (not sscs; None and the sampler's default value are one cell); samplers whose NFE budget cannot
    be met are left out.  Raises ValueError for an unknown sampler or when nothing fits."""
    out = []
    for s in samplers:
        if s not in SAMPLER_SPECS:
            raise ValueError(f"unknown sampler {s!r}; choose from {', '.join(SAMPLER_SPECS)}")
        try:
            steps_for_nfe(s, nfe, denoise)
        except ValueError:
            continue
        spec = SAMPLER_SPECS[s]
        lams = [None]
        if spec.stochastic and s != "sscs":
            for lam in lambdas:
                v = spec.default_lambda_s if lam is None else float(lam)
                if v not in [spec.default_lambda_s if x is None else x for x in lams]:
                    lams.append(v)
        out += [dict(sampler=s, lambda_s=lam) for lam in lams]
    if not out:
        raise ValueError(f"no candidate sampler fits an NFE budget of {nfe}")
    return out


def label(c: dict) -> str:
    return c["sampler"] + ("" if c.get("lambda_s") is None else f" lambda_s={c['lambda_s']:g}")


@dataclass
class TuneResult:
    """``best``: the winning candidate (sampler, lambda_s); ``rounds``: per round the sample count,
    the scores of the candidates it ran and the floor estimate; ``cost``: network evaluations x
    samples and seconds of the candidates and of the reference; ``nfe``: the budget tuned for."""

    best: dict
    nfe: int
    rounds: list = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    #: Whether the winner also beats the runner-up against each half of the reference alone (False:
    #: the two are within the noise of this sample size; None: no runner-up).
    resolved: bool | None = None
    runner_up: dict | None = None

    def markdown(self) -> str:
        lines = [f"tune at NFE {self.nfe}: reference {self.reference['sampler']} at {self.reference['nfe']} NFE, "
                 f"{self.reference['n']} samples (seeds from 2^40); score: {self.reference.get('metric', 'marginal')} "
                 "W2 to it (lower is better)", ""]
        for r in self.rounds:
            lines.append(f"round {r['round']}: {r['n']} samples per candidate (floor ~ {r['floor']:.4g}: two "
                         f"independent sets of the reference law)")
            for c, v in sorted(r["scores"], key=lambda t: t[1]):
                lines.append(f"  {label(c):32s} {v:.4g}" + ("   (kept)" if c in r["kept"] else ""))
        c = self.cost
        verdict = ("" if self.resolved is None else
                   f" (beats the runner-up {label(self.runner_up)} against both halves of the reference)" if self.resolved
                   else f" (NOT resolved: against half of the reference the runner-up {label(self.runner_up)} scores "
                        "better; the two are within the noise of this sample size, raise --n0/--rounds/--reference-n)")
        lines += ["", f"best: {label(self.best)}{verdict}",
                  f"cost: candidates {c['candidate_nfe_samples']:,} network evaluations x samples "
                  f"({c['candidate_seconds']:.1f} s), reference {c['reference_nfe_samples']:,} "
                  f"({c['reference_seconds']:.1f} s)"]
        return "\n".join(lines)


def _flat(x: torch.Tensor):
    return x.reshape(x.shape[0], -1).double().cpu()


def tune(model, nfe: int, *, samplers=DEFAULT_SAMPLERS, lambdas=DEFAULT_LAMBDAS, n0: int = 128, eta: int = 2,
         max_rounds: int = 4, reference=None, reference_sampler: str = "ei_2m", reference_nfe: int = 400,
         reference_n: int | None = None, metric: str = "marginal", n_projections: int = 256, seed: int = 0,
         log=None, **sample_kwargs) -> TuneResult:
    """Successive halving over :func:`candidates` at ``nfe`` against a high-NFE reference of the same model.

    Args:
        model: anything :func:`psld_fast.sample` takes (EpsModel, DenoiserModel, ...).
        reference: (M, *shape) samples of the model's law to score against (default: drawn here with
            ``reference_sampler`` at ``reference_nfe`` on seeds ``2^40 + i``, ``reference_n`` of them,
            default the largest round's sample count, at least 512).
        n0, eta, max_rounds: round r draws ``n0 * eta^r`` samples per surviving candidate and keeps
            the best ``ceil(k / eta)``.
        metric: "marginal" (:func:`psld_fast.metrics.marginal_wasserstein`: the W2 of each coordinate's
            marginal, summed; default) or "sliced" (sliced W2 with ``n_projections`` fixed directions).
        log: called with one line per finished candidate and round (e.g. ``print``).
        sample_kwargs: passed to every :func:`psld_fast.sample` call (device, backend, dtype, schedule,
            extra_args, ...), candidates and reference alike.
    """
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive int, got {nfe!r}")
    if n0 < 2 or eta < 2 or max_rounds < 1:
        raise ValueError(f"need n0 >= 2, eta >= 2, max_rounds >= 1 (got {n0}, {eta}, {max_rounds})")
    for k in ("seeds", "generator", "sampler", "nfe", "lambda_s", "num_samples", "progress"):
        if k in sample_kwargs:
            raise ValueError(f"tune chooses {k} itself; leave it out")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")

    def score(a, b):
        if metric == "marginal":
            return marginal_wasserstein(a, b)
        return sliced_wasserstein(a, b, n_projections=n_projections, seed=seed)

    cands = candidates(nfe, samplers, lambdas, sample_kwargs.get("denoise", True))
    log = log or (lambda line: None)
    n_max = n0 * eta ** (max_rounds - 1)
    cost = dict(candidate_nfe_samples=0, candidate_seconds=0.0, reference_nfe_samples=0, reference_seconds=0.0)
    ref_info = dict(sampler="(given)", nfe=0)
    if reference is None:
        m = reference_n or max(n_max, 512)
        t0 = time.perf_counter()
        res = sample(model, m, sampler=reference_sampler, nfe=reference_nfe, progress=False,
                     seeds=torch.arange(m, dtype=torch.int64) + REFERENCE_SEED0, **sample_kwargs)
        cost["reference_seconds"] = time.perf_counter() - t0
        cost["reference_nfe_samples"] = res.nfe * m
        reference = res.x
        ref_info = dict(sampler=reference_sampler, nfe=res.nfe)
    ref = _flat(reference)
    ref_info["n"] = ref.shape[0]
    if ref.shape[0] < 4:
        raise ValueError(f"the reference holds {ref.shape[0]} samples; give at least 4")
    if not bool(torch.isfinite(ref).all()):
        raise FloatingPointError("the reference samples hold NaN/Inf: choose another reference_sampler or NFE")
    pools: dict[int, torch.Tensor] = {}
    alive = list(range(len(cands)))
    rounds = []
    for r in range(max_rounds):
        n = n0 * eta ** r
        scores = []
        for i in alive:
            c = cands[i]
            have = 0 if i not in pools else pools[i].shape[0]
            t0 = time.perf_counter()
            try:
                res = sample(model, n - have, sampler=c["sampler"], nfe=nfe, lambda_s=c["lambda_s"], progress=False,
                             seeds=torch.arange(have, n, dtype=torch.int64) + seed, **sample_kwargs)
                x = _flat(res.x)
                cost["candidate_nfe_samples"] += res.nfe * (n - have)
                pools[i] = x if i not in pools else torch.cat([pools[i], x])
                v = score(pools[i], ref) if bool(torch.isfinite(pools[i]).all()) else math.inf
            except FloatingPointError:  # diverged at this budget: out
                v = math.inf
            cost["candidate_seconds"] += time.perf_counter() - t0
            scores.append((c, v))
            log(f"round {r} n={n}: {label(c)}: {v:.4g}")
        half = ref.shape[0] // 2
        floor = score(ref[:half], ref[half:2 * half])
        order = sorted(range(len(alive)), key=lambda j: scores[j][1])
        keep = max(1, math.ceil(len(alive) / eta))
        alive = [alive[j] for j in order[:keep] if math.isfinite(scores[j][1])] or [alive[order[0]]]
        rounds.append(dict(round=r, n=n, scores=scores, floor=floor, kept=[cands[i] for i in alive]))
        if len(alive) == 1:
            break
    final = sorted(rounds[-1]["scores"], key=lambda t: t[1])
    best = final[0][0]
    # Resolution check: does the winner beat the runner-up against each half of the reference alone?
    resolved = None
    if len(final) > 1 and math.isfinite(final[1][1]):
        a, b = pools[cands.index(best)], pools[cands.index(final[1][0])]
        half = ref.shape[0] // 2
        resolved = all(score(a, h) < score(b, h) for h in (ref[:half], ref[half:2 * half]))
    ref_info["metric"] = metric
    return TuneResult(best=best, nfe=nfe, rounds=rounds, cost=cost, reference=ref_info, resolved=resolved,
                      runner_up=final[1][0] if len(final) > 1 else None)
