"""Any position-space diffusion model as an exact PSLD model, and any PSLD model as a denoiser.

PSLD's perturbation kernel given the data point ``x0`` is, per coordinate, a Gaussian in
``z = (x, m)``: ``z ~ N(mu x0, Sigma)`` with ``mu`` the first column of the transition matrix
``P(b(tau))`` and ``Sigma`` the HSM covariance (``m0 ~ N(0, kappa M)``, no data variance).  Its
likelihood depends on ``x0`` only through

    y = w^T z,   w = Sigma^{-1} mu / (mu^T Sigma^{-1} mu),   and  y = x0 + sigma_y n,
    sigma_y^2 = 1 / (mu^T Sigma^{-1} mu),

so ``E[x0 | z] = D(y, sigma_y)`` with ``D`` the ordinary (EDM / VE) denoiser of the same data,
and the PSLD score and eps follow exactly (Tweedie):

    score = -Sigma^{-1} (z - mu D),     eps = -L^T score = E z - e D,
    E = L^T Sigma^{-1},  e = E mu.

``Sigma`` is the covariance without the 1e-9 jitter of the HSM code (the data law's score), ``L``
the jittered Cholesky factor the samplers invert (:func:`psld_fast.models.hsm_cholesky_tensor`):
with these the lift of a Gaussian-mixture denoiser *is* :class:`~psld_fast.models.GaussianMixture`'s
eps (tested to 1e-10).  The reverse map turns a PSLD eps network into a denoiser: for ``(y, sigma)``
take ``tau`` with ``sigma_y(tau) = sigma``, ``z = mu y`` and ``D = w^T (z + Sigma s)``.

Because eps is affine in ``(z, D)`` and ``y`` linear in ``z``, a sampler stage
``z <- P z + Q eps + noise`` becomes ``z <- (P + Q E) z - (Q e) D + noise`` and the next call's
input is ``y = w'^T z``: the fused op ``psld_fast::lifted_step_`` (16 coefficients,
:data:`psld_fast.program.LIFTED_COEF_LAYOUT`) does both in one pass over the state, so a lifted
model costs what a native one does per NFE.  :func:`lifted_coefficients` folds a compiled
program into those coefficients.

Also here: :func:`vp_denoiser` (a discrete-time VP eps/v network, e.g. a diffusers ``UNet2DModel``,
as a denoiser, with k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``
semantics), :func:`as_denoiser` (the reverse lift) and :class:`CFGDenoiser` (classifier-free
guidance as a denoiser combinator).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading

import numpy as np
import torch
from torch import nn

from .models import EpsModel, _cov_entries, _transition_entries, hsm_cholesky_tensor
from .sde import PSLD

__all__ = ["DenoiserModel", "vp_denoiser", "as_denoiser", "CFGDenoiser", "VPDenoiser", "PSLDDenoiser",
           "load_diffusers", "load_denoiser_factory", "with_class_label",
           "lift_terms", "sigma_y", "tau_for_sigma", "lifted_coefficients", "LiftedProgram", "STARTS", "ENDS", "DEFAULT_END", "sampler_group",
           "gaussian_lift_eps_affine", "lifted_stage_maps", "lifted_program_x_law"]

#: Where a lifted model's sampling starts: "T" (the process's own T and stationary prior; the
#: denoiser's sigma is clamped to its trained range) or "sigma_max" (the process truncated at
#: sigma_y(T') = sigma_max, stationary prior there).  None/"auto": per sampler family, see
#: :data:`DEFAULT_START`.
STARTS = ("T", "sigma_max")
#: Default start per sampler family, chosen by docs/any_model_protocol.md (bench/compare_kdiffusion.py).
DEFAULT_START = {"stochastic": "sigma_max", "deterministic": "sigma_max"}
#: Where a lifted model's sampling ends: "process" (the process's eps_end, raised to tau(sigma_min)
#: if it lies below the denoiser's trained range) or "sigma_min" (eps_end = tau(sigma_min), the
#: bottom of the trained range).  None: per sampler group, :data:`DEFAULT_END`.
ENDS = ("process", "sigma_min")
#: Default end per sampler group (one-step stochastic, one-step deterministic, multistep), chosen by
#: part 2 of docs/any_model_protocol.md (bench/compare_kdiffusion.py --end-protocol).
DEFAULT_END = {"stochastic": "process", "deterministic": "process", "multistep": "sigma_min"}


def sampler_group(sampler: str | None) -> str:
    """"multistep" (ei_x0, ei_2m, ei_2m_sde), else the sampler's family "stochastic" / "deterministic"
    (an unknown or absent sampler: "stochastic")."""
    from .samplers import SAMPLER_SPECS

    if sampler in ("ei_x0", "ei_2m", "ei_2m_sde"):
        return "multistep"
    spec = SAMPLER_SPECS.get(sampler)
    return "stochastic" if spec is None or spec.stochastic else "deterministic"

_LIFT_LOCK = threading.Lock()

#: Largest forward time the sigma -> tau inversion searches (sigma_y grows without bound in tau).
_TAU_SEARCH_MAX = 20.0


# ------------------------------------------------------------------------------ the lift's terms
def _b(sde: PSLD, tau):
    return sde.beta_min * tau + 0.5 * tau * tau * (sde.beta_max - sde.beta_min)


def lift_terms(sde: PSLD, tau) -> dict:
    """The lift's per-coordinate terms at forward time(s) ``tau`` (float64 tensors of tau's shape).

    Keys: ``mu0, mu1`` (mean of z per unit x0), ``w0, w1`` (y = w0 x + w1 m), ``sigma`` (sigma_y),
    ``E00, E01, E10, E11`` and ``e0, e1`` (eps = E z - e D), ``S00, S01, S11`` (Sigma without the
    jitter), ``l11, l21, l22`` (the jittered Cholesky factor of the eps convention).
    """
    tau = torch.as_tensor(tau, dtype=torch.float64)
    p = _transition_entries(sde, _b(sde, tau))
    mu0, mu1 = p[0], p[2]
    c00, c01, c11 = _cov_entries(sde, p, 0.0, sde.kappa * sde.M)
    det = c00 * c11 - c01 * c01
    i00, i01, i11 = c11 / det, -c01 / det, c00 / det              # Sigma^{-1}
    a0, a1 = i00 * mu0 + i01 * mu1, i01 * mu0 + i11 * mu1          # Sigma^{-1} mu
    c = mu0 * a0 + mu1 * a1
    l11, l21, l22 = hsm_cholesky_tensor(sde, tau)
    return dict(mu0=mu0, mu1=mu1, w0=a0 / c, w1=a1 / c, sigma=1.0 / torch.sqrt(c),
                E00=l11 * i00 + l21 * i01, E01=l11 * i01 + l21 * i11, E10=l22 * i01, E11=l22 * i11,
                e0=l11 * a0 + l21 * a1, e1=l22 * a1, S00=c00, S01=c01, S11=c11, l11=l11, l21=l21, l22=l22)


@functools.lru_cache(maxsize=4096)
def _scalar_terms_cached(sde: PSLD, tau: float) -> dict:
    return {k: float(v) for k, v in lift_terms(sde, torch.tensor([tau], dtype=torch.float64)).items()}


def _scalar_terms(sde: PSLD, tau: float) -> dict:
    """:func:`lift_terms` at one time as floats (cached: programs and callbacks ask for the same
    times again and again).  A copy, so callers may not change the cache."""
    return dict(_scalar_terms_cached(sde, float(tau)))


def x0_from_eps(t: dict, x, m, eps_x, eps_m):
    """The exact x0 estimate of a PSLD eps: ``w^T (z + Sigma s)`` with the score ``s = -L^-T eps``
    (Tweedie in the augmented space), from :func:`lift_terms` entries ``t`` (floats or tensors that
    broadcast against the halves)."""
    sm = -eps_m / t["l22"]
    sx = (-eps_x - t["l21"] * sm) / t["l11"]
    return t["w0"] * (x + t["S00"] * sx + t["S01"] * sm) + t["w1"] * (m + t["S01"] * sx + t["S11"] * sm)


def sigma_y(sde: PSLD, tau) -> np.ndarray:
    """The position-space noise level sigma_y(tau) of the PSLD marginal (float64, tau's shape)."""
    return lift_terms(sde, np.asarray(tau, dtype=np.float64))["sigma"].numpy()


def tau_for_sigma(sde: PSLD, sigma) -> np.ndarray:
    """The forward time(s) with ``sigma_y(tau) = sigma`` (bisection in log tau, float64).

    Raises ValueError for a sigma that is not a positive number or lies beyond the process's reach
    (sigma_y grows with tau; the search stops at tau = 20).
    """
    s = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"tau_for_sigma: sigma must be finite and > 0, got {np.asarray(sigma).tolist()}")
    lo = np.full_like(s, math.log(1e-12))
    hi = np.full_like(s, math.log(_TAU_SEARCH_MAX))
    top = float(sigma_y(sde, _TAU_SEARCH_MAX))
    if np.any(s > top):
        raise ValueError(f"sigma={s.max():.6g} is beyond this PSLD process's range (sigma_y reaches {top:.4g} "
                         f"at tau={_TAU_SEARCH_MAX})")
    for _ in range(80):  # 80 halvings of a ~34-wide log interval: below 1e-16 relative in tau
        mid = 0.5 * (lo + hi)
        big = sigma_y(sde, np.exp(mid)) > s
        hi = np.where(big, mid, hi)
        lo = np.where(big, lo, mid)
    tau = np.exp(0.5 * (lo + hi))
    return tau.reshape(np.shape(sigma)) if np.ndim(sigma) else tau[0]


