"""Markdown and figure of the grid study's report (see `experiments.studies.grid_report`); the
trade-off plane's helpers (:func:`general_delta`, :func:`pareto`, :func:`label`)."""
from __future__ import annotations

from pathlib import Path

from experiments.outputs import annotate_points, fmt, markdown_table as md_table, pyplot, save_figure
from sft.methods import METHODS


def is_lora(method: str) -> bool:
    """Whether ``method`` (a registered name, or "wise-ft") trains LoRA adapters (`sft.methods`)."""
    return method in METHODS and METHODS[method].lora


def _pct(x) -> str:
    """A fraction as a percentage with one decimal ("-" for None)."""
    return "-" if x is None else f"{100 * x:.1f} %"


def general_delta(r: dict) -> float:
    """The general degradation used on the trade-off plane: mean of the two bits/token deltas."""
    return 0.5 * (r["general_delta_bits_humaneval"] + r["general_delta_bits_gsm8k"])


def pareto(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (domain gain: higher, general degradation: lower)."""
    keep = []
    for r in rows:
        dominated = any(o is not r and o["domain_gain_bits"] >= r["domain_gain_bits"]
                        and general_delta(o) <= general_delta(r)
                        and (o["domain_gain_bits"] > r["domain_gain_bits"] or general_delta(o) < general_delta(r))
                        for o in rows)
        if not dominated:
            keep.append(r)
    return sorted(keep, key=lambda r: r["domain_gain_bits"])


def label(r: dict) -> str:
    if r["method"] == "wise-ft":
        return f"WiSE-FT({r['parent']}, a={r['alpha']:g})"
    if r.get("plateau"):
        return f"{r['method']}@{r['lr']:g} (plateau schedule, {r['steps']} steps)"
    return f"{r['method']}@{r['lr']:g}" + (f" ({r['steps']} steps)" if r.get("own_steps") else "")


def tradeoff_png(rows: list[dict], path: Path, title: str) -> str:
    """Domain gain (x) vs general degradation (y) per run; the Pareto set circled."""
    plt = pyplot()
    front = {id(r) for r in pareto(rows)}
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter([0], [0], marker="*", s=120, color="k", zorder=3)
    ax.annotate("base", (0, 0), xytext=(4, 4), textcoords="offset points", fontsize=8)
    methods = sorted({r["method"] for r in rows})
    cmap = plt.get_cmap("tab10")
    for k, m in enumerate(methods):
        pts = [r for r in rows if r["method"] == m]
        ax.scatter([r["domain_gain_bits"] for r in pts], [general_delta(r) for r in pts], s=36, color=cmap(k),
                   label=m, marker="D" if m == "wise-ft" else "o")
        for r in pts:
            ax.annotate(f"{r['lr']:g}" if m != "wise-ft" else f"a={r['alpha']:g}",
                        (r["domain_gain_bits"], general_delta(r)), xytext=(3, 3), textcoords="offset points",
                        fontsize=7)
    fr = [r for r in rows if id(r) in front]
    ax.scatter([r["domain_gain_bits"] for r in fr], [general_delta(r) for r in fr], s=160, facecolors="none",
               edgecolors="k", label="Pareto set")
    ax.margins(x=0.15, y=0.15)  # room for the rate labels beside the outermost points
    return _finish_plane(fig, ax, "general degradation (bits/token, mean of HumanEval and GSM8K)", title, path, 8)


def tradeoff_acc_png(rows: list[dict], path: Path, title: str) -> str:
    """The trade-off plane with accuracy on the general axis (the paper's Figures 1-2): domain gain (x)
    vs the change of ``general_acc_mean`` against the base, points (y), per run; bars of +-1 mean
    paired SE (the tasks' paired SEs combined as for a mean of independent changes)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter([0], [0], marker="*", s=120, color="k", zorder=3)
    cmap = plt.get_cmap("tab10")
    for k, m in enumerate(sorted({r["method"] for r in rows})):
        pts = [r for r in rows if r["method"] == m]
        ax.errorbar([r["domain_gain_bits"] for r in pts], [100 * r["general_acc_delta_mean"] for r in pts],
                    yerr=[100 * mean_se(r) for r in pts], fmt="D" if m == "wise-ft" else "o", ms=5, lw=0.8,
                    capsize=2, color=cmap(k), label=m)
    ax.margins(x=0.15, y=0.15)
    return _finish_plane(fig, ax, "general accuracy change (points, mean over the kept tasks)", title, path, 8)


def mean_se(r: dict) -> float:
    """SE of a run's ``general_acc_delta_mean`` from its per-task paired SEs over the kept tasks
    (``general_acc_kept``): sqrt(sum se_t^2) / k, the tasks' questions being disjoint."""
    kept = r.get("general_acc_kept") or list(r["general_acc_se"])
    return (sum(r["general_acc_se"][t] ** 2 for t in kept) ** 0.5 / len(kept)) if kept else 0.0


def bits_vs_acc_png(runs: list[dict], sp: dict, path: Path) -> str:
    """Change in pooled general code length (x) vs change in general accuracy (y) over the runs, with
    the Spearman of :func:`experiments.studies.grid_report.spearman_bits_vs_acc` in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    cmap = plt.get_cmap("tab10")
    rs = [r for r in runs if r.get("general_acc_delta_mean") is not None]
    for k, v in enumerate(("cot", "label")):
        pts = [r for r in rs if r["variant"] == v]
        ax.scatter([r["general_delta_bits_pooled"] for r in pts], [100 * r["general_acc_delta_mean"] for r in pts],
                   s=30, color=cmap(k), label=v)
    ax.axhline(0, lw=0.6, color="gray")
    ax.axvline(0, lw=0.6, color="gray")
    ax.set_xlabel("general code length change (bits/token, pooled HumanEval + GSM8K)")
    ax.set_ylabel("general accuracy change (points)")
    ax.set_title(f"Spearman {fmt(sp['rho'])} over {sp['n']} runs" if sp["rho"] is not None else sp["note"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def general_acc_section(runs: list[dict], ga: dict | None, figs: dict) -> list[str]:
    """General accuracy per run beside the code-length changes, the accuracy trade-off planes and
    the code-length-vs-accuracy Spearman."""
    L = ["## General accuracy (benchmarks) beside the code-length changes", ""]
    if not ga or ga.get("general_acc") is None:
        return L + ["No benchmark unit in the cache (the study ran without bench_tasks).", ""]
    tasks, kept, sp = list(ga["general_acc"]), ga["general_acc_tasks"], ga["spearman"]
    bm = "n/a" if ga["general_acc_mean"] is None else f"{100 * ga['general_acc_mean']:.1f}%"
    L += [f"Zero-shot multiple-choice accuracy (`sft.eval.benchmarks`, lm-eval's acc / acc_norm) on "
          + ", ".join(f"{t} ({ga['general_acc_n'][t]} questions, base {100 * ga['general_acc'][t]:.1f}%, "
                      f"chance {100 * ga['general_acc_chance'][t]:.1f}%)" for t in tasks)
          + f". The mean is over the tasks where the base model is more than 2 standard errors above chance: "
          f"{', '.join(kept) or 'none'} (base mean "
          f"{bm}). "
          "Changes are run minus base in points, +- the paired standard error over the same questions.", "",
          md_table(["run", "variant", "general d (bits/tok, pooled)", "acc mean d (pts)",
                    *[f"{t} d (pts)" for t in tasks]],
                   [[label(r), r["variant"], r["general_delta_bits_pooled"],
                     None if r["general_acc_delta_mean"] is None else f"{100 * r['general_acc_delta_mean']:+.1f}",
                     *[f"{100 * (r['general_acc'][t] - ga['general_acc'][t]):+.1f} +- {100 * r['general_acc_se'][t]:.1f}"
                       for t in tasks]] for r in runs if r.get("general_acc")]), ""]
    L += [f"![general accuracy {k[4:]}]({figs[k]})" for k in ("acc_cot", "acc_label") if k in figs]
    L += ["", "**Does code length track capability? (Proposition 3.1's premise)** Spearman over the runs between "
          "the change in pooled general code length and the change in mean general accuracy (a negative value: "
          "more bits, less accuracy): " + (f"{fmt(sp['rho'])} over {sp['n']} runs." if sp["rho"] is not None
                                           else f"{sp['note']}."), ""]
    return L + ([f"![code length vs accuracy]({figs['bits_vs_acc']})", ""] if "bits_vs_acc" in figs else [])


def _finish_plane(fig, ax, ylabel: str, title: str, path: Path, legend_size: int) -> str:
    """Axes through the base model, the trade-off plane's labels, legend; saved."""
    ax.axhline(0, lw=0.6, color="gray")
    ax.axvline(0, lw=0.6, color="gray")
    ax.set_xlabel("domain gain (bits saved per held-out gold completion)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return save_figure(fig, path)


def trajectories_png(rows: list[dict], mg: dict, path: Path, title: str) -> str:
    """Each run's trajectory on the trade-off plane (domain gain x, pooled general delta y; one line a
    run, a colour a method) and each method's matched-gain frontier at the levels (steps, no
    interpolation between levels is implied: the markers are the values)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    cmap = plt.get_cmap("tab10")
    methods = sorted({r["method"] for r in rows if r.get("trajectory")})
    ends, names, colors = [], [], []
    for k, m in enumerate(methods):
        for j, r in enumerate(r for r in rows if r["method"] == m and r.get("trajectory")):
            t = r["trajectory"]
            ax.plot([p["domain_gain_bits"] for p in t], [p["general_delta_bits_pooled"] for p in t], "-o", ms=2.5,
                    lw=0.9, color=cmap(k), alpha=0.7, label=f"{m} runs (last step labelled: lr, step)" if j == 0 else None)
            ends.append((t[-1]["domain_gain_bits"], t[-1]["general_delta_bits_pooled"]))
            names.append(f"{r['lr']:g}, {t[-1]['step']}")
            colors.append(cmap(k))
        least = mg["least_degradation"].get(m, [])
        pts = [(g, d) for g, d in zip(mg["levels"], least) if d is not None]
        ax.scatter([g for g, _ in pts], [d for _, d in pts], marker="_", s=220, lw=2.2, color=cmap(k),
                   label=f"{m} frontier (least degradation at gain >= level)")
    annotate_points(ax, ends, names, fontsize=6.5, color=colors)
    return _finish_plane(fig, ax, "general delta (bits/token, pooled HumanEval + GSM8K)", title, path, 7)


NOT_TESTABLE = "not testable with this grid"
MIN_SPEARMAN_N = 3  # a rank correlation of fewer runs is +-1 or undefined: no evidence either way


def _by(runs, variant, method=None, sweep=False):
    """The variant's runs (of ``method``); ``sweep``: only the rate sweep (runs with the study's
    step count: the findings compare rates at equal steps)."""
    return [r for r in runs if r["variant"] == variant and (method is None or r["method"] == method)
            and not (sweep and r.get("own_steps"))]


def finding1(runs: list[dict]) -> list[str]:
    """Finding 1: a smaller learning rate gives a better trade-off (less degradation per domain gain)."""
    lines, verdicts = [], []
    for v in ("cot", "label"):
        for m in sorted({r["method"] for r in _by(runs, v)} - {"wise-ft"}):
            rs = sorted(_by(runs, v, m, sweep=True), key=lambda r: r["lr"])
            if len(rs) < 2:
                continue
            lo, hi = rs[0], rs[-1]
            better = general_delta(lo) <= general_delta(hi) and lo["domain_acc"] >= hi["domain_acc"] - 1e-12
            verdicts.append(better)
            lines.append(f"- {v}/{m}: lr {lo['lr']:g}: acc {fmt(lo['domain_acc'])}, gain {fmt(lo['domain_gain_bits'])} "
                         f"bits, general {fmt(general_delta(lo))} bits/token; lr {hi['lr']:g}: acc "
                         f"{fmt(hi['domain_acc'])}, gain {fmt(hi['domain_gain_bits'])} bits, general "
                         f"{fmt(general_delta(hi))} bits/token -> smaller rate "
                         f"{'no worse on both axes' if better else 'not better on both axes'}.")
    if not verdicts:
        return [f"Finding 1: {NOT_TESTABLE} (no method has two learning rates in the completed runs)."]
    word = "holds" if all(verdicts) else "holds in part" if any(verdicts) else "does not hold"
    return lines + [f"Verdict: Finding 1 {word} "
                    f"here ({sum(verdicts)} of {len(verdicts)} method/variant pairs: the smallest rate degrades "
                    f"general capability no more and keeps domain accuracy no lower than the largest)."]


def finding2(runs: list[dict], tol: float = 0.01) -> list[str]:
    """Finding 2: label-only supervision widens the safe range (rates whose degradation <= tol)."""
    out, ranges = [], {}
    for v in ("cot", "label"):
        rs = _by(runs, v, "ce", sweep=True)
        ranges[v] = sorted(r["lr"] for r in rs if general_delta(r) <= tol)
        if not rs:
            continue
        out.append(f"- {v}/ce: general degradation by rate: "
                   + ", ".join(f"{r['lr']:g}: {fmt(general_delta(r))}" for r in sorted(rs, key=lambda r: r["lr"]))
                   + f"; safe (<= {tol:g} bits/token): {', '.join(f'{x:g}' for x in ranges[v]) or 'none'}.")
    short = [v for v in ("cot", "label") if len(_by(runs, v, "ce", sweep=True)) < 2]
    if short:
        return out + [f"Finding 2: {NOT_TESTABLE} (CE of {' and '.join(short)} at fewer than two learning "
                      "rates: a safe range needs a rate sweep in both variants)."]
    wider = (max(ranges["label"], default=0) >= max(ranges["cot"], default=0)
             and len(ranges["label"]) >= len(ranges["cot"]))
    return out + [f"Verdict: Finding 2 {'holds' if wider else 'does not hold'} here (label-only safe range "
                  f"{'at least as wide as' if wider else 'narrower than'} CoT's)."]


def _full_ft(r: dict) -> bool:
    """A full fine-tuning run (not a WiSE-FT point, not LoRA)."""
    return r["method"] != "wise-ft" and not is_lora(r["method"])


def _talr_line(runs: list[dict], v: str) -> str | None:
    """TALR vs the other runs of variant ``v`` at its largest rate (LoRA at its own rate, WiSE-FT of
    the large-rate runs); None when ``v`` has no full fine-tuning run."""
    trained = [r for r in _by(runs, v, sweep=True) if _full_ft(r)]
    if not trained:
        return None
    hi = max(r["lr"] for r in trained)
    at = [r for r in _by(runs, v, sweep=True) if r["lr"] == hi or is_lora(r["method"])]  # WiSE-FT of the hi-rate runs
    talr = [r for r in at if r["method"] == "talr" and r["lr"] == hi]
    if not talr:
        return f"- {v}: no TALR run at lr {hi:g} yet."
    t = talr[0]
    others = [r for r in at if r is not t]
    beats = [r for r in others if general_delta(t) <= general_delta(r) and t["domain_acc"] >= r["domain_acc"]]
    return (f"- {v} at lr {hi:g}: TALR acc {fmt(t['domain_acc'])}, gain {fmt(t['domain_gain_bits'])} bits, "
            f"general {fmt(general_delta(t))} bits/token; baselines: "
            + "; ".join(f"{label(r)} acc {fmt(r['domain_acc'])}, general {fmt(general_delta(r))}" for r in others)
            + f". TALR is at least as good on both axes as {len(beats)} of {len(others)} "
              f"({', '.join(label(r) for r in beats) or 'none'}).")


def compute_parts(parts: dict | None) -> str:
    """" (gradients 0.33, probes 0.6, ...)": a forecast's compute ratio by what spent it ("" without)."""
    if not parts:
        return ""
    return " (" + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])) + ")"


