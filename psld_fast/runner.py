"""The sampling loop of one batch, shared by ``psld_fast.sample`` and the CUDA-graph runner.

``run_program`` runs ``eps = net(u, tau_k); affine_step_(u, eps, seeds, coef_k, k)`` for every
stage k of a compiled :class:`~psld_fast.program.Program`.  Per NFE it does only that: the forward
times of all stages are made before the loop (on CPU in one tensor), the coefficients are Python floats
computed once per program, the network output is validated on its first call, and nothing syncs
the host.  NaN/Inf checking is folded into the batch's one final check of the state: a NaN or Inf
in a network output reaches the state at that stage (the kernels multiply every input by its
coefficient, and ``0 * NaN`` is NaN) and stays there (every later stage reads the state), so the
final ``isfinite(u).all()`` sees it.  Only when that check fails is the batch run again with a
check after every network call, to name the stage in the error.

Also here: ``torch.compile`` of the network (:func:`compiled_model`, cached per network and mode;
torch.compile itself caches per input shape), used by ``sample(..., compile=...)``.

This module imports nothing from the rest of the runner layer (``api``, ``graphs``): both import it.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import weakref

import torch

from .guards import warn_at_caller
from .models import EpsModel
from .program import Program, ms_estimate  # noqa: F401  (ms_estimate re-exported: bench, tests)

__all__ = ["run_program", "Multistep", "multistep_for", "ms_estimate", "nonfinite", "raise_if_nonfinite", "as_step_eps", "check_eps", "first_call", "stage_taus",
           "compiled_model", "compile_mode", "clear_compile_cache", "COMPILE_MODES", "warn_if_training",
           "MODE_SENSITIVE"]

log = logging.getLogger("psld_fast")


@torch.no_grad()
def run_program(model, program: Program, seeds: torch.Tensor, step_fn, *, dtype, device,
                stream: int = 0, callback=None, batch_start: int = 0, bar=None,
                check: bool = True, extra_args: dict | None = None, lifted_step_fn=None,
                init_x: torch.Tensor | None = None, init_tau: float | None = None) -> torch.Tensor:
    """Run one batch of a compiled program eagerly; returns the final packed state u.

    Raises FloatingPointError naming the first stage whose network output held NaN/Inf (or, if
    the outputs were finite, saying the state itself overflowed), and ValueError/TypeError for a
    model output of the wrong type, shape or dtype.  ``check=False`` skips the final NaN/Inf check,
    the batch's one host sync: the loop alone never syncs.

    ``extra_args`` (a dict, already sliced to this batch) go to every network call as keywords.
    A lifted model (:class:`~psld_fast.lift.DenoiserModel`) with a ``lifted_step_fn`` runs the fused
    lifted loop ``D = denoiser(y, sigma_k); lifted_step_(u, D, y, ...)``; without one its forward
    computes eps and the plain step runs.  ``init_x`` (B, *shape) at forward time ``init_tau``
    replaces the prior draw by the exact lift of a given position-space x (lifted models only).
    """
    kw = dict(dtype=dtype, device=device, stream=stream, extra_args=extra_args or {},
              lifted_step_fn=lifted_step_fn, init_x=init_x, init_tau=init_tau)
    u = _loop(model, program, seeds, step_fn, callback=callback, batch_start=batch_start, bar=bar, **kw)
    if check and not bool(torch.isfinite(u).all()):  # the batch's one host sync
        kind, stage = _first_bad_stage(model, program, seeds, step_fn, **kw)
        if kind == "network":
            raise_if_nonfinite(stage, False, program, batch_start)
        raise_if_nonfinite(-1, True, program, batch_start, state_stage=stage)
    return u


def stage_taus(program: Program, B: int, dtype, device) -> list:
    """Per stage: the (B,) forward-time tensor of its network call, or None.

    On CPU all rows come from one tensor (one allocation per batch instead of one per NFE); on a
    GPU each row is a device-side fill, since copying a host tensor over would sync the host.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return [torch.full((B,), s.tau, dtype=dtype, device=device) if s.uses_network else None
                for s in program.stages]
    taus = [s.tau for s in program.stages if s.uses_network]
    rows = iter(torch.tensor(taus, dtype=dtype)[:, None].expand(len(taus), B).contiguous().unbind(0))
    return [next(rows) if s.uses_network else None for s in program.stages]


def _callable(model):
    """The callable to run per NFE: the user's network itself when ``model`` is a plain EpsModel
    without hooks (saves the wrapper's Module.__call__), else the model."""
    if (type(model) is EpsModel and model.net is not None and not model._forward_hooks
            and not model._forward_pre_hooks and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks):
        return model.net
    return model


