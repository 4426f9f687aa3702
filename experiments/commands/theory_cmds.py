"""``talr bounds``, ``talr simulate`` and ``talr claims`` (numpy/scipy only; no torch)."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from experiments.cli import UserError, user_errors


def _ranged(name, lo=-math.inf, hi=math.inf, **opt):
    from theory.checks import ranged

    return ranged(name, lo, hi, **opt)


def _pos(name):
    return _ranged(name, 0)


# units of the printed quantities (code lengths and their bounds are in nats: natural logs)
UNITS = {"Lambda_T_min": "(total weight)", "lam_per_step": "(weight per step)", "bound": "nats",
         "expansion": "nats", "expansion_error": "nats", "limit_T_inf": "nats", "k1": "(ratio)",
         "k2": "(1/nats)", "lambda_max": "(weight per step)", "asymptotic": "(weight per step)",
         "relative_error": "(ratio)"}


def _dumps(x, indent: int | None = None) -> str:
    """Strict JSON (non-finite floats as null, numpy as Python) through the one sanitiser, `sft.io.to_jsonable`."""
    from sft.io import to_jsonable

    return json.dumps(to_jsonable(x), indent=indent, allow_nan=False)


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(_dumps(result, indent=2))
    else:
        for k, v in result.items():
            unit = UNITS.get(k, "")
            print(f"{k:>24}: {v:.6g} {unit}".rstrip() if isinstance(v, float) else f"{k:>24}: {v} {unit}".rstrip())


def _non_finite(result: dict) -> list[str]:
    return [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]


# ------------------------------------------------------------------- bounds
def _bounds_degradation(args) -> int:
    from theory import bounds as B

    with user_errors(ValueError), np.errstate(all="ignore"):
        lam_min = float(B.Lambda_T_min(args.T, args.delta_star, args.mu_T, args.C2))
        bound = float(B.degradation_bound(args.T, args.delta_star, args.mu_T, args.C1, args.C2, args.A))
    with np.errstate(all="ignore"):
        exp = float(B.degradation_bound_expansion(args.T, args.delta_star, args.mu_T, args.C1, args.C2, args.A))
        k1, k2 = B.theorem_3_1_k(args.A, args.mu_T, args.C1, args.C2)
    result = {
        "Lambda_T_min": lam_min,
        "lam_per_step": lam_min / args.T,
        "bound": bound,
        "expansion": exp,
        "expansion_error": bound - exp,
        "limit_T_inf": args.A * args.delta_star / args.mu_T,
        "k1": float(k1),
        "k2": float(k2),
    }
    bad = _non_finite(result)
    if bad:
        raise UserError(f"{', '.join(bad)} overflow float64 (not finite) for these constants; "
                        f"rescale them (e.g. measure in bits or per token)")
    if result["lam_per_step"] > 1:  # a tilting step has weight lam_t in [0, 1] (Theorem E.1)
        raise UserError(f"Lambda_T^min = {lam_min:.6g} needs a per-step weight {result['lam_per_step']:.6g} > 1 "
                        f"in --T {args.T:g} steps: no schedule reaches Delta_* = {args.delta_star:g}; raise --T")
    _emit(result, args.json)
    return 0


def _bounds_lambda_max(args) -> int:
    from theory import bounds as B

    with user_errors(ValueError):
        lm = float(B.lambda_max(args.T, args.eps_fg, args.H_T, args.V_s, args.C1))
        asym = float(B.lambda_max_asymptotic(args.T, args.eps_fg, args.H_T, args.V_s))
    result = {"lambda_max": lm, "asymptotic": asym}
    if lm > 0:  # eps_fg = 0 gives lambda_max = 0: no step is safe, and no relative error
        result["relative_error"] = (asym - lm) / lm
    bad = _non_finite(result)
    if bad:
        raise UserError(f"{', '.join(bad)} not finite for these constants")
    _emit(result, args.json)
    return 0


# ----------------------------------------------------------------- simulate
def _plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, [r["dL_P1_nats"] for r in rows], "C3-", label="ΔL(P1) measured")
    ax.plot(t, [r["dL_P2_nats"] for r in rows], "C0-", label="ΔL(P2) measured")
    if "bound_P1_nats" in rows[0]:
        b1 = [r["bound_P1_nats"] if math.isfinite(r["bound_P1_nats"]) else np.nan for r in rows]
        ax.plot(t, b1, "C3--", label="Thm E.3 bound on ΔL(P1)")
        ax.plot(t, [r["bound_P2_nats"] for r in rows], "C0--", label="Thm E.3 bound on ΔL(P2)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("step t")
    ax.set_ylabel("code-length change (nats)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# options only one world reads, with their defaults (None on the parser: "not given")
WORLD_OPTIONS = {
    "tabular": {"lam": 0.1, "lam_min": 0.0, "warmup": 0, "q_noise": 0.05, "rho": "uniform"},
    "softmax": {"lr": 0.5, "optimizer": "sgd", "weighting": "ce"},
}


def _world_options(args) -> None:
    """Refuse an option the chosen world ignores when it was given; fill in the defaults of the others."""
    for world, opts in WORLD_OPTIONS.items():
        given = [k for k in opts if getattr(args, k) is not None]
        if world != args.world and given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UserError(f"{flags}: not used by the {args.world} world (only by --world {world}); drop "
                            f"{'it' if len(given) == 1 else 'them'}")
        for k, v in opts.items():
            if world == args.world and getattr(args, k) is None:
                setattr(args, k, v)
    if args.world == "softmax" and args.schedule != "constant":
        raise UserError("the softmax world uses the optimiser's learning rate; --schedule must be constant")
    if args.world == "tabular" and args.lam_min > args.lam:
        raise UserError(f"--lam-min {args.lam_min:g} is outside [0, --lam = {args.lam:g}]")


def _run_world(args, n_nodes: int, big: bool) -> list[dict]:
    """The rows of ``metrics.jsonl``: exact tilting (tabular) or the optimiser's steps (softmax)."""
    from theory import simulate as S
    from theory.tilting import schedule

    progress = big and not args.no_progress
    if args.world == "tabular":
        lams = schedule(args.schedule, args.steps, args.lam, warmup=args.warmup, lam_min=args.lam_min)
        world = S.make_world(V=args.vocab, depth=args.depth, n_hard=args.n_hard, q_noise=args.q_noise,
                             seed=args.seed, max_nodes=None if args.force else S.MAX_NODES, progress=progress)
        return S.run_tabular(world, lams, alpha=args.alpha, rho=args.rho, progress=progress)
    cfg = S.SoftmaxConfig(lr=args.lr, steps=args.steps, optimizer=args.optimizer, weighting=args.weighting,
                          alpha=args.alpha)
    if n_nodes > S.MAX_NODES and not args.force:
        raise ValueError(f"V={args.vocab}, depth={args.depth}: {n_nodes:,} nodes, above the limit of "
                         f"{S.MAX_NODES:,}; lower --depth/--vocab or pass --force")
    sw = S.make_softmax_world(V=args.vocab, depth=args.depth, n_hard=args.n_hard, seed=args.seed)
    rows = S.run_softmax(sw, cfg)
    last = rows[-1]
    # The optimiser minimises the code length of P2: if it ends above where it started, the steps
    # diverged and dL(P1) measures the blow-up, not forgetting.
    if not (math.isfinite(last["dL_P2_nats"]) and last["dL_P2_nats"] <= 0 and math.isfinite(last["dL_P1_nats"])):
        raise UserError(f"--lr {args.lr:g} ({args.optimizer}) diverged: dL(P2) = {last['dL_P2_nats']:.4g} nats after "
                        f"{args.steps} steps (training should lower it; dL(P1) = {last['dL_P1_nats']:.4g} nats); "
                        f"lower --lr")
    return rows


