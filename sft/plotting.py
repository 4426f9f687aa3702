"""The figure set-up of talr: matplotlib on the Agg backend, PNGs written atomically.

The one place that configures matplotlib (`sft.analysis` draws Figure 3 with it; `experiments.outputs`
re-exports it for studies and commands). No torch here.
"""
from __future__ import annotations

from pathlib import Path

from .io import write_with

__all__ = ["pyplot", "save_png"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (`sft.io.write_with`; parents created), close
    it, and return ``path``."""
    path = Path(path)
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    finally:
        pyplot().close(fig)
    return path
