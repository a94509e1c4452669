"""The PSLD forward process (Pandey & Mandt, ICCV 2023) in closed form.

Everything here is per-coordinate 2x2 algebra on (x, m) and is evaluated in float64 on the host:
samplers fold these numbers into the coefficients of their affine stages, so the accuracy of the
whole library rests on this file.  Spec: ``spec/psld-samplers.md`` sections 1 and 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["PSLD", "HSM_JITTER"]

#: The PSLD code adds this to both diagonal entries of the initial (x0, m0) covariance.
HSM_JITTER = 1e-9


@dataclass(frozen=True)
class PSLD:
    """Phase Space Langevin Diffusion with critical damping.

    ``dz = beta(tau) F z dtau + sqrt(beta(tau)) Dh dw`` with ``z = (x, m)``,
    ``F = 1/2 [[-Gamma, Minv], [-1, -nu]]``, ``Dh = diag(sqrt(Gamma), sqrt(M nu))`` and the critical
    damping ``Minv = (Gamma - nu)^2 / 4``.  ``gamma = 0`` is CLD.

    Args:
        gamma: friction on the data coordinate (``Gamma >= 0``).
        nu: friction on the momentum (``nu > 0``, ``nu != gamma``).
        kappa: initial momentum variance factor, ``m0 ~ N(0, kappa * M)``.
        beta_min, beta_max: linear noise schedule ``beta(tau) = beta_min + tau (beta_max - beta_min)``.
        T: final forward time.
        eps_end: forward time at which sampling stops before the final denoising step.
    """

    gamma: float = 0.01
    nu: float = 4.01
    kappa: float = 0.04
    beta_min: float = 8.0
    beta_max: float = 8.0
    T: float = 1.0
    eps_end: float = 1e-3
    _derived: dict = field(init=False, repr=False, compare=False, hash=False, default=None)

    def __post_init__(self):
        for name in ("gamma", "nu", "kappa", "beta_min", "beta_max", "T", "eps_end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"PSLD: {name} must be a finite number, got {value!r}")
        if self.gamma < 0:
            raise ValueError(f"PSLD: gamma must be >= 0 (gamma = 0 is CLD), got {self.gamma}")
        if self.nu <= 0:
            raise ValueError(f"PSLD: nu must be > 0, got {self.nu}")
        if self.gamma == self.nu:
            raise ValueError("PSLD: gamma == nu gives Minv = (gamma - nu)^2 / 4 = 0 (infinite mass); "
                             "critical damping needs gamma != nu")
        if self.kappa <= 0:
            raise ValueError(f"PSLD: kappa must be > 0, got {self.kappa}")
        if self.beta_min <= 0 or self.beta_max <= 0:
            raise ValueError(f"PSLD: beta_min and beta_max must be > 0, got {self.beta_min}, {self.beta_max}")
        if self.T <= 0:
            raise ValueError(f"PSLD: T must be > 0, got {self.T}")
        if not 0 < self.eps_end < self.T:
            raise ValueError(f"PSLD: eps_end must lie in (0, T={self.T}), got {self.eps_end}")
        minv = (self.gamma - self.nu) ** 2 / 4.0
        object.__setattr__(self, "_derived", {"Minv": minv, "M": 1.0 / minv})

    # ----------------------------------------------------------------------------------- constants
    @property
    def Minv(self) -> float:
        """Inverse mass ``(Gamma - nu)^2 / 4`` (critical damping)."""
        return self._derived["Minv"]

    @property
    def M(self) -> float:
        """Mass ``1 / Minv``; the stationary momentum variance."""
        return self._derived["M"]

    @property
    def is_cld(self) -> bool:
        return self.gamma == 0.0

    @property
    def Sinf(self) -> np.ndarray:
        """Stationary covariance ``diag(1, M)``."""
        return np.diag([1.0, self.M])

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("gamma", "nu", "kappa", "beta_min", "beta_max", "T", "eps_end")}

    # -------------------------------------------------------------------------------- noise schedule
    def beta(self, tau: float) -> float:
        """``beta(tau) = beta_min + tau (beta_max - beta_min)``."""
        return self.beta_min + tau * (self.beta_max - self.beta_min)

    def b(self, tau: float) -> float:
        """Integrated schedule ``b(tau) = int_0^tau beta``."""
        return self.beta_min * tau + 0.5 * tau * tau * (self.beta_max - self.beta_min)

    # ------------------------------------------------------------------------------------ transition
    def P(self, b: float) -> np.ndarray:
        """Transition matrix ``exp(b F)`` over integrated beta ``b`` (valid for any real b)."""
        lbar = (self.gamma + self.nu) / 4.0
        a = (self.nu - self.gamma) / 4.0
        c = self.Minv / 2.0
        return math.exp(-lbar * b) * np.array([[1.0 + a * b, c * b], [-0.5 * b, 1.0 - a * b]])

    def marginal_mean_matrix(self, tau: float) -> np.ndarray:
        """``E[z_tau] = P(b(tau)) mu0``."""
        return self.P(self.b(tau))

    def marginal_mean(self, tau: float, mu0) -> np.ndarray:
        """``E[z_tau] = P(b(tau)) mu0`` for a start mean ``mu0`` of shape (2,) or (2, ...)."""
        mu0 = np.asarray(mu0, dtype=np.float64)
        return np.tensordot(self.P(self.b(tau)), mu0, axes=1)

    def marginal_cov(self, tau: float, S0) -> np.ndarray:
        """``Cov[z_tau] = Sinf + P (S0 - Sinf) P^T`` for a Gaussian start with covariance ``S0``."""
        P = self.P(self.b(tau))
        S0 = np.asarray(S0, dtype=np.float64)
        return self.Sinf + P @ (S0 - self.Sinf) @ P.T

    def dsm_cov(self, tau: float, var_x0: float = 0.0) -> np.ndarray:
        """Covariance given a data point with variance ``var_x0`` (0 = DSM with known x0)."""
        return self.marginal_cov(tau, np.diag([var_x0, self.kappa * self.M]))

    def hsm_cov(self, tau: float) -> np.ndarray:
        """HSM covariance (x0 known, ``m0 ~ N(0, kappa M)``), with the PSLD code's 1e-9 jitter."""
        S0 = np.diag([HSM_JITTER, self.kappa * self.M + HSM_JITTER])
        return self.marginal_cov(tau, S0)

    def hsm_cholesky(self, tau: float) -> tuple[float, float, float]:
        """Lower Cholesky factor ``(l11, l21, l22)`` of the HSM covariance at ``tau``."""
        if tau <= 0:
            raise ValueError(f"hsm_cholesky: tau must be > 0 (the network is never called at 0), got {tau}")
        S = self.hsm_cov(tau)
        l11 = math.sqrt(S[0, 0])
        l21 = S[0, 1] / l11
        l22 = math.sqrt(S[1, 1] - l21 * l21)
        return l11, l21, l22

    def score_matrix(self, tau: float) -> np.ndarray:
        """``S`` with ``score = S @ eps``, i.e. ``S = -L^{-T}`` (spec 1.2)."""
        l11, l21, l22 = self.hsm_cholesky(tau)
        return -np.array([[1.0 / l11, -l21 / (l11 * l22)], [0.0, 1.0 / l22]])

    def eps_matrix(self, tau: float) -> np.ndarray:
        """``E`` with ``eps = E @ score``, i.e. ``E = -L^T``."""
        l11, l21, l22 = self.hsm_cholesky(tau)
        return -np.array([[l11, l21], [0.0, l22]])

    # ------------------------------------------------------------------------- tensor conversions
    def eps_to_score(self, eps: torch.Tensor, tau: float) -> torch.Tensor:
        """Packed eps (B, 2C, ...) -> packed score, at one forward time ``tau``."""
        return _apply_2x2(self.score_matrix(tau), eps)

    def score_to_eps(self, score: torch.Tensor, tau: float) -> torch.Tensor:
        """Packed score (B, 2C, ...) -> packed eps, at one forward time ``tau``."""
        return _apply_2x2(self.eps_matrix(tau), score)

    def prior_sample(self, shape, *, generator=None, dtype=torch.float64, device=None) -> torch.Tensor:
        """Packed draw from the prior ``x ~ N(0, I), m ~ N(0, M I)``; ``shape`` is the x shape (B, C, ...)."""
        shape = tuple(shape)
        z = torch.randn((shape[0], 2 * shape[1], *shape[2:]), generator=generator, dtype=dtype, device=device)
        z[:, shape[1]:] *= math.sqrt(self.M)
        return z

    # ---------------------------------------------------------------- reverse-time sub-step matrices
    def ou_half(self, d: float) -> tuple[np.ndarray, np.ndarray]:
        """SSCS's exact linear part A over integrated beta ``d``: ``z <- Mean z + Chol xi``.

        Mean = Sg P(d) Sg with Sg = diag(1, -1); noise covariance Sg (Sinf - P Sinf P^T) Sg.
        """
        Sg = np.diag([1.0, -1.0])
        P = self.P(d)
        mean = Sg @ P @ Sg
        cov = Sg @ (self.Sinf - P @ self.Sinf @ P.T) @ Sg
        return mean, chol2(cov)


def chol2(cov: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a 2x2 PSD matrix (zero-safe; no exception on a zero matrix)."""
    c00 = max(cov[0, 0], 0.0)
    l11 = math.sqrt(c00)
    l21 = cov[1, 0] / l11 if l11 > 0 else 0.0
    l22 = math.sqrt(max(cov[1, 1] - l21 * l21, 0.0))
    return np.array([[l11, 0.0], [l21, l22]])


def _apply_2x2(A: np.ndarray, z: torch.Tensor) -> torch.Tensor:
    C = z.shape[1] // 2
    x, m = z[:, :C], z[:, C:]
    return torch.cat([A[0, 0] * x + A[0, 1] * m, A[1, 0] * x + A[1, 1] * m], dim=1)