def matched_gain_verdict(mg: dict | None) -> list[str]:
    """Per variant: "does TALR keep general ability better than CE at matched domain gain?" from
    `theory.frontier.matched_gain` (summary ``matched_gain``), with the levels' numbers."""
    out = []
    for v in ("cot", "label"):
        m = (mg or {}).get(v)
        if m is None:
            continue
        c = m["claim"]
        if c is None:
            out.append(f"- {v}: {NOT_TESTABLE} (trajectories of {', '.join(sorted(m['least_degradation']))} only: "
                       "the claim needs TALR and CE).")
            continue
        ld = m["least_degradation"]

        def val(x):
            return "not reached" if x is None else fmt(x)

        cells = "; ".join(f"gain >= {fmt(g)} bits ({f'{100 * f:g}% of the best' if f else 'absolute'}): "
                          f"TALR {val(ld['talr'][i])}, CE {val(ld['ce'][i])} -> {c['per_level'][i]}"
                          for i, (g, f) in enumerate(zip(m["levels"], m["level_fractions"])))
        reach = {k: sum(x is not None for x in v) for k, v in ld.items()}
        wins = m.get("wins") or {}
        verdict = {"holds": "yes", "fails": "no", "mixed": "mixed (yes at some levels, no at others)",
                   "undecided": "undecided"}[c["verdict"]]
        out.append(f"- {v}: least general degradation (bits/token) over every trajectory point reaching the gain, "
                   f"no interpolation: {cells}. TALR keeps general ability better at matched gain: {verdict} "
                   f"(tolerance max({m['tol']:g} bits/token, {100 * m['rel_tol']:g}%): one seed, an assumed "
                   "seed noise). Best at matched gain: "
                   + ", ".join(f"{k.upper()} at {wins.get(k, 0)} of the {reach[k]} levels it reaches"
                               for k in sorted(ld, key=lambda k: -wins.get(k, 0)))
                   + f" ({len(m['levels'])} levels; a level one method never reaches is no evidence on the claim).")
    return out or [f"TALR vs CE at matched gain: {NOT_TESTABLE} (no run recorded a trajectory)."]


