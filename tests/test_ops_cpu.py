"""The compiled affine-step op against its definition, psld_fast.program.affine_step_reference.

Every kernel test takes a ``device`` fixture; tests/test_ops_cuda.py re-runs the same functions on
CUDA by importing them beside its own ``device`` fixture.  Backend resolution tests need no kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _step_cases import MS_CASES, SHARED_CASES, make_ms_inputs, run_ms_case, run_shared_case
from _tolerances import NORMAL_TOL, STEP_TOL, assert_close_verbose
from psld_fast import ops
from psld_fast.program import affine_step_reference
from psld_fast.rng import philox4x32, philox_normals, seeds_to_key

needs_kernel = pytest.mark.skipif(not ops.HAS_CPU_KERNEL, reason="psld_fast._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every term non-zero, P and R lower/upper parts distinct, |coef| <= 1.
COEF = [0.9, 0.1, -0.2, 0.8, 0.05, -0.03, 0.02, 0.07, 0.5, 0.0, 0.1, 0.3, 0.2, 0.0, -0.05, 0.1]
SEEDS = [0, 1, 2**40 + 5, -3, 2**63 - 1]


@pytest.fixture
def device():
    return torch.device("cpu")


def _seeds(n, device):
    return torch.tensor([SEEDS[i % len(SEEDS)] ^ (i // len(SEEDS)) for i in range(n)],
                        dtype=torch.int64, device=device)


def _state(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _step(u, eps, seeds, coef, step=3, stream=1):
    out = u.clone()
    torch.ops.psld_fast.affine_step_(out, eps, seeds, coef, step, stream)
    return out


@needs_kernel
def test_philox_words_bit_exact_and_normals_close(device):
    seeds = _seeds(5, device)
    numel, step, stream = 1000, 7, 3
    words, normals = torch.ops.psld_fast.philox_test(seeds, numel, step, stream)
    k0, k1 = seeds_to_key(seeds.cpu())
    ref_words = philox4x32(torch.arange(numel)[None], step, stream, 0, k0[:, None], k1[:, None])
    ref_normals = philox_normals(seeds.cpu(), numel, step, stream)
    for q in range(4):
        assert torch.equal(words[..., q].cpu(), ref_words[q]), f"Philox word {q} differs"
        tol = NORMAL_TOL * (1 + ref_normals[q].abs())
        err = (normals[..., q].cpu() - ref_normals[q]).abs()
        assert bool((err <= tol).all()), f"normal {q}: max err {float(err.max()):.3g}"


@needs_kernel
@pytest.mark.parametrize("half_numel", [1, 7, 127, 4097])
@pytest.mark.parametrize("eps_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_step_matches_reference(device, state_dtype, eps_dtype, half_numel):
    u = _state((3, 2, half_numel), state_dtype, device)
    eps = _state((3, 2, half_numel), eps_dtype, device, seed=1)
    seeds = _seeds(3, device)
    assert_close_verbose(_step(u, eps, seeds, COEF), affine_step_reference(u, eps, seeds, COEF, 3, 1),
                         **STEP_TOL[state_dtype], what=f"{state_dtype}/{eps_dtype}/D={half_numel}")


@needs_kernel
@pytest.mark.parametrize("case", SHARED_CASES, ids=lambda c: c.id)
def test_shared_cases(device, case):
    """The case matrix every kernel runs (tests/_step_cases.py): the CUDA vector path with R = 0,
    P = 0 and eps None, storage offsets, batches up to 65, the small-half layouts; bit for bit
    without noise."""
    def close(got, expected, what):
        assert_close_verbose(got, expected, **STEP_TOL[case.state_dtype], what=what)

    run_shared_case(case, torch.ops.psld_fast.affine_step_, device, None if case.exact else close)


@needs_kernel
@pytest.mark.parametrize("case", MS_CASES, ids=lambda c: c.id)
def test_multistep_cases(device, case):
    """The multistep op ms_step_ (the step plus D_prev read from dbuf and this call's D written back,
    one pass) against ms_step_reference over the multistep case matrix: the recorded D bit for bit,
    u bit for bit without noise, dbuf untouched without record, the state read for D even when
    P = 0 and not read when nothing needs it (NaN there)."""
    def close(got, expected, what):
        assert_close_verbose(got, expected, **STEP_TOL[case.step.state_dtype], what=what)

    run_ms_case(case, torch.ops.psld_fast.ms_step_, device, None if case.step.exact else close)


@needs_kernel
@pytest.mark.parametrize("shape", [(5, 2, 3), (3, 4, 700), (65, 2, 1)])
@pytest.mark.parametrize("record,g", [(True, (0.0, 0.0)), (True, (0.4, -1.1)), (False, (0.4, -1.1))])
def test_lifted_multistep_op(device, shape, record, g):
    """lifted_ms_step_ against its definition: y from the new state including G D_prev, dbuf <- d
    bit for bit, d and dbuf's other uses intact; and against the plain multistep op on eps = (d, d)."""
    from psld_fast.program import lifted_ms_step_reference, lifted_plain_coef

    B, C2, D = shape
    C = C2 // 2
    u = _state(shape, torch.float32, device)
    d = _state((B, C, D), torch.float32, device, seed=1)
    dbuf = _state((B, C, D), torch.float32, device, seed=2)
    y = torch.full((B, C, D), float("nan"), device=device)
    seeds = _seeds(B, device)
    coef = [0.9, 0.1, -0.2, 0.8, 0.05, 0.02, 0.5, 0.0, 0.1, 0.3, 0.0, 0.0, 0.0, 0.0, 0.7, -0.4]
    ru, ry, rd = lifted_ms_step_reference(u, d, y, dbuf, seeds, coef, list(g), record, 4, 2)
    uu, dd, d0 = u.clone(), dbuf.clone(), d.clone()
    torch.ops.psld_fast.lifted_ms_step_(uu, d, y, dd, seeds, coef, list(g), record, 4, 2)
    assert torch.equal(d, d0)
    assert torch.equal(dd, rd) and (not record or torch.equal(dd, d))
    assert_close_verbose(uu, ru, **STEP_TOL[torch.float32], what="lifted ms u")
    assert_close_verbose(y, ry, **STEP_TOL[torch.float32], what="lifted ms y")
    plain_u, plain_d = u.clone(), dbuf.clone()
    torch.ops.psld_fast.ms_step_(plain_u, torch.cat([d, d], dim=1), plain_d, seeds, lifted_plain_coef(coef),
                                 [*g, 0.0, 0.0, 1.0, 0.0], record, 4, 2)
    assert torch.equal(plain_u, uu) and torch.equal(plain_d, dd)


