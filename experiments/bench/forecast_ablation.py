"""Ablation: the forecast with and without the probe-measured gradient rotation (`sft.forecast.coherence`),
scored against an already trained validation grid (`talr study forecast --out DIR` must have run).

Prints one JSON line per variant: spearman, spearman_within_lr (and per learning rate), within_2x,
advisor_hit_rate, advisor_within_budget, compute_ratio. Nothing is written.

    PYTHONPATH=$PWD .venv/bin/python -m experiments.bench.forecast_ablation --world-seed 0 --out runs/study_w0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np


def score_forecast(cfg, fc: dict, runs: list[dict]) -> dict:
    """The forecast's summary figures against the grid's seed-mean measurements."""
    from scipy.stats import spearmanr

    from experiments.studies.forecast import measured_scores as measured
    from experiments.studies.forecast_metrics import (advisor_scores, budgets_over, spearman, spearman_within_lr,
                                                      within_2x)

    meas = measured(cfg, fc, runs)
    rows, lrs = fc["rows"], sorted(cfg.lrs)
    method = np.array([r["method"] for r in rows])
    li = np.array([lrs.index(r["lr"]) for r in rows])
    dl = np.array([r["dL_P1_bits"] for r in rows])
    gain = np.array([r["domain_gain_bits"] for r in rows])
    adv = advisor_scores(method, li, dl, gain, meas["dl"], meas["gain"], budgets_over(meas["dl"], cfg.n_budgets))
    return {"spearman": spearman(dl, meas["dl"]), "spearman_within_lr": spearman_within_lr(li, dl, meas["dl"]),
            "per_lr": [float(spearmanr(dl[li == k], meas["dl"][li == k])[0]) for k in range(len(lrs))],
            "within_2x": within_2x(dl, meas["dl"]), "advisor_hit_rate": adv["advisor_hit_rate"],
            "advisor_within_budget": adv["advisor_within_budget"],
            "compute_ratio": fc["compute"]["compute_ratio"], "lambda_c": fc["probe"].get("lambda_c")}


def main(argv=None) -> None:
    import torch

    from experiments.studies import forecast as S
    from sft.forecast_run import forecast_grid
    from sft.worlds import build_world, pretrain

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the study's folder (its runs/ are read)")
    a = ap.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in sorted(Path(a.out, "runs").glob("*.json"))]
    if not runs:
        raise SystemExit(f"{a.out}/runs: no trained runs; run `talr study forecast --out {a.out}` first")
    torch.set_num_threads(1)
    cfg = S.make_config("default", world_seed=a.world_seed, out=a.out, progress=False)
    world = build_world(S.world_config(cfg))
    model0, _ = pretrain(world, cfg.cache_dir)
    d1 = S.general_sample(world, S.forecast_config(cfg, world).n_general)
    for coherent in (False, True):
        fcfg = dataclasses.replace(S.forecast_config(cfg, world), coherence=coherent)
        fc = forecast_grid(model0, world.d2_train, d1, fcfg, progress=False,
                           d1_tree=S.general_tree(world, fcfg.n_general))
        print(json.dumps({"world_seed": a.world_seed, "coherence": coherent, **score_forecast(cfg, fc, runs)}))


if __name__ == "__main__":
    main()