# ----------------------------------------------------------- exact laws on Gaussian data (oracle)
def gaussian_lift_eps_affine(sde: PSLD, mu, var, sigma_min: float = 0.0, sigma_max: float = math.inf,
                             denoiser_error=None):
    """The lifted exact Gaussian denoiser's eps as an affine map of z, for
    :func:`psld_fast.exact.stage_maps` (``eps_affine``): ``tau -> (E (D, 2, 2), e0 (D, 2))``.

    The lift's eps is ``E z - e D(y, s)`` with ``y = w0 x + w1 m`` (:func:`lift_terms`) and the exact
    denoiser of N(mu, diag var) data ``D(y, s) = (var y + s^2 mu) / (var + s^2)`` called at
    ``s = clamp(sigma_y(tau), sigma_min, sigma_max)`` (as :meth:`DenoiserModel.denoise` clamps), so
    eps stays affine in z: ``eps = (E - a e w^T) z - c e`` with ``D = a y + c``.  Where no clamping is
    active this is the native exact eps.  ``denoiser_error(a, c, s)`` may return a modified
    ``(a, c)`` per coordinate (an affine error on the denoiser, e.g. an additive ``D + r(s) U``).
    """
    mu = np.asarray(mu, dtype=np.float64).ravel()
    var = np.asarray(var, dtype=np.float64).ravel()

    def eps_affine(tau: float):
        t = _scalar_terms(sde, tau)
        s = min(max(t["sigma"], sigma_min), sigma_max)
        a = var / (var + s * s)
        c = s * s * mu / (var + s * s)
        if denoiser_error is not None:
            a, c = denoiser_error(a, c, s)
        E = np.array([[t["E00"], t["E01"]], [t["E10"], t["E11"]]])
        e = np.array([t["e0"], t["e1"]])
        w = np.array([t["w0"], t["w1"]])
        return E[None] - a[:, None, None] * np.outer(e, w)[None], -c[:, None] * e[None]

    return eps_affine


