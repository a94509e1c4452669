"""Per-sample counter-based RNG: Philox4x32-10 + Box-Muller, exactly as Triton computes them.

This is the reference definition of every random number the library draws.  The C++ header
``csrc/philox.h`` (CPU and CUDA kernels) and the Triton kernel (``tl.philox``) implement the same
function; tests check the integer streams bit for bit and the normals to float32 rounding.

Layout (the reproducibility contract):

* key   = the sample's 64-bit seed (``k0`` = low 32 bits, ``k1`` = high 32 bits);
* counter = ``(j, step, stream, 0)`` where ``j`` is the flat element index inside one half of one
  sample (``0 <= j < C * H * W``), ``step`` the stage index of the sampler program and ``stream`` a
  user-level stream id;
* one Philox call gives four uint32 words -> four normals ``(n0, n1, n2, n3)``; ``(n0, n1)`` is the
  first noise draw of the stage for the coordinate pair ``(x_j, m_j)`` and ``(n2, n3)`` the second.

Because the counter never contains the batch position, a sample depends only on its own seed.
All integer arithmetic is done in int64 tensors holding uint32 values, so this runs on any device:
constants are Python numbers or made on the operands' device (never a host-to-device copy, so the
functions are safe inside CUDA-graph capture and under ``torch.cuda.set_sync_debug_mode``).
"""
from __future__ import annotations

import torch

__all__ = ["philox4x32", "uint32_to_uniform", "box_muller", "philox_normals", "seeds_to_key",
           "PHILOX_ROUNDS"]

PHILOX_ROUNDS = 10
_M0 = 0xD2511F53  # Random123's PHILOX_M4x32_0 (Triton's PHILOX_ROUND_A)
_M1 = 0xCD9E8D57  # PHILOX_M4x32_1 (PHILOX_ROUND_B)
_W0 = 0x9E3779B9  # key bump, golden ratio
_W1 = 0xBB67AE85  # key bump, sqrt(3) - 1
_MASK = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a uint32 constant ``a`` and a uint32 tensor ``b``.

    Split b into 16-bit halves so no intermediate leaves the int64 range.
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK
    return hi, lo


def _operand_device(values) -> torch.device:
    """The device of the tensor operands (Python ints are placed there); CPU when there are none."""
    devices = {v.device for v in values if isinstance(v, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"philox4x32: operands on several devices: {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values (broadcasting).

    Operands are tensors (all on one device) or Python ints, which are made on that device.
    Returns the four output words as int64 tensors in ``[0, 2^32)``.
    """
    args = (c0, c1, c2, c3, k0, k1)
    device = _operand_device(args)
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(*(
        v.to(torch.int64) if isinstance(v, torch.Tensor)
        else torch.full((), int(v), dtype=torch.int64, device=device) for v in args))
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def uint32_to_uniform(r: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: a float32 in [0, 1)."""
    signed = torch.where(r >= 2**31, r - 2**32, r)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.full((), 4.6566127342e-10, dtype=torch.float32, device=r.device)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal`` in float32."""
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = torch.full((), 6.283185307179586, dtype=torch.float32, device=u2.device) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def seeds_to_key(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 seeds -> (k0, k1) uint32 words (the seed's bits, as Triton splits a uint64 seed)."""
    seeds = seeds.to(torch.int64)
    return seeds & _MASK, (seeds >> 32) & _MASK


def philox_normals(seeds: torch.Tensor, numel: int, step: int, stream: int = 0):
    """The four normal streams of one stage for a batch.

    Args:
        seeds: (B,) int64 per-sample seeds.
        numel: elements per half per sample (``C * H * W``).
        step: stage index (Philox counter word 1).
        stream: stream id (counter word 2).
    Returns:
        four float32 tensors of shape (B, numel): ``n0, n1`` (first draw for x, m) and ``n2, n3``
        (second draw for x, m).
    """
    if numel >= 2**32:
        raise ValueError(f"philox_normals: {numel} elements per half exceed the 32-bit counter")
    k0, k1 = seeds_to_key(seeds)
    j = torch.arange(numel, dtype=torch.int64, device=seeds.device)
    r0, r1, r2, r3 = philox4x32(j[None, :], step & _MASK, stream & _MASK, 0, k0[:, None], k1[:, None])
    n0, n1 = box_muller(uint32_to_uniform(r0), uint32_to_uniform(r1))
    n2, n3 = box_muller(uint32_to_uniform(r2), uint32_to_uniform(r3))
    return n0, n1, n2, n3
