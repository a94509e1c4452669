"""FID and KID of a sample folder against reference statistics, streamed and torchrun-ready.

Features come from a torch-fidelity feature extractor, by default ``inception-v3-compat`` (the
TF-FID Inception-v3 port) loaded from a **local** weights file: ``inception_weights=`` /
``--inception-weights``, else env ``PSLD_FAST_INCEPTION_WEIGHTS``, else torch-fidelity's own
download location ``<torch.hub.get_dir()>/checkpoints/``.  Nothing is downloaded at run time; a
missing file raises :class:`InceptionWeightsMissing` naming the file and where to put it.

Statistics are streamed: each batch of features is added to float64 moments on the device (sum,
sum of outer products, count); under ``torchrun`` every rank reads its own contiguous block of the
sorted file list and the moments are all-reduced, so no rank ever holds all features.  Then
``mu = S / n`` and ``sigma = (Q - n mu mu^T) / (n - 1)`` (the unbiased covariance, as ``np.cov``)
and FID is torch-fidelity's formula applied to these float64 statistics
(``fid_statistics_to_metric``: ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 sum sqrt(eig(s1 s2))``).  The
moments, their all-reduce and the offline weights handling are ours; the metric arithmetic
(FID and KID) is torch-fidelity's own functions, called on our statistics and features.

KID needs features, not moments.  Each set keeps a fixed random subset of at most
``kid_max_features`` (default 10 000) features, chosen up front by global index
(``numpy.random.default_rng(seed).choice``), so the subset is the same for any world size; under
torchrun the kept rows are assembled by one all-reduce of a (k, d) buffer.  KID is then
torch-fidelity's ``kid_features_to_metric`` on those features: ``kid_subsets`` (100) subsets of ``kid_subset_size`` (1000, capped at
the set sizes) drawn with ``numpy.random.RandomState(seed)``, polynomial kernel
``(x.y / d + 1)^3``, unbiased MMD^2; mean and standard deviation over subsets.  With more samples
than ``kid_max_features``, KID is that of the subset (an unbiased estimate of the same quantity).

Inputs: a folder (PNG/JPEG tree, npz shards of ``psld-fast generate``, or a generate run), one
``.npz`` with ``x`` (float in [-1, 1], N C H W, clipped and quantised like the PNG writer, or uint8
NCHW / NHWC), or a statistics ``.npz`` with ``mu`` / ``sigma`` (only as the reference; optional
``kid_features``).  Greyscale images are repeated to three channels.  Reference folders' statistics
are cached (key: folder path + hash of the file list and sizes + extractor + KID subset settings).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["fid", "frechet_distance", "kernel_inception_distance", "InceptionWeightsMissing", "InceptionWeightsCorrupt",
           "resolve_inception_weights", "make_extractor", "list_samples", "compute_statistics",
           "reference_statistics", "load_statistics", "save_statistics", "FeatureAccumulator",
           "register_random_conv", "INCEPTION_FILE", "INCEPTION_URL", "ENV_WEIGHTS"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
ENV_WEIGHTS = "PSLD_FAST_INCEPTION_WEIGHTS"
INCEPTION = "inception-v3-compat"
RANDOM_CONV = "psld-random-conv"
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception-v3 weights file for FID is not where it was looked for."""


class InceptionWeightsCorrupt(ValueError):
    """The Inception-v3 weights file exists but cannot be loaded (empty, truncated download, another file)."""


#: The weight-free way to run the FID pipeline offline (numbers not comparable with published FIDs).
_OFFLINE_HINT = (f"For an offline smoke test of the pipeline without the weights use --extractor {RANDOM_CONV} "
                 "(its numbers are not comparable with published FIDs).")


