"""Issue 13, bug 9: token ids beyond 32 bits stay distinct; KL refuses an unnormalised Q."""
import numpy as np
import pytest

from theory.divergence import TreeLogProbs, kl
from theory.tree import TokenTree


@pytest.mark.parametrize("method", ["sorted", "unique"])
def test_ids_beyond_32_bits_are_not_merged(method):
    """[5] and [2**32 + 5] used to share one node (the sort keys wrapped at 32 bits)."""
    t = TokenTree.from_sequences([[5], [2**32 + 5]], _method=method)
    assert t.n_nodes == 3  # root + two distinct children
    assert sorted(t.token[1:].tolist()) == [5, 2**32 + 5]


def test_ids_at_or_above_vocab_are_rejected():
    with pytest.raises(ValueError, match="outside vocab_size=10"):
        TokenTree.from_sequences([[5], [10]], vocab_size=10)


def test_kl_rejects_q_summing_above_one_and_accepts_sub_normalised():
    tree = TokenTree.from_sequences([[0], [1], [1, 0]], vocab_size=2)
    V = tree.vocab_size
    good = np.log(np.full((tree.n_nodes, V + 1), 1.0 / (V + 1)))
    assert kl(tree, TreeLogProbs.from_full(tree, good), unit="nats") >= 0
    low = good + np.log(0.5)  # half of Q's mass elsewhere: allowed, KL still >= 0
    assert kl(tree, TreeLogProbs.from_full(tree, low), unit="nats") > 0
    over = np.log(np.full((tree.n_nodes, V + 1), 0.9))  # rows sum to 2.7
    with pytest.raises(ValueError, match=r"sum to 2\.7 > 1"):
        kl(tree, TreeLogProbs.from_full(tree, over), unit="nats")
