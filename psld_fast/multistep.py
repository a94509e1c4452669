"""Data-prediction exponential integrators for PSLD: ``ei_x0``, ``ei_2m``, ``ei_2m_sde`` (issue 21).

Given the data estimate ``D = E[x0 | z]`` of a network call, the PSLD score is
``s = -Sigma^-1 (z - mu D)`` (Sigma the HSM covariance without jitter, mu = the first column of
P(b(tau)); see :mod:`psld_fast.lift`), so the reverse-time family

    dz = [beta F z - (1 + lam^2)/2 beta Dh^2 s] dtau + lam sqrt(beta) Dh dw      (tau decreasing)

is *linear in z* with a forcing that is linear in D:

    dz/dtau = L(tau) z + g(tau) D,  L = beta F + c beta Dh^2 Sigma^-1,  g = -c beta Dh^2 Sigma^-1 mu,
    c = (1 + lam^2) / 2  (lam = 0: the probability-flow ODE; lam = 1: the reverse SDE).

An exponential integrator solves the linear part exactly and models only D over a step.  D is what
varies slowly (a constant for a single data point, where the first-order step is exact), the
counterpart of DPM-Solver++'s data prediction; the eps-parametrised exponential integrator
(``ci_ei``) freezes eps instead, which PSLD's fast-changing eps punishes (ci_ei at NFE 20 on the
16-d Gaussian: 0.97 exact W2).  Over ``tau_n -> tau_next``:

    z_next = Phi z_n + J0 D_n + J1 (D_n - D_prev) + noise,  noise ~ N(0, C)

with ``Phi``, ``J0 = int Phi(., s) g(s) ds``, ``J1`` the same integral weighted by
``r(s) = (v(s) - v_n) / (v_n - v_prev)`` (D extrapolated linearly in the variable ``v``,
:data:`MS_VARIABLES`, through the last two calls: the Adams-Bashforth correction of DPM-Solver++(2M))
and ``C`` the exact noise covariance of the linear part (``lam > 0``).  All are solved here once per
program in float64 by RK4 in ``u = sqrt(tau)`` (the variable in which Sigma(tau) is smooth at the data
end), with enough sub-steps that the quadrature error is far below any sampler's error
(:data:`RK4_DU`; checked against closed forms and by doubling in the tests).

For a native PSLD eps network the data estimate of a call is affine in the state and the network
output, ``D = a^T z + c^T eps`` per coordinate (:func:`denoiser_coef`, Tweedie in the augmented
space, the same estimate as :func:`psld_fast.lift.x0_from_eps`); a lifted denoiser returns D itself.
"""
from __future__ import annotations

import math

import numpy as np

from .sde import PSLD

__all__ = ["MS_VARIABLES", "exact_hsm_cov", "sigma_y", "denoiser_coef", "ms_variable",
           "ei_transition", "RK4_DU", "RK4_DU_REL", "RK4_MIN_SUBSTEPS", "rk4_substeps"]

#: The variables a multistep sampler may extrapolate D in (``ms_variable``): forward time, its
#: square root (the quadrature variable), the integrated schedule b(tau) ("rho") and the log of the
#: position-space noise level sigma_y (DPM-Solver++'s choice: its lambda = -log sigma for VE).
MS_VARIABLES = ("tau", "sqrt_tau", "rho", "log_sigma")

#: RK4 sub-steps in ``u = sqrt(tau)``: at most :data:`RK4_DU` wide, at most :data:`RK4_DU_REL` times the
#: step's smaller u (the linear part is stiff like 1/tau at the data end) and at least
#: :data:`RK4_MIN_SUBSTEPS` per grid step.  Measured against the closed-form point-mass marginals (tests/test_multistep.py):
#: fourth order, 3e-9 relative at du = 0.002 on the largest steps of a 10-NFE grid (1.2e-5 with 16
#: uniform sub-steps there, which already left every sampler's exact W2 unchanged to 6 digits).
RK4_DU = 0.002
RK4_DU_REL = 0.02
RK4_MIN_SUBSTEPS = 8


def rk4_substeps(tau_n: float, tau_next: float) -> int:
    """The default number of RK4 sub-steps of :func:`ei_transition` over ``tau_n -> tau_next``."""
    u0, u1 = math.sqrt(tau_n), math.sqrt(tau_next)
    return max(RK4_MIN_SUBSTEPS, math.ceil((u0 - u1) / min(RK4_DU, RK4_DU_REL * u1)))


def exact_hsm_cov(sde: PSLD, tau: float) -> np.ndarray:
    """The HSM covariance of z given x0 at ``tau`` without the 1e-9 jitter (the data law's score)."""
    return sde.marginal_cov(tau, np.diag([0.0, sde.kappa * sde.M]))


def sigma_y(sde: PSLD, tau: float) -> float:
    """``(mu^T Sigma^-1 mu)^(-1/2)``: the noise level of the position-space variable y (host math)."""
    mu = sde.P(sde.b(tau))[:, 0]
    return 1.0 / math.sqrt(float(mu @ np.linalg.solve(exact_hsm_cov(sde, tau), mu)))


