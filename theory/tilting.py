"""Exponential tilting (Definition B.3), smoothing (Assumption B.1), schedules lambda_t and
the effective step fitted from a real update (Theorem B.1 (= E.1), Step 5).

Everything works on per-node conditional arrays ``[N, K]`` (``K = V + 1``, EOS last) in
natural-log space, vectorised over all nodes at once. Rows are independent prefixes u.

Invariant kept by :func:`tilt_log`: every output row is a normalised log-distribution
(``logsumexp == 0`` to rounding); ``lam == 0`` returns ``logq`` and ``lam == 1``
returns ``logp`` bit-for-bit (Definition B.3's boundary cases), also where ``logp`` has
``-inf`` entries (an unsmoothed target).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "log_softmax",
    "smooth",
    "log_ratio",
    "tilt_log",
    "tilt",
    "schedule",
    "lambda_from_lr",
    "EffectiveStep",
    "fit_effective_step",
]


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Row-wise log-softmax (max-shifted; ``-inf`` entries stay ``-inf``)."""
    x = np.asarray(x, dtype=np.float64)
    mx = np.max(x, axis=axis, keepdims=True)
    if not np.all(np.isfinite(mx)):
        mx = np.where(np.isfinite(mx), mx, 0.0)
    z = x - mx
    e = np.exp(z)
    with np.errstate(divide="ignore"):
        z -= np.log(e.sum(axis=axis, keepdims=True))
    return z


def smooth(p_hat: np.ndarray, alpha: float, rho: np.ndarray | None = None) -> np.ndarray:
    """Smoothed target ``p~ = (1 - alpha) p^ + alpha rho`` (Assumption B.1).

    Args:
        p_hat: empirical target conditionals ``[N, K]`` (rows sum to 1, zeros allowed).
        alpha: mixing weight in ``(0, 1)`` (``0`` allowed: no smoothing).
        rho: strictly positive reference ``[N, K]`` (e.g. the current model ``q_t``);
            ``None`` means uniform.
    """
    p_hat = np.asarray(p_hat, dtype=np.float64)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (Assumption B.1), got {alpha}")
    if rho is None:
        rho = np.full_like(p_hat, 1.0 / p_hat.shape[-1])
    rho = np.asarray(rho, dtype=np.float64)
    if rho.shape != p_hat.shape:
        raise ValueError(f"rho has shape {rho.shape}, p_hat {p_hat.shape}")
    if alpha > 0 and np.any(rho <= 0):
        raise ValueError("rho must be strictly positive (Assumption B.1)")
    return (1.0 - alpha) * p_hat + alpha * rho


def log_ratio(logq: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """``r_u(a) = log p~(a|u) - log q(a|u)`` (Definition B.3); also ``f`` of Appendix E.2."""
    return np.asarray(logp, dtype=np.float64) - np.asarray(logq, dtype=np.float64)


def _lam_col(lam, n: int) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)
    if lam.ndim == 0:
        lam = np.full(n, float(lam))
    if lam.shape != (n,):
        raise ValueError(f"lam must be a scalar or have shape ({n},), got {lam.shape}")
    return lam[:, None]


