"""Every bound of arXiv 2509.20758 (Section 3.3, Appendix B.4, Appendix E) as a function.

Symbols follow the paper:

* ``lam`` -- per-step tilting weight lambda_t; ``Lambda_T = sum_t lam_t``, ``S_T = sum_t lam_t^2``;
* ``f = log p~2 - log q`` -- the tilting direction; ``Var_Q(f)``, ``E_P[f]``;
* ``M_h``, ``M_l`` -- amplitude of ``f`` on / off the hard set S (Assumption B.4),
  ``w_S`` -- q-mass of S, ``beta``, ``gamma`` -- leakage (Assumption B.5);
* ``H_T = sup_t sqrt(chi2(P1 || Q_t))``, ``mu_T = inf_t KL(Q_t || P2)``;
* ``C1``, ``C2`` -- the second-order constants of Theorem E.2 / E.3;
* ``A = H_T (sqrt(w_S) M_h + M_l + (beta + gamma) M_h)`` (Theorem E.4);
* ``s`` -- expected hard tokens per D2 example, ``m`` -- example length,
  ``M_e = M_l + (beta + gamma) M_h``, ``V_s = sqrt(s M_h^2 + (m - s) M_e^2)`` (Theorem E.5);
* ``delta_star`` -- target domain gain Delta_*, ``eps_fg`` -- degradation budget.

All functions broadcast over numpy arrays and return float arrays (0-d for scalars).
Units are whatever the inputs are in (nats if the KLs are in nats). A bound that does
not exist for the given numbers raises ``ValueError`` naming them.

Roots of quadratics are evaluated in the rationalised form ``2c / (b + sqrt(b^2 - 4ac))``,
equal to the paper's ``(b - sqrt(...)) / 2a`` but free of cancellation and valid at
``C1 = 0`` / ``C2 = 0`` (where the paper's form is 0/0).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .prefix import PrefixDecomposition, prefix_decomposition  # per-prefix Prop. 3.1 (re-export)

LN2 = math.log(2.0)

__all__ = [
    "Constants",
    "M_e",
    "V_s",
    "lemma_e1",
    "lemma_e1_derivative",
    "lemma_e2_second_moment_bound",
    "lemma_e2_variance_bound",
    "lemma_e3_rhs",
    "theorem_e2_domain",
    "theorem_e2_general",
    "theorem_e2_general_sparse",
    "theorem_e3_domain",
    "theorem_e3_general",
    "theorem_e3_general_sparse",
    "theorem_e3_cumulative",
    "Lambda_T_min",
    "degradation_bound",
    "degradation_bound_expansion",
    "equal_step_degradation_bound",
    "theorem_e4_at_gain",
    "lambda_max",
    "lambda_max_asymptotic",
    "theorem_3_1_k",
    "theorem_3_1_bound",
    "theorem_3_2_lambda_max",
    "PrefixDecomposition",
    "prefix_decomposition",
]


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _check_nonneg(**kw) -> None:
    for name, v in kw.items():
        a = _arr(v)
        if np.any(np.isnan(a)) or np.any(a < 0):
            raise ValueError(f"{name} must be >= 0, got {v!r}")


def _nats_per(unit: str) -> float:
    """Nats in one ``unit`` (the constants of Appendix E are in nats)."""
    if unit == "nats":
        return 1.0
    if unit == "bits":
        return LN2
    raise ValueError(f"unit must be 'bits' or 'nats', not {unit!r}")


def _check_pos(**kw) -> None:
    for name, v in kw.items():
        a = _arr(v)
        if np.any(np.isnan(a)) or np.any(a <= 0):
            raise ValueError(f"{name} must be > 0, got {v!r}")


@dataclass(frozen=True)
class Constants:
    """The constants of Appendix E (NaN = not given). Validated on construction.

    Attributes:
        M_h: bound on |f| over the hard set S (Assumption B.4).
        M_l: bound on |f| off S (Assumption B.4), ``M_l << M_h``.
        w_S: q-mass of S, in [0, 1].
        beta: off-S energy ratio of the desired direction (Assumption B.5).
        gamma: leakage of the realised update, in [0, 1) (Assumption B.5).
        H_T: sup_t sqrt(chi2(P1 || Q_t)) (Theorem E.3).
        mu_T: inf_t KL(Q_t || P2) > 0 (Theorem E.4).
        C1, C2: second-order constants of Theorems E.2/E.3 (D1 and D2).
        s: expected number of hard tokens per D2 example (Theorem E.5).
        m: example token length (Theorem E.5), ``m >= max(s, 1)``.
        eps_fg: degradation budget on D1 (Theorem E.5 / 3.2).
    """

    M_h: float = float("nan")
    M_l: float = float("nan")
    w_S: float = float("nan")
    beta: float = 0.0
    gamma: float = 0.0
    H_T: float = float("nan")
    mu_T: float = float("nan")
    C1: float = float("nan")
    C2: float = float("nan")
    s: float = float("nan")
    m: float = float("nan")
    eps_fg: float = float("nan")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = float(getattr(self, f.name))
            if not np.isnan(v) and v < 0:
                raise ValueError(f"Constants.{f.name} must be >= 0, got {v}")
        if not np.isnan(self.w_S) and self.w_S > 1:
            raise ValueError(f"Constants.w_S is a probability mass, got {self.w_S}")
        if self.gamma >= 1:
            raise ValueError(f"Constants.gamma must be < 1 (Assumption B.5), got {self.gamma}")
        if not (np.isnan(self.s) or np.isnan(self.m)) and self.s > self.m:
            raise ValueError(f"Constants.s={self.s} hard tokens exceed the length m={self.m}")

    def _need(self, *names: str) -> None:
        missing = [n for n in names if np.isnan(float(getattr(self, n)))]
        if missing:
            raise ValueError(f"Constants: {', '.join(missing)} not given")

    @property
    def M_e(self) -> float:
        """Effective out-of-set amplitude ``M_l + (beta + gamma) M_h`` (Theorem E.5)."""
        self._need("M_l", "M_h")
        return float(M_e(self.M_l, self.M_h, self.beta, self.gamma))

    @property
    def sqrt_var_bound(self) -> float:
        """``sqrt(w_S) M_h + M_l + (beta + gamma) M_h`` (Theorem E.2, last line)."""
        self._need("w_S", "M_h", "M_l")
        return float(np.sqrt(self.w_S) * self.M_h + self.M_l + (self.beta + self.gamma) * self.M_h)

    @property
    def A(self) -> float:
        """``A = H_T (sqrt(w_S) M_h + M_l + (beta + gamma) M_h)`` (Theorem E.4)."""
        self._need("H_T")
        return self.H_T * self.sqrt_var_bound

    @property
    def V_s(self) -> float:
        """``V_s`` of Theorem E.5."""
        self._need("s", "m")
        return float(V_s(self.s, self.m, self.M_h, self.M_e))

    def to_dict(self) -> dict:
        return {k: (None if np.isnan(v) else float(v)) for k, v in asdict(self).items()}


# --------------------------------------------------------------------- helpers
def M_e(M_l, M_h, beta=0.0, gamma=0.0) -> np.ndarray:
    """``M_e = M_l + (beta + gamma) M_h`` (Theorem E.5)."""
    return _arr(M_l) + (_arr(beta) + _arr(gamma)) * _arr(M_h)


def V_s(s, m, M_h, M_e) -> np.ndarray:
    """``V_s = sqrt(s M_h^2 + (m - s) M_e^2)`` (Theorem E.5, eq. (15)).

    Note: eq. (14) relaxes the hard *fraction* ``s/m`` to the *count* ``s`` and
    ``1 - s/m`` to ``m - s``; ``V_s^2`` is therefore up to ``m`` times the per-token
    variance bound of eq. (13) (see the claims ledger).
    """
    s, m = _arr(s), _arr(m)
    _check_nonneg(s=s, M_h=M_h, M_e=M_e)
    if np.any(m < np.maximum(s, 1.0)):
        raise ValueError(f"need m >= max(s, 1) (eq. (14)); got s={s!r}, m={m!r}")
    return np.sqrt(s * _arr(M_h) ** 2 + (m - s) * _arr(M_e) ** 2)


# ---------------------------------------------------------------- Lemma E.1-E.3
def lemma_e1(lam, E_P_f, E_Q_f, Var_Q_f=0.0) -> np.ndarray:
    """Second-order change of code length under one tilting step (Lemma E.1).

    ``Delta L(P) ~= -lam (E_P[f] - E_Q[f]) + lam^2/2 Var_Q(f)``; with ``Var_Q_f=0`` this
    is the first-order term. Exact up to O(lam^3) for *sequence-level* geometric
    interpolation (and per prefix); see the ledger for per-prefix tilting on trees.
    """
    lam = _arr(lam)
    return -lam * (_arr(E_P_f) - _arr(E_Q_f)) + 0.5 * lam**2 * _arr(Var_Q_f)


def lemma_e1_derivative(E_P_f, E_Q_f) -> np.ndarray:
    """``d/dlam KL(P || Q_lam)`` at 0 = ``-(E_P[f] - E_Q[f])`` (Lemma E.1)."""
    return -(_arr(E_P_f) - _arr(E_Q_f))


def lemma_e2_second_moment_bound(w_S, M_h, M_l) -> np.ndarray:
    """``Var_Q(f) <= E_Q[f^2] <= w_S M_h^2 + (1 - w_S) M_l^2`` (Lemma E.2, first chain)."""
    w_S = _arr(w_S)
    return w_S * _arr(M_h) ** 2 + (1 - w_S) * _arr(M_l) ** 2


def lemma_e2_variance_bound(w_S, M_h, M_l, beta=0.0, gamma=0.0) -> np.ndarray:
    """Effective variance bound with leakage, ``w_S M_h^2 + (M_l + (beta+gamma) M_h)^2``
    (Lemma E.2, last display)."""
    return _arr(w_S) * _arr(M_h) ** 2 + M_e(M_l, M_h, beta, gamma) ** 2


def lemma_e3_rhs(kl_P_Q, kl_Q_P2t, kl_P_P2t) -> np.ndarray:
    """``E_P[f] - E_Q[f] = KL(P||Q) + KL(Q||P~2) - KL(P||P~2)`` (Lemma E.3)."""
    return _arr(kl_P_Q) + _arr(kl_Q_P2t) - _arr(kl_P_P2t)


# ------------------------------------------------------------------ Theorem E.2
def theorem_e2_domain(lam, kl_Q_P2t, kl_P2_P2t, C2) -> np.ndarray:
    """One-step domain bound ``Delta L(P2) <= -lam (KL(Q||P~2) - KL(P2||P~2)) + C2 lam^2``
    (Theorem E.2, D2; with ``kl_P2_P2t = 0`` the oracle case ``-lam KL(Q||P2) + C2 lam^2``)."""
    lam = _arr(lam)
    return -lam * (_arr(kl_Q_P2t) - _arr(kl_P2_P2t)) + _arr(C2) * lam**2


def theorem_e2_general(lam, Var_Q_f, chi2_P1_Q, C1) -> np.ndarray:
    """One-step degradation bound ``lam sqrt(Var_Q f) sqrt(chi2(P1||Q)) + C1 lam^2``
    (Theorem E.2, D1, first inequality)."""
    lam = _arr(lam)
    _check_nonneg(Var_Q_f=Var_Q_f, chi2_P1_Q=chi2_P1_Q)
    return lam * np.sqrt(_arr(Var_Q_f) * _arr(chi2_P1_Q)) + _arr(C1) * lam**2


def theorem_e2_general_sparse(lam, chi2_P1_Q, c: Constants) -> np.ndarray:
    """``lam (sqrt(w_S) M_h + M_l + (beta+gamma) M_h) sqrt(chi2(P1||Q)) + C1 lam^2``
    (Theorem E.2, D1, second inequality)."""
    c._need("C1")
    lam = _arr(lam)
    return lam * c.sqrt_var_bound * np.sqrt(_arr(chi2_P1_Q)) + c.C1 * lam**2


# ------------------------------------------------------------------ Theorem E.3
def theorem_e3_domain(lams, kl_Qt_P2, C2) -> np.ndarray:
    """Multi-step domain bound ``-sum_t lam_t KL(Q_t||P2) + C2 S_T`` (Theorem E.3, oracle).

    ``lams`` and ``kl_Qt_P2`` have the steps on the last axis.
    """
    lams = _arr(lams)
    return -(lams * _arr(kl_Qt_P2)).sum(-1) + _arr(C2) * (lams**2).sum(-1)


def theorem_e3_general(lams, H_T, sqrt_var_t, C1) -> np.ndarray:
    """``H_T sum_t lam_t sqrt(Var_{Q_t}(f_t)) + C1 S_T`` (Theorem E.3, D1, first form)."""
    lams = _arr(lams)
    return _arr(H_T) * (lams * _arr(sqrt_var_t)).sum(-1) + _arr(C1) * (lams**2).sum(-1)


def theorem_e3_general_sparse(lams, c: Constants) -> np.ndarray:
    """``A Lambda_T + C1 S_T`` (Theorem E.3, D1, last form; eq. (10))."""
    c._need("C1")
    lams = _arr(lams)
    return c.A * lams.sum(-1) + c.C1 * (lams**2).sum(-1)


def theorem_e3_cumulative(lams, c: Constants, unit: str = "nats") -> np.ndarray:
    """Theorem E.3 (sparse form, eq. (10)) after each step of a schedule:
    ``A Lambda_t + C1 S_t`` for ``t = 1 .. T`` with ``Lambda_t = sum_{s<=t} lam_s`` and
    ``S_t = sum_{s<=t} lam_s^2`` (:func:`theorem_e3_general_sparse` at every prefix of ``lams``).

    ``lams``: the steps ``lam_t`` (1-D; e.g. fitted between evaluations by
    `theory.tilting.fit_effective_step`); a negative fitted step (the update moved away from the
    target) counts as 0, the theorem's schedules having ``lam_t >= 0``. ``c`` holds ``A`` (via
    ``H_T``, ``w_S``, ``M_h``, ``M_l``) and ``C1`` in nats; the curve is returned in ``unit``
    (``"bits"`` divides by ln 2, to draw it over code lengths). NaN/inf constants propagate.
    """
    lam = np.clip(_arr(lams), 0.0, None)
    if lam.ndim != 1:
        raise ValueError(f"lams must be 1-D (one lam per step), got shape {lam.shape}")
    return (c.A * np.cumsum(lam) + c.C1 * np.cumsum(lam**2)) / _nats_per(unit)


# ------------------------------------------------------ Theorem B.2 (= E.4)
def Lambda_T_min(T, delta_star, mu_T, C2) -> np.ndarray:
    """Smallest total weight meeting the domain target with equal steps (Theorem B.2 (= E.4)).

    The smaller root of ``mu_T Lambda - (C2/T) Lambda^2 = Delta_*`` (eq. (9) with
    ``S_T = Lambda^2/T``):  ``T/(2 C2) (mu_T - sqrt(mu_T^2 - 4 C2 Delta_*/T))``.
    Exists only for ``T > 4 C2 Delta_* / mu_T^2`` (``>=`` gives a double root, kept).
    Infeasible inputs: all scalar -> `ValueError` naming the condition; any array -> NaN at
    the infeasible entries only (so one call can scan T or Delta_*).
    """
    scalar = all(np.ndim(x) == 0 for x in (T, delta_star, mu_T, C2))
    T, d, mu, C2 = np.broadcast_arrays(_arr(T), _arr(delta_star), _arr(mu_T), _arr(C2))
    _check_pos(T=T, mu_T=mu)
    _check_nonneg(delta_star=d, C2=C2)
    disc = mu**2 - 4 * C2 * d / T
    if not scalar:
        with np.errstate(invalid="ignore"):
            return np.where(disc >= 0, 2 * d / (mu + np.sqrt(np.maximum(disc, 0))), np.nan)
    if np.any(disc < 0):
        i = np.unravel_index(np.argmin(disc), disc.shape)
        raise ValueError(
            "Theorem B.2 (= E.4): no equal-steps schedule meets the domain target: need "
            f"T > 4*C2*Delta_*/mu_T^2 = {4 * C2[i] * d[i] / mu[i]**2:.6g}, got T={T[i]:.6g} "
            f"(C2={C2[i]:.6g}, Delta_*={d[i]:.6g}, mu_T={mu[i]:.6g}; discriminant {disc[i]:.6g} < 0)"
        )
    return 2 * d / (mu + np.sqrt(disc))  # = T/(2 C2) (mu - sqrt(disc)), rationalised


def degradation_bound(T, delta_star, mu_T, C1, C2, A) -> np.ndarray:
    """Minimal degradation bound over T-step schedules (Theorem B.2 (= E.4), eq. (10)):
    ``A Lambda + C1 Lambda^2 / T`` at ``Lambda = Lambda_T_min`` (eq. (10), equal steps).
    Infeasible: scalar inputs raise, array inputs give NaN there (as `Lambda_T_min`)."""
    Lam = Lambda_T_min(T, delta_star, mu_T, C2)
    _check_nonneg(C1=C1, A=A)
    return _arr(A) * Lam + _arr(C1) * Lam**2 / _arr(T)


def degradation_bound_expansion(T, delta_star, mu_T, C1, C2, A) -> np.ndarray:
    """``A Delta_*/mu_T + (A C2/mu_T^3 + C1/mu_T^2) Delta_*^2 / T`` (Theorem B.2 (= E.4)),
    the 1/T expansion of :func:`degradation_bound` without its O(1/T^2) remainder."""
    T, d, mu = _arr(T), _arr(delta_star), _arr(mu_T)
    _check_pos(T=T, mu_T=mu)
    A, C1, C2 = _arr(A), _arr(C1), _arr(C2)
    return A * d / mu + (A * C2 / mu**3 + C1 / mu**2) * d**2 / T


def equal_step_degradation_bound(lam, delta_star, mu_T, C1, C2, A) -> np.ndarray:
    """Theorem B.2 (= E.4) at a *fixed per-step* weight ``lam`` (eqs. (9)-(10), equal steps):
    feasibility ``Lambda (mu_T - C2 lam) >= Delta_*`` gives
    ``Delta L_T(P1) <= Delta_* (A + C1 lam) / (mu_T - C2 lam)``.
    Its expansion ``A Delta_*/mu_T + Delta_* (C1/mu_T + A C2/mu_T^2) lam + O(lam^2)`` is
    what Theorem 3.1 should read with lam the per-step size (linear in Delta_*)."""
    lam, d, mu = _arr(lam), _arr(delta_star), _arr(mu_T)
    C1, C2, A = _arr(C1), _arr(C2), _arr(A)
    den = mu - C2 * lam
    if np.any(den <= 0):
        raise ValueError(
            f"Theorem B.2 (= E.4): per-step weight lam={lam!r} too large: "
            f"need lam < mu_T/C2 = {mu / np.maximum(C2, 1e-300)!r}"
        )
    return d * (A + C1 * lam) / den


def theorem_e4_at_gain(T, gain, c: Constants, unit: str = "nats") -> float:
    """Theorem B.2 (= E.4) (eq. (10), equal steps) at a measured domain gain ``Delta_* = gain``:
    :func:`degradation_bound` with ``A``, ``mu_T``, ``C1``, ``C2`` from ``c`` (nats).

    ``gain`` and the returned bound are in ``unit`` (``"bits"``: the gain is converted to nats
    before the bound, the bound back to bits). ``T``: the number of steps (or evaluation
    intervals) the gain took. Raises ``ValueError`` when no equal-steps schedule of ``T`` steps
    reaches the gain (see :func:`Lambda_T_min`) or the gain is negative.
    """
    k = _nats_per(unit)
    return float(degradation_bound(T, gain * k, c.mu_T, c.C1, c.C2, c.A)) / k


# ------------------------------------------------------ Theorem B.3 (= E.5)
def lambda_max(T, eps_fg, H_T, V_s, C1) -> np.ndarray:
    """Largest equal per-step weight guaranteeing ``Delta L_T(P1) <= eps_fg`` (Theorem B.3 (= E.5),
    eq. (19)): the positive root of ``C1 lam^2 + H_T V_s lam - eps_fg/T = 0``."""
    T, eps, b, C1 = _arr(T), _arr(eps_fg), _arr(H_T) * _arr(V_s), _arr(C1)
    _check_pos(T=T)
    _check_nonneg(eps_fg=eps, H_T=H_T, V_s=V_s, C1=C1)
    disc = b**2 + 4 * C1 * eps / T  # >= 0 for admissible inputs
    if np.any((b == 0) & (C1 == 0)):
        raise ValueError("Theorem B.3 (= E.5): H_T*V_s = 0 and C1 = 0: every lam is safe, lambda_max is unbounded")
    return 2 * (eps / T) / (b + np.sqrt(disc))  # = (-b + sqrt(disc)) / (2 C1), rationalised


def lambda_max_asymptotic(T, eps_fg, H_T, V_s) -> np.ndarray:
    """``eps_fg / (H_T V_s T)`` (Theorem B.3 (= E.5), eq. (20)), the leading term of :func:`lambda_max`."""
    T = _arr(T)
    _check_pos(T=T, H_T=H_T, V_s=V_s)
    return _arr(eps_fg) / (_arr(H_T) * _arr(V_s) * T)


# ---------------------------------------------------------- Theorems 3.1 and 3.2
def theorem_3_1_k(A, mu_T, C1, C2) -> tuple[np.ndarray, np.ndarray]:
    """``(k1, k2)`` of Theorem 3.1 read off Theorem B.2 (= E.4):
    ``k1 = A / mu_T``, ``k2 = A C2 / mu_T^3 + C1 / mu_T^2``.

    Caveat (ledger): Theorem 3.1's ``k2 Delta_*^2 lam`` matches E.4 only if ``lam`` is
    read as ``1/T``. With ``lam`` the per-step weight (``lam ~ Delta_*/(mu_T T)``) the
    correct term is ``Delta_* (C1/mu_T + A C2/mu_T^2) lam`` (see
    :func:`equal_step_degradation_bound`)."""
    A, mu, C1, C2 = _arr(A), _arr(mu_T), _arr(C1), _arr(C2)
    _check_pos(mu_T=mu)
    return A / mu, A * C2 / mu**3 + C1 / mu**2


def theorem_3_1_bound(delta_star, lam, A, mu_T, C1, C2) -> np.ndarray:
    """``k1 Delta_* + k2 Delta_*^2 lam`` (Theorem 3.1, as stated; eq. (3))."""
    k1, k2 = theorem_3_1_k(A, mu_T, C1, C2)
    d = _arr(delta_star)
    return k1 * d + k2 * d**2 * _arr(lam)


def theorem_3_2_lambda_max(eps_fg, s, T, H_T, M_h) -> np.ndarray:
    """``lambda_max ~ eps_fg / (H_T M_h sqrt(s) T)`` (Theorem 3.2: Theorem B.3 (= E.5) with M_e << M_h)."""
    _check_pos(s=s)
    return lambda_max_asymptotic(T, eps_fg, H_T, _arr(M_h) * np.sqrt(_arr(s)))


_CORRECTED = (
    "lemma_e1_corrected", "oracle_inequality_corrected", "theorem_e1_corrected_residual_lower_bound",
    "theorem_e3_corrected", "theorem_3_1_corrected", "lambda_max_bracket", "lambda_max_per_token",
    "lemma_e2_corrected",
)


def __getattr__(name: str):
    """The corrected statements live in :mod:`theory.corrected` (which imports this module);
    ``theory.bounds.<name>_corrected`` resolves there on first use."""
    if name in _CORRECTED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.corrected"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
