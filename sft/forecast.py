"""Forecast a fine-tuning grid before training: each (method, learning rate)'s general
degradation dL(P1) and domain gain, from gradients at theta0, a replay of the optimiser and
one short probe.

Model (what is theory, what is fit):

1. **dL(P1) by the per-prefix decomposition (theory, exact for the predicted step).** For an
   update q -> q' with log-shift s_u = log q'_u - log q_u at every prefix u of D1,
   dL(P1) = -sum_u P1(u) (E_{p1_u} - E_{q_u})[s_u] + sum_u P1(u) KL(q_u || q'_u)
   (Proposition 3.1 node by node). It is evaluated on the prefixes of a sample of D1 at the
   predicted parameters theta0 + d_theta (one forward pass over the sample per configuration:
   s_u is the model's exact shift for the predicted step, no linearisation of log q in theta);
   on the sample's empirical tree the two terms sum to the mean of log q0(z) - log q'(z).

2. **The step d_theta (theory: the optimiser, replayed on frozen gradients).** Each method's
   mini-batch gradients of the domain loss are computed once at theta0 (``n_batches`` batches
   of B sequences, with the method's stop-gradient token weights: CE 1, TALR max(p^{1/tau},
   w_min) with tau = the batch median of per-sequence mean losses, DFT p, FLOW's sequence
   weights exp(-loss0/tau)), split into two token groups (hard: p0 < 0.2; easy). AdamW (beta =
   0.9, 0.999, eps 1e-8; the trainer's cosine schedule without warm-up; global-norm clipping at
   1) is then replayed for T steps in parameter space, one of these batches per step. What
   depends on where the parameters are is done exactly: L2's pull 2 l2 (theta - theta0) joins
   every step's gradient; LoRA is replayed on its own factors (Delta W = s B A, B = 0 and peft's
   kaiming-uniform A at the start, dL/dB = s G A^T, dL/dA = s B^T G with G the frozen weight
   gradient), so its restricted bilinear subspace and slow start come out of the replay.
   Gradients shrink as the domain is learned: each group's gradient is scaled by
   phi(ell) / phi(ell0), phi = w(p) (1 - p), p = exp(-ell) (the size of a token's logit gradient
   times the method's weight). Adam's second moment keeps the early, large gradients, so the
   steps shrink with them. The replay needs no model passes.

   *Rotation (measured on the probe of 3).* The real gradient does not only shrink, it turns:
   on the probe, its cosine with the frozen mean gradient at theta0 decays with the distance
   travelled, close to exp(-Lambda_t / lam_c) with Lambda_t = sum_{s<t} eta_t (Adam moves every
   coordinate by about eta per step), while its norm falls much more slowly. A frozen replay can
   only carry the part along its frozen direction, so (methods without an L2 pull) each group
   is scaled by phi at its *tracked* loss (the realised loss of 3: the gradient's size) times
   exp(-Lambda_t / lam_c) (the part still along the frozen direction); lam_c is fitted on the
   probe's 12 cosines (no extra passes). The previous rule, phi at the first-order loss
   ell = ell0 + g . d_theta, declared the hard tokens learned within a few steps and stopped
   CE's, L2's and FLOW's replays too early (CE@3e-4: 1.85 bits forecast vs 3.43 measured); the
   rotation rule ranks the methods at a rate better on both validation worlds (spearman_within_lr
   0.42 -> 0.67 and 0.55 -> 0.69, `experiments/bench/forecast_ablation.py`). L2 keeps the
   first-order rule: its pull is balanced in the real run by the whole (rotated) gradient, which
   the frozen replay lacks, so with the rotation rule the pull erases the displacement (L2@3e-3:
   0.08 bits forecast vs 4.6 measured). LoRA's replay keeps the first-order rule too.

3. **The domain gain (fit: one CE probe shared by the grid).** Theory gives the first-order
   loss change of each group for a step, not how fast the realised loss approaches its floor.
   A tracker lets each group's mean loss fall as d ell = -kappa (ell / ell0)^2 x (the first-order
   effect of the part of the step that the group's own gradient makes; no spill-over between
   groups). kappa (one per group) is fitted on ONE short real CE run at the grid's middle rate
   (``probe_steps`` AdamW steps, the first steps of the real schedule), matching its measured
   group losses; the forecast gain is sum_k (ell0_k - ell_k(T)) x (group-k tokens per sequence).
   The probe's dL(P1) is kept for the baselines; it does not enter the forecast of dL(P1).

Assumptions: exchangeable mini-batches whose gradients at theta0 represent the run's up to the
tracked shrinkage; a D1 sample of ``n_general`` sequences estimates dL(P1) (the tiny world's
exact dL is over P1's whole tree); the domain gain is measured on the tokens the SFT loss sees.
Known limits (docs/forecast): the displacement along the rotated directions is not replayed
(only its effect on the tracked loss), so the frozen replay cannot see that the curved real
trajectory learns the domain with a smaller displacement: L2 at large rates (whose pull
equilibrium depends on that) and every method at the largest rate are over-predicted; lam_c
comes from one probe at the grid's middle rate.

Compute is counted in forward-token passes (a backward costs two): ``compute_ratio`` = the
whole grid's forecast / one training run of one configuration (T steps of B sequences).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import losses as L
from .data import PadCollator
from .methods import forecast_methods, get_method
from .models import token_nll

LN2 = math.log(2.0)
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

__all__ = ["ForecastConfig", "Forecast", "ComputeMeter", "cosine_lrs", "method_gradients", "replay_adam", "coherence", "adam_step",
           "replay_lora", "sequence_losses", "forecast_grid", "advise"]


@dataclass
class ForecastConfig:
    """The grid to forecast and the forecast's own sizes."""

    methods: tuple = field(default_factory=forecast_methods)  # the registry's (`sft.methods`)
    lrs: tuple = (3e-5, 9.49e-5, 3e-4, 9.49e-4, 3e-3)
    steps: int = 150
    batch: int = 16
    n_batches: int = 6  # mini-batch gradients per method at theta0
    n_general: int = 128  # D1 sequences in the evaluation sample
    probe_steps: int = 12  # real CE steps of the calibration probe (the grid's middle rate)
    seed: int = 0
    l2_coeff: float = 0.01
    lora_r: int = 8
    lora_alpha: int = 16
    w_min: float = L.W_MIN
    max_grad_norm: float = 1.0
    pad_token_id: int = 0
    track: bool = True  # scale group gradients by their tracked loss (False: frozen replay)
    coherence: bool = True  # measure the gradient's rotation on the probe (False: the first-order scale)

    def __post_init__(self):
        bad = [m for m in self.methods if m not in forecast_methods()]
        if bad:
            raise ValueError(f"methods {bad}: expected a subset of {forecast_methods()}")
        if not self.lrs or any(not (0 < lr < 1) or not math.isfinite(lr) for lr in self.lrs):
            raise ValueError(f"lrs {self.lrs}: each must be in (0, 1)")
        for name in ("steps", "batch", "n_batches", "n_general", "probe_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class ComputeMeter:
    """Forward-token passes: a forward over n tokens costs n, a forward+backward 3n."""

    def __init__(self):
        self.units = 0.0

    def forward(self, n_tokens: int) -> None:
        self.units += float(n_tokens)

    def forward_backward(self, n_tokens: int) -> None:
        self.units += 3.0 * float(n_tokens)


def training_run_units(examples: Sequence[dict], steps: int, batch: int) -> float:
    """Forward-token passes of one training run: T steps x B sequences x mean length x 3."""
    mean_len = float(np.mean([len(e["input_ids"]) for e in examples]))
    return 3.0 * steps * batch * mean_len


def cosine_lrs(lr: float, steps: int) -> np.ndarray:
    """Per-step rates of the trainer's schedule (HF cosine, no warm-up): lr (1 + cos(pi t / T)) / 2."""
    t = np.arange(steps)
    return lr * 0.5 * (1.0 + np.cos(np.pi * t / steps))


# ------------------------------------------------------------------------------------ gradients
def _collate(examples, pad_token_id):
    return PadCollator(pad_token_id)(list(examples))


def sequence_losses(model: nn.Module, examples: Sequence[dict], *, pad_token_id: int, batch_size: int = 64,
                    meter: ComputeMeter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sum, mean) of each example's supervised token losses in nats under ``model`` (no grad)."""
    sums, means = [], []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(examples), batch_size):
                b = _collate(examples[s:s + batch_size], pad_token_id)
                nll, si = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"], chunked=False)
                n = b["input_ids"].shape[0]
                tot = torch.zeros(n, dtype=torch.float64).index_add_(0, si, nll.double())
                cnt = torch.bincount(si, minlength=n).double()
                sums.append(tot.numpy())
                means.append((tot / cnt.clamp_min(1)).numpy())
                if meter is not None:
                    meter.forward(int(b["attention_mask"].sum()))
    finally:
        model.train(was)
    return np.concatenate(sums), np.concatenate(means)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