@needs_kernel
def test_multistep_op_rejects_bad_arguments(device):
    case = MS_CASES[0]
    u, eps, dbuf, seeds, _ = make_ms_inputs(case, device)
    coef, ms = case.step.coef, case.ms
    bad = [((u, eps, dbuf.double(), seeds, coef, ms, True, 0, 0), "dbuf must be float32"),
           ((u, eps, dbuf[:, :, :-1], seeds, coef, ms, True, 0, 0), "dbuf must have the shape of one half"),
           ((u, eps, dbuf, seeds, coef, ms[:5], True, 0, 0), "ms must hold 6 numbers"),
           ((u, None, dbuf, seeds, coef, ms, True, 0, 0), "needs eps"),
           ((u, eps, dbuf.transpose(0, 2).contiguous().transpose(0, 2), seeds, coef, ms, True, 0, 0), "contiguous")]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.psld_fast.ms_step_(*args)
    half = torch.zeros_like(dbuf)
    with pytest.raises(RuntimeError, match="ms must hold 2 numbers"):
        torch.ops.psld_fast.lifted_ms_step_(u, half, None, dbuf, seeds, [0.0] * 16, ms, True, 0, 0)
    with pytest.raises(RuntimeError, match="needs d"):
        torch.ops.psld_fast.lifted_ms_step_(u, None, None, dbuf, seeds, [0.0] * 16, [0.0, 1.0], True, 0, 0)


