import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from theory import bounds as B

pos = st.floats(0.05, 5.0)


def test_lambda_T_min_hand_value():
    # mu=1, C2=1, Delta=1, T=10: T/(2C2)(mu - sqrt(mu^2 - 4 C2 Delta/T)) = 5 (1 - sqrt(0.6))
    assert B.Lambda_T_min(10, 1, 1, 1) == pytest.approx(5 * (1 - np.sqrt(0.6)), rel=1e-14)


def test_lambda_T_min_c2_zero_is_delta_over_mu():
    assert B.Lambda_T_min(3, 0.6, 0.3, 0.0) == pytest.approx(2.0)


def test_degradation_bound_raises_with_numbers():
    with pytest.raises(ValueError, match=r"T > 4\*C2\*Delta_\*/mu_T\^2 = 4"):
        B.degradation_bound(3, 1, 1, 1, 1, 1)


@settings(max_examples=60, deadline=None)
@given(T=st.floats(1.0, 1e4), d=pos, mu=pos, C1=pos, C2=pos, A=pos)
def test_lambda_T_min_is_the_smaller_root(T, d, mu, C1, C2, A):
    T = T * 4 * C2 * d / mu**2 + 1e-9  # keep T above the existence threshold
    L = B.Lambda_T_min(T, d, mu, C2)
    assert mu * L - C2 / T * L**2 == pytest.approx(d, rel=1e-9)
    assert L <= T * mu / (2 * C2) * (1 + 1e-12)  # the smaller root lies left of the vertex
    # the expansion drops positive terms: exact bound >= expansion, gap O(1/T^2)
    b = B.degradation_bound(T, d, mu, C1, C2, A)
    assert b >= B.degradation_bound_expansion(T, d, mu, C1, C2, A) * (1 - 1e-12)


def test_expansion_error_is_order_T_minus_2():
    Ts = np.array([1e3, 1e4, 1e5])
    gap = B.degradation_bound(Ts, 0.5, 0.4, 1.0, 2.0, 0.3) - B.degradation_bound_expansion(Ts, 0.5, 0.4, 1.0, 2.0, 0.3)
    scaled = gap * Ts**2
    assert scaled[2] == pytest.approx(scaled[1], rel=2e-3)
    assert scaled[1] == pytest.approx(scaled[0], rel=2e-2)


def test_degradation_bound_strictly_decreasing_in_T():
    b = B.degradation_bound(np.array([30.0, 60, 120, 1e3, 1e6]), 0.5, 0.4, 1.0, 2.0, 0.3)
    assert np.all(np.diff(b) < 0)
    assert b[-1] == pytest.approx(0.3 * 0.5 / 0.4, rel=2e-5)  # A Delta / mu_T + O(1/T)


