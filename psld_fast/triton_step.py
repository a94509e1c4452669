"""Triton implementation of the fused affine step ``psld_fast::affine_step_triton_``.

What: one kernel per network evaluation that reads the packed state ``u = cat(x, m)`` and the network
output ``eps`` once, draws its own Philox4x32-10 / Box-Muller noise (``tl.philox`` keyed by the
per-sample int64 seed, counter ``(j, step, stream, 0)``, exactly the layout of
:mod:`psld_fast.rng`) and writes ``u`` once, in place::

    x' = P00 x + P01 m + Q00 ex + Q01 em + R1_00 n0 + R1_01 n1 + R2_00 n2 + R2_01 n3
    m' = P10 x + P11 m + Q10 ex + Q11 em + R1_10 n0 + R1_11 n1 + R2_10 n2 + R2_11 n3

(:func:`psld_fast.program.affine_step_reference` is the definition; math in float32.)

Why no ``triton.autotune``: the kernel mutates its input in place and autotuning benchmarks a config
by running it several times, which would apply the step several times.  Launch sizes come from the
hand-made table in :func:`launch_config` instead.

The coefficients are plain float kernel arguments, so a CUDA graph bakes them in per step; ``step``,
``stream`` and the batch size are not specialised (no recompilation per step).  The ``constexpr``
flags select the variant: ``HAS_EPS`` (an eps tensor was given), ``HAS_NOISE`` (any R != 0;
otherwise no Philox at all), ``SECOND_DRAW`` (any R2 != 0, only SSCS: otherwise the second
Box-Muller pair, two more log and sincos per element, is not computed), ``READ_STATE`` (any P != 0;
otherwise the old ``u`` is never loaded, it may hold NaN garbage, e.g. the prior draw writing into
``torch.empty``) and ``FLAT`` (the grid layout, below).  :func:`kernel_variants` lists them all.

The multistep op ``psld_fast::ms_step_triton_`` (:func:`psld_fast.program.ms_step_reference`) is the
same kernel with a float32 buffer ``dbuf`` (one half's shape) holding the previous call's data
estimate: ``HAS_DPREV`` adds ``g0 D_prev`` / ``g1 D_prev`` to x' / m', ``HAS_DREC`` overwrites dbuf
with this call's ``D = (a0 x + a1 m) + (c0 ex + c1 em)`` (``DREC_STATE``: a0 or a1 != 0, so the state
is loaded even when P == 0), each element read before it is written by the same program.

Grid, 1-D (so the batch is not limited by the 65535 of grid axes 1/2): halves of at least
``FLAT_BELOW`` elements run one program per (sample b, block of BLOCK elements of one half), B * NB
programs; smaller halves run ``FLAT``: one program per BLOCK consecutive (sample, element) pairs
of the flattened (B, D) index space, each lane with its own sample's seed, so a 1-element half
fills its blocks.  The counter never contains b in either layout, so a sample's result does not
depend on its batch position, the batch size or the layout.

This module needs Triton: import it only when ``import triton`` works (``psld_fast.ops`` imports it
lazily and checks ``HAS_TRITON``).  On CPU tensors the kernel runs only under Triton's interpreter,
which requires ``TRITON_INTERPRET=1`` in the environment *before* ``triton`` is first imported
(``INTERPRETED`` tells).  Registration: with compiled Triton the op is a ``torch.library.triton_op``
(torch.compile and CUDA graphs see the kernel itself through ``wrap_triton``); under the
interpreter, whose kernels cannot be traced into a graph, it is an opaque ``custom_op`` with the same
schema, so compiled graphs still call it with real tensors.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["affine_step_triton_", "ms_step_triton_", "HAS_TRITON", "INTERPRETED", "launch_config", "kernel_variants",
           "FLAT_BELOW"]

#: Importing this module succeeded, so Triton is usable (``psld_fast.ops`` checks this).
HAS_TRITON = True

_MASK32 = 0xFFFFFFFF
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _to_bf16_rne(v):
    """float32 -> bfloat16, round to nearest even (NaN -> quiet NaN), with integer ops only."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=["B", "NB", "step", "stream"])
