"""Report of `talr study grid` (`experiments.studies.grid`), rebuilt from ``out/study.json`` and ``out/cache/*.json`` alone.

``summary.json``: ``base`` (the untouched model) and ``runs`` (one record per trained run and per
WiSE-FT point, fields listed in :data:`RUN_FIELDS`). ``report.md``: data and budget, the
trade-off plane per variant (``tradeoff_<variant>.png``) with its Pareto set in text, Tables 1-2
analogues, Finding 1, Finding 2 and TALR vs the baselines at the larger rate, each with numbers
and a verdict, and the training throughput (MFU). General accuracy (bench units): per run
``general_acc``, ``general_acc_mean`` (over the tasks where the base is more than :data:`BENCH_Z`
standard errors above chance), ``general_acc_se`` (paired SE against the base); top level
``spearman_bits_vs_acc``; ``tradeoff_acc_<variant>.png`` and ``bits_vs_acc.png``.

Units: domain gain = base bits minus run bits per held-out gold completion (positive = better);
general deltas = run minus base, bits per token (positive = forgetting).
"""
from __future__ import annotations

import json
from pathlib import Path

from .grid_text import (MIN_SPEARMAN_N, NOT_TESTABLE, bits_vs_acc_png, general_delta, label, mean_se, pareto,
                        report_markdown, study_domain, tradeoff_acc_png, tradeoff_png, trajectories_png)

__all__ = ["RUN_FIELDS", "ce_run_peak", "general_delta", "label", "load_results", "pareto", "run_record", "write_report"]

RUN_FIELDS = ("variant", "method", "lr", "steps", "alpha", "domain_acc", "domain_gain_bits",
              "general_delta_bits_humaneval", "general_delta_bits_gsm8k", "bound_over_measured",
              "bound_kl_over_measured", "floor_over_measured",
              "forecast_general_delta_bits", "plateau", "trajectory", "general_acc", "general_acc_mean",
              "general_acc_se")
TRAJECTORY_FIELDS = ("step", "domain_gain_bits", "general_delta_bits_pooled")
# matched-gain tolerance (`theory.frontier.matched_gain`): two methods' least degradations closer than
# max(MATCHED_TOL bits/token, MATCHED_REL_TOL of the larger) are "undecided". An assumption, not a
# measurement: the grid trains one seed; the tiny world's seed-to-seed spread was ~5-10 % of a delta.
MATCHED_TOL = 0.002
MATCHED_REL_TOL = 0.1


def grid_key(e: dict) -> tuple:
    """(variant, method, lr, steps or None, plateau) of a grid entry dict."""
    return e["variant"], e["method"], float(e["lr"]), e.get("steps"), bool(e.get("plateau"))