HARD_GROUP_P = 0.2  # the gradients' token groups: hard (p0 < HARD_GROUP_P), easy (Figure 3c's threshold)


@dataclass
class GroupGradients:
    """A method's mini-batch gradients at theta0, split by token group.

    ``g [n_batches, K, P]``: gradient of the method's batch loss restricted to group k's tokens;
    ``ce_mean [K, P]``: gradient of group k's mean CE token loss over all batches (progress
    tracking); ``ell0 [K]``: group k's mean initial token loss (nats); ``tau``: TALR's temperature
    at theta0 (median per-sequence mean loss)."""

    g: torch.Tensor
    ce_mean: torch.Tensor
    ell0: torch.Tensor
    tau: float
    tokens_per_seq: torch.Tensor  # [K] mean supervised tokens of group k per sequence
    kappa: torch.Tensor | None = None  # [K] realised / first-order loss progress (the probe's fit; 1 = theory)
    lam_c: float = math.inf  # coherence length of the frozen direction in summed rate (the probe's fit)

    def gain_bits(self, ell: torch.Tensor) -> float:
        """Predicted drop of the domain code length per sequence (bits) at tracked losses ``ell``."""
        return float(((self.ell0 - ell) * self.tokens_per_seq).sum() / LN2)


def method_gradients(model: nn.Module, batches: Sequence[Sequence[dict]], method: str, *, pad_token_id: int,
                     flow_tau: float | None = None, w_min: float = L.W_MIN, hard_p: float = HARD_GROUP_P,
                     meter: ComputeMeter | None = None) -> GroupGradients:
    """Gradients of ``method``'s data loss at the current parameters, per batch and token group
    (easy: p0 >= ``hard_p``; hard: p0 < ``hard_p``). L2 and LoRA use CE's (their differences
    are replayed, see the module docstring); FLOW uses CE token weights and its sequence weights."""
    loss_method = {"l2": "ce", "lora": "ce", "flow": "ce"}.get(method, method)
    params = _params(model)
    P = sum(p.numel() for p in params)
    out, ce_sum = [], torch.zeros(2, P)
    ell_sum, n_tok, taus = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), []
    was = model.training
    model.train()
    try:
        for ex in batches:
            b = _collate(ex, pad_token_id)
            B = b["input_ids"].shape[0]
            nll, si = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"], chunked=False)
            w, tau = L.token_weights(loss_method, nll, si, B, w_min=w_min)
            if loss_method == "talr":
                taus.append(float(tau))
            seq_w = None
            if method == "flow":
                seq_w = torch.exp(-L.sequence_mean_losses(nll, si, B) / flow_tau)
            hard = (torch.exp(-nll.detach()) < hard_p)
            per = []
            for k, mask in enumerate((~hard, hard)):
                if not bool(mask.any()):
                    per.append(torch.zeros(P))
                    continue
                loss = L.reduce(L.weighted_sum(nll * mask, w, si, sequence_weights=seq_w), nll.numel(), None)
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                per.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                      for g, p in zip(grads, params)]))
                if loss_method == "ce" and seq_w is None:
                    ce_sum[k] += per[-1] * nll.numel()  # gradient of the group's summed loss
                else:
                    gs = torch.autograd.grad((nll * mask).sum(), params, retain_graph=True, allow_unused=True)
                    ce_sum[k] += torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                            for g, p in zip(gs, params)])
                ell_sum[k] += float(nll.detach()[mask].sum())
                n_tok[k] += float(mask.sum())
            out.append(torch.stack(per))
            if meter is not None:
                n = int(b["attention_mask"].sum())
                meter.forward(n)
                meter.units += 2.0 * n * (2 if loss_method == "ce" and seq_w is None else 4)  # backward passes
    finally:
        model.train(was)
    nt = n_tok.clamp_min(1)
    n_seq = sum(len(ex) for ex in batches)
    return GroupGradients(torch.stack(out), ce_sum / nt[:, None].float(), ell_sum / nt,
                          float(np.median(taus)) if taus else 1.0, n_tok / max(n_seq, 1))


