"""psld_fast.rng: Philox4x32-10 known answers, statistics, and bit-exact agreement with Triton.

The Triton cross-checks run a small kernel that calls ``tl.philox`` / ``tl.uint_to_uniform_float`` /
``tl.pair_uniform_to_normal`` (and ``tl.randn4x`` itself) on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, which must be in the environment before ``triton`` is first imported: see
tests/conftest.py), or compiled on CUDA when a GPU is present.

Bounds: the integer words and the uniforms must agree bit for bit (integer arithmetic, then one
int32 -> float32 conversion and one float32 multiply, both correctly rounded everywhere).  The
normals go through log, sqrt, cos and sin, whose float32 implementations differ between libms
(Sleef/glibc in PyTorch, numpy's SIMD loops in the interpreter, libdevice on the GPU); each is
accurate to a few ulp, so we allow ``|dn| <= NORMAL_ATOL + NORMAL_RTOL * |n|`` with
``NORMAL_ATOL = 2e-6`` and ``NORMAL_RTOL = 4e-6`` (about 32 ulp of float32 at |n| ~ 1).  The worst
case is u1 -> 1 where ``r = sqrt(-2 log u1)`` -> 0 (an absolute error of log near 0 is amplified by
the sqrt), hence the absolute term.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # effective only if triton has not been imported yet
    os.environ.setdefault("TRITON_INTERPRET", "1")

import psld_fast as pf  # noqa: E402
from psld_fast import rng  # noqa: E402
from _devices import triton_device_params

NORMAL_ATOL = 2e-6
NORMAL_RTOL = 4e-6

# Random123 kat_vectors, philox4x32_10: (ctr words, key words, expected output words).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

SEEDS = [0, 1, -1, 2, 12345, -987654321, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3,
         0x0123456789ABCDEF, -0x0123456789ABCDEF, 2**63 - 1, -(2**63)]


def _key_to_seed(k0: int, k1: int) -> int:
    """The int64 seed whose low/high 32-bit words are (k0, k1)."""
    s = (k1 << 32) | k0
    return s - 2**64 if s >= 2**63 else s


# --------------------------------------------------------------------------- pure PyTorch reference

@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = rng.philox4x32(*ctr, *key)
    assert tuple(int(w) for w in out) == expected


def test_philox_broadcasts_and_stays_uint32():
    c0 = torch.arange(1000, dtype=torch.int64)
    words = rng.philox4x32(c0, 5, 6, 0, 0xDEADBEEF, 0xFFFFFFFF)
    for w in words:
        assert w.shape == (1000,) and w.dtype == torch.int64
        assert int(w.min()) >= 0 and int(w.max()) < 2**32
    # each element equals the scalar evaluation
    one = rng.philox4x32(123, 5, 6, 0, 0xDEADBEEF, 0xFFFFFFFF)
    assert [int(w[123]) for w in words] == [int(w) for w in one]


def test_seeds_to_key_splits_low_high():
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    k0, k1 = rng.seeds_to_key(seeds)
    for s, a, b in zip(SEEDS, k0.tolist(), k1.tolist()):
        assert a == s & 0xFFFFFFFF and b == (s >> 32) & 0xFFFFFFFF
        assert _key_to_seed(a, b) == s


def test_uniform_edges():
    r = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2], dtype=torch.int64)
    u = rng.uint32_to_uniform(r)
    assert u.dtype == torch.float32
    assert float(u[0]) == 0.0 and float(u[4]) == 0.0  # 0 and 0xFFFFFFFF (int32 -1 -> 0)
    assert float(u.max()) < 1.0 and float(u.min()) >= 0.0


def test_uniform_and_normal_statistics():
    """1e6 draws (4 streams x 250k): uniforms in [0, 1), normals' moments within 5 sigma."""
    n_el = 250_000
    seeds = torch.tensor([0x5EED], dtype=torch.int64)
    k0, k1 = rng.seeds_to_key(seeds)
    j = torch.arange(n_el, dtype=torch.int64)
    words = rng.philox4x32(j, 3, 1, 0, k0, k1)
    u = torch.cat([rng.uint32_to_uniform(w) for w in words]).double()
    N = u.numel()
    assert N == 1_000_000
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / N ** 0.5
    normals = rng.philox_normals(seeds, n_el, step=3, stream=1)
    n = torch.cat([t.reshape(-1) for t in normals]).double()
    assert torch.isfinite(n).all()
    assert abs(float(n.mean())) < 5 / N ** 0.5
    # var of the sample variance of N(0,1) is 2/N
    assert abs(float(n.var()) - 1.0) < 5 * (2 / N) ** 0.5
    # the four streams are uncorrelated (each correlation ~ N(0, 1/n_el))
    flat = torch.stack([t.reshape(-1).double() for t in normals])
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert float(off.abs().max()) < 5 / n_el ** 0.5
    # Box-Muller's radius is bounded by the 1e-7 clamp of u1
    assert float(n.abs().max()) <= (-2 * torch.log(torch.tensor(1e-7, dtype=torch.float32))).sqrt().item() + 1e-5


