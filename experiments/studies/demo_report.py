"""The tiny-world demo's report (`experiments.studies.demo`): ``report.md`` with PNG figures beside it.

Sections: (a) trade-off plane with the Pareto front, (b) bound vs measured degradation over
steps, (c) token-probability box plots and the p > 0.2 curriculum curve, (d) the claims
ledger, (e) tables mirroring the paper's Tables 1-2 and the findings, tested with numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..outputs import annotate_points, fmt, markdown_table, pyplot, save_figure, write_text


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when both coordinates are to be maximised."""
    idx = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def _tradeoff_png(variant: str, v: dict, lrs, path: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = {min(lrs): "o", max(lrs): "s"}
    runs = [(name, r, dict(marker=markers.get(float(name.split("@")[1]), "^"), s=40)) for name, r in v["runs"].items()]
    wise = [(name, r, dict(marker="x", color="gray", s=30)) for name, r in v.get("wise", {}).items()]
    for _, r, style in runs + wise:  # fine-tuned runs, then WiSE-FT merges
        ax.scatter(r["domain_gain_bits"], -r["dL_P1_bits"], **style)
    pts = [(r["domain_gain_bits"], -r["dL_P1_bits"]) for _, r, _ in runs + wise]
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
    ax.margins(0.12)
    annotate_points(ax, pts, [name for name, _, _ in runs + wise], fontsize=[7] * len(runs) + [6] * len(wise),
                    color=[None] * len(runs) + ["gray"] * len(wise))
    ax.set_xlabel("domain gain: conditional code length saved on P2 (bits/response)")
    ax.set_ylabel("general retention: -dL(P1) (bits/response)")
    ax.set_title(f"Trade-off ({variant}); circles lr={min(lrs):g}, squares lr={max(lrs):g}, x WiSE-FT")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _bound_png(variant: str, v: dict, path: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, r in v["runs"].items():
        if not (name.startswith("ce@") or name.startswith("talr@")):
            continue
        steps = [p["step"] for p in r["points"]]
        meas = [p["kl_p1_bits"] - v["base"]["kl_p1_bits"] for p in r["points"]]
        (line,) = ax.plot(steps, meas, marker="o", ms=3, label=f"{name} measured")
        pb = [p.get("prefix_bound_bits") for p in r["points"]]
        if all(x is not None for x in pb):
            ax.plot(steps, pb, ls=":", marker="^", ms=3, color=line.get_color(), label=f"{name} per-prefix bound")
        if r.get("e3_curve_bits"):
            ax.plot(steps[: len(r["e3_curve_bits"]) + 1], [0.0] + r["e3_curve_bits"], ls="--",
                    color=line.get_color(), label=f"{name} Thm E.3 bound")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dL(P1) = KL(P1||q_t) - KL(P1||q0) (bits)")
    ax.set_title(f"Bounds over measured general degradation ({variant}): paper (dashed), per-prefix (dotted)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: no curve hidden
    return save_figure(fig, path)


def _tokens_png(variant: str, v: dict, path: Path) -> str:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    tp = v.get("token_probs", {})
    names = [k for k, p in tp.items() if len(p)]
    data = [np.concatenate(tp[k]) for k in names]
    if data:
        a1.boxplot(data, showfliers=False)
        a1.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    a1.set_ylabel("p(target token)")
    a1.set_title(f"Target-token probabilities, D2 train ({variant})")
    shown = []
    for name, r in v["runs"].items():
        ep, fr = curriculum(r)
        if name.split("@")[0] in CURRICULUM_METHODS and fr:
            a2.plot(ep, fr, marker="o", ms=3, label=name)
            shown.append(name.split("@")[0])
    a2.set_xlabel("epoch")
    a2.set_ylabel("fraction of batch tokens with p > 0.2 (epoch mean)")
    a2.set_title(curriculum_title(shown))
    if shown:
        a2.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


CURRICULUM_METHODS = {"clip": "clipping", "talr": "TALR"}  # the methods of Fig. 3c, as its title names them


def curriculum_title(methods) -> str:
    """The curriculum panel's title, naming only the Fig. 3c methods that have a curve in it."""
    names = [CURRICULUM_METHODS[m] for m in CURRICULUM_METHODS if m in set(methods)]
    return "Curriculum (Fig. 3c): " + (" and ".join(names) if names else "no clipping or TALR run")


def curriculum(run: dict) -> tuple[list[int], list[float]]:
    """Per-epoch mean of the per-step fraction of supervised tokens with p > 0.2."""
    fr, ep = run.get("frac_p_gt_0.2") or [], run.get("epoch_of_step") or []
    if not fr or len(ep) != len(fr):
        return [], []
    e = np.ceil(np.asarray([x if x is not None else 0.0 for x in ep]) - 1e-9).astype(int)
    vals = np.asarray([x if x is not None else np.nan for x in fr], dtype=float)
    keys = sorted(set(e.tolist()))
    return keys, [float(np.nanmean(vals[e == k])) for k in keys]


def summary_rows(results: dict) -> list[list]:
    rows = []
    for variant, v in results["variants"].items():
        for name, r in v["runs"].items():
            rows.append([variant, name, r["domain_acc"], r["domain_gain_bits"], r["dL_P1_bits"],
                         r.get("e4_bound_bits"), r.get("prefix_bound_bits"), r["lams"][-1] if r["lams"] else None])
    return rows


SUMMARY_HEADERS = ["variant", "method@lr", "domain acc", "domain gain (bits)", "dL(P1) (bits)",
                   "Thm E.4 bound (bits)", "per-prefix bound (bits)", "last fitted lambda"]


def write(results: dict, out: Path) -> Path:
    """``out/report.md`` and its figures: the set-up, one section per world variant, the findings, the
    claims ledger and the summary table (one writer per section below)."""
    out = Path(out)
    lines = intro_section(results)
    for variant, v in results["variants"].items():
        lines += world_section(variant, v, results["config"]["lrs"], out)
    lines += findings_section(results)
    lines += ledger_section(results) + ["## Summary", "", markdown_table(SUMMARY_HEADERS, summary_rows(results)), ""]
    return write_text(out / "report.md", "\n".join(lines))


def seeds_of(cfg: dict) -> list[int]:
    """The fine-tuning seeds of a demo's config: ``seed`` for every run, more for the decisive ones."""
    return [cfg["seed"] + k for k in range(cfg.get("ft_seeds", 1))]


def intro_section(results: dict) -> list[str]:
    cfg = results["config"]
    seeds = seeds_of(cfg)
    return [
        "# talr demo report", "",
        f"Preset `{cfg['preset']}`: tiny-transformer world, {cfg['steps']} optimizer steps per run, "
        f"batch {cfg['batch']}, learning rates {', '.join(f'{x:g}' for x in cfg['lrs'])}, "
        f"exact evaluation every {cfg['eval_every']} steps. Wall time {results.get('wall_seconds', 0):.0f} s.", "",
        f"Regenerate with `talr demo --preset {cfg['preset']} --seed {cfg['seed']}`: world and pretraining seed "
        f"{cfg['seed']}; every run is fine-tuned with seed {cfg['seed']}, and the configurations a verdict compares "
        f"(CE at every rate, every method at the largest) also with seed{'s' if len(seeds) > 2 else ''} "
        f"{', '.join(str(x) for x in seeds[1:]) or 'none'}. Figures and tables show seed {cfg['seed']}; each verdict "
        "says how many fine-tuning seeds it rests on and is \"undecided\" when their ranges overlap.", "",
        "Code lengths are bits per response, exact over the finite trees. Domain gain is the drop of the "
        "conditional code length of P2 completions given their prompts (what completion-only SFT trains); "
        "general degradation is dL(P1) = KL(P1||q) - KL(P1||q0). The bounds use constants estimated at q0 "
        "(Appendix E; nats converted to bits) and the effective steps lambda_t fitted between evaluations "
        "(Theorem E.1, Step 5).", ""]


def world_section(variant: str, v: dict, lrs, out: Path) -> list[str]:
    """One world variant: q0 and its constants, the three figures, the token table, one table per rate."""
    pre, base, c = v["pretrain"], v["base"], v["constants"]
    lines = [f"## World: {variant}", "",
             f"Pretrained q0: KL(P1||q0) = {fmt(pre.get('kl_p1_bits'))} bits per response against "
             f"H(P1) = {fmt(pre.get('H_p1_bits'))} bits; conditional code length on P2 = "
             f"{fmt(base['cond_code_len_p2_bits'])} bits; domain accuracy {fmt(base['domain_acc'])}; P1 mode "
             f"accuracy {fmt(base.get('mode_acc_p1'))}, entropy of q on P1's prefixes "
             f"{fmt(base.get('q_entropy_p1_bits'))} bits.", "",
             "Constants at q0 (nats): " + ", ".join(f"{k}={fmt(c.get(k))}" for k in
                                                    ("M_h", "M_l", "w_S", "s", "m", "H_T", "mu_T", "C1", "C2")), ""]
    if (c.get("H_T") or 0) > 100:
        lines += [f"H_T = sqrt(chi2(P1||q0)) = {fmt(c['H_T'])}: the chi-square divergence over whole responses "
                  "is dominated by the few responses q0 finds least likely, so every bound that carries H_T "
                  "(Theorems E.2-E.5) is loose by orders of magnitude in this world.", ""]
    lines += ["### (a) Trade-off plane", "",
              f"![trade-off {variant}]({_tradeoff_png(variant, v, lrs, out / f'tradeoff_{variant}.png')})", "",
              "### (b) Bound vs measured general degradation", "",
              f"![bound {variant}]({_bound_png(variant, v, out / f'bound_{variant}.png')})", "",
              "### (c) Token probabilities and curriculum", "",
              f"![tokens {variant}]({_tokens_png(variant, v, out / f'tokens_{variant}.png')})", ""]
    return lines + token_table(v.get("token_probs", {})) + [x for lr in lrs for x in rate_table(variant, v, lr)]


def token_table(tp: dict) -> list[str]:
    """Median target-token probability and the easy / hard fractions of each model in ``tp``."""
    if not tp:
        return []
    rows = []
    for k, p in tp.items():
        allp = np.concatenate(p) if len(p) else np.zeros(0)
        stats = [float(np.median(allp)), float((allp > 0.2).mean()), float((allp < 0.1).mean())] if allp.size else [None] * 3
        rows.append([k, *stats])
    return [markdown_table(["model", "median p", "frac p > 0.2", "frac hard (p < 0.1)"], rows), ""]


def rate_table(variant: str, v: dict, lr: float) -> list[str]:
    """Section (e): every method and WiSE-FT merge at one learning rate (paper Tables 1-2 analogue)."""
    rows = [[name.split("@")[0], r["domain_acc"], r["domain_gain_bits"], r["dL_P1_bits"], -r["dL_P1_bits"],
             r.get("prefix_bound_bits"), r.get("mode_acc_p1"), r.get("d_q_entropy_p1_bits"),
             float(np.median(r["sin_theta"])) if r.get("sin_theta") else None]
            for name, r in v["runs"].items() if float(name.split("@")[1]) == lr]
    rows += [[f"WiSE-FT a={r['alpha']:g}", r["domain_acc"], r["domain_gain_bits"], r["dL_P1_bits"],
              -r["dL_P1_bits"], None, r.get("mode_acc_p1"), None, None]
             for r in v.get("wise", {}).values() if r["lr"] == lr]
    return [f"### (e) Table (paper Tables 1-2 analogue), {variant}, lr = {lr:g}", "",
            markdown_table(["method", "domain acc", "domain gain (bits)", "dL(P1) (bits)", "retention (bits)",
                            "per-prefix bound (bits)", "P1 mode acc", "d entropy of q on P1 (bits)",
                            "median sin(theta)"], rows), ""]


def _seeds(n: int) -> str:
    return f"{n} fine-tuning seed{'s' if n != 1 else ''}"


def _vals(xs) -> str:
    return " / ".join(fmt(x) for x in xs)


def findings_section(results: dict) -> list[str]:
    """The findings, tested: per variant, then Finding 2 across the variants."""
    f = results.get("findings", {})
    lines = ["## Findings, tested", "",
             "Per-seed values are separated by \" / \" (seeds in order); a verdict holds only when the ranges of "
             "the compared configurations over their seeds do not overlap.", ""]
    for variant in results["variants"]:
        if variant in f:
            lines += variant_findings_lines(variant, f[variant])
    if "finding2" in f:
        lines += finding2_lines(f)
    return lines


def variant_findings_lines(variant: str, e: dict) -> list[str]:
    f1 = e["finding1"]
    lines = [f"- **{variant}, Finding 1 (smaller lr, better trade-off):** at an equal domain gain of "
             f"{_vals(f1['equal_gain_bits'])} bits, CE degraded P1 by {_vals(f1['small'])} bits at the small lr vs "
             f"{_vals(f1['large'])} at the large lr -> {f1['verdict']} here ({_seeds(f1['n_seeds'])}). End of "
             f"training (first seed): small lr gain {fmt(e['ce_small']['gain_bits'])} / dL(P1) "
             f"{fmt(e['ce_small']['dL_P1_bits'])} / acc {fmt(e['ce_small']['acc'])}; large lr gain "
             f"{fmt(e['ce_large']['gain_bits'])} / dL(P1) {fmt(e['ce_large']['dL_P1_bits'])} / acc "
             f"{fmt(e['ce_large']['acc'])}."]
    if "talr_retention" in e:
        t = e["talr_retention"]
        lines += [f"- **{variant}, TALR at the large lr:** retention ranking (least degradation first, first seed): "
                  f"{', '.join(e['retention_rank_at_large_lr'])}; dL(P1) per seed: "
                  + ", ".join(f"{k} {_vals(x)}" for k, x in t["dL_P1_bits"].items())
                  + f" -> TALR {t['verdict']} here ({_seeds(t['n_seeds'])})."]
    return lines + bound_lines(variant, e) + description_lines(variant, e)


def bound_lines(variant: str, e: dict) -> list[str]:
    t = e.get("e4_tightness", {})
    lines = [f"- **{variant}, bound tightness:** Theorem E.4 bound / measured dL(P1) over {t.get('n')} runs: "
             f"median {fmt(t.get('median'))}, min {fmt(t.get('min'))} (a value below 1 would be a violation)."]
    pt = e.get("prefix_tightness")
    if pt:
        lines += [f"- **{variant}, per-prefix bound** (`theory.bounds.prefix_decomposition` against q0, "
                  f"end of each of {pt['n_runs']} runs): per-prefix bound / measured dL(P1): median "
                  f"{fmt(pt['median'])}, max {fmt(pt['max'])}, violations {pt['violations']} (over "
                  f"{pt['n_points']} evaluation points; exact delta vs measured dL(P1) within "
                  f"{pt['max_identity_gap_bits']:.1e} bits)."]
        if pt.get("median_kl") is not None:
            lines += [f"- **{variant}, per-prefix bounds / measured dL(P1)** (median over the same runs; "
                      "`theory.prefix.bound_columns`): chi2 " + fmt(pt["median"]) + ", chi2 node-wise "
                      + fmt(pt["median_nodewise"]) + ", KL (t per node) " + fmt(pt["median_kl"]) + ", KL (one t) "
                      + fmt(pt["median_kl_global"]) + ", floor of any node-wise bound " + fmt(pt["median_floor"])
                      + f"; the KL term dominates dL(P1) in {pt['n_kl_term_dominant']} of {pt['n_runs']} runs."]
    return lines


def description_lines(variant: str, e: dict) -> list[str]:
    """What the first seed's runs show without a verdict: Pareto set, rankings, alignment with tilting."""
    lines = []
    if e.get("pareto"):
        lines += [f"- **{variant}, Pareto-optimal runs** (domain gain up, dL(P1) down): {', '.join(e['pareto'])}."]
    for lr, rk in (e.get("ranking") or {}).items():
        lines += [f"- **{variant}, lr {lr}, method ranking:** by dL(P1) (least first) {', '.join(rk['by_kl'])}; "
                  f"by P1 mode accuracy (highest first) {', '.join(rk['by_mode_acc'])}."]
    st = {k: x for k, x in (e.get("sin_theta_median") or {}).items() if x is not None}
    if st:
        lines += [f"- **{variant}, alignment with tilting** (median over evaluation intervals of the mass-weighted "
                  "sin(theta) between the realised log-shift on the D2 tree and the tilting direction; 0 = a "
                  "tilt, 1 = orthogonal): " + ", ".join(f"{k} {x:.2f}" for k, x in st.items()) + "."]
    return lines


def finding2_lines(f: dict) -> list[str]:
    f2 = f["finding2"]
    lines = [f"- **Finding 2 (label-only widens the safe range):** degradation ratio large/small lr is "
             f"{_vals(f2['label'])} label-only vs {_vals(f2['cot'])} CoT (expected hard tokens per example s = "
             f"{fmt(f['label']['s_hard_per_example'])} vs {fmt(f['cot']['s_hard_per_example'])}) -> "
             f"{f2['verdict']} here ({_seeds(f2['n_seeds'])})."]
    tight = f["cot"].get("finding2_tight")
    if tight:
        lines += ["- **Finding 2 under the tight form** (Theorem B.3 (= E.5) without relaxation (14), this run's "
                  "constants at q0, so no fine-tuning seed): "
                  f"lambda_max label-only / CoT = {fmt(tight['per_token'])} per token vs {fmt(tight['paper'])} with "
                  f"the paper's V_s (> 1: label-only tolerates larger steps) -> the tight form "
                  f"{'supports' if tight['per_token'] > 1 else 'does not support'} Finding 2's explanation."]
    return lines


def ledger_section(results: dict) -> list[str]:
    return ["", "## (d) Claims ledger", "",
            markdown_table(["statement", "verdict", "checked", "violations"],
                           [[c["id"], c["verdict"], c.get("n_instances"), c.get("n_violations")]
                            for c in results.get("ledger", [])]),
            "", "Run `talr claims` for the counterexamples and notes behind each verdict.", ""]
