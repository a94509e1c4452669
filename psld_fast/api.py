"""``psld_fast.sample``: compile a sampler, then run its stages with one fused op per NFE.

The loop is ``eps = model(u, tau_k); affine_step_(u, eps, seeds, coef_k, k)`` for every stage k of
the compiled program (:func:`psld_fast.runner.run_program`, shared with the CUDA-graph runner of
:mod:`psld_fast.graphs`).  Nothing inside it syncs the host: NaN/Inf from the network reaches the
state, which is checked once at the end of a batch.
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from .graphs import extra_args_spec, get_runner, use_cuda_graph
from .guards import MAX_NFE, as_count, check_data_range, check_memory, seeds_int64, warn_at_caller
from .models import EpsModel, GaussianMixture, as_shape
from .sde import PSLD
from .runner import (as_step_eps, compile_mode, compiled_model, nonfinite, raise_if_nonfinite,  # noqa: F401
                     run_program, warm_compiled, warn_if_training)
from .samplers import ALL_SAMPLERS, compile_sampler

__all__ = ["sample", "SampleResult", "DEFAULT_SEED", "make_seeds"]

log = logging.getLogger("psld_fast")

#: Seeds default to ``DEFAULT_SEED + arange(num_samples)`` when neither seeds nor generator is given.
DEFAULT_SEED = 0

_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class SampleResult:
    """Samples and how they were made.  ``x``: (N, *shape) data; ``m``: momenta; ``nfe``: network
    evaluations spent per sample; ``seeds``: (N,) int64; ``timings``: seconds per phase:
    ``compile`` (the sampler program), ``net_compile`` (torch.compile warm-up, only with
    ``compile=``), ``sampling`` (the batches), ``total`` (all of it)."""

    x: torch.Tensor
    m: torch.Tensor
    nfe: int
    seeds: torch.Tensor
    timings: dict
    sampler: str
    backend: str
    program_info: dict = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        """Samples per second of the sampling loop, ``timings["sampling"]``: the same time that gives
        the per-NFE cost (``timings["sampling"] / nfe``), without the one-off compilation of the
        sampler program (``timings["compile"]``) and of the network (``timings["net_compile"]``)."""
        return self.x.shape[0] / max(self.timings.get("sampling", 0.0), 1e-12)


def make_seeds(num_samples: int, seeds=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample int64 seeds: given ones (checked), drawn from ``generator``, or the default range."""
    if seeds is not None:  # any int64 value (negative ones included); out-of-range values are refused
        return seeds_int64(seeds, num_samples)
    if generator is not None:
        return torch.randint(-(2**63), 2**63 - 1, (num_samples,), generator=generator, dtype=torch.int64)
    return DEFAULT_SEED + torch.arange(num_samples, dtype=torch.int64)


def _as_model(model, sde, shape) -> EpsModel:
    if isinstance(model, EpsModel):
        if shape is not None or sde is not None:  # a shallow copy: the caller's model is never changed
            model = copy.copy(model)
            model.__dict__ = dict(model.__dict__)
            for k in ("_modules", "_parameters", "_buffers"):
                if isinstance(model.__dict__.get(k), dict):
                    model.__dict__[k] = dict(model.__dict__[k])
        if shape is not None:
            model.shape = as_shape(shape)
        if sde is not None:
            model.sde = sde
    elif callable(model):
        model = EpsModel(model, sde=sde, shape=shape)
    else:
        raise TypeError(f"model must be an EpsModel or a callable net(u, tau) -> eps, got {type(model).__name__}")
    if model.shape is None:
        raise ValueError("sample: the data shape of one sample is unknown; pass shape=(C, ...) "
                         "or wrap the network as EpsModel(net, sde, shape)")
    if isinstance(model, GaussianMixture) and math.prod(model.shape) != model.means.shape[1]:
        raise ValueError(f"shape={tuple(model.shape)} does not fit this analytic model: its samples hold "
                         f"{model.means.shape[1]} values, not "
                         f"{math.prod(model.shape)}")
    return model


