"""The size probes of a grid study's forecast unit re-run alone, their dL(P1) split into the per-prefix
decomposition's two terms (`sft.forecast_run.ForecastGrid.probe_terms`: first-order and KL, full vocabulary):
what `sft.forecast.split_dl` (``ForecastConfig.first_order``, candidate 8) reads, for units that ran before the
probes recorded it. No gradient moments, no replay: the two real CE probes of ``probe_steps`` steps (the grid's
geometric middle rate and its largest, as the unit runs them, same batches) and one full-vocabulary pass each.

    PYTHONPATH=$PWD .venv/bin/python -m experiments.bench.probe_split --study docs/study-smollm2-heldout \\
        --variant label --out docs/forecast/split/heldout_label.json

``--lora-share`` also measures LoRA's diffusion factor weighted by the general set's Fisher information
(`sft.forecast_run.ForecastGrid.measure_lora_share`, ``ForecastConfig.lora_share="fisher"``: two D1 passes);
``--method-factors`` measures each token weighting's Fisher-weighted step size over CE's
(`sft.forecast_run.ForecastGrid.measure_method_factors`, ``ForecastConfig.method_walk``, candidate 9: per method
four backward passes and four D1 passes). ``--no-probes`` skips the probes (the file then holds the LoRA share
and/or the method factors alone).

Prints each probe's measured dL beside the unit's stored one (a check that the probe is the unit's: equal up to
floating-point order; a study whose units have not run yet is measured without the check), its first-order and KL
terms (bits per sequence and per token of the general set), and, from the probes, every (method, rate)'s diffusion
forecast by version 7 and by candidate 9 (``forecast`` in the file; `forecast_rows`): a forecast written before
the grid's runs are read.
About 2-4 minutes per unit on 2 CPU cores for SmolLM2-135M.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def at_theta0(grid, eps: float, lora: bool, methods: bool):
    """LoRA's Fisher share and the method factors (each when asked) at the calibration probe's walk ``eps``, as the
    unit measures them, printed; (share, factors), None for each not asked."""
    share = factors = None
    if lora:
        share = grid.measure_lora_share(eps)
        print(f"LoRA share: Fisher-weighted {share['factor']:.5f} against the coordinate count's "
              f"{share['count_factor']:.5f} (KL {share['kl_lora_bits']:.4g} / {share['kl_full_bits']:.4g} bits/seq "
              f"at eps {share['eps']:.3g})", flush=True)
    if methods:
        factors = grid.measure_method_factors(eps)
        print("method factors: " + ", ".join(f"{m} {f:.3f}" for m, f in factors["factors"].items())
              + " (KL bits/seq per batch: " + "; ".join(f"{m} " + " ".join(f"{x:.4g}" for x in v)
                                                      for m, v in factors["kl_bits"].items()) + ")", flush=True)
    return share, factors


def load_unit(study: Path, rec: dict, variant: str) -> dict:
    """The study's forecast unit for ``variant``, or, where it has not run yet, an empty one (said): the probes
    are then not compared with a unit's."""
    name = rec.get("forecast_units", {}).get(variant)
    path = study / "cache" / name if name is not None else None
    if path is None or not path.exists():
        print(f"{study}: no {variant} forecast unit yet; the probes' dL is not compared with a unit's", flush=True)
        return {"probe": {"size_points": []}}
    return json.loads(path.read_text())


def forecast_rows(grid, points: list[dict], share, factors, per_tok: float) -> list[dict]:
    """Every (method, rate) of the grid's forecast config sized by diffusion from the probes just run, as a unit
    would (`sft.forecast_run.ForecastGrid.diffusion`, bits/token): version 7 and candidate 9 (``method_walk`` on
    the probes' KL terms, LoRA's Fisher share), where each was measured; printed. Where the unit's switch keeps the
    replay (its calibration probe's lam_c above its rate) the unit's rows are the replay's, not these."""
    from dataclasses import replace

    from sft.forecast import VERSION7

    fc = grid.cfg
    grid.size_points = [(p["lr"], p["measured_bits"], math.nan) for p in points]
    grid.size_split = [(p["lr"], p["first_order_bits"], p["kl_term_bits"]) for p in points]
    grid.lora_share, grid.method_factors = share, factors
    v7 = replace(fc, **VERSION7)
    cand = replace(fc, method_walk=factors is not None, lora_share="fisher" if share is not None else "count")
    rows = []
    try:
        for m in fc.methods:
            for lr in fc.lrs:
                row = {"method": m, "lr": float(lr)}
                for key, cfg in (("version7", v7), ("candidate9", cand)):
                    grid.cfg = cfg
                    row[key] = grid.diffusion(m, float(lr))[0] * per_tok
                rows.append(row)
    finally:
        grid.cfg = fc
    print("| run | version 7 (bits/token) | candidate 9 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['method']}@{r['lr']:g} | {r['version7']:.4f} | {r['candidate9']:.4f} |")
    return rows


