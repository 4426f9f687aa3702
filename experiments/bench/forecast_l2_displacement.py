"""Real CE and L2 runs of a tiny world at the grid's three largest rates: the squared
displacement ||theta_T - theta0||^2, dL(P1) and the domain gain of each (what the forecast's L2
model must reproduce: docs/forecast/README.md). Trains 6 runs (one seed); prints one JSON line each.

    PYTHONPATH=$PWD .venv/bin/python -m experiments.bench.forecast_l2_displacement --world-seed 0
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv=None) -> None:
    import torch

    from experiments.studies import forecast as S
    from experiments.studies.forecast_grid import WorldCache
    from sft.world_runs import finetune_exact

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = S.make_config("default", world_seed=a.world_seed, out=tempfile.mkdtemp(), progress=False)
    world, model0, base, _, _ = WorldCache(cfg.cache_dir).get(S.world_config(cfg))
    theta0 = torch.cat([p.detach().reshape(-1) for p in model0.parameters()])
    for lr in sorted(cfg.lrs)[-3:]:
        for method in ("ce", "l2"):
            with tempfile.TemporaryDirectory() as tmp:
                model, end, _, _ = finetune_exact(world, model0, method, lr, steps=cfg.steps, batch=cfg.batch,
                                                  seed=a.seed, run_dir=Path(tmp), base=base)
            d = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta0
            print(json.dumps({"world_seed": a.world_seed, "method": method, "lr": lr, "displacement_sq": float(d.pow(2).sum()),
                              "dL_P1_bits": end["dL_P1_bits"], "domain_gain_bits": end["domain_gain_bits"]}), flush=True)


if __name__ == "__main__":
    main()
