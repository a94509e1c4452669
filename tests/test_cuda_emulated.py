"""The CUDA kernel's own device code, run on the CPU.

csrc/affine_step_cuda.cuh holds everything the CUDA kernel computes and decides (the element step,
the grid-stride thread bodies, vector width, two-draw variant and grid); tests/cuda_emulation/
harness.cpp compiles it with g++ through a small shim (cuda_shim.h: __device__, threadIdx, ...,
__fadd_rn, __fmaf_rn, float2, dim3) and runs every thread of the chosen launch.  So without a GPU:

* the case matrix (_step_cases.emulation_matrix: 6696 cases, every state/eps dtype pair, eps None,
  half sizes 1..4097, batches up to 65, storage offsets breaking 16-byte alignment, P = 0, R = 0 /
  one draw / two) agrees with affine_step_reference (bit for bit without noise) and the C++ CPU
  kernel, takes the vector path exactly when the .cu should, never accesses a misaligned vector
  (the harness raises where a GPU would fault) and writes nothing outside u;
* the scalar and vector instantiations give the same bits (the noise sum's rounding is fixed);
* the Philox counter of element j is (j, step, stream, 0) (normals and words);
* states of more than 2^31 and 2^32 elements (sparse: lazily committed memory, a few threads run)
  index correctly.

Not covered here (tests/test_ops_cuda.py on a GPU): nvcc's code generation, libdevice's logf and
sincosf (the harness uses glibc's), the real launch.  The harness is built per session into a
temporary folder (~40 s on 2 cores); ``PSLD_FAST_EMULATION_SANITIZE=undefined`` builds it with
UBSan instead, aborting on the first report (.ci/run does that once);
``PSLD_FAST_EMULATION_STRIDE=n`` runs every n-th case of the matrix (the UBSan run uses 3).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from _step_cases import (DTYPES, MS_CASES, SHARED_CASES, StepCase, emulation_matrix, make_inputs,  # noqa: F401
                         make_ms_inputs, one_thread, run_ms_case, seeds_for)
from _tolerances import NORMAL_TOL, STEP_TOL, assert_close_verbose
from psld_fast import ops
from psld_fast.program import affine_step_reference
from psld_fast.rng import box_muller, philox4x32, philox_normals, seeds_to_key, uint32_to_uniform

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "cuda_emulation"
CSRC = HERE.parent / "csrc"
ENV_SANITIZE = "PSLD_FAST_EMULATION_SANITIZE"
ENV_STRIDE = "PSLD_FAST_EMULATION_STRIDE"
GUARD = 64  # NaN elements before and after each tensor's storage: stray writes show there

PAIRS = [(s, e) for s in DTYPES for e in (*DTYPES, None)]


def _name(t):
    return "none" if t is None else str(t).replace("torch.", "")


def build_harness(build_dir: Path, sanitize: str = "") -> None:
    """Compile tests/cuda_emulation/harness.cpp (with csrc/bindings.cpp for the argument checks)
    and load it: registers torch.ops.psld_cuda_emu.*"""
    from torch.utils.cpp_extension import load

    cflags = ["-O2", "-g0", "-std=c++17", "-ffp-contract=off"]
    ldflags = []
    name = "psld_cuda_emu"
    if sanitize:
        cflags += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        ldflags += [f"-fsanitize={sanitize}"]
        name += "_" + sanitize.replace(",", "_")
    load(name, [str(HARNESS / "harness.cpp"), str(CSRC / "bindings.cpp")], extra_cflags=cflags,
         extra_ldflags=ldflags, extra_include_paths=[str(CSRC), str(HARNESS)],
         build_directory=str(build_dir), is_python_module=False, verbose=False)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    assert ops.HAS_CPU_KERNEL, "psld_fast._C is not built: the emulated kernel is compared with it"
    t0 = time.perf_counter()
    build_harness(tmp_path_factory.mktemp("cuda_emulation"), os.environ.get(ENV_SANITIZE, ""))
    print(f"\nemulation harness built in {time.perf_counter() - t0:.1f} s")
    return torch.ops.psld_cuda_emu


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # (tests/_step_cases.py) one torch thread for these small tensors
    yield


# --------------------------------------------------------------------------------- the launch plan
def expected_plan(case: StepCase, u: torch.Tensor, eps: torch.Tensor | None) -> list[int]:
    """What the .cu's launcher must choose, restated: 16-byte state packs when D allows them and
    every pointer is aligned to its pack (eps packs of min(vec * itemsize, 16) bytes)."""
    vec = 16 // u.element_size()
    vector = case.D % vec == 0 and u.data_ptr() % 16 == 0 and (
        eps is None or eps.data_ptr() % min(vec * eps.element_size(), 16) == 0)
    vec = vec if vector else 1
    noise = any(c != 0.0 for c in case.coef[8:])
    two = noise and any(c != 0.0 for c in case.coef[12:])
    blocks = min((case.batch * (case.D // vec) + 255) // 256, 2**16)
    return [vec, int(two), blocks]


def run_case(emu, case: StepCase) -> list[str]:
    """Emulated kernel vs reference and CPU kernel for one case; the failures (empty: passed)."""
    u, eps, seeds, ubuf, ebuf = make_inputs(case, guard=GUARD)
    ubuf0 = ubuf.clone()
    ebuf0 = None if ebuf is None else ebuf.clone()
    ref = affine_step_reference(torch.zeros_like(u) if not case.reads_state else u, eps, seeds, case.coef, 3, 1)
    cpu = u.clone()
    torch.ops.psld_fast.affine_step_(cpu, eps, seeds, case.coef, 3, 1)
    want_plan = expected_plan(case, u, eps)
    try:
        plan = emu.affine_step_(u, eps, seeds, case.coef, 3, 1)
    except RuntimeError as exc:
        return [f"{case.id}: raised {str(exc).splitlines()[0]}"]
    bad = []
    if plan != want_plan:
        bad.append(f"{case.id}: launch [vec, two_draws, blocks] = {plan}, expected {want_plan}")
    n, start = u.numel(), GUARD + case.u_offset
    if not (torch.equal(ubuf[:start].isnan(), ubuf0[:start].isnan())
            and torch.equal(ubuf[start + n:].isnan(), ubuf0[start + n:].isnan())):
        bad.append(f"{case.id}: wrote outside u")
    if ebuf is not None and not torch.equal(ebuf.nan_to_num(7.0), ebuf0.nan_to_num(7.0)):
        bad.append(f"{case.id}: wrote into eps")
    tol = STEP_TOL[case.state_dtype]
    checks = (("reference", ref, 1), ("CPU kernel", cpu, 2))  # two kernels: one ulp each way
    for what, expected, k in checks:
        if case.exact:
            if not torch.equal(u, expected):
                err = (u.float() - expected.float()).abs().max()
                bad.append(f"{case.id}: not bit-exact vs the {what} without noise (max err {float(err):.3g})")
        else:
            try:
                assert_close_verbose(u, expected, atol=k * tol["atol"], rtol=k * tol["rtol"], what=case.id)
            except AssertionError as exc:
                bad.append(f"vs the {what}: {exc}")
    return bad


def _report(cases, failures, seconds):
    head = "\n".join(failures[:12])
    return f"{len(failures)} failures in {len(cases)} cases ({seconds:.1f} s); first ones:\n{head}"


@pytest.mark.parametrize("state_dtype,eps_dtype", PAIRS, ids=[f"{_name(s)}-{_name(e)}" for s, e in PAIRS])
def test_case_matrix(emu, state_dtype, eps_dtype):
    """558 cases per dtype pair (6696 in all): see the module docstring."""
    cases = emulation_matrix(state_dtype, eps_dtype)[::int(os.environ.get(ENV_STRIDE, "1"))]
    t0 = time.perf_counter()
    failures = [f for case in cases for f in run_case(emu, case)]
    seconds = time.perf_counter() - t0
    assert not failures, _report(cases, failures, seconds)
    vectors = sum(expected_plan(c, *make_inputs(c)[:2])[0] > 1 for c in cases)
    assert vectors >= len(cases) // 8, f"only {vectors} of {len(cases)} cases take the vector path"


@pytest.mark.parametrize("case", SHARED_CASES, ids=lambda c: c.id)
def test_shared_cases(emu, case):
    """The cases every kernel runs (tests/_step_cases.py)."""
    failures = run_case(emu, case)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- the multistep ops
@pytest.mark.parametrize("case", MS_CASES, ids=lambda c: c.id)
def test_multistep_cases(emu, case):
    """The multistep op (D_prev read from dbuf, this call's D written back by the same thread) against
    ms_step_reference (D bit for bit, u bit for bit without noise) and the C++ CPU kernel; the
    vector path is taken exactly when dbuf is 16-byte aligned too (a misaligned pack would raise)."""
    def close(got, expected, what):
        assert_close_verbose(got, expected, **STEP_TOL[case.step.state_dtype], what=what)

    plans = []

    def op(*args):
        plans.append(emu.ms_step_(*args))

    run_ms_case(case, op, "cpu", None if case.step.exact else close)
    u, eps, dbuf, seeds, _ = make_ms_inputs(case)
    want = expected_plan(case.step, u, eps)
    if want[0] > 1 and dbuf.data_ptr() % 16:  # dbuf's float32 packs need 16-byte alignment too
        want = [1, want[1], min((case.step.batch * case.step.D + 255) // 256, 2**16)]
    assert plans == [want], f"{case.id}: launch {plans}, expected {want}"
    cpu_u, cpu_d, emu_u, emu_d = u.clone(), dbuf.clone(), u.clone(), dbuf.clone()
    torch.ops.psld_fast.ms_step_(cpu_u, eps, cpu_d, seeds, case.step.coef, case.ms, case.record, 3, 1)
    emu.ms_step_(emu_u, eps, emu_d, seeds, case.step.coef, case.ms, case.record, 3, 1)
    assert torch.equal(cpu_d, emu_d), f"{case.id}: D differs from the CPU kernel"
    if case.step.exact:
        assert torch.equal(cpu_u.nan_to_num(7.0), emu_u.nan_to_num(7.0)), f"{case.id}: u differs from the CPU kernel"


def test_lifted_multistep_op(emu):
    """lifted_ms_step_ emulated = the C++ CPU lifted multistep op (D bit for bit: dbuf <- d) and its
    definition, vector and scalar paths."""
    from psld_fast.program import lifted_ms_step_reference

    coef = [0.9, 0.1, -0.2, 0.8, 0.05, 0.02, 0.5, 0.0, 0.1, 0.3, 0.0, 0.0, 0.0, 0.0, 0.7, -0.4]
    for B, C, D, record in ((3, 1, 3072, True), (65, 1, 3, True), (2, 2, 1024, False)):
        g = torch.Generator().manual_seed(B + D)
        u = torch.randn((B, 2 * C, D), generator=g)
        d = torch.randn((B, C, D), generator=g)
        dbuf = torch.randn((B, C, D), generator=g)
        seeds = seeds_for(B)
        ms = [0.35, -0.6]
        ru, ry, rd = lifted_ms_step_reference(u, d, torch.empty_like(d), dbuf, seeds, coef, ms, record, 4, 2)
        outs = []
        for fn in (emu.lifted_ms_step_, torch.ops.psld_fast.lifted_ms_step_):
            uu, yy, dd = u.clone(), torch.empty_like(d), dbuf.clone()
            fn(uu, d, yy, dd, seeds, coef, ms, record, 4, 2)
            outs.append((uu, yy, dd))
            assert torch.equal(dd, rd)
            assert_close_verbose(uu, ru, **STEP_TOL[torch.float32], what=f"lifted ms u B{B} D{D}")
            assert_close_verbose(yy, ry, **STEP_TOL[torch.float32], what=f"lifted ms y B{B} D{D}")
        assert torch.equal(outs[0][2], outs[1][2])


# ------------------------------------------------------------------ scalar vs vector instantiation
@pytest.mark.parametrize("state_dtype,eps_dtype", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16),
                                                   (torch.bfloat16, torch.float32), (torch.float32, None)], ids=str)
@pytest.mark.parametrize("coef_kind", ["two_draws", "one_draw", "p0"])
def test_scalar_and_vector_paths_agree_bitwise(emu, state_dtype, eps_dtype, coef_kind):
    """A sample's bits do not depend on its tensor's alignment: the same data through the vector
    instantiation (aligned) and the scalar one (storage offset by one element) are equal."""
    for batch, D in ((3, 3072), (65, 8), (2, 4096)):
        case = StepCase(batch, D, state_dtype, eps_dtype, coef_kind)
        u, eps, seeds, _, _ = make_inputs(case)
        ua, ub = u.clone(), make_inputs(StepCase(batch, D, state_dtype, eps_dtype, coef_kind, 1, 1))[0]
        ub.copy_(u)
        eb = None
        if eps is not None:
            eb = make_inputs(StepCase(batch, D, state_dtype, eps_dtype, coef_kind, 1, 1))[1]
            eb.copy_(eps)
        plan_a = emu.affine_step_(ua, eps, seeds, case.coef, 5, 2)
        plan_b = emu.affine_step_(ub, eb, seeds, case.coef, 5, 2)
        assert plan_a[0] > 1 and plan_b[0] == 1, f"expected vector vs scalar, got {plan_a} / {plan_b}"
        assert torch.equal(ua, ub), f"{case.id}: vector and scalar instantiations differ: max " \
                                    f"{float((ua.float() - ub.float()).abs().max()):.3g}"


# ---------------------------------------------------------------------------- noise counter mapping
@pytest.mark.parametrize("D", [1, 7, 1024, 4097])
def test_noise_is_the_counter_of_each_element(emu, D):
    """With P = Q = 0 and R1 (or R2) the identity, the state is the normals of Philox counter
    (j, step, stream, 0) under the sample's seed: element j of sample s gets exactly its own."""
    seeds = seeds_for(8)
    step, stream = 2**32 + 9, 5  # the counter takes step's low 32 bits
    n = philox_normals(seeds, D, step, stream)
    for draw, coef in ((0, [0.0] * 8 + [1.0, 0.0, 0.0, 1.0] + [0.0] * 4), (1, [0.0] * 12 + [1.0, 0.0, 0.0, 1.0])):
        for u in (torch.empty(8, 2, D), make_inputs(StepCase(8, D, torch.float32, None, "p0", 1))[0]):
            u.fill_(float("nan"))
            emu.affine_step_(u, None, seeds, coef, step, stream)
            for half in (0, 1):
                ref = n[2 * draw + half]
                err = (u[:, half] - ref).abs()
                bound = NORMAL_TOL * (1 + ref.abs())
                assert bool((err <= bound).all()), \
                    f"draw {draw} half {half} D={D}: max err {float(err.max()):.3g} at {int(err.argmax())}"


def test_philox_test_kernel_words_and_normals(emu):
    seeds = seeds_for(6)
    words, normals = emu.philox_test(seeds, 1000, 7, 3)
    k0, k1 = seeds_to_key(seeds)
    ref_words = philox4x32(torch.arange(1000)[None], 7, 3, 0, k0[:, None], k1[:, None])
    ref_normals = philox_normals(seeds, 1000, 7, 3)
    for q in range(4):
        assert torch.equal(words[..., q], ref_words[q]), f"Philox word {q} differs"
        err = (normals[..., q] - ref_normals[q]).abs()
        assert bool((err <= NORMAL_TOL * (1 + ref_normals[q].abs())).all()), f"normal {q}"
    cpu_words, _ = torch.ops.psld_fast.philox_test(seeds, 1000, 7, 3)
    assert torch.equal(words, cpu_words)


# ----------------------------------------------------------------------------------- sparse states
def _pattern(s: torch.Tensor, j: torch.Tensor, h: int, salt: int) -> torch.Tensor:
    """harness.cpp's pattern(): the input values at the probed elements (exact in float32)."""
    v = (s * 7919 + j * 104729 + h * 15485863 + salt * 32452843) % 2001
    return (v - 1000).to(torch.float32) / 1024.0


def _touched(threads, total, stride):
    """The flattened items t = first + k * stride < total that the given grid-stride threads visit."""
    return torch.cat([torch.arange(f, total, stride, dtype=torch.int64) for f in threads])


@pytest.mark.parametrize("batch,D,state_dtype,eps_dtype,coef_kind,wide_loop", [
    # 2^31 elements per half, 1.3e10 in u: element offsets beyond 2^33, the vector path, 32-bit items
    (3, 2**31, torch.float32, torch.float16, "two_draws", False),
    # 6.4e9 grid-stride items (> 2^32): the 64-bit loop of the scalar path
    (3, 2**31 + 1, torch.float16, torch.bfloat16, "one_draw", True),
    # the largest half: Philox counter j up to 2^32 - 2, 64-bit loop, no eps
    (2, 2**32 - 1, torch.bfloat16, None, "two_draws", True),
], ids=["2^31-half-vector", "2^32-items-scalar", "max-half"])
def test_sparse_states_beyond_32_bits(emu, batch, D, state_dtype, eps_dtype, coef_kind, wide_loop):
    """States of 2^32 to 2^34 elements in lazily committed memory: a few threads of the real grid
    (the first ones, one in the middle, the one that owns the last element) run, and every element
    they visit, plus elements they must not touch, is compared with the definition."""
    coef = StepCase(batch, D, state_dtype, eps_dtype, coef_kind).coef
    vec = 16 // torch.empty((), dtype=state_dtype).element_size()
    vec = vec if D % vec == 0 else 1
    vecs = D // vec
    total = batch * vecs
    blocks = min((total + 255) // 256, 2**16)
    stride = blocks * 256
    threads = [0, 1, stride // 2 + 3, (total - 1) % stride]
    assert (total > 2**32 - 1) == wide_loop
    ts = _touched(threads, total, stride)
    s_t = ts // vecs
    j_t = ((ts - s_t * vecs) * vec)[:, None] + torch.arange(vec)
    touched = torch.stack([s_t[:, None].expand_as(j_t).reshape(-1), j_t.reshape(-1)], 1)
    idle = [t for t in (2, 3, 4, stride - 2, stride - 3) if t not in threads][:2]
    spare = _touched(idle, total, stride)[::7]  # items of threads that do not run
    untouched = torch.stack([spare // vecs, (spare % vecs) * vec], 1)
    probes = torch.cat([touched, untouched]).contiguous()
    seeds = seeds_for(batch)
    out, plan = emu.sparse_step(batch, D, state_dtype, eps_dtype, seeds, coef, 2**33 + 4, 3, threads, probes)
    assert plan == [vec, int(coef_kind == "two_draws"), blocks], plan

    s, j = probes[:, 0], probes[:, 1]

    def stored(h, salt, dtype):
        return _pattern(s, j, h, salt).to(dtype).float()

    x, m = stored(0, 0, state_dtype), stored(1, 0, state_dtype)
    c = torch.tensor(coef, dtype=torch.float64).float()
    xn = c[0] * x + c[1] * m
    mn = c[2] * x + c[3] * m
    if eps_dtype is not None:
        ex, em = stored(0, 1, eps_dtype), stored(1, 1, eps_dtype)
        xn = xn + (c[4] * ex + c[5] * em)
        mn = mn + (c[6] * ex + c[7] * em)
    k0, k1 = seeds_to_key(seeds[s])
    w = philox4x32(j, 4, 3, 0, k0, k1)
    n0, n1 = box_muller(uint32_to_uniform(w[0]), uint32_to_uniform(w[1]))
    n2, n3 = box_muller(uint32_to_uniform(w[2]), uint32_to_uniform(w[3]))
    xn = xn + (c[8] * n0 + c[9] * n1 + c[12] * n2 + c[13] * n3)
    mn = mn + (c[10] * n0 + c[11] * n1 + c[14] * n2 + c[15] * n3)
    expected = torch.stack([xn, mn], 1).to(state_dtype).float()
    n_touched = touched.shape[0]
    assert_close_verbose(out[:n_touched], expected[:n_touched], **STEP_TOL[state_dtype],
                         what=f"sparse ({batch}, 2, {D}) {state_dtype}: elements the threads visited")
    assert torch.equal(out[n_touched:], torch.stack([x, m], 1)[n_touched:]), "elements of other threads changed"


# --------------------------------------------------------------------- the lifted op (issue 18)
def _lifted_matrix():
    """(B, D, state dtype, d dtype or None, with y, offsets (u, d, y), noise) cases of the lifted op."""
    cases = []
    for sd in DTYPES:
        for dd in (*DTYPES, None):
            for D in (1, 3, 8, 64, 1027, 4096):
                for B in (1, 5, 33):
                    for with_y in (True, False):
                        for offs in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)):
                            if dd is None and offs[1] or not with_y and offs[2]:
                                continue
                            cases.append((B, D, sd, dd, with_y, offs, (B + D) % 3 != 0))
    return cases


LIFTED_CASES = _lifted_matrix()


def _lifted_inputs(B, D, sd, dd, with_y, offs, noise, guard):
    from _step_cases import _offset_tensor

    g = torch.Generator().manual_seed(B * 131 + D)
    u, ubuf = _offset_tensor(torch.randn(B, 2, D, generator=g).to(sd), offs[0], guard)
    d = dbuf = y = ybuf = None
    if dd is not None:
        d, dbuf = _offset_tensor(torch.randn(B, 1, D, generator=g).to(dd), offs[1], guard)
    if with_y:
        y, ybuf = _offset_tensor(torch.full((B, 1, D), float("nan")).to(sd), offs[2], guard)
    coef = (0.3 * torch.randn(16, generator=g, dtype=torch.float64)).tolist()
    if not noise:
        coef[6:14] = [0.0] * 8
    elif (B + D) % 2:
        coef[10:14] = [0.0] * 4  # one draw (the R2 = 0 variant)
    return u, d, y, seeds_for(B), coef, ubuf, dbuf, ybuf


def test_lifted_op_matrix(emu):
    """The lifted op (the same kernel: eps = D read for both halves, the extra output y) against its
    reference definition and the C++ CPU lifted op, over state/D dtypes, half sizes 1..4096, batches
    up to 33, storage offsets of u, D and y, with and without y and noise: u bit-exact with the CPU
    op without noise (y to one rounding of the multiply-add), the vector path exactly when every
    pointer allows it, no misaligned vector access, nothing written outside u and y."""
    from psld_fast.program import lifted_step_reference

    failures, vectors = [], 0
    t0 = time.perf_counter()
    for case in LIFTED_CASES[::int(os.environ.get(ENV_STRIDE, "1"))]:
        B, D, sd, dd, with_y, offs, noise = case
        u, d, y, seeds, coef, ubuf, dbuf, ybuf = _lifted_inputs(*case, guard=GUARD)
        ubuf0 = ubuf.clone()
        ref_u, ref_y = lifted_step_reference(u, d, y, seeds, coef, 4, 2)
        cpu_u, cpu_y = u.clone(), None if y is None else y.clone()
        torch.ops.psld_fast.lifted_step_(cpu_u, d, cpu_y, seeds, coef, 4, 2)
        try:
            plan = emu.lifted_step_(u, d, y, seeds, coef, 4, 2)
        except RuntimeError as exc:
            failures.append(f"{case}: raised {str(exc).splitlines()[0]}")
            continue
        vec = 16 // u.element_size()
        want_vec = vec if (D % vec == 0 and u.data_ptr() % 16 == 0
                           and (d is None or d.data_ptr() % min(vec * d.element_size(), 16) == 0)
                           and (y is None or y.data_ptr() % 16 == 0)) else 1
        vectors += want_vec > 1
        want_two = int(noise and any(c != 0.0 for c in coef[10:14]))  # R2 of the lifted layout
        if plan[:2] != [want_vec, want_two]:
            failures.append(f"{case}: launch {plan}, expected vec {want_vec}, two draws {want_two}")
        n, start = u.numel(), GUARD + offs[0]
        if not (ubuf[:start].isnan().all() and ubuf[start + n:].isnan().all()):
            failures.append(f"{case}: wrote outside u")
        if y is not None:
            start = GUARD + offs[2]
            if not (ybuf[:start].isnan().all() and ybuf[start + y.numel():].isnan().all()):
                failures.append(f"{case}: wrote outside y")
        tol = STEP_TOL[sd]
        try:
            if not noise and not torch.equal(u, cpu_u):
                raise AssertionError(f"u not bit-exact vs the CPU lifted op: {float((u.float() - cpu_u.float()).abs().max()):.3g}")
            assert_close_verbose(u, ref_u, **tol, what="u vs reference")
            assert_close_verbose(u, cpu_u, atol=2 * tol["atol"], rtol=2 * tol["rtol"], what="u vs CPU op")
            if y is not None:
                assert_close_verbose(y, ref_y, atol=2 * tol["atol"], rtol=2 * tol["rtol"], what="y vs reference")
                assert_close_verbose(y, cpu_y, atol=2 * tol["atol"], rtol=2 * tol["rtol"], what="y vs CPU op")
        except AssertionError as exc:
            failures.append(f"{case}: {str(exc).splitlines()[0]}")
    seconds = time.perf_counter() - t0
    assert not failures, f"{len(failures)} failures ({seconds:.1f} s):\n" + "\n".join(failures[:12])
    assert vectors >= len(LIFTED_CASES[::int(os.environ.get(ENV_STRIDE, "1"))]) // 8


def test_lifted_op_is_the_plain_kernel_on_doubled_eps(emu):
    """Noise bit for bit the plain kernel's with eps = (D, D) and the equivalent plain coefficients
    (vector and scalar paths); D may alias y (the denoiser returned its input)."""
    from psld_fast.program import lifted_plain_coef

    for B, D in ((4, 1024), (3, 7)):
        u, d, y, seeds, coef, *_ = _lifted_inputs(B, D, torch.float32, torch.float32, True, (0, 0, 0), True, 0)
        plain = u.clone()
        emu.affine_step_(plain, torch.cat([d, d], dim=1), seeds, lifted_plain_coef(coef), 6, 1)
        y.copy_(d)
        emu.lifted_step_(u, y, y, seeds, coef, 6, 1)
        assert torch.equal(u, plain)
        assert torch.allclose(y, coef[14] * plain[:, :1] + coef[15] * plain[:, 1:], rtol=1e-6, atol=1e-6)
