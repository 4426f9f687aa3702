"""Batched greedy generation with a KV cache: the one generator of talr's evaluations.

``greedy_generate(model, tokenizer, prompts, stop=..., max_new_tokens=...)`` encodes each prompt
without special tokens, keeps its last ``max_length - max_new_tokens`` tokens (as lm-eval's HFLM
does), sorts prompts by length (less padding) and cuts them into batches. Per batch, by stage:

* prefill (:func:`_prefill`; :meth:`_StaticLlama.start` on the static path below): the token
  prefix every prompt of the batch shares (a chat template's system turn and instructions: 76 of
  238 tokens on the MedCalc prompts) runs once and its cache is repeated over the rows; the rest of
  each prompt is left-padded and run in one forward (static path: in buckets of rows of similar
  length, :func:`length_buckets`, each padded to its own longest). Cache
  layout per row: ``[shared prefix][padding][rest]``; padding is masked and position ids count real
  tokens only, so a row sees the same positions as its prompt alone;
* decode (:func:`_decode`): one forward per new token over the last token only. A row stops at
  EOS or at the first stop string in its decoded tail; a stopped row leaves the batch (its cache
  rows are dropped), so later steps run on live rows only. The batch ends when no row is live or
  after ``max_new_tokens``. For a plain HF Llama with sdpa attention (SmolLM2) the steps run on a
  preallocated KV cache over the model's own modules with q/k/v and gate/up fused into one matmul
  each, on weights prepacked for oneDNN (:class:`_StaticLlama`, :class:`_Proj`: no per-step copy of
  the cache; logits equal HF's up to float rounding); any other model steps through its own forward
  and ``DynamicCache`` (:class:`_HFSteps`);
* cut (:func:`_cut`): one string per prompt, in input order, cut at the first stop string (kept
  when ``keep_stop=True``, dropped otherwise) and at EOS (never kept).

``generate_and_score(..., completions)`` also codes a given completion per prompt on the same
prompt cache (one prefill serves both the code length and the generation): the completion's
tokens are fed after the prompt, their log-probabilities summed in bits (float64), and the cache
is back to the prompt before decoding. Equal to ``sft.eval.codelength.corpus_code_length_bits``
in conditional mode without BOS, at half the prompt cost. The static path feeds completions in
chunks of columns on the rows whose completion reaches each chunk (not every row padded to the
longest) and computes the lm-head on at most ``_StaticLlama.HEAD_TOKENS`` positions at a time.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..models import inference, lm_head_of, unwrap

__all__ = ["greedy_generate", "generate_and_score", "context_limit", "length_buckets"]


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
    fused = _Fused()  # the static path's fused weights, shared by the batches of this call
    with inference(model, len(prompts), desc=desc, unit="prompt", progress=progress) as advance:
        for idx in (order[k:k + batch_size] for k in range(0, len(order), batch_size)):
            comps = None if comp is None else [comp[i] for i in idx]
            steps, logits = _start(model, [encoded[i] for i in idx], pad, max_new_tokens, comps, fused)
            if comps is not None:
                bits[idx] = steps.score(logits, comps)
            for i, g in zip(idx, _decode(steps, logits, stopper, max_new_tokens)):
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


def _pad_right(comps: list[list[int]], pad: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the completions right-padded to the longest."""
    C = max(len(c) for c in comps)
    ids = torch.full((len(comps), C), pad, dtype=torch.long)
    cmask = torch.zeros((len(comps), C), dtype=torch.long)
    for r, c in enumerate(comps):
        ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[r, :len(c)] = 1
    return ids.to(dev), cmask.to(dev)


def _logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids) under ``logits`` (float32 softmax, float64 out)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0].double()


def _bits(logp: torch.Tensor, cmask: torch.Tensor) -> np.ndarray:
    """Each row's code length in bits: -sum log2 p over its completion tokens."""
    return (-logp.cpu() / math.log(2.0) * cmask.cpu()).sum(-1).numpy()


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


