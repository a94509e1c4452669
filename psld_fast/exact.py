"""Exact output laws of compiled programs on Gaussian data (closed-form moments, no Monte Carlo).

For data ``x0 ~ N(mu, diag(s^2))`` the PSLD score is affine in z per coordinate, so every stage
``z <- P z + Q eps(z) + R1 xi1 + R2 xi2`` maps a Gaussian (mean, 2x2 covariance) per coordinate to a
Gaussian.  Propagating the moments through a program gives the sampler's exact output law: the
oracle for convergence-order tests and for the error of each sampler at each NFE.
"""
from __future__ import annotations

import math

import numpy as np

from .program import Program
from .sde import PSLD

__all__ = ["gaussian_eps_affine", "program_output_moments", "gaussian_w2_1d", "sampler_error",
           "program_x_law", "RelativeEpsError", "stage_maps", "step_spectral_radii"]


def gaussian_eps_affine(sde: PSLD, tau: float, mu: np.ndarray, var: np.ndarray):
    """Exact eps of N(mu, var) data at forward time tau as ``eps = E z + e0`` per coordinate.

    Returns E with shape (D, 2, 2) and e0 with shape (D, 2).
    """
    P = sde.P(sde.b(tau))
    D = mu.shape[0]
    S0 = np.zeros((D, 2, 2))
    S0[:, 0, 0] = var
    S0[:, 1, 1] = sde.kappa * sde.M
    C = sde.Sinf + P @ (S0 - sde.Sinf) @ P.T           # (D, 2, 2)
    Cinv = np.linalg.inv(C)
    mean = np.stack([P[0, 0] * mu, P[1, 0] * mu], axis=1)  # (D, 2)
    Lt = -sde.eps_matrix(tau)                               # L^T
    E = Lt @ Cinv                                           # eps = L^T C^{-1} (z - mean)
    e0 = -np.einsum("dij,dj->di", E, mean)
    return E, e0


class RelativeEpsError:
    """A controlled network error that keeps the law Gaussian: ``eps_hat = (I + r(tau) U_d) eps*``.

    ``U_d`` is a fixed random 2x2 matrix per coordinate (entries N(0, 1/2), ``seed``), and the relative
    size ``r(tau) = r_data * exp(-tau / tau_scale) + r_noise`` grows towards the data end, as the
    error of a trained eps-network does (its targets are hardest at small tau).  Being multiplicative
    and linear in eps, it can be applied to any eps (exact Gaussian, mixture or network) per
    coordinate pair, and on Gaussian data the output law stays exactly computable.
    """

    def __init__(self, dim: int, r_data: float = 0.1, r_noise: float = 0.01, tau_scale: float = 0.1,
                 seed: int = 0):
        rng = np.random.default_rng(seed)
        self.U = rng.normal(0.0, math.sqrt(0.5), size=(int(dim), 2, 2))
        self.r_data, self.r_noise, self.tau_scale = float(r_data), float(r_noise), float(tau_scale)

    def r(self, tau: float) -> float:
        return self.r_data * math.exp(-tau / self.tau_scale) + self.r_noise

    def matrix(self, tau: float) -> np.ndarray:
        """(D, 2, 2) per-coordinate ``I + r(tau) U``."""
        return np.eye(2) + self.r(tau) * self.U

    def apply(self, eps, tau: float):
        """The erroneous eps for a packed (B, 2C, ...) tensor whose x half has D = C * ... elements."""
        import torch

        G = torch.as_tensor(self.matrix(tau), dtype=eps.dtype, device=eps.device)
        B, C2 = eps.shape[0], eps.shape[1]
        e = eps.reshape(B, 2, -1)                      # (B, 2, D)
        if e.shape[2] != G.shape[0]:
            raise ValueError(f"RelativeEpsError: built for {G.shape[0]} coordinates, eps has {e.shape[2]}")
        out = torch.einsum("dij,bjd->bid", G, e)
        return out.reshape(eps.shape)


def _stage_eps(stage, sde: PSLD, mu, var, eps_error, eps_affine):
    """The eps of a network stage as ``E z + e0`` per coordinate (see :func:`stage_maps`)."""
    if eps_affine is None:
        E, e0 = gaussian_eps_affine(sde, stage.tau, mu, var)
    else:
        E, e0 = eps_affine(stage.tau)
    if eps_error is not None:
        G = eps_error.matrix(stage.tau)
        E, e0 = G @ E, np.einsum("dij,dj->di", G, e0)
    return E, e0


def stage_maps(program: Program, sde: PSLD, mu, var, eps_error=None, eps_affine=None, drop_multistep: bool = False):
    """Per stage the affine map of the per-coordinate state on Gaussian data: ``z <- A z + b + noise``.

    Yields ``(A (D, 2, 2), b (D, 2), noise_cov (2, 2))``.  The eps of a network stage is the exact
    Gaussian eps (:func:`gaussian_eps_affine`) unless ``eps_affine(tau) -> (E (D, 2, 2), e0 (D, 2))``
    gives another eps that is affine in z (e.g. a lifted denoiser, :func:`psld_fast.lift.lifted_stage_maps`);
    ``eps_error`` (e.g. :class:`RelativeEpsError`) then replaces that eps by ``eps_error.matrix(tau) @ eps``.
    A multistep program's stages also read the previous call's data estimate, which 2x2 maps cannot
    hold: ValueError, unless ``drop_multistep=True`` asks for the maps with ``G2`` left out (then they
    are not the program's law); :func:`program_output_moments` propagates it through an augmented state.
    """
    if program.multistep and not drop_multistep:
        raise ValueError(f"stage_maps: {program.sampler} is a multistep program (its stages read the previous call's "
                         "data estimate); use program_output_moments / program_x_law for its law, or pass "
                         "drop_multistep=True for the maps without that term")
    mu = np.asarray(mu, dtype=np.float64).ravel()
    var = np.asarray(var, dtype=np.float64).ravel()
    D = mu.shape[0]
    for stage in program.stages:
        A = np.broadcast_to(stage.P, (D, 2, 2)).copy()
        b = np.zeros((D, 2))
        if stage.uses_network:
            E, e0 = _stage_eps(stage, sde, mu, var, eps_error, eps_affine)
            A = A + stage.Q @ E
            b = e0 @ stage.Q.T
        yield A, b, stage.R1 @ stage.R1.T + stage.R2 @ stage.R2.T


