"""Regenerate ``psld_fast/data/digits.npz`` from scikit-learn's copy of the UCI digits.

Source: "Optical Recognition of Handwritten Digits" (E. Alpaydin, C. Kaynak, 1998), UCI Machine
Learning Repository, CC BY 4.0 -- the 1797-image 8x8 version that scikit-learn ships as
``sklearn.datasets.load_digits`` (pixel values 0..16, no download needed).

Conversion: ``images`` (float 0..16) -> uint8 (N, 8, 8), values unchanged (exact: they are integers);
``target`` -> uint8 labels (N,).  Order is scikit-learn's.  Stored with ``np.savez_compressed``.

scikit-learn is NOT a dependency of psld_fast; run this from a throwaway venv::

    python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn numpy
    /tmp/skl/bin/python tools/make_digits.py            # writes psld_fast/data/digits.npz
    /tmp/skl/bin/python tools/make_digits.py --check    # only compare with the shipped file
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "psld_fast" / "data" / "digits.npz"
MAX_BYTES = 200 * 1024


def build() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.asarray(d.images)
    assert imgs.shape == (1797, 8, 8), imgs.shape
    assert np.all(imgs == np.round(imgs)) and imgs.min() >= 0 and imgs.max() <= 16
    labels = np.asarray(d.target)
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    return {"images": imgs.astype(np.uint8), "labels": labels.astype(np.uint8)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing")
    args = ap.parse_args(argv)
    arrays = build()
    if args.check:
        with np.load(args.out) as f:
            same = all(np.array_equal(f[k], v) and f[k].dtype == v.dtype for k, v in arrays.items())
        print("identical" if same else "DIFFERENT")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size} bytes)")
    if size >= MAX_BYTES:
        print(f"error: {size} bytes >= {MAX_BYTES}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