# ------------------------------------------------------------------------------ torch-fidelity
def _import_torch_fidelity():
    """Import torch_fidelity, working around a torchvision that cannot register its ops.

    The PyPI torchvision wheel is a CUDA build; beside a CPU-only torch its C extension registers no
    operators and ``torchvision/_meta_registrations.py`` fails at import with ``operator
    torchvision::nms does not exist``.  torch-fidelity imports torchvision for its dataset helpers
    only, so in that one case an empty module is registered as ``torchvision._meta_registrations``
    (the fake-tensor kernels of torchvision's detection ops, which nothing here uses) and the import
    is retried.  Any other import error is raised as it is.  Used only by this module.
    """
    try:
        import torch_fidelity

        return torch_fidelity
    except (RuntimeError, ImportError) as exc:
        if "torchvision::" not in str(exc) or "does not exist" not in str(exc):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "torch_fidelity")]:
        del sys.modules[name]
    stub = types.ModuleType("torchvision._meta_registrations")
    stub.__doc__ = "empty stand-in registered by psld_fast.fid (CUDA torchvision wheel beside CPU torch)"
    sys.modules["torchvision._meta_registrations"] = stub
    import torch_fidelity

    return torch_fidelity


def resolve_inception_weights(path=None) -> Path:
    """The local Inception weights file: ``path``, else env ``PSLD_FAST_INCEPTION_WEIGHTS``, else
    ``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if path is not None:
        tried, origin = Path(path), "given with --inception-weights / inception_weights="
    elif os.environ.get(ENV_WEIGHTS):
        tried, origin = Path(os.environ[ENV_WEIGHTS]), f"named by {ENV_WEIGHTS}"
    else:
        tried, origin = None, None
    if tried is not None and tried.is_file():
        return tried
    if tried is None and hub.is_file():
        return hub
    where = (f"the file {tried} ({origin}) does not exist" if tried is not None else
             f"no --inception-weights given, {ENV_WEIGHTS} is not set and {hub} does not exist")
    raise InceptionWeightsMissing(
        f"FID/KID need torch-fidelity's Inception-v3 weights, the file {INCEPTION_FILE}, and "
        f"psld-fast downloads nothing at run time: {where}. Fetch the file once on a machine with network access "
        f"({INCEPTION_URL}) and pass --inception-weights /path/to/{INCEPTION_FILE}, or set "
        f"{ENV_WEIGHTS}=/path/to/{INCEPTION_FILE}, or put it at {hub}. {_OFFLINE_HINT}")


def _random_conv_class():
    tf = _import_torch_fidelity()
    import torch.nn.functional as F

    class RandomConvFeatures(tf.FeatureExtractorBase):
        """A fixed random two-layer conv net + mean/max pooling: 64 float64 features, deterministic.

        For tests and smoke checks of the FID pipeline without Inception weights.  Its numbers are
        *not* comparable with published FIDs.
        """

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(0x5053)
            self.register_buffer("w1", torch.randn(16, 3, 3, 3, generator=g, dtype=torch.float64) / 27 ** 0.5)
            self.register_buffer("w2", torch.randn(32, 16, 3, 3, generator=g, dtype=torch.float64) / 144 ** 0.5)

        @staticmethod
        def get_provided_features_list():
            return ("64",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "64"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros((1, 3, 16, 16), dtype=torch.uint8)

        def forward(self, x):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            h = x.to(torch.float64) / 127.5 - 1.0
            h = torch.tanh(F.conv2d(h, self.w1, padding=1))
            h = torch.tanh(F.conv2d(h, self.w2, padding=1, stride=2))
            return (torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1),)

    return RandomConvFeatures


def register_random_conv(name: str = RANDOM_CONV) -> str:
    """Register the weight-free random-conv extractor with torch-fidelity (idempotent); returns its name."""
    tf = _import_torch_fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        tf.register_feature_extractor(name, _random_conv_class())
    return name


@dataclass
class Extractor:
    """A torch-fidelity feature extractor on a device, with what identifies its features."""

    module: torch.nn.Module
    name: str
    feature: str
    device: torch.device
    identity: dict
    dim: int = 0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float64 (B, d) on ``device``."""
        out = self.module(images.to(self.device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(out.shape[0], -1).to(torch.float64)


def make_extractor(name: str = INCEPTION, *, weights=None, device=None, feature: str | None = None) -> Extractor:
    """Build a registered torch-fidelity extractor (Inception from a local file; never downloads)."""
    kwargs, identity = {}, {"name": name}
    if name == INCEPTION:
        path = resolve_inception_weights(weights)
        kwargs["feature_extractor_weights_path"] = str(path)
        identity["weights"] = {"file": path.name, "size": path.stat().st_size}
    tf = _import_torch_fidelity()
    del tf
    if name == RANDOM_CONV:
        register_random_conv()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {name!r}; registered: {', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    feature = feature or cls.get_default_feature_layer_for_metric("fid")
    identity["feature"] = feature
    device = torch.device(device) if device is not None else torch.device("cpu")
    try:
        module = cls(name, [feature], **kwargs).eval().requires_grad_(False).to(device)
    except Exception as exc:  # noqa: BLE001  torch.load of a bad file: UnpicklingError, EOFError, RuntimeError, ...
        if "feature_extractor_weights_path" not in kwargs:
            raise
        path = Path(kwargs["feature_extractor_weights_path"])
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise InceptionWeightsCorrupt(
            f"the Inception weights file {path} ({path.stat().st_size} bytes) cannot be loaded "
            f"({type(exc).__name__}: {first}); it is empty, truncated (an interrupted download is the usual "
            f"cause) or another file: fetch {INCEPTION_FILE} again ({INCEPTION_URL}). {_OFFLINE_HINT}") from None
    ex = Extractor(module, name, feature, device, identity)
    ex.dim = int(ex(torch.zeros((1, 3, 32, 32), dtype=torch.uint8)).shape[1])
    identity["dim"] = ex.dim
    return ex


# ------------------------------------------------------------------------------------- inputs
def _npz_rows(path: Path) -> int:
    """Rows of ``x`` in an .npz without loading the array (reads the .npy header)."""
    try:
        return _npz_rows_unchecked(path)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc}); truncated or "
                         "another format?") from None


