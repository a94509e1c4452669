"""Shared by the benchmarks: interleaved timing rounds, thread pinning, machine description.

Why interleaved: on a shared machine the load changes during a run; timing variant A for a while,
then B, turns that drift into a fake A/B ratio.  ``interleaved`` runs one call of every variant per
round, so each round's ratio compares calls made under the same load, and the median of those
per-round ratios is stable where a ratio of medians taken minutes apart is not.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pin_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (and one inter-op thread); returns the count in use."""
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set (or parallel work already started)
            pass
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{model}, {os.cpu_count()} logical CPUs, {isa}"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def git_revision() -> str:
    def git(*args):
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        rev += "+dirty"
    return rev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, device: torch.device, *, rounds: int, warmup: int = 1,
                min_rounds: int = 5, budget_s: float | None = None) -> dict:
    """``{name: [seconds per round]}``: every round calls each fn once, in order.

    ``budget_s`` caps the rounds (by the first round's length) but never below ``min_rounds``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    n = rounds
    for r in range(n):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
        if r == 0 and budget_s is not None:
            first = sum(t[0] for t in times.values())
            n = max(min_rounds, min(rounds, int(budget_s / max(first, 1e-9))))
            if n < rounds:
                rounds = n
        if r + 1 >= n:
            break
    return times


def summary(times: dict, base: str | None) -> dict:
    """Per variant: min, median (seconds), rounds and, against ``base``, the median over rounds of
    base_time / variant_time (> 1: the variant is faster)."""
    out = {}
    for name, t in times.items():
        row = {"min": min(t), "median": statistics.median(t), "rounds": len(t)}
        if base is not None and base in times:
            row["ratio"] = statistics.median(b / v for b, v in zip(times[base], t))
            row["ratio_min"] = min(b / v for b, v in zip(times[base], t))
        out[name] = row
    return out


def header(what: str, device: torch.device, threads: int) -> str:
    import psld_fast

    return (f"# {what}  device: {device_name(device)} | threads {threads} | torch {torch.__version__} | "
            f"git {git_revision()} | psld_fast from {os.path.relpath(os.path.dirname(psld_fast.__file__), ROOT)} | "
            f"load average at start {load_average()}")