def _loop(model, program, seeds, step_fn, *, dtype, device, stream, callback=None, batch_start=0,
          bar=None, first_bad=None, extra_args=None, lifted_step_fn=None, init_x=None, init_tau=None):
    extra_args = extra_args or {}
    if lifted_step_fn is not None and hasattr(model, "lifted"):
        return _lifted_loop(model, program, seeds, lifted_step_fn, dtype=dtype, device=device, stream=stream,
                            callback=callback, batch_start=batch_start, bar=bar, first_bad=first_bad,
                            extra_args=extra_args, init_x=init_x, init_tau=init_tau)
    B = seeds.shape[0]
    C = model.shape[0]
    u = torch.empty((B, 2 * C, *model.shape[1:]), dtype=dtype, device=device)
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    taus = stage_taus(program, B, tau_dtype, device)
    net = _callable(model)
    lower = dtype != torch.float64
    checked = False
    nfe = 0
    ms = multistep_for(program, u, step_fn)
    for k, stage in enumerate(program.stages):
        tau = taus[k]
        eps = None
        if k == 0 and init_x is not None:  # the exact lift of a given x replaces the prior draw
            _init_from_x(model, program, u, init_x, init_tau, seeds, step_fn, stream)
            continue
        if tau is not None:
            if not checked:
                eps = first_call(net, u, tau, model.shape, extra_args)
                check_eps(eps, u, k)
                checked = True
            else:
                eps = net(u, tau, **extra_args) if extra_args else net(u, tau)
            if callback is not None:
                y_call, denoised = _denoised_estimate(model, u, eps, stage.tau)
            if lower and eps.dtype == torch.float64:
                eps = eps.float()
            if first_bad is not None and not bool(torch.isfinite(eps).all()):
                first_bad.append(("network", k))  # its input, the state, was finite (checked below)
                return u
            nfe += 1
        if ms is not None and stage.is_multistep:
            ms.step(stage, u, eps, seeds, k, stream)
        else:
            step_fn(u, eps, seeds, stage.coef, k, stream)
        if first_bad is not None and not bool(torch.isfinite(u).all()):
            first_bad.append(("state", k))  # finite inputs, non-finite result: the sampler overflowed
            return u
        if callback is not None:
            info = {"stage": k, "nfe": nfe, "tau": stage.tau, "u": u, "batch_start": batch_start}
            if tau is not None:
                info.update(x=y_call, denoised=denoised, sigma=y_call_sigma(model, stage.tau))
            callback(info)
        if bar is not None and tau is not None:
            bar.update(B)
    return u


def _init_from_x(model, program, u, init_x, init_tau, seeds, step_fn, stream):
    """Stage 0 from a given position-space x: ``z = mu x + v n`` (the plain step with eps = (x, x))."""
    from .program import lifted_plain_coef

    coef = lifted_plain_coef(model.lifted(program, init_tau).init_coef)
    x = init_x.to(u.dtype)
    step_fn(u, torch.cat([x, x], dim=1), seeds, coef, 0, stream)


def y_call_sigma(model, tau: float) -> float:
    from .lift import _scalar_terms

    return _scalar_terms(model.sde, tau)["sigma"]


def _denoised_estimate(model, u, eps, tau):
    """The position-space state ``y = w^T z`` and x0 estimate ``w^T (z + Sigma s)`` (s from eps) of a
    stage's call, for callbacks."""
    from .lift import _scalar_terms, x0_from_eps

    t = _scalar_terms(model.sde, tau)
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    C = u.shape[1] // 2
    x, m = u[:, :C].to(ct), u[:, C:].to(ct)
    e = eps.to(ct)
    y = (t["w0"] * x + t["w1"] * m).to(u.dtype)
    return y, x0_from_eps(t, x, m, e[:, :C], e[:, C:]).to(u.dtype)