def plateau_lines(pl: dict | None) -> list[str]:
    """The plateau schedule's reference runs: criterion and the step each met it."""
    out = []
    for v, p in sorted((pl or {}).items()):
        met = (f"met it at step {p['met_step']}" if p["met_step"] is not None
               else f"did not meet it within {p['max_steps']} steps")
        out.append(f"- {v}: {p['reference']} on a cosine schedule over {p['max_steps']} steps: {p['criterion']}; "
                   f"{met}, stopped at step {p['stopped_at']} ({fmt(p['epochs'])} epochs of the training rows); "
                   "the other plateau runs of the variant stop at the same step on the same schedule.")
    return out


def talr_vs_baselines(runs: list[dict]) -> list[str]:
    out = [line for line in (_talr_line(runs, v) for v in ("cot", "label")) if line is not None]
    return out or [f"TALR vs the baselines: {NOT_TESTABLE} (no full fine-tuning run yet)."]


def samples_section(base: dict, runs: list[dict]) -> list[str]:
    """The first held-out generation of the base model and of the best run per variant."""
    out = ["## Sample generations (first held-out row, first 300 characters)", ""]
    for v in [v for v in ("label", "cot") if v in base["eval"]]:
        rs = _by(runs, v)
        picks = [("base", base["eval"][v]["samples"][0] if base["eval"][v].get("samples") else "")]
        if rs:
            best = max(rs, key=lambda r: (r["domain_acc"], r["domain_gain_bits"]))
            picks.append((label(best), best.get("sample", "")))
        for name, text in picks:
            out += [f"**{v}, {name}:**", "", "```", (text or "(empty)").strip(), "```", ""]
    return out


