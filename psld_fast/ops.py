"""The fused affine-step op: schemas, fakes, backend choice.

The op ``psld_fast::affine_step_`` applies one sampler stage in place (definition and shapes:
:func:`psld_fast.program.affine_step_reference`)::

    u (B, 2C, ...) <- P u + Q eps + R1 [n0; n1] + R2 [n2; n3]     per coordinate pair (x_j, m_j)

Schemas are defined here, once, with ``torch.library``; the compiled module ``psld_fast._C``
(csrc/) only registers the CPU and CUDA implementations; the Triton kernel is its own triton_op
(``psld_fast::affine_step_triton_``, psld_fast/triton_step.py).  So that the ops work whatever was
built, the reference is registered as the CompositeExplicitAutograd fallback of ``affine_step_``:
a compiled kernel for the tensor's device takes precedence over it.

Backends (:func:`resolve_backend`): "reference" (pure PyTorch, any dtype incl. float64), "cpu"
(C++ kernel), "cuda" (CUDA kernel), "triton".  Choice: argument > ``PSLD_FAST_BACKEND`` > "auto";
auto picks cuda > triton > reference on a GPU and cpu > reference on CPU, and the reference for
float64 states.  An explicit request that cannot be met raises with the reason; an automatic
fallback logs once.  Importing this module neither initialises CUDA nor imports Triton.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence

import torch

from .program import (affine_step_reference, lifted_ms_step_reference, lifted_plain_coef, lifted_step_reference,
                      ms_estimate, ms_step_reference)

__all__ = ["affine_step_", "affine_step", "resolve_backend", "unavailable_reason", "get_step_fn",
           "get_lifted_step_fn", "get_ms_step_fn", "get_lifted_ms_step_fn", "multistep_fns", "BACKENDS",
           "HAS_CPU_KERNEL", "HAS_CUDA_KERNEL", "HAS_TRITON", "has_triton"]

logger = logging.getLogger("psld_fast")

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENV_BACKEND = "PSLD_FAST_BACKEND"

_lib = torch.library.Library("psld_fast", "FRAGMENT")
_lib.define("affine_step_(Tensor(a!) u, Tensor? eps, Tensor seeds, float[] coef, int step, "
            "int stream) -> ()")
_lib.define("affine_step(Tensor u, Tensor? eps, Tensor seeds, float[] coef, int step, "
            "int stream) -> Tensor")
# The lifted step (psld_fast.lift): d and y have the shape of one half of u; coef holds 16 numbers (P, G, R1, R2, W).
_lib.define("lifted_step_(Tensor(a!) u, Tensor? d, Tensor(b!)? y, Tensor seeds, float[] coef, int step, "
            "int stream) -> ()")
# The multistep ops (psld_fast.program.ms_step_reference): the plain / lifted step plus dbuf (one half's
# shape, float32), the previous call's data estimate: read (ms g0 g1) and, with record, overwritten
# with this call's (ms a0 a1 c0 c1; the lifted op's is d itself), in the same pass.
_lib.define("ms_step_(Tensor(a!) u, Tensor? eps, Tensor(b!) dbuf, Tensor seeds, float[] coef, float[] ms, "
            "bool record, int step, int stream) -> ()")
_lib.define("lifted_ms_step_(Tensor(a!) u, Tensor? d, Tensor(b!)? y, Tensor(c!) dbuf, Tensor seeds, float[] coef, "
            "float[] ms, bool record, int step, int stream) -> ()")
# Test-only: the Philox words (int64 holding uint32) and normals of (B, numel) elements, (B, numel, 4).
_lib.define("philox_test(Tensor seeds, int numel, int step, int stream) -> (Tensor, Tensor)")


def _check_fake(u, eps, seeds, coef):
    torch._check(u.dim() >= 2 and u.shape[1] % 2 == 0, lambda: f"affine_step_: bad u shape {u.shape}")
    torch._check(eps is None or eps.shape == u.shape, lambda: "affine_step_: eps must have u's shape")
    torch._check(seeds.dim() == 1 and seeds.dtype == torch.int64,
                 lambda: "affine_step_: seeds must be a 1-d int64 tensor")
    torch._check(len(coef) == 16, lambda: "affine_step_: coef must hold 16 numbers")


@torch.library.register_fake("psld_fast::affine_step_", lib=_lib)
def _affine_step_inplace_fake(u, eps, seeds, coef, step, stream) -> None:
    _check_fake(u, eps, seeds, coef)


@torch.library.register_fake("psld_fast::affine_step", lib=_lib)
def _affine_step_fake(u, eps, seeds, coef, step, stream) -> torch.Tensor:
    _check_fake(u, eps, seeds, coef)
    return torch.empty_like(u)


@torch.library.register_fake("psld_fast::lifted_step_", lib=_lib)
def _lifted_step_fake(u, d, y, seeds, coef, step, stream) -> None:
    torch._check(u.dim() >= 2 and u.shape[1] % 2 == 0, lambda: f"lifted_step_: bad u shape {u.shape}")
    torch._check(len(coef) == 16, lambda: "lifted_step_: coef must hold 16 numbers")


@torch.library.impl(_lib, "lifted_step_", "CompositeExplicitAutograd")
def _reference_lifted_step_(u, d, y, seeds, coef, step, stream=0) -> None:
    """The lifted op on backend "reference", and its fallback when no compiled kernel is registered
    for u's device (every device but CPU today)."""
    u_new, y_new = lifted_step_reference(u, d, y, seeds, coef, step, stream)
    if y_new is not None:
        y.copy_(y_new)
    u.copy_(u_new)


