"""Command line: ``psld-fast train`` (hooked into :mod:`psld_fast.cli`).

Trains a small PSLD eps-network with the HSM loss (:mod:`psld_fast.train`) on 2-D points drawn
exactly from an analytic preset (``--data ring2d``) or on an image array (``--data digits``: the
shipped UCI digits at 16x16; or a ``.npy``/``.npz``/``.pt`` file of examples in [-1, 1]).  Writes
``<out>/last.ckpt`` atomically every ``--ckpt-every`` steps and at the end; rerunning the same
command resumes from it.  ``--export FILE`` also writes a stripped copy (EMA weights only) like the
models shipped in ``psld_fast/data/learned_*.pt``.  ``--split train`` trains on the fixed stratified
70/30 split of the digits; ``--objective edm`` trains a position-only EDM denoiser instead (loads as
a :class:`~psld_fast.lift.DenoiserModel`).
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["register", "cmd_train"]


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a small PSLD eps-network (HSM loss) or EDM denoiser (EMA, resumable checkpoints)",
        description="Train a PSLD eps-network with the HSM loss E||eps(mu_tau + L_tau e, tau) - e||^2 "
                    "(tau ~ U[1e-5, 1]), or with --objective edm a position-only EDM denoiser. Adam with warm-up, gradient clipping, EMA, bf16 autocast on CUDA. "
                    "Checkpoints (Lightning-like: state_dict score_fn.*/ema_score_fn.*, hyper_parameters, "
                    "global_step, optimizer_states) go to OUT/last.ckpt; rerun the command to resume.")
    p.add_argument("--data", default="ring2d",
                   help="ring2d (or another analytic preset: exact draws), digits (1797 UCI digits 16x16), "
                        "digits8, or a .npy/.npz(x)/.pt file of examples (N, ...) in [-1, 1]")
    p.add_argument("--objective", choices=["hsm", "edm"], default="hsm",
                   help="hsm (default): a PSLD eps-network on (x, m) with the HSM loss; edm: a position-only "
                        "denoiser D(x, sigma) with the EDM preconditioning and loss (sigma_data 0.5, "
                        "log sigma ~ N(-1.2, 1.2^2), trained range sigma 0.002..80; images only, unet; no "
                        "--sde). It loads as a psld_fast.DenoiserModel: psld_fast samples it lifted, "
                        "k-diffusion natively (model.denoiser)")
    p.add_argument("--split", choices=["all", "train", "heldout"], default="all",
                   help="digits only: all 1797 images (default), or the fixed stratified 70/30 split "
                        "(psld_fast.datasets.digits_split_indices): train (1258) or heldout (539); "
                        "stored in the checkpoint's hyper_parameters")
    p.add_argument("--arch", choices=["mlp", "unet"], default=None, help="default: mlp for points, unet for images")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<data>)")
    p.add_argument("--steps", type=int, default=2000, help="total optimizer steps (a resumed run continues to this)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every K steps (and at the end)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop with a checkpoint after this much time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on CUDA (CPU never uses it)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/last.ckpt exists")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a shared machine: small nets oversubscribe)")
    p.add_argument("--net", default=None,
                   help='network config overrides as JSON, e.g. \'{"hidden": 256}\' (mlp) or \'{"base": 32}\' (unet)')
    p.add_argument("--sde", default=None, help='PSLD parameters as JSON, e.g. \'{"gamma": 0.02, "nu": 4.02}\'')
    p.add_argument("--export", type=Path, default=None,
                   help="also write a stripped copy (EMA weights, hyper-parameters, no optimizer) here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import torch

    from .train import TrainConfig, save_checkpoint_atomic, strip_checkpoint, train

    from ._io import check_writable_dir, check_writable_file

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / Path(args.data).stem
    check_writable_dir(out, "--out")  # before any training step, not at the first checkpoint
    if args.export is not None:
        check_writable_file(args.export, what="--export")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--ckpt-every", args.ckpt_every)):
        if value < 1:
            raise ValueError(f"{flag} {value}: give an integer >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}: give an integer >= 0")
    for flag, value, ok, what in (("--lr", args.lr, args.lr > 0, "a number > 0"),
                                  ("--grad-clip", args.grad_clip, args.grad_clip >= 0, "a number >= 0 (0: off)"),
                                  ("--ema-decay", args.ema_decay, 0 <= args.ema_decay < 1, "a number in [0, 1)"),
                                  ("--max-minutes", args.max_minutes, args.max_minutes is None or args.max_minutes > 0,
                                   "a number > 0")):
        if not ok or value != value:  # NaN fails every comparison
            raise ValueError(f"{flag} {value}: give {what}")
    cfg = TrainConfig(data=args.data, split=args.split, objective=args.objective, arch=args.arch, net=_json_object(args.net, "--net"),
                      sde=_json_object(args.sde, "--sde"), out=str(out), steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
                      ema_decay=args.ema_decay, ckpt_every=args.ckpt_every, seed=args.seed, device=args.device,
                      amp=not args.no_amp, resume=not args.no_resume, progress=not args.no_progress,
                      max_minutes=args.max_minutes)
    summary = train(cfg)
    if args.export:
        ck = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
        save_checkpoint_atomic(strip_checkpoint(ck), args.export)
        summary["export"] = str(args.export)
    print(json.dumps(summary, indent=1))
    return 0


def _json_object(text: str | None, flag: str) -> dict:
    """``--net`` / ``--sde`` JSON as a dict; ValueError naming the flag otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: not valid JSON ({exc}); give e.g. '{{\"hidden\": 256}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} {text!r}: give a JSON object such as '{{\"hidden\": 256}}'")
    return value