def _unit_text(v: str, x: dict) -> str:
    """One forecast unit in the section's opening sentence: its probe, fit, compute, time and memory."""
    return (f"{v}: probe {fmt(x['probe']['steps'])} steps at lr {fmt(x['probe']['lr'])}, fitted kappa "
            f"{'/'.join(fmt(k) for k in x['probe'].get('kappa') or [])} (easy/hard token group; grid 0.02..5), "
            f"lambda_c {fmt(x['probe']['lambda_c'])}, compute ratio "
            f"{fmt(x['compute_ratio'])} of one training run{compute_parts(x.get('compute_parts'))}, "
            f"{fmt((x['seconds'] or 0) / 60)} min"
            + (f", peak resident memory {x['peak_rss_gb']:.1f} GB" if x.get("peak_rss_gb") is not None else "")
            + (f" ({x['rss_at_start_gb']:.1f} GB resident at the unit's start, part of it left by earlier units)"
               if x.get("rss_at_start_gb") is not None else "")
            + (f" with the moments on disk while unread ({x['spill']['spilled_gb']:.1f} GB written and read back, "
               f"{x['spill']['spill_seconds']:.0f} s)" if x.get("spill") else "") + memory_target_text(x))


def memory_target_text(x: dict) -> str:
    """The unit's peak against the target, its variant's CE training run's peak + 2 GB ('' without both)."""
    p, ce = x.get("peak_rss_gb"), x.get("ce_run_peak_gb")
    if p is None or ce is None:
        return ""
    lim = ce + 2.0
    return (f", against a CE run's {ce:.2f} GB + 2 = {lim:.2f} GB: "
            + ("within" if p <= lim else f"over by {p - lim:.2f} GB"))