def test_lambda_max_hand_value_and_root():
    # C1=1, HV=1, eps/T=2: lam^2 + lam - 2 = 0 -> lam = 1
    assert B.lambda_max(1, 2, 1, 1, 1) == pytest.approx(1.0)
    # C1 = 0: linear case eps/(T H V)
    assert B.lambda_max(4, 2, 1, 1, 0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        B.lambda_max(4, 2, 0, 1, 0)


@settings(max_examples=60, deadline=None)
@given(T=st.floats(1, 1e5), eps=pos, H=pos, Vs=pos, C1=pos)
def test_lambda_max_solves_eq_18(T, eps, H, Vs, C1):
    lam = B.lambda_max(T, eps, H, Vs, C1)
    assert T * (H * Vs * lam + C1 * lam**2) == pytest.approx(eps, rel=1e-9)
    assert B.lambda_max_asymptotic(T, eps, H, Vs) >= lam  # the first-order term over-estimates


def test_V_s_and_constants():
    assert B.V_s(4, 16, 2.0, 0.5) == pytest.approx(np.sqrt(4 * 4 + 12 * 0.25))
    with pytest.raises(ValueError, match="m >= max"):
        B.V_s(5, 3, 1, 1)
    c = B.Constants(M_h=2, M_l=0.1, w_S=0.04, beta=0.1, gamma=0.05, H_T=0.5, mu_T=0.3, C1=1, C2=1, s=4, m=16)
    assert c.M_e == pytest.approx(0.1 + 0.15 * 2)
    assert c.A == pytest.approx(0.5 * (0.2 * 2 + 0.1 + 0.3))
    assert c.V_s == pytest.approx(np.sqrt(4 * 4 + 12 * 0.4**2))
    with pytest.raises(ValueError, match="gamma"):
        B.Constants(gamma=1.0)
    with pytest.raises(ValueError, match="w_S"):
        B.Constants(w_S=1.5)
    with pytest.raises(ValueError, match="H_T"):
        B.Constants().A


def test_theorem_3_1_k_and_equal_step_form():
    k1, k2 = B.theorem_3_1_k(A=1.0, mu_T=0.5, C1=1.0, C2=2.0)
    assert k1 == pytest.approx(2.0) and k2 == pytest.approx(2 / 0.125 + 1 / 0.25)
    # equal steps: exact slope in lam at 0 is Delta (C1/mu + A C2/mu^2), linear in Delta
    lam = 1e-7
    for d in (0.1, 0.2):
        b0 = B.equal_step_degradation_bound(0.0, d, 0.5, 1.0, 2.0, 1.0)
        slope = (B.equal_step_degradation_bound(lam, d, 0.5, 1.0, 2.0, 1.0) - b0) / lam
        assert slope == pytest.approx(d * (1 / 0.5 + 2 / 0.25), rel=1e-5)


def test_one_and_multi_step_forms():
    assert B.lemma_e1(0.1, 2.0, 1.0, 4.0) == pytest.approx(-0.1 + 0.02)
    assert B.theorem_e2_general(0.1, 4.0, 0.25, 3.0) == pytest.approx(0.1 * 2 * 0.5 + 0.03)
    assert B.theorem_e2_domain(0.1, 1.0, 0.2, 5.0) == pytest.approx(-0.08 + 0.05)
    lams = np.array([[0.1, 0.2], [0.3, 0.0]])
    assert np.allclose(B.theorem_e3_domain(lams, np.array([1.0, 2.0]), 1.0), [-0.5 + 0.05, -0.3 + 0.09])
    c = B.Constants(M_h=1, M_l=0, w_S=0.25, H_T=2, C1=1)
    assert B.theorem_e3_general_sparse(np.array([0.1, 0.1]), c) == pytest.approx(2 * 0.5 * 0.2 + 0.02)
    assert B.lemma_e2_second_moment_bound(0.25, 2, 1) == pytest.approx(1 + 0.75)
    assert B.lemma_e2_variance_bound(0.25, 2, 1, 0.1, 0.1) == pytest.approx(1 + 1.4**2)


def test_theorem_e3_cumulative_hand_values():
    """A Lambda_t + C1 S_t after each step, S_t the sum of SQUARED steps; negative steps count as 0."""
    c = B.Constants(M_h=2.0, M_l=0.5, w_S=0.25, H_T=3.0, C1=2.0)  # A = 3 (0.5 * 2 + 0.5) = 4.5
    assert c.A == pytest.approx(4.5)
    lams = [0.1, 0.2, -0.3, 0.4]
    # Lambda_t = 0.1, 0.3, 0.3, 0.7;  S_t = 0.01, 0.05, 0.05, 0.21
    want = [4.5 * 0.1 + 2 * 0.01, 4.5 * 0.3 + 2 * 0.05, 4.5 * 0.3 + 2 * 0.05, 4.5 * 0.7 + 2 * 0.21]
    np.testing.assert_allclose(B.theorem_e3_cumulative(lams, c), want, rtol=1e-14)
    np.testing.assert_allclose(B.theorem_e3_cumulative(lams, c, unit="bits"), np.array(want) / np.log(2), rtol=1e-14)
    # the last point is the one-shot sparse form of the whole (clipped) schedule
    assert B.theorem_e3_cumulative(lams, c)[-1] == pytest.approx(
        float(B.theorem_e3_general_sparse(np.clip(lams, 0, None), c)), rel=1e-14)
    with pytest.raises(ValueError, match="unit"):
        B.theorem_e3_cumulative(lams, c, unit="bytes")


def test_theorem_e4_at_gain_converts_units():
    c = B.Constants(M_h=2.0, M_l=0.5, w_S=0.25, H_T=3.0, C1=2.0, C2=1.0, mu_T=1.0)
    # T = 10, Delta_* = 1 nat: Lambda = 5 (1 - sqrt(0.6)); bound = A Lambda + C1 Lambda^2 / T
    lam = 5 * (1 - np.sqrt(0.6))
    assert B.theorem_e4_at_gain(10, 1.0, c) == pytest.approx(4.5 * lam + 2 * lam**2 / 10, rel=1e-13)
    # the same gain in bits gives the same bound, in bits
    ln2 = np.log(2)
    assert B.theorem_e4_at_gain(10, 1.0 / ln2, c, unit="bits") == pytest.approx(
        (4.5 * lam + 2 * lam**2 / 10) / ln2, rel=1e-13)
    with pytest.raises(ValueError, match="T > 4"):
        B.theorem_e4_at_gain(3, 1.0, c)


def test_lemma_e3_identity_on_three_outcomes():
    """E_P f - E_Q f = KL(P||Q) + KL(Q||P~2) - KL(P||P~2), f = log p~2 - log q (brute force)."""
    p, q, p2 = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6]), np.array([0.1, 0.7, 0.2])
    f = np.log(p2) - np.log(q)

    def kl(a, b):
        return float(np.sum(a * np.log(a / b)))

    lhs = float(p @ f - q @ f)
    assert B.lemma_e3_rhs(kl(p, q), kl(q, p2), kl(p, p2)) == pytest.approx(lhs, rel=1e-12)


def test_theorem_3_2_lambda_max_hand_value():
    # eps_fg / (H_T M_h sqrt(s) T) = 0.1 / (2 * 0.5 * 2 * 10)
    assert B.theorem_3_2_lambda_max(0.1, 4, 10, 2.0, 0.5) == pytest.approx(0.005, rel=1e-14)
