"""Ablation of the forecast's parts, scored against an already trained validation grid
(`talr study forecast --out DIR`, or its grid alone, must have run): the adopted forecast and
variants with one part changed -- no size probe (the replay's own size), no rotation, the
moments stored in bf16 (memory), no noise floor, the rotation that shrinks the gradient instead of
turning the steps, both (the previous replay) -- and, for each variant, the largest and median relative
change of its 30 forecasts against the adopted one (what that change costs or buys).

Prints one JSON line per variant: spearman, spearman_within_lr, within_2x (0.01 bits/token
counts as zero), advisor_hit_rate, advisor_within_budget, compute_ratio. Nothing is written.

    PYTHONPATH=$PWD .venv/bin/python -m experiments.bench.forecast_ablation --world-seed 0 --out runs/study_w0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

# version 3's settings, the defaults before version 5 (FORECAST_MODEL 3); every variant below except
# "adopted" (the defaults: version 7 since session 12; version 5 before), "version5", "version6" and the V5-based ones is version 3 plus its
# changes, as when it was scored
V3 = {"kl_term_only": False, "l2_relax": "", "size_axis": "rate", "coherence_fit": "log", "replay_block": 10,
      "lora_block": 2, "fit_block": 1, "n_general": 128, "tau_track": False, "tracker_weight": False,
      "cross_fit": False, "token_tracker": False, "size_model": "replay"}
V4 = {**V3, "kl_term_only": True, "coherence_fit": "linear", "fit_block": 12, "size_probe": False, "replay_block": 25,
      "lora_block": 3}  # tried as FORECAST_MODEL 4, not adopted (docs/forecast/README.md, version 4)
V5 = {"kl_term_only": True, "l2_relax": "tracked", "size_axis": "lambda", "coherence_fit": "linear",
      "replay_block": 25, "lora_block": 3, "fit_block": 12, "n_general": 96, "tau_track": False,
      "tracker_weight": False, "cross_fit": False, "token_tracker": False,
      "size_model": "replay"}  # version 5 (docs/forecast/README.md)
VARIANTS = {"adopted": {}, "version3": V3, "no_size_probe": {**V3, "size_probe": False},
            "no_rotation": {**V3, "coherence": False},
            "bf16_moments": {**V3, "store_dtype": "bfloat16"}, "no_noise_floor": {**V3, "noise_floor": False},
            "shrinking_rotation": {**V3, "keep_norm": False},  # the gradient x exp(-Lambda / lam_c) rule
            "previous_replay": {**V3, "noise_floor": False, "keep_norm": False},
            "exact_replay": {**V3, "replay_block": 1, "lora_block": 1},  # Adam's denominator every step (no blocks)
            "block25": {**V3, "replay_block": 25},
            "cheap_probe": {**V3, "replay_block": 25, "n_batches": 4, "probe_steps": 8},  # fewer model passes
            "no_l2_energy": {**V3, "l2_energy": False},  # L2's own first-order replay with its pull
            "version2": {**V3, "replay_block": 1, "lora_block": 1, "l2_energy": False},  # FORECAST_MODEL 2
            # version 4 (tried, not adopted) and its parts, added one at a time to version 3
            "version4": V4,
            "kl_term": {**V3, "kl_term_only": True},  # dL(P1) = the KL term of the decomposition on the D1 sample
            "kl_linear": {**V3, "kl_term_only": True, "coherence_fit": "linear"},  # + lam_c from the cosines themselves
            "kl_linear_nsp": {**V3, "kl_term_only": True, "coherence_fit": "linear", "size_probe": False},  # + no size probe
            "kl_linear_nsp_b25": {**V3, "kl_term_only": True, "coherence_fit": "linear", "size_probe": False, "replay_block": 25},
            "kl_linear_nsp_b25_lora3": {**V4, "fit_block": 1},  # + LoRA blocks of 3; + fit_block 12 = version 4
            "v4_n_batches4": {**V4, "fit_block": 1, "lora_block": 2, "n_batches": 4},  # 4 probe batches instead
            # version 5 (docs/forecast/README.md): the KL term with the size probe kept, L2 relaxed by Adam's pull,
            # the size ratio in summed rate, and its parts added one at a time to `kl_term`
            "version5": V5,
            "kl_l2relax0": {**V3, "kl_term_only": True, "l2_relax": "theta0"},  # sigma at theta0 (barely binds)
            "kl_l2relax": {**V3, "kl_term_only": True, "l2_relax": "tracked"},  # sigma at the tracked loss
            "kl_lam": {**V3, "kl_term_only": True, "size_axis": "lambda"},  # the size ratio in summed rate alone
            "kl_l2relax0_lam": {**V3, "kl_term_only": True, "l2_relax": "theta0", "size_axis": "lambda"},
            "kl_l2relax_lam": {**V3, "kl_term_only": True, "l2_relax": "tracked", "size_axis": "lambda"},
            "kl_l2relax_lam_blocks": {**V3, "kl_term_only": True, "l2_relax": "tracked", "size_axis": "lambda", "replay_block": 25,
                                      "lora_block": 3, "fit_block": 12},  # the compute cuts without the linear lam_c
            "kl_l2relax_lam_lin": {**V3, "kl_term_only": True, "l2_relax": "tracked", "size_axis": "lambda",
                                   "coherence_fit": "linear"},
            "v5_n_general128": {**V5, "n_general": 128},  # + blocks 25 / 3 / 12; + 96 D1 sequences = version 5
            "v5_n_batches5": {**V5, "n_general": 128, "n_batches": 5},  # (tried instead of the 96 sequences)
            "v5_seed1": {**V5, "seed": 1},  # other probe batches and probe draws: the scores' noise
            "tau_track": {**V5, "tau_track": True},
            "tracker_weight": {**V5, "tracker_weight": True},  # the tracker's progress x the token-weight ratio
            "tau_track_tw": {**V5, "tau_track": True, "tracker_weight": True},  # = version 6 (not adopted)
            "version6": {**V5, "tau_track": True, "tracker_weight": True},  # + TALR's tau following the tracked loss
            # the tracker's alignment without the batches' own noise (`GradientMoments.alignment`): CE's debiased,
            # the other methods' moments on batches disjoint from CE's
            "cross_fit": {**V5, "cross_fit": True},
            "token_tracker": {**V5, "token_tracker": True},  # the domain loss tracked token by token (`TokenTracker`)
            # the decorrelated path's damage summed over its steps, KL(theta0 + F d) / F (`additive_dl`; session 12)
            "additive": {**V5, "additive": True},
            # candidate 7 (session 12): the size by diffusion where the probe's gradient is a random walk
            "auto": {**V5, "size_model": "auto"}}


def score_forecast(cfg, fc: dict, runs: list[dict], zero_tol: float) -> dict:
    """The forecast's summary figures against the grid's seed-mean measurements."""
    from experiments.studies.forecast import measured_scores as measured
    from sft.forecast_metrics import advisor_scores, budgets_over, spearman, spearman_within_lr, within_2x

    meas = measured(cfg, fc, runs)
    rows, lrs = fc["rows"], sorted(cfg.lrs)
    method = np.array([r["method"] for r in rows])
    li = np.array([lrs.index(r["lr"]) for r in rows])
    dl = np.array([r["dL_P1_bits"] for r in rows])
    gain = np.array([r["domain_gain_bits"] for r in rows])
    adv = advisor_scores(method, li, dl, gain, meas["dl"], meas["gain"], budgets_over(meas["dl"], cfg.n_budgets))
    return {"spearman": spearman(dl, meas["dl"]), "spearman_within_lr": spearman_within_lr(li, dl, meas["dl"]),
            "within_2x": within_2x(dl, meas["dl"], zero_tol), "advisor_hit_rate": adv["advisor_hit_rate"],
            "advisor_within_budget": adv["advisor_within_budget"], "compute_ratio": fc["compute"]["compute_ratio"]}


def _table_runs(path: str) -> list[dict]:
    """One pseudo-run per row of a stored summary's table (its seed-mean measurements)."""
    rows = json.loads(Path(path).read_text())["table"]
    return [{"spec": {"method": r["method"], "lr": r["lr"], "seed": 0}, "dL_P1_bits": r["measured_dL_P1_bits"],
             "domain_gain_bits": r["measured_gain_bits"], "kl_q0_qT_domain_bits": float("nan")} for r in rows]