def lifted_stage_maps(program, sde: PSLD, mu, var, sigma_min: float = 0.0, sigma_max: float = math.inf,
                      denoiser_error=None):
    """Per stage the affine map ``z <- A z + b + noise`` of a program run on the lifted exact
    Gaussian denoiser (:func:`gaussian_lift_eps_affine`); as :func:`psld_fast.exact.stage_maps` (which
    refuses multistep programs)."""
    from .exact import stage_maps

    return stage_maps(program, sde, mu, var,
                      eps_affine=gaussian_lift_eps_affine(sde, mu, var, sigma_min, sigma_max, denoiser_error))


def lifted_program_x_law(program, sde: PSLD, mu, var, sigma_min: float = 0.0, sigma_max: float = math.inf,
                         denoiser_error=None):
    """Exact per-coordinate mean and variance (each (D,)) of a program's output x on the lifted
    exact Gaussian denoiser with sigma clamped to ``[sigma_min, sigma_max]``."""
    from .exact import program_x_law

    return program_x_law(program, sde, mu, var,
                         eps_affine=gaussian_lift_eps_affine(sde, mu, var, sigma_min, sigma_max, denoiser_error))


# --------------------------------------------------------------------------------- DenoiserModel
class DenoiserModel(EpsModel):
    """A position-space denoiser lifted to an exact PSLD eps model.

    Args:
        denoiser: ``denoiser(x, sigma, **extra_args) -> x0_hat`` in the k-diffusion / EDM convention:
            x (B, *shape) noisy data ``x0 + sigma n``, sigma (B,) noise levels.  A k-diffusion
            ``Denoiser``, an EDM network, :func:`vp_denoiser` of a DDPM/diffusers network, ... .
        shape: the shape of one data sample, e.g. (3, 32, 32).
        sigma_min, sigma_max: the noise levels the denoiser was trained on.  The PSLD process is
            run inside them: its last time ``eps_end`` is raised so that sigma_y(eps_end) >=
            sigma_min, and it starts per ``start``.
        sde: the PSLD process of the lift and the samplers (default ``PSLD()``).
        start: "T" (start at the process's T with its stationary prior; the denoiser is called
            with sigma clamped to sigma_max where sigma_y(tau) exceeds it), "sigma_max" (start at
            the tau where sigma_y = sigma_max, stationary prior there), or None (default, per
            sampler family: :data:`DEFAULT_START`).
        end: "process" (the process's eps_end, raised into the trained range), "sigma_min" (eps_end
            = tau(sigma_min)), or None (default, per sampler group: :data:`DEFAULT_END`).
    The forward ``model(u, tau, **extra_args)`` returns eps (the unfused lift, used on backends
    without the fused lifted step); ``psld_fast.sample`` runs the fused ``lifted_step_`` loop on CPU
    (C++ kernel) and with the reference backend.
    """

    def __init__(self, denoiser, shape, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sde: PSLD | None = None, name: str | None = None, start: str | None = None,
                 end: str | None = None):
        if not callable(denoiser):
            raise TypeError(f"DenoiserModel: denoiser must be callable denoiser(x, sigma) -> x0, got "
                            f"{type(denoiser).__name__}")
        if shape is None:
            raise ValueError("DenoiserModel: shape (of one data sample, e.g. (3, 32, 32)) is required")
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"DenoiserModel: shape must be positive sizes, got {shape}")
        for nm, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"DenoiserModel: {nm} must be a finite number > 0, got {v!r}")
        if not sigma_min < sigma_max:
            raise ValueError(f"DenoiserModel: sigma_min={sigma_min} must be < sigma_max={sigma_max}")
        if start is not None and start not in STARTS:
            raise ValueError(f"DenoiserModel: unknown start {start!r}; choose one of {STARTS} or None (per sampler)")
        if end is not None and end not in ENDS:
            raise ValueError(f"DenoiserModel: unknown end {end!r}; choose one of {ENDS} or None (per sampler)")
        super().__init__(net=None, sde=sde, shape=shape, name=name or type(denoiser).__name__)
        self.denoiser = denoiser  # registered as a submodule when it is one (parameters, .to, .eval)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.start, self.end = start, end
        base = self.sde
        top = float(sigma_y(base, base.T))
        if self.sigma_min >= top:
            raise ValueError(f"DenoiserModel: the denoiser's range starts at sigma_min={self.sigma_min:g}, above "
                             f"sigma_y(T)={top:.4g} of the PSLD process: no PSLD time maps into the trained range")
        #: eps_end per end knob: the trained range's bottom, and the process's own (raised into it)
        self.eps_end_sigma_min = float(tau_for_sigma(base, self.sigma_min)) * (1.0 + 1e-12)
        if float(sigma_y(base, base.eps_end)) < self.sigma_min:
            self.eps_end = self.eps_end_sigma_min
        else:
            self.eps_end = base.eps_end
        self.tau_max = float(tau_for_sigma(base, self.sigma_max)) if self.sigma_max < top else base.T
        if not self.eps_end < self.tau_max:
            raise ValueError(f"DenoiserModel: the trained range [{self.sigma_min:g}, {self.sigma_max:g}] maps to "
                             f"tau in [{self.eps_end:.4g}, {self.tau_max:.4g}]: empty")

    # ------------------------------------------------------------------------------ the process
    def resolved_start(self, sampler: str | None = None) -> str:
        if self.start is not None:
            return self.start
        from .samplers import SAMPLER_SPECS

        spec = SAMPLER_SPECS.get(sampler)
        family = "stochastic" if spec is None or spec.stochastic else "deterministic"
        return DEFAULT_START[family]

    def resolved_end(self, sampler: str | None = None) -> str:
        return self.end if self.end is not None else DEFAULT_END[sampler_group(sampler)]

    def process_for(self, sampler: str | None = None) -> PSLD:
        """The PSLD process ``sample`` compiles the sampler for: the lift's process with ``eps_end``
        per :meth:`resolved_end` (inside the trained range) and ``T`` per :meth:`resolved_start`."""
        T = self.tau_max if self.resolved_start(sampler) == "sigma_max" else self.sde.T
        eps_end = self.eps_end_sigma_min if self.resolved_end(sampler) == "sigma_min" else self.eps_end
        return dataclasses.replace(self.sde, T=T, eps_end=eps_end)

    # ------------------------------------------------------------------------------ evaluation
    def denoise(self, y: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        """The denoiser at ``(y, sigma)``, sigma clamped to the trained range; output checked."""
        return self.check_output(self.denoiser(y, sigma.clamp(self.sigma_min, self.sigma_max), **extra_args), y)

    def check_output(self, out, y: torch.Tensor) -> torch.Tensor:
        """The denoiser's output as a tensor of y's shape (diffusers-style objects unwrapped), else
        ValueError naming the denoiser."""
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "sample", out)  # diffusers-style output objects
        if not isinstance(out, torch.Tensor) or out.shape != y.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the denoiser {self.name} returned {got}; expected a tensor of its input's shape "
                             f"{tuple(y.shape)} (x0_hat in the k-diffusion convention)")
        return out

    def forward(self, u: torch.Tensor, tau, **extra_args) -> torch.Tensor:
        tau = torch.as_tensor(tau, device=u.device)
        if tau.dim() == 0:
            tau = tau.expand(u.shape[0])
        t = lift_terms(self.sde, tau.detach().to("cpu", torch.float64))
        ct = u.dtype if u.dtype in (torch.float32, torch.float64) else torch.float32
        shape = (-1,) + (1,) * (u.dim() - 1)
        c = {k: v.to(u.device, ct).reshape(shape) for k, v in t.items()}
        C = u.shape[1] // 2
        x, m = u[:, :C].to(ct), u[:, C:].to(ct)
        y = c["w0"] * x + c["w1"] * m
        D = self.denoise(y.to(u.dtype), t["sigma"].to(u.device, ct), **extra_args).to(ct)
        ex = c["E00"] * x + c["E01"] * m - c["e0"] * D
        em = c["E10"] * x + c["E11"] * m - c["e1"] * D
        return torch.cat([ex, em], dim=1).to(u.dtype)

    def lifted(self, program, init_tau: float | None = None) -> "LiftedProgram":
        """The fused coefficients of ``program`` for this model (cached per program object);
        ``init_tau``: with a stage 0 that lifts a given x at that time (see :func:`lifted_coefficients`)."""
        key = (self.sde, init_tau)
        with _LIFT_LOCK:  # kept on the program (programs are cached and read-only)
            per = program.__dict__.setdefault("_lifted", {})
            hit = per.get(key)
            if hit is None:
                hit = lifted_coefficients(program, self.sde, init_tau)
                per[key] = hit
            return hit


