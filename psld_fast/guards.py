"""Argument checks and budgets of :func:`psld_fast.sample`, kept out of the sampling loop.

* :func:`as_count`: ``num_samples`` / ``nfe`` as a Python int (``np.int64`` and 0-d integer tensors
  accepted, bools and floats refused).
* :func:`seeds_int64`: per-sample seeds as an int64 tensor, refusing values outside the int64 range
  (a numpy ``uint64`` 2**64-1 would otherwise wrap to the seed -1).
* :data:`MAX_NFE` and :func:`check_memory`: an NFE or sample count that cannot fit fails at once
  with the numbers, instead of allocating until the machine's OOM killer ends the process.
* :func:`warn_at_caller`: a warning attributed to the first frame outside psld_fast (and torch's
  ``no_grad`` wrapper), i.e. the user's line that called ``sample``.
* :func:`check_data_range`: one warning per run when the samples leave the data range by orders of
  magnitude (a sampler diverging at a very low NFE).
* :func:`default_threads` and :func:`set_threads`: a CPU thread count that does not oversubscribe a
  loaded machine (the command line's default, offered to Python users as ``set_threads("auto")``).
"""
from __future__ import annotations

import operator
import os
import sys
import warnings

import numpy as np
import torch

__all__ = ["MAX_NFE", "DIVERGENCE_FACTOR", "as_count", "seeds_int64", "check_memory", "warn_at_caller",
           "check_data_range", "default_threads", "set_threads"]

#: Largest NFE budget ``sample`` accepts (a program holds one stage per NFE; 10^5 NFE is ~1000x the
#: budgets the samplers are meant for and compiles in well under a second).
MAX_NFE = 100_000
#: ``max |x|`` above this many times the data scale (1 for the PSLD convention, data in [-1, 1])
#: counts as having left the data range.
DIVERGENCE_FACTOR = 100.0
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def as_count(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; ValueError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        n = operator.index(value)  # int, np.integer, 0-d integer tensor
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n}")
    return int(n)


def _out_of_range(values) -> list[int]:
    return [int(v) for v in values if not INT64_MIN <= int(v) <= INT64_MAX][:3]


def seeds_int64(seeds, num_samples: int) -> torch.Tensor:
    """Checked (num_samples,) int64 CPU tensor of seeds (negative seeds are valid seeds)."""
    if isinstance(seeds, torch.Tensor):
        t = seeds.detach()
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"seeds must be integers, got {t.dtype}")
        if t.dtype in (torch.uint64, torch.uint32) and t.numel() and int(t.max()) > INT64_MAX:
            raise ValueError(f"seeds must lie in the int64 range [-2**63, 2**63-1]; got {int(t.max())}")
        values = t
    else:
        if isinstance(seeds, (str, bytes)):  # np.asarray("01") is a 0-d string array, not two seeds
            raise ValueError(f"seeds must be integers, got the string {seeds!r}; pass e.g. range(n) or [0, 1]"
                             " (on the command line: --seeds 0-63)")
        try:
            arr = np.asarray(seeds)
        except OverflowError:
            arr = np.asarray(list(seeds), dtype=object)
        if arr.dtype.kind in "fcbUSV" or (arr.dtype.kind == "O" and not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.reshape(-1))):
            raise ValueError("seeds must be integers, got " + {"O": "objects", "U": "strings", "S": "bytes",
                                                                 "V": "structured values"}.get(arr.dtype.kind, str(arr.dtype)))
        if arr.dtype.kind in "uO":
            bad = _out_of_range(arr.reshape(-1))
            if bad:
                raise ValueError(f"seeds must lie in the int64 range [-2**63, 2**63-1]; got {bad[0]}"
                                 + (" (a uint64 above 2**63-1 would silently wrap to a negative seed)"
                                    if arr.dtype.kind == "u" else ""))
            arr = arr.astype(np.int64)
        values = torch.from_numpy(np.ascontiguousarray(arr))
    if values.dim() != 1 or values.shape[0] != num_samples:
        raise ValueError(f"seeds: expected {num_samples} seeds (one per sample), got shape {tuple(values.shape)}")
    return values.to(torch.int64).cpu()


