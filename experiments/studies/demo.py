"""The main job: measured vs predicted degradation in the tiny-transformer world.

Pipeline (one call of :func:`run_demo`):

1. build the world (exact P1 and P2 token trees, CoT and label-only variants) and pretrain a
   small Llama on P1 (cached by config hash; both variants share the checkpoint);
2. fine-tune a copy with every method (CE, TALR, DFT, clipping, FLOW, L2, KL, LoRA) at a small
   and a large learning rate, evaluating the exact ``KL(P1 || q)`` and the conditional code
   length of P2 completions every ``eval_every`` steps, and fitting the effective tilting
   step ``lambda`` between evaluations (Theorem E.1, Step 5, pooled over P2 prefixes);
3. WiSE-FT: interpolate the CE runs with the pretrained weights;
4. estimate the constants of Appendix E at ``q0`` and evaluate Theorem E.3 over the fitted
   ``lambda_t`` and Theorem E.4 at the measured domain gain;
5. token-level analysis (Figure 3 analogue) and the claims ledger;
6. write ``report.md`` with PNG figures and ``results.json``.

Re-runnable: ``out`` is marked as a demo folder and locked while the demo runs (a non-empty
folder that is not a demo's is refused; ``overwrite`` empties a demo folder first). Each
fine-tuning run (its curve, bounds, WiSE-FT points and token probabilities) is cached in
``out/runs/<variant>/<method>_lr<lr>.<hash>.json``, the hash over everything the run depends on;
a second call, or one after a killed demo, redoes only the runs without a complete cache file.

Units: code lengths and degradations in bits per response; the theory's constants live in
nats, so bounds are converted (``/ ln 2``) where they are drawn over measurements.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from sft.methods import METHODS
from sft.world_runs import appendix_e_constants  # shared with the forecast study

from ..outputs import seed_verdict

DEMO_HINT = ("it holds no `talr demo` marker (another command's output, an older talr's, or other files): "
             "remove it or choose another --out")


@dataclass
class DemoConfig:
    """What the demo runs (the presets below are the embedded defaults)."""

    preset: str = "default"
    out: str = "runs/demo"
    methods: tuple = tuple(METHODS)  # every registered method (`sft.methods`)
    label_methods: tuple = ("ce", "talr")  # label-only variant: enough for Finding 2, keeps the demo short
    lrs: tuple = (3e-4, 3e-3)
    variants: tuple = ("cot", "label")
    steps: int = 150
    batch: int = 16
    eval_every: int = 50
    wise_alphas: tuple = (0.25, 0.5, 0.75)
    ledger_n: int = 1000  # instances per ledger check (the whole ledger takes ~10 s)
    seed: int = 0  # world, pretraining and the first fine-tuning seed
    ft_seeds: int = 2  # fine-tuning seeds seed, seed+1, ... for the configurations a verdict compares (`decisive`)
    cache_dir: str | None = None  # pretrained worlds; None: the user's cache (`sft.runs.user_cache_dir`)
    progress: bool = True
    world_overrides: dict = field(default_factory=dict)
    overwrite: bool = False  # empty a demo's own (marked) ``out`` first instead of reusing its cached runs


PRESETS = {
    "default": {},
    "smoke": dict(steps=12, batch=8, eval_every=6, lrs=(1e-3, 1e-2), wise_alphas=(0.5,), ledger_n=2,
                  methods=("ce", "talr", "clip"), label_methods=("ce", "talr")),
}


def make_config(preset: str = "default", **overrides) -> DemoConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return DemoConfig(preset=preset, **{**PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------- measurement
class _Curve:
    """Exact metrics at evaluation points, the effective step between them, the per-prefix
    bound of dL(P1) against q0 and the alignment of each interval's update with tilting."""

    def __init__(self, world, base_logq1, alpha: float = 0.1):
        from theory.estimate import smoothed_target
        from theory.prefix import with_other

        self.world = world
        self.p2 = world.p2
        self.logp = smoothed_target(world.p2, alpha)  # p~2 with uniform smoothing (Assumption B.1)
        self.active = (self.p2.mass > 0) & ~self.p2.forced_end()
        self.base1 = with_other(base_logq1)  # q0 on P1, with its mass outside the alphabet as one outcome
        self.points: list[dict] = []
        self._prev = None

    def measure(self, model, step: int) -> dict:
        from sft.treeprobs import exact_full_logprobs
        from sft.worlds import exact_metrics
        from theory.corrected import pooled_sin_theta
        from theory.prefix import with_other
        from theory.tilting import fit_effective_step

        w = self.world
        logq1 = exact_full_logprobs(model, w.p1, bos_id=w.bos_id, eos_id=w.eos_id)
        m = exact_metrics(model, w, logq_p1_full=logq1)
        logq = exact_full_logprobs(model, w.p2, bos_id=w.bos_id, eos_id=w.eos_id, renormalize=True)
        point = {"step": step, **m, **prefix_point(w.p1, self.base1, with_other(logq1))}
        if self._prev is not None:
            a = self.active
            fit = fit_effective_step(self._prev[a], logq[a], self.logp[a], weights=self.p2.mass[a])
            point.update(lam=fit.lam_pooled, eps=fit.eps_pooled, residual=fit.residual_pooled,
                         sin_theta=pooled_sin_theta(self._prev[a], logq[a], self.logp[a], self.p2.mass[a]))
        self._prev = logq
        self.points.append(point)
        return point