def load_results(out: Path) -> tuple[dict, dict, list[dict], dict]:
    """(study record, base cache record, run/WiSE cache records, forecast rows by (variant,
    method, lr)) of the current data key and grid."""
    if not (out / "study.json").is_file():
        raise FileNotFoundError(f"{out}: no study here (no study.json): run the study first, or pass the --out "
                                f"(or --preset, which picks the default --out) of the study whose report to rebuild")
    study = json.loads((out / "study.json").read_text())
    key = study["data_key"]
    grid = {grid_key(e) for e in study["config"]["grid"]}
    base, runs, forecasts, bench = None, [], {}, {}
    for p in sorted((out / "cache").glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("data_key") != key:
            continue
        rec["file"] = p.name
        if rec["kind"] == "bench":
            if rec.get("bench_key") == study.get("bench"):  # the study's current benchmark settings
                bench[rec["of"]] = rec
        elif rec["kind"] == "base":
            base = rec
        elif rec["kind"] == "forecast":
            if p.name != study.get("forecast_units", {}).get(rec["variant"], p.name):
                continue  # another forecast model's or setting's unit (study.json names the current ones)
            forecasts.update({(rec["variant"], r["method"], float(r["lr"])): {**r, "unit": rec}
                              for r in rec["rows"]})
        elif grid_key(rec["entry"]) in grid:
            runs.append(rec)
    if base is None:
        raise FileNotFoundError(f"{out}/cache: no base evaluation for data key {key}; run the study first")
    for rec in [base, *runs]:
        rec["bench"] = bench.get(rec.pop("file"))
    return study, base, runs, forecasts


BENCH_Z = 2.0  # a task counts in general_acc_mean when the base is more than BENCH_Z standard errors above chance


def kept_tasks(base_bench: dict) -> list[str]:
    """Tasks (of an `evaluate_benchmarks` result) where the base model's accuracy is more than
    :data:`BENCH_Z` standard errors above chance (SE: sd of its per-question correctness, ddof 1,
    over sqrt n); the paper's C.1 drops tasks below a threshold in the same spirit."""
    import numpy as np

    out = []
    for t, row in base_bench["tasks"].items():
        if "accuracy" not in row:
            continue
        c = np.asarray(base_bench["correct"][t][row["metric"]], float)
        se = float(np.std(c, ddof=1) / np.sqrt(len(c))) if len(c) > 1 else 0.0
        if row["accuracy"] - row["chance"] > BENCH_Z * se:
            out.append(t)
    return out


def general_acc_fields(bench: dict | None, base_bench: dict | None) -> dict:
    """``general_acc`` (task -> accuracy), ``general_acc_mean`` (over :func:`kept_tasks` of the base;
    None when no task is kept), ``general_acc_se`` (task -> `paired_se` of the change against the
    base, same questions in the same order), ``general_acc_delta_mean`` (mean minus the base's);
    all None without both bench records."""
    from sft.eval.benchmarks import paired_se

    if not bench or not base_bench:
        return dict.fromkeys(("general_acc", "general_acc_mean", "general_acc_se", "general_acc_delta_mean",
                              "general_acc_kept"))
    r, b = bench["bench"], base_bench["bench"]
    acc = {t: x["accuracy"] for t, x in r["tasks"].items() if "accuracy" in x}
    se = {t: paired_se(b["correct"][t][x["metric"]], r["correct"][t][x["metric"]]) for t, x in r["tasks"].items()
          if t in acc}
    kept = kept_tasks(b)
    mean = sum(acc[t] for t in kept) / len(kept) if kept else None
    base_mean = sum(b["tasks"][t]["accuracy"] for t in kept) / len(kept) if kept else None
    return {"general_acc": acc, "general_acc_mean": mean, "general_acc_se": se,
            "general_acc_delta_mean": None if mean is None else mean - base_mean, "general_acc_kept": kept}


def spearman_bits_vs_acc(runs: list[dict]) -> dict:
    """Spearman over the runs (trained and WiSE-FT) between the change in pooled general code length
    (bits/token) and the change in ``general_acc_mean`` (Proposition 3.1's premise: code length
    tracks capability, so a negative rank correlation). ``rho`` None below :data:`MIN_SPEARMAN_N`
    runs or when an axis is constant (``note`` says which)."""
    from sft.forecast_metrics import spearman

    rs = [r for r in runs if r.get("general_acc_delta_mean") is not None]
    out = {"n": len(rs), "rho": None, "note": None,
           "x": "general_delta_bits_pooled (bits/token)", "y": "general_acc_mean - base (accuracy)"}
    if len(rs) < MIN_SPEARMAN_N:
        why = (f"no task has the base more than {BENCH_Z:g} standard errors above chance, so no mean"
               if not rs and any(r.get("general_acc") for r in runs) else f"n = {len(rs)} runs with general accuracy")
        out["note"] = f"{NOT_TESTABLE} ({why})"
        return out
    rho = spearman([r["general_delta_bits_pooled"] for r in rs], [r["general_acc_delta_mean"] for r in rs])
    if rho != rho:
        out["note"] = f"{NOT_TESTABLE} (an axis is constant over the {len(rs)} runs)"
    else:
        out["rho"] = rho
    return out


def pooled_general_delta(ev: dict, base_ev: dict) -> float:
    """Measured change of the pooled general code length (HumanEval + GSM8K tokens), bits/token:
    the unit of the forecast's ``dL_general_bits_per_token``."""
    g, b = ev["general"], base_ev["general"]
    nh, ng = g["humaneval_tokens"], g["gsm8k_tokens"]
    return ((g["humaneval_bits_per_token"] - b["humaneval_bits_per_token"]) * nh
            + (g["gsm8k_bits_per_token"] - b["gsm8k_bits_per_token"]) * ng) / (nh + ng)


def bound_over_measured(run: dict, key: str = "bound_bits") -> float | None:
    """A per-prefix bound (``key``: the chi2 ``bound_bits``, ``bound_kl_bits``, ``floor_bits``) over the
    measured Delta L(P1) of the general set (full vocabulary, bits per coded token); None when the run carries no
    such bound or the measured change is not a degradation."""
    pb = run.get("prefix")
    if not pb or pb.get(key) is None or pb["delta_bits"] <= 0:
        return None
    return pb[key] / pb["delta_bits"]


def forecast_row(run: dict, forecasts: dict) -> dict | None:
    """The forecast row of a trained run's (variant, method, lr): its ``dL_general_bits_per_token``
    (bits/token of the pooled general set) and ``domain_gain_bits``; None for WiSE-FT points,
    runs with their own step count, skipped methods and where no forecast unit exists."""
    if run.get("alpha") is not None or run.get("own_steps"):
        return None
    return forecasts.get((run["variant"], run["method"], float(run["lr"])))


def _ends(xs: list) -> tuple:
    """(first, last) of the finite values in ``xs`` (None, None when there is none)."""
    xs = [x for x in xs if x is not None and x == x]
    return (xs[0], xs[-1]) if xs else (None, None)


def train_fields(t: dict) -> dict:
    """A trained run's summary fields from its training record: status, loss, throughput (MFU None
    where the run beat the timed peak: never a utilisation above 1) and the token statistics'
    first and last values."""
    (tau0, tau1), (fr0, fr1), (mp0, mp1) = _ends(t["tau"]), _ends(t["frac_p_gt_0.2"]), _ends(t.get("median_p", []))
    mfu = t["mfu"] if t.get("mfu") is not None and t["mfu"] <= 1 else None
    return dict(status=t["status"], train_loss=t["train_loss"], train_seconds=t["train_seconds"],
                tokens_per_s=t["tokens_per_s"], mfu=mfu, matmul_gflops=t.get("matmul_gflops"),
                model_gflops_per_s=t.get("model_gflops_per_s"), tau_first=tau0, tau_last=tau1,
                frac_p_gt_02_first=fr0, frac_p_gt_02_last=fr1, median_p_first=mp0, median_p_last=mp1)


def acc_fields(rec: dict, base: dict) -> dict:
    """A run's general accuracy fields (:func:`general_acc_fields`) and its benchmark seconds."""
    bench = rec.get("bench")
    return {**general_acc_fields(bench, base.get("bench")), "bench_seconds": bench.get("seconds") if bench else None}


def run_record(rec: dict, base: dict, steps: int, forecasts: dict | None = None) -> dict:
    """One summary row from a cache record (a trained run or a WiSE-FT point)."""
    e = rec["entry"]
    v = e["variant"]
    # an entry with its own step count or the plateau schedule has no forecast (the grid's T differs);
    # a plateau run's steps are those it stopped at
    pl = rec["train"].get("plateau") if rec["kind"] == "run" else None
    own_steps = bool(e.get("steps") or e.get("plateau"))
    steps = pl["stopped_at"] if pl else e.get("steps") or steps
    ev, b = rec["eval"], base["eval"]
    row = {"variant": v, "method": "wise-ft" if rec["kind"] == "wise" else e["method"], "lr": e["lr"],
           "steps": steps, "own_steps": bool(own_steps), "alpha": rec.get("alpha"),
           "parent": None if rec["kind"] == "run" else f"{v}-{e['method']}-{e['lr']:g}",
           "plateau": bool(e.get("plateau")), "plateau_met_step": pl["met_step"] if pl else None,
           "domain_acc": ev[v]["domain_acc"], "domain_gain_bits": b[v]["domain_bits"] - ev[v]["domain_bits"],
           "general_delta_bits_humaneval": ev["general"]["humaneval_bits_per_token"]
           - b["general"]["humaneval_bits_per_token"],
           "general_delta_bits_gsm8k": ev["general"]["gsm8k_bits_per_token"] - b["general"]["gsm8k_bits_per_token"],
           "general_delta_bits_pooled": pooled_general_delta(ev, b),
           "n_correct": ev[v]["n_correct"], "n_unparsed": ev[v]["n_unparsed"],
           "reached_stop": ev[v]["reached_stop"], "sample": (ev[v].get("samples") or [""])[0],
           "eval_seconds": rec.get("eval_seconds", sum(ev.get("seconds", {}).values())),
           "peak_rss_gb": rec.get("peak_rss_gb")}  # training + evaluation of a run (None: not recorded)
    if rec["kind"] == "run":
        row.update(train_fields(rec["train"]))
    row.update(acc_fields(rec, base))
    traj = rec["train"].get("trajectory") if rec["kind"] == "run" else None
    row["trajectory"] = [{k: p[k] for k in TRAJECTORY_FIELDS} for p in traj] if traj else None
    pb = rec.get("prefix")
    row["prefix_bound_bits"] = pb["bound_bits"] if pb else None
    row["prefix_delta_bits"] = pb["delta_bits"] if pb else None
    row["bound_over_measured"] = bound_over_measured({"prefix": pb})
    row["bound_kl_over_measured"] = bound_over_measured({"prefix": pb}, "bound_kl_bits")
    row["floor_over_measured"] = bound_over_measured({"prefix": pb}, "floor_bits")
    row["bound_point_over_measured"] = bound_over_measured({"prefix": pb}, "bound_point_bits")
    # every bound over measured as `theory.prefix.bound_columns` gives it (runs evaluated since it exists)
    row["bound_columns"] = pb.get("columns") if pb else None
    row.update(forecast_fields(forecast_row(row, forecasts or {}), base))
    return row


def forecast_fields(f: dict | None, base: dict) -> dict:
    """A run's forecast columns from its forecast row ``f`` (None: no forecast): the general change
    (bits/token), the domain gain and, where the forecast scored the benchmarks on its predicted
    model, the change of the mean accuracy against the base's bench record."""
    fb = (f or {}).get("extra_eval") or {}
    return {"forecast_general_delta_bits": None if f is None else f["dL_general_bits_per_token"],
            "forecast_domain_gain_bits": None if f is None else f["domain_gain_bits"],
            "forecast_general_acc_delta_mean": general_acc_fields(fb, base.get("bench"))["general_acc_delta_mean"]
            if fb.get("bench") else None}


def forecast_summary(runs: list[dict], units: list[dict]) -> dict:
    """Forecast vs measured over the trained runs that have a forecast, per variant and pooled:
    Spearman and within-2x of the general degradation (bits/token of the pooled general set),
    Spearman of the domain gain; the forecast's cost (compute ratio, seconds) per variant."""
    from sft.forecast_metrics import spearman, within_2x

    out = {"units": {u["variant"]: {"compute_ratio": u["compute"]["compute_ratio"], "seconds": u.get("seconds"),
                                    "compute_parts": u["compute"].get("parts"), "peak_rss_gb": u.get("peak_rss_gb"),
                                    "rss_at_start_gb": u.get("rss_at_start_gb"), "spill": u.get("spill") or None,
                                    "ce_run_peak_gb": ce_run_peak(runs, u["variant"]),
                                    "probe": {k: u["probe"].get(k) for k in ("lr", "steps", "lambda_c", "kappa")}}
                     for u in units}}
    for name, sel in (("cot", "cot"), ("label", "label"), ("all", None)):
        rs = [r for r in runs if r.get("forecast_general_delta_bits") is not None and sel in (None, r["variant"])]
        fc = [r["forecast_general_delta_bits"] for r in rs]
        ms = [r["general_delta_bits_pooled"] for r in rs]
        out[name] = {"n": len(rs), "spearman_general": spearman(fc, ms) if rs else None,
                     "within_2x_general": within_2x(fc, ms, zero_tol=WITHIN_ZERO_TOL) if rs else None,
                     "spearman_gain": spearman([r["forecast_domain_gain_bits"] for r in rs],
                                               [r["domain_gain_bits"] for r in rs]) if rs else None,
                     "advisor": grid_advisor(rs) if sel is not None else None,
                     "accuracy": accuracy_forecast_summary(rs)}
    return out


def ce_run_peak(runs: list[dict], variant: str) -> float | None:
    """The largest peak resident memory of the variant's trained CE runs (GB; the issue's memory target is
    a forecast unit's peak <= a training run's + 2 GB); None without one."""
    ps = [r["peak_rss_gb"] for r in runs if r["variant"] == variant and r.get("method") == "ce"
          and r.get("peak_rss_gb") is not None]
    return max(ps) if ps else None


def accuracy_forecast_summary(rs: list[dict]) -> dict | None:
    """The general accuracy forecast (benchmarks scored on each configuration's predicted model)
    against the measured change of ``general_acc_mean``, over the runs that have both: Spearman,
    the mean absolute error (accuracy points / 100), and the share of runs whose forecast lies within
    two paired standard errors of the measured change (`grid_text.mean_se`), each beside the same
    figure for a forecast of no change (``*_no_change``: what the noise alone allows); None without
    such runs."""
    from sft.forecast_metrics import spearman

    rs = [r for r in rs if r.get("forecast_general_acc_delta_mean") is not None
          and r.get("general_acc_delta_mean") is not None]
    if not rs:
        return None
    fc = [r["forecast_general_acc_delta_mean"] for r in rs]
    ms = [r["general_acc_delta_mean"] for r in rs]
    within = [abs(f - m) <= 2 * mean_se(r) for f, m, r in zip(fc, ms, rs)]
    within_zero = [abs(m) <= 2 * mean_se(r) for m, r in zip(ms, rs)]  # the no-change forecast, for scale
    return {"n": len(rs), "spearman": spearman(fc, ms) if len(rs) >= MIN_SPEARMAN_N else None,
            "mae": sum(abs(f - m) for f, m in zip(fc, ms)) / len(rs), "within_2se": sum(within) / len(rs),
            "mae_no_change": sum(abs(m) for m in ms) / len(rs), "within_2se_no_change": sum(within_zero) / len(rs),
            "spearman_bits_forecast": spearman([r["forecast_general_delta_bits"] for r in rs], ms)
            if len(rs) >= MIN_SPEARMAN_N else None}


WITHIN_ZERO_TOL = 0.01  # bits/token: a run is within 2x when both changes are this close to zero (no ratio)


def grid_advisor(rs: list[dict], n_budgets: int = 3) -> dict | None:
    """`sft.forecast_metrics.advisor_scores` on one variant's forecast runs: at ``n_budgets`` budgets
    (log-spaced over the measured general changes, `budgets_over`), the forecast's choice (the
    largest forecast gain whose forecast change fits) against the hindsight best (the largest
    measured gain whose measured change fits); gains are compared by rank only (the forecast's per
    training sequence, the measured per held-out completion). None with fewer than 3 runs or no
    positive measured change."""
    import numpy as np

    from sft.forecast_metrics import advisor_scores, budgets_over

    ms = [r["general_delta_bits_pooled"] for r in rs]
    if len(rs) < 3 or not any(m > 0 for m in ms):
        return None
    lrs = sorted({r["lr"] for r in rs})
    res = advisor_scores([r["method"] for r in rs], [lrs.index(r["lr"]) for r in rs],
                         [r["forecast_general_delta_bits"] for r in rs], [r["forecast_domain_gain_bits"] for r in rs],
                         ms, [r["domain_gain_bits"] for r in rs], budgets_over(ms, n_budgets))
    for b in res["budgets"]:
        for k in ("choice", "best"):
            if isinstance(b.get(k), (int, np.integer)):
                b[k] = None if b[k] < 0 else label(rs[int(b[k])])
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in res.items()}


