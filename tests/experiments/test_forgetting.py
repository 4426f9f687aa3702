"""The TALR-vs-CE forgetting study: world variants, cached runs, per-prefix split of dL(P1)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experiments.studies.forgetting import ForgettingConfig, run_study  # noqa: E402
from sft.worlds import WorldConfig, build_world  # noqa: E402


def test_answer_first_puts_the_hard_token_after_the_prompt():
    w = build_world(WorldConfig.smoke(answer_first=True))
    ids, _ = w.p2.leaves()
    for u in ids:
        z = w.p2.prefix(int(u))
        assert z[w.prompt_len] == w.answer_of(z[: w.prompt_len])  # first completion token
        assert not set(z[w.prompt_len + 1:]) & set(w.hard_token_ids.tolist())
    assert WorldConfig.smoke(answer_first=True).key() == WorldConfig.smoke().key()  # same pretrained q0


def test_study_runs_caches_and_splits(tmp_path):
    cfg = ForgettingConfig(out=str(tmp_path / "f"), preset="smoke", steps=4, batch=8, lr=1e-2,
                           variants=("cot", "answer_first"), cache_dir=str(tmp_path / "cache"), progress=False)
    res = run_study(cfg)
    assert len(res["rows"]) == 4 and set(res["talr_minus_ce"]) == {"cot", "answer_first"}
    for r in res["rows"]:
        assert r["dL_P1_bits"] == pytest.approx(r["first_order_bits"] + r["kl_term_bits"], abs=1e-9)
        assert 0 <= r["mode_acc_p1"] <= 1 and r["kl_term_bits"] >= 0
    cached = sorted((tmp_path / "f" / "runs").glob("*.json"))
    assert len(cached) == 4
    stamp = [c.stat().st_mtime_ns for c in cached]
    again = run_study(cfg)  # every run cached: nothing retrained, same numbers
    assert [c.stat().st_mtime_ns for c in cached] == stamp
    assert json.dumps(again["rows"]) == json.dumps(res["rows"])
    assert "TALR minus CE" in (tmp_path / "f" / "forgetting.md").read_text()


def test_study_reruns_with_other_steps_and_seed(tmp_path):
    """A re-run with another --steps or --train-seed failed: the scratch run folder of the first
    call was refused as "not empty"."""
    kw = dict(out=str(tmp_path / "f"), preset="smoke", batch=8, lr=1e-2, variants=("cot",),
              cache_dir=str(tmp_path / "cache"), progress=False)
    first = run_study(ForgettingConfig(steps=2, **kw))
    second = run_study(ForgettingConfig(steps=3, **kw))
    third = run_study(ForgettingConfig(steps=2, train_seed=7, **kw))
    assert [r["steps"] for r in second["rows"]] == [3, 3] and [r["train_seed"] for r in third["rows"]] == [7, 7]
    assert len(list((tmp_path / "f" / "runs").glob("*.json"))) == 6
    assert json.dumps(run_study(ForgettingConfig(steps=2, **kw))["rows"]) == json.dumps(first["rows"])  # cached
