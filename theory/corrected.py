"""Corrected statements of Appendix E: one function beside each statement the ledger fails.

Every function carries its derivation (a proof a reader can follow line by line) and is
checked by ``theory.claims`` on >= 1000 random exact instances with 0 violations. Natural
logs (nats). Per-prefix inputs are arrays over nodes ``u`` (leading batch axes allowed):

* ``w``: prefix weights ``P(u)`` ``[..., N]`` (0 at forced ends: those rows are never coded);
* ``p``: the distribution's conditionals ``p_u`` ``[..., N, K]``;
* ``logq``, ``logp``: model and (smoothed) target log-conditionals ``[..., N, K]``;
* ``f_u = log p~_u - log q_u`` -- the per-prefix tilting direction of Definition B.3.

From a :class:`theory.tree.TokenTree` ``P``: ``w = P.mass * ~P.forced_end()``,
``p = P.cond_full()``; :mod:`theory.batched` builds them for batches of worlds.

Per-prefix tilting ``log q_lam,u = log q_u + lam f_u - psi_u(lam)``,
``psi_u(lam) = log E_{q_u}[exp(lam f_u)]``, and the chain rule
``KL(P || Q) = sum_u P(u) KL(p_u || q_u)`` (exact on a tree holding every outcome of each
coded prefix) give the one identity everything below rests on:

    (*)  Delta(lam) := KL(P||Q_lam) - KL(P||Q) = sum_u P(u) [ psi_u(lam) - lam E_{p_u} f_u ].
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from . import bounds as B
from .changemeasure import _lse

__all__ = [
    "TiltBracket",
    "per_prefix_terms",
    "lemma_e1_corrected",
    "OracleRate",
    "oracle_inequality_corrected",
    "ResidualBracket",
    "theorem_e1_corrected_residual_lower_bound",
    "pooled_sin_theta",
    "theorem_e3_corrected",
    "theorem_3_1_corrected",
    "LambdaMaxBracket",
    "lambda_max_bracket",
    "lambda_max_bracket_tilting",
    "lambda_max_per_token",
    "lemma_e2_corrected",
]


_a = partial(np.asarray, dtype=np.float64)  # float arrays in, as everywhere in theory


def per_prefix_terms(w, p, logq, logp) -> dict:
    """Per-prefix moments of ``f_u`` summed with weights ``w`` (arrays over the batch axes).

    Returns ``gap = sum_u w (E_{p_u} f_u - E_{q_u} f_u)`` (so the first-order term is
    ``-gap``), ``R = sum_u w range_{q_u}(f_u)^2`` (range over q_u's support), ``var =
    sum_u w Var_{q_u}(f_u)``, ``chi2_bar = sum_u w chi2(p_u || q_u)`` and ``cs =
    sqrt(chi2_bar * var)`` (the Cauchy-Schwarz bound of ``|gap|``, formed in log space).

    The support is ``isfinite(log q)``: a probability that underflows to 0 (``log q < -745``) is
    still an outcome; chi2 and the variance are summed in log space, so ``chi2_bar`` may be
    ``inf`` while ``cs`` stays finite.
    """
    w, p, logq, logp = _a(w), _a(p), _a(logq), _a(logp)
    q = np.exp(logq)
    sup = np.isfinite(logq)
    with np.errstate(invalid="ignore"):
        f = np.where(sup, logp - np.where(sup, logq, 0.0), 0.0)
    if not np.all(np.isfinite(f)):
        raise ValueError("f = log p~ - log q must be finite on q's support (smooth the target, Assumption B.1)")
    Eq = (q * f).sum(-1)
    Ep = (p * f).sum(-1)
    rng = np.where(sup, f, -np.inf).max(-1) - np.where(sup, f, np.inf).min(-1)
    ww = np.where(w > 0, w, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lw = np.log(ww)
        lvar = _lse(np.where(sup, logq + 2 * np.log(np.abs(f - Eq[..., None])), -np.inf))
        lchi = _lse(np.where(sup, 2 * np.log(np.abs(p - q)) - np.where(sup, logq, 0.0), -np.inf))
        lvar_bar, lchi_bar = _lse(lw + lvar), _lse(lw + lchi)
        return {
            "gap": (ww * (Ep - Eq)).sum(-1),
            "R": (ww * np.where(w > 0, rng, 0.0) ** 2).sum(-1),
            "var": np.exp(lvar_bar),
            "chi2_bar": np.exp(lchi_bar),
            "cs": np.exp(0.5 * (lvar_bar + lchi_bar)),
        }


# ------------------------------------------------------------------ Lemma E.1
@dataclass(frozen=True)
class TiltBracket:
    """``first_order = -sum_u P(u)(E_{p_u} f_u - E_{q_u} f_u)``; for the step ``lam``:
    ``lower = lam * first_order <= Delta(lam) <= upper = lower + lam^2/8 * R``."""

    first_order: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    R: np.ndarray


def lemma_e1_corrected(w, p, logq, logp, lam) -> TiltBracket:
    """Lemma E.1, corrected: the true first-order term and a non-asymptotic bracket.

    Derivation (per-prefix tilting, any real ``lam``):

    1. By (*), ``Delta(lam) - lam L = sum_u P(u) [psi_u(lam) - lam E_{q_u} f_u]`` with
       ``L := -sum_u P(u) (E_{p_u} f_u - E_{q_u} f_u)`` (add and subtract ``lam E_{q_u} f_u``).
    2. Jensen: ``psi_u(lam) = log E_q e^{lam f} >= E_q[lam f]``, so each bracket is >= 0:
       ``Delta(lam) >= lam L``.
    3. Hoeffding's lemma (``f_u`` takes values in an interval of length ``range(f_u)``):
       ``psi_u(lam) <= lam E_q f + lam^2 range(f_u)^2 / 8``, so
       ``Delta(lam) <= lam L + (lam^2/8) sum_u P(u) range(f_u)^2``.
    4. Hence ``d/dlam Delta(0) = L`` exactly. The paper's ``-(E_P f - E_Q f)`` with one
       sequence-level ``f`` weights the prefix terms ``E_{q_u} f_u`` by ``Q(u)`` instead of
       ``P(u)``; the two agree at depth 1 (one prefix) and differ on deeper trees.
    """
    t = per_prefix_terms(w, p, logq, logp)
    lam = _a(lam)
    L = -t["gap"]
    return TiltBracket(first_order=L, lower=lam * L, upper=lam * L + lam**2 / 8 * t["R"], R=t["R"])


# ------------------------------------------------------------ oracle inequality
@dataclass(frozen=True)
class OracleRate:
    """``gain_rate = sum_u P2(u)(E_{p2_u} f_u - E_{q_u} f_u)`` (``-`` the first-order term on
    P2), ``mu = KL(P2||Q) - KL(P2||P~2)`` (the rate that holds: ``gain_rate >= mu``) and the
    paper's ``KL(Q||P~2) - KL(P2||P~2)`` (E.2's rate; not a lower bound on deeper trees)."""

    gain_rate: np.ndarray
    mu: np.ndarray
    paper_rate: np.ndarray


def oracle_inequality_corrected(w2, p2, logq, logp, kl_P2_Q, kl_P2_P2t, kl_Q_P2t) -> OracleRate:
    """The oracle inequality used by Theorems E.2-E.4, corrected for per-prefix tilting.

    The paper bounds the domain first-order gain by ``E_{P2} f - E_Q f >= KL(Q||P~2) -
    KL(P2||P~2)`` (Lemma E.3 with one sequence-level ``f``). Under per-prefix tilting the
    gain is ``G := sum_u P2(u) (E_{p2_u} f_u - E_{q_u} f_u)`` (Lemma E.1 corrected), and:

    1. per prefix, Lemma E.3 applied to one conditional gives
       ``E_{p2_u} f_u - E_{q_u} f_u = KL(p2_u||q_u) + KL(q_u||p~_u) - KL(p2_u||p~_u)``;
    2. weighting by ``P2(u)`` and using the chain rule twice:
       ``G = KL(P2||Q) + sum_u P2(u) KL(q_u||p~_u) - KL(P2||P~2)``;
    3. the middle sum is >= 0, so ``G >= mu := KL(P2||Q) - KL(P2||P~2)`` (oracle target
       ``P~2 = P2``: ``G >= KL(P2||Q)``, the current excess domain code length).
    4. The paper's ``KL(Q||P~2) = sum_u Q(u) KL(q_u||p~_u)`` weights the middle sum by
       ``Q(u)``: where Q visits prefixes P2 rarely visits and ``q_u`` is far from ``p~_u``
       there, ``KL(Q||P~2) > G`` (a depth-2 counterexample is in the ledger).

    Carried through E.3/E.4: ``mu_T := inf_{t<T} [KL(P2||Q_t) - KL(P2||P~2)]`` replaces
    ``inf_t KL(Q_t||P2)`` (see :func:`theorem_e3_corrected`).
    Inputs: ``w2, p2`` -- P2's prefix weights and conditionals; the three KLs (nats).
    """
    t = per_prefix_terms(w2, p2, logq, logp)
    return OracleRate(gain_rate=t["gap"], mu=_a(kl_P2_Q) - _a(kl_P2_P2t), paper_rate=_a(kl_Q_P2t) - _a(kl_P2_P2t))


# -------------------------------------------------------- Theorem B.1 (= E.1)
@dataclass(frozen=True)
class ResidualBracket:
    """Per node: ``lower = ||s|| sin(theta) <= min_lam ||log q_{t+1} - log q^(lam)||_{t,u}
    <= residual = the norm at the least-squares lam`` and its parts."""

    lower: np.ndarray
    residual: np.ndarray
    sin_theta: np.ndarray
    s_norm: np.ndarray
    lam: np.ndarray
    offset: np.ndarray
    eps: np.ndarray


def theorem_e1_corrected_residual_lower_bound(logq_t, logq_t1, logp) -> ResidualBracket:
    """Theorem B.1 (= E.1), corrected: the best tilting fit is no better than ``||s|| sin(theta)``.

    Per prefix (omit u), ``<g, h> := E_{q_t}[g h]``; ``s`` = centred ``log(q_{t+1}/q_t)``,
    ``r_c`` = centred ``r = log(p~/q_t)``, ``theta`` = the angle between ``s`` and ``r_c``.

    1. Tilting: ``log(q^(lam)/q_t) = lam r - A(lam r)``; its centred part is *exactly*
       ``lam r_c`` (Step 4's ``+ O(lam^3)`` is zero).
    2. So ``D(lam) := log q_{t+1} - log q^(lam) = (s - lam r_c) + c(lam)`` with a constant
       ``c(lam) = E_{q_t}[D] = KL(q_t||q^(lam)) - KL(q_t||q_{t+1})``.
    3. A constant is orthogonal to centred functions: ``||D||^2 = ||s - lam r_c||^2 + c^2``.
    4. ``min_lam ||s - lam r_c||^2 = ||s||^2 sin^2(theta)`` (projection onto ``r_c``, at
       ``lam* = <s, r_c>/||r_c||^2``). Hence for every lam
       ``||D(lam)|| >= ||s|| sin(theta)``, and ``||D(lam*)||^2 = ||s||^2 sin^2 + c(lam*)^2``.
    5. ``||s|| = sqrt(2 eps) (1 + O(sqrt eps))`` (Step 3), so the residual is
       ``O(eps)`` **iff** ``sin(theta) = O(sqrt(eps))``. It is 0 when ``K = 2`` (centred
       functions on two outcomes form a line, ``s || r_c``, ``q^(lam*) = q_{t+1}``) and for a
       natural-gradient step on ``KL(q||p~)`` in per-prefix logits (its direction is
       ``F^+ grad = -r_c``: the step *is* a tilt with ``lam = lr``). Plain SGD on CE moves
       the logits by ``lr (p~ - q)`` (centred: not parallel to ``r_c`` when ``K > 2``),
       shared parameters and Adam's preconditioning rotate it further: ``sin(theta) = O(1)``
       and the residual is ``Theta(sqrt(eps))`` (ledger: log-log slope 0.5).
    """
    a, b, lp = _a(logq_t), _a(logq_t1), _a(logp)
    q = np.exp(a)
    sup = q > 0  # outcomes outside q_t's support carry no weight in L2(q_t)
    z = lambda x: np.where(sup, x, 0.0)  # noqa: E731
    with np.errstate(invalid="ignore"):
        d, r = z(b - z(a)), z(lp - z(a))
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(r))):
        raise ValueError("log q_{t+1} and log p~ must be finite on q_t's support (Assumption B.1)")
    s = z(d - (q * d).sum(-1, keepdims=True))
    rc = z(r - (q * r).sum(-1, keepdims=True))
    s2 = (q * s * s).sum(-1)
    rc2 = (q * rc * rc).sum(-1)
    src = (q * s * rc).sum(-1)
    ok = rc2 > 1e-300
    lam = np.where(ok, src / np.where(ok, rc2, 1.0), 0.0)
    perp2 = (q * (s - lam[..., None] * rc) ** 2).sum(-1)  # direct, no cancellation
    eps = -(q * d).sum(-1)
    # KL(q_t || q^(lam)) = psi(lam) - lam E_q r, psi(lam) = log E_q e^{lam r} summed in log space over
    # isfinite(log q_t): an outcome below float64's range (q_t = 0) still enters psi, e^{log q + lam r}
    fin = np.isfinite(a)
    with np.errstate(invalid="ignore"):
        r_all = np.where(fin & np.isfinite(lp), lp - np.where(fin, a, 0.0), 0.0)
    psi = _lse(np.where(fin, a + lam[..., None] * r_all, -np.inf))
    kl_tilt = psi - lam * (q * r).sum(-1)
    c = kl_tilt - eps
    s_norm = np.sqrt(s2)
    with np.errstate(invalid="ignore", divide="ignore"):
        sin = np.where(s_norm > 0, np.sqrt(perp2) / np.where(s_norm > 0, s_norm, 1.0), 0.0)
    return ResidualBracket(lower=np.sqrt(perp2), residual=np.sqrt(perp2 + c**2), sin_theta=sin,
                           s_norm=s_norm, lam=lam, offset=c, eps=eps)


def pooled_sin_theta(logq_t, logq_t1, logp, weights) -> float:
    """Mass-weighted ``sin(theta)`` of an update over many prefixes (the alignment diagnostic):
    ``sqrt(sum_u w_u ||s_u||^2 sin^2(theta_u) / sum_u w_u ||s_u||^2)`` -- by
    :func:`theorem_e1_corrected_residual_lower_bound` the fraction of the realised log-shift's
    norm that no tilting step can produce. 0: the update is a tilt (the paper's picture
    applies); 1: orthogonal to the tilting direction at every prefix."""
    rb = theorem_e1_corrected_residual_lower_bound(logq_t, logq_t1, logp)
    w = _a(weights)
    den = float(np.dot(w, rb.s_norm**2))
    return float(np.sqrt(np.dot(w, rb.lower**2) / den)) if den > 0 else 0.0


# ------------------------------------------------------ Theorems E.2-E.4, 3.1
def theorem_e3_corrected(lams, gap1_bound_t, R1_t, mu_t, R2_t) -> tuple[np.ndarray, np.ndarray]:
    """Theorems E.2/E.3 (one and many steps), corrected and non-asymptotic.

    Per step t (Lemma E.1 corrected on ``P = P1`` and ``P = P2``, summed over steps):

    * ``Delta L_T(P1) <= sum_t lam_t G1_t + (1/8) sum_t lam_t^2 R1_t``, where ``G1_t`` is any
      upper bound of the first-order term, e.g. the per-prefix Cauchy-Schwarz
      ``sqrt(chi2_bar_t) sqrt(sum_u P1(u) Var_{q_t,u}(f_t,u))`` (Proposition 3.1 node by node,
      :func:`theory.prefix.prefix_decomposition`); with ``C1 := sup_t R1_t / 8`` this is
      ``<= sum_t lam_t G1_t + C1 S_T``;
    * ``Delta L_T(P2) <= -sum_t lam_t mu_t + (1/8) sum_t lam_t^2 R2_t`` with
      ``mu_t = KL(P2||Q_t) - KL(P2||P~2)`` (:func:`oracle_inequality_corrected`), so with
      ``mu_T = inf_t mu_t``, ``C2 = sup_t R2_t / 8``: ``<= -mu_T Lambda_T + C2 S_T``.

    Arrays have the steps on the last axis; returns ``(bound_P1, bound_P2)`` (nats).
    The explicit constants make ``C1``, ``C2`` computable (the paper leaves them implicit).
    """
    lams = _a(lams)
    b1 = (lams * _a(gap1_bound_t)).sum(-1) + (lams**2 * _a(R1_t)).sum(-1) / 8
    b2 = -(lams * _a(mu_t)).sum(-1) + (lams**2 * _a(R2_t)).sum(-1) / 8
    return b1, b2


def theorem_3_1_corrected(delta_star, lam, A, mu_T, C1, C2) -> dict:
    """Theorem 3.1, corrected: what Theorem E.4 gives for equal per-step weights ``lam``.

    1. Equal steps: ``Lambda_T = T lam``, ``S_T = T lam^2``. The domain bound of
       :func:`theorem_e3_corrected` certifies ``Delta L_T(P2) <= -Delta_*`` once
       ``T lam (mu_T - C2 lam) >= Delta_*`` (eq. (9)); this needs ``lam < mu_T / C2``
       (feasibility) and is met with the fewest steps at ``T lam = Delta_* / (mu_T - C2 lam)``.
    2. There the general bound ``A Lambda_T + C1 S_T = T lam (A + C1 lam)`` is
       ``exact = Delta_* (A + C1 lam) / (mu_T - C2 lam)`` (eq. (10)).
    3. Expanding in ``lam``: ``= k1 Delta_* + k2' Delta_* lam + O(lam^2)`` with
       ``k1 = A/mu_T``, ``k2' = C1/mu_T + A C2/mu_T^2`` -- linear in ``Delta_* lam``; the
       paper's ``k2 Delta_*^2 lam`` is E.4's ``1/T`` term with ``1/T`` renamed ``lam``.
    4. A rigorous linear form: for ``0 <= lam <= mu_T/(2 C2)``,
       ``1/(mu - C2 lam) <= (1 + 2 C2 lam/mu)/mu`` and ``2 C1 C2 lam^2/mu^2 <= C1 lam/mu``, so
       ``exact <= linear := Delta_* (k1 + 2 k2' lam)``.
    Returns ``exact``, ``first_order`` (``k1 Delta_* + k2' Delta_* lam``), ``linear``
    (NaN where ``lam > mu_T/(2 C2)``), ``k1``, ``k2``; raises when ``lam >= mu_T/C2``.
    """
    d, lam, A, mu, C1, C2 = (_a(x) for x in (delta_star, lam, A, mu_T, C1, C2))
    exact = B.equal_step_degradation_bound(lam, d, mu, C1, C2, A)
    k1 = A / mu
    k2 = C1 / mu + A * C2 / mu**2
    linear = np.where(2 * C2 * lam <= mu, d * (k1 + 2 * k2 * lam), np.nan)
    return {"exact": exact, "first_order": k1 * d + k2 * d * lam, "linear": linear, "k1": k1, "k2": k2}


# ------------------------------------------- Theorem 3.2, Theorem B.3 (= E.5)
@dataclass(frozen=True)
class LambdaMaxBracket:
    """``lower <= lambda_max <= upper`` (``upper = inf`` when the first-order rate is <= 0)."""

    lower: np.ndarray
    upper: np.ndarray


def lambda_max_bracket(T, eps_fg, L_up, R, L_low=None) -> LambdaMaxBracket:
    """Theorem 3.2 / B.3 (= E.5), corrected: an exact two-sided bracket of the safe step.

    ``lambda_max`` := the largest equal per-step weight with ``Delta L_T(P1) <= eps_fg``
    for every smaller weight. Per step, Lemma E.1 corrected gives
    ``lam L_t <= Delta_t <= lam L_t + lam^2 R_t / 8``; with ``L_up >= sup_t L_t``,
    ``L_low <= inf_t L_t`` (default ``L_up``: the exact one-step rate at ``T = 1``) and
    ``R >= sup_t R_t`` (``R = sum_u P1(u) range(f_u)^2``):

    1. ``Delta L_T(P1) <= T (lam L_up + lam^2 R/8)``; the right side is <= eps_fg on
       ``[0, lower]``, ``lower`` = positive root of ``(R/8) lam^2 + L_up lam - eps_fg/T``
       ``= 2 (eps_fg/T) / (L_up + sqrt(L_up^2 + R eps_fg / (2T)))``: every such lam is safe.
    2. ``Delta L_T(P1) >= T lam L_low``; if ``L_low > 0`` then at ``lam = eps_fg/(T L_low)``
       the degradation already reaches eps_fg: ``lambda_max <= upper = eps_fg/(T L_low)``.
    3. ``upper / lower -> 1`` as ``eps_fg -> 0`` when ``L_low = L_up``: the bracket is
       exact to first order. The paper's eq. (19) is step 1 with ``L_up`` replaced by
       ``H_T V_s`` (a much larger upper bound): a valid but loose *lower* end.

    Which constants make it valid for ``T > 1``: ``L_t``, ``R_t`` are the rates at the trajectory's
    points ``q_t`` (``t < T``) for every step size up to the end considered, not at ``q_0``. For equal
    tilting steps toward one target, ``R_t = (1 - Lambda_t)^2 R_0 <= R_0`` (q_0's R suffices), but
    ``L_t = (1 - mu) Delta_1'(mu)`` at ``mu = Lambda_t = 1 - (1 - lam)^t`` grows with ``mu`` (``Delta_1``
    is convex): ``L_up`` must be ``sup_{mu in [0, 1]} (1 - mu) Delta_1'(mu)`` (ledger: q_0's one-step
    rate puts the lower end above the true lambda_max on many instances at ``T = 2, 10, 100``;
    the sup gives 0 violations). With q_0's constants use :func:`lambda_max_bracket_tilting`.
    """
    T, eps, L, R = _a(T), _a(eps_fg), _a(L_up), _a(R)
    Ll = L if L_low is None else _a(L_low)
    if np.any(T <= 0) or np.any(eps < 0) or np.any(R < 0):
        raise ValueError("need T > 0, eps_fg >= 0 and R >= 0")
    e = eps / T
    with np.errstate(divide="ignore", invalid="ignore"):
        linear_only = np.where(L > 0, e / np.where(L > 0, L, 1), np.inf)  # R = 0: Delta = lam L exactly
        lower = np.where(R > 0, 2 * e / (L + np.sqrt(L**2 + R * e / 2)), linear_only)
        upper = np.where(Ll > 0, e / np.where(Ll > 0, Ll, 1.0), np.inf)
    return LambdaMaxBracket(lower=lower, upper=upper)


def lambda_max_bracket_tilting(T, eps_fg, L0, R0) -> LambdaMaxBracket:
    """Theorem 3.2 / B.3 (= E.5), corrected, for ``T`` equal tilting steps with q_0's constants.

    1. Equal steps ``lam`` toward one target: ``log q_{t+1} = (1 - lam) log q_t + lam log p~ - norm``
       unrolls to ``q_T = tilt(q_0, Lambda_T)`` with ``Lambda_T = 1 - (1 - lam)^T`` (per prefix; the
       normalisers cancel). So ``Delta L_T(P1)(lam) = Delta_1(Lambda_T(lam))``, one step of weight
       ``Lambda_T`` from ``q_0``.
    2. ``Delta_1`` is convex with ``Delta_1(0) = 0``: the safe set is ``[0, mu_max]`` and
       ``lambda_max = 1 - (1 - mu_max)^(1/T)`` (``Lambda_T`` increases).
    3. :func:`lambda_max_bracket` at ``T = 1`` with q_0's first-order rate ``L0`` and ``R0 = sum_u
       P1(u) range(f_u)^2`` brackets ``mu_max`` (Lemma E.1 corrected at q_0, for every weight);
       mapping both ends through ``mu -> 1 - (1 - mu)^(1/T)`` brackets ``lambda_max``. Ends at or
       beyond 1 are the domain's edge, 1.
    """
    one = lambda_max_bracket(1.0, eps_fg, L0, R0)
    T = _a(T)
    if np.any(T < 1):
        raise ValueError("need T >= 1 equal steps")

    def to_lam(mu):
        m = np.minimum(np.where(np.isfinite(mu), mu, 1.0), 1.0)
        with np.errstate(divide="ignore"):
            return np.where(m >= 1.0, 1.0, -np.expm1(np.log1p(-m) / T))

    return LambdaMaxBracket(lower=to_lam(one.lower), upper=to_lam(one.upper))


def lambda_max_per_token(T, eps_fg, H_T, s, m, M_h, M_e, C1) -> np.ndarray:
    """Theorem E.5 without the relaxation (14): eq. (19) with the per-token variance bound
    of eq. (13), ``V_tok = sqrt((s/m) M_h^2 + (1 - s/m) M_e^2)`` in place of ``V_s``.

    (14) bounds the hard *fraction* ``s/m`` by the *count* ``s`` (and ``1 - s/m`` by
    ``m - s``), inflating ``V_s^2`` up to ``m``-fold. Without it, the safe step depends on
    the fraction ``s/m``: label-only data (short answers, mostly hard tokens) has a
    *larger* fraction than CoT data and hence a *smaller* safe step -- the opposite of
    Finding 2's explanation (see the ledger's Theorem 3.2 entry for the numbers).
    """
    s, m = _a(s), _a(m)
    if np.any(m <= 0) or np.any(s < 0) or np.any(s > m):
        raise ValueError(f"need 0 <= s <= m, m > 0; got s={s!r}, m={m!r}")
    V_tok = np.sqrt((s / m) * _a(M_h) ** 2 + (1 - s / m) * _a(M_e) ** 2)
    return B.lambda_max(T, eps_fg, H_T, V_tok, C1)


# ------------------------------------------------------------------ Lemma E.2
def lemma_e2_corrected(w_S, M_h, beta=0.0, gamma=0.0) -> np.ndarray:
    """Lemma E.2, corrected: the second moment of the *realised* log-shift under leakage.

    Assumption B.5 for a direction ``g`` with ``|g| <= M_h`` on S and
    ``||Pi_Sc g|| <= beta ||Pi_S g||`` (norms in ``L2(q)``) gives a realised ``Delta`` with
    ``||Pi_S (Delta - g)|| <= gamma ||Pi_S g||`` and ``||Pi_Sc Delta|| <= (beta + gamma) ||Pi_S g||``.

    1. Triangle inequality on S: ``||Pi_S Delta|| <= (1 + gamma) ||Pi_S g||``.
    2. S and S^c are orthogonal: ``E_q[Delta^2] = ||Pi_S Delta||^2 + ||Pi_Sc Delta||^2
       <= ((1 + gamma)^2 + (beta + gamma)^2) ||Pi_S g||^2``.
    3. ``||Pi_S g||^2 = E_q[g^2 1_S] <= w_S M_h^2``. Hence
       ``Var_q(Delta) <= E_q[Delta^2] <= ((1 + gamma)^2 + (beta + gamma)^2) w_S M_h^2``.

    Tight: ``q = (1/2, 1/2)``, ``g = f = (1, 0)``, S = {first}, ``gamma = 0.1``, ``beta = 0``,
    ``Delta = (1.1, 0.1)``: both sides are 0.61. The paper's ``w_S M_h^2 + (M_l +
    (beta+gamma) M_h)^2`` (0.51 there) lets the S-part grow by ``gamma`` for free.
    """
    g = _a(gamma)
    if np.any(g < 0) or np.any(g >= 1):
        raise ValueError(f"gamma must be in [0, 1) (Assumption B.5), got {gamma!r}")
    return ((1 + g) ** 2 + (_a(beta) + g) ** 2) * _a(w_S) * _a(M_h) ** 2
