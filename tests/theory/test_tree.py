"""TokenTree: invariants, brute force on tiny trees, union, truncation, sampling."""
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from theory.tree import TokenTree

seqs_st = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=5), min_size=1, max_size=12)


def brute_prefix_mass(seqs, weights, max_depth=None):
    """P(prefix) and P(response) by enumeration over the dataset."""
    pre, full = Counter(), Counter()
    tot = float(sum(weights))
    for s, w in zip(seqs, weights):
        s = tuple(s if max_depth is None else s[:max_depth])
        for k in range(len(s) + 1):
            pre[s[:k]] += w / tot
        full[s] += w / tot
    return pre, full


@settings(max_examples=60, deadline=None)
@given(seqs_st, st.data())
def test_from_sequences_matches_enumeration(seqs, data):
    weights = data.draw(st.lists(st.floats(0.1, 5.0), min_size=len(seqs), max_size=len(seqs)))
    d = data.draw(st.one_of(st.none(), st.integers(0, 4)))
    tree = TokenTree.from_sequences(seqs, weights=weights, max_depth=d, vocab_size=4)
    tree.validate()
    pre, full = brute_prefix_mass(seqs, weights, d)
    assert tree.n_nodes == len(pre)
    prefixes = tree.prefixes()
    for u, p in enumerate(prefixes):
        assert tree.mass[u] == pytest.approx(pre[p], abs=1e-12)
        assert tree.eos_mass[u] == pytest.approx(full.get(p, 0.0), abs=1e-12)
        assert tree.find(p) == u
    # masses sum to 1 and every conditional vector sums to 1
    assert tree.eos_mass.sum() == pytest.approx(1.0)
    cond_sum = tree.cond_eos() + np.bincount(tree.parent[1:], weights=tree.cond_edge()[1:], minlength=tree.n_nodes)
    forced = tree.forced_end()
    assert np.allclose(cond_sum[~forced], 1.0)
    # BFS order and sorted children
    assert np.all(np.diff(tree.depth) >= 0)
    for u in range(tree.n_nodes):
        toks = tree.token[tree.children(u)]
        assert np.all(np.diff(toks) > 0)


def test_hand_built_tree():
    tree = TokenTree.from_sequences([[0, 1], [0], [1], [0, 1]], vocab_size=2)
    # nodes: root, (0), (1), (0,1)
    assert tree.prefixes() == [(), (0,), (1,), (0, 1)]
    assert np.allclose(tree.mass, [1.0, 0.75, 0.25, 0.5])
    assert np.allclose(tree.eos_mass, [0.0, 0.25, 0.25, 0.5])
    assert np.allclose(tree.cond_edge(), [1.0, 0.75, 0.25, 2 / 3])
    assert tree.find((1, 1)) == -1
    full = tree.cond_full()
    assert np.allclose(full[1], [0.0, 2 / 3, 1 / 3])


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="outside vocab_size"):
        TokenTree.from_sequences([[0, 5]], vocab_size=3)
    with pytest.raises(ValueError, match="negative"):
        TokenTree.from_sequences([[0, -1]])
    with pytest.raises(ValueError, match="weights"):
        TokenTree.from_sequences([[0]], weights=[1.0, 2.0])


def _markov(V):
    rng = np.random.default_rng(V)
    table = rng.dirichlet(np.ones(V + 1), size=V + 1)

    def next_probs(prefix):
        return table[prefix[-1] if prefix else V]

    return next_probs


def test_from_distribution_complete_and_pruned():
    V, d = 3, 4
    nxt = _markov(V)
    tree = TokenTree.from_distribution(nxt, V, d)
    tree.validate()
    assert tree.n_nodes == sum(V**k for k in range(d + 1))  # complete tree
    # response probabilities by enumeration
    for u, p in enumerate(tree.prefixes()):
        prob = 1.0
        for k in range(len(p)):
            prob *= nxt(p[:k])[p[k]]
        assert tree.mass[u] == pytest.approx(prob)
        end = 1.0 if len(p) == d else nxt(p)[V]
        assert tree.eos_mass[u] == pytest.approx(prob * end)
    pruned = TokenTree.from_distribution(nxt, V, d, min_mass=0.01)
    pruned.validate()
    assert pruned.n_nodes < tree.n_nodes
    kept = sum(tree.eos_mass[tree.find(p)] for p in pruned.prefixes())
    assert 0 < pruned.pruned_mass < 1
    # the kept responses carry at least 1 - pruned of the original mass
    assert kept >= 1 - pruned.pruned_mass - 1e-12
    batched = TokenTree.from_distribution(lambda ps: np.stack([nxt(p) for p in ps]), V, d, batched=True)
    assert np.allclose(batched.mass, tree.mass)


