"""Score networks for PSLD (pure PyTorch)."""

from .ncsnpp import PRESET_SDE, PRESETS, NCSNpp, preset_config

__all__ = ["NCSNpp", "PRESETS", "PRESET_SDE", "preset_config"]