def _affine_step_kernel(
    u_ptr, eps_ptr, seed_ptr, d_ptr,
    B, D, NB, step, stream,
    p00, p01, p10, p11,
    q00, q01, q10, q11,
    r1_00, r1_01, r1_10, r1_11,
    r2_00, r2_01, r2_10, r2_11,
    g0, g1, a0, a1, c0, c1,
    BLOCK: tl.constexpr, HAS_EPS: tl.constexpr, HAS_NOISE: tl.constexpr,
    SECOND_DRAW: tl.constexpr, READ_STATE: tl.constexpr, FLAT: tl.constexpr, BF16_RNE: tl.constexpr,
    HAS_DPREV: tl.constexpr = False, HAS_DREC: tl.constexpr = False, DREC_STATE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    if FLAT:
        # Small halves: program -> BLOCK consecutive (sample, element) pairs of the flattened
        # (B, D) index space, so a block is full even when D is 1 (the launcher guarantees
        # B * D < 2^31, hence 32-bit index math).
        t = pid * BLOCK + tl.arange(0, BLOCK)
        mask = t < B * D
        b = t // D
        j = t - b * D
    else:
        # 1-D grid of B * NB programs: program -> (sample b, block jb of the D elements of one half).
        b = pid // NB
        jb = pid - b * NB
        j = jb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # element index inside one half (< 2^32)
        mask = j < D
    x_off = b.to(tl.int64) * D * 2 + j                  # u[b, j]      (x half)
    m_off = x_off + D                                   # u[b, D + j]  (m half)

    d_off = b.to(tl.int64) * D + j                      # dbuf[b, j] (multistep ops)
    dn = tl.zeros((BLOCK,), dtype=tl.float32)           # this call's data estimate (HAS_DREC)
    if READ_STATE:
        x = tl.load(u_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(u_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
        xn = p00 * x + p01 * m
        mn = p10 * x + p11 * m
        if DREC_STATE:
            dn = a0 * x + a1 * m
    else:
        xn = tl.zeros((BLOCK,), dtype=tl.float32)
        mn = tl.zeros((BLOCK,), dtype=tl.float32)
        if DREC_STATE:  # P == 0 but D reads the state
            x = tl.load(u_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(u_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
            dn = a0 * x + a1 * m

    if HAS_EPS:
        ex = tl.load(eps_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        em = tl.load(eps_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
        xn = xn + (q00 * ex + q01 * em)
        mn = mn + (q10 * ex + q11 * em)
        if HAS_DREC:
            dn = dn + (c0 * ex + c1 * em)

    if HAS_NOISE:
        # Philox key = the sample's int64 seed: tl.philox casts it to uint64 and splits it into
        # k0 = low 32 bits, k1 = high 32 bits (psld_fast.rng.seeds_to_key).  FLAT: one seed per lane.
        if FLAT:
            seed = tl.load(seed_ptr + b, mask=mask, other=0)
        else:
            seed = tl.load(seed_ptr + b)
        j32 = j.to(tl.uint32)
        zero = j32 * 0
        c1 = zero + step.to(tl.uint32, bitcast=True)
        c2 = zero + stream.to(tl.uint32, bitcast=True)
        i0, i1, i2, i3 = tl.philox(seed, j32, c1, c2, zero)
        n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i0), tl.uint_to_uniform_float(i1))
        if SECOND_DRAW:  # R2 != 0 (SSCS): the second Box-Muller pair; else its log/sincos are skipped
            n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i2), tl.uint_to_uniform_float(i3))
            xn = xn + (r1_00 * n0 + r1_01 * n1 + r2_00 * n2 + r2_01 * n3)
            mn = mn + (r1_10 * n0 + r1_11 * n1 + r2_10 * n2 + r2_11 * n3)
        else:
            xn = xn + (r1_00 * n0 + r1_01 * n1)
            mn = mn + (r1_10 * n0 + r1_11 * n1)

    if HAS_DPREV:  # multistep: + G D_prev, read before this program overwrites the same elements
        dp = tl.load(d_ptr + d_off, mask=mask, other=0.0)
        xn = xn + g0 * dp
        mn = mn + g1 * dp
    if HAS_DREC:
        tl.store(d_ptr + d_off, dn, mask=mask)

    if BF16_RNE:
        # Interpreter only (bf16 state): its fp32 -> bf16 cast truncates, so round to nearest even by
        # hand, as the GPU's cvt.rn.bf16.f32 does (NaN stays a quiet NaN).
        xn = _to_bf16_rne(xn)
        mn = _to_bf16_rne(mn)
    tl.store(u_ptr + x_off, xn.to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + m_off, mn.to(u_ptr.dtype.element_ty), mask=mask)


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older/newer Triton
        return False
    return isinstance(kernel, InterpretedFunction)


#: The kernel runs under Triton's interpreter (TRITON_INTERPRET=1 was set before ``import triton``).
INTERPRETED = _is_interpreted(_affine_step_kernel)


#: Halves with fewer elements than this run in the flattened (sample, element) layout on a GPU.
FLAT_BELOW = 1024
#: Register budget of the GPU launches (``.maxnreg``).  Without it ptxas holds the per-sample layout
#: (128 threads) to 96 registers and the flat one (256 threads) to 64-80, and spills 4-16 bytes in
#: several variants; with it none spills (tools/triton_aot_check.py --all,
#: bench/results/triton_aot_sm80_sm90.md).  Not applied when torch.compile traces the op (Inductor
#: launches the kernel with its own options).
MAXNREG = 128


def launch_config(D: int, device_type: str, B: int = 1) -> tuple[int, int, bool]:
    """Hand-made ``(BLOCK, num_warps, flat)`` table (no autotune: the kernel is in place).

    GPU: a half of at least ``FLAT_BELOW`` elements is cut into blocks of 1024 elements of one
    sample with 4 warps: 8 elements of x and of m per thread, contiguous, so every access is a
    16-byte vector (two for fp32, one for fp16/bf16).  A smaller half runs ``flat``: each program
    takes up to 1024 consecutive (sample, element) pairs with 4 per thread (8 warps; gathered,
    scalar accesses), so D = 1 fills a block as well as D = 1000 does.  Both are launched with the
    register budget ``MAXNREG``.
    CPU interpreter: its cost is per program, so one big block (up to 65536 elements), flattened
    across samples whenever a half is smaller than that.
    Flat needs ``B * D < 2^31`` (32-bit index math); beyond that the per-sample layout is used.
    """
    D, B = max(int(D), 1), max(int(B), 1)
    if device_type == "cpu":
        block, warps, limit = 65536, 1, 65536
    else:
        block, warps, limit = 1024, 4, FLAT_BELOW
    flat = D < limit and B * D < 2**31
    if device_type == "cpu":
        return min(max(triton.next_power_of_2(B * D if flat else D), 16), block), warps, flat
    if flat:
        block = min(block, max(triton.next_power_of_2(B * D), 128))
        warps = block // 128  # 4 pairs per thread
    return block, warps, flat


def kernel_variants() -> list[dict]:
    """Every compiled variant :func:`affine_step_triton_` can launch on a GPU: the state and eps
    dtypes (eps None: no eps term) and the ``constexpr`` arguments with ``num_warps``.

    ``BF16_RNE`` is interpreter-only and the flat layout's small blocks (fewer than 1024 pairs in
    the whole batch) differ from the 1024-wide one only in size, so the list holds BLOCK 1024 plus
    one small flat block per dtype pair (what ``tools/triton_aot_check.py`` compiles).  ``maxnreg``:
    the register budget the launcher gives (None: ptxas's choice).
    """
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    out = []
    for state in dtypes:
        for eps in (None, *dtypes):
            for noise in (0, 1, 2):  # no R, R1 only, R1 and R2
                for read_state in (True, False):
                    for flat in (False, True):
                        blocks = ((1024, 8), (128, 1)) if flat else ((1024, 4),)
                        for block, warps in blocks:
                            if block != 1024 and not (noise == 2 and read_state):
                                continue
                            out.append(dict(state=state, eps=eps, BLOCK=block, num_warps=warps,
                                            maxnreg=MAXNREG,
                                            HAS_EPS=eps is not None, HAS_NOISE=noise > 0,
                                            SECOND_DRAW=noise == 2, READ_STATE=read_state,
                                            FLAT=flat, BF16_RNE=False, **_NO_MS))
        # the multistep op (ms_step_triton_): its samplers' stages read the state, have eps and at
        # most one draw; D recorded from (x, m, eps) natively or from eps = (D, D) lifted
        for noise in (0, 1):
            for flat in (False, True):
                for ms in _MS_FLAGS:
                    out.append(dict(state=state, eps=state, BLOCK=1024, num_warps=8 if flat else 4,
                                    maxnreg=MAXNREG, HAS_EPS=True, HAS_NOISE=noise > 0, SECOND_DRAW=False,
                                    READ_STATE=True, FLAT=flat, BF16_RNE=False, **ms))
    return out


_NO_MS = dict(HAS_DPREV=False, HAS_DREC=False, DREC_STATE=False)
#: (read D_prev, record D, D reads the state): the first multistep stage, a middle one (native and
#: lifted), the last one.
_MS_FLAGS = tuple(dict(HAS_DPREV=a, HAS_DREC=b, DREC_STATE=c) for a, b, c in
                  ((False, True, True), (True, True, True), (True, True, False), (True, False, False)))


def _check_args(u, eps, seeds, coef, step, stream):
    """Validate the op's arguments; returns (B, D, eps_contiguous_or_None)."""
    name = "affine_step_triton_"
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"{name}: u must be a torch.Tensor, got {type(u).__name__}")
    if u.dtype not in _DTYPES:
        raise TypeError(f"{name}: u must be float32, float16 or bfloat16, got {u.dtype}"
                        + (" (float64 runs only on the reference backend)" if u.dtype == torch.float64 else ""))
    if u.dim() < 2 or u.shape[1] % 2:
        raise ValueError(f"{name}: u must have shape (B, 2C, ...) with an even channel count, "
                         f"got {tuple(u.shape)}")
    if not u.is_contiguous():
        raise ValueError(f"{name}: u must be contiguous (it is updated in place), got strides {u.stride()}")
    if eps is not None:
        if not isinstance(eps, torch.Tensor):
            raise TypeError(f"{name}: eps must be a torch.Tensor or None, got {type(eps).__name__}")
        if eps.dtype not in _DTYPES:
            raise TypeError(f"{name}: eps must be float32, float16 or bfloat16, got {eps.dtype}")
        if eps.shape != u.shape:
            raise ValueError(f"{name}: eps shape {tuple(eps.shape)} != u shape {tuple(u.shape)}")
        if eps.device != u.device:
            raise ValueError(f"{name}: eps is on {eps.device} but u is on {u.device}")
        eps = eps.contiguous()
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"{name}: seeds must be a torch.Tensor, got {type(seeds).__name__}")
    if seeds.dtype != torch.int64:
        raise TypeError(f"{name}: seeds must be int64, got {seeds.dtype}")
    if seeds.dim() != 1 or seeds.shape[0] != u.shape[0]:
        raise ValueError(f"{name}: seeds must have shape ({u.shape[0]},), got {tuple(seeds.shape)}")
    if seeds.device != u.device:
        raise ValueError(f"{name}: seeds are on {seeds.device} but u is on {u.device}")
    if len(coef) != 16:
        raise ValueError(f"{name}: coef must hold 16 numbers, got {len(coef)}")
    for what, v in (("step", step), ("stream", stream)):
        if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
            raise TypeError(f"{name}: {what} must be an int, got {type(v).__name__}")
    B = u.shape[0]
    D = math.prod(int(s) for s in u.shape[1:]) // 2
    if D >= 2**32:
        raise ValueError(f"{name}: {D} elements per half per sample exceed the 32-bit Philox counter")
    if u.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"{name}: u is a CPU tensor; the Triton kernel runs on CPU only under Triton's "
                           "interpreter, which needs TRITON_INTERPRET=1 set before `triton` is first "
                           "imported (or use the 'cpu'/'reference' backend)")
    return B, D, eps


