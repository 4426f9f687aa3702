"""Markdown and figure of the SmolLM2 study report (see `experiments.studies.smollm2_report`)."""
from __future__ import annotations

from pathlib import Path

from experiments.outputs import fmt, markdown_table as md_table, pyplot, save_figure

from .smollm2_report import general_delta, label, pareto


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
    for r in rows:
        if id(r) in front:
            ax.scatter([r["domain_gain_bits"]], [general_delta(r)], s=160, facecolors="none", edgecolors="k")
    ax.axhline(0, lw=0.6, color="gray")
    ax.axvline(0, lw=0.6, color="gray")
    ax.set_xlabel("domain gain (bits saved per held-out gold completion)")
    ax.set_ylabel("general degradation (bits/token, mean of HumanEval and GSM8K)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


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
        return ["Not decidable: no method has two learning rates in the completed runs."]
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
        out.append(f"- {v}/ce: general degradation by rate: "
                   + ", ".join(f"{r['lr']:g}: {fmt(general_delta(r))}" for r in sorted(rs, key=lambda r: r["lr"]))
                   + f"; safe (<= {tol:g} bits/token): {', '.join(f'{x:g}' for x in ranges[v]) or 'none'}.")
    if not _by(runs, "cot", "ce") or not _by(runs, "label", "ce"):
        return out + ["Not decidable: CE runs of both variants are needed."]
    wider = (max(ranges["label"], default=0) >= max(ranges["cot"], default=0)
             and len(ranges["label"]) >= len(ranges["cot"]))
    return out + [f"Verdict: Finding 2 {'holds' if wider else 'does not hold'} here (label-only safe range "
                  f"{'at least as wide as' if wider else 'narrower than'} CoT's)."]


def talr_vs_baselines(runs: list[dict]) -> list[str]:
    out = []
    for v in ("cot", "label"):
        trained = [r for r in _by(runs, v, sweep=True) if r["method"] not in ("wise-ft", "lora")]
        if not trained:
            continue
        hi = max(r["lr"] for r in trained)
        at = [r for r in _by(runs, v, sweep=True) if r["lr"] == hi or r["method"] == "lora"]  # WiSE-FT of the hi-rate runs
        talr = [r for r in at if r["method"] == "talr" and r["lr"] == hi]
        if not talr:
            out.append(f"- {v}: no TALR run at lr {hi:g} yet.")
            continue
        t = talr[0]
        others = [r for r in at if r is not t]
        beats = [r for r in others if general_delta(t) <= general_delta(r) and t["domain_acc"] >= r["domain_acc"]]
        out.append(f"- {v} at lr {hi:g}: TALR acc {fmt(t['domain_acc'])}, gain {fmt(t['domain_gain_bits'])} bits, "
                   f"general {fmt(general_delta(t))} bits/token; baselines: "
                   + "; ".join(f"{label(r)} acc {fmt(r['domain_acc'])}, general {fmt(general_delta(r))}"
                               for r in others)
                   + f". TALR is at least as good on both axes as {len(beats)} of {len(others)} "
                     f"({', '.join(label(r) for r in beats) or 'none'}).")
    return out or ["Not decidable: no runs yet."]


def samples_section(base: dict, runs: list[dict]) -> list[str]:
    """The first held-out generation of the base model and of the best run per variant."""
    out = ["## Sample generations (first held-out row, first 300 characters)", ""]
    for v in ("label", "cot"):
        rs = _by(runs, v)
        picks = [("base", base["eval"][v]["samples"][0] if base["eval"][v].get("samples") else "")]
        if rs:
            best = max(rs, key=lambda r: (r["domain_acc"], r["domain_gain_bits"]))
            picks.append((label(best), best.get("sample", "")))
        for name, text in picks:
            out += [f"**{v}, {name}:**", "", "```", (text or "(empty)").strip(), "```", ""]
    return out


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
          "geometric middle rate (" + "; ".join(
              f"{v}: probe {fmt(x['probe']['steps'])} steps at lr {fmt(x['probe']['lr'])}, fitted kappa "
              f"{'/'.join(fmt(k) for k in x['probe'].get('kappa') or [])} (easy/hard token group; grid 0.02..5), "
              f"lambda_c {fmt(x['probe']['lambda_c'])}, compute ratio "
              f"{fmt(x['compute_ratio'])} of one training run, {fmt((x['seconds'] or 0) / 60)} min"
              for v, x in sorted(u.items())) + "). The forecast's dL(P1) is turned into bits per token of the "
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
                   [[k, fs[k]["n"], fs[k]["spearman_general"], fs[k]["within_2x_general"], fs[k]["spearman_gain"]]
                    for k in ("label", "cot", "all") if fs.get(k)]), ""]
    return L