def matched_gain_summary(runs: list[dict]) -> dict:
    """Per variant: `theory.frontier.matched_gain` over every trajectory point of its trained runs
    (all rates, both schedules), with the claim "TALR keeps general ability better than CE"; each
    level's realising point labelled by its run (``{"run", "step"}``). None for a variant without
    trajectories."""
    from sft.trajectory import pool_trajectories
    from theory.frontier import matched_gain

    out = {}
    for v in ("cot", "label"):
        trajs = {(r["method"], label(r)): r["trajectory"] for r in runs if r["variant"] == v and r.get("trajectory")}
        if not trajs:
            continue
        points, labels = pool_trajectories(trajs)
        mg = matched_gain(points, labels=labels, tol=MATCHED_TOL, rel_tol=MATCHED_REL_TOL)
        mg["at"] = {m: [None if x is None else {"run": x["lr"], "step": x["step"]} for x in xs]
                    for m, xs in mg["at"].items()}
        mg["units"] = {"gain": "bits per held-out gold completion", "degradation": "bits/token, pooled general set"}
        out[v] = mg
    return out


def plateau_summary(recs: list[dict]) -> dict:
    """Per variant: the plateau reference's criterion, the step it met it and where every plateau
    run stopped (from the training records)."""
    out: dict = {}
    for r in recs:
        pl = r.get("train", {}).get("plateau") if r["kind"] == "run" else None
        if pl and pl["reference"]:
            e = r["entry"]
            out[e["variant"]] = {"reference": f"{e['method']}@{e['lr']:g}", **{k: pl[k] for k in (
                "criterion", "max_steps", "met_step", "stopped_at", "epochs")}}
    return out


