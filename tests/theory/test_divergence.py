"""Divergences on trees against brute-force enumeration of responses."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from theory.divergence import (
    TreeLogProbs, chi2, code_length_bits, delta_code_length, delta_code_length_per_level,
    expect_p, expect_q, kl, leaf_log_prob, q_coverage, var_q,
)
from theory.tree import TokenTree

V = 3


def random_model(rng, temp=1.0):
    """A full-support model: conditionals from random logits per prefix (memoised)."""
    cache = {}

    def logq(prefix):
        if prefix not in cache:
            z = rng.normal(size=V + 1) * temp
            cache[prefix] = z - np.log(np.exp(z).sum())
        return cache[prefix]

    return logq


def lp_of(tree, logq):
    return TreeLogProbs.from_full(tree, np.stack([logq(p) for p in tree.prefixes()]))


def brute_logQ(z, logq, max_depth=None):
    s = sum(logq(z[:k])[z[k]] for k in range(len(z)))
    if max_depth is None or len(z) < max_depth:
        s += logq(z)[V]
    return s


seqs_st = st.lists(st.lists(st.integers(0, V - 1), max_size=4), min_size=1, max_size=10)


@settings(max_examples=50, deadline=None)
@given(seqs_st, st.integers(0, 2**31), st.one_of(st.none(), st.integers(1, 4)))
def test_kl_code_length_chi2_equal_enumeration(seqs, seed, d):
    rng = np.random.default_rng(seed)
    tree = TokenTree.from_sequences(seqs, vocab_size=V, max_depth=d)
    logq = random_model(rng)
    lp = lp_of(tree, logq)
    ids, p = tree.leaves()
    zs = [tree.prefix(u) for u in ids]
    lq = np.array([brute_logQ(z, logq, d) for z in zs])
    assert kl(tree, lp, unit="nats") == pytest.approx(np.sum(p * (np.log(p) - lq)), abs=1e-10)
    assert code_length_bits(tree, lp) == pytest.approx(-np.sum(p * lq) / np.log(2), abs=1e-10)
    assert chi2(tree, lp) == pytest.approx(np.sum(p**2 / np.exp(lq)) - 1, rel=1e-9, abs=1e-9)
    assert np.allclose(leaf_log_prob(tree, lp)[ids], lq)
    assert kl(tree, lp) >= -1e-12
    assert kl(tree, TreeLogProbs.from_tree(tree)) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(seqs_st, st.integers(0, 2**31))
def test_proposition_3_1_forms_agree(seqs, seed):
    rng = np.random.default_rng(seed)
    tree = TokenTree.from_sequences(seqs, vocab_size=V)
    lp1, lp2 = lp_of(tree, random_model(rng)), lp_of(tree, random_model(rng, 2.0))
    total, per_level = delta_code_length_per_level(tree, lp1, lp2)
    assert total == pytest.approx(delta_code_length(tree, lp1, lp2), abs=1e-9)
    assert per_level.size == tree.n_levels  # layers 1 .. max depth + 1
    # code-length difference is also the difference of cross-entropies
    assert total == pytest.approx(code_length_bits(tree, lp2) - code_length_bits(tree, lp1), abs=1e-9)


def all_responses(d):
    for n in range(d + 1):
        yield from itertools.product(range(V), repeat=n)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 3))
def test_sequence_level_moments_under_q_on_complete_tree(seed, d):
    rng = np.random.default_rng(seed)
    logp, logq = random_model(rng), random_model(rng)
    tree = TokenTree.from_distribution(lambda pre: np.exp(logp(pre)), V, d)
    lp = lp_of(tree, logq)
    f = rng.normal(size=tree.n_nodes)
    zs = list(all_responses(d))
    q = np.array([np.exp(brute_logQ(z, logq, d)) for z in zs])
    pz = np.array([np.exp(brute_logQ(z, logp, d)) for z in zs])
    fz = np.array([f[tree.find(z)] for z in zs])
    assert q.sum() == pytest.approx(1.0) and q_coverage(tree, lp) == pytest.approx(1.0)
    assert expect_q(tree, lp, f) == pytest.approx(np.dot(q, fz))
    assert var_q(tree, lp, f) == pytest.approx(np.dot(q, (fz - np.dot(q, fz)) ** 2))
    assert expect_p(tree, f) == pytest.approx(np.dot(pz, fz))
    # change of measure (used in Theorem E.2): |E_P f - E_Q f| <= sqrt(Var_Q f * chi2(P||Q))
    gap = abs(expect_p(tree, f) - expect_q(tree, lp, f))
    assert gap <= np.sqrt(var_q(tree, lp, f) * chi2(tree, lp)) + 1e-9


def test_var_q_refuses_a_tree_without_q_support():
    tree = TokenTree.from_sequences([[0], [1, 2]], vocab_size=V)
    lp = lp_of(tree, random_model(np.random.default_rng(0)))
    assert q_coverage(tree, lp) < 1
    with pytest.raises(ValueError, match="outside this tree"):
        var_q(tree, lp, np.zeros(tree.n_nodes))


def test_hand_computed_kl_bits():
    # P: "0" w.p. 1/2, "1" w.p. 1/2 ; Q: q(0)=q(1)=1/4, q(EOS|0)=q(EOS|1)=1/2.
    tree = TokenTree.from_sequences([[0], [1]], vocab_size=2)
    logq_full = np.log(np.array([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
    lp = TreeLogProbs.from_full(tree, logq_full)
    # -log2 Q(z) = 2 + 1 = 3 bits each; H(P) = 1 bit => KL = 2 bits
    assert code_length_bits(tree, lp) == pytest.approx(3.0)
    assert kl(tree, lp) == pytest.approx(2.0)
    assert kl(tree, lp, unit="nats") == pytest.approx(2.0 * np.log(2))
    with pytest.raises(ValueError, match="unit"):
        kl(tree, lp, unit="bans")