def forecast_section(runs: list[dict], fs: dict | None) -> list[str]:
    """Forecast (before training, `sft.forecast`) vs measured, per trained run and in summary."""
    L = ["## Forecast vs measured", ""]
    rs = [r for r in runs if r.get("forecast_general_delta_bits") is not None]
    if not fs or not rs:
        return L + ["No forecast unit in the cache (run the study with the forecast on).", ""]
    u = fs["units"]
    L += ["`sft.forecast` (as `talr forecast` runs it) predicted every (method, lr) of each variant from theta0 "
          "and its own probe only, reading no run of the grid (the study schedules it after the variant's runs): "
          "mini-batch gradients at theta0, AdamW replayed on them, one short real CE probe at the grid's "
          "geometric middle rate (" + "; ".join(_unit_text(v, x) for v, x in sorted(u.items()))
          + "). The forecast's dL(P1) is turned into bits per token of the "
          "pooled general set (HumanEval solution tokens + GSM8K question tokens), and compared with the "
          "measured pooled change in the same unit. The forecast gain is in bits per training sequence on "
          "the training examples, the measured one per held-out gold completion: only its ranking is compared.", "",
          md_table(["run", "variant", "forecast general (bits/tok)", "measured general (bits/tok)", "ratio",
                    "forecast gain (bits)", "measured gain (bits)"],
                   [[label(r), r["variant"], r["forecast_general_delta_bits"], r["general_delta_bits_pooled"],
                     r["forecast_general_delta_bits"] / r["general_delta_bits_pooled"]
                     if r["general_delta_bits_pooled"] else None, r.get("forecast_domain_gain_bits"),
                     r["domain_gain_bits"]] for r in rs]), "",
          md_table(["runs", "n", "Spearman general", "within 2x general", "Spearman gain"],
                   [[k, fs[k]["n"], rank_or_untestable(fs[k], "spearman_general"), fs[k]["within_2x_general"],
                     rank_or_untestable(fs[k], "spearman_gain")] for k in ("label", "cot", "all") if fs.get(k) and fs[k]["n"]]), "",
          "Within 2x: |forecast - measured| <= max(|forecast|, |measured|) / 2, or both within 0.01 bits/token "
          "of zero (near-zero changes have no meaningful ratio).", ""]
    return L + advisor_lines(fs) + accuracy_forecast_lines(runs, fs)


def advisor_lines(fs: dict) -> list[str]:
    """Per variant with an advisor record (`experiments.studies.grid_report.grid_advisor`): its hit rate,
    within-budget rate and mean gain lost, and the choice at each budget against the hindsight best."""
    L = []
    for v in ("label", "cot"):
        a = (fs.get(v) or {}).get("advisor")
        if not a or not a["budgets"]:
            continue
        L += [f"Advisor ({v}, `sft.forecast.advise` on the forecasts vs the hindsight best on the measurements; "
              "a hit: the best's method within one rate step, or a feasible choice losing no more than one step): "
              f"hit rate {fmt(a['advisor_hit_rate'])}, measured change within 2x the budget "
              f"{fmt(a['advisor_within_budget'])}, measured domain gain lost against the best "
              f"{_pct(a.get('advisor_gain_lost'))} on average (a near-tie in measured gain is a miss).", "",
              md_table(["budget (bits/tok)", "advisor's choice", "hindsight best", "hit", "within 2x budget",
                        "gain lost"],
                       [[b["budget_bits"], b["choice"], b["best"], b["hit"], b["within_budget"],
                         _pct(b.get("gain_lost"))] for b in a["budgets"]]), ""]
    return L



