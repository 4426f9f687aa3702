"""The exact per-prefix decomposition of Delta L(P1), its Cauchy-Schwarz (chi2) and
change-of-measure (KL) bounds, and the floor of every node-wise bound.

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

**Change of measure (KL) instead of chi2.** On a sample of texts ``p1_u`` is a point mass on the
observed token ``x``, so ``chi2(p1_u||q_u) = 1/q_u(x) - 1``: rare tokens dominate the chi2 bounds.
Write the first-order term per node as ``F_u = (E_{p1_u} - E_{q_u})[c_u]`` with the centred
``c_u = -s_u + E_{q_u} s_u``. The Gibbs / Donsker-Varadhan variational principle
``KL(p||q) = sup_g {E_p g - log E_q e^g}`` with ``g = t c_u`` gives for every ``t > 0``

    F_u <= [ KL(p1_u||q_u) + Lambda_u(t) ] / t,      Lambda_u(t) = log E_{q_u} exp(t c_u),

whose infimum over ``t`` is attained at the tilt ``r ∝ q_u e^{t c_u}`` with ``KL(r||q_u) =
KL(p1_u||q_u)`` and equals ``sup{E_r c_u : KL(r||q_u) <= KL(p1_u||q_u)}``; past the tilt's reach it
is the cap ``max_a c_u(a)`` (derivation and numerics: :mod:`theory.changemeasure`). For a point
mass ``KL(p1_u||q_u) = -log q_u(x)``, the token's own code length, instead of ``1/q_u(x)``. So

    Delta L(P1) <= sum_u P1(u) DV_u + kl_term                        (``bound_kl``, t per node)
                <= min_t [KL_bar + sum_u P1(u) Lambda_u(t)] / t + kl_term   (``bound_kl_global``)

(the second: one ``t`` for all nodes; ``KL_bar = sum_u P1(u) KL(p1_u||q_u) = KL(P1||Q)``). No bound
that sees each ``p1_u`` only through ``KL(p1_u||q_u)`` is smaller than ``bound_kl``. Every such
node-wise bound is ``>= max(F_u, 0)`` at each node, hence ``>= floor = sum_u P1(u) max(F_u, 0) +
kl_term``: the negative first-order terms cancel positive ones in ``Delta L(P1)`` but in no
node-wise bound.

**Point masses: a bound below the floor.** On a sample of texts ``p1_u = delta_x`` is a point
mass. A bound that knows this (and sees ``p1_u`` through ``KL(delta_x||q_u) = -log q_u(x)`` only,
as the KL bound does) may take the supremum over point masses alone:

    F_u <= PM_u = max{ c_u(a) : KL(delta_a||q_u) <= KL(delta_x||q_u) } = max{ c_u(a) : q_u(a) >= q_u(x) },

valid because ``a = x`` is in the set, and ``PM_u <= DV_u`` because every ``delta_a`` of the set is
feasible in the KL bound's supremum. ``PM_u`` may be negative (every token at least as likely as
``x`` was pushed up, or ``x`` is the argmax, where ``PM_u = F_u`` exactly), so
``bound_point = sum_u P1(u) PM_u + kl_term`` can go below the floor of non-negative node-wise
bounds. Rows of ``P1`` that are not point masses use ``DV_u``.

The support of ``q_u`` is ``isfinite(log q_u)``: a probability that underflows to 0 (``log q``
below -745) is still an outcome, and chi2, the variance and ``Lambda`` are summed in log space.

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

from .changemeasure import Rep, _lse, compress, dv_rows, global_t
from .divergence import TreeLogProbs
from .tree import TokenTree

__all__ = ["PrefixDecomposition", "full_log_conditionals", "with_other", "prefix_decomposition", "NodeTerms",
           "node_terms", "concat_terms", "decompose", "bound_columns"]

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
        bound_kl: ``sum_u P1(u) DV_u + kl_term``, ``DV_u = min(inf_t [KL(p1_u||q_u) + Lambda_u(t)]/t,
            max_a c_u(a))`` with ``c_u = -s_u + E_{q_u} s_u`` (the change-of-measure bound, t per node).
        bound_kl_global: ``min_t [KL_bar + sum_u P1(u) Lambda_u(t)] / t + kl_term`` (one t for all
            nodes; ``KL_bar = sum_u P1(u) KL(p1_u||q_u)``), capped at ``sum_u P1(u) max c_u + kl_term``.
        bound_min: ``sum_u P1(u) min(DV_u, sqrt(chi2_u Var_u)) + kl_term``: each node's better bound
            (it sees p1_u through both KL and chi2), <= ``bound_kl`` and ``bound_nodewise``.
        floor: ``sum_u P1(u) max(F_u, 0) + kl_term``: no node-wise bound that is >= 0 at every
            node (chi2 and KL ones are) goes below it; ``F_u`` = ``first_order_u``.
        kl_bar: ``KL_bar`` (in ``unit``); ``t_global``: the global bound's ``t`` (per nat).
        unit: ``"nats"`` or ``"bits"``.
        nodes: ids of the coded prefixes with ``P1(u) > 0`` (the per-node arrays follow).
        weight, first_order_u, kl_u, chi2_u, var_u: per-node ``P1(u)``,
            ``-(E_p - E_q)[s_u]``, ``KL(q_u || q'_u)``, ``chi2(p1_u || q_u)``,
            ``Var_{q_u}(s_u)`` (unweighted; multiply by ``weight`` and sum for the totals).
        kl_pq_u, dv_u, t_u: per node ``KL(p1_u||q_u)``, ``DV_u`` (in ``unit``) and its ``t`` (per nat).
        bound_point, pm_u: ``sum_u P1(u) PM_u + kl_term`` and per node ``PM_u`` (in ``unit``; module
            docstring: point-mass rows only, ``DV_u`` elsewhere); ``<= bound_kl``.
    """

    delta: float
    first_order: float
    kl_term: float
    chi2_bar: float
    var_bar: float
    bound: float
    bound_nodewise: float
    bound_kl: float
    bound_kl_global: float
    bound_min: float
    floor: float
    kl_bar: float
    t_global: float
    unit: str
    nodes: np.ndarray
    weight: np.ndarray
    first_order_u: np.ndarray
    kl_u: np.ndarray
    chi2_u: np.ndarray
    var_u: np.ndarray
    kl_pq_u: np.ndarray
    dv_u: np.ndarray
    t_u: np.ndarray
    bound_point: float = float("nan")
    pm_u: np.ndarray | None = None

    @property
    def tightness(self) -> float:
        """``bound / delta`` (``inf`` when ``delta <= 0``: any non-negative bound holds)."""
        return float(self.bound / self.delta) if self.delta > 0 else float("inf")

    def to_dict(self) -> dict:
        keys = ("delta", "first_order", "kl_term", "chi2_bar", "var_bar", "bound", "bound_nodewise", "bound_kl",
                "bound_kl_global", "bound_min", "floor", "bound_point", "kl_bar", "unit")
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