def test_from_distribution_rejects_bad_probs():
    with pytest.raises(ValueError, match="not a probability"):
        TokenTree.from_distribution(lambda p: np.array([0.5, 0.6, 0.1]), 2, 2)
    with pytest.raises(ValueError, match="shape"):
        TokenTree.from_distribution(lambda p: np.array([0.5, 0.5]), 2, 2)


@settings(max_examples=40, deadline=None)
@given(seqs_st, st.integers(0, 3))
def test_truncate_equals_building_truncated(seqs, d):
    full = TokenTree.from_sequences(seqs, vocab_size=4)
    direct = TokenTree.from_sequences(seqs, vocab_size=4, max_depth=d)
    cut = full.truncate(d)
    cut.validate()
    assert cut.prefixes() == direct.prefixes()
    assert np.allclose(cut.mass, direct.mass) and np.allclose(cut.eos_mass, direct.eos_mass)


@settings(max_examples=40, deadline=None)
@given(seqs_st, seqs_st, st.floats(0.0, 1.0))
def test_union_is_the_mixture(a, b, w):
    ta = TokenTree.from_sequences(a, vocab_size=4)
    tb = TokenTree.from_sequences(b, vocab_size=4)
    tu, ia, ib = ta.union(tb, weight=w)
    tu.validate()
    pu = tu.prefixes()
    assert [pu[i] for i in ia] == ta.prefixes()
    assert [pu[i] for i in ib] == tb.prefixes()
    assert set(pu) == set(ta.prefixes()) | set(tb.prefixes())
    expect = np.zeros(tu.n_nodes)
    np.add.at(expect, ia, w * ta.eos_mass)
    np.add.at(expect, ib, (1 - w) * tb.eos_mass)
    assert np.allclose(tu.eos_mass, expect)


@settings(max_examples=40, deadline=None)
@given(seqs_st, seqs_st)
def test_union_aligned_keeps_each_distribution(a, b):
    """Each input's prefix and response masses, read off the shared topology, are its own (by
    enumeration); the union's masses are their average."""
    ta = TokenTree.from_sequences(a, vocab_size=4)
    tb = TokenTree.from_sequences(b, vocab_size=4)
    tu, ua, ub = ta.union_aligned(tb)
    for t in (tu, ua, ub):
        t.validate()
    assert ua.prefixes() == ub.prefixes() == tu.prefixes()
    for seqs, on_u in ((a, ua), (b, ub)):
        pre, full = brute_prefix_mass(seqs, [1.0] * len(seqs))
        for u, prefix in enumerate(on_u.prefixes()):
            assert on_u.mass[u] == pytest.approx(pre.get(prefix, 0.0), abs=1e-12)
            assert on_u.eos_mass[u] == pytest.approx(full.get(prefix, 0.0), abs=1e-12)
    np.testing.assert_allclose(tu.mass, (ua.mass + ub.mass) / 2, atol=1e-12)


def test_sampling_matches_distribution():
    tree = TokenTree.from_sequences([[0, 1], [0], [1, 1, 1], [0, 1], [2]], weights=[1, 2, 3, 1, 3], vocab_size=3)
    draws = tree.sample(20000, rng=0)
    freq = Counter(tuple(int(t) for t in z) for z in draws)
    ids, probs = tree.leaves()
    for u, p in zip(ids, probs):
        assert freq[tree.prefix(u)] / 20000 == pytest.approx(p, abs=0.015)
    assert set(freq) <= {tree.prefix(u) for u in ids}


def test_with_masses_reweights_same_topology():
    tree = TokenTree.from_sequences([[0], [1], [0, 1]], vocab_size=2)
    eos = np.zeros(tree.n_nodes)
    eos[tree.find((1,))] = 3.0
    eos[tree.find((0, 1))] = 1.0
    t2 = tree.with_masses(eos)
    t2.validate()
    assert t2.mass[tree.find((0,))] == pytest.approx(0.25)


@settings(max_examples=80, deadline=None)
@given(seqs_st, st.one_of(st.none(), st.integers(0, 4)), st.data())
def test_sorting_and_level_builders_agree(seqs, d, data):
    weights = data.draw(st.lists(st.floats(0.0, 3.0), min_size=len(seqs), max_size=len(seqs)))
    if sum(weights) == 0:
        weights[0] = 1.0
    a = TokenTree.from_sequences(seqs, weights=weights, max_depth=d, vocab_size=4, _method="sorted")
    b = TokenTree.from_sequences(seqs, weights=weights, max_depth=d, vocab_size=4, _method="levels")
    for name in ("parent", "token", "depth", "child_start", "child_count"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.allclose(a.mass, b.mass) and np.allclose(a.eos_mass, b.eos_mass)
