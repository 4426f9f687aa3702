"""Scores of a forecast against measured runs (pure numpy/scipy; hand-checkable).

Every function takes per-configuration arrays aligned on one grid: ``method`` (str),
``lr_index`` (position in the sorted learning-rate grid), the forecast and the seed-mean
measurement.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import spearmanr

__all__ = ["spearman", "spearman_within_lr", "within_2x", "advisor_choice", "hindsight_best", "advisor_scores",
           "budgets_over"]


def spearman(a, b) -> float:
    """Spearman rank correlation (scipy); NaN when either side is constant or too short."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def spearman_within_lr(lr_index, forecast, measured) -> float:
    """Mean over learning rates of the Spearman across the configurations at that rate."""
    lr_index = np.asarray(lr_index)
    vals = [spearman(np.asarray(forecast)[lr_index == i], np.asarray(measured)[lr_index == i])
            for i in np.unique(lr_index)]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def within_2x(forecast, measured, zero_tol: float = 0.0) -> float:
    """Fraction of configurations counted within 2x: |forecast - measured| <= max(|forecast|,
    |measured|) / 2 (for values of one sign: forecast / measured in [1/2, 2]), or both within
    ``zero_tol`` of zero (near-zero changes have no meaningful ratio; the studies pass 0.01
    bits/token in their unit)."""
    f, m = np.asarray(forecast, float), np.asarray(measured, float)
    ok = np.abs(f - m) <= np.maximum(np.abs(f), np.abs(m)) / 2
    ok &= (f * m > 0) | (f == m)
    ok |= (np.abs(f) <= zero_tol) & (np.abs(m) <= zero_tol)
    return float(np.mean(ok & np.isfinite(f) & np.isfinite(m)))


def advisor_choice(dl, gain, budget: float, gain_tol: float = 0.0) -> int:
    """Index of `sft.forecast.advise`'s choice on these arrays (largest gain with dl <= budget,
    gains within ``gain_tol`` x the largest tied and broken by the smaller dl); -1 if none."""
    from .forecast import advise

    rows = [{"i": i, "dL_P1_bits": float(d), "domain_gain_bits": float(g)} for i, (d, g) in enumerate(zip(dl, gain))]
    best, _ = advise(rows, budget, gain_tol=gain_tol)
    return -1 if best is None else int(best["i"])


def hindsight_best(measured_dl, measured_gain, budget: float) -> int:
    """The measured best: largest measured gain with measured dL(P1) <= budget."""
    return advisor_choice(measured_dl, measured_gain, budget)


def budgets_over(measured_dl, n: int = 6) -> np.ndarray:
    """``n`` budgets log-spaced between the 20th and the 95th percentile of the positive measured dL."""
    m = np.asarray(measured_dl, float)
    m = m[np.isfinite(m) & (m > 0)]
    return np.geomspace(np.quantile(m, 0.2), np.quantile(m, 0.95), n)


def _step_down_gain(method, lr_index, gain, h: int) -> float:
    """Measured gain of the hindsight best's method one learning-rate step lower; at the lowest
    rate, extrapolated geometrically from the two lowest (gain(h)^2 / gain one step up)."""
    same = method == method[h]
    lower = np.flatnonzero(same & (lr_index == lr_index[h] - 1))
    if lower.size:
        return float(gain[lower[0]])
    upper = np.flatnonzero(same & (lr_index == lr_index[h] + 1))
    if upper.size and gain[upper[0]] > gain[h] > 0:
        return float(gain[h] ** 2 / gain[upper[0]])
    return float(gain[h])


def advisor_scores(method, lr_index, fc_dl, fc_gain, ms_dl, ms_gain, budgets) -> dict:
    """Hit rate, within-budget rate (the choice's measured dL <= 2 x budget) and gain lost over ``budgets``.

    A hit: the choice is within one grid step of the hindsight best -- the best's method at a
    learning rate at most one step away, or a choice that is feasible (measured dL <= budget)
    and gains at least what the best's method gains one learning-rate step below the best
    (it loses no more than one grid step). Where the measured gain is flat in the rate (the best at the lowest
    rate gaining more than one step up) no step's loss is defined and only the best itself is a hit, so near-ties
    count as misses; the gain lost, (best's measured gain - the choice's) / best's (None where nothing is chosen or
    the best gains nothing; negative where the choice gains more, measured over the budget), says by how much.
    ``advisor_gain_lost``: its mean over the budgets where it is defined (None if none)."""
    from .forecast import GAIN_TOL

    method, lr_index = np.asarray(method), np.asarray(lr_index)
    hits, inside, rows, lost = [], [], [], []
    for b in budgets:
        c = advisor_choice(fc_dl, fc_gain, b, gain_tol=GAIN_TOL)
        h = hindsight_best(ms_dl, ms_gain, b)
        if h < 0:
            continue  # nothing measured is feasible: the budget says nothing
        hit = c >= 0 and (bool(method[c] == method[h] and abs(int(lr_index[c]) - int(lr_index[h])) <= 1)
                          or bool(ms_dl[c] <= b and ms_gain[c] >= _step_down_gain(method, lr_index, ms_gain, h)))
        ok = c >= 0 and float(ms_dl[c]) <= 2 * b
        gl = float((ms_gain[h] - ms_gain[c]) / ms_gain[h]) if c >= 0 and ms_gain[h] > 0 else None
        hits.append(hit)
        inside.append(ok)
        if gl is not None:
            lost.append(gl)
        rows.append({"budget_bits": float(b), "choice": int(c), "best": int(h), "hit": bool(hit),
                     "within_budget": bool(ok), "gain_lost": gl})
    return {"advisor_hit_rate": float(np.mean(hits)) if hits else float("nan"),
            "advisor_within_budget": float(np.mean(inside)) if inside else float("nan"),
            "advisor_gain_lost": float(np.mean(lost)) if lost else None, "budgets": rows}