def _start(model, rows: list[list[int]], pad: int, max_new_tokens: int, comps: list[list[int]] | None,
           fused=None):
    """(decoder, the prompts' last logits) of a batch after its prefill: :class:`_StaticLlama` and
    its own prefill for a plain HF Llama with sdpa attention, else :func:`_prefill` and
    :class:`_HFSteps`."""
    room = max(max_new_tokens - 1, max((len(c) for c in comps or ()), default=0) - 1, 1)
    static = _StaticLlama.start(model, rows, pad, room, fused)
    if static is not None:
        return static
    st = _prefill(model, rows, pad)
    return _HFSteps(model, st, pad), st.logits


def length_buckets(lens: list[int], cost: int) -> list[tuple[int, int]]:
    """Rows sorted by decreasing length cut into consecutive buckets ``(start, stop)`` minimising
    the tokens computed, each bucket padded to its longest row, plus ``cost`` tokens per bucket
    (a forward's fixed cost): dynamic programming over the cut points."""
    n = len(lens)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * lens[i] + cost
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def _decode(steps, logits: torch.Tensor, stopper: _Stopper, max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens per row from the prompt's last ``logits``. Rows that are done leave the batch,
    so every step runs on live rows only."""
    gen: list[list[int]] = [[] for _ in range(logits.shape[0])]
    live = list(range(len(gen)))  # original row of each batch row
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).tolist()
        keep = [k for k, (r, t) in enumerate(zip(live, nxt)) if not stopper.push(gen[r], t)]
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            order = steps.select(keep)
            live, nxt = [live[k] for k in order], [nxt[k] for k in order]
        logits = steps.step(nxt)
    return gen


class _HFSteps:
    """Scoring and decode steps by the model's own forward over its ``DynamicCache`` (any causal LM)."""

    def __init__(self, model, st: _Batch, pad: int):
        self.model, self.cache, self.mask, self.next_pos, self.pad = model, st.cache, st.mask, st.next_pos, pad

    def score(self, logits0: torch.Tensor, comps: list[list[int]]) -> np.ndarray:
        """Bits of each completion given the cached prompt (``logits0``: the prompt's last logits);
        the cache is cropped back to the prompt."""
        if max((len(c) for c in comps), default=0) == 0:
            return np.zeros(len(comps))
        ids, cmask = _pad_right(comps, self.pad, self.mask.device)
        C = ids.shape[1]
        logits = logits0[:, None]
        if C > 1:
            feed_pos = self.next_pos + torch.arange(C - 1, device=ids.device)[None]
            more = self.model(input_ids=ids[:, :-1], attention_mask=torch.cat([self.mask, cmask[:, :-1]], dim=1),
                              position_ids=feed_pos, past_key_values=self.cache, use_cache=True).logits
            logits = torch.cat([logits, more], dim=1)
            self.cache.crop(-(C - 1))
        return _bits(_logp(logits, ids), cmask)

    def select(self, keep: list[int]) -> list[int]:
        """Keep batch rows ``keep`` (in that order) of the cache, mask and positions."""
        sel = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(sel)
        self.mask, self.next_pos = self.mask[sel], self.next_pos[sel]
        return keep

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Logits of the next token of each row after feeding it ``tokens``."""
        dev = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones((len(tokens), 1), dtype=torch.long, device=dev)], dim=1)
        logits = self.model(input_ids=torch.tensor(tokens, device=dev)[:, None], attention_mask=self.mask,
                            position_ids=self.next_pos, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        self.next_pos = self.next_pos + 1
        return logits


def _mm(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as ``weight @ x^T``: the weight streams through once in its own
    row-major order (faster than ``F.linear`` for a few rows on CPU without oneDNN; equal up to
    float rounding, a different summation order)."""
    y = torch.matmul(weight, x.reshape(-1, x.shape[-1]).T).T.contiguous()  # sdpa's fast kernel needs it
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], -1)


