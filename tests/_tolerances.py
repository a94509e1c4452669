"""One tolerance table for the fused-step kernels, and a verbose allclose.

The kernels compute in float32 like the reference and add the terms in the same order, so the
deterministic part (P, Q) agrees to the bit; the differences come from the normals (vectorised
Cephes log/sincos on CPU, libdevice on CUDA, Sleef/libm in the reference: a few float32 ulps, see
NORMAL_TOL) and, for half-precision states, from the final rounding, which such a difference can
flip by one ulp of the state dtype.
"""
from __future__ import annotations

import torch

# Normals vs psld_fast.rng.philox_normals: |a - b| <= NORMAL_TOL * (1 + |b|).
NORMAL_TOL = 2e-6

# Result of one step vs affine_step_reference (coefficients of order 1), by state dtype.
STEP_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),    # a few ulps of the normals times |R| <= 1
    torch.float16: dict(atol=1e-3, rtol=1e-3),    # one fp16 ulp (2^-10 relative) after rounding
    torch.bfloat16: dict(atol=8e-3, rtol=8e-3),   # one bf16 ulp (2^-7 relative) after rounding
}


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                         what: str = "") -> None:
    """assert_allclose whose message gives the max/mean error and the worst index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs()
    err = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(err), err)
    excess = err - (atol + rtol * e.abs())
    bad = (excess > 0) | torch.isnan(err)
    if bool(bad.any()):
        flat = int(torch.nan_to_num(excess, nan=float("inf")).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements outside atol={atol}, rtol={rtol}; "
            f"max err {float(torch.nan_to_num(err, nan=float('inf')).max()):.3g}, "
            f"mean err {float(torch.nan_to_num(err).mean()):.3g}; worst at {idx}: "
            f"actual {float(a[idx]):.8g} expected {float(e[idx]):.8g}")
