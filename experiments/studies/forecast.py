"""Validation study of `sft.forecast` in the tiny-transformer world (`talr study forecast`).

1. Build the CoT world (``--world-seed``), pretrain (cached), and forecast the whole grid
   (methods x learning rates, T steps, batch B) from theta0 with `sft.forecast_run`
   (compute counted; the forecast is cached in ``DIR/forecast.json``).
2. Train every configuration with 3 seeds and measure its exact dL(P1) and domain gain as the
   demo does (`experiments.studies.forecast_grid`, cached per run).
3. Score the forecast and the baselines against the seed-mean measurements
   (`sft.forecast_metrics`) and write ``summary.json``, ``table.md``,
   ``forecast_vs_measured.png`` and ``tradeoff.png``.

Baselines (each what a user would otherwise do; their magnitudes are scaled to the forecast's
own CE probe -- same rate, same steps -- so that ``within_2x`` is defined):
(0) ``lr_alone``: dL proportional to the summed rate sum_t eta_t (method-blind);
(a) ``paper_rule``: Theorem E.5/B.3's degradation T (C1 lam^2 + H_T V_s lam) (eq. (19)) with the
    constants of `theory.estimate` at q0 and lam = c eta, c from the probe;
(b) ``finch``: sum_t eta_t sqrt(L_t), L_t the probe's domain loss curve (held at its last value
    after the probe), scaled at the probe;
(c) ``power_law``: per rate, a CE probe's dL(P1) on the D1 sample fitted as a t^b, read at T
    (its own compute is reported);
(d) ``kl_domain_after``: KL(q0 || q_T) on the domain prompts, measured after training (the
    ceiling a before-training forecast tries to approach; raw bits).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sft.methods import forecast_methods
from sft.world_runs import general_sample, general_tree

from sft.forecast_metrics import advisor_scores, budgets_over, spearman, spearman_within_lr, within_2x

LN2 = math.log(2.0)


@dataclass
class ForecastStudyConfig:
    preset: str = "default"
    out: str = "runs/forecast_study"
    world_seed: int = 0
    methods: tuple = field(default_factory=forecast_methods)  # the registry's (`sft.methods`)
    lrs: tuple = (3e-5, 9.49e-5, 3e-4, 9.49e-4, 3e-3)
    seeds: tuple = (0, 1, 2)
    steps: int = 150
    batch: int = 16
    workers: int = 2
    n_budgets: int = 6
    cache_dir: str | None = None  # None: the user cache (sft.runs.user_cache_dir("worlds"))
    progress: bool = True
    world_overrides: dict = field(default_factory=dict)


PRESETS = {
    "default": {},
    "smoke": dict(methods=("ce", "talr", "l2"), lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1), steps=6, batch=8, workers=1,
                  n_budgets=5),
}


def make_config(preset: str = "default", **overrides) -> ForecastStudyConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return ForecastStudyConfig(preset=preset, **{**PRESETS[preset], **overrides})


def world_config(cfg: ForecastStudyConfig):
    from sft.worlds import WorldConfig

    factory = WorldConfig.smoke if cfg.preset == "smoke" else WorldConfig.default
    return factory(variant="cot", seed=cfg.world_seed, **cfg.world_overrides)


def forecast_config(cfg: ForecastStudyConfig, world):
    from sft.forecast import ForecastConfig

    kw = dict(methods=tuple(cfg.methods), lrs=tuple(cfg.lrs), steps=cfg.steps, batch=cfg.batch,
              pad_token_id=world.pad_id)
    if cfg.preset == "smoke":
        kw.update(n_batches=2, n_general=16, probe_steps=3)
    return ForecastConfig(**kw)


# ---------------------------------------------------------------------------------- baselines
def paper_rule_constants(world, model0) -> dict:
    """H_T V_s and C1 of Theorem E.5 (= B.3) at q0 (nats), as the demo estimates them."""
    from sft.world_runs import appendix_e_constants

    c = appendix_e_constants(world, model0).constants
    return {"H_T_V_s": float(c.H_T * c.V_s), "C1": float(c.C1) if math.isfinite(c.C1) else 0.0}


def paper_rule_dl(lrs_t: np.ndarray, c: float, HV: float, C1: float) -> float:
    """Theorem E.5 (= B.3), eq. (19) summed over steps: sum_t (C1 lam_t^2 + H_T V_s lam_t), in bits."""
    lam = c * np.asarray(lrs_t)
    return float(np.sum(C1 * lam**2 + HV * lam) / LN2)


def baselines(cfg: ForecastStudyConfig, fc: dict, rule: dict, power: dict) -> dict[str, list[float]]:
    """Per configuration (the forecast's row order) each before-training baseline's dL (bits)."""
    from scipy.optimize import brentq

    from sft.forecast import cosine_lrs

    probe = fc["probe"]
    plrs = np.asarray(probe["lrs"])
    pdl = max(float(probe["dL_P1_bits"]), 1e-9)
    loss = np.asarray(probe["loss_nats"])[:, 2]
    out: dict[str, list[float]] = {"lr_alone": [], "paper_rule": [], "finch": [], "power_law": []}
    # (a) lam = c * eta with c such that the rule reproduces the probe
    HV, C1 = rule["H_T_V_s"], rule["C1"]
    f = lambda c: paper_rule_dl(plrs, c, HV, C1) - pdl  # noqa: E731
    c_a = brentq(f, 0.0, 1e6) if f(1e6) > 0 else float("nan")
    finch_probe = float(np.sum(plrs * np.sqrt(loss)))
    lr_index = {lr: i for i, lr in enumerate(sorted(cfg.lrs))}
    for row in fc["rows"]:
        lrs_t = cosine_lrs(row["lr"], cfg.steps)
        out["lr_alone"].append(pdl * lrs_t.sum() / plrs.sum())
        out["paper_rule"].append(paper_rule_dl(lrs_t, c_a, HV, C1))
        L_t = np.concatenate([loss, np.full(max(0, cfg.steps - loss.size), loss[-1])])[: cfg.steps]
        out["finch"].append(pdl * float(np.sum(lrs_t * np.sqrt(L_t))) / finch_probe)
        out["power_law"].append(power["dL_P1_bits"][lr_index[row["lr"]]])
    return out


# ------------------------------------------------------------------------------------- study
def run_study(cfg: ForecastStudyConfig) -> dict:
    """Run (or resume) the study into ``cfg.out``; returns the summary."""
    import torch

    from experiments.outputs import write_json

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg, out, write_json)
    finally:
        torch.set_num_threads(threads)


def _cached_json(path: Path, make, write, request: dict | None = None):
    """``path``'s JSON when it exists (and, with ``request``, was made for it), else ``make()`` written there."""
    import json

    if path.exists():
        old = json.loads(path.read_text())
        if request is None or old.get("request") == request:
            return old
    obj = make()
    if request is not None:
        obj["request"] = request
    write(path, obj)
    return json.loads(path.read_text())


def _run(cfg: ForecastStudyConfig, out: Path, write) -> dict:
    from sft.forecast_run import forecast_grid, power_law_probes
    from sft.worlds import build_world, pretrain

    from .forecast_grid import RunSpec, run_grid

    wcfg = world_config(cfg)
    world = build_world(wcfg)
    model0, _ = pretrain(world, cfg.cache_dir)
    fcfg = forecast_config(cfg, world)
    d1 = general_sample(world, fcfg.n_general)

    def make_fc():
        t0 = time.perf_counter()
        res = forecast_grid(model0, world.d2_train, d1, fcfg, progress=cfg.progress,
                            d1_tree=general_tree(world, fcfg.n_general))
        res["seconds"] = time.perf_counter() - t0
        return res

    request = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(fcfg).items()}
    fc = _cached_json(out / "forecast.json", make_fc, write, request)
    power = _cached_json(out / "baseline_power_law.json",
                         lambda: power_law_probes(model0, world.d2_train, d1, fcfg), write)
    rule = _cached_json(out / "baseline_paper_rule.json", lambda: paper_rule_constants(world, model0), write)
    specs = [RunSpec(wcfg.key(), wcfg.variant, m, float(lr), cfg.steps, cfg.batch, s)
             for s in cfg.seeds for m in cfg.methods for lr in cfg.lrs]
    t0 = time.perf_counter()
    runs = run_grid(specs, wcfg, out, cache_dir=cfg.cache_dir, workers=cfg.workers, progress=cfg.progress)
    grid_seconds = time.perf_counter() - t0
    summary = score(cfg, fc, runs, baselines(cfg, fc, rule, power), power, zero_tol=zero_tolerance(d1))
    summary.update(world_seed=cfg.world_seed, preset=cfg.preset, world_key=wcfg.key(),
                   config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                   forecast_seconds=fc.get("seconds"), grid_seconds_this_call=grid_seconds,
                   mean_run_seconds=float(np.mean([r["seconds"] for r in runs])))
    write(out / "summary.json", summary)
    from .forecast_report import write_report

    write_report(out, summary)
    return summary


