"""Regularisers added to the SFT loss: L2 to the initial weights, KL to a frozen reference.

Both are baselines of the paper (Section 4, Appendix C.4). Their value is added to the data loss
of each optimizer step exactly once: the trainer adds ``penalty / k`` to each of the k
micro-batches of a step (and every process adds the same L2 term, which DDP averages), so the
gradient of a step is grad(data loss) + grad(penalty) whatever the accumulation or world size.
"""
from __future__ import annotations

import torch
from torch import nn

from .methods import KL_COEFF, L2_COEFF  # noqa: E402,F401  (defaults of the records, torch-free)


class L2ToInit:
    """coeff * sum_i ||theta_i - theta0_i||^2 over the trainable parameters (theta0 snapshot at init)."""

    def __init__(self, model: nn.Module, coeff: float = L2_COEFF):
        self.coeff = float(coeff)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = None
        for n in self.names:
            d = (params[n] - self.theta0[n].to(params[n].device)).pow(2).sum()
            total = d if total is None else total + d
        return self.coeff * total

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.theta0


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) on tokens drawn from the data.

    r = ref_logp - logp;  k3 = exp(r) - r - 1 >= 0  (Schulman's k3, as in DeepSeek-R1's GRPO).
    ``ref_logp`` carries no gradient. Both in nats.
    """
    r = ref_logp.detach() - logp
    return torch.exp(r) - r - 1.0


class KLToReference:
    """coeff * sum_t k3(t) / N over the supervised tokens, with a frozen reference model.

    ``ref_model`` is the initial model (a frozen copy, eval mode, no grad). The trainer calls
    `ref_nll` on each micro-batch to get the reference's token losses at the same positions.
    """

    def __init__(self, ref_model: nn.Module, coeff: float = KL_COEFF):
        self.coeff = float(coeff)
        self.ref_model = ref_model.eval()
        for p in self.ref_model.parameters():
            p.requires_grad_(False)

    def penalty(self, nll: torch.Tensor, ref_nll: torch.Tensor, num_items) -> torch.Tensor:
        total = k3_kl(-nll, -ref_nll).sum()
        denom = num_items if num_items is not None else max(nll.numel(), 1)
        if torch.is_tensor(denom):
            denom = denom.to(total.device, total.dtype)
        return self.coeff * total / denom
