"""When does a held-out code length stop improving? A stated, testable stopping criterion.

``Plateau(patience=K, rel_tol=X, abs_tol=A)`` is met at evaluation ``i`` (``i >= K``, 0-based)
when the last ``K`` evaluations ``v[i-K+1..i]`` improve on the best value before them,
``best = min(v[0..i-K])``, by no more than ``max(X * |best|, A)``:

    best - min(v[i-K+1..i]) <= max(X * |best|, A)

The criterion's step is ``steps[i]`` of the first such ``i`` (None when it is never met, e.g.
with fewer than ``K + 1`` evaluations). Lower values are better (code lengths, losses). A
value that gets worse counts as no improvement. ``abs_tol`` keeps the criterion meaningful when
the code length approaches 0 bits (a deterministic completion), where a relative tolerance alone
would demand ever smaller absolute gains.

Pure Python + numpy (no torch): `sft.trajectory.TrajectoryCallback` applies it during training
(``stop_on=``), a study applies it to a finished trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from theory.checks import check_range

__all__ = ["Plateau"]


@dataclass(frozen=True)
class Plateau:
    """No improvement of more than ``max(rel_tol * best, abs_tol)`` over the best earlier value
    in the last ``patience`` evaluations (module docstring)."""

    patience: int = 3
    rel_tol: float = 0.01
    abs_tol: float = 0.0

    def __post_init__(self):
        check_range("patience", self.patience, 1, integer=True)
        check_range("rel_tol", self.rel_tol, 0)
        check_range("abs_tol", self.abs_tol, 0)

    def describe(self, what: str = "the held-out domain code length") -> str:
        """The criterion in words, for a report."""
        tol = f"{100 * self.rel_tol:g}% of the best earlier value"
        if self.abs_tol > 0:
            tol = f"max({tol}, {self.abs_tol:g} bits)"
        return (f"{what} stops improving at the first evaluation after which none of the last {self.patience} "
                f"evaluations improves on the best value before them by more than {tol}")

    def met_at(self, steps: Sequence[int], values: Sequence[float]) -> int | None:
        """The step at which the criterion is first met, or None (module docstring)."""
        s = np.asarray(steps)
        v = np.asarray(values, dtype=np.float64)
        if s.shape != v.shape or v.ndim != 1:
            raise ValueError(f"{s.size} steps but {v.size} values (both 1-D)")
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            raise ValueError(f"value at step {s[bad[0]]} is {v[bad[0]]}: the criterion needs finite values")
        if s.size > 1 and not np.all(np.diff(s) > 0):
            raise ValueError("steps must be strictly increasing")
        K = self.patience
        if v.size <= K:
            return None
        best_before = np.minimum.accumulate(v)[: v.size - K]  # best of v[0..i-K] for i = K..n-1
        window = np.lib.stride_tricks.sliding_window_view(v[1:], K).min(axis=1)  # min v[i-K+1..i]
        met = best_before - window <= np.maximum(self.rel_tol * np.abs(best_before), self.abs_tol)
        hit = np.flatnonzero(met)
        return int(s[K + hit[0]]) if hit.size else None