def _onednn(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``weight`` reordered into oneDNN's blocked layout for ``rows``-row inputs (a copy), or None
    where oneDNN cannot take it (not a float32 CPU tensor, a build without oneDNN)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    except (AttributeError, RuntimeError):
        return None


class _Proj:
    """Linears that read the same input (q/k/v, gate/up), applied as ONE matmul over their
    concatenated weight, split after.

    Plain ``nn.Linear`` layers only: their weights (and biases) are concatenated once and, for
    float32 on CPU, reordered into oneDNN's blocked layout (``_reorder_linear_weight``, as
    torch.compile's weight freezing does). Measured on 2 cores (SmolLM2-135M, a batch-8 decode
    step against ``weight @ x^T`` per linear, ``experiments/bench/generation.py --steps``): 106 ->
    68 ms with 1 thread (under load), 62 -> 43 ms with 2 (nearly quiet); oneDNN's kernel is also
    ~15-25% faster than ``F.linear`` at prefill sizes, and the fusion alone ~7% over oneDNN per
    linear. Memory: one copy of the fused weights while the
    generator runs (SmolLM2: 30 x 3.5M + 28M lm-head parameters, ~540 MB in float32). Outputs
    equal ``F.linear`` up to float rounding (another summation order, ~1e-6 relative). Any other
    layer (LoRA, quantised) is called as it is, one by one.
    """

    def __init__(self, linears, rows: int):
        self.linears = list(linears)
        self.sizes = [getattr(lin, "out_features", 0) for lin in self.linears]
        self.weight = self.bias = self.packed = None
        if all(type(lin) is torch.nn.Linear for lin in self.linears):
            ws = [lin.weight for lin in self.linears]
            self.weight = torch.cat(ws) if len(ws) > 1 else ws[0]
            if any(lin.bias is not None for lin in self.linears):
                self.bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                                       for lin in self.linears])
            self.packed = _onednn(self.weight, rows)
            if self.packed is not None:
                self.weight = None  # the packed copy replaces the concatenated one

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each linear's output on ``x``, in order."""
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        elif self.weight is not None:
            y = _mm(self.weight, self.bias, x)
        else:
            return tuple(lin(x) for lin in self.linears)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)


class _Fused:
    """The fused projections of a Llama's layers and its lm-head (:class:`_Proj`), built once per
    :func:`generate_and_score` call on the first batch the static path takes, shared by its batches."""

    def __init__(self):
        self.base, self.layers, self.head = None, None, None

    def of(self, base, layers, rows: int) -> "_Fused":
        if self.base is not base:
            self.base = base
            self.layers = [(_Proj([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj], rows),
                            _Proj([la.self_attn.o_proj], rows), _Proj([la.mlp.gate_proj, la.mlp.up_proj], rows),
                            _Proj([la.mlp.down_proj], rows)) for la in layers]
            self.head = _Proj([base.lm_head], rows)
        return self