def _lifted_loop(model, program, seeds, lifted_step_fn, *, dtype, device, stream, callback, batch_start,
                 bar, first_bad, extra_args, init_x, init_tau):
    """The fused loop of a lifted model: per NFE one denoiser call and one lifted_step_."""
    B = seeds.shape[0]
    C = model.shape[0]
    lp = model.lifted(program, init_tau if init_x is not None else None)
    u = torch.empty((B, 2 * C, *model.shape[1:]), dtype=dtype, device=device)
    y = torch.empty((B, C, *model.shape[1:]), dtype=dtype, device=device)
    sig_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # the denoiser's sigma per call, clamped to its trained range once here (not per NFE)
    sig = [None if s is None else torch.full((B,), min(max(s, model.sigma_min), model.sigma_max),
                                             dtype=sig_dtype, device=device) for s in lp.sigmas]
    den = model.denoiser
    unwrap = None  # set at the first call: whether outputs are diffusers-style objects (.sample)
    lower = dtype != torch.float64
    nfe = 0
    ms = multistep_for(program, u, None, lifted_step_fn)
    for k, stage in enumerate(program.stages):
        D = None
        coef = lp.coef[k]
        if k == 0 and init_x is not None:
            D, coef = init_x.to(dtype), lp.init_coef
        elif sig[k] is not None:
            if unwrap is None:  # first call: every check of DenoiserModel.denoise
                raw = den(y, sig[k], **extra_args)
                unwrap = not isinstance(raw, torch.Tensor)
                D = model.check_output(raw, y)
                if D.device != y.device:
                    raise ValueError(f"the denoiser returned its output on {D.device}, the input is on {y.device}")
                if not D.is_floating_point():
                    raise ValueError(f"the denoiser returned dtype {D.dtype}; a floating dtype is required")
            else:
                D = den(y, sig[k], **extra_args)
                if unwrap:
                    D = D.sample
            if lower and D.dtype == torch.float64:
                D = D.float()
            if first_bad is not None and not bool(torch.isfinite(D).all()):
                first_bad.append(("network", k))
                return u
            nfe += 1
        if callback is not None:  # copies: the step overwrites y (and D, when the denoiser returned y)
            info = {"stage": k, "nfe": nfe, "tau": stage.tau, "u": u, "batch_start": batch_start}
            if sig[k] is not None:
                info.update(x=y.clone(), sigma=lp.sigmas[k], denoised=D.clone())
        y_k = y if lp.writes_y[k] else None
        if ms is not None and stage.is_multistep:
            ms.lifted_step(stage, u, D, y_k, seeds, coef, k, stream)
        else:
            lifted_step_fn(u, D, y_k, seeds, coef, k, stream)
        if first_bad is not None and not bool(torch.isfinite(u).all()):
            first_bad.append(("state", k))  # finite inputs, non-finite result: the sampler overflowed
            return u
        if callback is not None:
            callback(info)
        if bar is not None and sig[k] is not None:
            bar.update(B)
    return u


class Multistep:
    """What a multistep program's loop needs (``Stage.G2`` / ``dcoef``): ``dbuf``, the previous
    call's data estimate D (one half's shape, float32; float64 for a float64 state), and the fused
    multistep ops matching the loop's step functions (:func:`psld_fast.ops.multistep_fns`).  A stage
    that reads or records D runs ``step`` (one pass over u, eps and dbuf with the fused backends),
    every other stage the plain step.  :func:`multistep_for` returns None for one-step programs."""

    __slots__ = ("dbuf", "fn", "lifted_fn")

    def __init__(self, u: torch.Tensor, step_fn, lifted_step_fn=None):
        from .ops import multistep_fns

        C = u.shape[1] // 2
        dt = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.dbuf = torch.zeros((u.shape[0], C, *u.shape[2:]), dtype=dt, device=u.device)
        self.fn, self.lifted_fn = multistep_fns(step_fn, lifted_step_fn)

    def step(self, stage, u, eps, seeds, k: int, stream: int) -> None:
        self.fn(u, eps, self.dbuf, seeds, stage.coef, stage.ms, stage.records, k, stream)

    def lifted_step(self, stage, u, d, y, seeds, coef, k: int, stream: int) -> None:
        self.lifted_fn(u, d, y, self.dbuf, seeds, coef, stage.ms_lifted, stage.records, k, stream)


def multistep_for(program: Program, u: torch.Tensor, step_fn, lifted_step_fn=None) -> "Multistep | None":
    return Multistep(u, step_fn, lifted_step_fn) if program.multistep else None


#: Layers whose output depends on the mode: sampled in training mode they give random dropout
#: masks, batch statistics, and (batch norm) running statistics updated by every call.
MODE_SENSITIVE = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
_warned_training: "weakref.WeakSet" = weakref.WeakSet()
_warned_lock = threading.Lock()


