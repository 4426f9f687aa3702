"""``talr study NAME``: the studies under ``experiments/studies/``.

    talr study forecast [--preset smoke|default] [--world-seed N] --out DIR
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("study", help="run a study (forecast: the forecast's validation grid)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = p.add_subparsers(dest="study", metavar="STUDY")
    register_forecast(studies)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def register_forecast(studies) -> None:
    f = studies.add_parser("forecast", help="validate talr forecast on a grid of tiny-world runs (3 seeds)",
                           description="Forecast methods x learning rates before training, train every "
                                       "configuration with 3 seeds, measure exact dL(P1) and domain gain, and "
                                       "score the forecast and the baselines (DIR/summary.json, table.md, figures). "
                                       "Runs are cached in DIR/runs; a second call resumes.")
    f.add_argument("--preset", default="default", choices=["default", "smoke"],
                   help="default: 5 lrs x 6 methods x 3 seeds (about 20 min on 2 cores); smoke: a 1-minute check")
    f.add_argument("--world-seed", type=int, default=0, help="seed of the tiny world (its languages and model)")
    f.add_argument("--workers", type=int, default=None, help="training processes (one torch thread each)")
    f.add_argument("--cache-dir", default="runs/.cache/worlds", help="pretrained worlds (by config hash)")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--no-progress", action="store_true", help="hide progress bars")
    f.set_defaults(func=run_forecast_study)


def run_forecast_study(args) -> int:
    import math

    from experiments.studies.forecast import make_config, run_study

    kw = dict(out=args.out, world_seed=args.world_seed, cache_dir=args.cache_dir, progress=not args.no_progress)
    if args.workers is not None:
        if args.workers < 1:
            raise SystemExit(f"--workers must be >= 1, got {args.workers}")
        kw["workers"] = args.workers
    s = run_study(make_config(args.preset, **kw))
    keys = ("n_configs", "spearman", "spearman_ceiling", "spearman_within_lr", "within_2x", "advisor_hit_rate",
            "advisor_within_budget", "compute_ratio")
    for k in keys:
        v = s[k]
        print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    print(f"lr-alone spearman        {s['baselines']['lr_alone']['spearman']:.3f}")
    print(f"\nreport: {args.out}/table.md")
    return 0 if all(math.isfinite(float(s[k])) for k in keys) else 1