@torch.library.register_fake("psld_fast::ms_step_", lib=_lib)
def _ms_step_fake(u, eps, dbuf, seeds, coef, ms, record, step, stream) -> None:
    _check_fake(u, eps, seeds, coef)
    torch._check(len(ms) == 6, lambda: "ms_step_: ms must hold 6 numbers")


@torch.library.register_fake("psld_fast::lifted_ms_step_", lib=_lib)
def _lifted_ms_step_fake(u, d, y, dbuf, seeds, coef, ms, record, step, stream) -> None:
    torch._check(u.dim() >= 2 and u.shape[1] % 2 == 0, lambda: f"lifted_ms_step_: bad u shape {u.shape}")
    torch._check(len(coef) == 16 and len(ms) == 2, lambda: "lifted_ms_step_: coef 16 and ms 2 numbers")


@torch.library.impl(_lib, "ms_step_", "CompositeExplicitAutograd")
def _reference_ms_step_(u, eps, dbuf, seeds, coef, ms, record, step, stream=0) -> None:
    """The multistep op on backend "reference", and its fallback when no compiled kernel is registered
    for u's device."""
    u_new, d_new = ms_step_reference(u, eps, dbuf, seeds, coef, ms, record, step, stream)
    if record:
        dbuf.copy_(d_new)
    u.copy_(u_new)


@torch.library.impl(_lib, "lifted_ms_step_", "CompositeExplicitAutograd")
def _reference_lifted_ms_step_(u, d, y, dbuf, seeds, coef, ms, record, step, stream=0) -> None:
    """The lifted multistep op on backend "reference", and its fallback."""
    u_new, y_new, d_new = lifted_ms_step_reference(u, d, y, dbuf, seeds, coef, ms, record, step, stream)
    if y_new is not None:
        y.copy_(y_new)
    if record:
        dbuf.copy_(d_new)
    u.copy_(u_new)


@torch.library.register_fake("psld_fast::philox_test", lib=_lib)
def _philox_test_fake(seeds, numel, step, stream):
    B = seeds.shape[0]
    return (seeds.new_empty((B, numel, 4)), seeds.new_empty((B, numel, 4), dtype=torch.float32))