def warn_if_training(model) -> bool:
    """One RuntimeWarning (at the caller's line) per network sampled while a dropout or batch-norm
    layer in it is in training mode; ``sample`` never switches the mode itself (``.eval()`` would
    change the caller's module).  Called by ``sample`` on every path: eager CPU/GPU and CUDA graphs.
    Returns whether the network is in that state."""
    net = model.net if type(model) is EpsModel and isinstance(model.net, torch.nn.Module) else model
    if not isinstance(net, torch.nn.Module):
        return False
    layers = [m for m in net.modules() if isinstance(m, MODE_SENSITIVE) and m.training]
    if not layers:
        return False
    with _warned_lock:
        if net in _warned_training:
            return True
        _warned_training.add(net)
    warn_at_caller(f"the network ({type(net).__name__}) is in training mode and has dropout or batch-norm "
                   f"layers ({type(layers[0]).__name__}): it is sampled as it is (random masks, batch "
                   "statistics, running statistics updated); call net.eval() before sampling", RuntimeWarning)
    return True


def first_call(net, u: torch.Tensor, tau: torch.Tensor, shape, extra_args=None) -> torch.Tensor:
    """The batch's first network call; a RuntimeError inside the network (typically a shape mismatch
    such as "mat1 and mat2 shapes cannot be multiplied") is re-raised naming the shapes it was given,
    so that a wrong ``shape=`` is found at once.  Out-of-memory errors pass through unchanged."""
    try:
        return net(u, tau, **extra_args) if extra_args else net(u, tau)
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(
            f"the network failed on its first call, given u of shape {tuple(u.shape)} (a batch of samples of "
            f"shape {tuple(shape)}, x and m stacked on dim 1) and tau of shape {tuple(tau.shape)}: {first}. "
            "Is the sample shape right (shape= of sample / EpsModel)?") from exc


def _first_bad_stage(model, program, seeds, step_fn, **kw) -> tuple[str, int]:
    """Rerun the batch (same seeds: same path) checking every network output and every state:
    ("network", k) when stage k's network returned NaN/Inf for a finite state, ("state", k) when
    stage k's step turned a finite state and network output into NaN/Inf (the sampler diverged),
    ("state", -1) when the rerun stayed finite."""
    first_bad: list[tuple[str, int]] = []
    _loop(model, program, seeds, step_fn, first_bad=first_bad, **kw)
    return first_bad[0] if first_bad else ("state", -1)


def nonfinite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor, True when ``t`` holds a NaN or Inf; stays on the device (no sync).

    One reduction pass: a float32 sum is NaN/Inf exactly when some element is (short of a sum of
    finite values above 3e38, which no eps network produces), and costs a fraction of
    ``isfinite(t).all()``'s two passes.  (Used by the CUDA-graph runner, which flags NaN/Inf per
    stage on the device.)
    """
    return ~torch.isfinite(t.sum(dtype=torch.float32))


def raise_if_nonfinite(bad_stage: int, state_bad: bool, program: Program, batch_start: int,
                       state_stage: int | None = None) -> None:
    """FloatingPointError for a batch whose network output (first at ``bad_stage`` >= 0) or state
    (``state_bad``; first non-finite after stage ``state_stage`` when known) held NaN/Inf."""
    if bad_stage >= 0:
        raise FloatingPointError(
            f"the network returned NaN/Inf at stage {bad_stage} (tau={program.stages[bad_stage].tau:.6g}) "
            f"for the batch starting at sample {batch_start}, although its input state was finite")
    if state_bad:
        info = program.info
        where = (f" at stage {state_stage} of {len(program.stages)}" if state_stage is not None and state_stage >= 0
                 else "")
        knobs = f"{program.sampler} at NFE {program.nfe}" + (
            f" with lambda_s={info['lambda_s']:g}" if info.get("lambda_s") not in (None, 1.0) else "")
        raise FloatingPointError(
            f"the sampler diverged: the state overflowed to NaN/Inf{where} for the batch starting at sample "
            f"{batch_start}, with finite network outputs ({knobs}); use a smaller lambda_s, more NFE or "
            "another sampler")


def as_step_eps(eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The fused step computes in float32: a float64 network output for a lower-precision state is
    rounded to float32 here (the kernels take float32/float16/bfloat16 eps)."""
    if eps.dtype == torch.float64 and u.dtype != torch.float64:
        return eps.float()
    return eps


def check_eps(eps, u, k) -> None:
    """TypeError/ValueError for a network output that is not a floating tensor of u's shape and device."""
    if not isinstance(eps, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(eps).__name__} at stage {k}")
    if eps.shape != u.shape:
        raise ValueError(f"the model returned eps of shape {tuple(eps.shape)}, expected the state's "
                         f"shape {tuple(u.shape)} (eps = cat(eps_x, eps_m) on dim 1)")
    if not eps.is_floating_point():
        raise ValueError(f"the model returned eps of dtype {eps.dtype}; a floating dtype is required")
    if eps.device != u.device:
        raise ValueError(f"the model returned eps on {eps.device}, the state is on {u.device}")