def _npz_rows_unchecked(path: Path) -> int:
    with zipfile.ZipFile(path) as z:
        if "x.npy" not in z.namelist():
            return -1
        with z.open("x.npy") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape = fmt.read_array_header_1_0(f)[0]
            elif version == (2, 0):
                shape = fmt.read_array_header_2_0(f)[0]
            else:  # pragma: no cover - version 3 headers (non-ASCII field names)
                shape = fmt._read_array_header(f, version)[0]
    return int(shape[0]) if shape else -1


def _is_stats_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc}); truncated or "
                         "another format?") from None
    return {"mu.npy", "sigma.npy"} <= names


@dataclass
class SampleSource:
    """A sorted list of items ``(file, row)``: row -1 for an image file, else a row of an npz ``x``."""

    path: Path
    items: list = field(default_factory=list)
    files: list = field(default_factory=list)  # (relative name, size) for cache keys
    warnings: list = field(default_factory=list)

    def __len__(self):
        return len(self.items)


def list_samples(path, what: str = "sample") -> SampleSource:
    """Enumerate the images of a folder (image files and npz shards, hidden files skipped) or one file;
    ``what`` ("sample" or "reference") names the input in the errors."""
    path = Path(path)
    src = SampleSource(path)
    if path.is_file():
        paths = [path]
    elif path.is_dir():
        paths = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [Path(root) / f for f in files if not f.startswith(".")
                      and f.lower().endswith(_IMAGE_EXT + (".npz",))]
        paths.sort(key=lambda p: p.relative_to(path).as_posix())
    else:
        raise FileNotFoundError(f"no such {what} file or folder: {path}")
    for p in paths:
        if p.suffix.lower() == ".npz":
            n = _npz_rows(p)
            if n < 0:
                if p == path:
                    raise ValueError(f"{p} holds no 'x' array of images (a statistics file is only accepted as --ref)")
                continue
            src.items += [(str(p), i) for i in range(n)]
        elif p.suffix.lower() in _IMAGE_EXT:
            src.items.append((str(p), -1))
        else:
            raise ValueError(f"{p}: not an image or .npz file")
        src.files.append((p.relative_to(path).as_posix() if p != path else p.name, p.stat().st_size))
    if not src.items:
        raise ValueError(f"{path}: no images found (PNG/JPEG files or .npz shards with an 'x' array)")
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        try:
            man = json.loads(manifest.read_text())
            seeds = man.get("seeds") or man["config"].get("seeds") or {}
            want = seeds.get("count", 0)
            last = (man.get("runs") or [{}])[-1]
            if last.get("seeds") and "finished" not in last:  # a run was killed: it asked for these too
                want = max(want, last["seeds"]["count"])
            if len(src.items) < want:
                src.warnings.append(f"{path} is an incomplete generate run: {len(src.items)} of {want} samples "
                                    "(rerun the generate command to finish it)")
        except (ValueError, KeyError, TypeError):
            pass
    return src