@dataclasses.dataclass(frozen=True)
class LiftedProgram:
    """A program folded for a lifted model: per stage the 16 lifted coefficients, whether it writes
    y, and the sigma_y of its call (None for stage 0)."""

    coef: list
    writes_y: list
    sigmas: list
    init_coef: list | None = None  # stage 0 from a given position-space x (k-diffusion entry points)


def lifted_coefficients(program, sde: PSLD, init_tau: float | None = None) -> LiftedProgram:
    """Fold a compiled program into the lifted op's coefficients (float64 host math).

    Stage k with a call at tau_k: ``P' = P + Q E_k``, ``G = -Q e_k``; every stage writes the next
    call's ``y = w_{k+1}^T z`` (W = 0 and no write after the last call).  ``init_tau``: also make the
    coefficients of a stage 0 that lifts a given position-space ``x`` at that time,
    ``z = mu x + v n`` with ``v v^T = Sigma - sigma_y^2 mu mu^T`` (the exact conditional law of z
    given y = x), replacing the prior draw.
    """
    stages = program.stages
    call_taus = [s.tau for s in stages]
    next_tau = [None] * len(stages)
    upcoming = None
    for k in range(len(stages) - 1, -1, -1):
        next_tau[k] = upcoming
        if stages[k].uses_network:
            upcoming = stages[k].tau
    coefs, writes, sigmas = [], [], []
    for k, st in enumerate(stages):
        P, Q = st.P.copy(), st.Q
        G = np.zeros(2)
        sig = None
        if st.uses_network:
            t = _scalar_terms(sde, call_taus[k])
            E = np.array([[t["E00"], t["E01"]], [t["E10"], t["E11"]]])
            P = P + Q @ E
            G = -Q @ np.array([t["e0"], t["e1"]])
            sig = t["sigma"]
        W = np.zeros(2)
        if next_tau[k] is not None:
            tn = _scalar_terms(sde, next_tau[k])
            W = np.array([tn["w0"], tn["w1"]])
        coefs.append([float(v) for v in np.concatenate([P.ravel(), G, st.R1.ravel(), st.R2.ravel(), W])])
        writes.append(next_tau[k] is not None)
        sigmas.append(sig)
    init = None
    if init_tau is not None:
        t = _scalar_terms(sde, init_tau)
        s2 = t["sigma"] ** 2
        M00 = t["S00"] - s2 * t["mu0"] ** 2
        M01 = t["S01"] - s2 * t["mu0"] * t["mu1"]
        M11 = t["S11"] - s2 * t["mu1"] ** 2
        if M11 >= M00:
            r = math.sqrt(max(M11, 0.0))
            v = (M01 / r if r > 0 else 0.0, r)
        else:
            r = math.sqrt(max(M00, 0.0))
            v = (r, M01 / r)
        W = coefs[0][14:16]
        init = [0.0, 0.0, 0.0, 0.0, t["mu0"], t["mu1"], v[0], 0.0, v[1], 0.0, 0.0, 0.0, 0.0, 0.0] + list(W)
    return LiftedProgram(coef=coefs, writes_y=writes, sigmas=sigmas, init_coef=init)


