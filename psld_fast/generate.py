"""Large sample sets, written once per seed, resumable, identical under any world size.

``generate(model, out_dir, seeds, fmt="png" | "npz", ...)`` (CLI: ``psld-fast generate``) draws one
sample per seed with :func:`psld_fast.sample` and writes it under the seed's name:

* ``png``: ``{out}/{seed // 1000 * 1000:06d}/{seed:06d}.png`` (x clipped to [-1, 1], quantised with
  :func:`psld_fast.images.to_uint8`); image models only (C, H, W) with C in (1, 3).
* ``npz``: shards ``{out}/{seed // S * S:06d}.npz`` holding the requested seeds of the block
  ``[k S, (k + 1) S)`` (S = ``shard_size``, default 1000) in request order: ``x`` float32 (raw
  samples, not clipped) and ``seeds`` int64.

A sample depends only on its seed (the library's reproducibility contract), so the files do not
depend on the batch size, the number of processes or the order of work.  Under ``torchrun``
(``WORLD_SIZE > 1``) the work is dealt round-robin: PNG batches of ``batch_size`` seeds, npz shards.
Every file is written atomically (temporary name in the same folder + ``os.replace``); a killed run
restarted with the same command skips the files that exist (zero-length files, which only a crash
of the machine can leave behind, count as missing) and deletes the temporary files it left.

``manifest.json`` (written by rank 0, atomically) records the configuration that determines the
samples (model identity incl. a SHA-256 of its weights, sampler settings, dtype, format, seeds),
the environment (versions, device, backend, world size) and one entry per run.  A folder holding a
different configuration is refused unless ``force=True``, which takes the folder over: the manifest
is replaced (the old one kept as ``manifest.replaced-<time>.json``) and the sample files of the
other configuration are deleted, so a folder never mixes two configurations.  Sample files in a
folder without a manifest (unknown provenance) are refused the same way.

The seeds are not part of the configuration: rerunning with a larger or another seed set and the
same configuration writes only what is missing (an npz shard that lacks some of the requested seeds
of its block is rewritten with the old rows kept and the new ones appended), and the manifest's
``seeds`` records the union of the seeds of all finished runs.  A run holds an exclusive lock
(``fcntl``) on ``{out}/.psld_fast.lock``: a second run into the same folder stops at once with a
message naming the running one's pid.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .samplers import READING_KNOBS

__all__ = ["generate", "png_path", "shard_path", "seeds_to_spec", "model_identity", "ManifestMismatch",
           "FolderBusy", "FolderLock", "sample_files", "MANIFEST"]

MANIFEST = "manifest.json"
_FORMATS = ("png", "npz")
_RESERVED = {"num_samples", "seeds", "generator", "batch_size", "callback", "progress", "device"}
_PROGRAM_KEYS = ("schedule", "lambda_s", "denoise") + READING_KNOBS
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def _add_later_knobs(old_config: dict, config: dict) -> None:
    """A reading knob added to the library after a manifest was written (e.g. ``ms_variable``) is
    absent from it; where it does not apply to the run's sampler (None now) it changes nothing, so it
    is filled in as None and the run stays resumable."""
    old_s, new_s = old_config.get("sampler"), config.get("sampler")
    if isinstance(old_s, dict) and isinstance(new_s, dict):
        for k in READING_KNOBS:
            if k not in old_s and k in new_s and new_s[k] is None:
                old_s[k] = None
    # A lifted model's resolved process (T, eps_end) is recorded since the end knob; a folder written
    # before cannot be checked for it and resumes as it did.
    if "process" in config and "process" not in old_config:
        old_config["process"] = config["process"]


class ManifestMismatch(ValueError):
    """The output folder holds a run with another configuration."""


class FolderBusy(RuntimeError):
    """Another run holds the output folder's lock."""


LOCK = ".psld_fast.lock"


