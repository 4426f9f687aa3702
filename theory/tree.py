"""Token trees (Definition 3.1 (= B.1) of arXiv 2509.20758).

A :class:`TokenTree` stores a distribution ``P`` over responses ``z`` (token sequences
followed by EOS) as a prefix tree. Every node ``u`` is a prefix; its children are the
observed next tokens and it carries one EOS leaf (the response that ends at ``u``).

Invariants (checked by ``validate`` and the tests):

* nodes are in BFS order: ``depth`` is non-decreasing, ``parent[u] < u``;
* the children of ``u`` are the contiguous ids ``child_start[u] .. child_start[u] +
  child_count[u] - 1``, sorted by token;
* ``mass[u] = eos_mass[u] + sum(mass[c] for c in children(u))`` (Definition 3.1 (2)),
  ``mass[0] == 1`` and ``eos_mass.sum() == 1``: the EOS leaves carry the response
  probabilities (Definition 3.1 (3)).

Depth truncation ``d`` (Definition 3.2): a response longer than ``d`` tokens is cut to its
first ``d`` tokens. Both coder and decoder know ``d``, so at a node of depth ``d`` the end
is certain and costs no bits: ``cond_eos`` there is 1 and model conditionals are ignored.

Token ids are ``0 .. vocab_size - 1``; in full conditional vectors (length ``V + 1``) EOS
has index ``V`` (:data:`EOS`-relative: ``eos_index = vocab_size``).
No per-node Python objects: every attribute is a flat numpy array.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = ["TokenTree"]


def _as_int_arrays(seqs: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten sequences into (tokens, lengths) int64 arrays."""
    if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
        lengths = np.full(seqs.shape[0], seqs.shape[1], dtype=np.int64)
        return np.ascontiguousarray(seqs, dtype=np.int64).ravel(), lengths
    seqs = list(seqs)
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    if not seqs or not lengths.any():
        return np.zeros(0, dtype=np.int64), lengths
    try:
        tokens = np.concatenate(seqs)
    except ValueError:  # ragged nesting or scalars: convert one by one
        tokens = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs])
    if tokens.dtype.kind == "f" and np.array_equal(tokens, np.floor(tokens)):
        tokens = tokens.astype(np.int64)  # lists mixing empty [] (float) and ints
    if tokens.size != lengths.sum() or tokens.dtype.kind not in "iu":
        raise ValueError("sequences must be flat sequences of integer token ids")
    return tokens.astype(np.int64, copy=False), lengths


