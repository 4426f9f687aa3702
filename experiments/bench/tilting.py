"""Benchmark: 1000 tilting steps (Definition B.3) on a ~10^5-node tree, vectorised vs a
per-node Python loop, in the same run. Prints the ratio (target >= 50x).

The loop is timed on a subset of nodes and steps and extrapolated linearly (it is
O(nodes x steps) with no shared work); the subset sizes are printed.

    .venv/bin/python -m experiments.bench.tilting
"""
from __future__ import annotations

import math
import time

import numpy as np

from theory.tilting import log_softmax, smooth, tilt_log
from theory.tree import TokenTree


def loop_tilt(logq: np.ndarray, logp: np.ndarray, lam: float) -> np.ndarray:
    """Reference: one node at a time, plain Python over the vocabulary."""
    out = np.empty_like(logq)
    for u in range(logq.shape[0]):
        row = [(1 - lam) * a + lam * b for a, b in zip(logq[u], logp[u])]
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        out[u] = [x - lse for x in row]
    return out


def main(V: int = 10, depth: int = 5, steps: int = 1000, loop_nodes: int = 2000, loop_steps: int = 3) -> float:
    uni = np.full(V + 1, 1.0 / (V + 1))
    tree = TokenTree.from_distribution(lambda ps: np.tile(uni, (len(ps), 1)), V, depth, batched=True)
    N, K = tree.n_nodes, V + 1
    rng = np.random.default_rng(0)
    logq = log_softmax(rng.standard_normal((N, K)))
    logp = np.log(smooth(rng.dirichlet(np.ones(K), size=N), 0.1))
    lam = 0.01

    t0 = time.perf_counter()
    q = logq
    for _ in range(steps):
        q = tilt_log(q, logp, lam)
    t_vec = time.perf_counter() - t0

    sub_q, sub_p = logq[:loop_nodes].copy(), logp[:loop_nodes]
    t0 = time.perf_counter()
    for _ in range(loop_steps):
        sub_q = loop_tilt(sub_q, sub_p, lam)
    t_loop_sub = time.perf_counter() - t0
    t_loop = t_loop_sub * (N / loop_nodes) * (steps / loop_steps)

    # same answer on the subset
    ref = logq[:loop_nodes]
    for _ in range(loop_steps):
        ref = tilt_log(ref, sub_p, lam)
    err = float(np.abs(ref - sub_q).max())
    ratio = t_loop / t_vec
    print(f"tree: {N} nodes, V+1 = {K}; {steps} tilting steps")
    print(f"vectorised: {t_vec:.2f} s ({t_vec / steps * 1e3:.2f} ms/step)")
    print(f"python loop: {t_loop_sub:.2f} s for {loop_nodes} nodes x {loop_steps} steps "
          f"-> extrapolated {t_loop:.0f} s for {N} nodes x {steps} steps")
    print(f"max |difference| on the subset: {err:.1e}")
    print(f"speed-up: {ratio:.0f}x (target >= 50x)")
    return ratio


if __name__ == "__main__":
    main()