def _augmented_moments(program: Program, sde: PSLD, mu, var, eps_error, eps_affine):
    """Moments of a multistep program through the per-coordinate state ``(x, m, D_prev)`` (3-d): a
    network stage maps it to ``(P z + Q eps + G2 D_prev + noise, D)`` with ``eps = E z + e0`` and the
    recorded estimate ``D = a^T z + c^T eps`` (``Stage.dcoef``; D_prev kept where none is recorded)."""
    mu = np.asarray(mu, dtype=np.float64).ravel()
    var = np.asarray(var, dtype=np.float64).ravel()
    D = mu.shape[0]
    mean = np.zeros((D, 3))
    cov = np.zeros((D, 3, 3))
    for stage in program.stages:
        A = np.zeros((D, 3, 3))
        b = np.zeros((D, 3))
        A[:, :2, :2] = stage.P
        A[:, 2, 2] = 1.0
        if stage.uses_network:
            E, e0 = _stage_eps(stage, sde, mu, var, eps_error, eps_affine)
            A[:, :2, :2] += stage.Q @ E
            b[:, :2] = e0 @ stage.Q.T
            if stage.dcoef is not None:
                a, c = stage.dcoef[:2], stage.dcoef[2:]
                A[:, 2, :2] = a + np.einsum("j,djk->dk", c, E)
                A[:, 2, 2] = 0.0
                b[:, 2] = e0 @ c
        if stage.G2 is not None:
            A[:, :2, 2] = stage.G2
        noise = np.zeros((3, 3))
        noise[:2, :2] = stage.R1 @ stage.R1.T + stage.R2 @ stage.R2.T
        mean = np.einsum("dij,dj->di", A, mean) + b
        cov = A @ cov @ np.transpose(A, (0, 2, 1)) + noise
    return mean[:, :2], cov[:, :2, :2]


def program_output_moments(program: Program, sde: PSLD, mu, var, eps_error=None, eps_affine=None):
    """Exact per-coordinate mean (D, 2) and covariance (D, 2, 2) of a program's final state
    (with the exact eps, another affine eps ``eps_affine``, or the controlled error ``eps_error``;
    see :func:`stage_maps`)."""
    if program.multistep:
        return _augmented_moments(program, sde, mu, var, eps_error, eps_affine)
    D = np.asarray(mu).size
    mean = np.zeros((D, 2))
    cov = np.zeros((D, 2, 2))
    for A, b, noise in stage_maps(program, sde, mu, var, eps_error, eps_affine):
        mean = np.einsum("dij,dj->di", A, mean) + b
        cov = A @ cov @ np.transpose(A, (0, 2, 1)) + noise
    return mean, cov


def program_x_law(program: Program, sde: PSLD, mu, var, eps_error=None, eps_affine=None):
    """Per-coordinate mean and variance (each (D,)) of the program's output x."""
    mean, cov = program_output_moments(program, sde, mu, var, eps_error, eps_affine)
    return mean[:, 0], cov[:, 0, 0]


def step_spectral_radii(program: Program, sde: PSLD, var, evals_per_step: int = 1) -> np.ndarray:
    """Spectral radius of each grid step's deterministic map on centred Gaussian data N(0, diag(var)).

    The maps of ``evals_per_step`` consecutive network stages are multiplied (stage 0, the prior
    draw, and the final denoising stage are left out); returns an array (steps, D).  A radius above 1
    where the exact reverse flow contracts means the discretisation amplifies that direction.
    """
    var = np.asarray(var, dtype=np.float64).ravel()
    maps = [A for A, _, _ in stage_maps(program, sde, np.zeros_like(var), var)][1:]
    if program.info.get("denoise", True):
        maps = maps[:-1]
    radii = []
    for i in range(0, len(maps) - evals_per_step + 1, evals_per_step):
        M = np.broadcast_to(np.eye(2), maps[i].shape).copy()
        for A in maps[i:i + evals_per_step]:
            M = A @ M
        radii.append(np.abs(np.linalg.eigvals(M)).max(axis=-1))
    return np.array(radii)


def gaussian_w2_1d(m1, v1, m2, v2) -> float:
    """W2 between two diagonal Gaussians given per-coordinate means and variances."""
    m1, v1, m2, v2 = (np.asarray(a, dtype=np.float64) for a in (m1, v1, m2, v2))
    return float(math.sqrt(np.sum((m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2)))


def sampler_error(program: Program, sde: PSLD, mu, var) -> float:
    """Exact W2 distance between the program's x-law and the data law N(mu, diag(var))."""
    mean, cov = program_output_moments(program, sde, mu, var)
    return gaussian_w2_1d(mean[:, 0], cov[:, 0, 0], np.ravel(mu), np.ravel(var))