def tilt_log(logq: np.ndarray, logp: np.ndarray, lam) -> np.ndarray:
    """One tilting step in log space (Definition B.3), all rows at once.

    ``log q^_{t+1}(.|u) = log_softmax((1 - lam_u) log q_t(.|u) + lam_u log p~(.|u))``.

    Args:
        logq: ``[N, K]`` normalised log-conditionals of the current model.
        logp: ``[N, K]`` normalised log-target (``-inf`` allowed where p~ = 0).
        lam: scalar or ``[N]`` per-node weights; any real value (``[0, 1]`` in the paper).
    """
    logq = np.asarray(logq, dtype=np.float64)
    logp = np.asarray(logp, dtype=np.float64)
    if logq.shape != logp.shape or logq.ndim != 2:
        raise ValueError(f"logq {logq.shape} and logp {logp.shape} must be equal [N, K]")
    if np.ndim(lam) == 0:  # fast path: one weight for every node
        lam = float(lam)
        if lam == 0.0:
            return logq
        if lam == 1.0:
            return logp
        if 0.0 < lam < 1.0:  # both factors positive: no 0 * inf, no nan
            mixed = logq * (1.0 - lam)
            mixed += lam * logp
            return log_softmax(mixed)
    lam = _lam_col(lam, logq.shape[0])
    with np.errstate(invalid="ignore"):
        # 0 * -inf is nan; those entries are fixed by the exact boundary cases below
        mixed = (1.0 - lam) * logq + lam * logp
    out = log_softmax(np.where(np.isnan(mixed), -np.inf, mixed))
    out = np.where(lam == 0.0, logq, out)
    return np.where(lam == 1.0, logp, out)


def tilt(q: np.ndarray, p: np.ndarray, lam) -> np.ndarray:
    """Probability-space form of :func:`tilt_log`: ``q^{1-lam} p~^lam / Z``."""
    with np.errstate(divide="ignore"):
        return np.exp(tilt_log(np.log(q), np.log(p), lam))