@needs_kernel
@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_image_batch(device, state_dtype):
    u = _state((64, 6, 32, 32), state_dtype, device)
    eps = _state((64, 6, 32, 32), torch.float32, device, seed=1)
    seeds = _seeds(64, device)
    assert_close_verbose(_step(u, eps, seeds, COEF), affine_step_reference(u, eps, seeds, COEF, 3, 1),
                         **STEP_TOL[state_dtype], what=f"(64, 6, 32, 32) {state_dtype}")


@needs_kernel
def test_p_zero_does_not_read_garbage_state(device):
    coef = [0.0] * 4 + COEF[4:]
    u = torch.full((4, 6, 5, 5), float("nan"), device=device)
    eps = _state(u.shape, torch.float32, device)
    seeds = _seeds(4, device)
    out = _step(u, eps, seeds, coef)
    assert bool(torch.isfinite(out).all())
    assert_close_verbose(out, affine_step_reference(torch.zeros_like(u), eps, seeds, coef, 3, 1),
                         **STEP_TOL[torch.float32], what="P = 0")


@needs_kernel
def test_eps_none(device):
    u = _state((4, 6, 5, 5), torch.float32, device)
    seeds = _seeds(4, device)
    assert_close_verbose(_step(u, None, seeds, COEF), affine_step_reference(u, None, seeds, COEF, 3, 1),
                         **STEP_TOL[torch.float32], what="eps None")


@needs_kernel
@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_r_zero_is_bit_exact(device, state_dtype):
    """Without noise the kernel does the reference's float32 operations in its order: bit exact."""
    coef = COEF[:8] + [0.0] * 8
    u = _state((4, 6, 5, 5), state_dtype, device)
    eps = _state(u.shape, torch.float16, device, seed=1)
    seeds = _seeds(4, device)
    out, ref = _step(u, eps, seeds, coef), affine_step_reference(u, eps, seeds, coef, 3, 1)
    assert torch.equal(out, ref), f"max err {float((out.float() - ref.float()).abs().max()):.3g}"


@needs_kernel
def test_non_contiguous_u_is_rejected(device):
    u = _state((2, 4, 16), torch.float32, device)[..., ::2]
    with pytest.raises(RuntimeError, match="u must be contiguous"):
        torch.ops.psld_fast.affine_step_(u, None, _seeds(2, device), COEF, 0, 0)


@needs_kernel
def test_non_contiguous_eps_is_handled(device):
    u = _state((2, 4, 8), torch.float32, device)
    eps = _state((2, 4, 16), torch.float32, device, seed=1)[..., ::2]
    seeds = _seeds(2, device)
    assert_close_verbose(_step(u, eps, seeds, COEF), affine_step_reference(u, eps, seeds, COEF, 3, 1),
                         **STEP_TOL[torch.float32], what="strided eps")


@needs_kernel
@pytest.mark.parametrize("case, match", [
    ("eps_shape", "eps must have u's shape"),
    ("eps_dtype", "eps must be float32, float16 or bfloat16"),
    ("seeds_dtype", "seeds must be int64 of shape"),
    ("seeds_shape", "seeds must be int64 of shape"),
    ("coef_len", "coef must hold 16 numbers"),
    ("u_float64", "use backend='reference' for float64"),
    ("u_odd_channels", "even channel count"),
])
def test_bad_arguments_raise_clearly(device, case, match):
    u = _state((2, 4, 8), torch.float32, device)
    eps, seeds, coef = torch.zeros_like(u), _seeds(2, device), COEF
    if case == "eps_shape":
        eps = eps[:, :2]
    elif case == "eps_dtype":
        eps = eps.to(torch.int32)
    elif case == "seeds_dtype":
        seeds = seeds.to(torch.int32)
    elif case == "seeds_shape":
        seeds = _seeds(3, device)
    elif case == "coef_len":
        coef = COEF[:15]
    elif case == "u_float64":
        u = u.double()
        eps = eps.double()
    elif case == "u_odd_channels":
        u, eps = u[:, :3].contiguous(), eps[:, :3].contiguous()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.psld_fast.affine_step_(u, eps, seeds, coef, 0, 0)


