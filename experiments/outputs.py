"""What studies and commands write: Markdown tables, figures and JSON, each written atomically.

One place for the output conventions of ``experiments``:

* ``fmt`` / ``markdown_table``: numbers in reports (3 significant decimals, ``n/a`` for None,
  yes/no for booleans) and GitHub Markdown tables of them;
* ``pyplot``: matplotlib with the Agg backend (the one figure set-up, `sft.plotting`);
  ``save_figure(fig, path)``: PNG written atomically (`sft.io.write_with`), figure closed;
* ``write_json`` (strict JSON, NaN/inf as null: `sft.io.atomic_write_json`) and ``write_text``
  (`sft.io.atomic_write_text`).

No torch here: the theory commands use it too.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from sft.io import atomic_write_json, atomic_write_text
from sft.plotting import pyplot, save_png

__all__ = ["fmt", "markdown_table", "pyplot", "save_figure", "write_json", "write_text"]

FIGURE_DPI = 110


def fmt(x: Any, nd: int = 3) -> str:
    """A table cell: floats with ``nd`` decimals (``nd`` significant digits when tiny or huge)."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{nd}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{nd}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with a header row; every cell through :func:`fmt`."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def save_figure(fig, path: str | Path, dpi: int = FIGURE_DPI) -> str:
    """Write ``fig`` as a PNG at ``path`` atomically, close it, and return the file name (for a
    Markdown link beside it)."""
    return save_png(fig, path, dpi=dpi).name


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Strict JSON (numpy values converted, NaN/inf as null), written atomically."""
    return atomic_write_json(path, obj, indent=indent)


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text written atomically."""
    return atomic_write_text(path, text)
