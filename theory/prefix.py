"""The exact per-prefix decomposition of Delta L(P1) and its Cauchy-Schwarz bound.

Proposition 3.1 taken node by node. ``P1`` is a token tree; a model update ``q -> q'`` is
given by both models' full conditionals at every prefix ``u``. With the log-shift
``s_u = log q'_u - log q_u`` at each coded (non-forced) prefix:

    Delta L(P1) = KL(P1 || Q') - KL(P1 || Q)
                = sum_u P1(u) E_{p1_u}[-s_u]                                   (chain rule)
                = -sum_u P1(u) (E_{p1_u} - E_{q_u})[s_u]  +  sum_u P1(u) KL(q_u || q'_u),

because ``E_{q_u}[s_u] = E_{q_u}[log q'_u / q_u] = -KL(q_u || q'_u)``. The first sum is the
*first-order term* (it changes sign with ``s``), the second the *KL term* (>= 0, second order
in ``s``). Per node, ``(E_p - E_q)[s] = E_q[(p/q - 1)(s - E_q s)]``, so Cauchy-Schwarz in
``L2(q_u)`` gives ``|(E_p - E_q)[s]| <= sqrt(chi2(p1_u || q_u)) sqrt(Var_{q_u}(s_u))``, and
Cauchy-Schwarz over prefixes (weights ``P1(u)``) gives

    Delta L(P1) <= sum_u P1(u) sqrt(chi2_u Var_u) + kl_term          (``bound_nodewise``)
                <= sqrt(chi2_bar) sqrt(var_bar) + kl_term             (``bound``)

with ``chi2_bar = sum_u P1(u) chi2(p1_u || q_u)`` and ``var_bar = sum_u P1(u) Var_{q_u}(s_u)``.
``chi2_bar`` adds per token where the paper's whole-response ``chi2(P1 || Q)`` multiplies
(``1 + chi2`` of a product measure is the product of ``1 + chi2`` of its factors).

Input format. Each model is given by its natural-log conditionals over the tree's whole
alphabet (``V`` tokens, EOS last):

* a dense array ``[N, V + 1]`` (the bridge's ``logq_full``; for an empirical tree with a
  restricted alphabet one token column is the "other" bucket), or ``[N, V + 1 + k]`` whose
  last ``k`` columns are outcomes outside the tree's alphabet that ``P1`` never emits (e.g. a
  model's mass on PAD/BOS in the tiny world: ``log(1 - sum of the other columns)``), or
* an object with a ``logq_full`` attribute holding that array, or
* a :class:`theory.divergence.TreeLogProbs` (edges and EOS only): the conditionals are
  rebuilt from the node's children, so the tree must hold every outcome of each coded
  prefix (a complete tree from ``TokenTree.from_distribution``).

Every coded prefix with ``P1(u) > 0`` must have a normalised row (``sum_a q(a|u) = 1``);
a row that sums to less means outcomes the tree does not hold (missing children), and
:func:`prefix_decomposition` raises ``ValueError`` naming the node.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .divergence import TreeLogProbs
from .tree import TokenTree

__all__ = ["PrefixDecomposition", "full_log_conditionals", "with_other", "prefix_decomposition"]

LN2 = float(np.log(2.0))


@dataclass(frozen=True)
class PrefixDecomposition:
    """Result of :func:`prefix_decomposition` (scalars in ``unit``; ``chi2_bar`` unitless).

    Attributes:
        delta: the exact ``Delta L(P1) = first_order + kl_term``.
        first_order: ``-sum_u P1(u) (E_{p1_u} - E_{q_u})[s_u]``.
        kl_term: ``sum_u P1(u) KL(q_u || q'_u)`` (>= 0).
        chi2_bar: ``sum_u P1(u) chi2(p1_u || q_u)``.
        var_bar: ``sum_u P1(u) Var_{q_u}(s_u)`` (in ``unit`` squared).
        bound: ``sqrt(chi2_bar * var_bar) + kl_term`` (>= ``delta``).
        bound_nodewise: ``sum_u P1(u) sqrt(chi2_u Var_u) + kl_term`` (between the two).
        unit: ``"nats"`` or ``"bits"``.
        nodes: ids of the coded prefixes with ``P1(u) > 0`` (the per-node arrays follow).
        weight, first_order_u, kl_u, chi2_u, var_u: per-node ``P1(u)``,
            ``-(E_p - E_q)[s_u]``, ``KL(q_u || q'_u)``, ``chi2(p1_u || q_u)``,
            ``Var_{q_u}(s_u)`` (unweighted; multiply by ``weight`` and sum for the totals).
    """

    delta: float
    first_order: float
    kl_term: float
    chi2_bar: float
    var_bar: float
    bound: float
    bound_nodewise: float
    unit: str
    nodes: np.ndarray
    weight: np.ndarray
    first_order_u: np.ndarray
    kl_u: np.ndarray
    chi2_u: np.ndarray
    var_u: np.ndarray

    @property
    def tightness(self) -> float:
        """``bound / delta`` (``inf`` when ``delta <= 0``: any non-negative bound holds)."""
        return float(self.bound / self.delta) if self.delta > 0 else float("inf")

    def to_dict(self) -> dict:
        keys = ("delta", "first_order", "kl_term", "chi2_bar", "var_bar", "bound", "bound_nodewise", "unit")
        return {k: getattr(self, k) for k in keys}


def full_log_conditionals(tree: TokenTree, lp) -> np.ndarray:
    """Dense natural-log conditionals ``[N, V + 1]`` from any accepted input format.

    A :class:`TreeLogProbs` is scattered onto its children (``-inf`` where the tree holds
    no child); arrays and ``.logq_full`` holders are checked for shape and returned.
    """
    if isinstance(lp, TreeLogProbs):
        lp.check(tree)
        full = np.full((tree.n_nodes, tree.vocab_size + 1), -np.inf)
        full[tree.parent[1:], tree.token[1:]] = lp.edge[1:]
        full[:, tree.vocab_size] = lp.eos
        return full
    arr = getattr(lp, "logq_full", lp)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != tree.n_nodes or arr.shape[1] < tree.vocab_size + 1:
        raise ValueError(
            f"log-conditionals have shape {arr.shape}, expected (N, V + 1 [+ k]) = "
            f"({tree.n_nodes}, {tree.vocab_size + 1}) (EOS at index V, extra outcomes after it)"
        )
    if np.any(np.isnan(arr)) or np.any(arr > 1e-9):
        raise ValueError("log-conditionals must be <= 0 and not NaN")
    return arr


def with_other(logq_full: np.ndarray) -> np.ndarray:
    """Append one column ``log(1 - sum_a q(a|u))``: the mass a model puts outside the tree's
    alphabet (an extra outcome P1 never emits), so every row sums to 1. The rest is floored at
    1e-300 (rounding can make it 0 or negative), which changes no sum by more than 1e-297."""
    logq_full = np.asarray(logq_full, dtype=np.float64)
    rest = 1.0 - np.exp(logq_full).sum(-1, keepdims=True)
    return np.concatenate([logq_full, np.log(np.maximum(rest, 1e-300))], axis=-1)


def _check_rows(name: str, tree: TokenTree, logq: np.ndarray, nodes: np.ndarray, tol: float) -> None:
    sums = np.exp(logq[nodes]).sum(1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > tol)
    if bad.size:
        u = int(nodes[bad[0]])
        raise ValueError(
            f"{name}: the conditional at node {u} (prefix {tree.prefix(u)}) sums to "
            f"{sums[bad[0]]:.6g} over the tree's alphabet, not 1 ({bad.size} such nodes): the tree "
            "lacks outcomes of that prefix; use a complete tree, or an empirical tree with an "
            "'other' symbol and full [N, V + 1] conditionals"
        )


def prefix_decomposition(
    tree: TokenTree, lp_before, lp_after, unit: str = "nats", tol: float = 1e-6
) -> PrefixDecomposition:
    """Exact per-prefix decomposition of ``Delta L(P1)`` for an update ``q -> q'``
    (Proposition 3.1 node by node) and its Cauchy-Schwarz bound; see the module docstring.

    Args:
        tree: ``P1`` as a token tree (its masses are ``P1(u)``).
        lp_before, lp_after: ``q`` and ``q'`` as ``[N, V + 1]`` log-conditionals, holders
            of ``logq_full``, or :class:`TreeLogProbs` on a tree holding every outcome.
        unit: ``"nats"`` (default) or ``"bits"`` for every code-length quantity.
        tol: allowed deviation of a conditional's row sum from 1.

    Raises:
        ValueError: a row that is not normalised over the alphabet (missing outcomes), or
            a model that gives zero probability to an outcome ``P1`` uses, or ``q'`` zero
            where ``q`` is not (infinite ``KL(q_u || q'_u)``).
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'bits' or 'nats', not {unit!r}")
    lq = full_log_conditionals(tree, lp_before)
    lq2 = full_log_conditionals(tree, lp_after)
    if lq.shape != lq2.shape:
        raise ValueError(f"lp_before {lq.shape} and lp_after {lq2.shape} cover different outcome sets")
    nodes = np.flatnonzero(~tree.forced_end() & (tree.mass > 0))
    _check_rows("lp_before", tree, lq, nodes, tol)
    _check_rows("lp_after", tree, lq2, nodes, tol)
    p = tree.cond_full()[nodes]
    if lq.shape[1] > p.shape[1]:  # outcomes outside the alphabet: P1 never emits them
        p = np.concatenate([p, np.zeros((p.shape[0], lq.shape[1] - p.shape[1]))], axis=1)
    a, b = lq[nodes], lq2[nodes]
    fa, fb = np.isfinite(a), np.isfinite(b)
    if np.any((p > 0) & ~fa):
        u = int(nodes[np.flatnonzero(((p > 0) & ~fa).any(1))[0]])
        raise ValueError(f"lp_before gives zero probability at node {u} to an outcome P1 uses (infinite KL)")
    if np.any(fa & ~fb):
        u = int(nodes[np.flatnonzero((fa & ~fb).any(1))[0]])
        raise ValueError(f"lp_after is zero at node {u} where lp_before is not (infinite KL(q||q'))")
    q = np.exp(a)
    s = np.where(fa, b - np.where(fa, a, 0.0), 0.0)  # log q' - log q where q > 0, else 0
    Eq_s = (q * s).sum(1)  # = -KL(q_u || q'_u)
    Ep_s = (p * s).sum(1)
    kl_u = np.maximum(-Eq_s, 0.0)
    first_u = -(Ep_s - Eq_s)
    var_u = np.maximum((q * s * s).sum(1) - Eq_s**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2_u = np.maximum(np.where(p > 0, p * p / np.where(q > 0, q, 1.0), 0.0).sum(1) - 1.0, 0.0)
    w = tree.mass[nodes]
    sc = 1.0 if unit == "nats" else 1.0 / LN2
    first = float(w @ first_u) * sc
    klt = float(w @ kl_u) * sc
    chi2_bar = float(w @ chi2_u)
    var_bar = float(w @ var_u) * sc * sc
    return PrefixDecomposition(
        delta=first + klt,
        first_order=first,
        kl_term=klt,
        chi2_bar=chi2_bar,
        var_bar=var_bar,
        bound=float(np.sqrt(chi2_bar * var_bar)) + klt,
        bound_nodewise=float(w @ np.sqrt(chi2_u * var_u)) * sc + klt,
        unit=unit,
        nodes=nodes,
        weight=w,
        first_order_u=first_u * sc,
        kl_u=kl_u * sc,
        chi2_u=chi2_u,
        var_u=var_u * sc * sc,
    )
