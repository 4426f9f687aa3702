"""Benchmark: build a token tree from 10^6 tokens and compute KL(P || Q) over it.

Compares talr's vectorised TokenTree (+ theory.divergence.kl) with a dict-of-dicts Python
trie doing the same work (count prefixes, then sum p * log(p/q) over edges and EOS leaves),
in one run. Target (issue 2): >= 20x.
Run: .venv/bin/python experiments/bench/tree.py
"""
from __future__ import annotations

import math
import time

import numpy as np

from theory.divergence import TreeLogProbs, kl
from theory.tree import TokenTree

V = 64


def corpus(n_tokens=1_000_000, seed=0):
    """Order-1 Markov sequences (lengths 5..60), about n_tokens tokens in total."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(V, 0.1), size=V)
    cum = np.cumsum(trans, axis=1)
    seqs, total = [], 0
    while total < n_tokens:
        L = int(rng.integers(5, 61))
        s = np.empty(L, dtype=np.int64)
        s[0] = rng.integers(V)
        u = rng.random(L)
        for t in range(1, L):
            s[t] = min(np.searchsorted(cum[s[t - 1]], u[t]), V - 1)
        seqs.append(s)
        total += L
    return seqs, total


def model_logq(prev):
    """A fixed model: log q(a | last token) (row V is the start state)."""
    rng = np.random.default_rng(1)
    table = rng.dirichlet(np.ones(V + 1), size=V + 1)
    return np.log(table[prev])


def talr_run(seqs):
    tree = TokenTree.from_sequences(seqs, vocab_size=V)
    logtab = model_logq(np.arange(V + 1))
    last = np.where(tree.token >= 0, tree.token, V)  # the model conditions on the last token
    edge = np.zeros(tree.n_nodes)
    edge[1:] = logtab[last[tree.parent[1:]], tree.token[1:]]  # one gather per edge
    lp = TreeLogProbs(edge, logtab[last, V])
    return tree.n_nodes, kl(tree, lp, unit="nats")


def dict_trie_run(seqs):
    table = np.exp(model_logq(np.arange(V + 1)))
    root = {"n": 0, "eos": 0, "kids": {}}
    for s in seqs:
        node = root
        node["n"] += 1
        for tok in s.tolist():
            kids = node["kids"]
            if tok not in kids:
                kids[tok] = {"n": 0, "eos": 0, "kids": {}}
            node = kids[tok]
            node["n"] += 1
        node["eos"] += 1
    total = root["n"]
    kl_sum, n_nodes, stack = 0.0, 0, [(root, V)]
    while stack:
        node, last = stack.pop()
        n_nodes += 1
        q = table[last]
        if node["eos"]:
            p_eos = node["eos"] / node["n"]
            kl_sum += node["eos"] / total * math.log(p_eos / q[V])
        for tok, child in node["kids"].items():
            p = child["n"] / node["n"]
            kl_sum += child["n"] / total * math.log(p / q[tok])
            stack.append((child, tok))
    return n_nodes, kl_sum


def best_of(fn, seqs, repeat=3):
    """Fastest of ``repeat`` runs (both sides get the same treatment)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(seqs)
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    seqs, total = corpus()
    t_talr, (n1, kl1) = best_of(talr_run, seqs)
    t_dict, (n2, kl2) = best_of(dict_trie_run, seqs)
    assert n1 == n2 and abs(kl1 - kl2) < 1e-6 * max(1.0, abs(kl2)), (n1, n2, kl1, kl2)
    print(f"tokens={total} sequences={len(seqs)} nodes={n1} KL={kl1:.6f} nats (both agree)")
    print(f"best of 3: talr TokenTree+kl: {t_talr:.3f} s | dict-of-dicts trie: {t_dict:.3f} s | "
          f"speed-up {t_dict / t_talr:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
