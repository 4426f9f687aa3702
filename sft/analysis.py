"""Token-level analysis of SFT data under a model (Figure 3 of arXiv 2509.20758).

``token_probs`` gives, for every example of a dataset, the model's probability of each
supervised target token, ``p_t = q(y_t | y_<t, x)`` (labels != -100, HF convention: position
``t`` of the labels is predicted from the inputs before it). Examples are sorted by length,
right-padded in batches and run through `sft.models.token_nll` (chunked lm-head: full-vocabulary
logits never exist for the whole batch), then returned in the dataset's order.

Summaries pool all target tokens of a dataset: the *hard-token fraction* is the share with
``p < threshold`` (the set S of Section 4.3), ``frac_above(probs, 0.2)`` the share with
``p > 0.2`` (Figure 3c's curriculum curve, one value per epoch). Figures: a heatmap of one
example's tokens coloured by probability (3a), box plots across models or checkpoints (3b) and
the curriculum fraction per epoch (3c).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .data import IGNORE_INDEX, PadCollator
from .losses import HARD_P
from .models import inference, token_nll
from .plotting import pyplot, save_png

__all__ = ["token_probs", "hard_token_fraction", "frac_above", "summary", "heatmap_png", "boxplot_png",
           "curriculum_png", "target_tokens"]


def _pad_id(tokenizer, pad_token_id):
    if pad_token_id is not None:
        return int(pad_token_id)
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return 0


def length_batches(lengths: np.ndarray, batch_size: int, max_pad: float = 0.1) -> list[np.ndarray]:
    """Longest-first batches of at most ``batch_size`` examples whose padding adds at most
    ``max_pad`` of their real tokens (on a CPU the transformer's cost is linear in padded
    tokens, so padding is pure waste; only the lm-head work is saved by batching)."""
    order = np.argsort(-lengths, kind="stable")
    batches, cur, real = [], [], 0
    for i in order:
        L = int(lengths[i])
        if cur and (len(cur) == batch_size or (len(cur) + 1) * int(lengths[cur[0]]) > (1 + max_pad) * (real + L)):
            batches.append(np.array(cur))
            cur, real = [], 0
        cur.append(int(i))
        real += L
    if cur:
        batches.append(np.array(cur))
    return batches


@torch.no_grad()
def token_probs(model: nn.Module, tokenizer, dataset: Sequence[dict], batch_size: int = 8, *,
                pad_token_id: int | None = None, progress: bool = True, desc: str = "token probs") -> list[np.ndarray]:
    """Per-example arrays of target-token probabilities (float64, one entry per supervised token).

    ``dataset``: examples ``{"input_ids", "labels"}`` (an `sft.data.SFTDataset` or a list);
    ``tokenizer`` only supplies the pad id (``None``: ``pad_token_id`` or 0). Batched by length
    (:func:`length_batches`); the lm-head runs only on supervised positions, in chunks.
    """
    n = len(dataset)
    lengths = np.array([len(dataset[i]["input_ids"]) for i in range(n)])
    batches = length_batches(lengths, batch_size)  # longest first: a memory problem shows at once
    collate = PadCollator(_pad_id(tokenizer, pad_token_id))
    dev = next(model.parameters()).device
    out: list[np.ndarray] = [np.zeros(0)] * n
    with inference(model, n, desc=desc, unit="ex", progress=progress) as advance:
        for idx in batches:
            batch = collate([dataset[int(i)] for i in idx])
            labels = batch["labels"].to(dev)
            # PadCollator pads on the right and attention is causal, so real tokens never attend to
            # pads: no mask is needed, and without one SDPA takes its causal fast path (a padding
            # mask made the batched pass slower than a per-example loop on SmolLM2).
            nll, seq = token_nll(model, batch["input_ids"].to(dev), None, labels)
            p = torch.exp(-nll.double()).cpu().numpy()
            counts = np.bincount(seq.cpu().numpy(), minlength=len(idx))
            for i, part in zip(idx, np.split(p, np.cumsum(counts)[:-1])):
                out[int(i)] = part
            advance(len(idx))
    return out


def target_tokens(example: dict) -> list[int]:
    """The supervised target ids of an example, aligned with its ``token_probs`` entry."""
    return [int(t) for t in example["labels"][1:] if t != IGNORE_INDEX]


def _pool(probs) -> np.ndarray:
    if isinstance(probs, np.ndarray):
        return probs.ravel()
    probs = list(probs)
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in probs]) if probs else np.zeros(0)


def hard_token_fraction(probs, threshold: float = HARD_P) -> float:
    """Share of all target tokens (pooled over examples) with ``p < threshold``."""
    p = _pool(probs)
    return float(np.mean(p < threshold)) if p.size else float("nan")


def frac_above(probs, threshold: float = 0.2) -> float:
    """Share of all target tokens (pooled over examples) with ``p > threshold`` (Figure 3c)."""
    p = _pool(probs)
    return float(np.mean(p > threshold)) if p.size else float("nan")


def summary(probs, hard_threshold: float = HARD_P) -> dict:
    """Pooled statistics: token count, mean, median, quartiles, hard fraction, fraction > 0.2,
    and the mean per-example code length in bits (sum of -log2 p over an example's targets)."""
    p = _pool(probs)
    per_ex = [float(-np.log2(np.maximum(np.asarray(x), 1e-300)).sum()) for x in probs] if not isinstance(
        probs, np.ndarray) else []
    if not p.size:
        return {"n_tokens": 0}
    q = np.quantile(p, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"n_examples": len(per_ex), "n_tokens": int(p.size), "mean_p": float(p.mean()), "median_p": float(q[2]),
            "p10": float(q[0]), "p25": float(q[1]), "p75": float(q[3]), "p90": float(q[4]),
            "hard_threshold": hard_threshold, "hard_fraction": hard_token_fraction(p, hard_threshold),
            "frac_above_0.2": frac_above(p, 0.2),
            "mean_code_length_bits": float(np.mean(per_ex)) if per_ex else float("nan")}


# ----------------------------------------------------------------------------------------------
# figures (matplotlib, Agg; every function writes one PNG and returns its path)
# ----------------------------------------------------------------------------------------------
def heatmap_png(tokens: Sequence[str], probs, path, *, per_row: int = 16, title: str | None = None) -> Path:
    """One example's target tokens as a grid of cells coloured by probability (Figure 3a)."""
    plt = pyplot()
    probs = np.asarray(probs, dtype=np.float64)
    if len(tokens) != probs.size:
        raise ValueError(f"heatmap: {len(tokens)} tokens but {probs.size} probabilities")
    n = max(probs.size, 1)
    rows = (n + per_row - 1) // per_row
    grid = np.full((rows, per_row), np.nan)
    grid.ravel()[:probs.size] = probs
    fig, ax = plt.subplots(figsize=(per_row * 0.75, rows * 0.45 + 0.8))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for k, tok in enumerate(tokens):
        r, c = divmod(k, per_row)
        text = str(tok).replace("\n", "\\n")
        ax.text(c, r, text[:8], ha="center", va="center", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.03, label="p(target token)")
    ax.set_title(title or "target-token probabilities")
    return save_png(fig, path, dpi=120)


def boxplot_png(probs_by_name: Mapping[str, object], path, *, hard_threshold: float | None = HARD_P,
                title: str | None = None) -> Path:
    """Box plots of pooled target-token probabilities, one box per model / checkpoint (Figure 3b)."""
    plt = pyplot()
    names = list(probs_by_name)
    data = [_pool(probs_by_name[k]) for k in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
    for i, d in enumerate(data, start=1):
        if d.size:
            ax.annotate(f"median {np.median(d):.2f}", (i, np.median(d)), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    if hard_threshold is not None:
        ax.axhline(hard_threshold, ls="--", lw=0.8, color="gray", label=f"hard: p < {hard_threshold}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("p(target token)")
    ax.set_title(title or "target-token probabilities")
    return save_png(fig, path, dpi=120)


def curriculum_png(fractions_per_epoch, path, *, threshold: float = 0.2, title: str | None = None) -> Path:
    """Fraction of target tokens with ``p > threshold`` per epoch (Figure 3c). Accepts one
    sequence of fractions or ``{name: sequence}``."""
    plt = pyplot()
    series = fractions_per_epoch if isinstance(fractions_per_epoch, Mapping) else {"": fractions_per_epoch}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, fr in series.items():
        fr = np.asarray(fr, dtype=np.float64)
        ax.plot(np.arange(fr.size), fr, marker="o", label=name or None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"fraction of tokens with p > {threshold}")
    ax.set_ylim(0, 1.02)
    if any(series):
        ax.legend(fontsize=8)
    ax.set_title(title or "curriculum: easy-token fraction")
    return save_png(fig, path, dpi=120)