@torch.no_grad()
def sample(model, num_samples: int, *, sampler: str = "reduced_oba", nfe: int = 50,
           schedule="quadratic", lambda_s: float | None = None, lambda_reading: str | None = None,
           net_time: str | None = None, denoise: bool = True, split: str | None = None,
           coupling: str | None = None, lambda_form: str = "std", seeds=None,
           generator: torch.Generator | None = None, backend: str | None = "auto",
           dtype: torch.dtype = torch.float32, device=None, batch_size: int | None = None,
           callback=None, progress: bool = True, sde=None, shape=None, stream: int = 0,
           cuda_graph="auto", ci_lambda: float | None = None, compile=False,
           extra_args: dict | None = None, ms_variable: str | None = None) -> SampleResult:
    """Draw ``num_samples`` samples from a PSLD model with a (reduced) splitting sampler.

    Args:
        model: :class:`~psld_fast.models.EpsModel` (or a callable ``net(u, tau) -> eps`` with
            ``sde=`` and ``shape=`` given); u (B, 2C, ...) = cat(x, m), tau (B,) forward times.
        sampler: one of ``psld_fast.ALL_SAMPLERS``.
        nfe: network-evaluation budget ``N * evals_per_step + 1`` (the +1 is the denoising step);
            the result reports the NFE actually spent.
        schedule: "quadratic", "uniform", "cubic", "logsnr", "power:<p>" or an array of the N+1
            reverse times t_0 = 0 < t_1 < ... < t_N = T - eps_end (reverse time t = T - tau).
        lambda_s: x-noise scale (default 1: the reverse SDE; for ``ei_2m_sde`` the scale of the whole
            noise of its SDE family, default 0.25); ``lambda_reading`` "marginal" (a) |
            "noise" (b) (default per sampler: "marginal" for all today).
        net_time: "start" | "end" (time conditioning of calls made after O; default per sampler).
        split: "additive" (spec 4.3 default reading: O adds noise) | "ou" (O is the exact OU friction
            step); default per sampler (chosen by docs/readings_protocol.md).
        coupling: "sequential" | "joint": how one call serves consecutive A and B sub-steps
            (reduced samplers; default per sampler, chosen by the protocol).
        lambda_form: "std" (lambda_s scales the x-noise std) | "var" (it scales the variance).
        ci_lambda: lambda of the conjugate samplers (``ci_ddim``, ``ci_ddim2``, ``csps_d``; default per
            sampler; see :mod:`psld_fast.conjugate` for the stability bound).
        ms_variable: the variable the multistep samplers (``ei_2m``, ``ei_2m_sde``) extrapolate the
            data estimate in: "tau" | "sqrt_tau" | "rho" | "log_sigma" (default per sampler; see
            :mod:`psld_fast.multistep` and docs/multistep_protocol.md).
        seeds: (num_samples,) integers in the int64 range, one per sample (negative seeds are valid; a
            repeated seed gives the same sample again); else drawn from ``generator``; else 0..N-1.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton" (env ``PSLD_FAST_BACKEND``).
        dtype: state dtype (float32 default; float16/bfloat16 on the kernels; float64 reference).
        batch_size: samples per batch (default: all at once, up to 1024).
        callback: called after every stage with a dict (stage, nfe, tau, u, batch_start: the index of
            the batch's first sample).
        cuda_graph: "auto" (replay each batch from a CUDA graph on a GPU with a kernel backend),
            True, or False (eager); CPU runs are always eager (see :mod:`psld_fast.graphs`).
        compile: False (default), True (= "default") or a ``torch.compile`` mode: the network is
            run as ``torch.compile(net, mode=..., dynamic=False)``, cached per network and mode
            (torch.compile caches per shape).  Compilation happens in a warm-up call per batch
            shape before the sampling loop and is reported as ``timings["net_compile"]``.  Under
            the CUDA-graph runner "reduce-overhead"/"max-autotune" become "default"/
            "max-autotune-no-cudagraphs": the network is captured inside our graph, which already
            removes the launch overhead, and torch.compile's own CUDA graphs cannot be captured
            inside another.
        extra_args: keyword arguments for every network call (class labels, embeddings, masks):
            tensors whose first dimension is ``num_samples`` are sliced with the batch, anything
            else is passed as it is.  A :class:`~psld_fast.lift.DenoiserModel` passes them to its
            denoiser, a native model to ``net(u, tau, **extra_args)``.  The CUDA-graph runner keeps
            the tensors in static buffers refilled per batch; other values are part of the graph's
            signature (a new value captures a new graph).
    A :class:`~psld_fast.lift.DenoiserModel` (any EDM/VE denoiser or VP network) is sampled through
    the exact lift, with the process of :meth:`~psld_fast.lift.DenoiserModel.process_for` (its
    trained sigma range): per NFE one denoiser call and one lifted step (the fused ``lifted_step_``
    op on the CPU; elsewhere the backend's fused step plus one pass for the denoiser's next input),
    inside the CUDA graph too.
    Never changes the network's mode (a dropout/batch-norm network in training mode gets one
    RuntimeWarning, on every path) nor torch's thread count (call ``psld_fast.set_threads("auto")``
    for the command line's load-aware default).

    Returns:
        :class:`SampleResult`.  Equivalent to :func:`psld_fast.reference.run_reference` with the
        Philox noise of :mod:`psld_fast.rng` (tested pathwise).
    """
    num_samples = as_count(num_samples, "num_samples")
    nfe = as_count(nfe, "nfe")
    if nfe > MAX_NFE:
        raise ValueError(f"nfe={nfe} is above the limit of {MAX_NFE} network evaluations per sample "
                         "(psld_fast.guards.MAX_NFE); the samplers converge long before that")
    if sampler not in ALL_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(ALL_SAMPLERS)}")
    if dtype not in _STATE_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _STATE_DTYPES]}, got {dtype}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it gets a dict after every stage), got {type(callback).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if sde is not None and not isinstance(sde, PSLD) and not all(hasattr(sde, a) for a in ("T", "M", "b")):
        raise TypeError(f"sde must be a psld_fast.PSLD, got {type(sde).__name__}")
    model = _as_model(model, sde, shape)
    device = _check_device(model, device)
    warn_if_training(model)  # every path: eager CPU/GPU and CUDA graphs
    check_memory(num_samples, min(batch_size or 1024, num_samples), model.shape, dtype, device)
    extra_args = _check_extra_args(extra_args, num_samples)
    process = model.process_for(sampler) if hasattr(model, "process_for") else model.sde
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # re-issued at the caller's line below
        warnings.simplefilter("always")
        program = compile_sampler(sampler, process, nfe, schedule=schedule, lambda_s=lambda_s,
                                  lambda_reading=lambda_reading, net_time=net_time, denoise=denoise, split=split,
                                  coupling=coupling, lambda_form=lambda_form, ci_lambda=ci_lambda,
                                  ms_variable=ms_variable)
    for w in caught:
        warn_at_caller(w.message, w.category)
    if program.nfe != nfe:
        log.info("sampler %s: nfe=%d does not fit %s; spending %d", sampler, nfe,
                 "N * evals_per_step + 1", program.nfe)
    from .ops import get_lifted_step_fn, get_step_fn, resolve_backend  # lazy: loads the compiled kernels

    backend = resolve_backend(backend, device, dtype=dtype)
    step_fn = get_step_fn(backend)
    lifted_fn = get_lifted_step_fn(backend) if hasattr(model, "lifted") else None
    graphed = use_cuda_graph(cuda_graph, device, backend, callback)
    mode = compile_mode(compile, graphed)
    all_seeds = make_seeds(num_samples, seeds, generator)
    batch_size = batch_size or min(num_samples, 1024)
    t_compile = time.perf_counter() - t0
    t_net_compile = 0.0
    if mode is not None and program.nfe > 0:
        t_wrap = time.perf_counter()
        model = compiled_model(model, mode)  # the first one imports torch._dynamo/_inductor (seconds)
        t_net_compile += time.perf_counter() - t_wrap
        # the graph runner pads a smaller last batch; the eager loop runs it as it is
        last = batch_size if graphed else (num_samples % batch_size or batch_size)
        for b in sorted({min(batch_size, num_samples), last}):
            t_net_compile += warm_compiled(model, program, b, dtype, device)
    xs, ms = [], []
    bar = _progress(progress, num_samples * program.nfe, f"{sampler} nfe={program.nfe}")
    t1 = time.perf_counter()
    runner = get_runner(model, program, backend, step_fn, batch=min(batch_size, num_samples), dtype=dtype,
                        device=device, stream=stream, lifted_step_fn=lifted_fn,
                        extra_spec=extra_args_spec(extra_args, num_samples)) if graphed else None
    try:
        for start in range(0, num_samples, batch_size):
            batch_seeds = all_seeds[start:start + batch_size].to(device)
            batch_extra = _slice_extra(extra_args, start, batch_size, num_samples, device)
            if runner is not None:
                u = runner.run(model, batch_seeds, batch_start=start, bar=bar, extra_args=batch_extra)
            else:
                u = run_program(model, program, batch_seeds, step_fn, dtype=dtype, device=device,
                                stream=stream, callback=callback, batch_start=start, bar=bar,
                                extra_args=batch_extra, lifted_step_fn=lifted_fn)
            C = model.shape[0]
            xs.append(u[:, :C])
            ms.append(u[:, C:])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_run = time.perf_counter() - t1
    finally:  # also on an error or Ctrl-C: the bar's line is cleared before the message
        if bar is not None:
            bar.close()
    timings = {"compile": t_compile, "sampling": t_run, "total": time.perf_counter() - t0}
    if mode is not None:
        timings["net_compile"] = t_net_compile
    x = torch.cat(xs)
    check_data_range(x, sampler=sampler, nfe=program.nfe, scale=float(getattr(model, "data_scale", 1.0)),
                     split=program.info.get("split"))
    return SampleResult(x=x, m=torch.cat(ms), nfe=program.nfe, seeds=all_seeds,
                        timings=timings, sampler=sampler, backend=backend, program_info=program.info)


def _check_extra_args(extra_args, num_samples: int) -> dict:
    if extra_args is None:
        return {}
    if not isinstance(extra_args, dict) or not all(isinstance(k, str) for k in extra_args):
        raise TypeError(f"extra_args must be a dict of keyword arguments, got {type(extra_args).__name__}")
    for k, v in extra_args.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] not in (1, num_samples):
            raise ValueError(f"extra_args[{k!r}] has first dimension {v.shape[0]}; per-sample arguments need "
                             f"one row per sample ({num_samples}), shared ones a batch of 1 or no batch dimension")
    return extra_args


