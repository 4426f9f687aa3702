"""The forecast pipeline (model in `sft.forecast`): gradients at theta0, replays, the probe,
evaluation of every configuration on the D1 sample and the D2 training examples."""
from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .io import release_free_memory
from .methods import get_method
from .models import model_device
from .forecast import (HARD_GROUP_P, HOST, LN2, WALK_BATCHES, ComputeMeter, Forecast, ForecastConfig, GradientMoments,
                       Shifted, adam_directions, cosine_lrs, diffusion_dl, eval_batches, gradient_scale,
                       l2_energy_scale, l2_relaxation, lora_diffusion_factor, lora_layout, method_gradients,
                       method_step_grad, method_walk_factor, micro_batches, padded_batch, random_walk, replay_adam,
                       replay_lora, sequence_losses, split_dl, squared_norm, training_run_units, walk_step)

__all__ = ["SampleTree", "ForecastGrid", "forecast_grid", "probe_batches", "mean_bits", "token_groups", "probe_losses",
           "fit_coherence", "fit_kappa", "power_law_probes", "replay_flops", "Spill"]


class Spill:
    """Holds the forecast's N-sized state on disk while a phase does not read it (`forecast_grid`'s
    ``spill``): the moments while a configuration's predicted model is evaluated (D1 and any
    ``extra_eval``) and while a probe trains its copy of the model (the covariances; the size probe also
    the mean), and the CE direction while another method's gradients are taken. Each tensor is written
    with `torch.save` into a fresh folder under ``folder`` and read back whole on the way out, so the
    forecast is bit-identical with and without it; the folder is removed by :meth:`close`. Memory:
    `sft.forecast.forecast_memory_bytes`' ``spill_peak``. Cost: the bytes moved written and read back
    through the page cache (``bytes`` counts one way, ``seconds`` both)."""

    def __init__(self, folder=None):
        self.dir = None if folder is None else Path(tempfile.mkdtemp(prefix="talr-spill-", dir=folder))
        self.count, self.bytes, self.seconds, self.away_bytes = 0, 0, 0.0, 0

    @contextmanager
    def away(self, obj, *names):
        """``obj``'s tensor attributes ``names`` on disk (set to None) for the block; nothing when off or
        ``obj`` is None. The caller holds no other reference to them (else their memory stays, though the
        result is the same)."""
        if self.dir is None or obj is None:
            yield
            return
        t0, paths = time.perf_counter(), {}
        for name in names:
            t = getattr(obj, name)
            if t is None:
                continue
            path = self.dir / f"{self.count}-{name}.pt"
            self.count += 1
            torch.save(t, path)
            paths[name] = (path, t.numel() * t.element_size())
            setattr(obj, name, None)
            del t
        moved = sum(b for _, b in paths.values())
        self.bytes, self.away_bytes = self.bytes + moved, self.away_bytes + moved
        release_free_memory()
        self.seconds += time.perf_counter() - t0
        try:
            yield
        finally:
            t0 = time.perf_counter()
            for name, (path, _) in paths.items():
                setattr(obj, name, torch.load(path, weights_only=True))
                path.unlink()
            self.away_bytes -= moved
            self.seconds += time.perf_counter() - t0

    def close(self) -> dict:
        """Remove the folder; {"spilled_gb": one way, "spill_seconds"} (empty when off)."""
        if self.dir is None:
            return {}
        shutil.rmtree(self.dir, ignore_errors=True)
        return {"spilled_gb": self.bytes / 1e9, "spill_seconds": self.seconds}


class _Held:
    """One tensor under a name, for `Spill.away` (the CE direction shared between methods)."""

    def __init__(self, t):
        self.t = t


def mean_bits(model, examples, pad_token_id, meter=None) -> float:
    """Mean over examples of the summed supervised token loss, in bits."""
    s, _ = sequence_losses(model, examples, pad_token_id=pad_token_id, meter=meter)
    return float(np.mean(s) / LN2)


KL_TOP = 256  # outcomes of q0 kept per position by `SampleKL` (the rest lumped into one)


def coded_log_probs(model, examples, pad_token_id, meter=None, batch_size: int = 4):
    """Per batch of ``examples``, the model's log-conditionals ``[n_coded, V]`` (float32, on the host) at the
    positions whose next token is supervised, in row-major order (the lm-head on those rows only)."""
    from .losses import shift_and_select
    from .models import final_hidden, lm_head_of

    for b in eval_batches(model, examples, pad_token_id, batch_size, meter):
        mask = shift_and_select(b["labels"])[0]
        head = lm_head_of(model)
        if head is not None:
            h = final_hidden(model, b["input_ids"], b["attention_mask"])[:, :-1][mask]
            logits = torch.nn.functional.linear(h, head.weight, head.bias)
        else:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           use_cache=False).logits[:, :-1][mask]
        yield torch.log_softmax(logits.float(), dim=-1).to(HOST)


class SampleKL:
    """sum_u KL(q0_u || q_u) over the supervised positions u of a D1 sample, per sequence, in bits: the
    decomposition's KL term (Proposition 3.1) on the sample's empirical tree, for a model whose tree is
    not built (a real LLM's D1 sample; the tiny world's `SampleTree` gives it exactly). Each conditional
    is coarsened to q0's ``top`` likeliest outcomes at u plus one lumped rest, which can only lower a KL
    (data processing), so this is a lower bound of the full-vocabulary term; q0's part is kept from
    construction (``top`` + 1 numbers a position), q's computed per call. Non-negative and quadratic in a
    small step, with none of the first-order term's sampling noise (`sft.forecast`, 1.)."""

    def __init__(self, model, examples, pad_token_id: int, meter=None, top: int = KL_TOP):
        if int(top) < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        self.examples, self.pad, self.n = examples, pad_token_id, len(examples)
        self.ref = []
        for lp in coded_log_probs(model, examples, pad_token_id, meter):
            v, i = lp.topk(min(int(top), lp.shape[1]), dim=1)
            v = v.double()
            self.ref.append((i, v, _log_rest(v)))

    def __call__(self, model, meter=None) -> float:
        tot = 0.0
        for (i, v, rest), lp in zip(self.ref, coded_log_probs(model, self.examples, self.pad, meter)):
            w = lp.gather(1, i).double()
            kl = (v.exp() * (v - w)).sum(1) + rest.exp() * (rest - _log_rest(w))
            tot += float(kl.sum())
        return tot / max(self.n, 1) / LN2