def test_counter_layout_independent_of_batch():
    seeds = torch.tensor([7, -7, 2**33], dtype=torch.int64)
    full = rng.philox_normals(seeds, 300, step=4, stream=2)
    for b in range(3):
        alone = rng.philox_normals(seeds[b:b + 1], 300, step=4, stream=2)
        for f, a in zip(full, alone):
            assert torch.equal(f[b], a[0])
    other_step = rng.philox_normals(seeds, 300, step=5, stream=2)
    other_stream = rng.philox_normals(seeds, 300, step=4, stream=3)
    assert not torch.equal(full[0], other_step[0]) and not torch.equal(full[0], other_stream[0])


# --------------------------------------------------------------------------- Triton cross-checks

_kernels = {}


def _get_kernels():
    if _kernels:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def philox_kernel(seed_ptr, c_ptr, int_ptr, unif_ptr, norm_ptr, N, BLOCK: tl.constexpr):
        off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = off < N
        seed = tl.load(seed_ptr + off, mask=mask, other=0)  # int64 key, split by tl.philox
        c0 = tl.load(c_ptr + 4 * off + 0, mask=mask, other=0).to(tl.uint32)
        c1 = tl.load(c_ptr + 4 * off + 1, mask=mask, other=0).to(tl.uint32)
        c2 = tl.load(c_ptr + 4 * off + 2, mask=mask, other=0).to(tl.uint32)
        c3 = tl.load(c_ptr + 4 * off + 3, mask=mask, other=0).to(tl.uint32)
        i0, i1, i2, i3 = tl.philox(seed, c0, c1, c2, c3)
        tl.store(int_ptr + 4 * off + 0, i0.to(tl.int64), mask=mask)
        tl.store(int_ptr + 4 * off + 1, i1.to(tl.int64), mask=mask)
        tl.store(int_ptr + 4 * off + 2, i2.to(tl.int64), mask=mask)
        tl.store(int_ptr + 4 * off + 3, i3.to(tl.int64), mask=mask)
        u0 = tl.uint_to_uniform_float(i0)
        u1 = tl.uint_to_uniform_float(i1)
        u2 = tl.uint_to_uniform_float(i2)
        u3 = tl.uint_to_uniform_float(i3)
        tl.store(unif_ptr + 4 * off + 0, u0, mask=mask)
        tl.store(unif_ptr + 4 * off + 1, u1, mask=mask)
        tl.store(unif_ptr + 4 * off + 2, u2, mask=mask)
        tl.store(unif_ptr + 4 * off + 3, u3, mask=mask)
        n0, n1 = tl.pair_uniform_to_normal(u0, u1)
        n2, n3 = tl.pair_uniform_to_normal(u2, u3)
        tl.store(norm_ptr + 4 * off + 0, n0, mask=mask)
        tl.store(norm_ptr + 4 * off + 1, n1, mask=mask)
        tl.store(norm_ptr + 4 * off + 2, n2, mask=mask)
        tl.store(norm_ptr + 4 * off + 3, n3, mask=mask)

    @triton.jit
    def randn4x_kernel(seed_ptr, out_ptr, N, BLOCK: tl.constexpr):
        # tl.randn4x(seed, j) == our layout with step = stream = 0 (counter (j, 0, 0, 0))
        b = tl.program_id(1)
        seed = tl.load(seed_ptr + b)
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = j < N
        n0, n1, n2, n3 = tl.randn4x(seed, j)
        base = out_ptr + b * 4 * N + j
        tl.store(base, n0, mask=mask)
        tl.store(base + N, n1, mask=mask)
        tl.store(base + 2 * N, n2, mask=mask)
        tl.store(base + 3 * N, n3, mask=mask)

    _kernels.update(philox=philox_kernel, randn4x=randn4x_kernel)
    return _kernels


