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

__all__ = ["gaussian_eps_affine", "program_output_moments", "gaussian_w2_1d", "sampler_error"]


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


def program_output_moments(program: Program, sde: PSLD, mu, var):
    """Exact per-coordinate mean (D, 2) and covariance (D, 2, 2) of a program's final state."""
    mu = np.asarray(mu, dtype=np.float64).ravel()
    var = np.asarray(var, dtype=np.float64).ravel()
    D = mu.shape[0]
    mean = np.zeros((D, 2))
    cov = np.zeros((D, 2, 2))
    for stage in program.stages:
        A = np.broadcast_to(stage.P, (D, 2, 2)).copy()
        b = np.zeros((D, 2))
        if stage.uses_network:
            E, e0 = gaussian_eps_affine(sde, stage.tau, mu, var)
            A = A + stage.Q @ E
            b = e0 @ stage.Q.T
        noise = stage.R1 @ stage.R1.T + stage.R2 @ stage.R2.T
        mean = np.einsum("dij,dj->di", A, mean) + b
        cov = A @ cov @ np.transpose(A, (0, 2, 1)) + noise
    return mean, cov


def gaussian_w2_1d(m1, v1, m2, v2) -> float:
    """W2 between two diagonal Gaussians given per-coordinate means and variances."""
    m1, v1, m2, v2 = (np.asarray(a, dtype=np.float64) for a in (m1, v1, m2, v2))
    return float(math.sqrt(np.sum((m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2)))


def sampler_error(program: Program, sde: PSLD, mu, var) -> float:
    """Exact W2 distance between the program's x-law and the data law N(mu, diag(var))."""
    mean, cov = program_output_moments(program, sde, mu, var)
    return gaussian_w2_1d(mean[:, 0], cov[:, 0, 0], np.ravel(mu), np.ravel(var))
