"""Markdown table and figures of the forecast study and of `talr forecast`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.outputs import METHOD_COLORS, markdown_table, pyplot, save_figure, tradeoff_figure, write_text



SCORE_KEYS = ("spearman", "spearman_within_lr", "within_2x", "advisor_hit_rate", "advisor_within_budget",
              "compute_ratio")


def summary_markdown(s: dict) -> str:
    """The scores table (forecast and baselines) and the per-configuration table."""
    head = ["predictor", *SCORE_KEYS]
    rows = [["forecast (talr)", *[s.get(k, float("nan")) for k in SCORE_KEYS]]]
    for name, b in s["baselines"].items():
        rows.append([name, *[(float("nan") if b.get(k) is None else b.get(k, float("nan"))) for k in SCORE_KEYS]])
    txt = (f"# Forecast study (world seed {s['world_seed']}, preset {s['preset']})\n\n"
           f"{s['n_configs']} configurations x {s['n_seeds']} seeds; spearman_ceiling (two seeds' "
           f"measurements) = {s['spearman_ceiling']:.3f} (within a rate: {s['spearman_within_lr_ceiling']:.3f}); compute ratio = {s['compute_ratio']:.3f} "
           f"({s['compute']['unit']}; of which the replays {s['compute'].get('replay_ratio', float('nan')):.3f}"
           + "".join(f", {k.replace('_', ' ')} {v:.3f}" for k, v in sorted((s['compute'].get('parts') or {}).items())
                     if k != "replays") + "). "
           f"within_2x counts a configuration when |forecast - measured| <= max(forecast, measured) / 2 or both are "
           f"within {s.get('within_2x_zero_tol_bits', 0.0):.3g} bits (0.01 bits/token) of zero.\n\n"
           + markdown_table(head, rows) + "\n\n")
    cols = ["method", "lr", "forecast_dL_P1_bits", "measured_dL_P1_bits", "measured_dL_P1_sd", "forecast_gain_bits",
            "measured_gain_bits", "lr_alone_dL_P1_bits", "power_law_dL_P1_bits", "kl_domain_after_bits"]
    txt += "## Per configuration (bits per sequence; measured = mean over seeds)\n\n"
    txt += markdown_table(cols, [[r[c] for c in cols] for r in s["table"]]) + "\n"
    txt += "\n## Advisor\n\n" + markdown_table(
        ["budget (bits)", "choice", "hindsight best", "hit", "measured dL <= 2 budget"],
        [[b["budget_bits"], _name(s, b["choice"]), _name(s, b["best"]), b["hit"], b["within_budget"]]
         for b in s["advisor_budgets"]]) + "\n"
    return txt


def _name(s: dict, i: int) -> str:
    if i < 0:
        return "-"
    r = s["table"][i]
    return f"{r['method']}@{r['lr']:g}"


def forecast_figure(path: Path, s: dict) -> None:
    """Forecast vs measured dL(P1) (log-log), y = x and the 2x band, coloured by method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    f = np.array([r["forecast_dL_P1_bits"] for r in s["table"]])
    m = np.array([r["measured_dL_P1_bits"] for r in s["table"]])
    pos = np.concatenate([f[f > 0], m[m > 0]])
    lo, hi = pos.min() / 2, pos.max() * 2
    xs = np.geomspace(lo, hi, 50)
    ax.fill_between(xs, xs / 2, xs * 2, color="0.9", label="2x band")
    ax.plot(xs, xs, "k-", lw=1, label="y = x")
    for meth in dict.fromkeys(r["method"] for r in s["table"]):
        sel = np.array([r["method"] == meth for r in s["table"]])
        ok = sel & (f > 0) & (m > 0)
        ax.scatter(m[ok], f[ok], s=22, color=METHOD_COLORS.get(meth), label=meth)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured dL(P1) (bits, seed mean)")
    ax.set_ylabel("forecast dL(P1) (bits, before training)")
    ax.set_title(f"spearman {s['spearman']:.2f}, within 2x {s['within_2x']:.2f}")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def write_report(out: Path, s: dict) -> None:
    write_text(out / "table.md", summary_markdown(s))
    forecast_figure(out / "forecast_vs_measured.png", s)
    rows = [{"method": r["method"], "lr": r["lr"], "dL_P1_bits": r["forecast_dL_P1_bits"],
             "domain_gain_bits": r["forecast_gain_bits"]} for r in s["table"]]
    tradeoff_figure(out / "tradeoff.png", rows)
