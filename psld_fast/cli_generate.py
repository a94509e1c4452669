"""Command line: ``psld-fast generate | fid | sweep`` (hooked into :mod:`psld_fast.cli`).

* ``generate``: one file per seed (PNG tree or npz shards), resumable, any number of processes
  under ``torchrun``.
* ``fid``: FID and KID of a sample folder against reference statistics (torch-fidelity's
  Inception-v3 from a local weights file; streamed float64 moments, all-reduced under torchrun).
* ``sweep``: sampler x NFE x lambda_s (x net_time x schedule) grid with a quality metric per cell:
  CSV (resumable), Markdown table and a PNG plot.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ._io import write_atomic
from .cli_common import DTYPES as _DTYPES
from .cli_common import (add_model_args, add_sampler_args, add_threads_arg, check_writable_dir, check_writable_file,
                         format_rate, load_model, parse_float_list, parse_int_list, parse_seeds, sampler_kwargs,
                         external_source, model_label)

__all__ = ["register"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub) -> None:
    from .samplers import LAMBDA_READINGS, SPLITS

    # ----------------------------------------------------------------------------- generate
    p = sub.add_parser(
        "generate", help="write one sample per seed (PNG tree or npz shards); resumable, torchrun-ready",
        description="Write samples for a seed range, one file per seed ({out}/{seed//1000*1000:06d}/{seed:06d}.png) "
                    "or npz shards of --shard-size seeds. Rerun the same command to resume a killed run. "
                    "Under torchrun (e.g. torchrun --nproc-per-node 8 -m psld_fast generate ...) the seeds are "
                    "split across ranks; the files are the same for any number of processes and any batch size.")
    add_model_args(p)
    add_sampler_args(p)
    p.add_argument("--seeds", type=parse_seeds, required=True, help="seed range, e.g. 0-49999 (inclusive)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default out/<model>_<sampler>_nfe<nfe>)")
    p.add_argument("--format", dest="fmt", choices=["png", "npz"], default="png",
                   help="png: one file per seed (image models); npz: shards holding x (float32) and seeds")
    p.add_argument("--shard-size", type=int, default=1000, help="seed values per npz shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per sampler call (does not change the files)")
    p.add_argument("--force", action="store_true",
                   help="take over a folder that holds another configuration: its sample files are deleted "
                        "(the old manifest is kept as manifest.replaced-<time>.json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    p.set_defaults(func=cmd_generate)

    # ---------------------------------------------------------------------------------- fid
    p = sub.add_parser(
        "fid", help="FID and KID of a sample folder against reference statistics (torch-fidelity Inception)",
        description="FID/KID of SAMPLES (a PNG tree, npz shards, a generate run, or one .npz with x) against --ref "
                    "(an .npz with mu/sigma, or a folder of reference images whose statistics are computed and "
                    "cached). Inception-v3 weights come from a local file: --inception-weights or "
                    "PSLD_FAST_INCEPTION_WEIGHTS (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); "
                    "nothing is downloaded. Works under torchrun (moments are all-reduced).")
    p.add_argument("samples", type=Path, help="sample folder or .npz")
    p.add_argument("--ref", type=Path, required=True, help="reference: stats .npz (mu, sigma) or image folder / .npz")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="torch-fidelity Inception weights file (default: env PSLD_FAST_INCEPTION_WEIGHTS)")
    p.add_argument("--extractor", default="inception-v3-compat",
                   help="torch-fidelity feature extractor name (default inception-v3-compat; 'psld-random-conv' "
                        "is a weight-free smoke test whose numbers are NOT comparable with published FIDs)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--batch-size", type=int, default=None, help="images per feature batch (default 64 CPU, 200 GPU)")
    p.add_argument("--no-kid", action="store_true", help="FID only")
    p.add_argument("--kid-max-features", type=int, default=10000,
                   help="KID uses a fixed random subset of at most this many features per set (default 10000)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where reference statistics are cached (default $XDG_CACHE_HOME/psld_fast/fid or ~/.cache/...)")
    p.add_argument("--save-stats", type=Path, default=None,
                   help="also save the samples' statistics (mu, sigma, n, KID features) to this .npz")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    add_threads_arg(p)
    p.set_defaults(func=cmd_fid)

    # -------------------------------------------------------------------------------- sweep
    p = sub.add_parser(
        "sweep", help="sampler x NFE x lambda_s grid with a quality metric per cell (CSV, Markdown, PNG plot)",
        description="Quality per cell of a sampler x NFE x lambda_s (x net_time x schedule) grid: sliced W2 to the "
                    "exact data law (95% CI) for the analytic presets, FID for checkpoints (needs --ref and "
                    "Inception weights). Writes sweep.csv (a row per finished cell; rerun to resume or to extend "
                    "the grid), sweep.md and sweep.png into --out.")
    add_model_args(p)
    p.add_argument("--samplers", default="em,reduced_oba,reduced_obab", help="comma-separated sampler names")
    p.add_argument("--nfes", default="10,20,50,100", help="comma-separated NFE budgets")
    p.add_argument("--lambdas", default="default",
                   help="comma-separated lambda_s values ('default' = the sampler's own, 1 for the SDE samplers)")
    p.add_argument("--net-times", default="default", help="comma-separated: default, start, end")
    p.add_argument("--schedules", default="quadratic", help="comma-separated: uniform, quadratic, cubic, logsnr, power:<p>")
    p.add_argument("--lambda-reading", default=None, choices=LAMBDA_READINGS, help="default: per sampler")
    p.add_argument("--splits", default="default", help="comma-separated O step readings: default, additive, ou")
    p.add_argument("--split", default=None, choices=SPLITS, help="one O step reading (same as --splits with one value)")
    p.add_argument("--couplings", default="default",
                   help="comma-separated: default, sequential, joint (joint: reduced samplers only)")
    p.add_argument("--ci-lambdas", default="default",
                   help="comma-separated lambda of the conjugate samplers (ci_ddim, ci_ddim2, csps_d)")
    p.add_argument("--no-denoise", action="store_true", help="skip the final denoising step")
    p.add_argument("-n", "--num-samples", type=int, default=None,
                   help="samples per cell (default 1024 for analytic models, 10000 for FID)")
    p.add_argument("--seed", type=int, default=0, help="every cell uses the seeds seed*10^9 + 0..n-1")
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap replicates of the sliced-W2 interval (default 100)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="output folder (default out/sweep_<model>)")
    p.add_argument("--ref", type=Path, default=None, help="FID reference (stats .npz or image folder) for checkpoints")
    p.add_argument("--inception-weights", type=Path, default=None)
    p.add_argument("--extractor", default="inception-v3-compat")
    p.add_argument("--force", action="store_true", help="accept a folder whose sweep.json holds another configuration")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)


# --------------------------------------------------------------------------------------- handlers
def _model_and_source(args):
    model = load_model(args)
    if args.checkpoint is not None:
        return model, {"checkpoint": str(Path(args.checkpoint).resolve())}, Path(args.checkpoint).stem
    ext = external_source(args)
    if ext is not None:
        return model, ext, model_label(args)
    return model, {"preset": args.model}, args.model


def cmd_generate(args) -> int:
    import torch

    from .generate import generate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.json:
        check_writable_file(args.json, what="--json")
    if args.out is not None:
        check_writable_dir(args.out, "--out")
    model, source, name = _model_and_source(args)
    out = args.out or Path("out") / f"{name}_{args.sampler}_nfe{args.nfe}"
    check_writable_dir(out, "--out")
    if args.json and Path(args.json).resolve() == Path(out).resolve():
        raise ValueError(f"--json {args.json} is the output folder; give a file name, e.g. {Path(out) / 'summary.json'}")
    source["command"] = "psld-fast " + " ".join(sys.argv[1:]) if sys.argv else None
    summary = generate(model, out, args.seeds, fmt=args.fmt, batch_size=args.batch_size,
                       shard_size=args.shard_size, force=args.force, progress=not args.no_progress,
                       device=device, source=source, sampler=args.sampler, nfe=args.nfe,
                       backend=args.backend, dtype=_DTYPES[args.dtype], **sampler_kwargs(args))
    if _rank() == 0:
        s = summary
        print(f"generate   {name} {tuple(model.shape)}  {args.sampler}  NFE {s['nfe']}  {s['format']}  "
              f"device {s['device']}  backend {s['backend']}  ranks {s['world_size']}")
        print(f"samples    {s['requested']} requested: {s['written']} written, {s['skipped']} already there"
              + (f", {s['removed_temp_files']} stale temporary files removed" if s["removed_temp_files"] else ""))
        rate = f"{format_rate(s['samples_per_second'])} samples/s" if s["written"] else "nothing to do"
        per_k = f", {1000.0 / s['samples_per_second']:.1f} s per 1000 samples" if s["written"] else ""
        print(f"time       {s['seconds']:.2f} s ({rate}{per_k})")
        print(f"wrote      {s['out_dir']}")
        if args.json:
            write_atomic(args.json, (json.dumps(s, indent=2) + "\n").encode())
    return 0


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover
        pass
    import os

    return int(os.environ.get("RANK", "0"))


def cmd_fid(args) -> int:
    from .fid import fid

    for flag, path in (("--json", args.json), ("--save-stats", args.save_stats)):  # before the expensive work
        if path is not None:
            check_writable_file(path, what=flag)
    res = fid(args.samples, args.ref, inception_weights=args.inception_weights, extractor=args.extractor,
              device=args.device, batch_size=args.batch_size, kid=not args.no_kid,
              kid_max_features=args.kid_max_features, kid_subsets=args.kid_subsets,
              kid_subset_size=args.kid_subset_size, cache_dir=args.cache_dir, save_stats=args.save_stats,
              progress=not args.no_progress)
    if _rank() == 0:
        for w in res.get("warnings", []):
            print(f"psld-fast fid: warning: {w}", file=sys.stderr)
        print(f"FID        {res['fid']:.4f}   ({res['n']} samples vs {res['n_ref']} reference, features "
              f"{res['extractor']}:{res['feature']}, {res['world_size']} rank(s), {res['seconds']:.1f} s)")
        if res.get("kid_mean") is not None:
            print(f"KID        {res['kid_mean']:.6f} +- {res['kid_std']:.6f}   ({res['kid_subsets']} subsets of "
                  f"{res['kid_subset_size']} from {res['kid_n']} / {res['kid_n_ref']} features)")
        else:
            print(f"KID        n/a ({res.get('kid_note', 'not computed')})")
        if res.get("reference_cache_file"):  # only a cache that exists is reported
            print(f"reference  statistics {'read from' if res['reference_cached'] else 'cached in'} "
                  f"{res['reference_cache_file']} (usable as --ref)")
        if args.json:
            write_atomic(args.json, (json.dumps(res, indent=2) + "\n").encode())
    return 0


def cmd_sweep(args) -> int:
    import torch

    from .sweep import sweep

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.out is not None:
        check_writable_dir(args.out, "--out")
    nfes = parse_int_list(args.nfes, "--nfes")  # the grid's numbers, before the model is loaded
    parse_float_list(args.lambdas, "--lambdas")
    parse_float_list(args.ci_lambdas, "--ci-lambdas")
    if args.ref is not None and not Path(args.ref).exists():
        raise ValueError(f"--ref {args.ref}: no such reference file or folder")
    model, source, name = _model_and_source(args)
    out = args.out or Path("out") / f"sweep_{name}"
    check_writable_dir(out, "--out")
    lambdas = parse_float_list(args.lambdas, "--lambdas")
    net_times = [None if v in ("default", "none") else v for v in _csv(args.net_times)]
    splits = [None if v in ("default", "none") else v for v in _csv(args.splits)]
    couplings = [None if v in ("default", "none") else v for v in _csv(args.couplings)]
    ci_lambdas = parse_float_list(args.ci_lambdas, "--ci-lambdas")
    rows = sweep(model, out, _csv(args.samplers), nfes, lambdas,
                 net_times=net_times, schedules=_csv(args.schedules), splits=splits, couplings=couplings,
                 ci_lambdas=ci_lambdas, num_samples=args.num_samples,
                 seed=args.seed, reference=args.ref, inception_weights=args.inception_weights,
                 extractor=args.extractor, batch_size=args.batch_size, device=device, backend=args.backend,
                 dtype=_DTYPES[args.dtype], lambda_reading=args.lambda_reading, split=args.split,
                 denoise=not args.no_denoise,
                 n_boot=args.n_boot, force=args.force, progress=not args.no_progress, source=source, verbose=True)
    print(f"sweep      {len(rows)} cells in {out}/sweep.csv, table {out}/sweep.md, plot {out}/sweep.png")
    return 0