# ------------------------------------------------------------------------------ VP networks
class VPDenoiser(nn.Module):
    """A discrete-time VP network as a denoiser (k-diffusion's DiscreteEpsDDPMDenoiser /
    DiscreteVDDPMDenoiser semantics; see :func:`vp_denoiser`)."""

    def __init__(self, net, alphas_cumprod, prediction: str = "epsilon", quantize: bool = False):
        super().__init__()
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"vp_denoiser: prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).detach().reshape(-1)
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac < 1)):
            raise ValueError("vp_denoiser: alphas_cumprod must be >= 2 numbers in (0, 1)")
        sig = ((1 - ac) / ac) ** 0.5
        if not torch.all(sig[1:] > sig[:-1]):
            raise ValueError("vp_denoiser: alphas_cumprod must decrease (sigma = sqrt((1 - abar) / abar) increasing)")
        self.inner_model = net
        self.prediction = prediction
        self.quantize = bool(quantize)
        self.register_buffer("sigmas", sig)
        self.register_buffer("log_sigmas", sig.log())

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Discrete timestep of sigma: nearest (quantize) or linear in log sigma between neighbours."""
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if self.quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        n = self.log_sigmas.shape[0]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=n - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        frac = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - frac) * low + frac * (low + 1)).view(sigma.shape)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        s = sigma.reshape((-1,) + (1,) * (x.dim() - 1))
        c_in = 1.0 / (s * s + 1.0) ** 0.5
        out = self.inner_model(x * c_in, self.sigma_to_t(sigma.float()), **extra_args)
        out = getattr(out, "sample", out)  # diffusers UNet2DModel returns an output object
        if self.prediction == "epsilon":
            return x - s * out
        return x / (s * s + 1.0) - s * c_in * out  # v: c_skip x + c_out v


def vp_denoiser(eps_net, alphas_cumprod, *, prediction: str = "epsilon", quantize: bool = False) -> VPDenoiser:
    """A discrete-time VP network ``eps_net(x_in, t, **kw)`` as an EDM denoiser.

    sigma = sqrt((1 - abar) / abar) per discrete step, the input scaled by 1/sqrt(sigma^2 + 1),
    ``t`` from sigma by linear interpolation in log sigma (``quantize=True``: the nearest step), and
    ``D = x - sigma eps`` (``prediction="v_prediction"``: ``D = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1)``).
    A diffusers ``UNet2DModel`` works directly (its ``.sample`` output is used); pass the scheduler's
    ``alphas_cumprod``.  The result has ``sigma_min`` / ``sigma_max`` for :class:`DenoiserModel`.
    """
    return VPDenoiser(eps_net, alphas_cumprod, prediction=prediction, quantize=quantize)


# -------------------------------------------------------------------- PSLD network -> denoiser
class PSLDDenoiser(nn.Module):
    """A PSLD eps model as an EDM denoiser (see :func:`as_denoiser`)."""

    def __init__(self, model: EpsModel):
        super().__init__()
        if not isinstance(model, EpsModel):
            raise TypeError(f"as_denoiser: expected a psld_fast EpsModel, got {type(model).__name__}")
        self.model = model
        sde = model.sde
        self.sigma_min = float(sigma_y(sde, sde.eps_end))
        self.sigma_max = float(sigma_y(sde, sde.T))
        self._tau_cache: dict = {}

    def _taus(self, sigma: torch.Tensor) -> torch.Tensor:
        vals = sigma.detach().to("cpu", torch.float64).reshape(-1)
        uniq = torch.unique(vals)
        missing = [float(s) for s in uniq if float(s) not in self._tau_cache]
        if missing:
            if len(self._tau_cache) > 4096:
                self._tau_cache.clear()
            for s, t in zip(missing, np.atleast_1d(tau_for_sigma(self.model.sde, np.array(missing)))):
                self._tau_cache[s] = float(t)
        return torch.tensor([self._tau_cache[float(s)] for s in vals], dtype=torch.float64)

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        tau = self._taus(sigma)
        t = lift_terms(self.model.sde, tau)
        ct = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        shape = (-1,) + (1,) * (x.dim() - 1)
        c = {k: v.to(x.device, ct).reshape(shape) for k, v in t.items()}
        y = x.to(ct)
        zx, zm = c["mu0"] * y, c["mu1"] * y
        u = torch.cat([zx, zm], dim=1).to(x.dtype)
        eps = self.model(u, tau.to(x.device, ct), **extra_args).to(ct)
        C = x.shape[1]
        return x0_from_eps(c, zx, zm, eps[:, :C], eps[:, C:]).to(x.dtype)


def as_denoiser(model: EpsModel) -> PSLDDenoiser:
    """A PSLD eps model as a denoiser ``D(x, sigma, **extra_args)`` (k-diffusion convention), exact:
    ``tau`` with ``sigma_y(tau) = sigma``, ``z = mu x``, ``D = w^T (z + Sigma s)`` with the model's
    score ``s``.  ``sigma_min`` / ``sigma_max`` are sigma_y at the process's eps_end and T."""
    return PSLDDenoiser(model)


