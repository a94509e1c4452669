"""Images in ``[-1, 1]`` to PNG files: one image or a grid, with or without Pillow.

PNG encoding uses Pillow when it can be imported and otherwise a small pure-Python writer (zlib,
8-bit greyscale or RGB, filter 0).  Files are written atomically: to a temporary file in the same
folder, then ``os.replace``.
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import write_atomic

try:  # optional
    from PIL import Image as _PIL
except ImportError:  # pragma: no cover - exercised by monkeypatching _PIL in the tests
    _PIL = None

__all__ = ["to_uint8", "make_grid", "save_grid", "save_png", "encode_png"]


def to_uint8(images: Any) -> torch.Tensor:
    """The PSLD/EDM quantisation ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` of values in [-1, 1].

    Accepts a tensor or array of any shape, computed in its floating dtype (integer input: float32);
    returns a uint8 tensor of the same shape.  A uint8 input is returned as is.
    """
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _as_nchw(images: Any) -> torch.Tensor:
    x = torch.as_tensor(images).detach().cpu()
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no images")
    return x


def make_grid(images: Any, nrow: int | None = None, padding: int = 1, scale: int = 4,
              pad_value: int = 128) -> np.ndarray:
    """Tile images (N, C, H, W) in ``[-1, 1]`` (clipped; uint8 input is taken as is) into one
    uint8 array (rows, cols, C).

    ``nrow`` images per row (default ``ceil(sqrt(N))``), ``padding`` pixels of ``pad_value``
    between tiles and around the border, then the whole grid is upscaled by ``scale`` with nearest
    neighbour.  Size: ``(r * (H + padding) + padding) * scale`` by
    ``(nrow * (W + padding) + padding) * scale`` with ``r = ceil(N / nrow)``.
    """
    x = to_uint8(_as_nchw(images)).numpy()
    n, c, h, w = x.shape
    nrow = int(nrow) if nrow is not None else math.ceil(math.sqrt(n))
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError("need nrow >= 1, padding >= 0, scale >= 1")
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                   int(pad_value), dtype=np.uint8)
    for k in range(n):
        i, j = divmod(k, nrow)
        y0, x0 = padding + i * (h + padding), padding + j * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = x[k].transpose(1, 2, 0)
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    return grid


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _encode_png_pure(arr: np.ndarray) -> bytes:
    """Minimal PNG: 8-bit greyscale (colour type 0) or RGB (2), no interlace, filter 0 per row."""
    h, w, c = arr.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(arr).reshape(h, w * c)], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + _png_chunk(b"IEND", b""))


def _encode_png_pil(arr: np.ndarray) -> bytes:
    import io

    img = _PIL.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, "L" if arr.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array (H, W), (H, W, 1) or (H, W, 3): Pillow if available, else the
    pure-Python writer."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.size == 0:
        raise ValueError(f"expected a non-empty uint8 (H, W[, 1|3]) array, got {arr.dtype} {arr.shape}")
    return _encode_png_pil(arr) if _PIL is not None else _encode_png_pure(arr)


def save_grid(images: Any, path: str | os.PathLike, nrow: int | None = None, padding: int = 1,
              scale: int = 4, *, pad_value: int = 128) -> Path:
    """Write images (N, C, H, W) in ``[-1, 1]`` (C = 1 or 3; clipped) as one PNG grid.

    Layout and size as in :func:`make_grid` (nearest-neighbour upscale by ``scale`` so that 16x16
    digits are visible).  Greyscale PNG for C = 1, RGB for C = 3.  Atomic write; returns the path.
    """
    return write_atomic(path, encode_png(make_grid(images, nrow, padding, scale, pad_value)))


def save_png(image: Any, path: str | os.PathLike, scale: int = 1) -> Path:
    """Write one image (C, H, W), (1, C, H, W) or (H, W) in ``[-1, 1]`` as a PNG (no padding;
    nearest-neighbour upscale by ``scale``).  Atomic write; returns the path."""
    x = _as_nchw(image)
    if x.shape[0] != 1:
        raise ValueError(f"save_png takes one image, got a batch of {x.shape[0]}; use save_grid")
    return write_atomic(path, encode_png(make_grid(x, 1, 0, scale)))
