"""The forecast pipeline (model in `sft.forecast`): gradients at theta0, replays, the probe,
evaluation of every configuration on the D1 sample and the D2 training examples."""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .forecast import (LN2, _collate, ComputeMeter, Forecast, ForecastConfig, Shifted, cosine_lrs, lora_layout,
                       HARD_GROUP_P, method_gradients, replay_adam, replay_lora, sequence_losses, training_run_units)

__all__ = ["SampleTree", "forecast_grid", "mean_bits", "token_groups", "probe_losses", "fit_coherence", "fit_kappa",
           "power_law_probes"]


def mean_bits(model, examples, pad_token_id, meter=None) -> float:
    """Mean over examples of the summed supervised token loss, in bits."""
    s, _ = sequence_losses(model, examples, pad_token_id=pad_token_id, meter=meter)
    return float(np.mean(s) / LN2)


def token_groups(model, examples, pad_token_id, hard_p, meter) -> list[np.ndarray]:
    """Per example, a bool array over its supervised tokens: True where p0 < ``hard_p``."""
    from .models import token_nll

    out = []
    with torch.no_grad():
        for s in range(0, len(examples), 64):
            b = _collate(examples[s:s + 64], pad_token_id)
            nll, si = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"], chunked=False)
            hard = (torch.exp(-nll) < hard_p).numpy()
            si = si.numpy()
            out += [hard[si == i] for i in range(b["input_ids"].shape[0])]
            meter.forward(int(b["attention_mask"].sum()))
    return out