def _write_run(out: Path, config: dict, rows: list[dict], title: str) -> None:
    """config.json, metrics.jsonl and delta_L.png, published at ``out`` as one complete folder."""
    from sft.io import publish_dir, umask_mode
    from sft.runs import mark_run_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(umask_mode(0o777))  # mkdtemp makes it 0700; the user's umask decides
        mark_run_dir(tmp, "simulate")  # `--overwrite` may replace it later
        (tmp / "config.json").write_text(_dumps(config, indent=2))
        with open(tmp / "metrics.jsonl", "w") as fh:
            for r in rows:
                fh.write(_dumps(r) + "\n")
        _plot(tmp / "delta_L.png", rows, title)
        publish_dir(tmp, out, overwrite=True)  # non-empty `out` reached here only with --overwrite
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _simulate(args) -> int:
    from theory import simulate as S

    from sft.runs import RunDirError, check_out_dir

    _world_options(args)
    out = Path(args.out)
    if out.is_symlink():  # the output folder is published by a rename, which would replace the link
        raise UserError(f"--out {out}: is a symbolic link; pass the folder it points to")
    with user_errors(RunDirError):  # before any work: not empty, not talr's (--overwrite), read-only
        check_out_dir(out, overwrite=args.overwrite, hint="use --overwrite to replace an earlier simulate output")
    used = {k for w, opts in WORLD_OPTIONS.items() if w != args.world for k in opts}
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command", "out", *used)}
    n_nodes = S.complete_tree_nodes(args.vocab, args.depth)
    big = n_nodes > 100_000
    if big and not args.json and (args.force or n_nodes <= S.MAX_NODES):
        print(f"talr simulate: building a complete tree of {n_nodes:,} nodes", file=sys.stderr)
    with user_errors(ValueError):
        rows = _run_world(args, n_nodes, big)
    _write_run(out, config, rows, f"{args.world} world, schedule={args.schedule}")
    last = rows[-1]
    if args.json:
        print(_dumps({"out": str(out), "rows": len(rows), "n_nodes": n_nodes,
                      "final_dL_P1_nats": last["dL_P1_nats"], "final_dL_P2_nats": last["dL_P2_nats"]}, indent=2))
    else:
        print(f"wrote {out}/metrics.jsonl ({len(rows)} rows), config.json, delta_L.png; "
              f"final dL(P1)={last['dL_P1_nats']:.4g} nats, dL(P2)={last['dL_P2_nats']:.4g} nats")
    return 0


