"""The bridge `sft.treeprobs`: empirical trees of a real tokenizer/model (exact trees are tested
against brute force in tests/worlds/test_worlds.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sft.models import byte_tokenizer, load_model
from sft.treeprobs import (TreeProbsError, build_empirical_trees, empirical_tree_logprobs, pool_conditionals,
                           pooled_logq, sequence_conditionals, tree_paths)
from theory.divergence import leaf_log_prob
from theory.tree import TokenTree

TINY = "tiny:hidden=32,layers=1,heads=2,intermediate=64"


def test_pooled_conditionals_are_distributions_and_average():
    """Rows of the tree conditionals sum to 1 over (used tokens, other, EOS); a node shared by two
    sequences holds the average of their conditionals; a lone sequence's rows are kept exactly."""
    tok = byte_tokenizer()
    model = load_model(TINY, seed=1)
    general = ([None, None], ["xab", "xac"])  # no BOS: "x" is the context
    domain = (["x", "y"], ["ab", "b"])
    ts = build_empirical_trees(tok, general, domain, depth=4, model_vocab=model.config.vocab_size)
    assert ts.has_other and ts.V == 3 + 1  # used {a, b, c} + other
    rows = sequence_conditionals(model, ts)
    for r, s in zip(rows, ts.seqs):
        assert r.shape == (len(s) + 1, ts.V + 1)
        np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-9)
    lq = pool_conditionals(ts, rows)
    # D2: the root is shared by both domain sequences (prompts x and y): the average
    np.testing.assert_allclose(np.exp(lq.p2[0]), (rows[2][0] + rows[3][0]) / 2, atol=1e-12)
    # D1: node "a" is shared by "xab" and "xac" (one context): equal rows
    assert tok.decode(ts.seqs[0]) == "ab"
    a = ts.p1.find([0])
    assert a > 0
    np.testing.assert_allclose(np.exp(lq.p1[a]), rows[0][1], atol=1e-12)
    np.testing.assert_allclose(rows[0][1], rows[1][1], atol=1e-12)
    # hand check of the compression: the 'a' column is q(a | context) of the full softmax
    ids = torch.tensor([ts.contexts[0] + ts.seqs[0]])
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0].double(), -1)
    assert rows[0][0, 0] == pytest.approx(float(p[len(ts.contexts[0]) - 1, ts.vocab_ids[0]]), rel=1e-5)
    assert rows[0][0, -1] == pytest.approx(float(p[len(ts.contexts[0]) - 1, tok.eos_token_id]), rel=1e-5)
    # the 'other' column is the rest of the softmax (neither a used token nor the stop token)
    rest = 1.0 - float(p[len(ts.contexts[0]) - 1, ts.vocab_ids].sum()) - float(p[len(ts.contexts[0]) - 1, 257])
    assert rows[0][0, 3] == pytest.approx(rest, rel=1e-6)


def test_one_context_tree_gives_the_models_sequence_log_probs():
    """With every sequence in one context, pooling is exact: the empirical tree's log Q(z) of each
    response equals the model's own log-probability of the tokens and the stop token."""
    tok = byte_tokenizer()
    model = load_model(TINY, seed=2)
    texts = ["xab", "xac", "xb", "xbca"]
    ts = build_empirical_trees(tok, ([None] * 4, texts), ([None], ["xc"]), depth=3,
                               model_vocab=model.config.vocab_size)
    lq = empirical_tree_logprobs(model, ts)
    assert lq.p1.shape == (ts.p1.n_nodes, ts.V + 1) and lq.union.shape == (ts.union.n_nodes, ts.V + 1)
    leaf = leaf_log_prob(ts.p1, lq.tree_logprobs(ts, "p1"))
    for s, path in zip(ts.seqs[:4], ts.paths_own[:4]):
        ctx = ts.contexts[0]
        forced = len(s) == ts.depth  # "xbca" is cut at depth 3: the end is certain, EOS costs nothing
        ids = torch.tensor([ctx + s + ([] if forced else [tok.eos_token_id])])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        want = sum(float(lp[t, ids[0, t + 1]]) for t in range(len(ctx) - 1, ids.shape[1] - 1))
        assert leaf[path[-1]] == pytest.approx(want, rel=1e-6)  # float32 logits, padded batch


def test_pooled_logq_weights():
    paths = [np.array([0, 1]), np.array([0, 2])]
    rows = [np.array([[0.5, 0.5], [0.9, 0.1]]), np.array([[0.1, 0.9], [0.2, 0.8]])]
    lq = np.exp(pooled_logq(4, paths, rows, np.array([3.0, 1.0]), 2))
    np.testing.assert_allclose(lq[0], [0.4, 0.6])
    np.testing.assert_allclose(lq[1], [0.9, 0.1])
    np.testing.assert_allclose(lq[3], [0.5, 0.5])  # never visited: uniform


def test_errors_name_the_problem():
    tok = byte_tokenizer()
    with pytest.raises(TreeProbsError, match="outside the model's vocabulary"):
        build_empirical_trees(tok, ([None], ["xab"]), ([None], ["xb"]), depth=3, model_vocab=100)
    tree = TokenTree.from_sequences([[0, 1]], vocab_size=3)
    assert [p.tolist() for p in tree_paths(tree, [[0, 1], [0]])] == [[0, 1, 2], [0, 1]]
    with pytest.raises(TreeProbsError, match="not in the tree"):
        tree_paths(tree, [[0, 2]])
