"""The record one ledger check returns (:class:`Claim`) and its tightness quantiles."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Claim", "quantiles", "power", "power_identity"]


@dataclass
class Claim:
    """One checked statement: verdict, instances, violations, smallest counterexample,
    tightness quantiles (bound / actual) and a note with the numbers behind the verdict.
    ``corrects``: the id of the paper statement a corrected statement replaces."""

    id: str
    statement: str
    verdict: str
    n_instances: int
    n_violations: int = 0
    counterexample: dict | None = None
    tightness: dict | None = None  # quantiles of bound / actual
    note: str = ""
    corrects: str | None = None
    power: dict | None = None  # violation rate of the statement made 1% / 10% too strong
    n_hard: int | None = None  # instances from the hard family (None: the check has no such instances, see note)

    @property
    def power_text(self) -> str:
        """``"1%: 0.3%, 10%: 12%"``, or a sentence when the check catches neither strengthening."""
        if not self.power:
            return "not defined for this check (see note)"
        if all(v == 0 for v in self.power.values()):
            return "catches neither the 1% nor the 10% stronger statement (no power at this resolution)"
        return ", ".join(f"{k} stronger: {100 * v:.3g}% of instances violate" for k, v in self.power.items())

    def to_dict(self) -> dict:
        return asdict(self)


def quantiles(x) -> dict | None:
    """min/p10/median/p90/max of the finite entries of ``x`` (None when there are none)."""
    x = np.asarray([v for v in np.ravel(x) if np.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return None
    qs = np.quantile(x, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {k: float(v) for k, v in zip(["min", "p10", "median", "p90", "max"], qs)}


def power(actual, bound, lower: bool = False, tol: float = 1e-9) -> dict:
    """The violation rate of an upper bound ``actual <= bound`` made 1% and 10% too strong
    (``bound - x |bound|``; for a lower bound, ``lower=True``, ``bound + x |bound|``): how often
    the check would catch a statement that is wrong by that much."""
    a, b = np.ravel(np.asarray(actual, dtype=np.float64)), np.ravel(np.asarray(bound, dtype=np.float64))
    if lower:
        a, b = -a, -b
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size == 0:
        return {"1%": float("nan"), "10%": float("nan")}
    return {f"{x:.0%}": float(np.mean(a > b - x * np.abs(b) + tol * np.maximum(1.0, np.abs(a))))
            for x in (0.01, 0.1)}


def power_identity(lhs, rhs, tol) -> dict:
    """The violation rate of an identity ``lhs = rhs`` (checked to ``tol``, scalar or per instance)
    made 1% and 10% wrong, ``lhs = (1 + x) rhs``: how often the check would catch that error."""
    a, b = np.ravel(np.asarray(lhs, dtype=np.float64)), np.ravel(np.asarray(rhs, dtype=np.float64))
    t = np.broadcast_to(np.asarray(tol, dtype=np.float64), a.shape) if np.ndim(tol) else np.full(a.shape, float(tol))
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return {"1%": float("nan"), "10%": float("nan")}
    a, b, t = a[ok], b[ok], np.ravel(t)[ok]
    return {f"{x:.0%}": float(np.mean(np.abs(a - (1 + x) * b) > t)) for x in (0.01, 0.1)}
