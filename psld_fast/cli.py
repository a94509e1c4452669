"""Command line: ``psld-fast sample | compare | info`` (also ``python -m psld_fast``).

``psld-fast sample`` with no arguments is the main job: 64 handwritten digits from the embedded
analytic digits model with Reduced OBA at 50 NFE, a PNG grid, and a quality figure (sliced
Wasserstein distance to exact draws from the data law, with a bootstrap confidence interval).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .api import sample
from .learned import LEARNED
from .models import PRESETS, GaussianMixture, get_preset
from .samplers import ALL_SAMPLERS, LAMBDA_READINGS, NET_TIMES, SAMPLER_SPECS, SPLITS

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_seeds(text: str) -> list[int]:
    """'0-63', '5', '1,4,9' or '0-9,100-109' -> list of ints (ranges inclusive)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                seeds.extend(range(lo_i, hi_i + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: use e.g. 0-63 or 1,5,9") from None
    if not seeds:
        raise argparse.ArgumentTypeError("empty seed list")
    return seeds


def _add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="digits", choices=sorted(PRESETS) + [f"learned-{k}" for k in LEARNED],
                   help="embedded model (default: digits). Analytic: " +
                        "; ".join(f"{k}: {v[1]}" for k, v in PRESETS.items()) +
                        ". Learned (small networks trained with psld-fast train): " +
                        ", ".join(f"learned-{k}" for k in LEARNED))
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="a PSLD checkpoint to sample from instead: an official PSLD Lightning .ckpt "
                        "(NCSN++) or one written by psld-fast train")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="state dtype")
    g.add_argument("--backend", default=None, choices=["auto", "reference", "cpu", "cuda", "triton"],
                   help="fused-step implementation (default: $PSLD_FAST_BACKEND, else auto)")


def _add_sampler_args(p: argparse.ArgumentParser, single=True):
    g = p.add_argument_group("sampler")
    if single:
        g.add_argument("--sampler", default="reduced_oba", choices=ALL_SAMPLERS)
        g.add_argument("--nfe", type=int, default=50, help="network evaluations per sample, incl. the final denoising step")
    g.add_argument("--lambda-s", type=float, default=None, help="x-noise scale lambda_s (default 1)")
    g.add_argument("--lambda-reading", default="marginal", choices=LAMBDA_READINGS)
    g.add_argument("--net-time", default=None, choices=NET_TIMES,
                   help="time conditioning of calls after O (default: per sampler)")
    g.add_argument("--schedule", default="quadratic", help="uniform | quadratic | cubic | logsnr | power:<p>")
    g.add_argument("--split", default=None, choices=SPLITS,
                   help="additive: O only adds noise (spec's reading); ou: O is the exact friction+noise step "
                        "(default: ou for the reduced samplers, additive for the naive ones)")
    g.add_argument("--no-denoise", action="store_true", help="skip the final denoising step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psld-fast",
        description="Fast stochastic sampling of PSLD diffusion models (reduced splitting integrators on fused kernels).",
        epilog="Run 'psld-fast sample' with no arguments for the embedded default: 64 digits, Reduced OBA, 50 NFE.")
    parser.add_argument("--version", action="version", version=f"psld-fast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and fallbacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sample", help="draw samples, write a PNG grid, print speed and quality",
                       description="Draw samples and write a PNG grid (image models) or an .npz.")
    _add_model_args(p)
    _add_sampler_args(p)
    p.add_argument("-n", "--num-samples", type=int, default=64)
    p.add_argument("--seeds", type=parse_seeds, default=None, help="per-sample seeds, e.g. 0-63 (default 0..n-1)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="output file (.png grid or .npz; default samples/<model>_<sampler>.png)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-quality", action="store_true", help="skip the quality figure")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="run the network through torch.compile (MODE default: 'default'); the one-off "
                        "compile time is printed separately")

    p = sub.add_parser("compare", help="sampler x NFE table of the quality figure (analytic or shipped learned model)",
                       description="Quality (sliced Wasserstein to the exact data law, 95%% CI) per sampler and NFE.")
    _add_model_args(p)
    _add_sampler_args(p, single=False)
    p.add_argument("--samplers", default="em,sscs,naive_oba,reduced_oba,reduced_obab,reduced_baoab",
                   help="comma-separated sampler names")
    p.add_argument("--nfes", default="20,50,100", help="comma-separated NFE budgets")
    p.add_argument("-n", "--num-samples", type=int, default=512)

    sub.add_parser("info", help="versions, devices and available backends")
    try:  # training of small models lives in its own module
        from .cli_train import register as register_train
    except ImportError:
        register_train = None
    if register_train is not None:
        register_train(sub)
    try:  # large-scale generation, FID and sweeps live in their own module
        from .cli_generate import register
    except ImportError:
        register = None
    if register is not None:
        register(sub)
    return parser


def _load_model(args):
    if args.checkpoint is not None:
        from .learned import load_checkpoint_any

        return load_checkpoint_any(args.checkpoint)
    if args.model.startswith("learned-"):
        from .learned import load_learned

        return load_learned(args.model[len("learned-"):])
    return get_preset(args.model)


def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sampler_kwargs(args) -> dict:
    return dict(lambda_s=args.lambda_s, lambda_reading=args.lambda_reading, net_time=args.net_time,
                schedule=args.schedule, denoise=not args.no_denoise, split=args.split)


def _reference_law(model, name: str | None):
    """The exact data law a model's samples are scored against: the analytic model itself, or for a
    shipped learned model the law it was trained on (ring2d: the exact mixture; digits: the real
    digits, an empirical law)."""
    if isinstance(model, GaussianMixture):
        return model
    if name == "learned-ring2d":
        return get_preset("ring2d")
    return None


