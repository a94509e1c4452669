"""Sampler programs: a sampler compiles to a list of per-NFE affine stages.

Between two network calls every sampler of the spec is, per coordinate pair ``(x_j, m_j)``,

    [x; m] <- P [x; m] + Q [eps_x; eps_m] + R1 [n0; n1] + R2 [n2; n3]

with 2x2 matrices P, Q, R1, R2 (the eps -> score conversion, lambda_s, step sizes and beta folded
in) and ``n0..n3`` the four normals of one Philox call (``psld_fast.rng``).  R1 carries the stage's
first noise draw, R2 its second (SSCS needs two draws between network calls).

A :class:`Program` is ``stages[0]`` (no network output: the prior draw and whatever precedes the
first call) followed by one stage per network evaluation: ``eps = net(u, stage.tau)`` then
``affine_step_(u, eps, seeds, stage.coef, k)``.  The coefficients are float64 numbers computed on the
host; the kernels do the arithmetic in float32.

Multistep samplers (``ei_2m``, ``ei_2m_sde``; :mod:`psld_fast.multistep`) also carry the previous
call's data estimate ``D_prev`` (one half's shape): a stage with ``dcoef`` records the estimate of its
own call, ``D = a0 x + a1 m + c0 eps_x + c1 eps_m`` of the state before the step (a lifted denoiser's
output is that estimate itself), and a stage with ``G2`` adds ``G2 D_prev`` (x gets ``G2[0] D_prev``,
m ``G2[1] D_prev``) after the affine step.  Such a stage runs the multistep op ``ms_step_`` (definition
:func:`ms_step_reference`): the same pass with a float32 buffer ``dbuf`` that holds D_prev, read and
overwritten with this call's D element by element.

This file also holds :func:`affine_step_reference`, the pure-PyTorch definition of the op that
``psld_fast.ops`` dispatches to the fused kernels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from .rng import philox_normals

__all__ = ["Stage", "Program", "ProgramBuilder", "affine_step_reference", "run_stages_reference", "COEF_LAYOUT",
           "lifted_step_reference", "LIFTED_COEF_LAYOUT", "lifted_plain_coef", "ms_step_reference",
           "lifted_ms_step_reference", "MS_COEF_LAYOUT", "ms_estimate"]

#: Order of the 16 float coefficients passed to the op.
COEF_LAYOUT = ("P00", "P01", "P10", "P11", "Q00", "Q01", "Q10", "Q11",
               "R1_00", "R1_01", "R1_10", "R1_11", "R2_00", "R2_01", "R2_10", "R2_11")


@dataclass(frozen=True)
class Stage:
    """One affine stage.  ``tau`` is the forward time of the network call that feeds it (None for
    stage 0); ``n_draws`` how many of the two noise slots it uses (0, 1 or 2).  Multistep samplers
    only (else None): ``dcoef`` (4,) records this call's data estimate, ``G2`` (2,) is the
    coefficient of the previous recorded estimate (see the module docstring)."""

    tau: float | None
    P: np.ndarray
    Q: np.ndarray
    R1: np.ndarray
    R2: np.ndarray
    n_draws: int
    G2: np.ndarray | None = None
    dcoef: np.ndarray | None = None

    @functools.cached_property
    def coef(self) -> list[float]:
        """The 16 coefficients in :data:`COEF_LAYOUT` order, as Python floats (float64); computed
        once (it is read once per NFE of every batch)."""
        return [float(v) for v in np.concatenate([self.P.ravel(), self.Q.ravel(),
                                                  self.R1.ravel(), self.R2.ravel()])]

    @property
    def uses_network(self) -> bool:
        return self.tau is not None

    @property
    def is_multistep(self) -> bool:
        """Whether the stage reads or records a data estimate: it runs the multistep op."""
        return self.G2 is not None or self.dcoef is not None

    @property
    def records(self) -> bool:
        """Whether the stage's call records its data estimate (``dcoef``) for a later stage."""
        return self.dcoef is not None

    @functools.cached_property
    def ms_lifted(self) -> list[float]:
        """The lifted multistep op's 2 numbers ``(g0, g1)``."""
        return self.ms[:2]

    @functools.cached_property
    def ms(self) -> list[float]:
        """The multistep op's 6 numbers in :data:`MS_COEF_LAYOUT` order (zeros for an absent G2 or
        dcoef); the lifted op takes the first two."""
        g = (0.0, 0.0) if self.G2 is None else self.G2
        d = (0.0,) * 4 if self.dcoef is None else self.dcoef
        return [float(v) for v in (*g, *d)]


