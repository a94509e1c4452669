"""Every sampler of the spec compiled to a program of per-NFE affine stages.

Each ``_compile_<name>`` below walks the time grid and emits the sampler's sub-steps as 2x2 maps
into a :class:`~psld_fast.program.ProgramBuilder`; the readable, tensor-level loops in
:mod:`psld_fast.reference` are the oracle these programs are tested against pathwise.

Sub-steps over a reverse step ``t_n -> t_{n+1}`` with integrated beta ``d = b(tau_n) - b(tau_{n+1})``
(spec 4.3; ``s = S eps`` with ``S = -L^{-T}`` at the call time, ``c_x`` the x-score factor):

    O(d):    x += lx sqrt(Gamma d) xi_x ;          m += sqrt(M nu d) xi_m
    B(d, s): m += d/2 (x + nu m + 2 M nu s_m)
    A(d, s): x += d/2 (Gamma x - Minv m + c_x Gamma s_x)

Conventions (documented knobs):

* ``lambda_form='std'`` (default): lambda_s scales the x-noise standard deviation, ``lx = lambda_s``;
  ``'var'``: it scales the x-noise variance, ``lx = sqrt(lambda_s)`` (a reparametrisation of the grid).
* ``lambda_reading='marginal'`` (spec reading (a), default): ``c_x = 1 + lx^2``; ``'noise'``
  (reading (b)): ``c_x = 2`` (only the noise is scaled).
* ``coupling``: how one network call serves consecutive A and B sub-steps (reduced samplers only).
  ``'sequential'``: the second sub-step sees the first one's update (B, then A with the new m:
  symplectic-Euler order); ``'joint'``: both start from the state the score was evaluated at (one
  Euler step of the Hamiltonian part with the shared score).
* ``net_time='end'``: a network call made after the step's O update is conditioned on
  ``tau_{n+1}`` (the reduced samplers' shifted time); ``'start'``: every call of step n at ``tau_n``.
* ``split='additive'`` (spec 4.3 default reading): O only adds noise, A and B carry the whole drift.
  ``split='ou'`` (spec 4.3 alternative): O is the exact friction + noise OU step
  ``x <- e^{-k_x d/2} x + lx sqrt(Gamma (1 - e^{-k_x d}) / k_x) xi_x`` with ``k_x = (c_x - 1) Gamma``,
  ``m <- e^{-nu d/2} m + sqrt(M (1 - e^{-nu d})) xi_m``, and A, B carry the Hamiltonian coupling and
  the ``(s + Sinf^{-1} z)`` score terms:
  ``A: x += d/2 (-Minv m + c_x Gamma (s_x + x))``, ``B: m += d/2 (x + 2 M nu (s_m + Minv m))``.
  Same SDE, but the stiff friction is integrated exactly: stable at large steps.
* EM and SSCS follow the PSLD code: drift and noise use ``h * beta(tau_n)`` and the score at tau_n.
* The final denoising step is a noise-free Euler step of the full reverse SDE from ``eps_end``.

Deterministic samplers (``DETERMINISTIC_SAMPLERS``; no noise after the prior draw):

* ``ode_euler``: Euler on the PF ODE at ``h beta(tau_n)``.
* ``nse``, ``nvv``, ``rse``, ``rvv`` (spec 4.6): the PF ODE split into
  ``A(d, s): x += d/2 (Gamma x - Minv m + Gamma s_x)`` and ``B(d, s): m += d/2 (x + nu m + M nu s_m)``
  (``_Steps(pf=True)``: the halved score terms).  NSE: A, then B with a fresh call (2 NFE); NVV:
  B(h/2), A, B(h/2), fresh calls (3 NFE); RSE: one call serves A then B (1 NFE); RVV: one call serves
  B(h/2) and A, the closing B(h/2) has its own call (2 NFE).  ``coupling`` (reduced ones) as above;
  ``net_time`` sets the time of a call made after the step's position update (A).
* ``ci_ei``, ``ci_ddim``, ``ci_ddim2``, ``csps_d``: conjugate integrators, knob ``ci_lambda``; formulas,
  stability bound and the CSPS-D reading in :mod:`psld_fast.conjugate`.
* ``ei_x0``, ``ei_2m``: data-prediction exponential integrators (:mod:`psld_fast.multistep`): the exact
  linear part of the PF ODE with the call's data estimate D frozen over a step (ei_x0, first order) or
  extrapolated linearly through the last two calls in ``ms_variable`` (ei_2m, second order; its first
  step is ei_x0's).  The DPM-Solver++(1)/(2M) counterparts; multistep stages carry ``Stage.G2`` and
  ``Stage.dcoef`` (the previous call's D).
* ``lambda_s``, ``lambda_reading``, ``lambda_form`` and ``split`` do not apply to them and are ignored.

``ei_2m_sde`` (stochastic): ei_2m on the family ``dz = [f - (1 + lambda_s^2)/2 G G^T s] dt + lambda_s G dw``
(lambda_s = 1: the reverse SDE; 0: ei_2m; default 0.25 by docs/multistep_protocol.md part 2) with the
exact noise of its linear part; ``split``,
``lambda_reading``, ``lambda_form`` and ``net_time`` do not apply (ignored).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .grids import time_grid
from .program import Program, ProgramBuilder
from .sde import PSLD, chol2

__all__ = ["SAMPLERS", "DETERMINISTIC_SAMPLERS", "ALL_SAMPLERS", "SamplerSpec", "SAMPLER_SPECS",
           "compile_sampler", "steps_for_nfe", "LAMBDA_READINGS", "LAMBDA_FORMS", "NET_TIMES", "SPLITS",
           "COUPLINGS", "READING_KNOBS"]

#: Every reading knob a program records in ``program.info`` (and generate/sweep in their manifests).
READING_KNOBS = ("lambda_reading", "lambda_form", "net_time", "split", "coupling", "ci_lambda", "ms_variable")

LAMBDA_READINGS = ("marginal", "noise")
LAMBDA_FORMS = ("std", "var")
SPLITS = ("additive", "ou")
NET_TIMES = ("start", "end")
COUPLINGS = ("sequential", "joint")


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    evals_per_step: int
    stochastic: bool
    default_net_time: str
    default_lambda_s: float
    description: str
    default_split: str = "additive"
    default_coupling: str = "sequential"
    default_lambda_reading: str = "marginal"
    #: Conjugate samplers only: the default ``ci_lambda`` (None: the knob does not apply).
    default_ci_lambda: float | None = None
    #: Multistep samplers only: the default extrapolation variable ``ms_variable`` (None: no knob).
    default_ms_variable: str | None = None

    @property
    def reduced(self) -> bool:
        """A reduced sampler: one network call serves consecutive A and B sub-steps."""
        return self.name.startswith("reduced_") or self.name in ("rse", "rvv")


#: Default ``ci_lambda`` of lambda-DDIM and lambda-DDIM-II (psld_fast.conjugate), picked on the exact
#: 16-d Gaussian: best at NFE 20-50 of {0, 0.02, 0.05, 0.1, 0.2, 0.3} (lambda-DDIM NFE 20: 0.60 vs 2.01
#: at lambda 0).  lambda reweights eps over a step (a first-order term), so at NFE >= 100 smaller
#: lambda is better.  CSPS-D keeps 0 (lambda 0.2 was worse at every NFE).
DEFAULT_CI_LAMBDA = 0.1
DEFAULT_CI_LAMBDA2 = 0.05
#: Default extrapolation variable of the multistep samplers: chosen by the rule of
#: docs/multistep_protocol.md (bench/multistep_protocol.py; results in bench/results/multistep/).
DEFAULT_MS_VARIABLE = "rho"
#: Default lambda_s of ei_2m_sde, by part 2 of docs/multistep_protocol.md (bench/results/multistep/lambda_s.md:
#: mean log W2 ratio to lambda_s = 1 over 24 exact cells: 0.25 -0.32, 0.5 -0.31, 1.5 +0.43).
DEFAULT_LAMBDA_EI_SDE = 0.25

# Defaults of the splitting samplers: chosen by the rule of docs/readings_protocol.md, stated before
# the measurements (bench/protocol.py; tables and the rule applied: bench/results/protocol/).  Stage 1
# (coupling x split x net_time) picked joint/additive/start for Reduced OBA, BAO and BAOAB and
# sequential/ou/start for Reduced OBAB (no reading of OBAB passed the NFE-10 stability filter; the
# best mean rank is taken); the naive samplers take the majority split (additive).  Stage 2 (rule
# revision 1: candidates must converge to the data law) kept lambda_s 1 with reading (a) for all
# four; the rule as first written had moved Reduced BAO/BAOAB to lambda_s 0.25 with the noise-only
# reading (b), which does not converge to the data law (exact W2 0.028 at NFE 2001 on the 16-d
# Gaussian): bench/results/protocol/decision_rev0.md.
_JOINT_ADDITIVE = dict(default_split="additive", default_coupling="joint")
_SPECS = [
    SamplerSpec("em", 1, True, "start", 1.0, "Euler-Maruyama on the reverse SDE"),
    SamplerSpec("sscs", 1, True, "start", 1.0, "symmetric splitting (CLD): exact OU half-steps around an Euler score step"),
    SamplerSpec("naive_oba", 2, True, "start", 1.0, "O, B, A with a fresh network call for B and for A"),
    SamplerSpec("naive_bao", 2, True, "start", 1.0, "B, A (fresh calls), O"),
    SamplerSpec("naive_obab", 3, True, "start", 1.0, "O, B(h/2), A, B(h/2), each with a fresh call"),
    SamplerSpec("naive_baoab", 4, True, "start", 1.0, "B(h/2), A(h/2), O, A(h/2), B(h/2), each with a fresh call"),
    SamplerSpec("reduced_oba", 1, True, "start", 1.0, "Reduced OBA: one call after O serves B and A",
                **_JOINT_ADDITIVE),
    SamplerSpec("reduced_bao", 1, True, "start", 1.0, "Reduced BAO: one call serves B and A, then O",
                **_JOINT_ADDITIVE),
    SamplerSpec("reduced_obab", 2, True, "start", 1.0,
                "Reduced OBAB: call after O serves B(h/2)+A; closing B(h/2) at tau_{n+1}", "ou"),
    SamplerSpec("reduced_baoab", 2, True, "start", 1.0,
                "Reduced BAOAB: call 1 serves B(h/2)+A(h/2), O, call 2 serves A(h/2)+B(h/2)",
                **_JOINT_ADDITIVE),
    SamplerSpec("ode_euler", 1, False, "start", 0.0, "Euler on the probability-flow ODE (deterministic)"),
    # Deterministic splitting integrators for the PF ODE (spec 4.6): A, B with the halved score terms.
    SamplerSpec("nse", 2, False, "start", 0.0, "naive symplectic Euler on the PF ODE: A, B with a fresh call each"),
    SamplerSpec("nvv", 3, False, "start", 0.0, "naive velocity Verlet on the PF ODE: B(h/2), A, B(h/2), fresh calls"),
    SamplerSpec("rse", 1, False, "start", 0.0, "reduced symplectic Euler: one call serves A and B"),
    SamplerSpec("rvv", 2, False, "start", 0.0,
                "reduced velocity Verlet: call serves B(h/2)+A; closing B(h/2) call after the position update"),
    # Conjugate integrators (Pandey, Rudolph & Mandt, ICLR 2024): Euler in zhat = A_tau z.
    SamplerSpec("ci_ei", 1, False, "start", 0.0, "conjugate integrator with B = 0 (exponential integrator)",
                default_ci_lambda=0.0),
    SamplerSpec("ci_ddim", 1, False, "start", 0.0, "lambda-DDIM: conjugate integrator with B = lambda I",
                default_ci_lambda=DEFAULT_CI_LAMBDA),
    SamplerSpec("ci_ddim2", 1, False, "start", 0.0, "lambda-DDIM-II: conjugate integrator with B = lambda ones(2, 2)",
                default_ci_lambda=DEFAULT_CI_LAMBDA2),
    SamplerSpec("csps_d", 2, False, "end", 0.0,
                "CSPS-D: reduced velocity Verlet with conjugate (exact-linear) B and A sub-steps", default_ci_lambda=0.0),
    # Data-prediction exponential integrators (psld_fast.multistep; issue 21): the PSLD counterparts
    # of DDIM / DPM-Solver++(1), DPM-Solver++(2M) and DPM-Solver++(2M) SDE.
    SamplerSpec("ei_x0", 1, False, "start", 0.0,
                "first-order data-prediction exponential integrator (exact linear part, D frozen over a step)",
                default_ms_variable=None),
    SamplerSpec("ei_2m", 1, False, "start", 0.0,
                "two-step data-prediction exponential integrator (DPM-Solver++(2M) counterpart): D extrapolated "
                "linearly through the last two calls, first step first order", default_ms_variable=DEFAULT_MS_VARIABLE),
    SamplerSpec("ei_2m_sde", 1, True, "start", DEFAULT_LAMBDA_EI_SDE,
                "ei_2m on the lambda_s-family of reverse SDEs (lambda_s = 1: the reverse SDE) with the exact noise "
                "of the linear part (DPM-Solver++(2M) SDE counterpart)", default_ms_variable=DEFAULT_MS_VARIABLE),
]
SAMPLER_SPECS = {s.name: s for s in _SPECS}
#: The stochastic samplers of the spec (the public contract).
SAMPLERS = tuple(s.name for s in _SPECS if s.stochastic)
DETERMINISTIC_SAMPLERS = tuple(s.name for s in _SPECS if not s.stochastic)
ALL_SAMPLERS = SAMPLERS + DETERMINISTIC_SAMPLERS


def steps_for_nfe(sampler: str, nfe: int, denoise: bool = True) -> int:
    """Number of grid steps N that fits the NFE budget ``N * evals_per_step + denoise``."""
    spec = _spec(sampler)
    extra = 1 if denoise else 0
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool):
        raise TypeError(f"nfe must be an integer, got {type(nfe).__name__}")
    N = (nfe - extra) // spec.evals_per_step
    if N < 1:
        raise ValueError(f"nfe={nfe} is too small for sampler {sampler!r}: one step costs "
                         f"{spec.evals_per_step} NFE{' plus 1 for the final denoising step' if denoise else ''}, "
                         f"so nfe must be >= {spec.evals_per_step + extra}")
    return int(N)


def _spec(sampler: str) -> SamplerSpec:
    if sampler not in SAMPLER_SPECS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(ALL_SAMPLERS)}")
    return SAMPLER_SPECS[sampler]


# ------------------------------------------------------------------------------- sub-step matrices
class _Steps:
    """The 2x2 sub-step maps of one run (process, lambda_s, reading and split fixed)."""

    def __init__(self, sde: PSLD, lambda_s: float, reading: str, split: str = "additive",
                 coupling: str = "sequential", lambda_form: str = "std", pf: bool = False):
        self.sde = sde
        self.lx = lambda_s if lambda_form == "std" else math.sqrt(lambda_s)
        self.cx = 1.0 + self.lx * self.lx if reading == "marginal" else 2.0  # inf, not OverflowError, if huge
        self.ou = split == "ou"
        self.joint = coupling == "joint"
        # pf: the probability-flow ODE's A and B (spec 4.6), halved score terms, no O:
        #   A: x += d/2 (Gamma x - Minv m + Gamma s_x);  B: m += d/2 (x + nu m + M nu s_m)
        self.pf = pf
        if pf:
            self.cx, self.ou = 1.0, False
        self.ci_lambda = self.sampler = None
        self.lambda_s = lambda_s

    def O(self, d):
        """Noise-only O: returns R.  (The OU O is :meth:`O_ou`: returns (Mz, R).)"""
        s = self.sde
        return np.diag([self.lx * math.sqrt(s.gamma * d), math.sqrt(s.M * s.nu * d)])

    def O_ou(self, d):
        s = self.sde
        kx = (self.cx - 1.0) * s.gamma
        var_x = s.gamma * (-math.expm1(-kx * d) / kx if kx > 0 else d)  # (lx^2 times) Gamma (1 - e^{-kx d}) / kx
        Mz = np.diag([math.exp(-kx * d / 2), math.exp(-s.nu * d / 2)])
        R = np.diag([self.lx * math.sqrt(var_x), math.sqrt(-s.M * math.expm1(-s.nu * d))])
        return Mz, R

    def B(self, d, S):
        s = self.sde
        if self.ou:  # m += d/2 (x + 2 M nu (s_m + Minv m)) = d/2 x + d nu m + d M nu s_m
            Mz = np.array([[1.0, 0.0], [d / 2, 1.0 + d * s.nu]])
        else:
            Mz = np.array([[1.0, 0.0], [d / 2, 1.0 + d * s.nu / 2]])
        Meps = np.zeros((2, 2))
        Meps[1] = d * s.M * s.nu * S[1]
        if self.pf:
            Meps[1] *= 0.5
        return Mz, Meps

    def A(self, d, S, cx=None):
        s = self.sde
        cx = self.cx if cx is None else cx
        gx = d * cx * s.gamma / 2 if self.ou else d * s.gamma / 2  # x-coefficient
        Mz = np.array([[1.0 + gx, -d * s.Minv / 2], [0.0, 1.0]])
        Meps = np.zeros((2, 2))
        Meps[0] = d * cx * s.gamma / 2 * S[0]
        return Mz, Meps

    def shared(self, first, second):
        """Two sub-steps ``(Mz, Meps)`` served by one call: composed (sequential coupling: the second
        sees the first's update) or both applied to the call's state (joint: increments added)."""
        (M1, E1), (M2, E2) = first, second
        if self.joint:
            return M1 + M2 - np.eye(2), E1 + E2
        return M2 @ M1, M2 @ E1 + E2

    def BA(self, dB, dA, S):
        """B(dB) then A(dA), one shared score."""
        return self.shared(self.B(dB, S), self.A(dA, S))

    def AB(self, dA, dB, S):
        """A(dA) then B(dB), one shared score."""
        return self.shared(self.A(dA, S), self.B(dB, S))

    def euler(self, hb, S, cx, cm):
        """``z += hb * drift`` with score factors ``cx/2 * Gamma``, ``cm/2 * M nu`` (hb = h * beta)."""
        s = self.sde
        Mz = np.eye(2) + hb / 2 * np.array([[s.gamma, -s.Minv], [1.0, s.nu]])
        Meps = hb / 2 * np.diag([cx * s.gamma, cm * s.M * s.nu]) @ S
        return Mz, Meps


def compile_sampler(sampler: str, sde: PSLD, nfe: int, *, schedule="quadratic", lambda_s=None,
                    lambda_reading: str | None = None, net_time: str | None = None,
                    denoise: bool = True, split: str | None = None, coupling: str | None = None,
                    lambda_form: str = "std", ci_lambda: float | None = None,
                    ms_variable: str | None = None) -> Program:
    """Compile a sampler into a :class:`Program` of affine stages (all float64 host math).

    The reading knobs (``lambda_reading``, ``lambda_form``, ``net_time``, ``split``, ``coupling``;
    None = the sampler's default) are described in the module docstring; ``ci_lambda`` is the lambda
    of the conjugate samplers (``ci_ddim``, ``ci_ddim2``, ``csps_d``; see :mod:`psld_fast.conjugate`);
    ``ms_variable`` the variable the multistep samplers (``ei_2m``, ``ei_2m_sde``) extrapolate the data
    estimate D in (:data:`psld_fast.multistep.MS_VARIABLES`).
    Raises ValueError naming the argument for an unknown sampler, schedule, reading or net_time,
    a negative lambda_s or an NFE budget too small for the sampler.  Programs for named schedules
    are cached (compiling costs milliseconds, ~50 us per NFE; the ``ei_*`` samplers solve their
    linear part by RK4, ~2 ms per NFE); treat them as read-only.
    """
    args = (sampler, sde, nfe, schedule, lambda_s, lambda_reading, net_time, denoise, split, coupling,
            lambda_form, ci_lambda, ms_variable)
    if isinstance(schedule, str):
        try:
            return _compile_cached(*args)
        except TypeError:  # an unhashable argument: compile without the cache
            pass
    return _compile(*args)


@functools.lru_cache(maxsize=64)
def _compile_cached(*args) -> Program:
    return _compile(*args)


def _compile(sampler, sde, nfe, schedule, lambda_s, lambda_reading, net_time, denoise, split, coupling,
             lambda_form, ci_lambda=None, ms_variable=None) -> Program:
    spec = _spec(sampler)
    if lambda_s is None:
        lambda_s = spec.default_lambda_s
    if not isinstance(lambda_s, (int, float)) or not math.isfinite(lambda_s) or lambda_s < 0:
        raise ValueError(f"lambda_s must be a finite number >= 0, got {lambda_s!r}")
    if sampler == "sscs" and lambda_s != 1.0:
        raise ValueError("lambda_s is not defined for sscs (its OU half-steps are exact): leave it at 1")
    lambda_reading = spec.default_lambda_reading if lambda_reading is None else lambda_reading
    if lambda_reading not in LAMBDA_READINGS:
        raise ValueError(f"unknown lambda_reading {lambda_reading!r}; choose one of {LAMBDA_READINGS}")
    if lambda_form not in LAMBDA_FORMS:
        raise ValueError(f"unknown lambda_form {lambda_form!r}; choose one of {LAMBDA_FORMS}")
    split = spec.default_split if split is None else split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    coupling = spec.default_coupling if coupling is None else coupling
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose one of {COUPLINGS}")
    if coupling == "joint" and not spec.reduced:
        raise ValueError(f"coupling='joint' applies to the samplers whose one network call serves several "
                         f"sub-steps (reduced_*, rse, rvv), not to {sampler}")
    net_time = spec.default_net_time if net_time is None else net_time
    if net_time not in NET_TIMES:
        raise ValueError(f"unknown net_time {net_time!r}; choose one of {NET_TIMES}")
    N = steps_for_nfe(sampler, nfe, denoise)
    grid = time_grid(schedule, N, sde)
    if spec.default_ci_lambda is None:
        if ci_lambda is not None:
            raise ValueError(f"ci_lambda applies to the conjugate samplers only, not {sampler}")
    else:
        ci_lambda = spec.default_ci_lambda if ci_lambda is None else ci_lambda
        _check_ci_lambda(sampler, sde, grid, ci_lambda)
        ci_lambda = float(ci_lambda)
    if spec.default_ms_variable is None:
        if ms_variable is not None:
            raise ValueError(f"ms_variable applies to the multistep samplers only, not {sampler}")
    else:
        from .multistep import MS_VARIABLES

        ms_variable = spec.default_ms_variable if ms_variable is None else ms_variable
        if ms_variable not in MS_VARIABLES:
            raise ValueError(f"unknown ms_variable {ms_variable!r}; choose one of {MS_VARIABLES}")
    steps = _Steps(sde, float(lambda_s), lambda_reading, split, coupling, lambda_form, pf=sampler in _PF_SPLITTING)
    steps.ci_lambda, steps.sampler, steps.ms_variable = ci_lambda, sampler, ms_variable
    pb = ProgramBuilder()
    # Stage 0: the prior draw x ~ N(0, I), m ~ N(0, M I) overwrites the state.
    pb.reset_state()
    pb.noise(np.diag([1.0, math.sqrt(sde.M)]))
    _COMPILERS[sampler](pb, steps, grid, net_time)
    if denoise:
        _denoise(pb, steps)
    info = dict(sampler=sampler, nfe=nfe, steps=N, schedule=schedule if isinstance(schedule, str) else "custom",
                lambda_s=float(lambda_s), lambda_reading=lambda_reading, lambda_form=lambda_form,
                net_time=net_time, denoise=denoise, split=split, coupling=coupling,
                ci_lambda=ci_lambda, ms_variable=ms_variable, sde=sde.to_dict())
    program = Program(sampler=sampler, stages=pb.finish(), grid=grid, info=info)
    info["nfe"] = program.nfe
    _check_coefficients(program)
    _warn_if_amplifying(program, sde, spec)
    return program


#: Largest magnitude of a step coefficient: the kernels compute in float32.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_coefficients(program: Program) -> None:
    """ValueError when a step coefficient is NaN/Inf or beyond float32 (e.g. lambda_s = 1e30): such a
    program cannot run on the kernels, and would only fail later as NaN in the state."""
    for k, stage in enumerate(program.stages):
        coef = np.asarray(stage.coef + [float(v) for w in (stage.G2, stage.dcoef) if w is not None for v in w],
                          dtype=np.float64)
        if not np.all(np.isfinite(coef)) or np.abs(coef).max(initial=0.0) > _FLOAT32_MAX:
            info = program.info
            raise ValueError(f"{program.sampler} at NFE {program.nfe} with lambda_s={info['lambda_s']:g}: the "
                             f"step coefficients of stage {k} are beyond float32 (the noise scale grows like "
                             "lambda_s); use a much smaller lambda_s (it is meant to be of order 1)")


def _check_ci_lambda(sampler, sde, grid, lam):
    from .conjugate import CI_KINDS, ci_lambda_max

    kind = CI_KINDS[sampler]
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"ci_lambda must be a finite number >= 0, got {lam!r}")
    if kind == "zero":
        if lam != 0:
            raise ValueError(f"{sampler} is the B = 0 conjugate integrator: ci_lambda must be 0")
        return
    taus = sde.T - np.asarray(grid)
    d_max = max(sde.b(a) - sde.b(b) for a, b in zip(taus[:-1], taus[1:]))
    lam_max = ci_lambda_max(kind, d_max)
    if lam > lam_max:
        raise ValueError(f"ci_lambda={lam} is unstable for {sampler} on this grid: the Euler factor on the B "
                         f"term amplifies; need ci_lambda <= {lam_max:.4g} (largest step d = {d_max:.4g} "
                         f"in integrated beta; see psld_fast.conjugate)")


def _friction_hint(sampler, sde, grid, split) -> str:
    """The additive split integrates the momentum friction explicitly: ``m <- (1 - d nu / 2) m + ...``
    amplifies once ``d nu / 2 > 2``; named in the amplification warning as its likely cause."""
    if split != "additive" or not sampler.startswith(("naive_", "reduced_")):
        return ""
    taus = sde.T - np.asarray(grid)
    d_max = max(sde.b(a) - sde.b(b) for a, b in zip(taus[:-1], taus[1:]))
    if d_max * sde.nu / 2 <= 2:
        return ""
    return (f" The additive split makes the explicit momentum friction unstable at the largest step "
            f"(integrated beta {d_max:.3g}: d*nu/2 = {d_max * sde.nu / 2:.2f} > 2); split='ou' solves it exactly.")


#: Probe data laws of the amplification check: centred Gaussian directions with these variances
#: (stiff directions near the data, as in images, up to the prior's scale).
_PROBE_VARS = np.array([1e-4, 1e-2, 1.0])
#: Warn when the step maps multiply a probe direction by more than this over the run.
_AMPLIFICATION_LIMIT = 1.5
#: Grids with more steps than this are not checked (their step maps are contractions; measured).
_AMPLIFICATION_MAX_STEPS = 400


def _warn_if_amplifying(program: Program, sde: PSLD, spec: SamplerSpec):
    """Warn when the deterministic part of the step maps amplifies a data direction.

    On Gaussian probe data N(0, v) (v in :data:`_PROBE_VARS`) each grid step's map is linear; its
    spectral radius above 1, where the exact reverse flow contracts towards the data, means the
    discretisation amplifies that direction (e.g. the uniform grid at NFE 20: radius 1.5 for
    variance 1e-4, where EM's exact W2 error is 10x that of the quadratic grid).  The product of
    the radii above 1 over the run is compared with :data:`_AMPLIFICATION_LIMIT`.
    """
    steps = program.info["steps"]
    if steps > _AMPLIFICATION_MAX_STEPS or program.multistep:  # (multistep: the 2x2 maps do not apply)
        return
    from .exact import step_spectral_radii

    with np.errstate(all="ignore"):  # huge lambda_s: radii beyond float range must not warn from numpy
        radii = step_spectral_radii(program, sde, _PROBE_VARS, spec.evals_per_step)  # (steps, probes)
        # the product of the radii above 1, in log10 (a product of 1e5 radii overflows float64)
        log_amp = np.sum(np.log10(np.maximum(np.nan_to_num(radii, nan=np.inf), 1.0)), axis=0)
    worst = int(np.argmax(log_amp))
    if not log_amp[worst] > np.log10(_AMPLIFICATION_LIMIT):
        return
    info = program.info
    warnings.warn(f"{program.sampler} at NFE {program.nfe} ({info['schedule']} grid): the step maps amplify "
                  f"data directions of variance {_PROBE_VARS[worst]:g} by {_times(log_amp[worst])} over the run "
                  f"(largest per-step spectral radius {_number(radii[:, worst].max())}) where the exact reverse flow "
                  f"contracts; expect large errors for low-variance data. Use more NFE, the quadratic "
                  f"schedule, or another reading." + _friction_hint(program.sampler, sde, program.grid, info["split"]),
                  RuntimeWarning, stacklevel=4)


def _times(log10_factor: float) -> str:
    """A factor given by its log10 as text: '7.01x', '3.2e+45x', '10^812x', 'more than 10^308x'."""
    if not np.isfinite(log10_factor):
        return "more than 10^308x (beyond float64)"
    if log10_factor < 300:
        return f"{10.0 ** log10_factor:.3g}x"
    return f"10^{log10_factor:.0f}x"


def _number(v: float) -> str:
    return f"{v:.2f}" if np.isfinite(v) and abs(v) < 1e6 else (f"{v:.3g}" if np.isfinite(v) else "beyond float64")


def _step_times(sde: PSLD, grid, n):
    tau_n, tau_next = sde.T - grid[n], sde.T - grid[n + 1]
    return tau_n, tau_next, sde.b(tau_n) - sde.b(tau_next), grid[n + 1] - grid[n]


def _after_o(net_time, tau_n, tau_next):
    return tau_next if net_time == "end" else tau_n


def _O(pb, steps, d):
    if steps.ou:
        Mz, R = steps.O_ou(d)
        pb.linear(Mz)
        pb.noise(R)
    else:
        pb.noise(steps.O(d))


def _call(pb, steps, tau):
    pb.call(tau)
    return steps.sde.score_matrix(tau)


def _denoise(pb, steps):
    sde = steps.sde
    S = _call(pb, steps, sde.eps_end)
    pb.linear(*steps.euler(sde.eps_end * sde.beta(sde.eps_end), S, 2.0, 2.0))


def _compile_em(pb, steps, grid, net_time):
    sde = steps.sde
    for n in range(len(grid) - 1):
        tau_n, _, _, h = _step_times(sde, grid, n)
        hb = h * sde.beta(tau_n)
        S = _call(pb, steps, tau_n)
        pb.linear(*steps.euler(hb, S, steps.cx, 2.0))
        pb.noise(np.diag([steps.lx * math.sqrt(hb * sde.gamma), math.sqrt(hb * sde.M * sde.nu)]))


def _compile_ode_euler(pb, steps, grid, net_time):
    sde = steps.sde
    for n in range(len(grid) - 1):
        tau_n, _, _, h = _step_times(sde, grid, n)
        S = _call(pb, steps, tau_n)
        pb.linear(*steps.euler(h * sde.beta(tau_n), S, 1.0, 1.0))


def _compile_sscs(pb, steps, grid, net_time):
    sde = steps.sde
    for n in range(len(grid) - 1):
        tau_n, _, _, h = _step_times(sde, grid, n)
        hb = h * sde.beta(tau_n)
        mean, chol = sde.ou_half(hb / 2)
        pb.linear(mean)
        pb.noise(chol)
        S = _call(pb, steps, tau_n)
        Mz = np.eye(2) + hb * np.diag([sde.gamma, sde.nu])  # S(h): x += hb Gamma (s_x + x), m += hb M nu (s_m + Minv m)
        pb.linear(Mz, hb * np.diag([sde.gamma, sde.M * sde.nu]) @ S)
        pb.linear(mean)
        pb.noise(chol)


def _compile_naive_oba(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        tau = _after_o(net_time, tau_n, tau_next)
        _O(pb, steps, d)
        pb.linear(*steps.B(d, _call(pb, steps, tau)))
        pb.linear(*steps.A(d, _call(pb, steps, tau)))


def _compile_naive_bao(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, _, d, _ = _step_times(steps.sde, grid, n)
        pb.linear(*steps.B(d, _call(pb, steps, tau_n)))
        pb.linear(*steps.A(d, _call(pb, steps, tau_n)))
        _O(pb, steps, d)


def _compile_naive_obab(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        tau = _after_o(net_time, tau_n, tau_next)
        _O(pb, steps, d)
        pb.linear(*steps.B(d / 2, _call(pb, steps, tau)))
        pb.linear(*steps.A(d, _call(pb, steps, tau)))
        pb.linear(*steps.B(d / 2, _call(pb, steps, tau)))


def _compile_naive_baoab(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        tau = _after_o(net_time, tau_n, tau_next)
        pb.linear(*steps.B(d / 2, _call(pb, steps, tau_n)))
        pb.linear(*steps.A(d / 2, _call(pb, steps, tau_n)))
        _O(pb, steps, d)
        pb.linear(*steps.A(d / 2, _call(pb, steps, tau)))
        pb.linear(*steps.B(d / 2, _call(pb, steps, tau)))


def _compile_reduced_oba(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        _O(pb, steps, d)
        S = _call(pb, steps, _after_o(net_time, tau_n, tau_next))
        pb.linear(*steps.BA(d, d, S))


def _compile_reduced_bao(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, _, d, _ = _step_times(steps.sde, grid, n)
        S = _call(pb, steps, tau_n)
        pb.linear(*steps.BA(d, d, S))
        _O(pb, steps, d)


def _compile_reduced_obab(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        _O(pb, steps, d)
        S = _call(pb, steps, _after_o(net_time, tau_n, tau_next))
        pb.linear(*steps.BA(d / 2, d, S))
        pb.linear(*steps.B(d / 2, _call(pb, steps, tau_next)))


def _compile_reduced_baoab(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        S = _call(pb, steps, tau_n)
        pb.linear(*steps.BA(d / 2, d / 2, S))
        _O(pb, steps, d)
        S = _call(pb, steps, _after_o(net_time, tau_n, tau_next))
        pb.linear(*steps.AB(d / 2, d / 2, S))


# ------------------------------------------------------- deterministic splitting (PF ODE, spec 4.6)
# steps.pf is set: A and B carry the PF ODE's halved score terms.  A call made after the step's
# position update (A) is conditioned per net_time (tau_{n+1} for 'end', the shifted time).

def _compile_nse(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        pb.linear(*steps.A(d, _call(pb, steps, tau_n)))
        pb.linear(*steps.B(d, _call(pb, steps, _after_o(net_time, tau_n, tau_next))))


def _compile_nvv(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        pb.linear(*steps.B(d / 2, _call(pb, steps, tau_n)))
        pb.linear(*steps.A(d, _call(pb, steps, tau_n)))
        pb.linear(*steps.B(d / 2, _call(pb, steps, _after_o(net_time, tau_n, tau_next))))


def _compile_rse(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, _, d, _ = _step_times(steps.sde, grid, n)
        pb.linear(*steps.AB(d, d, _call(pb, steps, tau_n)))


def _compile_rvv(pb, steps, grid, net_time):
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(steps.sde, grid, n)
        pb.linear(*steps.BA(d / 2, d, _call(pb, steps, tau_n)))
        pb.linear(*steps.B(d / 2, _call(pb, steps, _after_o(net_time, tau_n, tau_next))))


_PF_SPLITTING = ("nse", "nvv", "rse", "rvv")


# ------------------------------------------------------------ conjugate integrators (psld_fast.conjugate)
def _compile_conjugate(pb, steps, grid, net_time):
    """zhat = A z; one Euler step on zhat with eps frozen and dPhi exact; back to z."""
    from .conjugate import CI_KINDS, conjugate_A, conjugate_B, conjugate_dphi

    sde, lam = steps.sde, steps.ci_lambda
    kind = CI_KINDS[steps.sampler]
    Bm = conjugate_B(kind, lam)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(sde, grid, n)
        _call(pb, steps, tau_n)
        An = conjugate_A(sde, kind, lam, tau_n)
        Ainv = np.linalg.inv(conjugate_A(sde, kind, lam, tau_next))
        pb.linear(Ainv @ An @ (np.eye(2) - d * Bm), Ainv @ conjugate_dphi(sde, kind, lam, tau_next, tau_n))


def _compile_csps_d(pb, steps, grid, net_time):
    """Reduced velocity Verlet whose B and A sub-steps are scalar conjugate integrators
    (psld_fast.conjugate.conjugate_substeps)."""
    from .conjugate import conjugate_substeps, tau_of_b

    sde, lam = steps.sde, steps.ci_lambda
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = _step_times(sde, grid, n)
        tau_mid = tau_of_b(sde, (sde.b(tau_n) + sde.b(tau_next)) / 2)
        B1, _ = conjugate_substeps(sde, lam, tau_mid, tau_n)
        B2, _ = conjugate_substeps(sde, lam, tau_next, tau_mid)
        _, A = conjugate_substeps(sde, lam, tau_next, tau_n)
        _call(pb, steps, tau_n)
        pb.linear(*B1)                                       # B(h/2)
        pb.linear(*A)                                        # A(h), same eps, new m
        _call(pb, steps, _after_o(net_time, tau_n, tau_next))
        pb.linear(*B2)                                       # closing B(h/2)


def _compile_ei(pb, steps, grid, net_time):
    """The data-prediction exponential integrators (psld_fast.multistep): per step the exact linear
    part, ``D`` (the call's data estimate, ``multistep.denoiser_coef``) frozen (``ei_x0``, and the
    first step of the others) or extrapolated linearly in ``steps.ms_variable`` through the last two
    calls; ``ei_2m_sde`` adds the exact noise of the ``lambda_s``-SDE's linear part."""
    from .multistep import denoiser_coef, ei_transition, ms_variable

    sde = steps.sde
    lam = steps.lambda_s if steps.sampler == "ei_2m_sde" else 0.0  # the family's lambda, not lx
    two = steps.sampler != "ei_x0"
    tau_prev = None
    for n in range(len(grid) - 1):
        tau_n, tau_next, _, _ = _step_times(sde, grid, n)
        _call(pb, steps, tau_n)
        dc = denoiser_coef(sde, tau_n)
        a, c = dc[:2], dc[2:]
        weights = [lambda s: 1.0]
        if two and tau_prev is not None:
            vn, vp = ms_variable(sde, steps.ms_variable, tau_n), ms_variable(sde, steps.ms_variable, tau_prev)
            weights.append(lambda s, vn=vn, vp=vp: (ms_variable(sde, steps.ms_variable, s) - vn) / (vn - vp))
        Phi, J, C = ei_transition(sde, tau_n, tau_next, lam=lam, weights=weights)
        Jd = J.sum(axis=0)                     # D_n's coefficient: J0 + J1
        pb.linear(Phi + np.outer(Jd, a), np.outer(Jd, c))
        if len(J) > 1:
            pb.prev_denoised(-J[1])
        if two and n < len(grid) - 2:  # the last step's D feeds no later step
            pb.record_denoised(dc)
        if lam > 0:
            pb.noise(chol2(C))
        tau_prev = tau_n


_COMPILERS = {
    "em": _compile_em, "sscs": _compile_sscs, "ode_euler": _compile_ode_euler,
    "naive_oba": _compile_naive_oba, "naive_bao": _compile_naive_bao,
    "naive_obab": _compile_naive_obab, "naive_baoab": _compile_naive_baoab,
    "reduced_oba": _compile_reduced_oba, "reduced_bao": _compile_reduced_bao,
    "reduced_obab": _compile_reduced_obab, "reduced_baoab": _compile_reduced_baoab,
    "nse": _compile_nse, "nvv": _compile_nvv, "rse": _compile_rse, "rvv": _compile_rvv,
    "ci_ei": _compile_conjugate, "ci_ddim": _compile_conjugate, "ci_ddim2": _compile_conjugate,
    "csps_d": _compile_csps_d,
    "ei_x0": _compile_ei, "ei_2m": _compile_ei, "ei_2m_sde": _compile_ei,
}
