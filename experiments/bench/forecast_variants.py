"""A grid study's forecast unit re-run with candidate settings, scored against the runs the study trained.

For a SmolLM2 grid study (`talr study grid`) whose training units are done, this rebuilds the study's data
from its ``study.json`` (preset, seed, steps, batch; the data key is checked), runs
`experiments.studies.grid.forecast_variant` once per ``--set`` group (`sft.forecast.ForecastConfig` fields on
top of the study's; an empty group is the default model) without the benchmark scoring, and scores each
against the measured general change (bits/token of the pooled general set): Spearman and within 2x (both
within 0.01 bits/token of zero counts as within, as in the study's report). The study folder is only read.

    PYTHONPATH=$PWD .venv/bin/python -m experiments.bench.forecast_variants --study docs/study-smollm2-T72 \\
        --variant label --set "" --set additive=1 --out docs/forecast/additive/T72_label.json

Prints one table per group (forecast, measured, ratio per run) and its scores; ``--out`` writes them as JSON.
About 9 minutes per group on 2 CPU cores for SmolLM2-135M's label variant at T = 72.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields
from pathlib import Path


def parse_group(text: str) -> dict:
    """``"a=1,b=x"`` -> ForecastConfig overrides, each value parsed as its field's type; "" -> {}."""
    from sft.forecast import ForecastConfig

    types = {f.name: f.type for f in fields(ForecastConfig)}
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--set {text!r}: {part!r} is not name=value")
        k, v = (x.strip() for x in part.split("=", 1))
        if k not in types:
            raise ValueError(f"--set {text!r}: {k!r} is not a ForecastConfig field")
        t = str(types[k])
        if t == "bool":
            if v.lower() not in ("1", "0", "true", "false"):
                raise ValueError(f"--set {text!r}: {k} wants 1/0/true/false, got {v!r}")
            out[k] = v.lower() in ("1", "true")
        elif t == "int":
            out[k] = int(v)
        elif t == "float":
            out[k] = float(v)
        else:
            out[k] = v
    return out


def study_config(study: Path, preset: str, variant: str):
    """The study's `StudyConfig` for ``variant`` from its study.json (seed, steps, batch; further epochs
    allowed when the record has them), without the benchmark scoring of the predicted models."""
    from experiments.studies.grid import make_config

    rec = json.loads((study / "study.json").read_text())
    c = rec["config"]
    repeat = float(rec.get("epochs", {}).get(variant, 1.0)) > 1.0
    cfg = make_config(preset, variants=(variant,), seed=int(c["seed"]), steps=int(c["steps"]),
                      batch_size=int(c["batch_size"]), repeat_rows=repeat, forecast_accuracy=False)
    return cfg, rec


def measured(study: Path, variant: str) -> dict:
    """(method, lr) -> the run's measured general change (bits/token) and the study's own forecast."""
    runs = json.loads((study / "summary.json").read_text())["runs"]
    return {(r["method"], float(r["lr"])): {"measured": r["general_delta_bits_pooled"],
                                            "study_forecast": r.get("forecast_general_delta_bits")}
            for r in runs if r["variant"] == variant and r.get("general_delta_bits_pooled") is not None
            and not r.get("plateau") and r.get("own_steps") in (None, False)}


def score(rows: list[dict]) -> dict:
    from experiments.studies.grid_report import WITHIN_ZERO_TOL
    from sft.forecast_metrics import spearman, within_2x

    f = [r["forecast"] for r in rows]
    m = [r["measured"] for r in rows]
    return {"n": len(rows), "spearman": spearman(f, m), "within_2x": within_2x(f, m, zero_tol=WITHIN_ZERO_TOL)}


def table(rows: list[dict]) -> str:
    lines = ["| run | forecast (bits/token) | measured | ratio | path F |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = r["forecast"] / r["measured"] if abs(r["measured"]) > 1e-12 else math.inf
        lines.append(f"| {r['method']}@{r['lr']:g} | {r['forecast']:.4f} | {r['measured']:.4f} | {ratio:.2f} | "
                     f"{r.get('path_F', 1.0):.4g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from experiments.studies.grid import forecast_variant, key_of, load_base, prepare_data
    from sft.forecast import FORECAST_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="the grid study's folder (study.json, summary.json)")
    ap.add_argument("--preset", default="heldout", help="the study's preset (default heldout)")
    ap.add_argument("--variant", default="label", choices=("label", "cot"))
    ap.add_argument("--set", action="append", default=None, dest="groups",
                    help='ForecastConfig overrides "name=value,..." for one forecast ("" the default; repeatable)')
    ap.add_argument("--out", default=None, help="JSON file for every group's rows and scores")
    a = ap.parse_args(argv)
    study = Path(a.study)
    if not (study / "study.json").is_file() or not (study / "summary.json").is_file():
        raise SystemExit(f"{study}: no study.json and summary.json (run the study's training units first)")
    groups = [parse_group(g) for g in (a.groups if a.groups is not None else [""])]
    if a.out and Path(a.out).exists():
        raise SystemExit(f"{a.out} exists: refusing to overwrite it")
    cfg, rec = study_config(study, a.preset, a.variant)
    meas = measured(study, a.variant)
    if not meas:
        raise SystemExit(f"{study}: no measured {a.variant} run in summary.json")
    model, tok, desc = load_base(cfg)
    dkey = key_of({**cfg.data_key(), "model_desc": desc})  # as `run_study` keys its units
    if dkey != rec["data_key"]:
        raise SystemExit(f"{study}: data key {dkey} differs from the study's {rec['data_key']} (preset or seed?)")
    data = prepare_data(cfg, tok)
    out = {"study": str(study), "variant": a.variant, "model": FORECAST_MODEL, "groups": []}
    for g in groups:
        res = forecast_variant(model, tok, cfg, data, a.variant, overrides=g)
        rows = [{"method": r["method"], "lr": r["lr"], "forecast": r["dL_general_bits_per_token"],
                 "measured": meas[(r["method"], float(r["lr"]))]["measured"], "path_F": r.get("path_F", 1.0),
                 "size_correction": r.get("size_correction"), "replay_dL_P1_bits": r.get("replay_dL_P1_bits"),
                 **({"replay_model": r["replay_model_dL_P1_bits"] * res["n_general"] / res["n_general_tokens"]}
                    if r.get("replay_model_dL_P1_bits") is not None else {})}
                for r in res["rows"] if (r["method"], float(r["lr"])) in meas]
        sc = score(rows)
        if all("replay_model" in r for r in rows):  # the replay's sized forecast, from the same probes
            sc["replay_model"] = score([{**r, "forecast": r["replay_model"]} for r in rows])
        print(f"\n## overrides {g or '(the default)'}: spearman {sc['spearman']:.3f}, within 2x {sc['within_2x']:.3f} "
              f"(n {sc['n']}), {res['seconds'] / 60:.1f} min, compute {res['compute']['compute_ratio']:.3f}")
        print(f"size points (peak rate, measured, replayed): {res['probe']['size_points']}")
        print(table(rows), flush=True)
        if "replay_model" in sc:
            print(f"the replay's sized forecast (version 5) from the same probes: spearman "
                  f"{sc['replay_model']['spearman']:.3f}, within 2x {sc['replay_model']['within_2x']:.3f}")
        out["groups"].append({"overrides": g, "rows": rows, "scores": sc, "probe": res["probe"],
                              "seconds": res["seconds"], "compute": res["compute"]})
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(a.out)


if __name__ == "__main__":
    main()
