"""Argument helpers shared by the command-line modules (:mod:`psld_fast.cli`,
:mod:`psld_fast.cli_generate`, :mod:`psld_fast.cli_train`): seed lists, the model / sampler /
device / threads options, and the checks that turn everyday mistakes into one-line errors before
any expensive work starts.  It imports none of the CLI modules (the import graph is a DAG).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from ._io import check_writable_dir, check_writable_file  # noqa: F401  (re-exported: used by the CLI modules)
from .guards import default_threads

__all__ = ["OneLineParser", "DTYPES", "SeedList", "parse_seeds", "MAX_SEEDS", "INT64_MIN", "INT64_MAX", "add_model_args",
           "add_sampler_args", "add_threads_arg", "apply_threads", "default_threads", "load_model",
           "resolve_device", "check_backend", "format_rate", "sampler_kwargs", "check_writable_file", "check_writable_dir", "join_negative_seeds",
           "parse_int_list", "parse_float_list"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
#: Most seeds one command line may name (a list of that many ints takes ~0.5 GB in Python).
MAX_SEEDS = 10_000_000


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit code 2), not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class SeedList:
    """Seeds given as inclusive ranges, kept as ranges (never expanded while parsing).

    Behaves like the list of seeds: ``len``, iteration, indexing, ``==`` with a list; ``tolist()``
    expands it."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = [(int(a), int(b)) for a, b in ranges]
        self._len = sum(b - a + 1 for a, b in self.ranges)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        for a, b in self.ranges:
            yield from range(a, b + 1)

    def __getitem__(self, i):
        return self.tolist()[i]

    def tolist(self) -> list[int]:
        return list(iter(self))

    def __eq__(self, other):
        if isinstance(other, SeedList):
            return self.ranges == other.ranges
        try:
            return self.tolist() == list(other)
        except TypeError:
            return NotImplemented

    def __repr__(self) -> str:
        return "SeedList(" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ranges) + ")"

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        return np.fromiter(iter(self), dtype=np.int64, count=len(self)).astype(dtype or np.int64, copy=False)


_SEED_PART = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


def parse_seeds(text: str) -> SeedList:
    """'0-63', '5', '1,4,9', '0-9,100-109' or '-5--2' -> :class:`SeedList` (ranges inclusive).

    Every seed must lie in the int64 range; at most :data:`MAX_SEEDS` seeds.  Negative seeds are
    valid seeds; a seed named twice gives the same sample twice."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = _SEED_PART.match(part)
        if m is None:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: use e.g. 0-63, 1,5,9 or -5--2")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        for v in (lo, hi):
            if not INT64_MIN <= v <= INT64_MAX:
                raise argparse.ArgumentTypeError(
                    f"seed {v} is outside the int64 range [-2**63, 2**63-1] (= [{INT64_MIN}, {INT64_MAX}])")
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: range {lo}-{hi} ends before it starts")
        ranges.append((lo, hi))
    if not ranges:
        raise argparse.ArgumentTypeError("empty seed list")
    seeds = SeedList(ranges)
    if len(seeds) > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"--seeds {text}: {len(seeds)} seeds is more than one run takes "
                                         f"(at most {MAX_SEEDS:,}); split the range over several runs")
    return seeds


def parse_int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """``--nfes 20,50,100`` -> [20, 50, 100]; ValueError naming ``flag`` for an empty list, a word or a
    value below ``minimum``."""
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    if not parts:
        raise ValueError(f"{flag} {text!r}: give a comma-separated list of integers, e.g. 20,50,100")
    out = []
    for t in parts:
        try:
            v = int(t)
        except ValueError:
            raise ValueError(f"{flag} {text}: {t!r} is not an integer") from None
        if v < minimum:
            raise ValueError(f"{flag} {text}: {v} is below the smallest allowed value {minimum}")
        out.append(v)
    return out


def parse_float_list(text: str, flag: str, minimum: float = 0.0, default_words=("default", "none")) -> list:
    """``--lambdas 0.5,1,default`` -> [0.5, 1.0, None]; ValueError naming ``flag`` otherwise."""
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    if not parts:
        raise ValueError(f"{flag} {text!r}: give a comma-separated list of numbers (or 'default')")
    out = []
    for t in parts:
        if t.lower() in default_words:
            out.append(None)
            continue
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"{flag} {text}: {t!r} is not a number (or 'default')") from None
        if not v >= minimum or v != v or v in (float("inf"),):
            raise ValueError(f"{flag} {text}: {t} is not a finite number >= {minimum:g}")
        out.append(v)
    return out


def join_negative_seeds(argv: list[str]) -> list[str]:
    """``--seeds -5--2`` -> ``--seeds=-5--2`` (argparse would take '-5--2' for an option)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--seeds" and i + 1 < len(argv) and argv[i + 1].startswith("-") and \
                re.fullmatch(r"[-\d,\s]+", argv[i + 1]):
            out.append(f"--seeds={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


# --------------------------------------------------------------------------------------- threads
def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores not busy with other work, from the load "
                        "average; on a loaded machine more threads than free cores run many times slower)")


