"""Small data sets shipped with the package.

:func:`load_digits` serves the UCI "Optical Recognition of Handwritten Digits" images (Alpaydin &
Kaynak, 1998; CC BY 4.0 -- see ``psld_fast/data/DIGITS_LICENSE.md``) stored in
``psld_fast/data/digits.npz`` (1797 images, 8x8, uint8 values 0..16, uint8 labels 0..9; rebuilt by
``tools/make_digits.py``).  It needs no network and no scikit-learn.
"""
from __future__ import annotations

import functools
import io
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["load_digits", "digits_raw", "digits_split_indices", "DIGITS_MAX", "SPLITS", "SPLIT_SEED",
           "HELDOUT_FRACTION"]

#: Largest pixel value of the raw digits (4x4 block counts of a 32x32 bitmap).
DIGITS_MAX = 16


@functools.lru_cache(maxsize=1)
def _digits_npz() -> tuple[np.ndarray, np.ndarray]:
    ref = resources.files("psld_fast") / "data" / "digits.npz"
    with np.load(io.BytesIO(ref.read_bytes())) as f:
        images, labels = f["images"], f["labels"]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The shipped arrays as stored: ``images`` uint8 (1797, 8, 8) in 0..16, ``labels`` uint8 (1797,).

    Read-only views of a cached copy; copy them before modifying.
    """
    return _digits_npz()


#: Names accepted by ``load_digits(split=...)``.
SPLITS = ("all", "train", "heldout")
#: Seed of the fixed train / held-out split (part of its definition: do not change).
SPLIT_SEED = 20210
#: Share of every class that is held out (rounded to the nearest image per class).
HELDOUT_FRACTION = 0.3


@functools.lru_cache(maxsize=4)
def _split_indices(split: str) -> np.ndarray:
    _, labels = _digits_npz()
    rng = np.random.default_rng(SPLIT_SEED)
    held = []
    for c in range(10):                      # classes in order 0..9, one permutation each
        idx = np.flatnonzero(labels == c)
        k = int(round(HELDOUT_FRACTION * idx.size))
        held.append(idx[rng.permutation(idx.size)[:k]])
    held = np.sort(np.concatenate(held))
    out = held if split == "heldout" else np.setdiff1d(np.arange(labels.size), held)
    out.setflags(write=False)
    return out


def digits_split_indices(split: str) -> np.ndarray:
    """File indices (increasing) of the fixed, stratified train / held-out split of the digits.

    ``"heldout"``: ``round(0.3 * n_c)`` images of every class ``c`` (539 in all), drawn by
    ``numpy.random.default_rng(SPLIT_SEED)`` (one permutation per class, classes 0..9 in order);
    ``"train"``: the other 1258; ``"all"``: all 1797.  Deterministic across runs and machines.
    """
    _check_split(split)
    if split == "all":
        return np.arange(_digits_npz()[1].size)
    return _split_indices(split).copy()


def _check_split(split) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in SPLITS)}, got {split!r}")


def _subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` indices of each class drawn without replacement by ``numpy.random.default_rng(seed)``
    (classes visited in order 0..9, one permutation each), returned in increasing (file) order."""
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be a positive int or None, got {per_class!r}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class > idx.size:
            raise ValueError(f"per_class={per_class} but class {int(c)} has only {idx.size} images")
        picked.append(idx[rng.permutation(idx.size)[:per_class]])
    return np.sort(np.concatenate(picked))


def load_digits(size: int = 16, per_class: int | None = None, seed: int = 0, *,
                mode: str = "bicubic", split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Handwritten digits as a float64 image batch in ``[-1, 1]``.

    Args:
        size: output side length.  The 8x8 originals are mapped to ``[-1, 1]`` (``v / 8 - 1``:
            0 -> -1 background, 16 -> +1 ink) and resized with
            ``torch.nn.functional.interpolate(mode=mode, align_corners=False)`` (antialiased when
            shrinking), then clamped to ``[-1, 1]`` (bicubic overshoots).  ``size=8`` returns the
            originals exactly.
        per_class: if given, a deterministic subset of ``per_class`` images of every class
            (at most 174, the smallest class), chosen by ``seed``; ``None`` returns all 1797.
        seed: seed of the subset choice (unused when ``per_class`` is None).
        mode: ``"bicubic"`` (default) or ``"bilinear"``.
        split: ``"all"`` (default: the 1797 images), ``"train"`` (1258) or ``"heldout"`` (539), the
            fixed stratified 70/30 split of :func:`digits_split_indices`.  ``per_class`` then draws
            from within the split.

    Returns:
        ``(images, labels)``: float64 tensor (N, 1, size, size) and int64 tensor (N,), in the
        file's order (subsets keep that order).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    _check_split(split)
    raw, labels = _digits_npz()
    if split != "all":
        idx = _split_indices(split)
        raw, labels = raw[idx], labels[idx]
    if per_class is not None:
        idx = _subset(labels, per_class, seed)
        raw, labels = raw[idx], labels[idx]
    x = torch.from_numpy(raw.astype(np.float64)).unsqueeze(1) * (2.0 / DIGITS_MAX) - 1.0
    if size != raw.shape[-1]:
        x = F.interpolate(x, size=(int(size), int(size)), mode=mode, align_corners=False,
                          antialias=size < raw.shape[-1])
        x = x.clamp_(-1.0, 1.0)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))
