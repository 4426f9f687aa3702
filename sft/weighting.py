"""Per-token probabilities of a dataset under a model, and FLOW's static sequence weights.

FLOW (Sanyal et al., 2025; the paper's Section 4 baseline) weights every token of sequence b by

    s_b = exp(-ell0_b / tau),   ell0_b = mean token loss of b under the *initial* model,
    tau = median_b ell0_b,

computed once before training (one no-grad pass with a progress bar) and stored with the dataset
as the column ``flow_weight`` (the collator turns it into the loss's ``sequence_weights``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import PadCollator
from .io import atomic_write_json
from .models import token_nll

# sft.trainer still imports this name from here (its owner moves it to sft.io); do not use it in new code
write_json_atomic = atomic_write_json


@torch.no_grad()
def token_logprobs(model, dataset: Sequence[dict], *, batch_size: int = 8, pad_token_id: int = 0,
                   chunk_size: int | None = None, progress: bool = True, desc: str = "token log-probs") -> list[np.ndarray]:
    """log p(x_t | x_<t) (nats, float64) of every supervised token of every example, in order.

    ``model`` is put in eval mode for the pass and restored afterwards. Exponentiate for the
    probabilities of Figure 3.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = PadCollator(pad_token_id)
    out: list[np.ndarray] = []
    try:
        for s in tqdm(range(0, len(dataset), batch_size), desc=desc, disable=not progress, leave=False):
            batch = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
            nll, seq_index = token_nll(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       batch["labels"].to(device), chunk_size=chunk_size)
            nll = nll.double().cpu().numpy()
            seq_index = seq_index.cpu().numpy()
            for b in range(batch["input_ids"].shape[0]):
                out.append(-nll[seq_index == b])
    finally:
        model.train(was_training)
    return out


def flow_weights(seq_mean_losses: np.ndarray) -> tuple[np.ndarray, float]:
    """FLOW weights exp(-ell0_b / tau) with tau = median(ell0_b); returns (weights, tau)."""
    ell0 = np.asarray(seq_mean_losses, dtype=np.float64)
    tau = max(float(np.median(ell0)), 1e-12)
    return np.exp(-ell0 / tau), tau


def attach_flow_weights(model, dataset, *, batch_size: int = 8, pad_token_id: int = 0, progress: bool = True,
                        save_to: str | Path | None = None):
    """Compute FLOW weights once with ``model`` and return ``(dataset with 'flow_weight', tau)``.

    With ``save_to`` the weights are written there as JSON ({"tau", "weights"}), atomically.
    """
    lp = token_logprobs(model, dataset, batch_size=batch_size, pad_token_id=pad_token_id, progress=progress,
                        desc="FLOW initial losses")
    ell0 = np.array([-x.mean() for x in lp])
    w, tau = flow_weights(ell0)
    if save_to is not None:
        atomic_write_json(save_to, {"tau": tau, "weights": w.tolist()})
    return dataset.with_column("flow_weight", w.tolist()), tau
