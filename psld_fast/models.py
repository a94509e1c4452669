"""Models the samplers run: user networks, score adapters and analytic Gaussian mixtures.

The PSLD convention is an eps network ``net(u, tau) -> eps`` with ``u = cat(x, m)`` on dim 1 and
forward time ``tau`` of shape (B,).  :class:`EpsModel` carries such a network together with its
process (:class:`~psld_fast.sde.PSLD`) and the shape of one data sample, which is all ``sample``
needs.  :class:`GaussianMixture` computes the exact eps of a Gaussian-mixture data law (spec 1.3):
the test oracle, and with the shipped digits the embedded default model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .sde import HSM_JITTER, PSLD

__all__ = ["EpsModel", "ScoreModelAdapter", "GaussianMixture", "PRESETS", "get_preset", "as_shape",
           "hsm_cholesky_tensor"]


def as_shape(shape, what: str = "shape") -> tuple[int, ...]:
    """The shape of one data sample as a tuple of ints >= 1 (an int n means (n,)); ValueError naming
    ``what`` otherwise (a zero or negative size would only fail later, deep in an allocation, or give
    an empty result)."""
    import operator

    try:
        dims = (operator.index(shape),)
    except TypeError:
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError:
            raise ValueError(f"{what}={shape!r}: give the shape of one sample as a tuple of ints, e.g. (3, 32, 32)") from None
    if not dims or any(isinstance(d, bool) or d < 1 for d in dims):
        raise ValueError(f"{what}={tuple(dims)}: every size of one sample's shape must be an integer >= 1")
    return tuple(int(d) for d in dims)


class EpsModel(nn.Module):
    """An eps-parameterised PSLD network with its process and data shape.

    Args:
        net: callable ``net(u, tau) -> eps``; u (B, 2C, ...), tau (B,) forward times, eps like u.
        sde: the PSLD process the network was trained for (default ``PSLD()``).
        shape: shape of one data sample x, e.g. (3, 32, 32) (u then has 2C channels).
    """

    def __init__(self, net, sde: PSLD | None = None, shape=None, name: str | None = None):
        super().__init__()
        self.net = net
        self.sde = sde if sde is not None else PSLD()
        shape = shape if shape is not None else getattr(net, "data_shape", None)
        self.shape = as_shape(shape) if shape is not None else None
        self.name = name or type(net).__name__

    def forward(self, u: torch.Tensor, tau: torch.Tensor, **extra_args) -> torch.Tensor:
        return self.net(u, tau, **extra_args) if extra_args else self.net(u, tau)


def hsm_cholesky_tensor(sde: PSLD, tau: torch.Tensor):
    """Per-element HSM Cholesky factors (l11, l21, l22) for a tensor of forward times (float64)."""
    tau = tau.to(torch.float64)
    b = sde.beta_min * tau + 0.5 * tau * tau * (sde.beta_max - sde.beta_min)
    p = _transition_entries(sde, b)
    s0x, s0m = HSM_JITTER, sde.kappa * sde.M + HSM_JITTER
    c00, c01, c11 = _cov_entries(sde, p, s0x, s0m)
    l11 = torch.sqrt(c00)
    l21 = c01 / l11
    l22 = torch.sqrt(c11 - l21 * l21)
    return l11, l21, l22


def _transition_entries(sde: PSLD, b: torch.Tensor):
    lbar = (sde.gamma + sde.nu) / 4.0
    a = (sde.nu - sde.gamma) / 4.0
    c = sde.Minv / 2.0
    e = torch.exp(-lbar * b)
    return e * (1 + a * b), e * (c * b), e * (-0.5 * b), e * (1 - a * b)


def _cov_entries(sde: PSLD, p, s0x, s0m):
    """Entries of ``Sinf + P (diag(s0x, s0m) - Sinf) P^T`` (broadcasting)."""
    p00, p01, p10, p11 = p
    dx, dm = s0x - 1.0, s0m - sde.M
    c00 = 1.0 + p00 * p00 * dx + p01 * p01 * dm
    c01 = p00 * p10 * dx + p01 * p11 * dm
    c11 = sde.M + p10 * p10 * dx + p11 * p11 * dm
    return c00, c01, c11


def _expand_tau(tau, u: torch.Tensor) -> torch.Tensor:
    tau = torch.as_tensor(tau, device=u.device)
    if tau.dim() == 0:
        tau = tau.expand(u.shape[0])
    return tau


class ScoreModelAdapter(EpsModel):
    """Wraps a score network ``score_net(u, tau) -> score`` as an eps model: ``eps = -L^T score``."""

    def forward(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        score = self.net(u, tau)
        l11, l21, l22 = hsm_cholesky_tensor(self.sde, _expand_tau(tau, u))
        shape = (-1,) + (1,) * (u.dim() - 1)
        l11, l21, l22 = (v.reshape(shape).to(score.dtype) for v in (l11, l21, l22))
        C = u.shape[1] // 2
        sx, sm = score[:, :C], score[:, C:]
        return torch.cat([-(l11 * sx + l21 * sm), -l22 * sm], dim=1)


class GaussianMixture(EpsModel):
    """Exact eps of the PSLD marginals of ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` (spec 1.3).

    Args:
        means: (K, *shape) component means.
        stds: (K,) or (K, *shape) component standard deviations (> 0).
        weights: (K,) mixture weights (normalised here); default uniform.
        sde: the PSLD process.
    Computed in float64 whatever the input dtype; eps is returned in u's dtype.
    """

    def __init__(self, means, stds, weights=None, sde: PSLD | None = None, name: str = "gaussian_mixture"):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError(f"GaussianMixture: means must be (K, *shape), got shape {tuple(means.shape)}")
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.shape == (K,):
            stds = stds.reshape(K, *([1] * (means.dim() - 1))).expand_as(means)
        if stds.shape != means.shape:
            raise ValueError(f"GaussianMixture: stds must be (K,) or (K, *shape) = {tuple(means.shape)}, "
                             f"got {tuple(stds.shape)}")
        if not torch.all(stds > 0):
            raise ValueError("GaussianMixture: every std must be > 0")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not torch.all(weights > 0):
            raise ValueError(f"GaussianMixture: weights must be {K} positive numbers")
        super().__init__(net=None, sde=sde, shape=tuple(means.shape[1:]), name=name)
        flat_vars = (stds * stds).reshape(K, -1)
        # isotropic components (one variance each) take a matmul fast path in score()
        self.isotropic = bool(torch.all(flat_vars == flat_vars[:, :1]))
        self.register_buffer("means", means.reshape(K, -1))
        self.register_buffer("vars", flat_vars)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def score(self, u: torch.Tensor, tau) -> torch.Tensor:
        """Exact score of the PSLD marginal at forward time tau (float64, shape of u)."""
        B, C = u.shape[0], u.shape[1] // 2
        tau = _expand_tau(tau, u).to(torch.float64)
        z = u.to(torch.float64).reshape(B, 2, -1)
        x, m = z[:, 0, None, :], z[:, 1, None, :]  # (B, 1, D)
        b = self.sde.beta_min * tau + 0.5 * tau * tau * (self.sde.beta_max - self.sde.beta_min)
        p = [v.reshape(B, 1, 1) for v in _transition_entries(self.sde, b)]
        mu = self.means.to(u.device)[None]  # (1, K, D)
        var = self.vars.to(u.device)[None]
        if self.isotropic:
            sx, sm = self._score_isotropic(x[:, 0], m[:, 0], p, mu[0], var[0, :, 0])
        else:
            c00, c01, c11 = _cov_entries(self.sde, p, var, self.sde.kappa * self.sde.M)
            det = c00 * c11 - c01 * c01
            dx, dm = x - p[0] * mu, m - p[2] * mu  # (B, K, D)
            gx = (c11 * dx - c01 * dm) / det  # C^{-1} (z - mean)
            gm = (c00 * dm - c01 * dx) / det
            logp = -0.5 * ((dx * gx + dm * gm) + torch.log(det)).sum(-1) + self.log_weights.to(u.device)
            w = torch.softmax(logp, dim=1)[:, :, None]  # (B, K, 1)
            sx, sm = -(w * gx).sum(1), -(w * gm).sum(1)
        return torch.cat([sx.reshape(B, C, *u.shape[2:]), sm.reshape(B, C, *u.shape[2:])], dim=1)

    def _score_isotropic(self, x, m, p, mu, var):
        """Same score when every component has one variance: the (B, K, D) terms become matmuls.

        x, m: (B, D); p: transition entries (B, 1, 1); mu: (K, D); var: (K,).
        """
        D = x.shape[1]
        p00, p10 = p[0][:, :, 0], p[2][:, :, 0]  # (B, 1)
        c00, c01, c11 = (v for v in _cov_entries(self.sde, [q[:, :, 0] for q in p], var[None], self.sde.kappa * self.sde.M))
        det = c00 * c11 - c01 * c01  # (B, K)
        xm, mm = x @ mu.T, m @ mu.T  # (B, K)
        mu2 = (mu * mu).sum(1)[None]  # (1, K)
        # |dx|^2, <dx, dm>, |dm|^2 with dx = x - p00 mu_k, dm = m - p10 mu_k
        dxx = (x * x).sum(1, keepdim=True) - 2 * p00 * xm + p00 * p00 * mu2
        dmm = (m * m).sum(1, keepdim=True) - 2 * p10 * mm + p10 * p10 * mu2
        dxm = (x * m).sum(1, keepdim=True) - p10 * xm - p00 * mm + p00 * p10 * mu2
        quad = (c11 * dxx - 2 * c01 * dxm + c00 * dmm) / det
        logp = -0.5 * (quad + D * torch.log(det)) + self.log_weights.to(x.device)
        w = torch.softmax(logp, dim=1)  # (B, K)
        a11, a01, a00 = ((w * c / det).sum(1, keepdim=True) for c in (c11, c01, c00))
        sx = -(a11 * x - a01 * m - (w * (c11 * p00 - c01 * p10) / det) @ mu)
        sm = -(a00 * m - a01 * x - (w * (c00 * p10 - c01 * p00) / det) @ mu)
        return sx, sm

    def forward(self, u: torch.Tensor, tau) -> torch.Tensor:
        tau = _expand_tau(tau, u)
        s = self.score(u, tau)
        l11, l21, l22 = (v.reshape((-1,) + (1,) * (u.dim() - 1)) for v in hsm_cholesky_tensor(self.sde, tau))
        C = u.shape[1] // 2
        eps = torch.cat([-(l11 * s[:, :C] + l21 * s[:, C:]), -l22 * s[:, C:]], dim=1)
        return eps.to(u.dtype if u.is_floating_point() else torch.float32)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact EDM denoiser ``E[x0 | x0 + sigma n = x]`` of the data law (float64 math,
        returned in x's dtype): x (B, *shape), sigma (B,) or a number."""
        B = x.shape[0]
        y = x.to(torch.float64).reshape(B, 1, -1)                       # (B, 1, D)
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(B)
        s2 = (s2 * s2).reshape(B, 1, 1)
        mu, var = self.means.to(x.device)[None], self.vars.to(x.device)[None]  # (1, K, D)
        tot = var + s2
        d = y - mu
        logp = -0.5 * (d * d / tot + torch.log(tot)).sum(-1) + self.log_weights.to(x.device)
        w = torch.softmax(logp, dim=1)[:, :, None]                      # (B, K, 1)
        post = (var * y + s2 * mu) / tot                                # per-component posterior means
        return (w * post).sum(1).reshape(x.shape).to(x.dtype)

    def as_edm_denoiser(self):
        """:meth:`denoise` as a callable ``D(x, sigma)`` (an exact test/bench denoiser)."""
        return _MixtureDenoiser(self)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact draws from the data law, (n, *shape) float64 (on the buffers' device)."""
        dev = self.means.device
        k = torch.multinomial(self.log_weights.exp().cpu(), n, replacement=True, generator=generator).to(dev)
        noise = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64).to(dev)
        return (self.means[k] + self.vars[k].sqrt() * noise).reshape(n, *self.shape)

    def data_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate mean and variance of the data law (float64, shape ``self.shape``)."""
        w = self.log_weights.exp()[:, None]
        mean = (w * self.means).sum(0)
        second = (w * (self.vars + self.means ** 2)).sum(0)
        return mean.reshape(self.shape), (second - mean ** 2).reshape(self.shape)


class _MixtureDenoiser(nn.Module):
    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture
        self.sigma_min, self.sigma_max = 1e-4, 1e4

    def forward(self, x, sigma, **extra_args):
        return self.mixture.denoise(x, sigma)


# ---------------------------------------------------------------------------------------- presets
def _digits(sde, size=16, per_class=10, std=0.1):
    from .datasets import load_digits

    images, _ = load_digits(size=size, per_class=per_class, seed=0)
    return GaussianMixture(images, torch.full((images.shape[0],), std), sde=sde, name="digits")


def _gaussian(sde, dim=16):
    g = torch.Generator().manual_seed(0)
    mean = 0.5 * torch.randn(1, dim, generator=g, dtype=torch.float64)
    std = 0.2 + 0.6 * torch.rand(1, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(mean, std, sde=sde, name="gaussian")


def _ring2d(sde, k=8, radius=0.8, std=0.05):
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return GaussianMixture(means, torch.full((k,), std), sde=sde, name="ring2d")


def _cifar_like(sde, k=10, shape=(3, 32, 32), std=0.2):
    g = torch.Generator().manual_seed(0)
    means = torch.tanh(torch.randn(k, *shape, generator=g, dtype=torch.float64))
    return GaussianMixture(means, torch.full((k,), std), sde=sde, name="cifar_like")


PRESETS = {
    "digits": (_digits, "100 handwritten digits (16x16, 10 per class) as a Gaussian mixture, std 0.1"),
    "gaussian": (_gaussian, "one 16-d Gaussian with diagonal covariance (linear score: exact laws)"),
    "ring2d": (_ring2d, "8-component ring in 2-D, std 0.05"),
    "cifar_like": (_cifar_like, "10 random (3, 32, 32) components: CIFAR-10 shapes for benchmarks"),
}


def get_preset(name: str, sde: PSLD | None = None) -> GaussianMixture:
    """Build an analytic model by name (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name][0](sde if sde is not None else PSLD())