def accuracy_forecast_lines(runs: list[dict], fs: dict) -> list[str]:
    """The general accuracy forecast (the benchmarks scored on each configuration's predicted model)
    against the measured change, per run and per variant; nothing when no forecast unit scored them."""
    rs = [r for r in runs if r.get("forecast_general_acc_delta_mean") is not None]
    if not rs:
        return []
    L = ["### General accuracy, forecast", "",
         "The forecast also scores the benchmark tasks on each configuration's predicted model (theta0 + "
         "sqrt(r) d_theta, r the size correction of its dL; no run read). Change of the mean accuracy over the "
         "kept tasks against the base, in points; within 2 SE: the forecast lies within two paired standard "
         "errors of the measured change.", "",
         md_table(["run", "variant", "forecast change (points)", "measured change (points)", "paired SE (points)"],
                  [[label(r), r["variant"], round(100 * r["forecast_general_acc_delta_mean"], 6),  # no 1e-14 residues
                    None if r.get("general_acc_delta_mean") is None else round(100 * r["general_acc_delta_mean"], 6),
                    100 * mean_se(r) if r.get("general_acc_se") else None] for r in rs]), ""]
    rows = [[k, a["n"], a["spearman"] if a["spearman"] is not None else f"{NOT_TESTABLE} (n = {a['n']})",
             a["spearman_bits_forecast"] if a["spearman_bits_forecast"] is not None else "-",
             f"{100 * a['mae']:.2f} ({100 * a['mae_no_change']:.2f})",
             f"{a['within_2se']:.3f} ({a['within_2se_no_change']:.3f})"]
            for k in ("label", "cot", "all") if (a := (fs.get(k) or {}).get("accuracy"))]
    if rows:
        L += [md_table(["runs", "n", "Spearman (forecast vs measured accuracy change)",
                        "Spearman (forecast bits vs measured accuracy change)",
                        "mean abs error, points (no-change forecast)", "within 2 SE (no-change forecast)"], rows), "",
              "The no-change forecast (0 for every run) gives the scale: with paired SEs of 1-2 points most "
              "measured changes are themselves within 2 SE of zero, so the ranking is the informative figure.", ""]
    return L


def rank_or_untestable(f: dict, key: str):
    """A Spearman cell: the value, or why the grid cannot give one."""
    if f["n"] < MIN_SPEARMAN_N or f[key] is None or f[key] != f[key]:
        return f"{NOT_TESTABLE} (n = {f['n']})"
    return f[key]


def _rates(cfg: dict, lora: bool) -> str:
    lrs = sorted({e["lr"] for e in cfg["grid"] if is_lora(e["method"]) == lora})
    return ", ".join(f"{x:g}" for x in lrs) or "none"


MEDCALC = {"name": "medcalc", "title": "MedCalc-Bench v1.0", "metric": "accuracy", "stop": "</answer>",
           "categories": "calculators", "group": "note", "variants": ["cot", "label"]}  # studies from before the domain axis


def study_domain(study: dict) -> dict:
    """The study's domain record as ``study.json`` states it (MedCalc for older studies)."""
    return study.get("domain") or MEDCALC


def report_header(study: dict) -> list[str]:
    """The report's title and its paragraph on the model, the data (rows per variant, epochs over them when a
    run takes more than one pass), the training and the evaluation."""
    cfg, dom = study["config"], study_domain(study)
    gen = dict((k, v) for k, v in cfg["gen_tokens"])
    vs = [v for v in ("cot", "label") if v in study["n_train_rows"]]
    names = {"cot": "CoT", "label": "label-only"}
    epochs = study.get("epochs", {})  # studies before repeat_rows: one pass
    rows = " or ".join(f"{study['n_train_rows'][v]} {names[v]} rows ({study['train_tokens'][v]} tokens"
                       + (f", examples <= {cfg['max_length']} tokens" if v == "cot" else "")
                       + (f"; {epochs[v]:.2f} epochs of them, in order" if epochs.get(v, 1) > 1 else "") + ")"
                       for v in vs)
    budgets = " / ".join(f"{gen[v]} ({names[v]})" for v in vs)
    return [f"# talr study grid --domain {dom['name']}: SFT of {study['model'].split(' (')[0]} on {dom['title']}", "",
            f"Model: {study['model']} ({study['n_params'] / 1e6:.1f} M parameters, float32). Data: {study['data']}: "
            f"{study['n_kept']} of {study['n_rows']} rows have a label-only prompt of at most "
            f"{cfg['max_prompt_tokens']} tokens ({len(study['calculators'])} {dom['categories']}: short prompts, a "
            f"stated selection that keeps 2-core training affordable); split by "
            f"{dom['group']} ({cfg['heldout_fraction']:g} held out). Training: "
            f"{cfg['steps']} AdamW steps (cosine schedule) of {cfg['batch_size']} sequences, "
            f"{'one epoch over' if all(epochs.get(v, 1) <= 1 for v in vs) else 'over'} {rows}. "
            f"Evaluation: {study['n_eval']} held-out rows; greedy generation with {budgets} new tokens, stopped at "
            f"`{dom['stop']}`, {dom['metric']} by the domain's judge; domain code length of the held-out gold "
            f"completions given their prompts (bits per completion); general code length of {cfg['n_humaneval']} "
            f"HumanEval canonical solutions given their prompts and of {cfg['n_gsm8k']} GSM8K test questions "
            f"(bits/token). Learning rates {_rates(cfg, False)} (LoRA {_rates(cfg, True)}): the paper's 1e-6..5e-6 "
            f"for a 3B model over thousands of steps barely moves a 135M model in {cfg['steps']} steps.", ""]


def _base_section(study: dict, b: dict) -> list[str]:
    dom = study_domain(study)
    return ["## Base model", "",
            md_table(["variant", f"domain {dom['metric']}", "correct / n", "unparsed", f"reached {dom['stop']}",
                      "domain bits/completion"],
                     [[v, b[v]["domain_acc"], f"{b[v]['n_correct']}/{b[v]['n_eval']}", b[v]["n_unparsed"],
                       b[v]["reached_stop"], b[v]["domain_bits"]] for v in ("cot", "label") if v in b]), "",
            f"General code length: HumanEval {fmt(b['general']['humaneval_bits_per_token'])} bits/token, GSM8K "
            f"{fmt(b['general']['gsm8k_bits_per_token'])} bits/token.", ""]