class _StaticLlama:
    """Scoring and decode steps of a plain HF Llama over its own modules, with a preallocated KV cache.

    HF's ``DynamicCache`` concatenates every layer's keys and values at each step (copying the
    whole cache: O(T^2) over a generation). Here each layer has buffers ``[B, kv_heads, T_max, d]``
    filled from the prefill's cache; decode step ``t`` writes column ``t`` in place and attends over
    the view ``[:n, :, :t+1]``.

    Invariants: live rows are the buffer rows ``[0, n)`` (a row that leaves is overwritten by a live
    row from the tail, :meth:`select`); columns ``[0, t)`` hold every live row's keys and values;
    ``attend[r, c]`` is False exactly on row ``r``'s left padding; ``pos[r]`` is row ``r``'s next
    position id (real tokens before it). Columns from ``t`` on are scratch: :meth:`score` writes the
    completions there and decoding overwrites them (no crop).

    A decode step calls the model's own modules (embedding, rotary, RMSNorm, activation) with the
    shapes HF's forward uses, its projections and lm-head fused per input (:class:`_Proj`: q/k/v
    one matmul, gate/up one), and ``scaled_dot_product_attention`` as HF's sdpa
    attention does at one query token: without a mask and with ``enable_gqa`` when no live row is
    padded, else with the boolean padding mask and the queries packed as ``[n, kv_heads, group, d]``
    (no key/value heads repeated). Its logits equal :class:`_HFSteps`' up to float rounding (the
    fused matmuls sum in another order: ~1e-6 relative; tests/eval/test_generate.py).
    :meth:`score` feeds the completions in chunks of columns, each on the rows whose completion
    reaches it (not every row padded to the longest). The prefill (:meth:`start`) runs on the same
    modules, the prompts' rests in buckets of similar length.
    """

    CHUNK = 64  # completion tokens per scoring forward
    BUCKET_COST = 32  # tokens a prefill bucket's extra forward is worth (:func:`length_buckets`)
    HEAD_TOKENS = 512  # positions per lm-head call in scoring (bounds the logits' memory)

    @staticmethod
    def plain(model):
        """(the HF model, its decoder layers) of a plain sdpa Llama, else None."""
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

        base = unwrap(model)
        if type(base) is not LlamaForCausalLM or lm_head_of(model) is None:
            return None
        layers = base.model.layers[:base.config.num_hidden_layers]
        if (getattr(base.config, "_attn_implementation", None) != "sdpa"
                or any(type(la) is not LlamaDecoderLayer or type(la.self_attn) is not LlamaAttention
                       or type(la.mlp) is not LlamaMLP
                       for la in layers)):
            return None
        return base, layers

    @classmethod
    def start(cls, model, rows: list[list[int]], pad: int, room: int,
              fused: _Fused | None = None) -> "tuple[_StaticLlama, torch.Tensor] | None":
        """(the static decoder of prompts ``rows`` after its prefill, their last logits), with
        ``room`` columns after the longest prompt; None when ``model`` is not a plain sdpa Llama.
        ``fused``: the call's fused projections (built here on first use; a fresh set when None)."""
        plain = cls.plain(model)
        if plain is None:
            return None
        base, layers = plain
        p = common_prefix(rows) if len(rows) > 1 else 0
        T = max(len(r) for r in rows) + room
        self = cls(base, layers, len(rows), T, pad, (fused or _Fused()).of(base, layers, len(rows)))
        return self, self._fill(rows, p)

    def __init__(self, base, layers, B: int, T: int, pad: int, fused: _Fused):
        self.base, self.layers, self.pad, self.fused = base, layers, pad, fused
        emb, a = base.model.embed_tokens.weight, layers[0].self_attn
        shape = (B, base.config.num_key_value_heads, T, a.head_dim)
        self.k = [emb.new_empty(shape) for _ in layers]
        self.v = [emb.new_empty(shape) for _ in layers]
        self.attend = torch.ones((B, T), dtype=torch.bool, device=emb.device)
        self.pos = torch.zeros((B, 1), dtype=torch.long, device=emb.device)
        self.n, self.t, self.padded = B, 0, False

    def _fill(self, rows: list[list[int]], p: int) -> torch.Tensor:
        """Prefill, cache layout ``[shared prefix][left padding][rest]`` (as :func:`_prefill`): the
        ``p`` prefix tokens run once (row 0, copied to the other rows), the rests in buckets of rows
        of similar length (:func:`length_buckets`), each right-aligned at the last prompt column, so a
        short row is padded only to its bucket's longest (the CoT evaluation's 52 prompts, rests of
        165-224 tokens: 4 buckets, prefill 34.6 -> 25.5 s on 1 thread under load, logits equal).
        Returns the prompts' last logits."""
        dev, rest = self.pos.device, [r[p:] for r in rows]
        W = max(len(x) for x in rest)
        if p:
            self._forward(slice(0, 1), torch.tensor([rows[0][:p]], device=dev), 0, torch.arange(p, device=dev)[None])
            for buf in self.k + self.v:
                buf[1:, :, :p] = buf[:1, :, :p]
        for r, x in enumerate(rest):
            self.attend[r, p:p + W - len(x)] = False
        order = sorted(range(len(rest)), key=lambda r: -len(rest[r]))
        last = self.base.model.embed_tokens.weight.new_empty((len(rows), self.base.config.hidden_size))
        for b0, b1 in length_buckets([len(rest[r]) for r in order], self.BUCKET_COST):
            idx = order[b0:b1]
            contiguous = idx == list(range(idx[0], idx[-1] + 1))  # the usual case: rows come sorted
            sel = slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=dev)
            ids, smask = _left_pad([rest[r] for r in idx], self.pad, dev)
            c0 = p + W - ids.shape[1]
            for buf in self.k + self.v:  # padding left of the bucket: masked, but 0 * NaN garbage would be NaN
                buf[sel, :, p:c0] = 0.0
            last[idx] = self._forward(sel, ids, c0, (p + smask.cumsum(-1) - 1).clamp(min=p))[:, -1]
        self.t = p + W
        self.pos[:, 0] = torch.tensor([p + len(x) for x in rest], device=dev)
        self.padded = not bool(self.attend[:, :self.t].all())
        return self.fused.head(last)[0]

    # ----------------------------------------------------------------------------------- decode
    def select(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep``: rows of ``keep`` beyond the new count move into the holes left below
        it (one row copied per leaver, not the whole cache). Returns the old row of each new row."""
        n, kept = len(keep), set(keep)
        order = list(range(n))
        holes = [j for j in range(n) if j not in kept]
        movers = [s for s in keep if s >= n]
        for j, s in zip(holes, movers):
            order[j] = s
        if holes:
            dst, src = (torch.tensor(x, device=self.pos.device) for x in (holes, movers))
            for buf in self.k + self.v:
                buf[dst, :, :self.t] = buf[src, :, :self.t]
            self.attend[dst], self.pos[dst] = self.attend[src], self.pos[src]
        self.n = n
        self.padded = not bool(self.attend[:n, :self.t].all())
        return order

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Logits of the next token of each live row after feeding it ``tokens`` (one per row)."""
        n, t, inner = self.n, self.t, self.base.model
        h = inner.embed_tokens(torch.tensor(tokens, device=self.pos.device)[:, None])
        cos_sin = inner.rotary_emb(h, position_ids=self.pos[:n])
        mask = self.attend[:n, None, None, :t + 1] if self.padded else None
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self._qkv(i, h, cos_sin)
            self.k[i][:n, :, t:t + 1], self.v[i][:n, :, t:t + 1] = k, v
            kw = dict(dropout_p=0.0, scale=a.scaling, is_causal=False)
            if a.num_key_value_groups > 1 and mask is None:
                kw["enable_gqa"] = True
            elif a.num_key_value_groups > 1:  # pack the group's queries: [n, kv_heads, group, d]
                q = q.reshape(n, q.shape[1] // a.num_key_value_groups, a.num_key_value_groups, a.head_dim)
            o = torch.nn.functional.scaled_dot_product_attention(q, self.k[i][:n, :, :t + 1],
                                                                 self.v[i][:n, :, :t + 1], attn_mask=mask, **kw)
            h = self._out(i, h, o.reshape(n, -1, 1, a.head_dim))
        self.t += 1
        self.pos[:n] += 1
        return self.fused.head(inner.norm(h)[:, -1])[0]

    def _qkv(self, i: int, h: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values ``[rows, heads, len, d]`` of layer ``i`` on ``h``, rotated
        (LlamaAttention; q/k/v as one fused projection)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer = self.layers[i]
        shape = (*h.shape[:2], -1, layer.self_attn.head_dim)
        q, k, v = (y.reshape(shape).transpose(1, 2) for y in self.fused.layers[i][0](layer.input_layernorm(h)))
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        return q, k, v

    def _out(self, i: int, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The rest of decoder layer ``i`` after attention output ``o`` ``[rows, heads, len, d]``
        (LlamaMLP: down(act(gate(x)) * up(x)); gate/up as one fused projection)."""
        _, o_proj, gate_up, down = self.fused.layers[i]
        o = o.transpose(1, 2).reshape(*h.shape[:2], -1)
        h = h + o_proj(o)[0]
        layer = self.layers[i]
        g, u = gate_up(layer.post_attention_layernorm(h))
        return h + down(layer.mlp.act_fn(g) * u)[0]

    # ---------------------------------------------------------------------------------- scoring
    def score(self, logits0: torch.Tensor, comps: list[list[int]]) -> np.ndarray:
        """Bits of each completion given the prompt (``logits0``: the prompt's last logits).

        Completion token ``j`` is predicted at column ``t + j - 1``; tokens are fed in chunks of
        :attr:`CHUNK` columns, each chunk on the rows whose completion reaches into it."""
        if max((len(c) for c in comps), default=0) == 0:
            return np.zeros(len(comps))
        ids, cmask = _pad_right(comps, self.pad, self.pos.device)
        lens = cmask.sum(-1)
        logp = torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
        logp[:, 0] = _logp(logits0, ids[:, 0])
        for a in range(0, ids.shape[1] - 1, self.CHUNK):
            m = min(self.CHUNK, ids.shape[1] - 1 - a)
            rows = torch.nonzero(lens - 1 > a)[:, 0]
            sub = None if len(rows) == self.n else rows
            h = self._chunk(sub, ids[rows, a:a + m], a)
            for r0 in range(0, len(rows), max(1, self.HEAD_TOKENS // m)):
                r1 = r0 + max(1, self.HEAD_TOKENS // m)
                logp[rows[r0:r1], a + 1:a + 1 + m] = _logp(self.fused.head(h[r0:r1])[0],
                                                           ids[rows[r0:r1], a + 1:a + 1 + m])
        return _bits(logp, cmask)

    def _chunk(self, rows: torch.Tensor | None, ids: torch.Tensor, a: int) -> torch.Tensor:
        """Final hidden states of completion positions ``[a, a + m)`` of ``rows`` (None: all live
        rows), their keys and values written to columns ``[t + a, t + a + m)``."""
        sel = slice(0, ids.shape[0]) if rows is None else rows
        pos = self.pos[sel] + a + torch.arange(ids.shape[1], device=ids.device)[None]
        return self._forward(sel, ids, self.t + a, pos)

    def _forward(self, rows, ids: torch.Tensor, c0: int, pos: torch.Tensor) -> torch.Tensor:
        """Final hidden states of tokens ``ids`` ``[r, m]`` of buffer ``rows`` (a slice or an index
        tensor) at columns ``[c0, c0 + m)`` with position ids ``pos``; their keys and values are
        written there. A token attends to the attended columns before it and to itself (a padding
        token, masked for every other, then never attends to nothing)."""
        inner, m = self.base.model, ids.shape[1]
        cols = torch.arange(c0 + m, device=ids.device)[None]
        here = c0 + torch.arange(m, device=ids.device)[:, None]
        mask = (self.attend[rows, :c0 + m][:, None, None, :] & (cols <= here)) | (cols == here)
        h = inner.embed_tokens(ids)
        cos_sin = inner.rotary_emb(h, position_ids=pos)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, h, cos_sin)
            K, V = self.k[i], self.v[i]
            K[rows, :, c0:c0 + m], V[rows, :, c0:c0 + m] = k, v
            o = torch.nn.functional.scaled_dot_product_attention(
                q, K[rows, :, :c0 + m], V[rows, :, :c0 + m], attn_mask=mask, dropout_p=0.0,
                scale=layer.self_attn.scaling, enable_gqa=layer.self_attn.num_key_value_groups > 1)
            h = self._out(i, h, o)
        return inner.norm(h)