def probe_losses(model0: nn.Module, examples: Sequence[dict], groups: list[np.ndarray], cfg: ForecastConfig,
                 lrs: np.ndarray, meter: ComputeMeter, return_model: bool = False,
                 direction: torch.Tensor | None = None, cosines: list | None = None):
    """Real CE AdamW steps (the trainer's optimiser, rates ``lrs``) on ``examples``; returns
    each step's batch mean loss per token group and overall ``[steps, 3]`` (before the step;
    NaN where a batch has no token of the group), and the probed model with ``return_model``.
    With ``direction`` (flattened, the trainable parameters' order), appends to ``cosines`` each
    step's cosine between the real (unclipped) gradient and it (no extra passes)."""
    from . import losses as L
    from .models import token_nll

    model = copy.deepcopy(model0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(lrs[0]), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    rng = np.random.default_rng([cfg.seed, 7])
    out = np.full((len(lrs), 3), np.nan)
    for t, lr in enumerate(lrs):
        idx = rng.choice(len(examples), cfg.batch, replace=False)
        b = _collate([examples[int(i)] for i in idx], cfg.pad_token_id)
        nll, si = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"], chunked=False)
        hard = torch.as_tensor(np.concatenate([groups[int(i)] for i in idx]))
        for k, mask in enumerate((~hard, hard)):
            if bool(mask.any()):
                out[t, k] = float(nll.detach()[mask].mean())
        out[t, 2] = float(nll.detach().mean())
        loss = L.reduce(nll.sum(), nll.numel(), None)
        for gr in opt.param_groups:
            gr["lr"] = float(lr)
        opt.zero_grad()
        loss.backward()
        if direction is not None and cosines is not None:
            g = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
            cosines.append(float(g @ direction) / max(float(g.norm() * direction.norm()), 1e-30))
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        meter.forward_backward(int(b["attention_mask"].sum()))
    return (out, model) if return_model else out


def fit_coherence(cosines: Sequence[float], lrs: np.ndarray) -> float:
    """lam_c of `sft.forecast.coherence`, exp(-Lambda_t / lam_c) with Lambda_t = sum_{s<t} eta_s, from a
    probe's cosines between its real gradient at step t and the frozen mean gradient at theta0,
    relative to step 0's (batch noise makes cos_0 < 1): least squares of log(cos_t / cos_0) on
    Lambda_t through the origin, over the steps with a positive cosine. inf (no rotation) when
    the probe shows no decay or cos_0 <= 0."""
    c = np.asarray(cosines, float)
    lam = np.concatenate([[0.0], np.cumsum(lrs)[:-1]])[: c.size]
    if c.size < 2 or not c[0] > 0:
        return math.inf
    ok = (c > 0) & (lam > 0)
    if not ok.any():
        return math.inf
    y = np.log(np.minimum(c[ok] / c[0], 1.0))
    slope = float(np.sum(lam[ok] * y) / np.sum(lam[ok] ** 2))
    return -1.0 / slope if slope < 0 else math.inf


KAPPA_GRID = np.geomspace(0.02, 5.0, 25)


def fit_kappa(gg, lrs: np.ndarray, order: np.ndarray, target: np.ndarray, tail: int = 5,
              exhaustive: bool = False) -> torch.Tensor:
    """kappa [2] so that the replayed CE probe's tracked group losses match the probe's
    (mean over the last ``tail`` steps; coordinate search on the log grid `KAPPA_GRID`, hard
    group first). The tracked loss falls as kappa_k grows, so the error |log(got / want)| is
    unimodal along the grid: a binary search for the first grid point whose tracked loss is at
    or below the target, then the better of it and its neighbour, finds the grid's argmin with
    about 6 replays instead of 25 (a replay is 6 AdamW steps over every parameter: minutes on a
    135 M-parameter model). ``exhaustive=True`` evaluates the whole grid (the reference)."""
    grid = KAPPA_GRID
    kappa = torch.ones(2, dtype=torch.float64)
    last = target[-tail:, :2]
    n = np.isfinite(last).sum(0)
    want = np.where(n > 0, np.nansum(last, axis=0) / np.maximum(n, 1), np.nan)  # NaN: group absent
    for k in (1, 0, 1):
        if not np.isfinite(want[k]):
            continue
        memo = {}

        def err(i: int) -> tuple[float, float]:
            if i not in memo:
                kappa[k] = float(grid[i])
                gg.kappa = kappa
                _, _, traj = replay_adam(gg, "ce", lrs, order, trajectory=True)
                got = float(traj[-tail:, k].mean())
                memo[i] = (abs(math.log((got + 1e-3) / (want[k] + 1e-3))), got)
            return memo[i]

        if exhaustive:
            best = int(np.argmin([err(i)[0] for i in range(len(grid))]))
        else:
            lo, hi = 0, len(grid) - 1  # first index with got <= want (hi if none)
            while lo < hi:
                mid = (lo + hi) // 2
                if err(mid)[1] <= want[k]:
                    hi = mid
                else:
                    lo = mid + 1
            cand = [i for i in (lo - 1, lo) if 0 <= i < len(grid)]
            best = min(cand, key=lambda i: (err(i)[0], i))
        kappa[k] = float(grid[best])
    gg.kappa = kappa
    return kappa


class SampleTree:
    """The D1 sample as a token tree (`theory.tree.TokenTree` with empirical masses) and the ids
    that turn it into model inputs: dL(P1) is then `theory.prefix.prefix_decomposition` of the
    model's full conditionals on its prefixes (first-order and KL terms reported)."""

    def __init__(self, tree, bos_id: int, eos_id: int):
        self.tree, self.bos_id, self.eos_id = tree, bos_id, eos_id
        leaves = tree.child_count == 0
        self.tokens = int((tree.depth[leaves] + 1).sum())  # one forward per maximal path

    def logq(self, model, meter: ComputeMeter):
        from theory.prefix import with_other

        from .treeprobs import exact_full_logprobs

        meter.forward(self.tokens)
        return with_other(exact_full_logprobs(model, self.tree, bos_id=self.bos_id, eos_id=self.eos_id))


def forecast_grid(model0: nn.Module, d2: Sequence[dict], d1: Sequence[dict], cfg: ForecastConfig, *,
                  progress: bool = True, calibrate: bool = True, d1_tree: SampleTree | None = None,
                  only: set | None = None) -> dict:
    """Forecast every (method, lr) of ``cfg``: returns {"rows": [Forecast dicts], "compute": {...},
    "probe": {...}}. ``d2``: the SFT training examples; ``d1``: general examples (labels on
    every response token); both as {"input_ids", "labels"} dicts. With ``d1_tree`` (the same
    sample as a token tree) dL(P1) comes from the per-prefix decomposition on its prefixes and
    each row also holds its first-order and KL terms. ``only``: a set of (method, lr) pairs of
    the product to forecast (the others are skipped; gradients and probe are shared anyway)."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(model0)
    meter = ComputeMeter()
    rng = np.random.default_rng(cfg.seed)
    d1 = list(d1)[: cfg.n_general]
    pad = cfg.pad_token_id
    perm = rng.permutation(len(d2))
    n_b = min(cfg.n_batches, max(1, len(d2) // cfg.batch))
    batches = [[d2[int(i)] for i in perm[k * cfg.batch:(k + 1) * cfg.batch]] for k in range(n_b)]
    grad_examples = [ex for b in batches for ex in b]
    base_d1 = mean_bits(model, d1, pad, meter)
    flow_tau = None
    if "flow" in cfg.methods:
        _, means = sequence_losses(model, grad_examples, pad_token_id=pad, meter=meter)
        flow_tau = max(float(np.median(means)), 1e-12)
    order = rng.integers(0, n_b, size=cfg.steps)
    need = {("ce" if m in ("l2", "lora") else m) for m in cfg.methods}
    pairs = [(m, lr) for m in cfg.methods for lr in cfg.lrs if only is None or (m, lr) in only]
    bar = tqdm(total=len(need) + len(pairs) + (1 if calibrate else 0), desc="forecast",
               unit="job", disable=not progress)
    grads = {}
    for m in sorted(need):
        grads[m] = method_gradients(model, batches, m, pad_token_id=pad, flow_tau=flow_tau, w_min=cfg.w_min,
                                    meter=meter)
        bar.update(1)
    layout = lora_layout(model) if "lora" in cfg.methods else None

    def replay(method, lr, steps=cfg.steps, schedule=True):
        lrs = cosine_lrs(lr, steps) if schedule else np.full(steps, lr)
        g = grads["ce" if method in ("l2", "lora") else method]
        if method == "lora":
            return replay_lora(g, layout, lrs, order[:steps], r=cfg.lora_r, alpha=cfg.lora_alpha, seed=cfg.seed,
                               max_grad_norm=cfg.max_grad_norm, track=cfg.track)
        return replay_adam(g, method, lrs, order[:steps], l2_coeff=cfg.l2_coeff if method == "l2" else 0.0,
                           max_grad_norm=cfg.max_grad_norm, w_min=cfg.w_min, track=cfg.track)

    base_lq = d1_tree.logq(model, meter) if d1_tree is not None else None

    def evaluate(delta):
        from theory.prefix import prefix_decomposition

        with Shifted(model, delta):
            if d1_tree is None:
                return mean_bits(model, d1, pad, meter) - base_d1, {}
            d = prefix_decomposition(d1_tree.tree, base_lq, d1_tree.logq(model, meter), unit="bits")
        return d.delta, {"first_order_bits": d.first_order, "kl_term_bits": d.kl_term}

    probe = {}
    if calibrate:
        lr_p = float(np.exp(np.mean(np.log(cfg.lrs))))  # the grid's geometric middle
        k_steps = min(cfg.probe_steps, cfg.steps)
        plrs = cosine_lrs(lr_p, cfg.steps)[:k_steps]  # the first steps of a real run at lr_p
        groups = token_groups(model, grad_examples, pad, HARD_GROUP_P, meter)
        cos = []
        target, pm = probe_losses(model0, grad_examples, groups, cfg, plrs, meter, return_model=True,
                                  direction=grads["ce"].g.sum(1).mean(0), cosines=cos)
        lam_c = fit_coherence(cos, plrs) if cfg.coherence else math.inf
        for gk in grads.values():
            gk.lam_c = lam_c
        probe_dl = mean_bits(pm, d1, pad, meter) - base_d1
        kappa = fit_kappa(grads["ce"], plrs, order[:k_steps], target)
        for gk in grads.values():
            gk.kappa = kappa
        probe = {"lr": lr_p, "steps": k_steps, "lrs": plrs.tolist(), "loss_nats": target.tolist(),
                 "dL_P1_bits": probe_dl, "kappa": kappa.tolist(), "cosines": cos,
                 "lambda_c": lam_c if math.isfinite(lam_c) else None}
        bar.update(1)
    rows = []
    for m, lr in pairs:
        delta, ell = replay(m, lr)
        dl, parts = evaluate(delta)
        gain = grads["ce" if m in ("l2", "lora") else m].gain_bits(ell)
        rows.append(Forecast(m, lr, dl, gain, extras={"Lambda": float(cosine_lrs(lr, cfg.steps).sum()),
                                                       "tracked_loss_nats": ell.tolist(), **parts}).to_dict())
        bar.update(1)
    bar.close()
    run_units = training_run_units(d2, cfg.steps, cfg.batch)
    return {"rows": rows, "probe": probe,
            "compute": {"forecast_units": meter.units, "training_run_units": run_units,
                        "compute_ratio": meter.units / run_units, "unit": "forward-token passes (backward = 2)"},
            "base": {"d1_bits": base_d1}}


def power_law_probes(model0: nn.Module, d2: Sequence[dict], d1: Sequence[dict], cfg: ForecastConfig,
                     n_evals: int = 4, steps: int | None = None) -> dict:
    """Baseline (c): per learning rate, a CE probe of ``steps`` real steps (default twice the
    forecast's probe; the first steps of the real schedule) with dL(P1) on the D1 sample at
    ``n_evals`` points; a power law dL = a t^b fitted (log-log least squares on the positive
    points) and read at T.
    Returns {"dL_P1_bits": [per lr], "compute_units": ...}."""
    meter = ComputeMeter()
    d1 = list(d1)[: cfg.n_general]
    pad = cfg.pad_token_id
    base = mean_bits(model0, d1, pad, meter)
    from . import losses as L
    from .models import token_nll

    preds = []
    k = min(steps or 2 * cfg.probe_steps, cfg.steps)
    at = set(np.unique(np.geomspace(max(2, k // 4), k, n_evals).round().astype(int)).tolist())
    for lr in cfg.lrs:
        model = copy.deepcopy(model0)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        rng = np.random.default_rng([cfg.seed, 11])
        plrs = cosine_lrs(lr, cfg.steps)[:k]
        ts, ds = [], []
        for t, lr_t in enumerate(plrs, start=1):
            idx = rng.choice(len(d2), cfg.batch, replace=False)
            b = _collate([d2[int(i)] for i in idx], pad)
            nll, _ = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"], chunked=False)
            for gr in opt.param_groups:
                gr["lr"] = float(lr_t)
            opt.zero_grad()
            L.reduce(nll.sum(), nll.numel(), None).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            meter.forward_backward(int(b["attention_mask"].sum()))
            if t in at:
                ts.append(t)
                ds.append(mean_bits(model, d1, pad, meter) - base)
        ts, ds = np.array(ts, float), np.array(ds, float)
        ok = ds > 0
        if ok.sum() >= 2:
            bexp, loga = np.polyfit(np.log(ts[ok]), np.log(ds[ok]), 1)
            preds.append(float(np.exp(loga) * cfg.steps ** bexp))
        else:
            preds.append(float(ds[-1]))
    run_units = training_run_units(d2, cfg.steps, cfg.batch)
    return {"dL_P1_bits": preds, "compute_units": meter.units, "compute_ratio": meter.units / run_units}
