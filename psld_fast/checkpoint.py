"""Load official PSLD (pytorch-lightning) checkpoints into :class:`psld_fast.nets.NCSNpp`.

Layout of a PSLD ``.ckpt`` (pytorch-lightning 1.9, ``SDEWrapper``; inferred from the upstream code):

* ``ckpt["state_dict"]`` holds every bare-network key twice: all ``score_fn.<key>`` (online weights),
  then all ``ema_score_fn.<key>`` (EMA weights, decay 0.9999).  The SDE / sampler / loss carry no tensors,
  there is no ``module.`` prefix.  The paper's samples use the EMA weights (``sample_from: target``).
* Other top-level entries (``epoch``, ``global_step``, ``pytorch-lightning_version``, ``loops``,
  ``callbacks``, ``optimizer_states``, ``lr_schedulers``) are not needed.  ``SDEWrapper`` never calls
  ``save_hyperparameters()``, so the network config is *not* stored: it is recognised from the key/shape
  layout (presets ``cifar10``, ``celeba64``, ``afhqv2``, ``small``) or given with ``preset=`` / ``config=``.

SDE hyper-parameters, first match wins: the ``sde=`` argument; ``hyper_parameters`` / ``hparams`` in the
checkpoint (any nested mapping with ``gamma`` and ``nu``; ``eval_eps`` becomes ``eps_end``); the values
published with the recognised preset (``PRESET_SDE``); else ``PSLD()`` defaults.  The choice is recorded in
``model.net.checkpoint_info["sde_source"]``.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from .nets.ncsnpp import PRESET_SDE, PRESETS, NCSNpp

__all__ = [
    "CheckpointError",
    "load_psld_checkpoint",
    "extract_score_fn_state_dict",
    "infer_preset",
    "layout_mismatch",
]

EMA_PREFIX = "ema_score_fn."
ONLINE_PREFIX = "score_fn."
_MAX_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint file cannot be turned into a PSLD NCSN++ model (the message says why)."""


# --------------------------------------------------------------------------------------------------
# Reading and selecting
# --------------------------------------------------------------------------------------------------


def _name(path: Any) -> str:
    try:
        return os.fspath(path)
    except TypeError:
        return repr(path)


