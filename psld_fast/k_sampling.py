"""Every psld_fast sampler behind k-diffusion's sampler signature.

A k-diffusion user swaps a function name::

    from k_diffusion.sampling import sample_dpmpp_2m           # before
    from psld_fast.k_sampling import sample_reduced_oba        # after
    x0 = sample_reduced_oba(denoiser, x, sigmas, extra_args={"class_labels": y}, callback=cb)

``sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **knobs)``:

* ``model(x, sigma, **extra_args) -> x0_hat`` is a denoiser (k-diffusion / EDM convention);
* ``x`` (B, *shape) is the initial noise at ``sigmas[0]`` (``torch.randn(...) * sigmas[0]``, as
  k-diffusion takes it): it is lifted exactly to the augmented PSLD state, ``z = mu x + v n`` with
  ``n`` a per-sample Philox draw (:func:`psld_fast.lift.lifted_coefficients`);
* ``sigmas`` (decreasing, usually ending in 0) set the grid: each positive sigma is mapped to the
  PSLD forward time with ``sigma_y(tau) = sigma``; a final 0 is the sampler's denoising step (so a
  one-call-per-step sampler spends ``len(sigmas) - 1`` NFE, as k-diffusion's Euler does);
  without a final 0 the result is the noisy position ``y`` at ``sigmas[-1]``;
* ``callback`` gets k-diffusion's keys per network call: ``x`` (the position-space state y at the
  call), ``i``, ``sigma``, ``sigma_hat`` (= sigma), ``denoised``;
* ``disable`` (k-diffusion's progress-bar switch) is accepted; no bar is drawn here;
* knobs: ``seeds`` (B,) int64 per-sample Philox seeds (default: drawn from torch's global
  generator, as k-diffusion draws its noise), ``sde`` (the PSLD process of the lift, default
  ``PSLD()``), ``backend``, and the sampler's reading knobs (``lambda_s``, ``net_time``, ``split``,
  ``coupling``, ``lambda_reading``, ``lambda_form``, ``ci_lambda``, ``ms_variable``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .lift import DenoiserModel, sigma_y, tau_for_sigma
from .samplers import ALL_SAMPLERS, SAMPLER_SPECS, compile_sampler
from .sde import PSLD

__all__ = ["sample_psld", "psld_grid"] + [f"sample_{name}" for name in ALL_SAMPLERS]

_KNOBS = ("lambda_s", "lambda_reading", "net_time", "split", "coupling", "lambda_form", "ci_lambda", "ms_variable")


def _sigma_array(sigmas) -> np.ndarray:
    return np.asarray(torch.as_tensor(sigmas).detach().cpu().double().reshape(-1), dtype=np.float64)


def psld_grid(sigmas, sde: PSLD | None = None):
    """The truncated PSLD process and reverse-time grid of a k-diffusion sigma schedule.

    Returns ``(process, grid, denoise)``: the process runs from ``T = tau(sigmas[0])`` to
    ``eps_end = tau(last positive sigma)``; ``grid`` the reverse times of the positive sigmas;
    ``denoise`` whether the schedule ends in 0 (the final denoising step).
    """
    sde = sde if sde is not None else PSLD()
    s = _sigma_array(sigmas)
    if s.size < 2 or not np.all(np.isfinite(s)):
        raise ValueError(f"sigmas must hold at least 2 finite noise levels, got {s.tolist()}")
    denoise = s[-1] == 0
    pos = s[:-1] if denoise else s
    if np.any(pos <= 0):
        raise ValueError("sigmas: only the last noise level may be 0")
    if pos.size < 2:
        raise ValueError(f"sigmas {s.tolist()} give no step: need at least two positive noise levels")
    if not np.all(np.diff(pos) < 0):
        raise ValueError(f"sigmas must decrease strictly, got {s.tolist()}")
    taus = np.asarray(tau_for_sigma(sde, pos), dtype=np.float64)
    process = dataclasses.replace(sde, T=float(taus[0]), eps_end=float(taus[-1]))
    grid = process.T - taus
    grid[0], grid[-1] = 0.0, process.T - process.eps_end
    return process, grid, bool(denoise)


@torch.no_grad()
def sample_psld(sampler: str, model, x: torch.Tensor, sigmas, extra_args=None, callback=None, disable=None,
                seeds=None, sde: PSLD | None = None, backend: str | None = "auto", **knobs) -> torch.Tensor:
    """Run psld_fast's ``sampler`` with k-diffusion's calling convention (see the module doc)."""
    if sampler not in SAMPLER_SPECS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(ALL_SAMPLERS)}")
    unknown = set(knobs) - set(_KNOBS)
    if unknown:
        raise TypeError(f"sample_{sampler}: unknown keyword argument(s) {sorted(unknown)}; knobs: {_KNOBS}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, *shape) tensor of initial noise, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    sig = _sigma_array(sigmas)
    process, grid, denoise = psld_grid(sig, sde)
    spec = SAMPLER_SPECS[sampler]
    steps = len(grid) - 1
    nfe = steps * spec.evals_per_step + (1 if denoise else 0)
    program = compile_sampler(sampler, process, nfe, schedule=grid, denoise=denoise, **knobs)
    pos = sig[sig > 0]
    lifted = DenoiserModel(model, tuple(x.shape[1:]), sigma_min=float(pos.min()) * (1 - 1e-9),
                           sigma_max=float(pos[0]) * (1 + 1e-9), sde=process, start="T", end="process")
    B = x.shape[0]
    if seeds is None:
        seeds = torch.randint(-(2**63), 2**63 - 1, (B,), dtype=torch.int64)
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(x.device)
    if seeds.shape[0] != B:
        raise ValueError(f"seeds must hold one seed per sample ({B}), got {seeds.shape[0]}")
    from .ops import get_lifted_step_fn, get_step_fn, resolve_backend
    from .runner import run_program

    dtype = x.dtype
    backend = resolve_backend(backend, x.device, dtype=dtype)
    cb = None
    if callback is not None:
        calls = iter(range(program.nfe))

        def cb(info):
            if "denoised" in info:
                i = next(calls)
                sig = info.get("sigma")
                if sig is None:
                    sig = float(sigma_y(process, info["tau"]))
                callback({"x": info["x"], "i": i, "sigma": sig, "sigma_hat": sig, "denoised": info["denoised"]})

    u = run_program(lifted, program, seeds, get_step_fn(backend), dtype=dtype, device=x.device,
                    callback=cb, extra_args=dict(extra_args or {}),
                    lifted_step_fn=get_lifted_step_fn(backend), init_x=x, init_tau=process.T)
    C = x.shape[1]
    if denoise:
        return u[:, :C]
    from .lift import lift_terms

    w = lift_terms(process, torch.tensor([process.eps_end], dtype=torch.float64))
    return (float(w["w0"]) * u[:, :C].double() + float(w["w1"]) * u[:, C:].double()).to(dtype)


def _make(name: str):
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **knobs):
        return sample_psld(name, model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                           **knobs)

    fn.__name__ = fn.__qualname__ = f"sample_{name}"
    fn.__doc__ = (f"psld_fast's {name} ({SAMPLER_SPECS[name].description}) with k-diffusion's sampler "
                  f"signature; see :mod:`psld_fast.k_sampling`.")
    return fn


for _name in ALL_SAMPLERS:
    globals()[f"sample_{_name}"] = _make(_name)
del _name
