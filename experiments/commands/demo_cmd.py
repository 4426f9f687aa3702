"""`talr demo`: the main job (tiny-transformer world; see experiments/studies/demo.py)."""
from __future__ import annotations

import argparse
import sys

from experiments.cli import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from sft.runs import user_cache_dir

    p = sub.add_parser("demo", help="run the main job: measured vs predicted degradation in the tiny world",
                       description="Fine-tune a pretrained tiny Llama with every method at two learning rates "
                                   "(CoT and label-only), measure exact degradation and domain gain, evaluate "
                                   "the bounds, and write DIR/report.md with figures. Re-runnable: every run is "
                                   "cached in DIR, a second call redoes only what is missing.")
    p.add_argument("--out", default="runs/demo",
                   help="output directory (default runs/demo); a non-empty folder is used only when it is a "
                        "demo's own output")
    p.add_argument("--overwrite", action="store_true",
                   help="empty DIR first (only a folder an earlier `talr demo` wrote) instead of reusing its runs")
    p.add_argument("--preset", default="default", choices=["default", "smoke"],
                   help="default: the full study (minutes); smoke: a ~1-minute check of the pipeline")
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny: the embedded tiny-transformer world; smollm2: the small preset of "
                        "`talr study smollm2` (SmolLM2-135M on MedCalc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None,
                   help=f"where pretrained tiny-world checkpoints are cached, by config hash (default: "
                        f"{user_cache_dir('worlds')}; $TALR_CACHE_DIR or $XDG_CACHE_HOME move it)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model == "smollm2":
        from experiments.commands.study import run_smollm2

        return run_smollm2(argparse.Namespace(preset="small", out=args.out, medcalc=None, gsm8k=None, model="smollm2",
                                              report_only=False, no_progress=args.no_progress))
    from experiments.outputs import markdown_table
    from experiments.studies.demo import DEMO_HINT, make_config, run_demo
    from experiments.studies.demo_report import SUMMARY_HEADERS, summary_rows
    from sft.runs import RunDirError, check_out_dir

    try:  # before any work: a foreign non-empty --out, a link with --overwrite, a read-only folder
        check_out_dir(args.out, overwrite=args.overwrite, kind="demo",
                      hint=DEMO_HINT)
    except RunDirError as exc:
        raise UserError(str(exc)) from None
    cfg = make_config(args.preset, out=args.out, seed=args.seed, progress=not args.no_progress,
                      cache_dir=args.cache_dir, overwrite=args.overwrite)
    try:
        res = run_demo(cfg)
    except RunDirError as exc:  # another process took the folder meanwhile
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:  # finished runs are cached: the same command continues
        print(f"talr demo: interrupted; the finished runs are cached in {cfg.out}, run the same command to "
              f"continue", file=sys.stderr)
        return 130
    print(markdown_table(SUMMARY_HEADERS, summary_rows(res)))
    print(f"\nreport: {cfg.out}/report.md  ({res['wall_seconds']:.0f} s)")
    return 0