def _triton_philox(seeds: torch.Tensor, ctr: torch.Tensor, device: str):
    """Run the test kernel: seeds (N,) int64, ctr (N, 4) int64 in [0, 2^32)."""
    k = _get_kernels()["philox"]
    N = seeds.numel()
    BLOCK = 65536 if device == "cpu" else 1024
    s, c = seeds.to(device).contiguous(), ctr.to(device).contiguous()
    ints = torch.empty(N, 4, dtype=torch.int64, device=device)
    unif = torch.empty(N, 4, dtype=torch.float32, device=device)
    norm = torch.empty(N, 4, dtype=torch.float32, device=device)
    k[((N + BLOCK - 1) // BLOCK,)](s, c, ints, unif, norm, N, BLOCK=BLOCK)
    return ints.cpu(), unif.cpu(), norm.cpu()


def _reference(seeds: torch.Tensor, ctr: torch.Tensor):
    k0, k1 = rng.seeds_to_key(seeds)
    words = rng.philox4x32(ctr[:, 0], ctr[:, 1], ctr[:, 2], ctr[:, 3], k0, k1)
    ints = torch.stack(words, dim=1)
    unif = torch.stack([rng.uint32_to_uniform(w) for w in words], dim=1)
    n0, n1 = rng.box_muller(unif[:, 0], unif[:, 1])
    n2, n3 = rng.box_muller(unif[:, 2], unif[:, 3])
    return ints, unif, torch.stack([n0, n1, n2, n3], dim=1)


def _assert_normals_close(got, ref):
    err = (got.double() - ref.double()).abs()
    bound = NORMAL_ATOL + NORMAL_RTOL * ref.double().abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"normals differ by {float(err.flatten()[worst]):.3g} at |n| = {float(ref.flatten()[worst].abs()):.3g}")


@pytest.mark.parametrize("device", triton_device_params())
def test_triton_philox_known_answers(device):
    seeds = torch.tensor([_key_to_seed(*key) for _, key, _ in KAT], dtype=torch.int64)
    ctr = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64)
    ints, _, _ = _triton_philox(seeds, ctr, device)
    assert [tuple(r) for r in ints.tolist()] == [e for _, _, e in KAT]