class FolderLock:
    """Exclusive, non-blocking ``fcntl`` lock on ``{folder}/.psld_fast.lock`` (released by the
    kernel when the process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, folder: Path, what: str = "psld-fast run"):
        self.path, self.what, self.fd = Path(folder) / LOCK, what, None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (Windows: no lock)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise FolderBusy(f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                             "finish or write to another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.what}, pid {os.getpid()} on {platform.node()} since {_now()}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:  # the (empty) file stays: unlinking a lock file races with a waiting opener
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --------------------------------------------------------------------------------------- naming
def png_path(out_dir, seed: int) -> Path:
    """``{out}/{seed // 1000 * 1000:06d}/{seed:06d}.png``."""
    seed = int(seed)
    return Path(out_dir) / f"{seed // 1000 * 1000:06d}" / f"{seed:06d}.png"


def shard_path(out_dir, block_start: int) -> Path:
    return Path(out_dir) / f"{int(block_start):06d}.npz"


def seeds_to_spec(seeds: Iterable[int]) -> str:
    """Compact text of a seed list in the ``parse_seeds`` syntax: [0, 1, 2, 5] -> '0-2,5'."""
    parts, run = [], None
    for s in seeds:
        s = int(s)
        if run is not None and s == run[1] + 1:
            run[1] = s
            continue
        if run is not None:
            parts.append(str(run[0]) if run[0] == run[1] else f"{run[0]}-{run[1]}")
        run = [s, s]
    if run is not None:
        parts.append(str(run[0]) if run[0] == run[1] else f"{run[0]}-{run[1]}")
    return ",".join(parts)


# ----------------------------------------------------------------------------- configuration
def _state_sha256(model) -> str | None:
    if not isinstance(model, torch.nn.Module):
        return None
    state = model.state_dict()
    if not state:
        return None
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_identity(model) -> dict:
    """What identifies a model's samples: class, shape, process and a SHA-256 of its weights."""
    sde = getattr(model, "sde", None)
    net = getattr(model, "net", None)
    ident = {
        "class": type(model).__name__,
        "net": type(net).__name__ if net is not None else None,
        "name": getattr(model, "name", None),
        "shape": list(getattr(model, "shape", None) or []),
        "sde": {k: getattr(sde, k) for k in ("gamma", "nu", "kappa", "beta_min", "beta_max", "T", "eps_end")}
        if sde is not None else None,
        "weights_sha256": _state_sha256(model),
    }
    return ident


def _jsonable(v):
    if isinstance(v, torch.dtype):
        return _DTYPE_NAMES.get(v, str(v))
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _versions() -> dict:
    from . import __version__

    return {"psld_fast": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "numpy": np.__version__}


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.machine()}, {torch.get_num_threads()} threads)"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, obj) -> None:
    from ._io import write_atomic

    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _diff(old: dict, new: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            if k == "seeds" or (isinstance(a, str) and len(a) > 60):
                a, b = str(a)[:60] + ("..." if len(str(a)) > 60 else ""), str(b)[:60] + ("..." if len(str(b)) > 60 else "")
            out.append(f"{prefix}{k}: {a!r} in the folder, {b!r} now")
    return out


def sample_files(out_dir: Path) -> list[Path]:
    """The files of ``out_dir`` named like generate's samples (``NNNNNN/NNNNNN.png``, ``NNNNNN.npz``)."""
    out_dir = Path(out_dir)
    found = [p for p in out_dir.glob("*.npz") if p.stem.isdigit()]
    for d in out_dir.iterdir() if out_dir.is_dir() else ():
        if d.is_dir() and d.name.isdigit():
            found += [p for p in d.glob("*.png") if p.stem.isdigit()]
    return sorted(found)


def _delete_samples(out_dir: Path) -> int:
    files = sample_files(out_dir)
    for f in files:
        f.unlink()
    for d in out_dir.iterdir():
        if d.is_dir() and d.name.isdigit():
            try:
                d.rmdir()
            except OSError:
                pass
    return len(files)


def _config_without_seeds(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "seeds"}


def _check_manifest(out_dir: Path, manifest: dict, force: bool) -> tuple[dict, list[str]]:
    """Rank 0: create or validate the manifest.  Returns (manifest to keep, warnings).

    Never leaves a folder whose sample files came from another configuration than the manifest's:
    ``force`` deletes them, otherwise the run is refused."""
    path = out_dir / MANIFEST
    warnings: list[str] = []
    if not path.exists():
        orphans = sample_files(out_dir)
        if orphans and not force:
            raise ManifestMismatch(
                f"{out_dir} holds {len(orphans)} sample files but no {MANIFEST}, so their configuration is "
                "unknown. Use another output folder, or --force to delete them and start afresh.")
        if orphans:
            warnings.append(f"--force: deleted {_delete_samples(out_dir)} sample files of unknown configuration")
        _write_json_atomic(path, manifest)
        return manifest, warnings
    try:
        old = json.loads(path.read_text())
        old_config = old["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not force:
            raise ManifestMismatch(f"{path} is unreadable ({exc}); use another output folder or --force "
                                   "(which deletes the sample files in it)") from None
        old, old_config = {}, None
    if old_config is not None and isinstance(old_config.get("seeds"), dict) and "seeds" not in old:
        old["seeds"] = old_config["seeds"]  # manifests before the seeds left the configuration
    if old_config is not None:
        _add_later_knobs(old_config, manifest["config"])
    if old_config is None or _config_without_seeds(old_config) != manifest["config"]:
        diffs = _diff(_config_without_seeds(old_config), manifest["config"]) if old_config else ["unreadable manifest"]
        if not force:
            raise ManifestMismatch(
                f"{out_dir} holds samples of another configuration ({'; '.join(diffs)}). Use another output "
                "folder, or --force (force=True) to take it over: the other configuration's sample files are "
                "then deleted.")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.replace(path, out_dir / f"manifest.replaced-{stamp}.json")
        removed = _delete_samples(out_dir)
        warnings.append(f"--force: replaced the manifest of another configuration ({'; '.join(diffs)}) and deleted "
                        f"its {removed} sample files; the old manifest is manifest.replaced-{stamp}.json")
        _write_json_atomic(path, manifest)
        return manifest, warnings
    env_old, env_new = old.get("environment", {}), manifest["environment"]
    for key in ("psld_fast", "torch"):
        if env_old.get("versions", {}).get(key) != env_new["versions"].get(key):
            warnings.append(f"resuming with {key} {env_new['versions'].get(key)} (the folder was started with "
                            f"{env_old.get('versions', {}).get(key)})")
    for key in ("device", "backend"):
        if env_old.get(key, "").split(" ")[0] != env_new.get(key, "").split(" ")[0]:
            warnings.append(f"resuming on {key} {env_new.get(key)} (started on {env_old.get(key)}): "
                            "samples agree to float rounding, not bit for bit")
    old.setdefault("runs", [])
    return old, warnings


def _seeds_record(seeds) -> dict:
    return {"count": len(seeds), "spec": seeds_to_spec(seeds),
            "sha256": hashlib.sha256(np.asarray(seeds, dtype=np.int64).tobytes()).hexdigest()}


def _spec_seeds(spec: str) -> list[int]:
    """Inverse of :func:`seeds_to_spec`."""
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        k = part.find("-", 1)
        out += [int(part)] if k < 0 else list(range(int(part[:k]), int(part[k + 1:]) + 1))
    return out


def _shard_seeds(path: Path) -> set[int]:
    """Seeds held by an existing npz shard (empty when there is none)."""
    if not _exists(path):
        return set()
    try:
        with np.load(path) as z:
            return set(int(v) for v in z["seeds"])
    except Exception as exc:
        raise ValueError(f"{path} is not a readable shard ({type(exc).__name__}); delete it and rerun") from None


# ------------------------------------------------------------------------------------ writing
def _npz_bytes(x: np.ndarray, seeds: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, seeds=seeds)
    return buf.getvalue()


def _exists(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _remove_temp_files(out_dir: Path) -> int:
    """Delete the ``.<name>.<random>.tmp`` files of atomic writes a killed run left behind."""
    n = 0
    for root, _dirs, files in os.walk(out_dir):
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(root, f))
                    n += 1
                except OSError:
                    pass
    return n


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar, self.total, self.done, self.t0, self.next_report = None, total, 0, time.perf_counter(), 0.1
        self.enabled = enabled and total > 0
        if not self.enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="sample", smoothing=0.1, dynamic_ncols=True)
        except ImportError:
            print(f"{desc}: {total} samples", file=sys.stderr, flush=True)

    def update(self, n: int):
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_report * self.total or self.done == self.total:
            el = time.perf_counter() - self.t0
            rate = self.done / max(el, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"  {self.done}/{self.total} samples  {rate:.1f}/s  ETA {eta:.0f} s", file=sys.stderr, flush=True)
            self.next_report += 0.1

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------- generate
def generate(model, out_dir, seeds, *, fmt: str = "png", batch_size: int | None = None,
             shard_size: int = 1000, force: bool = False, progress: bool = True, device=None,
             source: dict | None = None, after_batch: Callable[[dict], None] | None = None,
             extra_args: dict | None = None, **sample_kwargs) -> dict:
    """Write one sample per seed into ``out_dir`` (see the module docstring); resumable.

    Args:
        model: an :class:`~psld_fast.models.EpsModel` (e.g. a preset or a loaded checkpoint).
        out_dir: output folder (created).
        seeds: iterable of int seeds (duplicates are dropped, order kept).
        fmt: ``"png"`` (image models) or ``"npz"`` (shards of ``shard_size`` seed values).
        batch_size: samples per :func:`psld_fast.sample` call (default 256); does not change the files.
        force: take over a folder whose manifest holds another configuration (its sample files are
            deleted: a folder never mixes two configurations).
        progress: progress bar with ETA on rank 0 (tqdm if importable).
        device: where to sample (default: the model's device; ``cuda:LOCAL_RANK`` under torchrun).
        source: free-form description recorded in the manifest (e.g. ``{"checkpoint": path}``).
        after_batch: called after each batch's files are written with a dict (rank, batch, seeds,
            files); an exception raised there aborts the run like a crash would.
        extra_args: the network's keyword arguments (class labels, embeddings): a tensor with one row
            per seed (first dimension ``len(seeds)``, in the order of ``seeds``) goes with its seed
            into whichever batch and rank samples it; anything else goes to every call.  The
            manifest records the shared values (a change is another configuration) and
            ``conditioning.json`` a digest of each seed's rows: a resume that would give a seed
            other conditioning than its file has is refused.
        **sample_kwargs: sampler settings for :func:`psld_fast.sample` (sampler, nfe, schedule,
            lambda_s, lambda_reading, net_time, denoise, backend, dtype, ...).

    Returns:
        A summary dict: requested, written, skipped (already there), seconds, samples_per_second,
        world_size, device, backend, nfe, out_dir, format.  Counts are over all ranks.
    """
    from .api import sample
    from .distributed import env_world_size, setup

    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
    bad = _RESERVED & set(sample_kwargs)
    if bad:
        raise TypeError(f"generate: {', '.join(sorted(bad))} cannot be passed here (seeds and batching are "
                        "generate's own arguments)")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    from .models import EpsModel

    if not isinstance(model, EpsModel):
        raise TypeError(f"generate needs an EpsModel (wrap a network as EpsModel(net, sde, shape)), got "
                        f"{type(model).__name__}")
    if isinstance(seeds, (str, bytes)):  # "0-99" would iterate as the seeds 0, 9, 9
        raise ValueError(f"seeds must be integers, got the string {seeds!r}; pass e.g. range(100) "
                         "(on the command line: --seeds 0-99)")
    given = [int(s) for s in seeds]
    seed_list = list(dict.fromkeys(given))
    if not seed_list:
        raise ValueError("no seeds given")
    extra_args = _check_generate_extra(extra_args, seed_list, len(given))
    shape = tuple(getattr(model, "shape", None) or ())
    if fmt == "png" and not (len(shape) == 3 and shape[0] in (1, 3)):
        raise ValueError(f"--format png needs an image model with samples of shape (C, H, W), C in (1, 3); this "
                         f"model's samples have shape {shape}: use --format npz")
    batch_size = batch_size or 256
    sample_kwargs.setdefault("sampler", "reduced_oba")
    sample_kwargs.setdefault("nfe", 50)
    from .guards import MAX_NFE, as_count

    sample_kwargs["nfe"] = as_count(sample_kwargs["nfe"], "nfe")
    if sample_kwargs["nfe"] > MAX_NFE:  # checked before the program is compiled below
        raise ValueError(f"nfe={sample_kwargs['nfe']} is above the limit of {MAX_NFE} network evaluations per sample")

    if device is None:  # the model's device; under torchrun a CUDA model goes to cuda:LOCAL_RANK
        device = _model_device(model)
        if device.type == "cuda" and env_world_size() > 1:
            device = "cuda"
    ctx = setup(device)
    dev = ctx.device
    model = model.to(dev)
    out_dir = Path(out_dir)
    locks: list[FolderLock] = []
    try:
        return _generate(model, out_dir, seed_list, fmt, batch_size, shard_size, force, progress, ctx, dev,
                         source, after_batch, sample_kwargs, sample, locks, extra_args)
    finally:
        for lock in locks:
            lock.release()
        ctx.close()


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            return t.device
    return torch.device("cpu")


CONDITIONING = "conditioning.json"


def _check_generate_extra(extra_args, seed_list: list, n_given: int) -> dict:
    """``extra_args`` split into per-seed tensors (one row per seed) and shared values, checked."""
    if extra_args is None:
        return {}
    if not isinstance(extra_args, dict) or not all(isinstance(k, str) for k in extra_args):
        raise TypeError(f"extra_args must be a dict of keyword arguments, got {type(extra_args).__name__}")
    n = len(seed_list)
    for k, v in extra_args.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n_given != n:
            raise ValueError(f"extra_args[{k!r}] has one row per given seed, but the seeds repeat ({n_given} given, "
                             f"{n} distinct): pass each seed once, so that its row is unambiguous")
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] not in (1, n):
            raise ValueError(f"extra_args[{k!r}] has first dimension {v.shape[0]}; per-seed arguments need one row "
                             f"per seed ({n}, in the order of the seeds), shared ones a batch of 1 or none")
    return extra_args