def _to_nchw_uint8(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.uint8:
        if t.dim() == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
            t = t.permute(0, 3, 1, 2)
    else:
        from .images import to_uint8

        t = to_uint8(t.float().clamp(-1, 1))
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C in (1, 3), got shape {tuple(t.shape)}")
    return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t


def _read_image(path: str) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        raise RuntimeError("reading image files needs Pillow (pip install pillow)") from None
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class _Loader:
    """Loads batches of items; keeps the last npz shard in memory; decodes images in threads."""

    def __init__(self, threads: int = 4):
        self.cached = (None, None)
        self.threads = threads
        self.pool = None

    def load(self, items) -> torch.Tensor:
        out: list = [None] * len(items)
        img_idx = [i for i, (_f, r) in enumerate(items) if r < 0]
        if img_idx:
            if len(img_idx) > 8 and self.threads > 1:
                if self.pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self.pool = ThreadPoolExecutor(self.threads)
                imgs = list(self.pool.map(_read_image, [items[i][0] for i in img_idx]))
            else:
                imgs = [_read_image(items[i][0]) for i in img_idx]
            for i, im in zip(img_idx, imgs):
                out[i] = im
        for i, (f, r) in enumerate(items):
            if r >= 0:
                if self.cached[0] != f:
                    with np.load(f) as z:
                        self.cached = (f, _to_nchw_uint8(z["x"]))
                out[i] = self.cached[1][r]
        shapes = {tuple(t.shape) for t in out}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes in one batch: {sorted(shapes)}; FID needs one size")
        return torch.stack(out)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


# ------------------------------------------------------------------------------------ moments
class FeatureAccumulator:
    """Streaming float64 moments of features (+ the fixed KID subset), all-reduced over ranks.

    ``kid_keep``: sorted global indices whose features are kept for KID (None: keep none).
    """

    def __init__(self, dim: int, device, kid_keep: np.ndarray | None = None):
        self.dim, self.device = dim, torch.device(device)
        self.s = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.q = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        self.n = 0
        self.kid_keep = kid_keep
        self.kid = (torch.zeros(len(kid_keep), dim, dtype=torch.float64, device=self.device)
                    if kid_keep is not None else None)

    def add(self, feats: torch.Tensor, global_index: np.ndarray | None = None):
        f = feats.to(self.device, torch.float64)
        self.s += f.sum(0)
        self.q.addmm_(f.T, f)
        self.n += f.shape[0]
        if self.kid is not None and len(self.kid_keep):
            pos = np.searchsorted(self.kid_keep, global_index)
            pos_c = np.minimum(pos, len(self.kid_keep) - 1)
            hit = self.kid_keep[pos_c] == global_index
            if hit.any():
                self.kid[torch.as_tensor(pos_c[hit], device=self.device)] = f[torch.as_tensor(np.nonzero(hit)[0], device=self.device)]

    def result(self, ctx=None) -> dict:
        s, q, kid = self.s, self.q, self.kid
        n = self.n
        if ctx is not None and ctx.distributed:
            s, q = ctx.all_reduce_sum(s.clone()), ctx.all_reduce_sum(q.clone())
            (n,) = ctx.sum_ints(n)
            if kid is not None:
                kid = ctx.all_reduce_sum(kid.clone())
        if n < 2:
            raise ValueError(f"FID needs at least 2 images, got {n}")
        s, q = s.cpu().numpy(), q.cpu().numpy()
        mu = s / n
        sigma = (q - n * np.outer(mu, mu)) / (n - 1)
        sigma = (sigma + sigma.T) / 2
        return {"mu": mu, "sigma": sigma, "n": int(n),
                "kid_features": kid.cpu().numpy() if kid is not None else None}


def _kid_keep(n: int, max_features: int, seed: int) -> np.ndarray:
    if max_features <= 0:
        return np.zeros(0, dtype=np.int64)
    if n <= max_features:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, max_features, replace=False)).astype(np.int64)


