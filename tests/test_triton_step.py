"""The Triton fused affine step ``psld_fast::affine_step_triton_`` against ``affine_step_reference``.

Runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first
imported: tests/conftest.py does it when no GPU is present) and on CUDA when a GPU is present.

Tolerance table (``|got - ref| <= atol + rtol * |ref|``, compared in float64), keyed by
(state dtype, eps dtype).  Only the state dtype matters: eps is upcast to float32 exactly by both
sides.  float32: the kernel's sums may be contracted into FMAs and its normals come from another
libm (see tests/test_rng.py: <= 2e-6 + 4e-6 |n| per normal, times |R| <= 1, four normals), so
atol = rtol = 1e-5.  float16 / bfloat16: the float32 results then round to the storage type, and two
float32 values a few ulp apart can round to neighbouring values: one ulp of the storage type,
rtol = 2^-10 (fp16) and 2^-7 (bf16), plus atol = 1e-5 for results near 0.  (The interpreter's own
fp32 -> bf16 cast truncates; the kernel rounds to nearest even by hand there, as the GPU does.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():  # effective only if triton has not been imported yet
    os.environ.setdefault("TRITON_INTERPRET", "1")

from psld_fast.program import affine_step_reference  # noqa: E402
from _devices import triton_device_params
from _step_cases import (COEFS, MS_CASES, SHARED_CASES, StepCase, make_inputs, make_ms_inputs, offset_by_one,
                         run_ms_case, run_shared_case)

try:
    import triton  # noqa: F401
    from psld_fast import triton_step
except ImportError:  # pragma: no cover - no triton installed
    triton_step = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 2.0**-10), torch.bfloat16: (1e-5, 2.0**-7)}
#: (state dtype, eps dtype) -> (atol, rtol)
TOL = {(s, e): _STATE_TOL[s] for s in DTYPES for e in DTYPES}


@pytest.fixture(params=triton_device_params())
def device(request):
    return request.param


def op(u, eps, seeds, coef, step, stream=0):
    return torch.ops.psld_fast.affine_step_triton_(u, eps, seeds, coef, step, stream)


def _coef(gen, P=True, Q=True, R=True):
    """Realistic coefficients: P near the identity, Q and R of order 0.1-0.5, R lower triangular."""
    c = (torch.rand(16, generator=gen, dtype=torch.float64) - 0.5)
    c[[0, 3]] += 1.0
    c[4:8] *= 0.6
    c[[9, 13]] = 0.0  # R upper-right entries (lower-triangular R1, R2)
    if not P:
        c[0:4] = 0.0
    if not Q:
        c[4:8] = 0.0
    if not R:
        c[8:16] = 0.0
    return c.tolist()


def _seeds(B, gen):
    s = torch.randint(-(2**63), 2**63 - 1, (B,), generator=gen, dtype=torch.int64)
    base = torch.tensor([0, -1, 2**32, 2**32 + 5, 12345], dtype=torch.int64)
    s[: min(B, 5)] = base[: min(B, 5)]
    return s


def _assert_close(got, ref, state_dtype, eps_dtype=torch.float32):
    atol, rtol = TOL[(state_dtype, eps_dtype)]
    assert got.dtype == ref.dtype == state_dtype and got.shape == ref.shape
    g, r = got.cpu().double(), ref.cpu().double()
    assert torch.equal(torch.isnan(g), torch.isnan(r))
    g, r = torch.nan_to_num(g), torch.nan_to_num(r)
    err = (g - r).abs()
    bound = atol + rtol * r.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(f"{state_dtype}/{eps_dtype}: |got - ref| = {float(err.flatten()[i]):.3g} > "
                             f"{float(bound.flatten()[i]):.3g} at ref = {float(r.flatten()[i]):.6g}")


def _run(u, eps, seeds, coef, step, stream=0):
    """Apply the Triton op to a clone; return it with the reference result."""
    ref = affine_step_reference(u, eps, seeds, coef, step, stream)
    v = u.clone()
    assert op(v, eps, seeds, coef, step, stream) is None
    return v, ref


# --------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps_dtype", DTYPES, ids=str)
def test_matches_reference_dtypes_and_sizes(device, state_dtype, eps_dtype):
    """Every (state, eps) dtype pair at 1, 7, 127 and 4097 elements per half (blocks' edges)."""
    gen = torch.Generator().manual_seed(3 * DTYPES.index(state_dtype) + DTYPES.index(eps_dtype))
    for D, shape in ((1, (3, 2)), (7, (3, 2, 7)), (127, (2, 2, 127)), (4097, (2, 2, 4097))):
        u = torch.randn(shape, generator=gen).to(state_dtype).to(device)
        eps = torch.randn(shape, generator=gen).to(eps_dtype).to(device)
        seeds = _seeds(shape[0], gen).to(device)
        got, ref = _run(u, eps, seeds, _coef(gen), step=D % 5 + 1, stream=D % 3)
        _assert_close(got, ref, state_dtype, eps_dtype)


@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_matches_reference_image_batch(device, state_dtype):
    """A (64, 6, 32, 32) batch (C = 3, D = 3072), eps of another dtype."""
    gen = torch.Generator().manual_seed(7)
    eps_dtype = {torch.float32: torch.bfloat16, torch.float16: torch.float32, torch.bfloat16: torch.float16}[state_dtype]
    shape = (64, 6, 32, 32)
    u = torch.randn(shape, generator=gen).to(state_dtype).to(device)
    eps = torch.randn(shape, generator=gen).to(eps_dtype).to(device)
    seeds = torch.arange(1000, 1064, dtype=torch.int64).to(device)
    got, ref = _run(u, eps, seeds, _coef(gen), step=11, stream=2)
    _assert_close(got, ref, state_dtype, eps_dtype)


@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_prior_draw_ignores_garbage_state(device, state_dtype):
    """All P = 0: u is not read (NaN garbage from torch.empty must not leak), with and without eps."""
    gen = torch.Generator().manual_seed(3)
    shape = (4, 4, 9, 9)
    u = torch.full(shape, float("nan"), dtype=state_dtype, device=device)
    seeds = _seeds(4, gen).to(device)
    got, ref = _run(u, None, seeds, _coef(gen, P=False, Q=False), step=0)
    assert torch.isfinite(got.float()).all()
    _assert_close(got, ref, state_dtype)
    eps = torch.randn(shape, generator=gen).to(device)
    got, ref = _run(u, eps, seeds, _coef(gen, P=False), step=1)
    assert torch.isfinite(got.float()).all()
    _assert_close(got, ref, state_dtype)


def test_eps_none_ignores_q(device):
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(3, 4, 5, 5, generator=gen).to(device)
    seeds = _seeds(3, gen).to(device)
    coef = _coef(gen)
    got, ref = _run(u, None, seeds, coef, step=2)
    _assert_close(got, ref, torch.float32)
    coef_q0 = coef[:4] + [0.0] * 4 + coef[8:]
    got_q0, _ = _run(u, None, seeds, coef_q0, step=2)
    assert torch.equal(got, got_q0)


def test_nan_eps_propagates_like_reference(device):
    """The reference reads eps whenever it is given (even with Q = 0): NaN in, NaN out."""
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(2, 2, 8, generator=gen).to(device)
    eps = torch.randn(2, 2, 8, generator=gen).to(device)
    eps[0, 0, 3] = float("nan")
    got, ref = _run(u, eps, _seeds(2, gen).to(device), _coef(gen), step=1)
    _assert_close(got, ref, torch.float32)
    assert torch.isnan(got[0, :, 3]).all()


@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_no_noise_is_deterministic(device, state_dtype):
    """All R = 0: no random numbers, so the seeds do not matter."""
    gen = torch.Generator().manual_seed(6)
    u = torch.randn(3, 6, 7, 7, generator=gen).to(state_dtype).to(device)
    eps = torch.randn(3, 6, 7, 7, generator=gen).to(device)
    coef = _coef(gen, R=False)
    got, ref = _run(u, eps, _seeds(3, gen).to(device), coef, step=9)
    _assert_close(got, ref, state_dtype)
    other, _ = _run(u, eps, torch.tensor([5, 6, 7], dtype=torch.int64, device=device), coef, step=123)
    assert torch.equal(got, other)


def test_step_and_stream_use_low_32_bits(device):
    gen = torch.Generator().manual_seed(8)
    u = torch.randn(2, 2, 300, generator=gen).to(device)
    seeds = _seeds(2, gen).to(device)
    coef = _coef(gen)
    got, ref = _run(u, None, seeds, coef, step=2**32 - 1, stream=2**31 + 3)
    _assert_close(got, ref, torch.float32)
    wrapped, _ = _run(u, None, seeds, coef, step=-1, stream=2**31 + 3 - 2**32)
    assert torch.equal(got, wrapped)
    other_step, _ = _run(u, None, seeds, coef, step=2**32 - 2, stream=2**31 + 3)
    other_stream, _ = _run(u, None, seeds, coef, step=2**32 - 1, stream=2**31 + 4)
    assert not torch.equal(got, other_step) and not torch.equal(got, other_stream)


# --------------------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("state_dtype", (torch.float32, torch.bfloat16), ids=str)
def test_batch_invariance(device, state_dtype):
    """A sample's result depends on its seed only: not on the batch size or its position (bit-exact)."""
    gen = torch.Generator().manual_seed(9)
    B = 5
    u = torch.randn(B, 4, 17, 17, generator=gen).to(state_dtype).to(device)
    eps = torch.randn(B, 4, 17, 17, generator=gen).to(device)
    seeds = _seeds(B, gen).to(device)
    coef = _coef(gen)
    full, _ = _run(u, eps, seeds, coef, step=4)
    for b in range(B):
        alone, _ = _run(u[b:b + 1].clone(), eps[b:b + 1], seeds[b:b + 1], coef, step=4)
        assert torch.equal(alone[0], full[b])
    perm = torch.tensor([3, 0, 4, 1, 2], device=device)
    permuted, _ = _run(u[perm].contiguous(), eps[perm], seeds[perm], coef, step=4)
    assert torch.equal(permuted, full[perm])
    # same seed at two positions with the same state: identical samples
    dup, _ = _run(u[[1, 1]].contiguous(), eps[[1, 1]], seeds[[1, 1]], coef, step=4)
    assert torch.equal(dup[0], dup[1]) and torch.equal(dup[0], full[1])


@pytest.mark.parametrize("shape", [(1000, 2, 1), (7, 2, 3), (33, 4, 5)], ids=str)
@pytest.mark.parametrize("draws", [1, 2])
def test_small_halves_flat_layout(device, shape, draws, monkeypatch):
    """Small halves run in the flattened (sample, element) layout: they match the reference, and the
    per-sample layout gives the same bits (the Philox counter never holds the batch position)."""
    if triton_step is None:
        pytest.skip("triton is not installed")
    gen = torch.Generator().manual_seed(31 + draws)
    u = torch.randn(shape, generator=gen).to(device)
    eps = torch.randn(shape, generator=gen).to(torch.bfloat16).to(device)
    seeds = _seeds(shape[0], gen).to(device)
    coef = _coef(gen)
    if draws == 1:
        coef[12:16] = [0.0] * 4  # R2 = 0: the kernel variant without the second Box-Muller pair
    D = (shape[1] // 2) * shape[2]
    assert triton_step.launch_config(D, torch.device(device).type, shape[0])[2], "expected the flat layout"
    flat, ref = _run(u, eps, seeds, coef, step=5, stream=1)
    _assert_close(flat, ref, torch.float32, torch.bfloat16)
    original = triton_step.launch_config

    def per_sample(D, device_type, B=1):
        block, warps, _ = original(D, device_type, 1)
        return block, warps, False

    monkeypatch.setattr(triton_step, "launch_config", per_sample)
    blocked, _ = _run(u, eps, seeds, coef, step=5, stream=1)
    assert torch.equal(flat, blocked)


@pytest.mark.parametrize("case", SHARED_CASES, ids=lambda c: c.id)
def test_shared_cases(device, case):
    """The case matrix every kernel runs (tests/_step_cases.py), storage offsets included."""
    if triton_step is None:
        pytest.skip("triton is not installed")

    def close(got, expected, what):
        try:
            _assert_close(got, expected, case.state_dtype)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None

    run_shared_case(case, op, device, close)


@pytest.mark.parametrize("case", MS_CASES, ids=lambda c: c.id)
def test_multistep_cases(device, case):
    """The multistep op ms_step_triton_ (the same kernel with dbuf: D_prev read, this call's D
    written) against ms_step_reference: D within float32 rounding (the kernel's sums may become
    FMAs on a GPU), u within the state tolerance, dbuf untouched without record."""
    if triton_step is None:
        pytest.skip("triton is not installed")

    def close(got, expected, what):
        try:
            _assert_close(got, expected, case.step.state_dtype)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None

    run_ms_case(case, torch.ops.psld_fast.ms_step_triton_, device, close, d_exact=False)


def test_multistep_op_errors(device):
    if triton_step is None:
        pytest.skip("triton is not installed")
    case = MS_CASES[0]
    u, eps, dbuf, seeds, _ = make_ms_inputs(case, device)
    with pytest.raises(TypeError, match="dbuf must be float32"):
        torch.ops.psld_fast.ms_step_triton_(u, eps, dbuf.half(), seeds, case.step.coef, case.ms, True, 0, 0)
    with pytest.raises(ValueError, match="ms must hold 6"):
        torch.ops.psld_fast.ms_step_triton_(u, eps, dbuf, seeds, case.step.coef, case.ms[:2], True, 0, 0)
    with pytest.raises(ValueError, match="shape of one half"):
        torch.ops.psld_fast.ms_step_triton_(u, eps, dbuf[:1], seeds, case.step.coef, case.ms, True, 0, 0)


_offset_by_one = offset_by_one  # (tests/_step_cases.py)


@pytest.mark.parametrize("which", ["u", "eps", "both"])
@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_misaligned_inputs(device, state_dtype, which):
    """Storages that start off a 16-byte boundary (tests/test_ops_cuda.py's test for the CUDA kernel)."""
    gen = torch.Generator().manual_seed(77)
    u = torch.randn((4, 6, 16, 16), generator=gen).to(device=device, dtype=state_dtype)
    eps = torch.randn(u.shape, generator=gen).to(device=device, dtype=torch.float16)
    seeds = _seeds(4, gen).to(device)
    if which in ("u", "both"):
        u = _offset_by_one(u)
    if which in ("eps", "both"):
        eps = _offset_by_one(eps)
    coef = _coef(gen)
    expected = affine_step_reference(u, eps, seeds, coef, 3, 1)
    op(u, eps, seeds, coef, 3, 1)
    _assert_close(u, expected, state_dtype, torch.float16)


@pytest.mark.parametrize("D", [1023, 1024, 1025, 3076, 4097])
def test_gpu_launch_configuration_under_the_interpreter(D, monkeypatch):
    """The interpreter normally runs the CPU launch table (one big flat block); here the GPU's is
    forced (BLOCK 1024 per sample from FLAT_BELOW on, the flat 1024-pair blocks below it), with
    masks at the block edges, for a few dtype pairs, both draw variants, P = 0 and eps None."""
    if triton_step is None or not triton_step.INTERPRETED:
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")
    original = triton_step.launch_config
    used = []

    def gpu_table(D_, device_type, B=1):
        used.append(original(D_, "cuda", B))
        return used[-1]

    monkeypatch.setattr(triton_step, "launch_config", gpu_table)
    f32, f16, bf16 = DTYPES
    for state, eps, kind in ((f32, f32, "two_draws"), (bf16, f16, "one_draw"), (f16, None, "p0_two"),
                             (f32, bf16, "r0")):
        case = StepCase(3, D, state, eps, kind)
        u, e, seeds, _, _ = make_inputs(case)
        expected = affine_step_reference(u, e, seeds, case.coef, 3, 1)
        op(u, e, seeds, case.coef, 3, 1)
        _assert_close(u, expected, state, eps or f32)
    assert used and all(cfg == original(D, "cuda", 3) for cfg in used)
    assert used[0][2] == (D < triton_step.FLAT_BELOW), used[0]


def test_launch_config_layouts():
    if triton_step is None:
        pytest.skip("triton is not installed")
    lc = triton_step.launch_config
    assert lc(1, "cuda", 1000) == (1024, 8, True)        # 1000 one-element halves: one full block (4 per thread)
    assert lc(3, "cuda", 7) == (128, 1, True)            # 21 pairs: the smallest block
    assert lc(3072, "cuda", 64) == (1024, 4, False)      # large halves: per-sample vector blocks
    assert lc(1, "cuda", 2**31)[2] is False               # flat needs B * D < 2^31 (32-bit indices)
    assert lc(1, "cpu", 40000) == (65536, 1, True)
    variants = triton_step.kernel_variants()
    assert len({tuple(sorted((k, str(v)) for k, v in d.items())) for d in variants}) == len(variants)
    assert {(v["FLAT"], v["SECOND_DRAW"], v["READ_STATE"], v["HAS_EPS"]) for v in variants} >= {
        (f, s, r, e) for f in (False, True) for s in (False, True) for r in (False, True) for e in (False, True)}


# --------------------------------------------------------------------------- semantics and errors

def test_mutates_only_u(device):
    gen = torch.Generator().manual_seed(10)
    u = torch.randn(2, 4, 6, generator=gen).to(device)
    eps = torch.randn(2, 4, 6, generator=gen).to(device)
    seeds = _seeds(2, gen).to(device)
    u0, eps0, seeds0, ptr = u.clone(), eps.clone(), seeds.clone(), u.data_ptr()
    coef = _coef(gen)
    ref = affine_step_reference(u, eps, seeds, coef, 3)
    assert op(u, eps, seeds, coef, 3) is None
    assert u.data_ptr() == ptr and not torch.equal(u, u0)
    _assert_close(u, ref, torch.float32)
    assert torch.equal(eps, eps0) and torch.equal(seeds, seeds0)


def test_non_contiguous_eps(device):
    gen = torch.Generator().manual_seed(11)
    u = torch.randn(2, 4, 8, 8, generator=gen).to(device)
    eps_t = torch.randn(2, 4, 8, 8, generator=gen).to(device).transpose(2, 3)
    assert not eps_t.is_contiguous()
    seeds = _seeds(2, gen).to(device)
    coef = _coef(gen)
    got, ref = _run(u, eps_t, seeds, coef, step=1)
    _assert_close(got, ref, torch.float32)
    got_c, _ = _run(u, eps_t.contiguous(), seeds, coef, step=1)
    assert torch.equal(got, got_c)


def test_empty_batch_is_a_no_op(device):
    u = torch.empty(0, 4, 3, device=device)
    op(u, None, torch.empty(0, dtype=torch.int64, device=device), [1.0] * 16, 0)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(12)
    u = torch.randn(2, 4, 5, generator=gen).to(device)
    eps = torch.randn(2, 4, 5, generator=gen).to(torch.bfloat16).to(device)
    seeds = _seeds(2, gen).to(device)
    torch.library.opcheck(torch.ops.psld_fast.affine_step_triton_.default,
                          (u, eps, seeds, _coef(gen), 3, 1))
    torch.library.opcheck(torch.ops.psld_fast.affine_step_triton_.default,
                          (u, None, seeds, _coef(gen, P=False), 0, 0))
    dbuf = torch.randn(2, 2, 5, generator=gen).to(device)
    torch.library.opcheck(torch.ops.psld_fast.ms_step_triton_.default,
                          (u, eps, dbuf, seeds, _coef(gen), [0.3, -0.7, 0.6, -0.25, 0.4, 0.15], True, 3, 1))


def _bad_calls(device):
    u = torch.zeros(2, 4, 5, device=device)
    s = torch.zeros(2, dtype=torch.int64, device=device)
    c = [0.5] * 16
    return [
        ("u must be float32, float16 or bfloat16", TypeError, (u.double(), None, s, c, 0, 0)),
        ("u must have shape", ValueError, (torch.zeros(2, 3, 5, device=device), None, s, c, 0, 0)),
        ("u must have shape", ValueError, (torch.zeros(8, device=device), None, s[:1].expand(8).clone(), c, 0, 0)),
        ("u must be contiguous", ValueError, (torch.zeros(2, 5, 4, device=device).transpose(1, 2), None, s, c, 0, 0)),
        ("eps shape", ValueError, (u, torch.zeros(2, 4, 6, device=device), s, c, 0, 0)),
        ("eps must be float32", TypeError, (u, torch.zeros(2, 4, 5, dtype=torch.int32, device=device), s, c, 0, 0)),
        ("seeds must be int64", TypeError, (u, None, s.int(), c, 0, 0)),
        ("seeds must have shape", ValueError, (u, None, s[:1], c, 0, 0)),
        ("seeds must have shape", ValueError, (u, None, s.reshape(2, 1), c, 0, 0)),
        ("coef must hold 16", ValueError, (u, None, s, c[:15], 0, 0)),
    ]


def test_bad_inputs_raise_clear_errors(device):
    for msg, exc, args in _bad_calls(device):
        with pytest.raises(exc, match=msg):
            op(*args)


def test_too_many_elements_per_half():
    if triton_step is None:
        pytest.skip("triton is not installed")
    u = torch.empty(1, 2, 2**32, device="meta")
    s = torch.zeros(1, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="32-bit Philox counter"):
        triton_step._check_args(u, None, s, [0.0] * 16, 0, 0)


def test_device_mismatch():
    if triton_step is None or not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    u = torch.zeros(2, 4, 5, device="cuda")
    with pytest.raises(ValueError, match="seeds are on"):
        op(u, None, torch.zeros(2, dtype=torch.int64), [0.5] * 16, 0)
    with pytest.raises(ValueError, match="eps is on"):
        op(u, torch.zeros(2, 4, 5), torch.zeros(2, dtype=torch.int64, device="cuda"), [0.5] * 16, 0)


def test_cpu_without_interpreter_raises():
    """Without TRITON_INTERPRET the module imports, but a CPU tensor gets a clear RuntimeError."""
    if triton_step is None:
        pytest.skip("triton is not installed")
    code = textwrap.dedent("""
        import torch
        from psld_fast import triton_step
        assert triton_step.HAS_TRITON and not triton_step.INTERPRETED
        try:
            torch.ops.psld_fast.affine_step_triton_(torch.zeros(1, 2, 3), None,
                                                   torch.zeros(1, dtype=torch.int64), [1.0] * 16, 0, 0)
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
            print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]


# --------------------------------------------------------------------------- torch.compile / CUDA graphs

def test_torch_compile(device):
    """The op inside a compiled function mutates u as in eager (Inductor; CPU uses the opaque op)."""
    gen = torch.Generator().manual_seed(13)
    u = torch.randn(2, 4, 6, 6, generator=gen).to(device)
    eps = torch.randn(2, 4, 6, 6, generator=gen).to(device)
    seeds = _seeds(2, gen).to(device)
    coef = _coef(gen)

    def f(u, eps, seeds):
        torch.ops.psld_fast.affine_step_triton_(u, eps, seeds, coef, 5, 0)
        return u * 2.0

    ref = affine_step_reference(u, eps, seeds, coef, 5)
    v = u.clone()
    torch._dynamo.reset()
    try:
        from torch._inductor import config as inductor_config
        with inductor_config.patch(fx_graph_cache=False):
            out = torch.compile(f, fullgraph=True)(v, eps, seeds)
    finally:
        torch._dynamo.reset()
    _assert_close(v, ref, torch.float32)
    torch.testing.assert_close(out, 2.0 * v)


def test_cuda_graph_replay():
    if triton_step is None or not torch.cuda.is_available() or triton_step.INTERPRETED:
        pytest.skip("needs CUDA and compiled Triton")
    gen = torch.Generator().manual_seed(14)
    u = torch.randn(4, 6, 16, 16, generator=gen).cuda()
    eps = torch.randn(4, 6, 16, 16, generator=gen).cuda()
    seeds = _seeds(4, gen).cuda()
    coef = _coef(gen)
    static = u.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (JIT compile) outside the capture
        op(static.clone(), eps, seeds, coef, 3)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        op(static, eps, seeds, coef, 3)
    for new_seeds in (seeds, seeds + 1):
        static.copy_(u)
        seeds.copy_(new_seeds)
        g.replay()
        torch.cuda.synchronize()
        ref = affine_step_reference(u, eps, seeds, coef, 3)
        _assert_close(static, ref, torch.float32)
