"""Train PSLD eps-networks with the HSM loss (spec 1.2), or position-only EDM denoisers
(``objective="edm"``, see :func:`edm_loss`); checkpoints in a Lightning-like layout.

Loss: ``E || eps_theta(mu_tau + L_tau e, tau) - e ||^2`` with ``e ~ N(0, I)`` on the packed state
``(x, m)``, ``tau ~ U[tau_min, 1]`` (``tau_min = 1e-5``), ``mu_tau = P(b(tau)) (x0, 0)`` and ``L_tau``
the lower Cholesky factor of the HSM covariance (x0 known, ``m0 ~ N(0, kappa M)``, 1e-9 jitter).

Training loop: Adam with linear learning-rate warm-up, gradient-norm clipping, an EMA of the weights
(decay ``min(ema_decay, (1 + n) / (10 + n))``), bfloat16 autocast on CUDA only (``amp``), a tqdm bar
with the running loss.  Checkpoints are written atomically (temporary file + ``os.replace``) every
``ckpt_every`` steps and at the end, as ``<out>/last.ckpt``::

    {"state_dict": {"score_fn.<k>": ..., "ema_score_fn.<k>": ...},
     "hyper_parameters": {"model": {arch config}, "sde": {gamma, nu, ...}, "data": {...}, "train": {...}},
     "global_step": n, "optimizer_states": [adam state], "loss_history": [[step, loss], ...],
     "rng_state": {...}, "elapsed_s": seconds of training so far, "psld_fast_version": ...}

Rerunning the same command resumes from ``last.ckpt`` (network, EMA, optimizer, step, RNG): a killed
run loses at most the steps since its last checkpoint.  :func:`load_trained_checkpoint` returns an
:class:`~psld_fast.models.EpsModel` with the right network and process.
"""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .models import EpsModel, _transition_entries, hsm_cholesky_tensor
from .nets.small import build_net, count_params, default_config
from .sde import PSLD
from ._io import check_writable_dir, write_atomic

__all__ = ["TrainConfig", "hsm_loss", "edm_loss", "EDM_DEFAULTS", "OBJECTIVES", "perturb", "train", "load_trained_checkpoint", "make_data",
           "save_checkpoint_atomic", "strip_checkpoint"]

ONLINE = "score_fn."
EMA = "ema_score_fn."