def main(argv=None) -> None:
    import numpy as np
    import torch

    from experiments.bench.forecast_variants import study_config
    from experiments.studies.grid import general_examples, key_of, load_base, prepare_data, variant_forecast_config
    from sft.forecast import cosine_lrs
    from sft.forecast_run import ForecastGrid, probe_losses

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="the grid study's folder (study.json with a forecast unit)")
    ap.add_argument("--preset", default="heldout", help="the study's preset (default heldout)")
    ap.add_argument("--variant", default="label", choices=("label", "cot"))
    ap.add_argument("--out", required=True, help="JSON file to write (refused if it exists)")
    ap.add_argument("--lora-share", action="store_true", help="measure LoRA's Fisher-weighted diffusion factor")
    ap.add_argument("--method-factors", action="store_true",
                    help="measure each token weighting's Fisher-weighted step size over CE's (candidate 9)")
    ap.add_argument("--no-probes", action="store_true", help="skip the probes (with --lora-share or --method-factors)")
    a = ap.parse_args(argv)
    study, out = Path(a.study), Path(a.out)
    if out.exists():
        raise SystemExit(f"{out} exists: refusing to overwrite it")
    if a.no_probes and not (a.lora_share or a.method_factors):
        raise SystemExit("--no-probes leaves nothing to measure without --lora-share or --method-factors")
    rec = json.loads((study / "study.json").read_text())
    unit = load_unit(study, rec, a.variant)
    cfg, _ = study_config(study, a.preset, a.variant)
    model, tok, desc = load_base(cfg)
    dkey = key_of({**cfg.data_key(), "model_desc": desc})
    if dkey != rec["data_key"]:
        raise SystemExit(f"{study}: data key {dkey} differs from the study's {rec['data_key']} (preset or seed?)")
    data = prepare_data(cfg, tok)
    d1 = general_examples(tok, data)
    n_tok = sum(sum(x != -100 for x in ex["labels"][1:]) for ex in d1)
    fc = variant_forecast_config(cfg, a.variant, tok, len(d1))
    if a.lora_share and "lora" not in fc.methods:
        raise SystemExit(f"{study}: the {a.variant} grid has no LoRA entry (--lora-share)")
    torch.manual_seed(fc.seed)
    t0 = time.perf_counter()
    grid = ForecastGrid(model, data.train[a.variant][:cfg.steps * cfg.batch_size], d1, fc, None)
    k = min(fc.probe_steps, fc.steps)
    rates = [float(np.exp(np.mean(np.log(fc.lrs)))), float(max(fc.lrs))]
    share, factors = at_theta0(grid, rates[0] * math.sqrt(k), a.lora_share, a.method_factors)
    groups = [] if a.no_probes else grid.groups()
    stored = {round(float(p), 12): float(m) for p, m, _ in unit["probe"]["size_points"]}
    points = []
    for lr in ([] if a.no_probes else rates):
        _, pm = probe_losses(model, grid.examples, groups, fc, cosine_lrs(lr, fc.steps)[:k], grid.meter,
                             return_model=True)
        dl = grid.probe_dl(pm)
        fo, kl = grid.probe_terms(pm)
        del pm
        was = stored.get(round(lr, 12), math.nan)
        per_tok = len(d1) / n_tok
        points.append({"lr": lr, "measured_bits": dl, "unit_measured_bits": was, "first_order_bits": fo,
                       "kl_term_bits": kl, "per_token": {"measured": dl * per_tok, "first_order": fo * per_tok,
                                                          "kl_term": kl * per_tok}})
        print(f"probe {lr:.3g}: measured {dl:.4f} bits/seq (unit {was:.4f}), first-order {fo:.4f}, KL {kl:.4f}; "
              f"per token {dl * per_tok:.4f} = {fo * per_tok:.4f} + {kl * per_tok:.4f}", flush=True)
    rows = forecast_rows(grid, points, share, factors, len(d1) / n_tok) if points else []
    res = {"study": str(study), "variant": a.variant, "steps": fc.steps, "probe_steps": k, "forecast": rows,
           "size_split": [[p["lr"], p["first_order_bits"], p["kl_term_bits"]] for p in points], "points": points,
           "lora_share": share, "method_factors": factors, "n_general": len(d1), "n_general_tokens": n_tok, "seconds": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out} ({res['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
