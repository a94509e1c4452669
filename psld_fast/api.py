"""``psld_fast.sample``: compile a sampler, then run its stages with one fused op per NFE.

The loop is ``eps = model(u, tau_k); affine_step_(u, eps, seeds, coef_k, k)`` for every stage k of
the compiled program.  Nothing inside it syncs the host: the NaN/Inf check of the network output
is accumulated on the device and read once at the end of a batch.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch

from .guards import MAX_NFE, as_count, check_data_range, check_memory, seeds_int64, warn_at_caller
from .models import EpsModel
from .program import Program
from .samplers import ALL_SAMPLERS, compile_sampler

__all__ = ["sample", "SampleResult", "DEFAULT_SEED", "make_seeds"]

log = logging.getLogger("psld_fast")

#: Seeds default to ``DEFAULT_SEED + arange(num_samples)`` when neither seeds nor generator is given.
DEFAULT_SEED = 0

_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class SampleResult:
    """Samples and how they were made.  ``x``: (N, *shape) data; ``m``: momenta; ``nfe``: network
    evaluations spent per sample; ``seeds``: (N,) int64; ``timings``: seconds per phase."""

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
        return self.x.shape[0] / max(self.timings.get("total", 0.0), 1e-12)


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
            model.shape = tuple(shape)
        if sde is not None:
            model.sde = sde
    elif callable(model):
        model = EpsModel(model, sde=sde, shape=shape)
    else:
        raise TypeError(f"model must be an EpsModel or a callable net(u, tau) -> eps, got {type(model).__name__}")
    if model.shape is None:
        raise ValueError("sample: the data shape of one sample is unknown; pass shape=(C, ...) "
                         "or wrap the network as EpsModel(net, sde, shape)")
    return model


@torch.no_grad()
def sample(model, num_samples: int, *, sampler: str = "reduced_oba", nfe: int = 50,
           schedule="quadratic", lambda_s: float | None = None, lambda_reading: str | None = None,
           net_time: str | None = None, denoise: bool = True, split: str | None = None,
           coupling: str | None = None, lambda_form: str = "std", seeds=None,
           generator: torch.Generator | None = None, backend: str | None = "auto",
           dtype: torch.dtype = torch.float32, device=None, batch_size: int | None = None,
           callback=None, progress: bool = True, sde=None, shape=None, stream: int = 0,
           cuda_graph="auto", ci_lambda: float | None = None) -> SampleResult:
    """Draw ``num_samples`` samples from a PSLD model with a (reduced) splitting sampler.

    Args:
        model: :class:`~psld_fast.models.EpsModel` (or a callable ``net(u, tau) -> eps`` with
            ``sde=`` and ``shape=`` given); u (B, 2C, ...) = cat(x, m), tau (B,) forward times.
        sampler: one of ``psld_fast.ALL_SAMPLERS``.
        nfe: network-evaluation budget ``N * evals_per_step + 1`` (the +1 is the denoising step);
            the result reports the NFE actually spent.
        schedule: "quadratic", "uniform", "cubic", "logsnr", "power:<p>" or an array of the N+1
            reverse times t_0 = 0 < t_1 < ... < t_N = T - eps_end (reverse time t = T - tau).
        lambda_s: x-noise scale (default 1: the reverse SDE); ``lambda_reading`` "marginal" (a) |
            "noise" (b) (default per sampler: "marginal" for all today).
        net_time: "start" | "end" (time conditioning of calls made after O; default per sampler).
        split: "additive" (spec 4.3 default reading: O adds noise) | "ou" (O is the exact OU friction
            step); default per sampler (chosen by docs/readings_protocol.md).
        coupling: "sequential" | "joint": how one call serves consecutive A and B sub-steps
            (reduced samplers; default per sampler, chosen by the protocol).
        lambda_form: "std" (lambda_s scales the x-noise std) | "var" (it scales the variance).
        ci_lambda: lambda of the conjugate samplers (``ci_ddim``, ``ci_ddim2``, ``csps_d``; default per
            sampler; see :mod:`psld_fast.conjugate` for the stability bound).
        seeds: (num_samples,) integers in the int64 range, one per sample (negative seeds are valid; a
            repeated seed gives the same sample again); else drawn from ``generator``; else 0..N-1.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton" (env ``PSLD_FAST_BACKEND``).
        dtype: state dtype (float32 default; float16/bfloat16 on the kernels; float64 reference).
        batch_size: samples per batch (default: all at once, up to 1024).
        callback: called after every stage with a dict (stage, nfe, tau, u, batch_start: the index of
            the batch's first sample).
        cuda_graph: "auto" (replay each batch from a CUDA graph on a GPU with a kernel backend),
            True, or False (eager); CPU runs are always eager (see :mod:`psld_fast.graphs`).
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
    model = _as_model(model, sde, shape)
    device = _check_device(model, device)
    check_memory(num_samples, min(batch_size or 1024, num_samples), model.shape, dtype, device)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # re-issued at the caller's line below
        warnings.simplefilter("always")
        program = compile_sampler(sampler, model.sde, nfe, schedule=schedule, lambda_s=lambda_s,
                                  lambda_reading=lambda_reading, net_time=net_time, denoise=denoise, split=split,
                                  coupling=coupling, lambda_form=lambda_form, ci_lambda=ci_lambda)
    for w in caught:
        warn_at_caller(w.message, w.category)
    if program.nfe != nfe:
        log.info("sampler %s: nfe=%d does not fit %s; spending %d", sampler, nfe,
                 "N * evals_per_step + 1", program.nfe)
    from .graphs import get_runner, use_cuda_graph
    from .ops import get_step_fn, resolve_backend

    backend = resolve_backend(backend, device, dtype=dtype)
    step_fn = get_step_fn(backend)
    graphed = use_cuda_graph(cuda_graph, device, backend, callback)
    all_seeds = make_seeds(num_samples, seeds, generator)
    t_compile = time.perf_counter() - t0
    batch_size = batch_size or min(num_samples, 1024)
    xs, ms = [], []
    bar = _progress(progress, num_samples * program.nfe, f"{sampler} nfe={program.nfe}")
    t1 = time.perf_counter()
    runner = get_runner(model, program, backend, step_fn, batch=min(batch_size, num_samples), dtype=dtype,
                        device=device, stream=stream) if graphed else None
    for start in range(0, num_samples, batch_size):
        batch_seeds = all_seeds[start:start + batch_size].to(device)
        if runner is not None:
            u = runner.run(model, batch_seeds, batch_start=start, bar=bar)
        else:
            u = run_program(model, program, batch_seeds, step_fn, dtype=dtype, device=device,
                            stream=stream, callback=callback, batch_start=start, bar=bar)
        C = model.shape[0]
        xs.append(u[:, :C])
        ms.append(u[:, C:])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_run = time.perf_counter() - t1
    if bar is not None:
        bar.close()
    timings = {"compile": t_compile, "sampling": t_run, "total": time.perf_counter() - t0}
    x = torch.cat(xs)
    check_data_range(x, sampler=sampler, nfe=program.nfe, scale=float(getattr(model, "data_scale", 1.0)),
                     split=program.info.get("split"))
    return SampleResult(x=x, m=torch.cat(ms), nfe=program.nfe, seeds=all_seeds,
                        timings=timings, sampler=sampler, backend=backend, program_info=program.info)


def _check_device(model, device) -> torch.device:
    """The sampling device: ``device`` if given (checked against the model's tensors), else the
    model's.  Mismatches are reported here, not as a device error deep inside the network."""
    model_device = _model_device(model)
    if device is None:
        return model_device
    device = torch.device(device)
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


@torch.no_grad()
def run_program(model, program: Program, seeds: torch.Tensor, step_fn, *, dtype, device,
                stream: int = 0, callback=None, batch_start: int = 0, bar=None,
                check: bool = True) -> torch.Tensor:
    """Run one batch of a compiled program eagerly; returns the final packed state u.

    Raises FloatingPointError naming the first stage whose network output held NaN/Inf, and
    ValueError for a model output of the wrong shape or dtype.  ``check=False`` skips that final
    NaN/Inf check, the batch's one host sync: the loop alone never syncs.
    """
    B = seeds.shape[0]
    C = model.shape[0]
    u = torch.empty((B, 2 * C, *model.shape[1:]), dtype=dtype, device=device)
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    for k, stage in enumerate(program.stages):
        eps = None
        if stage.uses_network:
            tau = torch.full((B,), stage.tau, dtype=tau_dtype, device=device)
            eps = model(u, tau)
            _check_eps(eps, u, k)
            eps = as_step_eps(eps, u)
            first_bad.masked_fill_(nonfinite(eps) & (first_bad < 0), k)
        step_fn(u, eps, seeds, stage.coef, k, stream)
        if callback is not None:
            callback({"stage": k, "nfe": sum(1 for s in program.stages[:k + 1] if s.uses_network),
                      "tau": stage.tau, "u": u, "batch_start": batch_start})
        if bar is not None and stage.uses_network:
            bar.update(B)
    if not check:
        return u
    bad_stage, state_bad = torch.stack([first_bad, (~torch.isfinite(u).all()).long()]).tolist()  # one sync
    raise_if_nonfinite(bad_stage, bool(state_bad) and bad_stage < 0, program, batch_start)
    return u


def nonfinite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor, True when ``t`` holds a NaN or Inf; stays on the device (no sync).

    One reduction pass: a float32 sum is NaN/Inf exactly when some element is (short of a sum of
    finite values above 3e38, which no eps network produces), and costs a fraction of
    ``isfinite(t).all()``'s two passes.
    """
    return ~torch.isfinite(t.sum(dtype=torch.float32))


def raise_if_nonfinite(bad_stage: int, state_bad: bool, program: Program, batch_start: int) -> None:
    """FloatingPointError for a batch whose network output (first at ``bad_stage`` >= 0) or final
    state (``state_bad``) held NaN/Inf."""
    if bad_stage >= 0:
        raise FloatingPointError(
            f"the network returned NaN/Inf at stage {bad_stage} (tau={program.stages[bad_stage].tau:.6g}) "
            f"for the batch starting at sample {batch_start}")
    if state_bad:
        raise FloatingPointError("sampling produced NaN/Inf in the state although the network outputs were finite "
                                 "(the step coefficients overflowed the state dtype?)")


def as_step_eps(eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The fused step computes in float32: a float64 network output for a lower-precision state is
    rounded to float32 here (the kernels take float32/float16/bfloat16 eps)."""
    if eps.dtype == torch.float64 and u.dtype != torch.float64:
        return eps.float()
    return eps


def _check_eps(eps, u, k):
    if not isinstance(eps, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(eps).__name__} at stage {k}")
    if eps.shape != u.shape:
        raise ValueError(f"the model returned eps of shape {tuple(eps.shape)}, expected the state's "
                         f"shape {tuple(u.shape)} (eps = cat(eps_x, eps_m) on dim 1)")
    if not eps.is_floating_point():
        raise ValueError(f"the model returned eps of dtype {eps.dtype}; a floating dtype is required")
    if eps.device != u.device:
        raise ValueError(f"the model returned eps on {eps.device}, the state is on {u.device}")