def denoiser_coef(sde: PSLD, tau: float) -> np.ndarray:
    """``(a0, a1, c0, c1)`` with ``D = a0 x + a1 m + c0 eps_x + c1 eps_m``: the x0 estimate
    ``w^T (z + Sigma s)`` of an eps-network call at ``tau``, ``s = S eps`` (S = -L^-T of the jittered
    Cholesky factor, the eps convention), ``w = Sigma^-1 mu / (mu^T Sigma^-1 mu)``."""
    mu = sde.P(sde.b(tau))[:, 0]
    Sig = exact_hsm_cov(sde, tau)
    a = np.linalg.solve(Sig, mu)
    w = a / float(mu @ a)
    c = (w @ Sig) @ sde.score_matrix(tau)
    return np.concatenate([w, c])


def ms_variable(sde: PSLD, name: str, tau: float) -> float:
    """The value at ``tau`` of the extrapolation variable ``name`` (:data:`MS_VARIABLES`)."""
    if name == "tau":
        return float(tau)
    if name == "sqrt_tau":
        return math.sqrt(tau)
    if name == "rho":
        return sde.b(tau)
    if name == "log_sigma":
        return math.log(sigma_y(sde, tau))
    raise ValueError(f"unknown ms_variable {name!r}; choose one of {MS_VARIABLES}")


def _terms(sde: PSLD, c: float, tau: float):
    """``L(tau)`` (2x2) and ``g(tau)`` (2,) of the linear ODE, and ``beta Dh^2`` (2x2)."""
    beta = sde.beta(tau)
    F = 0.5 * np.array([[-sde.gamma, sde.Minv], [-1.0, -sde.nu]])
    Dh2 = np.array([[sde.gamma, 0.0], [0.0, sde.M * sde.nu]])
    P = sde.P(sde.b(tau))
    kM = sde.kappa * sde.M
    # Sigma = Sinf + P (diag(0, kappa M) - Sinf) P^T, and its inverse, written out (the hot loop)
    s00 = 1.0 - P[0, 0] ** 2 + (kM - sde.M) * P[0, 1] ** 2
    s01 = -P[0, 0] * P[1, 0] + (kM - sde.M) * P[0, 1] * P[1, 1]
    s11 = sde.M - P[1, 0] ** 2 + (kM - sde.M) * P[1, 1] ** 2
    det = s00 * s11 - s01 * s01
    Sinv = np.array([[s11, -s01], [-s01, s00]]) / det
    K = beta * Dh2 @ Sinv
    return beta * F + c * K, -c * (K @ P[:, 0]), beta * Dh2


def ei_transition(sde: PSLD, tau_n: float, tau_next: float, *, lam: float = 0.0, weights=(),
                  substeps: int | None = None):
    """The exact linear part of one step ``tau_n -> tau_next`` (< tau_n) of the lam-family above.

    ``weights``: functions ``w(tau)``; for each the integral ``J_w = int Phi(tau_next, s) g(s) w(s) ds``
    over the step (the coefficient of a D that varies as ``w`` over it).  Returns ``(Phi (2, 2),
    J (len(weights), 2), C (2, 2))`` with C the covariance the noise adds over the step (0 for lam = 0).
    ``substeps``: RK4 steps (default :func:`rk4_substeps`).
    """
    if not 0 < tau_next < tau_n:
        raise ValueError(f"ei_transition: need 0 < tau_next < tau_n, got {tau_next}, {tau_n}")
    c = (1.0 + lam * lam) / 2.0
    lam2 = lam * lam
    nw = len(weights)

    def deriv(u, Phi, J, C):
        tau = u * u
        L, g, BD = _terms(sde, c, tau)
        dPhi = L @ Phi
        dJ = J @ L.T + np.outer([w(tau) for w in weights], g) if nw else J
        dC = L @ C + C @ L.T - lam2 * BD
        return 2 * u * dPhi, 2 * u * dJ, 2 * u * dC

    u0, u1 = math.sqrt(tau_n), math.sqrt(tau_next)
    if substeps is None:
        substeps = rk4_substeps(tau_n, tau_next)
    h = (u1 - u0) / substeps
    Phi, J, C = np.eye(2), np.zeros((nw, 2)), np.zeros((2, 2))
    u = u0
    for _ in range(substeps):
        k1 = deriv(u, Phi, J, C)
        k2 = deriv(u + h / 2, *(a + h / 2 * k for a, k in zip((Phi, J, C), k1)))
        k3 = deriv(u + h / 2, *(a + h / 2 * k for a, k in zip((Phi, J, C), k2)))
        k4 = deriv(u + h, *(a + h * k for a, k in zip((Phi, J, C), k3)))
        Phi, J, C = (a + h / 6 * (q1 + 2 * q2 + 2 * q3 + q4)
                     for a, q1, q2, q3, q4 in zip((Phi, J, C), k1, k2, k3, k4))
        u += h
    return Phi, J, 0.5 * (C + C.T)
