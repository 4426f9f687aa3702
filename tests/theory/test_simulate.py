import numpy as np
import pytest

from theory.claims import b1_slope
from theory.simulate import (
    SoftmaxConfig, equal_gain_degradation, lambda_max_vs_s, make_softmax_world, make_world,
    run_softmax, run_tabular, talr_weights,
)


def test_world_masses_and_hard_levels():
    w = make_world(V=2, depth=4, n_hard=2, seed=1)
    assert len(w.hard_levels) == 2
    for t in (w.p1, w.p2):
        t.validate()
    # P2 differs from P1 exactly on the hard levels
    differs = np.any(np.abs(np.exp(w.logp1) - np.exp(w.logp2)) > 1e-12, axis=1)
    diff_levels = set(np.unique(w.tree.depth[differs]).tolist())
    assert diff_levels == set(w.hard_levels)


def test_tabular_run_bounds_hold_and_domain_improves():
    w = make_world(V=2, depth=3, n_hard=1, q_noise=0.05, seed=2)
    rows = run_tabular(w, np.full(8, 0.15))
    assert rows[-1]["dL_P2_nats"] < 0
    for r in rows[1:]:
        assert r["dL_P1_nats"] <= r["bound_P1_nats"] + 1e-12
        assert r["dL_P2_nats"] <= r["bound_P2_nats"] + 1e-12


def test_finding1_tabular_equal_gain_is_T_independent_for_fixed_target():
    w = make_world(V=2, depth=3, n_hard=1, q_noise=0.05, seed=5)
    rows = equal_gain_degradation(w, [1, 3, 9], 0.2, rho="uniform")
    d1 = [r["dL_P1_nats"] for r in rows]
    assert max(d1) - min(d1) < 1e-9
    # and T * lam grows with T (lam is not exactly c/T): 1 - (1 - lam)^T is what is fixed
    lam_eff = [1 - (1 - r["lam"]) ** r["T"] for r in rows]
    assert max(lam_eff) - min(lam_eff) < 1e-9


def test_softmax_sgd_learns_domain_and_leaks():
    sw = make_softmax_world(V=3, depth=3, seed=0)
    rows = run_softmax(sw, SoftmaxConfig(lr=1.0, steps=15))
    assert rows[-1]["dL_P2_nats"] < -0.05
    assert rows[-1]["dL_P1_nats"] > 0  # shared parameters: the D2 update leaks into D1
    rows_t = run_softmax(sw, SoftmaxConfig(lr=0.05, steps=3, optimizer="adam", weighting="talr"))
    assert all(r["tau"] > 0 for r in rows_t[:-1])


def test_talr_weights_hand_value():
    w = make_world(V=1, depth=1, seed=0)
    logq = np.log(np.array([[0.5, 0.5], [0.0 + 1e-300, 1.0]]))
    wt, tau = talr_weights(w.tree, logq, w.p1)
    # responses: "EOS" at root (mean loss ln 2) and "0" then forced end (mean loss ln 2)
    assert tau == pytest.approx(np.log(2))
    assert wt[0, 0] == pytest.approx(max(0.5 ** (1 / np.log(2)), 0.01))


def test_theorem_b1_residual_is_order_sqrt_eps_not_eps():
    r = b1_slope(V=3, seed=0, n_lr=8)
    assert r["decades"] >= 2
    assert 0.45 <= r["slope"] <= 0.55  # O(sqrt(eps)): Theorem B.1's O(eps) fails here
    assert r["misalignment"] > 0.1
    rb = b1_slope(V=1, seed=0, n_lr=4)  # two outcomes: every update is a tilt
    assert rb["residual_max"] < 1e-10


def test_finding2_exponent_near_minus_half():
    from scipy import stats

    r = lambda_max_vs_s(s_values=(1, 2, 4, 8), seeds=(0, 1), depth=8, eps_fg=0.05)
    # the interval, recomputed independently: OLS of log lam_max on log s with one intercept per
    # seed (lstsq on the full design), classical standard error, Student t with n - 1 - seeds dof
    rows = r["rows"]
    seeds = sorted({row["seed"] for row in rows})
    X = np.array([[np.log(row["s"])] + [float(row["seed"] == k) for k in seeds] for row in rows])
    y = np.log([row["lam_max"] for row in rows])
    coef, rss, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(rows) - X.shape[1]
    se = np.sqrt(rss[0] / dof * np.linalg.inv(X.T @ X)[0, 0])
    half = stats.t.ppf(0.975, dof) * se
    assert r["exponent"] == pytest.approx(coef[0], rel=1e-9)
    np.testing.assert_allclose(r["ci95"], (coef[0] - half, coef[0] + half), rtol=1e-9)
    lo, hi = r["ci95"]
    assert lo < -0.5 < hi  # Theorem B.3 (= E.5)'s exponent -1/2 lies inside this world's interval
    assert -0.6 < r["exponent"] < -0.35
    lams = [row["lam_max"] for row in r["rows"] if row["seed"] == 0]
    assert all(np.diff(lams) < 0)  # more hard tokens -> smaller safe step
