"""One case matrix for every fused-step kernel: the C++ CPU kernel (tests/test_ops_cpu.py, re-run on
CUDA by tests/test_ops_cuda.py), Triton (tests/test_triton_step.py) and the CUDA kernel's device
code emulated on the CPU (tests/test_cuda_emulated.py, which runs :data:`SHARED_CASES` and the
larger :func:`emulation_matrix`).

A case is a state (batch, 2, D) of one dtype, an eps of another (or None), a coefficient kind and
storage offsets: the kernels' paths are chosen by exactly these (the CUDA kernel's 16-byte vector
path needs D % (16 / itemsize) == 0 and aligned pointers; the CPU and Triton kernels flatten small
halves across samples), so the list below names the path each case is for.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Every term non-zero, P and R lower/upper parts distinct, |coef| <= 1 (test_ops_cpu.COEF).
COEF = [0.9, 0.1, -0.2, 0.8, 0.05, -0.03, 0.02, 0.07, 0.5, 0.0, 0.1, 0.3, 0.2, 0.0, -0.05, 0.1]
COEFS = {
    "two_draws": COEF,                         # R1 and R2: the SSCS variant
    "one_draw": COEF[:12] + [0.0] * 4,         # R2 = 0: no second Box-Muller pair
    "r0": COEF[:8] + [0.0] * 8,                # no noise: bit exact against the reference
    "p0": [0.0] * 4 + COEF[4:12] + [0.0] * 4,  # the state is not read (the prior draw), one draw
    "p0_two": [0.0] * 4 + COEF[4:],            # the state is not read, two draws
    "p0_r0": [0.0] * 4 + COEF[4:8] + [0.0] * 8,  # neither: eps only, bit exact
}
SEEDS = [0, 1, 2**40 + 5, -3, 2**63 - 1, -(2**63), 2**32, 12345]


@dataclass(frozen=True)
class StepCase:
    """u of shape (batch, 2, D) and state_dtype; eps like u in eps_dtype (None: no eps); the
    storages start ``u_offset`` / ``eps_offset`` elements after an aligned allocation."""

    batch: int
    D: int
    state_dtype: torch.dtype
    eps_dtype: torch.dtype | None
    coef_kind: str
    u_offset: int = 0
    eps_offset: int = 0
    why: str = ""

    @property
    def coef(self) -> list[float]:
        return COEFS[self.coef_kind]

    @property
    def exact(self) -> bool:
        """No noise: the kernels do the reference's float32 operations in its order, bit for bit."""
        return all(c == 0.0 for c in self.coef[8:])

    @property
    def reads_state(self) -> bool:
        return any(c != 0.0 for c in self.coef[:4])

    @property
    def id(self) -> str:
        def name(t):
            return "none" if t is None else str(t).replace("torch.", "")
        off = f"-off{self.u_offset}.{self.eps_offset}" if self.u_offset or self.eps_offset else ""
        return f"{self.why + '-' if self.why else ''}B{self.batch}-D{self.D}-{name(self.state_dtype)}-" \
               f"{name(self.eps_dtype)}-{self.coef_kind}{off}"