def measured_scores(cfg: ForecastStudyConfig, fc: dict, runs: list[dict]) -> dict[str, np.ndarray]:
    by = {}
    for r in runs:
        s = r["spec"]
        by.setdefault((s["method"], float(s["lr"])), []).append(r)
    keys = [(row["method"], float(row["lr"])) for row in fc["rows"]]
    seed_sorted = [sorted(by[k], key=lambda r: r["spec"]["seed"]) for k in keys]
    return {
        "dl": np.array([np.mean([r["dL_P1_bits"] for r in rs]) for rs in seed_sorted]),
        "gain": np.array([np.mean([r["domain_gain_bits"] for r in rs]) for rs in seed_sorted]),
        "kl_domain": np.array([np.mean([r["kl_q0_qT_domain_bits"] for r in rs]) for rs in seed_sorted]),
        "dl_seed_a": np.array([rs[0]["dL_P1_bits"] for rs in seed_sorted]),
        "dl_seed_b": np.array([rs[1]["dL_P1_bits"] if len(rs) > 1 else np.nan for rs in seed_sorted]),  # one seed: no ceiling
        "dl_sd": np.array([np.std([r["dL_P1_bits"] for r in rs]) for rs in seed_sorted]),
    }


ZERO_BITS_PER_TOKEN = 0.01  # |dL| below this per token is "no change": within 2x whatever the ratio


