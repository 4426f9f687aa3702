"""Change of measure (Gibbs / Donsker-Varadhan) bounds of a mean gap, row by row.

For distributions ``p << q`` on a finite set and a function ``c`` with ``E_q c = 0``, the
variational principle ``KL(p||q) = sup_g { E_p g - log E_q e^g }`` (equality at
``g = log dp/dq``) with ``g = t c`` gives, for every ``t > 0``,

    (DV)   E_p c  <=  [ KL(p||q) + Lambda(t) ] / t,      Lambda(t) := log E_q exp(t c).

The infimum over ``t`` is the value of ``sup { E_r c : KL(r||q) <= KL(p||q) }`` (Lagrange
duality of a concave objective over a convex set): the maximiser is the *tilt*
``r_t ∝ q e^{t c}``, whose divergence ``h(t) := KL(r_t||q) = t Lambda'(t) - Lambda(t)`` grows with
``t`` (``h'(t) = t Var_{r_t}(c) >= 0``) from 0 to ``-log q(argmax c)``. Differentiating,
``d/dt [(K + Lambda)/t] = (h(t) - K) / t^2``: the objective falls while ``h(t) < K`` and rises
after, so the infimum is attained at the root ``t*`` of ``h(t*) = K`` (found by bisection in
``log t``) and equals ``Lambda'(t*) = E_{r_t*} c``. When ``K >= -log q(argmax c)`` no root exists,
the objective falls for all ``t`` and the infimum is its limit ``max_a c_a`` -- the *cap*, which
also holds directly (``E_p c <= max c`` on q's support). No bound that sees ``p`` only through
``KL(p||q)`` is smaller: the tilt ``r_t*`` has the same KL and attains it.

Numerics. Any ``t > 0`` gives a valid bound, so the bisection only *chooses* ``t``. ``Lambda`` is
``log1p(E_q expm1(t c))`` where that is small (no cancellation at small ``t``), else a log-sum-exp;
probabilities stay in log space (a finite ``log q`` of -1,500 is in the support). Rows wider than
``2 bins`` (a 49,152-token vocabulary) are first compressed to a mean-preserving spread on ``bins``
bins (:func:`compress`) whose log-MGF is ``>= Lambda`` at every ``t``: bounds from it stay valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["log_mgf", "tilt_kl", "solve_t", "Rep", "compress", "dv_rows", "global_t"]

_TINY = -700.0  # log q below this: the mass is handled in log space (exp underflows at -745)
_SPAN = 1e9     # t is searched in [1e-9, 1e9] / max|c|


def _lse(z: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp (``-inf`` for an all ``-inf`` row)."""
    m = z.max(-1)
    ms = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return ms + np.log(np.exp(z - ms[..., None]).sum(-1))


def log_mgf(lq: np.ndarray, c: np.ndarray, t) -> np.ndarray:
    """``Lambda(t) = log E_q exp(t c)`` per row, ``t >= 0`` scalar or one per row.

    ``lq``: normalised natural-log probabilities (``-inf`` off the support); ``c`` finite on it.
    The ``log1p(E_q expm1(t c))`` form is used where ``|E_q expm1(t c)| < 1/2`` (exact near
    ``t = 0``), the log-sum-exp form elsewhere; masses below ``exp(-700)`` enter as
    ``exp(log q + t c) - q``, never as a zero.
    """
    t = np.asarray(t, dtype=np.float64)
    tt = t[..., None] if t.ndim else t
    sup = np.isfinite(lq)
    with np.errstate(over="ignore", invalid="ignore"):
        tc = np.where(sup, tt * c, 0.0)
        z = np.where(sup, lq + tc, -np.inf)
        lse = _lse(z)
        big = lq > _TINY
        q = np.exp(np.where(big, lq, -np.inf))
        terms = np.where(big, q * np.expm1(np.minimum(tc, 700.0)), np.exp(z) - np.exp(lq))
        terms = np.where(big & (tc > 700.0), np.inf, terms)
        M = np.where(sup, terms, 0.0).sum(-1)
        small = np.isfinite(M) & (np.abs(M) < 0.5)
        return np.where(small, np.log1p(np.where(small, M, 0.0)), lse)


