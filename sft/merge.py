"""WiSE-FT (Wortsman et al., 2022): theta_alpha = (1 - alpha) * theta_0 + alpha * theta_ft.

alpha = 0 gives the initial model, alpha = 1 the fine-tuned one. A post-hoc method, not a training
one: its record is `sft.methods.POST_HOC["wise_ft"]`. Floating tensors are
interpolated; integer buffers (and any tensor equal in both) are copied from theta_ft.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn


def interpolate_state_dicts(theta_0: dict[str, torch.Tensor], theta_ft: dict[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * theta_0 + alpha * theta_ft, key by key (the key sets must match)."""
    if set(theta_0) != set(theta_ft):
        missing = sorted(set(theta_0) ^ set(theta_ft))[:5]
        raise KeyError(f"state dicts differ in keys, e.g. {missing}")
    out = {}
    for k, t1 in theta_ft.items():
        t0 = theta_0[k].to(t1.device)
        if t1.is_floating_point():
            out[k] = torch.lerp(t0.to(t1.dtype), t1, float(alpha))
        else:
            out[k] = t1.clone()
    return out


def wise_ft(model_0: nn.Module, model_ft: nn.Module, alphas: Iterable[float]) -> Iterator[tuple[float, nn.Module]]:
    """Yield ``(alpha, model)`` for each alpha; each model is a fresh copy of ``model_ft``.

    For a LoRA model, merge it first (``peft_model.merge_and_unload()``) so both share keys.
    """
    sd0 = {k: v.detach() for k, v in model_0.state_dict().items()}
    sd1 = {k: v.detach() for k, v in model_ft.state_dict().items()}
    for a in alphas:
        m = copy.deepcopy(model_ft)
        m.load_state_dict(interpolate_state_dicts(sd0, sd1, a))
        yield float(a), m


def save_wise_ft(model_0: nn.Module, model_ft: nn.Module, alphas: Iterable[float], out_dir: str | Path,
                 tokenizer=None) -> list[Path]:
    """Save one HF folder ``out_dir/alpha_{a:.2f}`` per alpha; returns the folders."""
    folders = []
    for a, m in wise_ft(model_0, model_ft, alphas):
        folder = Path(out_dir) / f"alpha_{a:.2f}"
        m.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders
