"""Token-weighted SFT losses: CE, TALR (Algorithm 1), DFT and hard-threshold clipping.

Every loss is   L = sum_t  s_b(t) * w_t * ell_t  /  N ,   ell_t = -log p_theta(x_t | x_<t)   (nats)

where t runs over the supervised tokens of the batch (label != -100 after the causal shift),
w_t is a *stop-gradient* token weight, s_b(t) an optional static weight of the sequence b that
holds t (FLOW, `sft.weighting`), and N = ``num_items_in_batch`` (the number of supervised tokens
of the whole accumulated, all-process batch; the micro-batch's own count when None). Dividing a
sum by the global N is what makes k accumulated micro-batches, or k processes, equal one batch
of k times the size.

Token weights (all computed from ell.detach(), so no gradient flows through them) are the
records of `sft.methods` (``Method.token_weight``, the same function the forecast calls):

=========  ==============================================  =============================
method     w_t                                             source
=========  ==============================================  =============================
ce         1
talr       max(exp(-ell_t / tau), w_min),  w_min = 0.01    Algorithm 1, Appendix D.2
dft        p_t = exp(-ell_t)                               DFT (TALR with tau = 1, no floor)
clip       1[p_t > threshold], threshold = 0.2             Figure 3(c)
=========  ==============================================  =============================

(flow, l2, kl and lora use CE's weights; a registered method brings its own.)

TALR's temperature tau is, unless fixed by the caller, the median over sequences of the mean
token loss of each sequence (Appendix D.2). *Which* sequences is the tau scope:

* ``"micro"`` -- the sequences of the micro-batch one process sees (no extra cost; what these
  functions do when no ``tau`` is given);
* ``"step"`` -- all sequences of the optimizer step, over every accumulation micro-batch and
  every process. The trainer computes this before the step with a no-grad pre-pass
  (`sequence_mean_losses` on each micro-batch, gathered, `talr_tau`), and passes ``tau=`` to
  the loss. This makes TALR with accumulation / several processes equal one large batch.

The paper says "the median of the average sequence loss within a batch" with a global batch of
16 on 16-32 GPUs, so its per-device batch may have held a single sequence; the scope is
therefore ambiguous there and left as an option. For an even number of sequences the median is
the mean of the two middle values (``torch.quantile(., 0.5)``), not torch.median's lower one.

Two forms compute the same numbers:

* from logits ``[B, T, V]`` -- ``ce_loss``, ``talr_loss``, ``dft_loss``, ``clipped_loss``
  (plain functions, HF convention: labels aligned with input_ids, shifted inside);
* from final hidden states ``[B, T, H]`` and the lm-head weight ``[V, H]`` -- ``chunked_loss``:
  only supervised positions are projected, ``chunk_size`` rows at a time, and the backward pass
  recomputes each chunk's logits (`ChunkedTargetNLL`), so a ``[tokens x V]`` tensor never exists;
  peak extra memory is O(chunk_size * V) instead of O(B * T * V). Values and gradients equal the
  logits form to float rounding (tested to 1e-6 in float64).

Per-step token statistics (`token_stats`) come back when ``return_stats=True``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

IGNORE_INDEX = -100
from .config import CLIP_THRESHOLD, HARD_P, METHOD_NAMES, W_MIN  # noqa: E402,F401  (defaults, torch-free)
from .methods import get_method  # noqa: E402
_MIN_TAU = 1e-12


# ----------------------------------------------------------------------------------------------
# token selection and per-token negative log-likelihoods
# ----------------------------------------------------------------------------------------------
def shift_and_select(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal shift of HF-convention labels ``[B, T]``.

    Returns ``(mask [B, T-1] bool, targets [N], seq_index [N])``: position j of a row predicts
    ``labels[:, j + 1]``; ``mask`` marks supervised predictions; targets and the row index of each
    supervised prediction follow in row-major order.
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    targets = shifted[mask]
    seq_index = torch.nonzero(mask, as_tuple=True)[0]
    return mask, targets, seq_index


def token_nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ell_t for every supervised token from full logits; returns ``(nll [N], seq_index [N])``.

    Half-precision logits are upcast to float32 (as HF's ForCausalLMLoss does).
    """
    mask, targets, seq_index = shift_and_select(labels)
    sel = logits[:, :-1][mask]
    if sel.dtype in (torch.float16, torch.bfloat16):
        sel = sel.float()
    logp = torch.log_softmax(sel, dim=-1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return nll, seq_index


class ChunkedTargetNLL(torch.autograd.Function):
    """ell = logsumexp(h W^T + b) - (h W^T + b)[target], one ``chunk_size``-row chunk at a time.

    Forward keeps only the per-row log-normaliser (N floats). Backward recomputes each chunk's
    logits and forms dl/dlogits = g * (softmax - onehot) in place, so the memory held at any time
    is one ``[chunk_size, V]`` block (plus its softmax, in place). Logits of half-precision inputs
    are formed in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # noqa: D102
        n = hidden.shape[0]
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        nll = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(hidden[s:e], weight, bias, acc)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            nll[s:e] = lse[s:e] - z.gather(1, targets[s:e, None]).squeeze(1)
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.acc = acc
        return nll

    @staticmethod
    def backward(ctx, grad_nll):  # noqa: D102
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        n, cs, acc = hidden.shape[0], ctx.chunk_size, ctx.acc
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        rows = torch.arange(min(cs, n), device=hidden.device)
        for s in range(0, n, cs):
            e = min(s + cs, n)
            gn = grad_nll[s:e, None].to(acc)
            g = _chunk_logits(hidden[s:e], weight, bias, acc)
            g.sub_(lse[s:e, None]).exp_()  # softmax
            g[rows[: e - s], targets[s:e]] -= 1.0  # d ell / d logits, unscaled
            gw = g.to(weight.dtype)
            # the per-row upstream gradient scales the [rows, H] factors, not the [rows, V] block
            if need_h:
                grad_h[s:e] = ((gw @ weight).to(acc) * gn).to(hidden.dtype)
            if need_w:
                grad_w += (gw.t() @ (hidden[s:e].to(acc) * gn).to(weight.dtype)).to(acc)
            if need_b:
                grad_b += (g * gn).sum(0)
            del g, gw
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    return z.to(acc) if z.dtype != acc else z


def default_chunk_size(vocab_size: int, budget_elems: int = 1 << 25) -> int:
    """Rows per chunk so one ``[rows, V]`` float block holds about ``budget_elems`` (128 MiB fp32)."""
    return max(16, budget_elems // max(1, vocab_size))


def token_nll_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ell_t for every supervised token from final hidden states ``[B, T, H]``, chunked.

    Only the N supervised positions are projected onto the vocabulary (prompt and padding rows
    never reach the lm-head). Returns ``(nll [N], seq_index [N])``, like `token_nll_from_logits`.
    """
    mask, targets, seq_index = shift_and_select(labels)
    h = hidden[:, :-1][mask]
    cs = chunk_size or default_chunk_size(lm_head_weight.shape[0])
    if h.shape[0] == 0:
        return h.sum(-1) * 0.0, seq_index  # keeps the graph; empty
    nll = ChunkedTargetNLL.apply(h, lm_head_weight, lm_head_bias, targets, cs)
    return nll, seq_index


# ----------------------------------------------------------------------------------------------
# weights, tau, reduction
# ----------------------------------------------------------------------------------------------
def sequence_mean_losses(nll: torch.Tensor, seq_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean token loss of each sequence that has at least one supervised token ([B'] <= B)."""
    nll = nll.detach()
    sums = torch.zeros(batch_size, dtype=nll.dtype, device=nll.device).index_add_(0, seq_index, nll)
    counts = torch.bincount(seq_index, minlength=batch_size).to(nll.dtype)
    keep = counts > 0
    return sums[keep] / counts[keep]


def talr_tau(seq_means: torch.Tensor) -> torch.Tensor:
    """tau = median of per-sequence mean token losses (Appendix D.2); mean of the middle pair."""
    if seq_means.numel() == 0:
        return torch.tensor(1.0, dtype=torch.float64)
    return torch.quantile(seq_means.detach().to(torch.float64), 0.5).clamp_min(_MIN_TAU)


def token_weights(
    method: str,
    nll: torch.Tensor,
    seq_index: torch.Tensor,
    batch_size: int,
    *,
    tau: float | torch.Tensor | None = None,
    w_min: float = W_MIN,
    threshold: float = CLIP_THRESHOLD,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stop-gradient token weights of ``method`` (its `sft.methods` record) and the tau used
    (methods with a temperature, e.g. TALR; else None). ``options``: a registered method's own
    weight options (default: its record's)."""
    m = get_method(method)
    unknown = set(options) - {p.arg for p in m.params if p.arg}
    if unknown:
        raise TypeError(f"method {method!r}: unknown weight options {sorted(unknown)}")
    ell = nll.detach()
    if not m.tau:
        return m.token_weight(ell, w_min=w_min, threshold=threshold, **options), None
    if tau is None:
        tau = talr_tau(sequence_mean_losses(ell, seq_index, batch_size))
    tau_t = torch.as_tensor(tau, dtype=ell.dtype, device=ell.device).clamp_min(_MIN_TAU)
    return m.token_weight(ell, tau=tau_t, w_min=w_min, threshold=threshold, **options), tau_t


def weighted_sum(
    nll: torch.Tensor,
    weights: torch.Tensor,
    seq_index: torch.Tensor,
    *,
    sequence_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_t s_b(t) * w_t * ell_t  (weights and sequence weights carry no gradient)."""
    w = weights.detach()
    if sequence_weights is not None:
        w = w * sequence_weights.detach().to(w.dtype)[seq_index]
    return (w * nll).sum()


def reduce(total: torch.Tensor, n_tokens: int, num_items_in_batch) -> torch.Tensor:
    """sum / num_items_in_batch, or sum / (micro-batch token count) when None."""
    denom = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
    if torch.is_tensor(denom):
        denom = denom.to(total.device, total.dtype)
    return total / denom


def token_stats(
    nll: torch.Tensor,
    weights: torch.Tensor,
    tau: torch.Tensor | float | None = None,
    *,
    hard_p: float = HARD_P,
    w_min: float | None = None,
) -> dict[str, float]:
    """Summary of one step's supervised tokens.

    Keys: n_tokens, tau (NaN when the method has none), mean_nll, w_q{0,10,25,50,75,90,100},
    frac_p_gt_0.2 (Figure 3c), median_p (the median token probability), frac_hard (p < hard_p: the hard set S), frac_floor (weights at
    w_min; TALR only).
    """
    ell = nll.detach().to(torch.float64)
    w = weights.detach().to(torch.float64)
    n = int(ell.numel())
    out: dict[str, float] = {"n_tokens": n, "tau": float(tau) if tau is not None else math.nan}
    if n == 0:
        return out
    p = torch.exp(-ell)
    out["mean_nll"] = float(ell.mean())
    qs = torch.quantile(w, torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64))
    for name, q in zip(("w_q0", "w_q10", "w_q25", "w_q50", "w_q75", "w_q90", "w_q100"), qs.tolist()):
        out[name] = q
    out["w_mean"] = float(w.mean())
    out["frac_p_gt_0.2"] = float((p > 0.2).to(torch.float64).mean())
    out["median_p"] = float(torch.quantile(p, 0.5))
    out["frac_hard"] = float((p < hard_p).to(torch.float64).mean())
    if w_min is not None:
        out["frac_floor"] = float((w <= w_min).to(torch.float64).mean())
    return out


# ----------------------------------------------------------------------------------------------
# public losses
# ----------------------------------------------------------------------------------------------
def _finish(method, nll, seq_index, batch_size, num_items_in_batch, return_stats, sequence_weights,
            tau=None, w_min=W_MIN, threshold=CLIP_THRESHOLD, hard_p=HARD_P, **options):
    w, tau_used = token_weights(method, nll, seq_index, batch_size, tau=tau, w_min=w_min, threshold=threshold,
                                **options)
    loss = reduce(weighted_sum(nll, w, seq_index, sequence_weights=sequence_weights), nll.numel(), num_items_in_batch)
    if not return_stats:
        return loss
    stats = token_stats(nll, w, tau_used, hard_p=hard_p, w_min=w_min if has_floor(method) else None)
    return loss, stats


def has_floor(method: str) -> bool:
    """The method's weights have the floor ``w_min`` (its statistics report ``frac_floor``)."""
    return any(p.arg == "w_min" for p in get_method(method).params)


def sft_loss(
    method: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch=None,
    sequence_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    **options,
):
    """Loss ``method`` (a token-weighted loss of `sft.methods`: "ce", "talr", "dft", "clip", ...)
    from full logits ``[B, T, V]``.

    options: ``tau`` (TALR; None = micro-batch median), ``w_min`` (TALR floor, 0.01),
    ``threshold`` (clip, 0.2), ``hard_p`` (statistics, 0.1), a registered method's own.
    """
    nll, seq_index = token_nll_from_logits(logits, labels)
    return _finish(method, nll, seq_index, labels.shape[0], num_items_in_batch, return_stats,
                   sequence_weights, **options)


def chunked_loss(
    method: str,
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch=None,
    sequence_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **options,
):
    """Same as `sft_loss` from final hidden states ``[B, T, H]`` and the lm-head ``[V, H]``,
    never materialising ``[tokens x V]`` logits (see `ChunkedTargetNLL`)."""
    nll, seq_index = token_nll_from_hidden(hidden, lm_head_weight, labels, lm_head_bias=lm_head_bias,
                                           chunk_size=chunk_size)
    return _finish(method, nll, seq_index, labels.shape[0], num_items_in_batch, return_stats,
                   sequence_weights, **options)


def ce_loss(logits, labels, *, num_items_in_batch=None, **options):
    """Cross entropy, sum / num_items_in_batch."""
    return sft_loss("ce", logits, labels, num_items_in_batch=num_items_in_batch, **options)


def talr_loss(logits, labels, *, num_items_in_batch=None, **options):
    """TALR (Algorithm 1): w = max(sg(exp(-ell/tau)), w_min); ``tau=None`` = micro-batch median."""
    return sft_loss("talr", logits, labels, num_items_in_batch=num_items_in_batch, **options)


def dft_loss(logits, labels, *, num_items_in_batch=None, **options):
    """DFT: w = sg(p); with every target at p = 1/2 it equals CE / 2."""
    return sft_loss("dft", logits, labels, num_items_in_batch=num_items_in_batch, **options)


def clipped_loss(logits, labels, *, num_items_in_batch=None, **options):
    """Only tokens with p > ``threshold`` (0.2) contribute (Figure 3c)."""
    return sft_loss("clip", logits, labels, num_items_in_batch=num_items_in_batch, **options)


LOSSES: dict[str, Callable] = {"ce": ce_loss, "talr": talr_loss, "dft": dft_loss, "clip": clipped_loss}


def compute_loss_func(method: str = "talr", **options) -> Callable:
    """A drop-in ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for
    ``transformers.Trainer(compute_loss_func=...)`` and TRL's ``SFTTrainer(compute_loss_func=...)``.

    ``method`` is a token-weighted loss of `sft.methods` (``ce | talr | dft | clip``, `sft_loss`); ``options`` as in `sft_loss`
    (``tau``, ``w_min``, ``threshold``). Labels follow the HF convention (unshifted, -100 on
    ignored tokens); the loss is ``sum_t w_t ell_t / num_items_in_batch`` like the Trainer's own,
    from full logits (`sft.trainer` uses the chunked form of the same loss). Example::

        from transformers import Trainer
        from sft.losses import compute_loss_func
        Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=compute_loss_func("talr"))
    """
    if not get_method(method).is_loss:
        raise ValueError(f"method {method!r}: expected one of {METHOD_NAMES} (a token-weighted loss alone)")

    def loss_func(outputs, labels, num_items_in_batch=None):
        return sft_loss(method, outputs.logits, labels, num_items_in_batch=num_items_in_batch, **options)

    loss_func.__name__ = f"{method}_compute_loss_func"
    return loss_func