# ------------------------------------------------------------------- schedules
def schedule(
    kind: str,
    T: int,
    lam: float,
    *,
    warmup: int = 0,
    lam_min: float = 0.0,
) -> np.ndarray:
    """Per-step weights ``lam_t`` (``t = 0..T-1``).

    kinds:
        ``constant``: ``lam`` every step (the equal-steps schedule of Theorem B.2 (= E.4));
        ``cosine``: linear warm-up over ``warmup`` steps, then cosine from ``lam`` to ``lam_min``;
        ``linear``: linear warm-up, then linear decay from ``lam`` to ``lam_min``;
        ``inverse``: ``lam / T`` every step (the ``lam_t ~ 1/T`` scaling of Theorem B.2 (= E.4)).
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if warmup < 0 or (warmup and warmup >= T):
        raise ValueError(f"warmup must be in [0, T), got {warmup} with T={T}")
    t = np.arange(T, dtype=np.float64)
    if kind == "constant":
        return np.full(T, float(lam))
    if kind == "inverse":
        return np.full(T, float(lam) / T)
    if kind not in ("cosine", "linear"):
        raise ValueError(f"unknown schedule {kind!r} (constant, inverse, cosine, linear)")
    warm = (t + 1) / warmup * lam if warmup else np.full(T, float(lam))
    frac = np.clip((t - warmup) / max(T - warmup, 1), 0.0, 1.0)
    if kind == "cosine":
        decay = lam_min + (lam - lam_min) * 0.5 * (1 + np.cos(np.pi * frac))
    else:
        decay = lam - (lam - lam_min) * frac
    return np.where(t < warmup, warm, decay)


def lambda_from_lr(lrs: np.ndarray, lam_per_lr: float) -> np.ndarray:
    """``lam_t = lam_per_lr * lr_t``: tilting weights from a learning-rate schedule.

    ``lam_per_lr`` is the slope fitted on a real run (first-order: the effective step of
    Theorem E.1 is proportional to the learning rate, see :func:`fit_effective_step`)."""
    lrs = np.asarray(lrs, dtype=np.float64)
    if np.any(lrs < 0):
        raise ValueError("learning rates must be >= 0")
    return lam_per_lr * lrs


# ------------------------------------------------------- effective step (E.1)
@dataclass
class EffectiveStep:
    """Theorem B.1 (= E.1), Step 5, per node (arrays ``[N]``) and pooled (scalars).

    Attributes:
        lam: ``lam_{t,u} = E_qt[s r_c] / E_qt[r_c^2]`` (q_t-least squares).
        residual: ``||log q_{t+1} - log q^(lam_{t,u})||_{t,u}`` -- the quantity of
            Theorem B.1 (constant offset included).
        residual_centered: ``||s - lam_{t,u} r_c||_{t,u}`` (Step 5, without ``C(lam)``).
        misalignment: ``residual_centered / ||s||_{t,u}``: the sine of the angle between
            the true shift and the tilting direction; Step 5 silently assumes it is
            O(sqrt(eps)).
        eps: ``KL(q_t || q_{t+1})`` per node (Assumption B.2).
        s_norm: ``||s||_{t,u}``.
        lam_pooled, residual_pooled, eps_pooled: the same with one lam for all nodes,
            least squares weighted by ``weights`` (e.g. node mass).
    """

    lam: np.ndarray
    residual: np.ndarray
    residual_centered: np.ndarray
    misalignment: np.ndarray
    eps: np.ndarray
    s_norm: np.ndarray
    lam_pooled: float
    residual_pooled: float
    eps_pooled: float


def fit_effective_step(
    logq_t: np.ndarray,
    logq_t1: np.ndarray,
    logp: np.ndarray,
    weights: np.ndarray | None = None,
) -> EffectiveStep:
    """Fit the effective tilting step of a real update ``q_t -> q_{t+1}`` (Theorem B.1 (= E.1)).

    ``s = log(q_{t+1}/q_t) - E_qt[.]``, ``r_c = r - E_qt[r]``, ``lam = <s, r_c> / <r_c, r_c>``
    in ``L2(q_t)``. Nodes with ``||r_c|| = 0`` (target already reached) get ``lam = 0``.
    The pooled fit minimises ``sum_u w_u ||s_u - lam r_c,u||^2``.
    ``logp`` must be finite (a smoothed target, Assumption B.1).
    """
    logq_t = np.asarray(logq_t, dtype=np.float64)
    logq_t1 = np.asarray(logq_t1, dtype=np.float64)
    logp = np.asarray(logp, dtype=np.float64)
    if not (logq_t.shape == logq_t1.shape == logp.shape) or logq_t.ndim != 2:
        raise ValueError("logq_t, logq_t1 and logp must all be [N, K]")
    if not (np.all(np.isfinite(logq_t)) and np.all(np.isfinite(logq_t1)) and np.all(np.isfinite(logp))):
        raise ValueError("log-probabilities must be finite (smooth the target, Assumption B.1)")
    n = logq_t.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    q = np.exp(logq_t)
    d = logq_t1 - logq_t
    s = d - (q * d).sum(1, keepdims=True)
    r = logp - logq_t
    rc = r - (q * r).sum(1, keepdims=True)
    s_rc = (q * s * rc).sum(1)
    rc2 = (q * rc * rc).sum(1)
    ok = rc2 > 1e-300
    lam = np.where(ok, s_rc / np.where(ok, rc2, 1.0), 0.0)
    s2 = (q * s * s).sum(1)
    res_c = np.sqrt(np.maximum(s2 - 2 * lam * s_rc + lam**2 * rc2, 0.0))

    def _resid(lam_col):
        tilted = tilt_log(logq_t, logp, lam_col)
        return np.sqrt((q * (logq_t1 - tilted) ** 2).sum(1))

    residual = _resid(lam)
    eps = (q * (logq_t - logq_t1)).sum(1)
    s_norm = np.sqrt(s2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mis = np.where(s_norm > 0, res_c / s_norm, 0.0)
    wsum = w.sum()
    lam_p = float((w * s_rc).sum() / max((w * rc2).sum(), 1e-300))
    res_p = _resid(np.full(n, lam_p))
    return EffectiveStep(
        lam=lam,
        residual=residual,
        residual_centered=res_c,
        misalignment=mis,
        eps=eps,
        s_norm=s_norm,
        lam_pooled=lam_p,
        residual_pooled=float(np.sqrt((w * res_p**2).sum() / wsum)),
        eps_pooled=float((w * eps).sum() / wsum),
    )
