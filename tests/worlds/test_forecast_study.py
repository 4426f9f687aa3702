"""`talr study forecast` end to end on a tiny grid: summary keys, caching, files."""
from __future__ import annotations

import json
import math

from experiments.studies.forecast import make_config, run_study


def test_study_smoke_writes_summary_and_resumes(pretrained, tmp_path):
    _, _, cache = pretrained
    cfg = make_config("smoke", out=str(tmp_path / "study"), cache_dir=str(cache), methods=("ce", "l2"),
                      lrs=(1e-3, 1e-2), seeds=(0, 1), progress=False, world_overrides={"pretrain_steps": 150})
    s = run_study(cfg)
    assert s["n_configs"] == 4 and s["n_runs"] == 8
    for k in ("spearman", "spearman_within_lr", "spearman_ceiling", "within_2x", "advisor_hit_rate",
              "advisor_within_budget", "compute_ratio"):
        assert k in s
    assert set(s["baselines"]) == {"lr_alone", "paper_rule", "finch", "power_law", "kl_domain_after"}
    assert math.isfinite(s["compute_ratio"]) and s["compute_ratio"] > 0
    out = tmp_path / "study"
    for name in ("summary.json", "table.md", "forecast_vs_measured.png", "tradeoff.png", "forecast.json"):
        assert (out / name).stat().st_size > 0
    json.loads((out / "summary.json").read_text())  # strict JSON
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 8
    stamps = [p.stat().st_mtime_ns for p in runs]
    s2 = run_study(cfg)  # everything cached: no run is redone
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    assert s2["spearman"] == s["spearman"] or (math.isnan(s2["spearman"]) and math.isnan(s["spearman"]))


def test_study_cli_checks_and_passes_the_grid_options(monkeypatch, tmp_path):
    import pytest

    from experiments import cli
    from experiments.studies import forecast as S

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(S, "run_study", fake)
    out = str(tmp_path / "s")
    for bad in (["--steps", "0"], ["--batch-size", "-2"], ["--lrs", "0.1,2"], ["--lrs", "x"], ["--methods", "ce,sgd"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["study", "forecast", *bad, "--out", out])
        assert e.value.code == 2, bad
    assert "cfg" not in seen
    with pytest.raises(SystemExit):
        cli.main(["study", "forecast", "--steps", "60", "--batch-size", "8", "--lrs", "1e-4,1e-3",
                  "--methods", "ce,l2", "--world-seed", "7", "--seeds", "2,0", "--out", out])
    c = seen["cfg"]
    assert (c.steps, c.batch, c.lrs, c.methods, c.world_seed) == (60, 8, (1e-4, 1e-3), ("ce", "l2"), 7)
    assert c.seeds == (2, 0)


def test_measured_scores_with_one_seed_have_no_ceiling():
    """One training seed: the seed means are that seed's values and the second seed (the
    ceiling's) is NaN, not a copy of the first (which would claim a perfect ceiling)."""
    import numpy as np

    from experiments.studies.forecast import measured_scores

    cfg = make_config("default", methods=("ce",), lrs=(1e-3, 1e-2), seeds=(0,))
    fc = {"rows": [{"method": "ce", "lr": 1e-3}, {"method": "ce", "lr": 1e-2}]}
    runs = [{"spec": {"method": "ce", "lr": lr, "seed": 0}, "dL_P1_bits": d, "domain_gain_bits": g,
             "kl_q0_qT_domain_bits": 1.0} for lr, d, g in ((1e-2, 4.0, 9.0), (1e-3, 0.5, 3.0))]
    m = measured_scores(cfg, fc, runs)
    assert m["dl"].tolist() == [0.5, 4.0] and m["gain"].tolist() == [3.0, 9.0]
    assert m["dl_seed_a"].tolist() == [0.5, 4.0] and bool(np.isnan(m["dl_seed_b"]).all())