def compute_statistics(source, extractor: Extractor, ctx=None, *, batch_size: int | None = None,
                       kid_max_features: int = 10000, seed: int = 2020, progress: bool = True) -> dict:
    """Moments (mu, sigma, n) and the KID feature subset of a sample source (path or SampleSource)."""
    src = source if isinstance(source, SampleSource) else list_samples(source)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    n = len(src.items)
    lo, hi = n * rank // world, n * (rank + 1) // world
    batch_size = batch_size or (200 if extractor.device.type == "cuda" else 64)
    acc = FeatureAccumulator(extractor.dim, extractor.device, _kid_keep(n, kid_max_features, seed))
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=hi - lo, desc=f"features {src.path.name}" + (f" (rank 0 of {world})" if world > 1 else ""),
                       unit="img", leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    loader = _Loader()
    try:
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            images = loader.load(src.items[start:stop])
            acc.add(extractor(images), np.arange(start, stop, dtype=np.int64))
            if bar is not None:
                bar.update(stop - start)
    finally:
        loader.close()
        if bar is not None:
            bar.close()
    out = acc.result(ctx)
    out["warnings"] = list(src.warnings)
    return out


# ------------------------------------------------------------------------------ the distances
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID of two sets of statistics, computed by torch-fidelity's own formula
    (``torch_fidelity.metric_fid.fid_statistics_to_metric``: ``|mu1 - mu2|^2 + tr(s1) + tr(s2) -
    2 sum sqrt(eig(s1 s2))``) on float64 statistics; ours only checks the shapes first."""
    _import_torch_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    value = float(fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)[KEY_METRIC_FID])
    # a squared distance: the square roots of the near-zero eigenvalues of s1 s2 (rank-deficient for
    # fewer samples than features) carry errors of about sqrt(machine eps) * |s| each, so equal
    # statistics can come out as -2e-8 (printed "-0.0000"); within that bound the value is 0 (a
    # clearly negative one, broken statistics, is kept)
    tol = mu1.size * np.sqrt(np.finfo(np.float64).eps) * (abs(np.trace(s1)) + abs(np.trace(s2))) + 1e-12
    if -tol < value < 0.0:
        value = 0.0
    return value


def kernel_inception_distance(f1, f2, *, subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> dict:
    """KID by torch-fidelity's estimator (``torch_fidelity.metric_kid.kid_features_to_metric``: mean and
    std over ``subsets`` subsets drawn with ``RandomState(seed)`` of the unbiased MMD^2 with the kernel
    ``(x.y / d + 1)^3``), in float64; the subset size is capped at the set sizes."""
    _import_torch_fidelity()
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(f1)} and {len(f2)}")
    out = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=int(subsets),
                                 kid_subset_size=int(m), rng_seed=int(seed), verbose=False)
    return {"kid_mean": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD]),
            "kid_subsets": int(subsets), "kid_subset_size": int(m)}


# ----------------------------------------------------------------------------- stats on disk
def save_statistics(path, stats: dict, meta: dict | None = None) -> Path:
    """Write mu, sigma, n (and kid_features when present) to an .npz, atomically."""
    from ._io import write_atomic

    arrays = {"mu": np.asarray(stats["mu"]), "sigma": np.asarray(stats["sigma"]), "n": np.asarray(stats["n"])}
    if stats.get("kid_features") is not None:
        kf = np.asarray(stats["kid_features"], dtype=np.float64)
        f32 = kf.astype(np.float32)
        # Inception features are float32: store them so (half the size) when that loses nothing
        arrays["kid_features"] = f32 if np.array_equal(f32.astype(np.float64), kf) else kf
    arrays["meta"] = np.asarray(json.dumps(meta or {}))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, buf.getvalue())


def load_statistics(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path} holds no 'mu'/'sigma' statistics")
        out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64),
               "n": int(z["n"]) if "n" in z else None,
               "kid_features": z["kid_features"].astype(np.float64) if "kid_features" in z else None,
               "meta": json.loads(str(z["meta"])) if "meta" in z else {}}
    return out


def _cache_dir(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psld_fast" / "fid"


def reference_statistics(reference, extractor: Extractor, ctx=None, *, cache_dir=None, batch_size=None,
                         kid_max_features: int = 10000, seed: int = 2020, progress: bool = True) -> tuple[dict, dict]:
    """Statistics of the reference: a stats .npz as it is, else computed from images and cached.

    Returns (stats, info) with info = {"source", "cached", "cache_file"}.
    """
    ref = Path(reference)
    if ref.is_file() and ref.suffix == ".npz" and _is_stats_npz(ref):
        st = load_statistics(ref)
        meta = st.get("meta") or {}
        info = {"source": "statistics file", "cached": False, "cache_file": None}
        ex_meta = meta.get("extractor")
        if ex_meta and (ex_meta.get("name"), ex_meta.get("feature")) != (extractor.name, extractor.feature):
            info["warning"] = (f"{ref} was computed with {ex_meta.get('name')}:{ex_meta.get('feature')}, "
                               f"the samples with {extractor.name}:{extractor.feature}")
        if st["mu"].shape[0] != extractor.dim:
            raise ValueError(f"{ref}: statistics of dimension {st['mu'].shape[0]}, the extractor gives {extractor.dim}")
        return st, info
    src = list_samples(ref, "reference")
    key_obj = {"path": str(ref.resolve()), "files": hashlib.sha256(json.dumps(src.files).encode()).hexdigest(),
               "n": len(src.items), "extractor": extractor.identity, "kid_max_features": kid_max_features,
               "seed": seed, "version": 1}
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()[:32]
    cache_file = _cache_dir(cache_dir) / f"ref-{ref.name}-{key}.npz"
    if cache_file.is_file():
        try:
            st = load_statistics(cache_file)
            if st.get("meta", {}).get("key") == key_obj:
                return st, {"source": "images", "cached": True, "cache_file": str(cache_file)}
        except (OSError, ValueError, KeyError):
            pass
    st = compute_statistics(src, extractor, ctx, batch_size=batch_size, kid_max_features=kid_max_features,
                            seed=seed, progress=progress)
    info = {"source": "images", "cached": False, "cache_file": str(cache_file)}
    if ctx is None or ctx.is_main:
        try:
            save_statistics(cache_file, st, {"key": key_obj, "extractor": extractor.identity})
        except OSError as exc:
            info["cache_file"] = None  # never report a cache that was not written
            info["warning"] = (f"the reference statistics were not cached ({cache_file.parent} is not writable: "
                               f"{exc.strerror or exc}); use --cache-dir to pick a writable folder")
    return st, info


# --------------------------------------------------------------------------------------- fid
def fid(samples, reference, *, inception_weights=None, extractor: str = INCEPTION, device=None,
        batch_size: int | None = None, kid: bool = True, kid_max_features: int = 10000, kid_subsets: int = 100,
        kid_subset_size: int = 1000, seed: int = 2020, cache_dir=None, save_stats=None,
        progress: bool = True) -> dict:
    """FID (and KID) of ``samples`` against ``reference`` (see the module docstring).

    Runs in one process or under torchrun (every rank gets the same result).  Returns a dict:
    fid, kid_mean, kid_std (None when KID is off or the reference holds no features), n, n_ref,
    extractor, feature, world_size, seconds, reference_cached, warnings.
    """
    from .distributed import setup

    t0 = time.perf_counter()
    for name, value, low in (("batch_size", batch_size, 1), ("kid_subsets", kid_subsets, 1),
                             ("kid_subset_size", kid_subset_size, 2), ("kid_max_features", kid_max_features, 2)):
        if value is None and name == "batch_size":
            continue
        if name != "batch_size" and not kid:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}"
                             + (" (--" + name.replace("_", "-") + ")"))
    for path, what in ((samples, "sample"), (reference, "reference")):  # before the extractor is built
        if not isinstance(path, SampleSource) and not Path(path).exists():
            raise FileNotFoundError(f"no such {what} file or folder: {path}")
    source = samples if isinstance(samples, SampleSource) else list_samples(samples)  # unreadable shards: now
    if Path(reference).is_file() and Path(reference).suffix == ".npz":
        _is_stats_npz(Path(reference))
    ctx = setup(device)
    try:
        ex = make_extractor(extractor, weights=inception_weights, device=ctx.device)
        warnings = []
        if extractor != INCEPTION:
            warnings.append(f"features from {extractor!r}, not Inception-v3: the numbers are not comparable "
                            "with published FID/KID")
        kmax = kid_max_features if kid else 0
        ref, ref_info = reference_statistics(reference, ex, ctx, cache_dir=cache_dir, batch_size=batch_size,
                                             kid_max_features=kmax, seed=seed, progress=progress)
        if ref_info.get("warning"):
            warnings.append(ref_info["warning"])
        st = compute_statistics(source, ex, ctx, batch_size=batch_size, kid_max_features=kmax, seed=seed,
                                progress=progress)
        warnings += st.pop("warnings", [])
        if save_stats is not None and ctx.is_main:
            save_statistics(save_stats, st, {"extractor": ex.identity, "samples": str(samples)})
        result = None
        if ctx.is_main:  # the matrix square root once, then share
            result = {"fid": frechet_distance(st["mu"], st["sigma"], ref["mu"], ref["sigma"])}
            if not kid:
                result["kid_note"] = "disabled"
            elif ref.get("kid_features") is None or len(ref["kid_features"]) < 2:
                result["kid_note"] = "the reference statistics hold no features"
            elif st["kid_features"] is None or len(st["kid_features"]) < 2:
                result["kid_note"] = "fewer than 2 sample features"
            else:
                result.update(kernel_inception_distance(st["kid_features"], ref["kid_features"],
                                                        subsets=kid_subsets, subset_size=kid_subset_size, seed=seed))
                result["kid_n"], result["kid_n_ref"] = len(st["kid_features"]), len(ref["kid_features"])
        result = ctx.broadcast_object(result)
    finally:
        ctx.close()
    result.setdefault("kid_mean", None)
    result.setdefault("kid_std", None)
    result.update({"n": st["n"], "n_ref": ref.get("n"), "extractor": ex.name, "feature": ex.feature,
                   "samples": str(samples), "reference": str(reference), "reference_cached": ref_info["cached"],
                   "reference_cache_file": ref_info["cache_file"], "world_size": ctx.world_size,
                   "seconds": time.perf_counter() - t0, "warnings": warnings})
    return result