def _log_rest(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_j exp(logp_j)) per row (float64), floored at log 1e-30 where the kept outcomes hold all."""
    return torch.log((-torch.expm1(torch.logsumexp(logp, dim=1))).clamp_min(1e-30))


def token_groups(model, examples, pad_token_id, hard_p, meter) -> list[np.ndarray]:
    """Per example, a bool array over its supervised tokens: True where p0 < ``hard_p``."""
    from .models import token_nll

    out = []
    with torch.no_grad():
        for s in range(0, len(examples), 16):
            b = padded_batch(examples[s:s + 16], pad_token_id, model_device(model))
            nll, si = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
            hard = (torch.exp(-nll) < hard_p).to(HOST).numpy()
            si = si.to(HOST).numpy()
            out += [hard[si == i] for i in range(b["input_ids"].shape[0])]
            meter.forward(int(b["attention_mask"].sum()))
    return out


def _cosine(params, direction: torch.Tensor) -> float:
    """cos(grad, direction) parameter by parameter (no flattened copy of either): ``direction`` is
    ``[N]`` or ``[K, N]`` (its rows summed), in the trainable parameters' order; on the host, one parameter's
    gradient moved there at a time."""
    d2 = direction if direction.dim() == 2 else direction[None]
    dot = gg = dd = 0.0
    off = 0
    for p in params:
        n = p.numel()
        d = d2[:, off:off + n].float().sum(0)
        if p.grad is not None:
            g = p.grad.reshape(-1).to(HOST, torch.float32)
            dot, gg = dot + float(g @ d), gg + float(g @ g)
        dd += float(d @ d)
        off += n
    return dot / max(math.sqrt(gg * dd), 1e-30)


def probe_losses(model0: nn.Module, examples: Sequence[dict], groups: list[np.ndarray], cfg: ForecastConfig,
                 lrs: np.ndarray, meter: ComputeMeter, return_model: bool = False,
                 direction: torch.Tensor | None = None, cosines: list | None = None, on_step=None):
    """Real CE AdamW steps (the trainer's optimiser, rates ``lrs``) on ``examples``; returns
    each step's batch mean loss per token group and overall ``[steps, 3]`` (before the step;
    NaN where a batch has no token of the group), and the probed model with ``return_model``.
    With ``direction`` (``[N]`` or ``[K, N]`` summed over K, the trainable parameters' order),
    appends to ``cosines`` each step's cosine between the real (unclipped) gradient and it (no
    extra passes). ``on_step(model, t)`` is called after each step t = 1..len(lrs). A step's
    batch runs in micro-batches of ``cfg.micro_batch`` rows (0: at once), its gradient summed
    over them (the CE batch loss is a sum of token losses over the batch's token count: exact)."""
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
        b = padded_batch([examples[int(i)] for i in idx], cfg.pad_token_id, model_device(model))
        hard = np.concatenate([groups[int(i)] for i in idx])
        n_b = len(hard)  # the batch's supervised tokens
        sums, cnt, at = np.zeros(3), np.zeros(3), 0
        opt.zero_grad()
        for part in micro_batches(b, cfg.micro_batch):
            nll, _ = token_nll(model, part["input_ids"], part["attention_mask"], part["labels"])
            h = torch.as_tensor(hard[at:at + nll.numel()], device=nll.device)
            at += nll.numel()
            for k, mask in enumerate((~h, h, torch.ones_like(h))):
                sums[k] += float(nll.detach()[mask].sum())
                cnt[k] += float(mask.sum())
            L.reduce(nll.sum(), n_b, None).backward()
            del nll
        out[t] = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
        for gr in opt.param_groups:
            gr["lr"] = float(lr)
        if direction is not None and cosines is not None:
            cosines.append(_cosine(params, direction))
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        meter.forward_backward(int(b["attention_mask"].sum()))
        if on_step is not None:
            on_step(model, t + 1)
    return (out, model) if return_model else out


def fit_coherence(cosines: Sequence[float], lrs: np.ndarray, space: str = "log") -> float:
    """lam_c of `sft.forecast.coherence`, exp(-Lambda_t / lam_c) with Lambda_t = sum_{s<t} eta_s, from a
    probe's cosines between its real gradient at step t and the frozen mean gradient at theta0,
    relative to step 0's (batch noise makes cos_0 < 1). ``space="log"`` (the default): least squares of
    log(cos_t / cos_0) on Lambda_t through the origin, over the steps with a positive cosine (a
    step whose cosine has decayed into the batch noise, near 0, weighs most there: a noisy, short
    lam_c). ``space="linear"`` (tried as version 4): least squares of cos_t / cos_0 - exp(-Lambda_t / lam_c) over every
    step t >= 1 (the noise enters additively; `_fit_exp_linear`). inf (no rotation) when the
    probe shows no decay or cos_0 <= 0."""
    if space not in ("log", "linear"):
        raise ValueError(f"space {space!r}: expected 'log' or 'linear'")
    c = np.asarray(cosines, float)
    lam = np.concatenate([[0.0], np.cumsum(lrs)[:-1]])[: c.size]
    if c.size < 2 or not c[0] > 0:
        return math.inf
    if space == "linear":
        return _fit_exp_linear(lam[1:], c[1:] / c[0])
    ok = (c > 0) & (lam > 0)
    if not ok.any():
        return math.inf
    y = np.log(np.minimum(c[ok] / c[0], 1.0))
    slope = float(np.sum(lam[ok] * y) / np.sum(lam[ok] ** 2))
    return -1.0 / slope if slope < 0 else math.inf


def _fit_exp_linear(lam: np.ndarray, y: np.ndarray) -> float:
    """argmin over lam_c of sum_t (y_t - exp(-lam_t / lam_c))^2: bounded Brent search (scipy) on
    log lam_c between 1e-3 and 1e3 x the largest lam_t (the sum is unimodal there for a decaying
    y); inf when the upper end wins (no decay seen)."""
    from scipy.optimize import minimize_scalar

    if lam.size == 0 or not lam.max() > 0:
        return math.inf
    lo, hi = math.log(1e-3 * lam.max()), math.log(1e3 * lam.max())
    x = minimize_scalar(lambda x: float(np.sum((y - np.exp(-lam / math.exp(x))) ** 2)), bounds=(lo, hi),
                        method="bounded", options={"xatol": 1e-10}).x
    return math.inf if x >= hi - 1e-3 else math.exp(x)


KAPPA_GRID = np.geomspace(0.02, 5.0, 25)


def fit_kappa(gg: GradientMoments, lrs: np.ndarray, target: np.ndarray, tail: int = 5,
              exhaustive: bool = False, meter: ComputeMeter | None = None, block: int = 1) -> torch.Tensor:
    """kappa [2] so that the replayed CE probe's tracked group losses match the probe's
    (mean over the last ``tail`` steps; coordinate search on the log grid `KAPPA_GRID`, hard
    group first). The tracked loss falls as kappa_k grows, so the error |log(got / want)| is
    unimodal along the grid: a binary search for the first grid point whose tracked loss is at
    or below the target, then the better of it and its neighbour, finds the grid's argmin with
    about 6 replays instead of 25 (a replay is 6 AdamW steps over every parameter: minutes on a
    135 M-parameter model). ``exhaustive=True`` evaluates the whole grid (the reference). ``block``: the
    replays' held denominator (`replay_adam`; 1: exact)."""
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
                _, _, traj = replay_adam(gg, "ce", lrs, trajectory=True, block=block)
                if meter is not None:
                    meter.replay(len(lrs), replay_flops("ce", None, gg.noise_floor, block=block))
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


def probe_batches(d2: Sequence[dict], cfg: ForecastConfig, rng) -> tuple[list[list[dict]], list[list[dict]]]:
    """(CE's, the other methods') probe batches: ``n_batches`` of B training examples each, a random
    partition of D2. Without ``cross_fit`` both are the same batches; with it the methods with
    gradients of their own (TALR, DFT, FLOW) take the next ``n_batches`` (disjoint from CE's, whose
    mean is their tracker's progress direction: `GradientMoments.alignment`), as many as D2 holds
    (CE's again when it holds none)."""
    perm = rng.permutation(len(d2))
    n_all = max(1, len(d2) // cfg.batch)
    n_b = min(cfg.n_batches, n_all)
    cut = [[d2[int(i)] for i in perm[k * cfg.batch:(k + 1) * cfg.batch]] for k in range(min(n_all, 2 * n_b))]
    if not cfg.cross_fit:
        return cut[:n_b], cut[:n_b]
    return cut[:n_b], cut[n_b:] or cut[:n_b]


@contextmanager
def _released():
    """Return the heap pages freed inside the block to the system on its way out (`release_free_memory`)."""
    try:
        yield
    finally:
        release_free_memory()


class ForecastGrid:
    """What the rows of one forecast share: the model at theta0 (``model0`` itself, no copy: each
    configuration is evaluated inside `Shifted`, which restores theta0 exactly), its probe batches,
    the D1 sample and its evaluation, the compute meter."""

    def __init__(self, model0: nn.Module, d2, d1, cfg: ForecastConfig, d1_tree: SampleTree | None):
        self.cfg, self.meter = cfg, ComputeMeter()
        self.model = model0
        self.d1, self.tree, self.pad = list(d1)[: cfg.n_general], d1_tree, cfg.pad_token_id
        self.batches, self.own_batches = probe_batches(d2, cfg, np.random.default_rng(cfg.seed))
        self.d2 = d2
        self.examples = [ex for b in self.batches for ex in b]
        with self.meter.phase("d1_evals"):
            self.base_d1 = mean_bits(self.model, self.d1, self.pad, self.meter)
            self.base_lq = d1_tree.logq(self.model, self.meter) if d1_tree is not None else None
            # ``additive`` on a real LLM: the configurations' dL is the KL term on the sample (`SampleKL`)
            self.sample_kl = SampleKL(self.model, self.d1, self.pad, self.meter) \
                if cfg.additive and d1_tree is None else None
        self.layout = lora_layout(self.model) if any(get_method(m).lora for m in cfg.methods) else None
        self.dtype, self.noise_dtype = getattr(torch, cfg.store_dtype), getattr(torch, cfg.noise_dtype)
        self.size_points, self._groups, self._last = [], None, None
        self.path_F = 1.0  # the last replay's `decorrelation` F (`additive_dl`)
        self.calibration_point = []  # [(lr, measured dL, nan)] of the calibration probe (`diffusion`)
        self.size_split = []  # [(lr, first-order term, KL term)] of each probe's dL (``first_order``: `split_dl`)
        self._base_cond = None  # theta0's full conditionals on the D1 sample (`probe_terms` on a real LLM)
        self.method_factors = None  # ``method_walk``: {factors, kl_bits, eps} (`measure_method_factors`)
        self.lora_share = None  # ``lora_share="fisher"``: {factor, kl_full, kl_lora, eps} (`measure_lora_share`)
        self._shape = None  # (trainable parameters, LoRA's diffusion factor), on the first `diffusion`
        self.ce_tokens = None  # CE's moments' tokens at theta0 on ``batches`` (`TokenLosses`), once computed
        self.extra_eval, self.extra_seconds = None, 0.0  # forecast_grid's ``extra_eval`` and its seconds
        self.spill = Spill()  # off unless forecast_grid is given a folder

    def groups(self) -> list[np.ndarray]:
        """Per probe example, its hard tokens at theta0 (computed once): read from CE's moments, whose
        pass saw the same examples at theta0 (no model pass), else a forward over them."""
        if self._groups is None and self.ce_tokens is not None:
            self._groups = self.ce_tokens.hard_by_sequence()
        if self._groups is None:
            with self.meter.phase("probes"):
                self._groups = token_groups(self.model, self.examples, self.pad, HARD_GROUP_P, self.meter)
        return self._groups

    def flow_tau(self) -> float:
        """FLOW's temperature: the median per-sequence mean loss of the probe examples at theta0 (from CE's
        moments when computed, else a forward over them)."""
        if self.ce_tokens is not None:
            means = self.ce_tokens.sequence_means()
        else:
            with self.meter.phase("gradients"):
                _, means = sequence_losses(self.model, self.examples, pad_token_id=self.pad, meter=self.meter)
        return max(float(np.median(means)), 1e-12)

    def moments(self, method: str, ce_mean=None) -> GradientMoments:
        """``method``'s moments: on CE's batches (``ce_mean`` None: CE, whose mean is the shared
        progress direction) or on the other methods' (`probe_batches`). CE's keep their tokens at theta0:
        the probe's token groups, FLOW's temperature and TALR's batch taus on the same batches are read
        from them (each a forward pass over the batches before). ``ce_mean`` may be a `_Held` tensor: it
        is then on disk during the gradient pass (`Spill`) and moves into the moments after it."""
        held = ce_mean if isinstance(ce_mean, _Held) else None
        batches = self.batches if ce_mean is None else self.own_batches
        rec = get_method(method)
        flow_tau = self.flow_tau() if rec.sequence_weights == "flow" else None
        taus = None
        if rec.tau and self.ce_tokens is not None \
                and [id(x) for b in batches for x in b] == [id(x) for x in self.examples]:  # CE's batches
            taus = self.ce_tokens.batch_taus([len(b) for b in batches])
        with self.meter.phase("gradients"), _released(), self.spill.away(held, "t"):
            gm = method_gradients(self.model, batches, method, pad_token_id=self.pad, flow_tau=flow_tau,
                                  w_min=self.cfg.w_min, meter=self.meter, ce_mean=None if held else ce_mean,
                                  dtype=self.dtype, micro_batch=self.cfg.micro_batch, batch_taus=taus,
                                  noise_dtype=self.noise_dtype, shared_ce=held is not None)
        if held is not None:  # the shared direction moves into the moments (``held`` lets go of it)
            gm.ce_mean, held.t = held.t.to(self.dtype), None
        if method == "ce" and ce_mean is None and self.ce_tokens is None:
            self.ce_tokens = gm.tokens
        return gm

    def replay(self, gm: GradientMoments, method: str, lr: float):
        cfg = self.cfg
        lrs = cosine_lrs(lr, cfg.steps)
        rec = get_method(method)
        if rec.regularizer == "l2" and cfg.l2_energy:
            return self.replay(gm, "ce", lr)  # L2's own part: `l2_row`
        if self._last is not None and self._last[0] == (method, lr):  # CE's replay, shared with L2 at this rate
            self.path_F = self._last[2]
            return self._last[1]
        self.meter.replay(cfg.steps, replay_flops(method, cfg))
        if rec.lora:
            self.path_F = 1.0  # LoRA's factors are replayed along one path (no rotation)
            return replay_lora(gm, self.layout, lrs, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=cfg.seed,
                               max_grad_norm=cfg.max_grad_norm, track=cfg.track, block=cfg.lora_block)
        l2 = cfg.l2_coeff if rec.regularizer == "l2" else 0.0
        out = replay_adam(gm, method, lrs, l2_coeff=l2, max_grad_norm=cfg.max_grad_norm, w_min=cfg.w_min,
                          track=cfg.track, block=cfg.replay_block)
        self.path_F = gm.path_F
        if method == "ce":
            self._last = ((method, lr), out, gm.path_F)  # one displacement kept (memory: + 4 N bytes)
        return out

    def evaluate(self, delta: torch.Tensor, path_F: float = 1.0) -> tuple[float, dict]:
        """dL(P1) on the D1 sample at theta0 + delta (bits per sequence) and, with a tree, its two terms;
        with ``additive`` the decorrelated path's damage, `additive_dl` (``path_F`` its F)."""
        if self.cfg.additive:
            return additive_dl(lambda scale: self._at(delta, scale), path_F)
        return self._at(delta, 1.0)

    def _at(self, delta: torch.Tensor, scale: float) -> tuple[float, dict]:
        with Shifted(self.model, delta, scale=scale):
            return self.sample_dl(self.model)

    def sample_dl(self, model: nn.Module) -> tuple[float, dict]:
        """dL(P1) of ``model`` against theta0 on the D1 sample (bits per sequence) and, with a tree, its two
        terms; with ``cfg.kl_term_only`` (and a tree) the KL term alone (module docstring of `sft.forecast`,
        1.: the first-order term vanishes at a pretraining stationary point, its sample estimate is noise;
        tried as version 4, not adopted)."""
        from theory.prefix import prefix_decomposition

        with self.meter.phase("d1_evals"):
            if self.tree is None and self.sample_kl is not None:  # ``additive``: the KL term on the sample
                return self.sample_kl(model, self.meter), {}
            if self.tree is None:
                return mean_bits(model, self.d1, self.pad, self.meter) - self.base_d1, {}
            d = prefix_decomposition(self.tree.tree, self.base_lq, self.tree.logq(model, self.meter), unit="bits")
        return (d.kl_term if self.cfg.kl_term_only else d.delta), {"first_order_bits": d.first_order,
                                                                   "kl_term_bits": d.kl_term}

    def probe_dl(self, model: nn.Module) -> float:
        """The probes' measured dL on the D1 sample: as the configurations' with ``kl_term_only``, else the
        sample's mean code length (the default; equal to the tree's two terms summed)."""
        if self.cfg.kl_term_only and self.tree is not None:
            return self.sample_dl(model)[0]
        with self.meter.phase("d1_evals"):
            return mean_bits(model, self.d1, self.pad, self.meter) - self.base_d1

    def probe_terms(self, model: nn.Module) -> tuple[float, float]:
        """The two terms of ``model``'s dL(P1) on the D1 sample against theta0 (bits per sequence;
        Proposition 3.1): on the sample's tree, else over the full vocabulary at every coded position
        (`sft.prefixbound.full_vocab_decomposition`, theta0's conditionals computed once and kept until
        `drop_terms`: 4 V bytes a coded token, 0.28 GB on SmolLM2's general set)."""
        from theory.prefix import prefix_decomposition

        with self.meter.phase("d1_evals"):
            if self.tree is not None:
                d = prefix_decomposition(self.tree.tree, self.base_lq, self.tree.logq(model, self.meter), unit="bits")
                return float(d.first_order), float(d.kl_term)
            from .prefixbound import full_vocab_decomposition

            tokens = sum(len(ex["input_ids"]) for ex in self.d1)
            self._base_terms()
            self.meter.forward(tokens)
            d, _ = full_vocab_decomposition(self._base_cond, model, self.d1, unit="bits")
        per_seq = d.weight.size / max(len(self.d1), 1)  # bits per coded token -> per sequence
        return float(d.first_order) * per_seq, float(d.kl_term) * per_seq

    def _base_terms(self) -> None:
        """theta0's full conditionals on the D1 sample for `probe_terms` (no tree), computed once and before
        any `Shifted` moves ``self.model``."""
        if self.tree is None and self._base_cond is None:
            from .prefixbound import coded_conditionals

            with self.meter.phase("d1_evals"):
                self.meter.forward(sum(len(ex["input_ids"]) for ex in self.d1))
                self._base_cond = coded_conditionals(self.model, self.d1)

    def measure_lora_share(self, eps: float) -> dict:
        """LoRA's diffusion factor weighted by the D1 sample's Fisher information (``lora_share="fisher"``):
        the KL term at theta0 + a LoRA-shaped random step over that at theta0 + a full one
        (`sft.forecast.walk_step`, std ``eps``; two D1 passes). Both are quadratic in ``eps`` at a probe's
        size, so the ratio is the two walks' Fisher-weighted variance ratio."""
        cfg = self.cfg
        kl = {}
        self._base_terms()  # at theta0, before the steps
        for name, layout in (("full", None), ("lora", self.layout)):
            step = walk_step(self.model, eps, cfg.seed, layout, cfg.lora_r, cfg.lora_alpha)
            with Shifted(self.model, step):
                kl[name] = self.probe_terms(self.model)[1]
            del step
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.lora_share = {"factor": kl["lora"] / kl["full"] if kl["full"] > 0 else math.nan,
                           "kl_full_bits": kl["full"], "kl_lora_bits": kl["lora"], "eps": float(eps),
                           "count_factor": lora_diffusion_factor(self.layout, n, cfg.lora_r, cfg.lora_alpha)}
        return self.lora_share

    def measure_method_factors(self, eps: float, n_batches: int = WALK_BATCHES) -> dict:
        """Each token weighting's diffusion factor against CE's (candidate 9, ``method_walk``;
        `sft.forecast.method_walk_factor`): per method with a weighting of its own (TALR, FLOW, DFT; L2 and
        LoRA walk with CE's), its gradients on ``n_batches`` batches of B rows of D2 at theta0 (a random
        partition, seed + 1: as many as D2 holds; `method_step_grad`), Adam-normalised together
        (`adam_directions`), and the D1 sample's KL term at theta0 + ``eps`` u_b for each; CE's on the same
        batches. Memory: ``n_batches`` flat gradients (4 N bytes each) of one method at a time; compute:
        ``n_batches`` backward passes and D1 passes per method."""
        cfg = self.cfg
        self._base_terms()
        perm = np.random.default_rng(cfg.seed + 1).permutation(len(self.d2))
        n_b = max(1, min(int(n_batches), len(self.d2) // cfg.batch))
        batches = [[self.d2[int(i)] for i in perm[k * cfg.batch:(k + 1) * cfg.batch]] for k in range(n_b)]
        own = ["ce"] + [m for m in cfg.methods if m != "ce" and get_method(m).replay_gradients != "ce"]
        tau = self.flow_tau() if any(get_method(m).sequence_weights == "flow" for m in own) else None
        kl = {}
        for m in own:
            with self.meter.phase("gradients"):
                us = adam_directions([method_step_grad(self.model, b, m, pad_token_id=self.pad, flow_tau=tau,
                                                       w_min=cfg.w_min) for b in batches])
                for b in batches:
                    n = sum(len(ex["input_ids"]) for ex in b)
                    self.meter.forward(n)
                    self.meter.backward(n)
            kl[m] = []
            for u in us:
                with Shifted(self.model, u, float(eps)):
                    kl[m].append(self.probe_terms(self.model)[1])
            del us
        self.method_factors = {
            "factors": {m: method_walk_factor(kl[m], kl["ce"]) for m in own if m != "ce"},
            "kl_bits": kl, "eps": float(eps), "n_batches": len(batches)}
        return self.method_factors

    def drop_terms(self) -> None:
        """Lets go of theta0's cached conditionals (`probe_terms`) once the probes and the LoRA share are done."""
        self._base_cond = None

    def calibrate(self, ce: GradientMoments, model0: nn.Module) -> dict:
        """The CE probe at the grid's geometric middle rate: lam_c (`fit_coherence`) and kappa (`fit_kappa`)."""
        cfg = self.cfg
        lr_p = float(np.exp(np.mean(np.log(cfg.lrs))))
        k_steps = min(cfg.probe_steps, cfg.steps)
        plrs = cosine_lrs(lr_p, cfg.steps)[:k_steps]  # the first steps of a real run at lr_p
        cos = []
        groups = self.groups()
        with self.spill.away(ce, "cov"):  # the probe reads CE's mean (the cosines), not its covariances
            with self.meter.phase("probes"):
                target, pm = probe_losses(model0, self.examples, groups, cfg, plrs, self.meter,
                                          return_model=True, direction=ce.mean, cosines=cos)
            probe_dl = self.probe_dl(pm)
            ce.lam_c = fit_coherence(cos, plrs, cfg.coherence_fit) if cfg.coherence else math.inf
            self.calibration_point = [(lr_p, float(probe_dl), math.nan)]
            if self.wants_split(ce):
                self.size_split = [(lr_p, *self.probe_terms(pm))]
            del pm
        release_free_memory()  # the probe's activations and optimiser state, before the replays
        kappa = fit_kappa(ce, plrs, target, meter=self.meter, block=cfg.fit_block)
        return {"lr": lr_p, "steps": k_steps, "lrs": plrs.tolist(), "loss_nats": target.tolist(),
                "dL_P1_bits": probe_dl, "kappa": kappa.tolist(), "cosines": cos,
                "lambda_c": ce.lam_c if math.isfinite(ce.lam_c) else None}

    def size_probe(self, ce: GradientMoments, model0: nn.Module, probe: dict) -> list[tuple[float, float, float]]:
        """(peak rate, measured dL, replayed dL) at the end of two real CE probes of ``probe_steps``
        steps (the first steps of a real run at that rate): the calibration probe (the grid's middle
        rate) and one at the grid's largest rate. The replay (CE, the probe's kappa and lam_c) runs
        the same rates from theta0."""
        cfg = self.cfg
        lr_top = float(max(cfg.lrs))
        k = min(cfg.probe_steps, cfg.steps)
        plrs = cosine_lrs(lr_top, cfg.steps)[:k]
        groups = self.groups()
        with self.spill.away(ce, "mean", "cov"):
            with self.meter.phase("probes"):
                _, pm = probe_losses(model0, self.examples, groups, cfg, plrs, self.meter, return_model=True)
            top = self.probe_dl(pm)
            if self.wants_split(ce):  # theta0's conditionals stay for the LoRA share; `_probes` drops them
                self.size_split.append((lr_top, *self.probe_terms(pm)))
            del pm
        release_free_memory()  # the probe's activations and optimiser state, before the replays
        return [(float(probe["lr"]), float(probe["dL_P1_bits"]), self.replayed_dl(ce, np.asarray(probe["lrs"]))),
                (lr_top, top, self.replayed_dl(ce, plrs))]

    def l2_step(self, gm: GradientMoments, delta: torch.Tensor, ell, lam_T: float, r: float):
        """L2's displacement from CE's replayed one (`sft.forecast`, 2., L2): relaxed per coordinate by
        Adam's pull with ``l2_relax`` (`l2_relaxation`; sigma at the tracked loss or at theta0), then held
        to the descent bound (`l2_energy_scale`; ``r`` the size correction). Returns (delta, extras)."""
        cfg = self.cfg
        if cfg.l2_relax:  # a new tensor (CE's displacement is kept for CE's row): scaled in place below
            rho = (gradient_scale("ce", torch.as_tensor(ell, dtype=torch.float64), gm.ell0, gm.tau, cfg.w_min)
                   if cfg.l2_relax == "tracked" else None)
            moment = None
            if cfg.l2_relax == "tracked" and gm.token_scales is not None:  # the token tracker's end of CE's run
                rho, rn = gm.token_scales
                moment = lambda sl: gm.second_moment(rho, sl, rn)  # noqa: E731
            delta = l2_relaxation(delta, gm.raw_sq, lam_T, cfg.l2_coeff, rho=rho, moment=moment)
        s = l2_energy_scale(squared_norm(delta), gm.ell0, ell, gm.tokens_per_seq, cfg.l2_coeff, size=r)
        return (delta.mul_(s) if cfg.l2_relax else delta * s), {"l2_energy_scale": s}

    def wants_split(self, ce: GradientMoments) -> bool:
        """Whether the probes record their per-prefix split (`probe_terms`): always with ``first_order``; with
        ``method_walk`` only where the rows are sized by diffusion (the split's KL part is what the factors scale),
        so a replay-sized grid (every tiny world so far) costs and forecasts exactly as without it."""
        return self.cfg.first_order or (self.cfg.method_walk and self.by_diffusion(ce))

    def by_diffusion(self, gm: GradientMoments) -> bool:
        """``size_model``: "diffusion" always, "auto" where the calibration probe's gradient decorrelates within
        one step (`sft.forecast.random_walk` of lam_c and the probe's rate), "replay" never."""
        mode = self.cfg.size_model
        if mode == "auto" and self.calibration_point:
            return random_walk(gm.lam_c, self.calibration_point[0][0])
        return mode == "diffusion"

    def diffusion(self, method: str, lr: float) -> tuple[float, dict]:
        """`sft.forecast.diffusion_dl` from this grid's size probes (the calibration probe alone without the
        size probe)."""
        cfg = self.cfg
        if self._shape is None:  # the model's trainable coordinates and LoRA's share of their walk, once
            n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            self._shape = n, lora_diffusion_factor(self.layout, n, cfg.lora_r, cfg.lora_alpha) if self.layout else 1.0
        n, lora = self._shape
        if cfg.lora_share == "fisher" and self.lora_share is not None and math.isfinite(self.lora_share["factor"]):
            lora = self.lora_share["factor"]
        if cfg.first_order and self.size_split:
            return split_dl(method, lr, self.size_split, steps=cfg.steps, probe_steps=cfg.probe_steps, n_params=n,
                            l2_coeff=cfg.l2_coeff, max_grad_norm=cfg.max_grad_norm, lora_factor=lora)
        return diffusion_dl(method, lr, self.size_points or self.calibration_point, steps=cfg.steps,
                            probe_steps=cfg.probe_steps, n_params=n, l2_coeff=cfg.l2_coeff,
                            max_grad_norm=cfg.max_grad_norm, lora_factor=lora, walk_rate=cfg.walk_rate,
                            weight_factor=self.weight_factor(method),
                            kl_points=[(p, k, math.nan) for p, _, k in self.size_split] or None, c_below=cfg.c_below)

    def weight_factor(self, method: str) -> float:
        """``method_walk``: the method's measured token-weighting factor (`measure_method_factors`), 1 for CE's
        weighting, for a factor not measured or not finite, and without ``method_walk``."""
        f = (self.method_factors or {}).get("factors", {}).get(method) if self.cfg.method_walk else None
        return float(f) if f is not None and math.isfinite(f) and f > 0 else 1.0

    def size_at(self, lr: float, lam_T: float) -> float:
        """The size correction of a configuration at peak rate ``lr`` whose run sums to ``lam_T``:
        `size_correction` in log peak rate (``size_axis="rate"``) or, with ``"lambda"``, in log summed
        rate, each probe placed at the sum of its own ``probe_steps`` rates."""
        if self.cfg.size_axis == "rate":
            return size_correction(self.size_points, lr)
        k = min(self.cfg.probe_steps, self.cfg.steps)
        pts = [(float(cosine_lrs(p, self.cfg.steps)[:k].sum()), m, r) for p, m, r in self.size_points]
        return size_correction(pts, lam_T)

    def replayed_dl(self, ce: GradientMoments, lrs: np.ndarray) -> float:
        self.meter.replay(len(lrs), replay_flops("ce", self.cfg))
        delta, _ = replay_adam(ce, "ce", lrs, max_grad_norm=self.cfg.max_grad_norm, w_min=self.cfg.w_min,
                               track=self.cfg.track, block=self.cfg.replay_block)
        F = ce.path_F

        def at(scale: float) -> tuple[float, dict]:  # ``additive``: the configurations' rule (`sample_dl`)
            with Shifted(self.model, delta, scale=scale):
                return (self.sample_dl(self.model)[0] if self.cfg.additive else self.probe_dl(self.model)), {}
        with self.spill.away(ce, "mean", "cov"):
            return (additive_dl(at, F) if self.cfg.additive else at(1.0))[0]

    def rows(self, gm: GradientMoments, pairs, progress) -> list[dict]:
        out = []
        for m, lr in pairs:
            delta, ell = self.replay(gm, m, lr)
            F = self.path_F
            lam_T = float(cosine_lrs(lr, self.cfg.steps).sum())
            r = self.size_at(lr, lam_T)
            extra = {}
            if get_method(m).regularizer == "l2" and self.cfg.l2_energy:
                delta, extra = self.l2_step(gm, delta, ell, lam_T, r)
            with self.spill.away(gm, "mean", "cov", "ce_mean"):  # the evaluations read none of the moments
                dl, parts = self.evaluate(delta, F)
                final = dl * r
                if self.by_diffusion(gm):  # the size by diffusion; r places the accuracy forecast
                    final, more = self.diffusion(m, lr)
                    extra.update(more, replay_model_dL_P1_bits=dl * r)  # the replay's sized forecast, beside it
                    r = final / dl if dl > 0 else 1.0
                if self.extra_eval is not None:  # at the size-corrected step: dL ~ |d_theta|^2, so sqrt(r) d_theta
                    with Shifted(self.model, delta, scale=math.sqrt(max(r, 0.0))):
                        extra["extra_eval"] = self.extra_eval(self.model)
            del delta
            out.append(Forecast(m, lr, final, gm.gain_bits(ell), extras={
                "Lambda": lam_T, "tracked_loss_nats": ell.tolist(), "replay_dL_P1_bits": dl, "size_correction": r,
                "path_F": F,
                **extra, **parts}).to_dict())
            progress(1)
        return out


def replay_flops(method: str, cfg: ForecastConfig | None, noise_floor: bool | None = None,
                 block: int | None = None) -> float:
    """Flops per parameter and step of a replay (counted by hand from `sft.forecast.replay_adam` /
    `replay_lora`'s per-coordinate operations; x = 15 with the noise floor, which forms the mean
    products and the noise's covariances on the fly, else 0): without an L2 pull two passes per
    block of b steps (``cfg.replay_block``, LoRA ``cfg.lora_block``, 1 without a cfg), (30 + x) to form C and Q and (20 + x)
    to add the block's step: (50 + 2 x) / b; L2's per-coordinate moments 45 + x; LoRA (12 r + 10 + x) / b
    (its factor gradients 8 r + 10 + x and the tracker's ce_k . Delta W 4 r, formed once per block)."""
    nf = (cfg.noise_floor if cfg is not None else False) if noise_floor is None else noise_floor
    extra = 15.0 if nf else 0.0
    lora = method == "lora" or get_method(method).lora
    b = block if block is not None else (getattr(cfg, "lora_block" if lora else "replay_block") if cfg is not None else 1)
    b = max(int(b), 1)
    if lora:  # factor gradients 8 r + 10 + x, ce_k . Delta W 4 r, per block
        return (12.0 * (cfg.lora_r if cfg is not None else 8) + 10.0 + extra) / b
    if get_method(method).regularizer == "l2":
        return 45.0 + extra
    return (50.0 + 2.0 * extra) / b


def additive_dl(at, path_F: float) -> tuple[float, dict]:
    """The damage of a decorrelated path, summed over its steps (``additive``; theory, no knob).

    The replay's displacement d (already shortened by sqrt(F), `sft.forecast.decorrelation`) stands for a
    path whose steps turn: with F = sum_st d_s d_t k_st / (sum_s d_s)^2 its squared length is F times the
    straight path's, as if it were m = 1 / F independent straight segments of squared length |d|^2 / m each.
    Version 5 evaluates the loss at theta0 + d: all of that length along ONE direction, where the KL grows
    faster than quadratically once the step leaves the quadratic regime. Independent segments have no
    cross terms in the second-order expansion, so their damages add: dL = m KL(theta0 + d / sqrt(m)) =
    KL(theta0 + sqrt(F) d) / F (F = 1: a straight path, version 5's value). In the quadratic regime both
    agree; beyond it this one is smaller. ``at(scale)`` returns (dL, parts) at theta0 + scale x d; the
    parts are scaled alike."""
    F = float(path_F)
    if not (0.0 < F <= 1.0) or not math.isfinite(F):
        raise ValueError(f"path_F {path_F!r}: expected a decorrelation factor in (0, 1]")
    if F == 1.0:
        return at(1.0)
    dl, parts = at(math.sqrt(F))
    return dl / F, {k: v / F for k, v in parts.items()}


def size_correction(points: Sequence[tuple[float, float, float]], lr: float) -> float:
    """measured / replayed dL(P1) at peak rate ``lr``: the log of the ratio interpolated linearly in
    log-rate between the probes' points (rate, measured, replayed), held at the nearest probe
    outside their range (no extrapolation); points where either dL is not positive are left out;
    1 without usable points."""
    pts = sorted((lr_p, m / r) for lr_p, m, r in points if lr_p > 0 and m > 0 and r > 0)
    if not pts:
        return 1.0
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.exp(np.interp(math.log(lr), x, y)))


def _ce_family_rows(grid: ForecastGrid, ce: GradientMoments, pairs, methods, progress) -> dict[str, list[dict]]:
    """The rows of the methods that replay CE's moments, rate by rate so that L2 reuses CE's replay
    at the same rate (one displacement kept at a time)."""
    mine = sorted((p for p in pairs if p[0] in methods), key=lambda p: (p[1], p[0] != "ce"))
    rows = grid.rows(ce, mine, progress)
    grid._last = None
    return {m: [r for r in rows if r["method"] == m] for m in methods}


def _timed(fn, grid: ForecastGrid):
    def run(model):
        t = time.perf_counter()
        try:
            with _released():
                return fn(model)
        finally:
            grid.extra_seconds += time.perf_counter() - t
    return run


def forecast_grid(model0: nn.Module, d2: Sequence[dict], d1: Sequence[dict], cfg: ForecastConfig, *,
                  progress: bool = True, calibrate: bool = True, d1_tree: SampleTree | None = None,
                  only: set | None = None, extra_eval=None, spill=None) -> dict:
    """Forecast every (method, lr) of ``cfg``: returns {"rows": [Forecast dicts], "compute": {...},
    "probe": {...}}. ``d2``: the SFT training examples; ``d1``: general examples (labels on
    every response token); both as {"input_ids", "labels"} dicts. With ``d1_tree`` (the same
    sample as a token tree) dL(P1) comes from the per-prefix decomposition on its prefixes and
    each row also holds its first-order and KL terms. ``only``: a set of (method, lr) pairs of
    the product to forecast (the others are skipped; gradients and probe are shared anyway).
    ``extra_eval(model)``: any other evaluation (e.g. benchmark accuracy) of each configuration's
    predicted model, theta0 + sqrt(r) d_theta (r its size correction: the forecast dL is r times
    the replayed one and dL grows as |d_theta|^2), stored in the row's ``extra_eval``; its passes
    are not in the compute meter (their seconds: ``extra_eval_seconds``). ``spill``: a folder (or a
    `Spill`) where the N-sized state waits on disk while a phase does not read it (`Spill`: the same
    forecast in less memory; the result's ``spill`` says how much moved and how long it took).

    One method's gradient moments live at a time (CE's first: the probe calibrates on them and
    CE, L2 and LoRA replay them; then TALR's, DFT's, FLOW's, each freed after its rows), so the
    memory is that of `sft.forecast.forecast_memory_bytes`, independent of the grid."""
    torch.manual_seed(cfg.seed)
    grid = ForecastGrid(model0, d2, d1, cfg, d1_tree)
    grid.extra_eval = None if extra_eval is None else _timed(extra_eval, grid)
    grid.spill = spill if isinstance(spill, Spill) else Spill(spill)
    try:
        res = _forecast_rows(grid, model0, d2, cfg, progress, calibrate, only)
    finally:
        spilled = grid.spill.close()
    res["spill"] = spilled
    return res


def _probes(grid: ForecastGrid, ce: GradientMoments, model0: nn.Module) -> dict:
    """The calibration probe, the size probe, and what the diffusion rows read from theta0 beside them (the
    probes' per-prefix split with ``first_order`` or ``method_walk``, LoRA's Fisher share with
    ``lora_share="fisher"``, the token weightings' walk factors with ``method_walk``)."""
    cfg = grid.cfg
    probe = grid.calibrate(ce, model0)
    if cfg.size_probe:
        grid.size_points = grid.size_probe(ce, model0, probe)
        probe["size_points"] = grid.size_points
    eps = float(probe["lr"]) * math.sqrt(len(probe["lrs"]))  # a probe's walk per coordinate
    share = cfg.lora_share == "fisher" and grid.layout is not None and grid.by_diffusion(ce)
    walk = cfg.method_walk and grid.by_diffusion(ce)
    # CE's moments are read by neither measurement: on disk meanwhile, the factors' gradients take their place
    with grid.spill.away(ce, "mean", "cov", "ce_mean") if share or walk else nullcontext():
        if share:
            probe["lora_share"] = grid.measure_lora_share(eps)
        if walk:
            probe["method_factors"] = grid.measure_method_factors(eps)
    grid.drop_terms()
    if grid.size_split:
        probe["size_split"] = grid.size_split
    return probe


def _forecast_rows(grid: ForecastGrid, model0: nn.Module, d2, cfg: ForecastConfig, progress: bool,
                   calibrate: bool, only: set | None) -> dict:
    """`forecast_grid`'s body: CE's moments, the probes, the rows of CE's family, each other method's rows."""
    from tqdm.auto import tqdm

    pairs = [(m, lr) for m in cfg.methods for lr in cfg.lrs if only is None or (m, lr) in only]
    replays_ce = [m for m in cfg.methods if m == "ce" or get_method(m).replay_gradients == "ce"]
    own = [m for m in cfg.methods if m not in replays_ce]  # methods with gradients of their own (sft.methods)
    bar = tqdm(total=1 + len(own) + len(pairs) + int(calibrate), desc="forecast", unit="job", disable=not progress)
    ce = grid.moments("ce")
    ce.noise_floor, ce.keep_norm, ce.tau_track = cfg.noise_floor, cfg.keep_norm, cfg.tau_track
    ce.tracker_weight, ce.debias, ce.token_tracker = cfg.tracker_weight, cfg.cross_fit, cfg.token_tracker
    bar.update(1)
    probe = {}
    if calibrate:
        probe = _probes(grid, ce, model0)
        bar.update(1)
    by_method = _ce_family_rows(grid, ce, pairs, replays_ce, bar.update)
    direction, kappa, lam_c = _Held(ce.ce().to(grid.dtype)), ce.kappa, ce.lam_c
    del ce
    for m in own:
        gm = grid.moments(m, ce_mean=direction)  # the direction moves into gm (on disk during the pass)
        gm.kappa, gm.lam_c, gm.noise_floor, gm.keep_norm = kappa, lam_c, cfg.noise_floor, cfg.keep_norm
        gm.tau_track, gm.tracker_weight, gm.token_tracker = cfg.tau_track, cfg.tracker_weight, cfg.token_tracker
        bar.update(1)
        by_method[m] = grid.rows(gm, [p for p in pairs if p[0] == m], bar.update)
        direction.t, gm.ce_mean = gm.ce_mean, None  # back to the holder for the next method
        del gm
    bar.close()
    rows = sorted((r for rs in by_method.values() for r in rs), key=lambda r: pairs.index((r["method"], r["lr"])))
    run_units = training_run_units(d2, cfg.steps, cfg.batch)
    return {"rows": rows, "probe": probe,
            "compute": {"forecast_units": grid.meter.units, "training_run_units": run_units,
                        "compute_ratio": grid.meter.units / run_units, "replay_ratio": grid.meter.replay_units / run_units,
                        "parts": {k: v / run_units for k, v in sorted(grid.meter.parts.items())},
                        "unit": "forward-token passes (backward = 2; a replay's flops / 2 N)"},
            "base": {"d1_bits": grid.base_d1}, "extra_eval_seconds": grid.extra_seconds}


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
            b = padded_batch([d2[int(i)] for i in idx], pad, model_device(model))
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
