"""Tests of psld_fast.datasets (shipped digits) and psld_fast.images (PNG grids)."""
from __future__ import annotations

import zlib
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

import psld_fast.images as images
from psld_fast.datasets import digits_raw, load_digits
from psld_fast.images import make_grid, save_grid, save_png, to_uint8


# ---------------------------------------------------------------------------------------------
# digits

def test_shipped_files():
    data = resources.files("psld_fast") / "data"
    npz = data / "digits.npz"
    assert len(npz.read_bytes()) < 200 * 1024
    lic = (data / "DIGITS_LICENSE.md").read_text()
    assert "CC BY 4.0" in lic and "Alpaydin" in lic
    raw, labels = digits_raw()
    assert raw.shape == (1797, 8, 8) and raw.dtype == np.uint8 and raw.max() == 16
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_load_digits_shapes_range():
    x, y = load_digits()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float64
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0 and torch.isfinite(x).all()
    xb, _ = load_digits(12, mode="bilinear")
    assert xb.shape == (1797, 1, 12, 12) and xb.min() >= -1 and xb.max() <= 1
    xs, _ = load_digits(4)
    assert xs.shape == (1797, 1, 4, 4) and xs.min() >= -1 and xs.max() <= 1


def test_load_digits_size8_is_exact_rescale():
    raw, labels = digits_raw()
    x, y = load_digits(8)
    np.testing.assert_array_equal(x[:, 0].numpy(), raw / 8.0 - 1.0)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_upsampling_is_smooth_and_preserves_mean():
    x8, _ = load_digits(8)
    x16, _ = load_digits(16, mode="bilinear")
    # bilinear with align_corners=False (no clamping needed) keeps each image's mean up to the
    # border effect; and neighbouring pixels differ by at most half an original step
    assert (x16.mean((1, 2, 3)) - x8.mean((1, 2, 3))).abs().max() < 0.1
    assert (x16[..., 1:] - x16[..., :-1]).abs().max() <= (x8[..., 1:] - x8[..., :-1]).abs().max() / 2 + 1e-12


def test_load_digits_deterministic_and_per_class():
    a, la = load_digits(per_class=7, seed=1)
    b, lb = load_digits(per_class=7, seed=1)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (70, 1, 16, 16)
    assert torch.bincount(la, minlength=10).tolist() == [7] * 10
    c, lc = load_digits(per_class=7, seed=2)
    assert not torch.equal(a, c)
    # a subset of the full set, in file order
    full, lfull = load_digits()
    hits = [int(torch.nonzero((full == img).all(dim=(1, 2, 3)))[0]) for img in a[:5]]
    assert hits == sorted(hits) and all(lfull[h] == la[i] for i, h in enumerate(hits))
    assert load_digits(per_class=174)[0].shape[0] == 1740
    with pytest.raises(ValueError):
        load_digits(per_class=175)
    with pytest.raises(ValueError):
        load_digits(per_class=0)


def test_split_disjoint_stratified_deterministic_union_all():
    from psld_fast.datasets import digits_split_indices

    tr, ho = digits_split_indices("train"), digits_split_indices("heldout")
    assert np.intersect1d(tr, ho).size == 0                                   # disjoint
    np.testing.assert_array_equal(np.union1d(tr, ho), np.arange(1797))        # union = all
    np.testing.assert_array_equal(digits_split_indices("all"), np.arange(1797))
    assert (np.diff(tr) > 0).all() and (np.diff(ho) > 0).all()               # file order
    _, labels = digits_raw()
    n_c = np.bincount(labels, minlength=10)
    ho_c = np.bincount(labels[ho], minlength=10)
    np.testing.assert_array_equal(ho_c, np.round(0.3 * n_c).astype(int))   # stratified: 30% of each class
    assert ho.size == 539 and tr.size == 1258
    # deterministic: a fresh computation (cache cleared) gives the same indices, and its first
    # held-out indices are pinned so that a change of seed or of the drawing rule is caught
    from psld_fast import datasets as D

    D._split_indices.cache_clear()
    np.testing.assert_array_equal(D.digits_split_indices("heldout"), ho)
    assert ho[:8].tolist() == [0, 2, 3, 4, 7, 8, 11, 15]
    # load_digits serves the same images and labels
    full, lfull = load_digits(8)
    xt, lt = load_digits(8, split="train")
    xh, lh = load_digits(8, split="heldout")
    assert torch.equal(xt, full[tr]) and torch.equal(lh, lfull[ho]) and torch.equal(xh, full[ho])
    assert load_digits(split="all")[0].shape[0] == 1797
    # per_class draws within the split
    xs, ls = load_digits(8, split="heldout", per_class=5, seed=3)
    assert torch.bincount(ls, minlength=10).tolist() == [5] * 10
    assert all(bool((xh == img).all(dim=(1, 2, 3)).any()) for img in xs)
    with pytest.raises(ValueError, match="split must be one of"):
        load_digits(split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        digits_split_indices("validation")


# ---------------------------------------------------------------------------------------------
# images

def test_to_uint8_quantisation():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 255, 255, 255]
    assert to_uint8(x.numpy()).dtype == torch.uint8
    u = torch.arange(5, dtype=torch.uint8)
    assert to_uint8(u) is u