def base_acc(base_bench: dict | None) -> dict:
    """The base model's ``general_acc``, ``general_acc_mean``, the kept tasks (``general_acc_tasks``),
    chance per task and the questions per task (empty without a bench record)."""
    if not base_bench:
        return {}
    b = base_bench["bench"]
    f = general_acc_fields(base_bench, base_bench)
    return {"general_acc": f["general_acc"], "general_acc_mean": f["general_acc_mean"],
            "general_acc_tasks": kept_tasks(b), "general_acc_chance": {t: x["chance"] for t, x in b["tasks"].items()
                                                                       if "chance" in x},
            "general_acc_n": {t: x["n"] for t, x in b["tasks"].items()}, "bench_seconds": base_bench.get("seconds")}


def compute_seconds(base: dict, runs: list[dict]) -> dict:
    """Seconds of the base evaluation, training, evaluation and benchmarks (base included) over the runs."""
    return {"base_eval": sum(base["eval"]["seconds"].values()),
            "train": sum(r.get("train_seconds") or 0.0 for r in runs),
            "eval": sum(r.get("eval_seconds") or 0.0 for r in runs),
            "bench": sum(r.get("bench_seconds") or 0.0 for r in runs) + ((base.get("bench") or {}).get("seconds") or 0.0)}


def acc_figures(runs: list[dict], sp: dict, out: Path, title: str) -> dict:
    """``tradeoff_acc_<variant>.png`` (the trade-off plane with accuracy on the general axis) per variant
    with a general accuracy mean, ``bits_vs_acc.png`` (the Spearman's scatter) when any run has one."""
    figs = {}
    for v in ("cot", "label"):
        rows = [r for r in runs if r["variant"] == v and r.get("general_acc_delta_mean") is not None]
        if rows:
            figs[f"acc_{v}"] = tradeoff_acc_png(rows, out / f"tradeoff_acc_{v}.png",
                                                title=f"{title} grid, {v}: general accuracy")
    if sp["n"]:
        figs["bits_vs_acc"] = bits_vs_acc_png(runs, sp, out / "bits_vs_acc.png")
    return figs


