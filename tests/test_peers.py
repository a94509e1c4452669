"""psld_fast beside its peers: k-diffusion's VP wrappers and samplers, a diffusers UNet2DModel, and
the k-diffusion-signature entry points (psld_fast.k_sampling).

The peers are pinned in requirements-peers.txt (``bash tools/install_peers.sh``; CI installs them);
without them these tests are skipped with that message.
"""
import numpy as np
import pytest
import torch

import psld_fast
from psld_fast import k_sampling
from psld_fast.lift import DenoiserModel, sigma_y, vp_denoiser
from psld_fast.peers import PEERS_HINT, import_diffusers, load_kdiffusion

try:
    K = load_kdiffusion()
except ImportError as exc:  # pragma: no cover - CI installs the peers
    pytest.skip(f"{exc} ({PEERS_HINT})", allow_module_level=True)


def _abar(n=1000):
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class _TinyEps(torch.nn.Module):
    """A deterministic stand-in for a VP network: eps(x, t) depends on x and on t non-trivially."""

    def forward(self, x, t, **kw):
        return torch.tanh(x) * (1 + 0.001 * t.reshape(-1, *([1] * (x.dim() - 1))))


@pytest.mark.parametrize("prediction,kd_cls", [("epsilon", "DiscreteEpsDDPMDenoiser"),
                                               ("v_prediction", "DiscreteVDDPMDenoiser")])
@pytest.mark.parametrize("quantize", [False, True])
def test_vp_denoiser_matches_k_diffusion_wrappers(prediction, kd_cls, quantize):
    net, ac = _TinyEps(), _abar()
    ours = vp_denoiser(net, ac, prediction=prediction, quantize=quantize)
    theirs = getattr(K.external, kd_cls)(net, ac, quantize=quantize)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.0101, 0.3, 1.7, 20.0, 150.0])
    assert torch.allclose(ours(x, sigma), theirs(x, sigma), rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours.sigma_to_t(sigma), theirs.sigma_to_t(sigma))
    assert ours.sigma_min == pytest.approx(float(theirs.sigma_min)) and ours.sigma_max == pytest.approx(float(theirs.sigma_max))


def test_diffusers_unet_samples_through_the_lift():
    diffusers = import_diffusers()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    den = vp_denoiser(unet, sched.alphas_cumprod)
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    want = x - sigma[:, None, None, None] * unet(x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5,
                                                 den.sigma_to_t(sigma)).sample
    assert torch.allclose(den(x, sigma), want, atol=1e-5)
    model = DenoiserModel(den, (1, 8, 8), sigma_min=den.sigma_min, sigma_max=den.sigma_max)
    assert float(sigma_y(model.sde, model.eps_end)) >= den.sigma_min * (1 - 1e-9)
    res = psld_fast.sample(model, 3, nfe=6, progress=False)
    assert res.x.shape == (3, 1, 8, 8) and torch.isfinite(res.x).all()


def _gauss(dim=4):
    g = torch.Generator().manual_seed(0)
    mean = 0.5 * torch.randn(1, dim, generator=g, dtype=torch.float64)
    return psld_fast.GaussianMixture(mean, torch.full((1,), 0.3, dtype=torch.float64))


