import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from theory.bounds import prefix_decomposition
from theory.divergence import TreeLogProbs, kl
from theory.tilting import log_softmax
from theory.tree import TokenTree
from treehelpers import complete_tree


def random_logq(tree, rng, scale):
    return log_softmax(scale * rng.standard_normal((tree.n_nodes, tree.vocab_size + 1)))


def brute_force_delta(tree, lq, lq2):
    """KL(P1||Q') - KL(P1||Q) by enumerating every response and multiplying along its path."""
    total = 0.0
    V = tree.vocab_size
    for u in range(tree.n_nodes):
        if tree.eos_mass[u] <= 0:
            continue
        log_ratio, v = 0.0, u
        if not tree.forced_end()[u]:
            log_ratio += lq[u, V] - lq2[u, V]
        while v > 0:
            par, tok = tree.parent[v], tree.token[v]
            log_ratio += lq[par, tok] - lq2[par, tok]
            v = par
        total += tree.eos_mass[u] * log_ratio
    return total


@settings(max_examples=80, deadline=None)
@given(V=st.integers(1, 3), depth=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       s1=st.floats(0.0, 3.0), s2=st.floats(0.0, 3.0))
def test_identity_and_bound_on_complete_trees(V, depth, seed, s1, s2):
    rng = np.random.default_rng(seed)
    tree = complete_tree(V, depth, rng, conc=float(rng.uniform(0.3, 3)))
    lq, lq2 = random_logq(tree, rng, s1), random_logq(tree, rng, s2)
    d = prefix_decomposition(tree, lq, lq2)
    ref = kl(tree, TreeLogProbs.from_full(tree, lq2), "nats") - kl(tree, TreeLogProbs.from_full(tree, lq), "nats")
    assert d.delta == pytest.approx(ref, abs=1e-9)
    assert d.delta == pytest.approx(brute_force_delta(tree, lq, lq2), abs=1e-9)
    assert d.first_order + d.kl_term == pytest.approx(d.delta, abs=1e-12)
    assert d.kl_term >= 0
    assert d.delta <= d.bound_nodewise + 1e-12 <= d.bound + 2e-12
    # TreeLogProbs input on a complete tree gives the same numbers
    d2 = prefix_decomposition(tree, TreeLogProbs.from_full(tree, lq), TreeLogProbs.from_full(tree, lq2))
    assert d2.delta == pytest.approx(d.delta, abs=1e-12) and d2.bound == pytest.approx(d.bound, rel=1e-12)
    bits = prefix_decomposition(tree, lq, lq2, unit="bits")
    assert bits.delta == pytest.approx(d.delta / np.log(2), abs=1e-12)
    assert bits.bound == pytest.approx(d.bound / np.log(2), rel=1e-12, abs=1e-12)
    assert bits.chi2_bar == pytest.approx(d.chi2_bar)


def test_hand_value_one_node():
    # one coded prefix, p = q = (1/2, 1/2), q' = (3/4, 1/4): delta = KL(q||q') = 1/2 log(4/3)
    tree = TokenTree.from_distribution(lambda pre: np.array([0.5, 0.5]), 1, 1)
    lq = np.log(np.tile([0.5, 0.5], (tree.n_nodes, 1)))
    lq2 = np.log(np.tile([0.75, 0.25], (tree.n_nodes, 1)))
    d = prefix_decomposition(tree, lq, lq2)
    assert d.delta == pytest.approx(0.5 * np.log(4 / 3), rel=1e-12)
    assert d.kl_term == pytest.approx(0.5 * np.log(4 / 3), rel=1e-12)
    assert d.first_order == pytest.approx(0.0, abs=1e-15) and d.chi2_bar == pytest.approx(0.0, abs=1e-15)
    assert d.bound == pytest.approx(d.delta, rel=1e-12)  # tight when P1 = Q


def test_first_order_sign_and_chi2_hand_value():
    # p = (1, 0) at the root, q = (1/2, 1/2), q' = (3/4, 1/4): s = (log 1.5, log .5)
    tree = TokenTree.from_distribution(lambda pre: np.array([1.0, 0.0]), 1, 1)
    lq = np.log(np.tile([0.5, 0.5], (tree.n_nodes, 1)))
    lq2 = np.log(np.tile([0.75, 0.25], (tree.n_nodes, 1)))
    d = prefix_decomposition(tree, lq, lq2)
    assert d.delta == pytest.approx(-np.log(1.5), rel=1e-12)  # P1 always emits token 0
    assert d.chi2_bar == pytest.approx(1.0, rel=1e-12)  # sum p^2/q - 1 = 2 - 1
    assert d.first_order == pytest.approx(-np.log(1.5) - d.kl_term, rel=1e-12)


def test_tree_lacking_outcomes_raises():
    rng = np.random.default_rng(0)
    tree = TokenTree.from_sequences([[0, 1], [0], [2, 2, 1]], vocab_size=3, max_depth=4)
    lq, lq2 = random_logq(tree, rng, 1.0), random_logq(tree, rng, 1.0)
    with pytest.raises(ValueError, match=r"lacks outcomes"):
        prefix_decomposition(tree, TreeLogProbs.from_full(tree, lq), TreeLogProbs.from_full(tree, lq2))
    # full rows are fine on the same empirical tree (they hold every outcome)
    d = prefix_decomposition(tree, lq, lq2)
    assert np.isfinite(d.delta)
    # a restricted alphabet without an "other" column: rows sum to < 1
    cut = lq.copy()
    cut[:, 1] = -np.inf
    with pytest.raises(ValueError, match=r"node 0 .* sums to"):
        prefix_decomposition(tree, cut, lq2)


def test_bad_inputs_raise():
    rng = np.random.default_rng(1)
    tree = complete_tree(2, 2, rng)
    lq = random_logq(tree, rng, 1.0)
    with pytest.raises(ValueError, match="shape"):
        prefix_decomposition(tree, lq[:, :2], lq)
    with pytest.raises(ValueError, match="unit"):
        prefix_decomposition(tree, lq, lq, unit="nat")
    zero = lq.copy()
    zero[0, 0] = -np.inf
    zero[0] = zero[0] - np.log(np.exp(zero[0]).sum())
    with pytest.raises(ValueError, match="zero"):
        prefix_decomposition(tree, lq, zero)


def test_logq_full_holder_is_accepted():
    rng = np.random.default_rng(2)
    tree = complete_tree(2, 2, rng)
    lq, lq2 = random_logq(tree, rng, 1.0), random_logq(tree, rng, 1.0)

    class Holder:
        logq_full = lq2

    assert prefix_decomposition(tree, lq, Holder()).delta == pytest.approx(prefix_decomposition(tree, lq, lq2).delta)


def test_mass_outside_the_alphabet_as_an_extra_column():
    # raw model rows that leak mass to outcomes outside the tree (PAD/BOS): with_other closes them,
    # and delta equals the KL difference computed on the raw rows
    from theory.prefix import with_other

    rng = np.random.default_rng(3)
    tree = complete_tree(2, 2, rng)
    raw = [random_logq(tree, rng, 1.0) + np.log(0.97), random_logq(tree, rng, 1.0) + np.log(0.9)]
    with pytest.raises(ValueError, match="sums to"):
        prefix_decomposition(tree, raw[0], raw[1])
    d = prefix_decomposition(tree, with_other(raw[0]), with_other(raw[1]))
    ref = (kl(tree, TreeLogProbs.from_full(tree, raw[1]), "nats")
           - kl(tree, TreeLogProbs.from_full(tree, raw[0]), "nats"))
    assert d.delta == pytest.approx(ref, abs=1e-10)
    assert d.delta <= d.bound
