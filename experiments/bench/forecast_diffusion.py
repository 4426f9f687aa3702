"""The diffusion size model (`sft.forecast.diffusion_dl`, ``size_model="diffusion"``/``"auto"``) scored
offline on grid studies whose forecast units ran: each unit's size probes (their measured points), the
rates, the run length and the model's shape are all it reads, so the forecast it prints is the one the
forecast unit would have written with that setting, without re-running a model pass.

    PYTHONPATH=$PWD .venv/bin/python -m experiments.bench.forecast_diffusion \\
        docs/study-smollm2-T72:label docs/study-smollm2-heldout:label docs/study-smollm2-heldout:cot \\
        --out docs/forecast/diffusion/dev.json --figure docs/forecast/diffusion/dev.png

For every STUDY:VARIANT: per run the diffusion forecast, the measured general change and the unit's own
forecast (bits/token of the pooled general set), whether the unit's probe is a random walk
(`sft.forecast.random_walk`: where ``"auto"`` uses diffusion), Spearman and within 2x (both within 0.01
bits/token of zero counts as within, as in the study's report) of each; then the pooled within 2x.
Beside them (session 13): ``walk``, candidate 8 (``walk_rate="equal"``: c read at lr x sqrt(the method's factor);
LoRA's factor the study's Fisher-weighted share from ``--lora-share``'s files, else the coordinate count's), and,
where ``--split`` holds the probes' per-prefix terms (`experiments.bench.probe_split`), ``split``
(`sft.forecast.split_dl`: first-order + KL forecast apart) with each run's measured terms beside it:

    PYTHONPATH=$PWD .venv/bin/python -m experiments.bench.forecast_diffusion docs/study-smollm2-T72:label \\
        docs/study-smollm2-heldout:label ... --split docs/forecast/split --lora-share docs/forecast/lora_share

The shape is SmolLM2-135M's (``--n-params``, ``--lora-factor``: `sft.forecast.lora_diffusion_factor` of its
``lora_layout`` at r 8, alpha 16); L2's coefficient and the clip are the trainer's defaults.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SMOLLM2_PARAMS = 134515008  # SmolLM2-135M's trainable parameters (tied embeddings)
SMOLLM2_LORA = 0.012332304213965478  # lora_diffusion_factor of its 210 adapted matrices, r 8, alpha 16


def probe_record(unit: dict, study: Path, variant: str | None, folder: Path | None, key: str):
    """``key`` of the unit's probe record, else of the first file of ``folder`` written for this study (and
    ``variant``, unless None: any variant shares the model and general set) by `experiments.bench.probe_split`;
    None when neither has it."""
    if unit["probe"].get(key):
        return unit["probe"][key]
    for f in sorted(folder.glob("*.json")) if folder is not None else ():
        rec = json.loads(f.read_text())
        if Path(rec.get("study", "")).resolve() == study.resolve() and variant in (None, rec.get("variant")) \
                and rec.get(key):
            return rec[key]
    return None


def split_points(unit: dict, study: Path, variant: str, split_dir: Path | None):
    """The probes' (peak rate, first-order term, KL term) for `split_dl`: the unit's own (``size_split``,
    recorded by units run with ``first_order`` or ``method_walk``) or a ``split_dir`` file for this study and
    variant; None when neither has them."""
    return probe_record(unit, study, variant, split_dir, "size_split")


def lora_share(unit: dict, study: Path, share_dir: Path | None):
    """LoRA's Fisher-weighted diffusion factor for a study: the unit's own (``probe.lora_share``) or a
    ``share_dir`` file for this study (any variant) written with ``--lora-share``; None when neither has it."""
    rec = probe_record(unit, study, None, share_dir, "lora_share")
    return None if rec is None else float(rec["factor"])


def method_factors(unit: dict, study: Path, variant: str, factor_dir: Path | None) -> dict | None:
    """Each token weighting's walk factor for a study variant (candidate 9, `sft.forecast.method_walk_factor`):
    the unit's own (``probe.method_factors``) or a ``factor_dir`` file for this study and variant written with
    ``--method-factors``; None when neither has them."""
    rec = probe_record(unit, study, variant, factor_dir, "method_factors")
    return None if rec is None else rec["factors"]


def aware_columns(unit: dict, f: dict, factors: dict | None, share: float | None, walk: bool, kw: dict,
                  split=None) -> dict:
    """Candidate 9's two parts for one row (bits/token): ``fisher`` (version 7 with LoRA's Fisher share) and
    ``aware`` (also the token weighting's measured walk factor on the walk's KL part, the probes' KL terms from
    ``split``; without it on the whole dL), each the unit's own forecast where its probe is not a random walk (the
    ``"auto"`` switch keeps the replay there)."""
    from sft.forecast import diffusion_dl

    per_tok = unit["n_general"] / unit["n_general_tokens"]
    if not walk:
        return {"fisher": f["dL_general_bits_per_token"], "aware": f["dL_general_bits_per_token"], "weight_factor": 1.0}
    lora = share if share is not None else kw["lora_factor"]
    kw = {k: v for k, v in kw.items() if k != "lora_factor"}
    fisher, _ = diffusion_dl(f["method"], f["lr"], unit["probe"]["size_points"], lora_factor=lora, **kw)
    wf = float((factors or {}).get(f["method"], 1.0))
    kl = [(p, k, float("nan")) for p, _, k in split] if split else None
    aware, _ = diffusion_dl(f["method"], f["lr"], unit["probe"]["size_points"], lora_factor=lora,
                            weight_factor=wf, kl_points=kl, **kw)
    return {"fisher": fisher * per_tok, "aware": aware * per_tok, "weight_factor": wf}


def unit_rows(study: Path, variant: str, n_params: int, lora_factor: float, split_dir: Path | None = None,
              share_dir: Path | None = None, factor_dir: Path | None = None, c_below: str = "hold") -> dict:
    """One study variant scored: its rows (method, lr, diffusion, measured, unit's forecast; with the probes'
    split, candidate 8's ``split`` and the run's measured first-order and KL terms) and scores. ``c_below``: how
    version 8's ``aware`` rows read c below the lowest probe (`sft.forecast.diffusion_coefficient`)."""
    from experiments.studies.grid_report import WITHIN_ZERO_TOL
    from sft.config import L2_COEFF
    from sft.forecast import diffusion_dl, random_walk, split_dl
    from sft.forecast_metrics import spearman, within_2x

    rec = json.loads((study / "study.json").read_text())
    name = rec.get("forecast_units", {}).get(variant)
    if name is None:
        raise SystemExit(f"{study}: no {variant} forecast unit in study.json")
    unit = json.loads((study / "cache" / name).read_text())
    steps = int(rec["config"]["steps"])
    per_tok = unit["n_general"] / unit["n_general_tokens"]
    runs = {(r["method"], float(r["lr"])): r for r in json.loads((study / "summary.json").read_text())["runs"]
            if r["variant"] == variant and r.get("general_delta_bits_pooled") is not None and not r.get("plateau")
            and not r.get("own_steps")}
    split = split_points(unit, study, variant, split_dir)
    share = lora_share(unit, study, share_dir)
    factors = method_factors(unit, study, variant, factor_dir)
    lam_c = unit["probe"].get("lambda_c")
    walk = lam_c is not None and random_walk(lam_c, unit["probe"]["lr"])
    rows = []
    for f in unit["rows"]:
        run = runs.get((f["method"], float(f["lr"])))
        if run is None:
            continue
        dl, parts = diffusion_dl(f["method"], f["lr"], unit["probe"]["size_points"], steps=steps,
                                 probe_steps=unit["probe"]["steps"], n_params=n_params, l2_coeff=L2_COEFF,
                                 max_grad_norm=1.0, lora_factor=lora_factor)
        rows.append({"method": f["method"], "lr": f["lr"], "diffusion": dl * per_tok,
                     "measured": run["general_delta_bits_pooled"], "unit_forecast": f["dL_general_bits_per_token"],
                     **parts})
        wdl, wp = diffusion_dl(f["method"], f["lr"], unit["probe"]["size_points"], steps=steps,
                               probe_steps=unit["probe"]["steps"], n_params=n_params, l2_coeff=L2_COEFF,
                               max_grad_norm=1.0, lora_factor=share if share is not None else lora_factor,
                               walk_rate="equal")
        rows[-1].update(walk=wdl * per_tok, walk_factor=wp["method_factor"], walk_c_rate=wp["c_rate"])
        if factors is not None:
            rows[-1].update(aware_columns(unit, f, factors, share, walk, dict(
                steps=steps, probe_steps=unit["probe"]["steps"], n_params=n_params, l2_coeff=L2_COEFF,
                max_grad_norm=1.0, lora_factor=lora_factor, c_below=c_below), split))
        if split is not None:
            sdl, sp = split_dl(f["method"], f["lr"], split, steps=steps, probe_steps=unit["probe"]["steps"],
                               n_params=n_params, l2_coeff=L2_COEFF, max_grad_norm=1.0, lora_factor=lora_factor)
            cols = run.get("bound_columns") or {}
            rows[-1].update(split=sdl * per_tok, split_first_order=sp["first_order_forecast"] * per_tok,
                            split_kl=sp["kl_term_forecast"] * per_tok, measured_first_order=cols.get("first_order"),
                            measured_kl=cols.get("kl_term"))
    out = {"study": str(study), "variant": variant, "steps": steps, "lambda_c": lam_c, "probe_lr": unit["probe"]["lr"],
           "random_walk": walk, "rows": rows, "method_factors": factors}
    m = [r["measured"] for r in rows]
    out["lora_share"] = share
    for key in (("diffusion", "unit_forecast", "walk") + (("split",) if split is not None else ())
                + (("fisher", "aware") if factors is not None else ())):
        f = [r[key] for r in rows]
        out[key] = {"spearman": spearman(f, m), "within_2x": within_2x(f, m, zero_tol=WITHIN_ZERO_TOL), "n": len(rows)}
    return out


