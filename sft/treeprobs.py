"""The bridge from a causal LM to `theory`: the model's conditionals on a token tree, as numpy.

Every study that holds a model against the theory goes through this module; it returns
natural-log conditionals, dense per node (``[N, V + 1]``: the tree's ``V`` symbols, EOS last),
which `theory.divergence.TreeLogProbs.from_full` turns into edge log-probabilities. The dense
matrix is kept because per-node statistics (per-prefix decompositions, tilting fits, constant
estimation) need each node's whole conditional, not only the edges the tree holds.

Two cases:

**Exact** (a complete tree whose tokens are model ids, e.g. the tiny world's P1 and P2):
:func:`exact_full_logprobs` / :func:`exact_tree_logprobs`. One forward pass per maximal path,
batched and right-padded; the conditional of node ``u`` is read at the position of ``u``'s last
token in one maximal path through ``u``. Tree token ``t < V`` is model id ``t``; EOS is
``eos_id`` (default ``V``); the input starts with ``bos_id`` (default ``V + 2``, the world
layout).

**Empirical** (a real LLM on evaluation sets): :func:`build_empirical_trees` tokenizes a general
(D1) and a domain (D2) set into restricted-alphabet trees; :func:`empirical_tree_logprobs` puts
a model's conditionals on them. Call it once per model (before and after an update) on the same
:class:`EmpiricalTrees`, so the arrays line up node by node. Approximations (the theory is about
one distribution over responses; a real LLM conditions on prompts and has ~50k tokens):

1. **Restricted alphabet.** The tree alphabet is the tokens that occur in the (truncated)
   sequences, plus one ``other`` symbol that carries the model's remaining probability mass
   (absent when the sets use every token), plus EOS. EOS is the model's stop token: a sequence
   ends at its first stop token and ``q(EOS | u) = q(stop | u)``. Coarsening the alphabet can
   only lower KL divergences (data processing), so tree KLs are lower bounds of the token-level
   ones at the same depth.
2. **Prompts pooled.** A node is a response prefix; different prompts reaching it share it. Its
   conditional is the average, in probability space, of ``q(. | prompt_i, prefix)`` over the
   sequences through the node, weighted by their empirical mass (in the union tree D1 and D2
   weigh 1/2 each, so at shared prefixes, e.g. the root, the two contexts are mixed). Exact when
   every sequence has the same context.
3. **Depth.** Trees stop at depth ``d``: on full-length responses ``chi2(P^1 || Q)`` overflows
   (every response costs hundreds of bits), which makes every D1 bound of the paper infinite.

Public entries: ``exact_full_logprobs``, ``exact_tree_logprobs``, ``encode_pairs``,
``build_empirical_trees``, ``EmpiricalTrees``, ``sequence_conditionals``, ``pooled_logq``,
``pool_conditionals``, ``empirical_tree_logprobs``, ``EmpiricalLogProbs``, ``TreeProbsError``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from theory.divergence import TreeLogProbs
from theory.tree import TokenTree

from .models import model_device

__all__ = ["exact_full_logprobs", "exact_tree_logprobs", "encode_pairs", "build_empirical_trees", "EmpiricalTrees",
           "sequence_conditionals", "pooled_logq", "pool_conditionals", "empirical_tree_logprobs",
           "EmpiricalLogProbs", "TreeProbsError", "tree_paths"]


class TreeProbsError(ValueError):
    """Sequences, tokenizer and model that do not make a tree; the message says which."""


# ----------------------------------------------------------------------------------------------
# exact: complete trees whose tokens are model ids
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def exact_full_logprobs(model: nn.Module, tree: TokenTree, *, bos_id: int | None = None, eos_id: int | None = None,
                        batch_size: int = 512, renormalize: bool = False) -> np.ndarray:
    """Dense natural-log model conditionals ``[N, V + 1]`` at every node (EOS last).

    Every node is read exactly once; the compute is ``#leaves x depth`` token positions (no KV
    bookkeeping). ``renormalize=False`` keeps the model's raw probabilities (rows sum to 1 minus
    the mass the model puts on ids outside the tree, e.g. PAD and BOS); ``True`` renormalises
    over the ``V + 1`` symbols. Ids: see the module docstring.
    """
    V = tree.vocab_size
    eos_id = V if eos_id is None else int(eos_id)
    bos_id = V + 2 if bos_id is None else int(bos_id)
    N = tree.n_nodes
    # leaf_of[u]: a maximal path through u (first child's, bottom-up over levels)
    leaf_of = np.arange(N)
    for sl in reversed(tree.level_slices()[:-1]):
        ids = np.arange(sl.start, sl.stop)
        has = tree.child_count[ids] > 0
        leaf_of[ids[has]] = leaf_of[tree.child_start[ids[has]]]
    leaves = np.flatnonzero(tree.child_count == 0)
    row_of_leaf = np.full(N, -1)
    row_of_leaf[leaves] = np.arange(leaves.size)
    row = row_of_leaf[leaf_of]  # path row of each node
    pos = tree.depth  # position of node u's last token, with BOS at position 0
    T = int(tree.depth.max()) + 1
    paths = np.full((leaves.size, T), 0, dtype=np.int64)  # path token matrix [n_leaves, 1 + max depth]
    paths[:, 0] = bos_id
    node = leaves.copy()
    while True:
        live = node > 0
        if not live.any():
            break
        paths[live, tree.depth[node[live]]] = tree.token[node[live]]
        node[live] = tree.parent[node[live]]
    lengths = tree.depth[leaves] + 1
    cols = np.r_[np.arange(V), eos_id]
    dev = model_device(model)
    out = np.empty((N, V + 1))
    order = np.argsort(row, kind="stable")  # nodes grouped by path row
    bounds = np.searchsorted(row[order], np.arange(0, leaves.size + batch_size, batch_size))
    was = model.training
    model.eval()
    try:
        for bi, r0 in enumerate(range(0, leaves.size, batch_size)):
            r1 = min(r0 + batch_size, leaves.size)
            L = int(lengths[r0:r1].max())
            ids = torch.as_tensor(paths[r0:r1, :L], device=dev)
            mask = torch.as_tensor(np.arange(L)[None, :] < lengths[r0:r1, None], device=dev).long()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            nodes = order[bounds[bi]:bounds[bi + 1]]
            sel = logits[torch.as_tensor(row[nodes] - r0, device=dev), torch.as_tensor(pos[nodes], device=dev)]
            logp = torch.log_softmax(sel.double(), dim=-1)[:, torch.as_tensor(cols, device=dev)]
            if renormalize:
                logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
            out[nodes] = logp.cpu().numpy()
    finally:
        model.train(was)
    return np.minimum(out, 0.0)


def exact_tree_logprobs(model: nn.Module, tree: TokenTree, *, bos_id: int | None = None, eos_id: int | None = None,
                        batch_size: int = 512, renormalize: bool = False) -> TreeLogProbs:
    """Exact model log-conditionals on every edge and EOS leaf of ``tree``
    (:func:`exact_full_logprobs`, read on the tree's edges)."""
    full = exact_full_logprobs(model, tree, bos_id=bos_id, eos_id=eos_id, batch_size=batch_size,
                               renormalize=renormalize)
    return TreeLogProbs.from_full(tree, full)


# ----------------------------------------------------------------------------------------------
# empirical: restricted-alphabet trees of evaluation sequences (real LLMs)
# ----------------------------------------------------------------------------------------------
@dataclass
class EmpiricalTrees:
    """Tokenized sequences and their trees (module docstring, 1-3). Tree symbol ``k < R`` is
    model id ``vocab_ids[k]``; symbol ``R`` is ``other`` when ``has_other``; EOS is ``V``."""

    contexts: list          # per sequence: context ids (BOS + prompt)
    seqs: list              # per sequence: response ids truncated at depth d / the stop token
    is_domain: np.ndarray   # bool per sequence (D1 first, then D2)
    vocab_ids: np.ndarray   # real token id of tree symbol k (k < R)
    has_other: bool
    stop_id: int
    depth: int
    p1: TokenTree           # D1 on its own topology
    p2: TokenTree           # D2 on its own topology
    union: TokenTree        # union topology (D1 and D2 weigh 1/2 each) ...
    p1u: TokenTree          # ... with D1's masses
    p2u: TokenTree          # ... with D2's masses
    paths_own: list         # per sequence: node ids (depth 0..len) in its own tree
    paths_union: list       # per sequence: node ids in the union

    @property
    def V(self) -> int:
        """Tree alphabet size (used tokens + ``other``); EOS is symbol ``V``."""
        return int(self.vocab_ids.size) + int(self.has_other)


def encode_pairs(tokenizer, prompts: Sequence[str | None], texts: Sequence[str]) -> tuple[list, list]:
    """Context and response ids of each sequence, as `sft.eval.codelength.corpus_code_length_bits`
    codes them: the context is BOS + prompt; a text without a prompt (None) is coded whole, its
    first token the context when the tokenizer has no BOS."""
    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    ctxs, seqs = [], []
    for p, t in zip(prompts, texts):
        if p is None:
            ids = head + enc(t)
            k = len(head) if head else 1
            ctxs.append(ids[:k])
            seqs.append(ids[k:])
        else:
            ctxs.append(head + enc(p))
            seqs.append(enc(t))
    return ctxs, seqs


def tree_paths(tree: TokenTree, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Node ids along each sequence of tree symbols (root first); every sequence must be in the tree."""
    out = []
    for s in seqs:
        u, ids = 0, [0]
        for t in s:
            a, c = int(tree.child_start[u]), int(tree.child_count[u])
            i = a + int(np.searchsorted(tree.token[a:a + c], t))
            if i >= a + c or tree.token[i] != t:
                raise TreeProbsError(f"sequence {list(s)} is not in the tree (symbol {t} after node {u})")
            u = i
            ids.append(u)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _prompts_texts(s) -> tuple:
    return (s.prompts, s.texts) if hasattr(s, "texts") else tuple(s)


def build_empirical_trees(tokenizer, general, domain, *, depth: int, model_vocab: int,
                          stop_id: int | None = None) -> EmpiricalTrees:
    """Restricted-alphabet token trees of a general (D1) and a domain (D2) set at depth ``depth``.

    ``general`` / ``domain``: ``(prompts, texts)`` or any object with ``.prompts`` and ``.texts``
    (a prompt None codes the text whole). ``model_vocab``: the model's output size (to tell
    whether an ``other`` symbol is needed). ``stop_id``: the token that ends a response (default
    the tokenizer's ``eos_token_id``).
    """
    stop = tokenizer.eos_token_id if stop_id is None else stop_id
    if stop is None:
        raise TreeProbsError("the tokenizer has no eos_token_id: cannot define the response end (EOS)")
    c1, s1 = encode_pairs(tokenizer, *_prompts_texts(general))
    c2, s2 = encode_pairs(tokenizer, *_prompts_texts(domain))
    seqs = []
    for s in s1 + s2:
        if stop in s:
            s = s[:s.index(stop)]
        seqs.append(s[:depth])
    used = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs] + [np.zeros(0, np.int64)]))
    if used.size and int(used.max()) >= model_vocab or stop >= model_vocab:
        raise TreeProbsError(f"token id {max(int(used.max()), stop)} outside the model's vocabulary ({model_vocab})")
    has_other = used.size + 1 < model_vocab  # tokens left besides the used ones and the stop token
    remap = {int(t): k for k, t in enumerate(used)}
    tseqs = [[remap[t] for t in s] for s in seqs]
    V = int(used.size) + int(has_other)
    n1 = len(s1)
    p1 = TokenTree.from_sequences(tseqs[:n1], max_depth=depth, vocab_size=V)
    p2 = TokenTree.from_sequences(tseqs[n1:], max_depth=depth, vocab_size=V)
    union, p1u, p2u = p1.union_aligned(p2)
    return EmpiricalTrees(
        contexts=c1 + c2, seqs=seqs, is_domain=np.arange(len(seqs)) >= n1, vocab_ids=used,
        has_other=bool(has_other), stop_id=int(stop), depth=depth, p1=p1, p2=p2, union=union, p1u=p1u, p2u=p2u,
        paths_own=tree_paths(p1, tseqs[:n1]) + tree_paths(p2, tseqs[n1:]), paths_union=tree_paths(union, tseqs))


def sequence_conditionals(model: nn.Module, trees: EmpiricalTrees, batch_size: int = 4,
                          progress: bool = False) -> list[np.ndarray]:
    """Per sequence, the model's conditionals over the tree alphabet at depths 0..len:
    probabilities ``[len + 1, V + 1]`` (used tokens, ``other``, EOS = stop token; rows sum to 1)."""
    from tqdm.auto import tqdm

    dev = model_device(model)
    ids_used = torch.as_tensor(trees.vocab_ids, dtype=torch.long, device=dev)
    out: list = [None] * len(trees.seqs)
    order = sorted(range(len(trees.seqs)), key=lambda i: -(len(trees.contexts[i]) + len(trees.seqs[i])))
    was = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(order), batch_size), desc="tree conditionals", disable=not progress,
                      unit="batch"):
            idx = order[s:s + batch_size]
            full = [trees.contexts[i] + trees.seqs[i] for i in idx]
            width = max(len(x) for x in full)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, x in enumerate(full):
                ids[r, :len(x)] = torch.as_tensor(x)
                mask[r, :len(x)] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            for r, i in enumerate(idx):
                a = len(trees.contexts[i]) - 1
                lp = torch.log_softmax(logits[r, a:a + len(trees.seqs[i]) + 1].double(), dim=-1)
                cols = [lp.index_select(1, ids_used)]
                if trees.has_other:
                    rest = torch.ones(lp.shape[1], dtype=torch.bool, device=dev)
                    rest[ids_used] = False
                    rest[trees.stop_id] = False
                    cols.append(torch.logsumexp(lp[:, rest], dim=1, keepdim=True))
                cols.append(lp[:, trees.stop_id:trees.stop_id + 1])
                out[i] = torch.exp(torch.cat(cols, dim=1)).cpu().numpy()
    finally:
        model.train(was)
    return out


def pooled_logq(n_nodes: int, paths: Sequence[np.ndarray], rows: Sequence[np.ndarray], weights: np.ndarray,
                K: int) -> np.ndarray:
    """Dense natural-log conditionals ``[n_nodes, K]``: the weighted average of the per-sequence
    model conditionals at each node (module docstring, 2); uniform where no sequence passes
    (e.g. forced-end rows, never coded). Rows are renormalised in float64."""
    acc = np.zeros((n_nodes, K))
    wsum = np.zeros(n_nodes)
    for path, row, w in zip(paths, rows, weights):
        if w <= 0:
            continue
        np.add.at(acc, path, w * row[:path.size])
        np.add.at(wsum, path, w)
    seen = wsum > 0
    acc[seen] /= wsum[seen, None]
    acc[~seen] = 1.0 / K
    acc = np.maximum(acc, 1e-300)
    acc /= acc.sum(1, keepdims=True)
    return np.log(acc)


@dataclass
class EmpiricalLogProbs:
    """A model's pooled natural-log conditionals ``[N, V + 1]`` on the three trees of an
    :class:`EmpiricalTrees` (columns: used tokens, ``other``, EOS)."""

    p1: np.ndarray
    p2: np.ndarray
    union: np.ndarray

    def tree_logprobs(self, trees: EmpiricalTrees, which: str) -> TreeLogProbs:
        """Edge and EOS log-probabilities on ``trees.<which>`` (``which`` in p1, p2, union; the
        union's rows also serve ``p1u`` and ``p2u``, which share its topology)."""
        tree = getattr(trees, which)
        return TreeLogProbs.from_full(tree, np.minimum(getattr(self, which), 0.0))


def pool_conditionals(trees: EmpiricalTrees, rows: Sequence[np.ndarray]) -> EmpiricalLogProbs:
    """Pool per-sequence conditionals (:func:`sequence_conditionals`) on the D1 tree, the D2 tree
    and the union (D1 and D2 weigh 1/2 each)."""
    K = trees.V + 1
    dom = trees.is_domain
    n1, n2 = int((~dom).sum()), int(dom.sum())
    own = trees.paths_own
    g = [i for i in range(len(rows)) if not dom[i]]
    d = [i for i in range(len(rows)) if dom[i]]
    w_union = np.where(dom, 0.5 / max(n2, 1), 0.5 / max(n1, 1))
    return EmpiricalLogProbs(
        p1=pooled_logq(trees.p1.n_nodes, [own[i] for i in g], [rows[i] for i in g], np.ones(n1), K),
        p2=pooled_logq(trees.p2.n_nodes, [own[i] for i in d], [rows[i] for i in d], np.ones(n2), K),
        union=pooled_logq(trees.union.n_nodes, trees.paths_union, rows, w_union, K))


def empirical_tree_logprobs(model: nn.Module, trees: EmpiricalTrees, *, batch_size: int = 4,
                            progress: bool = False) -> EmpiricalLogProbs:
    """``model``'s pooled conditionals on ``trees`` (one forward pass per sequence)."""
    return pool_conditionals(trees, sequence_conditionals(model, trees, batch_size, progress))