# ------------------------------------------------------------------------------------- guidance
class CFGDenoiser(nn.Module):
    """Classifier-free guidance as a denoiser: ``D_u + cond_scale (D_c - D_u)``.

    ``denoiser(x, sigma, **cond)`` is evaluated once on the doubled batch ``cat([x, x])`` with the
    unconditional arguments ``uncond`` (a dict of the same keys: e.g. ``{"class_labels": null_label}``;
    tensors of batch 1 or scalars are expanded) stacked before the conditional ones, as
    k-diffusion users' CFG wrappers do.  ``cond_scale = 1`` is the conditional denoiser.
    """

    def __init__(self, denoiser, cond_scale: float, uncond: dict):
        super().__init__()
        if not isinstance(uncond, dict) or not uncond:
            raise ValueError("CFGDenoiser: uncond must be a non-empty dict of the unconditional extra arguments")
        if not isinstance(cond_scale, (int, float)) or not math.isfinite(cond_scale):
            raise ValueError(f"CFGDenoiser: cond_scale must be a finite number, got {cond_scale!r}")
        self.inner_model = denoiser
        self.cond_scale = float(cond_scale)
        self.uncond = uncond
        for attr in ("sigma_min", "sigma_max"):
            if hasattr(denoiser, attr):
                setattr(self, attr, getattr(denoiser, attr))

    def forward(self, x, sigma, **cond):
        missing = set(self.uncond) - set(cond)
        if missing:
            raise ValueError(f"CFGDenoiser: the conditional extra arguments lack {sorted(missing)} "
                             f"(pass them through extra_args)")
        B = x.shape[0]
        args = dict(cond)
        for k, un in self.uncond.items():
            c = cond[k]
            un = torch.as_tensor(un, device=c.device, dtype=c.dtype)
            if un.dim() == 0 or un.shape[0] == 1:
                un = un.reshape((1,) + tuple(c.shape[1:]) if un.dim() else (1,) * max(c.dim(), 1)).expand(c.shape)
            args[k] = torch.cat([un, c])
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(B)
        out = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]), **args)
        out = getattr(out, "sample", out)
        d_u, d_c = out[:B], out[B:]
        return d_u + self.cond_scale * (d_c - d_u)


