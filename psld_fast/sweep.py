"""Quality over a sampler x NFE x lambda_s (x schedule x reading) grid: CSV, Markdown, PNG plot.

The reading axes are ``net_times``, ``splits``, ``couplings`` and ``ci_lambdas`` (None = the sampler's
default); cells where a reading does not apply (``coupling='joint'`` for a sampler without shared
calls, ``ci_lambda`` for a non-conjugate sampler) are left out of the grid.

``sweep(model, out_dir, samplers, nfes, lambdas, ...)`` (CLI: ``psld-fast sweep``) samples every cell
with the same seeds (common random numbers: differences between cells are not seed noise) and scores
it with one metric:

* ``"sw2"`` (analytic :class:`~psld_fast.models.GaussianMixture` models): sliced Wasserstein-2 to
  exact draws from the data law with a 95% bootstrap interval, the figure of ``psld-fast sample``
  (:func:`psld_fast.metrics.sliced_wasserstein_ci`; the reference draw is fixed by ``seed``).
* ``"fid"`` (image checkpoints): FID against ``reference`` (statistics .npz or image folder, see
  :mod:`psld_fast.fid`) with Inception-v3 features from a local weights file; the samples are
  streamed through the extractor batch by batch, nothing is written.

Outputs in ``out_dir``: ``sweep.csv`` (one row per cell, appended and flushed as each cell
finishes), ``sweep.md`` (the best lambda_s per sampler and NFE, then every cell), ``sweep.png``
(matplotlib: metric vs NFE on a log axis, one line per sampler through the best lambda_s of each
NFE with its 95% interval as error bars, the other lambda_s values as small dots; skipped with a
note saying what to install when matplotlib is missing) and ``sweep.json`` (the configuration).  Rerunning resumes: cells already in the CSV are skipped, so a grid can also be
extended.  A folder whose ``sweep.json`` differs (model, metric, sample count, seed, ...) is refused
unless ``force=True``, which starts over (old files renamed ``*.replaced-<time>``).  A sweep holds
an exclusive lock on ``{out}/.psld_fast.lock``: a second one into the same folder is refused.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import sys
import time
from itertools import product
from pathlib import Path

import torch

__all__ = ["sweep", "plot_sweep", "write_markdown", "read_rows", "FIELDS"]

FIELDS = ["sampler", "schedule", "net_time", "split", "coupling", "ci_lambda", "nfe", "lambda_s", "nfe_spent",
          "metric", "value", "lo", "hi",
          "std", "n", "status", "seconds"]
_METRIC_TEXT = {"sw2": "sliced W2 to the exact data law (95% bootstrap CI)", "fid": "FID"}


def _lam_key(v) -> str:
    return "default" if v is None else repr(float(v))


#: The reading columns of a row, in key order.
_READING_COLS = ("net_time", "split", "coupling", "ci_lambda")


def _key(row) -> tuple:
    return (row["sampler"], row["schedule"], *(row[c] for c in _READING_COLS), str(int(row["nfe"])), row["lambda_s"])


def _text(v) -> str:
    return "default" if v is None else str(v)


# ----------------------------------------------------------------------------------------- csv
def read_rows(path) -> list[dict]:
    """Rows of a sweep CSV; a torn last line (a kill during the write) is dropped from the file."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        from ._io import write_atomic

        write_atomic(path, text.encode())
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if None in row or any(row.get(f) is None for f in FIELDS):
            continue
        rows.append(row)
    return rows


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    if new:
        w.writeheader()
    w.writerow({k: row.get(k, "") for k in FIELDS})
    with open(path, "a", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------------------- sweep
def sweep(model, out_dir, samplers, nfes, lambdas=(None,), *, net_times=(None,), schedules=("quadratic",),
          splits=(None,), couplings=(None,), ci_lambdas=(None,),
          num_samples: int | None = None, seed: int = 0, metric: str = "auto", reference=None,
          inception_weights=None, extractor: str = "inception-v3-compat", batch_size: int | None = None,
          device=None, backend="auto", dtype=torch.float32, lambda_reading: str | None = None,
          split: str | None = None, denoise: bool = True, n_boot: int = 100, force: bool = False, progress: bool = True,
          source: dict | None = None, verbose: bool = False, on_cell=None) -> list[dict]:
    """Score every cell of the grid (see the module docstring); returns all rows of the CSV.

    Args:
        samplers, nfes, lambdas, net_times, schedules, splits, couplings, ci_lambdas: the grid
            (``None`` = the sampler's default); ``split`` is the one-value form of ``splits``.
        num_samples: samples per cell (default 1024 for sw2, 10000 for FID).
        seed: the cells' seeds are ``seed * 10**9 + arange(num_samples)``; also fixes the reference
            draw and the bootstrap.
        metric: "auto" (sw2 for GaussianMixture models, else fid), "sw2" or "fid".
        reference, inception_weights, extractor: FID reference and features (see psld_fast.fid).
        on_cell: called with each newly computed row.
    """
    from .api import sample
    from .generate import model_identity
    from .models import GaussianMixture

    from .guards import MAX_NFE, as_count

    samplers, nfes = list(samplers), [as_count(v, "nfe") for v in nfes]
    if max(nfes, default=0) > MAX_NFE:
        raise ValueError(f"nfe={max(nfes)} is above the limit of {MAX_NFE} network evaluations per sample")
    lambdas, net_times, schedules = list(lambdas), list(net_times), list(schedules)
    if split is not None:
        if list(splits) not in ([None], [split]):
            raise ValueError(f"sweep: give split={split!r} or splits={list(splits)!r}, not both")
        splits = (split,)
    splits, couplings = list(splits), list(couplings)
    ci_lambdas = [None if v is None else float(v) for v in ci_lambdas]
    if not (samplers and nfes and lambdas and net_times and schedules and splits and couplings and ci_lambdas):
        raise ValueError("sweep: every grid axis needs at least one value")
    from .samplers import ALL_SAMPLERS, COUPLINGS, NET_TIMES, SAMPLER_SPECS, SPLITS

    for name, values, allowed in (("split", splits, SPLITS), ("coupling", couplings, COUPLINGS)):
        for v in values:
            if v is not None and v not in allowed:
                raise ValueError(f"unknown {name} {v!r}; choose from default, {', '.join(allowed)}")

    for s in samplers:
        if s not in ALL_SAMPLERS:
            raise ValueError(f"unknown sampler {s!r}; choose from {', '.join(ALL_SAMPLERS)}")
    from .samplers import steps_for_nfe

    for v in nfes:  # a budget that fits no sampler of the grid is a mistake, not a row of invalid cells
        fits = []
        for s in samplers:
            try:
                fits.append(steps_for_nfe(s, v, denoise))
            except ValueError as exc:
                last = exc
        if not fits:
            raise ValueError(f"sweep: nfe={v} fits none of the samplers ({last})")
    for t in net_times:
        if t is not None and t not in NET_TIMES:
            raise ValueError(f"unknown net_time {t!r}; choose from default, {', '.join(NET_TIMES)}")
    if metric == "auto":
        metric = "sw2" if isinstance(model, GaussianMixture) else "fid"
    if metric not in _METRIC_TEXT:
        raise ValueError(f"metric must be 'auto', 'sw2' or 'fid', got {metric!r}")
    if metric == "sw2" and not isinstance(model, GaussianMixture):
        raise ValueError("sweep: the sliced-W2 metric needs an analytic (GaussianMixture) model, whose data law is known")
    if metric == "fid" and reference is None:
        raise ValueError("sweep: a non-analytic model is scored by FID, which needs a reference (--ref: a statistics "
                         ".npz with mu/sigma or a folder of reference images) and Inception weights "
                         "(--inception-weights or PSLD_FAST_INCEPTION_WEIGHTS)")
    # the per-cell knobs, before the first cell (a bad one would only mark every cell "invalid")
    if num_samples is not None:
        num_samples = as_count(num_samples, "num_samples", minimum=2)
    if batch_size is not None:
        batch_size = as_count(batch_size, "batch_size")
    if metric == "sw2" and (isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 2):
        raise ValueError(f"n_boot must be an integer >= 2 (bootstrap replicates), got {n_boot!r}")
    from .grids import time_grid

    for sch in schedules:
        if isinstance(sch, str):
            time_grid(sch, 1, model.sde)  # unknown names and bad power:<p> fail here
    n = int(num_samples or (1024 if metric == "sw2" else 10000))
    device = torch.device(device) if device is not None else (
        next(iter(list(model.parameters()) + list(model.buffers())), torch.empty(0)).device)
    model = model.to(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .generate import FolderLock

    with FolderLock(out_dir, "psld-fast sweep"):  # a second sweep into this folder stops at once

        # ---- the metric's fixed parts
        ex = ref_stats = ref_samples = None
        config = {"model": model_identity(model), "metric": metric, "num_samples": n, "seed": seed,
                  "lambda_reading": lambda_reading or "default", "denoise": denoise, "dtype": str(dtype).replace("torch.", "")}
        if metric == "sw2":
            config["n_boot"] = n_boot
            g = torch.Generator().manual_seed(seed + 12345)
            ref_samples = model.sample_data(max(n, 1024), generator=g).double().cpu()
        else:
            from .fid import make_extractor, reference_statistics

            ex = make_extractor(extractor, weights=inception_weights, device=device)
            ref_stats, _info = reference_statistics(reference, ex, None, progress=progress)
            config["reference"] = str(Path(reference).resolve())
            config["extractor"] = ex.identity
        config = json.loads(json.dumps(config))
        _check_config(out_dir, config, force, source)

        csv_path = out_dir / "sweep.csv"
        rows = read_rows(csv_path)
        done = {_key(r) for r in rows}
        def applies(sampler, coupling, ci):
            spec = SAMPLER_SPECS[sampler]
            return ((coupling in (None, "sequential") or spec.reduced)
                    and (ci is None or spec.default_ci_lambda is not None))

        cells = [c for c in product(samplers, schedules, net_times, splits, couplings, ci_lambdas, nfes, lambdas)
                 if applies(c[0], c[4], c[5])
                 and (c[0], c[1], _text(c[2]), _text(c[3]), _text(c[4]), _lam_key(c[5]), str(c[6]), _lam_key(c[7]))
                 not in done]
        seeds = seed * 10**9 + torch.arange(n, dtype=torch.int64)
        bs = batch_size or (n if metric == "sw2" else 256)
        bar = None
        if progress and cells:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(cells), desc="sweep", unit="cell", dynamic_ncols=True)
            except ImportError:
                pass
        if verbose and len(done):
            print(f"sweep: {len(done)} cells already in {csv_path}, {len(cells)} to go", file=sys.stderr)
        try:
            for sampler, schedule, net_time, split, coupling, ci, nfe, lam in cells:
                reading = dict(net_time=net_time, split=split, coupling=coupling,
                               **({} if ci is None else {"ci_lambda": ci}))
                row = {"sampler": sampler, "schedule": schedule, "net_time": _text(net_time), "split": _text(split),
                       "coupling": _text(coupling), "ci_lambda": _lam_key(ci), "nfe": nfe,
                       "lambda_s": _lam_key(lam), "metric": metric, "n": n}
                kw = dict(sampler=sampler, nfe=nfe, schedule=schedule, lambda_s=lam, lambda_reading=lambda_reading,
                          denoise=denoise, backend=backend, dtype=dtype, device=device, **reading,
                          progress=False)
                t0 = time.perf_counter()
                try:
                    if metric == "sw2":
                        from .metrics import sliced_wasserstein_ci

                        res = sample(model, n, seeds=seeds, batch_size=bs, **kw)
                        q = sliced_wasserstein_ci(res.x.double().cpu(), ref_samples, seed=seed, n_boot=n_boot)
                        row.update(value=q["value"], lo=q["lo"], hi=q["hi"], std=q["std"])
                    else:
                        row.update(value=_fid_cell(model, sample, kw, seeds, bs, ex, ref_stats), lo="", hi="", std="")
                        res = None
                    row["nfe_spent"] = res.nfe if res is not None else ""
                    row["status"] = "ok"
                except FloatingPointError:
                    row.update(value="nan", lo="", hi="", std="", status="diverged")
                except ValueError as exc:
                    row.update(value="nan", lo="", hi="", std="", status="invalid: " + str(exc).replace("\n", " ")[:160])
                if row.get("nfe_spent") in (None, ""):
                    row["nfe_spent"] = _spent(model, sampler, nfe, schedule, lam, lambda_reading, denoise, reading)
                row["seconds"] = round(time.perf_counter() - t0, 3)
                row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
                _append_row(csv_path, row)
                row = {k: str(row.get(k, "")) for k in FIELDS}
                rows.append(row)
                if verbose:
                    print(f"  {sampler:14s} {schedule:10s} " + " ".join(f"{row[c]:8s}" for c in _READING_COLS)
                          + f" NFE {nfe:4d}  lambda_s {row['lambda_s']:8s}"
                          f"  {metric} {row['value']}" + (f" [{row['lo']}, {row['hi']}]" if row["lo"] not in ("", None) else "")
                          + ("" if row["status"] == "ok" else f"  ({row['status']})"), file=sys.stderr, flush=True)
                if on_cell is not None:
                    on_cell(dict(row))
                if bar is not None:
                    bar.update(1)
                _write_outputs(out_dir, rows, config)
        finally:
            if bar is not None:
                bar.close()
        _write_outputs(out_dir, rows, config)
        return rows


def _spent(model, sampler, nfe, schedule, lam, lambda_reading, denoise, reading):
    from .samplers import compile_sampler

    try:
        process = model.process_for(sampler) if hasattr(model, "process_for") else model.sde
        return compile_sampler(sampler, process, nfe, schedule=schedule, lambda_s=lam, lambda_reading=lambda_reading,
                               denoise=denoise, **reading).nfe
    except (ValueError, TypeError):
        return ""


def _fid_cell(model, sample, kw, seeds, bs, ex, ref_stats) -> float:
    from .fid import FeatureAccumulator, frechet_distance
    from .images import to_uint8

    acc = FeatureAccumulator(ex.dim, ex.device)
    for i in range(0, len(seeds), bs):
        res = sample(model, len(seeds[i:i + bs]), seeds=seeds[i:i + bs], **kw)
        x = res.x
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FID needs image samples (C, H, W), got {tuple(x.shape[1:])}")
        img = to_uint8(x.float().clamp(-1, 1))
        acc.add(ex(img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img))
    st = acc.result()
    return frechet_distance(st["mu"], st["sigma"], ref_stats["mu"], ref_stats["sigma"])


def _check_config(out_dir: Path, config: dict, force: bool, source) -> None:
    from .generate import _diff, _write_json_atomic

    path = out_dir / "sweep.json"
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("config")
        except (OSError, ValueError):
            old = None
        if old == config:
            return
        diffs = _diff(old or {}, config)
        if not force:
            raise ValueError(f"{out_dir} holds a sweep of another configuration ({'; '.join(diffs)}). Use another "
                             "--out folder, or --force to start over (the old files are renamed *.replaced-<time>).")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for name in ("sweep.json", "sweep.csv", "sweep.md", "sweep.png"):
            if (out_dir / name).exists():
                os.replace(out_dir / name, out_dir / f"{name}.replaced-{stamp}")
    from .generate import _versions

    _write_json_atomic(path, {"config": config, "source": source or {}, "versions": _versions(),
                              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})


# ------------------------------------------------------------------------------------- reports
def _series(rows) -> dict:
    """{(sampler, schedule, net_time, split, coupling, ci_lambda): {nfe: [(lambda_s, value, row)]}} of the
    finished cells."""
    out: dict = {}
    for r in rows:
        key = (r["sampler"], r["schedule"], *(r[c] for c in _READING_COLS))
        out.setdefault(key, {}).setdefault(int(r["nfe"]), []).append((r["lambda_s"], _f(r["value"]), r))
    return out


def _best(cells):
    ok = [c for c in cells if math.isfinite(c[1])]
    return min(ok, key=lambda c: c[1]) if ok else None


def _label(key, keys) -> str:
    parts = [key[0]]
    if len({k[1] for k in keys}) > 1:
        parts.append(key[1])
    for i, col in enumerate(_READING_COLS, start=2):
        if len({k[i] for k in keys}) > 1:
            parts.append(f"{col}={key[i]}")
    return " ".join(parts)


def _fmt_cell(r, metric) -> str:
    if r.get("status") != "ok":
        return r.get("status", "")
    v = f"{_f(r['value']):.4g}"
    if metric == "sw2" and r.get("lo") not in ("", None):
        v += f" [{_f(r['lo']):.4g}, {_f(r['hi']):.4g}]"
    return v


def write_markdown(path, rows, config) -> Path:
    from ._io import write_atomic

    metric = config.get("metric", "")
    series = _series(rows)
    nfes = sorted({int(r["nfe"]) for r in rows})
    keys = list(series)
    lines = [f"# Sweep: {config.get('model', {}).get('name')} {tuple(config.get('model', {}).get('shape', []))}", "",
             f"Metric: {_METRIC_TEXT.get(metric, metric)}, lower is better. {config.get('num_samples')} samples per "
             f"cell, the same seeds in every cell (seed base {config.get('seed')}); lambda_reading "
             f"{config.get('lambda_reading')}, denoise {config.get('denoise')}, dtype {config.get('dtype')}.", "",
             "## Best lambda_s per NFE", "",
             "| sampler | " + " | ".join(f"NFE {v}" for v in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for key in keys:
        cells = []
        for v in nfes:
            b = _best(series[key].get(v, []))
            cells.append("" if b is None else f"{_fmt_cell(b[2], metric)} (lambda_s {b[0]})")
        lines.append(f"| {_label(key, keys)} | " + " | ".join(cells) + " |")
    lines += ["", "## All cells", "",
              "| sampler | schedule | net_time | split | coupling | ci_lambda | NFE | NFE spent | lambda_s | value | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["sampler"], r["schedule"], *(r[c] for c in _READING_COLS), int(r["nfe"]),
                                         r["lambda_s"])):
        lines.append(f"| {r['sampler']} | {r['schedule']} | "
                     + " | ".join(r[c] for c in _READING_COLS) + f" | {r['nfe']} | {r['nfe_spent']} | "
                     f"{r['lambda_s']} | {_fmt_cell(r, metric)} | {r['seconds']} |")
    lines += ["", "Plot: `sweep.png`, metric vs NFE (log axis), one line per sampler through its best lambda_s per NFE "
              "(square markers); small dots are the other lambda_s values.", ""]
    return write_atomic(Path(path), "\n".join(lines).encode())


def _write_outputs(out_dir: Path, rows, config) -> None:
    if not rows:
        return
    write_markdown(out_dir / "sweep.md", rows, config)
    from .plotting import PlotUnavailable

    metric = config.get("metric")
    try:
        plot_sweep(out_dir / "sweep.png", rows,
                   ylabel={"sw2": "sliced W2 to the data law", "fid": "FID"}.get(metric, "metric"),
                   title=f"{config.get('model', {}).get('name') or 'model'}: "
                         f"{ {'sw2': 'sliced W2 (95% CI)', 'fid': 'FID'}.get(metric, metric)} vs NFE, "
                         f"{config.get('num_samples')} samples per cell")
    except PlotUnavailable as exc:
        if not _plot_note_said:
            _plot_note_said.append(True)
            print(f"psld-fast sweep: sweep.png not drawn: {exc} (sweep.csv and sweep.md are complete)", file=sys.stderr)


_plot_note_said: list = []  # the missing-matplotlib note is said once per process


# ----------------------------------------------------------------------------------- plotting
def plot_sweep(path, rows, ylabel: str = "metric", title: str | None = None) -> Path:
    """Metric vs NFE (log x; log y when the values span more than a factor 20), one line per series
    through the best lambda_s of each NFE (with the 95% interval as error bars when the rows have
    one); the other lambda_s values as small dots.  Format from the suffix (.png, .svg, .pdf).
    Raises :class:`psld_fast.plotting.PlotUnavailable` without matplotlib."""
    from .plotting import plain_log_labels, require_matplotlib, save_figure

    plt = require_matplotlib()
    series = _series(rows)
    keys = list(series)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    finite = []
    for k, key in enumerate(keys):
        color = f"C{k % 10}"
        others_x, others_y, best = [], [], []
        for nfe in sorted(series[key]):
            b = _best(series[key][nfe])
            for lam, v, _r in series[key][nfe]:
                if math.isfinite(v):
                    finite.append(v)
                    if b is None or lam != b[0]:
                        others_x.append(nfe)
                        others_y.append(v)
            if b is not None:
                best.append((nfe, b[1], _f(b[2].get("lo", "")), _f(b[2].get("hi", "")), b[0]))
        label = _label(key, keys)
        dodge = 1.0 + 0.025 * (k - (len(keys) - 1) / 2)  # series side by side around each NFE (log axis)
        if others_x:
            ax.plot([v * dodge for v in others_x], others_y, "o", color=color, alpha=0.4, markersize=3.5)
        if best:
            x = [b[0] * dodge for b in best]
            y = [b[1] for b in best]
            if all(math.isfinite(b[2]) and math.isfinite(b[3]) for b in best):
                err = [[max(b[1] - b[2], 0.0) for b in best], [max(b[3] - b[1], 0.0) for b in best]]
                ax.errorbar(x, y, yerr=err, fmt="s-", color=color, capsize=3, markersize=5, linewidth=1.6,
                            label=label)
            else:
                ax.plot(x, y, "s-", color=color, markersize=5, linewidth=1.6, label=label)
    ax.set_xscale("log")
    nfes = sorted({int(r["nfe"]) for r in rows})
    if nfes:
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(v) for v in nfes])
        ax.minorticks_off()
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
        plain_log_labels(ax)
    if not finite:
        ax.text(0.5, 0.5, "no finite values (every cell diverged or was invalid)", transform=ax.transAxes,
                ha="center", va="center")
    ax.set_xlabel("NFE (network evaluations per sample, log scale)")
    ax.set_ylabel(f"{ylabel} (lower is better)")
    ax.set_title(title or f"{ylabel} vs NFE")
    ax.grid(True, which="major", alpha=0.3)
    if keys:
        handles, labels = ax.get_legend_handles_labels()
        handles.append(plt.Line2D([], [], ls="", marker="o", markersize=3.5, color="grey", alpha=0.5))
        labels.append("other lambda_s values")
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9,
                  title="best lambda_s per NFE", title_fontsize=9, frameon=False)
    return save_figure(fig, path)
