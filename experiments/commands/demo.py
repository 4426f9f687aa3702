"""`talr demo`: the main job (the toy-world pipeline; grows into the full study)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default world")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from theory.coding import encode, decode, ideal_code_length_bits
    from theory.divergence import TreeLogProbs, code_length_bits, delta_code_length, kl
    from theory.tree import TokenTree

    rng = np.random.default_rng(args.seed)
    V, d = 6, 5
    p1 = rng.dirichlet(np.full(V + 1, 0.5), size=V + 1)  # general world P1 (order-1 Markov)
    q0 = 0.9 * p1 + 0.1 * rng.dirichlet(np.ones(V + 1), size=V + 1)  # a model close to P1
    q1 = 0.5 * q0 + 0.5 * rng.dirichlet(np.ones(V + 1), size=V + 1)  # after a big update
    tree = TokenTree.from_distribution(lambda pre: p1[pre[-1] if pre else V], V, d)
    last = np.where(tree.token >= 0, tree.token, V)
    lp0 = TreeLogProbs.from_full(tree, np.log(q0[last]))
    lp1 = TreeLogProbs.from_full(tree, np.log(q1[last]))
    print(f"P1: exact token tree, {tree.n_nodes} nodes, V={V}, depth {d}")
    print(f"expected code length under q0: {code_length_bits(tree, lp0):.3f} bits; KL(P1||q0) = {kl(tree, lp0):.3f} bits")
    print(f"general degradation dL(P1) = KL(P1||q1) - KL(P1||q0) = {delta_code_length(tree, lp0, lp1):+.3f} bits")
    z = tree.sample(1, rng)[0]
    probs = np.stack([q0[([V] + list(z))[t]] for t in range(len(z))])[:, :V]
    data, nbits = encode(z, probs)
    assert np.array_equal(decode(data, nbits, probs), z)
    print(f"arithmetic-coded response {z.tolist()}: {nbits} real bits vs {ideal_code_length_bits(z, probs):.2f} ideal")
    return 0
