"""psld_fast: fast stochastic sampling for PSLD-style (data + momentum) diffusion models.

Reduced splitting integrators (Pandey, Rudolph & Mandt, ICLR 2024) and their baselines, compiled to
per-NFE affine stages and run by fused kernels.  Importing the package is cheap: it neither
initialises CUDA nor needs Triton or the compiled extension; it defines the op schemas
``torch.ops.psld_fast.affine_step_`` (in place) and ``torch.ops.psld_fast.affine_step`` (functional)
and registers the compiled CPU/CUDA kernels when they were built (Triton is loaded on first use).
"""
from . import ops  # noqa: F401  defines torch.ops.psld_fast.affine_step_ / affine_step (cheap: no CUDA, no Triton)
from .api import DEFAULT_SEED, SampleResult, make_seeds, sample
from .grids import SCHEDULES, time_grid
from .lift import CFGDenoiser, DenoiserModel, as_denoiser, load_diffusers, vp_denoiser
from .guards import set_threads
from .models import EpsModel, GaussianMixture, ScoreModelAdapter, get_preset
from .program import Program, Stage, affine_step_reference
from .samplers import ALL_SAMPLERS, DETERMINISTIC_SAMPLERS, SAMPLERS, compile_sampler
from .sde import PSLD

__version__ = "0.1.0"


def load_psld_checkpoint(*args, **kwargs):
    """Load an official PSLD Lightning checkpoint as an :class:`EpsModel` (see psld_fast.checkpoint)."""
    from .checkpoint import load_psld_checkpoint as _load

    return _load(*args, **kwargs)


__all__ = ["PSLD", "sample", "SampleResult", "SAMPLERS", "DETERMINISTIC_SAMPLERS", "ALL_SAMPLERS",
           "SCHEDULES", "time_grid", "compile_sampler", "Program", "Stage", "affine_step_reference",
           "EpsModel", "ScoreModelAdapter", "GaussianMixture", "get_preset", "make_seeds",
           "DEFAULT_SEED", "load_psld_checkpoint", "set_threads", "DenoiserModel", "vp_denoiser", "as_denoiser",
           "CFGDenoiser", "load_diffusers", "__version__"]