def _pair(r: dict, key: str) -> str:
    first = r.get(f"{key}_first")
    return "n/a" if first is None else f"{fmt(first)}/{fmt(r.get(f'{key}_last'))}"


def _variant_tables(runs: list[dict], b: dict, figs: dict, metric: str) -> list[str]:
    """Tables 1-2 analogues, each with its trade-off plane and Pareto set."""
    L = []
    for v, title in (("label", "Table 1 analogue: label-only"), ("cot", "Table 2 analogue: CoT")):
        rows = _by(runs, v)
        if not rows:
            continue
        L += [f"## {title}", "",
              md_table(["run", f"domain {metric}", "d (pts)", "domain gain (bits)", "HumanEval d (bits/tok)",
                        "GSM8K d (bits/tok)", "tau first/last", "median p first/last", "frac p>0.2 first/last",
                        "train s"],
                       [[label(r), r["domain_acc"], 100 * (r["domain_acc"] - b[v]["domain_acc"]), r["domain_gain_bits"],
                         r["general_delta_bits_humaneval"], r["general_delta_bits_gsm8k"], _pair(r, "tau"),
                         _pair(r, "median_p"), _pair(r, "frac_p_gt_02"), r.get("train_seconds")] for r in rows]), ""]
        if v in figs:
            L += [f"![trade-off {v}]({figs[v]})", "",
                  f"Pareto set ({v}; higher domain gain, lower general degradation): "
                  + "; ".join(f"{label(r)} (gain {fmt(r['domain_gain_bits'])}, general {fmt(general_delta(r))})"
                              for r in pareto(rows)) + ".", ""]
    return L


def _findings_section(runs: list[dict], b: dict, metric: str, mg: dict | None = None,
                      pl: dict | None = None) -> list[str]:
    L = ["## Findings", "", "**Finding 1 (smaller learning rate, better trade-off).**", "", *finding1(runs), "",
         "**Finding 2 (label-only widens the safe range).**", "", *finding2(runs), "",
         "**TALR vs the baselines at the larger rate (equal steps).**", "", *talr_vs_baselines(runs), "",
         "**TALR vs CE at matched domain gain (trajectories; does TALR keep general ability better?).**", "",
         *matched_gain_verdict(mg), *plateau_lines(pl), "",
         *[f"![trajectories {v}](trajectories_{v}.png)" for v in ("cot", "label") if v in (mg or {})], ""]
    best = max(runs, key=lambda r: r["domain_acc"] - b[r["variant"]]["domain_acc"], default=None)
    if best is not None:
        d = 100 * (best["domain_acc"] - b[best["variant"]]["domain_acc"])
        L += [f"**Domain {metric} target (+10 points over base).** Best: {best['variant']} {label(best)}, "
              f"{fmt(100 * best['domain_acc'], 3)}% vs base {fmt(100 * b[best['variant']]['domain_acc'], 3)}% "
              f"({d:+.1f} points on {b[best['variant']]['n_eval']} held-out rows): target "
              f"{'met' if d >= 10 else 'not met'}.", ""]
    return L


def shown_mfu(mfu) -> str:
    """MFU as the report prints it: never above 100 % (None: the run beat the timed peak)."""
    return "n/a (above the timed peak)" if mfu is None or mfu > 1 else f"{100 * mfu:.1f}%"


def _throughput_section(runs: list[dict]) -> list[str]:
    tr = [r for r in runs if r.get("tokens_per_s") is not None]
    if not tr:
        return []
    return ["## Throughput (model FLOPs utilisation)", "",
            md_table(["run", "tokens/s", "6 N tokens/s (GFLOP/s)", "fp32 matmul peak (GFLOP/s)", "MFU"],
                     [[f"{r['variant']} {label(r)}", r["tokens_per_s"], r.get("model_gflops_per_s"),
                       r.get("matmul_gflops"), shown_mfu(r.get("mfu"))] for r in tr]), "",
            "The peak is the best of 8 timings of a 1024^3 fp32 matmul, taken at the start and again after each "
            "training run in the same process (the running maximum); both numbers swing with other load on the "
            "cores, and a run that beat the timed peak shows n/a, never a utilisation above 100 %. For LoRA 6 N "
            "over-counts the work (the frozen weights get no gradient).", ""]


def _compute_section(runs: list[dict], b: dict) -> list[str]:
    ev = sum(r.get("eval_seconds") or 0.0 for r in runs)
    tr_s = sum(r.get("train_seconds") or 0.0 for r in runs)
    return ["## Compute", "", f"{len(runs)} runs ({sum(r['method'] != 'wise-ft' for r in runs)} trained, "
            f"{sum(r['method'] == 'wise-ft' for r in runs)} WiSE-FT points): training {tr_s / 60:.1f} min, evaluation "
            f"{ev / 60:.1f} min, base evaluation {sum(b['seconds'].values()) / 60:.1f} min, on 2 CPU cores.", "",
            *_memory_lines(runs)]


