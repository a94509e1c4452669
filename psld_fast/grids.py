"""Reverse-time grids ``0 = t_0 < ... < t_N = T - eps_end`` (spec section 3), in float64.

``uniform`` and ``quadratic`` (the PSLD default: big steps near the noise, small near the data) are
the spec's; ``cubic`` and ``power:<p>`` (``t_i = t_N (1 - (1 - i/N)^p)``) generalise them, and
``logsnr`` spaces the steps uniformly in the log of the HSM data-variance ratio (a schedule from the
EDM/DPM-Solver family adapted to PSLD).
"""
from __future__ import annotations

import math

import numpy as np

from .sde import PSLD

__all__ = ["SCHEDULES", "time_grid"]

SCHEDULES = ("uniform", "quadratic", "cubic", "logsnr")


def _power(N: int, t_end: float, p: float) -> np.ndarray:
    i = np.arange(N + 1, dtype=np.float64)
    return t_end * (1.0 - (1.0 - i / N) ** p)


def _logsnr(N: int, sde: PSLD) -> np.ndarray:
    # x-marginal signal-to-noise of the HSM law: P00(b)^2 / Sxx, monotone in tau.
    def lsnr(tau):
        P = sde.P(sde.b(tau))
        return math.log(P[0, 0] ** 2 / sde.hsm_cov(tau)[0, 0])

    lo, hi = lsnr(sde.T), lsnr(sde.eps_end)
    targets = np.linspace(lo, hi, N + 1)
    taus = [sde.T]
    for target in targets[1:-1]:
        a, b = sde.eps_end, sde.T  # bisection: lsnr decreases in tau
        for _ in range(100):
            mid = 0.5 * (a + b)
            if lsnr(mid) > target:
                a = mid
            else:
                b = mid
        taus.append(0.5 * (a + b))
    taus.append(sde.eps_end)
    return sde.T - np.asarray(taus)


def time_grid(schedule, N: int, sde: PSLD) -> np.ndarray:
    """Reverse times ``t_0..t_N`` (N steps) for a named schedule or an explicit increasing array.

    Raises ValueError naming the problem for an unknown schedule or a malformed array.
    """
    if not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"time_grid: the number of steps must be an integer >= 1, got {N!r}")
    t_end = sde.T - sde.eps_end
    if isinstance(schedule, str):
        if schedule == "uniform":
            t = _power(N, t_end, 1.0)
        elif schedule == "quadratic":
            t = _power(N, t_end, 2.0)
        elif schedule == "cubic":
            t = _power(N, t_end, 3.0)
        elif schedule.startswith("power:"):
            try:
                p = float(schedule.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"schedule {schedule!r}: expected 'power:<exponent>'") from None
            if not p > 0:
                raise ValueError(f"schedule {schedule!r}: the exponent must be > 0")
            t = _power(N, t_end, p)
        elif schedule == "logsnr":
            t = _logsnr(N, sde)
        else:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES} or 'power:<p>'")
    else:
        t = np.asarray(schedule, dtype=np.float64)
        if t.ndim != 1 or len(t) != N + 1:
            raise ValueError(f"schedule array must have N + 1 = {N + 1} reverse times, got shape {t.shape}")
        problems = []
        if not abs(t[0]) < 1e-12:
            problems.append(f"it starts at {t[0]:.6g}, not 0")
        if not abs(t[-1] - t_end) < 1e-9:
            problems.append(f"it ends at {t[-1]:.9g}, not T - eps_end = {t_end:.9g}")
        bad = np.flatnonzero(~(np.diff(t) > 0))
        if len(bad):
            i = int(bad[0])
            problems.append(f"t[{i}] = {t[i]:.6g} >= t[{i + 1}] = {t[i + 1]:.6g}"
                            + (f" ({len(bad)} non-increasing steps)" if len(bad) > 1 else ""))
        if problems:
            raise ValueError("schedule array: the reverse times t_0..t_N (reverse time t = T - tau) must increase "
                             f"strictly from 0 to T - eps_end = {t_end:.9g}; {'; '.join(problems)}")
    t[0], t[-1] = 0.0, t_end
    return t
