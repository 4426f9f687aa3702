"""The change-of-measure (KL) bounds of the per-prefix decomposition, the floor and the underflow fix."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from theory.changemeasure import compress, log_mgf, tilt_kl
from theory.corrected import per_prefix_terms
from theory.prefix import bound_columns, decompose, node_terms, prefix_decomposition
from theory.tilting import log_softmax
from theory.tree import TokenTree
from treehelpers import complete_tree


def hard_logq(tree, rng, scale):
    """Random rows with some near-deterministic rows (1 - 1e-12) and log q down to -1,500."""
    lq = log_softmax(scale * rng.standard_normal((tree.n_nodes, tree.vocab_size + 1)))
    for u in range(tree.n_nodes):
        kind = rng.integers(0, 4)
        if kind == 1:  # near-deterministic
            row = np.full(tree.vocab_size + 1, np.log(1e-12 / max(tree.vocab_size, 1)))
            row[rng.integers(0, row.size)] = np.log1p(-1e-12)
            lq[u] = row
        elif kind == 2:  # one outcome far below underflow
            lq[u, rng.integers(0, lq.shape[1])] = -rng.uniform(700, 1500)
            lq[u] = lq[u] - np.logaddexp.reduce(lq[u])
    return lq


def brute_dv(p, lq, lq2):
    """min over a dense grid of t of [KL(p||q) + log E_q e^{tc}]/t, and max c (exact, slow)."""
    q = np.exp(lq)
    s = lq2 - lq
    c = -s + (q * s).sum()
    K = float(np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - lq), 0)))
    ts = np.geomspace(1e-4, 1e4, 4001)
    vals = [(K + np.logaddexp.reduce(lq + t * c)) / t for t in ts]
    return min(min(vals), c.max()), float((p - q) @ c)


@settings(max_examples=60, deadline=None)
@given(V=st.integers(1, 3), depth=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       s1=st.floats(0.0, 3.0), s2=st.floats(0.0, 6.0))
def test_kl_bounds_hold_and_order(V, depth, seed, s1, s2):
    rng = np.random.default_rng(seed)
    tree = complete_tree(V, depth, rng, conc=float(rng.uniform(0.1, 3)))
    lq = hard_logq(tree, rng, s1)
    lq2 = log_softmax(lq + s2 * rng.standard_normal(lq.shape) * (rng.random(lq.shape) < 0.5))
    d = prefix_decomposition(tree, lq, lq2)
    tol = 1e-9 * max(1.0, abs(d.delta))
    assert d.delta <= d.bound_kl + tol
    assert d.floor <= d.bound_kl + tol and d.floor <= d.bound_nodewise + tol
    assert d.bound_kl <= d.bound_kl_global + tol
    assert d.floor - tol <= d.bound_min <= min(d.bound_kl, d.bound_nodewise) + tol and d.delta <= d.bound_min + tol
    assert d.delta <= d.floor + tol  # sum of max(F_u, 0) >= sum of F_u
    assert np.all(d.first_order_u <= d.dv_u + 1e-9 * np.maximum(1, np.abs(d.dv_u)))


@settings(max_examples=40, deadline=None)
@given(K=st.integers(2, 6), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 4.0))
def test_dv_is_the_infimum_and_the_tilt_attains_it(K, seed, scale):
    rng = np.random.default_rng(seed)
    lq = log_softmax(rng.standard_normal(K) * scale)
    lq2 = log_softmax(lq + rng.standard_normal(K) * scale)
    p = rng.dirichlet(np.full(K, 0.5))
    nt = node_terms(p[None], lq[None], lq2[None])
    ref, F = brute_dv(p, lq, lq2)
    assert F == pytest.approx(nt.first_u[0], abs=1e-12)
    assert nt.dv_u[0] <= ref + 1e-9  # no grid point does better
    assert nt.dv_u[0] >= F - 1e-12
    if nt.dv_u[0] < nt.cap_u[0] - 1e-6:  # attained at the tilt with KL(r||q) = KL(p||q)
        q = np.exp(lq)
        c = -(lq2 - lq) + (q * (lq2 - lq)).sum()
        kl_r, Er = tilt_kl(lq[None], c[None], nt.t_u)
        assert kl_r[0] == pytest.approx(nt.kl_pq_u[0], rel=1e-6, abs=1e-9)
        assert Er[0] == pytest.approx(nt.dv_u[0], rel=1e-6, abs=1e-9)


def test_two_outcomes_hand_values():
    # q = (1/2, 1/2), s = (-1, 1) (up to a constant): c = (1, -1). For two outcomes the tilt with the
    # same KL as p is p or p swapped, so DV = max(E_p c, E_p~ c) = |0.6| for p = (.8, .2) and (.2, .8).
    lq = np.log([[0.5, 0.5]] * 2)
    lq2 = log_softmax(lq + np.array([-1.0, 1.0]))
    nt = node_terms(np.array([[0.8, 0.2], [0.2, 0.8]]), lq, lq2)
    np.testing.assert_allclose(nt.first_u, [0.6, -0.6], atol=1e-12)
    np.testing.assert_allclose(nt.dv_u, [0.6, 0.6], rtol=1e-6)
    np.testing.assert_allclose(nt.cap_u, [1.0, 1.0], atol=1e-12)
    # point mass on the least likely, most pushed-down token: KL = -log q(x) = log 2 reaches the tilt's
    # limit -log q(argmax c) = log 2, so DV is the cap max c = 1 (= F: tight)
    nt = node_terms(np.array([0]), lq[:1], lq2[:1])
    assert nt.kl_pq_u[0] == pytest.approx(np.log(2)) and nt.dv_u[0] == pytest.approx(1.0, abs=1e-6)


def test_underflow_instance_from_the_issue():
    # one prefix, p = (.4, .4, .2), log q = (log .5, log .5, -800), log q'_3 = -1600:
    # Delta L = E_p[-s] = .2 * 800 = 160 nats; q(3) underflows to 0 but is in the support
    tree = TokenTree.from_distribution(lambda pre: np.array([0.4, 0.4, 0.2]), 2, 1)
    lq = np.tile([np.log(0.5), np.log(0.5), -800.0], (tree.n_nodes, 1))
    lq2 = np.tile([np.log(0.5), np.log(0.5), -1600.0], (tree.n_nodes, 1))
    d = prefix_decomposition(tree, lq, lq2)
    assert d.delta == pytest.approx(160.0, rel=1e-12)
    for b in (d.bound, d.bound_nodewise, d.bound_kl, d.bound_kl_global, d.floor):
        assert b >= d.delta * (1 - 1e-12)
    # chi2 ~ .04 e^800 and Var ~ e^-800 640000 (both far outside float64) give a finite product
    # (their product: .04 * 640000 = 160^2: Cauchy-Schwarz is an equality up to e^-800)
    assert d.bound == pytest.approx(160.0, rel=1e-9)
    # KL(p||q) = 159.5 < -log q(3) = 800: the tilt puts ~0.2 on outcome 3, E_r c ~ 0.2 * 800 = 160
    assert d.bound_kl == pytest.approx(160.0, rel=1e-3)
    t = per_prefix_terms(np.array([1.0]), np.array([[0.4, 0.4, 0.2]]), lq[:1], lq2[:1])
    assert t["chi2_bar"] > 1e300 and t["gap"] == pytest.approx(-160.0, rel=1e-12)


def test_compressed_rows_stay_valid_and_close():
    rng = np.random.default_rng(0)
    K, n = 5000, 6
    lq = log_softmax(3 * rng.standard_normal((n, K)))
    lq2 = log_softmax(lq + 0.5 * rng.standard_normal((n, K)))
    lq[0, 7] = -1200.0  # a mass far below underflow, pushed up hard: the extra atom carries it
    lq2[0, 7] = -5.0
    lq, lq2 = lq - np.logaddexp.reduce(lq, 1)[:, None], lq2 - np.logaddexp.reduce(lq2, 1)[:, None]
    tok = rng.integers(0, K, n)
    tok[0] = 7
    exact = node_terms(tok, lq, lq2, bins=10**6)
    comp = node_terms(tok, lq, lq2, bins=256)
    # a mean-preserving spread on 256 bins: never below the exact bound, and within O(t w^2)
    assert np.all(comp.dv_u >= exact.dv_u - 1e-12)
    np.testing.assert_allclose(comp.dv_u, exact.dv_u, rtol=1e-3)
    w = np.full(n, 1.0 / n)
    de, dc = decompose(w, exact), decompose(w, comp)
    assert de.bound_kl_global - 1e-12 <= dc.bound_kl_global <= de.bound_kl_global * (1 + 1e-3)
    # the upper copy bounds the log-MGF from above at every t >= 0
    c = -(lq2 - lq) + (np.exp(lq) * (lq2 - lq)).sum(1, keepdims=True)
    rep = compress(lq, c, 256)
    for t in (1e-6, 0.1, 1.0, 30.0):
        assert np.all(log_mgf(rep.lm, rep.c, t) >= log_mgf(lq, c, t) - 1e-12)


def test_log_mgf_small_t_is_accurate():
    lq = np.log([[0.3, 0.7]])
    c = np.array([[0.7, -0.3]])  # E_q c = 0, Var = 0.21
    for t in (1e-8, 1e-5, 1e-3):
        assert log_mgf(lq, c, t)[0] == pytest.approx(t * t * 0.21 / 2, rel=1e-3)


def test_bound_columns():
    tree = TokenTree.from_distribution(lambda pre: np.array([1.0, 0.0]), 1, 1)
    lq = np.log(np.tile([0.5, 0.5], (tree.n_nodes, 1)))
    lq2 = np.log(np.tile([0.25, 0.75], (tree.n_nodes, 1)))
    d = prefix_decomposition(tree, lq, lq2, unit="bits")
    cols = bound_columns(d)
    assert cols["measured"] == pytest.approx(1.0)  # -log2(1/4) + log2(1/2)
    assert cols["bound_kl_over_measured"] == pytest.approx(d.bound_kl)
    assert cols["floor_over_measured"] == pytest.approx(d.floor) and d.floor == pytest.approx(1.0)
    assert cols["dominant"] == "first-order term"
    assert bound_columns(d, measured=-0.5)["bound_kl_over_measured"] is None
    assert set(cols) >= {"first_order", "kl_term", "bound_chi2", "bound_kl", "bound_kl_global", "floor",
                         "bound_chi2_over_measured", "bound_kl_global_over_measured"}


@settings(max_examples=60, deadline=None)
@given(K=st.integers(2, 40), n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.05, 6.0))
def test_point_mass_bound_is_the_max_over_likelier_tokens_and_below_dv(K, n, seed, scale):
    """Point-mass rows: PM_u = max{c(a) : q(a) >= q(x)} by brute force, F_u <= PM_u <= DV_u, and
    the point bound sits between the measured change and the KL bound."""
    rng = np.random.default_rng(seed)
    lq = log_softmax(rng.normal(size=(n, K)) * scale)
    lq2 = log_softmax(lq + rng.normal(size=(n, K)) * scale)
    x = rng.integers(0, K, n)
    t = node_terms(x, lq, lq2)
    for u in range(n):
        s = lq2[u] - lq[u]
        c = -s + np.exp(lq[u]) @ s
        brute = max(c[a] for a in range(K) if lq[u, a] >= lq[u, x[u]])
        assert t.pm_u[u] == pytest.approx(min(brute, t.dv_u[u]), abs=1e-12)
        assert t.first_u[u] <= t.pm_u[u] + 1e-9 and t.pm_u[u] <= t.dv_u[u] + 1e-12
        if x[u] == np.argmax(lq[u]):  # the likeliest token: the bound is exact
            assert t.pm_u[u] == pytest.approx(t.first_u[u], abs=1e-9)
    d = decompose(np.full(n, 1.0 / n), t)
    assert d.delta <= d.bound_point + 1e-9 and d.bound_point <= d.bound_kl + 1e-12


def test_point_mass_bound_goes_below_the_floor_and_dense_rows_keep_dv():
    # q = (.7, .2, .1); the update pushes the likeliest token up: observed x = 0 (argmax), F < 0
    lq = np.log(np.array([[0.7, 0.2, 0.1]]))
    lq2 = np.log(np.array([[0.9, 0.06, 0.04]]))
    d = decompose(np.ones(1), node_terms(np.array([0]), lq, lq2))
    assert d.first_order < 0 and d.bound_point == pytest.approx(d.delta, abs=1e-12) and d.bound_point < d.floor
    dense = node_terms(np.array([[0.5, 0.3, 0.2]]), lq, lq2)
    np.testing.assert_array_equal(dense.pm_u, dense.dv_u)