def apply_threads(args) -> None:
    """Set torch's CPU threads from ``--threads`` or :func:`default_threads` (env OMP_NUM_THREADS wins
    over the default)."""
    n = getattr(args, "threads", None)
    if n is not None and n < 1:
        raise ValueError(f"--threads {n}: give an integer >= 1")
    if n is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        n = default_threads()
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------- model/sampler
def add_model_args(p: argparse.ArgumentParser):
    from .learned import LEARNED
    from .models import PRESETS

    g = p.add_argument_group("model")
    g.add_argument("--model", default="digits", choices=sorted(PRESETS) + [f"learned-{k}" for k in LEARNED],
                   help="embedded model (default: digits). Analytic: " +
                        "; ".join(f"{k}: {v[1]}" for k, v in PRESETS.items()) +
                        ". Learned (small networks trained with psld-fast train): " +
                        ", ".join(f"learned-{k}" for k in LEARNED))
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="a PSLD checkpoint to sample from instead: an official PSLD Lightning .ckpt "
                        "(NCSN++) or one written by psld-fast train")
    g.add_argument("--diffusers", type=Path, default=None, metavar="DIR",
                   help="sample a diffusers UNet2DModel through the exact PSLD lift: a local save_pretrained "
                        "folder (the UNet's config.json and weights, or a pipeline folder with unet/ and "
                        "scheduler/); nothing is downloaded. Needs diffusers (psld-fast[diffusers])")
    g.add_argument("--denoiser", default=None, metavar="MODULE:FACTORY",
                   help="sample your own denoiser through the lift: FACTORY() in MODULE (a module name or a "
                        ".py file) returns a psld_fast.DenoiserModel, or (denoiser, dict(shape=..., "
                        "sigma_min=..., sigma_max=...)) with denoiser(x, sigma, **kw) -> x0 (k-diffusion convention)")
    g.add_argument("--class-label", type=int, default=None,
                   help="class label for a class-conditional --diffusers/--denoiser model (its class_labels argument)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (with --class-label and --null-label): D_u + s (D_c - D_u)")
    g.add_argument("--null-label", type=int, default=None,
                   help="the unconditional class label of a model trained for classifier-free guidance")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="state dtype")
    g.add_argument("--backend", default=None, choices=["auto", "reference", "cpu", "cuda", "triton"],
                   help="fused-step implementation (default: $PSLD_FAST_BACKEND, else auto)")
    add_threads_arg(p)


def add_sampler_args(p: argparse.ArgumentParser, single=True):
    from .multistep import MS_VARIABLES
    from .samplers import ALL_SAMPLERS, COUPLINGS, LAMBDA_FORMS, LAMBDA_READINGS, NET_TIMES, SPLITS

    g = p.add_argument_group("sampler")
    if single:
        g.add_argument("--sampler", default="reduced_oba", choices=ALL_SAMPLERS)
        g.add_argument("--nfe", type=int, default=50, help="network evaluations per sample, incl. the final denoising step")
    g.add_argument("--lambda-s", type=float, default=None, help="x-noise scale lambda_s (default 1)")
    g.add_argument("--lambda-reading", default=None, choices=LAMBDA_READINGS,
                   help="marginal: x-score factor 1 + lx^2 (marginal-preserving); noise: only the noise is scaled "
                        "(default: per sampler)")
    g.add_argument("--lambda-form", default="std", choices=LAMBDA_FORMS,
                   help="lambda_s scales the x-noise std (std) or its variance (var)")
    g.add_argument("--net-time", default=None, choices=NET_TIMES,
                   help="time conditioning of calls after O (default: per sampler)")
    g.add_argument("--schedule", default="quadratic", help="uniform | quadratic | cubic | logsnr | power:<p>")
    g.add_argument("--split", default=None, choices=SPLITS,
                   help="additive: O only adds noise (spec's reading); ou: O is the exact friction+noise step "
                        "(default: per sampler, see docs/readings_protocol.md)")
    g.add_argument("--coupling", default=None, choices=COUPLINGS,
                   help="reduced samplers: one call serves B then A with the updated state (sequential) or "
                        "both from the call's state (joint) (default: per sampler)")
    g.add_argument("--ci-lambda", type=float, default=None,
                   help="lambda of the conjugate samplers ci_ddim, ci_ddim2, csps_d (default: per sampler; "
                        "stable for 0 <= lambda <= 2/d_max, 1/d_max for ci_ddim2)")
    g.add_argument("--ms-variable", default=None, choices=MS_VARIABLES,
                   help="multistep samplers ei_2m, ei_2m_sde: the variable the data estimate is extrapolated in "
                        "(default: per sampler, see docs/multistep_protocol.md)")
    g.add_argument("--no-denoise", action="store_true", help="skip the final denoising step")