def _memory_lines(runs: list[dict]) -> list[str]:
    """The trained runs' peak resident memory (training, trajectory probes and evaluation of one
    run, the mark reset at its start); runs cached before it was recorded are counted, not guessed."""
    trained = [r for r in runs if r["method"] != "wise-ft"]
    have = [r for r in trained if r.get("peak_rss_gb") is not None]
    if not have:
        return []
    top = max(have, key=lambda r: r["peak_rss_gb"])
    miss = len(trained) - len(have)
    return [f"Peak resident memory of a trained run (training, trajectory probes, evaluation): at most "
            f"{top['peak_rss_gb']:.1f} GB ({label(top)}), over {_n(len(have), 'run')}"
            + (f"; {_n(miss, 'run')} cached before it was recorded." if miss else "."), ""]


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def _bound_section(runs: list[dict]) -> list[str]:
    withb = [r for r in runs if r.get("prefix_bound_bits") is not None]
    L = ["## Per-prefix bound over measured degradation", ""]
    if not withb:
        return L + ["No run carries the per-prefix bound yet (runs evaluated before it was wired in).", ""]
    def med(rows, key):
        xs = sorted(r[key] for r in rows if r.get(key) is not None)
        return None if not xs else (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2

    def meds_of(rows, what):
        deg = [r for r in rows if r.get("bound_kl_over_measured") is not None]
        if not deg:
            return f"No {what} has a general code length that rose: no bound / measured ratio."
        return (f"Median over the {len(deg)} {what} whose general code length rose: KL bound / measured "
                f"{fmt(med(deg, 'bound_kl_over_measured'))}, chi2 bound / measured {fmt(med(deg, 'bound_over_measured'))}, "
                f"floor / measured {fmt(med(deg, 'floor_over_measured'))}, point-mass bound / measured "
                f"{fmt(med(deg, 'bound_point_over_measured'))}.")

    meds = meds_of([r for r in withb if r.get("alpha") is None], "trained runs") + " " + \
        meds_of(withb, "models (trained runs and WiSE-FT points)")
    return L + [
        "Over the full vocabulary at every coded position of the general set (HumanEval solutions given their "
        "prompts, GSM8K questions; each position its own node, p1 the point mass on the observed token: "
        "`sft.prefixbound`), the exact Delta L(P1) and its per-prefix bounds (`theory.prefix`, Proposition 3.1 "
        "node by node), bits per coded token:", "",
        md_table(["run", "variant", "measured Delta L(P1)", "chi2 bound", "chi2 / measured", "KL / measured",
                  "floor / measured"],
                 [[label(r), r["variant"], r["prefix_delta_bits"], r["prefix_bound_bits"],
                   r["bound_over_measured"], r.get("bound_kl_over_measured"), r.get("floor_over_measured")]
                  for r in withb]), "", meds, "",
        "KL = the change-of-measure (Donsker-Varadhan) bound, t per node (`theory.prefix`, `bound_kl`); "
        "floor = no node-wise bound goes below it.",
        "", *_bound_columns_lines(withb),
        "bound / measured is null where the measured change is not a degradation (Delta L(P1) <= 0). "
        f"{len(runs) - len(withb)} runs carry no bound (null).", ""]


def _bound_columns_lines(runs: list[dict]) -> list[str]:
    """Every per-prefix bound over measured, as `theory.prefix.bound_columns` gives it, per run that has them."""
    rs = [r for r in runs if r.get("bound_columns")]
    if not rs:
        return []
    keys = ("bound_chi2", "bound_chi2_nodewise", "bound_kl", "bound_kl_global", "bound_min", "floor", "bound_point")
    rows = [[label(r), r["variant"], c["measured"], c["first_order"], c["kl_term"],
             *[c.get(f"{k}_over_measured") for k in keys], c["dominant"]] for r in rs for c in [r["bound_columns"]]]
    return ["All the bounds over measured (`theory.prefix.bound_columns`; bits per coded token; null where the "
            "measured change is not a degradation):", "",
            md_table(["run", "variant", "measured dL", "first-order", "KL term", "chi2", "chi2 node-wise",
                      "KL (t per node)", "KL (one t)", "min(KL, chi2) per node", "floor", "point mass", "dominant"], rows),
            "", "point mass = `bound_point`: the supremum over point masses at least as likely as the observed "
            "token (`theory.prefix`; valid for the empirical general set, whose rows are point masses; it may go "
            "below the floor, which holds only for bounds >= 0 at every node).", ""]


def report_markdown(study: dict, base: dict, runs: list[dict], figs: dict, fsum: dict | None = None,
                    mg: dict | None = None, pl: dict | None = None, ga: dict | None = None) -> str:
    """``report.md``: one writer per section (``ga``: the summary's base record with ``spearman``)."""
    b = base["eval"]
    metric = study_domain(study)["metric"]
    return "\n".join(report_header(study) + _base_section(study, b) + _variant_tables(runs, b, figs, metric)
                     + general_acc_section(runs, ga, figs)
                     + _findings_section(runs, b, metric, mg, pl) + _throughput_section(runs) + samples_section(base, runs)
                     + _compute_section(runs, b) + _bound_section(runs) + forecast_section(runs, fsum))