def zero_tolerance(d1: list[dict]) -> float:
    """0.01 bits/token in the study's unit (bits per D1 sequence): x the mean predicted tokens of a sequence."""
    return ZERO_BITS_PER_TOKEN * float(np.mean([sum(1 for x in e["labels"] if x >= 0) for e in d1]))


def score(cfg: ForecastStudyConfig, fc: dict, runs: list[dict], base: dict, power: dict, zero_tol: float = 0.0) -> dict:
    """Every figure of the summary (see the module docstring and `sft.forecast_metrics`); ``within_2x``
    counts a configuration within when |forecast - measured| <= max of the two / 2 or both are within
    ``zero_tol`` of zero."""
    rows = fc["rows"]
    meas = measured_scores(cfg, fc, runs)
    lrs = sorted(cfg.lrs)
    method = np.array([r["method"] for r in rows])
    lr_index = np.array([lrs.index(r["lr"]) for r in rows])
    fc_dl = np.array([r["dL_P1_bits"] for r in rows])
    fc_gain = np.array([r["domain_gain_bits"] for r in rows])
    budgets = budgets_over(meas["dl"], cfg.n_budgets)

    def figures(pred, gain=fc_gain):
        adv = advisor_scores(method, lr_index, pred, gain, meas["dl"], meas["gain"], budgets)
        return {"spearman": spearman(pred, meas["dl"]),
                "spearman_within_lr": spearman_within_lr(lr_index, pred, meas["dl"]),
                "within_2x": within_2x(pred, meas["dl"], zero_tol), **adv}

    main = figures(fc_dl)
    table = []
    for i, r in enumerate(rows):
        table.append({"method": r["method"], "lr": r["lr"], "forecast_dL_P1_bits": fc_dl[i],
                      "measured_dL_P1_bits": meas["dl"][i], "measured_dL_P1_sd": meas["dl_sd"][i],
                      "forecast_gain_bits": fc_gain[i], "measured_gain_bits": meas["gain"][i],
                      **{f"{k}_dL_P1_bits": v[i] for k, v in base.items()},
                      "kl_domain_after_bits": meas["kl_domain"][i]})
    base_figs = {k: figures(np.asarray(v)) for k, v in base.items()}
    base_figs["lr_alone"]["compute_ratio"] = fc["compute"]["compute_ratio"]  # shares the forecast's probe
    base_figs["paper_rule"]["compute_ratio"] = fc["compute"]["compute_ratio"]
    base_figs["finch"]["compute_ratio"] = fc["compute"]["compute_ratio"]
    base_figs["power_law"]["compute_ratio"] = power["compute_ratio"]
    base_figs["kl_domain_after"] = {"spearman": spearman(meas["kl_domain"], meas["dl"]),
                                    "spearman_within_lr": spearman_within_lr(lr_index, meas["kl_domain"], meas["dl"]),
                                    "within_2x": within_2x(meas["kl_domain"], meas["dl"], zero_tol),
                                    "compute_ratio": None, "note": "needs every trained model"}
    return {
        "n_configs": int(len(rows)), "n_runs": int(len(runs)), "n_seeds": len(cfg.seeds),
        **{k: v for k, v in main.items() if k != "budgets"},
        "spearman_ceiling": spearman(meas["dl_seed_a"], meas["dl_seed_b"]),
        "spearman_within_lr_ceiling": spearman_within_lr(lr_index, meas["dl_seed_a"], meas["dl_seed_b"]),
        "compute_ratio": fc["compute"]["compute_ratio"], "compute": fc["compute"], "within_2x_zero_tol_bits": zero_tol,
        "advisor_budgets": main["budgets"], "probe": {k: v for k, v in fc["probe"].items() if k != "loss_nats"},
        "baselines": {k: {kk: vv for kk, vv in v.items() if kk != "budgets"} for k, v in base_figs.items()},
        "table": table,
    }
