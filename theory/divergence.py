"""Divergences and code lengths on token trees (Proposition 3.1 (= B.3), Proposition B.1).

A model ``Q`` is given on a tree by its natural-log conditionals on the tree's edges and
EOS leaves (:class:`TreeLogProbs`). The tree's own masses are ``P``. Every function here is
vectorised over nodes; the only loop is over depth levels (for path probabilities).

Conventions:

* ``unit="bits"`` (default) or ``"nats"`` for anything that is a code length or a KL.
* At nodes where the end is forced (depth == ``tree.max_depth``) the EOS costs nothing:
  both ``P`` and ``Q`` put probability 1 on it (Definition 3.2's truncation).
* Sequence-level quantities under ``Q`` (``var_q``, ``expect_q``, ``q_coverage``) are
  exact only if the tree holds ``Q``'s whole support (e.g. a complete tree built by
  ``TokenTree.from_distribution``); ``var_q`` raises when it does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .tree import TokenTree

__all__ = [
    "TreeLogProbs",
    "path_log_prob",
    "leaf_log_prob",
    "code_length_bits",
    "cross_entropy",
    "entropy",
    "kl",
    "chi2",
    "expect_p",
    "expect_q",
    "var_q",
    "q_coverage",
    "delta_code_length",
    "delta_code_length_per_level",
]

LN2 = float(np.log(2.0))


def _scale(unit: str) -> float:
    if unit == "bits":
        return 1.0 / LN2
    if unit == "nats":
        return 1.0
    raise ValueError(f"unit must be 'bits' or 'nats', not {unit!r}")


@dataclass
class TreeLogProbs:
    """Model log-conditionals on a tree (natural log).

    ``edge[u] = log q(token_u | parent_u)`` (entry 0, the root, is unused) and
    ``eos[u] = log q(EOS | u)``.
    """

    edge: np.ndarray
    eos: np.ndarray

    def __post_init__(self):
        self.edge = np.asarray(self.edge, dtype=np.float64)
        self.eos = np.asarray(self.eos, dtype=np.float64)
        if self.edge.shape != self.eos.shape or self.edge.ndim != 1:
            raise ValueError(f"edge {self.edge.shape} and eos {self.eos.shape} must be equal 1-D shapes")
        if np.any(self.edge[1:] > 1e-9) or np.any(self.eos > 1e-9):
            raise ValueError("log-probabilities must be <= 0")

    def check(self, tree: TokenTree) -> None:
        if self.edge.size != tree.n_nodes:
            raise ValueError(f"log-probs cover {self.edge.size} nodes, the tree has {tree.n_nodes}")

    @classmethod
    def from_full(cls, tree: TokenTree, logq_full: np.ndarray) -> "TreeLogProbs":
        """From dense log-conditionals ``[N, V + 1]`` (EOS last) at every node."""
        logq_full = np.asarray(logq_full, dtype=np.float64)
        if logq_full.shape != (tree.n_nodes, tree.vocab_size + 1):
            raise ValueError(
                f"logq_full has shape {logq_full.shape}, expected ({tree.n_nodes}, {tree.vocab_size + 1})"
            )
        edge = np.zeros(tree.n_nodes)
        edge[1:] = logq_full[tree.parent[1:], tree.token[1:]]
        return cls(edge, logq_full[:, tree.vocab_size].copy())

    @classmethod
    def from_tree(cls, tree: TokenTree) -> "TreeLogProbs":
        """The tree's own conditionals ``log p(.|u)`` (``-inf`` where zero)."""
        with np.errstate(divide="ignore"):
            return cls(np.log(tree.cond_edge()), np.log(tree.cond_eos()))

    @classmethod
    def from_fn(
        cls,
        tree: TokenTree,
        logprob_fn: Callable[[list], np.ndarray],
        batch_size: int = 256,
    ) -> "TreeLogProbs":
        """Evaluate ``logprob_fn(prefixes) -> [n, V + 1]`` once per node, in batches."""
        prefixes = tree.prefixes()
        full = np.empty((tree.n_nodes, tree.vocab_size + 1))
        for s in range(0, tree.n_nodes, batch_size):
            full[s : s + batch_size] = logprob_fn(prefixes[s : s + batch_size])
        return cls.from_full(tree, full)