# ------------------------------------------------------------------- claims
def _claims(args) -> int:
    from theory.claims import format_ledger, run_ledger

    import time

    t0 = time.perf_counter()
    claims = run_ledger(n=args.n, seed=args.seed, only=args.only)
    if not claims:
        raise UserError(f"--only {' '.join(args.only)!r} matches no claim id")
    if args.json:
        print(_dumps([c.to_dict() for c in claims], indent=2))
    else:
        print(format_ledger(claims))
        print(f"{len(claims)} checks, {args.n} instances each (simulations fewer, see n=), "
              f"{time.perf_counter() - t0:.1f} s")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bounds", help="evaluate the bounds of the paper for given constants")
    bsub = p.add_subparsers(dest="bound", metavar="BOUND", required=True)
    d = bsub.add_parser("degradation", help="Theorem E.4/B.2: Lambda_T^min, the bound, its 1/T expansion")
    d.add_argument("--T", type=_ranged("T", 1), required=True, help="number of steps, >= 1")
    d.add_argument("--delta-star", dest="delta_star", type=_pos("delta-star"), required=True, help="domain gain Delta_*")
    d.add_argument("--mu-T", dest="mu_T", type=_pos("mu-T"), required=True, help="inf_t KL(Q_t||P2)")
    d.add_argument("--C1", type=_pos("C1"), required=True, help="second-order constant of the D1 bound (E.2)")
    d.add_argument("--C2", type=_pos("C2"), required=True, help="second-order constant of the D2 bound (E.2)")
    d.add_argument("--A", type=_pos("A"), required=True, help="H_T (sqrt(w_S) M_h + M_l + (beta+gamma) M_h)")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(func=_bounds_degradation)
    lm = bsub.add_parser("lambda-max", help="Theorem E.5/B.3: the largest safe per-step weight")
    lm.add_argument("--T", type=_ranged("T", 1), required=True, help="number of equal steps, >= 1")
    lm.add_argument("--eps-fg", dest="eps_fg", type=_pos("eps-fg"), required=True,
                    help="tolerated general degradation eps_fg (nats)")
    lm.add_argument("--H-T", dest="H_T", type=_pos("H-T"), required=True, help="sup_t sqrt(chi2(P1||Q_t))")
    lm.add_argument("--V-s", dest="V_s", type=_pos("V-s"), required=True,
                    help="sqrt(E[s M_h^2 + (m - s) M_e^2]) (Theorem E.5)")
    lm.add_argument("--C1", type=_pos("C1"), required=True, help="second-order constant of the D1 bound")
    lm.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lm.set_defaults(func=_bounds_lambda_max)

    s = subparsers.add_parser("simulate", help="exact tabular or softmax world; writes runs/NAME")
    s.add_argument("--world", choices=["tabular", "softmax"], default="tabular",
                   help="tabular: exact tilting of per-node tables; softmax: shared-parameter model trained by SGD/Adam")
    s.add_argument("--schedule", choices=["constant", "inverse", "cosine", "linear"], default="constant",
                   help="tabular: lambda_t schedule (the softmax world: constant, its optimiser's learning rate)")
    s.add_argument("--lam", type=_ranged("lam", 0, 1), default=None,
                   help="tabular: peak per-step weight, in [0, 1] (default 0.1)")
    s.add_argument("--lam-min", dest="lam_min", type=_ranged("lam-min", 0, 1), default=None,
                   help="tabular: floor of cosine/linear decay, in [0, --lam] (default 0)")
    s.add_argument("--warmup", type=_ranged("warmup", 0, integer=True), default=None,
                   help="tabular: linear warm-up steps (default 0)")
    s.add_argument("--steps", type=_ranged("steps", 1, integer=True), default=20, help="tilting / optimizer steps")
    s.add_argument("--vocab", type=_ranged("vocab", 1, integer=True), default=2, help="tokens per node (EOS extra)")
    s.add_argument("--depth", type=_ranged("depth", 1, integer=True), default=3, help="tree depth d")
    s.add_argument("--n-hard", dest="n_hard", type=_ranged("n-hard", 0, integer=True), default=1,
                   help="hard tokens of the domain P2 (<= depth)")
    s.add_argument("--q-noise", dest="q_noise", type=_ranged("q-noise", 0), default=None,
                   help="tabular: logit noise of q0 around P1 (default 0.05)")
    s.add_argument("--alpha", type=_ranged("alpha", 0, 1), default=0.1, help="smoothing of the target (Assumption B.1)")
    s.add_argument("--rho", choices=["uniform", "model"], default=None,
                   help="tabular: smoothing reference rho, uniform or the current model (default uniform)")
    s.add_argument("--lr", type=_ranged("lr", 0, lo_open=True), default=None,
                   help="softmax: learning rate, > 0 (default 0.5)")
    s.add_argument("--optimizer", choices=["sgd", "adam"], default=None, help="softmax: optimizer (default sgd)")
    s.add_argument("--weighting", choices=["ce", "talr"], default=None,
                   help="softmax: token weighting of the loss (default ce)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--out", required=True, help="output folder (runs/NAME)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--force", action="store_true",
                   help="build trees above the node limit (theory.simulate.MAX_NODES; memory ~ 80 bytes x nodes "
                        "x (V+1))")
    s.add_argument("--no-progress", action="store_true", help="no progress bar for large trees")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=_simulate)

    c = subparsers.add_parser("claims", help="the claims ledger: every statement checked")
    c.add_argument("--n", type=_ranged("n", 1, integer=True), default=1000,
                   help="random instances per check, >= 1 (simulation-based checks use fewer, shown as n=)")
    c.add_argument("--seed", type=int, default=0, help="random seed")
    c.add_argument("--only", nargs="*", default=None, help="ids to run (substring match)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=_claims)