@dataclass(frozen=True)
class NodeTerms:
    """Per-node terms of the decomposition in nats (rows of :func:`node_terms`; concatenate the
    rows of several batches with :func:`concat_terms`)."""

    first_u: np.ndarray
    kl_u: np.ndarray
    log_chi2_u: np.ndarray
    log_var_u: np.ndarray
    kl_pq_u: np.ndarray
    dv_u: np.ndarray
    t_u: np.ndarray
    cap_u: np.ndarray
    pm_u: np.ndarray
    rep: Rep


def _normalise(logc: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return logc - _lse(logc)[:, None]


def _dense(p, shape) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim == 1 and np.issubdtype(p.dtype, np.integer):  # point masses (observed next tokens)
        out = np.zeros(shape)
        out[np.arange(shape[0]), p] = 1.0
        return out
    p = np.asarray(p, dtype=np.float64)
    if p.shape[1] < shape[1]:  # outcomes outside the alphabet: P1 never emits them
        p = np.concatenate([p, np.zeros((p.shape[0], shape[1] - p.shape[1]))], axis=1)
    return p


def _check_support(P, sup, full, lq2, ids) -> None:
    def where(bad):
        i = int(np.flatnonzero(bad)[0])
        return f"row {i}" if ids is None else f"node {int(ids[i])}"

    if not full:
        bad = P.outside(sup)
        if bad.any():
            raise ValueError(f"lp_before gives zero probability at {where(bad)} to an outcome P1 uses (infinite KL)")
    bad = ~np.isfinite(lq2).all(1) if full else (sup & ~np.isfinite(lq2)).any(1)
    if bad.any():
        raise ValueError(f"lp_after is zero at {where(bad)} where lp_before is not (infinite KL(q||q'))")


def node_terms(p, logq, logq2, bins: int = 512, ids=None, normalised: bool = False) -> NodeTerms:
    """Every per-node term of the decomposition for rows ``[n, K]`` (nats), vectorised over rows.

    ``p``: P1's conditionals ``[n, <= K]`` (zero-padded) or int ``[n]`` (point masses: an observed
    next token); ``logq``, ``logq2``: natural-log conditionals of ``q`` and ``q'`` (normalised here
    unless ``normalised``). The support is ``isfinite(log q)`` (a probability that underflows to 0
    is still in it); rows holding such outcomes get chi2 and the variance summed in log space.
    Raises ``ValueError`` naming the row (or ``ids[row]``) where ``P1`` uses an outcome ``q`` excludes
    or ``q'`` excludes one ``q`` allows.
    """
    lq, lq2 = (np.asarray(x, dtype=np.float64) for x in (logq, logq2))
    if not normalised:
        lq, lq2 = _normalise(lq), _normalise(lq2)
    sup = np.isfinite(lq)
    full = bool(sup.all())
    P = _P1Rows(p, lq.shape)
    _check_support(P, sup, full, lq2, ids)
    s = lq2 - lq if full else np.where(sup, lq2 - np.where(sup, lq, 0.0), 0.0)
    q = np.exp(lq)
    Eq_s = (q * s).sum(1)
    d = s - Eq_s[:, None]
    log_chi2, log_var = P.log_chi2(q, lq, sup), _log_var(q, lq, d, sup)
    c = -d if full else np.where(sup, -d, 0.0)  # c = -s + E_q s: E_q c = 0, (E_p - E_q)[c] = first_u
    rep = compress(lq, c, bins, q=q)
    kl_pq = P.kl(lq)
    dv, t, cap = dv_rows(lq, c, kl_pq, rep)
    dv = np.maximum(dv, 0.0)
    pm = np.minimum(P.point_max(lq, c), dv) if P.point else dv  # PM_u <= DV_u (module docstring)
    return NodeTerms(first_u=Eq_s - P.mean(s), kl_u=np.maximum(-Eq_s, 0.0), log_chi2_u=log_chi2,
                     log_var_u=log_var, kl_pq_u=kl_pq, dv_u=dv, t_u=t, cap_u=cap, pm_u=pm, rep=rep)


class _P1Rows:
    """P1's rows, dense ``[n, K]`` or point masses (int ``[n]``: sums over their one entry only)."""

    def __init__(self, p, shape):
        p = np.asarray(p)
        self.point = p.ndim == 1 and np.issubdtype(p.dtype, np.integer)
        self.rows = np.arange(shape[0])
        self.p = p.astype(np.int64) if self.point else _dense(p, shape)

    def outside(self, sup) -> np.ndarray:
        """Rows where P1 uses an outcome outside ``sup``."""
        return ~sup[self.rows, self.p] if self.point else ((self.p > 0) & ~sup).any(1)

    def mean(self, x) -> np.ndarray:
        return x[self.rows, self.p] if self.point else (self.p * x).sum(1)

    def point_max(self, lq, c) -> np.ndarray:
        """Point masses: ``PM_u = max{c_u(a) : log q_u(a) >= log q_u(x)}`` (module docstring)."""
        lx = lq[self.rows, self.p]
        return np.where(lq >= lx[:, None], c, -np.inf).max(1)

    def kl(self, lq) -> np.ndarray:
        """``KL(p1_u||q_u)`` (for a point mass ``-log q_u(x)``, the token's code length)."""
        if self.point:
            return np.maximum(-lq[self.rows, self.p], 0.0)
        # sum_a [p log(p/q) - p + q] term by term (each >= 0, no cancellation when p ~ q):
        # p h(u), u = q/p - 1, h(u) = u - log1p(u); outcomes P1 never emits add their q
        r, k = np.nonzero(self.p > 0)
        pk = self.p[r, k]
        lr = lq[r, k] - np.log(pk)  # log(q/p) = log1p(u), exact also where q/p underflows
        u = np.expm1(lr)
        h = np.where(np.abs(u) < 1e-2, u * u * (0.5 - u / 3 + u * u / 4 - u**3 / 5 + u**4 / 6), u - lr)
        rest = np.where(self.p > 0, 0.0, np.exp(lq)).sum(1)
        return np.bincount(r, weights=pk * h, minlength=lq.shape[0]) + rest

    def log_chi2(self, q, lq, sup) -> np.ndarray:
        """``log chi2(p1_u||q_u) = log sum_a (p - q)^2 / q`` (point mass: ``(1 - q_x)^2/q_x + 1 - q_x``,
        in log space; dense rows holding an outcome below ``exp(-700)``: log space too)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.point:
                lx = lq[self.rows, self.p]
                l1 = np.log(-np.expm1(lx))  # log(1 - q_x)
                return np.logaddexp(2 * l1 - lx, l1)
            p = self.p
            out = np.log(np.where(q > 0, (p - q) ** 2 / np.where(q > 0, q, 1.0), 0.0).sum(1))
            tiny = (sup & (lq < -700.0)).any(1)
            if tiny.any():
                lt, st = lq[tiny], sup[tiny]
                out[tiny] = _lse(np.where(st, 2 * np.log(np.abs(p[tiny] - q[tiny])) - np.where(st, lt, 0.0), -np.inf))
        return out


def _log_var(q, lq, d, sup) -> np.ndarray:
    """``log Var_q(s) = log sum_a q_a d_a^2`` (log space on rows holding an outcome below ``exp(-700)``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log((q * d * d).sum(1))
        tiny = (lq < -700.0).any(1)
        if tiny.any():
            st = sup[tiny]
            out[tiny] = _lse(np.where(st, lq[tiny] + 2 * np.log(np.abs(d[tiny])), -np.inf))
    return out


def concat_terms(parts) -> NodeTerms:
    """The rows of several :class:`NodeTerms` (same compression width) as one."""
    parts = list(parts)
    cat = lambda xs: np.concatenate(xs, axis=0)  # noqa: E731
    kw = {f: cat([getattr(x, f) for x in parts]) for f in NodeTerms.__dataclass_fields__ if f != "rep"}
    rep = Rep(*(cat([getattr(x.rep, f) for x in parts]) for f in Rep.__dataclass_fields__))
    return NodeTerms(**kw, rep=rep)


def decompose(weight, terms: NodeTerms, unit: str = "nats", nodes=None) -> PrefixDecomposition:
    """Sum the per-node terms with weights ``P1(u)`` into a :class:`PrefixDecomposition`
    (both bounds, the KL bounds and the floor; module docstring)."""
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'bits' or 'nats', not {unit!r}")
    w = np.asarray(weight, dtype=np.float64)
    sc = 1.0 if unit == "nats" else 1.0 / LN2
    with np.errstate(divide="ignore"):
        lw = np.log(w)
    klt = float(w @ terms.kl_u) * sc
    first = float(w @ terms.first_u) * sc
    lcb, lvb = float(_lse(lw + terms.log_chi2_u)), float(_lse(lw + terms.log_var_u))
    with np.errstate(over="ignore", invalid="ignore"):
        node_cs = np.exp(0.5 * (terms.log_chi2_u + terms.log_var_u))
        bound = float(np.exp(0.5 * (lcb + lvb)))
    glob, tg = global_t(w, terms.kl_pq_u, terms.rep)
    glob = min(glob, float(w @ terms.cap_u))
    with np.errstate(over="ignore"):  # chi2 beyond float64 is reported as inf
        return PrefixDecomposition(
            delta=first + klt, first_order=first, kl_term=klt,
            chi2_bar=float(np.exp(lcb)), var_bar=float(np.exp(lvb)) * sc * sc,
            bound=bound * sc + klt, bound_nodewise=float(w @ node_cs) * sc + klt,
            bound_kl=float(w @ terms.dv_u) * sc + klt, bound_kl_global=max(glob, 0.0) * sc + klt,
            bound_min=float(w @ np.minimum(terms.dv_u, node_cs)) * sc + klt,
            floor=float(w @ np.maximum(terms.first_u, 0.0)) * sc + klt, kl_bar=float(w @ terms.kl_pq_u) * sc,
            t_global=tg, unit=unit, nodes=np.arange(w.size) if nodes is None else np.asarray(nodes), weight=w,
            first_order_u=terms.first_u * sc, kl_u=terms.kl_u * sc, chi2_u=np.exp(terms.log_chi2_u),
            var_u=np.exp(terms.log_var_u) * sc * sc, kl_pq_u=terms.kl_pq_u * sc, dv_u=terms.dv_u * sc, t_u=terms.t_u,
            bound_point=float(w @ terms.pm_u) * sc + klt, pm_u=terms.pm_u * sc)


def prefix_decomposition(
    tree: TokenTree, lp_before, lp_after, unit: str = "nats", tol: float = 1e-6
) -> PrefixDecomposition:
    """Exact per-prefix decomposition of ``Delta L(P1)`` for an update ``q -> q'``
    (Proposition 3.1 node by node), its Cauchy-Schwarz bounds, its change-of-measure (KL)
    bounds and the floor; see the module docstring.

    Args:
        tree: ``P1`` as a token tree (its masses are ``P1(u)``).
        lp_before, lp_after: ``q`` and ``q'`` as ``[N, V + 1]`` log-conditionals, holders
            of ``logq_full``, or :class:`TreeLogProbs` on a tree holding every outcome.
        unit: ``"nats"`` (default) or ``"bits"`` for every code-length quantity.
        tol: allowed deviation of a conditional's row sum from 1 (rows are then normalised).

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
    step = max(1, 2**21 // lq.shape[1])  # rows per batch: bounded memory on wide alphabets
    parts = []
    for i in range(0, nodes.size, step):
        sl = nodes[i:i + step]
        parts.append(node_terms(p[i:i + step], lq[sl], lq2[sl], ids=sl))
    if not parts:
        parts = [node_terms(np.zeros((0, lq.shape[1])), lq[:0], lq2[:0])]
    return decompose(tree.mass[nodes], concat_terms(parts), unit, nodes)


def bound_columns(d: PrefixDecomposition, measured: float | None = None) -> dict:
    """The report columns every reporter shows for one run (demo, ``talr compare``, the grid study):
    measured dL (default: the decomposition's exact ``delta``), first-order term, KL term, the chi2
    bound, the KL bounds, the floor, each over measured (None unless measured > 0) and which term of
    dL dominates (``"KL term"`` when ``kl_term >= |first_order|``, else ``"first-order term"``).
    All in ``d.unit``."""
    meas = d.delta if measured is None else float(measured)
    cols = {"unit": d.unit, "measured": meas, "first_order": d.first_order, "kl_term": d.kl_term,
            "bound_chi2": d.bound, "bound_chi2_nodewise": d.bound_nodewise, "bound_kl": d.bound_kl,
            "bound_kl_global": d.bound_kl_global, "bound_min": d.bound_min, "floor": d.floor,
            "bound_point": d.bound_point}
    for k in ("bound_chi2", "bound_chi2_nodewise", "bound_kl", "bound_kl_global", "bound_min", "floor", "bound_point"):
        cols[f"{k}_over_measured"] = cols[k] / meas if meas > 0 else None
    cols["dominant"] = "KL term" if d.kl_term >= abs(d.first_order) else "first-order term"
    return cols