@dataclass
class Program:
    """A compiled sampler: ``stages[0]`` has no network call, every later stage one."""

    sampler: str
    stages: list[Stage]
    grid: np.ndarray            # reverse-time grid t_0..t_N (float64)
    info: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        return sum(1 for s in self.stages if s.uses_network)

    @property
    def taus(self) -> list[float]:
        return [s.tau for s in self.stages if s.uses_network]

    @property
    def multistep(self) -> bool:
        """Whether the stages carry the previous call's data estimate (``Stage.G2`` / ``dcoef``)."""
        return any(s.G2 is not None or s.dcoef is not None for s in self.stages)


class ProgramBuilder:
    """Composes sub-step affine maps into stages.

    The current stage maps the state at its start ``z0`` (and the stage's network output ``eps``) to
    ``z = P z0 + Q eps + R1 xi1 + R2 xi2``.  ``linear(Mz, Meps)`` applies ``z <- Mz z + Meps eps``,
    ``noise(R)`` adds a fresh draw ``R xi``, ``call(tau)`` closes the stage at a network call.
    """

    def __init__(self):
        self.stages: list[Stage] = []
        self._start(None)

    def _start(self, tau):
        self._tau = tau
        self._P = np.eye(2)
        self._Q = np.zeros((2, 2))
        self._R = [np.zeros((2, 2)), np.zeros((2, 2))]
        self._draws = 0
        self._zeroed = False
        self._G2 = None
        self._dcoef = None

    def reset_state(self):
        """The state is overwritten (the prior draw): the old value is not read."""
        self._P = np.zeros((2, 2))
        self._Q = np.zeros((2, 2))
        self._R = [np.zeros((2, 2)), np.zeros((2, 2))]

    def linear(self, Mz, Meps=None):
        Mz = np.asarray(Mz, dtype=np.float64)
        self._P = Mz @ self._P
        self._Q = Mz @ self._Q
        self._R = [Mz @ R for R in self._R]
        if self._G2 is not None:
            self._G2 = Mz @ self._G2
        if Meps is not None:
            if self._tau is None:
                raise RuntimeError("ProgramBuilder: stage 0 has no network output to use")
            self._Q = self._Q + np.asarray(Meps, dtype=np.float64)

    def record_denoised(self, dcoef):
        """This stage's call records its data estimate ``D = dcoef . (x, m, eps_x, eps_m)`` (of the
        state at the call) for the next multistep stage."""
        if self._tau is None:
            raise RuntimeError("ProgramBuilder: stage 0 has no network call to record")
        self._dcoef = np.asarray(dcoef, dtype=np.float64).reshape(4).copy()

    def prev_denoised(self, G2):
        """``z <- z + G2 D_prev``: the data estimate recorded by the previous call (multistep)."""
        if self._tau is None or not any(st.dcoef is not None for st in self.stages):
            raise RuntimeError("ProgramBuilder: no earlier call recorded a data estimate")
        G2 = np.asarray(G2, dtype=np.float64).reshape(2)
        self._G2 = G2.copy() if self._G2 is None else self._G2 + G2

    def noise(self, R):
        if self._draws == 2:
            raise RuntimeError("ProgramBuilder: a stage holds at most two noise draws")
        self._R[self._draws] = self._R[self._draws] + np.asarray(R, dtype=np.float64)
        self._draws += 1

    def _close(self):
        self.stages.append(Stage(self._tau, self._P, self._Q, self._R[0], self._R[1], self._draws,
                                 self._G2, self._dcoef))

    def call(self, tau: float):
        self._close()
        self._start(float(tau))

    def finish(self) -> list[Stage]:
        self._close()
        stages, self.stages = self.stages, []
        return stages