@pytest.mark.parametrize("sampler", ["reduced_oba", "sscs", "em", "rvv", "reduced_obab"])
def test_k_signature_fused_and_unfused_paths_agree_and_count_nfe(sampler):
    gm = _gauss()
    den = gm.as_edm_denoiser()
    sigmas = K.sampling.get_sigmas_karras(12, 0.002, 80.0, device="cpu").double()
    x = 80.0 * torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    calls, seen = [0], []

    def counting(xx, s):
        calls[0] += 1
        return den(xx, s)

    fn = getattr(k_sampling, f"sample_{sampler}")
    out = fn(counting, x.clone(), sigmas, seeds=torch.arange(6), backend="reference", callback=seen.append)
    spec = psld_fast.samplers.SAMPLER_SPECS[sampler]
    assert calls[0] == 11 * spec.evals_per_step + 1 == len(seen)
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"} and seen[0]["sigma"] == pytest.approx(80.0)
    assert [s["i"] for s in seen] == list(range(len(seen)))
    # the same run through the model's forward (eps by torch ops) and the plain step
    process, grid, denoise = k_sampling.psld_grid(sigmas)
    program = psld_fast.compile_sampler(sampler, process, calls[0], schedule=grid, denoise=denoise)
    dm = DenoiserModel(den, (4,), sigma_min=0.002 * (1 - 1e-9), sigma_max=80 * (1 + 1e-9), sde=process, start="T")
    from psld_fast.ops import get_step_fn
    from psld_fast.runner import run_program

    u = run_program(dm, program, torch.arange(6), get_step_fn("reference"), dtype=torch.float64, device="cpu",
                    init_x=x, init_tau=process.T)
    assert torch.allclose(out, u[:, :4], rtol=1e-10, atol=1e-10)


def test_k_signature_lift_of_the_initial_noise_has_the_exact_law():
    """x ~ N(0, sigma0^2) lifted to z = mu x + v n has the HSM marginal covariance at tau(sigma0)."""
    from psld_fast.lift import lifted_coefficients, lift_terms

    sde = psld_fast.PSLD()
    process, grid, _ = k_sampling.psld_grid(torch.tensor([10.0, 1.0, 0.0]), sde)
    program = psld_fast.compile_sampler("em", process, 2, schedule=grid)
    c = lifted_coefficients(program, process, init_tau=process.T).init_coef
    t = {k: float(v) for k, v in lift_terms(process, torch.tensor([process.T], dtype=torch.float64)).items()}
    G = np.array(c[4:6])
    R = np.array(c[6:10]).reshape(2, 2)
    cov = 100.0 * np.outer(G, G) + R @ R.T
    assert np.allclose(cov, [[t["S00"], t["S01"]], [t["S01"], t["S11"]]], rtol=1e-9)
    assert t["sigma"] == pytest.approx(10.0, rel=1e-9)


def test_k_signature_errors_name_the_problem():
    den = _gauss().as_edm_denoiser()
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="must decrease"):
        k_sampling.sample_reduced_oba(den, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="at least two positive"):
        k_sampling.sample_reduced_oba(den, x, torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="unknown keyword"):
        k_sampling.sample_reduced_oba(den, x, torch.tensor([2.0, 1.0, 0.0]), eta=1.0)
    with pytest.raises(ValueError, match="one seed per sample"):
        k_sampling.sample_reduced_oba(den, x, torch.tensor([2.0, 1.0, 0.0]), seeds=[1, 2, 3])


def test_k_diffusion_samplers_run_on_a_psld_model_through_as_denoiser():
    gm = psld_fast.get_preset("ring2d")
    den = psld_fast.as_denoiser(gm)
    sigmas = K.sampling.get_sigmas_karras(30, den.sigma_min, 80.0).double()
    torch.manual_seed(0)
    x = torch.randn(2000, 2, dtype=torch.float64) * sigmas[0]
    out = K.sampling.sample_dpmpp_2m(den, x, sigmas, disable=True)
    from psld_fast.metrics import sliced_wasserstein

    ref = gm.sample_data(2000, generator=torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(gm.sample_data(2000, generator=torch.Generator().manual_seed(2)).numpy(), ref.numpy())
    assert sliced_wasserstein(out.numpy(), ref.numpy()) < 3 * floor + 0.01


def test_cli_samples_a_diffusers_folder(tmp_path, capsys):
    diffusers = import_diffusers()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    folder = tmp_path / "tiny_ddpm"
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    from psld_fast.cli import main

    assert main(["sample", "--diffusers", str(folder), "-n", "3", "--nfe", "6", "--out", str(tmp_path / "s.npz"),
                 "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny_ddpm (1, 8, 8)" in out and (tmp_path / "s.npz").exists()
    assert main(["sample", "--diffusers", str(tmp_path), "-n", "2", "--no-progress"]) == 2
    assert "no config.json of a UNet2DModel" in capsys.readouterr().err
