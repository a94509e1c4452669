"""The CUDA affine-step kernel: the CPU file's checks on a GPU, plus CUDA == CPU and misaligned data.

Skipped without a GPU or without a CUDA build of psld_fast._C.  The device is a fixture, so this
module imports (and collects) on any machine without touching CUDA.
"""
from __future__ import annotations

import pytest
import torch

from _step_cases import offset_by_one
from _tolerances import STEP_TOL, assert_close_verbose
from psld_fast import ops
from psld_fast.program import affine_step_reference
from test_ops_cpu import (  # noqa: F401  (re-run here with this module's `device` fixture)
    COEF, DTYPES, _seeds, _state, _step,
    test_bad_arguments_raise_clearly, test_batch_invariance, test_eps_none, test_image_batch,
    test_mutation_semantics, test_non_contiguous_eps_is_handled, test_non_contiguous_u_is_rejected,
    test_opcheck, test_p_zero_does_not_read_garbage_state, test_philox_words_bit_exact_and_normals_close,
    test_r_zero_is_bit_exact, test_shared_cases, test_step_matches_reference,
    test_multistep_cases, test_lifted_multistep_op, test_multistep_op_rejects_bad_arguments,
)

pytestmark = pytest.mark.skipif(not (ops.HAS_CUDA_KERNEL and torch.cuda.is_available()),
                                reason="needs a GPU and psld_fast._C built with CUDA")


@pytest.fixture
def device():
    return torch.device("cuda")


def test_auto_backend_is_cuda(device):
    assert ops.resolve_backend("auto", device) == "cuda"


@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_kernel(device, state_dtype):
    u = _state((16, 6, 17, 19), state_dtype, "cpu")
    eps = _state(u.shape, torch.float32, "cpu", seed=1)
    seeds = _seeds(16, "cpu")
    on_cpu = _step(u, eps, seeds, COEF)
    on_gpu = _step(u.to(device), eps.to(device), seeds.to(device), COEF)
    assert_close_verbose(on_gpu, on_cpu, **STEP_TOL[state_dtype], what=f"CUDA vs CPU {state_dtype}")


_offset_by_one = offset_by_one  # (tests/_step_cases.py)


@pytest.mark.parametrize("which", ["u", "eps", "both"])
@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_misaligned_inputs(device, state_dtype, which):
    u = _state((4, 6, 16, 16), state_dtype, device)
    eps = _state(u.shape, torch.float16, device, seed=1)
    if which in ("u", "both"):
        u = _offset_by_one(u)
    if which in ("eps", "both"):
        eps = _offset_by_one(eps)
    seeds = _seeds(4, device)
    expected = affine_step_reference(u, eps, seeds, COEF, 3, 1)
    torch.ops.psld_fast.affine_step_(u, eps, seeds, COEF, 3, 1)
    assert_close_verbose(u, expected, **STEP_TOL[state_dtype], what=f"misaligned {which}")


@pytest.mark.parametrize("coef_kind", ["two_draws", "one_draw", "p0"])
@pytest.mark.parametrize("state_dtype,eps_dtype", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16),
                                                   (torch.bfloat16, torch.float32), (torch.float32, None)], ids=str)
def test_alignment_does_not_change_bits(device, state_dtype, eps_dtype, coef_kind):
    """The vector instantiation (aligned storage) and the scalar one (offset by one element) give the
    same bits: the noise sum's rounding is spelled out (__fmul_rn / __fmaf_rn / __fadd_rn), so ptxas
    cannot contract the two differently.  tests/test_cuda_emulated.py checks the same on the CPU."""
    from _step_cases import COEFS

    coef = COEFS[coef_kind]
    for shape in ((3, 2, 3072), (65, 2, 8), (4, 6, 32, 32)):
        u = _state(shape, state_dtype, device)
        eps = None if eps_dtype is None else _state(shape, eps_dtype, device, seed=1)
        seeds = _seeds(shape[0], device)
        aligned = _step(u, eps, seeds, coef)
        shifted_u = _offset_by_one(u)
        shifted_eps = None if eps is None else _offset_by_one(eps)
        torch.ops.psld_fast.affine_step_(shifted_u, shifted_eps, seeds, coef, 3, 1)
        assert torch.equal(aligned, shifted_u), \
            f"{shape} {state_dtype}/{eps_dtype} {coef_kind}: aligned and misaligned storage differ, max " \
            f"{float((aligned.float() - shifted_u.float()).abs().max()):.3g}"


def test_wrong_device_raises(device):
    u = _state((2, 4, 8), torch.float32, device)
    with pytest.raises(RuntimeError, match="eps is on cpu"):
        torch.ops.psld_fast.affine_step_(u, torch.zeros(2, 4, 8), _seeds(2, device), COEF, 0, 0)
    with pytest.raises(RuntimeError, match="seeds is on cpu"):
        torch.ops.psld_fast.affine_step_(u, None, _seeds(2, "cpu"), COEF, 0, 0)


