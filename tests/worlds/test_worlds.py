"""The tiny-transformer world: exact trees, exact KL against brute force, pretraining, trade-off."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sft.treeprobs import exact_full_logprobs, exact_tree_logprobs
from sft.worlds import (WorldConfig, build_world, conditional_code_length_bits, entropy_bits, exact_metrics, new_model,
                        pretrain)
from theory.divergence import TreeLogProbs, kl
from theory.tree import TokenTree


def _random_model(world, seed=0):
    torch.manual_seed(seed)
    return new_model(world)


def test_world_structure(smoke_world):
    w = smoke_world
    w.p1.validate()
    w.p2.validate()
    V = w.tree_vocab
    assert (w.eos_id, w.pad_id, w.bos_id, w.vocab_size) == (V, V + 1, V + 2, V + 3)
    # markers: every P1 response starts with M1, every P2 response with M2 (disjoint subtrees)
    assert w.p1.token[w.p1.children(0)].tolist() == [w.m1_id]
    assert w.p2.token[w.p2.children(0)].tolist() == [w.m2_id]
    union, ia, ib = w.p1.union(w.p2)
    assert not set(ia[1:].tolist()) & set(ib[1:].tolist())
    # hard tokens never appear in P1; every P2 response ends with its prompt's answer
    assert not np.isin(w.p1.token, w.hard_token_ids).any()
    ids, p = w.p2.leaves()
    assert math.isclose(p.sum(), 1.0)
    for u in ids:
        z = w.p2.prefix(int(u))
        assert z[-1] == w.answer_of(z[: w.prompt_len])
        assert len(z) == w.prompt_len + w.cfg.cot_len + 1
    # CoT tokens are P1's most probable continuation (easy under P1's structure)
    z = w.p2.prefix(int(ids[0]))
    C = w.cfg.n_content
    a, b = z[1], z[2]
    for c in z[3:-1]:
        assert c == int(np.argmax(w.trans[a * (C + 1) + b]))
        a, b = b, c
    # SFT examples: completion-only labels
    ex = w.d2_train[0]
    k = 1 + w.prompt_len
    assert ex["labels"][:k] == [-100] * k and ex["labels"][k:] == ex["input_ids"][k:]
    assert ex["input_ids"][0] == w.bos_id and ex["input_ids"][-1] == w.eos_id
    label = build_world(WorldConfig.smoke(variant="label"))
    assert all(len(label.p2.prefix(int(u))) == label.prompt_len + 1 for u in label.p2.leaves()[0])


def test_pretraining_key_ignores_p2_fields():
    a, b = WorldConfig.smoke(), WorldConfig.smoke(variant="label", n_train=10)
    assert a.key() == b.key()
    assert a.key() != WorldConfig.smoke(seed=1).key()


def _brute_force_leaf_logq(model, world, tree):
    """log q(z) for every response z of the tree, one plain forward pass per response."""
    out = {}
    ids, _ = tree.leaves()
    model.eval()
    with torch.no_grad():
        for u in ids:
            z = list(tree.prefix(int(u)))
            forced = tree.max_depth is not None and len(z) == tree.max_depth
            seq = [world.bos_id] + z + ([] if forced else [world.eos_id])
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            out[int(u)] = float(sum(logp[t, seq[t + 1]] for t in range(len(seq) - 1)))
    return out


@pytest.mark.parametrize("which", ["p1", "p2"])
def test_exact_kl_equals_brute_force(smoke_world, which):
    w = smoke_world
    tree = w.p1.truncate(4) if which == "p1" else w.p2
    model = _random_model(w, seed=3)
    lp = exact_tree_logprobs(model, tree, batch_size=7, bos_id=w.bos_id, eos_id=w.eos_id)  # several padded batches
    brute = _brute_force_leaf_logq(model, w, tree)
    ids, p = tree.leaves()
    logq = np.array([brute[int(u)] for u in ids])
    kl_brute = float(np.dot(p, np.log(p) - logq) / math.log(2))
    assert kl(tree, lp) == pytest.approx(kl_brute, rel=1e-5, abs=1e-5)
    from theory.divergence import leaf_log_prob

    np.testing.assert_allclose(leaf_log_prob(tree, lp)[ids], logq, rtol=1e-5, atol=1e-5)
    # dense conditionals: rows are the model's softmax restricted to tree tokens + EOS
    full = exact_full_logprobs(model, tree, bos_id=w.bos_id, eos_id=w.eos_id, batch_size=5)
    assert full.shape == (tree.n_nodes, tree.vocab_size + 1)
    assert np.all(np.exp(full).sum(1) <= 1 + 1e-9)
    norm = exact_full_logprobs(model, tree, bos_id=w.bos_id, eos_id=w.eos_id, renormalize=True)
    np.testing.assert_allclose(np.exp(norm).sum(1), 1.0, atol=1e-9)


def test_conditional_code_length_by_hand():
    # responses (0, 1) w.p. 0.5 and (0, 2) w.p. 0.5; prompt = first token
    tree = TokenTree.from_sequences([[0, 1], [0, 2]], vocab_size=3)
    full = np.log(np.full((tree.n_nodes, 4), 0.25))
    lp = TreeLogProbs.from_full(tree, full)
    # completion + EOS: two tokens at q = 1/4 each -> 4 bits
    assert conditional_code_length_bits(tree, lp, prompt_len=1) == pytest.approx(4.0)
    assert conditional_code_length_bits(tree, lp, prompt_len=0) == pytest.approx(6.0)


def test_pretraining_small_kl_and_cache(smoke_world, pretrained):
    model, info, cache = pretrained
    assert not info["cached"]
    assert info["H_p1_bits"] == pytest.approx(entropy_bits(smoke_world.p1))
    # learned: KL(P1 || q0) is small against H(P1) (random init is about H + several bits)
    kl_random = exact_metrics(_random_model(smoke_world), smoke_world)["kl_p1_bits"]
    assert info["kl_p1_bits"] < 0.35 * info["H_p1_bits"] < kl_random
    again, info2 = pretrain(smoke_world, cache_dir=cache)
    assert info2["cached"] and info2["kl_p1_bits"] == info["kl_p1_bits"]
    assert exact_metrics(again, smoke_world)["kl_p1_bits"] == pytest.approx(info["kl_p1_bits"], abs=1e-6)


def test_ce_finetuning_shows_the_tradeoff(smoke_world, pretrained, tmp_path):
    from sft.trainer import TrainConfig, train

    model, info, _ = pretrained
    w = smoke_world
    before = exact_metrics(model, w)
    ft = copy.deepcopy(model)
    cfg = TrainConfig(method="ce", lr=3e-3, max_steps=25, batch_size=16, out=str(tmp_path / "ft"),
                      progress=False, save_final=False, token_stats=False)
    res = train(cfg, ft, w.d2_train, pad_token_id=w.pad_id)
    after = exact_metrics(res.model, w)
    # domain gain: the completion code length drops a lot (mostly the hard answer token) ...
    assert after["cond_code_len_p2_bits"] < before["cond_code_len_p2_bits"] - 3.0
    assert after["answer_prob"] > before["answer_prob"]
    # ... and the general distribution degrades through the shared parameters
    assert after["kl_p1_bits"] > before["kl_p1_bits"] + 0.05
