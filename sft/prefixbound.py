"""The bridge for full-vocabulary per-prefix bounds: two causal LMs' conditionals at every coded
position of a set of examples, in batches, handed to `theory.prefix` row by row.

Each coded position ``i`` of an example (``labels[i] != -100``, as `sft.eval.codelength` codes it)
is a node ``u`` = (example, prefix) with ``P1(u) = 1 / n_coded`` (so code lengths are per token) and
``p1_u`` the point mass on the observed token ``labels[i]``. The models' conditionals there are
their full softmax over the whole output vocabulary (no restricted alphabet, no pooling: each
context is its own node), read from the logits at position ``i - 1``. Then

    Delta L(P1) = (1/n) sum_i [log q(x_i | ctx_i) - log q'(x_i | ctx_i)]

is exactly the change of the set's code length per token, and `theory.prefix.decompose` gives the
first-order / KL split, the chi2 and KL (change-of-measure) bounds and the floor.

Memory: at most ``batch_size`` examples' logits (float32, both models) and ``rows`` coded rows in
float64 (``rows x V x 8`` bytes per array; theory's temporaries are a handful of those) are held at
once; only per-node scalars and a ``bins``-wide compressed copy per node are kept across batches.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from theory.prefix import PrefixDecomposition, concat_terms, decompose, node_terms

__all__ = ["coded_conditionals", "full_vocab_terms", "full_vocab_decomposition"]

IGNORE = -100


def _batches(examples, batch_size: int):
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(examples[i]["input_ids"]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        lab = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(examples[i]["input_ids"])
            ids[r, :n] = torch.as_tensor(examples[i]["input_ids"])
            lab[r, :n] = torch.as_tensor(examples[i]["labels"])
            mask[r, :n] = 1
        yield ids, mask, lab


@torch.inference_mode()
def _coded_logits(model: nn.Module, ids, mask, lab) -> tuple[torch.Tensor, torch.Tensor]:
    dev = next(model.parameters()).device
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
    coded = lab[:, 1:] != IGNORE  # position i is predicted at i - 1
    return logits[:, :-1][coded.to(dev)].float().cpu(), lab[:, 1:][coded]


def coded_conditionals(model: nn.Module, examples, *, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``model``'s logits (float32, full vocabulary) at every coded position of ``examples``, one
    ``(logits [n_b, V], tokens [n_b])`` pair per batch in :func:`full_vocab_terms`' order: computed
    once for a base model, they serve every later comparison (``model_before`` of
    :func:`full_vocab_terms`) without a second model resident. Memory: ``4 V`` bytes per coded
    position (1,411 positions of SmolLM2's 49,152-token vocabulary: 0.28 GB)."""
    _check_coded(examples)
    was = model.training
    model.eval()
    try:
        return [_coded_logits(model, ids, mask, lab) for ids, mask, lab in _batches(examples, batch_size)]
    finally:
        model.train(was)


def _check_coded(examples) -> None:
    if not any(any(x != IGNORE for x in e["labels"][1:]) for e in examples):
        raise ValueError("no coded position (labels != -100 after the first token) in the examples")


def full_vocab_terms(model_before, model_after: nn.Module, examples, *, batch_size: int = 4,
                     rows: int = 128, bins: int = 512, progress: bool = False):
    """Per-node terms (`theory.prefix.NodeTerms`, nats) at every coded position of ``examples`` (dicts
    with ``input_ids`` and ``labels`` aligned, -100 where not coded) and timings: ``forward_s`` (both
    models), ``theory_s``, ``max_batch_gb`` (the largest float64 batch of conditionals held), ``vocab``.
    ``model_before``: a model, or its :func:`coded_conditionals` on the same ``examples`` and
    ``batch_size`` (a different set is an error)."""
    from tqdm.auto import tqdm

    _check_coded(examples)
    batches = list(_batches(examples, batch_size))
    cached = not isinstance(model_before, nn.Module)
    if cached and len(model_before) != len(batches):  # same batch count; each batch's tokens checked below
        raise ValueError("model_before's coded_conditionals were computed on other examples or another batch_size")
    parts, fwd, th, peak, vocab = [], 0.0, 0.0, 0.0, 0
    was = (None if cached else model_before.training, model_after.training)
    if not cached:
        model_before.eval()
    model_after.eval()
    try:
        for j, (ids, mask, lab) in enumerate(tqdm(batches, desc="prefix bound", disable=not progress)):
            t = time.perf_counter()
            a, tok = model_before[j] if cached else _coded_logits(model_before, ids, mask, lab)
            b, tok_b = _coded_logits(model_after, ids, mask, lab)
            if not torch.equal(tok, tok_b):
                raise ValueError("model_before's coded_conditionals were computed on other examples")
            fwd += time.perf_counter() - t
            t = time.perf_counter()
            vocab = a.shape[1]
            for s in range(0, a.shape[0], rows):
                lq = torch.log_softmax(a[s:s + rows].double(), -1).numpy()
                lq2 = torch.log_softmax(b[s:s + rows].double(), -1).numpy()
                peak = max(peak, 2 * lq.nbytes / 1e9)
                parts.append(node_terms(tok[s:s + rows].numpy().astype(np.int64), lq, lq2, bins=bins, normalised=True))
            th += time.perf_counter() - t
    finally:
        if not cached:
            model_before.train(was[0])
        model_after.train(was[1])
    return concat_terms(parts), {"forward_s": fwd, "theory_s": th, "max_batch_gb": peak, "vocab": vocab}


def full_vocab_decomposition(model_before: nn.Module, model_after: nn.Module, examples, *, unit: str = "bits",
                             **kw) -> tuple[PrefixDecomposition, dict]:
    """:func:`full_vocab_terms` summed with ``P1(u) = 1/n_coded``: the per-token decomposition of the
    set's code-length change from ``model_before`` to ``model_after`` with every bound, and the timings
    (``theory_s`` includes the global bound's bisection)."""
    terms, timing = full_vocab_terms(model_before, model_after, examples, **kw)
    t = time.perf_counter()
    n = terms.first_u.size
    d = decompose(np.full(n, 1.0 / n), terms, unit)
    timing["theory_s"] += time.perf_counter() - t
    return d, timing