def _slice_extra(extra_args: dict, start: int, batch_size: int, num_samples: int, device) -> dict:
    """This batch's extra arguments: per-sample tensors (first dim == num_samples) sliced and moved."""
    out = {}
    for k, v in extra_args.items():
        if isinstance(v, torch.Tensor):
            if v.dim() > 0 and v.shape[0] == num_samples and num_samples > 1:
                v = v[start:start + batch_size]
            v = v.to(device)
        out[k] = v
    return out


def _check_device(model, device) -> torch.device:
    """The sampling device: ``device`` if given (checked against the model's tensors), else the
    model's.  Mismatches are reported here, not as a device error deep inside the network."""
    model_device = _model_device(model)
    if device is None:
        return model_device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:<index>'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} requested but CUDA is not available "
                           f"(torch {torch.__version__})")
    has_tensors = any(True for _ in model.parameters()) or any(True for _ in model.buffers())
    if has_tensors and (model_device.type != device.type or
                        (device.index is not None and model_device.index not in (None, device.index))):
        raise ValueError(f"the model's tensors are on {model_device} but device={str(device)!r}; "
                         f"move the model first (model.to({str(device)!r}))")
    return device


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        try:
            return next(model.buffers()).device
        except StopIteration:
            return torch.device("cpu")


def _progress(enabled, total, desc):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="nfe", leave=False, mininterval=0.5)
