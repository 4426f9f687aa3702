"""`talr compare` on a run folder: works from any directory, skips incomplete checkpoints, warns
when a data file changed since training (issue 13, bugs 2 and 4)."""
import json
import shutil

import pytest

from experiments.cli import main

TINY = "tiny:hidden=32,layers=1,heads=2,intermediate=64"


def test_compare_from_elsewhere_skips_incomplete_checkpoint_and_warns_on_changed_data(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    rows = [{"prompt": f"What is {a}+{b}?", "completion": f"{a + b}"} for a, b in [(2, 3), (4, 1), (6, 2), (3, 3)]]
    (work / "domain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "general.jsonl").write_text(json.dumps({"text": "The cat sat on the mat."}) + "\n")
    monkeypatch.chdir(work)  # relative paths, as a user types them
    assert main(["train", "--model", TINY, "--data", "domain.jsonl", "--out", "run", "--lr", "3e-3", "--max-steps",
                 "4", "--batch-size", "4", "--save-steps", "2", "--no-progress", "--domain-eval", "domain.jsonl",
                 "--general-eval", "general.jsonl"]) == 0
    run = work / "run"
    half = run / "checkpoint-3"  # a half-copied checkpoint: weights but no trainer_state.json
    half.mkdir()
    shutil.copy(run / "checkpoint-2" / "model.safetensors", half / "model.safetensors")
    (half / "optimizer.pt").write_bytes(b"")
    with open(work / "domain.jsonl", "a") as fh:  # the data changed after training
        fh.write(json.dumps({"prompt": "What is 1+1?", "completion": "2"}) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.warns(UserWarning) as record:
        rc = main(["compare", str(run), "--depth", "8", "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    messages = " ".join(str(w.message) for w in record)
    assert "checkpoint-3: incomplete checkpoint skipped" in messages
    assert "domain.jsonl changed since training" in messages
    assert [p["step"] for p in json.loads((run / "compare.json").read_text())["points"]] == [0, 2, 4]