# ------------------------------------------------------------------------------------------ loss
def perturb(sde: PSLD, x0: torch.Tensor, tau: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``u = mu_tau + L_tau e`` for data x0 (B, C, ...), forward times tau (B,), noise e like u."""
    C = x0.shape[1]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    t64 = tau.to(torch.float64)
    b = sde.beta_min * t64 + 0.5 * t64 * t64 * (sde.beta_max - sde.beta_min)
    p00, _, p10, _ = _transition_entries(sde, b)
    l11, l21, l22 = hsm_cholesky_tensor(sde, t64)
    dt = x0.dtype
    p00, p10, l11, l21, l22 = (v.to(dt).reshape(shape) for v in (p00, p10, l11, l21, l22))
    ex, em = e[:, :C], e[:, C:]
    x = p00 * x0 + l11 * ex
    m = p10 * x0 + l21 * ex + l22 * em
    return torch.cat([x, m], dim=1)


def hsm_loss(net, sde: PSLD, x0: torch.Tensor, *, tau_min: float = 1e-5, generator=None,
             autocast: bool = False) -> torch.Tensor:
    """One Monte-Carlo estimate of the HSM eps loss (mean over batch and coordinates)."""
    B = x0.shape[0]
    tau = tau_min + (sde.T - tau_min) * torch.rand(B, generator=generator, dtype=torch.float64)
    e = torch.randn((B, 2 * x0.shape[1], *x0.shape[2:]), generator=generator, dtype=x0.dtype)
    tau, e = tau.to(x0.device), e.to(x0.device)
    u = perturb(sde, x0, tau, e)
    tau_in = tau.to(torch.float32)
    if autocast:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            out = net(u, tau_in)
        out = out.float()
    else:
        out = net(u, tau_in)
    return (out - e).pow(2).mean()


#: The EDM objective's constants (Karras et al. 2022): log-normal training sigmas, sigma_data and
#: the denoiser's trained range (the k-diffusion / EDM defaults).
EDM_DEFAULTS = {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
OBJECTIVES = ("hsm", "edm")


def edm_loss(net, x0: torch.Tensor, *, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
             generator=None, autocast: bool = False) -> torch.Tensor:
    """One Monte-Carlo estimate of the EDM denoiser loss (mean over batch and coordinates):
    ``lambda(s) || D(x0 + s n, s) - x0 ||^2`` with ``log s ~ N(P_mean, P_std^2)``, ``n ~ N(0, I)`` and
    ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` (= 1 / c_out^2: the loss of the raw network output F
    against its target ``(x0 - c_skip y) / c_out``)."""
    B = x0.shape[0]
    rnd = torch.randn(B, generator=generator, dtype=torch.float64)
    n = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    sigma = torch.exp(P_mean + P_std * rnd).to(x0.device)
    n = n.to(x0.device)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    s = sigma.to(x0.dtype).reshape(shape)
    y = x0 + s * n
    weight = (s * s + sigma_data ** 2) / (s * sigma_data) ** 2
    if autocast:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            D = net(y, sigma.to(torch.float32))
        D = D.float()
    else:
        D = net(y, sigma.to(torch.float32))
    return (weight * (D - x0).pow(2)).mean()


# ------------------------------------------------------------------------------------------ data
class _PointSource:
    """Infinite exact draws from an analytic preset (e.g. ring2d)."""

    def __init__(self, preset: str, sde: PSLD):
        from .models import get_preset

        self.gm = get_preset(preset, sde)
        self.shape = self.gm.shape

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.gm.sample_data(n, generator=gen).float()


class _ArraySource:
    """Minibatches (with replacement) from a fixed array of examples, optional horizontal flips off."""

    def __init__(self, data: torch.Tensor):
        self.data = data.float().contiguous()
        self.shape = tuple(self.data.shape[1:])

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, self.data.shape[0], (n,), generator=gen)
        return self.data[idx]


def make_data(spec: str, sde: PSLD | None = None, *, split: str = "all"):
    """``"ring2d"`` (or any analytic preset): exact draws; ``"digits"``: the 1797 shipped UCI digits
    at 16x16 in [-1, 1]; ``"digits8"``: at 8x8; a ``.npy`` / ``.npz`` (key ``x``) / ``.pt`` path: an
    array (N, ...) of examples in [-1, 1].  ``split`` (digits only): ``"all"``, ``"train"`` (the 1258
    images of the fixed stratified 70/30 split, :func:`psld_fast.datasets.digits_split_indices`) or
    ``"heldout"`` (the other 539)."""
    from .datasets import SPLITS
    from .models import PRESETS

    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if spec in ("digits", "digits16", "digits8"):
        from .datasets import load_digits

        x, _ = load_digits(size=8 if spec == "digits8" else 16, split=split)
        info = {"kind": "digits", "size": 8 if spec == "digits8" else 16, "n": int(x.shape[0]),
                "source": "psld_fast/data/digits.npz (UCI optdigits, CC BY 4.0), bicubic"}
        if split != "all":
            info["split"] = split
        return _ArraySource(x), info
    if split != "all":
        raise ValueError(f"split {split!r} applies to the digits data only, not to {spec!r}")
    if spec in PRESETS:
        return _PointSource(spec, sde), {"kind": "preset", "name": spec, "source": "exact draws from get_preset"}
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"training data {spec!r}: not a preset ({', '.join(sorted(set(PRESETS) | {'digits8'}))}) "
                                "nor a file")
    try:
        x = _load_array(path)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"training data {spec}: not a readable .npy, .npz (with an 'x' array) or .pt tensor "
                         f"file ({detail})") from None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"training data {spec}: holds a {type(x).__name__}, not an array of examples")
    if x.dim() < 2:
        raise ValueError(f"training data {spec}: expected (N, ...) examples, got shape {tuple(x.shape)}")
    return _ArraySource(x), {"kind": "array", "path": str(path), "n": int(x.shape[0])}


def _load_array(path: Path):
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as f:
            if "x" not in f:
                raise KeyError(f"no 'x' array; it holds {', '.join(f.files) or 'nothing'}")
            return torch.from_numpy(f["x"])
    from .checkpoint import _read

    return _read(path, "cpu", True, api_hint=False)


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    return write_atomic(path, lambda f: torch.save(obj, f), fsync=True)


def _state_dict(net, ema) -> dict:
    sd = {ONLINE + k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    sd.update({EMA + k: v.detach().cpu().clone() for k, v in ema.state_dict().items()})
    return sd


def strip_checkpoint(ckpt: Mapping, *, keep_online: bool = False, half: bool = False) -> dict:
    """A shippable copy: EMA weights (and optionally the online ones), hyper-parameters, step and
    loss history; no optimizer state.  ``half`` stores float tensors as float16 (loaded back as float32)."""
    sd = {}
    for k, v in ckpt["state_dict"].items():
        if k.startswith(EMA) or (keep_online and k.startswith(ONLINE)):
            sd[k] = v.half() if half and v.is_floating_point() else v
    out = {k: ckpt[k] for k in ("hyper_parameters", "global_step", "loss_history", "elapsed_s",
                                "psld_fast_version") if k in ckpt}
    out["state_dict"] = sd
    return out


def load_trained_checkpoint(path, *, use_ema: bool = True, map_location="cpu", name: str | None = None,
                            sde_lift: Mapping | None = None) -> EpsModel:
    """Load a checkpoint written by :func:`train` (or its stripped copy) as an :class:`EpsModel` in
    eval mode.  Falls back to the other weight set (with a note in ``net.checkpoint_info``) when the
    requested one is absent.

    An ``objective="edm"`` checkpoint loads as a :class:`~psld_fast.lift.DenoiserModel` (an EpsModel
    subclass) around its :class:`~psld_fast.nets.small.EDMUNet` (``model.denoiser``; k-diffusion
    samples that natively), lifted to ``PSLD(**sde_lift)`` (default ``PSLD()``)."""
    from .checkpoint import CheckpointError, extract_score_fn_state_dict

    from .checkpoint import _read

    ckpt = _read(path, map_location, True)  # a Mapping is passed through; a bad file: one-line CheckpointError
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hp, Mapping) or "model" not in hp or "arch" not in hp["model"]:
        raise CheckpointError(f"{path}: no hyper_parameters['model']['arch']: not a psld_fast.train checkpoint "
                              "(official PSLD checkpoints load with psld_fast.load_psld_checkpoint)")
    try:
        state, prefix = extract_score_fn_state_dict(ckpt, use_ema=use_ema)
    except CheckpointError:
        state, prefix = extract_score_fn_state_dict(ckpt, use_ema=not use_ema)
    edm = hp.get("objective") == "edm"
    sde = None if edm else PSLD(**hp["sde"])
    net = build_net(hp["model"], sde)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.checkpoint_info = {"path": None if isinstance(path, Mapping) else str(path), "prefix": prefix,
                           "global_step": int(ckpt.get("global_step", 0)), "arch": hp["model"]["arch"]}
    if edm:
        from .lift import DenoiserModel

        return DenoiserModel(net, net.data_shape, sigma_min=net.sigma_min, sigma_max=net.sigma_max,
                             sde=PSLD(**sde_lift) if sde_lift else None,
                             name=name or f"small-{hp['model']['arch']}")
    return EpsModel(net, sde, shape=net.data_shape, name=name or f"small-{hp['model']['arch']}")


# ------------------------------------------------------------------------------------------ train
@dataclass
class TrainConfig:
    data: str = "ring2d"
    split: str = "all"                   # digits only: "all", "train" or "heldout" (datasets.SPLITS)
    objective: str = "hsm"               # "hsm": PSLD eps-network; "edm": position-only EDM denoiser
    arch: str | None = None              # default: "mlp" for point data, "unet" for images
    net: dict = field(default_factory=dict)   # overrides of nets.small.default_config(arch)
    sde: dict = field(default_factory=dict)   # PSLD(**sde)
    out: str = "runs/train"
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    tau_min: float = 1e-5
    ckpt_every: int = 500
    seed: int = 0
    device: str | None = None
    amp: bool = True                     # bfloat16 autocast, CUDA only
    resume: bool = True
    progress: bool = True
    max_minutes: float | None = None     # stop (with a checkpoint) after this much training time
    log_every: int = 50


class _EMA:
    def __init__(self, net, decay):
        self.model = copy.deepcopy(net).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, net, step):
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for pe, p in zip(self.model.parameters(), net.parameters()):
            pe.lerp_(p.detach(), 1.0 - d)
        for be, b in zip(self.model.buffers(), net.buffers()):
            be.copy_(b)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


def train(cfg: TrainConfig | dict | None = None, **kwargs) -> dict:
    """Train (or resume) a small PSLD eps-network (``objective="hsm"``, default) or a position-only EDM
    denoiser (``objective="edm"``: :class:`~psld_fast.nets.small.EDMUNet`, :func:`edm_loss`, images
    only); returns a summary dict (also see ``<out>/last.ckpt``)."""
    if cfg is None:
        cfg = TrainConfig(**kwargs)
    elif isinstance(cfg, Mapping):
        cfg = TrainConfig(**{**cfg, **kwargs})
    elif kwargs:
        cfg = TrainConfig(**{**asdict(cfg), **kwargs})
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective {cfg.objective!r}: choose one of {', '.join(OBJECTIVES)} (hsm: the PSLD "
                         "eps-network; edm: a position-only EDM denoiser)")
    edm = cfg.objective == "edm"
    if edm and cfg.sde:
        raise ValueError("objective 'edm' trains a position-only denoiser: it takes no PSLD parameters (sde)")
    out = Path(cfg.out)
    check_writable_dir(out, "training output folder")  # before the data, the network or any step
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sde = PSLD(**cfg.sde)
    source, data_info = make_data(cfg.data, sde, split=cfg.split)
    shape = source.shape
    arch = cfg.arch or ("mlp" if len(shape) == 1 else "unet")
    if edm and arch != "unet":
        raise ValueError(f"objective 'edm' trains the small U-Net on images; got arch {arch!r} "
                         f"(data shape {shape})")
    if arch == "mlp":
        net_cfg = default_config("mlp", dim=shape[0], **cfg.net)
    else:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"arch 'unet' needs square images (C, H, H), got data shape {shape}")
        net_cfg = default_config("edm_unet" if edm else "unet", channels=shape[0], size=shape[1], **cfg.net)
    ckpt_path = out / "last.ckpt"
    torch.manual_seed(cfg.seed)
    net = build_net(net_cfg, sde).to(device)
    ema = _EMA(net, cfg.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)        # data + noise + tau draws (CPU, then moved)
    hparams = {"model": net_cfg, "sde": sde.to_dict(), "data": data_info,
               "train": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "device", "resume")}}
    if edm:
        edm_cfg = {**EDM_DEFAULTS, "sigma_data": net_cfg["sigma_data"], "sigma_min": net_cfg["sigma_min"],
                   "sigma_max": net_cfg["sigma_max"]}
        del hparams["sde"]
        hparams.update(objective="edm", edm=edm_cfg)

        def loss_fn(x0):
            return edm_loss(net, x0, P_mean=edm_cfg["P_mean"], P_std=edm_cfg["P_std"],
                            sigma_data=edm_cfg["sigma_data"], generator=gen, autocast=use_amp)
    else:
        hparams["objective"] = "hsm"

        def loss_fn(x0):
            return hsm_loss(net, sde, x0, tau_min=cfg.tau_min, generator=gen, autocast=use_amp)
    step, history, elapsed0 = 0, [], 0.0
    if cfg.resume and ckpt_path.exists():
        from .checkpoint import CheckpointError, _read

        ck = _read(ckpt_path, "cpu", True, api_hint=False)
        if not isinstance(ck, Mapping) or not isinstance(ck.get("hyper_parameters"), Mapping) or \
                "model" not in ck["hyper_parameters"]:
            raise CheckpointError(f"{ckpt_path} is not a psld_fast.train checkpoint; use another --out or --no-resume")
        if ck["hyper_parameters"].get("objective", "hsm") != cfg.objective:
            raise ValueError(f"{ckpt_path}: holds a {ck['hyper_parameters'].get('objective', 'hsm')!r}-objective "
                             f"run, not {cfg.objective!r}; use another --out or --no-resume")
        if ck["hyper_parameters"]["model"] != net_cfg:
            raise ValueError(f"{ckpt_path}: holds a different network config ({ck['hyper_parameters']['model']}); "
                             "use another --out or --no-resume")
        sd = ck["state_dict"]
        net.load_state_dict({k[len(ONLINE):]: v for k, v in sd.items() if k.startswith(ONLINE)})
        ema.model.load_state_dict({k[len(EMA):]: v for k, v in sd.items() if k.startswith(EMA)})
        opt.load_state_dict(ck["optimizer_states"][0])
        step = int(ck["global_step"])
        history = [list(h) for h in ck.get("loss_history", [])]
        elapsed0 = float(ck.get("elapsed_s", 0.0))
        if "rng_state" in ck:
            gen.set_state(ck["rng_state"]["data"])
            torch.set_rng_state(ck["rng_state"]["torch"])
    resumed_from = step
    use_amp = bool(cfg.amp) and device.type == "cuda"

    def checkpoint():
        save_checkpoint_atomic({
            "state_dict": _state_dict(net, ema.model), "hyper_parameters": hparams, "global_step": step,
            "optimizer_states": [opt.state_dict()], "loss_history": history,
            "rng_state": {"data": gen.get_state(), "torch": torch.get_rng_state()},
            "elapsed_s": elapsed0 + (time.perf_counter() - t0), "psld_fast_version": _version(),
        }, ckpt_path)

    bar = None
    if cfg.progress and step < cfg.steps:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc=f"train {arch} on {cfg.data}", unit="step",
                       mininterval=1.0)
        except ImportError:
            bar = None
    t0 = time.perf_counter()
    run_loss, n_run = 0.0, 0
    net.train()
    stopped_early = False
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        x0 = source.batch(cfg.batch_size, gen).to(device)
        loss = loss_fn(x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(net, step)
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"training loss is {lv} at step {step}; last good checkpoint: {ckpt_path}")
        run_loss += lv
        n_run += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            history.append([step, run_loss / n_run])
            run_loss, n_run = 0.0, 0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1][1] if history else lv:.4f}", refresh=False)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            checkpoint()
        if cfg.max_minutes is not None and (time.perf_counter() - t0) > 60 * cfg.max_minutes:
            stopped_early = True
            break
    if n_run:
        history.append([step, run_loss / n_run])
    if bar is not None:
        bar.close()
    if step > resumed_from or not ckpt_path.exists():
        checkpoint()
    return {"checkpoint": str(ckpt_path), "global_step": step, "resumed_from": resumed_from,
            "final_loss": history[-1][1] if history else None, "params": count_params(net),
            "elapsed_s": elapsed0 + (time.perf_counter() - t0), "stopped_early": stopped_early,
            "arch": net_cfg["arch"], "objective": cfg.objective, "device": str(device)}


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"