def _rates(cfg: dict, lora: bool) -> str:
    lrs = sorted({e["lr"] for e in cfg["grid"] if (e["method"] == "lora") == lora})
    return ", ".join(f"{x:g}" for x in lrs) or "none"


def report_markdown(study: dict, base: dict, runs: list[dict], figs: dict, fsum: dict | None = None) -> str:
    cfg = study["config"]
    b = base["eval"]
    gen = dict((k, v) for k, v in cfg["gen_tokens"])
    L = ["# talr study smollm2: SFT of SmolLM2-135M-Instruct on real MedCalc-Bench rows", "",
         f"Model: {study['model']} ({study['n_params'] / 1e6:.1f} M parameters, float32). Data: {study['data']}: "
         f"{study['n_kept']} of {study['n_rows']} rows have a Table-4 prompt of at most {cfg['max_prompt_tokens']} "
         f"tokens ({len(study['calculators'])} calculators: short notes, a stated selection that keeps 2-core "
         f"training affordable); split by Note ID ({cfg['heldout_fraction']:g} held out). Training: "
         f"{cfg['steps']} AdamW steps (cosine schedule) of {cfg['batch_size']} sequences, one epoch over "
         f"{study['n_train_rows']['cot']} CoT rows ({study['train_tokens']['cot']} tokens, examples <= "
         f"{cfg['max_length']} tokens) or {study['n_train_rows']['label']} label-only rows "
         f"({study['train_tokens']['label']} tokens). Evaluation: {study['n_eval']} held-out rows; greedy generation "
         f"with {gen['cot']} new tokens (CoT) / {gen['label']} (label-only), stopped at `</answer>`, judged by the "
         f"official MedCalc rules; domain code length of the held-out gold completions given their prompts (bits "
         f"per completion); general code length of {cfg['n_humaneval']} HumanEval canonical solutions given their "
         f"prompts and of {cfg['n_gsm8k']} GSM8K test questions (bits/token). Learning rates {_rates(cfg, False)} "
         f"(LoRA {_rates(cfg, True)}): the paper's 1e-6..5e-6 for a 3B model over thousands of steps barely moves "
         f"a 135M model in {cfg['steps']} steps.", "",
         "## Base model", "",
         md_table(["variant", "domain acc", "correct / n", "unparsed", "reached </answer>", "domain bits/completion"],
                  [[v, b[v]["domain_acc"], f"{b[v]['n_correct']}/{b[v]['n_eval']}", b[v]["n_unparsed"],
                    b[v]["reached_stop"], b[v]["domain_bits"]] for v in ("cot", "label")]), "",
         f"General code length: HumanEval {fmt(b['general']['humaneval_bits_per_token'])} bits/token, GSM8K "
         f"{fmt(b['general']['gsm8k_bits_per_token'])} bits/token.", ""]
    for v, title in (("label", "Table 1 analogue: label-only"), ("cot", "Table 2 analogue: CoT")):
        rows = _by(runs, v)
        if not rows:
            continue
        L += [f"## {title}", "",
              md_table(["run", "domain acc", "d acc (pts)", "domain gain (bits)", "HumanEval d (bits/tok)",
                        "GSM8K d (bits/tok)", "tau first/last", "median p first/last", "frac p>0.2 first/last",
                        "train s"],
                       [[label(r), r["domain_acc"], 100 * (r["domain_acc"] - b[v]["domain_acc"]), r["domain_gain_bits"],
                         r["general_delta_bits_humaneval"], r["general_delta_bits_gsm8k"],
                         f"{fmt(r.get('tau_first'))}/{fmt(r.get('tau_last'))}"
                         if r.get("tau_first") is not None else "n/a",
                         f"{fmt(r.get('median_p_first'))}/{fmt(r.get('median_p_last'))}"
                         if r.get("median_p_first") is not None else "n/a",
                         f"{fmt(r.get('frac_p_gt_02_first'))}/{fmt(r.get('frac_p_gt_02_last'))}"
                         if r.get("frac_p_gt_02_first") is not None else "n/a", r.get("train_seconds")]
                        for r in rows]), ""]
        if v in figs:
            front = pareto(rows)
            L += [f"![trade-off {v}]({figs[v]})", "",
                  f"Pareto set ({v}; higher domain gain, lower general degradation): "
                  + "; ".join(f"{label(r)} (gain {fmt(r['domain_gain_bits'])}, general {fmt(general_delta(r))})"
                              for r in front) + ".", ""]
    best = max(runs, key=lambda r: r["domain_acc"] - b[r["variant"]]["domain_acc"], default=None)
    L += ["## Findings", "", "**Finding 1 (smaller learning rate, better trade-off).**", "", *finding1(runs), "",
          "**Finding 2 (label-only widens the safe range).**", "", *finding2(runs), "",
          "**TALR vs the baselines at the larger rate.**", "", *talr_vs_baselines(runs), ""]
    if best is not None:
        d = 100 * (best["domain_acc"] - b[best["variant"]]["domain_acc"])
        L += [f"**Domain accuracy target (+10 points over base).** Best: {best['variant']} {label(best)}, "
              f"{fmt(100 * best['domain_acc'], 3)}% vs base {fmt(100 * b[best['variant']]['domain_acc'], 3)}% "
              f"({d:+.1f} points on {b[best['variant']]['n_eval']} held-out rows): target "
              f"{'met' if d >= 10 else 'not met'}.", ""]
    tr = [r for r in runs if r.get("mfu") is not None]
    if tr:
        L += ["## Throughput (model FLOPs utilisation)", "",
              md_table(["run", "tokens/s", "6 N tokens/s (GFLOP/s)", "fp32 matmul peak (GFLOP/s)", "MFU"],
                       [[f"{r['variant']} {label(r)}", r["tokens_per_s"], r.get("model_gflops_per_s"),
                         r.get("matmul_gflops"), r["mfu"]] for r in tr]), "",
              "The peak is a 1024^3 fp32 matmul timed in the same process at its start (both numbers swing "
              "with other load on the 2 cores). For LoRA 6 N over-counts the work (the frozen weights get no "
              "gradient).", ""]
    L += samples_section(base, runs)
    ev = sum(r.get("eval_seconds") or 0.0 for r in runs)
    tr_s = sum(r.get("train_seconds") or 0.0 for r in runs)
    L += ["## Compute", "", f"{len(runs)} runs ({sum(r['method'] != 'wise-ft' for r in runs)} trained, "
          f"{sum(r['method'] == 'wise-ft' for r in runs)} WiSE-FT points): training {tr_s / 60:.1f} min, evaluation "
          f"{ev / 60:.1f} min, base evaluation {sum(b['seconds'].values()) / 60:.1f} min, on 2 CPU cores.", ""]
    withb = [r for r in runs if r.get("prefix_bound_bits") is not None]
    L += ["## Per-prefix bound over measured degradation", ""]
    if withb:
        L += [f"On the empirical general tree (HumanEval + GSM8K sequences, restricted alphabet + other, depth 16, "
              "built by `sft.treeprobs` as `talr compare` builds it), the exact Delta L(P1) and its per-prefix "
              "bound (`theory.prefix.prefix_decomposition`, Proposition 3.1 node by node), bits per sequence:", "",
              md_table(["run", "variant", "measured Delta L(P1)", "bound", "bound / measured"],
                       [[label(r), r["variant"], r["prefix_delta_bits"], r["prefix_bound_bits"],
                         r["bound_over_measured"]] for r in withb]), "",
              "bound / measured is null where the measured change is not a degradation (Delta L(P1) <= 0). "
              f"{len(runs) - len(withb)} runs were evaluated before the bound was wired in (null).", ""]
    else:
        L += ["No run carries the per-prefix bound yet (runs evaluated before it was wired in).", ""]
    L += forecast_section(runs, fsum)
    return "\n".join(L)
