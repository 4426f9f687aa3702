import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from theory import bounds as B
from theory.corrected import (
    lambda_max_bracket, lambda_max_per_token, lemma_e1_corrected, lemma_e2_corrected,
    oracle_inequality_corrected, theorem_3_1_corrected, theorem_e1_corrected_residual_lower_bound,
)
from theory.divergence import TreeLogProbs, kl
from theory.tilting import log_softmax, tilt_log
from theory.tree import TokenTree
from treehelpers import complete_tree


def tree_kl(tree, logq):
    return kl(tree, TreeLogProbs.from_full(tree, np.minimum(logq, 0.0)), "nats")


def arrays(tree):
    return tree.mass * ~tree.forced_end(), tree.cond_full()


@settings(max_examples=60, deadline=None)
@given(V=st.integers(1, 3), depth=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), lam=st.floats(-1.0, 2.0))
def test_lemma_e1_bracket_brute_force(V, depth, seed, lam):
    rng = np.random.default_rng(seed)
    P = complete_tree(V, depth, rng)
    logq = log_softmax(rng.standard_normal((P.n_nodes, V + 1)))
    logp = log_softmax(2 * rng.standard_normal((P.n_nodes, V + 1)))
    w, p = arrays(P)
    br = lemma_e1_corrected(w, p, logq, logp, lam)
    delta = tree_kl(P, tilt_log(logq, logp, lam)) - tree_kl(P, logq)
    assert br.lower - 1e-10 <= delta <= br.upper + 1e-10
    h = 1e-6
    deriv = (tree_kl(P, tilt_log(logq, logp, h)) - tree_kl(P, tilt_log(logq, logp, -h))) / (2 * h)
    assert deriv == pytest.approx(float(br.first_order), abs=1e-5 * max(1, abs(deriv)))


def chain_two_level(d2_root, q_root, p2_child, q_child):
    """V = 1, depth 2: root and node '0' are coded over {token 0, EOS}."""
    tree = TokenTree.from_distribution(lambda pre: np.array([0.5, 0.5]), 1, 2)
    logq = np.log(np.array([q_root, q_child, [1e-300, 1.0]]))
    logp2 = np.log(np.array([d2_root, p2_child, [1e-300, 1.0]]))
    logp2[2] = logq[2] = [-np.inf, 0.0]
    P2 = tree.with_masses(np.exp(np.array([np.log(d2_root[1]), np.log(d2_root[0]) + np.log(p2_child[1]),
                                            np.log(d2_root[0]) + np.log(p2_child[0])])))
    return tree, P2, logq, logp2