# ----------------------------------------------------------------------------- command-line models
class _LabelledDenoiser(nn.Module):
    """A denoiser called with a fixed class label (``class_labels`` of the batch's size)."""

    def __init__(self, denoiser, label: int):
        super().__init__()
        self.inner_model, self.label = denoiser, int(label)
        for attr in ("sigma_min", "sigma_max"):
            if hasattr(denoiser, attr):
                setattr(self, attr, getattr(denoiser, attr))

    def forward(self, x, sigma, **extra_args):
        labels = torch.full((x.shape[0],), self.label, dtype=torch.long, device=x.device)
        return self.inner_model(x, sigma, class_labels=labels, **extra_args)


def with_class_label(model: "DenoiserModel", label: int | None, guidance: float | None = None,
                     null_label: int | None = None) -> "DenoiserModel":
    """``model`` conditioned on ``label`` (and classifier-free guided with ``guidance``, the
    unconditional branch using ``null_label``); unchanged when label is None."""
    if label is None:
        if guidance is not None or null_label is not None:
            raise ValueError("--guidance and --null-label need --class-label")
        return model
    den = model.denoiser
    if guidance is not None:
        if null_label is None:
            raise ValueError("--guidance needs --null-label (the label the model was trained with for 'no class')")
        den = CFGDenoiser(den, guidance, {"class_labels": torch.tensor([int(null_label)])})
    return DenoiserModel(_LabelledDenoiser(den, label), model.shape, sigma_min=model.sigma_min,
                         sigma_max=model.sigma_max, sde=model.sde, name=f"{model.name}[class {label}]",
                         start=model.start, end=model.end)