@pytest.mark.parametrize("device", triton_device_params())
def test_triton_philox_matches_reference(device):
    """Every (seed, counter) pair, including negative and >= 2^32 seeds, bit for bit."""
    g = torch.Generator().manual_seed(1)
    special = torch.tensor([0, 1, 2, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    rand_seeds = torch.randint(-(2**63), 2**63 - 1, (16,), generator=g, dtype=torch.int64)
    seeds_list = torch.cat([torch.tensor(SEEDS, dtype=torch.int64), rand_seeds])
    # counters: all combinations of special words in each slot, plus random ones
    ctr_rows = []
    for i, w in enumerate(special.tolist()):
        for slot in range(4):
            row = [i * 3 + 1, 7, 0, 0]
            row[slot] = w
            ctr_rows.append(row)
    ctr_rows += torch.randint(0, 2**32, (64, 4), generator=g, dtype=torch.int64).tolist()
    ctr = torch.tensor(ctr_rows, dtype=torch.int64)
    S, C = seeds_list.numel(), ctr.shape[0]
    seeds = seeds_list.repeat_interleave(C)
    ctr = ctr.repeat(S, 1)
    ints, unif, norm = _triton_philox(seeds, ctr, device)
    r_ints, r_unif, r_norm = _reference(seeds, ctr)
    assert torch.equal(ints, r_ints)
    assert torch.equal(unif, r_unif)
    assert float(unif.min()) >= 0.0 and float(unif.max()) < 1.0
    _assert_normals_close(norm, r_norm)


@pytest.mark.parametrize("device", triton_device_params())
def test_triton_randn4x_is_our_layout(device):
    """tl.randn4x(seed, j) equals psld_fast.rng.philox_normals(seed, ..., step=0, stream=0)."""
    k = _get_kernels()["randn4x"]
    seeds = torch.tensor([0, -1, 2**32, 2**40 + 3, -(2**63)], dtype=torch.int64)
    N = 70_000  # > one interpreter block, not a multiple of it
    BLOCK = 65536 if device == "cpu" else 1024
    out = torch.empty(seeds.numel(), 4, N, dtype=torch.float32, device=device)
    k[((N + BLOCK - 1) // BLOCK, seeds.numel())](seeds.to(device), out, N, BLOCK=BLOCK)
    ref = torch.stack(rng.philox_normals(seeds, N, step=0, stream=0), dim=1)
    _assert_normals_close(out.cpu(), ref)


@pytest.mark.parametrize("device", triton_device_params())
def test_triton_normal_statistics(device):
    """1e6 Triton normals: moments within 5 sigma, all finite, radius bounded by the clamp."""
    N = 250_000
    seeds = torch.full((N,), 0x5EED, dtype=torch.int64)
    ctr = torch.stack([torch.arange(N, dtype=torch.int64), torch.full((N,), 3, dtype=torch.int64),
                       torch.ones(N, dtype=torch.int64), torch.zeros(N, dtype=torch.int64)], dim=1)
    _, unif, norm = _triton_philox(seeds, ctr, device)
    n = norm.double().reshape(-1)
    M = n.numel()
    assert float(unif.min()) >= 0.0 and float(unif.max()) < 1.0
    assert torch.isfinite(n).all()
    assert abs(float(n.mean())) < 5 / M ** 0.5
    assert abs(float(n.var()) - 1.0) < 5 * (2 / M) ** 0.5


# --------------------------------------------------------------------------- any device (issue 15.1)

def test_reference_rng_builds_constants_on_the_seeds_device():
    """Meta tensors stand in for CUDA: a CPU-made constant mixed with them is a device error, so
    this catches every host-side constant on the reference path without a GPU."""
    seeds = torch.arange(3, dtype=torch.int64, device="meta")
    normals = rng.philox_normals(seeds, 5, step=7, stream=1)
    assert all(t.device.type == "meta" and t.shape == (3, 5) and t.dtype == torch.float32 for t in normals)
    words = rng.philox4x32(torch.arange(4, device="meta"), 1, 2, 0, 5, 6)
    assert all(w.device.type == "meta" and w.shape == (4,) for w in words)
    with pytest.raises(ValueError, match="several devices"):
        rng.philox4x32(torch.arange(4, device="meta"), torch.arange(4), 2, 0, 5, 6)


def test_reference_op_and_program_noise_on_meta():
    from psld_fast import ops
    from psld_fast.program import affine_step_reference
    from psld_fast.reference import ProgramNoise

    u = torch.empty(3, 2, 4, device="meta")
    seeds = torch.arange(3, dtype=torch.int64, device="meta")
    coef = [0.5] * 16
    out = affine_step_reference(u, u.to(torch.bfloat16), seeds, coef, 2, 0)
    assert out.device.type == "meta" and out.shape == u.shape
    ops._reference_step_(u, None, seeds, coef, 2, 0)  # the op's fallback
    ops.get_step_fn("reference")(u, u, seeds, coef, 2, 0)
    program = pf.compile_sampler("sscs", pf.PSLD(), nfe=6)
    noise = ProgramNoise(program, seeds, (2, 2))
    assert noise()[0].device.type == "meta"


def test_reference_sampling_loop_on_meta():
    """The whole reference sampling loop (sample's batch body) runs on meta tensors; only the final
    NaN/Inf read-back needs data, so it is skipped here."""
    from psld_fast import ops
    from psld_fast.api import run_program

    model = pf.get_preset("ring2d").to("meta")
    program = pf.compile_sampler("reduced_oba", model.sde, nfe=8)
    seeds = torch.arange(4, dtype=torch.int64, device="meta")
    u = run_program(model, program, seeds, ops.get_step_fn("reference"), dtype=torch.float32,
                    device="meta", check=False)
    assert u.device.type == "meta" and u.shape == (4, 4)
