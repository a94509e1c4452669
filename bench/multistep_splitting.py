"""A multistep form of Reduced OBA (issue 21, item 1): built, measured, not shipped.

    python bench/multistep_splitting.py

Reduced OBA whose B and A sub-steps use the score of the data estimate extrapolated through the last
two calls to the step's midpoint: with the call's D_n = a.z + c.eps (psld_fast.multistep.denoiser_coef)
and the previous call's D_prev, D* = D_n + r (D_n - D_prev), r from the line in ``ms_variable`` (rho)
evaluated at the midpoint of the step's ends, and eps* = eps + e (D* - D_n) with e = S^-1 Sigma^-1 mu
(the eps of D* at the same z, from s = -Sigma^-1 (z - mu D) and s = S eps).  The B/A map
``z <- Mz z + Meps eps*`` is affine in (z, eps, D_prev), so it is an ordinary multistep program
(``Stage.G2`` / ``dcoef``) and runs on the fused ms_step_ op.  With r = 0 the program is Reduced OBA's
(checked below).  Exact W2 on the exact Gaussian preset (16-d) and the lifted testbeds (a1)/(a2).

Result (bench/results/multistep/splitting.md): worse than Reduced OBA at every budget, by a factor
that grows with r (7x at NFE 100 with the midpoint r, 3.4x with half of it), still order 1.  A likely
reason, not verified here: the difference D_n - D_prev carries the O step's fresh noise, and the
explicit B/A step multiplies it by the score's stiff factor Sigma^-1 mu, while the exponential
integrators ei_2m(_sde) integrate that linear part exactly (which is where extrapolating D helps).
Reduced OBA's error is its splitting's, not a stale score's, so extrapolating the score cannot remove
it.  The library does not ship this sampler.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import psld_fast as pf  # noqa: E402
from _benchutil import git_revision  # noqa: E402
from psld_fast.exact import sampler_error as w2  # noqa: E402
from psld_fast.grids import time_grid  # noqa: E402
from psld_fast.multistep import denoiser_coef, exact_hsm_cov, ms_variable  # noqa: E402
from psld_fast.program import Program, ProgramBuilder  # noqa: E402
from psld_fast.samplers import _O, _Steps, _after_o, _call, _denoise, _step_times, steps_for_nfe  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "multistep"


def compile_reduced_oba_2m(sde, nfe, variable="rho", scale=1.0):
    """Reduced OBA (its defaults: joint coupling, additive split, lambda_s 1, marginal reading, start
    conditioning, quadratic grid, final denoising step) with the extrapolated score; ``scale`` multiplies
    r (0: Reduced OBA)."""
    N = steps_for_nfe("reduced_oba", nfe, True)
    grid = time_grid("quadratic", N, sde)
    steps = _Steps(sde, 1.0, "marginal", "additive", "joint", "std")
    pb = ProgramBuilder()
    pb.reset_state()
    pb.noise(np.diag([1.0, math.sqrt(sde.M)]))
    tau_prev = None
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(sde, grid, n)
        _O(pb, steps, d)
        tau_c = _after_o("start", tau_n, tau_next)
        S = _call(pb, steps, tau_c)
        Mz, Meps = steps.BA(d, d, S)
        dc = denoiser_coef(sde, tau_c)
        g = None
        if tau_prev is not None and scale != 0.0:
            v = lambda t: ms_variable(sde, variable, t)  # noqa: E731
            r = scale * ((v(tau_n) + v(tau_next)) / 2 - v(tau_c)) / (v(tau_c) - v(tau_prev))
            mu = sde.P(sde.b(tau_c))[:, 0]
            g = r * (Meps @ np.linalg.solve(S, np.linalg.solve(exact_hsm_cov(sde, tau_c), mu)))
            Mz, Meps = Mz + np.outer(g, dc[:2]), Meps + np.outer(g, dc[2:])
        pb.linear(Mz, Meps)
        if g is not None:
            pb.prev_denoised(-g)
        if scale != 0.0 and n < len(grid) - 2:
            pb.record_denoised(dc)
        tau_prev = tau_c
    _denoise(pb, steps)
    return Program("reduced_oba_2m", pb.finish(), grid, dict(sampler="reduced_oba_2m", nfe=nfe, denoise=True))


def main():
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    model = pf.get_preset("gaussian")
    mu, var = (t.numpy().ravel() for t in model.data_moments())
    sde = model.sde
    same = compile_reduced_oba_2m(sde, 20, scale=0.0)
    ref = pf.compile_sampler("reduced_oba", sde, 20)
    assert all(np.allclose(a.coef, b.coef, rtol=1e-12, atol=1e-14) for a, b in zip(same.stages, ref.stages)), \
        "r = 0 must be Reduced OBA's program"
    nfes = (10, 20, 50, 100, 200)
    rows = {"reduced_oba": [w2(pf.compile_sampler("reduced_oba", sde, n), sde, mu, var) for n in nfes]}
    for scale in (1.0, 0.5):
        rows[f"reduced_oba_2m (r x {scale:g})"] = [w2(compile_reduced_oba_2m(sde, n, scale=scale), sde, mu, var)
                                                   for n in nfes]
    rows["ei_2m"] = [w2(pf.compile_sampler("ei_2m", sde, n), sde, mu, var) for n in nfes]
    lines = ["# A multistep form of Reduced OBA (not shipped)", "",
             f"Command: `python bench/multistep_splitting.py` (git {git_revision()}). Exact W2 of the output law "
             "on the exact 16-d Gaussian preset (`gaussian`, native PSLD), quadratic grid. See the script's "
             "docstring for the construction; r = 0 reproduces Reduced OBA's program (checked).", "",
             "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for k, v in rows.items():
        lines.append(f"| {k} | " + " | ".join(f"{x:.4g}" for x in v) + " |")
    orders = {k: math.log(v[-2] / v[-1]) / math.log(nfes[-1] / nfes[-2]) for k, v in rows.items()}
    lines += ["", "Order between NFE 100 and 200: " + ", ".join(f"{k} {o:.2f}" for k, o in orders.items()) + "."]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "splitting.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