def test_current_stream_and_graph_capture(device):
    """The kernel runs on the current stream and can be captured in a CUDA graph."""
    u = _state((8, 6, 8, 8), torch.float32, device)
    eps = _state(u.shape, torch.float32, device, seed=1)
    seeds = _seeds(8, device)
    expected = affine_step_reference(u, eps, seeds, COEF, 3, 1)
    static_u = u.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.psld_fast.affine_step_(static_u.copy_(u), eps, seeds, COEF, 3, 1)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.psld_fast.affine_step_(static_u, eps, seeds, COEF, 3, 1)
    static_u.copy_(u)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_verbose(static_u, expected, **STEP_TOL[torch.float32], what="graph replay")


COEF_ONE_DRAW = COEF[:12] + [0.0] * 4  # R2 = 0: the kernel variant without the second Box-Muller pair


@pytest.mark.parametrize("state_dtype,eps_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                   (torch.bfloat16, torch.float16), (torch.float16, torch.float32)],
                         ids=str)
@pytest.mark.parametrize("coef", [COEF, COEF_ONE_DRAW], ids=["two_draws", "one_draw"])
def test_vector_path_mixed_dtypes(device, state_dtype, eps_dtype, coef):
    """D = 3072 (an image half), 16-byte aligned: the vector path with an eps pack of another size
    (8 bytes for fp32 state + half eps, 32 bytes for half state + fp32 eps); D = 3076 (D % 8 == 4)
    keeps the 8-byte fp32/half packs on the vector path too."""
    for shape in ((8, 6, 32, 32), (5, 2, 3076)):
        u = _state(shape, state_dtype, device)
        eps = _state(shape, eps_dtype, device, seed=1)
        seeds = _seeds(shape[0], device)
        expected = affine_step_reference(u, eps, seeds, coef, 3, 1)
        got = _step(u, eps, seeds, coef)
        assert_close_verbose(got, expected, **STEP_TOL[state_dtype], what=f"{state_dtype}/{eps_dtype} {shape}")


@pytest.mark.parametrize("shape", [(1000, 2, 1), (7, 2, 3), (4099, 2, 2), (3, 2, 5, 5)], ids=str)
@pytest.mark.parametrize("coef", [COEF, COEF_ONE_DRAW], ids=["two_draws", "one_draw"])
def test_small_halves_fill_blocks(device, shape, coef):
    """Tiny halves run in the flattened (sample, element) grid: same result as the reference, and a
    sample alone gives the same bits as its row in the batch."""
    u = _state(shape, torch.float32, device)
    eps = _state(shape, torch.float32, device, seed=1)
    seeds = _seeds(shape[0], device)
    got = _step(u, eps, seeds, coef)
    assert_close_verbose(got, affine_step_reference(u, eps, seeds, coef, 3, 1), **STEP_TOL[torch.float32],
                         what=f"small halves {shape}")
    for b in (0, shape[0] - 1):
        alone = _step(u[b:b + 1].clone(), eps[b:b + 1], seeds[b:b + 1], coef)
        assert torch.equal(alone[0], got[b])


@pytest.mark.parametrize("state_dtype,d_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("shape", [(8, 2, 16, 16), (5, 2, 3, 7), (3, 6, 32, 32)], ids=str)
def test_lifted_step_matches_the_cpu_op(device, state_dtype, d_dtype, shape):
    """psld_fast::lifted_step_ on CUDA (the same kernel, D read for both halves, y written) against
    the C++ CPU op on the same inputs, with and without y; D may alias y."""
    from psld_fast.program import lifted_step_reference

    g = torch.Generator().manual_seed(3)
    B, C2 = shape[0], shape[1]
    half = (B, C2 // 2, *shape[2:])
    u = torch.randn(shape, generator=g).to(state_dtype)
    d = torch.randn(half, generator=g).to(d_dtype)
    coef = (0.3 * torch.randn(16, generator=g, dtype=torch.float64)).tolist()
    seeds = _seeds(B, "cpu")
    tol = STEP_TOL[state_dtype]
    for with_y in (True, False):
        y_cpu = torch.zeros(half, dtype=state_dtype) if with_y else None
        u_cpu = u.clone()
        torch.ops.psld_fast.lifted_step_(u_cpu, d, y_cpu, seeds, coef, 5, 1)
        u_gpu, d_gpu = u.to(device), d.to(device)
        y_gpu = torch.zeros(half, dtype=state_dtype, device=device) if with_y else None
        torch.ops.psld_fast.lifted_step_(u_gpu, d_gpu, y_gpu, seeds.to(device), coef, 5, 1)
        assert_close_verbose(u_gpu.cpu(), u_cpu, atol=2 * tol["atol"], rtol=2 * tol["rtol"], what="u")
        if with_y:
            assert_close_verbose(y_gpu.cpu(), y_cpu, atol=2 * tol["atol"], rtol=2 * tol["rtol"], what="y")
    ref_u, ref_y = lifted_step_reference(u, d.to(state_dtype), d.to(state_dtype).clone(), seeds, coef, 5, 1)
    y_alias = d.to(device=device, dtype=state_dtype)
    u_gpu = u.to(device)
    torch.ops.psld_fast.lifted_step_(u_gpu, y_alias, y_alias, seeds.to(device), coef, 5, 1)
    assert_close_verbose(u_gpu.cpu(), ref_u, atol=2 * tol["atol"], rtol=2 * tol["rtol"], what="u, D aliases y")
    assert_close_verbose(y_alias.cpu(), ref_y, atol=2 * tol["atol"], rtol=2 * tol["rtol"], what="y, D aliases y")