@needs_kernel
@pytest.mark.parametrize("with_eps", [True, False])
def test_opcheck(device, with_eps):
    u = _state((2, 4, 3, 3), torch.float32, device)
    eps = _state(u.shape, torch.float32, device, seed=1) if with_eps else None
    args = (u, eps, _seeds(2, device), COEF, 3, 1)
    torch.library.opcheck(torch.ops.psld_fast.affine_step_.default, args)
    torch.library.opcheck(torch.ops.psld_fast.affine_step.default, args)
    dbuf = _state((2, 2, 3, 3), torch.float32, device, seed=2)
    ms = [0.3, -0.7, 0.6, -0.25, 0.4 if with_eps else 0.0, 0.15 if with_eps else 0.0]
    torch.library.opcheck(torch.ops.psld_fast.ms_step_.default, (u, eps, dbuf, _seeds(2, device), COEF, ms, True, 3, 1))
    d = _state((2, 2, 3, 3), torch.float32, device, seed=3)
    y = torch.zeros_like(d)
    torch.library.opcheck(torch.ops.psld_fast.lifted_ms_step_.default,
                          (u, d, y, dbuf, _seeds(2, device), COEF, [0.5, -0.2], True, 3, 1))


@needs_kernel
def test_mutation_semantics(device):
    u = _state((3, 4, 7), torch.float32, device)
    eps = _state(u.shape, torch.bfloat16, device, seed=1)
    seeds = _seeds(3, device)
    u0, eps0, seeds0 = u.clone(), eps.clone(), seeds.clone()
    ptr = u.data_ptr()
    assert ops.affine_step_(u, eps, seeds, COEF, 3, 1) is None
    assert u.data_ptr() == ptr
    assert torch.equal(eps, eps0) and torch.equal(seeds, seeds0)
    assert_close_verbose(u, affine_step_reference(u0, eps0, seeds0, COEF, 3, 1),
                         **STEP_TOL[torch.float32], what="in place")
    out = ops.affine_step(u0, eps0, seeds0, COEF, 3, 1)
    assert torch.equal(out, u), "functional twin differs from the in-place op"
    assert not torch.equal(u0, out)


@needs_kernel
def test_batch_invariance(device):
    """A sample's result depends on its seed only, not on its batch position or the batch size."""
    u = _state((5, 4, 33), torch.float32, device)
    eps = _state(u.shape, torch.float32, device, seed=1)
    seeds = _seeds(5, device)
    batch = _step(u, eps, seeds, COEF)
    for b in (0, 3):
        single = _step(u[b:b + 1], eps[b:b + 1], seeds[b:b + 1], COEF)
        assert torch.equal(batch[b:b + 1], single), f"row {b} depends on the batch"
    perm = torch.tensor([4, 2, 0, 1, 3], device=device)
    assert torch.equal(_step(u[perm], eps[perm], seeds[perm], COEF), batch[perm])


