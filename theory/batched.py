"""Batches of exact worlds on one complete tree, as arrays ``[B, N, K]`` (vectorised checks).

The claims ledger checks each statement on >= 1000 random instances; one Python loop per
instance would take minutes, so here ``B`` worlds share the complete topology of
``theory.simulate`` (all ``V`` children at every node up to ``depth``, EOS forced there) and
every quantity is one numpy expression over the batch. Natural logs (nats) throughout.

Arrays: ``log-conditionals [B, N, K]`` (``K = V + 1``, EOS last; forced-end rows are the
EOS one-hot ``[-inf, ..., 0]``), prefix masses ``[B, N]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .changemeasure import _lse
from .simulate import World, _complete_tree, _tree_with
from .tree import TokenTree

__all__ = [
    "BatchWorld",
    "random_batch",
    "log_softmax_rows",
    "prefix_log_mass",
    "chain_kl",
    "leaf_log_prob_b",
    "chi2_seq",
    "tilt_b",
    "node_weights",
    "SHAPES",
    "batches",
    "smoothed_b",
    "seq_moments",
    "HARD_SHAPES",
    "hard_batches",
    "point_mass_rows",
    "mixed_batches",
    "push_point_masses",
    "p1_pushed",
    "HARD_NOTE",
    "hard_rows",
    "near_mass_rows",
    "seq_cauchy_schwarz",
]


@dataclass
class BatchWorld:
    """``B`` exact worlds on one complete topology ``tree``.

    ``logp1``, ``logp2``, ``logq0``: ``[B, N, K]``; ``hard`` ``[B, depth]`` marks the hard
    levels (P2 puts ``hard_mass`` on P1's least likely token there)."""

    tree: TokenTree
    logp1: np.ndarray
    logp2: np.ndarray
    logq0: np.ndarray
    hard: np.ndarray

    @property
    def coded(self) -> np.ndarray:
        return ~self.tree.forced_end()

    def world(self, i: int) -> World:
        """World ``i`` as a :class:`theory.simulate.World` (for the tabular simulations)."""
        t = self.tree
        levels = tuple(int(x) for x in np.flatnonzero(self.hard[i]))
        return World(t, _tree_with(t, self.logp1[i]), _tree_with(t, self.logp2[i]), self.logp1[i], self.logp2[i],
                     self.logq0[i], levels)


def log_softmax_rows(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis (``-inf`` entries stay ``-inf``)."""
    mx = np.max(x, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    z = x - mx
    with np.errstate(divide="ignore"):
        return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _forced_rows(tree: TokenTree, arr: np.ndarray) -> np.ndarray:
    K = tree.vocab_size + 1
    out = arr.copy()
    row = np.full(K, -np.inf)
    row[-1] = 0.0
    out[..., tree.forced_end(), :] = row
    return out


def random_batch(
    rng: np.random.Generator, B: int, V: int, depth: int, *, hard_mass=(0.5, 0.95),
    eos_prob=(0.01, 0.3), q_noise=(0.0, 1.0), concentration=(0.3, 3.0), independent: bool = False,
) -> BatchWorld:
    """``B`` random worlds in the manner of :func:`theory.simulate.make_world`, each with its
    own hard levels (``n_hard`` uniform in ``0..depth``), hard mass, EOS probability, model
    noise and Dirichlet concentration (drawn uniformly from the given ranges).

    ``independent=True``: P2 and the model are drawn independently of P1 and of each other
    (Dirichlet conditionals, floored at 0.001/K) -- general pairs, for statements the paper
    makes for *any* Q and P2 (the oracle inequality)."""
    tree = _complete_tree(V, depth)
    N, K = tree.n_nodes, V + 1
    u = lambda r: rng.uniform(r[0], r[1], size=(B, 1, 1))  # noqa: E731
    conc, eos, noise, hm = u(concentration), u(eos_prob), u(q_noise), u(hard_mass)
    g = rng.gamma(np.broadcast_to(conc, (B, N, V)))
    tok = g / g.sum(-1, keepdims=True)
    tok = 0.98 * tok + 0.02 / V
    p1 = np.concatenate([(1 - eos) * tok, np.broadcast_to(eos, (B, N, 1))], axis=-1)
    n_hard = rng.integers(0, depth + 1, size=B)
    order = np.argsort(rng.random((B, depth)), axis=1)
    hard = np.zeros((B, depth), dtype=bool)
    rows = np.repeat(np.arange(B), depth)
    hard[rows, order.ravel()] = (np.tile(np.arange(depth), B) < np.repeat(n_hard, depth))
    node_hard = hard[:, np.minimum(tree.depth, depth - 1)] & (tree.depth < depth)[None, :]  # [B, N]
    ht = np.argmin(p1[..., :V], axis=-1)  # [B, N]
    onehot = np.eye(K)[ht]  # [B, N, K]
    rest = p1 * (1 - onehot)
    rest = rest * (1 - hm) / rest.sum(-1, keepdims=True) + onehot * hm
    p2 = np.where(node_hard[..., None], rest, p1)
    with np.errstate(divide="ignore"):
        logp1, logp2 = _forced_rows(tree, np.log(p1)), _forced_rows(tree, np.log(p2))
    logq0 = _forced_rows(tree, log_softmax_rows(np.log(p1) + noise * rng.standard_normal((B, N, K))))
    if independent:
        def draw():
            g = rng.gamma(np.broadcast_to(conc, (B, N, K)))
            return _forced_rows(tree, np.log(0.999 * g / g.sum(-1, keepdims=True) + 0.001 / K))
        logp2, logq0 = draw(), draw()
    return BatchWorld(tree, logp1, logp2, logq0, hard)


def prefix_log_mass(tree: TokenTree, logc: np.ndarray) -> np.ndarray:
    """``log P(u)`` ``[B, N]`` from log-conditionals ``[B, N, K]`` (one pass per level)."""
    out = np.zeros(logc.shape[:-1])
    for sl in tree.level_slices()[1:]:
        par = tree.parent[sl]
        out[..., sl] = out[..., par] + logc[..., par, tree.token[sl]]
    return out


def node_weights(tree: TokenTree, logc: np.ndarray) -> np.ndarray:
    """``P(u)`` at coded prefixes, 0 at forced ends ``[B, N]`` (the chain-rule weights)."""
    return np.exp(prefix_log_mass(tree, logc)) * (~tree.forced_end())


def _row_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        t = np.where(p > 0, p * (logp - logq), 0.0)
    return t.sum(-1)


def chain_kl(tree: TokenTree, logp: np.ndarray, logq: np.ndarray, weights_from=None) -> np.ndarray:
    """``KL(P || Q) = sum_u P(u) KL(p_u || q_u)`` ``[B]`` (chain rule, exact on the
    complete tree). ``weights_from``: log-conditionals whose prefix masses weight the nodes
    (default ``logp``, i.e. the KL; pass another to get ``sum_u R(u) KL(p_u||q_u)``)."""
    w = node_weights(tree, logp if weights_from is None else weights_from)
    return (w * _row_kl(logp, logq)).sum(-1)


def leaf_log_prob_b(tree: TokenTree, logc: np.ndarray) -> np.ndarray:
    """``log P(z)`` of the response ending at each node ``[B, N]`` (forced EOS costs 0)."""
    eos = np.where(tree.forced_end(), 0.0, logc[..., -1])
    return prefix_log_mass(tree, logc) + eos


def chi2_seq(tree: TokenTree, logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """Whole-response ``chi2(P || Q) = sum_z P(z)^2 / Q(z) - 1`` ``[B]``."""
    lp, lq = leaf_log_prob_b(tree, logp), leaf_log_prob_b(tree, logq)
    return np.exp(2 * lp - lq).sum(-1) - 1.0


def tilt_b(tree: TokenTree, logq: np.ndarray, logp: np.ndarray, lam) -> np.ndarray:
    """Per-prefix tilting (Definition B.3) of every world at once; ``lam`` scalar or ``[B]``."""
    lam = np.asarray(lam, dtype=np.float64).reshape(-1, 1, 1) if np.ndim(lam) else float(lam)
    with np.errstate(invalid="ignore"):
        mixed = (1 - lam) * logq + lam * logp
    return _forced_rows(tree, log_softmax_rows(np.where(np.isnan(mixed), -np.inf, mixed)))


SHAPES = ((1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2), (1, 3), (2, 3))  # (V, depth)


def batches(rng: np.random.Generator, n: int, shapes=SHAPES, **kw):
    """``n`` random worlds split over the ``(V, depth)`` shapes (one :class:`BatchWorld` each)."""
    sizes = np.full(len(shapes), n // len(shapes))
    sizes[: n % len(shapes)] += 1
    for (V, depth), b in zip(shapes, sizes):
        if b:
            yield random_batch(rng, int(b), V, depth, **kw)


def smoothed_b(tree: TokenTree, logp: np.ndarray, alpha) -> np.ndarray:
    """``log((1 - alpha) p + alpha / K)`` at coded rows (Assumption B.1, uniform rho);
    ``alpha`` scalar or ``[B]``."""
    a = np.asarray(alpha, dtype=np.float64).reshape(-1, 1, 1) if np.ndim(alpha) else float(alpha)
    K = logp.shape[-1]
    with np.errstate(divide="ignore"):
        return _forced_rows(tree, np.log((1 - a) * np.exp(logp) + a / K))


def seq_moments(tree: TokenTree, logp: np.ndarray, logq: np.ndarray, F: np.ndarray) -> tuple:
    """``(E_P F, E_Q F, Var_Q F)`` ``[B]`` for a function ``F`` ``[B, N]`` of the response
    ending at each node (exact: the complete tree holds both supports)."""
    P = np.exp(leaf_log_prob_b(tree, logp))
    Q = np.exp(leaf_log_prob_b(tree, logq))
    EQ = (Q * F).sum(-1)
    return (P * F).sum(-1), EQ, np.maximum((Q * F * F).sum(-1) - EQ**2, 0.0)


def seq_cauchy_schwarz(tree: TokenTree, logp: np.ndarray, logq: np.ndarray, F: np.ndarray) -> np.ndarray:
    """``sqrt(Var_Q F * chi2(P || Q))`` ``[B]`` for ``F`` ``[B, N]`` (responses ending at each node), both
    factors summed in log space: a response with ``Q(z)`` below float64's range (``log Q < -745``) still
    adds ``P(z)^2 / Q(z)`` to chi2 and ``Q(z)(F - E_Q F)^2`` to the variance (their product can be O(1))."""
    lp, lq = leaf_log_prob_b(tree, logp), leaf_log_prob_b(tree, logq)
    P, Q = np.exp(lp), np.exp(lq)
    EQ = (Q * F).sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fin = np.isfinite(lq)
        lvar = _lse(np.where(fin, lq + 2 * np.log(np.abs(F - EQ)), -np.inf))
        lchi = _lse(np.where(fin, 2 * np.log(np.abs(P - Q)) - np.where(fin, lq, 0.0), -np.inf))
        return np.exp(0.5 * (lvar + lchi))


HARD_SHAPES = ((1, 8), (2, 5), (3, 3), (5, 2), (2, 6))  # deep trees and wider alphabets (V, depth)


def point_mass_rows(tree: TokenTree, logc: np.ndarray, tok: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``logc`` with the coded rows where ``mask`` ``[B, N]`` holds replaced by a point mass on
    ``tok`` ``[B, N]`` (a token index ``< V``)."""
    K = logc.shape[-1]
    with np.errstate(divide="ignore"):
        one = np.log(np.eye(K)[tok])
    return _forced_rows(tree, np.where(mask[..., None], one, logc))


def near_mass_rows(tree: TokenTree, logc: np.ndarray, tok: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``logc`` with the coded rows where ``mask`` ``[B, N]`` holds made near-deterministic: ``1 - 1e-12``
    on ``tok`` ``[B, N]``, the rest spread evenly."""
    V = tree.vocab_size
    near = log_softmax_rows(np.where(np.eye(V + 1, dtype=bool)[tok], np.log1p(-1e-12), np.log(1e-12 / V)))
    return _forced_rows(tree, np.where(mask[..., None], near, logc))


def _harden(rng, tree: TokenTree, logc: np.ndarray, frac: float = 0.25) -> np.ndarray:
    """Coded rows made near-deterministic (1 - 1e-12 on one outcome) or given one outcome with
    ``log q`` uniform in [-1500, -700] (far below float64's underflow), each with prob. ``frac``."""
    B, N, K = logc.shape
    kind = rng.random((B, N))
    det = np.full((B, N, K), np.log(1e-12 / (K - 1)) if K > 1 else 0.0)
    det[np.arange(B)[:, None], np.arange(N)[None, :], rng.integers(0, K, (B, N))] = np.log1p(-1e-12) if K > 1 else 0.0
    tiny = logc.copy()
    pick = np.eye(K, dtype=bool)[rng.integers(0, K, (B, N))]
    tiny = log_softmax_rows(np.where(pick, -rng.uniform(700, 1500, (B, N, 1)), tiny))
    out = np.where((kind < frac)[..., None], det, np.where((kind > 1 - frac)[..., None], tiny, logc))
    return _forced_rows(tree, out)


def hard_batches(rng: np.random.Generator, n: int, shapes=HARD_SHAPES):
    """``n`` worlds of the hard family: :func:`random_batch` worlds on deep trees / wide alphabets
    whose model rows are hardened (near-deterministic rows, ``log q`` down to -1,500) and whose
    P1 rows are, each with prob. 1/4, near-deterministic or a point mass on the token ``q`` finds
    least likely (checks add point masses on the most pushed token once they know the update)."""
    sizes = np.full(len(shapes), n // len(shapes))
    sizes[: n % len(shapes)] += 1
    for (V, depth), b in zip(shapes, sizes):
        if not b:
            continue
        bw = random_batch(rng, int(b), V, depth, concentration=(0.1, 3.0), q_noise=(0.0, 3.0))
        t = bw.tree
        logq0 = _harden(rng, t, bw.logq0)
        kind = rng.random(logq0.shape[:2])
        least = np.argmin(logq0[..., :V], axis=-1)
        logp1 = point_mass_rows(t, bw.logp1, least, kind < 0.25)
        logp1 = near_mass_rows(t, logp1, least, kind > 0.75)
        yield BatchWorld(t, logp1, bw.logp2, logq0, bw.hard)


def mixed_batches(rng: np.random.Generator, n: int, **kw):
    """``n`` worlds, yielded as ``(hard, world)``: the first ``n - n // 2`` from :func:`batches`
    (``**kw`` passed on), the other ``n // 2`` from :func:`hard_batches` -- every ledger check draws
    from both families."""
    for bw in batches(rng, n - n // 2, **kw):
        yield False, bw
    for bw in hard_batches(rng, n // 2):
        yield True, bw


def push_point_masses(rng: np.random.Generator, tree: TokenTree, logp: np.ndarray, down: np.ndarray,
                      frac: float = 0.25) -> np.ndarray:
    """``logp`` with a fraction ``frac`` of its coded rows made point masses on the token an update
    pushes down most: ``argmax down`` over the real tokens (``down`` ``[B, N, K]``, e.g.
    ``log q - log q'`` or ``-f`` for a tilt along ``f``; non-finite entries are skipped)."""
    V = tree.vocab_size
    with np.errstate(invalid="ignore"):
        d = np.where(np.isfinite(down), down, -np.inf)[..., :V]
    return point_mass_rows(tree, logp, np.argmax(d, -1), rng.random(d.shape[:2]) < frac)


HARD_NOTE = ("half the worlds from the hard family (theory.batched.hard_batches: trees to depth 8, rows "
             "1 - 1e-12, log q down to -1,500, P1 point masses on q's least likely and on the most pushed-down "
             "token)")


def p1_pushed(rng: np.random.Generator, bw: BatchWorld, hard: bool, logp: np.ndarray, frac: float = 0.25) -> np.ndarray:
    """``bw.logp1``, and for a world of the hard family a fraction ``frac`` of its rows made point masses on
    the token a tilt toward ``logp`` pushes down most (``argmin f``, ``f = log p~ - log q0``)."""
    if not hard:
        return bw.logp1
    with np.errstate(invalid="ignore"):  # forced rows: -inf - -inf
        down = bw.logq0 - logp
    return push_point_masses(rng, bw.tree, bw.logp1, down, frac)


def hard_rows(rng: np.random.Generator, n: int, K_max: int | None = None) -> np.ndarray:
    """``n`` single conditionals of the hard family: one random coded row of the model ``log q`` of each
    of ``n`` :func:`hard_batches` worlds (near-deterministic rows, ``log q`` down to -1,500), as
    log-probabilities ``[n, K_max]`` padded with ``-inf`` (``K_max`` default: the widest alphabet)."""
    rows = []
    for bw in hard_batches(rng, n):
        coded = np.flatnonzero(bw.coded)
        B = bw.logq0.shape[0]
        rows.append(bw.logq0[np.arange(B), coded[rng.integers(0, coded.size, B)]])
    K = K_max or max(V for V, _ in HARD_SHAPES) + 1
    out = np.full((n, K), -np.inf)
    i = 0
    for r in rows:
        out[i: i + r.shape[0], : r.shape[1]] = r[:, :K]
        i += r.shape[0]
    return out[rng.permutation(n)]