def _eos_eff(tree: TokenTree, lp: TreeLogProbs) -> np.ndarray:
    lp.check(tree)
    return np.where(tree.forced_end(), 0.0, lp.eos)


def path_log_prob(tree: TokenTree, lp: TreeLogProbs) -> np.ndarray:
    """``log Q(prefix u)`` for every node (one vectorised pass per depth level)."""
    lp.check(tree)
    out = np.zeros(tree.n_nodes)
    for sl in tree.level_slices()[1:]:
        out[sl] = out[tree.parent[sl]] + lp.edge[sl]
    return out


def leaf_log_prob(tree: TokenTree, lp: TreeLogProbs) -> np.ndarray:
    """``log Q(z)`` of the response ``z`` that ends at each node."""
    return path_log_prob(tree, lp) + _eos_eff(tree, lp)


def _xlogy_terms(mass: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """``mass * logq`` with 0 where mass is 0 (avoids 0 * -inf)."""
    out = np.zeros_like(mass)
    np.multiply(mass, logq, out=out, where=mass > 0)
    return out


def _mass_dot(mass: np.ndarray, logq: np.ndarray) -> float:
    """``sum mass * logq`` with ``0 * -inf = 0`` (one pass when every logq is finite)."""
    if logq.size == 0:
        return 0.0
    if logq.min() > -np.inf:
        return float(np.dot(mass, logq))
    return float(_xlogy_terms(mass, logq).sum())


def cross_entropy(tree: TokenTree, lp: TreeLogProbs, unit: str = "bits") -> float:
    """``E_P[-log Q(z)]`` in the per-level form of Proposition B.1."""
    eos = _eos_eff(tree, lp)
    leaves = np.flatnonzero(tree.eos_mass)
    total = -(_mass_dot(tree.mass[1:], lp.edge[1:]) + _mass_dot(tree.eos_mass[leaves], eos[leaves]))
    return float(total * _scale(unit))


def entropy(tree: TokenTree, unit: str = "bits") -> float:
    """``H(P) = -sum_z P(z) log P(z)`` over the tree's responses."""
    _, p = tree.leaves()
    return float(-np.dot(p, np.log(p)) * _scale(unit))


def code_length_bits(tree: TokenTree, lp: TreeLogProbs) -> float:
    """Expected ideal code length ``E_P[-log2 Q(z)]`` of the compression protocol (Def. 3.2)."""
    return cross_entropy(tree, lp, unit="bits")


def check_subnormalised(tree: TokenTree, lp: TreeLogProbs, tol: float = 1e-6) -> None:
    """Raise `ValueError` unless at every node ``sum_children q(c|u) + q(EOS|u) <= 1 + tol``.

    Q may put mass on tokens outside the tree (the rest of each row), never more than one in
    all: otherwise Q is not a distribution and KL(P || Q) can come out negative.
    """
    lp.check(tree)
    with np.errstate(over="ignore"):
        total = np.exp(_eos_eff(tree, lp))
        np.add.at(total, tree.parent[1:], np.exp(lp.edge[1:]))
    u = int(np.argmax(total))
    if total[u] > 1.0 + tol:
        raise ValueError(f"Q's conditionals at node {u} sum to {total[u]:.9g} > 1 (tolerance {tol:g}): "
                         "normalise them (e.g. log_softmax) before computing KL")


def kl(tree: TokenTree, lp: TreeLogProbs, unit: str = "bits", tol: float = 1e-6) -> float:
    """``KL(P || Q) = E_P[-log Q(z)] - H(P)`` (>= 0 up to rounding).

    Summing the per-level terms ``P(c) (log p(c|u) - log q(c|u))`` telescopes to this: the
    tree's own conditionals contribute exactly ``-H(P)``. Q's conditionals must sum to at most
    one at every node (`check_subnormalised`, within ``tol``); otherwise `ValueError`.
    """
    check_subnormalised(tree, lp, tol)
    return cross_entropy(tree, lp, unit) - entropy(tree, unit)


def chi2(tree: TokenTree, lp: TreeLogProbs) -> float:
    """``chi^2(P || Q) = sum_z P(z)^2 / Q(z) - 1`` over P's support."""
    ids, p = tree.leaves()
    logq = leaf_log_prob(tree, lp)[ids]
    return float(np.exp(2.0 * np.log(p) - logq).sum() - 1.0)


def expect_p(tree: TokenTree, f_leaf: np.ndarray) -> float:
    """``E_P[f(z)]`` for ``f`` given at each node's EOS leaf (the response ending there)."""
    f_leaf = np.asarray(f_leaf, dtype=np.float64)
    ids, p = tree.leaves()
    return float(np.dot(p, f_leaf[ids]))


def q_coverage(tree: TokenTree, lp: TreeLogProbs) -> float:
    """``Q``'s total probability on the tree's responses (1 when the tree holds Q's support)."""
    return float(np.exp(leaf_log_prob(tree, lp)).sum())


def _q_leaf(tree: TokenTree, lp: TreeLogProbs, tol: float) -> np.ndarray:
    q = np.exp(leaf_log_prob(tree, lp))
    missing = 1.0 - q.sum()
    if abs(missing) > tol:
        raise ValueError(
            f"Q puts {missing:.3g} of its mass outside this tree; E_Q / Var_Q need a tree "
            "holding Q's support (e.g. a complete tree from TokenTree.from_distribution)"
        )
    return q


def expect_q(tree: TokenTree, lp: TreeLogProbs, f_leaf: np.ndarray, tol: float = 1e-6) -> float:
    """``E_Q[f(z)]`` (exact only on a tree covering Q's support; raises otherwise)."""
    q = _q_leaf(tree, lp, tol)
    return float(np.dot(q, np.asarray(f_leaf, dtype=np.float64)))


def var_q(tree: TokenTree, lp: TreeLogProbs, f_leaf: np.ndarray, tol: float = 1e-6) -> float:
    """``Var_Q(f(z))`` (exact only on a tree covering Q's support; raises otherwise)."""
    q = _q_leaf(tree, lp, tol)
    f = np.asarray(f_leaf, dtype=np.float64)
    mean = np.dot(q, f)
    return float(np.dot(q, (f - mean) ** 2))


def delta_code_length(
    tree: TokenTree, lp1: TreeLogProbs, lp2: TreeLogProbs, unit: str = "bits"
) -> float:
    """``Delta L(P) = KL(P || q2) - KL(P || q1)`` (Proposition 3.1 (= B.3), second form)."""
    return kl(tree, lp2, unit) - kl(tree, lp1, unit)


def delta_code_length_per_level(
    tree: TokenTree, lp1: TreeLogProbs, lp2: TreeLogProbs, unit: str = "bits"
) -> tuple[float, np.ndarray]:
    """Proposition 3.1 (= B.3), first form: ``-sum_l sum_j p_{l,j} log(q2_{l,j} / q1_{l,j})``.

    Layer ``l`` holds the edges into depth-``l`` nodes and the EOS leaves of depth
    ``l - 1`` nodes. Returns ``(total, per_layer)`` with ``per_layer[l - 1]`` for
    ``l = 1 .. depth + 1``.
    """
    e1, e2 = _eos_eff(tree, lp1), _eos_eff(tree, lp2)
    edge_terms = -_xlogy_terms(tree.mass, lp2.edge - lp1.edge)
    edge_terms[0] = 0.0
    eos_terms = -_xlogy_terms(tree.eos_mass, e2 - e1)
    n_layers = tree.n_levels + 1
    per = np.bincount(tree.depth, weights=edge_terms, minlength=n_layers)
    per += np.bincount(tree.depth + 1, weights=eos_terms, minlength=n_layers)
    per = per[1:] * _scale(unit)
    return float(per.sum()), per