def _traced() -> bool:
    """Whether this launch is being traced into a graph (torch.compile / make_fx through
    ``triton_op``): the kernel call then becomes a higher-order op that takes only Triton's standard
    launch options, so ``maxnreg`` is left out."""
    try:
        from torch._library.triton import is_wrap_triton_enabled
    except ImportError:  # pragma: no cover - other torch layouts: be conservative
        return True
    return is_wrap_triton_enabled()


def _as_int32(v) -> int:
    """Low 32 bits of ``v`` as a signed int32 value (the kernel bitcasts it back to uint32).

    A traced (symbolic) step is specialised here: the counter words are kernel scalars."""
    v = int(v) & _MASK32
    return v - 2**32 if v >= 2**31 else v


def _affine_step_triton_impl(u: torch.Tensor, eps: torch.Tensor | None, seeds: torch.Tensor,
                             coef: list[float], step: int, stream: int) -> None:
    """In-place fused affine step on ``u`` (see the module docstring and
    :func:`psld_fast.program.affine_step_reference`)."""
    B, D, eps_c = _check_args(u, eps, seeds, coef, step, stream)
    _launch(u, eps_c, None, seeds, coef, None, False, B, D, step, stream)


def _check_ms_args(u, eps, dbuf, ms, record, name="ms_step_triton_"):
    half = (u.shape[0], u.shape[1] // 2, *u.shape[2:])
    if not isinstance(dbuf, torch.Tensor) or tuple(dbuf.shape) != half:
        raise ValueError(f"{name}: dbuf must have the shape of one half of u {half}, "
                         f"got {tuple(getattr(dbuf, 'shape', ()))}")
    if dbuf.dtype != torch.float32:
        raise TypeError(f"{name}: dbuf must be float32 (the data estimate is kept in the compute dtype), "
                        f"got {dbuf.dtype}")
    if dbuf.device != u.device:
        raise ValueError(f"{name}: dbuf is on {dbuf.device} but u is on {u.device}")
    if not dbuf.is_contiguous():
        raise ValueError(f"{name}: dbuf must be contiguous (it is read and written in place)")
    if len(ms) != 6:
        raise ValueError(f"{name}: ms must hold 6 numbers (g0 g1 a0 a1 c0 c1), got {len(ms)}")
    if record and eps is None and (float(ms[4]) != 0.0 or float(ms[5]) != 0.0):
        raise ValueError(f"{name}: record=True with eps coefficients c0, c1 needs eps")


def _ms_step_triton_impl(u: torch.Tensor, eps: torch.Tensor | None, dbuf: torch.Tensor, seeds: torch.Tensor,
                         coef: list[float], ms: list[float], record: bool, step: int, stream: int) -> None:
    """In-place multistep step on ``u`` and ``dbuf`` (:func:`psld_fast.program.ms_step_reference`):
    the same kernel with the previous call's data estimate read from dbuf and, with ``record``, this
    call's written back, one pass."""
    B, D, eps_c = _check_args(u, eps, seeds, coef, step, stream)
    _check_ms_args(u, eps, dbuf, ms, record)
    _launch(u, eps_c, dbuf, seeds, coef, ms, record, B, D, step, stream)


def _launch(u, eps_c, dbuf, seeds, coef, ms, record, B, D, step, stream) -> None:
    if B == 0 or D == 0:
        return
    c = [float(v) for v in coef]
    read_state = any(v != 0.0 for v in c[0:4])
    has_noise = any(v != 0.0 for v in c[8:16])
    second_draw = any(v != 0.0 for v in c[12:16])
    has_eps = eps_c is not None
    m6 = [0.0] * 6 if ms is None else [float(v) for v in ms]
    has_dprev = m6[0] != 0.0 or m6[1] != 0.0
    has_drec = bool(record)
    drec_state = has_drec and (m6[2] != 0.0 or m6[3] != 0.0)
    BLOCK, num_warps, flat = launch_config(D, u.device.type, B)
    NB = triton.cdiv(D, BLOCK)
    programs = triton.cdiv(B * D, BLOCK) if flat else B * NB
    if programs >= 2**31:
        raise ValueError(f"affine_step_triton_: {B} x {NB} programs exceed the grid limit")
    launch = {"num_warps": num_warps}
    if u.device.type == "cuda" and not _traced():
        launch["maxnreg"] = MAXNREG
    # Triton launches on the current device: make it u's (a no-op in the usual single-device case).
    guard = (torch.cuda.device(u.device) if u.device.type == "cuda" and u.device.index is not None
             else contextlib.nullcontext())
    with guard:
        wrap_triton(_affine_step_kernel)[(programs,)](
            u, eps_c if has_eps else u, seeds.contiguous(), dbuf if dbuf is not None else u,
            B, D, NB, _as_int32(step), _as_int32(stream),
            *c, *m6,
            BLOCK=BLOCK, HAS_EPS=has_eps, HAS_NOISE=has_noise, SECOND_DRAW=second_draw,
            READ_STATE=read_state, FLAT=flat, BF16_RNE=INTERPRETED and u.dtype == torch.bfloat16,
            HAS_DPREV=has_dprev, HAS_DREC=has_drec, DREC_STATE=drec_state,
            **launch,
        )


if not INTERPRETED:
    # Compiled Triton: torch.compile / make_fx trace through the launcher and capture the kernel
    # itself (wrap_triton), so Inductor and CUDA graphs see it.
    affine_step_triton_ = triton_op("psld_fast::affine_step_triton_", mutates_args={"u"})(
        _affine_step_triton_impl)
else:
    # Interpreter (CPU tests): an interpreted kernel cannot be traced into a graph, so register an
    # opaque custom op instead; a compiled graph then calls it with real tensors at run time.
    affine_step_triton_ = torch.library.custom_op("psld_fast::affine_step_triton_", mutates_args={"u"})(
        _affine_step_triton_impl)

    @affine_step_triton_.register_fake
    def _(u, eps, seeds, coef, step, stream) -> None:
        _check_args(u, eps, seeds, coef, step, stream)

if not INTERPRETED:
    ms_step_triton_ = triton_op("psld_fast::ms_step_triton_", mutates_args={"u", "dbuf"})(_ms_step_triton_impl)
else:
    ms_step_triton_ = torch.library.custom_op("psld_fast::ms_step_triton_", mutates_args={"u", "dbuf"})(
        _ms_step_triton_impl)

    @ms_step_triton_.register_fake
    def _(u, eps, dbuf, seeds, coef, ms, record, step, stream) -> None:
        _check_args(u, eps, seeds, coef, step, stream)
        _check_ms_args(u, eps, dbuf, ms, record)