def tilt_kl(lq: np.ndarray, c: np.ndarray, t, norm=None) -> tuple[np.ndarray, np.ndarray]:
    """``(KL(r_t||q), E_{r_t} c)`` per row for the tilt ``r_t ∝ q e^{t c}`` (chooses ``t``); ``c`` must
    be finite (0 off q's support), ``norm``: ``log sum q`` per row when already known."""
    t = np.asarray(t, dtype=np.float64)
    tt = t[..., None] if t.ndim else t
    z = lq + tt * c
    lam = _lse(z)
    r = np.exp(z - lam[..., None])
    Er = (r * c).sum(-1)
    return np.maximum(t * Er - lam + (_lse(lq) if norm is None else norm), 0.0), Er


def _scale(lq: np.ndarray, c: np.ndarray) -> np.ndarray:
    s = np.where(np.isfinite(lq), np.abs(c), 0.0).max(-1)
    return np.where(s > 0, s, 1.0)


def solve_t(lq: np.ndarray, c: np.ndarray, K: np.ndarray, iters: int = 40) -> np.ndarray:
    """The root ``t*`` of ``KL(r_t||q) = K`` per row (bisection in ``log t`` on all rows at once;
    the top of the bracket, ``1e9 / max|c|``, when ``K`` is beyond the tilt's reach)."""
    sc = _scale(lq, c)
    c = np.where(np.isfinite(lq), c, 0.0)
    norm = _lse(lq)
    lo = np.full(sc.shape, np.log(1.0 / _SPAN)) - np.log(sc)
    hi = np.full(sc.shape, np.log(_SPAN)) - np.log(sc)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = tilt_kl(lq, c, np.exp(mid), norm)[0] < K
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.exp(0.5 * (lo + hi))


@dataclass(frozen=True)
class Rep:
    """Rows as ``(log mass, c)`` atoms whose log-MGF is ``>= Lambda`` at every ``t`` (equal to it when
    the rows were not compressed); ``width``: the bin width per row (0: exact)."""

    lm: np.ndarray
    c: np.ndarray
    width: np.ndarray