def _check_step_args(u, eps, seeds, coef):
    if not isinstance(u, torch.Tensor) or u.dim() < 2 or u.shape[1] % 2:
        raise ValueError(f"affine_step: u must be a (B, 2C, ...) tensor, got shape {tuple(getattr(u, 'shape', ()))}")
    if eps is not None and eps.shape != u.shape:
        raise ValueError(f"affine_step: eps shape {tuple(eps.shape)} != u shape {tuple(u.shape)}")
    if seeds.dim() != 1 or seeds.shape[0] != u.shape[0] or seeds.dtype != torch.int64:
        raise ValueError(f"affine_step: seeds must be int64 of shape ({u.shape[0]},), "
                         f"got {seeds.dtype} {tuple(seeds.shape)}")
    if len(coef) != 16:
        raise ValueError(f"affine_step: coef must hold 16 numbers, got {len(coef)}")


def affine_step_reference(u: torch.Tensor, eps: torch.Tensor | None, seeds: torch.Tensor,
                          coef, step: int, stream: int = 0) -> torch.Tensor:
    """Pure-PyTorch definition of the fused op; returns the new state (does not mutate ``u``).

    Args:
        u: (B, 2C, ...) packed state ``cat(x, m)``; float16/bfloat16/float32/float64.
        eps: network output of ``u``'s shape (any float dtype) or None (then Q is ignored).
        seeds: (B,) int64 per-sample seeds (Philox keys).
        coef: 16 numbers in :data:`COEF_LAYOUT` order.
        step, stream: Philox counter words 1 and 2.
    Math is float32 (float64 for a float64 state); the normals are always float32 Philox/Box-Muller.
    If all four P coefficients are 0 the old state is not read (it may hold garbage).
    """
    _check_step_args(u, eps, seeds, coef)
    xn, mn = _step_halves(u, eps, seeds, coef, step, stream)
    return torch.cat([xn, mn], dim=1).to(u.dtype)


#: Order of the multistep op's 6 numbers ``ms`` (``psld_fast::ms_step_``): ``Stage.G2`` then ``Stage.dcoef``.
MS_COEF_LAYOUT = ("g0", "g1", "a0", "a1", "c0", "c1")