def figure(path: Path, units: list[dict]) -> None:
    """Forecast against measured (bits/token, symmetric-log axes: the small rates' changes are near zero or
    negative) for the unit's own forecast, the diffusion's, candidate 8's and (where a unit has its method factors)
    candidate 9's, one colour per study variant; the band is within 2x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("unit_forecast", "the unit's forecast"), ("diffusion", "diffusion (version 7)"),
              ("walk", "walk (candidate 8)")]
    if any("aware" in u for u in units):
        panels.append(("aware", "method-aware walk (candidate 9)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.9 * len(panels), 4.6), sharex=True, sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for i, u in enumerate([u for u in units if key in u]):
            m = [r["measured"] for r in u["rows"]]
            f = [r[key] for r in u["rows"]]
            ax.scatter(m, f, s=22, color=f"C{i}", label=f"{Path(u['study']).name} {u['variant']} (T {u['steps']}): "
                       f"{u[key]['within_2x']:.2f}")
        x = np.geomspace(1e-3, 30, 50)
        ax.fill_between(x, x / 2, 2 * x, color="0.85", zorder=0)
        ax.plot([-1, 30], [-1, 30], color="0.5", lw=0.8)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("measured general change (bits/token)")
        ax.set_title(title)
        ax.legend(fontsize=6.5, title="within 2x", title_fontsize=7, loc="upper left")
    axes[0].set_ylabel("forecast (bits/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def folder_arg(value: str | None, flag: str) -> Path | None:
    if value is None:
        return None
    if not Path(value).is_dir():
        raise SystemExit(f"{flag} {value}: not a folder")
    return Path(value)


def print_unit(folder: str, variant: str, u: dict) -> None:
    """One unit's table: every model's forecast beside the measured change and its two per-prefix terms."""
    print(f"\n## {folder} {variant}, T = {u['steps']}: lambda_c {u['lambda_c']:.3g} vs probe rate {u['probe_lr']:.3g} "
          f"(random walk: {u['random_walk']}; LoRA's Fisher share {u['lora_share']})")
    if u.get("method_factors") is not None:
        print("method factors (candidate 9): " + ", ".join(f"{m} {f:.3f}" for m, f in u["method_factors"].items()))
    print("| run | diffusion (bits/token) | walk (candidate 8) | aware (candidate 9) | measured | unit's forecast "
          "| split: first-order + KL = dL | measured first-order + KL |\n|---|---|---|---|---|---|---|---|")
    for r in u["rows"]:
        sp = f"{r['split_first_order']:.3f} + {r['split_kl']:.3f} = {r['split']:.3f}" if "split" in r else "-"
        ms = f"{r['measured_first_order']:.3f} + {r['measured_kl']:.3f}" if r.get("measured_kl") is not None else "-"
        aw = f"{r['aware']:.3f}" if "aware" in r else "-"
        print(f"| {r['method']}@{r['lr']:g} | {r['diffusion']:.3f} | {r['walk']:.3f} | {aw} | {r['measured']:.3f} "
              f"| {r['unit_forecast']:.3f} | {sp} | {ms} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("units", nargs="+", help="STUDY_FOLDER:VARIANT (label or cot)")
    ap.add_argument("--n-params", type=int, default=SMOLLM2_PARAMS)
    ap.add_argument("--lora-factor", type=float, default=SMOLLM2_LORA)
    ap.add_argument("--out", default=None, help="JSON file for every unit's rows and scores")
    ap.add_argument("--figure", default=None, help="PNG of forecast vs measured, the unit's and the diffusion's")
    ap.add_argument("--lora-share", default=None, help="folder of `experiments.bench.probe_split --lora-share` "
                    "files: candidate 8's ``walk`` (walk_rate equal, LoRA's Fisher share) uses a study's share "
                    "there (else the unit's, else the coordinate count's)")
    ap.add_argument("--split", default=None, help="folder of `experiments.bench.probe_split` files: candidate 8 "
                    "(`sft.forecast.split_dl`) scored where a unit's probes are split there or in the unit")
    ap.add_argument("--method-factors", default=None, help="folder of `experiments.bench.probe_split "
                    "--method-factors` files: candidate 9's ``aware`` (version 7 x the token weighting's walk factor, "
                    "LoRA's Fisher share from --lora-share) and ``fisher`` (the share alone) scored where a study "
                    "variant's factors are there or in the unit")
    ap.add_argument("--c-below", choices=("hold", "equilibrium"), default="hold",
                    help="how the ``aware`` column reads c below the lowest probe: held (version 8; the default "
                         "here, so the recorded scores rerun) or along the probes' slope where c rises as the rate "
                         "falls (candidate 10, the forecast's version 9 since session 17)")
    a = ap.parse_args(argv)
    if a.n_params < 1 or not 0 < a.lora_factor <= 1:
        raise SystemExit("--n-params must be >= 1 and --lora-factor in (0, 1]")
    split_dir, share_dir = folder_arg(a.split, "--split"), folder_arg(a.lora_share, "--lora-share")
    factor_dir = folder_arg(a.method_factors, "--method-factors")
    res, pooled = [], {k: [0.0, 0] for k in ("diffusion", "unit_forecast", "walk", "split", "fisher", "aware")}
    for spec in a.units:
        folder, _, variant = spec.rpartition(":")
        if variant not in ("label", "cot") or not folder:
            raise SystemExit(f"{spec!r}: expected STUDY_FOLDER:label or STUDY_FOLDER:cot")
        u = unit_rows(Path(folder), variant, a.n_params, a.lora_factor, split_dir, share_dir, factor_dir, a.c_below)
        res.append(u)
        print_unit(folder, variant, u)
        for key in [k for k in pooled if k in u]:
            s = u[key]
            print(f"{key}: spearman {s['spearman']:.3f}, within 2x {s['within_2x']:.3f} (n {s['n']})")
            pooled[key][0] += s["within_2x"] * s["n"]
            pooled[key][1] += s["n"]
    summary = {k: v[0] / v[1] for k, v in pooled.items() if v[1]}
    print("\npooled within 2x: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()) + f" over {pooled['diffusion'][1]} runs")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"units": res, "pooled_within_2x": summary}, indent=1))
    if a.figure:
        Path(a.figure).parent.mkdir(parents=True, exist_ok=True)
        figure(Path(a.figure), res)


if __name__ == "__main__":
    main()