def seeds_for(batch: int, device="cpu") -> torch.Tensor:
    return torch.tensor([SEEDS[i % len(SEEDS)] ^ (i // len(SEEDS)) for i in range(batch)],
                        dtype=torch.int64, device=device)


def _offset_tensor(values: torch.Tensor, offset: int, guard: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): a contiguous copy of ``values`` whose storage starts ``guard + offset``
    elements into a fresh buffer (``guard`` elements of NaN before and after, to see stray writes)."""
    n = values.numel()
    buf = torch.full((2 * guard + offset + n,), float("nan"), dtype=values.dtype, device=values.device)
    view = buf[guard + offset:guard + offset + n].view(values.shape)
    view.copy_(values)
    return view, buf


def make_inputs(case: StepCase, device="cpu", guard: int = 0):
    """(u, eps, seeds, u_buffer, eps_buffer) for ``case``.  A state that is not read (P = 0) holds
    NaN, so a kernel reading it anyway shows."""
    g = torch.Generator().manual_seed(case.batch * 7919 + case.D)
    shape = (case.batch, 2, case.D)
    u0 = torch.randn(shape, generator=g)
    if not case.reads_state:
        u0 = torch.full(shape, float("nan"))
    u, ubuf = _offset_tensor(u0.to(device=device, dtype=case.state_dtype), case.u_offset, guard)
    eps = ebuf = None
    if case.eps_dtype is not None:
        e0 = torch.randn(shape, generator=g).to(device=device, dtype=case.eps_dtype)
        eps, ebuf = _offset_tensor(e0, case.eps_offset, guard)
    return u, eps, seeds_for(case.batch, device), ubuf, ebuf


def run_shared_case(case: StepCase, op, device, assert_close) -> None:
    """Apply ``op(u, eps, seeds, coef, step, stream)`` in place to the case's inputs (on their offset
    storages: a clone would realign them) and compare with affine_step_reference: bit for bit
    without noise when ``assert_close`` is None, else ``assert_close(got, expected, what)``."""
    from psld_fast.program import affine_step_reference

    u, eps, seeds, _, _ = make_inputs(case, device)
    expected = affine_step_reference(u, eps, seeds, case.coef, 3, 1)
    eps0 = None if eps is None else eps.clone()
    op(u, eps, seeds, case.coef, 3, 1)
    if eps is not None:
        assert torch.equal(eps, eps0), f"{case.id}: eps was written"
    if assert_close is None:
        assert torch.equal(u, expected), \
            f"{case.id}: not bit-exact, max err {float((u.float() - expected.float()).abs().max()):.3g}"
    else:
        assert_close(u, expected, case.id)


def _shared_cases() -> list[StepCase]:
    f32, f16, bf16 = DTYPES
    cases = []
    # The CUDA vector path (D a multiple of 8, aligned storage) with the bit-exact kinds and eps None:
    # before, these ran only at sizes that take the scalar path.
    for state, eps in ((f32, f32), (f16, f16), (bf16, f32), (f32, bf16), (f16, None), (f32, None)):
        for kind in ("r0", "p0", "p0_r0", "one_draw"):
            cases.append(StepCase(4, 3072, state, eps, kind, why="vector"))
    cases += [StepCase(65, 16, f32, None, "r0", why="vector"), StepCase(3, 8, bf16, f16, "p0", why="vector")]
    # Storage offsets: one element (16-byte alignment broken: the scalar path), and a whole 16-byte
    # vector (aligned again: the vector path with an offset).
    for state, eps in ((f32, f32), (f16, bf16), (bf16, f32), (f32, f16)):
        item = torch.empty((), dtype=state).element_size()
        for uo, eo in ((1, 0), (0, 1), (1, 1), (16 // item, 0)):
            for kind in ("two_draws", "r0"):
                cases.append(StepCase(3, 1024, state, eps, kind, uo, eo, why="offset"))
    cases.append(StepCase(5, 17, f32, f32, "two_draws", 3, 5, why="offset"))
    # Batches up to 65 and the small-half layouts (flat across samples on CPU and Triton).
    for D in (1, 2, 3, 5, 17, 33):
        for kind in ("two_draws", "one_draw", "r0"):
            cases.append(StepCase(65, D, f32, f16 if D % 2 else f32, kind, why="small"))
    cases += [StepCase(65, 1, bf16, bf16, "p0", why="small"), StepCase(65, 4, f16, None, "two_draws", why="small"),
              StepCase(65, 1025, f32, f32, "one_draw", why="batch"), StepCase(1, 4097, f16, f32, "two_draws", why="batch")]
    return cases


#: The cases every kernel runs (about 80, well under a second each on CPU).
SHARED_CASES = _shared_cases()

#: Half sizes of the emulation matrix: around every power of two that the vector widths (4, 8),
#: the block (256 threads) and the CPU and Triton block sizes care about, up to 4097.
MATRIX_D = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
            1000, 1023, 1024, 1025, 3072, 3076, 4096, 4097)
MATRIX_BATCHES = (1, 2, 3, 5, 8, 17, 65)
MATRIX_MAX_PAIRS = 70_000  # batch * D bound: keeps the matrix at a few tens of seconds


def emulation_matrix(state_dtype: torch.dtype, eps_dtype: torch.dtype | None) -> list[StepCase]:
    """The emulated CUDA kernel's case matrix for one dtype pair: every half size of MATRIX_D x
    noise (none, one draw, two) x state read or not (P = 0) x storage offsets (read: none, u by one
    element, eps by one (u by two without eps), u by a whole 16-byte vector; not read: none, both
    by one), the batch cycling through MATRIX_BATCHES (cut to keep batch * D <= MATRIX_MAX_PAIRS).
    558 cases per pair, 6696 for the twelve pairs."""
    item = torch.empty((), dtype=state_dtype).element_size()
    if eps_dtype is not None:
        read_offsets, blind_offsets = ((0, 0), (1, 0), (0, 1), (16 // item, 0)), ((0, 0), (1, 1))
    else:
        read_offsets, blind_offsets = ((0, 0), (1, 0), (2, 0), (16 // item, 0)), ((0, 0), (3, 0))
    kinds = {("r0", True): "r0", ("one_draw", True): "one_draw", ("two_draws", True): "two_draws",
             ("r0", False): "p0_r0", ("one_draw", False): "p0", ("two_draws", False): "p0_two"}
    cases = []
    for D in MATRIX_D:
        for noise in ("r0", "one_draw", "two_draws"):
            for reads in (True, False):
                for uo, eo in read_offsets if reads else blind_offsets:
                    batch = MATRIX_BATCHES[(len(cases) * 5 + D) % len(MATRIX_BATCHES)]
                    while batch > 1 and batch * D > MATRIX_MAX_PAIRS:
                        batch = MATRIX_BATCHES[MATRIX_BATCHES.index(batch) - 1]
                    cases.append(StepCase(batch, D, state_dtype, eps_dtype, kinds[noise, reads], uo, eo))
    return cases


def offset_by_one(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose storage starts one element later: not 16-byte aligned."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.fixture
def one_thread():
    """Small tensors: torch's intra-op threads only cost there (5-10x slower on a loaded 2-core
    machine).  A module makes it autouse with a fixture that requests it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ multistep ops