def _stored_runs(cfg, wcfg, out: str) -> list[dict]:
    from experiments.studies.forecast_grid import RunSpec

    paths = [Path(out, "runs", f"{RunSpec(wcfg.key(), wcfg.variant, m, float(lr), cfg.steps, cfg.batch, s).key()}.json")
             for s in cfg.seeds for m in cfg.methods for lr in cfg.lrs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"{out}/runs: {len(missing)} of {len(paths)} runs missing; train the grid first")
    return [json.loads(p.read_text()) for p in paths]


def main(argv=None) -> None:
    import torch

    from experiments.studies import forecast as S
    from sft.forecast_run import forecast_grid
    from sft.worlds import build_world, pretrain

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2", help="the training seeds of the stored runs (comma list)")
    ap.add_argument("--out", required=True, help="the study's folder (its runs/ are read)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {','.join(VARIANTS)}")
    ap.add_argument("--measured", help="a summary.json whose table holds the seed-mean measurements (worlds whose "
                    "runs are not stored); else --out's runs/")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = S.make_config("default", world_seed=a.world_seed, steps=a.steps, batch=a.batch_size, out=a.out,
                        progress=False, seeds=tuple(int(x) for x in a.seeds.split(",")))
    wcfg = S.world_config(cfg)
    runs = _table_runs(a.measured) if a.measured else _stored_runs(cfg, wcfg, a.out)
    world = build_world(wcfg)
    model0, _ = pretrain(world, cfg.cache_dir)
    d1 = S.general_sample(world, S.forecast_config(cfg, world).n_general)
    ref = None
    for name in a.variants.split(","):
        fcfg = dataclasses.replace(S.forecast_config(cfg, world), **VARIANTS[name])
        fc = forecast_grid(model0, world.d2_train, d1, fcfg, progress=False,
                           d1_tree=S.general_tree(world, fcfg.n_general))
        dl = np.array([r["dL_P1_bits"] for r in fc["rows"]])
        ref = dl if ref is None else ref
        rel = np.abs(dl - ref) / np.maximum(np.abs(ref), 1e-12)
        meas = S.measured_scores(cfg, fc, runs)["dl"]
        ratios = {m: [round(float(f / x), 2) for f, x, r in zip(dl, meas, fc["rows"]) if r["method"] == m]
                  for m in cfg.methods}  # forecast / measured by rate, the smallest first
        print(json.dumps({"world_seed": a.world_seed, "variant": name, **score_forecast(cfg, fc, runs, S.zero_tolerance(d1)),
                          "replay_ratio": fc["compute"]["replay_ratio"], "max_rel_change": float(rel.max()),
                          "median_rel_change": float(np.median(rel)), "forecast_over_measured": ratios}))


if __name__ == "__main__":
    main()