def _quality(model, x: torch.Tensor, seed: int = 0, name: str | None = None) -> dict | None:
    from .metrics import sliced_wasserstein_ci

    if name == "learned-digits":
        from .datasets import load_digits

        q = sliced_wasserstein_ci(x.double().cpu(), load_digits(size=x.shape[-1])[0], seed=seed)
        q["reference"] = "the 1797 training digits"
        return q
    law = _reference_law(model, name)
    if law is None:
        return None
    model = law
    ref = model.cpu().sample_data(max(len(x), 1024), generator=torch.Generator().manual_seed(seed + 12345))
    q = sliced_wasserstein_ci(x.double().cpu(), ref, seed=seed)
    q["reference"] = "the exact data law"
    if model.num_components == 1 and len(x) >= 2:  # one Gaussian: W2 of the sample moments vs the exact ones
        from .metrics import gaussian_w2_diag

        mean, var = model.data_moments()
        q["gaussian_w2"] = gaussian_w2_diag(x.double().cpu(), mean.reshape(-1), var.reshape(-1))
    return q


def cmd_sample(args) -> int:
    device = _device(args)
    model = _load_model(args).to(device)
    n = len(args.seeds) if args.seeds is not None else args.num_samples
    t0 = time.perf_counter()
    res = sample(model, n, sampler=args.sampler, nfe=args.nfe, seeds=args.seeds, backend=args.backend,
                 dtype=_DTYPES[args.dtype], device=device, batch_size=args.batch_size,
                 progress=not args.no_progress, compile=args.compile or False, **_sampler_kwargs(args))
    wall = time.perf_counter() - t0
    name = args.checkpoint.stem if args.checkpoint else args.model
    out = args.out or Path("samples") / f"{name}_{args.sampler}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png" and res.x.dim() == 4:
        from .images import save_grid

        save_grid(res.x.float().cpu(), out)
    else:
        import numpy as np

        out = out.with_suffix(".npz")
        np.savez(out, x=res.x.float().cpu().numpy(), seeds=res.seeds.numpy())
    print(f"model      {name} {tuple(model.shape)}  device {device}  backend {res.backend}  dtype {args.dtype}")
    info = res.program_info
    print(f"sampler    {args.sampler}  NFE {res.nfe}  schedule {args.schedule}  lambda_s {info['lambda_s']:g}"
          f"  net_time {info['net_time']}  split {info['split']}")
    print(f"samples    {n}  wall {wall:.2f} s  ({res.samples_per_second:.1f} samples/s, "
          f"{1e3 * res.timings['sampling'] / max(res.nfe, 1):.2f} ms per NFE)")
    if "net_compile" in res.timings:
        print(f"compile    torch.compile(mode={args.compile!r}) of the network: "
              f"{res.timings['net_compile']:.1f} s (once per network and batch shape; not in samples/s)")
    if not args.no_quality:
        q = _quality(model, res.x, name=None if args.checkpoint else args.model)
        if q is not None:
            print(f"quality    sliced W2 to {q['reference']}: {q['value']:.4f} "
                  f"(95% CI {q['lo']:.4f} - {q['hi']:.4f}, n={q['n']})")
            if "gaussian_w2" in q:
                print(f"quality    Gaussian W2 of the sample moments to the exact moments: {q['gaussian_w2']:.4f}")
    print(f"wrote      {out}")
    return 0


def cmd_compare(args) -> int:
    device = _device(args)
    model = _load_model(args).to(device)
    name = None if args.checkpoint else args.model
    if _reference_law(model, name) is None and name != "learned-digits":
        print("compare needs a model with a known data law (an analytic preset or a shipped learned model)",
              file=sys.stderr)
        return 2
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    nfes = [int(v) for v in args.nfes.split(",")]
    for s in samplers:
        if s not in SAMPLER_SPECS:
            print(f"unknown sampler {s!r}; choose from {', '.join(ALL_SAMPLERS)}", file=sys.stderr)
            return 2
    print(f"model {args.model} {tuple(model.shape)}, {args.num_samples} samples per cell, "
          f"sliced W2 to the exact data law (95% CI)")
    print(f"{'sampler':14s} " + " ".join(f"{'NFE ' + str(v):>24s}" for v in nfes))
    for s in samplers:
        cells = []
        for nfe in nfes:
            try:
                res = sample(model, args.num_samples, sampler=s, nfe=nfe, backend=args.backend,
                             dtype=_DTYPES[args.dtype], device=device, progress=False, **_sampler_kwargs(args))
                q = _quality(model, res.x, name=name)
                cells.append(f"{q['value']:.4f} [{q['lo']:.4f},{q['hi']:.4f}]")
            except (ValueError, FloatingPointError) as exc:
                cells.append("diverged" if isinstance(exc, FloatingPointError) else "n/a")
        print(f"{s:14s} " + " ".join(f"{c:>24s}" for c in cells), flush=True)
    return 0


def cmd_info(args) -> int:
    from . import ops

    print(f"psld-fast {__version__}  torch {torch.__version__}  python {sys.version.split()[0]}")
    print(f"cuda available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    print(f"compiled CPU kernel: {ops.HAS_CPU_KERNEL}  CUDA kernel: {ops.HAS_CUDA_KERNEL}  triton: {ops.has_triton()}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"auto backend on {dev}: {ops.resolve_backend('auto', torch.device(dev))}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        handler = getattr(args, "func", None) or {"sample": cmd_sample, "compare": cmd_compare,
                                                  "info": cmd_info}[args.command]
        return handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"psld-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
