"""The matched-gain frontier: the least general degradation a method reaches at domain gain >= g.

Comparing methods at equal learning rate and equal steps favours the one that learns slower (it
moves less on both axes). The fair comparison is on the trade-off plane of the paper's Figures
1-2 (domain gain on x, general degradation Delta L(P1) of Proposition 3.1 on y): for each method,
pool every point it reached (all its learning rates, every trajectory point of every run) and
read off

    D_m(g) = min { degradation(p) : p a point of method m with gain(p) >= g }     (nan if none)

the least degradation method m pays for at least g bits of domain gain. ``D_m`` is a
non-decreasing step function of ``g`` (a larger g leaves fewer points), defined up to the best
gain ``m`` ever reached and undefined (nan) above it.

Interpolation: **none.** Only points actually reached count; no straight line is drawn between
two trajectory points (training does not move along it, and a line would invent a model nobody
evaluated). A method evaluated more often can only look better through points it really reached,
so evaluate every method on the same schedule.

Units are the caller's: gains and degradations are numbers (bits per completion, bits per token);
nothing here assumes which.

Entries: :func:`frontier` (one method), :func:`gain_levels` (fractions of the best gain any method
reached, and absolute levels), :func:`best_at_levels` and :func:`claim_at_levels` (the
comparison, with "undecided" within a tolerance or where a method never reaches a level), and
:func:`matched_gain` (all of it as a ``summary.json``-ready dict).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Frontier", "frontier", "gain_levels", "within", "best_at_levels", "claim_at_levels", "matched_gain",
           "DEFAULT_FRACTIONS", "INTERPOLATION", "UNDECIDED"]

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
INTERPOLATION = "none"  # only points actually reached (module docstring)
UNDECIDED = "undecided"


@dataclass(frozen=True)
class Frontier:
    """``least[i]`` = least degradation over the points with gain >= ``levels[i]`` (nan where no
    point reaches it); ``at[i]`` = index of the point that realises it (-1 where none; among
    points of equal degradation the one with the larger gain, then the first in input order)."""

    levels: np.ndarray
    least: np.ndarray
    at: np.ndarray


def _finite_1d(name: str, x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {a.shape}")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(f"{name}[{int(bad[0])}] = {a[bad[0]]}: gains, degradations and levels must be finite")
    return a


def frontier(gain: Sequence[float], degradation: Sequence[float], levels: Sequence[float]) -> Frontier:
    """``D(g) = min { degradation[j] : gain[j] >= g }`` at every ``g`` in ``levels`` (module docstring).

    O((n + m) log n): points sorted by gain, descending, with a running minimum of the degradation;
    each level reads the prefix of points whose gain reaches it.
    """
    g = _finite_1d("gain", gain)
    d = _finite_1d("degradation", degradation)
    lv = _finite_1d("levels", levels)
    if g.shape != d.shape:
        raise ValueError(f"gain has {g.size} points but degradation has {d.size}")
    order = np.lexsort((np.arange(g.size), -g))  # gain descending, input order among equal gains
    run_min = np.minimum.accumulate(d[order]) if g.size else np.zeros(0)
    # index (into `order`) of the running minimum's first occurrence
    arg = np.zeros(g.size, dtype=np.int64)
    for k in range(1, g.size):
        arg[k] = k if d[order[k]] < run_min[k - 1] else arg[k - 1]
    n_reach = np.searchsorted(-g[order], -lv, side="right")  # points with gain >= level
    least = np.full(lv.size, np.nan)
    at = np.full(lv.size, -1, dtype=np.int64)
    hit = n_reach > 0
    least[hit] = run_min[n_reach[hit] - 1]
    at[hit] = order[arg[n_reach[hit] - 1]]
    return Frontier(lv, least, at)


def gain_levels(best_gain: float, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                absolute: Sequence[float] = ()) -> tuple[np.ndarray, list[float | None]]:
    """Gain levels ``fraction * best_gain`` (fractions in (0, 1]; only when ``best_gain > 0``) then
    the ``absolute`` levels. Returns ``(levels, fraction_of_each)`` with None for absolute ones."""
    if not math.isfinite(best_gain):
        raise ValueError(f"best_gain = {best_gain}: must be finite")
    for f in fractions:
        if not (isinstance(f, (int, float)) and 0 < f <= 1):
            raise ValueError(f"gain fraction {f!r}: expected a number in (0, 1]")
    fr = [float(f) for f in fractions] if best_gain > 0 else []
    ab = [float(a) for a in _finite_1d("absolute", list(absolute))]
    return np.array([f * best_gain for f in fr] + ab), [*fr, *[None] * len(ab)]


def within(x: float, y: float, tol: float = 0.0, rel_tol: float = 0.0) -> bool:
    """``|x - y| <= max(tol, rel_tol * max(|x|, |y|))``: two degradations too close to call."""
    return abs(x - y) <= max(tol, rel_tol * max(abs(x), abs(y)))


def best_at_levels(least: Mapping[str, np.ndarray], tol: float = 0.0, rel_tol: float = 0.0) -> list[str | None]:
    """Per level: the method with the least degradation among those that reach it; `UNDECIDED`
    when the runner-up is `within` tolerance of it; None when no method reaches the level."""
    names = list(least)
    table = np.array([np.asarray(least[m], dtype=np.float64) for m in names]).reshape(len(names), -1)
    out: list[str | None] = []
    for col in table.T:
        ok = np.flatnonzero(~np.isnan(col))
        if ok.size == 0:
            out.append(None)
            continue
        ranked = ok[np.argsort(col[ok], kind="stable")]
        if ranked.size > 1 and within(col[ranked[0]], col[ranked[1]], tol, rel_tol):
            out.append(UNDECIDED)
        else:
            out.append(names[ranked[0]])
    return out


def claim_at_levels(least_a: np.ndarray, least_b: np.ndarray, tol: float = 0.0,
                    rel_tol: float = 0.0) -> tuple[list[str], str]:
    """The claim "method a keeps general ability better than method b at matched gain", level by level.

    Per level: ``"yes"`` (a degrades less than b, beyond tolerance), ``"no"`` (more, beyond
    tolerance), `UNDECIDED` (within tolerance, or a method never reaches the level). Overall:
    ``"holds"`` (yes somewhere, no nowhere), ``"fails"`` (no somewhere, yes nowhere), ``"mixed"``
    (both) or `UNDECIDED` (no level decided)."""
    per = []
    for a, b in zip(np.asarray(least_a, dtype=np.float64), np.asarray(least_b, dtype=np.float64)):
        if np.isnan(a) or np.isnan(b) or within(a, b, tol, rel_tol):
            per.append(UNDECIDED)
        else:
            per.append("yes" if a < b else "no")
    yes, no = "yes" in per, "no" in per
    return per, ("mixed" if yes and no else "holds" if yes else "fails" if no else UNDECIDED)


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def matched_gain(points: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, absolute: Sequence[float] = (),
                 claim: tuple[str, str] = ("talr", "ce"), tol: float = 0.0, rel_tol: float = 0.0,
                 labels: Mapping[str, Sequence] | None = None) -> dict:
    """The matched-gain comparison of one variant, ready for ``summary.json``.

    ``points``: method -> (gains, degradations) of every point it reached (all rates, every
    trajectory point). ``labels``: method -> one JSON-able label per point (e.g. ``{"lr": 3e-4,
    "step": 120}``), reported as the point realising each level (where to run the expensive
    evaluations). ``claim = (a, b)``: the claim "a keeps general ability better than b" is judged
    (`claim_at_levels`) when both methods are present.

    Returns ``{"interpolation": "none", "tol", "rel_tol", "best_gain", "levels" [gain per level],
    "level_fractions" [fraction or None], "least_degradation" {method: [value or None]},
    "best" [method | "undecided" | None], "wins" {method: levels it is best at},
    "claim" {"a", "b", "per_level", "verdict"} or None, and "at" {method: [label or None]}
    when labels are given}``.
    """
    if not points:
        raise ValueError("matched_gain: no methods")
    for name, (g, d) in points.items():
        if len(g) != len(d):
            raise ValueError(f"method {name!r}: {len(g)} gains but {len(d)} degradations")
    all_g = [float(x) for g, _ in points.values() for x in g]
    best_gain = max(all_g) if all_g else 0.0
    levels, fracs = gain_levels(best_gain, fractions, absolute)
    fr = {m: frontier(g, d, levels) for m, (g, d) in points.items()}
    least = {m: f.least for m, f in fr.items()}
    best = best_at_levels(least, tol, rel_tol)
    out = {"interpolation": INTERPOLATION, "tol": tol, "rel_tol": rel_tol, "best_gain": best_gain,
           "levels": [float(x) for x in levels], "level_fractions": fracs,
           "least_degradation": {m: [_json_float(x) for x in v] for m, v in least.items()},
           "best": best, "wins": {m: best.count(m) for m in points}, "claim": None}
    a, b = claim
    if a in points and b in points:
        per, verdict = claim_at_levels(least[a], least[b], tol, rel_tol)
        out["claim"] = {"a": a, "b": b, "statement": f"{a} keeps general ability better than {b} at matched gain",
                        "per_level": per, "verdict": verdict}
    if labels is not None:
        out["at"] = {m: [None if i < 0 else labels[m][int(i)] for i in f.at] for m, f in fr.items()}
    return out
