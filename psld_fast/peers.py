"""The peer libraries psld_fast is measured against, loaded without their training-only imports.

``k_diffusion``'s package ``__init__`` imports its training stack (accelerate, clip, kornia, wandb,
clean-fid, ...), none of which sampling needs.  :func:`load_kdiffusion` imports only
``k_diffusion.sampling``, ``k_diffusion.utils`` and ``k_diffusion.external`` from the installed
package (pinned in requirements-peers.txt; ``bash tools/install_peers.sh``), by registering an
empty package module whose search path is the installed folder, so that its own ``__init__`` never
runs.  The modules are k-diffusion's own code, unchanged.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from types import SimpleNamespace

__all__ = ["load_kdiffusion", "import_diffusers", "kdiffusion_version", "PEERS_HINT"]

PEERS_HINT = "install the pinned peers with: bash tools/install_peers.sh"


def kdiffusion_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("k-diffusion")
    except Exception:
        return None


class _Unavailable(types.ModuleType):
    """Stands in for ``torchvision.transforms.functional`` when torchvision cannot be imported
    beside this torch (k_diffusion.utils imports it for image helpers sampling never calls)."""

    def __getattr__(self, name):
        raise ImportError(f"torchvision is unavailable here ({self.reason}); k-diffusion's sampling does not use it")


_TV = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _torchvision_broken() -> str | None:
    """None when torchvision imports beside this torch, else why not (and torchvision is then
    marked missing in sys.modules, so that packages probing for it skip it instead of crashing)."""
    if sys.modules.get("torchvision", 0) is None:
        return "marked unavailable"
    try:
        importlib.import_module("torchvision.transforms.functional")
        return None
    except Exception as exc:  # e.g. "operator torchvision::nms does not exist" with a mismatched torch
        reason = f"{type(exc).__name__}: {exc}"
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[name]  # a half-imported torchvision
    for name in _TV:
        sys.modules[name] = None  # find_spec -> None, import -> ImportError (undone by _forget_torchvision)
    return reason


def _forget_torchvision() -> None:
    """Drop the 'unavailable' marks again, so that later imports in this process see torchvision's
    own error as before (the peers already imported what they needed)."""
    for name in _TV:
        if name in sys.modules and (sys.modules[name] is None or isinstance(sys.modules[name], _Unavailable)):
            del sys.modules[name]


def _import_with_placeholder(names):
    """Import ``names`` with placeholder torchvision modules (k_diffusion.utils imports
    torchvision.transforms.functional at the top, for image helpers sampling never calls)."""
    reason = _torchvision_broken()
    if reason is None:
        return [importlib.import_module(n) for n in names]
    _forget_torchvision()
    mods = {}
    for name in _TV:
        mod = _Unavailable(name)
        mod.reason = reason
        mod.__path__ = []
        mods[name] = mod
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
    sys.modules.update(mods)
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        _forget_torchvision()


def import_diffusers():
    """The diffusers package (pinned peer), imported so that a torchvision that cannot load beside
    this torch is treated as absent (diffusers then skips it) instead of failing the import."""
    _torchvision_broken()
    try:
        import diffusers
        from diffusers.models.unets import unet_2d  # noqa: F401  (lazy in diffusers: import it here)
        from diffusers.schedulers import scheduling_ddpm  # noqa: F401
        diffusers.UNet2DModel, diffusers.DDPMScheduler  # resolve the lazy names now
    except ImportError as exc:
        raise ImportError(f"diffusers is not installed or failed to import ({exc}); {PEERS_HINT}") from exc
    finally:
        _forget_torchvision()
    return diffusers


def load_kdiffusion() -> SimpleNamespace:
    """``SimpleNamespace(sampling=..., external=..., utils=..., version=...)`` of the installed
    k-diffusion; ImportError naming the install command when it (or torchsde/torchdiffeq) is missing."""
    pkg = sys.modules.get("k_diffusion")
    if pkg is None:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"k-diffusion is not installed; {PEERS_HINT}")
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = os.path.join(pkg.__path__[0], "__init__.py")
        pkg.__package__ = "k_diffusion"
        sys.modules["k_diffusion"] = pkg
    try:
        sampling, external, utils = _import_with_placeholder(
            ["k_diffusion.sampling", "k_diffusion.external", "k_diffusion.utils"])
    except ImportError as exc:
        raise ImportError(f"k-diffusion's sampling modules need {exc.name or exc}; {PEERS_HINT}") from exc
    return SimpleNamespace(sampling=sampling, external=external, utils=utils, version=kdiffusion_version())