def _build_by_sorting(tokens, starts, lengths, w, vocab_size):
    """BFS node arrays of the prefix tree of ``n`` sequences via one lexicographic sort.

    Rows of the padded matrix ``M[n, L]`` (token + 1, pad 0, so a prefix sorts before its
    extensions) are sorted byte-wise; consecutive sorted rows share ``lcp`` tokens, so row
    ``r`` creates the nodes of depths ``lcp_r + 1 .. len_r``. In the depth-major (transposed)
    layout, created cells in reading order are BFS order (depth, then parent, then token), so
    a running count numbers the nodes and a running max along each depth row gives every
    row's node at that depth.
    """
    n = lengths.size
    L = int(lengths.max())
    col = np.arange(L)
    # big-endian so byte order = numeric order; wide enough for every id + 1 (ids >= 2**32 used to wrap)
    width = ">u2" if vocab_size + 1 < (1 << 16) else ">u4" if vocab_size + 1 < (1 << 32) else ">u8"
    inside = col[None, :] < lengths[:, None]
    M = np.zeros((n, L), dtype=width)
    if int(lengths.sum()) == tokens.size:  # no truncation: tokens are the row-major cells
        M[inside] = tokens + 1
    else:
        rows = np.repeat(np.arange(n), lengths)
        offs = np.arange(rows.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        M[inside] = tokens[starts[rows] + offs] + 1
    order = np.argsort(M.view(np.dtype((np.void, L * M.dtype.itemsize))).ravel(), kind="stable")
    M, lengths, w = M[order], lengths[order], w[order]
    lcp = np.zeros(n, dtype=np.int64)  # tokens shared with the previous sorted row
    if n > 1:
        diff = M[1:] != M[:-1]
        lcp[1:] = np.where(diff.any(axis=1), np.argmax(diff, axis=1), L)
        lcp[1:] = np.minimum(lcp[1:], np.minimum(lengths[1:], lengths[:-1]))
    inside_t = col[:, None] < lengths[None, :]  # [L, n], depth-major
    create_t = inside_t & (col[:, None] >= lcp[None, :])
    idt = np.int32 if create_t.size < (1 << 31) else np.int64
    ids = np.cumsum(create_t.ravel(), dtype=idt).reshape(L, n)  # BFS id (1-based) at created cells
    ids *= create_t
    node_t = np.maximum.accumulate(ids, axis=1)  # row r's node at depth d
    cells = np.flatnonzero(create_t)  # created cells in BFS order
    n_nodes = 1 + cells.size
    d_cell = cells // n
    parent = np.empty(n_nodes, dtype=np.int64)
    parent[0] = -1
    node_flat = node_t.ravel()
    parent[1:] = np.where(d_cell > 0, node_flat[np.maximum(cells - n, 0)], 0)
    token = np.empty(n_nodes, dtype=np.int64)
    token[0] = -1
    token[1:] = np.ascontiguousarray(M.T).ravel()[cells].astype(np.int64) - 1
    depth = np.concatenate([[0], d_cell + 1])
    if np.all(w == w[0]):
        count = np.bincount(node_t[inside_t], minlength=n_nodes) * float(w[0])
    else:
        count = np.bincount(node_t[inside_t], weights=np.broadcast_to(w, (L, n))[inside_t], minlength=n_nodes)
    count[0] = w.sum()
    rows = np.arange(n)
    last = np.where(lengths > 0, node_t[np.maximum(lengths - 1, 0), rows], 0)
    eos_count = np.bincount(last, weights=w, minlength=n_nodes)
    return parent, token, depth, count.astype(np.float64), eos_count


@dataclass(eq=False)
class TokenTree:
    """A distribution over responses stored as a BFS-ordered prefix tree.

    Attributes (all length ``N = n_nodes``):
        parent: parent id, ``-1`` for the root (the empty prefix, node 0).
        token: token on the edge parent -> node, ``-1`` for the root.
        depth: number of tokens in the prefix.
        child_start, child_count: CSR children (contiguous, sorted by token).
        mass: ``P(prefix u)``, the probability that a response starts with ``u``.
        eos_mass: ``P(response == u)``, the weight of ``u``'s EOS leaf.
        count, eos_count: the raw (weighted) counts behind ``mass`` (equal to ``mass``
            for trees built from a distribution).
        vocab_size: ``V``; tokens are ``0..V-1`` and EOS is index ``V``.
        max_depth: truncation depth ``d`` or ``None``.
        pruned_mass: probability mass dropped by ``from_distribution(min_mass=...)``.
    """

    parent: np.ndarray
    token: np.ndarray
    depth: np.ndarray
    child_start: np.ndarray
    child_count: np.ndarray
    mass: np.ndarray
    eos_mass: np.ndarray
    count: np.ndarray
    eos_count: np.ndarray
    vocab_size: int
    max_depth: int | None = None
    pruned_mass: float = 0.0

    # ------------------------------------------------------------------ basics
    @property
    def n_nodes(self) -> int:
        return int(self.parent.size)

    @property
    def eos_index(self) -> int:
        return int(self.vocab_size)

    @property
    def n_levels(self) -> int:
        return int(self.depth[-1]) + 1

    def level_slices(self) -> list[slice]:
        """Node id ranges of each depth (BFS order makes every level contiguous)."""
        bounds = np.searchsorted(self.depth, np.arange(self.n_levels + 1), side="left")
        return [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(self.n_levels)]

    def forced_end(self) -> np.ndarray:
        """Boolean mask of nodes where the end is certain (depth == max_depth)."""
        if self.max_depth is None:
            return np.zeros(self.n_nodes, dtype=bool)
        return self.depth == self.max_depth

    def cond_edge(self) -> np.ndarray:
        """``p(token_u | parent_u)`` for every node (1.0 at the root)."""
        out = np.ones(self.n_nodes)
        par = self.parent[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[1:] = np.where(self.mass[par] > 0, self.mass[1:] / self.mass[par], 0.0)
        return out

    def cond_eos(self) -> np.ndarray:
        """``p(EOS | u)`` for every node (1.0 where the end is forced)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(self.mass > 0, self.eos_mass / self.mass, 0.0)
        out[self.forced_end()] = 1.0
        return out

    def cond_full(self) -> np.ndarray:
        """Dense conditionals ``[N, V + 1]`` (EOS last); for small vocabularies."""
        full = np.zeros((self.n_nodes, self.vocab_size + 1))
        full[self.parent[1:], self.token[1:]] = self.cond_edge()[1:]
        full[:, self.vocab_size] = self.cond_eos()
        return full

    def children(self, u: int) -> np.ndarray:
        s = int(self.child_start[u])
        return np.arange(s, s + int(self.child_count[u]))

    def prefix(self, u: int) -> tuple[int, ...]:
        out = []
        while u > 0:
            out.append(int(self.token[u]))
            u = int(self.parent[u])
        return tuple(reversed(out))

    def prefixes(self, nodes: Iterable[int] | None = None) -> list[tuple[int, ...]]:
        """Prefixes of ``nodes`` (all nodes by default), built level by level."""
        pre: list[tuple[int, ...]] = [()] * self.n_nodes
        for sl in self.level_slices()[1:]:
            for u in range(sl.start, sl.stop):
                pre[u] = pre[int(self.parent[u])] + (int(self.token[u]),)
        if nodes is None:
            return pre
        return [pre[int(u)] for u in nodes]

    def find(self, prefix: Sequence[int]) -> int:
        """Node id of ``prefix`` or -1."""
        u = 0
        for tok in prefix:
            s, c = int(self.child_start[u]), int(self.child_count[u])
            toks = self.token[s : s + c]
            i = int(np.searchsorted(toks, tok))
            if i >= c or toks[i] != tok:
                return -1
            u = s + i
        return u

    def leaves(self) -> tuple[np.ndarray, np.ndarray]:
        """(node ids whose EOS leaf has positive mass, their probabilities)."""
        ids = np.flatnonzero(self.eos_mass > 0)
        return ids, self.eos_mass[ids]

    def validate(self, atol: float = 1e-9) -> None:
        """Raise ``ValueError`` if a structural or mass invariant is broken."""
        n = self.n_nodes
        if n == 0 or self.parent[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        if np.any(np.diff(self.depth) < 0) or np.any(self.parent[1:] >= np.arange(1, n)):
            raise ValueError("nodes are not in BFS order")
        child_sum = np.bincount(self.parent[1:], weights=self.mass[1:], minlength=n)
        if not np.allclose(self.mass, self.eos_mass + child_sum, atol=atol):
            raise ValueError("node mass differs from EOS mass + children's mass")
        if abs(self.mass[0] - 1.0) > atol or abs(self.eos_mass.sum() - 1.0) > atol:
            raise ValueError("masses do not sum to 1")
        cnt = np.bincount(self.parent[1:], minlength=n)
        if not np.array_equal(cnt, self.child_count):
            raise ValueError("child_count disagrees with parent")
        has = self.child_count > 0
        if np.any(self.parent[self.child_start[has]] != np.flatnonzero(has)):
            raise ValueError("child_start disagrees with parent")

    # ------------------------------------------------------------ construction
    @classmethod
    def _from_levels(
        cls,
        level_parent: list[np.ndarray],
        level_token: list[np.ndarray],
        level_count: list[np.ndarray],
        level_eos: list[np.ndarray],
        vocab_size: int,
        max_depth: int | None,
        pruned_mass: float = 0.0,
    ) -> "TokenTree":
        """Assemble a tree from per-level arrays (parents given as global ids)."""
        parent = np.concatenate(level_parent).astype(np.int64, copy=False)
        token = np.concatenate(level_token).astype(np.int64, copy=False)
        sizes = np.fromiter(map(len, level_parent), dtype=np.int64, count=len(level_parent))
        depth = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
        count = np.concatenate(level_count).astype(np.float64, copy=False)
        eos_count = np.concatenate(level_eos).astype(np.float64, copy=False)
        return cls._from_arrays(parent, token, depth, count, eos_count, vocab_size=vocab_size,
                                max_depth=max_depth, pruned_mass=pruned_mass)

    @classmethod
    def _from_arrays(cls, parent, token, depth, count, eos_count, *, vocab_size, max_depth,
                     pruned_mass=0.0) -> "TokenTree":
        """Assemble a tree from BFS-ordered node arrays (parents as global ids)."""
        n = parent.size
        child_count = np.bincount(parent[1:], minlength=n).astype(np.int64)
        child_start = np.zeros(n, dtype=np.int64)
        # children are contiguous and appear in parent order: first child = 1 + #children
        # of all earlier parents
        child_start[:] = 1 + np.concatenate([[0], np.cumsum(child_count)[:-1]])
        total = eos_count.sum()
        if total <= 0:
            raise ValueError("the tree carries no probability mass (all weights are zero)")
        tree = cls(
            parent=parent,
            token=token,
            depth=depth,
            child_start=child_start,
            child_count=child_count,
            mass=count / total,
            eos_mass=eos_count / total,
            count=count,
            eos_count=eos_count,
            vocab_size=int(vocab_size),
            max_depth=max_depth,
            pruned_mass=float(pruned_mass),
        )
        return tree

    @classmethod
    def from_sequences(
        cls,
        seqs: Iterable[Sequence[int]] | np.ndarray,
        weights: Sequence[float] | np.ndarray | None = None,
        max_depth: int | None = None,
        vocab_size: int | None = None,
        _method: str | None = None,
    ) -> "TokenTree":
        """Empirical token tree of a dataset of responses (EOS is implicit at the end).

        Args:
            seqs: token sequences (ints in ``0..V-1``), a list or a 2-D array.
            weights: optional non-negative weight per sequence (default 1 each).
            max_depth: truncate responses to this many tokens (Definition 3.2).
            vocab_size: ``V``; inferred as ``max token + 1`` when omitted.

        Work: one byte-wise sort of the sequences (as fixed-width rows) and a few passes
        over the padded ``[n, max_len]`` matrix; when padding would be wasteful (a few very
        long sequences) it falls back to one ``np.unique`` per depth level.
        """
        tokens, lengths = _as_int_arrays(seqs)
        n_seq = lengths.size
        if n_seq == 0:
            raise ValueError("no sequences given")
        if tokens.size and tokens.min() < 0:
            bad = int(np.repeat(np.arange(n_seq), lengths)[tokens < 0][0])
            raise ValueError(f"sequence {bad}: negative token id")
        v_obs = int(tokens.max()) + 1 if tokens.size else 1
        if vocab_size is None:
            vocab_size = v_obs
        elif v_obs > vocab_size:
            bad = int(np.repeat(np.arange(n_seq), lengths)[tokens >= vocab_size][0])
            raise ValueError(f"sequence {bad}: token id {v_obs - 1} is outside vocab_size={vocab_size}")
        w = np.ones(n_seq) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (n_seq,):
            raise ValueError(f"weights has shape {w.shape}, expected ({n_seq},)")
        if np.any(~np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite and non-negative")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if max_depth is not None:
            if max_depth < 0:
                raise ValueError("max_depth must be >= 0")
            lengths = np.minimum(lengths, max_depth)

        L = int(lengths.max())
        if L > 0 and (_method == "sorted" or (_method is None and n_seq * L <= 4 * int(lengths.sum()) + (1 << 20))):
            arrays = _build_by_sorting(tokens, starts, lengths, w, vocab_size)
            return cls._from_arrays(*arrays, vocab_size=vocab_size, max_depth=max_depth)
        if vocab_size * (int(lengths.sum()) + 1) >= 2**63:  # node * V + token must fit in int64
            arrays = _build_by_sorting(tokens, starts, lengths, w, vocab_size)
            return cls._from_arrays(*arrays, vocab_size=vocab_size, max_depth=max_depth)
        key_base = np.int64(vocab_size)
        node = np.zeros(n_seq, dtype=np.int64)  # current node of every sequence
        level_parent = [np.array([-1])]
        level_token = [np.array([-1])]
        level_count = [np.array([w.sum()])]
        level_eos = [np.array([w[lengths == 0].sum()])]
        active = np.flatnonzero(lengths > 0)
        offset = 1  # global id of the first node of the next level
        depth = 0
        while active.size:
            tok = tokens[starts[active] + depth]
            keys = node[active] * key_base + tok
            uniq, inv = np.unique(keys, return_inverse=True)
            level_parent.append(uniq // key_base)
            level_token.append(uniq % key_base)
            level_count.append(np.bincount(inv, weights=w[active], minlength=uniq.size))
            ends = lengths[active] == depth + 1
            level_eos.append(
                np.bincount(inv[ends], weights=w[active][ends], minlength=uniq.size)
            )
            node[active] = offset + inv
            offset += uniq.size
            depth += 1
            active = active[~ends]
        return cls._from_levels(
            level_parent, level_token, level_count, level_eos, vocab_size, max_depth
        )

    @classmethod
    def from_distribution(
        cls,
        next_probs: Callable,
        vocab_size: int,
        max_depth: int,
        min_mass: float = 0.0,
        batched: bool = False,
        progress: bool = False,
    ) -> "TokenTree":
        """Exact token tree of a generative distribution given per prefix (``progress``: a tqdm
        bar over the depth levels, for large trees).

        Args:
            next_probs: ``next_probs(prefix) -> probs[V + 1]`` (EOS last), or with
                ``batched=True`` ``next_probs(list_of_prefixes) -> probs[n, V + 1]``.
            vocab_size: ``V``.
            max_depth: responses are cut at this depth (the end is forced there).
            min_mass: children whose prefix mass is below this are pruned; the pruned
                mass is reported in ``pruned_mass`` and the rest is renormalised.

        With ``min_mass=0`` and full-support conditionals this is the complete tree.
        """
        if max_depth is None or max_depth < 0:
            raise ValueError("from_distribution needs a finite max_depth >= 0")
        V = int(vocab_size)
        level_parent = [np.array([-1])]
        level_token = [np.array([-1])]
        level_mass = [np.array([1.0])]
        level_eos: list[np.ndarray] = []
        prefixes: list[tuple[int, ...]] = [()]
        cur_mass = np.array([1.0])
        offset = 0
        pruned = 0.0
        levels = range(max_depth + 1)
        if progress:
            from tqdm.auto import tqdm

            levels = tqdm(levels, desc="building the tree", unit="level")
        for depth in levels:
            if depth == max_depth:
                level_eos.append(cur_mass.copy())  # forced end
                break
            if batched:
                probs = np.asarray(next_probs(prefixes), dtype=np.float64)
            else:
                probs = np.stack([np.asarray(next_probs(p), dtype=np.float64) for p in prefixes])
            if probs.shape != (len(prefixes), V + 1):
                raise ValueError(
                    f"next_probs returned shape {probs.shape}, expected ({len(prefixes)}, {V + 1})"
                )
            if np.any(probs < 0) or not np.allclose(probs.sum(1), 1.0, atol=1e-6):
                bad = int(np.flatnonzero((probs < 0).any(1) | ~np.isclose(probs.sum(1), 1.0, atol=1e-6))[0])
                raise ValueError(f"next_probs{prefixes[bad]} is not a probability vector")
            probs = probs / probs.sum(1, keepdims=True)
            level_eos.append(cur_mass * probs[:, V])
            child = cur_mass[:, None] * probs[:, :V]
            keep = child > 0 if min_mass <= 0 else child >= min_mass
            pruned += float(child[~keep].sum())
            par_local, tok = np.nonzero(keep)  # row-major: parent order, then token
            if par_local.size == 0:
                break
            level_parent.append(offset + par_local)
            level_token.append(tok)
            cur_mass = child[par_local, tok]
            level_mass.append(cur_mass)
            prefixes = [prefixes[p] + (int(t),) for p, t in zip(par_local, tok)]
            offset += level_parent[-2].size
        # masses after pruning: recompute bottom-up so mass = eos + children exactly
        eos = np.concatenate(level_eos)
        parent = np.concatenate(level_parent)
        mass = eos.copy()
        depth_arr = np.concatenate([np.full(p.size, d) for d, p in enumerate(level_parent)])
        for d in range(len(level_parent) - 1, 0, -1):
            ids = np.flatnonzero(depth_arr == d)
            np.add.at(mass, parent[ids], mass[ids])
        sizes = np.cumsum([0] + [p.size for p in level_parent])
        level_count = [mass[sizes[i] : sizes[i + 1]] for i in range(len(level_parent))]
        level_eos_split = [eos[sizes[i] : sizes[i + 1]] for i in range(len(level_parent))]
        return cls._from_levels(
            level_parent, level_token, level_count, level_eos_split, V, max_depth, pruned
        )

    # -------------------------------------------------------------- operations
    def truncate(self, d: int) -> "TokenTree":
        """The tree of responses cut to at most ``d`` tokens (end forced at depth d)."""
        if d < 0:
            raise ValueError("truncation depth must be >= 0")
        if self.max_depth is not None and d >= self.max_depth:
            return self
        keep = int(np.searchsorted(self.depth, d, side="right"))
        eos = self.eos_count[:keep].copy()
        last = self.depth[:keep] == d
        eos[last] = self.count[:keep][last]
        child_count = self.child_count[:keep].copy()
        child_count[last] = 0
        return TokenTree(
            parent=self.parent[:keep].copy(),
            token=self.token[:keep].copy(),
            depth=self.depth[:keep].copy(),
            child_start=self.child_start[:keep].copy(),
            child_count=child_count,
            mass=self.mass[:keep].copy(),
            eos_mass=eos / self.eos_count.sum(),
            count=self.count[:keep].copy(),
            eos_count=eos,
            vocab_size=self.vocab_size,
            max_depth=d,
            pruned_mass=self.pruned_mass,
        )

    def union(self, other: "TokenTree", weight: float = 0.5):
        """Union over shared prefixes (Proposition B.2).

        Returns ``(tree, idx_self, idx_other)`` where ``idx_*`` map each node of the
        inputs to its id in the union, and the union's distribution is the mixture
        ``weight * self + (1 - weight) * other`` (use ``|D1| / (|D1| + |D2|)`` for the
        pooled dataset of Proposition B.2). One model evaluated on the union's nodes
        scores both inputs.
        """
        if not 0.0 <= weight <= 1.0:
            raise ValueError("weight must be in [0, 1]")
        V = max(self.vocab_size, other.vocab_size)
        if self.max_depth != other.max_depth:
            raise ValueError(
                f"cannot union trees truncated at different depths ({self.max_depth} vs {other.max_depth})"
            )
        idx_a = np.zeros(self.n_nodes, dtype=np.int64)
        idx_b = np.zeros(other.n_nodes, dtype=np.int64)
        level_parent, level_token = [np.array([-1])], [np.array([-1])]
        level_count = [np.array([1.0])]
        level_eos = [np.array([weight * self.eos_mass[0] + (1 - weight) * other.eos_mass[0]])]
        sa, sb = self.level_slices(), other.level_slices()
        offset = 1
        key_base = np.int64(V)
        for d in range(1, max(len(sa), len(sb))):
            ka = kb = np.zeros(0, dtype=np.int64)
            if d < len(sa):
                ka = idx_a[self.parent[sa[d]]] * key_base + self.token[sa[d]]
            if d < len(sb):
                kb = idx_b[other.parent[sb[d]]] * key_base + other.token[sb[d]]
            uniq, inv = np.unique(np.concatenate([ka, kb]), return_inverse=True)
            ia, ib = inv[: ka.size], inv[ka.size :]
            m = np.zeros(uniq.size)
            e = np.zeros(uniq.size)
            if ka.size:
                idx_a[sa[d]] = offset + ia
                np.add.at(m, ia, weight * self.mass[sa[d]])
                np.add.at(e, ia, weight * self.eos_mass[sa[d]])
            if kb.size:
                idx_b[sb[d]] = offset + ib
                np.add.at(m, ib, (1 - weight) * other.mass[sb[d]])
                np.add.at(e, ib, (1 - weight) * other.eos_mass[sb[d]])
            level_parent.append(uniq // key_base)
            level_token.append(uniq % key_base)
            level_count.append(m)
            level_eos.append(e)
            offset += uniq.size
        tree = TokenTree._from_levels(
            level_parent, level_token, level_count, level_eos, V, self.max_depth
        )
        return tree, idx_a, idx_b

    def union_aligned(self, other: "TokenTree") -> tuple["TokenTree", "TokenTree", "TokenTree"]:
        """Both distributions on one topology (Proposition B.2): ``(union, self_on_union,
        other_on_union)``. ``union`` is :meth:`union` with weights 1/2; the other two share its
        nodes and carry ``self``'s and ``other``'s own masses (zero off their support), so one
        model evaluated on the union's nodes scores both (the constants of Appendix E need it)."""
        union, idx_self, idx_other = self.union(other)
        e_self, e_other = np.zeros(union.n_nodes), np.zeros(union.n_nodes)
        np.add.at(e_self, idx_self, self.eos_mass)
        np.add.at(e_other, idx_other, other.eos_mass)
        return union, union.with_masses(e_self), union.with_masses(e_other)

    def with_masses(self, eos_mass: np.ndarray) -> "TokenTree":
        """Same topology with another distribution given by its EOS-leaf masses."""
        eos = np.asarray(eos_mass, dtype=np.float64)
        if eos.shape != (self.n_nodes,) or np.any(eos < 0) or eos.sum() <= 0:
            raise ValueError("eos_mass must be non-negative with one entry per node")
        mass = eos.copy()
        for sl in reversed(self.level_slices()[1:]):
            np.add.at(mass, self.parent[sl], mass[sl])
        total = eos.sum()
        return TokenTree(
            parent=self.parent, token=self.token, depth=self.depth,
            child_start=self.child_start, child_count=self.child_count,
            mass=mass / total, eos_mass=eos / total, count=mass, eos_count=eos,
            vocab_size=self.vocab_size, max_depth=self.max_depth,
        )

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> list[np.ndarray]:
        """Draw ``n`` responses from the tree's distribution (vectorised per level)."""
        rng = np.random.default_rng(rng)
        cum = np.cumsum(self.mass)  # children of u are contiguous -> prefix sums index them
        node = np.zeros(n, dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        paths = [[] for _ in range(n)]
        while not done.all():
            act = np.flatnonzero(~done)
            u = node[act]
            r = rng.random(act.size) * self.mass[u]
            stop = (r < self.eos_mass[u]) | (self.child_count[u] == 0)
            done[act[stop]] = True
            go = act[~stop]
            if go.size == 0:
                break
            ug = node[go]
            start = self.child_start[ug]
            base = np.where(start > 0, cum[start - 1], 0.0)
            target = base + (r[~stop] - self.eos_mass[ug])
            pick = np.searchsorted(cum, target, side="right")
            pick = np.clip(pick, start, start + self.child_count[ug] - 1)
            node[go] = pick
            for i, c in zip(go, pick):
                paths[i].append(int(self.token[c]))
        return [np.asarray(p, dtype=np.int64) for p in paths]