#: The multistep op's numbers (psld_fast.program.MS_COEF_LAYOUT: g0 g1 a0 a1 c0 c1), all distinct.
MS = [0.3, -0.7, 0.6, -0.25, 0.4, 0.15]
#: Kinds of multistep stage: (ms, record).  "first": records D only (the first call of a multistep
#: program); "mid": reads D_prev and records; "last": reads only; "copy": D = eps_x (the lifted op's
#: record: a0 = a1 = c1 = 0, c0 = 1), so the state is not read for D.
MS_KINDS = {
    "first": ([0.0, 0.0] + MS[2:], True),
    "mid": (MS, True),
    "last": (MS[:2] + [0.0] * 4, False),
    "copy": (MS[:2] + [0.0, 0.0, 1.0, 0.0], True),
}


@dataclass(frozen=True)
class MsCase:
    """A StepCase (with eps) run through the multistep op; ``d_offset`` shifts dbuf's storage."""

    step: StepCase
    kind: str
    d_offset: int = 0

    @property
    def ms(self) -> list[float]:
        return MS_KINDS[self.kind][0]

    @property
    def record(self) -> bool:
        return MS_KINDS[self.kind][1]

    @property
    def d_reads_state(self) -> bool:
        return self.record and (self.ms[2] != 0.0 or self.ms[3] != 0.0)

    @property
    def id(self) -> str:
        return f"{self.step.id}-ms_{self.kind}" + (f"-doff{self.d_offset}" if self.d_offset else "")