@needs_kernel
@pytest.mark.parametrize("B, half_numel", [(5000, 1), (3001, 2), (1500, 3), (700, 17), (9, 33)])
def test_small_halves_across_samples(device, B, half_numel):
    """Halves smaller than a vector block run flattened across samples (lane = (sample, element),
    each with its own key): same results as the reference, a sample alone equals the sample in its
    batch bit for bit, whatever the chunk boundaries (kChunk = 2048 pairs) and thread count."""
    u = _state((B, 2, half_numel), torch.float32, device)
    eps = _state(u.shape, torch.float32, device, seed=1)
    seeds = _seeds(B, device)
    batch = _step(u, eps, seeds, COEF)
    assert_close_verbose(batch, affine_step_reference(u, eps, seeds, COEF, 3, 1),
                         **STEP_TOL[torch.float32], what=f"({B}, 2, {half_numel})")
    for b in (0, 1, B // 2, B - 1):
        single = _step(u[b:b + 1], eps[b:b + 1], seeds[b:b + 1], COEF)
        assert torch.equal(batch[b:b + 1], single), f"row {b} depends on the batch"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(_step(u, eps, seeds, COEF), batch), "result depends on the thread count"
        finally:
            torch.set_num_threads(threads)


def _cpu_isas():
    """The CPU kernel's instruction-set paths this machine can run (baseline always)."""
    if not ops.HAS_CPU_KERNEL:
        return []
    from psld_fast import _C

    current, paths = _C.cpu_isa(), []
    for name in ("baseline", "avx2", "avx512"):
        try:
            _C.set_cpu_isa(name)
            paths.append(name)
        except ValueError:
            pass
    _C.set_cpu_isa(current)
    return paths


@pytest.fixture
def cpu_isa(request):
    from psld_fast import _C

    previous = _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(previous)


@needs_kernel
@pytest.mark.parametrize("cpu_isa", _cpu_isas(), indirect=True)
def test_every_cpu_isa_path(cpu_isa):
    """Each instruction-set path of the CPU kernel this machine runs: bit-exact Philox words,
    normals within NORMAL_TOL, and steps (both layouts, every dtype) bit-identical to the baseline
    path (same float32 operations in the same order, no FMA)."""
    from psld_fast import _C

    seeds = _seeds(5, "cpu")
    words, normals = torch.ops.psld_fast.philox_test(seeds, 333, 7, 3)
    k0, k1 = seeds_to_key(seeds)
    ref_words = philox4x32(torch.arange(333)[None], 7, 3, 0, k0[:, None], k1[:, None])
    ref_normals = philox_normals(seeds, 333, 7, 3)
    for q in range(4):
        assert torch.equal(words[..., q], ref_words[q]), f"{cpu_isa}: Philox word {q} differs"
        err = (normals[..., q] - ref_normals[q]).abs()
        assert bool((err <= NORMAL_TOL * (1 + ref_normals[q].abs())).all()), f"{cpu_isa}: normal {q}"
    for case in MS_CASES[::5]:  # the multistep op (both layouts) is the same code on every path
        u, eps, dbuf, seeds_ms, _ = make_ms_inputs(case)
        outs = []
        for path in (cpu_isa, "baseline"):
            previous = _C.set_cpu_isa(path)
            try:
                uu, dd = u.clone(), dbuf.clone()
                torch.ops.psld_fast.ms_step_(uu, eps, dd, seeds_ms, case.step.coef, case.ms, case.record, 3, 1)
                outs.append((uu, dd))
            finally:
                _C.set_cpu_isa(previous)
        assert torch.equal(outs[0][0].nan_to_num(7.0), outs[1][0].nan_to_num(7.0)) and torch.equal(outs[0][1], outs[1][1]), \
            f"{cpu_isa}: multistep {case.id} differs from baseline"
    cases = [((7, 2, 1), torch.float32, torch.float32), ((3, 6, 9, 11), torch.float32, torch.float32),
             ((3, 6, 9, 11), torch.bfloat16, torch.float16), ((300, 2, 3), torch.float16, torch.float32)]
    for second_draw in (False, True):
        coef = COEF if second_draw else COEF[:12] + [0.0] * 4
        for shape, state_dtype, eps_dtype in cases:
            u = _state(shape, state_dtype, "cpu")
            eps = _state(shape, eps_dtype, "cpu", seed=1)
            seeds = _seeds(shape[0], "cpu")
            out = _step(u, eps, seeds, coef)
            previous = _C.set_cpu_isa("baseline")
            try:
                base = _step(u, eps, seeds, coef)
            finally:
                _C.set_cpu_isa(previous)
            assert torch.equal(out, base), f"{cpu_isa} != baseline for {shape} {state_dtype}"
            assert_close_verbose(out, affine_step_reference(u, eps, seeds, coef, 3, 1),
                                 **STEP_TOL[state_dtype], what=f"{cpu_isa} {shape} {state_dtype}")


@needs_kernel
def test_set_cpu_isa_rejects_unknown():
    from psld_fast import _C

    with pytest.raises(ValueError, match="not one of"):
        _C.set_cpu_isa("sse9")
    assert _C.cpu_isa() in ("baseline", "avx2", "avx512")


# ---------------------------------------------------------------- backend resolution (no kernel)


def test_resolve_backend_auto_and_explicit(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    expected = "cpu" if ops.HAS_CPU_KERNEL else "reference"
    assert ops.resolve_backend(None, "cpu") == expected
    assert ops.resolve_backend("auto", "cpu", torch.float64) == "reference"
    assert ops.resolve_backend("reference", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="backend='cuda' requested but .*the state is on cpu") as info:
        ops.resolve_backend("cuda", "cpu")
    assert "needs a CUDA device" in str(info.value)
    if not torch.cuda.is_available():
        assert "CUDA is not available here" in str(info.value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, Triton may run on CPU tensors
    with pytest.raises(RuntimeError, match="backend='triton' requested but .*the state is on cpu.*TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.resolve_backend("fastest", "cpu")
    if ops.HAS_CPU_KERNEL:
        with pytest.raises(RuntimeError, match="float64"):
            ops.resolve_backend("cpu", "cpu", torch.float64)


def test_resolve_backend_env_var(monkeypatch):
    monkeypatch.setenv(ops.ENV_BACKEND, "reference")
    assert ops.resolve_backend(None, "cpu") == "reference"
    assert ops.resolve_backend("auto", "cpu") in ("cpu", "reference")  # the argument wins
    monkeypatch.setenv(ops.ENV_BACKEND, "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' requested"):
        ops.resolve_backend(None, "cpu")


def test_reference_step_fn_mutates_in_place():
    u = _state((2, 4, 5), torch.float64, "cpu")
    seeds = _seeds(2, "cpu")
    expected = affine_step_reference(u, None, seeds, COEF, 2, 0)
    ops.get_step_fn("reference")(u, None, seeds, COEF, 2, 0)
    assert torch.equal(u, expected)


def test_ops_work_without_compiled_module():
    """With psld_fast._C unavailable the op falls back to the reference and auto picks it."""
    code = (
        "import sys; sys.modules['psld_fast._C'] = None\n"
        "import torch\n"
        "from psld_fast import ops\n"
        "from psld_fast.program import affine_step_reference\n"
        "assert not ops.HAS_CPU_KERNEL and not ops.HAS_CUDA_KERNEL\n"
        "assert ops.resolve_backend(None, 'cpu') == 'reference'\n"
        "u = torch.randn(2, 4, 3); s = torch.tensor([1, 2]); c = [0.5] * 16\n"
        "ref = affine_step_reference(u, u, s, c, 1, 0)\n"
        "ops.affine_step_(u, u.clone(), s, c, 1, 0)\n"
        "assert torch.equal(u, ref)\n"
        "try:\n"
        "    ops.resolve_backend('cpu', 'cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not built' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "assert 'torch.cuda' not in sys.modules or not torch.cuda.is_initialized()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ops.ENV_BACKEND}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_auto_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    monkeypatch.setattr(ops, "_warned", set())
    with caplog.at_level("INFO", logger="psld_fast"):
        for _ in range(3):
            assert ops.resolve_backend(None, "cpu", torch.float64) == "reference"
    assert sum("using the reference step" in r.message for r in caplog.records) == 1
