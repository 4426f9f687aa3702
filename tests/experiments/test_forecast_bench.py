"""`experiments.bench.forecast_diffusion`'s candidate 9 columns on a hand-made unit record (no model)."""
import math

import pytest

from experiments.bench.forecast_diffusion import aware_columns
from sft.forecast import diffusion_dl

UNIT = {"n_general": 10, "n_general_tokens": 200, "probe": {"size_points": [[1e-4, 2.0, math.nan], [1e-3, 400.0, math.nan]]}}
KW = dict(steps=20, probe_steps=4, n_params=10**6, l2_coeff=0.01, max_grad_norm=1.0, lora_factor=0.01)


def test_aware_is_version_7_times_the_weighting_factor_and_the_fisher_share_replaces_the_count():
    row = {"method": "talr", "lr": 3e-4, "dL_general_bits_per_token": 9.0}
    cols = aware_columns(UNIT, row, {"talr": 2.5, "flow": 0.9}, None, True, dict(KW))
    v7 = diffusion_dl("talr", 3e-4, UNIT["probe"]["size_points"], **KW)[0] * 10 / 200
    assert cols["fisher"] == pytest.approx(v7) and cols["aware"] == pytest.approx(2.5 * v7)
    assert cols["weight_factor"] == 2.5
    lora = aware_columns(UNIT, {**row, "method": "lora", "lr": 1e-3}, {"talr": 2.5}, 0.005, True, dict(KW))
    count = diffusion_dl("lora", 1e-3, UNIT["probe"]["size_points"], **KW)[0] * 10 / 200
    assert lora["fisher"] == pytest.approx(count * 0.5) and lora["aware"] == pytest.approx(lora["fisher"])
    # with the probes' split the factor scales the KL part: c_KL = 1.5 c here, so 1 + 1.5 x 1.5 = 3.25 x version 7
    split = [[1e-4, -1.0, 3.0], [1e-3, -200.0, 600.0]]
    cols = aware_columns(UNIT, row, {"talr": 2.5}, None, True, dict(KW), split)
    assert cols["aware"] == pytest.approx(3.25 * v7)
    # where the probe is not a random walk the "auto" switch keeps the replay: the unit's own forecast
    kept = aware_columns(UNIT, row, {"talr": 2.5}, 0.005, False, dict(KW))
    assert kept["aware"] == kept["fisher"] == 9.0


def test_probe_split_forecasts_a_study_before_its_units_run(tmp_path, capsys):
    """`experiments.bench.probe_split` on a smoke study trained without its forecast units: the probes run
    uncompared, TALR's walk factor is measured, and every configuration's forecast is written, candidate 9 being
    version 7 plus (w - 1) x the walk of the probes' KL terms (CE's rows equal); the file is never overwritten."""
    from experiments.bench import probe_split
    from experiments.cli import main

    study, out = tmp_path / "study", tmp_path / "ps.json"
    assert main(["study", "grid", "--domain", "medcalc", "--preset", "smoke", "--no-forecast", "--no-progress",
                 "--out", str(study)]) == 0
    probe_split.main(["--study", str(study), "--preset", "smoke", "--variant", "label", "--method-factors",
                      "--out", str(out)])
    assert "no label forecast unit yet" in capsys.readouterr().out
    rec = __import__("json").loads(out.read_text())
    assert len(rec["points"]) == 2 and all(math.isnan(p["unit_measured_bits"]) for p in rec["points"])
    w = rec["method_factors"]["factors"]["talr"]
    assert 0 < w < 10
    kl = [(p, k, math.nan) for p, _, k in rec["size_split"]]
    kw = dict(steps=rec["steps"], probe_steps=rec["probe_steps"], n_params=1, l2_coeff=0.01, max_grad_norm=1.0)
    assert {(r["method"], r["lr"]) for r in rec["forecast"]} == {(m, lr) for m in ("ce", "talr") for lr in
                                                                  {r["lr"] for r in rec["forecast"]}}
    for r in rec["forecast"]:
        if r["method"] == "ce":
            assert r["candidate9"] == r["version7"]
        else:
            walk_kl = diffusion_dl("talr", r["lr"], kl, **kw)[0] * rec["n_general"] / rec["n_general_tokens"]
            assert r["candidate9"] == pytest.approx(r["version7"] + (w - 1) * walk_kl, abs=1e-12)
    with pytest.raises(SystemExit, match="exists"):
        probe_split.main(["--study", str(study), "--preset", "smoke", "--variant", "label", "--method-factors",
                          "--out", str(out)])
