"""Shared test fixtures for theory tests: random complete token trees."""
import numpy as np

from theory.tree import TokenTree


def complete_tree(V, depth, rng, conc=1.0):
    """P1 on a complete tree with random full-support conditionals (Dirichlet(conc), floored)."""
    table = {}

    def nxt(prefix):
        key = tuple(prefix)
        if key not in table:
            table[key] = rng.dirichlet(np.full(V + 1, conc)) * 0.98 + 0.02 / (V + 1)
        return table[key]

    return TokenTree.from_distribution(nxt, V, depth)