@pytest.fixture(params=["pillow", "pure"])
def backend(request, monkeypatch):
    if request.param == "pure":
        monkeypatch.setattr(images, "_PIL", None)
    return request.param


@pytest.mark.parametrize("c", [1, 3])
def test_save_grid_roundtrip(tmp_path, backend, c):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, c, 16, 16, generator=g, dtype=torch.float64) * 2.4 - 1.2   # some clipped
    path = save_grid(x, tmp_path / "grid.png", nrow=3, padding=1, scale=4)
    assert path == tmp_path / "grid.png"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]      # no temp file left behind
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and img.mode == ("L" if c == 1 else "RGB")
    # 3 columns, ceil(7/3) = 3 rows; (n * (16 + 1) + 1) * 4
    assert img.size == ((3 * 17 + 1) * 4, (3 * 17 + 1) * 4)
    arr = np.asarray(img)
    expected = make_grid(x, nrow=3, padding=1, scale=4)
    np.testing.assert_array_equal(arr.reshape(expected.shape), expected)
    # tile (1, 2) = image 5, pixel (0, 0) -> grid pixel (1 + 17, 1 + 2 * 17) before scaling
    tile = expected[(1 + 17) * 4:(1 + 17 + 16) * 4:4, (1 + 34) * 4:(1 + 34 + 16) * 4:4]
    np.testing.assert_array_equal(tile, to_uint8(x[5]).numpy().transpose(1, 2, 0))
    assert expected[0, 0, 0] == 128                                  # padding colour


def test_pure_and_pillow_png_decode_identically(tmp_path, monkeypatch):
    x, _ = load_digits(per_class=1)
    save_grid(x, tmp_path / "pil.png", nrow=5)
    monkeypatch.setattr(images, "_PIL", None)
    save_grid(x, tmp_path / "pure.png", nrow=5)
    data = (tmp_path / "pure.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    # CRC of IHDR is right
    assert int.from_bytes(data[29:33], "big") == zlib.crc32(data[12:29])
    a, b = Image.open(tmp_path / "pil.png"), Image.open(tmp_path / "pure.png")
    assert a.size == b.size == ((5 * 17 + 1) * 4, (2 * 17 + 1) * 4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_png_single(tmp_path, backend):
    x = torch.linspace(-1, 1, 3 * 5 * 4).reshape(3, 5, 4)
    save_png(x, tmp_path / "one.png")
    img = Image.open(tmp_path / "one.png")
    assert img.size == (4, 5) and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), to_uint8(x).numpy().transpose(1, 2, 0))
    save_png(x[:1], tmp_path / "one.png", scale=2)                   # overwrite, greyscale
    img = Image.open(tmp_path / "one.png")
    assert img.size == (8, 10) and img.mode == "L"
    with pytest.raises(ValueError):
        save_png(torch.zeros(2, 1, 4, 4), tmp_path / "bad.png")
    with pytest.raises(ValueError):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")
