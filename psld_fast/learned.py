"""Small learned PSLD models shipped with the package (trained on this project's CPU, see
``docs/learned_models.md``).

* ``"ring2d"``: residual MLP (:class:`~psld_fast.nets.small.MLP2d`) trained on exact draws of the
  ``ring2d`` preset (8 Gaussians on a circle of radius 0.8, std 0.05), so that sampler output can be
  scored against the exact law ``psld_fast.get_preset("ring2d").sample_data(n)``.
* ``"digits"``: small U-Net (:class:`~psld_fast.nets.small.SmallUNet`) trained on the 1797 shipped UCI
  digits (``psld_fast.datasets.load_digits(16)``, CC BY 4.0), 16x16, 1 channel (u has 2 channels).
* ``"digits_split"``: the same network and training config on the train split only
  (``load_digits(16, split="train")``, 1258 images): score it against ``split="heldout"``.
* ``"digits_edm"``: a position-only EDM denoiser (:class:`~psld_fast.nets.small.EDMUNet`, EDM
  preconditioning and loss, ``psld-fast train --objective edm``) on the same train split; loads as a
  :class:`~psld_fast.lift.DenoiserModel` (sigma range 0.002..80).

All are EMA weights in the checkpoint layout of :mod:`psld_fast.train` (stripped of the optimizer
state) and load as :class:`~psld_fast.models.EpsModel` in eval mode::

    model = psld_fast.learned.load_learned("digits")
    x = psld_fast.sample(model, 64, sampler="reduced_oba", nfe=50).x
"""
from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import torch

from .lift import DenoiserModel
from .models import EpsModel

__all__ = ["LEARNED", "load_learned", "learned_path", "load_checkpoint_any"]

#: name -> (file in psld_fast/data, description)
LEARNED = {
    "ring2d": ("learned_ring2d.pt", "MLP trained on exact ring2d draws (8 Gaussians, radius 0.8, std 0.05)"),
    "digits": ("learned_digits.pt", "small U-Net trained on the 1797 UCI digits at 16x16 (CC BY 4.0)"),
    "digits_split": ("learned_digits_split.pt", "the digits U-Net (same config) trained on the 1258-image train "
                     "split only (datasets.digits_split_indices), so that the 539 held-out digits score it"),
    "digits_edm": ("learned_digits_edm.pt", "position-only EDM denoiser (EDMUNet, EDM preconditioning) on the "
                   "train split; loads as a DenoiserModel (psld_fast lifts it, k-diffusion samples it natively)"),
}


def learned_path(name: str):
    """The packaged resource holding the weights of ``name``."""
    if name not in LEARNED:
        raise ValueError(f"unknown learned model {name!r}; available: {', '.join(LEARNED)}")
    return resources.files("psld_fast") / "data" / LEARNED[name][0]


def load_learned(name: str, *, device=None, use_ema: bool = True) -> EpsModel:
    """A shipped learned model by name (one of :data:`LEARNED`) as an :class:`EpsModel`; ``"digits_edm"``
    as a :class:`~psld_fast.lift.DenoiserModel` (its k-diffusion denoiser is ``model.denoiser``)."""
    from .train import load_trained_checkpoint

    ref = learned_path(name)
    if not ref.is_file():
        raise FileNotFoundError(f"learned model {name!r}: {ref} is missing from this installation")
    ckpt = torch.load(io.BytesIO(ref.read_bytes()), map_location="cpu", weights_only=True)
    model = load_trained_checkpoint(ckpt, use_ema=use_ema, name=f"learned-{name}")
    (model.denoiser if isinstance(model, DenoiserModel) else model.net).checkpoint_info["path"] = str(ref)
    return model.to(device) if device is not None else model


def load_checkpoint_any(path, **kwargs) -> EpsModel:
    """Load either a :mod:`psld_fast.train` checkpoint (``hyper_parameters['model']['arch']``) or an
    official PSLD NCSN++ Lightning checkpoint (:func:`psld_fast.checkpoint.load_psld_checkpoint`)."""
    from .checkpoint import CheckpointError, _read, load_psld_checkpoint
    from .train import load_trained_checkpoint

    ckpt = _read(Path(path), kwargs.pop("map_location", "cpu"), kwargs.pop("weights_only", True),
                 api_hint=kwargs.pop("api_hint", True))
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict (state_dict, "
                              "hyper_parameters)")
    hp = ckpt.get("hyper_parameters")
    try:
        if isinstance(hp, dict) and isinstance(hp.get("model"), dict) and "arch" in hp["model"]:
            return load_trained_checkpoint(ckpt, use_ema=kwargs.get("use_ema", True))
        return load_psld_checkpoint(ckpt, **kwargs)
    except (CheckpointError, KeyError, TypeError) as exc:
        text = str(exc)
        raise CheckpointError(text if str(path) in text else f"{path}: {text}") from None