def gradient_scale(method: str, ell: torch.Tensor, ell0: torch.Tensor, tau: float, w_min: float = L.W_MIN) -> torch.Tensor:
    """rho_k = phi(ell_k) / phi(ell0_k): how a token group's gradient has shrunk once its mean
    loss fell from ell0 to ell. The CE gradient of a token w.r.t. its logits has size 1 - p,
    p = exp(-ell); a stop-gradient weight w(p) multiplies it: phi = w(p) (1 - p) with w the
    method's token weight (`sft.methods`, the loss's own): 1 (CE, L2, LoRA, FLOW),
    max(p^{1/tau}, w_min) (TALR), p (DFT)."""
    m = get_method(method)

    def phi(e):
        e = e.clamp_min(0.0)
        p = torch.exp(-e)
        return m.token_weight(e, tau=tau, w_min=w_min) * (1.0 - p)

    return (phi(ell) / phi(ell0).clamp_min(1e-30)).clamp(0.0, 1e3)


# ------------------------------------------------------------------------------------- replays
def adam_step(state: dict, g: torch.Tensor, t: int) -> torch.Tensor:
    """AdamW's update direction m_hat / (sqrt(v_hat) + eps) at step t >= 1 (torch's formula)."""
    b1, b2 = BETAS
    state["m"].mul_(b1).add_(g, alpha=1 - b1)
    state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (state["v"] / (1 - b2**t)).sqrt_().add_(ADAM_EPS)
    return state["m"] / (1 - b1**t) / denom


