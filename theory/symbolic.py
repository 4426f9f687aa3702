"""sympy derivations of the 1/T expansions used in :mod:`theory.bounds`.

Each function derives the series from the exact root (not from the paper's text), so a
test comparing it with ``bounds.py`` checks the paper's algebra independently:

* ``Lambda_T^min`` (Theorem E.4): smaller root of ``mu Lambda - (C2/T) Lambda^2 = Delta``;
* the degradation bound ``A Lambda + C1 Lambda^2 / T`` at that root (eq. (10));
* ``lambda_max`` (Theorem E.5, eq. (19)): positive root of ``C1 lam^2 + H V lam - eps/T``.

Series are in ``u = 1/T`` around ``u = 0``; ``order=n`` keeps terms up to ``u^n``.
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

__all__ = [
    "symbols",
    "Lambda_T_min_exact",
    "Lambda_T_min_series",
    "degradation_bound_series",
    "lambda_max_exact",
    "lambda_max_series",
    "series_coefficients",
]

T, u = sp.symbols("T u", positive=True)
Delta, mu, C1, C2, A, eps, H, V = sp.symbols("Delta_star mu_T C1 C2 A eps_fg H_T V_s", positive=True)


def symbols() -> dict[str, sp.Symbol]:
    """The sympy symbols used (names as in the paper)."""
    return {"T": T, "u": u, "Delta_star": Delta, "mu_T": mu, "C1": C1, "C2": C2, "A": A,
            "eps_fg": eps, "H_T": H, "V_s": V}


def Lambda_T_min_exact() -> sp.Expr:
    """``T/(2 C2) (mu - sqrt(mu^2 - 4 C2 Delta / T))`` as the smaller root (Theorem E.4)."""
    L = sp.symbols("L")
    roots = sp.solve(sp.Eq(mu * L - C2 / T * L**2, Delta), L)
    # the smaller root is the one with the minus sign: it tends to Delta/mu as T -> oo
    small = [r for r in roots if sp.limit(r.subs(T, 1 / u), u, 0, "+") == Delta / mu]
    if len(small) != 1:
        raise RuntimeError(f"could not identify the smaller root among {roots}")
    return sp.simplify(small[0])


@lru_cache(maxsize=None)
def Lambda_T_min_series(order: int = 2) -> sp.Expr:
    """Series of ``Lambda_T^min`` in ``u = 1/T`` up to ``u**order`` (Theorem E.4)."""
    expr = Lambda_T_min_exact().subs(T, 1 / u)
    return sp.series(expr, u, 0, order + 1).removeO()


@lru_cache(maxsize=None)
def degradation_bound_series(order: int = 1) -> sp.Expr:
    """Series of ``A Lambda + C1 Lambda^2 u`` at ``Lambda = Lambda_T^min`` (eq. (10))."""
    Lam = Lambda_T_min_exact().subs(T, 1 / u)
    return sp.series(A * Lam + C1 * Lam**2 * u, u, 0, order + 1).removeO()


def lambda_max_exact() -> sp.Expr:
    """Positive root of ``C1 lam^2 + H V lam - eps/T = 0`` (Theorem E.5, eq. (19))."""
    lam = sp.symbols("lam")
    roots = sp.solve(sp.Eq(C1 * lam**2 + H * V * lam - eps / T, 0), lam)
    pos = [r for r in roots if sp.limit(r.subs(T, 1 / u), u, 0, "+") == 0
           and sp.limit(r.subs(T, 1 / u) / u, u, 0, "+").is_positive]
    if len(pos) != 1:
        raise RuntimeError(f"could not identify the positive root among {roots}")
    return pos[0]


@lru_cache(maxsize=None)
def lambda_max_series(order: int = 2) -> sp.Expr:
    """Series of ``lambda_max`` in ``u = 1/T`` up to ``u**order`` (eq. (20) is order 1)."""
    expr = lambda_max_exact().subs(T, 1 / u)
    return sp.series(expr, u, 0, order + 1).removeO()


def series_coefficients(expr: sp.Expr, order: int) -> list[sp.Expr]:
    """Coefficients of ``u**0 .. u**order`` of a series in ``u``, simplified."""
    poly = sp.expand(expr)
    return [sp.simplify(poly.coeff(u, k)) for k in range(order + 1)]
