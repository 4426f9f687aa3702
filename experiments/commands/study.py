"""``talr study NAME``: the studies under ``experiments/studies/`` (one ``register_<name>`` each)."""
from __future__ import annotations

import argparse


DESCRIPTION = """\
Run a study: a grid of fine-tuning runs, measured and held against the theory, with a report.

  talr study forecast --out DIR [--preset smoke]   how well `talr forecast` predicts a grid of
                                                   tiny-world runs (about 20 min; smoke: 1 min)
  talr study smollm2 [--preset small] [--out DIR]  SFT of SmolLM2-135M-Instruct on MedCalc-Bench

Finished runs are cached in the output folder: the same call again resumes where it stopped.
`talr study NAME --help` lists the options of one study.
"""


def register(sub) -> None:
    p = sub.add_parser("study", help="run a study (forecast: the forecast's validation grid; smollm2: SFT of SmolLM2 on MedCalc)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = p.add_subparsers(dest="study", metavar="STUDY")
    register_forecast(studies)
    register_smollm2(studies)
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
            from experiments.cli import UserError

            raise UserError(f"--workers must be >= 1, got {args.workers}")
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


def register_smollm2(sub) -> None:
    p = sub.add_parser("smollm2", help="SFT of SmolLM2-135M-Instruct on real MedCalc-Bench rows (resumable grid)",
                       description="Fine-tune SmolLM2-135M-Instruct on MedCalc-Bench (CoT and label-only) with "
                                   "CE, TALR, L2, LoRA and WiSE-FT at several learning rates; measure domain "
                                   "accuracy and gain and general degradation (HumanEval, GSM8K code length); "
                                   "forecast every run's degradation from theta0 (sft.forecast) and compare; "
                                   "write DIR/report.md and DIR/summary.json. A second call skips cached work.")
    p.add_argument("--preset", default="default", choices=["small", "default"],
                   help="small: CE and TALR x 3 rates on CoT + label-only CE; default: the full grid")
    p.add_argument("--out", default=None, help="output directory (default runs/study-smollm2[-small])")
    p.add_argument("--medcalc", default=None, help="MedCalc-Bench CSV (default ../shared/data/...)")
    p.add_argument("--gsm8k", default=None, help="GSM8K test JSONL (default ../shared/data/gsm8k/test.jsonl)")
    p.add_argument("--model", default="smollm2", help="smollm2, or a tiny spec 'tiny:...' (pipeline checks)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out rows evaluated (default: the preset's)")
    p.add_argument("--no-forecast", action="store_true",
                   help="skip the forecast units (sft.forecast from theta0; ~10 min and ~15 GB per variant on SmolLM2)")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and summary.json from the cache")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_smollm2)


def run_smollm2(args: argparse.Namespace) -> int:
    from experiments.studies.smollm2 import make_config, run_study

    out = args.out or ("runs/study-smollm2" if args.preset == "default" else "runs/study-smollm2-small")
    sizes = {k: getattr(args, k, None) for k in ("steps", "batch_size", "n_eval")}
    for k, v in sizes.items():
        if v is not None and v < 1:
            print(f"talr study smollm2: --{k.replace('_', '-')} must be >= 1, got {v}")
            return 2
    cfg = make_config(args.preset, medcalc=args.medcalc, gsm8k=args.gsm8k, model=args.model,
                      forecast=not args.no_forecast, **{k: v for k, v in sizes.items() if v is not None})
    try:
        run_study(cfg, out, progress=not args.no_progress, report_only=args.report_only)
    except FileNotFoundError as exc:
        print(f"talr study smollm2: {exc}")
        return 2
    print(f"report: {out}/report.md")
    return 0
