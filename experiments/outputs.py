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

__all__ = ["annotate_points", "fmt", "markdown_table", "pyplot", "save_figure", "seed_verdict", "write_json", "write_text"]

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


def seed_verdict(lower: Sequence[float | None], upper: Sequence[float | None], *, yes: str = "holds",
                 no: str = "does not hold") -> str:
    """A verdict on "``lower`` < ``upper``" from one value per fine-tuning seed on each side.

    ``yes`` when every seed's ``lower`` is below every seed's ``upper`` (the gap is larger than
    the seeds' spread, so all seeds agree), ``no`` when every ``lower`` is above every ``upper``,
    ``"undecided"`` otherwise: the seed ranges overlap, a value is missing or not finite, or a
    side has fewer than two seeds (one seed has no spread to compare the gap with).
    """
    lo, hi = list(lower), list(upper)
    if min(len(lo), len(hi)) < 2 or any(x is None or not math.isfinite(x) for x in lo + hi):
        return "undecided"
    if max(lo) < min(hi):
        return yes
    if min(lo) > max(hi):
        return no
    return "undecided"


_RINGS = (6, 14, 24, 36, 50, 66)  # label offsets tried, in pixels from the point
_BACKDROP = dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.75)  # a line under a label stays readable
_DIRECTIONS = ((1, 0.3), (1, -1), (0, 1), (0, -1.2), (-1, 0.3), (-1, -1), (1, 1), (-1, 1))


def _label_box(ann, renderer, r: float, d: tuple[float, float], scale: float, pad_px: float):
    """Move ``ann`` to offset ``r * d`` pixels (aligned away from its point) and return its text box."""
    dx, dy = d
    ann.set_ha("left" if dx > 0 else "right" if dx < 0 else "center")
    ann.set_va("bottom" if dy > 0 else "top" if dy < 0 else "center")
    ann.xyann = (dx * r * scale, dy * r * scale)
    return ann.get_window_extent(renderer).padded(pad_px)


def _free(box, frame, placed, points, marker_px: float) -> bool:
    """``box`` lies inside ``frame``, meets no box of ``placed`` and keeps ``marker_px`` from ``points``."""
    inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    clear = box.padded(marker_px)
    return inside and not any(box.overlaps(b) for b in placed) and not any(clear.contains(*p) for p in points)


def annotate_points(ax, points: Sequence[tuple[float, float]], labels: Sequence[str], *,
                    fontsize: float | Sequence[float] = 7, color: str | None | Sequence[str | None] = None,
                    pad_px: float = 1.5, marker_px: float = 8.0) -> list:
    """Label each point of a scatter so that no two labels overlap each other or a marker.

    Greedy in the order given: each label tries offsets on growing rings around its point (right,
    above, below, left, diagonals) and takes the first whose box (measured by the renderer) meets no
    label placed before, keeps ``marker_px`` pixels from every other point, and stays inside the
    axes; a label moved past the first ring gets a thin leader line to its point, and a light
    backdrop keeps a line under a label readable. If no offset is free the label goes to the first
    ring's right (it may then overlap). ``fontsize`` and ``color`` are one value or one per label.
    Call after every point is drawn and the limits are final. Returns the annotation artists.
    """
    fig = ax.figure
    ax.autoscale_view()
    renderer = fig.canvas.get_renderer()
    px = [tuple(p) for p in ax.transData.transform(points)] if len(points) else []
    frame = ax.get_window_extent(renderer)
    scale = 72.0 / fig.dpi  # pixels -> points
    sizes = [fontsize] * len(labels) if isinstance(fontsize, (int, float)) else list(fontsize)
    colors = list(color) if isinstance(color, (list, tuple)) else [color] * len(labels)
    placed, artists = [], []
    for i, (xy, text, fontsize, color) in enumerate(zip(points, labels, sizes, colors)):
        ann = ax.annotate(text, xy, textcoords="offset points", xytext=(0, 0), fontsize=fontsize, color=color,
                          bbox=_BACKDROP)
        others = [p for j, p in enumerate(px) if j != i]
        tries = ((r, d) for r in _RINGS for d in _DIRECTIONS)
        for r, d in tries:
            box = _label_box(ann, renderer, r, d, scale, pad_px)
            if _free(box, frame, placed, others, marker_px):
                break
        else:
            r, box = _RINGS[0], _label_box(ann, renderer, _RINGS[0], _DIRECTIONS[0], scale, pad_px)
        if r > _RINGS[0]:
            leader = dict(arrowstyle="-", lw=0.5, color=color or "0.4", shrinkA=0, shrinkB=3)
            ann.remove()
            ann = ax.annotate(text, xy, textcoords="offset points", xytext=ann.xyann, fontsize=fontsize, color=color,
                              ha=ann.get_ha(), va=ann.get_va(), arrowprops=leader, bbox=_BACKDROP)
        placed.append(box)
        artists.append(ann)
    return artists


# One colour per method, shared by every figure that draws methods side by side.
METHOD_COLORS = {"ce": "#1f77b4", "talr": "#d62728", "dft": "#2ca02c", "l2": "#9467bd", "lora": "#ff7f0e",
                 "flow": "#8c564b"}


def tradeoff_figure(path: str | Path, rows: Sequence[dict], title: str = "predicted trade-off") -> None:
    """Predicted domain gain vs predicted dL(P1), one line per method over the learning rates, each
    point labelled with its rate (`annotate_points`: no label overlaps another or a marker).
    ``rows``: dicts with ``method``, ``lr``, ``dL_P1_bits`` and ``domain_gain_bits``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    pts, labels, colors = [], [], []
    for meth in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == meth), key=lambda r: r["lr"])
        x = [max(r["dL_P1_bits"], 1e-3) for r in rs]
        y = [r["domain_gain_bits"] for r in rs]
        ax.plot(x, y, "o-", color=METHOD_COLORS.get(meth), label=meth, ms=4)
        pts += list(zip(x, y))
        labels += [f"{r['lr']:g}" for r in rs]
        colors += [METHOD_COLORS.get(meth)] * len(rs)
    ax.set_xscale("log")
    ax.set_xlabel("predicted dL(P1) (bits)")
    ax.set_ylabel("predicted domain gain (bits)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    annotate_points(ax, pts, labels, fontsize=6, color=colors)
    fig.tight_layout()
    save_figure(fig, path)
