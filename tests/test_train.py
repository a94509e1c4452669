"""Training, checkpoints, resume and the shipped learned models (tiny: a few seconds on one core)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import psld_fast as pf
from psld_fast import train as T
from psld_fast.nets.small import build_net, default_config

TINY_MLP = {"hidden": 32, "depth": 1, "temb": 16}
TINY_UNET = {"base": 8, "mults": [1, 2], "temb": 16, "attn": False, "patch": 2}


def _cfg(tmp_path, **kw):
    base = dict(data="ring2d", arch="mlp", net=TINY_MLP, out=str(tmp_path / "run"), steps=5, batch_size=32,
                lr=1e-3, warmup=2, ckpt_every=0, progress=False, seed=0, log_every=1)
    base.update(kw)
    return T.TrainConfig(**base)


def test_perturb_matches_hsm_covariance():
    sde = pf.PSLD()
    n = 100_000
    g = torch.Generator().manual_seed(0)
    for tau in (1e-3, 0.1, 0.5):
        x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
        e = torch.randn(n, 2, generator=g, dtype=torch.float64)
        u = T.perturb(sde, x0, torch.full((n,), tau, dtype=torch.float64), e)
        P = sde.P(sde.b(tau))
        np.testing.assert_allclose(u.mean(0).numpy(), P @ np.array([0.7, 0.0]), atol=5e-3)
        np.testing.assert_allclose(torch.cov(u.T).numpy(), sde.hsm_cov(tau), rtol=3e-2, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*explicit momentum friction unstable:RuntimeWarning")
def test_train_ring2d_checkpoint_layout_and_load(tmp_path):
    out = T.train(_cfg(tmp_path))
    assert out["global_step"] == 5 and out["resumed_from"] == 0
    ck = torch.load(out["checkpoint"], weights_only=True)
    assert set(ck) >= {"state_dict", "hyper_parameters", "global_step", "optimizer_states"}
    assert ck["global_step"] == 5
    keys = list(ck["state_dict"])
    assert any(k.startswith("score_fn.") for k in keys) and any(k.startswith("ema_score_fn.") for k in keys)
    assert ck["hyper_parameters"]["model"]["arch"] == "mlp"
    assert ck["hyper_parameters"]["sde"]["gamma"] == pf.PSLD().gamma
    assert not list((tmp_path / "run").glob("*.tmp"))       # atomic write left no temporary
    # EMA differs from the online weights
    diff = max((ck["state_dict"]["score_fn." + k[len("ema_score_fn."):]] - v).abs().max().item()
               for k, v in ck["state_dict"].items() if k.startswith("ema_score_fn.") and v.is_floating_point())
    assert diff > 0
    model = T.load_trained_checkpoint(out["checkpoint"])
    assert isinstance(model, pf.EpsModel) and model.shape == (2,) and model.sde == pf.PSLD()
    res = pf.sample(model, 8, sampler="reduced_oba", nfe=5, progress=False)
    assert res.x.shape == (8, 2) and torch.isfinite(res.x).all()
    online = T.load_trained_checkpoint(out["checkpoint"], use_ema=False)
    assert online.net.checkpoint_info["prefix"] == "score_fn."


def test_train_digit_images(tmp_path):
    from psld_fast.datasets import load_digits

    x, _ = load_digits(16)
    path = tmp_path / "four.npy"
    np.save(path, x[:4].numpy().astype(np.float32))
    out = T.train(_cfg(tmp_path, data=str(path), arch="unet", net=TINY_UNET, batch_size=4))
    model = T.load_trained_checkpoint(out["checkpoint"])
    assert model.shape == (1, 16, 16)
    u = torch.randn(3, 2, 16, 16)
    assert model(u, torch.full((3,), 0.3)).shape == u.shape
    res = pf.sample(model, 2, sampler="em", nfe=3, progress=False)
    assert res.x.shape == (2, 1, 16, 16)


def _kill_loss_at(monkeypatch, name: str, call: int):
    """Patch ``T.<name>`` (the training loss) to raise KeyboardInterrupt at its ``call``-th call, as a
    kill during that step; returns the real loss."""
    real = getattr(T, name)
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, name, dying)
    return real


def test_resume_after_interruption(tmp_path, monkeypatch):
    real = _kill_loss_at(monkeypatch, "hsm_loss", 6)  # killed during step 6: the last checkpoint is step 4
    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg(tmp_path, steps=10, ckpt_every=2))
    ck = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 4
    monkeypatch.setattr(T, "hsm_loss", real)
    out = T.train(_cfg(tmp_path, steps=10, ckpt_every=2))
    assert out["resumed_from"] == 4 and out["global_step"] == 10
    ck = torch.load(out["checkpoint"], weights_only=True)
    assert ck["global_step"] == 10 and [h[0] for h in ck["loss_history"]][:4] == [1, 2, 3, 4]
    # a finished run is not retrained
    again = T.train(_cfg(tmp_path, steps=10, ckpt_every=2))
    assert again["resumed_from"] == 10 and again["global_step"] == 10


def test_loss_decreases_on_ring2d():
    """100 Adam steps of a small MLP without the Gaussian skip (seed 0, batch 128, lr 3e-3): the HSM
    loss on a fixed evaluation batch drops below half its starting value (it starts at ~1, the loss of
    eps = 0).  With the skip the starting loss is already ~0.075 and the best reachable ~0.055."""
    torch.manual_seed(0)
    sde = pf.PSLD()
    net = build_net(default_config("mlp", hidden=64, depth=2, temb=16, gaussian_skip=False), sde)
    src, _ = T.make_data("ring2d", sde)
    g_eval = torch.Generator().manual_seed(123)
    x_eval = src.batch(1024, g_eval)

    def eval_loss():
        with torch.no_grad():
            return T.hsm_loss(net, sde, x_eval, generator=torch.Generator().manual_seed(7)).item()

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss = T.hsm_loss(net, sde, src.batch(128, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


def test_cli_train_subcommand(tmp_path, capsys):
    from psld_fast import cli_train

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli_train.register(sub)
    export = tmp_path / "exp.pt"
    args = parser.parse_args(["train", "--data", "ring2d", "--out", str(tmp_path / "r"), "--steps", "3",
                              "--batch-size", "16", "--net", json.dumps(TINY_MLP), "--no-progress",
                              "--threads", "1", "--export", str(export)])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["global_step"] == 3
    small = torch.load(export, weights_only=True)
    assert "optimizer_states" not in small and all(k.startswith("ema_score_fn.") for k in small["state_dict"])
    assert T.load_trained_checkpoint(export).shape == (2,)


@pytest.mark.parametrize("name,shape,nfe", [("ring2d", (2,), 5), ("digits", (1, 16, 16), 3),
                                            ("digits_split", (1, 16, 16), 3), ("digits_edm", (1, 16, 16), 3)])
def test_shipped_learned_models(name, shape, nfe):
    from psld_fast.learned import learned_path, load_learned

    if not learned_path(name).is_file():
        pytest.skip(f"learned_{name}.pt not built yet")
    model = load_learned(name)
    net = model.denoiser if name == "digits_edm" else model.net
    assert model.shape == shape and not net.training
    assert isinstance(model, pf.DenoiserModel) == (name == "digits_edm")
    res = pf.sample(model, 3, sampler="reduced_oba", nfe=nfe, split="ou", progress=False)
    assert res.x.shape == (3, *shape) and torch.isfinite(res.x).all()
    if name in ("digits_split", "digits_edm"):
        ck = torch.load(learned_path(name), weights_only=True)
        assert ck["hyper_parameters"]["data"]["split"] == "train" and ck["hyper_parameters"]["data"]["n"] == 1258
        assert "optimizer_states" not in ck and all(k.startswith("ema_score_fn.") for k in ck["state_dict"])
        assert len(learned_path(name).read_bytes()) < 8 * 2 ** 20
    if name == "digits_split":     # the same network config as the all-digits model
        assert ck["hyper_parameters"]["model"] == torch.load(learned_path("digits"), weights_only=True)[
            "hyper_parameters"]["model"]
    if name == "digits_edm":       # k-diffusion's convention, natively: D(x, sigma) -> x0 estimate
        x = torch.randn(2, *shape)
        D = model.denoiser(x, torch.tensor([0.5, 5.0]))
        assert D.shape == x.shape and torch.isfinite(D).all()
        assert ck["hyper_parameters"]["objective"] == "edm"


def test_train_on_digit_split_records_it(tmp_path):
    out = T.train(_cfg(tmp_path, data="digits8", split="train", arch="unet",
                       net={**TINY_UNET, "patch": 1}, steps=2, batch_size=4))
    ck = torch.load(out["checkpoint"], weights_only=True)
    hp = ck["hyper_parameters"]
    assert hp["data"]["split"] == "train" and hp["data"]["n"] == 1258 and hp["train"]["split"] == "train"
    src, info = T.make_data("digits", split="heldout")
    assert src.data.shape[0] == 539 and info["split"] == "heldout"
    assert "split" not in T.make_data("digits")[1]          # the default ("all") is unchanged
    with pytest.raises(ValueError, match="split 'test'"):
        T.make_data("digits", split="test")
    with pytest.raises(ValueError, match="digits data only"):
        T.make_data("ring2d", pf.PSLD(), split="train")


def test_cli_train_split_flag_documented_and_checked(capsys):
    from psld_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--split" in help_text and "heldout" in help_text
    with pytest.raises(SystemExit) as exc:
        main(["train", "--split", "test", "--no-progress"])
    assert exc.value.code == 2
    assert "invalid choice: 'test'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ EDM objective
TINY_EDM = {"base": 8, "mults": [1, 2], "temb": 16, "attn": False, "patch": 1}


def test_edm_preconditioning_formulas():
    from psld_fast.nets.small import EDMUNet

    net = build_net(default_config("edm_unet", channels=1, size=8, **TINY_EDM))
    assert isinstance(net, EDMUNet) and net.sigma_min == 0.002 and net.sigma_max == 80.0
    assert net.inp.in_channels == 1 and net.out.out_channels == 1          # channels = data channels, not 2C
    sd = 0.5
    for s in (0.002, 0.1, 0.5, 2.0, 80.0):
        sig = torch.tensor([s], dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = (float(v) for v in net.precond(sig))
        assert c_skip == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-12)
        assert c_out == pytest.approx(s * sd / (s ** 2 + sd ** 2) ** 0.5, rel=1e-12)
        assert c_in == pytest.approx(1 / (s ** 2 + sd ** 2) ** 0.5, rel=1e-12)
        assert c_noise == pytest.approx(np.log(s) / 4, rel=1e-12)
        # data of variance sd^2 enters the body at unit variance; D = c_skip y is the Gaussian-optimal
        # denoiser's slope (sd^2 / (s^2 + sd^2)) and c_skip^2 sd^2 ... + c_out^2 = the loss scale
        assert c_in ** 2 * (sd ** 2 + s ** 2) == pytest.approx(1.0)
        assert (1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * s ** 2 == pytest.approx(c_out ** 2)
    # the output layer starts at zero: D = c_skip(sigma) x exactly, per-sample sigma or a scalar
    x = torch.randn(3, 1, 8, 8)
    sig = torch.tensor([0.05, 0.5, 20.0])
    D = net(x, sig)
    torch.testing.assert_close(D, x * (sd ** 2 / (sig ** 2 + sd ** 2)).reshape(-1, 1, 1, 1))
    torch.testing.assert_close(net(x, 0.5), x * 0.5)
    # once the network is nonzero, D = c_skip x + c_out F with F = body(c_in x, c_noise):
    # the recovered F at the same c_in x differs between noise levels (the body sees c_noise)
    with torch.no_grad():          # the zero-initialised layers (output, residual branches) made nonzero
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))

    def F_of(sigma, xin):          # body output for body input xin (x = xin / c_in)
        s = torch.tensor([sigma])
        c_skip, c_out, c_in, _ = net.precond(s)
        xx = xin / c_in
        return (net(xx, s) - c_skip * xx) / c_out

    xin = torch.randn(1, 1, 8, 8)
    assert (F_of(0.1, xin) - F_of(5.0, xin)).abs().max() > 1e-3
    torch.testing.assert_close(F_of(0.1, xin), F_of(0.1, xin))


def test_edm_loss_weight_is_inverse_c_out_squared():
    """With D = c_skip y + c_out F, the weighted loss equals ||F - (x0 - c_skip y) / c_out||^2: for
    F = 0 it is E[||(x0 - c_skip y) / c_out||^2], which is exactly 1 per coordinate for x0 ~ N(0, sd^2)."""
    class Zero(torch.nn.Module):       # D = c_skip y (the zero-initialised EDMUNet)
        def forward(self, y, sigma):
            s = sigma.reshape(-1, 1, 1, 1)
            return y * 0.25 / (s * s + 0.25)

    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(20000, 1, 2, 2, generator=g)
    loss = T.edm_loss(Zero(), x0, generator=g).item()
    assert loss == pytest.approx(1.0, abs=0.03)


def _edm_cfg(tmp_path, **kw):
    return _cfg(tmp_path, data="digits8", split="train", objective="edm", arch=None, net=TINY_EDM,
                batch_size=16, **kw)


def test_edm_train_loss_decreases(tmp_path):
    """60 steps of the tiny EDM U-Net on the 8x8 train digits (lr 3e-3): the EDM loss on a fixed
    evaluation batch with fixed noise drops below 70% of its starting value (~1.75 at F = 0: the digits
    are not centred, so above the 1 of N(0, sigma_data^2) data)."""
    from psld_fast.datasets import load_digits

    x_eval = load_digits(8, split="train")[0][:256].float()

    def eval_loss(model):
        with torch.no_grad():
            return T.edm_loss(model.denoiser, x_eval, generator=torch.Generator().manual_seed(7)).item()

    out0 = T.train(_edm_cfg(tmp_path, steps=1, lr=1e-9))
    before = eval_loss(T.load_trained_checkpoint(out0["checkpoint"], use_ema=False))
    out = T.train(_edm_cfg(tmp_path, steps=60, lr=3e-3, warmup=5, out=str(tmp_path / "run60")))
    after = eval_loss(T.load_trained_checkpoint(out["checkpoint"], use_ema=False))
    assert out["objective"] == "edm" and out["arch"] == "edm_unet"
    assert 1.0 < before < 3.0, before
    assert after < 0.7 * before, (before, after)          # measured: 1.75 -> 1.06


def test_edm_checkpoint_loads_as_denoiser_and_samples(tmp_path):
    from psld_fast.learned import load_checkpoint_any

    out = T.train(_edm_cfg(tmp_path, steps=3, ckpt_every=0))
    ck = torch.load(out["checkpoint"], weights_only=True)
    hp = ck["hyper_parameters"]
    assert hp["objective"] == "edm" and "sde" not in hp and hp["model"]["arch"] == "edm_unet"
    assert hp["edm"] == {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
    assert hp["data"]["split"] == "train"
    for model in (T.load_trained_checkpoint(out["checkpoint"]), load_checkpoint_any(out["checkpoint"])):
        assert isinstance(model, pf.DenoiserModel) and model.shape == (1, 8, 8)
        assert (model.sigma_min, model.sigma_max) == (0.002, 80.0) and not model.denoiser.training
    # the k-diffusion calling convention: denoiser(x, sigma (B,)) -> x0 estimate of x's shape
    x = torch.randn(2, 1, 8, 8)
    assert model.denoiser(x, torch.tensor([1.0, 3.0])).shape == x.shape
    res = pf.sample(model, 4, sampler="ei_2m", nfe=6, progress=False)   # lifted to PSLD
    assert res.x.shape == (4, 1, 8, 8) and torch.isfinite(res.x).all()
    # exported (stripped) copies load the same way
    path = tmp_path / "exp.pt"
    T.save_checkpoint_atomic(T.strip_checkpoint(ck), path)
    m2 = load_checkpoint_any(path)
    torch.testing.assert_close(m2.denoiser(x, torch.tensor([1.0, 3.0])), model.denoiser(x, torch.tensor([1.0, 3.0])))


def test_edm_resume_and_objective_mismatch(tmp_path, monkeypatch):
    real = _kill_loss_at(monkeypatch, "edm_loss", 4)  # killed during step 4: the last checkpoint is step 2
    with pytest.raises(KeyboardInterrupt):
        T.train(_edm_cfg(tmp_path, steps=6, ckpt_every=2))
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["global_step"] == 2
    monkeypatch.setattr(T, "edm_loss", real)
    out = T.train(_edm_cfg(tmp_path, steps=6, ckpt_every=2))
    assert out["resumed_from"] == 2 and out["global_step"] == 6
    # an uninterrupted run from the same seed reaches the same weights (RNG, optimizer, EMA restored)
    ref = T.train(_edm_cfg(tmp_path, steps=6, ckpt_every=2, out=str(tmp_path / "ref")))
    a = torch.load(out["checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(ref["checkpoint"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the hsm objective refuses the edm run folder
    with pytest.raises(ValueError, match="'edm'-objective run"):
        T.train(_cfg(tmp_path, data="digits8", split="train", arch="unet", net=TINY_EDM, steps=8))


def test_edm_bad_input_is_clear(tmp_path, capsys):
    from psld_fast.cli import main

    with pytest.raises(ValueError, match="objective 'score'"):
        T.train(_cfg(tmp_path, objective="score"))
    with pytest.raises(ValueError, match="images"):
        T.train(_cfg(tmp_path, objective="edm", arch=None))               # ring2d points
    with pytest.raises(ValueError, match="no PSLD parameters"):
        T.train(_edm_cfg(tmp_path, sde={"gamma": 0.02}))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--objective" in help_text and "edm" in help_text and "DenoiserModel" in help_text
    with pytest.raises(SystemExit) as exc:
        main(["train", "--objective", "score", "--no-progress"])
    assert exc.value.code == 2 and "invalid choice: 'score'" in capsys.readouterr().err