def load_diffusers(folder) -> "DenoiserModel":
    """A local diffusers folder (``save_pretrained`` of a UNet2DModel with its scheduler config, or a
    pipeline folder with ``unet/`` and ``scheduler/``) as a lifted model; nothing is downloaded.
    ValueError naming the folder and what is missing."""
    import os

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"--diffusers {folder}: not a folder")
    from .peers import import_diffusers

    try:
        diffusers = import_diffusers()
    except ImportError as exc:
        raise ValueError(f"--diffusers needs the diffusers package: pip install 'psld-fast[diffusers]' ({exc})") from None
    unet_dir = os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder
    sched_dir = os.path.join(folder, "scheduler") if os.path.isdir(os.path.join(folder, "scheduler")) else folder
    if not os.path.exists(os.path.join(unet_dir, "config.json")):
        raise ValueError(f"--diffusers {folder}: no config.json of a UNet2DModel (in the folder or its unet/)")
    try:
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir, local_files_only=True).eval()
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError variants
        raise ValueError(f"--diffusers {folder}: cannot load the UNet2DModel ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from None
    if not os.path.exists(os.path.join(sched_dir, "scheduler_config.json")):
        raise ValueError(f"--diffusers {folder}: no scheduler_config.json (in the folder or its scheduler/): the "
                         "noise schedule (alphas_cumprod) is needed")
    sched = diffusers.DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    prediction = getattr(sched.config, "prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"--diffusers {folder}: prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
    den = vp_denoiser(unet, sched.alphas_cumprod, prediction=prediction)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return DenoiserModel(den, (unet.config.in_channels, *size), sigma_min=den.sigma_min, sigma_max=den.sigma_max,
                         name=f"diffusers:{os.path.basename(os.path.normpath(folder))}")


def load_denoiser_factory(spec: str) -> "DenoiserModel":
    """``MODULE:FACTORY`` (MODULE a module name or a .py file): FACTORY() returns a DenoiserModel or
    ``(denoiser, dict(shape=..., sigma_min=..., sigma_max=...))``."""
    import importlib
    import importlib.util
    import os

    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"--denoiser {spec!r}: expected MODULE:FACTORY (e.g. my_models:edm_cifar)")
    mod_name, fn_name = spec.split(":")
    try:
        if mod_name.endswith(".py"):
            if not os.path.exists(mod_name):
                raise ValueError(f"--denoiser {spec}: {mod_name} does not exist")
            sp = importlib.util.spec_from_file_location(f"psld_fast_user_{abs(hash(mod_name))}", mod_name)
            mod = importlib.util.module_from_spec(sp)
            sp.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"--denoiser {spec}: cannot import {mod_name} ({exc})") from None
    factory = getattr(mod, fn_name, None)
    if not callable(factory):
        raise ValueError(f"--denoiser {spec}: {mod_name} has no callable {fn_name}")
    made = factory()
    if isinstance(made, DenoiserModel):
        return made
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], dict) and "shape" in made[1]:
        opts = dict(made[1])
        return DenoiserModel(made[0], opts.pop("shape"), name=opts.pop("name", f"{mod_name}:{fn_name}"), **opts)
    raise ValueError(f"--denoiser {spec}: {fn_name}() must return a DenoiserModel or (denoiser, dict(shape=..., "
                     f"sigma_min=..., sigma_max=...)), got {type(made).__name__}")
