"""End to end in the exact tiny world (smoke size): CE and TALR at two rates with trajectories, the
matched-gain frontier recomputed by brute force from the written trajectory files."""
import json

import numpy as np
import pytest

from experiments.matched_gain_world import MatchedGainConfig, report, run
from sft.trajectory import read_trajectory
from sft.worlds import WorldConfig, build_world


def test_matched_gain_end_to_end(pretrained, tmp_path):
    cache = pretrained[2]  # the smoke world's pretraining, shared with the other world tests
    cfg = MatchedGainConfig(lrs=(1e-3, 1e-2), variants=("cot",), steps=8, every=4, smoke=True,
                            cache_dir=str(cache), out=str(tmp_path), fractions=(0.5, 0.9))
    res = run(cfg, log=lambda s: None)
    assert json.loads((tmp_path / "results.json").read_text())["variants"]["cot"]["matched_gain"] == \
        res["variants"]["cot"]["matched_gain"]
    r = res["variants"]["cot"]
    assert r["pretrain_cached"]
    trajs = {(m, lr): read_trajectory(tmp_path / "cot" / f"{m}_lr{lr:g}") for m in cfg.methods for lr in cfg.lrs}
    for t in trajs.values():
        assert [p["step"] for p in t] == [0, 4, 8]
    mg = r["matched_gain"]
    best = max(p["domain_gain_bits"] for t in trajs.values() for p in t)
    assert mg["best_gain"] == best and mg["levels"] == [0.5 * best, 0.9 * best]
    for m in cfg.methods:  # brute force over every point the method reached, no interpolation
        g = np.array([p["domain_gain_bits"] for lr in cfg.lrs for p in trajs[(m, lr)]])
        d = np.array([p["general_delta_bits_pooled"] for lr in cfg.lrs for p in trajs[(m, lr)]])
        for i, level in enumerate(mg["levels"]):
            want = d[g >= level].min() if (g >= level).any() else None
            assert mg["least_degradation"][m][i] == want
            at = mg["at"][m][i]  # the (lr, step) realising it: where to run the expensive evaluations
            if want is not None:
                pt = next(p for p in trajs[(m, at["lr"])] if p["step"] == at["step"])
                assert pt["general_delta_bits_pooled"] == want and pt["domain_gain_bits"] >= level
    tree = build_world(WorldConfig.smoke(pretrain_steps=150)).p1  # E_P1[coded tokens], from the tree
    n_coded = tree.mass[1:].sum() + tree.eos_mass[~tree.forced_end()].sum()
    assert r["base"]["general_bits"] / r["base"]["general_bits_per_token"] == pytest.approx(n_coded, rel=1e-12)
    for m, vals in mg["least_degradation_bits_per_response"].items():
        assert vals == pytest.approx([None if x is None else x * n_coded for x in mg["least_degradation"][m]])
    for row in r["equal_step"]:
        last = trajs[(row["method"], row["lr"])][-1]
        assert row["step"] == 8 and row["domain_gain_bits"] == last["domain_gain_bits"]
    assert mg["claim"]["verdict"] in ("holds", "fails", "mixed", "undecided")
    text = report(res)
    assert "matched gain: 'talr keeps general ability better than ce at matched gain'" in text
    assert "Plateau criterion" in text
