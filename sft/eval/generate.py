"""Batched greedy generation with a KV cache: the one generator of talr's evaluations.

``greedy_generate(model, tokenizer, prompts, stop=..., max_new_tokens=...)`` encodes each prompt
without special tokens, keeps its last ``max_length - max_new_tokens`` tokens (as lm-eval's HFLM
does), sorts prompts by length (less padding), left-pads each batch, and decodes greedily with a
``DynamicCache``: one forward over the padded prompts, then one forward per new token over the
last token only. Position ids count real tokens only (``cumsum(mask) - 1``), so a left-padded row
sees the same positions as the prompt alone. A row stops at EOS or at the first stop string in
its decoded continuation; the batch stops when every row has stopped or after ``max_new_tokens``.
Rows that stopped are fed the pad token (masked out) until the batch ends.

Output: one string per prompt, in input order, cut at the first stop string (kept when
``keep_stop=True``, dropped otherwise) and at EOS (never kept).

``generate_and_score(..., completions)`` also codes a given completion per prompt on the same
prompt cache (one prefill serves both the code length and the generation): the completion's
tokens are fed after the prompt, their log-probabilities summed in bits (float64), and the cache
is cropped back to the prompt before decoding. Equal to ``sft.eval.codelength.corpus_code_length_bits``
in conditional mode without BOS, at half the prompt cost.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..models import inference

__all__ = ["greedy_generate", "generate_and_score", "context_limit"]


def context_limit(model, tokenizer) -> int:
    """The model's context length (config, else the tokenizer's ``model_max_length``, else 2048)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(model.config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 10**8 else 2048


def _cut(text: str, stops: Sequence[str], keep_stop: bool) -> tuple[str, bool]:
    """``text`` up to its earliest stop string; (cut text, whether a stop string was found)."""
    best = None
    for s in stops:
        k = text.find(s)
        if k >= 0 and (best is None or k < best[0]):
            best = (k, s)
    if best is None:
        return text, False
    k, s = best
    return text[:k + len(s)] if keep_stop else text[:k], True


def greedy_generate(model, tokenizer, prompts: Sequence[str], *, stop: Sequence[str] = (),
                    max_new_tokens: int = 256, batch_size: int = 8, keep_stop: bool = False,
                    max_length: int | None = None, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (see the module docstring).

    stop: stop strings (empty strings ignored). max_length: context limit for prompt + new tokens
    (default :func:`context_limit`). batch_size: prompts per batch (>= 1).
    """
    return generate_and_score(model, tokenizer, prompts, None, stop=stop, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, keep_stop=keep_stop, max_length=max_length,
                              progress=progress, desc=desc)[0]


@torch.inference_mode()
def generate_and_score(model, tokenizer, prompts: Sequence[str], completions: Sequence[str] | None, *,
                       stop: Sequence[str] = (), max_new_tokens: int = 256, batch_size: int = 8,
                       keep_stop: bool = False, max_length: int | None = None, progress: bool = True,
                       desc: str = "generate") -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """(greedy continuations, bits of each completion given its prompt, completion token counts).

    The two arrays are None when ``completions`` is None. Generation as :func:`greedy_generate`.
    """
    if completions is not None and len(completions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from transformers import DynamicCache

    stops = [s for s in stop if s]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token")
    budget = max(1, (max_length or context_limit(model, tokenizer)) - max_new_tokens)
    encoded = [list(tokenizer(p, add_special_tokens=False)["input_ids"])[-budget:] for p in prompts]
    for i, e in enumerate(encoded):
        if not e:
            raise ValueError(f"prompt {i} is empty: nothing to condition on")
    comp = None if completions is None else [list(tokenizer(c, add_special_tokens=False)["input_ids"])
                                             for c in completions]
    bits = None if comp is None else np.zeros(len(prompts), dtype=np.float64)
    ntok = None if comp is None else np.array([len(c) for c in comp], dtype=np.int64)
    tail = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops), default=0) + 2
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    dev = next(model.parameters()).device
    out = [""] * len(prompts)
    with inference(model, len(prompts), desc=desc, unit="prompt", progress=progress) as advance:
        for idx in batches:
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]  # lm-head on the last position only
            if comp is not None:
                _score(model, cache, logits, [comp[i] for i in idx], mask, pos, pad, dev, bits, idx)
            gen: list[list[int]] = [[] for _ in idx]
            done = [False] * len(idx)
            nxt_pos = pos[:, -1:] + 1
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1)
                for r in range(len(idx)):
                    if done[r]:
                        continue
                    t = int(nxt[r])
                    if eos is not None and t == eos:
                        done[r] = True
                        continue
                    gen[r].append(t)
                    if stops and any(s in tokenizer.decode(gen[r][-tail:]) for s in stops):
                        done[r] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                feed = torch.tensor([pad if d else int(t) for d, t in zip(done, nxt)], device=dev)[:, None]
                mask = torch.cat([mask, torch.tensor([[0 if d else 1] for d in done], device=dev)], dim=1)
                logits = model(input_ids=feed, attention_mask=mask, position_ids=nxt_pos, past_key_values=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1]
                nxt_pos = nxt_pos + 1
            for r, i in enumerate(idx):
                out[i] = _cut(tokenizer.decode(gen[r], skip_special_tokens=True), stops, keep_stop)[0]
            advance(len(idx))
    return out, bits, ntok


def _score(model, cache, last_logits, comps, mask, pos, pad, dev, bits, idx) -> None:
    """Bits of each completion given the cached prompt; crops the cache back to the prompt."""
    width = mask.shape[1]
    C = max((len(c) for c in comps), default=0)
    if C == 0:
        return
    ids = torch.full((len(comps), C), pad, dtype=torch.long)
    cmask = torch.zeros((len(comps), C), dtype=torch.long)
    for r, c in enumerate(comps):
        ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[r, :len(c)] = 1
    ids, cmask = ids.to(dev), cmask.to(dev)
    logits = last_logits[:, None]
    if C > 1:
        feed_pos = pos[:, -1:] + 1 + torch.arange(C - 1, device=dev)[None]
        more = model(input_ids=ids[:, :-1], attention_mask=torch.cat([mask, cmask[:, :-1]], dim=1),
                     position_ids=feed_pos, past_key_values=cache, use_cache=True).logits
        logits = torch.cat([logits, more], dim=1)
        cache.crop(-(C - 1))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0].double().cpu()
    per = (-logp / math.log(2.0) * cmask.cpu()).sum(-1)
    for r, i in enumerate(idx):
        bits[i] = float(per[r])
