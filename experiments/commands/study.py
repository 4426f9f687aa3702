"""`talr study NAME`: long, resumable studies; each study registers a sub-sub-command here.

Add a study by writing ``register_<name>(subparsers)`` below and listing it in :data:`STUDIES`.
"""
from __future__ import annotations

import argparse


def register_smollm2(sub) -> None:
    p = sub.add_parser("smollm2", help="SFT of SmolLM2-135M-Instruct on real MedCalc-Bench rows (resumable grid)",
                       description="Fine-tune SmolLM2-135M-Instruct on MedCalc-Bench (CoT and label-only) with "
                                   "CE, TALR, L2, LoRA, DFT and WiSE-FT at several learning rates; measure domain "
                                   "accuracy and gain and general degradation (HumanEval, GSM8K code length); "
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
                      **{k: v for k, v in sizes.items() if v is not None})
    try:
        run_study(cfg, out, progress=not args.no_progress, report_only=args.report_only)
    except FileNotFoundError as exc:
        print(f"talr study smollm2: {exc}")
        return 2
    print(f"report: {out}/report.md")
    return 0


STUDIES = {"smollm2": register_smollm2}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a resumable study (smollm2)")
    studies = p.add_subparsers(dest="study", metavar="STUDY")
    for reg in STUDIES.values():
        reg(studies)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
