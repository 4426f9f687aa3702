"""``talr compare RUN``: measured vs predicted degradation for a run of ``talr train``.

    talr compare runs/NAME [--general FILE|humaneval[:N]] [--domain FILE] [--depth 16] [--limit 32]

The evaluation sets default to ``general_eval`` / ``domain_eval`` in ``RUN/config.json``. Writes
``compare.json``, ``compare.md`` and ``compare.png`` into RUN (or ``--out``). See
`experiments.studies.compare` for what is measured and the approximations behind the theory side.
"""
from __future__ import annotations

import argparse
import dataclasses


def register(subparsers) -> None:
    from experiments.studies.compare import CompareConfig

    p = subparsers.add_parser("compare", help="hold a training run against the theory (bound vs measured)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder written by `talr train` (with checkpoint-* from --save-steps)")
    for f in dataclasses.fields(CompareConfig):
        if f.name in ("run", "progress"):
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        ty = {"int": int, "float": float}.get(type(default).__name__, str)
        p.add_argument("--" + f.name.replace("_", "-"), type=ty, default=default, help=f.metadata.get("help", ""))
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from experiments.cli import UserError, user_errors
    from experiments.studies.compare import CompareConfig, CompareError, run_compare

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig) if f.name != "progress"}
    try:
        cfg = CompareConfig(**kw, progress=not args.no_progress)
    except ValueError as exc:  # CompareConfig range-checks its numbers
        raise UserError(f"--{str(exc).replace('_', '-')}") from None
    with user_errors(CompareError, FileNotFoundError):
        res = run_compare(cfg)
    from experiments.outputs import markdown_table

    rows = [[p["checkpoint"], p["step"], p["dL_P1_bits"], p["dL_P1_tree_bits"], p["domain_gain_tree_bits"],
             p.get("lam"), p.get("e3_bound_bits"), p.get("e4_bound_bits")] for p in res["points"]]
    print(markdown_table(["checkpoint", "step", "dL(P1) full [bits]", "dL(P1) tree [bits]", "D2 gain tree [bits]",
                          "lambda", "Thm E.3 [bits]", "Thm E.4 [bits]"], rows))
    print(f"\nwrote {args.out or args.run}/compare.md, compare.json, compare.png ({res['wall_seconds']:.0f} s)")
    return 0