@torch.library.impl(_lib, "affine_step_", "CompositeExplicitAutograd")
def _reference_step_(u, eps, seeds, coef, step, stream=0) -> None:
    """The op on backend "reference", and its fallback when no compiled kernel is registered for u's
    device."""
    u.copy_(affine_step_reference(u, eps, seeds, coef, step, stream))


@torch.library.impl(_lib, "affine_step", "CompositeExplicitAutograd")
def _affine_step_functional(u, eps, seeds, coef, step, stream) -> torch.Tensor:
    out = u.clone(memory_format=torch.contiguous_format)
    torch.ops.psld_fast.affine_step_(out, eps, seeds, coef, step, stream)
    return out


def _load_compiled() -> tuple[bool, bool, str]:
    """Import psld_fast._C (registers the C++ kernels); returns (cpu, cuda, why-not)."""
    try:
        from . import _C
    except ImportError as exc:
        return False, False, f"psld_fast._C is not built ({exc})"
    return True, bool(getattr(_C, "WITH_CUDA", 0)), "psld_fast._C was built without CUDA"


HAS_CPU_KERNEL, HAS_CUDA_KERNEL, _COMPILED_NOTE = _load_compiled()


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        from . import triton_step  # noqa: F401  (registers psld_fast::affine_step_triton_)
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return False, f"psld_fast.triton_step is unavailable ({type(exc).__name__}: {exc})"
    return True, ""


def has_triton() -> bool:
    """Whether the Triton kernel imports (imports Triton on first call)."""
    return _triton_status()[0]


def __getattr__(name):  # HAS_TRITON is computed lazily: importing Triton is slow
    if name == "HAS_TRITON":
        return has_triton()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def affine_step_(u: torch.Tensor, eps: torch.Tensor | None, seeds: torch.Tensor,
                 coef: Sequence[float], step: int, stream: int = 0) -> None:
    """In-place fused step on ``u`` (B, 2C, ...) with the kernel registered for u's device."""
    torch.ops.psld_fast.affine_step_(u, eps, seeds, [float(c) for c in coef], int(step), int(stream))


def affine_step(u: torch.Tensor, eps: torch.Tensor | None, seeds: torch.Tensor,
                coef: Sequence[float], step: int, stream: int = 0) -> torch.Tensor:
    """Functional twin of :func:`affine_step_`: returns the new state, ``u`` unchanged."""
    return torch.ops.psld_fast.affine_step(u, eps, seeds, [float(c) for c in coef], int(step),
                                           int(stream))


_warned: set[str] = set()