def compress(lq: np.ndarray, c: np.ndarray, bins: int = 512, q=None) -> Rep:
    """Rows no wider than ``2 bins`` are kept exact. Wider rows: ``c``'s range is cut into ``bins``
    equal bins; each bin's mass ``m`` with mean ``cbar`` in ``[lo, hi]`` becomes two atoms, at ``lo``
    with mass ``m (hi - cbar)/(hi - lo)`` and at ``hi`` with ``m (cbar - lo)/(hi - lo)`` -- a
    mean-preserving spread, so ``E e^{t c}`` can only grow (``e^{tc}`` is convex; Edmundson-Madansky):
    ``Lambda_rep(t) >= Lambda(t)`` for every ``t``, and the excess is ``O(t^2 w^2)`` per unit mass
    (``w`` the bin width), the bound's ``O(t w^2)``. Masses below ``exp(-700)`` of the row's largest
    form one more atom at the largest ``c`` among them. ``c`` must be 0 off q's support; ``q``:
    ``exp(lq)`` when already computed."""
    n, K = lq.shape
    sup = np.isfinite(lq)
    full = bool(sup.all())
    if K <= 2 * bins:
        return Rep(lq, c if full else np.where(sup, c, 0.0), np.zeros(n))
    cmin = (c if full else np.where(sup, c, np.inf)).min(1)
    cmax = (c if full else np.where(sup, c, -np.inf)).max(1)
    w = (cmax - cmin) / bins
    ws = np.where(w > 0, w, 1.0)
    idx = np.clip(((c - cmin[:, None]) / ws[:, None]).astype(np.int64), 0, bins - 1)
    m = lq.max(1)
    drop = sup & (lq < (m + _TINY)[:, None]) if float((lq - m[:, None]).min()) < _TINY else None
    if drop is None and q is not None:
        qs, m = q, np.zeros(n)
    else:
        qs = np.exp(lq - m[:, None])
        if drop is not None:
            qs[drop] = 0.0
    idx += (np.arange(n) * bins)[:, None]
    mass = np.bincount(idx.ravel(), weights=qs.ravel(), minlength=n * bins).reshape(n, bins)
    mc = np.bincount(idx.ravel(), weights=(qs * c).ravel(), minlength=n * bins).reshape(n, bins)
    lo = cmin[:, None] + np.arange(bins)[None, :] * w[:, None]
    hi = lo + w[:, None]
    hi[:, -1] = cmax
    with np.errstate(divide="ignore", invalid="ignore"):
        cbar = np.clip(np.where(mass > 0, mc / np.where(mass > 0, mass, 1.0), lo), lo, hi)
        frac_hi = np.where(hi > lo, (cbar - lo) / np.where(hi > lo, hi - lo, 1.0), 1.0)
        parts_lm = [np.log(mass * (1 - frac_hi)) + m[:, None], np.log(mass * frac_hi) + m[:, None]]
    parts_c = [lo, hi]
    if drop is not None:
        c_d = np.where(drop, c, -np.inf).max(1)
        parts_lm.append(_lse(np.where(drop, lq, -np.inf))[:, None])
        parts_c.append(np.where(np.isfinite(c_d), c_d, 0.0)[:, None])
    return Rep(np.concatenate(parts_lm, 1), np.concatenate(parts_c, 1), np.where(w > 0, w, 0.0))


def dv_rows(lq: np.ndarray, c: np.ndarray, K: np.ndarray, rep: Rep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the DV bound ``min(inf_t (K + Lambda(t))/t, max c)`` (``Lambda`` from ``rep``: exact or
    an upper bound, so the value stays valid), its ``t`` and the cap ``max_a c_a`` over q's support."""
    sup = np.isfinite(lq)
    cap = np.where(sup, c, -np.inf).max(-1)
    cap = np.where(np.isfinite(cap), cap, 0.0)
    t = solve_t(rep.lm, rep.c, K)
    with np.errstate(over="ignore"):
        val = (K + log_mgf(rep.lm, rep.c, t)) / t
    return np.minimum(np.where(np.isnan(val), np.inf, val), cap), t, cap


def global_t(w: np.ndarray, K: np.ndarray, rep: Rep, group=None, iters: int = 60):
    """One ``t`` for all rows (weights ``w``): the root of ``sum w KL(r_t,u||q_u) = sum w K_u``
    and ``[sum w K_u + sum w Lambda_u(t)] / t`` there (bisection and value on ``rep``). Returns ``(bound, t)``; with ``group`` (an int per row), one ``t`` per group, all
    groups bisected at once, and arrays ``(bound[G], t[G])``."""
    g = np.zeros(w.size, dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    G = int(g.max()) + 1 if g.size else 1
    Kbar = np.bincount(g, weights=w * K, minlength=G)
    sc = np.ones(G)
    if w.size:
        np.maximum.at(sc, g, _scale(rep.lm, rep.c))
    lo, hi = np.log(1.0 / _SPAN / sc), np.log(_SPAN / sc)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = np.bincount(g, weights=w * tilt_kl(rep.lm, rep.c, np.exp(mid)[g])[0], minlength=G) < Kbar
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    t = np.exp(0.5 * (lo + hi))
    with np.errstate(over="ignore", invalid="ignore"):
        val = (Kbar + np.bincount(g, weights=w * log_mgf(rep.lm, rep.c, t[g]), minlength=G)) / t
    val = np.where(np.isnan(val), np.inf, val)
    return (float(val[0]), float(t[0])) if group is None else (val, t)
