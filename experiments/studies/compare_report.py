"""`talr compare`'s outputs: ``compare.md`` (table, constants, tightness), ``compare.png`` (bound over
measured degradation per checkpoint) and ``compare.json`` (everything), beside the run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..outputs import fmt, markdown_table, pyplot, save_figure, write_json, write_text


def bound_figure(result: dict, path: Path) -> str:
    """Measured dL(P1) (tree and full) per checkpoint with the Theorem E.3 curve, the Theorem
    B.2 (= E.4) points and the per-prefix bound; returns the PNG's file name."""
    plt = pyplot()
    pts = result["points"]
    steps = [p["step"] for p in pts]
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    ax.plot(steps, [p["dL_P1_tree_bits"] for p in pts], "o-",
            label=f"measured dL(P1), tree depth {result['tree']['depth']}")
    ax.plot(steps, [p["dL_P1_bits"] for p in pts], "s:", ms=4, label="measured general code-length change (full)")
    e3 = [0.0] + [p.get("e3_bound_bits") for p in pts[1:]]
    if all(x is not None for x in e3):
        ax.plot(steps, e3, "--", color="C3", label="Thm E.3 bound (A Lambda_t + C1 S_t)")
    pb = [0.0] + [p.get("prefix_bound_bits") for p in pts[1:]]
    if all(x is not None for x in pb):
        ax.plot(steps, pb, "^:", color="C2", label="per-prefix bound (sqrt(chi2_bar) sqrt(Vbar) + KL term)")
    e4 = [(p["step"], p["e4_bound_bits"]) for p in pts[1:] if p.get("e4_bound_bits") is not None]
    if e4:
        ax.plot(*zip(*e4), "x", color="C4", ms=8, label="Thm E.4 bound at measured domain gain")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.axhline(0, lw=0.5, color="gray")
    ax.set_xlabel("optimizer step (checkpoint)")
    ax.set_ylabel("general degradation (bits per response)")
    ax.set_title(f"Predicted bound over measured degradation: {Path(result['run']).name}")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_outputs(result: dict, out: Path) -> None:
    """Write compare.png, compare.md and compare.json into ``out``."""
    fig = bound_figure(result, out / "compare.png")
    c = result["constants"]
    rows = [[p["checkpoint"], p["step"], p["general"]["bits_per_token"], p["dL_P1_bits"], p["dL_P1_tree_bits"],
             p["domain"]["bits_per_token"], p["domain_gain_bits"], p["domain_gain_tree_bits"], p.get("lam"),
             p.get("e3_bound_bits"), p.get("e4_bound_bits"), p.get("prefix_bound_bits"), p.get("sin_theta")]
            for p in result["points"]]
    tr = result["tree"]
    ratios = [p["e4_bound_bits"] / p["dL_P1_tree_bits"] for p in result["points"][1:]
              if p.get("e4_bound_bits") is not None and p["dL_P1_tree_bits"] > 1e-9]
    lines = [f"# talr compare: {result['run']}", "",
             f"General set (D1): `{result['general_eval']}` ({tr['n_general']} sequences); domain set (D2): "
             f"`{result['domain_eval']}` ({tr['n_domain']} sequences). Trees of depth {tr['depth']} over "
             f"{tr['alphabet_used_tokens']} used tokens{' + other' if tr['other_symbol'] else ''} + EOS "
             f"(stop token id {tr['stop_token_id']}); {tr['nodes_p1']} / {tr['nodes_p2']} / {tr['nodes_union']} nodes "
             f"(D1 / D2 / union). Wall time {result['wall_seconds']:.0f} s.", "",
             f"![bound over measured]({fig})", "",
             markdown_table(["checkpoint", "step", "D1 bits/token", "dL(P1) full (bits)", "dL(P1) tree (bits)",
                     "D2 bits/token", "D2 gain full (bits)", "D2 gain tree (bits)", "fitted lambda",
                     "Thm E.3 (bits)", "Thm E.4 (bits)", "per-prefix bound (bits)", "sin(theta)"], rows), "",
             "Constants at the initial model (nats): " + ", ".join(
                 f"{k}={fmt(c.get(k))}" for k in ("M_h", "M_l", "w_S", "s", "m", "H_T", "mu_T", "C1", "C2")) +
             f"; A={fmt(result.get('A'))}.", "",
             (f"Tightness: Theorem E.4 bound / measured tree dL(P1) over {len(ratios)} checkpoints: median "
              f"{fmt(float(np.median(ratios)))}, min {fmt(float(np.min(ratios)))} (below 1 would be a violation)."
              if ratios else "Tightness: no checkpoint with both a Theorem E.4 bound and a positive measured "
                             "degradation."), ""]
    pr = [p["prefix_bound_bits"] / p["dL_P1_tree_bits"] for p in result["points"][1:]
          if p.get("prefix_bound_bits") is not None and p["dL_P1_tree_bits"] > 1e-9]
    viol = sum(p["prefix_bound_bits"] < p["dL_P1_tree_bits"] - 1e-9 for p in result["points"][1:]
               if p.get("prefix_bound_bits") is not None)
    lines += [(f"per-prefix bound / measured tree dL(P1) (`theory.bounds.prefix_decomposition` on the same "
               f"empirical D1 tree, mass outside the alphabet as one outcome): median {fmt(float(np.median(pr)))}, "
               f"max {fmt(float(np.max(pr)))}, violations {viol} over {len(pr)} checkpoints." if pr else
               "per-prefix bound: no checkpoint with a positive measured tree dL(P1)."), "",
              *_bound_columns_lines(result["points"][1:]),
              "sin(theta): mass-weighted sine between the realised log-shift on the D2 tree and the tilting "
              "direction over each checkpoint interval (`theory.corrected.pooled_sin_theta`; 0 = the update is a "
              "tilt, the paper's picture; near 1 = no tilting step reproduces it).", ""]
    errs = sorted({p["e4_error"] for p in result["points"][1:] if p.get("e4_error")})
    if errs:
        lines += ["Theorem E.4 not evaluated where: " + "; ".join(errs), ""]
    lines += ["How to read: 'full' columns are code lengths of whole sequences (completion given prompt where "
              "the set has prompts); 'tree' columns are exact KL changes on the depth-truncated token trees the "
              "bounds are computed on. Approximations (restricted alphabet, pooled prompts, depth, lambda per "
              "checkpoint interval) are listed in `experiments/studies/compare.py` and `sft/treeprobs.py`.", ""]
    write_text(out / "compare.md", "\n".join(lines))
    write_json(out / "compare.json", result)


def _bound_columns_lines(points) -> list[str]:
    """Per checkpoint, every per-prefix bound over the measured tree dL(P1) (`theory.prefix.bound_columns`)."""
    cols = [p["prefix"] for p in points if p.get("prefix")]
    if not cols:
        return []
    rows = [[p.get("checkpoint"), c["measured"], c["first_order"], c["kl_term"], c["bound_chi2_over_measured"],
             c["bound_chi2_nodewise_over_measured"], c["bound_kl_over_measured"], c["bound_kl_global_over_measured"],
             c["floor_over_measured"], c["dominant"]] for p, c in zip([p for p in points if p.get("prefix")], cols)]
    return ["Per-prefix bounds / measured tree dL(P1) (bits; `theory.prefix.bound_columns`: chi2 = Cauchy-Schwarz, "
            "KL = change of measure, floor = no node-wise bound goes below it):", "",
            markdown_table(["checkpoint", "measured dL", "first-order", "KL term", "chi2", "chi2 node-wise",
                            "KL (t per node)", "KL (one t)", "floor", "dominant"], rows), ""]