def _available_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None
    return None


def check_memory(num_samples: int, batch_size: int, shape, dtype: torch.dtype, device: torch.device) -> None:
    """MemoryError (with the numbers and the fix) when the result tensors and one batch's working state
    cannot fit in the device's available memory.  The network's own activations are not counted."""
    per_sample = 2 * int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()  # x and m
    result = num_samples * (per_sample + 8)                 # x, m and the int64 seed of every sample
    working = 4 * batch_size * per_sample                   # state u, eps, a copy for the result, slack
    need = result + working
    if need < 2 ** 28:  # under 256 MiB: not worth a look at the device's memory on every call
        return
    avail = _available_bytes(device)
    if avail is not None and need > avail:
        gib = 2.0 ** 30
        raise MemoryError(
            f"{num_samples} samples of shape {tuple(shape)} in {str(dtype).replace('torch.', '')} need "
            f"{need / gib:.1f} GiB on {device} (results {result / gib:.1f} GiB + a batch of {batch_size}), "
            f"{avail / gib:.1f} GiB are available; draw fewer samples per call (psld-fast generate writes "
            "any number of samples in batches)")


# ------------------------------------------------------------------------------------- threads
#: torch's own default thread count, read once at import (before anyone lowers it).
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def default_threads() -> int:
    """CPU threads that do not oversubscribe a loaded machine: the cores not busy with other work
    (cpu count minus the 1-minute load average, rounded), at least 1, at most torch's default."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    free = int(ncpu - load + 0.5)
    return max(1, min(_TORCH_DEFAULT_THREADS, ncpu, free))


def set_threads(n="auto") -> int:
    """Set torch's CPU thread count for sampling (process-wide, like ``torch.set_num_threads``);
    returns the count set.

    ``"auto"`` is the command line's default: ``OMP_NUM_THREADS`` when set, else
    :func:`default_threads` (the cores not busy with other work).  ``sample`` itself never changes
    the thread count (it is global to the process, shared with the caller's other work): on a
    loaded machine torch's default of one thread per core runs many times slower than this, so call
    ``psld_fast.set_threads("auto")`` once before sampling.
    """
    if n == "auto":
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        n = int(env) if env.isdigit() and int(env) >= 1 else default_threads()
    elif isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"set_threads: give 'auto' or an integer >= 1, got {n!r}")
    torch.set_num_threads(int(n))
    return int(n)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called here that names the first frame outside
    psld_fast and torch's decorator wrappers (the user's line)."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        fn = os.path.abspath(frame.f_code.co_filename)
        if not (fn.startswith(pkg + os.sep) or fn.startswith(torch_dir + os.sep)):
            return level
        frame, level = frame.f_back, level + 1
    return 2


def warn_at_caller(message, category=RuntimeWarning) -> None:
    warnings.warn(message, category, stacklevel=_caller_stacklevel())


def check_data_range(x: torch.Tensor, *, sampler: str, nfe: int, scale: float = 1.0, split: str | None = None) -> float:
    """Warn once (per call) when ``max |x|`` exceeds ``DIVERGENCE_FACTOR * scale``; returns max |x|.
    One reduction and one host sync per run."""
    if x.numel() == 0:
        return 0.0
    m = float(x.detach().abs().amax())
    if m > DIVERGENCE_FACTOR * scale:
        warn_at_caller(
            f"sampling left the data range: max |x| = {m:.3g} for data of scale about {scale:g} "
            f"({sampler} at NFE {nfe} is unstable here); raise nfe"
            + (", use split='ou'" if split == "additive" else "") + " or try another sampler (e.g. sscs, em)")
    return m