def _per_seed(extra_args: dict, n: int) -> list:
    return [k for k, v in extra_args.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n > 1]


def _extra_signature(extra_args: dict, n: int) -> dict:
    """The manifest's record of extra_args: per-seed tensors by dtype and row shape, shared values
    by a digest of their contents."""
    per = set(_per_seed(extra_args, n))
    sig = {}
    for k in sorted(extra_args):
        v = extra_args[k]
        if k in per:
            sig[k] = {"per_seed": True, "dtype": str(v.dtype), "row_shape": list(v.shape[1:])}
        elif isinstance(v, torch.Tensor):
            sig[k] = {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": _tensor_sha256(v)}
        else:
            sig[k] = {"value": repr(v)}
    return sig


def _tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(str(t.dtype).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _seed_digests(extra_args: dict, seed_list: list) -> dict:
    """Per seed, a digest of its rows of the per-seed tensors (``conditioning.json``)."""
    names = _per_seed(extra_args, len(seed_list))
    if not names:
        return {}
    rows = {k: extra_args[k].detach().cpu().contiguous() for k in names}
    return {str(s): hashlib.sha256(b"".join(_tensor_sha256(rows[k][i]).encode() for k in names)).hexdigest()[:16]
            for i, s in enumerate(seed_list)}


def _check_conditioning(out_dir: Path, digests: dict, done: list) -> None:
    """Rank 0: the seeds already on disk must have been sampled with the rows they get now; then
    record this run's rows (before sampling, so a crash leaves them on record)."""
    if not digests:
        return
    path = out_dir / CONDITIONING
    old = json.loads(path.read_text()) if path.exists() else {}
    bad = [s for s in done if str(s) in old and old[str(s)] != digests[str(s)]]
    if bad:
        raise ManifestMismatch(
            f"{out_dir}: {len(bad)} seeds already written (e.g. {bad[:5]}) were sampled with other per-seed "
            f"extra_args than given now ({CONDITIONING}); use another output folder, or delete their files")
    old.update(digests)
    _write_json_atomic(path, old)


def _generate(model, out_dir, seed_list, fmt, batch_size, shard_size, force, progress, ctx, dev, source,
              after_batch, sample_kwargs, sample, locks, extra_args):
    from ._io import write_atomic
    from .images import save_png
    from .ops import resolve_backend

    from .samplers import compile_sampler

    dtype = sample_kwargs.get("dtype", torch.float32)
    backend = resolve_backend(sample_kwargs.get("backend", "auto"), dev, dtype=dtype)
    import warnings as _warnings

    from .guards import warn_at_caller

    warned: set[str] = set()  # a run says each warning once, at the caller's line, not once per batch

    def rewarn(caught):
        for w in caught:
            key = f"{w.category.__name__}:{str(w.message)[:40]}"
            if key not in warned:
                warned.add(key)
                warn_at_caller(w.message, w.category)

    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        process = model.process_for(sample_kwargs["sampler"]) if hasattr(model, "process_for") else model.sde
        program = compile_sampler(sample_kwargs["sampler"], process, sample_kwargs["nfe"],
                                  **{k: v for k, v in sample_kwargs.items() if k in _PROGRAM_KEYS})
    rewarn(caught)
    # ---- rank 0: manifest and the list of work that is left; everyone else waits for it
    payload = None
    if ctx.is_main:
        try:
            if out_dir.exists() and not out_dir.is_dir():
                raise ValueError(f"output folder {out_dir} is an existing file; choose a folder")
            out_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(out_dir, os.W_OK | os.X_OK):
                raise PermissionError(f"output folder {out_dir} is not writable")
            locks.append(FolderLock(out_dir, "psld-fast generate").acquire())
            config = {
                "model": model_identity(model),
                "sampler": {k: _jsonable(v) for k, v in program.info.items() if k != "sde"},
                "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
                "format": fmt,
                "shard_size": shard_size if fmt == "npz" else None,
            }
            if extra_args:  # (absent otherwise: folders written before extra_args keep their configuration)
                config["extra_args"] = _extra_signature(extra_args, len(seed_list))
            if hasattr(model, "process_for"):  # a lifted model: the process its start/end knobs resolved to
                config["process"] = {"T": process.T, "eps_end": process.eps_end}
            config = json.loads(json.dumps(config))  # what a reload gives back
            manifest = {
                "psld_fast_generate": 1,
                "created": _now(),
                "config": config,
                "seeds": None,
                "source": source or {},
                "environment": {"versions": _versions(), "device": _device_text(dev), "backend": backend,
                                "world_size": ctx.world_size, "host": platform.node()},
                "runs": [],
            }
            manifest, warnings = _check_manifest(out_dir, manifest, force)
            removed = _remove_temp_files(out_dir)
            if fmt == "png":
                todo = [s for s in seed_list if not _exists(png_path(out_dir, s))]
                units = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
            else:
                blocks: dict[int, list[int]] = {}
                for s in seed_list:
                    blocks.setdefault(s // shard_size * shard_size, []).append(s)
                units = []
                for b, ss in blocks.items():
                    have = _shard_seeds(shard_path(out_dir, b))
                    missing = [s for s in ss if s not in have]
                    if missing:
                        units.append((b, missing, bool(have)))
                todo = [s for u in units for s in u[1]]
            pending = set(todo)
            _check_conditioning(out_dir, _seed_digests(extra_args, seed_list),
                                [s for s in seed_list if s not in pending])
            payload = {"units": units, "todo": len(todo), "warnings": warnings, "removed": removed, "error": None}
        except Exception as exc:  # tell the other ranks, then raise here
            payload = {"error": exc}
    payload = ctx.broadcast_object(payload)
    if payload["error"] is not None:
        raise payload["error"]
    if ctx.is_main:
        for w in payload["warnings"]:
            print(f"psld-fast generate: warning: {w}", file=sys.stderr)
        manifest["runs"].append({"started": _now(), "seeds": _seeds_record(seed_list),
                                 "world_size": ctx.world_size, "device": _device_text(dev),
                                 "backend": backend, "batch_size": batch_size, "versions": _versions(),
                                 "options": {k: _jsonable(v) for k, v in sample_kwargs.items()
                                             if k not in _PROGRAM_KEYS and k not in ("sampler", "nfe", "dtype")}})
        _write_json_atomic(out_dir / MANIFEST, manifest)  # a crashed run stays on record
    units = payload["units"]
    mine = units[ctx.rank::ctx.world_size]
    n_mine = sum(len(u) if fmt == "png" else len(u[1]) for u in mine)
    skipped = len(seed_list) - payload["todo"]
    desc = f"generate ({ctx.world_size} ranks, rank 0)" if ctx.distributed else "generate"
    bar = _Progress(progress and ctx.is_main, n_mine, desc)
    kwargs = dict(sample_kwargs)
    kwargs["backend"] = backend
    written, batch_no = 0, 0
    t0 = time.perf_counter()

    per_seed = _per_seed(extra_args, len(seed_list))
    row_of = {s: i for i, s in enumerate(seed_list)} if per_seed else {}

    def batch_extra(batch_seeds):
        if not extra_args:
            return None
        idx = torch.tensor([row_of[s] for s in batch_seeds], dtype=torch.long) if per_seed else None
        out = {}
        for k, v in extra_args.items():
            if k in per_seed:
                v = v.index_select(0, idx.to(v.device))  # (a 1-row batch: sample() treats it as shared, the same)
            out[k] = v
        return out

    def run(batch_seeds):
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            res = sample(model, len(batch_seeds), seeds=batch_seeds, device=dev, batch_size=len(batch_seeds),
                         progress=False, extra_args=batch_extra(batch_seeds), **kwargs)
        rewarn(caught)
        return res.x

    def done_batch(batch_seeds, files):
        nonlocal batch_no
        bar.update(len(batch_seeds))
        if after_batch is not None:
            after_batch({"rank": ctx.rank, "batch": batch_no, "seeds": list(batch_seeds), "files": files})
        batch_no += 1

    error = None
    try:
        if fmt == "png":
            for batch_seeds in mine:
                x = run(batch_seeds).float().clamp(-1, 1).cpu()
                files = []
                for s, img in zip(batch_seeds, x):
                    p = png_path(out_dir, s)
                    p.parent.mkdir(parents=True, exist_ok=True)
                    files.append(save_png(img, p))
                written += len(batch_seeds)
                done_batch(batch_seeds, files)
        else:
            for block, shard_seeds, extend in mine:
                xs = []
                for i in range(0, len(shard_seeds), batch_size):
                    batch_seeds = shard_seeds[i:i + batch_size]
                    xs.append(run(batch_seeds).float().cpu())
                    last = i + batch_size >= len(shard_seeds)
                    if last:
                        x_new, s_new = torch.cat(xs).numpy(), np.asarray(shard_seeds, dtype=np.int64)
                        if extend:  # the shard holds other seeds of this block: keep them, append the new
                            with np.load(shard_path(out_dir, block)) as z:
                                x_new = np.concatenate([z["x"], x_new])
                                s_new = np.concatenate([z["seeds"].astype(np.int64), s_new])
                        p = write_atomic(shard_path(out_dir, block), _npz_bytes(x_new, s_new))
                        written += len(shard_seeds)
                    done_batch(batch_seeds, [p] if last else [])
    except Exception as exc:  # noqa: BLE001  (re-raised below, after the other ranks are told)
        error = exc
    finally:
        bar.close()
    local_seconds = time.perf_counter() - t0
    # Every rank, failed or not, meets here (this also is the end-of-work barrier): a failing rank
    # brings the others down at once with its error instead of leaving them in a collective until
    # the process group's timeout.
    try:
        failed = ctx.failures(None if error is None else f"{type(error).__name__}: {error}")
    except Exception as comm_error:  # e.g. a CUDA error that also broke the communicator
        if error is not None:
            raise error from comm_error  # this rank's own failure stays the one shown
        raise
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("generate: " + "; ".join(f"rank {r} failed: {e}" for r, e in failed)
                           + " (files written so far are kept; rerun the same command to resume)")
    seconds = time.perf_counter() - t0
    (written_all,) = ctx.sum_ints(written)
    summary = {
        "out_dir": str(out_dir), "format": fmt, "requested": len(seed_list), "written": written_all,
        "skipped": skipped, "seconds": seconds, "samples_per_second": written_all / max(seconds, 1e-9),
        "world_size": ctx.world_size, "device": _device_text(dev), "backend": backend, "nfe": program.nfe,
        "removed_temp_files": payload["removed"], "rank0_seconds": local_seconds,
    }
    if ctx.is_main:
        manifest["runs"][-1].update({"finished": _now(), "written": written_all, "skipped": skipped,
                                     "seconds": round(seconds, 3)})
        old = manifest.get("seeds") or {}
        manifest["seeds"] = _seeds_record(sorted(set(_spec_seeds(old.get("spec", ""))) | set(seed_list)))
        _write_json_atomic(out_dir / MANIFEST, manifest)
    return summary
