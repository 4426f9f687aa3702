"""Batched greedy generation with a KV cache: the one generator of talr's evaluations.

``greedy_generate(model, tokenizer, prompts, stop=..., max_new_tokens=...)`` encodes each prompt
without special tokens, keeps its last ``max_length - max_new_tokens`` tokens (as lm-eval's HFLM
does), sorts prompts by length (less padding) and cuts them into batches. Per batch, by stage:

* prefill (:func:`_prefill`): the token prefix every prompt of the batch shares (a chat template's
  system turn and instructions: 76 of 238 tokens on the MedCalc prompts) runs once and its cache is
  repeated over the rows; the rest of each prompt is left-padded and run in one forward. Cache
  layout per row: ``[shared prefix][padding][rest]``; padding is masked and position ids count real
  tokens only, so a row sees the same positions as its prompt alone;
* decode (:func:`_decode`): one forward per new token over the last token only (``DynamicCache``).
  A row stops at EOS or at the first stop string in its decoded tail; a stopped row leaves the
  batch (its cache rows are dropped), so later steps run on live rows only. The batch ends when no
  row is live or after ``max_new_tokens``;
* cut (:func:`_cut`): one string per prompt, in input order, cut at the first stop string (kept
  when ``keep_stop=True``, dropped otherwise) and at EOS (never kept).

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
    _check(prompts, completions, max_new_tokens, batch_size)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token")
    budget = max(1, (max_length or context_limit(model, tokenizer)) - max_new_tokens)
    encoded = _encode(tokenizer, prompts, budget)
    comp = None if completions is None else [_ids(tokenizer, c) for c in completions]
    bits = None if comp is None else np.zeros(len(prompts), dtype=np.float64)
    ntok = None if comp is None else np.array([len(c) for c in comp], dtype=np.int64)
    stopper = _Stopper(tokenizer, [s for s in stop if s], eos)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out = [""] * len(prompts)
    with inference(model, len(prompts), desc=desc, unit="prompt", progress=progress) as advance:
        for idx in (order[k:k + batch_size] for k in range(0, len(order), batch_size)):
            state = _prefill(model, [encoded[i] for i in idx], pad)
            if comp is not None:
                bits[idx] = _score(model, state, [comp[i] for i in idx], pad)
            for i, g in zip(idx, _decode(model, state, stopper, max_new_tokens)):
                out[i] = _cut(tokenizer.decode(g, skip_special_tokens=True), stopper.stops, keep_stop)[0]
            advance(len(idx))
    return out, bits, ntok


def _check(prompts, completions, max_new_tokens: int, batch_size: int) -> None:
    if completions is not None and len(completions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------- encode
def _encode(tokenizer, prompts: Sequence[str], budget: int) -> list[list[int]]:
    """Each prompt's tokens (no special tokens), its last ``budget`` kept (as lm-eval's HFLM)."""
    encoded = [_ids(tokenizer, p)[-budget:] for p in prompts]
    for i, e in enumerate(encoded):
        if not e:
            raise ValueError(f"prompt {i} is empty: nothing to condition on")
    return encoded


# ------------------------------------------------------------------------------- left-pad, prefill
class _Batch:
    """A batch mid-generation: its KV cache, the last logits, the attention mask over the cache
    and each row's next position id (positions count real tokens only)."""

    def __init__(self, cache, logits, mask, next_pos):
        self.cache, self.logits, self.mask, self.next_pos = cache, logits, mask, next_pos


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving each row at least one token."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _left_pad(rows: list[list[int]], pad: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids.to(dev), mask.to(dev)


def _prefill(model, rows: list[list[int]], pad: int) -> _Batch:
    """One forward over the prompts; a prefix shared by every row is computed once.

    Cache layout per row: ``[shared prefix][left padding][rest of the prompt]``; padding is masked
    and position ids count real tokens, so each row sees exactly its own prompt.
    """
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    p = common_prefix(rows) if len(rows) > 1 else 0
    cache = DynamicCache()
    if p > 0:
        model(input_ids=torch.tensor([rows[0][:p]], device=dev), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(len(rows))
    ids, smask = _left_pad([r[p:] for r in rows], pad, dev)
    mask = torch.cat([torch.ones((len(rows), p), dtype=torch.long, device=dev), smask], dim=1)
    pos = (p + smask.cumsum(-1) - 1).clamp(min=p)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]  # lm-head on the last position only
    return _Batch(cache, logits, mask, pos[:, -1:] + 1)


def _score(model, st: _Batch, comps: list[list[int]], pad: int) -> np.ndarray:
    """Bits of each completion given the cached prompt; crops the cache back to the prompt."""
    dev = st.mask.device
    C = max((len(c) for c in comps), default=0)
    if C == 0:
        return np.zeros(len(comps))
    ids = torch.full((len(comps), C), pad, dtype=torch.long)
    cmask = torch.zeros((len(comps), C), dtype=torch.long)
    for r, c in enumerate(comps):
        ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[r, :len(c)] = 1
    ids, cmask = ids.to(dev), cmask.to(dev)
    logits = st.logits[:, None]
    if C > 1:
        feed_pos = st.next_pos + torch.arange(C - 1, device=dev)[None]
        more = model(input_ids=ids[:, :-1], attention_mask=torch.cat([st.mask, cmask[:, :-1]], dim=1),
                     position_ids=feed_pos, past_key_values=st.cache, use_cache=True).logits
        logits = torch.cat([logits, more], dim=1)
        st.cache.crop(-(C - 1))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0].double().cpu()
    return (-logp / math.log(2.0) * cmask.cpu()).sum(-1).numpy()


# ------------------------------------------------------------------------------------------ decode
class _Stopper:
    """Per-row stop test: EOS, or a stop string in the decoded tail of the new tokens."""

    def __init__(self, tokenizer, stops: list[str], eos: int | None):
        self.tokenizer, self.stops, self.eos = tokenizer, stops, eos
        self.tail = max((len(_ids(tokenizer, s)) for s in stops), default=0) + 2

    def push(self, gen: list[int], t: int) -> bool:
        """Append ``t`` to ``gen`` unless it is EOS; True when the row is done."""
        if self.eos is not None and t == self.eos:
            return True
        gen.append(t)
        return bool(self.stops) and any(s in self.tokenizer.decode(gen[-self.tail:]) for s in self.stops)


def _decode(model, st: _Batch, stopper: _Stopper, max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens per row. Rows that are done leave the batch (their cache rows are dropped), so
    every step runs on live rows only."""
    gen: list[list[int]] = [[] for _ in range(st.logits.shape[0])]
    live = list(range(len(gen)))  # original row of each batch row
    for step in range(max_new_tokens):
        nxt = st.logits.argmax(-1).tolist()
        keep = [k for k, (r, t) in enumerate(zip(live, nxt)) if not stopper.push(gen[r], t)]
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            _select(st, keep)
            live, nxt = [live[k] for k in keep], [nxt[k] for k in keep]
        dev = st.mask.device
        st.mask = torch.cat([st.mask, torch.ones((len(live), 1), dtype=torch.long, device=dev)], dim=1)
        st.logits = model(input_ids=torch.tensor(nxt, device=dev)[:, None], attention_mask=st.mask,
                          position_ids=st.next_pos, past_key_values=st.cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]
        st.next_pos = st.next_pos + 1
    return gen


def _select(st: _Batch, keep: list[int]) -> None:
    """Keep batch rows ``keep`` of the cache, mask and positions."""
    sel = torch.tensor(keep, device=st.mask.device)
    st.cache.batch_select_indices(sel)
    st.mask, st.next_pos = st.mask[sel], st.next_pos[sel]