def _log_fallback(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.info(msg)


def _unavailable(backend: str, device_type: str, dtype) -> str | None:
    """Why ``backend`` cannot run on this device/dtype, or None if it can."""
    if backend == "reference":
        return None
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"the kernels support float32/float16/bfloat16 states, not {dtype} (float64 runs on backend 'reference')"
    if backend == "cpu":
        if device_type != "cpu":
            return f"the state is on {device_type}; the C++ CPU kernel takes CPU tensors: use backend 'cuda', 'triton' or 'auto'"
        return None if HAS_CPU_KERNEL else _COMPILED_NOTE
    if backend == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        ok, why = _triton_status()  # Triton's interpreter runs the kernel on CPU tensors (slowly)
        if ok:
            from .triton_step import INTERPRETED

            return None if INTERPRETED else ("TRITON_INTERPRET=1 was set after triton was imported; "
                                             "set it before the first import")
        return why
    if device_type != "cuda":
        return _not_on_cuda(backend, device_type)
    if backend == "cuda":
        return None if HAS_CUDA_KERNEL else _COMPILED_NOTE
    ok, why = _triton_status()
    return None if ok else why


def _not_on_cuda(backend: str, device_type: str) -> str:
    """Why the GPU backend ``backend`` cannot run a state on ``device_type``, with the way out."""
    where = (f"the state is on {device_type}" + ("" if torch.cuda.is_available() else
             f" and CUDA is not available here (torch {torch.__version__}"
             f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'})"))
    if backend == "triton":
        return (f"{where}; the Triton kernel runs on CUDA tensors, or on CPU tensors through Triton's "
                "interpreter (slow, for testing): set TRITON_INTERPRET=1 in the environment before starting, "
                "or use backend 'cpu' / 'auto'")
    return f"{where}; the CUDA kernel needs a CUDA device (device='cuda'); on CPU use backend 'cpu' or 'auto'"


def unavailable_reason(backend: str, device, dtype: torch.dtype | None = None) -> str | None:
    """Why ``backend`` cannot run a state on ``device`` (of ``dtype``), or None when it can (for
    checks made before any work, e.g. by the command line)."""
    name = str(backend).strip().lower()
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {BACKENDS}"
    return None if name == "auto" else _unavailable(name, torch.device(device).type, dtype)


def resolve_backend(backend: str | None, device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run the step for a state on ``device`` (of ``dtype``, if given).

    ``backend`` None means the ``PSLD_FAST_BACKEND`` environment variable, else "auto".
    Raises RuntimeError when an explicitly requested backend cannot run, ValueError for an unknown
    name.  Does not initialise CUDA.
    """
    requested = backend if backend is not None else (os.environ.get(ENV_BACKEND) or "auto")
    requested = requested.strip().lower()
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    device_type = torch.device(device).type
    if requested != "auto":
        why = _unavailable(requested, device_type, dtype)
        if why is not None:
            raise RuntimeError(f"backend={requested!r} requested but {why}")
        _log_fallback(f"psld_fast: using the {requested} step on {device_type} (requested)")
        return requested
    candidates = ("cuda", "triton") if device_type == "cuda" else ("cpu",) if device_type == "cpu" else ()
    reasons = []
    chosen = "reference"
    for name in candidates:
        why = _unavailable(name, device_type, dtype)
        if why is None:
            chosen = name
            break
        reasons.append(f"{name}: {why}")
    _log_fallback(f"psld_fast: using the {chosen} step on {device_type} (auto"
                  + (f"; {'; '.join(reasons)})" if reasons else ")"))
    return chosen


def composite_lifted_step(step_fn: Callable[..., None]) -> Callable[..., None]:
    """The lifted step from a plain fused step: ``step_fn(u, (d, d), seeds, plain coef)`` (the plain
    step with ``Q = [[G0, 0], [G1, 0]]``, so the eps half that m would read is multiplied by zero),
    then ``y = W0 x' + W1 m'`` from the new state (one more pass over it).  Torch ops and the step
    only: no host sync, so the CUDA-graph runner captures it.  In float32/float64 y equals the fused
    op's up to the rounding of one multiply-add; in 16-bit states y is formed from the rounded state
    (the fused CPU op forms it before rounding)."""

    def lifted_step(u, d, y, seeds, coef, step, stream=0) -> None:
        plain = _plain_coef_cached(tuple(coef))
        step_fn(u, None if d is None else torch.cat([d, d], dim=1), seeds, plain, step, stream)
        if y is not None:
            C = u.shape[1] // 2
            ct = torch.float64 if u.dtype == torch.float64 else torch.float32
            y.copy_(torch.add(u[:, :C].to(ct) * float(coef[14]), u[:, C:].to(ct), alpha=float(coef[15])))

    lifted_step.__name__ = f"composite_lifted_step({getattr(step_fn, '__name__', 'step')})"
    return lifted_step


@functools.lru_cache(maxsize=4096)
def _plain_coef_cached(coef: tuple) -> list:
    return lifted_plain_coef(coef)


def get_lifted_step_fn(backend: str) -> Callable[..., None]:
    """``fn(u, d, y, seeds, coef16, step, stream)`` for a lifted model's fused loop with ``backend``:
    the fused op with the C++ CPU and the CUDA kernels (one pass: state, D and y together), with
    Triton the plain fused step plus one pass for y (:func:`composite_lifted_step`)."""
    if backend == "reference":
        return _reference_lifted_step_
    if (backend == "cpu" and HAS_CPU_KERNEL) or (backend == "cuda" and HAS_CUDA_KERNEL):
        return torch.ops.psld_fast.lifted_step_.default
    fn = composite_lifted_step(get_step_fn(backend))
    if backend == "triton":
        fn._psld_ms_variant = _triton_lifted_ms_step(get_ms_step_fn(backend))
    return fn


def composite_ms_step(step_fn: Callable[..., None]) -> Callable[..., None]:
    """The multistep op from any plain step ``step_fn`` (a caller's own, for instance): this call's D
    from the state and eps before the step, the step, then ``x += g0 D_prev``, ``m += g1 D_prev`` and
    dbuf <- D as torch ops (two more passes; no host sync).  The fused backends do it in the step's
    own pass (:func:`get_ms_step_fn`)."""

    def ms_step(u, eps, dbuf, seeds, coef, ms, record, step, stream=0) -> None:
        C = u.shape[1] // 2
        g0, g1 = float(ms[0]), float(ms[1])
        d_new = ms_estimate(u, eps, ms[2:], dbuf.dtype) if record else None
        step_fn(u, eps, seeds, coef, step, stream)
        if g0 != 0.0 or g1 != 0.0:
            d_prev = dbuf.to(u.dtype)
            u[:, :C].add_(d_prev, alpha=g0)
            u[:, C:].add_(d_prev, alpha=g1)
        if d_new is not None:
            dbuf.copy_(d_new)

    ms_step.__name__ = f"composite_ms_step({getattr(step_fn, '__name__', 'step')})"
    return ms_step


def composite_lifted_ms_step(lifted_step_fn: Callable[..., None]) -> Callable[..., None]:
    """The lifted multistep op from any lifted step: d copied (the step may overwrite it: an identity
    denoiser returns y), the step, then ``G D_prev`` added to u and ``(W . G) D_prev`` to y, dbuf <- d."""

    def lifted_ms_step(u, d, y, dbuf, seeds, coef, ms, record, step, stream=0) -> None:
        C = u.shape[1] // 2
        g0, g1 = float(ms[0]), float(ms[1])
        d_new = d.to(dbuf.dtype, copy=True) if record else None
        lifted_step_fn(u, d, y, seeds, coef, step, stream)
        if g0 != 0.0 or g1 != 0.0:
            d_prev = dbuf.to(u.dtype)
            u[:, :C].add_(d_prev, alpha=g0)
            u[:, C:].add_(d_prev, alpha=g1)
            if y is not None:
                y.add_(d_prev.to(y.dtype), alpha=float(coef[14]) * g0 + float(coef[15]) * g1)
        if d_new is not None:
            dbuf.copy_(d_new)

    lifted_ms_step.__name__ = f"composite_lifted_ms_step({getattr(lifted_step_fn, '__name__', 'step')})"
    return lifted_ms_step


def _triton_lifted_ms_step(ms_step_fn: Callable[..., None]) -> Callable[..., None]:
    """The lifted multistep op from a fused plain multistep op (Triton): eps = (d, d), D recorded as
    ``1 * d``, then y from the new state (one more pass, as :func:`composite_lifted_step`)."""

    def lifted_ms_step(u, d, y, dbuf, seeds, coef, ms, record, step, stream=0) -> None:
        plain = _plain_coef_cached(tuple(coef))
        ms6 = [float(ms[0]), float(ms[1]), 0.0, 0.0, 1.0, 0.0]
        ms_step_fn(u, None if d is None else torch.cat([d, d], dim=1), dbuf, seeds, plain, ms6, record, step, stream)
        if y is not None:
            C = u.shape[1] // 2
            y.copy_(torch.add(u[:, :C].float() * float(coef[14]), u[:, C:].float(), alpha=float(coef[15])))

    lifted_ms_step.__name__ = f"triton_lifted_ms_step({getattr(ms_step_fn, '__name__', 'step')})"
    return lifted_ms_step


def get_ms_step_fn(backend: str) -> Callable[..., None]:
    """``fn(u, eps, dbuf, seeds, coef, ms, record, step, stream)``: the multistep op with ``backend``
    (one pass over u, eps and dbuf with every kernel; the definition on "reference")."""
    if backend == "reference":
        return _reference_ms_step_
    if backend in ("cpu", "cuda"):
        get_step_fn(backend)  # the same availability checks
        return torch.ops.psld_fast.ms_step_.default
    if backend == "triton":
        get_step_fn(backend)
        from .triton_step import ms_step_triton_
        return ms_step_triton_
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[1:]}")


def get_lifted_ms_step_fn(backend: str) -> Callable[..., None]:
    """``fn(u, d, y, dbuf, seeds, coef16, ms2, record, step, stream)``: the lifted multistep op with
    ``backend`` (one pass with the C++ CPU and CUDA kernels; Triton: the fused plain multistep op
    plus one pass for y)."""
    if backend == "reference":
        return _reference_lifted_ms_step_
    if (backend == "cpu" and HAS_CPU_KERNEL) or (backend == "cuda" and HAS_CUDA_KERNEL):
        return torch.ops.psld_fast.lifted_ms_step_.default
    if backend == "triton":
        return _triton_lifted_ms_step(get_ms_step_fn(backend))
    return composite_lifted_ms_step(get_lifted_step_fn(backend))


def multistep_fns(step_fn, lifted_step_fn=None) -> tuple:
    """The multistep ops matching a loop's plain and lifted step functions: the fused op of the same
    backend when ``step_fn`` / ``lifted_step_fn`` is one of this module's (``get_step_fn`` /
    ``get_lifted_step_fn``), else the composite of the given function (:func:`composite_ms_step`).
    Imports nothing (Triton's op is matched only when psld_fast.triton_step is already loaded)."""
    return (None if step_fn is None else (_fused_variant(step_fn, False) or composite_ms_step(step_fn)),
            None if lifted_step_fn is None else (_fused_variant(lifted_step_fn, True)
                                                 or composite_lifted_ms_step(lifted_step_fn)))


def _fused_variant(fn, lifted: bool):
    v = getattr(fn, "_psld_ms_variant", None)  # this module's Python step functions carry theirs
    if v is not None:
        return v
    if HAS_CPU_KERNEL:
        if not lifted and fn is torch.ops.psld_fast.affine_step_.default:
            return torch.ops.psld_fast.ms_step_.default
        if lifted and fn is torch.ops.psld_fast.lifted_step_.default:
            return torch.ops.psld_fast.lifted_ms_step_.default
    ts = sys.modules.get(__package__ + ".triton_step")
    if not lifted and ts is not None and fn is getattr(ts, "affine_step_triton_", None):
        return ts.ms_step_triton_
    return None


_reference_step_._psld_ms_variant = _reference_ms_step_
_reference_lifted_step_._psld_ms_variant = _reference_lifted_ms_step_


def get_step_fn(backend: str) -> Callable[..., None]:
    """``fn(u, eps, seeds, coef, step, stream)`` that updates ``u`` in place with ``backend``
    (a resolved name, see :func:`resolve_backend`)."""
    if backend == "reference":
        return _reference_step_
    if backend in ("cpu", "cuda"):
        if not HAS_CPU_KERNEL or (backend == "cuda" and not HAS_CUDA_KERNEL):
            raise RuntimeError(f"backend={backend!r} requested but {_COMPILED_NOTE}")
        # The op overload itself: no Python wrapper or overload resolution per NFE.  Callers pass
        # coef as a list of floats and int step/stream (Stage.coef is one).
        return torch.ops.psld_fast.affine_step_.default
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            raise RuntimeError(f"backend='triton' requested but {why}")
        from .triton_step import affine_step_triton_
        return affine_step_triton_
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[1:]}")