def test_oracle_inequality_hand_counterexample_and_corrected_rate():
    # P2 rarely enters node '0' (0.01) where Q goes half the time and q is far from p2
    tree, P2, logq, logp2 = chain_two_level([0.01, 0.99], [0.5, 0.5], [0.99, 0.01], [0.01, 0.99])
    Q = tree.with_masses(np.exp(np.array([np.log(0.5), np.log(0.5) + np.log(0.99), np.log(0.5) + np.log(0.01)])))
    kl_Q_P2 = kl(Q, TreeLogProbs.from_full(Q, logp2), "nats")
    kl_P2_Q = kl(P2, TreeLogProbs.from_full(P2, logq), "nats")
    w2, p2 = arrays(P2)
    r = oracle_inequality_corrected(w2, p2, logq, logp2, kl_P2_Q, 0.0, kl_Q_P2)
    assert float(r.paper_rate) == pytest.approx(kl_Q_P2) and kl_Q_P2 == pytest.approx(3.866, abs=1e-3)
    assert float(r.gain_rate) == pytest.approx(2.34, abs=1e-2)  # hand value
    assert r.gain_rate < r.paper_rate  # the paper's oracle inequality fails
    assert r.gain_rate >= r.mu  # the corrected rate holds
    # identity: gain = KL(P2||Q) + sum_u P2(u) KL(q_u||p2_u) (oracle target)
    q = np.exp(logq[:2])
    inner = (q * (logq[:2] - logp2[:2])).sum(1)
    assert float(r.gain_rate) == pytest.approx(kl_P2_Q + w2[:2] @ inner, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(K=st.integers(2, 6), seed=st.integers(0, 2**31 - 1), lr=st.floats(1e-3, 1.0), lam=st.floats(-3, 3))
def test_theorem_e1_residual_lower_bound_brute_force(K, seed, lr, lam):
    rng = np.random.default_rng(seed)
    lq = log_softmax(rng.standard_normal((1, K)))
    lp = log_softmax(rng.standard_normal((1, K)) * 1.5)
    lq1 = log_softmax(lq + lr * rng.standard_normal((1, K)))
    rb = theorem_e1_corrected_residual_lower_bound(lq, lq1, lp)
    q = np.exp(lq)
    res = np.sqrt((q * (lq1 - tilt_log(lq, lp, lam)) ** 2).sum())
    assert res >= rb.lower[0] - 1e-12
    res_star = np.sqrt((q * (lq1 - tilt_log(lq, lp, rb.lam)) ** 2).sum())
    assert res_star == pytest.approx(rb.residual[0], rel=1e-8, abs=1e-12)
    if K == 2:  # every update is a tilt
        assert rb.residual[0] < 1e-10
    nat = log_softmax(lq + lr * (lp - lq))  # natural gradient on KL(q||p~): an exact tilt
    assert theorem_e1_corrected_residual_lower_bound(lq, nat, lp).residual[0] < 1e-10


def test_theorem_e1_sgd_is_misaligned():
    lq = np.log(np.array([[0.6, 0.3, 0.1]]))
    lp = np.log(np.array([[0.2, 0.2, 0.6]]))
    sgd = [log_softmax(lq + lr * (np.exp(lp) - np.exp(lq))) for lr in (1e-4, 1e-2)]
    sins = [theorem_e1_corrected_residual_lower_bound(lq, q1, lp).sin_theta[0] for q1 in sgd]
    assert sins[0] > 0.05 and sins[0] == pytest.approx(sins[1], rel=0.05)  # O(1), not O(sqrt eps)


@settings(max_examples=60, deadline=None)
@given(d=st.floats(0.01, 2), frac=st.floats(0.0, 0.99), A=st.floats(0.01, 3), mu=st.floats(0.05, 2),
       C1=st.floats(0, 3), C2=st.floats(1e-3, 3))
def test_theorem_3_1_corrected_forms(d, frac, A, mu, C1, C2):
    lam = frac * mu / C2
    r = theorem_3_1_corrected(d, lam, A, mu, C1, C2)
    assert float(r["exact"]) == pytest.approx(d * (A + C1 * lam) / (mu - C2 * lam))
    assert r["exact"] >= r["first_order"] - 1e-12  # the expansion's remainder is >= 0
    if frac <= 0.5:
        assert r["linear"] >= r["exact"] * (1 - 1e-12)
    else:
        assert np.isnan(r["linear"])
    with pytest.raises(ValueError, match="too large"):
        theorem_3_1_corrected(d, 1.01 * mu / C2, A, mu, C1, C2)


@settings(max_examples=40, deadline=None)
@given(V=st.integers(1, 3), depth=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), frac=st.floats(0.05, 0.9))
def test_lambda_max_bracket_brute_force(V, depth, seed, frac):
    rng = np.random.default_rng(seed)
    P = complete_tree(V, depth, rng)
    logq = log_softmax(np.log(P.cond_full() + 1e-3) + 0.3 * rng.standard_normal((P.n_nodes, V + 1)))
    logp = log_softmax(2 * rng.standard_normal((P.n_nodes, V + 1)))
    d = lambda lam: tree_kl(P, tilt_log(logq, logp, lam)) - tree_kl(P, logq)  # noqa: E731
    if d(1.0) <= 1e-6:
        return
    eps = frac * d(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if d(mid) > eps else (mid, hi)
    w, p = arrays(P)
    L = lemma_e1_corrected(w, p, logq, logp, 0.0)
    br = lambda_max_bracket(1, eps, L.first_order, L.R)
    assert br.lower * (1 - 1e-7) <= lo <= br.upper * (1 + 1e-7)


def test_lambda_max_per_token_and_paper_point_opposite_ways_on_demo_numbers():
    cot = dict(s=4.111, m=10.0, M_h=11.842, M_e=5.718)
    lab = dict(s=2.778, m=5.0, M_h=12.491, M_e=5.718)
    tok = [lambda_max_per_token(100, 1, 1, c["s"], c["m"], c["M_h"], c["M_e"], 1) for c in (cot, lab)]
    pap = [B.lambda_max(100, 1, 1, B.V_s(c["s"], c["m"], c["M_h"], c["M_e"]), 1) for c in (cot, lab)]
    assert pap[1] > pap[0]  # the paper's V_s: label-only tolerates larger steps
    assert tok[1] < tok[0]  # per-token form (no relaxation (14)): the opposite


def test_lemma_e2_corrected_tight_example_and_paper_counterexample():
    assert float(lemma_e2_corrected(0.5, 1.0, 0.0, 0.1)) == pytest.approx(0.61)
    realised = 0.5 * (1.1**2 + 0.1**2)  # Delta = (1.1, 0.1) on q = (1/2, 1/2), allowed by B.5
    assert realised == pytest.approx(0.61)
    paper = float(B.lemma_e2_variance_bound(0.5, 1.0, 0.0, 0.0, 0.1))
    assert paper == pytest.approx(0.51) and paper < realised
    with pytest.raises(ValueError, match="gamma"):
        lemma_e2_corrected(0.5, 1.0, 0.0, 1.0)


def test_lambda_max_bracket_tilting_against_iterated_steps():
    # one prefix: T equal tilts equal one tilt of weight 1 - (1 - lam)^T; the bracket holds there
    from theory.corrected import lambda_max_bracket_tilting, per_prefix_terms
    from theory.tilting import log_softmax, tilt_log

    rng = np.random.default_rng(5)
    lq, lp = log_softmax(rng.standard_normal((1, 4))), log_softmax(2 * rng.standard_normal((1, 4)))
    p1 = np.exp(log_softmax(lq + 0.1 * rng.standard_normal((1, 4))))  # near q: the tilt toward p degrades
    delta = lambda l: float((p1 * (lq - l)).sum())  # noqa: E731  KL(p1||q_lam) - KL(p1||q0)
    lam, T = 0.13, 7
    it = lq
    for _ in range(T):
        it = tilt_log(it, lp, lam)
    np.testing.assert_allclose(it, tilt_log(lq, lp, 1 - (1 - lam) ** T), atol=1e-12)
    t = per_prefix_terms(np.ones(1), p1, lq, lp)
    eps = 0.5 * delta(tilt_log(lq, lp, 1.0))
    assert eps > 0
    br = lambda_max_bracket_tilting(T, eps, -t["gap"], t["R"])
    assert 0 < br.lower[()] <= br.upper[()] <= 1
    run = lq
    for _ in range(T):
        run = tilt_log(run, lp, float(br.lower))
    assert delta(run) <= eps + 1e-12  # the lower end is safe after T real steps


def test_hard_family_has_its_features():
    from theory import batched as Bt

    rng = np.random.default_rng(0)
    worlds = list(Bt.hard_batches(rng, 40))
    assert max(bw.tree.max_depth for bw in worlds) >= 8
    lq = np.concatenate([bw.logq0[:, ~bw.tree.forced_end()].reshape(-1) for bw in worlds if bw.tree.vocab_size == 2])
    assert lq.min() < -1000 and np.any(np.exp(lq) > 1 - 1e-11)  # log q far below underflow, near-deterministic rows
    p = np.concatenate([np.exp(bw.logp1[:, ~bw.tree.forced_end()]).max(-1).ravel() for bw in worlds])
    assert np.any(p == 1.0)  # point masses


def test_push_point_masses_and_hard_rows():
    from theory import batched as Bt

    rng = np.random.default_rng(1)
    bw = Bt.random_batch(rng, 4, 3, 2)
    down = rng.standard_normal(bw.logq0.shape)
    out = Bt.push_point_masses(rng, bw.tree, bw.logp1, down, frac=1.0)
    coded = bw.coded
    np.testing.assert_array_equal(np.argmax(out[:, coded], -1), np.argmax(down[:, coded, :3], -1))
    assert np.all(np.exp(out[:, coded]).max(-1) == 1.0)  # point masses on a real token (never EOS)
    rows = Bt.hard_rows(rng, 60, K_max=6)
    assert rows.shape == (60, 6)
    fin = np.isfinite(rows)
    np.testing.assert_allclose(np.logaddexp.reduce(np.where(fin, rows, -np.inf), 1), 0.0, atol=1e-12)
    assert rows[fin].min() < -700 and np.exp(rows[fin]).max() > 1 - 1e-11  # below underflow; near-deterministic


def test_sequence_cauchy_schwarz_in_log_space_against_mpmath():
    import mpmath as mp

    from theory import batched as Bt

    mp.mp.dps = 50
    tree = Bt.random_batch(np.random.default_rng(0), 1, 2, 1).tree  # root over {0, 1, EOS}; children forced
    lq = np.full((1, tree.n_nodes, 3), [-np.inf, -np.inf, 0.0])
    lp = lq.copy()
    lq[0, 0] = [np.log(0.5), np.log(0.5), -800.0]  # the root's EOS: Q = e^-800, below float64's range
    lp[0, 0] = np.log([0.4, 0.4, 0.2])
    F = np.zeros((1, tree.n_nodes))
    F[0, 0] = 3.0  # F = 3 on the response ending at the root, 1 on the others
    F[0, tree.depth == 1] = 1.0
    got = Bt.seq_cauchy_schwarz(tree, lp, lq, F)[0]
    Q = [mp.mpf(0.5), mp.mpf(0.5), mp.exp(-800)]
    P = [mp.mpf(0.4), mp.mpf(0.4), mp.mpf(0.2)]
    f = [1, 1, 3]
    EQ = sum(q * x for q, x in zip(Q, f))
    var = sum(q * (x - EQ) ** 2 for q, x in zip(Q, f))
    chi2 = sum((p - q) ** 2 / q for p, q in zip(P, Q))
    assert got == pytest.approx(float(mp.sqrt(var * chi2)), rel=1e-9)  # ~ sqrt(.04 * 4): O(1)
    with np.errstate(over="ignore"):
        assert not np.isfinite(Bt.chi2_seq(tree, lp, lq)[0])  # the linear-space chi2 alone overflows


def test_residual_of_an_exact_tilt_with_an_outcome_below_underflow():
    # q = (.5, .5, e^-800); the update is the tilt of weight 1.5 toward p~, whose normaliser is
    # dominated by the third outcome (e^{-800 + 1.5 * 799}): the residual is 0, the offset 0
    lq = np.array([[np.log(0.5), np.log(0.5), -800.0]])
    lp = np.log(np.array([[0.2, 0.4, 0.4]]))
    z = lq + 1.5 * (lp - lq)
    lq1 = z - np.logaddexp.reduce(z, 1)[:, None]
    rb = theorem_e1_corrected_residual_lower_bound(lq, lq1, lp)
    assert rb.lam[0] == pytest.approx(1.5, rel=1e-9)
    assert abs(rb.offset[0]) < 1e-9 * rb.eps[0] and rb.residual[0] < 1e-6
    assert rb.eps[0] > 300  # KL(q || q1): the step moves ~all of q1's mass to the third outcome
