"""Analytic models: exact mixture scores against autograd of the exact log-density."""
import math

import numpy as np
import pytest
import torch

import psld_fast as pf
from psld_fast.models import GaussianMixture, ScoreModelAdapter, hsm_cholesky_tensor


def _log_density(model: GaussianMixture, z: torch.Tensor, tau: float) -> torch.Tensor:
    """Exact log p_tau(z) of the mixture marginal, built from sde.marginal_cov per coordinate."""
    sde = model.sde
    P = torch.as_tensor(sde.P(sde.b(tau)))
    B = z.shape[0]
    zz = z.reshape(B, 2, -1)
    comps = []
    for k in range(model.num_components):
        mu = model.means[k]
        lp = model.log_weights[k].clone()
        for d in range(mu.shape[0]):
            C = torch.as_tensor(sde.marginal_cov(tau, np.diag([model.vars[k, d].item(), sde.kappa * sde.M])))
            mean = P @ torch.stack([mu[d], torch.zeros((), dtype=torch.float64)])
            diff = zz[:, :, d] - mean
            lp = lp - 0.5 * (diff @ torch.linalg.inv(C) * diff).sum(1) - 0.5 * torch.logdet(2 * math.pi * C)
        comps.append(lp)
    return torch.logsumexp(torch.stack(comps, 1), 1)


@pytest.mark.parametrize("isotropic", [True, False])
@pytest.mark.parametrize("tau", [1e-3, 0.05, 0.5, 1.0])
def test_mixture_score_is_gradient_of_log_density(tau, isotropic):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    stds = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64)
    if not isotropic:
        stds = stds[:, None, None, None] * (1 + torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64))
    model = GaussianMixture(means, stds, weights=[0.2, 0.3, 0.5])
    assert model.isotropic == isotropic
    z = torch.randn(5, 2, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    grad, = torch.autograd.grad(_log_density(model, z, tau).sum(), z)
    score = model.score(z.detach(), torch.full((5,), tau, dtype=torch.float64))
    np.testing.assert_allclose(score.numpy(), grad.numpy(), rtol=1e-8, atol=1e-8 * grad.abs().max().item())


def test_mixture_eps_is_minus_LT_score_and_dtype():
    model = pf.get_preset("ring2d")
    z = torch.randn(7, 4, dtype=torch.float64)
    tau = torch.full((7,), 0.3, dtype=torch.float64)
    s = model.score(z, tau)
    eps = model(z, tau)
    l11, l21, l22 = model.sde.hsm_cholesky(0.3)
    np.testing.assert_allclose(eps[:, :2].numpy(), -(l11 * s[:, :2] + l21 * s[:, 2:]).numpy(), rtol=1e-12)
    np.testing.assert_allclose(eps[:, 2:].numpy(), (-l22 * s[:, 2:]).numpy(), rtol=1e-12)
    assert model(z.float(), tau.float()).dtype == torch.float32


def test_score_adapter_roundtrip():
    mix = pf.get_preset("gaussian")
    adapter = ScoreModelAdapter(lambda u, tau: mix.score(u, tau), sde=mix.sde, shape=mix.shape)
    z = torch.randn(4, 32, dtype=torch.float64)
    tau = torch.tensor([0.01, 0.2, 0.6, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(adapter(z, tau).numpy(), mix(z, tau).numpy(), rtol=1e-10, atol=1e-12)


def test_hsm_cholesky_tensor_matches_scalar():
    sde = pf.PSLD()
    taus = [1e-5, 1e-3, 0.1, 1.0]
    l11, l21, l22 = hsm_cholesky_tensor(sde, torch.tensor(taus, dtype=torch.float64))
    for i, tau in enumerate(taus):
        np.testing.assert_allclose([l11[i].item(), l21[i].item(), l22[i].item()], sde.hsm_cholesky(tau), rtol=1e-9)  # cancellation at tiny tau


def test_presets_and_errors():
    for name in pf.models.PRESETS:
        model = pf.get_preset(name)
        assert model.sde == pf.PSLD()
    assert pf.get_preset("digits").shape == (1, 16, 16)
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        pf.get_preset("nope")
    with pytest.raises(ValueError, match="stds must be"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="every std must be > 0"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(2), weights=[1.0, -1.0])


def test_data_moments_and_sampling():
    model = pf.get_preset("ring2d")
    mean, var = model.data_moments()
    x = model.sample_data(20000, generator=torch.Generator().manual_seed(0))
    # 5-sigma bands for n = 20000
    assert torch.all((x.mean(0) - mean).abs() < 5 * (var / 20000).sqrt())
    assert torch.all((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / 20000))