def external_source(args) -> dict | None:
    """The --diffusers / --denoiser source of the model (for labels and manifests), else None."""
    if getattr(args, "diffusers", None) is not None:
        src = {"diffusers": str(Path(args.diffusers).resolve())}
    elif getattr(args, "denoiser", None) is not None:
        src = {"denoiser": args.denoiser}
    else:
        return None
    for k in ("class_label", "guidance", "null_label"):
        if getattr(args, k, None) is not None:
            src[k] = getattr(args, k)
    return src


def model_label(args) -> str:
    """The model's name in the CLI's output lines."""
    if getattr(args, "diffusers", None) is not None:
        return Path(args.diffusers).name
    if getattr(args, "denoiser", None) is not None:
        return args.denoiser
    return args.checkpoint.stem if args.checkpoint else args.model


def load_model(args):
    diffusers_dir, factory = getattr(args, "diffusers", None), getattr(args, "denoiser", None)
    if sum(x is not None for x in (diffusers_dir, factory, args.checkpoint)) > 1:
        raise ValueError("give one of --checkpoint, --diffusers and --denoiser")
    if diffusers_dir is not None or factory is not None:
        from .lift import DenoiserModel, load_diffusers, load_denoiser_factory, with_class_label

        model = load_diffusers(diffusers_dir) if diffusers_dir is not None else load_denoiser_factory(factory)
        return with_class_label(model, args.class_label, args.guidance, args.null_label)
    if getattr(args, "class_label", None) is not None or getattr(args, "guidance", None) is not None:
        raise ValueError("--class-label and --guidance apply to --diffusers and --denoiser models")
    if args.checkpoint is not None:
        from .learned import load_checkpoint_any

        return load_checkpoint_any(args.checkpoint, api_hint=False)
    if args.model.startswith("learned-"):
        from .learned import load_learned

        return load_learned(args.model[len("learned-"):])
    from .models import get_preset

    return get_preset(args.model)


def resolve_device(text: str | None) -> torch.device:
    """``--device`` (default: cuda if available, else cpu), checked: ValueError with the fix."""
    if not text:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text}: not a device name; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available here (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: unsupported device type; use cpu or cuda")
    return device


def format_rate(per_second: float) -> str:
    """A rate for the speed lines: one decimal from 1/s up, else three significant digits (never
    "0.0" for a slow run)."""
    return f"{per_second:.1f}" if per_second >= 1 else f"{per_second:.3g}"


def check_backend(args) -> None:
    """``--backend`` (or ``$PSLD_FAST_BACKEND``) checked against the device and dtype before anything
    is loaded: ValueError saying why it cannot run and what to do."""
    from .ops import ENV_BACKEND, unavailable_reason

    name, flag = args.backend, f"--backend {args.backend}"
    if name is None:
        name = os.environ.get(ENV_BACKEND) or "auto"
        flag = f"{ENV_BACKEND}={name}"
    why = unavailable_reason(name, resolve_device(getattr(args, "device", None)), DTYPES.get(getattr(args, "dtype", None)))
    if why is not None:
        raise ValueError(f"{flag}: {why}")


def sampler_kwargs(args) -> dict:
    kw = dict(lambda_s=args.lambda_s, lambda_reading=args.lambda_reading, net_time=args.net_time,
              schedule=args.schedule, denoise=not args.no_denoise, split=args.split, coupling=args.coupling,
              lambda_form=args.lambda_form)
    if getattr(args, "ci_lambda", None) is not None:  # only the conjugate samplers take it
        kw["ci_lambda"] = args.ci_lambda
    if getattr(args, "ms_variable", None) is not None:  # only the multistep samplers take it
        kw["ms_variable"] = args.ms_variable
    return kw
