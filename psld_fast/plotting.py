"""Figures with matplotlib, an optional dependency (``pip install 'psld-fast[plot]'``).

Everything here imports matplotlib lazily and draws on the non-interactive Agg canvas, so it works
on headless machines and never touches a display.  Without matplotlib :func:`require_matplotlib`
raises :class:`PlotUnavailable`, whose message says what to install; callers that also write
tables (``psld-fast sweep``, ``bench/compare_learned.py``) catch it and keep their CSV/Markdown.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["PlotUnavailable", "require_matplotlib", "save_figure", "plain_log_labels", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'psld-fast[plot]' (or: pip install matplotlib)"


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or :class:`PlotUnavailable` naming the install command."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg", force=False)  # headless; a backend the user already chose is kept
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Save ``fig`` to ``path`` atomically in the format of its suffix (.png, .svg, .pdf, ...)."""
    from ._io import write_atomic

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"

    def _write(f):
        fig.savefig(f, format=fmt, dpi=150 if fmt == "png" else None, bbox_inches="tight",
                    metadata={"Software": None} if fmt == "png" else None)

    try:
        return write_atomic(path, _write)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)



def plain_log_labels(ax) -> None:
    """A log y axis labelled at 1, 2, 5 x 10^k as plain numbers (0.05, 0.1, 20), not 5x10^-2."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