def completeness(study: dict, recs: list[dict], forecast_units) -> dict:
    """Which of the study's grid entries (trained runs; their WiSE-FT points) and forecast variants
    are in the cache: a report built from a partial cache says so."""
    grid = study["config"]["grid"]
    have = {grid_key(r["entry"]) for r in recs if r.get("alpha") is None}
    wise = {(grid_key(r["entry"]), float(r["alpha"])) for r in recs if r.get("alpha") is not None}
    missing = [e for e in grid if grid_key(e) not in have]
    n_wise = sum(len(e.get("wise") or ()) for e in grid)
    fv = sorted({u.get("variant") for u in forecast_units})
    variants = sorted({e["variant"] for e in grid})
    return {"runs": len(grid) - len(missing), "runs_planned": len(grid), "wise": len(wise), "wise_planned": n_wise,
            "forecast_variants": fv, "complete": not missing and len(wise) == n_wise and fv == variants,
            "missing_runs": ["{variant}-{method}-{lr:g}".format(**e) + (f"-s{e['steps']}" if e.get("steps") else "")
                             + ("-plateau" if e.get("plateau") else "") for e in missing]}


def completeness_lines(c: dict) -> str:
    """A banner for a report built from a partial cache ('' when complete)."""
    if c["complete"]:
        return ""
    return (f"> **Partial study**: {c['runs']} of {c['runs_planned']} trained runs, {c['wise']} of "
            f"{c['wise_planned']} WiSE-FT points, forecasts for {', '.join(c['forecast_variants']) or 'no variant'} "
            f"are in the cache; every figure below covers only those. Missing: "
            f"{', '.join(c['missing_runs']) or 'no run, only forecast units'}. The same command resumes it "
            f"(the cache keeps every finished unit).\n\n")