def _check_dbuf(u, dbuf, op):
    half = (u.shape[0], u.shape[1] // 2, *u.shape[2:])
    if not isinstance(dbuf, torch.Tensor) or tuple(dbuf.shape) != half:
        raise ValueError(f"{op}: dbuf must have the shape of one half of u {half}, "
                         f"got {tuple(getattr(dbuf, 'shape', ()))}")
    if not dbuf.is_floating_point():
        raise ValueError(f"{op}: dbuf must be a float tensor, got {dbuf.dtype}")


def ms_estimate(u: torch.Tensor, eps: torch.Tensor | None, dcoef, dtype=None) -> torch.Tensor:
    """A call's data estimate ``D = (a0 x + a1 m) + (c0 eps_x + c1 eps_m)`` (``Stage.dcoef``) of the
    state at the call, in ``dtype`` (default: the compute dtype, float32; float64 for a float64
    state), with the multistep kernels' order of operations; the state is not read when a0 = a1 = 0
    (it may hold garbage there, as for the kernels)."""
    ct = dtype or (torch.float64 if u.dtype == torch.float64 else torch.float32)
    C = u.shape[1] // 2
    a0, a1, c0, c1 = (float(v) for v in dcoef)
    d = torch.zeros((u.shape[0], C, *u.shape[2:]), dtype=ct, device=u.device)
    if a0 != 0.0 or a1 != 0.0:
        d = a0 * u[:, :C].to(ct) + a1 * u[:, C:].to(ct)
    if eps is not None:
        d = d + (c0 * eps[:, :C].to(ct) + c1 * eps[:, C:].to(ct))
    return d


def ms_step_reference(u: torch.Tensor, eps: torch.Tensor | None, dbuf: torch.Tensor, seeds: torch.Tensor,
                      coef, ms, record: bool, step: int, stream: int = 0):
    """Pure-PyTorch definition of the multistep op; returns ``(new u, new dbuf)``, mutating nothing.

    The plain step (:func:`affine_step_reference`) plus the previous call's data estimate
    ``D_prev = dbuf`` (one half's shape): ``x' += g0 D_prev``, ``m' += g1 D_prev`` after the noise
    term, in the compute dtype, before the rounding to u's dtype.  With ``record`` the new dbuf is this
    call's ``D = (a0 x + a1 m) + (c0 eps_x + c1 eps_m)`` of the state and eps before the step (in the
    compute dtype, stored as dbuf's dtype); without, dbuf is returned unchanged.  ``ms`` holds
    ``g0 g1 a0 a1 c0 c1`` (:data:`MS_COEF_LAYOUT`).  g0 = g1 = 0: dbuf is not read."""
    _check_step_args(u, eps, seeds, coef)
    if len(ms) != 6:
        raise ValueError(f"ms_step: ms must hold 6 numbers {MS_COEF_LAYOUT}, got {len(ms)}")
    xn, mn, d_new = _ms_halves(u, eps, dbuf, seeds, coef, ms, record, step, stream, "ms_step")
    return torch.cat([xn, mn], dim=1).to(u.dtype), d_new


def _ms_halves(u, eps, dbuf, seeds, coef, ms, record, step, stream, op):
    """The new halves (compute dtype) and the new dbuf of the multistep op."""
    _check_dbuf(u, dbuf, op)
    g0, g1, a0, a1, c0, c1 = (float(v) for v in ms)
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    d_new = dbuf
    if record:
        if eps is None and (c0 != 0.0 or c1 != 0.0):
            raise ValueError(f"{op}: record=True with eps coefficients c0, c1 needs eps")
        d_new = ms_estimate(u, eps, (a0, a1, c0, c1), ct).to(dbuf.dtype)
    xn, mn = _step_halves(u, eps, seeds, coef, step, stream)
    if g0 != 0.0 or g1 != 0.0:
        dp = dbuf.to(ct)
        xn, mn = xn + g0 * dp, mn + g1 * dp
    return xn, mn, d_new


def lifted_ms_step_reference(u: torch.Tensor, d: torch.Tensor | None, y: torch.Tensor | None, dbuf: torch.Tensor,
                             seeds: torch.Tensor, coef, ms, record: bool, step: int, stream: int = 0):
    """Pure-PyTorch definition of the lifted multistep op; returns ``(new u, new y or None, new dbuf)``.

    :func:`lifted_step_reference` plus ``x' += g0 D_prev``, ``m' += g1 D_prev`` (``ms = (g0, g1)``)
    before y is formed from the new halves; with ``record`` the new dbuf is ``d``, the call's data
    estimate itself."""
    if len(ms) != 2:
        raise ValueError(f"lifted_ms_step: ms must hold 2 numbers (g0, g1), got {len(ms)}")
    if record and d is None:
        raise ValueError("lifted_ms_step: record=True needs d (the call's data estimate)")
    plain, eps = _check_lifted_args(u, d, y, seeds, coef)
    ms6 = [float(ms[0]), float(ms[1]), 0.0, 0.0, 1.0, 0.0]
    xn, mn, d_new = _ms_halves(u, eps, dbuf, seeds, plain, ms6, record, step, stream, "lifted_ms_step")
    y_new = None if y is None else (float(coef[14]) * xn + float(coef[15]) * mn).to(u.dtype)
    return torch.cat([xn, mn], dim=1).to(u.dtype), y_new, d_new


def run_stages_reference(eps_fn, program: Program, seeds: torch.Tensor, shape, dtype=torch.float64) -> torch.Tensor:
    """Run a program's stages with :func:`affine_step_reference` and :func:`ms_step_reference` (the
    definitions every fused loop implements); ``eps_fn(u, tau) -> eps`` with tau a float.  The state
    starts as NaN: stage 0 must not read it.  Returns the final packed state."""
    B = seeds.shape[0]
    u = torch.full((B, 2 * shape[0], *shape[1:]), float("nan"), dtype=dtype)
    dbuf = torch.zeros((B, *shape), dtype=dtype)
    for k, st in enumerate(program.stages):
        eps = eps_fn(u, st.tau) if st.uses_network else None
        if st.is_multistep:
            u, dbuf = ms_step_reference(u, eps, dbuf, seeds, st.coef, st.ms, st.records, k)
        else:
            u = affine_step_reference(u, eps, seeds, st.coef, k)
    return u


def _step_halves(u, eps, seeds, coef, step, stream):
    """The new x and m halves of the plain step in the compute dtype (float32, float64 for float64)."""
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    B, C2 = u.shape[0], u.shape[1]
    C = C2 // 2
    c = [float(v) for v in coef]
    P00, P01, P10, P11, Q00, Q01, Q10, Q11 = c[:8]
    R = c[8:]
    if P00 == P01 == P10 == P11 == 0.0:
        x = m = torch.zeros((), dtype=ct, device=u.device)
    else:
        x = u[:, :C].to(ct)
        m = u[:, C:].to(ct)
    xn = P00 * x + P01 * m
    mn = P10 * x + P11 * m
    if eps is not None:
        ex = eps[:, :C].to(ct)
        em = eps[:, C:].to(ct)
        xn = xn + (Q00 * ex + Q01 * em)
        mn = mn + (Q10 * ex + Q11 * em)
    if any(r != 0.0 for r in R):
        half_shape = (B, C, *u.shape[2:])
        numel = int(np.prod(half_shape[1:]))
        n = [t.reshape(half_shape).to(ct) for t in philox_normals(seeds.to(u.device), numel, step, stream)]
        xn = xn + (R[0] * n[0] + R[1] * n[1] + R[4] * n[2] + R[5] * n[3])
        mn = mn + (R[2] * n[0] + R[3] * n[1] + R[6] * n[2] + R[7] * n[3])
    xn = xn.expand(B, C, *u.shape[2:])
    mn = mn.expand(B, C, *u.shape[2:])
    return xn, mn


#: Order of the lifted op's 16 coefficients (``psld_fast::lifted_step_``).
LIFTED_COEF_LAYOUT = ("P00", "P01", "P10", "P11", "G0", "G1",
                      "R1_00", "R1_01", "R1_10", "R1_11", "R2_00", "R2_01", "R2_10", "R2_11", "W0", "W1")


def lifted_plain_coef(coef) -> list[float]:
    """The 16 plain-step coefficients equivalent to 16 lifted ones (Q = [[G0, 0], [G1, 0]])."""
    c = [float(v) for v in coef]
    return c[0:4] + [c[4], 0.0, c[5], 0.0] + c[6:14]


def lifted_step_reference(u: torch.Tensor, d: torch.Tensor | None, y: torch.Tensor | None,
                          seeds: torch.Tensor, coef, step: int, stream: int = 0):
    """Pure-PyTorch definition of the lifted op; returns ``(new u, new y or None)``, mutating nothing.

    The plain step with ``eps = (d, d)`` and ``Q = [[G0, 0], [G1, 0]]`` (so x' gets ``G0 d``, m'
    ``G1 d``), plus ``y = W0 x' + W1 m'`` from the new halves in the compute dtype, then rounded to
    u's dtype: the next denoiser call's input.  d and y have the shape of one half of u.
    """
    plain, eps = _check_lifted_args(u, d, y, seeds, coef)
    xn, mn = _step_halves(u, eps, seeds, plain, step, stream)
    y_new = None
    if y is not None:
        y_new = (float(coef[14]) * xn + float(coef[15]) * mn).to(u.dtype)
    return torch.cat([xn, mn], dim=1).to(u.dtype), y_new


def _check_lifted_args(u, d, y, seeds, coef):
    """Validates the lifted op's arguments; returns the equivalent plain coefficients and eps = (d, d)."""
    if len(coef) != 16:
        raise ValueError(f"lifted_step: coef must hold 16 numbers {LIFTED_COEF_LAYOUT}, got {len(coef)}")
    half = (u.shape[0], u.shape[1] // 2, *u.shape[2:])
    for name, t in (("d", d), ("y", y)):
        if t is not None and tuple(t.shape) != half:
            raise ValueError(f"lifted_step: {name} must have the shape of one half of u {half}, got {tuple(t.shape)}")
    plain = lifted_plain_coef(coef)
    eps = None if d is None else torch.cat([d, d], dim=1)
    _check_step_args(u, eps, seeds, plain)
    return plain, eps