def _ms_cases() -> list[MsCase]:
    f32, f16, bf16 = DTYPES
    steps = [StepCase(4, 3072, f32, f32, "r0", why="vector"), StepCase(4, 3072, f16, f16, "one_draw", why="vector"),
             StepCase(4, 3072, bf16, f32, "p0", why="vector"), StepCase(3, 1024, f32, f16, "two_draws", 1, 0, why="offset"),
             StepCase(65, 1, f32, f32, "one_draw", why="small"), StepCase(65, 3, f16, f32, "r0", why="small"),
             StepCase(65, 17, f32, f32, "p0_r0", why="small"), StepCase(65, 1025, f32, f32, "one_draw", why="batch"),
             StepCase(1, 4097, bf16, bf16, "two_draws", why="batch")]
    cases = [MsCase(s, kind) for s in steps for kind in MS_KINDS]
    cases += [MsCase(StepCase(4, 3072, f32, f32, "one_draw", why="vector"), "mid", 1),   # dbuf breaks alignment
              MsCase(StepCase(4, 3072, f16, f16, "r0", why="vector"), "mid", 4)]         # 16 bytes: aligned again
    return cases


#: The multistep cases every kernel runs (with the emulated CUDA kernel's launch rule, each path).
MS_CASES = _ms_cases()


def make_ms_inputs(case: MsCase, device="cpu", guard: int = 0):
    """(u, eps, dbuf, seeds, dbuf_buffer): the StepCase's inputs (u finite when D reads it, NaN when
    nothing reads it) and a float32 dbuf (B, 1, D) of D_prev values."""
    s = case.step
    u, eps, seeds, _, _ = make_inputs(s, device, guard)
    if case.d_reads_state and not s.reads_state:  # P = 0 but D = a0 x + a1 m reads the state
        g = torch.Generator().manual_seed(s.batch * 31 + s.D)
        u.copy_(torch.randn(u.shape, generator=g).to(u.dtype))
    g = torch.Generator().manual_seed(s.batch * 131 + s.D)
    d0 = torch.randn((s.batch, 1, s.D), generator=g).to(device)
    dbuf, dbufbuf = _offset_tensor(d0, case.d_offset, guard)
    return u, eps, dbuf, seeds, dbufbuf


def run_ms_case(case: MsCase, op, device, assert_close, d_exact: bool = True) -> None:
    """``op(u, eps, dbuf, seeds, coef, ms, record, step, stream)`` in place on the case's inputs against
    ms_step_reference: u bit for bit without noise when ``assert_close`` is None (else
    ``assert_close(got, expected, what)``); the recorded D bit for bit when ``d_exact`` (the CPU and
    CUDA kernels round as the reference), else within float32 rounding; dbuf untouched without record."""
    from psld_fast.program import ms_step_reference

    u, eps, dbuf, seeds, _ = make_ms_inputs(case, device)
    s = case.step
    expected_u, expected_d = ms_step_reference(u, eps, dbuf, seeds, s.coef, case.ms, case.record, 3, 1)
    eps0, dbuf0 = eps.clone(), dbuf.clone()
    op(u, eps, dbuf, seeds, s.coef, case.ms, case.record, 3, 1)
    assert torch.equal(eps, eps0), f"{case.id}: eps was written"
    if not case.record:
        assert torch.equal(dbuf, dbuf0), f"{case.id}: dbuf was written without record"
    elif d_exact:
        assert torch.equal(dbuf, expected_d), \
            f"{case.id}: D not bit-exact, max err {float((dbuf - expected_d).abs().max()):.3g}"
    else:
        err = float((dbuf - expected_d).abs().max())
        assert err <= 1e-6 * (1 + float(expected_d.abs().max())), f"{case.id}: D max err {err:.3g}"
    if assert_close is None:
        assert torch.equal(u, expected_u), \
            f"{case.id}: u not bit-exact, max err {float((u.float() - expected_u.float()).abs().max()):.3g}"
    else:
        assert_close(u, expected_u, case.id)
