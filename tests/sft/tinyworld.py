"""Helpers shared by the SFT tests and their subprocess scripts (no pytest import here)."""
from __future__ import annotations

import torch

from sft.data import parse_row, tokenize_rows
from sft.models import byte_tokenizer, load_model

VOCAB = 260  # byte tokenizer: 256 bytes + 4 specials


def make_model(dtype=torch.float64, seed=0, hidden=32):
    return load_model(f"tiny:vocab={VOCAB},hidden={hidden},intermediate=64,heads=4,max_pos=256", dtype=dtype,
                      seed=seed)


def make_dataset(tok=None, n=16):
    """n prompt/completion rows of varied lengths (so padding and per-sequence means differ)."""
    tok = tok or byte_tokenizer()
    rows = [parse_row({"prompt": f"Q{i}: add {i} and {3 * i % 7}" + " ." * (i % 4),
                       "completion": f"{i + 3 * i % 7}" + " ok" * (i % 3)}) for i in range(n)]
    return tokenize_rows(tok, rows)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_param_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)
