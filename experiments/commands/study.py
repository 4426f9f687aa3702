"""``talr study NAME``: the studies under ``experiments/studies/`` (one ``register_<name>`` each)."""
from __future__ import annotations

import argparse


DESCRIPTION = """\
Run a study: a grid of fine-tuning runs, measured and held against the theory, with a report.

  talr study forecast --out DIR [--preset smoke]   how well `talr forecast` predicts a grid of
                                                   tiny-world runs (about 20 min; smoke: 1 min)
  talr study grid --domain medcalc|esci [--preset smoke|small|heldout] [--variant cot|label] [--seed S]
                  [--data PATH] [--model M] [--out DIR]
                                                   SFT of SmolLM2-135M-Instruct (or a tiny Llama:
                                                   smoke, about a minute) on a domain, methods x rates
                                                   (heldout: the forecast's validation grid, fresh seed)
  talr study smollm2 [--preset small] [--out DIR]  the same for --domain medcalc (an alias)

Finished runs are cached in the output folder: the same call again resumes where it stopped.
`talr study NAME --help` lists the options of one study.
"""


def register(sub) -> None:
    p = sub.add_parser("study", help="run a study (forecast: the forecast's validation grid; grid: methods x rates "
                                     "on a domain, SmolLM2 or a tiny model)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = p.add_subparsers(dest="study", metavar="STUDY")
    register_forecast(studies)
    register_grid(studies)
    register_smollm2(studies)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def register_forecast(studies) -> None:
    from experiments.commands.forecast import rate_list, method_list, positive_int

    f = studies.add_parser("forecast", help="validate talr forecast on a grid of tiny-world runs (3 seeds)",
                           description="Forecast methods x learning rates before training, train every "
                                       "configuration with 3 seeds, measure exact dL(P1) and domain gain, and "
                                       "score the forecast and the baselines (DIR/summary.json, table.md, figures). "
                                       "Runs are cached in DIR/runs; a second call resumes.")
    f.add_argument("--preset", default="default", choices=["default", "smoke"],
                   help="default: 5 lrs x 6 methods x 3 seeds (about 20 min on 2 cores); smoke: a 1-minute check")
    f.add_argument("--world-seed", type=int, default=0, help="seed of the tiny world (its languages and model)")
    f.add_argument("--steps", type=positive_int, default=None, help="optimizer steps T of every run (default: the preset's)")
    f.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step B (default: the preset's)")
    f.add_argument("--lrs", type=lambda s: rate_list(s, "lrs"), default=None,
                   help="comma-separated peak learning rates in (0, 1) (default: the preset's)")
    f.add_argument("--methods", type=method_list, default=None, help="comma list of methods (default: the preset's)")
    f.add_argument("--seeds", type=seed_list, default=None, help="comma list of training seeds (default: the preset's, 0,1,2)")
    f.add_argument("--workers", type=positive_int, default=None, help="training processes (one torch thread each)")
    f.add_argument("--cache-dir", default=None, help="pretrained tiny worlds, by config hash (default: the user cache, $TALR_CACHE_DIR or ~/.cache/talr/worlds)")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--no-progress", action="store_true", help="hide progress bars")
    f.set_defaults(func=run_forecast_study)


def seed_list(text: str) -> tuple:
    """``--seeds``: a non-empty comma list of distinct integers >= 0."""
    import argparse

    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 0 or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"--seeds: expected distinct integers >= 0, got {text!r}")
    return vals


def run_forecast_study(args) -> int:
    import math

    from experiments.studies.forecast import make_config, run_study

    kw = dict(out=args.out, world_seed=args.world_seed, cache_dir=args.cache_dir, progress=not args.no_progress)
    for k, name in (("steps", "steps"), ("batch", "batch_size"), ("lrs", "lrs"), ("methods", "methods"),
                    ("workers", "workers"), ("seeds", "seeds")):
        if getattr(args, name) is not None:
            v = getattr(args, name)
            kw[k] = tuple(m.strip() for m in v.split(",")) if k == "methods" else v
    s = run_study(make_config(args.preset, **kw))
    keys = ("n_configs", "spearman", "spearman_ceiling", "spearman_within_lr", "within_2x", "advisor_hit_rate",
            "advisor_within_budget", "compute_ratio")
    one_seed = s["n_seeds"] < 2  # no second seed: the ceiling is undefined, not wrong
    for k in keys:
        v = s[k]
        if k == "spearman_ceiling" and one_seed:
            print(f"{k:24s} n/a (one training seed)")
            continue
        print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    print(f"lr-alone spearman        {s['baselines']['lr_alone']['spearman']:.3f}")
    print(f"\nreport: {args.out}/table.md")
    return 0 if all(math.isfinite(float(s[k])) for k in keys if not (k == "spearman_ceiling" and one_seed)) else 1


GRID_DESCRIPTION = ("Fine-tune SmolLM2-135M-Instruct (or a tiny Llama) on one domain (sft.domains: medcalc, esci) "
                    "in its supervision variants (CoT, label-only) with CE, TALR, L2, LoRA and WiSE-FT at several "
                    "learning rates; measure the domain metric and gain and the general degradation (HumanEval, "
                    "GSM8K code length); forecast every run's degradation from theta0 (sft.forecast) and compare; "
                    "write DIR/report.md and DIR/summary.json. A second call skips cached work.")


def _grid_options(p, domain: bool) -> None:
    from experiments.studies.grid import PRESETS, SMALL_MEMORY

    if domain:
        from sft.domains import DOMAINS

        p.add_argument("--domain", required=True, choices=sorted(DOMAINS), help="the domain (sft.domains)")
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="smoke: a tiny Llama on a few rows, about a minute (ESCI: the tests' fixture pair when "
                        "no data is given); small: CE and TALR x 3 rates on CoT + label-only CE on SmolLM2 "
                        f"(<= 45 min, memory {SMALL_MEMORY}); default: the full grid (4.45 h recorded over 22 runs, 6 WiSE-FT points and the forecasts; resumable); "
                        "heldout: the forecast's validation grid on a fresh draw of the data (seed 24780; 8 label-only and 5 CoT runs "
                        "the default grid never trained, FLOW among them, and their forecasts; resumable)")
    p.add_argument("--variant", choices=["cot", "label"], default=None,
                   help="only this supervision variant's entries (default: every variant of the domain); the cache "
                        "is shared, so a later call without it reuses the runs")
    p.add_argument("--seed", type=int, default=None,
                   help="the study's seed: the data split, training and held-out rows, training order, benchmark "
                        "subsets, forecast probe (default: the preset's; >= 0)")
    p.add_argument("--out", default=None, help="output directory (default runs/study-smollm2[-PRESET] for medcalc, "
                                               "runs/study-grid-DOMAIN[-PRESET] otherwise)")
    p.add_argument("--data", "--medcalc", dest="data", default=None,
                   help="the domain's data (MedCalc: the official CSV; ESCI: the folder of the official parquet "
                        "pair, the examples parquet or a JSONL export); default ../shared/data/...; a path given "
                        "must exist")
    p.add_argument("--gsm8k", default=None, help="GSM8K test JSONL (default ../shared/data/gsm8k/test.jsonl)")
    p.add_argument("--model", default=None, help="smollm2, or a tiny spec 'tiny:...' (pipeline checks; a SmolLM2 "
                                                 "preset's token limits are then counted in bytes, x4); default: "
                                                 "the preset's")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out rows evaluated (default: the preset's)")
    p.add_argument("--repeat-rows", action="store_true",
                   help="let steps x batch size exceed the training rows that fit: further epochs over them, in "
                        "order (default: refused, one pass)")
    p.add_argument("--no-forecast", action="store_true",
                   help=f"skip the forecast units (sft.forecast from theta0; 11-14 min per variant of the default preset "
                        f"on SmolLM2, 2-6 min of the small one; the small preset's {SMALL_MEMORY})")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and summary.json from the cache")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def register_grid(sub) -> None:
    p = sub.add_parser("grid", help="methods x learning rates x supervision variants on one domain (resumable)",
                       description=GRID_DESCRIPTION)
    _grid_options(p, domain=True)
    p.set_defaults(func=run_grid)


def register_smollm2(sub) -> None:
    p = sub.add_parser("smollm2", help="alias of `talr study grid --domain medcalc`",
                       description="An alias of `talr study grid --domain medcalc`. " + GRID_DESCRIPTION)
    _grid_options(p, domain=False)
    p.set_defaults(func=run_smollm2)


def default_out(domain: str, preset: str) -> str:
    """``runs/study-smollm2[-PRESET]`` for MedCalc (the former command's folders: their caches are
    reused), ``runs/study-grid-DOMAIN[-PRESET]`` otherwise."""
    stem = "runs/study-smollm2" if domain == "medcalc" else f"runs/study-grid-{domain}"
    return stem if preset == "default" else f"{stem}-{preset}"


def _report_hint(args, out: str) -> str:
    """For --report-only on a folder without a study: the presets whose default folder holds one."""
    from pathlib import Path

    from experiments.studies.grid import PRESETS

    if args.out is not None or Path(out, "study.json").is_file():
        return ""
    found = [p for p in PRESETS if Path(default_out(args.domain, p), "study.json").is_file()]
    return f" (a study is in the default folder of --preset {' / '.join(found)})" if found else ""


def run_grid(args: argparse.Namespace) -> int:
    from experiments.cli import UserError
    from experiments.studies.grid import make_config, run_study

    out = args.out or default_out(args.domain, args.preset)
    sizes = {k: getattr(args, k, None) for k in ("steps", "batch_size", "n_eval")}
    for k, v in sizes.items():
        if v is not None and v < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    seed = getattr(args, "seed", None)
    if seed is not None and seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    over = {k: v for k, v in dict(sizes, model=args.model, seed=seed).items() if v is not None}
    variant = getattr(args, "variant", None)
    try:
        cfg = make_config(args.preset, args.domain, variants=None if variant is None else (variant,), data=args.data,
                          gsm8k=args.gsm8k, forecast=not getattr(args, "no_forecast", False),
                          repeat_rows=bool(getattr(args, "repeat_rows", False)), **over)
    except ValueError as exc:  # a variant the domain or the preset does not have
        raise UserError(str(exc)) from None
    try:
        run_study(cfg, out, progress=not args.no_progress, report_only=args.report_only)
    except (FileNotFoundError, ValueError) as exc:  # missing or unusable data, model or study folder
        raise UserError(f"{exc}{_report_hint(args, out) if args.report_only else ''}") from None
    print(f"report: {out}/report.md")
    return 0


def run_smollm2(args: argparse.Namespace) -> int:
    print("talr study smollm2: an alias of `talr study grid --domain medcalc`")
    args.domain = "medcalc"
    args.model = getattr(args, "model", None)
    args.data = getattr(args, "data", None) or getattr(args, "medcalc", None)
    return run_grid(args)