# ------------------------------------------------------------------------------- torch.compile
#: Values of ``sample(..., compile=...)`` besides True/False: torch.compile modes.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# With our CUDA-graph runner the network is captured inside our graph; torch.compile's own CUDA
# graphs (cudagraph trees, used by these modes) cannot be captured inside another capture.
_NO_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
COMPILE_CACHE_SIZE = 4

_compile_lock = threading.Lock()
_compiled: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_warmed: set = set()


def compile_mode(compile, graphed: bool) -> str | None:
    """The torch.compile mode for ``sample``'s ``compile`` argument (None: no compilation).

    True means "default".  Under the CUDA-graph runner, modes that use torch.compile's own CUDA
    graphs are replaced by their no-cudagraphs twin ("reduce-overhead" -> "default",
    "max-autotune" -> "max-autotune-no-cudagraphs"): our graph already removes the launch overhead
    that reduce-overhead targets, and a cudagraph-trees callable cannot be captured in another graph.
    """
    if compile is False or compile is None:
        return None
    if compile is True:
        mode = "default"
    elif isinstance(compile, str) and compile in COMPILE_MODES:
        mode = compile
    else:
        raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}")
    if graphed and mode in _NO_CUDAGRAPHS:
        log.info("psld_fast: compile=%r under the CUDA-graph runner uses mode %r", mode, _NO_CUDAGRAPHS[mode])
        mode = _NO_CUDAGRAPHS[mode]
    return mode


def compiled_model(model: EpsModel, mode: str) -> EpsModel:
    """An EpsModel whose network is ``torch.compile(net, mode=mode, dynamic=False)``.

    Cached per (network, mode): later calls (and the CUDA-graph runner's cache, which keys on the
    network object) see the same compiled object; torch.compile caches the compiled code per input
    shape.  The cache keeps the last ``COMPILE_CACHE_SIZE`` networks alive (a compiled network
    holds its original); :func:`clear_compile_cache` empties it.
    """
    lifted = hasattr(model, "lifted") and getattr(model, "denoiser", None) is not None
    if lifted:  # a lifted model: compile its denoiser, keep the fused lifted loop
        net = model.denoiser
    else:
        net = model.net if type(model) is EpsModel and model.net is not None else model
    key = (id(net), mode)
    with _compile_lock:
        hit = _compiled.get(key)
        if hit is not None and hit[0]() is net:
            _compiled.move_to_end(key)
            compiled = hit[1]
        else:
            compiled = torch.compile(net, mode=mode, dynamic=False)
            try:
                ref = weakref.ref(net)
            except TypeError:
                ref = (lambda obj: (lambda: obj))(net)
            _compiled[key] = (ref, compiled)
            while len(_compiled) > COMPILE_CACHE_SIZE:
                _compiled.popitem(last=False)
    if lifted:
        import copy

        twin = copy.copy(model)
        twin.__dict__ = dict(model.__dict__)
        twin._modules = dict(model._modules)
        twin._modules.pop("denoiser", None)
        twin.__dict__["denoiser"] = compiled
        return twin
    return EpsModel(compiled, sde=model.sde, shape=model.shape, name=getattr(model, "name", None))


def warm_compiled(model: EpsModel, program: Program, B: int, dtype, device) -> float:
    """Run the compiled network once on a (B, 2C, ...) state if this (network, shape, dtype) has not
    run yet, so that compilation happens here and not inside the timed loop; returns the seconds
    spent (0 when already warm)."""
    net = getattr(model, "denoiser", None)
    key = (id(net if net is not None else model.net), B, tuple(model.shape), dtype, str(device))
    with _compile_lock:
        if key in _warmed:
            return 0.0
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tau = next(t for t in stage_taus(program, B, tau_dtype, device) if t is not None)
    u = torch.zeros((B, 2 * model.shape[0], *model.shape[1:]), dtype=dtype, device=device)
    t0 = time.perf_counter()
    model(u, tau)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    with _compile_lock:
        _warmed.add(key)
    return elapsed


def clear_compile_cache() -> None:
    """Forget every compiled network (torch.compile's own code cache is torch._dynamo.reset())."""
    with _compile_lock:
        _compiled.clear()
        _warmed.clear()