def _clip(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    if max_norm <= 0:
        return g
    n = float(g.norm())
    return g * (max_norm / (n + 1e-6)) if n > max_norm else g


def coherence(lam_t: float, lam_c: float) -> float:
    """exp(-Lambda_t / lam_c): the fraction of the real gradient that still points along the
    frozen direction at theta0 after the parameters travelled Lambda_t = sum_{s<t} eta_s (Adam moves
    every coordinate by about eta per step, so the summed rate measures the distance); 1 for
    lam_c = inf."""
    return math.exp(-lam_t / lam_c) if math.isfinite(lam_c) else 1.0


TRACKER_POWER = 2.0  # hyperbolic approach to 0 (heavier tail than exponential)


def _decay(ell: torch.Tensor, drop: torch.Tensor, ell0: torch.Tensor) -> torch.Tensor:
    """One exact step of d ell = -drop (ell / ell0)^g (g = TRACKER_POWER; g = 1: exponential)."""
    e0 = ell0.clamp_min(1e-12)
    if TRACKER_POWER == 1.0:
        return ell * torch.exp(-drop / e0)
    g = TRACKER_POWER
    return e0 * ((ell / e0).clamp_min(1e-30) ** (1 - g) + (g - 1) * drop / e0) ** (1 / (1 - g))


def replay_adam(gg: GroupGradients, method: str, lrs: np.ndarray, order: np.ndarray, *, l2_coeff: float = 0.0,
                max_grad_norm: float = 1.0, w_min: float = L.W_MIN, track: bool = True,
                trajectory: bool = False):
    """AdamW replayed on the frozen gradients ``gg``: returns (theta_T - theta0, ell_T) and,
    with ``trajectory=True``, also the domain-loss tracker after every step ``[T, K]``.

    The step (theory): step t uses batch ``order[t]``'s group gradients, each group k scaled
    by rho_k(t) (``track=False`` keeps them frozen), plus L2's pull ``2 l2_coeff (theta_t - theta0)``;
    clipped to ``max_grad_norm``; applied at rate ``lrs[t]``. With a finite coherence length
    ``gg.lam_c`` (the probe's, `coherence`), rho_k(t) = `gradient_scale` at the tracked loss
    ell_k(t) (the real gradient's size) x exp(-Lambda_t / lam_c) (the part of it that still points
    along the frozen direction, Lambda_t = sum_{s<t} lrs[s]); otherwise, and always with an L2 pull,
    `gradient_scale` at the first-order loss ell_k(t) = ell0_k + g_k . (theta_t - theta0).

    The domain-loss tracker ``ell_T`` (fit): each group's loss decays exponentially,
    d ell_k = -kappa_k (ell_k / ell0_k) x the first-order effect of the part of the step that the
    group's *own* gradient makes (Adam's denominator shared; no spill-over between groups);
    kappa (the probe's) defaults to 1."""
    P = gg.g.shape[2]
    K = gg.g.shape[1]
    delta = torch.zeros(P)
    ell = gg.ell0.clone()  # first-order, drives the gradient scale
    trk = gg.ell0.clone()  # the domain-loss tracker
    kappa = torch.ones(K, dtype=torch.float64) if gg.kappa is None else gg.kappa
    state = {"m": torch.zeros(P), "v": torch.zeros(P)}
    traj = []
    rotating = track and math.isfinite(gg.lam_c) and not l2_coeff
    lam_t = 0.0
    for t, (lr, b) in enumerate(zip(lrs, order), start=1):
        if not track:
            rho = torch.ones(K, dtype=torch.float64)
        elif rotating:
            rho = gradient_scale(method, trk, gg.ell0, gg.tau, w_min) * coherence(lam_t, gg.lam_c)
        else:
            rho = gradient_scale(method, ell, gg.ell0, gg.tau, w_min)
        lam_t += float(lr)
        parts = gg.g[int(b)]
        g = rho.float() @ parts
        if l2_coeff:
            g = g + 2.0 * l2_coeff * delta
        n = float(g.norm())
        c = max_grad_norm / (n + 1e-6) if 0 < max_grad_norm < n else 1.0
        step = float(lr) * adam_step(state, g * c, t)
        if track:
            ell = (ell - (gg.ce_mean @ step).double()).clamp_min(0.0)  # theta moves by -step
        denom = (state["v"] / (1 - BETAS[1] ** t)).sqrt_().add_(ADAM_EPS)
        own = (gg.ce_mean * parts).mul_(c * float(lr)).div_(denom).sum(1).double()
        trk = _decay(trk, kappa * own.clamp_min(0.0), gg.ell0)
        delta -= step
        if trajectory:
            traj.append(trk.clone())
    return (delta, trk, torch.stack(traj)) if trajectory else (delta, trk)


def lora_layout(model: nn.Module) -> list[tuple[int, int, int, int]]:
    """(offset, out, in, index) of every 2-D weight LoRA adapts ("all-linear": every
    ``nn.Linear`` except the output head) in the flattened parameter vector."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_w = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}
    out, off = [], 0
    for i, p in enumerate(_params(model)):
        if id(p) in linear_w:
            out.append((off, p.shape[0], p.shape[1], i))
        off += p.numel()
    return out


def replay_lora(gg: GroupGradients, layout, lrs: np.ndarray, order: np.ndarray, *, r: int, alpha: int,
                seed: int = 0, max_grad_norm: float = 1.0, track: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacement of the merged weights after AdamW on LoRA factors with frozen weight
    gradients G (Delta W = s B A, s = alpha / r; B = 0, A ~ peft's kaiming-uniform at start),
    group-scaled as in `replay_adam`."""
    s = alpha / r
    gen = torch.Generator().manual_seed(seed)
    As, Bs = [], []
    for _, o, i, _ in layout:
        bound = 1.0 / math.sqrt(i)  # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
        As.append((torch.rand(r, i, generator=gen) * 2 - 1) * bound)
        Bs.append(torch.zeros(o, r))
    n = sum(a.numel() + b.numel() for a, b in zip(As, Bs))
    state = {"m": torch.zeros(n), "v": torch.zeros(n)}
    P = gg.g.shape[2]

    def merged():
        d = torch.zeros(P)
        for (off, o, i, _), A, B in zip(layout, As, Bs):
            d[off:off + o * i] = (s * B @ A).reshape(-1)
        return d

    ell = gg.ell0.clone()
    trk = gg.ell0.clone()
    kappa = torch.ones(gg.g.shape[1], dtype=torch.float64) if gg.kappa is None else gg.kappa
    prev = torch.zeros(P)
    for t, (lr, bidx) in enumerate(zip(lrs, order), start=1):
        rho = gradient_scale("lora", ell, gg.ell0, gg.tau) if track else torch.ones(gg.g.shape[1])
        gfull = rho.float() @ gg.g[int(bidx)]
        parts = []
        for (off, o, i, _), A, B in zip(layout, As, Bs):
            G = gfull[off:off + o * i].reshape(o, i)
            parts += [(s * B.t() @ G).reshape(-1), (s * G @ A.t()).reshape(-1)]
        step = float(lr) * adam_step(state, _clip(torch.cat(parts), max_grad_norm), t)
        k = 0
        for A, B in zip(As, Bs):
            A -= step[k:k + A.numel()].reshape(A.shape)
            k += A.numel()
            B -= step[k:k + B.numel()].reshape(B.shape)
            k += B.numel()
        cur = merged()
        d = cur - prev
        if track:
            ell = (ell + (gg.ce_mean @ d).double()).clamp_min(0.0)
        own = -(gg.ce_mean @ d).double()  # LoRA: the whole merged step (its groups share A, B)
        trk = _decay(trk, kappa * own.clamp_min(0.0), gg.ell0)
        prev = cur
    return cur, trk


# ---------------------------------------------------------------------------------- evaluation
class Shifted:
    """Context: the model's parameters moved by a flattened displacement, restored on exit."""

    def __init__(self, model: nn.Module, delta: torch.Tensor):
        self.model, self.delta = model, delta

    def __enter__(self):
        self.saved = [p.detach().clone() for p in _params(self.model)]
        with torch.no_grad():
            off = 0
            for p in _params(self.model):
                p.add_(self.delta[off:off + p.numel()].reshape(p.shape).to(p.dtype))
                off += p.numel()
        return self.model

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, s in zip(_params(self.model), self.saved):
                p.copy_(s)
        return False


@dataclass
class Forecast:
    """Predicted numbers of one configuration (bits per sequence)."""

    method: str
    lr: float
    dL_P1_bits: float
    domain_gain_bits: float
    frozen_dL_P1_bits: float = float("nan")  # before the probe's calibration
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "lr": self.lr, "dL_P1_bits": self.dL_P1_bits,
                "domain_gain_bits": self.domain_gain_bits, "frozen_dL_P1_bits": self.frozen_dL_P1_bits,
                **self.extras}


GAIN_TOL = 0.01  # predicted gains within 1% of the best feasible one are ties


def advise(rows: Sequence[dict], budget: float, *, gain_tol: float = GAIN_TOL, key_dl: str = "dL_P1_bits",
           key_gain: str = "domain_gain_bits") -> tuple[dict | None, dict | None]:
    """(best, runner-up) among the rows with ``key_dl <= budget``: the largest ``key_gain``,
    where gains within ``gain_tol`` x the largest count as ties broken by the smaller
    degradation; None when nothing is feasible."""
    ok = [r for r in rows if math.isfinite(r[key_dl]) and r[key_dl] <= budget and math.isfinite(r[key_gain])]
    if not ok:
        return None, None
    top = max(r[key_gain] for r in ok)
    tie = lambda r: r[key_gain] >= top - gain_tol * abs(top)  # noqa: E731
    ok.sort(key=lambda r: (not tie(r), r[key_dl] if tie(r) else -r[key_gain]))
    return ok[0], (ok[1] if len(ok) > 1 else None)


def forecast_grid(*args, **kwargs):  # defined in sft.forecast_run (keeps this file about the model)
    from .forecast_run import forecast_grid as fg

    return fg(*args, **kwargs)
