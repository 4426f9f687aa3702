from fractions import Fraction

import numpy as np
import pytest
import sympy as sp

from theory import bounds as B
from theory import symbolic as S

POINTS = [
    dict(Delta_star=Fraction(1, 2), mu_T=Fraction(2, 5), C1=Fraction(1), C2=Fraction(2), A=Fraction(3, 10)),
    dict(Delta_star=Fraction(3, 7), mu_T=Fraction(5, 4), C1=Fraction(1, 3), C2=Fraction(1, 9), A=Fraction(2)),
]


def _subs(expr, pt, T):
    sy = S.symbols()
    return float(expr.subs({sy[k]: sp.Rational(v.numerator, v.denominator) for k, v in pt.items()}).subs(sy["u"], sp.Rational(1, T)))


@pytest.mark.parametrize("pt", POINTS)
def test_degradation_expansion_matches_bounds(pt):
    ser = S.degradation_bound_series(1)
    args = [float(pt[k]) for k in ("Delta_star", "mu_T", "C1", "C2", "A")]
    d, mu, C1, C2, A = args
    for T in (2000, 50000):
        x = 4 * C2 * d / (mu**2 * T)  # expansion variable of Theorem E.4's proof
        assert _subs(ser, pt, T) == pytest.approx(float(B.degradation_bound_expansion(T, d, mu, C1, C2, A)), rel=1e-12)
        # exact bound vs the order-2 series of Lambda: remainder O(1/T^3)
        lam_exact = float(B.Lambda_T_min(T, d, mu, C2))
        assert _subs(S.Lambda_T_min_series(2), pt, T) == pytest.approx(lam_exact, rel=10 * x**3)


def test_paper_coefficients():
    sy = S.symbols()
    c = S.series_coefficients(S.degradation_bound_series(1), 1)
    A, C1, C2, mu, d = (sy[k] for k in ("A", "C1", "C2", "mu_T", "Delta_star"))
    assert sp.simplify(c[0] - A * d / mu) == 0
    assert sp.simplify(c[1] - (A * C2 / mu**3 + C1 / mu**2) * d**2) == 0


def test_lambda_max_series_matches_bounds():
    ser = S.lambda_max_series(2)
    sy = S.symbols()
    vals = {sy["eps_fg"]: sp.Rational(1, 10), sy["H_T"]: sp.Rational(1, 2), sy["V_s"]: sp.Integer(2), sy["C1"]: sp.Integer(1)}
    for T in (100, 1000):
        approx1 = float(S.lambda_max_series(1).subs(vals).subs(sy["u"], sp.Rational(1, T)))
        assert approx1 == pytest.approx(float(B.lambda_max_asymptotic(T, 0.1, 0.5, 2.0)), rel=1e-14)
        exact = float(B.lambda_max(T, 0.1, 0.5, 2.0, 1.0))
        assert float(ser.subs(vals).subs(sy["u"], sp.Rational(1, T))) == pytest.approx(exact, rel=10 / T**2)
    c = S.series_coefficients(ser, 2)
    assert sp.simplify(c[2] + sy["C1"] * sy["eps_fg"] ** 2 / (sy["H_T"] * sy["V_s"]) ** 3) == 0
