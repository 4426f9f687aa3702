"""The size ratio measured / replayed along a whole run (why version 5 of `sft.forecast`'s size
probe still over-forecasts the largest rates): a real CE run of T steps at each given rate (the
forecast probe's own AdamW loop on the whole D2, seed 0), its dL(P1) as the KL term on the D1
sample at a few steps t, and CE's replay of the same first t rates from the forecast's moments,
kappa and lam_c (version 5's flags: ``experiments.bench.forecast_ablation.V5``).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python -m experiments.bench.forecast_size_trajectory --world-seed 0

Prints one line per (rate, t): real and replayed dL (bits per sequence), their ratio, and the
replayed squared displacement. Nothing is written.
"""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    import dataclasses

    import torch

    from experiments.bench.forecast_ablation import V5
    from experiments.studies import forecast as S
    from sft.forecast import cosine_lrs, replay_adam
    from sft.forecast_run import HARD_GROUP_P, ForecastGrid, probe_losses, token_groups
    from sft.worlds import build_world, pretrain

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--lrs", default="3e-4,3e-3", help="comma list of peak rates")
    ap.add_argument("--at", default="3,6,12,24,48,96,150", help="comma list of steps t to compare at")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = S.make_config("default", world_seed=a.world_seed, progress=False)
    world = build_world(S.world_config(cfg))
    model0, _ = pretrain(world, cfg.cache_dir)
    fcfg = dataclasses.replace(S.forecast_config(cfg, world), **V5)
    g = ForecastGrid(model0, world.d2_train, S.general_sample(world, fcfg.n_general), fcfg,
              S.general_tree(world, fcfg.n_general))
    ce = g.moments("ce")
    ce.noise_floor, ce.keep_norm = fcfg.noise_floor, fcfg.keep_norm
    g.calibrate(ce, model0)
    groups = token_groups(model0, world.d2_train, fcfg.pad_token_id, HARD_GROUP_P, g.meter)
    at = sorted({min(int(x), fcfg.steps) for x in a.at.split(",")})
    for lr in (float(x) for x in a.lrs.split(",")):
        lrs = cosine_lrs(lr, fcfg.steps)
        real = {}
        probe_losses(model0, world.d2_train, groups, fcfg, lrs[: at[-1]], g.meter,
                     on_step=lambda m, t: real.__setitem__(t, g.sample_dl(m)[0]) if t in at else None)
        for t in at:
            d, _ = replay_adam(ce, "ce", lrs[:t], max_grad_norm=fcfg.max_grad_norm, w_min=fcfg.w_min,
                               track=fcfg.track, block=fcfg.replay_block)
            rep = g.evaluate(d)[0]
            print(f"world {a.world_seed} lr {lr:.3g} t {t} Lambda {lrs[:t].sum():.4f}: real {real[t]:.3f} "
                  f"replayed {rep:.3f} ratio {real[t] / rep:.2f} |d|^2 {float(d.double().pow(2).sum()):.2f}", flush=True)


if __name__ == "__main__":
    main()