def prefix_point(p1, base_full, full) -> dict:
    """The per-prefix decomposition of dL(P1) from q0 (`theory.prefix.prefix_decomposition`), in bits."""
    from theory.prefix import prefix_decomposition

    d = prefix_decomposition(p1, base_full, full, unit="bits")
    return {"prefix_delta_bits": d.delta, "prefix_bound_bits": d.bound, "prefix_first_order_bits": d.first_order,
            "prefix_kl_term_bits": d.kl_term, "prefix_chi2_bar": d.chi2_bar,
            "prefix_bound_nodewise_bits": d.bound_nodewise, "prefix_bound_kl_bits": d.bound_kl,
            "prefix_bound_kl_global_bits": d.bound_kl_global, "prefix_floor_bits": d.floor}


def _callback(curve: _Curve, every: int):
    from transformers import TrainerCallback

    class EvalCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0:
                curve.measure(model, state.global_step)

    return EvalCallback()


def finetune(world, model0, method: str, lr: float, cfg: DemoConfig, run_dir: Path, base: dict, base_logq,
             base_logq1):
    """Fine-tune a copy of ``model0`` with ``method`` at ``lr`` for ``cfg.steps`` steps (batch
    ``cfg.batch``, seed ``cfg.seed``), measuring the exact metrics every ``cfg.eval_every`` steps
    and at the end (``base_logq``/``base_logq1``: q0's conditionals on P2 / P1). Returns
    ``(model, points, TrainResult, seconds)``; LoRA comes back merged."""
    from sft.data import SFTDataset
    from sft.trainer import TrainConfig, train

    curve = _Curve(world, base_logq1)
    curve.points.append({"step": 0, **base, **prefix_point(world.p1, curve.base1, curve.base1)})
    curve._prev = base_logq
    model = copy.deepcopy(model0)
    tc = TrainConfig(method=method, lr=lr, max_steps=cfg.steps, batch_size=cfg.batch, seed=cfg.seed,
                     out=str(run_dir), progress=False, save_final=False, token_stats=True,
                     logging_steps=max(1, cfg.steps // 5), warmup=0.0,
                     overwrite=True)  # a scratch folder: a killed earlier attempt's run is redone
    t0 = time.perf_counter()
    res = train(tc, model, SFTDataset(world.d2_train), pad_token_id=world.pad_id,
                callbacks=[_callback(curve, cfg.eval_every)])
    secs = time.perf_counter() - t0
    model = res.model
    if hasattr(model, "merge_and_unload"):  # LoRA: evaluate the merged model
        model = model.merge_and_unload()
    if curve.points[-1]["step"] != res.global_step:
        curve.measure(model, res.global_step)
    return model, curve.points, res, secs


def _one_run(world, model0, method: str, lr: float, cfg: DemoConfig, run_dir: Path, base: dict, base_logq,
             base_logq1, est) -> dict:
    """One fine-tuning run of the demo and everything measured on it: ``{"summary", "wise",
    "token_probs"}`` (WiSE-FT merges for CE; token probabilities for CE/TALR at the large rate)."""
    from sft.analysis import token_probs
    from sft.merge import wise_ft
    from sft.worlds import exact_metrics

    model, points, res, secs = finetune(world, model0, method, lr, cfg, run_dir, base, base_logq, base_logq1)
    summ = summarise(points, base)
    summ.update(bounds_of_run(est.constants, summ["lams"], summ["domain_gain_bits"]))
    summ.update(points=points, seconds=secs, status=res.status)
    stats_path = res.token_stats_path
    if stats_path.exists():
        rows = [json.loads(x) for x in stats_path.read_text().splitlines() if x.strip()]
        summ["frac_p_gt_0.2"] = [r.get("frac_p_gt_0.2") for r in rows]
        summ["epoch_of_step"] = [r.get("epoch") for r in rows]
    probs = None
    if method in ("ce", "talr") and lr == max(cfg.lrs):
        probs = token_probs(model, None, world.d2_train, batch_size=64, pad_token_id=world.pad_id, progress=False)
    wise = {}
    if method == "ce":
        for a, merged in wise_ft(model0, model, cfg.wise_alphas):
            m = exact_metrics(merged, world)
            wise[f"wise{a:g}@{lr:g}"] = {
                "alpha": a, "lr": lr, "mode_acc_p1": m["mode_acc_p1"],
                "dL_P1_bits": m["kl_p1_bits"] - base["kl_p1_bits"],
                "domain_gain_bits": base["cond_code_len_p2_bits"] - m["cond_code_len_p2_bits"],
                "domain_acc": m["domain_acc"]}
    return {"summary": summ, "wise": wise, "token_probs": probs}


def summarise(points: list[dict], base: dict) -> dict:
    """Final exact dL(P1) and domain gain (bits) of a run's evaluation points against ``base``."""
    last = points[-1]
    return {
        "dL_P1_bits": last["kl_p1_bits"] - base["kl_p1_bits"],
        "domain_gain_bits": base["cond_code_len_p2_bits"] - last["cond_code_len_p2_bits"],
        "domain_acc": last["domain_acc"],
        "answer_prob": last["answer_prob"],
        "lams": [p["lam"] for p in points if "lam" in p],
        "sin_theta": [p["sin_theta"] for p in points if "sin_theta" in p],
        "prefix_bound_bits": last.get("prefix_bound_bits"),
        "prefix_delta_bits": last.get("prefix_delta_bits"),
        "mode_acc_p1": last.get("mode_acc_p1"),
        "d_mode_acc_p1": last.get("mode_acc_p1", np.nan) - base.get("mode_acc_p1", np.nan),
        "d_q_entropy_p1_bits": last.get("q_entropy_p1_bits", np.nan) - base.get("q_entropy_p1_bits", np.nan),
    }


def interp_at_gain(points: list[dict], base: dict, gain: float) -> float | None:
    """Degradation (bits) when the run first reached ``gain`` bits of domain gain."""
    g = np.array([base["cond_code_len_p2_bits"] - p["cond_code_len_p2_bits"] for p in points])
    d = np.array([p["kl_p1_bits"] - base["kl_p1_bits"] for p in points])
    hit = np.flatnonzero(g >= gain)
    if hit.size == 0:
        return None
    i = int(hit[0])
    if i == 0:
        return float(d[0])
    t = (gain - g[i - 1]) / max(g[i] - g[i - 1], 1e-12)
    return float(d[i - 1] + t * (d[i] - d[i - 1]))


def decisive(cfg: DemoConfig, variant: str) -> list[tuple[str, float]]:
    """The (method, lr) pairs the verdicts compare: CE at every rate (Findings 1 and 2) and every
    method at the largest rate (TALR's retention)."""
    methods = cfg.label_methods if variant == "label" else cfg.methods
    pairs = [("ce", lr) for lr in cfg.lrs if "ce" in methods]
    return pairs + [(m, max(cfg.lrs)) for m in methods if (m, max(cfg.lrs)) not in pairs]


def n_units(cfg: DemoConfig) -> int:
    """Progress units of a demo: one per world variant (pretraining, constants) and one per fine-tuning run."""
    runs = sum(len(cfg.label_methods if v == "label" else cfg.methods) * len(cfg.lrs) for v in cfg.variants)
    return len(cfg.variants) + runs + sum(len(decisive(cfg, v)) for v in cfg.variants) * (cfg.ft_seeds - 1)


def seed_runs(world, model0, variant: str, cfg: DemoConfig, out: Path, at_q0: tuple, bar) -> dict:
    """The `decisive` configurations again with fine-tuning seeds ``cfg.seed + 1`` ..
    ``cfg.seed + cfg.ft_seeds - 1`` (same world and q0; ``at_q0`` = (base metrics, q0's conditionals on
    P2, on P1)): ``{name: {seed: summary with its points}}``."""
    from ..outputs import write_json

    base, base_logq, base_logq1 = at_q0
    res: dict = {}
    for seed in range(cfg.seed + 1, cfg.seed + cfg.ft_seeds):
        scfg = replace(cfg, seed=seed)
        for method, lr in decisive(cfg, variant):
            name = f"{method}@{lr:g}"
            run_dir = out / "runs" / variant / f"seed{seed}" / name.replace("@", "_lr")
            cache = run_dir.with_name(f"{run_dir.name}.{run_key(world.cfg, method, lr, scfg)}.json")
            entry = _load_cached(cache)  # cached like the main runs: a re-run redoes only what is missing
            if entry is None:
                _, points, r, secs = finetune(world, model0, method, lr, scfg, run_dir, base, base_logq, base_logq1)
                summ = summarise(points, base)
                entry = {k: summ[k] for k in ("dL_P1_bits", "domain_gain_bits", "domain_acc", "mode_acc_p1")}
                entry.update(points=points, seconds=secs, status=r.status)
                write_json(cache, entry)
                entry = json.loads(cache.read_text())
            res.setdefault(name, {})[str(seed)] = entry
            bar.update(1)
    return res


# ------------------------------------------------------------------------------ theory side
def bounds_of_run(constants, lams: list[float], gain_bits: float) -> dict:
    """Theorem E.3 over the fitted steps and Theorem E.4 at the measured gain, in bits
    (`theory.bounds.theorem_e3_cumulative`, `theorem_e4_at_gain`; ``T`` = evaluation intervals)."""
    from theory import bounds as B

    c = constants
    out: dict = {"A": c.A if np.isfinite(c.C1) else float("nan")}
    lam = np.asarray(lams, dtype=float)
    out["e3_curve_bits"] = (B.theorem_e3_cumulative(lam, c, unit="bits").tolist()
                            if lam.size and np.isfinite(c.C1) else [])
    try:
        out["e4_bound_bits"] = B.theorem_e4_at_gain(max(int(lam.size), 1), gain_bits, c, unit="bits")
    except ValueError as exc:
        out["e4_bound_bits"] = None
        out["e4_error"] = str(exc).splitlines()[0]
    return out


# --------------------------------------------------------------------------------- driver
def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole study into ``cfg.out`` (report.md, figures, results.json), reusing the runs a
    previous call cached there (see the module docstring); `sft.runs.RunDirError` when ``cfg.out``
    is a non-empty folder that is not a demo's, or another process is using it."""
    import torch
    from transformers.utils import logging as hf_logging

    from sft.runs import open_run_dir

    t_start = time.perf_counter()
    out = Path(cfg.out)
    lock = open_run_dir(out, resume=False, overwrite=cfg.overwrite, kind="demo",
                        hint=DEMO_HINT)
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide models are all per-op overhead: one thread is fastest
    bars = hf_logging.is_progress_bar_enabled()
    if not cfg.progress:  # also transformers' "Loading weights" bars (a cached world's checkpoint)
        hf_logging.disable_progress_bar()
    try:
        return _run(cfg, out, t_start)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
        lock.release()


def run_key(world_cfg, method: str, lr: float, cfg: DemoConfig) -> str:
    """Hash of everything one fine-tuning run of the demo depends on (its cache file's name)."""
    blob = json.dumps({"v": 1, "world": asdict(world_cfg), "method": method, "lr": lr, "steps": cfg.steps,
                       "batch": cfg.batch, "eval_every": cfg.eval_every, "seed": cfg.seed,
                       "wise_alphas": list(cfg.wise_alphas) if method == "ce" else None,
                       "token_probs": lr == max(cfg.lrs)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_cached(path: Path) -> dict | None:
    """A run's cache file, or None when absent or unreadable (then the run is redone)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _run(cfg: DemoConfig, out: Path, t_start: float) -> dict:
    from sft.analysis import frac_above, token_probs
    from sft.treeprobs import exact_full_logprobs
    from sft.worlds import WorldConfig, build_world, exact_metrics, pretrain
    from theory.claims import run_ledger

    from ..outputs import write_json
    from . import demo_report as report

    wfactory = WorldConfig.smoke if cfg.preset == "smoke" else WorldConfig.default
    results: dict = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                     "variants": {}}

    def methods_of(variant):
        return cfg.label_methods if variant == "label" else cfg.methods

    bar = _bar(n_units(cfg), cfg.progress, "demo")
    for variant in cfg.variants:
        world = build_world(wfactory(variant=variant, seed=cfg.seed, **cfg.world_overrides))
        model0, info = pretrain(world, cfg.cache_dir)
        base_logq1 = exact_full_logprobs(model0, world.p1, bos_id=world.bos_id, eos_id=world.eos_id)
        base = exact_metrics(model0, world, logq_p1_full=base_logq1)
        base_logq = exact_full_logprobs(model0, world.p2, bos_id=world.bos_id, eos_id=world.eos_id, renormalize=True)
        est = appendix_e_constants(world, model0)
        bar.update(1)
        vres = {"pretrain": {k: v for k, v in info.items() if k != "config"}, "base": base,
                "constants": est.to_dict(), "runs": {}, "wise": {}}
        probs0 = token_probs(model0, None, world.d2_train, batch_size=64, pad_token_id=world.pad_id, progress=False)
        vres["token_probs"] = {"q0": probs0}
        for method in methods_of(variant):
            for lr in cfg.lrs:
                name = f"{method}@{lr:g}"
                run_dir = out / "runs" / variant / name.replace("@", "_lr")
                cache = run_dir.with_name(f"{run_dir.name}.{run_key(world.cfg, method, lr, cfg)}.json")
                done = _load_cached(cache)
                if done is None:
                    done = _one_run(world, model0, method, lr, cfg, run_dir, base, base_logq, base_logq1, est)
                    write_json(cache, done)
                    done = json.loads(cache.read_text())  # the same values whether fresh or cached
                vres["runs"][name] = done["summary"]
                vres["wise"].update(done["wise"])
                if done["token_probs"] is not None:
                    vres["token_probs"][name] = [np.asarray(p, dtype=float) for p in done["token_probs"]]
                bar.update(1)
        vres["seed_runs"] = seed_runs(world, model0, variant, cfg, out, (base, base_logq, base_logq1), bar)
        results["variants"][variant] = vres
    bar.close()
    results["findings"] = findings(results, cfg)
    results["ledger"] = [c.to_dict() for c in run_ledger(n=cfg.ledger_n, seed=cfg.seed)]
    results["wall_seconds"] = time.perf_counter() - t_start
    report.write(results, out)
    # the token-probability arrays are for figures only; keep results.json small
    slim = copy.deepcopy(results)
    for v in slim["variants"].values():
        v["token_probs"] = {k: {"median": float(np.median(np.concatenate(p))) if p else None,
                                "frac_p_gt_0.2": frac_above(p)} for k, p in v["token_probs"].items()}
    write_json(out / "results.json", slim)
    return slim


def findings(results: dict, cfg: DemoConfig) -> dict:
    """The paper's findings, tested on this run's numbers. Each verdict (`experiments.outputs.seed_verdict`)
    rests on every fine-tuning seed of the configurations it compares and is "undecided" when the
    seeds' ranges overlap; the other entries describe the first seed's runs."""
    f: dict = {}
    for variant, v in results["variants"].items():
        entry = variant_findings(v, cfg)
        if entry is not None:
            entry["finding2_tight"] = finding2_per_token(results["variants"])
            f[variant] = entry
    if "cot" in f and "label" in f:
        f["finding2"] = finding2(results["variants"], cfg)
    return f


def seed_values(v: dict, name: str) -> list[dict]:
    """Run ``name``'s summaries, one per fine-tuning seed: the main run, then `seed_runs` in seed order."""
    extra = v.get("seed_runs", {}).get(name, {})
    return [v["runs"][name]] + [extra[k] for k in sorted(extra, key=int)]


def variant_findings(v: dict, cfg: DemoConfig) -> dict | None:
    """Findings of one world variant (None without CE at both the smallest and the largest rate)."""
    small, large = min(cfg.lrs), max(cfg.lrs)
    runs = v["runs"]
    if f"ce@{small:g}" not in runs or f"ce@{large:g}" not in runs:
        return None
    a, b = runs[f"ce@{small:g}"], runs[f"ce@{large:g}"]
    entry = {
        "ce_small": {"dL_P1_bits": a["dL_P1_bits"], "gain_bits": a["domain_gain_bits"], "acc": a["domain_acc"]},
        "ce_large": {"dL_P1_bits": b["dL_P1_bits"], "gain_bits": b["domain_gain_bits"], "acc": b["domain_acc"]},
        "s_hard_per_example": v["constants"].get("s"),
        "finding1": finding1(v, f"ce@{small:g}", f"ce@{large:g}"),
        "degradation_ratio_large_over_small": _ratio(b["dL_P1_bits"], a["dL_P1_bits"]),
    }
    f1 = entry["finding1"]
    entry.update(equal_gain_bits=f1["equal_gain_bits"][0], dL_P1_at_equal_gain_small=f1["small"][0],
                 dL_P1_at_equal_gain_large=f1["large"][0])
    talr = talr_retention(v, large)
    if talr is not None:
        entry.update(talr)
    bounds = [r["e4_bound_bits"] / r["dL_P1_bits"] for r in runs.values()
              if r.get("e4_bound_bits") is not None and r["dL_P1_bits"] > 1e-9]
    entry["e4_tightness"] = {"n": len(bounds), "median": float(np.median(bounds)) if bounds else None,
                             "min": float(np.min(bounds)) if bounds else None}
    entry["prefix_tightness"] = prefix_tightness(runs, v["base"])
    entry["ranking"] = rankings(runs, cfg.lrs)
    entry["pareto"] = pareto_runs(v)
    entry["sin_theta_median"] = {k: (float(np.median(r["sin_theta"])) if r.get("sin_theta") else None)
                                 for k, r in runs.items()}
    return entry


def _ratio(num: float, den: float) -> float | None:
    return num / den if abs(den) > 1e-12 else None


def finding1(v: dict, small: str, large: str) -> dict:
    """Finding 1 (a smaller rate degrades P1 less at an equal domain gain), seed by seed: each seed's
    CE runs at the two rates compared at the smaller of their two gains."""
    per = []
    for a, b in zip(seed_values(v, small), seed_values(v, large)):
        common = min(a["domain_gain_bits"], b["domain_gain_bits"])
        da = interp_at_gain(a["points"], v["base"], common) if common > 0 else None
        db = interp_at_gain(b["points"], v["base"], common) if common > 0 else None
        per.append((common, da, db))
    small_d, large_d = [p[1] for p in per], [p[2] for p in per]
    return {"verdict": seed_verdict(small_d, large_d), "n_seeds": len(per),
            "equal_gain_bits": [p[0] for p in per], "small": small_d, "large": large_d}


def talr_retention(v: dict, large: float) -> dict | None:
    """TALR at the largest rate against every other method there: "is the best" when its dL(P1) is
    below each other method's in every seed (ranges apart), "is not the best" when some method's
    range lies wholly below TALR's. The ranking is the first seed's."""
    names = [k for k in v["runs"] if k.endswith(f"@{large:g}")]
    talr = f"talr@{large:g}"
    if talr not in names or f"ce@{large:g}" not in names:
        return None
    vals = {k: [r["dL_P1_bits"] for r in seed_values(v, k)] for k in names}
    ranking = sorted(names, key=lambda k: vals[k][0])
    against = [seed_verdict(vals[talr], x, yes="lower", no="higher") for k, x in vals.items() if k != talr]
    verdict = ("is the best" if all(x == "lower" for x in against)
               else "is not the best" if "higher" in against else "undecided")
    return {"retention_rank_at_large_lr": ranking,
            "talr_retention": {"verdict": verdict, "n_seeds": min(len(x) for x in vals.values()),
                               "dL_P1_bits": vals}}


def finding2(variants: dict, cfg: DemoConfig) -> dict:
    """Finding 2 (label-only widens the safe range): CE's degradation ratio large/small rate, seed by
    seed, is lower label-only than with CoT."""
    small, large = f"ce@{min(cfg.lrs):g}", f"ce@{max(cfg.lrs):g}"
    ratios = {k: [_ratio(b["dL_P1_bits"], a["dL_P1_bits"])
                  for a, b in zip(seed_values(variants[k], small), seed_values(variants[k], large))]
              for k in ("label", "cot")}
    return {"verdict": seed_verdict(ratios["label"], ratios["cot"]),
            "n_seeds": min(len(x) for x in ratios.values()), **ratios}


def prefix_tightness(runs: dict, base: dict) -> dict:
    """Per-prefix bound / measured dL(P1) at the end of each run (median, max over runs with
    dL(P1) > 0), violations over every evaluation point, and the largest gap between the
    decomposition's exact delta and the measured dL(P1) (a consistency check, bits)."""
    kinds = {"kl": "prefix_bound_kl_bits", "kl_global": "prefix_bound_kl_global_bits",
             "nodewise": "prefix_bound_nodewise_bits", "floor": "prefix_floor_bits"}
    ratios, more, viol, n_pts, gap, kl_dom = [], {k: [] for k in kinds}, 0, 0, 0.0, 0
    for r in runs.values():
        for p in r["points"]:
            if p.get("prefix_bound_bits") is None:
                continue
            meas = p["kl_p1_bits"] - base["kl_p1_bits"]
            n_pts += 1
            viol += int(min(p["prefix_bound_bits"], p.get("prefix_bound_kl_bits", np.inf)) < meas - 1e-9)
            gap = max(gap, abs(p["prefix_delta_bits"] - meas))
        last = r["points"][-1]
        meas = last["kl_p1_bits"] - base["kl_p1_bits"]
        if last.get("prefix_bound_bits") is not None and meas > 1e-9:
            ratios.append(last["prefix_bound_bits"] / meas)
            kl_dom += int(last["prefix_kl_term_bits"] >= abs(last["prefix_first_order_bits"]))
            for k, key in kinds.items():
                if last.get(key) is not None:
                    more[k].append(last[key] / meas)
    med = lambda x: float(np.median(x)) if x else None  # noqa: E731
    return {"n_runs": len(ratios), "median": med(ratios), "max": float(np.max(ratios)) if ratios else None,
            "violations": viol, "n_points": n_pts, "max_identity_gap_bits": gap,
            **{f"median_{k}": med(v) for k, v in more.items()}, "n_kl_term_dominant": kl_dom}


def rankings(runs: dict, lrs) -> dict:
    """Methods ranked at each learning rate by dL(P1) (least first) and by P1 mode accuracy
    (highest first)."""
    out = {}
    for lr in lrs:
        at = {k.split("@")[0]: r for k, r in runs.items() if float(k.split("@")[1]) == lr}
        out[f"{lr:g}"] = {"by_kl": sorted(at, key=lambda k: at[k]["dL_P1_bits"]),
                          "by_mode_acc": sorted(at, key=lambda k: -(at[k].get("mode_acc_p1") or 0.0))}
    return out


def pareto_runs(v: dict) -> list[str]:
    """Names of the Pareto-optimal runs and WiSE-FT merges (max domain gain, min dL(P1))."""
    from .demo_report import pareto_front

    items = list(v["runs"].items()) + list(v.get("wise", {}).items())
    pts = [(r["domain_gain_bits"], -r["dL_P1_bits"]) for _, r in items]
    return [items[i][0] for i in pareto_front(pts)]


def finding2_per_token(variants: dict) -> dict | None:
    """Finding 2 under the tight (per-token, no relaxation (14)) form of Theorem E.5 and under the
    paper's V_s, on this run's constants: lambda_max(label) / lambda_max(CoT) (> 1 = label-only
    tolerates larger steps). `theory.claims_corrected.finding_2_direction`."""
    from theory.claims_corrected import finding_2_direction

    if not {"cot", "label"} <= set(variants):
        return None
    consts = {}
    for k in ("cot", "label"):
        c = variants[k]["constants"]
        if any(c.get(x) is None for x in ("s", "m", "M_h", "M_l")):
            return None
        consts[k] = {"s": c["s"], "m": c["m"], "M_h": c["M_h"], "M_l": c["M_l"]}
    return finding_2_direction(consts)


def _bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="run")
