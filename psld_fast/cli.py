"""Command line: ``psld-fast sample | compare | tune | info`` (also ``python -m psld_fast``).

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
from .cli_common import DTYPES as _DTYPES
from .cli_common import (OneLineParser, add_model_args, add_sampler_args, add_threads_arg, apply_threads, check_backend, check_writable_file, format_rate,
                         join_negative_seeds, load_model, parse_int_list, parse_seeds, resolve_device, sampler_kwargs,
                         external_source, model_label)
from .guards import MAX_NFE
from .models import GaussianMixture, get_preset
from .samplers import ALL_SAMPLERS, SAMPLER_SPECS, steps_for_nfe

__all__ = ["main", "build_parser", "parse_seeds"]

#: what ``sample --out`` can write
SAMPLE_SUFFIXES = (".png", ".npz")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="psld-fast",
        description="Fast stochastic sampling of PSLD diffusion models (reduced splitting integrators on fused kernels).",
        epilog="Run 'psld-fast sample' with no arguments for the embedded default: 64 digits, Reduced OBA, 50 NFE.")
    parser.add_argument("--version", action="version", version=f"psld-fast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and fallbacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sample", help="draw samples, write a PNG grid, print speed and quality",
                       description="Draw samples and write a PNG grid (image models) or an .npz.")
    add_model_args(p)
    add_sampler_args(p)
    p.add_argument("-n", "--num-samples", type=int, default=None, help="number of samples (default 64)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="per-sample seeds, e.g. 0-63 or -5--2 (default 0..n-1); any int64, negative ones included; "
                        "a seed named twice gives the same sample twice")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="output file: .png (a grid, image models) or .npz (x, seeds); default samples/<model>_<sampler>.png")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-quality", action="store_true", help="skip the quality figure")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="run the network through torch.compile (MODE default: 'default'); the one-off "
                        "compile time is printed separately")

    p = sub.add_parser("compare", help="sampler x NFE table of the quality figure (analytic or shipped learned model)",
                       description="Quality (sliced Wasserstein to the exact data law, or to the training digits for learned-digits; 95% CI) per sampler and NFE.")
    add_model_args(p)
    add_sampler_args(p, single=False)
    p.add_argument("--samplers", default="em,sscs,naive_oba,reduced_oba,reduced_obab,reduced_baoab",
                   help="comma-separated sampler names")
    p.add_argument("--nfes", default="20,50,100", help="comma-separated NFE budgets")
    p.add_argument("-n", "--num-samples", type=int, default=512)

    from .tune import DEFAULT_SAMPLERS as _TUNE_SAMPLERS

    p = sub.add_parser("tune", help="pick the sampler and lambda_s for a model at an NFE budget",
                       description="Successive halving over candidate (sampler, lambda_s) cells at --nfe, scored by "
                                   "sliced W2 to a high-NFE reference set of the same model (disjoint seeds); prints "
                                   "every round, the winner and the cost (psld_fast.tune).")
    add_model_args(p)
    p.add_argument("--nfe", type=int, required=True, help="the network-evaluation budget to tune for")
    p.add_argument("--samplers", default=",".join(_TUNE_SAMPLERS), help="comma-separated candidate samplers")
    p.add_argument("--lambdas", default="default,0.25,0.5,1",
                   help="lambda_s values for the stochastic samplers that take it ('default': the sampler's own)")
    p.add_argument("-n", "--n0", type=int, default=128, help="samples per candidate in the first round (x eta per round)")
    p.add_argument("--eta", type=int, default=2, help="keep the best 1/eta of the candidates each round")
    p.add_argument("--rounds", type=int, default=4, help="at most this many rounds")
    p.add_argument("--reference-sampler", default="ei_2m", choices=ALL_SAMPLERS)
    p.add_argument("--reference-nfe", type=int, default=400)
    p.add_argument("--reference-n", type=int, default=None, help="reference samples (default: the last round's count, >= 512)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tune)

    add_threads_arg(sub.add_parser("info", help="versions, devices and available backends"))
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
    for p in sub.choices.values():  # -v also after the subcommand (psld-fast sample -v)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log backend choices and fallbacks")
    return parser


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


def _sample_out(args, model, name: str) -> Path:
    """The file ``sample`` writes, checked before any sampling: a known suffix, a writable place."""
    is_image = len(model.shape) == 3 and model.shape[0] in (1, 3)
    out = args.out or Path("samples") / f"{name}_{args.sampler}.{'png' if is_image else 'npz'}"
    check_writable_file(out, SAMPLE_SUFFIXES, what="--out")
    if out.suffix.lower() == ".png" and not is_image:
        raise ValueError(f"--out {out}: this model's samples have shape {tuple(model.shape)}, not images; "
                         "write them to a .npz file")
    return out


def cmd_sample(args) -> int:
    device = resolve_device(args.device)
    if args.seeds is not None and args.num_samples is not None and args.num_samples != len(args.seeds):
        raise ValueError(f"-n {args.num_samples} and --seeds ({len(args.seeds)} seeds) disagree; give one of them")
    n = len(args.seeds) if args.seeds is not None else (args.num_samples if args.num_samples is not None else 64)
    if args.out is not None:  # suffix and place before the model is loaded (a checkpoint can take a while)
        check_writable_file(args.out, SAMPLE_SUFFIXES, what="--out")
    model = load_model(args).to(device)
    name = model_label(args)
    out = _sample_out(args, model, name)
    t0 = time.perf_counter()
    res = sample(model, n, sampler=args.sampler, nfe=args.nfe,
                 seeds=None if args.seeds is None else args.seeds.tolist(), backend=args.backend,
                 dtype=_DTYPES[args.dtype], device=device, batch_size=args.batch_size,
                 progress=not args.no_progress, compile=args.compile or False, **sampler_kwargs(args))
    wall = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        from .images import save_grid

        save_grid(res.x.float().cpu(), out)
    else:
        import io

        import numpy as np

        from ._io import write_atomic

        buf = io.BytesIO()
        np.savez(buf, x=res.x.float().cpu().numpy(), seeds=res.seeds.numpy())
        write_atomic(out, buf.getvalue())
    print(f"model      {name} {tuple(model.shape)}  device {device}  backend {res.backend}  dtype {args.dtype}")
    info = res.program_info
    print(f"sampler    {args.sampler}  NFE {res.nfe}  schedule {args.schedule}  lambda_s {info['lambda_s']:g}"
          f"  net_time {info['net_time']}  split {info['split']}  coupling {info['coupling']}"
          + (f"  ci_lambda {info['ci_lambda']:g}" if info.get("ci_lambda") is not None else "")
          + (f"  ms_variable {info['ms_variable']}" if info.get("ms_variable") is not None else ""))
    print(f"samples    {n}  wall {wall:.2f} s  (sampling {res.timings['sampling']:.2f} s: "  # one timing for both rates
          f"{format_rate(res.samples_per_second)} samples/s, "
          f"{1e3 * res.timings['sampling'] / max(res.nfe, 1):.2f} ms per NFE)")
    if "net_compile" in res.timings:
        print(f"compile    torch.compile(mode={args.compile!r}) of the network: "
              f"{res.timings['net_compile']:.1f} s (once per network and batch shape; not in samples/s)")
    if not args.no_quality:
        q = _quality(model, res.x, name=None if args.checkpoint or external_source(args) else args.model)
        if q is not None:
            print(f"quality    sliced W2 to {q['reference']}: {q['value']:.4f} "
                  f"(95% CI {q['lo']:.4f} - {q['hi']:.4f}, n={q['n']})")
            if "gaussian_w2" in q:
                print(f"quality    Gaussian W2 of the sample moments to the exact moments: {q['gaussian_w2']:.4f}")
    print(f"wrote      {out}")
    return 0


def cmd_compare(args) -> int:
    device = resolve_device(args.device)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    nfes = parse_int_list(args.nfes, "--nfes")
    if not samplers:
        raise ValueError(f"--samplers {args.samplers!r}: give a comma-separated list, e.g. em,reduced_oba")
    if args.num_samples < 2:
        raise ValueError(f"-n {args.num_samples}: the quality figure needs at least 2 samples per cell")
    for s in samplers:
        if s not in SAMPLER_SPECS:
            raise ValueError(f"--samplers: unknown sampler {s!r}; choose from {', '.join(ALL_SAMPLERS)}")
        for nfe in nfes:  # every cell's budget, before the first cell is sampled
            try:
                steps_for_nfe(s, nfe, not args.no_denoise)
            except ValueError as exc:
                raise ValueError(f"--nfes {args.nfes}: {exc}") from None
    if max(nfes) > MAX_NFE:
        raise ValueError(f"--nfes {args.nfes}: {max(nfes)} is above the limit of {MAX_NFE} network evaluations per sample")
    if args.checkpoint is not None or external_source(args) is not None:  # before the model is read
        raise ValueError("compare needs a model with a known data law (an analytic preset or a shipped learned "
                         "model), not a checkpoint, --diffusers or --denoiser model")
    model = load_model(args).to(device)
    name = args.model
    if _reference_law(model, name) is None and name != "learned-digits":
        raise ValueError(f"compare needs a model with a known data law; {name} has none")
    reference = "the 1797 training digits" if name == "learned-digits" else "the exact data law"
    print(f"model {model_label(args)} {tuple(model.shape)}, {args.num_samples} samples per cell, "
          f"sliced W2 to {reference} (95% CI)")
    print(f"{'sampler':14s} " + " ".join(f"{'NFE ' + str(v):>24s}" for v in nfes))
    notes, noted = [], set()
    for s in samplers:
        cells = []
        for nfe in nfes:
            try:
                res = sample(model, args.num_samples, sampler=s, nfe=nfe, backend=args.backend,
                             dtype=_DTYPES[args.dtype], device=device, progress=False, **sampler_kwargs(args))
                q = _quality(model, res.x, name=name)
                cells.append(f"{q['value']:.4f} [{q['lo']:.4f},{q['hi']:.4f}]")
            except (ValueError, FloatingPointError) as exc:  # a knob this sampler does not take: n/a, said once
                cells.append("diverged" if isinstance(exc, FloatingPointError) else "n/a")
                if isinstance(exc, ValueError) and s not in noted:
                    noted.add(s)
                    notes.append(f"n/a for {s}: {' '.join(str(exc).split())}")
        print(f"{s:14s} " + " ".join(f"{c:>24s}" for c in cells), flush=True)
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_tune(args) -> int:
    from .tune import label, tune

    device = resolve_device(args.device)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for s in samplers:
        if s not in SAMPLER_SPECS:
            raise ValueError(f"--samplers: unknown sampler {s!r}; choose from {', '.join(ALL_SAMPLERS)}")
    lambdas = []
    for v in (t.strip() for t in args.lambdas.split(",") if t.strip()):
        if v == "default":
            lambdas.append(None)
            continue
        try:
            lambdas.append(float(v))
        except ValueError:
            raise ValueError(f"--lambdas: {v!r} is not a number or 'default'") from None
    if not 1 <= args.nfe <= MAX_NFE or not 1 <= args.reference_nfe <= MAX_NFE:
        raise ValueError(f"--nfe / --reference-nfe must be in 1..{MAX_NFE}")
    check_backend(args)
    model = load_model(args).to(device)
    print(f"psld-fast tune: {model_label(args)} {tuple(model.shape)} at NFE {args.nfe}", flush=True)
    res = tune(model, args.nfe, samplers=samplers, lambdas=lambdas or (None,), n0=args.n0, eta=args.eta,
               max_rounds=args.rounds, reference_sampler=args.reference_sampler, reference_nfe=args.reference_nfe,
               reference_n=args.reference_n, seed=args.seed, device=device, backend=args.backend,
               dtype=_DTYPES[args.dtype], log=lambda line: print("  " + line, flush=True))
    print(res.markdown())
    b = res.best
    src = (f"--checkpoint {args.checkpoint}" if args.checkpoint is not None else
           f"--diffusers {args.diffusers}" if getattr(args, "diffusers", None) is not None else
           f"--denoiser {args.denoiser}" if getattr(args, "denoiser", None) is not None else f"--model {args.model}")
    print(f"use it: psld-fast sample {src} --sampler {b['sampler']} --nfe {args.nfe}"
          + ("" if b["lambda_s"] is None else f" --lambda-s {b['lambda_s']:g}")
          + f"   (psld_fast.sample(model, n, sampler={b['sampler']!r}, nfe={args.nfe}"
          + ("" if b["lambda_s"] is None else f", lambda_s={b['lambda_s']:g}") + f"); {label(b)})")
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


def _configure_logging(args) -> None:
    """psld_fast's log records on stderr as ``psld-fast CMD: message`` (INFO with -v, else WARNING),
    whatever handlers the root logger already has."""
    log = logging.getLogger("psld_fast")
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    handler = next((h for h in log.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()  # records still propagate (to a caller's own handlers, pytest's caplog)
        log.addHandler(handler)
    handler.setFormatter(_PrefixFormatter(f"psld-fast {args.command or ''}".strip()))


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (not the one current when it was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _PrefixFormatter(logging.Formatter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def format(self, record) -> str:
        text = " ".join(record.getMessage().split())
        return f"{self.prefix}: {text[len('psld_fast: '):] if text.startswith('psld_fast: ') else text}"


#: What an interrupted command leaves behind (every file is written atomically: nothing half-written).
_INTERRUPTED = {
    "generate": "; the finished sample files are kept: rerun the same command to resume",
    "sweep": "; the finished cells are in sweep.csv: rerun the same command to resume",
    "train": "; rerun the same command to resume from the last checkpoint",
}


def main(argv=None) -> int:
    """Run a subcommand; a mistake the user can fix is one line on stderr and exit code 2."""
    parser = build_parser()
    argv = join_negative_seeds(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    _configure_logging(args)
    if args.command is None:
        parser.print_help()
        return 0
    import warnings

    def _one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"psld-fast {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        apply_threads(args)
        if getattr(args, "device", None):  # every subcommand: checked before anything is loaded
            resolve_device(args.device)
        if hasattr(args, "backend"):
            check_backend(args)
        handler = getattr(args, "func", None) or {"sample": cmd_sample, "compare": cmd_compare,
                                                  "info": cmd_info}[args.command]
        return handler(args)
    except (ValueError, OSError, RuntimeError, FloatingPointError, MemoryError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
            text += f": {exc.filename}"
        print(f"psld-fast {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT, no traceback
        print(f"psld-fast {args.command}: interrupted{_INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
