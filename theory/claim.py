"""The record one ledger check returns (:class:`Claim`) and its tightness quantiles."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Claim", "quantiles"]


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

    def to_dict(self) -> dict:
        return asdict(self)


def quantiles(x) -> dict | None:
    """min/p10/median/p90/max of the finite entries of ``x`` (None when there are none)."""
    x = np.asarray([v for v in np.ravel(x) if np.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return None
    qs = np.quantile(x, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {k: float(v) for k, v in zip(["min", "p10", "median", "p90", "max"], qs)}