def write_report(out: str | Path) -> dict:
    from experiments.outputs import write_json, write_text

    out = Path(out)
    study, base, recs, forecasts = load_results(out)
    steps = study["config"]["steps"]
    order = {grid_key(e): k for k, e in enumerate(study["config"]["grid"])}
    recs.sort(key=lambda r: (r["entry"]["variant"], order.get(grid_key(r["entry"]), 999), r.get("alpha") or 0))
    runs = [run_record(r, base, steps, forecasts) for r in recs]
    b = base["eval"]
    dom = study_domain(study)
    variants = [v for v in ("cot", "label") if v in b]
    summary = {"model": study["model"], "data": study["data"], "config": study["config"], "domain": dom,
               "base": {**{v: {k: x for k, x in b[v].items() if k != "samples"} for v in variants},
                        "general": b["general"], "seconds": b["seconds"], **base_acc(base.get("bench"))},
               "runs": runs,
               "compute_seconds": compute_seconds(base, runs)}
    figs = {}
    for v in ("cot", "label"):
        rows = [r for r in runs if r["variant"] == v]
        if rows:
            figs[v] = tradeoff_png(rows, out / f"tradeoff_{v}.png", title=f"{dom['title']} grid, {v}")
    units = {id(f["unit"]): f["unit"] for f in forecasts.values()}
    summary["forecast"] = forecast_summary(runs, list(units.values()))
    summary["matched_gain"] = matched_gain_summary(runs)
    summary["plateau"] = plateau_summary(recs)
    summary["spearman_bits_vs_acc"] = spearman_bits_vs_acc(runs)
    summary["completeness"] = completeness(study, recs, units.values())
    figs.update(acc_figures(runs, summary["spearman_bits_vs_acc"], out, dom["title"]))
    for v, mg in summary["matched_gain"].items():
        trajectories_png([r for r in runs if r["variant"] == v], mg, out / f"trajectories_{v}.png",
                         title=f"{dom['title']} grid, {v}: trajectories and matched-gain frontiers")
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", completeness_lines(summary["completeness"]) + report_markdown(study, base, runs, figs, summary["forecast"],
                                                  summary["matched_gain"], summary["plateau"],
                                                  {**summary["base"], "spearman": summary["spearman_bits_vs_acc"]}))
    return summary