def _read(path: Any, map_location: Any, weights_only: bool, api_hint: bool = True) -> Any:
    """torch.load with one-line errors naming the file (never torch's multi-line advice).  ``api_hint``:
    a file with Python objects mentions this API's ``weights_only=False`` (not said on the command line)."""
    if isinstance(path, Mapping):  # already loaded
        return path
    if isinstance(path, (str, os.PathLike)):
        p = os.fspath(path)
        if os.path.isdir(p):
            raise CheckpointError(f"{p} is a directory; give the checkpoint file inside it (e.g. {p}/last.ckpt)")
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: no such checkpoint file")
        if os.path.getsize(p) == 0:
            raise CheckpointError(f"{p} is empty (0 bytes): not a PyTorch checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "weights only load failed" in str(e).lower():
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = [ln for ln in lines if "Unsupported global" in ln]
            if detail:
                first = detail[0].replace("\x1b[1m", "").replace("\x1b[0m", "")
                first = first[first.index("Unsupported global"):].split(" was not an allowed")[0][:120]
                hint = (" Pass weights_only=False to load_psld_checkpoint ONLY if you trust the file: unpickling "
                        "can run arbitrary code.") if api_hint else ""
                raise CheckpointError(
                    f"{_name(path)}: the file holds non-tensor Python objects ({first}); psld-fast reads "
                    f"weights only and refuses it.{hint}") from None
        raise CheckpointError(f"{_name(path)} is not a PyTorch checkpoint (neither a torch.save zip archive "
                              "nor a tensor pickle)") from None
    except (EOFError, RuntimeError) as e:
        msg = str(e).lower()
        if isinstance(e, EOFError) or "zip archive" in msg or "central directory" in msg:
            raise CheckpointError(f"{_name(path)} is truncated or corrupt (not a complete torch.save archive)") from None
        raise CheckpointError(f"{_name(path)} is not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    except PermissionError:
        raise
    except OSError as e:  # the zip reader seeking past the end of a cut file: EINVAL, no file name
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{_name(path)} is truncated or corrupt (not a complete torch.save archive)") from None
    except Exception as e:  # anything else a malformed file triggers inside torch.load
        raise CheckpointError(f"{_name(path)} is not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _prefix_counts(keys) -> dict[str, int]:
    counts: dict[str, int] = {}
    for k in keys:
        head = str(k).split(".", 1)[0] + "." if "." in str(k) else str(k)
        counts[head] = counts.get(head, 0) + 1
    return counts


def _examples(items, n: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (", ..." if len(items) > n else "")


def extract_score_fn_state_dict(ckpt: Any, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Select the bare-network weights from a loaded PSLD checkpoint.

    Returns ``(state_dict, prefix)`` with the prefix (``"ema_score_fn."`` or ``"score_fn."``) stripped.
    Raises :class:`CheckpointError` for anything that is not a PSLD Lightning checkpoint.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"expected the checkpoint to be a dict with a 'state_dict' entry, got {type(ckpt).__name__}"
        )
    if "state_dict" in ckpt:
        sd = ckpt["state_dict"]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"checkpoint['state_dict'] is a {type(sd).__name__}, expected a dict of tensors")
    elif any(isinstance(k, str) and (k.startswith(EMA_PREFIX) or k.startswith(ONLINE_PREFIX)) for k in ckpt):
        sd = ckpt  # a bare SDEWrapper.state_dict() saved with torch.save
    else:
        keys = [str(k) for k in ckpt]
        hint = ""
        if any(k.startswith("all_modules.") for k in keys):
            hint = (" It looks like a bare network state_dict: load it with NCSNpp.load_state_dict(...) "
                    "instead.")
        raise CheckpointError(
            f"checkpoint has no 'state_dict' entry (top-level keys: {_examples(sorted(keys), 10)}).{hint}"
        )
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"state_dict has non-string keys, e.g. {_examples(map(repr, bad))}")

    prefix = EMA_PREFIX if use_ema else ONLINE_PREFIX
    picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not picked:
        n_ema = sum(k.startswith(EMA_PREFIX) for k in sd)
        n_online = sum(k.startswith(ONLINE_PREFIX) for k in sd)
        found = _prefix_counts(sd.keys())
        found_s = ", ".join(f"{p!r}: {n}" for p, n in sorted(found.items())[:10]) or "none"
        if use_ema and n_online:
            raise CheckpointError(
                f"no EMA weights ('{EMA_PREFIX}*' keys) in the state_dict, which has {n_online} "
                f"'{ONLINE_PREFIX}*' keys; pass use_ema=False to load the online weights"
            )
        if not use_ema and n_ema:
            raise CheckpointError(
                f"no online weights ('{ONLINE_PREFIX}*' keys) in the state_dict, which has {n_ema} "
                f"'{EMA_PREFIX}*' keys; pass use_ema=True to load the EMA weights"
            )
        raise CheckpointError(
            f"no score_fn weights: the state_dict has no '{EMA_PREFIX}*' or '{ONLINE_PREFIX}*' keys "
            f"(key prefixes found: {found_s})"
        )
    not_tensors = [k for k, v in picked.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{len(not_tensors)} '{prefix}*' entries are not tensors, e.g. "
            f"{_examples(f'{k} ({type(picked[k]).__name__})' for k in not_tensors)}"
        )
    return picked, prefix


# --------------------------------------------------------------------------------------------------
# Layout matching
# --------------------------------------------------------------------------------------------------


def _layout_of(net: NCSNpp) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _preset_layout(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _layout_of(NCSNpp.from_preset(name))


def layout_mismatch(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> str | None:
    """A readable description of how ``got`` (key -> shape) differs from ``expected``, or ``None``."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [(k, tuple(got[k]), tuple(expected[k])) for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
    if shapes:
        listed = "; ".join(f"{k}: checkpoint {list(g)} vs model {list(e)}" for k, g, e in shapes[:_MAX_LISTED])
        parts.append(f"{len(shapes)} shape mismatches ({listed}{'; ...' if len(shapes) > _MAX_LISTED else ''})")
    return ", ".join(parts) if parts else None


def infer_preset(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the preset whose key/shape layout equals ``state_dict``'s exactly, else ``None``."""
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name in PRESETS:
        if _preset_layout(name) == got:
            return name
    return None


def _closest_preset(got: Mapping[str, tuple]) -> tuple[str, str]:
    best = None
    for name in PRESETS:
        exp = _preset_layout(name)
        score = sum(1 for k, s in got.items() if exp.get(k) == s) - abs(len(exp) - len(got))
        if best is None or score > best[0]:
            best = (score, name, layout_mismatch(exp, got) or "")
    return best[1], best[2]


# --------------------------------------------------------------------------------------------------
# SDE hyper-parameters
# --------------------------------------------------------------------------------------------------

_SDE_FIELDS = ("gamma", "nu", "kappa", "beta_min", "beta_max", "T")


def _as_mapping(obj: Any) -> Mapping | None:
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        return vars(obj)
    return None


def _find_sde_hparams(hp: Any, depth: int = 0) -> dict[str, float] | None:
    m = _as_mapping(hp)
    if m is None or depth > 8:
        return None
    if "gamma" in m and "nu" in m:
        out: dict[str, float] = {}
        for f in _SDE_FIELDS:
            if f in m and m[f] is not None:
                out[f] = float(m[f])
        return out
    # Prefer an explicit 'sde' section, then anything else.
    keys = sorted(m.keys(), key=lambda k: (str(k) != "sde", str(k)))
    for k in keys:
        found = _find_sde_hparams(m[k], depth + 1)
        if found:
            return found
    return None


def _find_key(hp: Any, key: str, depth: int = 0) -> Any:
    m = _as_mapping(hp)
    if m is None or depth > 8:
        return None
    if key in m:
        return m[key]
    for v in m.values():
        found = _find_key(v, key, depth + 1)
        if found is not None:
            return found
    return None


def _sde_kwargs_from_checkpoint(ckpt: Mapping) -> dict[str, float] | None:
    for entry in ("hyper_parameters", "hparams"):
        hp = ckpt.get(entry)
        if hp is None:
            continue
        found = _find_sde_hparams(hp)
        if found:
            eval_eps = _find_key(hp, "eval_eps")
            if eval_eps is not None:
                found["eps_end"] = float(eval_eps)
            return found
    return None


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def load_psld_checkpoint(
    path: Any,
    *,
    use_ema: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
    preset: str | None = None,
    config: Mapping[str, Any] | None = None,
    sde: Any = None,
):
    """Load a PSLD Lightning checkpoint as ``psld_fast.models.EpsModel(NCSNpp, PSLD)`` in eval mode.

    Args:
        path: checkpoint file (or an already ``torch.load``-ed dict).
        use_ema: take the EMA weights (``ema_score_fn.*``, what the paper samples with); ``False`` takes the
            online weights (``score_fn.*``).
        map_location: passed to ``torch.load``; the network's parameters are the loaded tensors, so this is
            also where the model lives.
        weights_only: passed to ``torch.load``.  Only set ``False`` for files you trust.
        preset: network preset name; default: recognised from the key/shape layout.
        config: network constructor config (see :meth:`NCSNpp.from_config`); overrides ``preset``.
        sde: a ``psld_fast.PSLD`` to attach; default: see the module docstring.

    Raises:
        CheckpointError: (a ValueError) the file is empty, truncated or corrupt ("PATH is truncated or
            corrupt"), holds Python objects, is not a dict / has no state_dict / no score_fn weights / a
            layout that does not match the network (missing, unexpected keys, shape mismatches).
        FileNotFoundError, PermissionError: the file is missing or cannot be read.
    """
    from .models import EpsModel  # lazy: written alongside this module
    from .sde import PSLD

    ckpt = _read(path, map_location, weights_only)
    state, prefix = extract_score_fn_state_dict(ckpt, use_ema=use_ema)
    got = {k: tuple(v.shape) for k, v in state.items()}

    # Which network?
    if config is not None:
        preset_name = None
        builder = functools.partial(NCSNpp.from_config, dict(config))
        what = "the given config"
    elif preset is not None:
        preset_name = str(preset).lower()
        if preset_name not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
        builder = functools.partial(NCSNpp.from_preset, preset_name)
        what = f"preset {preset_name!r}"
    else:
        preset_name = infer_preset(state)
        if preset_name is None:
            closest, diff = _closest_preset(got)
            raise CheckpointError(
                f"the '{prefix}*' weights ({len(got)} tensors) match no known NCSNpp preset "
                f"({', '.join(PRESETS)}); closest is {closest!r}: {diff}. Pass config=<network constructor "
                "config> (or preset=) to load another architecture."
            )
        builder = functools.partial(NCSNpp.from_preset, preset_name)
        what = f"preset {preset_name!r}"

    with torch.device("meta"):
        net = builder()
    diff = layout_mismatch(_layout_of(net), got)
    if diff:
        raise CheckpointError(f"the '{prefix}*' weights do not match the NCSNpp layout of {what}: {diff}")
    # Parameters become the loaded tensors (no second copy, no random init of 100M weights).
    net.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if leftover:  # cannot happen with a matching layout; guard anyway
        raise CheckpointError(f"tensors left unloaded: {_examples(leftover)}")
    net.eval()

    # Which SDE?
    if sde is not None:
        sde_source = "argument"
    else:
        kwargs = _sde_kwargs_from_checkpoint(ckpt)
        if kwargs:
            sde, sde_source = PSLD(**kwargs), "checkpoint hyper_parameters"
        elif preset_name is not None and PRESET_SDE.get(preset_name):
            sde, sde_source = PSLD(**PRESET_SDE[preset_name]), f"published values for preset {preset_name!r}"
        else:
            sde, sde_source = PSLD(), "PSLD() defaults"

    net.checkpoint_info = {
        "path": None if isinstance(path, Mapping) else _name(path),
        "prefix": prefix,
        "preset": preset_name,
        "sde_source": sde_source,
    }
    return EpsModel(net, sde, shape=net.data_shape, name=f"ncsnpp-{preset_name or 'custom'}")
